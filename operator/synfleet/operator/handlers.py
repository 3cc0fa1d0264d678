"""kopf handlers: thin. Each one hands the object to the Reconciler; the logic
and its tests live in synfleet.resources. kopf runs the pools' and policies'
lifecycle and the salt timers; renders follow the informers of
synfleet.operator.cache, which the startup handler starts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import aiohttp
import kopf

from synfleet.config.schema import Role
from synfleet.contract import GROUP, VERSION
from synfleet.kube import Kube
from synfleet.operator.cache import ClusterCache
from synfleet.operator.reconcile import Reconciler
from synfleet.resources.names import FINALIZER, MANAGED_BY

SALT_CHECK_S = 5.0     # how often a proxy pool's salts are checked; keys are published epochs ahead
TEARDOWN_CHECK_S = 2.0    # how often a deletion looks again at the nodes' NodeAgents
# kopf's connections to the API server at once: its four watches hold one each, the rest queue its patches.
KOPF_CONNECTIONS = 32


def plain(value):
    """kopf's body views as plain dicts and lists, for the pydantic models."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Peering: with two replicas the lower priority pauses while the higher one
    # lives (kopf freezes both on a tie, so the priority is random, not fixed);
    # renders follow the same rule (synfleet.operator.cache).
    settings.peering.mandatory = True
    settings.peering.priority = memo.peering.priority
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    # Pools and policies are deleted only once their nodes confirm (on.delete below).
    settings.persistence.finalizer = FINALIZER
    kube = Kube(field_manager=MANAGED_BY, on_request=memo.metrics.api_request)
    cache = ClusterCache(kube, memo.settings.namespace, memo.peering,
                         on_service=lambda old, new: reconciler.service_changed(old, new),
                         on_endpoint_slice=lambda old, new: reconciler.endpoint_slice_changed(old, new),
                         on_pool_gone=lambda role, name: reconciler.pool_gone(role, name),
                         on_change=lambda cause: reconciler.request_render(cause))
    # Renders run in the informers' threads, outside kopf's context: Events go through our client.
    post_event = partial(kube.post_event, component=MANAGED_BY)
    reconciler = memo.reconciler = Reconciler(kube, memo.settings, memo.metrics, post_event, cache)
    cache.start()


@kopf.on.login()
async def login(logger: logging.Logger, settings: kopf.OperatorSettings, **_) -> kopf.AiohttpSession:
    """kopf's own login (the client library's credentials), over a session with
    bounded connections. kopf's default session has no bound: at start-up it
    patches every pool and policy at once (finalizers), one TLS connection each,
    and asyncio keeps a 256 KiB read buffer per TLS connection: at 1,000
    policies that held ~250 MiB."""
    info = kopf.login_via_client(logger=logger, settings=settings)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), auth=info.as_aiohttp_basic_auth(), trust_env=info.trust_env)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, priority=info.priority,
                               default_namespace=info.default_namespace, expiration=info.expiration)


@kopf.on.cleanup()
def stop_caches(memo: kopf.Memo, **_) -> None:
    memo.reconciler.cache.stop()


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
