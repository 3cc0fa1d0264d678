"""The operator against a real kube-apiserver (tests/kubecluster.py): installed
with the real helm chart, running as the chart's ServiceAccount, driven with
kubectl like a user would. No kubelet runs here: the tests create Node objects
and write DaemonSet status the way the DaemonSet controller would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute

from conftest import agent_document, backend_set_of, require_bpf, require_kube, require_tool
from fleet import synfleet_ingress_program, wait_for
from kubecluster import KubeCluster, OperatorProcess, free_port
from prometheus import Prometheus, dashboard_queries, rendered_rules
from synfleet import contract
from synfleet.agent.agent import uninstall
from synfleet.agent.pins import DEFAULT_ROOT
from synfleet.config.schema import Role
from synfleet.resources import names
from synfleet_lab.testbed.netns import unique_name

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "synfleet"
NAMESPACE = "synfleet-system"
RELEASE = "synfleet"          # the chart names everything after the release: "synfleet"
APP_NS = "shop"


# The API server, the operator and the garbage collector each take their time.
KUBE_TIMEOUT_S = 30.0
# How long the tests' operator waits for nodes that never confirm a teardown.
TEARDOWN_TIMEOUT_S = 15.0


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


def proxy_pool(name: str, rotation_s: int = 60, master_rotation_s: int = 86400, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "ProxyPool", "metadata": {"name": name},
            "spec": {"nodeSelector": {"synfleet.io/proxy": name}, "interface": "eth0",
                     "salt": {"rotationSeconds": rotation_s, "masterRotationSeconds": master_rotation_s}, **spec}}


def backend_pool(name: str, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "BackendPool", "metadata": {"name": name},
            "spec": {"nodeSelector": {"synfleet.io/backend": name}, "interface": "eth0", **spec}}


def spp(name: str, **spec) -> dict:
    return {"apiVersion": "synfleet.io/v1alpha1", "kind": "SynProxyPolicy",
            "metadata": {"name": name, "namespace": APP_NS}, "spec": spec}


def add_agent_pod(kube: KubeCluster, role: str, pool: str, node: str, ready: bool = True) -> None:
    """An agent pod on `node` as the DaemonSet controller and the kubelet would
    leave it (the operator puts only nodes with a Ready backend agent in tables)."""
    name = f"synfleet-{role}-{pool}-{node}"
    apply(kube, {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": name, "namespace": NAMESPACE,
                              "labels": names.labels(Role(role), pool)},
                 "spec": {"nodeName": node, "serviceAccountName": f"synfleet-{role}-{pool}",
                          "containers": [{"name": "agent", "image": "ghcr.io/synfleet/agent:test"}]}})
    kube.merge_patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status", {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


def report_rollout(kube: KubeCluster, ds_name: str, ready: int, desired: int) -> None:
    """What the DaemonSet controller would write once its pods are (not) ready,
    and what those pods' agents (on nodes <pool>-1 …) report in their NodeAgents."""
    ds = get(kube, "daemonset", ds_name)
    kube.merge_patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{ds_name}/status", {"status": {
        "currentNumberScheduled": desired, "desiredNumberScheduled": desired, "numberMisscheduled": 0,
        "numberReady": ready, "updatedNumberScheduled": desired, "numberAvailable": ready,
        "observedGeneration": ds["metadata"]["generation"]}})
    _, role, pool = ds_name.split("-", 2)
    for i in range(1, desired + 1):
        obj = contract.node_agent(Role(role), pool, ds["metadata"]["ownerReferences"][0]["uid"], f"{pool}-{i}",
                                  NAMESPACE)
        apply(kube, obj)
        kube.merge_patch(f"/apis/synfleet.io/v1alpha1/namespaces/{NAMESPACE}/nodeagents/{obj['metadata']['name']}"
                         "/status", {"status": {"conditions": [
                             {"type": "Ready", "status": "True" if i <= ready else "False",
                              "reason": "Serving" if i <= ready else "NotReady"}]}})


def pool_objects(role: str, pool: str) -> list[tuple[str, str]]:
    made = [(kind, f"synfleet-{role}-{pool}") for kind in
            ("daemonset", "configmap", "serviceaccount", "role", "rolebinding")]
    return made + ([("secret", f"synfleet-salts-{pool}")] if role == "proxy" else [])


def delete_pool(kube: KubeCluster, role: str, pool: str) -> None:
    """Delete a pool and wait until the garbage collector, following the owner
    references, has removed everything the operator made for it."""
    kube.kubectl("delete", f"{role}pool", pool)
    wait_for(lambda: not any(get(kube, kind, name) for kind, name in pool_objects(role, pool)),
             f"{role} pool {pool}'s objects collected", timeout=60)


def condition(obj: dict, ctype: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def configmap_document(kube: KubeCluster, name: str) -> dict | None:
    cm = get(kube, "configmap", name)
    return yaml.safe_load(cm["data"][contract.CONFIG_KEY]) if cm else None


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
    op = OperatorProcess(kube, NAMESPACE, RELEASE, peering=RELEASE, teardown_timeout_s=TEARDOWN_TIMEOUT_S).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def fleet(kube, operator):
    """Two proxy nodes, two backend nodes (dual stack), a pool of each."""
    for i in (1, 2):
        add_node(kube, f"edge-{i}", [f"10.0.0.{i}", f"fd00::{i}"], **{"synfleet.io/proxy": "edge"})
        add_node(kube, f"web-{i}", [f"10.0.1.{i}", f"fd00:1::{i}"], **{"synfleet.io/backend": "web"})
    apply(kube, proxy_pool("edge"), backend_pool("web"))
    wait_for(lambda: get(kube, "daemonset", "synfleet-proxy-edge")
             and get(kube, "daemonset", "synfleet-backend-web"), "both DaemonSets", timeout=KUBE_TIMEOUT_S)
    for i in (1, 2):
        add_agent_pod(kube, "backend", "web", f"web-{i}")
    report_rollout(kube, "synfleet-backend-web", ready=2, desired=2)
    return kube


def web_policy(name: str = "web", **spec) -> dict:
    return spp(name, **{"addresses": ["203.0.113.10", "2001:db8::10"], "ports": [443],
                        "proxyPool": "edge", "backendPool": "web", **spec})


def test_chart_installs_crds_rbac_peering_and_the_operator_deployment(kube):
    crds = kube.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {"customresourcedefinition.apiextensions.k8s.io/" + n for n in (
        "synproxypolicies.synfleet.io", "proxypools.synfleet.io", "backendpools.synfleet.io", "nodeagents.synfleet.io",
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
    # The agents' objects are watched in the release namespace only.
    assert can("watch", "daemonsets", "-n", APP_NS) == "no" and can("watch", "pods", "-n", APP_NS) == "no"
    assert can("watch", "nodeagents.synfleet.io", "-n", APP_NS) == "no"
    assert can("watch", "nodeagents.synfleet.io", "-n", NAMESPACE) == "yes"


def test_pools_and_policy_become_daemonsets_salts_configmaps_and_rbac(fleet):
    apply(fleet, web_policy())
    proxy_doc = wait_for(lambda: (d := configmap_document(fleet, "synfleet-proxy-edge")) and d["policies"] and d,
                         "the policy in the proxy ConfigMap", timeout=KUBE_TIMEOUT_S)
    (entry,) = proxy_doc["policies"]
    assert entry["name"] == f"{APP_NS}/web" and entry["mode"] == "enforce"
    assert backend_set_of(proxy_doc, entry["name"])["backends"] == ["10.0.1.1", "10.0.1.2"]
    assert {(s["address"], s["port"]) for s in entry["services"]} == {("203.0.113.10", 443), ("2001:db8::10", 443)}
    backend_doc = configmap_document(fleet, "synfleet-backend-web")
    assert backend_doc["allowedProxies"] == ["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]

    secret = get(fleet, "secret", "synfleet-salts-edge")
    (key,) = contract.secret_salt_keys(secret)
    assert key.generation == 1 and len(key.key) == 32
    assert proxy_doc["failurePolicy"] == "open"
    # The ConfigMap plus a node's addresses plus the master keys is a document the agent accepts.
    agent_document(proxy_doc, "10.0.0.1", "fd00::1", [key])
    agent_document(backend_doc, "10.0.1.1", None)

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
    pool = wait_for(lambda: (p := get(fleet, "proxypool", "edge", None))
                    and p["status"].get("nodes") == "1/2" and p, "ProxyPool edge rolling out", timeout=KUBE_TIMEOUT_S)
    assert condition(pool, "Ready")["status"] == "False" and condition(pool, "Progressing")["status"] == "True"
    policy = get(fleet, "synproxypolicy", "web", APP_NS)
    assert condition(policy, "Ready")["reason"] == "PoolsNotReady"

    for ds in ("synfleet-proxy-edge", "synfleet-backend-web"):
        report_rollout(fleet, ds, ready=2, desired=2)
    policy = wait_for(lambda: (p := get(fleet, "synproxypolicy", "web", APP_NS))
                      and condition(p, "Ready").get("status") == "True" and p, "the policy Ready", timeout=KUBE_TIMEOUT_S)
    assert condition(policy, "Ready")["reason"] == "Protected"
    assert condition(policy, "Degraded")["status"] == "False"
    assert policy["status"]["observedGeneration"] == policy["metadata"]["generation"]
    assert policy["status"]["nodes"] == "2/2" and policy["status"]["backends"] == 2
    assert policy["status"]["saltGeneration"] == 1
    events = fleet.kubectl("get", "events", "-n", APP_NS, "--field-selector",
                           "involvedObject.kind=SynProxyPolicy,involvedObject.name=web", "-o", "json").stdout
    assert "Protected" in {e["reason"] for e in json.loads(events)["items"]}
    printed = fleet.kubectl("get", "synproxypolicies,proxypools,backendpools", "-A").stdout
    print(printed)
    assert "True" in printed and "enforce" in printed


INVALID = [
    # (what is wrong, object, text the API server's answer must contain)
    ("CIDR instead of an address", web_policy(addresses=["10.0.0.0/24"]), "spec.addresses[0]"),
    ("host name instead of an address", web_policy(addresses=["web.example.com"]), "must be an IPv4 or IPv6"),
    ("loopback address", web_policy(addresses=["127.0.0.1"]), "must be a unicast address"),
    ("port 0", web_policy(ports=[0]), "spec.ports[0]"),
    ("port 70000", web_policy(ports=[70000]), "spec.ports[0]"),
    ("port listed twice", web_policy(ports=[443, 443]), "spec.ports[1]: Duplicate value"),
    ("unknown mode", web_policy(mode="block"), 'spec.mode: Unsupported value: "block"'),
    ("master key rotating faster than 4 epochs", proxy_pool("x", rotation_s=60, master_rotation_s=120),
     "salt.masterRotationSeconds must be at least 4 x salt.rotationSeconds"),
    ("unknown failure policy", proxy_pool("x", failurePolicy="ignore"),
     'spec.failurePolicy: Unsupported value: "ignore"'),
    ("allowed address not a CIDR", proxy_pool("x", allowedAddresses=["203.0.113.7/33"]),
     "must be a CIDR such as 203.0.113.0/24"),
    ("namespace selector In without values", backend_pool("x", allowedNamespaces={
        "matchExpressions": [{"key": "team", "operator": "In"}]}), "In and NotIn need values"),
    ("service and addresses both", web_policy(service={"name": "web"}), "set exactly one of spec.service"),
    ("neither service nor addresses", spp("web", ports=[443], proxyPool="edge", backendPool="web"),
     "set exactly one of spec.service"),
    ("service name not a DNS label", spp("web", service={"name": "Web_Svc"}, ports=[443], proxyPool="edge",
                                         backendPool="web"), "spec.service.name"),
    ("unknown service address type", spp("web", service={"name": "web", "addressTypes": ["NodePort"]},
                                         ports=[443], proxyPool="edge", backendPool="web"),
     "spec.service.addressTypes[0]"),
    ("missing proxy pool", spp("web", addresses=["203.0.113.1"], ports=[443], backendPool="web"),
     "spec.proxyPool: Required value"),
    ("window scale 15", web_policy(cookie={"windowScale": 15}), "spec.cookie.windowScale"),
    ("MTU below IPv6's minimum", web_policy(cookie={"mtu": 1000}), "spec.cookie.mtu"),
    ("MSS table not ascending", web_policy(cookie={"mssV4": [1460, 1300, 1440, 1460]}),
     "cookie.mssV4 must hold 4 strictly ascending values"),
    ("MSS below the kernel's minimum", web_policy(cookie={"mssV4": [500, 1300, 1440, 1460]}),
     "spec.cookie.mssV4[0]"),
    ("unknown field", web_policy(cookie={"windowscale": 7}), 'unknown field "spec.cookie.windowscale"'),
    ("rotation below 10 s", proxy_pool("edge", rotation_s=5), "spec.salt.rotationSeconds"),
    ("rotation above a day", proxy_pool("edge", rotation_s=100000), "spec.salt.rotationSeconds"),
    ("interface name with a slash", proxy_pool("edge", interface="eth0/1"), "spec.interface"),
    ("interface name too long", backend_pool("web", interface="a-very-long-ifname"), "spec.interface"),
    ("toleration Exists with a value", backend_pool("web", tolerations=[
        {"key": "k", "operator": "Exists", "value": "v"}]), "a toleration with operator Exists takes no value"),
    ("metrics on a privileged port", backend_pool("web", metricsPort=80), "spec.metricsPort"),
    ("metrics on every address", backend_pool("web", metricsAddress="0.0.0.0"), "spec.metricsAddress"),
    ("unknown attach mode", proxy_pool("edge", attach={"mode": "clsact"}), "spec.attach.mode"),
    ("attach before and after", proxy_pool("edge", attach={"before": "a", "after": "b"}),
     "give attach.before or attach.after, not both"),
    ("attach by name in tc mode", backend_pool("web", attach={"mode": "tc", "after": "cil_from_netdev"}),
     "attach.before/after order tcx programs; with mode tc use tcPriority"),
    ("clsact priority 0", backend_pool("web", attach={"mode": "tc", "tcPriority": 0}), "spec.attach.tcPriority"),
    ("pool name too long", proxy_pool("p" * 41), "metadata.name must be at most 40 characters"),
    ("pool without interface", {"apiVersion": "synfleet.io/v1alpha1", "kind": "BackendPool",
                                "metadata": {"name": "web"}, "spec": {}}, "spec.interface: Required value"),
]


@pytest.mark.parametrize("what, obj, message", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_object_is_rejected_at_admission_naming_the_field(kube, what, obj, message):
    r = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(obj), check=False)
    assert r.returncode != 0, f"{what}: accepted"
    assert message in r.stderr, r.stderr


def test_master_keys_rotate_on_schedule_each_announced_before_it_takes_over(fleet, operator):
    from synfleet.cookie import current_epoch

    # 10 s epochs, a generation per minute (6 epochs), announced 3 epochs ahead.
    apply(fleet, proxy_pool("fast", rotation_s=10, master_rotation_s=60))
    (first,) = wait_for(lambda: contract.secret_salt_keys(get(fleet, "secret", "synfleet-salts-fast")),
                        "the fast pool's master key", timeout=KUBE_TIMEOUT_S)
    now = current_epoch(10)
    # Made in the epoch it was read in, or the one before (a boundary in between), covering the one before that.
    assert first.generation == 1 and first.from_epoch in (now - 1, now - 2)
    both = wait_for(lambda: (k := contract.secret_salt_keys(get(fleet, "secret", "synfleet-salts-fast")))
                    and len(k) == 2 and k, "the next generation", timeout=50)
    assert both[0] == first and (both[1].generation, both[1].from_epoch) == (2, first.from_epoch + 6)
    assert both[1].from_epoch >= current_epoch(10) + 2, "a generation is announced epochs before it signs"
    metrics = operator.metrics()
    assert 'synfleet_operator_salt_rotations_total{pool="fast"}' in metrics
    assert 'synfleet_operator_seconds_since_salt_rotation{pool="fast"}' in metrics
    delete_pool(fleet, "proxy", "fast")


def test_a_pool_rolling_out_fires_pool_not_ready_until_it_is_ready_and_the_dashboard_shows_it(fleet, operator):
    """The chart's operator alert and the dashboard's operator query, in a real
    Prometheus scraping this operator (the agents' are in test_observability.py)."""
    for tool in ("prometheus", "promtool"):
        require_tool(tool)
    with Prometheus({f"127.0.0.1:{operator.metrics_port}": {}}, rendered_rules()) as prom:
        report_rollout(fleet, "synfleet-proxy-edge", ready=1, desired=2)
        try:
            prom.wait_firing("SynfleetPoolNotReady", timeout=KUBE_TIMEOUT_S, kind="ProxyPool", pool="edge")
            queries = [(title, expr) for title, expr in dashboard_queries() if "synfleet_operator_" in expr]
            assert queries and all(prom.query(expr) for _, expr in queries), queries
        finally:
            report_rollout(fleet, "synfleet-proxy-edge", ready=2, desired=2)
        wait_for(lambda: prom.query('synfleet_operator_pool_ready{kind="ProxyPool", pool="edge"} == 1'),
                 "the pool Ready in the operator's metrics", timeout=KUBE_TIMEOUT_S)
        # Other tests' pools may be rolling out still: only this one's alert must end.
        wait_for(lambda: not [a for a in prom.firing().get("SynfleetPoolNotReady", [])
                              if (a["kind"], a["pool"]) == ("ProxyPool", "edge")], "the alert resolved", timeout=10)


def test_a_proxy_pool_asking_for_xdp_renders_it_and_the_default_is_off(fleet):
    apply(fleet, proxy_pool("front", xdp=True))
    node_of = lambda: ((configmap_document(fleet, "synfleet-proxy-front") or {}).get("node") or {})  # noqa: E731
    wait_for(lambda: node_of().get("xdp") is True, "xdp on in the pool's ConfigMap", timeout=KUBE_TIMEOUT_S)
    apply(fleet, proxy_pool("front"))
    wait_for(lambda: node_of().get("xdp") is False, "xdp off again", timeout=KUBE_TIMEOUT_S)
    assert get(fleet, "proxypool", "front")["spec"]["xdp"] is False          # the CRD's default
    delete_pool(fleet, "proxy", "front")


def test_a_node_both_pools_select_runs_the_proxy_and_the_backend_pool_names_it(fleet):
    add_node(fleet, "both-1", ["10.0.2.1"], **{"synfleet.io/proxy": "edge", "synfleet.io/backend": "web"})
    try:
        def excluded():
            ds = get(fleet, "daemonset", "synfleet-backend-web") or {}
            affinity = ds.get("spec", {}).get("template", {}).get("spec", {}).get("affinity") or {}
            return affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        required = wait_for(excluded, "the backend agents' node affinity", timeout=KUBE_TIMEOUT_S)
        assert required["nodeSelectorTerms"] == [{"matchExpressions": [
            {"key": "synfleet.io/proxy", "operator": "NotIn", "values": ["edge"]}]}]
        pool = wait_for(lambda: (p := get(fleet, "backendpool", "web"))
                        and condition(p, "Degraded").get("reason") == "NodesRunAProxy" and p,
                        "the backend pool naming the node", timeout=KUBE_TIMEOUT_S)
        assert condition(pool, "Degraded")["message"].startswith("not on both-1: a proxy pool selects it too")
        assert "NodesRunAProxy" not in json.dumps(get(fleet, "proxypool", "edge")["status"])
    finally:
        fleet.kubectl("delete", "node", "both-1")
    wait_for(lambda: condition(get(fleet, "backendpool", "web"), "Degraded").get("reason") != "NodesRunAProxy",
             "the condition cleared with the node", timeout=KUBE_TIMEOUT_S)


def test_policy_update_rerenders_and_deletes_clean_up(fleet):
    apply(fleet, web_policy("shortlived", addresses=["203.0.113.77"], ports=[8443]))
    names_in = lambda: [p["name"] for p in configmap_document(fleet, "synfleet-proxy-edge")["policies"]]  # noqa: E731
    wait_for(lambda: f"{APP_NS}/shortlived" in names_in(), "the new policy rendered", timeout=KUBE_TIMEOUT_S)
    apply(fleet, web_policy("shortlived", addresses=["203.0.113.77"], ports=[8443, 9443], mode="monitor"))

    def updated():
        entry = next(p for p in configmap_document(fleet, "synfleet-proxy-edge")["policies"]
                     if p["name"] == f"{APP_NS}/shortlived")
        return entry["mode"] == "monitor" and {s["port"] for s in entry["services"]} == {8443, 9443}
    wait_for(updated, "the update rendered", timeout=KUBE_TIMEOUT_S)

    fleet.kubectl("delete", "synproxypolicy", "shortlived", "-n", APP_NS)
    wait_for(lambda: f"{APP_NS}/shortlived" not in names_in(), "the deleted policy gone from the ConfigMap", timeout=KUBE_TIMEOUT_S)

    apply(fleet, backend_pool("doomed"))
    wait_for(lambda: all(get(fleet, kind, name) for kind, name in pool_objects("backend", "doomed")), "the pool's objects", timeout=KUBE_TIMEOUT_S)
    delete_pool(fleet, "backend", "doomed")


def test_backend_nodes_joining_failing_and_leaving_rerender_the_proxies(fleet):
    apply(fleet, web_policy())
    backends = lambda: backend_set_of(configmap_document(fleet, "synfleet-proxy-edge"), f"{APP_NS}/web")["backends"]  # noqa: E731
    add_node(fleet, "web-3", ["10.0.1.3", "fd00:1::3"], **{"synfleet.io/backend": "web"})
    add_agent_pod(fleet, "backend", "web", "web-3", ready=False)
    report_rollout(fleet, "synfleet-backend-web", ready=2, desired=3)
    time.sleep(2)
    assert backends() == ["10.0.1.1", "10.0.1.2"], "a node whose agent is not Ready gets no flows"
    add_agent_pod(fleet, "backend", "web", "web-3", ready=True)
    report_rollout(fleet, "synfleet-backend-web", ready=3, desired=3)
    wait_for(lambda: backends() == ["10.0.1.1", "10.0.1.2", "10.0.1.3"], "web-3 in the proxies' backend table", timeout=KUBE_TIMEOUT_S)
    fleet.merge_patch("/api/v1/nodes/web-3/status", {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "KubeletStopped", "message": "test",
         "lastHeartbeatTime": "2026-11-25T00:00:00Z", "lastTransitionTime": "2026-11-25T00:00:00Z"}]}})
    wait_for(lambda: backends() == ["10.0.1.1", "10.0.1.2"], "the NotReady node out of the table", timeout=KUBE_TIMEOUT_S)
    fleet.kubectl("delete", "node", "web-3")
    # No kubelet confirms a graceful termination here: delete at once.
    fleet.kubectl("delete", "pod", "synfleet-backend-web-web-3", "-n", NAMESPACE, "--grace-period=0", "--force")
    report_rollout(fleet, "synfleet-backend-web", ready=2, desired=2)
    add_node(fleet, "edge-3", ["10.0.0.3"], **{"synfleet.io/proxy": "edge"})
    wait_for(lambda: "10.0.0.3" in configmap_document(fleet, "synfleet-backend-web")["allowedProxies"],
             "a new proxy node allowed by the backends", timeout=KUBE_TIMEOUT_S)
    fleet.kubectl("delete", "node", "edge-3")
    wait_for(lambda: "10.0.0.3" not in configmap_document(fleet, "synfleet-backend-web")["allowedProxies"],
             "the removed proxy node no longer allowed", timeout=KUBE_TIMEOUT_S)

def test_a_backend_node_cordoned_marked_or_relabelled_out_drains_and_the_pool_says_until_when(fleet):
    """It takes no new connection at once (out of the proxies' tables); its
    established flows reach it for the pool's drainSeconds (the proxies'
    previous generation, tests/test_backend_changes.py); the BackendPool
    lists it with the reason and the end of its drain."""
    apply(fleet, backend_pool("web", drainSeconds=120), web_policy("drain", addresses=["203.0.113.60"]))
    add_node(fleet, "web-3", ["10.0.1.3", "fd00:1::3"], **{"synfleet.io/backend": "web"})
    add_agent_pod(fleet, "backend", "web", "web-3", ready=True)
    report_rollout(fleet, "synfleet-backend-web", ready=3, desired=3)
    entry = lambda: backend_set_of(configmap_document(fleet, "synfleet-proxy-edge"), f"{APP_NS}/drain")  # noqa: E731
    pool_status = lambda: get(fleet, "backendpool", "web", None).get("status") or {}  # noqa: E731
    wait_for(lambda: entry().get("backends") == ["10.0.1.1", "10.0.1.2", "10.0.1.3"], "web-3 a member",
             timeout=KUBE_TIMEOUT_S)
    assert entry()["drainSeconds"] == 120
    assert configmap_document(fleet, "synfleet-backend-web")["peerBackends"] == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    wait_for(lambda: pool_status().get("members") == ["web-1", "web-2", "web-3"], "the members in the status",
             timeout=KUBE_TIMEOUT_S)
    try:
        for how, undo, reason in [
                (["cordon", "web-3"], ["uncordon", "web-3"], "Cordoned"),
                (["annotate", "node", "web-3", "synfleet.io/draining=true"],
                 ["annotate", "node", "web-3", "synfleet.io/draining-"], "Marked"),
                (["label", "node", "web-3", "node.kubernetes.io/exclude-from-external-load-balancers="],
                 ["label", "node", "web-3", "node.kubernetes.io/exclude-from-external-load-balancers-"],
                 "ExcludedFromLoadBalancers"),
                (["label", "node", "web-3", "synfleet.io/backend-"],
                 ["label", "node", "web-3", "synfleet.io/backend=web"], "LeftPool")]:
            fleet.kubectl(*how)
            wait_for(lambda: entry().get("backends") == ["10.0.1.1", "10.0.1.2"], f"{reason}: out of the tables",
                     timeout=KUBE_TIMEOUT_S)
            drained = wait_for(lambda: pool_status().get("draining"), f"{reason}: the drain in the status",
                               timeout=KUBE_TIMEOUT_S)
            assert [(d["node"], d["reason"]) for d in drained] == [("web-3", reason)], drained
            since, until = (datetime.fromisoformat(drained[0][k].replace("Z", "+00:00")) for k in ("since", "until"))
            assert (until - since).total_seconds() == 120
            assert pool_status()["members"] == ["web-1", "web-2"]
            peers = configmap_document(fleet, "synfleet-backend-web")["peerBackends"]
            # A node still in the pool may still be handed flows by its peers, and hand them on.
            assert ("10.0.1.3" in peers) == (reason != "LeftPool")
            fleet.kubectl(*undo)
            wait_for(lambda: entry().get("backends") == ["10.0.1.1", "10.0.1.2", "10.0.1.3"], f"{reason} undone",
                     timeout=KUBE_TIMEOUT_S)
            wait_for(lambda: not pool_status().get("draining") or reason == "LeftPool",
                     f"{reason} undone: no drain", timeout=KUBE_TIMEOUT_S)
    finally:
        fleet.kubectl("delete", "spp", "drain", "-n", APP_NS)
        fleet.kubectl("delete", "node", "web-3")
        fleet.kubectl("delete", "pod", "synfleet-backend-web-web-3", "-n", NAMESPACE, "--grace-period=0", "--force")
        apply(fleet, backend_pool("web"))
        report_rollout(fleet, "synfleet-backend-web", ready=2, desired=2)


def test_a_configuration_the_api_server_refuses_is_a_condition_on_the_pool_and_its_policies(fleet, operator):
    """Seen at scale: a proxy pool's ConfigMap over the API server's 1 MiB
    limit was refused, and only the operator's log said so. Two policies of
    16,384 services each make one here."""
    ports = list(range(1000, 1064))
    big = lambda name, third: web_policy(name, addresses=[f"198.51.{third}.{i}" for i in range(256)],  # noqa: E731
                                         ports=ports)
    apply(fleet, big("big-1", 101))
    wait_for(lambda: condition(get(fleet, "synproxypolicy", "big-1", APP_NS), "Ready").get("status") == "True"
             or condition(get(fleet, "synproxypolicy", "big-1", APP_NS), "Ready").get("reason") == "PoolsNotReady",
             "the first large policy rendered", timeout=KUBE_TIMEOUT_S)
    written = get(fleet, "configmap", "synfleet-proxy-edge")["metadata"]["resourceVersion"]
    try:
        apply(fleet, big("big-2", 102))
        try:
            refused = wait_for(lambda: (c := condition(get(fleet, "proxypool", "edge", None), "Degraded"))
                               .get("reason") == "DataplaneConfigNotWritten" and c, "the pool degraded",
                               timeout=KUBE_TIMEOUT_S)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{get(fleet, 'proxypool', 'edge', None)['status']}\n"
                                 f"{operator.log()[-3000:]}") from None
        assert "could not be written" in refused["message"] and "too long" in refused["message"].lower(), refused
        policy = wait_for(lambda: (c := condition(get(fleet, "synproxypolicy", "big-2", APP_NS), "Degraded"))
                          .get("reason") == "DataplaneConfigNotWritten" and c, "the policy degraded",
                          timeout=KUBE_TIMEOUT_S)
        assert "keep the last configuration written" in policy["message"]
        events = json.loads(fleet.kubectl("get", "events", "-A", "--field-selector",
                                          "involvedObject.name=edge,type=Warning", "-o", "json").stdout)["items"]
        assert any(e["reason"] == "DataplaneConfigNotWritten" for e in events), events
        # The last good configuration stays.
        assert get(fleet, "configmap", "synfleet-proxy-edge")["metadata"]["resourceVersion"] == written
    finally:
        fleet.kubectl("delete", "spp", "big-2", "-n", APP_NS, "--ignore-not-found")
    wait_for(lambda: condition(get(fleet, "proxypool", "edge", None), "Degraded").get("status") == "False",
             "the pool recovered", timeout=KUBE_TIMEOUT_S)
    fleet.kubectl("delete", "spp", "big-1", "-n", APP_NS)


def test_services_no_policy_depends_on_cause_no_render(fleet, operator):
    """A cluster's Services and EndpointSlices churn all day; only those a
    policy names, or that hold an address a policy protects, are worth a render."""
    apply(fleet, spp("named", service={"name": "front", "addressTypes": ["ClusterIP"]}, ports=[443],
                     proxyPool="edge", backendPool="web"))
    wait_for(lambda: condition(get(fleet, "synproxypolicy", "named", APP_NS), "Degraded").get("reason")
             == "ServiceNotFound", "the policy waiting for its Service", timeout=KUBE_TIMEOUT_S)
    time.sleep(2)       # the events of the objects above are rendered
    renders = operator.metric("synfleet_operator_renders_total")
    unrelated = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"other-{i}", "namespace": APP_NS},
                  "spec": {"ports": [{"port": 80}]}} for i in range(20)]
    try:
        apply(fleet, *unrelated)
        wait_for(lambda: operator.metric('synfleet_operator_unrelated_events_total{kind="service"}') >= 20,
                 "the unrelated Services seen", timeout=KUBE_TIMEOUT_S)
        assert operator.metric("synfleet_operator_renders_total") == renders
        apply(fleet, {**unrelated[0], "metadata": {"name": "front", "namespace": APP_NS}})
        wait_for(lambda: condition(get(fleet, "synproxypolicy", "named", APP_NS), "Degraded").get("reason")
                 != "ServiceNotFound", "the named Service rendered", timeout=KUBE_TIMEOUT_S)
        assert operator.metric("synfleet_operator_renders_total") > renders
    finally:
        fleet.kubectl("delete", "spp", "named", "-n", APP_NS, "--ignore-not-found")
        fleet.kubectl("delete", "service", "front", *(f"other-{i}" for i in range(20)), "-n", APP_NS,
                      "--ignore-not-found")


def test_policy_naming_a_missing_service_is_degraded_with_the_reason_and_recovers(fleet):
    apply(fleet, spp("checkout", service={"name": "checkout"}, ports=[443], proxyPool="edge", backendPool="web"))
    policy = wait_for(lambda: (p := get(fleet, "synproxypolicy", "checkout", APP_NS))
                      and condition(p, "Degraded").get("status") == "True" and p, "Degraded", timeout=KUBE_TIMEOUT_S)
    assert condition(policy, "Degraded")["reason"] == "ServiceNotFound"
    assert f"Service {APP_NS}/checkout does not exist" in condition(policy, "Degraded")["message"]
    apply(fleet, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "checkout", "namespace": APP_NS},
                  "spec": {"ports": [{"port": 443}], "externalIPs": ["198.51.100.20"]}})
    wait_for(lambda: (p := get(fleet, "synproxypolicy", "checkout", APP_NS))
             and p["status"].get("addresses") == ["198.51.100.20"]
             and condition(p, "Degraded").get("status") == "False", "the Service's address protected", timeout=KUBE_TIMEOUT_S)
    warnings = fleet.kubectl("get", "events", "-n", APP_NS, "--field-selector",
                             "involvedObject.name=checkout,type=Warning", "-o", "json").stdout
    assert "ServiceNotFound" in {e["reason"] for e in json.loads(warnings)["items"]}
    fleet.kubectl("delete", "synproxypolicy", "checkout", "-n", APP_NS)


def test_tenant_a_pool_refuses_a_namespace_it_does_not_admit_until_the_namespace_is_labelled(fleet):
    apply(fleet, proxy_pool("guarded", allowedNamespaces={"matchLabels": {"synfleet.io/tenant": "edge"}}))
    apply(fleet, web_policy("tenant", addresses=["203.0.113.60"], proxyPool="guarded"))
    policy = wait_for(lambda: (p := get(fleet, "synproxypolicy", "tenant", APP_NS))
                      and condition(p, "Degraded").get("status") == "True" and p, "Degraded", timeout=KUBE_TIMEOUT_S)
    assert condition(policy, "Degraded")["reason"] == "Forbidden"
    assert f"ProxyPool 'guarded' does not admit namespace '{APP_NS}'" in condition(policy, "Degraded")["message"]
    warnings = fleet.kubectl("get", "events", "-n", APP_NS, "--field-selector",
                             "involvedObject.name=tenant,type=Warning", "-o", "json").stdout
    assert "Forbidden" in {e["reason"] for e in json.loads(warnings)["items"]}
    fleet.kubectl("label", "namespace", APP_NS, "synfleet.io/tenant=edge")
    try:
        wait_for(lambda: (p := get(fleet, "synproxypolicy", "tenant", APP_NS))
                 and condition(p, "Degraded").get("reason") != "Forbidden", "the labelled namespace admitted",
                 timeout=KUBE_TIMEOUT_S)
    finally:
        fleet.kubectl("label", "namespace", APP_NS, "synfleet.io/tenant-")
        fleet.kubectl("delete", "synproxypolicy", "tenant", "-n", APP_NS)
        delete_pool(fleet, "proxy", "guarded")


def test_operator_restart_resumes_without_duplicates_or_rewrites(fleet, operator):
    apply(fleet, web_policy())
    wait_for(lambda: configmap_document(fleet, "synfleet-proxy-edge")["policies"], "rendered", timeout=KUBE_TIMEOUT_S)
    before = {kind: fleet.kubectl("get", kind, "-n", NAMESPACE, "-o", "json").stdout
              for kind in ("daemonsets", "configmaps", "secrets", "roles")}
    versions = lambda raw: {i["metadata"]["name"]: i["metadata"]["resourceVersion"]  # noqa: E731
                            for i in json.loads(raw)["items"]}
    operator.stop(kill=True)
    operator.start()
    wait_for(lambda: all(operator.metric(m) >= 1 for m in (
        'synfleet_operator_reconciles_total{kind="ProxyPool"}',
        'synfleet_operator_reconciles_total{kind="BackendPool"}', "synfleet_operator_renders_total")), "the restarted operator to resume both pools and render",
        timeout=60)
    for kind, raw in before.items():
        after = versions(fleet.kubectl("get", kind, "-n", NAMESPACE, "-o", "json").stdout)
        # Salt Secrets too: epochs roll over with no write, only a new key generation (daily) writes.
        assert after == versions(raw), f"{kind} rewritten by a restart"


def test_with_two_replicas_only_one_acts_and_the_other_takes_over(fleet, operator):
    standby = OperatorProcess(fleet, NAMESPACE, RELEASE, peering=RELEASE, name="operator-b").start()
    try:
        peers = wait_for(lambda: (p := (get(
            fleet, "clusterkopfpeering", RELEASE, namespace=None).get("status") or {}))
            and {operator.peer_id, standby.peer_id} <= p.keys() and p, "both replicas in the peering", timeout=KUBE_TIMEOUT_S)
        assert peers[operator.peer_id]["priority"] != peers[standby.peer_id]["priority"]
        time.sleep(2)     # the lower one saw the higher in the peering and paused
        renders = {op: op.metric("synfleet_operator_renders_total") for op in (operator, standby)}
        apply(fleet, proxy_pool("twin"))
        published = "master keys published for pool twin:"
        wait_for(lambda: published in operator.log() or published in standby.log(),
                 "one replica publishing the twin pool's salts", timeout=KUBE_TIMEOUT_S)
        time.sleep(6)    # a timer tick of the other replica, had it been active
        actors = [op for op in (operator, standby) if published in op.log()]
        assert len(actors) == 1, "both replicas acted"
        (active,) = actors
        idle = standby if active is operator else operator
        # Renders follow informers, not kopf's handlers, and pause by the same rule.
        assert active.metric("synfleet_operator_renders_total") > renders[active]
        assert idle.metric("synfleet_operator_renders_total") == renders[idle], "the paused replica rendered"

        active.stop()      # SIGTERM: it leaves the peering, the other resumes at once
        apply(fleet, proxy_pool("twin2"))
        wait_for(lambda: "master keys published for pool twin2:" in idle.log(), "the standby taking over", timeout=60)
    finally:
        for name in ("twin", "twin2"):
            if get(fleet, "proxypool", name, None):
                delete_pool(fleet, "proxy", name)
        standby.stop()
        if not operator.running():
            operator.start()


@pytest.fixture
def lab_link():
    """A veth pair in this namespace for the agent to attach to: no address, no
    traffic (the API server is on this namespace's loopback, so the agent runs here)."""
    require_bpf()
    name = unique_name("sfk")
    with IPRoute() as ipr:     # this thread's namespace
        ipr.link("add", ifname=name, kind="veth", peer=name + "p")
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        try:
            yield name
        finally:
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


def agent_pod_on(kube: KubeCluster, node: str, role: str, pool: str, ready: bool = False) -> dict:
    """An agent pod of the pool assigned to `node` (no kubelet runs it): what a
    token bound to it names as its node; `ready` as the kubelet would report it."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": unique_name("agent"), "namespace": NAMESPACE, "labels": names.labels(Role(role), pool)},
           "spec": {"nodeName": node, "serviceAccountName": names.agent_name(Role(role), pool),
                    "containers": [{"name": "agent", "image": "ghcr.io/synfleet/agent:test"}]}}
    apply(kube, pod)
    if ready:
        kube.merge_patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}/status", {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    return get(kube, "pod", pod["metadata"]["name"])


class KubeAgent:
    """`synfleet agent --kubernetes` as the DaemonSet runs it, in this namespace
    on `interface`, authenticated as its pool's ServiceAccount with a token bound
    to a pod on `node`: RBAC and admission as in a cluster."""

    def __init__(self, kube: KubeCluster, role: str, pool: str, node: str, addresses: str, interface: str,
                 workdir: Path, ready_pod: bool = False) -> None:
        self.kube, self.role, self.pool, self.node, self.interface = kube, role, pool, node, interface
        self.pod = agent_pod_on(kube, node, role, pool, ready=ready_pod)
        token = kube.service_account_token(NAMESPACE, names.agent_name(Role(role), pool), self.pod)
        self.kubeconfig = kube.write_kubeconfig(workdir / f"{pool}-{node}.kubeconfig", token, NAMESPACE)
        self.port, self.instance = free_port(), unique_name("kube-agent")
        self.pool_uid = get(kube, f"{role}pool", pool)["metadata"]["uid"]
        self.log_path = workdir / f"{pool}-{node}.log"
        secret = ["--secret", f"synfleet-salts-{pool}"] if role == "proxy" else []
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "synfleet.cli", "agent", "--role", role, "--kubernetes",
                 "--namespace", NAMESPACE, "--configmap", f"synfleet-{role}-{pool}", *secret,
                 "--node-addresses", addresses, "--kubeconfig", str(self.kubeconfig),
                 "--pool", pool, "--pool-uid", self.pool_uid, "--node-name", node,
                 "--instance", self.instance, "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return next((sample.value for family in text_string_to_metric_families(text)
                     for sample in family.samples if sample.name == name), None)

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:
            return 0, str(err)

    def ready(self) -> bool:
        return self.readyz()[0] == 200

    def report(self) -> dict | None:
        return get(self.kube, "nodeagent", contract.node_agent_name(Role(self.role), self.pool, self.node))

    def program(self) -> int | None:
        return synfleet_ingress_program(self.interface)

    def pins(self) -> Path:
        return Path(DEFAULT_ROOT) / self.instance

    def stop(self) -> str:
        """Stop the process (SIGTERM: the data plane stays); its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.stop()
        uninstall(self.instance)
        # No kubelet confirms a graceful deletion here.
        self.kube.kubectl("delete", "pod", self.pod["metadata"]["name"], "-n", NAMESPACE, "--ignore-not-found",
                          "--grace-period=0", "--force")


def test_agent_in_cluster_mode_follows_its_configmap_and_outlives_an_operator_outage(fleet, operator, lab_link,
                                                                                    tmp_path):
    apply(fleet, proxy_pool("lab", rotation_s=10, interface=lab_link, nodeSelector={"synfleet.io/proxy": "lab"}))
    add_node(fleet, "lab-1", ["10.0.2.1", "fd00:2::1"], **{"synfleet.io/proxy": "lab"})
    apply(fleet, web_policy("lab", addresses=["203.0.113.50"], ports=[443], proxyPool="lab"))
    wait_for(lambda: (d := configmap_document(fleet, "synfleet-proxy-lab")) and d["policies"], "the lab pool rendered", timeout=KUBE_TIMEOUT_S)
    agent = KubeAgent(fleet, "proxy", "lab", "lab-1", "10.0.2.1,fd00:2::1", lab_link, tmp_path)
    metric = agent.metric
    try:
        wait_for(lambda: agent.proc.poll() is None and agent.ready(), "the agent ready", timeout=60)
        generation = metric("synfleet_config_generation")
        assert generation >= 1
        report = wait_for(lambda: (o := agent.report())
                          and condition(o, "Ready").get("status") == "True" and o, "the node's NodeAgent", timeout=30)
        assert report["spec"] == {"role": "proxy", "pool": "lab", "nodeName": "lab-1"}
        assert report["metadata"]["ownerReferences"][0]["uid"] == agent.pool_uid
        (program,) = report["status"]["programs"]
        assert program["interface"] == lab_link and program["hook"] == "tcx" and program["programId"] > 0
        assert report["status"]["saltGeneration"] == 1 and report["status"]["saltEpochsAhead"] == 720
        assert report["status"]["failurePolicy"] == "open" and "syn_answered" in report["status"]["counters"]
        assert report["status"]["configVersion"] == get(fleet, "configmap", "synfleet-proxy-lab")[
            "metadata"]["resourceVersion"]
        # The agent's token writes its own node's report only.
        forged = {"apiVersion": report["apiVersion"], "kind": "NodeAgent",
                  "metadata": {"name": "proxy-lab-lab-2", "namespace": NAMESPACE},
                  "spec": {**report["spec"], "nodeName": "lab-2"}}
        denied = fleet.kubectl("apply", "-f", "-", input=yaml.safe_dump(forged), kubeconfig=agent.kubeconfig,
                               check=False)
        assert denied.returncode != 0 and "only the NodeAgent of the node its token was issued for" in denied.stderr
        apply(fleet, web_policy("lab", addresses=["203.0.113.50"], ports=[443, 8443], proxyPool="lab"))
        wait_for(lambda: (metric("synfleet_config_generation") or 0) > generation,
                 "the agent applying the changed ConfigMap", timeout=KUBE_TIMEOUT_S)
        wait_for(lambda: agent.report()["status"]["configGeneration"] > generation,
                 "the NodeAgent showing the new generation", timeout=10)
        # Two hours of 10 s epochs loaded ahead; with the operator gone the epochs roll on.
        assert metric("synfleet_salt_epochs_ahead") == 720
        operator.stop()
        try:
            epoch = metric("synfleet_salt_epoch")
            wait_for(lambda: (metric("synfleet_salt_epoch") or 0) >= epoch + 2,
                     "the agent two salt epochs on with the operator stopped", timeout=35)
            assert agent.ready() and metric("synfleet_salt_epochs_ahead") == 720
        finally:
            operator.start()
        assert metric("synfleet_config_errors_total") == 0
    finally:
        # Deleted while its agent runs: the agent leaves the node bare.
        fleet.kubectl("delete", "synproxypolicy", "lab", "-n", APP_NS, "--ignore-not-found")
        delete_pool(fleet, "proxy", "lab")
        print(agent.stop())
        agent.close()
        fleet.kubectl("delete", "node", "lab-1")
    # The report goes with its pool.
    wait_for(lambda: agent.report() is None, "the NodeAgent collected", timeout=60)


@pytest.fixture
def teardown_fleet(fleet, lab_link, tmp_path):
    """A proxy pool and a backend pool (the same new name for both: names are
    not re-used, as the garbage collector may still be collecting an earlier
    pool's NodeAgents), one node each, each node's agent a real process in
    cluster mode (the proxy on one end of the lab's veth, the backend on the
    other), and a policy of that name through both pools. Yields (name, agents)."""
    proxy_if, backend_if = lab_link, lab_link + "p"
    gone = unique_name("gone")
    add_node(fleet, f"{gone}-p1", ["10.0.3.1"], **{"synfleet.io/proxy": gone})
    add_node(fleet, f"{gone}-b1", ["10.0.3.11"], **{"synfleet.io/backend": gone})
    apply(fleet, proxy_pool(gone, rotation_s=10, interface=proxy_if, nodeSelector={"synfleet.io/proxy": gone}),
          backend_pool(gone, interface=backend_if, nodeSelector={"synfleet.io/backend": gone}))
    wait_for(lambda: get(fleet, "configmap", f"synfleet-proxy-{gone}") and get(fleet, "configmap", f"synfleet-backend-{gone}")
             and get(fleet, "secret", f"synfleet-salts-{gone}"), "both pools' ConfigMaps", timeout=KUBE_TIMEOUT_S)
    agents = [KubeAgent(fleet, "proxy", gone, f"{gone}-p1", "10.0.3.1", proxy_if, tmp_path),
              KubeAgent(fleet, "backend", gone, f"{gone}-b1", "10.0.3.11", backend_if, tmp_path, ready_pod=True)]
    try:
        for agent in agents:
            wait_for(lambda: agent.proc.poll() is None and agent.ready() and agent.report()
                     and condition(agent.report(), "Ready").get("status") == "True",
                     f"the {agent.role} agent Ready and reporting", timeout=60)
        apply(fleet, web_policy(gone, addresses=["203.0.113.70"], proxyPool=gone, backendPool=gone))
        wait_for(lambda: condition(get(fleet, "synproxypolicy", gone, APP_NS) or {}, "Degraded").get("reason")
                 == "AsExpected", "the policy rendered into both pools", timeout=KUBE_TIMEOUT_S)
        yield gone, agents
    finally:
        fleet.kubectl("delete", "synproxypolicy", gone, "-n", APP_NS, "--ignore-not-found")
        for role in ("proxy", "backend"):
            fleet.kubectl("delete", f"{role}pool", gone, "--ignore-not-found")
        for agent in agents:
            print(agent.stop())
            agent.close()
        fleet.kubectl("delete", "node", f"{gone}-p1", f"{gone}-b1")


def applied_everywhere(kube: KubeCluster, agents: list[KubeAgent]) -> bool:
    """Every agent reports the version of its pool's ConfigMap as it is now."""
    return all(agent.report()["status"].get("configVersion") == get(
        kube, "configmap", f"synfleet-{agent.role}-{agent.pool}")["metadata"]["resourceVersion"] for agent in agents)


def test_teardown_deleting_a_policy_returns_once_its_nodes_stopped_serving_it(teardown_fleet, fleet):
    gone, agents = teardown_fleet
    wait_for(lambda: applied_everywhere(fleet, agents), "both agents applying the policy", timeout=KUBE_TIMEOUT_S)
    assert all(agent.metric("synfleet_config_generation") >= 2 for agent in agents)
    policy = get(fleet, "synproxypolicy", gone, APP_NS)
    assert names.FINALIZER in policy["metadata"]["finalizers"]
    started = time.monotonic()
    fleet.kubectl("delete", "synproxypolicy", gone, "-n", APP_NS, "--timeout=60s")   # waits for the finalizer
    took = time.monotonic() - started
    for role in ("proxy", "backend"):
        assert configmap_document(fleet, f"synfleet-{role}-{gone}")["policies"] == []
    assert applied_everywhere(fleet, agents), "the deletion finished before the nodes applied it"
    assert all(agent.program() for agent in agents), "deleting a policy detached a pool's agent"
    print(f"policy deletion confirmed by both nodes in {took:.1f} s")


def test_teardown_deleting_both_pools_leaves_their_nodes_bare_within_30_s(teardown_fleet, fleet):
    gone, agents = teardown_fleet
    assert all(agent.program() and agent.pins().is_dir() for agent in agents)
    # Every version of the pools' NodeAgents, as a watch sees them: a Retired
    # report may live only milliseconds before the garbage collector takes it.
    watch = subprocess.Popen([str(fleet.tools["kubectl"]), "--kubeconfig", str(fleet.kubeconfig), "get",
                              "nodeagents", "-n", NAMESPACE, "-l", f"{contract.LABEL_POOL}={gone}", "--watch",
                              "-o", "json"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)      # the watch has listed both reports
        started = time.monotonic()
        fleet.kubectl("delete", "proxypool,backendpool", gone, "--wait=false")
        wait_for(lambda: not any(agent.program() or agent.pins().exists() for agent in agents),
                 "no hook and no pin of either pool left", timeout=30)
        took_bare = time.monotonic() - started
        wait_for(lambda: not get(fleet, "proxypool", gone, None) and not get(fleet, "backendpool", gone, None),
                 "both pools' finalizers released", timeout=30)
        took_released = time.monotonic() - started
        time.sleep(1)
    finally:
        watch.terminate()
    seen, decoder, text = [], json.JSONDecoder(), watch.communicate(timeout=10)[0]
    while text.strip():
        obj, end = decoder.raw_decode(text.lstrip())
        seen.append(obj)
        text = text.lstrip()[end:]
    retired = {o["spec"]["role"] for o in seen if condition(o, "Retired").get("status") == "True"}
    assert retired == {"proxy", "backend"}, "each NodeAgent said Retired before it went"
    assert took_released < TEARDOWN_TIMEOUT_S, "the pools went by the timeout, not by their nodes' confirmation"
    wait_for(lambda: not any(get(fleet, kind, name) for role in ("proxy", "backend")
                             for kind, name in pool_objects(role, gone)),
             "everything the pools owned collected", timeout=60)
    took_gone = time.monotonic() - started
    for agent in agents:
        assert agent.proc.poll() is None, "a retired agent stays up (idle) until its DaemonSet goes"
        status, body = agent.readyz()
        assert status == 503 and f"retired: {contract.POOL_KINDS[Role(agent.role)]} {gone} is being deleted" in body
        assert "retired: the node is bare" in agent.stop()
    assert not Path(DEFAULT_ROOT, agents[0].instance).exists()
    print(f"nodes bare {took_bare:.1f} s after the deletion, pools released after {took_released:.1f} s, "
          f"their objects collected after {took_gone:.1f} s")


def test_teardown_a_node_that_never_confirms_holds_the_pool_only_until_the_timeout(fleet, operator):
    add_node(fleet, "mute-1", ["10.0.4.1"], **{"synfleet.io/proxy": "mute"})
    apply(fleet, proxy_pool("mute", nodeSelector={"synfleet.io/proxy": "mute"}))
    uid = wait_for(lambda: (p := get(fleet, "proxypool", "mute", None)) and names.FINALIZER in (
        p["metadata"].get("finalizers") or []) and p["metadata"]["uid"], "the pool with its finalizer",
        timeout=KUBE_TIMEOUT_S)
    # An agent that reported once and then went silent (its process died).
    report = contract.node_agent(Role.PROXY, "mute", uid, "mute-1", NAMESPACE)
    apply(fleet, report)
    fleet.merge_patch(f"/apis/synfleet.io/v1alpha1/namespaces/{NAMESPACE}/nodeagents/proxy-mute-mute-1/status",
                      {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}]}})
    try:
        started = time.monotonic()
        fleet.kubectl("delete", "proxypool", "mute", "--wait=false")
        time.sleep(3)
        pool = get(fleet, "proxypool", "mute", None)
        assert pool is not None and condition(pool, "Ready")["reason"] == "Retiring"
        assert "waiting for 1 node(s) to detach: mute-1" in condition(pool, "Ready")["message"]
        wait_for(lambda: get(fleet, "proxypool", "mute", None) is None, "the pool gone after the timeout",
                 timeout=TEARDOWN_TIMEOUT_S + 30)
        assert time.monotonic() - started >= TEARDOWN_TIMEOUT_S - 1
        warnings = json.loads(fleet.kubectl("get", "events", "-A", "--field-selector",
                                            "involvedObject.name=mute,reason=TeardownTimeout", "-o", "json").stdout)
        (message,) = {e["message"] for e in warnings["items"]}
        assert "node(s) mute-1 did not confirm" in message and "synfleet agent uninstall --instance mute" in message
    finally:
        fleet.kubectl("delete", "proxypool", "mute", "--ignore-not-found", "--wait=false")
        fleet.kubectl("delete", "node", "mute-1")


def test_examples_apply_through_kustomize(kube):
    rendered = kube.kubectl("kustomize", str(ROOT / "examples")).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert sorted(kinds) == ["BackendPool", "ProxyPool", "SynProxyPolicy", "SynProxyPolicy"]
    r = kube.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "examples"))
    assert r.stdout.count("(server dry run)") == 4
