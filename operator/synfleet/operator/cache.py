"""What the operator knows of the cluster between events: one informer per
kind (synfleet.kube.Informer: list, then watch), each keeping only what a
render reads, the way client-go's shared informers feed a controller. A
render reads copies of them and issues no list of its own.

kopf still runs the pools' and policies' lifecycle (creation, finalizers,
salt timers) and the peering between replicas; renders follow the informers.
kopf's own indexes are not used: their start-up gate wakes every waiting
object for each object indexed, quadratic in the cluster's size (at 20,000
Services it did not finish in six minutes).

Renders wait until every informer has its first list (no render from a
half-filled cache) and run only in the active replica: the one no live peer
in the kopf peering object outranks, the rule kopf pauses its own handlers
by."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from synfleet.config.schema import Role
from synfleet.contract import API_VERSION, NODE_AGENT_KIND, POOL_KINDS, parse_timestamp
from synfleet.kube import Informer, Kube
from synfleet.resources import names
from synfleet.resources.dataplane import AddressOwners, NodeInfo
from synfleet.resources.lifecycle import AgentReport

log = logging.getLogger("synfleet.operator")

READINESS_CHECK_S = 0.5
SYNC_TIMEOUT_S = 120.0
PEERING_KIND = "ClusterKopfPeering"
PEERING_API_VERSION = "kopf.dev/v1"


def service_fields(service: dict) -> dict:
    """What a render reads of a Service (resources.dataplane.service_addresses,
    externalTrafficPolicy), in the Service's own shape."""
    spec, status = service.get("spec") or {}, service.get("status") or {}
    return {"metadata": {"name": service["metadata"]["name"], "namespace": service["metadata"]["namespace"]},
            "spec": {k: spec[k] for k in ("clusterIP", "clusterIPs", "externalIPs", "externalTrafficPolicy")
                     if k in spec},
            "status": {"loadBalancer": {"ingress": [{"ip": i["ip"]} for i in
                                                    (status.get("loadBalancer") or {}).get("ingress") or []
                                                    if i.get("ip")]}}}


def endpoint_slice_fields(slice_: dict) -> dict:
    """What a render reads of an EndpointSlice (resources.dataplane.endpoint_nodes)."""
    meta = slice_["metadata"]
    service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    return {"metadata": {"namespace": meta["namespace"],
                         "labels": {"kubernetes.io/service-name": service} if service else {}},
            "endpoints": [{"nodeName": e["nodeName"], "conditions": {"ready": (e.get("conditions") or {})
                                                                    .get("ready", True)}}
                          for e in slice_.get("endpoints") or [] if e.get("nodeName")]}


def agent_pod_fields(pod: dict) -> dict:
    """What a render reads of an agent's pod (resources.dataplane.ready_agent_nodes)."""
    status = pod.get("status") or {}
    return {"metadata": {"name": pod["metadata"]["name"], "labels": pod["metadata"].get("labels") or {},
                         **({"deletionTimestamp": pod["metadata"]["deletionTimestamp"]}
                            if pod["metadata"].get("deletionTimestamp") else {})},
            "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
            "status": {"conditions": [{"type": c.get("type"), "status": c.get("status")}
                                      for c in status.get("conditions") or [] if c.get("type") == "Ready"]}}


def outranked(peering: dict | None, identity: str, priority: int, now: datetime) -> bool:
    """Whether a live peer other than `identity` has `priority` or more in the
    kopf peering object's status (kopf pauses on a tie too)."""
    for peer, info in ((peering or {}).get("status") or {}).items():
        if peer == identity or not isinstance(info, dict):
            continue
        lastseen = info.get("lastseen")
        alive = lastseen is None or (now - parse_timestamp(lastseen)).total_seconds() < int(info.get("lifetime", 60))
        if alive and int(info.get("priority", 0)) >= priority:
            return True
    return False


@dataclass(frozen=True)
class Snapshot:
    proxy_pools: dict[str, dict]
    backend_pools: dict[str, dict]
    policies: dict[tuple[str, str], dict]
    services: dict[tuple[str, str], dict]
    endpoint_slices: dict[tuple[str, str], dict]
    nodes: dict[str, NodeInfo]
    namespace_labels: dict[str, dict[str, str]]
    agent_reports: dict[str, AgentReport]
    daemonsets: dict[str, dict]
    agent_pods: dict[str, dict]
    address_owners: dict[str, frozenset[str]]


@dataclass(frozen=True)
class Peering:
    name: str
    identity: str
    priority: int


class ClusterCache:
    """`on_*` are the Reconciler's reactions, called from the informers' threads."""

    def __init__(self, kube: Kube, namespace: str, peering: Peering, *,
                 on_service: Callable[[dict | None, dict | None], None],
                 on_endpoint_slice: Callable[[dict | None, dict | None], None],
                 on_pool_gone: Callable[[Role, str], None],
                 on_change: Callable[[str], None]) -> None:
        self.peering = peering
        managed = names.MANAGED_SELECTOR

        def changed(kind: str) -> Callable[[object, object], None]:
            return lambda old, new: on_change(kind)

        owners, owners_lock = AddressOwners(), threading.Lock()

        def service(old: dict | None, new: dict | None) -> None:
            with owners_lock:
                owners.update(old, new)
            on_service(old, new)

        def policy(old: dict | None, new: dict | None) -> None:
            # Its status is this operator's own writing, and kopf's finalizer
            # changes nothing rendered: only a new spec or its deletion matters.
            if old is None or new is None or _spec_or_deletion(old) != _spec_or_deletion(new):
                on_change("policy")

        def pool(role: Role) -> Callable[[dict | None, dict | None], None]:
            def react(old: dict | None, new: dict | None) -> None:
                if new is None:      # what a pool made goes with it; its policies turn Degraded
                    on_pool_gone(role, old["metadata"]["name"])
            return react

        self._informers = {
            "proxy_pools": Informer(kube, API_VERSION, POOL_KINDS[Role.PROXY], on_change=pool(Role.PROXY)),
            "backend_pools": Informer(kube, API_VERSION, POOL_KINDS[Role.BACKEND], on_change=pool(Role.BACKEND)),
            "policies": Informer(kube, API_VERSION, "SynProxyPolicy", on_change=policy),
            "services": Informer(kube, "v1", "Service", keep=service_fields, on_change=service),
            "endpoint_slices": Informer(kube, "discovery.k8s.io/v1", "EndpointSlice", keep=endpoint_slice_fields,
                                        on_change=on_endpoint_slice),
            # Nodes heartbeat constantly; only labels, addresses and readiness are kept.
            "nodes": Informer(kube, "v1", "Node", keep=NodeInfo.from_object, on_change=changed("node")),
            # Their labels decide which pools admit their policies.
            "namespace_labels": Informer(kube, "v1", "Namespace",
                                         keep=lambda o: dict(o["metadata"].get("labels") or {}),
                                         on_change=changed("namespace")),
            # Readiness, retirement, applied version: not the counters every agent refreshes each minute.
            "agent_reports": Informer(kube, API_VERSION, NODE_AGENT_KIND, namespace,
                                      keep=AgentReport.from_object, on_change=changed("nodeagent")),
            "daemonsets": Informer(kube, "apps/v1", "DaemonSet", namespace, managed, on_change=changed("daemonset")),
            "agent_pods": Informer(kube, "v1", "Pod", namespace, managed, keep=agent_pod_fields,
                                   on_change=changed("agent_pod")),
        }
        # Read by active(): the readiness thread renders when this replica becomes the active one.
        self._peering = Informer(kube, PEERING_API_VERSION, PEERING_KIND)
        self.on_change = on_change
        self._owners, self._owners_lock = owners, owners_lock
        self._stop = threading.Event()
        self._ready = threading.Event()

    def start(self) -> "ClusterCache":
        for informer in [*self._informers.values(), self._peering]:
            informer.start()
        threading.Thread(target=self._watch_readiness, name="cache-readiness", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for informer in [*self._informers.values(), self._peering]:
            informer.stop()

    def _watch_readiness(self) -> None:
        """Render once every informer is synced; after that, whenever this
        replica becomes the active one (a peer's lifetime ends with no event)."""
        rendering = False
        while not self._stop.wait(READINESS_CHECK_S):
            if not self._ready.is_set() and all(i.synced.is_set() for i in [*self._informers.values(),
                                                                            self._peering]):
                self._ready.set()
                log.info("caches synced: %s", {k: len(i.items()) for k, i in self._informers.items()})
            now = self._ready.is_set() and self.active()
            if now and not rendering:
                self.on_change("active")      # synced, or the peer that outranked it is gone
            rendering = now

    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self) -> None:
        """For handlers that read the cache: kopf runs them from the start, before the first lists are in."""
        if not self._ready.wait(SYNC_TIMEOUT_S):
            raise TimeoutError(f"the operator's caches are not synced after {SYNC_TIMEOUT_S:.0f} s")

    def active(self) -> bool:
        peering = self._peering.items().get((None, self.peering.name))
        return not outranked(peering, self.peering.identity, self.peering.priority, datetime.now(timezone.utc))

    def snapshot(self) -> Snapshot:
        """Every kind as its informer has it now, by name ((namespace, name) where namespaced)."""
        namespaced = ("policies", "services", "endpoint_slices")
        with self._owners_lock:
            owners = self._owners.current()
        return Snapshot(**{field: self._informers[field].items() if field in namespaced else self._by_name(field)
                           for field in self._informers}, address_owners=owners)

    def _by_name(self, field: str) -> dict:
        """A cluster-scoped kind, or one of the operator's own namespace, by name alone."""
        return {name: o for (_, name), o in self._informers[field].items().items()}

    def proxy_pools(self) -> dict[str, dict]:
        return self._by_name("proxy_pools")

    def backend_pools(self) -> dict[str, dict]:
        return self._by_name("backend_pools")

    def agent_reports(self) -> list[AgentReport]:
        return list(self._informers["agent_reports"].items().values())

    def nodes(self) -> list[NodeInfo]:
        return list(self._informers["nodes"].items().values())


def _spec_or_deletion(obj: dict) -> tuple:
    return obj["metadata"].get("generation"), obj["metadata"].get("deletionTimestamp")

