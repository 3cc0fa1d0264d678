"""What the operator knows of the cluster between events: kopf indexes
(registered in handlers.py), one list and one watch per kind that kopf keeps
current and fills completely before it runs any handler, the way an informer
cache is synced before its controller starts. A render reads them here, as a
copy made on kopf's event loop, the only thread that changes them, so a
render sees one consistent moment and issues no list of its own.

Services and EndpointSlices are kept in the few fields a render reads: a
cluster has tens of thousands of them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from synfleet.resources.dataplane import NodeInfo
from synfleet.resources.lifecycle import AgentReport

COPY_TIMEOUT_S = 30.0

# The index names (each is the name of its index function in handlers.py).
PROXY_POOLS = "proxy_pool_index"
BACKEND_POOLS = "backend_pool_index"
POLICIES = "policy_index"
SERVICES = "service_index"
ENDPOINT_SLICES = "endpoint_slice_index"
NODES = "node_index"
NAMESPACES = "namespace_index"
AGENT_REPORTS = "agent_report_index"
DAEMONSETS = "daemonset_index"
INDEXES = (PROXY_POOLS, BACKEND_POOLS, POLICIES, SERVICES, ENDPOINT_SLICES, NODES, NAMESPACES,
           AGENT_REPORTS, DAEMONSETS)


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


def _entries(index: Mapping) -> dict:
    """An index's one value per key (the object's name), as a plain dict."""
    return {key: value for key in index for value in index[key]}


class ClusterCache:
    def __init__(self, loop: asyncio.AbstractEventLoop, indexes: Mapping[str, Mapping]) -> None:
        self.loop = loop
        self.indexes = {name: indexes[name] for name in INDEXES}

    def snapshot(self) -> Snapshot:
        """Every index, as of one moment; called from a handler's thread."""
        return Snapshot(**{FIELDS[name]: entries for name, entries in self._copy(*INDEXES).items()})

    def proxy_pools(self) -> dict[str, dict]:
        return self._copy(PROXY_POOLS)[PROXY_POOLS]

    def backend_pools(self) -> dict[str, dict]:
        return self._copy(BACKEND_POOLS)[BACKEND_POOLS]

    def agent_reports(self) -> list[AgentReport]:
        return list(self._copy(AGENT_REPORTS)[AGENT_REPORTS].values())

    def nodes(self) -> list[NodeInfo]:
        return list(self._copy(NODES)[NODES].values())

    def _copy(self, *names: str) -> dict[str, dict]:
        async def copy() -> dict[str, dict]:
            # No await in here: one step of the event loop, during which no index changes.
            return {name: _entries(self.indexes[name]) for name in names}
        return asyncio.run_coroutine_threadsafe(copy(), self.loop).result(COPY_TIMEOUT_S)


# Index name -> Snapshot field.
FIELDS = {PROXY_POOLS: "proxy_pools", BACKEND_POOLS: "backend_pools", POLICIES: "policies", SERVICES: "services",
          ENDPOINT_SLICES: "endpoint_slices", NODES: "nodes", NAMESPACES: "namespace_labels",
          AGENT_REPORTS: "agent_reports", DAEMONSETS: "daemonsets"}
