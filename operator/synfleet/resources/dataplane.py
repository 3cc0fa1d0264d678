"""Render every pool's DataplaneConfig from the cluster's policies, pools, nodes,
Services and EndpointSlices. The ConfigMap holds the agent's document without
the two per-node parts: `node.addresses` (each agent reads its node's
addresses from the downward API) and `salts` (proxies read them from the
salt Secret). Everything else is exactly what `synfleet agent --config` reads.

A policy that cannot be served (missing pool or Service, a pool that does not
admit its namespace, an address it may not claim, no address, no backend, an
address and port another policy owns, or it is being deleted) is left out with a reason;
the others are rendered. Every document is validated with the agent's own
schema, as each node's agent will see it, before it is returned."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from synfleet import contract
from synfleet.abi import MAX_POLICIES, MAX_TABLES
from synfleet.config import schema
from synfleet.config.schema import Role
from synfleet.contract import POOL_KINDS
from synfleet.cookie.salts import MASTER_KEY_BYTES, MasterKey
from synfleet.resources import names
from synfleet.resources.agents import OperatorSettings, owner_reference
from synfleet.resources.model import Pool, SynProxyPolicy

BACKEND_ROTATION_S = 60   # schema-required; a backend never derives an epoch


@functools.lru_cache(maxsize=1 << 17)
def canonical(address: str) -> str:
    """One spelling per address (IPv6 has many). Cached: a render compares
    every Service's addresses, the same strings render after render."""
    return str(ipaddress.ip_address(address))


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    ipv4: str | None
    ipv6: str | None
    ready: bool
    draining: str | None = None     # why it takes no new connection (a DrainEntry reason), or None

    @classmethod
    def from_object(cls, node: dict) -> "NodeInfo":
        addresses = [a["address"] for a in (node.get("status") or {}).get("addresses") or []
                     if a.get("type") == "InternalIP"]
        by_family = {4: None, 6: None}
        for a in addresses:
            family = ipaddress.ip_address(a).version
            by_family[family] = by_family[family] or a
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (node.get("status") or {}).get("conditions") or [])
        labels = dict(node["metadata"].get("labels") or {})
        return cls(name=node["metadata"]["name"], labels=labels,
                   ipv4=by_family[4], ipv6=by_family[6],
                   ready=ready and not node["metadata"].get("deletionTimestamp"),
                   draining=_draining(node, labels))

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.ipv4, self.ipv6) if a]

    @property
    def addresses_document(self) -> dict[str, str]:
        """node.addresses as this node's agent fills it in."""
        return {k: v for k, v in (("ipv4", self.ipv4), ("ipv6", self.ipv6)) if v}


def _draining(node: dict, labels: dict[str, str]) -> str | None:
    if (node.get("spec") or {}).get("unschedulable"):
        return "Cordoned"
    if contract.LABEL_EXCLUDE_FROM_LB in labels:
        return "ExcludedFromLoadBalancers"
    if (node["metadata"].get("annotations") or {}).get(contract.ANNOTATION_DRAINING) == "true":
        return "Marked"
    return None


def ready_agent_nodes(pods: list[dict]) -> dict[str, set[str]]:
    """Nodes with a Ready backend agent, by pool, from the agents' pods."""
    ready: dict[str, set[str]] = {}
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if labels.get(contract.LABEL_ROLE) != Role.BACKEND.value or pod["metadata"].get("deletionTimestamp"):
            continue
        conditions = (pod.get("status") or {}).get("conditions") or []
        node = (pod.get("spec") or {}).get("nodeName")
        if node and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            ready.setdefault(labels[contract.LABEL_POOL], set()).add(node)
    return ready


def selects(pool: Pool, node: NodeInfo) -> bool:
    return all(node.labels.get(k) == v for k, v in pool.spec.node_selector.items())


def proxy_nodes_in(backend_pool: Pool, view: "ClusterView") -> list[str]:
    """Nodes the backend pool selects that a proxy pool selects too: they run
    the proxy (agents.not_on_proxy_nodes), and the backend pool says so."""
    proxies = {n.name for p in view.proxy_pools for n in view.selected(p)}
    return sorted(n.name for n in view.selected(backend_pool) if n.name in proxies)


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclass(frozen=True)
class PolicyOutcome:
    policy_id: int | None
    addresses: list[str] = field(default_factory=list)
    backends: int = 0
    problem: Problem | None = None


@dataclass
class ClusterView:
    """What the renderer reads, as the API server returned it."""
    proxy_pools: list[Pool]
    backend_pools: list[Pool]
    policies: list[SynProxyPolicy]
    nodes: list[NodeInfo]
    services: dict[tuple[str, str], dict]            # (namespace, name) -> Service, every one in the cluster
    endpoint_slices: list[dict] = field(default_factory=list)
    # Nodes whose backend agent pod is Ready, by BackendPool: only they can
    # accept a validated handshake, so only they go into the proxies' tables.
    ready_backend_agents: dict[str, set[str]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    # What address_owners() returns, when the caller keeps it up to date itself
    # (the operator's cache does, Service by Service, instead of every render).
    owners: dict[str, frozenset[str]] | None = None
    _selected: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def address_owners(self) -> dict[str, frozenset[str]]:
        """Each Service address (any type) -> the namespaces whose Services carry it."""
        if self.owners is not None:
            return self.owners
        owners: dict[str, set[str]] = {}
        for (namespace, _), svc in self.services.items():
            for a in service_addresses(svc, ALL_ADDRESS_TYPES):
                owners.setdefault(canonical(a), set()).add(namespace)
        return {a: frozenset(n) for a, n in owners.items()}

    def selected(self, pool: Pool) -> list[NodeInfo]:
        """The nodes the pool's nodeSelector selects (once per view: a render asks often)."""
        key = (pool.role, pool.name)
        if key not in self._selected:
            self._selected[key] = [n for n in self.nodes if selects(pool, n)]
        return self._selected[key]


class AddressOwners:
    """ClusterView.address_owners kept up to date Service by Service (a
    cluster's tens of thousands of addresses are not parsed every render).
    Not thread-safe: its caller serializes update() and current()."""

    def __init__(self) -> None:
        self._holders: dict[str, set[tuple[str, str]]] = {}
        self._owners: dict[str, frozenset[str]] = {}

    def update(self, old: dict | None, new: dict | None) -> None:
        """A Service changed from `old` to `new` (None: absent)."""
        for service, present in ((old, False), (new, True)):
            if service is None:
                continue
            key = (service["metadata"]["namespace"], service["metadata"]["name"])
            for a in {canonical(a) for a in service_addresses(service, ALL_ADDRESS_TYPES)}:
                holders = self._holders.setdefault(a, set())
                if present:
                    holders.add(key)
                else:
                    holders.discard(key)
                if holders:
                    self._owners[a] = frozenset(ns for ns, _ in holders)
                else:
                    del self._holders[a]
                    self._owners.pop(a, None)

    def current(self) -> dict[str, frozenset[str]]:
        return dict(self._owners)


def members(backend_pool: Pool, view: "ClusterView") -> list[NodeInfo]:
    """The nodes new connections of the pool's policies may go to: selected,
    Ready, with an address and a Ready agent (only those accept a validated
    handshake), and not draining."""
    agents = view.ready_backend_agents.get(backend_pool.name, set())
    return [n for n in view.selected(backend_pool) if n.ready and n.addresses
            and n.name in agents and not n.draining]


@dataclass
class Rendered:
    configs: dict[tuple[Role, str], dict]        # ConfigMap documents by pool
    policies: dict[str, PolicyOutcome]               # by namespace/name


def allocate_ids(policies: list[SynProxyPolicy]) -> dict[str, int | None]:
    """Stable ids: a policy keeps the id in its status; the oldest policy wins a
    collision; the rest get the lowest free id (None when all are taken)."""
    ordered = sorted(policies, key=lambda p: (p.created, p.key))
    taken: dict[int, str] = {}
    for p in ordered:
        if p.policy_id is not None and 1 <= p.policy_id < MAX_POLICIES and p.policy_id not in taken:
            taken[p.policy_id] = p.key
    ids = {key: pid for pid, key in taken.items()}
    free = (i for i in range(1, MAX_POLICIES) if i not in taken)
    for p in ordered:
        if p.key not in ids:
            ids[p.key] = next(free, None)
    return {key: ids[key] for key in sorted(ids)}


def service_addresses(service: dict, address_types: list[str]) -> list[str]:
    spec, status = service.get("spec") or {}, service.get("status") or {}
    found: list[str] = []
    if "LoadBalancer" in address_types:
        found += [i["ip"] for i in (status.get("loadBalancer") or {}).get("ingress") or [] if i.get("ip")]
    if "ExternalIP" in address_types:
        found += spec.get("externalIPs") or []
    if "ClusterIP" in address_types:
        found += [a for a in spec.get("clusterIPs") or [spec.get("clusterIP")] if a and a != "None"]
    return list(dict.fromkeys(found))


def endpoint_nodes(slices: list[dict], namespace: str, service: str) -> set[str]:
    """Nodes that host a ready endpoint of the Service."""
    nodes = set()
    for s in slices:
        meta = s.get("metadata") or {}
        if meta.get("namespace") != namespace or \
                (meta.get("labels") or {}).get("kubernetes.io/service-name") != service:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready", True) and ep.get("nodeName"):
                nodes.add(ep["nodeName"])
    return nodes


def _tenancy(p: SynProxyPolicy, addresses: list[str], proxy_pool: Pool,
             owners: dict[str, set[str]]) -> Problem | None:
    """Whether the policy may claim these addresses: a Service's addresses belong
    to the Service's namespace (first come does not win), and the proxy pool
    may limit what `addresses` names."""
    for a in addresses:
        address = canonical(a)
        holders = owners.get(address, set())
        if holders and p.namespace not in holders:
            return Problem("AddressNotAllowed", f"{address} is an address of a Service in namespace "
                                                f"{', '.join(sorted(holders))}; only policies there may protect it")
        if p.spec.service is None and not proxy_pool.spec.admits_address(address):
            return Problem("AddressNotAllowed", f"{address} is outside ProxyPool {proxy_pool.name!r}'s "
                                                f"allowedAddresses ({', '.join(proxy_pool.spec.allowed_addresses)})")
    return None


def _resolve(p: SynProxyPolicy, view: ClusterView, pools: dict[tuple[Role, str], Pool],
             owners: dict[str, set[str]], pool_members: dict[str, list[NodeInfo]],
             ) -> tuple[list[str], str, list[NodeInfo]] | Problem:
    """The policy's protected addresses, its backend set's name and nodes, or
    why there are none. A pool's policies share one set (one Maglev table on
    the proxies); a Service with externalTrafficPolicy Local has its own, the
    pool's nodes that host its endpoints."""
    for role, pool_name in ((Role.PROXY, p.spec.proxy_pool), (Role.BACKEND, p.spec.backend_pool)):
        if (role, pool_name) not in pools:
            return Problem(f"{POOL_KINDS[role]}NotFound", f"{POOL_KINDS[role]} {pool_name!r} does not exist")
        if not pools[(role, pool_name)].spec.admits_namespace(view.namespace_labels.get(p.namespace, {})):
            return Problem("Forbidden", f"{POOL_KINDS[role]} {pool_name!r} does not admit namespace "
                                        f"{p.namespace!r} (its spec.allowedNamespaces)")
    backend_pool = pools[(Role.BACKEND, p.spec.backend_pool)]
    backends = pool_members[backend_pool.name]
    backend_set = backend_pool.name
    addresses = list(p.spec.addresses)
    if p.spec.service is not None:
        svc = view.services.get((p.namespace, p.spec.service.name))
        if svc is None:
            return Problem("ServiceNotFound", f"Service {p.namespace}/{p.spec.service.name} does not exist")
        addresses = service_addresses(svc, p.spec.service.address_types)
        if not addresses:
            return Problem("NoAddresses", f"Service {p.namespace}/{p.spec.service.name} has no "
                                          f"{' or '.join(p.spec.service.address_types)} address yet")
        if (svc.get("spec") or {}).get("externalTrafficPolicy") == "Local":
            hosting = endpoint_nodes(view.endpoint_slices, p.namespace, p.spec.service.name)
            backends = [n for n in backends if n.name in hosting]
            backend_set = f"{backend_pool.name}/{p.namespace}/{p.spec.service.name}"
    refused = _tenancy(p, addresses, pools[(Role.PROXY, p.spec.proxy_pool)], owners)
    if refused is not None:
        return refused
    if not backends:
        return Problem("NoBackends", f"no Ready, undrained node of BackendPool {backend_pool.name!r} with a "
                                     f"Ready agent {'hosts an endpoint' if p.spec.service else 'has an address'}")
    return addresses, backend_set, backends


def render(view: ClusterView, settings: OperatorSettings) -> Rendered:
    pools = {(p.role, p.name): p for p in view.proxy_pools + view.backend_pools}
    ids = allocate_ids(view.policies)
    outcomes: dict[str, PolicyOutcome] = {}
    entries: dict[tuple[Role, str], list[dict]] = {key: [] for key in pools}
    proxy_sources: dict[str, set[str]] = {}     # backend pool -> proxy pools feeding it
    backend_sets: dict[str, dict[str, dict]] = {}  # proxy pool -> its backendSets by name
    owner: dict[tuple[str, int], str] = {}
    address_owners = view.address_owners()
    pool_members = {p.name: members(p, view) for p in view.backend_pools}

    for p in sorted(view.policies, key=lambda p: (p.created, p.key)):
        pid = ids[p.key]
        if pid is None:
            outcomes[p.key] = PolicyOutcome(None, problem=Problem(
                "TooManyPolicies", f"all {MAX_POLICIES - 1} policy ids are in use"))
            continue
        if p.deleting:
            outcomes[p.key] = PolicyOutcome(pid, problem=Problem(
                "Deleting", "deleting: waiting for the nodes to stop serving it"))
            continue
        resolved = _resolve(p, view, pools, address_owners, pool_members)
        if isinstance(resolved, Problem):
            outcomes[p.key] = PolicyOutcome(pid, problem=resolved)
            continue
        addresses, set_name, backends = resolved
        endpoints = [(canonical(a), port) for a in addresses for port in p.spec.ports]
        clash = next((e for e in endpoints if e in owner), None)
        if clash:
            outcomes[p.key] = PolicyOutcome(pid, addresses, problem=Problem(
                "Conflict", f"{clash[0]} port {clash[1]} is already protected by SynProxyPolicy "
                            f"{owner[clash]}"))
            continue
        sets = backend_sets.setdefault(p.spec.proxy_pool, {})
        if set_name not in sets and len(sets) == MAX_TABLES:
            outcomes[p.key] = PolicyOutcome(pid, addresses, problem=Problem(
                "TooManyBackendSets", f"ProxyPool {p.spec.proxy_pool!r} already serves {MAX_TABLES} backend "
                                      f"sets (each BackendPool, and each externalTrafficPolicy: Local Service, is one)"))
            continue
        # One outer address per backend node; the outer family need not match the inner.
        sets.setdefault(set_name, {"name": set_name, "backends": [n.ipv4 or n.ipv6 for n in backends],
                                   "drainSeconds": pools[(Role.BACKEND, p.spec.backend_pool)].spec.drain_seconds})
        owner.update({e: p.key for e in endpoints})
        common = {"id": pid, "name": p.key, "mode": p.spec.mode.value,
                  "services": [{"address": a, "port": port} for a, port in endpoints],
                  # Defaults left out: the agent has the same (one Cookie model); it keeps the document small.
                  "cookie": p.spec.cookie.model_dump(mode="json", by_alias=True, exclude_defaults=True)}
        entries[(Role.PROXY, p.spec.proxy_pool)].append({**common, "backendSet": set_name})
        entries[(Role.BACKEND, p.spec.backend_pool)].append(common)
        proxy_sources.setdefault(p.spec.backend_pool, set()).add(p.spec.proxy_pool)
        outcomes[p.key] = PolicyOutcome(pid, addresses, len(backends))

    configs = {}
    for (role, name), pool in sorted(pools.items()):
        doc = {"apiVersion": schema.API_VERSION, "kind": schema.KIND, "role": role.value,
               "rotationSeconds": pool.spec.salt.rotation_seconds if role is Role.PROXY
               else BACKEND_ROTATION_S,
               "node": {"interfaces": [pool.spec.interface], "encapPort": settings.encap_port},
               "policies": entries[(role, name)]}
        if pool.spec.attach != schema.Attach():
            doc["node"]["attach"] = pool.spec.attach.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if role is Role.PROXY:
            doc["backendSets"] = list(backend_sets.get(name, {}).values())
            doc["node"]["xdp"] = pool.spec.xdp
            doc["failurePolicy"] = pool.spec.failure_policy.value
        if role is Role.BACKEND:
            sources = sorted({a for proxy in proxy_sources.get(name, ()) if (Role.PROXY, proxy) in pools
                              for n in view.selected(pools[(Role.PROXY, proxy)]) for a in n.addresses},
                             key=_ipv4_first)
            doc["allowedProxies"] = sources
            # Every node of the pool, draining or not: any may hand another a flow it owned.
            doc["peerBackends"] = sorted({n.ipv4 or n.ipv6 for n in view.selected(pool) if n.addresses},
                                         key=_ipv4_first)
        configs[(role, name)] = doc
    return Rendered(configs=configs, policies=outcomes)


def _ipv4_first(address: str) -> tuple[bool, str]:
    return ":" in address, address


ALL_ADDRESS_TYPES = ["LoadBalancer", "ExternalIP", "ClusterIP"]


@dataclass(frozen=True)
class ServiceInterest:
    """Which Services a render depends on: those a policy names (their
    addresses and EndpointSlices), and any whose address a policy protects
    (the address belongs to the Service's namespace: tenancy). Events of
    every other Service or EndpointSlice change nothing a render would write."""
    named: frozenset[tuple[str, str]]
    addresses: frozenset[str]

    @classmethod
    def of(cls, view: ClusterView, rendered: Rendered) -> "ServiceInterest":
        named = {(p.namespace, p.spec.service.name) for p in view.policies if p.spec.service is not None}
        addresses = {canonical(a) for p in view.policies for a in p.spec.addresses}
        addresses |= {canonical(a) for o in rendered.policies.values() for a in o.addresses}
        return cls(frozenset(named), frozenset(addresses))

    def service(self, key: tuple[str, str], addresses: set[str]) -> bool:
        """`addresses`: the Service's, before and after the change."""
        return key in self.named or not self.addresses.isdisjoint(addresses)

    def endpoint_slice(self, slice_: dict) -> bool:
        meta = slice_.get("metadata") or {}
        return (meta.get("namespace"), (meta.get("labels") or {}).get("kubernetes.io/service-name")) in self.named


def _shape(node: NodeInfo) -> tuple[bool, bool]:
    return bool(node.ipv4), bool(node.ipv6)


def address_shapes(nodes: list[NodeInfo]) -> frozenset[tuple[bool, bool]]:
    """Which address families the nodes have (IPv4, IPv6, both): all that
    validate_for_nodes' verdict depends on besides the document."""
    return frozenset(_shape(n) for n in nodes if n.addresses)


def validate_for_nodes(role: Role, document: dict, nodes: list[NodeInfo]) -> None:
    """Check the document as every node's agent will: raises schema.ConfigError
    naming the node whose agent would reject it."""
    placeholder_keys = [MasterKey(1, 0, bytes(MASTER_KEY_BYTES))] if role is Role.PROXY else None
    shapes = {_shape(n): n for n in nodes if n.addresses}
    if not shapes:   # no node yet: check the document alone
        shapes = {(True, True): NodeInfo("(any node)", {}, "192.0.2.1", "2001:db8::1", True)}
    for n in shapes.values():
        try:
            schema.parse(contract.node_document(document, n.addresses_document, placeholder_keys))
        except schema.ConfigError as err:
            raise schema.ConfigError(f"the agent on node {n.name} would reject it: {err}") from None


def configmap(pool: Pool, settings: OperatorSettings, document: dict, retire: str | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names.agent_name(pool.role, pool.name), "namespace": settings.namespace,
                         "labels": names.labels(pool.role, pool.name),
                         "ownerReferences": [owner_reference(pool)]},
            "data": contract.configmap_data(document, retire)}
