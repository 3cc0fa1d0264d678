"""The pure builders behind the operator: what each custom resource becomes."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from conftest import agent_document, backend_set_of
from synfleet import contract
from synfleet.abi import MAX_BACKENDS, MAX_POLICIES, MAX_TABLES
from synfleet.config import schema
from synfleet.config.schema import Role
from synfleet.contract import condition
from synfleet.operator.cache import endpoint_slice_fields, outranked, service_fields
from synfleet.resources import agents, lifecycle, names, salts
from synfleet.resources.agents import OperatorSettings
from synfleet.resources.dataplane import (
    AddressOwners,
    ClusterView,
    NodeInfo,
    Problem,
    ServiceInterest,
    allocate_ids,
    configmap,
    proxy_nodes_in,
    ready_agent_nodes,
    render,
    validate_for_nodes,
)
from synfleet.resources.model import Pool, SynProxyPolicy
from synfleet.resources.status import Rollout, drain_report, policy_status, pool_status

SETTINGS = OperatorSettings(namespace="synfleet-system", agent_image="ghcr.io/synfleet/agent:0.1.0")



def pool(role: Role, name: str, **spec) -> Pool:
    return Pool.from_object(role, {"metadata": {"name": name, "uid": f"uid-{name}", "generation": 3},
                                   "spec": {"interface": "eth0", **spec}})


def policy(name: str, created: str = "2026-11-25T10:00:00Z", namespace: str = "shop", policy_id=None,
           **spec) -> SynProxyPolicy:
    body = {"ports": [443], "proxyPool": "edge", "backendPool": "web", **spec}
    return SynProxyPolicy.from_object({"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                                            "generation": 2, "creationTimestamp": created},
                               "spec": body, "status": {"policyId": policy_id} if policy_id else {}})


def node(name: str, *addresses: str, ready: bool = True, **labels: str) -> NodeInfo:
    return NodeInfo.from_object({
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "Hostname", "address": name}] +
                   [{"type": "InternalIP", "address": a} for a in addresses],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


EDGE = pool(Role.PROXY, "edge", nodeSelector={"synfleet.io/edge": "true"})
WEB = pool(Role.BACKEND, "web", nodeSelector={"tier": "web"})
NODES = [node("edge-1", "10.0.0.1", "fd00::1", **{"synfleet.io/edge": "true"}),
         node("edge-2", "10.0.0.2", "fd00::2", **{"synfleet.io/edge": "true"}),
         node("web-1", "10.0.1.1", "fd00:1::1", tier="web"),
         node("web-2", "10.0.1.2", "fd00:1::2", tier="web"),
         node("web-3", "10.0.1.3", tier="web", ready=False)]


READY_AGENTS = {"web": {"web-1", "web-2", "web-3", "web-6"}}


def view(*policies: SynProxyPolicy, services=None, slices=None, nodes=NODES, agents=READY_AGENTS,
         proxy_pool=EDGE, backend_pool=WEB, namespaces=None) -> ClusterView:
    return ClusterView(proxy_pools=[proxy_pool], backend_pools=[backend_pool], policies=list(policies), nodes=nodes,
                       services=services or {}, endpoint_slices=slices or [], ready_backend_agents=agents,
                       namespace_labels=namespaces or {})


# ---- agent workload ----

def test_agent_daemonset_runs_the_pool_role_with_least_privilege():
    ds = agents.daemonset(EDGE, SETTINGS)
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert ds["metadata"]["namespace"] == "synfleet-system"
    assert ds["metadata"]["ownerReferences"] == [{
        "apiVersion": "synfleet.io/v1alpha1", "kind": "ProxyPool", "name": "edge", "uid": "uid-edge",
        "controller": True, "blockOwnerDeletion": True}]
    assert pod["hostNetwork"] and pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"synfleet.io/edge": "true"}
    assert c["image"] == SETTINGS.agent_image
    assert c["args"][:4] == ["agent", "--role", "proxy", "--kubernetes"]
    assert c["args"][c["args"].index("--secret") + 1] == "synfleet-salts-edge"
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    # A writable /tmp beside the read-only root (the Kubernetes client's discovery cache).
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["port"] == 9478
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_pool_image_tolerations_and_resources_reach_the_pod():
    custom = pool(Role.BACKEND, "web", image="registry.local/agent:dev", metricsPort=9600,
                  tolerations=[{"key": "dedicated", "operator": "Equal", "value": "web", "effect": "NoSchedule"}],
                  resources={"requests": {"cpu": "100m"}})
    pod = agents.daemonset(custom, SETTINGS)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/agent:dev"
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "web", "effect": "NoSchedule"}]
    assert c["resources"] == {"requests": {"cpu": "100m"}}
    assert "--secret" not in c["args"] and "$(SYNFLEET_NODE_IP):9600" in c["args"]


def test_agents_listen_on_the_nodes_internal_address_or_loopback_never_on_all():
    for spec, listen, probe_host in (({}, "$(SYNFLEET_NODE_IP):9478", None),
                                     ({"metricsAddress": "loopback"}, "127.0.0.1:9478", "127.0.0.1")):
        (c,) = agents.daemonset(pool(Role.PROXY, "edge", **spec), SETTINGS)["spec"]["template"]["spec"]["containers"]
        assert c["args"][c["args"].index("--listen") + 1] == listen
        assert c["readinessProbe"]["httpGet"].get("host") == c["livenessProbe"]["httpGet"].get("host") == probe_host
        env = {e["name"]: e for e in c["env"]}
        assert env["SYNFLEET_NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}


def test_backend_agents_keep_off_every_node_a_proxy_pool_selects():
    def terms(selectors):
        pod = agents.daemonset(WEB, SETTINGS, selectors)["spec"]["template"]["spec"]
        return [t["matchExpressions"] for t in pod["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]]

    def allowed(selectors, labels) -> bool:     # the scheduler's reading: OR of terms, AND within
        return any(all((e["operator"] == "NotIn" and labels.get(e["key"]) not in e["values"])
                       or (e["operator"] == "DoesNotExist" and e["key"] not in labels) for e in t)
                   for t in terms(selectors))

    two = [{"synfleet.io/edge": "true"}, {"zone": "dmz", "edge": "yes"}]
    assert len(terms(two)) == 2
    assert allowed(two, {"tier": "web"}) and allowed(two, {"tier": "web", "zone": "dmz"})
    assert not allowed(two, {"tier": "web", "synfleet.io/edge": "true"})
    assert not allowed(two, {"tier": "web", "zone": "dmz", "edge": "yes"})
    assert not allowed([{}], {"tier": "web", "kubernetes.io/hostname": "web-1"}), "a proxy pool on every node"
    assert "affinity" not in agents.daemonset(WEB, SETTINGS, [])["spec"]["template"]["spec"]
    assert "affinity" not in agents.daemonset(EDGE, SETTINGS, two)["spec"]["template"]["spec"]


def test_a_backend_pool_names_the_nodes_that_run_a_proxy_instead():
    both = node("web-9", "10.0.1.9", tier="web", **{"synfleet.io/edge": "true"})
    v = view(nodes=NODES + [both])
    assert proxy_nodes_in(WEB, v) == ["web-9"]
    st = pool_status(WEB, Rollout(desired=2, ready=2, updated=2, current=True), None, [], None,
                     proxy_nodes_in(WEB, v))
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert (conds["Degraded"]["status"], conds["Degraded"]["reason"]) == ("True", "NodesRunAProxy")
    assert conds["Degraded"]["message"].startswith("not on web-9: a proxy pool selects it too")


def test_only_proxy_agents_may_read_their_own_salt_secret():
    proxy_rules = agents.role(EDGE, SETTINGS)["rules"]
    backend_rules = agents.role(WEB, SETTINGS)["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["synfleet-salts-edge"],
            "verbs": ["get", "list", "watch"]} in proxy_rules
    assert all("secrets" not in r["resources"] for r in backend_rules)
    # Reads by name only; the one write is the agent's own NodeAgent report (the
    # chart's admission policy holds it to its node, as create cannot be named).
    report = {"apiGroups": ["synfleet.io"], "resources": ["nodeagents", "nodeagents/status"],
              "verbs": ["get", "create", "patch"]}
    for rules in (proxy_rules, backend_rules):
        assert report in rules
        others = [r for r in rules if r != report]
        assert all(r.get("resourceNames") for r in others)
        assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in others)


# ---- salts ----

DAY, MINUTE = 86400, 60


def generations(keys) -> list[tuple[int, int]]:
    return [(k.generation, k.from_epoch) for k in keys]


def test_the_first_master_key_covers_the_previous_epoch_and_epochs_roll_over_without_a_write():
    first = salts.rotate([], 100, MINUTE, DAY)
    assert generations(first) == [(1, 99)] and len(first[0].key) == 32
    assert all(salts.rotate(first, e, MINUTE, DAY) == first for e in range(100, 1300))


def test_the_next_generation_is_announced_an_hour_ahead_and_the_old_one_kept_while_cookies_need_it():
    first = salts.rotate([], 100, MINUTE, DAY)          # a generation lasts 1440 one-minute epochs
    switch = 99 + 1440
    assert salts.rotate(first, switch - 61, MINUTE, DAY) == first
    both = salts.rotate(first, switch - 60, MINUTE, DAY)
    assert generations(both) == [(1, 99), (2, switch)] and both[1].key != first[0].key
    assert salts.rotate(both, switch, MINUTE, DAY) == both      # cookies of switch - 1 still validate
    assert generations(salts.rotate(both, switch + 1, MINUTE, DAY)) == [(2, switch)]


def test_a_generation_announced_late_still_gets_its_whole_lead():
    late = salts.rotate(salts.rotate([], 100, MINUTE, DAY), 5000, MINUTE, DAY)
    assert generations(late) == [(1, 99), (2, 5060)]
    # Short generations: announced half a generation ahead at most.
    assert salts.announce_epochs(10, 60) == 3 and salts.announce_epochs(60, DAY) == 60


def test_a_changed_epoch_length_starts_a_new_generation_from_now():
    assert generations(salts.restart(salts.rotate([], 100, MINUTE, DAY), 7)) == [(2, 6)]


def test_salt_secret_round_trips_and_is_what_a_proxy_config_accepts():
    keys = salts.rotate([], 7, MINUTE, DAY)
    secret = salts.secret(EDGE, SETTINGS, keys)
    assert secret["metadata"]["name"] == "synfleet-salts-edge" and secret["type"] == "Opaque"
    assert contract.secret_salt_keys(secret) == keys
    assert contract.secret_rotation_seconds(secret) == 60
    assert contract.secret_salt_keys(None) == []


# ---- data-plane rendering ----

def test_policy_renders_into_both_pools_with_backends_and_allowed_proxies():
    p = policy("web", addresses=["203.0.113.10", "2001:db8::10"], ports=[443, 80], mode="monitor",
               cookie={"windowScale": 9, "timestamps": False})
    out = render(view(p), SETTINGS)
    proxy_doc = out.configs[(Role.PROXY, "edge")]
    backend_doc = out.configs[(Role.BACKEND, "web")]
    (entry,) = proxy_doc["policies"]
    assert entry["id"] == 1 and entry["name"] == "shop/web" and entry["mode"] == "monitor"
    assert {(s["address"], s["port"]) for s in entry["services"]} == {
        ("203.0.113.10", 443), ("203.0.113.10", 80), ("2001:db8::10", 443), ("2001:db8::10", 80)}
    assert backend_set_of(proxy_doc, "shop/web") == {                # web-3 is not Ready
        "name": "web", "backends": ["10.0.1.1", "10.0.1.2"], "drainSeconds": 300}
    assert entry["cookie"]["windowScale"] == 9 and entry["cookie"]["timestamps"] is False
    assert "backendSet" not in backend_doc["policies"][0] and "backendSets" not in backend_doc
    assert backend_doc["allowedProxies"] == ["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]
    assert proxy_doc["rotationSeconds"] == 60
    assert proxy_doc["node"] == {"interfaces": ["eth0"], "encapPort": 6080, "xdp": False}
    assert proxy_doc["failurePolicy"] == "open" and "failurePolicy" not in backend_doc
    assert backend_doc["node"] == {"interfaces": ["eth0"], "encapPort": 6080}
    assert out.policies["shop/web"].backends == 2 and out.policies["shop/web"].problem is None
    # Daisy chaining: who may hand flows on.
    assert backend_doc["peerBackends"] == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]

    cfg = agent_document(proxy_doc, "10.0.0.1", "fd00::1", salts.rotate([], 5, MINUTE, DAY))
    assert cfg.role is schema.Role.PROXY and cfg.node.addresses.ipv4.compressed == "10.0.0.1"
    validate_for_nodes(Role.BACKEND, backend_doc, NODES)


def test_a_proxy_pool_asking_for_xdp_renders_the_xdp_front_on():
    edge = pool(Role.PROXY, "edge", nodeSelector={"synfleet.io/edge": "true"}, xdp=True)
    v = view(policy("web", addresses=["203.0.113.10"], ports=[443]))
    out = render(dataclasses.replace(v, proxy_pools=[edge]), SETTINGS)
    doc = out.configs[(Role.PROXY, "edge")]
    assert doc["node"]["xdp"] is True
    assert agent_document(doc, "10.0.0.1", "fd00::1", salts.rotate([], 5, MINUTE, DAY)).node.xdp is True


def test_a_pools_attach_choice_reaches_its_document_and_the_default_adds_nothing():
    v = view(policy("web", addresses=["203.0.113.10"], ports=[443]))
    assert "attach" not in render(v, SETTINGS).configs[(Role.PROXY, "edge")]["node"]
    edge = pool(Role.PROXY, "edge", nodeSelector={"synfleet.io/edge": "true"},
                attach={"mode": "tcx", "after": "cil_from_netdev"})
    doc = render(dataclasses.replace(v, proxy_pools=[edge]), SETTINGS).configs[(Role.PROXY, "edge")]
    assert doc["node"]["attach"] == {"mode": "tcx", "after": "cil_from_netdev"}
    node_cfg = agent_document(doc, "10.0.0.1", "fd00::1", salts.rotate([], 5, MINUTE, DAY)).node
    assert node_cfg.attach.after == "cil_from_netdev"


def agent_pod(node: str, ready: bool, role: str = "backend", pool: str = "web") -> dict:
    return {"metadata": {"name": f"agent-{node}", "labels": names.labels(Role(role), pool)},
            "spec": {"nodeName": node},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_only_nodes_with_a_ready_backend_agent_receive_flows():
    pods = [agent_pod("web-1", True), agent_pod("web-2", False), agent_pod("edge-1", True, "proxy", "edge"),
            {"metadata": {"name": "starting", "labels": names.labels(Role.BACKEND, "web")}, "spec": {}}]
    agents = ready_agent_nodes(pods)
    assert agents == {"web": {"web-1"}}
    out = render(view(policy("a", addresses=["203.0.113.1"]), agents=agents), SETTINGS)
    assert backend_set_of(out.configs[(Role.PROXY, "edge")], "shop/a")["backends"] == ["10.0.1.1"]
    out = render(view(policy("a", addresses=["203.0.113.1"]), agents={}), SETTINGS)
    assert out.policies["shop/a"].problem.reason == "NoBackends"
    assert "Ready agent" in out.policies["shop/a"].problem.message


def test_service_addresses_follow_the_address_types_asked_for():
    svc = {"spec": {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"], "externalIPs": ["198.51.100.7"]},
           "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}}}
    default = policy("a", service={"name": "shop"})
    every = policy("b", service={"name": "shop", "addressTypes": ["ClusterIP", "LoadBalancer"]}, ports=[8443])
    out = render(view(default, every, services={("shop", "shop"): svc}), SETTINGS)
    assert out.policies["shop/a"].addresses == ["203.0.113.7", "198.51.100.7"]
    assert out.policies["shop/b"].addresses == ["203.0.113.7", "10.96.0.7"]


def test_local_traffic_policy_sends_only_to_nodes_hosting_a_ready_endpoint():
    svc = {"spec": {"externalIPs": ["198.51.100.7"], "externalTrafficPolicy": "Local"}}
    slices = [{"metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "shop"}},
               "endpoints": [{"nodeName": "web-2", "conditions": {"ready": True}},
                             {"nodeName": "web-1", "conditions": {"ready": False}}]}]
    out = render(view(policy("a", service={"name": "shop"}), services={("shop", "shop"): svc}, slices=slices),
                 SETTINGS)
    assert backend_set_of(out.configs[(Role.PROXY, "edge")], "shop/a")["backends"] == ["10.0.1.2"]


@pytest.mark.parametrize("spec, reason", [
    ({"service": {"name": "missing"}}, "ServiceNotFound"),
    ({"addresses": ["203.0.113.1"], "proxyPool": "nope"}, "ProxyPoolNotFound"),
    ({"addresses": ["203.0.113.1"], "backendPool": "nope"}, "BackendPoolNotFound"),
])
def test_unservable_policy_is_left_out_with_a_reason(spec, reason):
    out = render(view(policy("a", **spec)), SETTINGS)
    assert out.policies["shop/a"].problem.reason == reason
    assert out.configs[(Role.PROXY, "edge")]["policies"] == []


def test_service_without_an_address_yet_and_pool_without_ready_nodes_are_reported():
    svc = {"spec": {"clusterIP": "10.96.0.9"}, "status": {}}
    out = render(view(policy("a", service={"name": "s"}), services={("shop", "s"): svc}), SETTINGS)
    assert out.policies["shop/a"].problem.reason == "NoAddresses"
    down = [n for n in NODES if "web" not in n.name]
    out = render(view(policy("b", addresses=["203.0.113.1"]), nodes=down), SETTINGS)
    assert out.policies["shop/b"].problem.reason == "NoBackends"


def test_younger_policy_claiming_a_protected_port_is_in_conflict():
    old = policy("old", created="2026-11-25T09:00:00Z", addresses=["203.0.113.1"], ports=[443])
    new = policy("new", created="2026-11-25T10:00:00Z", addresses=["203.0.113.1", "203.0.113.2"], ports=[443])
    out = render(view(new, old), SETTINGS)
    assert out.policies["shop/old"].problem is None
    assert out.policies["shop/new"].problem.reason == "Conflict"
    assert "203.0.113.1 port 443" in out.policies["shop/new"].problem.message
    assert "shop/old" in out.policies["shop/new"].problem.message
    assert [p["name"] for p in out.configs[(Role.PROXY, "edge")]["policies"]] == ["shop/old"]


def test_policy_ids_are_stable_and_collisions_go_to_the_oldest():
    a = policy("a", created="2026-01-01T00:00:00Z", policy_id=5)
    b = policy("b", created="2026-01-02T00:00:00Z", policy_id=5)
    c = policy("c", created="2026-01-03T00:00:00Z")
    assert allocate_ids([c, b, a]) == {"shop/a": 5, "shop/b": 1, "shop/c": 2}


def test_policy_ids_are_cluster_wide_up_to_the_data_planes_id_space():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    many = [policy(f"p{i:04d}", created=(t0 + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ"))
            for i in range(MAX_POLICIES)]
    ids = allocate_ids(many)
    assert sorted(i for i in ids.values() if i is not None) == list(range(1, MAX_POLICIES))
    assert [key for key, i in ids.items() if i is None] == ["shop/p8191"]     # the newest waits


def test_a_pools_policies_share_its_backend_set_and_a_local_service_has_its_own():
    local = {"spec": {"externalIPs": ["198.51.100.7"], "externalTrafficPolicy": "Local"}}
    slices = [{"metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "shop"}},
               "endpoints": [{"nodeName": "web-2", "conditions": {"ready": True}}]}]
    out = render(view(policy("a", addresses=["203.0.113.1"]), policy("b", addresses=["203.0.113.2"]),
                      policy("c", service={"name": "shop"}, ports=[80]), policy("d", service={"name": "shop"}),
                      services={("shop", "shop"): local}, slices=slices), SETTINGS)
    doc = out.configs[(Role.PROXY, "edge")]
    assert {p["name"]: p["backendSet"] for p in doc["policies"]} == {
        "shop/a": "web", "shop/b": "web", "shop/c": "web/shop/shop", "shop/d": "web/shop/shop"}
    assert doc["backendSets"] == [
        {"name": "web", "backends": ["10.0.1.1", "10.0.1.2"], "drainSeconds": 300},
        {"name": "web/shop/shop", "backends": ["10.0.1.2"], "drainSeconds": 300}]
    validate_for_nodes(Role.PROXY, doc, NODES)


def test_a_proxy_pool_beyond_its_backend_sets_refuses_the_newest_policy_and_says_why():
    services = {("shop", f"s{i}"): {"spec": {"externalIPs": [f"198.51.{i // 250}.{i % 250 + 1}"],
                                             "externalTrafficPolicy": "Local"}} for i in range(MAX_TABLES + 1)}
    slices = [{"metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": f"s{i}"}},
               "endpoints": [{"nodeName": "web-1"}]} for i in range(MAX_TABLES + 1)]
    out = render(view(*[policy(f"p{i:03d}", created=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
                               service={"name": f"s{i}"}) for i in range(MAX_TABLES + 1)],
                      services=services, slices=slices), SETTINGS)
    assert len(out.configs[(Role.PROXY, "edge")]["backendSets"]) == MAX_TABLES
    refused = {k: o.problem for k, o in out.policies.items() if o.problem}
    assert list(refused) == [f"shop/p{MAX_TABLES:03d}"]
    assert refused[f"shop/p{MAX_TABLES:03d}"].reason == "TooManyBackendSets"
    assert f"already serves {MAX_TABLES} backend sets" in refused[f"shop/p{MAX_TABLES:03d}"].message


# The supported maximum (docs/operator.md, "Limits"): per pool 2,000 policies of
# 4 service endpoints each; 4,096 backend nodes; 20 proxies.
MAX_POOL_POLICIES = 2000


def test_at_the_supported_maximum_each_pools_document_fits_in_its_configmap():
    proxies = [node(f"edge-{i}", f"10.0.0.{i + 1}", f"fd00::{i + 1:x}", **{"synfleet.io/edge": "true"})
               for i in range(20)]
    backends = [node(f"web-{i}", f"10.1.{i // 250}.{i % 250 + 1}", f"fd00:1::{i + 1:x}", tier="web")
                for i in range(MAX_BACKENDS)]
    policies = [policy(f"p{i:04d}", addresses=[f"203.0.{i // 250}.{i % 250 + 1}", f"2001:db8::{i + 1:x}"],
                       ports=[80, 443], cookie={"windowScale": 9}) for i in range(MAX_POOL_POLICIES)]
    out = render(view(*policies, nodes=proxies + backends, agents={"web": {n.name for n in backends}}), SETTINGS)
    assert not [o.problem for o in out.policies.values() if o.problem]
    for (role, name), document in out.configs.items():
        assert len(document["policies"]) == MAX_POOL_POLICIES
        data = configmap(pool(role, name), SETTINGS, document)["data"]
        # The API server's limit on a ConfigMap's data (422 "Too long" above it).
        assert sum(len(k) + len(v.encode()) for k, v in data.items()) < 0.75 * 2**20, (role, name)
        validate_for_nodes(role, document, proxies[:1] if role is Role.PROXY else backends[:1])


def test_a_render_from_the_operators_trimmed_services_and_slices_is_the_render_from_the_full_objects():
    """The operator's cache keeps only what a render reads of Services and
    EndpointSlices (synfleet.operator.cache): the same documents and outcomes."""
    meta = {"uid": "u", "resourceVersion": "9", "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}}
    services = {
        ("shop", "lb"): {"metadata": {"name": "lb", "namespace": "shop", **meta},
                         "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"],
                                  "externalTrafficPolicy": "Local", "ports": [{"port": 443}], "selector": {"app": "x"}},
                         "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "VIP"},
                                                                 {"hostname": "lb.example"}]}}},
        ("shop", "ext"): {"metadata": {"name": "ext", "namespace": "shop", **meta},
                          "spec": {"clusterIP": "None", "externalIPs": ["198.51.100.8"]}},
        ("other", "taken"): {"metadata": {"name": "taken", "namespace": "other", **meta},
                             "spec": {"clusterIP": "10.96.0.9", "externalIPs": ["203.0.113.9"]}}}
    slices = [{"metadata": {"name": "lb-1", "namespace": "shop", **meta,
                            "labels": {"kubernetes.io/service-name": "lb", "endpointslice.kubernetes.io/managed-by": "x"}},
               "addressType": "IPv4", "ports": [{"port": 8443}],
               "endpoints": [{"addresses": ["10.244.0.2"], "nodeName": "web-2", "conditions": {"ready": True}},
                             {"addresses": ["10.244.0.3"], "nodeName": "web-1", "conditions": {"ready": False}},
                             {"addresses": ["10.244.0.4"], "nodeName": "web-1"},
                             {"addresses": ["10.244.0.5"]}]}]
    policies = [policy("a", service={"name": "lb", "addressTypes": ["LoadBalancer", "ClusterIP"]}),
                policy("b", service={"name": "ext"}), policy("c", addresses=["203.0.113.9"])]
    full = render(view(*policies, services=services, slices=slices), SETTINGS)
    trimmed = render(view(*policies, services={k: service_fields(v) for k, v in services.items()},
                          slices=[endpoint_slice_fields(s) for s in slices]), SETTINGS)
    assert trimmed == full
    assert full.policies["shop/c"].problem.reason == "AddressNotAllowed"
    assert backend_set_of(full.configs[(Role.PROXY, "edge")], "shop/a")["backends"] == ["10.0.1.1", "10.0.1.2"]


def test_address_owners_kept_service_by_service_are_those_a_render_would_compute():
    svc = lambda ns, name, *ips: {"metadata": {"namespace": ns, "name": name},  # noqa: E731
                                  "spec": {"clusterIP": "None", "externalIPs": list(ips)}}
    history = [(None, svc("a", "x", "198.51.100.1", "2001:DB8::1")), (None, svc("b", "y", "198.51.100.1")),
               (None, svc("a", "z", "2001:db8::1")),
               (svc("a", "x", "198.51.100.1", "2001:DB8::1"), svc("a", "x", "198.51.100.2")),
               (svc("b", "y", "198.51.100.1"), None)]
    owners, services = AddressOwners(), {}
    for old, new in history:
        owners.update(old, new)
        key = ((old or new)["metadata"]["namespace"], (old or new)["metadata"]["name"])
        if new is None:
            services.pop(key)
        else:
            services[key] = new
        assert owners.current() == view(services=services).address_owners()
    assert owners.current() == {"198.51.100.2": {"a"}, "2001:db8::1": {"a"}}


def test_a_replica_renders_only_while_no_live_peer_has_its_priority_or_more():
    """kopf's peering rule, which pauses its handlers, applied to renders."""
    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=timezone.utc)
    seen = lambda ago: (now - timedelta(seconds=ago)).isoformat()  # noqa: E731
    peering = {"status": {"me": {"priority": 50, "lifetime": 60, "lastseen": seen(1)},
                          "lower": {"priority": 10, "lifetime": 60, "lastseen": seen(1)},
                          "higher-dead": {"priority": 90, "lifetime": 60, "lastseen": seen(61)}}}
    assert not outranked(peering, "me", 50, now)
    assert not outranked(None, "me", 50, now), "no peering object yet: nobody outranks"
    peering["status"]["higher"] = {"priority": 90, "lifetime": 60, "lastseen": seen(59)}
    assert outranked(peering, "me", 50, now)
    assert not outranked(peering, "higher", 90, now)
    peering["status"]["tie"] = {"priority": 90, "lifetime": 60, "lastseen": seen(0)}
    assert outranked(peering, "higher", 90, now), "kopf pauses both replicas of a tie"


def test_a_render_depends_on_the_services_policies_name_and_those_holding_a_protected_address():
    named = policy("shop", service={"name": "front"})
    listed = policy("raw", addresses=["203.0.113.10"], ports=[80])
    services = {("shop", "front"): {"metadata": {"name": "front", "namespace": "shop"},
                                    "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}}
    v = view(named, listed, services=services)
    interest = ServiceInterest.of(v, render(v, SETTINGS))
    assert interest.service(("shop", "front"), set())
    assert interest.service(("blog", "other"), {"203.0.113.10"}), "an address a policy claims: tenancy"
    assert interest.service(("blog", "other"), {"198.51.100.7"}), "the named Service's address, elsewhere"
    assert not interest.service(("blog", "other"), {"192.0.2.1"})
    slice_ = lambda ns, svc: {"metadata": {"namespace": ns, "labels": {"kubernetes.io/service-name": svc}}}  # noqa: E731
    assert interest.endpoint_slice(slice_("shop", "front"))
    assert not interest.endpoint_slice(slice_("shop", "other")) and not interest.endpoint_slice(slice_("blog", "front"))


def test_document_a_node_cannot_use_is_rejected_naming_the_node():
    v4_only = [node("edge-9", "10.0.0.9", **{"synfleet.io/edge": "true"})]
    v6_backends = [node("web-6", "fd00:1::6", tier="web")]
    out = render(view(policy("a", addresses=["2001:db8::1"]), nodes=v4_only + v6_backends), SETTINGS)
    doc = out.configs[(Role.PROXY, "edge")]
    with pytest.raises(schema.ConfigError, match=r"node edge-9 .*ipv6"):
        validate_for_nodes(Role.PROXY, doc, v4_only)


def test_configmap_carries_the_document_owned_by_the_pool():
    doc = render(view(), SETTINGS).configs[(Role.BACKEND, "web")]
    cm = configmap(WEB, SETTINGS, doc)
    assert cm["metadata"]["name"] == "synfleet-backend-web"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "BackendPool"
    assert yaml.safe_load(cm["data"][contract.CONFIG_KEY]) == doc


# ---- tenancy ----

TEAMS = {"shop": {"team": "shop", "tier": "prod"}, "blog": {"team": "blog"}, "lab": {}}


def test_tenant_a_pool_admits_only_the_namespaces_its_selector_selects():
    edge = pool(Role.PROXY, "edge", nodeSelector={"synfleet.io/edge": "true"},
                allowedNamespaces={"matchLabels": {"tier": "prod"}})
    web = pool(Role.BACKEND, "web", nodeSelector={"tier": "web"},
               allowedNamespaces={"matchExpressions": [{"key": "team", "operator": "In", "values": ["shop", "blog"]}]})
    out = render(view(policy("a", addresses=["203.0.113.1"]),
                      policy("b", namespace="blog", addresses=["203.0.113.2"]),
                      policy("c", namespace="lab", addresses=["203.0.113.3"]),
                      proxy_pool=edge, backend_pool=web, namespaces=TEAMS), SETTINGS)
    assert out.policies["shop/a"].problem is None
    assert out.policies["blog/b"].problem == Problem(
        "Forbidden", "ProxyPool 'edge' does not admit namespace 'blog' (its spec.allowedNamespaces)")
    out = render(view(policy("c", namespace="lab", addresses=["203.0.113.3"]), backend_pool=web,
                      namespaces=TEAMS), SETTINGS)
    assert out.policies["lab/c"].problem.reason == "Forbidden" and "BackendPool 'web'" in out.policies["lab/c"].problem.message
    assert [e["name"] for e in out.configs[(Role.PROXY, "edge")]["policies"]] == []


def test_tenant_addresses_must_lie_in_the_pools_allowed_ranges():
    edge = pool(Role.PROXY, "edge", nodeSelector={"synfleet.io/edge": "true"},
                allowedAddresses=["203.0.113.0/25", "2001:db8:10::/48"])
    out = render(view(policy("in", addresses=["203.0.113.5", "2001:db8:10::5"]),
                      policy("out", addresses=["203.0.113.200"], ports=[80]), proxy_pool=edge), SETTINGS)
    assert out.policies["shop/in"].problem is None
    assert out.policies["shop/out"].problem == Problem(
        "AddressNotAllowed", "203.0.113.200 is outside ProxyPool 'edge''s allowedAddresses "
                             "(203.0.113.0/25, 2001:db8:10::/48)")


def test_tenant_a_services_address_belongs_to_its_namespace_even_before_its_owner_asks():
    svc = {"spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}}
    services = {("shop", "web"): svc}
    squatter = policy("squat", namespace="blog", created="2026-11-01T00:00:00Z", addresses=["203.0.113.7"])
    out = render(view(squatter, services=services), SETTINGS)
    assert out.policies["blog/squat"].problem == Problem(
        "AddressNotAllowed", "203.0.113.7 is an address of a Service in namespace shop; only policies there "
                             "may protect it")
    # The owner's policy, younger, protects its Service all the same.
    out = render(view(squatter, policy("web", service={"name": "web"}), services=services), SETTINGS)
    assert out.policies["shop/web"].problem is None and out.policies["shop/web"].addresses == ["203.0.113.7"]
    assert out.policies["blog/squat"].problem.reason == "AddressNotAllowed"
    # In the owner's namespace, naming the address directly is fine.
    assert render(view(policy("direct", addresses=["203.0.113.7"]), services=services),
                  SETTINGS).policies["shop/direct"].problem is None


# ---- status ----

def test_pool_status_progresses_from_rolling_out_to_ready():
    rolling = pool_status(EDGE, Rollout(desired=2, ready=1, updated=2, current=True), None, [], 42)
    ready = {c["type"]: c for c in rolling["conditions"]}
    assert ready["Ready"]["status"] == "False" and ready["Ready"]["reason"] == "RollingOut"
    assert ready["Progressing"]["status"] == "True"
    assert rolling["nodes"] == "1/2" and rolling["saltGeneration"] == 42 and rolling["observedGeneration"] == 3
    done = pool_status(EDGE, Rollout(desired=2, ready=2, updated=2, current=True), None, rolling["conditions"])
    conds = {c["type"]: c for c in done["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["lastTransitionTime"] == ready["Degraded"]["lastTransitionTime"]


def test_pool_matching_no_node_is_not_ready_and_says_why():
    st = pool_status(WEB, Rollout(desired=0, current=True), None, [])
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NoNodes" and "tier" in ready["message"]


def drained(name: str, *addresses: str, spec: dict | None = None, labels: dict | None = None,
            annotations: dict | None = None) -> NodeInfo:
    """A web node marked for draining in one of the ways the operator honours."""
    return NodeInfo.from_object({
        "metadata": {"name": name, "labels": {"tier": "web", **(labels or {})}, "annotations": annotations or {}},
        "spec": spec or {},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses],
                   "conditions": [{"type": "Ready", "status": "True"}]}})


@pytest.mark.parametrize("how, reason", [
    ({"spec": {"unschedulable": True}}, "Cordoned"),
    ({"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": ""}}, "ExcludedFromLoadBalancers"),
    ({"annotations": {"synfleet.io/draining": "true"}}, "Marked")])
def test_a_draining_node_gets_no_new_flow_but_stays_a_peer(how, reason):
    nodes = [*NODES[:3], drained("web-2", "10.0.1.2", **how)]
    out = render(view(policy("web", addresses=["203.0.113.10"]), nodes=nodes), SETTINGS)
    assert backend_set_of(out.configs[(Role.PROXY, "edge")], "shop/web")["backends"] == ["10.0.1.1"]
    assert out.configs[(Role.BACKEND, "web")]["peerBackends"] == ["10.0.1.1", "10.0.1.2"]
    assert nodes[-1].draining == reason


def test_the_pool_lists_its_members_and_its_draining_nodes_until_their_drain_ends():
    web = pool(Role.BACKEND, "web", nodeSelector={"tier": "web"}, drainSeconds=60)
    t0 = datetime(2026, 12, 3, 7, 0, tzinfo=timezone.utc)
    one, two = node("web-1", "10.0.1.1", tier="web"), node("web-2", "10.0.1.2", tier="web")
    cordoned = drained("web-2", "10.0.1.2", spec={"unschedulable": True})
    first = drain_report(web, [one, two], [one, two], {}, t0)
    assert first == {"members": ["web-1", "web-2"], "draining": []}
    later = drain_report(web, [one, cordoned], [one], first, t0 + timedelta(seconds=5))
    assert later["draining"] == [{"node": "web-2", "reason": "Cordoned", "since": "2026-12-03T07:00:05Z",
                                  "until": "2026-12-03T07:01:05Z"}]
    # Timed from when it was first seen, however often the status is written again.
    again = drain_report(web, [one, cordoned], [one], later, t0 + timedelta(seconds=50))
    assert again["draining"] == later["draining"]
    # It then leaves the pool: listed until the drain that began with the cordon ends.
    left = drain_report(web, [one], [one], again, t0 + timedelta(seconds=55))
    assert [(d["node"], d["reason"], d["until"]) for d in left["draining"]] == \
        [("web-2", "LeftPool", "2026-12-03T07:01:05Z")]
    assert drain_report(web, [one], [one], left, t0 + timedelta(seconds=64))["draining"] == left["draining"]
    assert drain_report(web, [one], [one], left, t0 + timedelta(seconds=65))["draining"] == []
    # A member that leaves at once drains from then.
    gone = drain_report(web, [one], [one], first, t0 + timedelta(seconds=100))
    assert [(d["node"], d["reason"], d["since"]) for d in gone["draining"]] == \
        [("web-2", "LeftPool", "2026-12-03T07:01:40Z")]


def test_condition_transition_time_moves_only_with_its_status():
    first = condition("Ready", False, "A", "", 1, [], now="2026-01-01T00:00:00Z")
    same = condition("Ready", False, "B", "", 2, [first], now="2026-01-02T00:00:00Z")
    flipped = condition("Ready", True, "C", "", 2, [same], now="2026-01-03T00:00:00Z")
    assert same["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-01-03T00:00:00Z"


def test_degraded_policy_status_carries_reason_and_keeps_its_id():
    out = render(view(policy("a", service={"name": "gone"})), SETTINGS)
    st = policy_status(policy("a", service={"name": "gone"}), out.policies["shop/a"], Rollout(), Rollout(), None, [])
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["policyId"] == 1
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "ServiceNotFound"
    assert conds["Ready"]["status"] == "False"


# ---- deletions ----

def report(role: Role, pool_name: str, node_name: str, ready: bool = True, retired: bool = False,
           version: str | None = None) -> lifecycle.AgentReport:
    obj = contract.node_agent(role, pool_name, f"uid-{pool_name}", node_name, "synfleet-system")
    obj["status"] = {"conditions": [{"type": "Ready", "status": str(ready)},
                                    {"type": "Retired", "status": str(retired)}],
                     **({"configVersion": version} if version else {})}
    return lifecycle.AgentReport.from_object(obj)


def test_a_deleted_pool_waits_for_each_live_node_whose_agent_reported_and_has_not_retired():
    reports = [report(Role.BACKEND, "web", "web-1", retired=True), report(Role.BACKEND, "web", "web-2"),
               report(Role.BACKEND, "web", "web-3"),      # its node is NotReady: nobody can answer there
               report(Role.BACKEND, "web", "web-9"),      # its node is gone
               report(Role.BACKEND, "other", "web-1"), report(Role.PROXY, "web", "web-1")]
    assert lifecycle.unretired(WEB, reports, NODES) == ["web-2"]
    assert lifecycle.unretired(WEB, reports[:1], NODES) == []


def test_a_deleted_policy_waits_for_serving_agents_that_have_not_applied_the_current_version():
    reports = [report(Role.PROXY, "edge", "edge-1", version="41"), report(Role.PROXY, "edge", "edge-2", version="42"),
               report(Role.PROXY, "edge", "edge-2", ready=False, version="40"),   # not serving: not waited for
               report(Role.PROXY, "edge", "edge-1")]      # reports no version (an older agent): cannot be waited for
    assert lifecycle.not_applied(EDGE, reports, NODES, "42") == ["edge-1"]
    assert lifecycle.not_applied(EDGE, reports, NODES, "41") == ["edge-2"]


def test_the_teardown_wait_ends_at_the_timeout_counted_from_the_deletion():
    now = datetime(2026, 12, 2, 12, 2, 0, tzinfo=timezone.utc)
    assert not lifecycle.overdue("2026-12-02T12:00:01Z", now, 120)
    assert lifecycle.overdue("2026-12-02T12:00:00Z", now, 120)
    assert not lifecycle.overdue(None, now, 120)


def test_a_policy_being_deleted_leaves_the_documents_but_keeps_its_id_until_it_is_gone():
    going = policy("going", policy_id=5, addresses=["203.0.113.10"])
    going = going.model_copy(update={"deleting": True})
    young = policy("young", created="2026-11-26T10:00:00Z", addresses=["203.0.113.11"])
    rendered = render(view(going, young), SETTINGS)
    assert rendered.policies["shop/going"].problem.reason == "Deleting"
    assert [p["name"] for p in rendered.configs[(Role.PROXY, "edge")]["policies"]] == ["shop/young"]
    assert rendered.policies["shop/young"].policy_id != 5


def test_a_retiring_configmap_keeps_the_document_beside_the_instruction():
    document = render(view(), SETTINGS).configs[(Role.PROXY, "edge")]
    cm = configmap(EDGE, SETTINGS, document, retire="ProxyPool edge is being deleted")
    assert contract.configmap_retirement(cm) == "ProxyPool edge is being deleted"
    assert contract.configmap_document(cm, "cm") == document
    assert contract.configmap_retirement(configmap(EDGE, SETTINGS, document)) is None


def test_a_retiring_pool_says_whom_it_waits_for():
    status = lifecycle.retiring_status(EDGE, ["edge-2"], [])
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Retiring")
    assert ready["message"] == "deleting: waiting for 1 node(s) to detach: edge-2"
