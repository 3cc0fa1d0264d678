"""kopf handlers: thin. Each one hands the object to the Reconciler; the logic
and its tests live in synfleet.resources."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping

import kopf

from synfleet.config.schema import Role
from synfleet.contract import GROUP, POOL_KINDS, VERSION
from synfleet.kube import Kube
from synfleet.operator import cache
from synfleet.operator.cache import ClusterCache, endpoint_slice_fields, service_fields
from synfleet.operator.reconcile import Reconciler
from synfleet.resources.dataplane import NodeInfo
from synfleet.resources.lifecycle import AgentReport
from synfleet.resources.names import FINALIZER, MANAGED_BY

SALT_CHECK_S = 5.0     # how often a proxy pool's salts are checked; keys are published epochs ahead
TEARDOWN_CHECK_S = 2.0    # how often a deletion looks again at the nodes' NodeAgents


def plain(value):
    """kopf's body views as plain dicts and lists, for the pydantic models."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _post_event(obj: dict, etype: str, reason: str, message: str) -> None:
    kopf.event(obj, type=etype, reason=reason, message=message)


# ---- the caches (synfleet.operator.cache), one entry per object by its name;
# async, so they run on kopf's event loop ----

@kopf.index(GROUP, VERSION, "proxypools")
async def proxy_pool_index(name, body, **_):
    return {name: plain(body)}


@kopf.index(GROUP, VERSION, "backendpools")
async def backend_pool_index(name, body, **_):
    return {name: plain(body)}


@kopf.index(GROUP, VERSION, "synproxypolicies")
async def policy_index(namespace, name, body, **_):
    return {(namespace, name): plain(body)}


@kopf.index("", "v1", "services")
async def service_index(namespace, name, body, **_):
    return {(namespace, name): service_fields(plain(body))}


@kopf.index("discovery.k8s.io", "v1", "endpointslices")
async def endpoint_slice_index(namespace, name, body, **_):
    return {(namespace, name): endpoint_slice_fields(plain(body))}


@kopf.index("", "v1", "nodes")
async def node_index(name, body, **_):
    return {name: NodeInfo.from_object(plain(body))}


@kopf.index("", "v1", "namespaces")
async def namespace_index(name, labels, **_):
    return {name: dict(labels)}


@kopf.index(GROUP, VERSION, "nodeagents")
async def agent_report_index(namespace, name, body, memo: kopf.Memo, **_):
    return {name: AgentReport.from_object(plain(body))} if namespace == memo.settings.namespace else {}


@kopf.index("apps", "v1", "daemonsets", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def daemonset_index(namespace, name, body, memo: kopf.Memo, **_):
    return {name: plain(body)} if namespace == memo.settings.namespace else {}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs) -> None:
    # Peering: with two replicas the lower priority pauses while the higher one
    # lives (kopf freezes both on a tie, so the priority is random, not fixed).
    settings.peering.mandatory = True
    settings.peering.priority = random.randint(1, 2**31 - 1)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    # Pools and policies are deleted only once their nodes confirm (on.delete below).
    settings.persistence.finalizer = FINALIZER
    # kopf runs no handler before every index is filled: the cache is complete when one reads it.
    indexes = ClusterCache(asyncio.get_running_loop(), {name: kwargs[name] for name in cache.INDEXES})
    memo.reconciler = Reconciler(Kube(field_manager=MANAGED_BY, on_request=memo.metrics.api_request),
                                 memo.settings, memo.metrics, _post_event, indexes)
    memo.seen = {}     # by uid: what a render reads of each policy, NodeAgent and Node


@kopf.on.resume(GROUP, VERSION, "proxypools")
@kopf.on.create(GROUP, VERSION, "proxypools")
@kopf.on.update(GROUP, VERSION, "proxypools", field="spec")
def proxy_pool(body, memo: kopf.Memo, **_) -> None:
    memo.reconciler.ensure_pool(Role.PROXY, plain(body))


@kopf.on.resume(GROUP, VERSION, "backendpools")
@kopf.on.create(GROUP, VERSION, "backendpools")
@kopf.on.update(GROUP, VERSION, "backendpools", field="spec")
def backend_pool(body, memo: kopf.Memo, **_) -> None:
    memo.reconciler.ensure_pool(Role.BACKEND, plain(body))


def _until_done(waiting: str | None) -> None:
    if waiting:
        raise kopf.TemporaryError(waiting, delay=TEARDOWN_CHECK_S)


@kopf.on.delete(GROUP, VERSION, "proxypools")
def proxy_pool_deleted(body, memo: kopf.Memo, **_) -> None:
    _until_done(memo.reconciler.retire_pool(Role.PROXY, plain(body)))


@kopf.on.delete(GROUP, VERSION, "backendpools")
def backend_pool_deleted(body, memo: kopf.Memo, **_) -> None:
    _until_done(memo.reconciler.retire_pool(Role.BACKEND, plain(body)))


@kopf.on.delete(GROUP, VERSION, "synproxypolicies")
def policy_deleted(body, memo: kopf.Memo, **_) -> None:
    _until_done(memo.reconciler.retire_policy(plain(body)))


@kopf.timer(GROUP, VERSION, "proxypools", interval=SALT_CHECK_S, initial_delay=SALT_CHECK_S)
def salts(body, memo: kopf.Memo, **_) -> None:
    memo.reconciler.rotate_salts(plain(body))


@kopf.on.event("", "v1", "services")
def service_changed(type, body, memo: kopf.Memo, **_) -> None:
    memo.reconciler.service_changed(plain(body), deleted=type == "DELETED")


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
def endpoint_slice_changed(body, memo: kopf.Memo, **_) -> None:
    memo.reconciler.endpoint_slice_changed(plain(body))


def _render_if_changed(memo: kopf.Memo, type: str, body, read) -> None:
    """Render when what a render reads of the object (`read(body)`) changed
    since its last event, or the object went."""
    uid = body["metadata"]["uid"]
    if type == "DELETED":
        memo.seen.pop(uid, None)
    elif memo.seen.get(uid) == (seen := read(plain(body))):
        return
    else:
        memo.seen[uid] = seen
    memo.reconciler.request_render()


@kopf.on.event(GROUP, VERSION, "synproxypolicies")
def policy_changed(type, body, memo: kopf.Memo, **_) -> None:
    # Its status is this operator's own writing, and kopf's finalizer changes
    # nothing rendered: only a new spec or its deletion matters.
    _render_if_changed(memo, type, body, lambda b: (b["metadata"].get("generation"),
                                                    b["metadata"].get("deletionTimestamp")))


@kopf.on.event(GROUP, VERSION, "nodeagents")
def agent_reported(type, body, memo: kopf.Memo, **_) -> None:
    # The agents' reports make the pools' Nodes column; their counters, refreshed
    # every minute on every node, do not.
    _render_if_changed(memo, type, body, AgentReport.from_object)


@kopf.on.event("", "v1", "nodes")
def node_changed(type, body, memo: kopf.Memo, **_) -> None:
    # Nodes heartbeat constantly; only labels, addresses and readiness matter.
    _render_if_changed(memo, type, body, NodeInfo.from_object)


@kopf.on.event("apps", "v1", "daemonsets", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
@kopf.on.event("", "v1", "namespaces")        # their labels decide which pools admit their policies
def rerender(memo: kopf.Memo, **_) -> None:
    memo.reconciler.request_render()


@kopf.on.event(GROUP, VERSION, "proxypools")
@kopf.on.event(GROUP, VERSION, "backendpools")
def pool_gone(type, body, memo: kopf.Memo, **_) -> None:
    # What a pool made goes with it (owner references); its policies turn Degraded.
    if type == "DELETED":
        if body.get("kind") == POOL_KINDS[Role.PROXY]:
            memo.metrics.forget_pool(body["metadata"]["name"])
            memo.reconciler.keep_backends_off_proxies()
        memo.reconciler.request_render()
