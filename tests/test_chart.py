"""The Helm chart, with the real helm binary: lint, render with default and
non-default values, validate against Kubernetes' schemas offline, and install
into the real test API server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import require_kube
from fleet import wait_for
from kubecluster import KubeCluster, OperatorProcess, kube_tools
from synfleet.resources.names import FINALIZER

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "synfleet"
KUBERNETES_VERSION = "1.35"
CUSTOM_VALUES = {
    "image": {"repository": "registry.example/synfleet/operator", "tag": "dev", "pullPolicy": "Always"},
    "agentImage": {"repository": "registry.example/synfleet/agent", "tag": "dev"},
    "replicas": 3, "encapPort": 7080,
    "metrics": {"port": 9090, "serviceMonitor": {"enabled": True, "interval": "15s",
                                                 "labels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True, "interval": "20s", "labels": {"release": "prometheus"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                                   "saltHorizonSeconds": 1800}},
    "dashboards": {"enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": "1"},
                   "annotations": {"grafana_folder": "synfleet"}},
    "podDisruptionBudget": {"minAvailable": 2},
    "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                     "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "regcred"}],
}
# Kinds whose schema is not Kubernetes' own: the API server checks them in
# test_chart_installs_into_a_real_api_server (ServiceMonitor needs the
# Prometheus Operator's CRDs, which this cluster lacks; test_observability.py
# loads the rules into a real Prometheus).
CUSTOM_KINDS = {"ClusterKopfPeering", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


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


def test_monitoring_objects_scrape_the_agents_by_pool_and_node_and_ship_the_files(tmp_path):
    docs = render(tmp_path, CUSTOM_VALUES)
    (pods,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert pods["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "synfleet-agent"}
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["interval"]) == ("metrics", "20s")
    assert {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]} == {
        "pool": ["__meta_kubernetes_pod_label_synfleet_io_pool"], "node": ["__meta_kubernetes_pod_node_name"]}
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["SynfleetSaltHorizonShort"].endswith("< 1800")
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["synfleet.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())
    kinds = {d["kind"] for d in render(tmp_path)}
    assert not kinds & {"PodMonitor", "PrometheusRule"}, "monitoring objects are opt-in"


def test_the_schema_describes_every_value_the_chart_has():
    """Every key of values.yaml has its own schema entry, down to the free-form
    maps (labels, resources), so that no value escapes validation."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def undescribed(value, node: dict, path: str) -> list[str]:
        if not isinstance(value, dict) or "properties" not in node:
            return []       # a leaf, or a map the schema takes whole
        return [p for key, sub in value.items()
                for p in ([path + key] if key not in node["properties"] else
                          undescribed(sub, node["properties"][key], f"{path}{key}."))]

    assert undescribed(values, schema, "") == []


@pytest.mark.parametrize("values,message", [
    ({"replicas": "two"}, "replicas"),
    ({"encapPort": 99999}, "encapPort"),
    ({"teardownTimeoutSeconds": 0}, "teardownTimeoutSeconds"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
    ({"replica": 2}, "replica"),           # a typo is not silently ignored
    ({"metrics": {"prometheusRule": {"saltHorizonSeconds": "1h"}}}, "saltHorizonSeconds"),
    ({"dashboards": {"enabled": "yes"}}, "enabled"),
], ids=["replicas-not-a-number", "port-out-of-range", "zero-timeout", "pull-policy", "interval", "typo",
        "salt-horizon-not-seconds", "dashboards-not-a-boolean"])
def test_bad_values_are_refused_naming_the_value(tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    r = subprocess.run([str(kube_tools()["helm"]), "template", "synfleet", str(CHART), "--values", str(path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert message in r.stderr


def test_single_replica_has_no_disruption_budget_and_metrics_can_be_off(tmp_path):
    docs = render(tmp_path, {"replicas": 1, "metrics": {"enabled": False}})
    kinds = [d["kind"] for d in docs]
    assert "PodDisruptionBudget" not in kinds and "Service" not in kinds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert "--metrics-port=0" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kube = KubeCluster(tmp_path_factory.mktemp("chart")).start()
    try:
        yield kube
    finally:
        kube.stop()


def test_chart_installs_into_a_real_api_server(cluster, tmp_path):
    cluster.kubectl("create", "namespace", "edge-system")
    # No Prometheus Operator CRDs here; the dashboard's ConfigMap goes to a namespace of its own.
    cluster.kubectl("create", "namespace", "monitoring")
    values = {**CUSTOM_VALUES, "metrics": {"port": 9090}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    cluster.helm("install", "edge", str(CHART), "--namespace", "edge-system",
                 "--values", str(tmp_path / "values.yaml"))
    dep = json.loads(cluster.kubectl("get", "deployment", "edge-synfleet", "-n", "edge-system",
                                     "-o", "json").stdout)
    assert dep["spec"]["replicas"] == 3
    status = cluster.helm("status", "edge", "--namespace", "edge-system", "-o", "json").stdout
    assert json.loads(status)["info"]["status"] == "deployed"
    dashboard = json.loads(cluster.kubectl("get", "configmap", "edge-synfleet-dashboard", "-n", "monitoring",
                                           "-o", "json").stdout)
    assert json.loads(dashboard["data"]["synfleet.json"])["uid"] == "synfleet-overview"
    cluster.helm("uninstall", "edge", "--namespace", "edge-system")


RELEASE_KINDS = "deployment,serviceaccount,service,role,rolebinding,clusterrole,clusterrolebinding," \
                "clusterkopfpeering,validatingadmissionpolicy,validatingadmissionpolicybinding"


def released(cluster: KubeCluster, release: str) -> list[str]:
    """Every object the chart made for `release` that still exists."""
    out = cluster.kubectl("get", RELEASE_KINDS, "-A", "-l", f"app.kubernetes.io/instance={release}",
                          "-o", "name").stdout
    return out.split()


def crds(cluster: KubeCluster) -> list[str]:
    return cluster.kubectl("get", "crd", "-o", "name").stdout.split()


def test_helm_uninstall_without_pools_leaves_only_the_crds(cluster):
    cluster.kubectl("create", "namespace", "bare-system")
    cluster.helm("install", "bare", str(CHART), "--namespace", "bare-system")
    assert len(released(cluster, "bare")) >= 9
    cluster.helm("uninstall", "bare", "--namespace", "bare-system", "--wait")
    assert released(cluster, "bare") == []
    assert {"customresourcedefinition.apiextensions.k8s.io/" + n for n in (
        "proxypools.synfleet.io", "backendpools.synfleet.io", "synproxypolicies.synfleet.io",
        "nodeagents.synfleet.io")} <= set(crds(cluster)), "Helm never deletes crds/"


def test_helm_uninstall_with_pools_leaves_them_serving_and_a_reinstall_finishes_their_deletion(cluster):
    namespace, release = "pools-system", "pools"
    cluster.kubectl("create", "namespace", namespace)
    cluster.helm("install", release, str(CHART), "--namespace", namespace)
    operator = OperatorProcess(cluster, namespace, f"{release}-synfleet", peering=f"{release}-synfleet").start()
    pool = {"apiVersion": "synfleet.io/v1alpha1", "kind": "ProxyPool", "metadata": {"name": "kept"},
            "spec": {"nodeSelector": {"synfleet.io/proxy": "kept"}, "interface": "eth0"}}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    agent_objects = [("daemonset", "synfleet-proxy-kept"), ("configmap", "synfleet-proxy-kept"),
                     ("secret", "synfleet-salts-kept")]

    def present(kind: str, name: str, ns: str | None = namespace) -> dict | None:
        r = cluster.kubectl("get", kind, name, "-o", "json", *(["-n", ns] if ns else []), check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None
    try:
        wait_for(lambda: all(present(k, n) for k, n in agent_objects)
                 and FINALIZER in (present("proxypool", "kept", None)["metadata"].get("finalizers") or []),
                 "the pool's agent objects and finalizer", timeout=30)
        operator.stop()        # what deleting the operator's Deployment does to its pods
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait")
        assert released(cluster, release) == []
        # The operator made these, not Helm: the agents keep running and serving.
        assert all(present(k, n) for k, n in agent_objects) and present("proxypool", "kept", None)
        cluster.kubectl("delete", "proxypool", "kept", "--wait=false")
        time.sleep(2)
        assert present("proxypool", "kept", None)["metadata"].get("deletionTimestamp"), \
            "with no operator, the finalizer holds the deletion"
        # The documented way out: install again; the operator finishes the deletion.
        cluster.helm("install", release, str(CHART), "--namespace", namespace)
        operator = OperatorProcess(cluster, namespace, f"{release}-synfleet", peering=f"{release}-synfleet",
                                   name="operator-again").start()
        wait_for(lambda: present("proxypool", "kept", None) is None, "the pool's deletion finished", timeout=60)
        wait_for(lambda: not any(present(k, n) for k, n in agent_objects), "its objects collected", timeout=60)
    finally:
        operator.stop()


# The last release whose BackendPool has no spec.drainSeconds (the commit before it was added).
RELEASE_BEFORE_DRAIN = "753a2fe~1"


def test_an_upgrade_brings_new_crd_fields_only_through_the_documented_step(cluster, tmp_path):
    """Helm never upgrades crds/ (docs/operator.md, "Upgrading"): from the
    previous release's chart, after `helm upgrade` alone the API server still
    refuses a field the new CRDs define; `kubectl apply --server-side
    --force-conflicts -f crds/` brings it."""
    previous = tmp_path / "previous"
    previous.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE_BEFORE_DRAIN, "charts/synfleet", "crds"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(previous)], input=archive, check=True)
    namespace, release = "upgrade-system", "upgrade"
    pool = {"apiVersion": "synfleet.io/v1alpha1", "kind": "BackendPool", "metadata": {"name": "upgraded"},
            "spec": {"nodeSelector": {"synfleet.io/backend": "upgraded"}, "interface": "eth0", "drainSeconds": 60}}

    def refused() -> str:
        """What the API server says to the pool with the new field ('' when it takes it)."""
        r = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool), check=False)
        return r.stderr if r.returncode else ""

    cluster.kubectl("create", "namespace", namespace)
    # A cluster installed with the previous release: its CRDs (these tests' earlier installs made the new ones).
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(previous / "crds"))
    try:
        cluster.helm("install", release, str(previous / "charts" / "synfleet"), "--namespace", namespace)
        assert 'unknown field "spec.drainSeconds"' in refused(), "the previous CRD does not know the field"
        cluster.helm("upgrade", release, str(CHART), "--namespace", namespace)
        assert 'unknown field "spec.drainSeconds"' in refused(), "helm upgrade left the previous CRDs in place"
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        wait_for(lambda: not refused(), "the pool taken once the CRDs are upgraded", timeout=10)
        got = json.loads(cluster.kubectl("get", "backendpool", "upgraded", "-o", "json").stdout)
        assert got["spec"]["drainSeconds"] == 60
    finally:
        cluster.kubectl("delete", "backendpool", "upgraded", "--ignore-not-found", "--wait=false")
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait")
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
