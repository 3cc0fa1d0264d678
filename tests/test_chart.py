"""The Helm chart, with the real helm binary: lint, render with default and
non-default values, validate against Kubernetes' schemas offline, and install
into the real test API server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import require_kube
from kubecluster import KubeCluster, kube_tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "synfleet"
KUBERNETES_VERSION = "1.35"
CUSTOM_VALUES = {
    "image": {"repository": "registry.example/synfleet/operator", "tag": "dev", "pullPolicy": "Always"},
    "agentImage": {"repository": "registry.example/synfleet/agent", "tag": "dev"},
    "replicas": 3, "encapPort": 7080,
    "metrics": {"port": 9090, "serviceMonitor": {"enabled": True, "interval": "15s",
                                                 "labels": {"release": "prometheus"}}},
    "podDisruptionBudget": {"minAvailable": 2},
    "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                     "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "regcred"}],
}
# Kinds whose schema is not Kubernetes' own: the API server checks them in
# test_chart_installs_into_a_real_api_server (ServiceMonitor needs the
# Prometheus Operator's CRD, which this cluster lacks).
CUSTOM_KINDS = {"ClusterKopfPeering", "ServiceMonitor"}


def helm(*args: str) -> str:
    return subprocess.run([str(kube_tools()["helm"]), *args], check=True, capture_output=True, text=True).stdout


def render(tmp_path: Path, values: dict | None = None, *extra: str) -> list[dict]:
    args = ["template", "synfleet", str(CHART), "--namespace", "synfleet-system", "--include-crds", *extra]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


@pytest.fixture(autouse=True)
def _tools():
    require_kube()


def test_helm_lint_strict_is_clean(tmp_path):
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(CUSTOM_VALUES))
    for extra in ([], ["--values", str(tmp_path / "values.yaml")]):
        out = helm("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out


def test_chart_crds_are_the_crds_directory_byte_for_byte():
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert ours and chart == ours


@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["default", "custom"])
def test_rendered_manifests_validate_against_kubernetes_schemas(tmp_path, values):
    docs = render(tmp_path, values)
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "CustomResourceDefinition", "ClusterKopfPeering", "Service", "PodDisruptionBudget",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    assert checked >= 12


def test_values_reach_the_operator_deployment(tmp_path):
    docs = render(tmp_path, CUSTOM_VALUES)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 3
    assert c["image"] == "registry.example/synfleet/operator:dev" and c["imagePullPolicy"] == "Always"
    assert "--agent-image=registry.example/synfleet/agent:dev" in c["args"]
    assert "--encap-port=7080" in c["args"] and "--metrics-port=9090" in c["args"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "15s"}]
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 2


def test_single_replica_has_no_disruption_budget_and_metrics_can_be_off(tmp_path):
    docs = render(tmp_path, {"replicas": 1, "metrics": {"enabled": False}})
    kinds = [d["kind"] for d in docs]
    assert "PodDisruptionBudget" not in kinds and "Service" not in kinds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert "--metrics-port=0" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_chart_installs_into_a_real_api_server(tmp_path):
    cluster = KubeCluster(tmp_path).start()
    try:
        cluster.kubectl("create", "namespace", "edge-system")
        values = {**CUSTOM_VALUES, "metrics": {"port": 9090}}     # no ServiceMonitor CRD here
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        cluster.helm("install", "edge", str(CHART), "--namespace", "edge-system",
                     "--values", str(tmp_path / "values.yaml"))
        dep = json.loads(cluster.kubectl("get", "deployment", "edge-synfleet", "-n", "edge-system",
                                         "-o", "json").stdout)
        assert dep["spec"]["replicas"] == 3
        status = cluster.helm("status", "edge", "--namespace", "edge-system", "-o", "json").stdout
        assert json.loads(status)["info"]["status"] == "deployed"
        cluster.helm("uninstall", "edge", "--namespace", "edge-system")
    finally:
        cluster.stop()
