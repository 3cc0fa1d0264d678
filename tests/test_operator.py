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
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute

from conftest import agent_document, require_bpf, require_kube
from fleet import wait_for
from kubecluster import KubeCluster, OperatorProcess, free_port
from synfleet import contract
from synfleet.agent.agent import uninstall
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


def test_pools_and_policy_become_daemonsets_salts_configmaps_and_rbac(fleet):
    apply(fleet, web_policy())
    proxy_doc = wait_for(lambda: (d := configmap_document(fleet, "synfleet-proxy-edge")) and d["policies"] and d,
                         "the policy in the proxy ConfigMap", timeout=KUBE_TIMEOUT_S)
    (entry,) = proxy_doc["policies"]
    assert entry["name"] == f"{APP_NS}/web" and entry["mode"] == "enforce"
    assert entry["backends"] == ["10.0.1.1", "10.0.1.2"]
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


def test_a_proxy_pool_asking_for_xdp_renders_it_and_the_default_is_off(fleet):
    apply(fleet, proxy_pool("front", xdp=True))
    node_of = lambda: ((configmap_document(fleet, "synfleet-proxy-front") or {}).get("node") or {})  # noqa: E731
    wait_for(lambda: node_of().get("xdp") is True, "xdp on in the pool's ConfigMap", timeout=KUBE_TIMEOUT_S)
    apply(fleet, proxy_pool("front"))
    wait_for(lambda: node_of().get("xdp") is False, "xdp off again", timeout=KUBE_TIMEOUT_S)
    assert get(fleet, "proxypool", "front")["spec"]["xdp"] is False          # the CRD's default
    delete_pool(fleet, "proxy", "front")


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
    backends = lambda: next(p["backends"] for p in configmap_document(fleet, "synfleet-proxy-edge")["policies"]  # noqa: E731
                            if p["name"] == f"{APP_NS}/web")
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
        apply(fleet, proxy_pool("twin"))
        published = "master keys published for pool twin:"
        wait_for(lambda: published in operator.log() or published in standby.log(),
                 "one replica publishing the twin pool's salts", timeout=KUBE_TIMEOUT_S)
        time.sleep(6)    # a timer tick of the other replica, had it been active
        actors = [op for op in (operator, standby) if published in op.log()]
        assert len(actors) == 1, "both replicas acted"
        (active,) = actors
        idle = standby if active is operator else operator

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


def agent_pod_on(kube: KubeCluster, node: str, service_account: str) -> dict:
    """A pod object of the agent's ServiceAccount assigned to `node` (no kubelet
    runs it): what a token bound to it names as its node."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": unique_name("agent"), "namespace": NAMESPACE},
           "spec": {"nodeName": node, "serviceAccountName": service_account,
                    "containers": [{"name": "agent", "image": "ghcr.io/synfleet/agent:test"}]}}
    apply(kube, pod)
    return get(kube, "pod", pod["metadata"]["name"])


def test_agent_in_cluster_mode_follows_its_configmap_and_outlives_an_operator_outage(fleet, operator, lab_link,
                                                                                    tmp_path):
    apply(fleet, proxy_pool("lab", rotation_s=10, interface=lab_link, nodeSelector={"synfleet.io/proxy": "lab"}))
    add_node(fleet, "lab-1", ["10.0.2.1", "fd00:2::1"], **{"synfleet.io/proxy": "lab"})
    apply(fleet, web_policy("lab", addresses=["203.0.113.50"], ports=[443], proxyPool="lab"))
    wait_for(lambda: (d := configmap_document(fleet, "synfleet-proxy-lab")) and d["policies"], "the lab pool rendered", timeout=KUBE_TIMEOUT_S)
    # The agent authenticates as its pool's ServiceAccount with a token bound to
    # its pod on lab-1, as the kubelet mounts it: RBAC and admission as in a cluster.
    pod = agent_pod_on(fleet, "lab-1", "synfleet-proxy-lab")
    token = fleet.service_account_token(NAMESPACE, "synfleet-proxy-lab", pod)
    kubeconfig = fleet.write_kubeconfig(tmp_path / "agent.kubeconfig", token, NAMESPACE)
    port, instance = free_port(), unique_name("kube-agent")
    pool_uid = get(fleet, "proxypool", "lab")["metadata"]["uid"]
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "synfleet.cli", "agent", "--role", "proxy", "--kubernetes",
         "--namespace", NAMESPACE, "--configmap", "synfleet-proxy-lab", "--secret", "synfleet-salts-lab",
         "--node-addresses", "10.0.2.1,fd00:2::1", "--kubeconfig", str(kubeconfig),
         "--pool", "lab", "--pool-uid", pool_uid, "--node-name", "lab-1",
         "--instance", instance, "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)

    def metric(name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return next((sample.value for family in text_string_to_metric_families(text)
                     for sample in family.samples if sample.name == name), None)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: agent.poll() is None and ready(), "the agent ready", timeout=60)
        generation = metric("synfleet_config_generation")
        assert generation >= 1
        report = wait_for(lambda: (o := get(fleet, "nodeagent", "proxy-lab-lab-1"))
                          and condition(o, "Ready").get("status") == "True" and o, "the node's NodeAgent", timeout=30)
        assert report["spec"] == {"role": "proxy", "pool": "lab", "nodeName": "lab-1"}
        assert report["metadata"]["ownerReferences"][0]["uid"] == pool_uid
        (program,) = report["status"]["programs"]
        assert program["interface"] == lab_link and program["hook"] == "tc" and program["programId"] > 0
        assert report["status"]["saltGeneration"] == 1 and report["status"]["saltEpochsAhead"] == 720
        assert report["status"]["failurePolicy"] == "open" and "syn_answered" in report["status"]["counters"]
        # The agent's token writes its own node's report only.
        forged = {"apiVersion": report["apiVersion"], "kind": "NodeAgent",
                  "metadata": {"name": "proxy-lab-lab-2", "namespace": NAMESPACE},
                  "spec": {**report["spec"], "nodeName": "lab-2"}}
        denied = fleet.kubectl("apply", "-f", "-", input=yaml.safe_dump(forged), kubeconfig=kubeconfig, check=False)
        assert denied.returncode != 0 and "only the NodeAgent of the node its token was issued for" in denied.stderr
        apply(fleet, web_policy("lab", addresses=["203.0.113.50"], ports=[443, 8443], proxyPool="lab"))
        wait_for(lambda: (metric("synfleet_config_generation") or 0) > generation,
                 "the agent applying the changed ConfigMap", timeout=KUBE_TIMEOUT_S)
        wait_for(lambda: get(fleet, "nodeagent", "proxy-lab-lab-1")["status"]["configGeneration"] > generation,
                 "the NodeAgent showing the new generation", timeout=10)
        # Two hours of 10 s epochs loaded ahead; with the operator gone the epochs roll on.
        assert metric("synfleet_salt_epochs_ahead") == 720
        operator.stop()
        try:
            epoch = metric("synfleet_salt_epoch")
            wait_for(lambda: (metric("synfleet_salt_epoch") or 0) >= epoch + 2,
                     "the agent two salt epochs on with the operator stopped", timeout=35)
            assert ready() and metric("synfleet_salt_epochs_ahead") == 720
        finally:
            operator.start()
        assert metric("synfleet_config_errors_total") == 0
    finally:
        agent.terminate()
        agent.wait(10)
        log.close()
        uninstall(instance)
        fleet.kubectl("delete", "synproxypolicy", "lab", "-n", APP_NS, "--ignore-not-found")
        # No kubelet confirms a graceful deletion here.
        fleet.kubectl("delete", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--ignore-not-found",
                      "--grace-period=0", "--force")
        delete_pool(fleet, "proxy", "lab")
    # The report goes with its pool.
    wait_for(lambda: get(fleet, "nodeagent", "proxy-lab-lab-1") is None, "the NodeAgent collected", timeout=60)
    print((tmp_path / "agent.log").read_text()[-2000:])


def test_examples_apply_through_kustomize(kube):
    rendered = kube.kubectl("kustomize", str(ROOT / "examples")).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert sorted(kinds) == ["BackendPool", "ProxyPool", "SynProxyPolicy", "SynProxyPolicy"]
    r = kube.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "examples"))
    assert r.stdout.count("(server dry run)") == 4
