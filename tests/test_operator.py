"""The operator against a real kube-apiserver (tests/kubecluster.py): installed
with the real helm chart, running as the chart's ServiceAccount, driven with
kubectl like a user would. No kubelet runs here: the tests create Node objects
and write DaemonSet status the way the DaemonSet controller would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import require_kube
from kubecluster import KubeCluster, OperatorProcess
from synfleet.resources import names, salts
from synfleet.resources.dataplane import node_document

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "synfleet"
NAMESPACE = "synfleet-system"
RELEASE = "synfleet"          # the chart names everything after the release: "synfleet"
APP_NS = "shop"


def wait_for(what: str, probe, timeout: float = 30.0, interval: float = 0.3):
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def apply(kube: KubeCluster, *docs: dict) -> None:
    kube.kubectl("apply", "-f", "-", input="---\n".join(yaml.safe_dump(d) for d in docs))


def get(kube: KubeCluster, kind: str, name: str, namespace: str | None = NAMESPACE) -> dict | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    r = kube.kubectl(*args, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def node(name: str, addresses: list[str], **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}, {
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "test", "lastHeartbeatTime": "2026-11-25T00:00:00Z",
                                   "lastTransitionTime": "2026-11-25T00:00:00Z"}]}}


def add_node(kube: KubeCluster, name: str, addresses: list[str], **labels: str) -> None:
    obj, status = node(name, addresses, **labels)
    apply(kube, obj)
    kube.merge_patch(f"/api/v1/nodes/{name}/status", status)


def proxy_pool(name: str, rotation_s: int = 60, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "ProxyPool", "metadata": {"name": name},
            "spec": {"nodeSelector": {"synfleet.io/proxy": name}, "interface": "eth0",
                     "salt": {"rotationSeconds": rotation_s}, **spec}}


def backend_pool(name: str, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "BackendPool", "metadata": {"name": name},
            "spec": {"nodeSelector": {"synfleet.io/backend": name}, "interface": "eth0", **spec}}


def spp(name: str, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "SynProxyPolicy",
            "metadata": {"name": name, "namespace": APP_NS}, "spec": spec}


def report_rollout(kube: KubeCluster, ds_name: str, ready: int, desired: int) -> None:
    """What the DaemonSet controller would write once its pods are (not) ready."""
    ds = get(kube, "daemonset", ds_name)
    kube.merge_patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{ds_name}/status", {"status": {
        "currentNumberScheduled": desired, "desiredNumberScheduled": desired, "numberMisscheduled": 0,
        "numberReady": ready, "updatedNumberScheduled": desired, "numberAvailable": ready,
        "observedGeneration": ds["metadata"]["generation"]}})


def condition(obj: dict, ctype: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def configmap_document(kube: KubeCluster, name: str) -> dict | None:
    cm = get(kube, "configmap", name)
    return yaml.safe_load(cm["data"][names.CONFIG_KEY]) if cm else None


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    require_kube()
    cluster = KubeCluster(tmp_path_factory.mktemp("kube")).start()
    try:
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl("create", "namespace", APP_NS)
        cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def operator(kube):
    op = OperatorProcess(kube, NAMESPACE, RELEASE, peering=RELEASE).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def fleet(kube, operator):
    """Two proxy nodes, two backend nodes (dual stack), a pool of each."""
    for i in (1, 2):
        add_node(kube, f"edge-{i}", [f"10.0.0.{i}", f"fd00::{i}"], **{"synfleet.io/proxy": "edge"})
        add_node(kube, f"web-{i}", [f"10.0.1.{i}", f"fd00:1::{i}"], **{"synfleet.io/backend": "web"})
    apply(kube, proxy_pool("edge"), backend_pool("web"))
    wait_for("both DaemonSets", lambda: get(kube, "daemonset", "synfleet-proxy-edge")
             and get(kube, "daemonset", "synfleet-backend-web"))
    return kube


def web_policy(name: str = "web", **spec) -> dict:
    return spp(name, **{"addresses": ["203.0.113.10", "2001:db8::10"], "ports": [443],
                        "proxyPool": "edge", "backendPool": "web", **spec})


def test_chart_installs_crds_rbac_peering_and_the_operator_deployment(kube):
    crds = kube.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {"customresourcedefinition.apiextensions.k8s.io/" + n for n in (
        "synproxypolicies.synfleet.io", "proxypools.synfleet.io", "backendpools.synfleet.io",
        "clusterkopfpeerings.kopf.dev")} <= set(crds)
    assert get(kube, "deployment", RELEASE)["spec"]["replicas"] == 2
    assert get(kube, "clusterkopfpeering", RELEASE, namespace=None) is not None
    assert get(kube, "poddisruptionbudget", RELEASE)["spec"]["minAvailable"] == 1
    as_operator = ["--as", f"system:serviceaccount:{NAMESPACE}:{RELEASE}"]
    can = lambda *a: kube.kubectl("auth", "can-i", *a, *as_operator, check=False).stdout.strip()  # noqa: E731
    assert can("patch", "synproxypolicies.synfleet.io/status", "-n", APP_NS) == "yes"
    assert can("create", "daemonsets", "-n", NAMESPACE) == "yes"
    assert can("create", "daemonsets", "-n", APP_NS) == "no"
    assert can("get", "secrets", "-n", APP_NS) == "no"


def test_pools_and_policy_become_daemonsets_salts_configmaps_and_rbac(fleet):
    apply(fleet, web_policy())
    proxy_doc = wait_for("the policy in the proxy ConfigMap",
                         lambda: (d := configmap_document(fleet, "synfleet-proxy-edge")) and d["policies"] and d)
    (entry,) = proxy_doc["policies"]
    assert entry["name"] == f"{APP_NS}/web" and entry["mode"] == "enforce"
    assert entry["backends"] == ["10.0.1.1", "10.0.1.2"]
    assert {(s["address"], s["port"]) for s in entry["services"]} == {("203.0.113.10", 443), ("2001:db8::10", 443)}
    backend_doc = configmap_document(fleet, "synfleet-backend-web")
    assert backend_doc["allowedProxies"] == ["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]

    secret = get(fleet, "secret", "synfleet-salts-edge")
    published = salts.published_salts(secret)
    assert len(published) == 4 and all(len(k) == 16 for k in published.values())
    # The ConfigMap plus a node's addresses plus the salts is a document the agent accepts.
    node_document(proxy_doc, "10.0.0.1", "fd00::1", published)
    node_document(backend_doc, "10.0.1.1", None)

    ds = get(fleet, "daemonset", "synfleet-proxy-edge")
    assert ds["metadata"]["ownerReferences"][0]["kind"] == "ProxyPool"
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/synfleet/agent:test"
    for role, sa in (("proxy", "synfleet-proxy-edge"), ("backend", "synfleet-backend-web")):
        as_agent = ["--as", f"system:serviceaccount:{NAMESPACE}:{sa}", "-n", NAMESPACE]
        can = lambda *a: fleet.kubectl("auth", "can-i", *a, *as_agent, check=False).stdout.strip()  # noqa: E731
        assert can("get", f"configmap/{sa}") == "yes"
        assert can("get", "configmap/synfleet-proxy-other") == "no"
        assert can("get", "secret/synfleet-salts-edge") == ("yes" if role == "proxy" else "no")
        assert can("list", "secrets") == "no"


def test_status_progresses_as_the_daemonsets_roll_out(fleet):
    apply(fleet, web_policy())
    for ds in ("synfleet-proxy-edge", "synfleet-backend-web"):
        report_rollout(fleet, ds, ready=1, desired=2)
    pool = wait_for("ProxyPool edge rolling out", lambda: (p := get(fleet, "proxypool", "edge", None))
                    and p["status"].get("nodes") == "1/2" and p)
    assert condition(pool, "Ready")["status"] == "False" and condition(pool, "Progressing")["status"] == "True"
    policy = get(fleet, "synproxypolicy", "web", APP_NS)
    assert condition(policy, "Ready")["reason"] == "PoolsNotReady"

    for ds in ("synfleet-proxy-edge", "synfleet-backend-web"):
        report_rollout(fleet, ds, ready=2, desired=2)
    policy = wait_for("the policy Ready", lambda: (p := get(fleet, "synproxypolicy", "web", APP_NS))
                      and condition(p, "Ready").get("status") == "True" and p)
    assert condition(policy, "Ready")["reason"] == "Protected"
    assert condition(policy, "Degraded")["status"] == "False"
    assert policy["status"]["observedGeneration"] == policy["metadata"]["generation"]
    assert policy["status"]["nodes"] == "2/2" and policy["status"]["backends"] == 2
    assert policy["status"]["saltEpoch"] in salts.published_salts(get(fleet, "secret", "synfleet-salts-edge"))
    events = fleet.kubectl("get", "events", "-n", APP_NS, "--field-selector",
                           "involvedObject.kind=SynProxyPolicy,involvedObject.name=web", "-o", "json").stdout
    assert "Protected" in {e["reason"] for e in json.loads(events)["items"]}
    printed = fleet.kubectl("get", "synproxypolicies,proxypools,backendpools", "-A").stdout
    print(printed)
    assert "True" in printed and "enforce" in printed
