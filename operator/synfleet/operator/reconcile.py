"""What the handlers call: read the cluster (the informers of
synfleet.operator.cache), build with synfleet.resources, write back. Every
write is a server-side apply or a status patch made only when the content
changed, so repeating any step is harmless."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from kubernetes.client.exceptions import ApiException

from synfleet import contract
from synfleet.config.schema import ConfigError, Role
from synfleet.contract import POOL_KINDS
from synfleet.cookie import current_epoch, key_for
from synfleet.kube import Kube
from synfleet.operator.cache import ClusterCache, Snapshot
from synfleet.operator.metrics import OperatorMetrics
from synfleet.resources import agents, lifecycle, names, salts
from synfleet.resources.agents import OperatorSettings
from synfleet.resources.dataplane import (
    ALL_ADDRESS_TYPES,
    ClusterView,
    Problem,
    ServiceInterest,
    address_shapes,
    canonical,
    configmap,
    members,
    proxy_nodes_in,
    ready_agent_nodes,
    render,
    service_addresses,
    validate_for_nodes,
)
from synfleet.resources.model import Pool, SynProxyPolicy
from synfleet.resources.status import Rollout, drain_report, policy_status, pool_status

log = logging.getLogger("synfleet.operator")
RENDER_RETRY_S = 5.0
CONFIGMAP_WRITERS = 8

# (object, type "Normal"/"Warning", reason, message) -> posts a Kubernetes Event
EventPoster = Callable[[dict, str, str, str], None]


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics,
                 post_event: EventPoster, cache: ClusterCache) -> None:
        self.kube = kube
        self.cache = cache
        self.settings = settings
        self.metrics = metrics
        self.post_event = post_event
        self._render_lock = threading.Lock()
        self._dirty = threading.Event()
        self._writers = ThreadPoolExecutor(CONFIGMAP_WRITERS, thread_name_prefix="configmap")
        metrics.render_pending.set_function(lambda: int(self._dirty.is_set() or self._render_lock.locked()))
        threading.Thread(target=self._render_loop, name="render", daemon=True).start()
        # What the last render depended on (None: no render yet, everything matters).
        self._interest: ServiceInterest | None = None
        # The cache learns of this operator's own writes only when their watch
        # event arrives: until then, what was written stands for the object's
        # status (by uid: the resourceVersion it was written over, and the status),
        # and a ConfigMap whose document is unchanged is not sent again (by pool uid).
        self._statuses: dict[str, tuple[str | None, dict]] = {}
        self._documents: dict[str, dict] = {}
        # What each pool's document last passed validation as (by pool uid):
        # the document and its nodes' address shapes. A render under policy
        # churn validates only the pools whose document changed.
        self._validated: dict[str, tuple[dict, frozenset]] = {}
        # Each policy's model as of its resourceVersion (by uid): a thousand
        # policies are not validated again every render.
        self._policies: dict[str, tuple[str | None, SynProxyPolicy]] = {}
        # Each proxy pool's master keys as its salt check last found or wrote them
        # (every SALT_CHECK_S): what a render reports as the generation in force.
        self._master_keys: dict[str, list] = {}

    # ---- pools ----

    def ensure_pool(self, role: Role, body: dict) -> None:
        pool = Pool.from_object(role, body)
        self.metrics.reconciles.labels(POOL_KINDS[role]).inc()
        self._documents.pop(pool.uid, None)      # its ConfigMap is written again, whatever it holds
        for obj in agents.agent_objects(pool, self.settings, self._proxy_selectors(pool)):
            self.kube.apply(obj)
        if role is Role.PROXY:
            self._publish_salts(pool)
            self.keep_backends_off_proxies(pool)
        self.request_render("pool")

    def _proxy_selectors(self, changed: Pool | None = None) -> list[dict[str, str]]:
        """Every proxy pool's nodeSelector; `changed` as it is now (the cache
        may not have its watch event yet)."""
        self.cache.wait_ready()
        # A retiring proxy pool keeps its nodes until it is gone (pool_gone runs this again).
        selectors = {name: Pool.from_object(Role.PROXY, o).spec.node_selector
                     for name, o in self.cache.proxy_pools().items()}
        if changed is not None and changed.role is Role.PROXY:
            selectors[changed.name] = changed.spec.node_selector
        return list(selectors.values())

    def keep_backends_off_proxies(self, changed: Pool | None = None) -> None:
        """Backend pools' DaemonSets follow the proxy pools' nodeSelectors
        (see agents.not_on_proxy_nodes); run when a proxy pool comes, changes or goes."""
        selectors = self._proxy_selectors(changed)
        for obj in self.cache.backend_pools().values():
            if not obj["metadata"].get("deletionTimestamp"):
                self.kube.apply(agents.daemonset(Pool.from_object(Role.BACKEND, obj), self.settings, selectors))

    def rotate_salts(self, body: dict) -> None:
        """Publish the master keys the pool needs now (a no-op but for a new
        generation); a change is rendered so that statuses show it."""
        if self._publish_salts(Pool.from_object(Role.PROXY, body)):
            self.request_render("salts")

    def _publish_salts(self, pool: Pool) -> bool:
        """Whether the pool's Secret had to change."""
        spec = pool.spec.salt
        now = current_epoch(spec.rotation_seconds)
        existing = self.kube.get("v1", "Secret", names.salts_secret_name(pool.name), self.settings.namespace)
        published = contract.secret_salt_keys(existing)
        if published and contract.secret_rotation_seconds(existing) != spec.rotation_seconds:
            wanted = salts.restart(published, now)
        else:
            wanted = salts.rotate(published, now, spec.rotation_seconds, spec.master_rotation_seconds)
        if wanted == published:
            self._master_keys[pool.name] = published
            return False
        self.kube.apply(salts.secret(pool, self.settings, wanted))
        self._master_keys[pool.name] = wanted
        self.metrics.rotated(pool.name)
        log.info("master keys published for pool %s: generations %s (current epoch %d)", pool.name,
                 {k.generation: k.from_epoch for k in wanted}, now)
        return True

    # ---- deletions (each holds the object's finalizer until it returns None) ----

    def retire_pool(self, role: Role, body: dict) -> str | None:
        """Tell the pool's agents to leave their nodes bare; None once every
        node confirmed (or the teardown timeout passed), else whom it waits for."""
        pool = Pool.from_object(role, body)
        name = names.agent_name(role, pool.name)
        # Under the render lock: a render that listed the pool before its
        # deletion must not write the ConfigMap over the instruction; every
        # later render sees the pool deleting and leaves its ConfigMap alone.
        with self._render_lock:
            cm = self.kube.get("v1", "ConfigMap", name, self.settings.namespace)
            retiring = cm is not None and contract.configmap_retirement(cm) is None
            if retiring:
                # The last good document stays beside the instruction.
                document = contract.configmap_document(cm, name)
                self.kube.apply(configmap(pool, self.settings, document,
                                          f"{pool.kind} {pool.name} is being deleted"))
                log.info("retiring %s %s: its agents detach from their nodes", pool.kind, pool.name)
        if retiring:
            self.request_render("retire")     # its policies lose the pool
        self.cache.wait_ready()
        reports = self.cache.agent_reports()
        waiting = lifecycle.unretired(pool, reports, self.cache.nodes())
        if not waiting:
            log.info("%s %s: no node left to detach (its agents' reports: %s)", pool.kind, pool.name,
                     [(r.node, "retired" if r.retired else "serving") for r in reports
                      if (r.role, r.pool) == (pool.role, pool.name)] or "none")
        self._report(body, lifecycle.retiring_status(pool, waiting, self._conditions(body)), False)
        return self._still_waiting(body, waiting, f"detach {pool.kind} {pool.name}'s programs",
                                   f"`synfleet agent uninstall --instance {pool.name}` on them")

    def retire_policy(self, body: dict) -> str | None:
        """Render the policy out of its pools; None once every serving agent of
        those pools applied the result (or the teardown timeout passed)."""
        policy = SynProxyPolicy.from_object(body)
        self.cache.wait_ready()
        self.request_render("retire")
        reports, nodes, waiting = self.cache.agent_reports(), self.cache.nodes(), []
        pools = {Role.PROXY: self.cache.proxy_pools(), Role.BACKEND: self.cache.backend_pools()}
        for role, pool_name in ((Role.PROXY, policy.spec.proxy_pool), (Role.BACKEND, policy.spec.backend_pool)):
            obj = pools[role].get(pool_name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                continue        # a pool that goes takes everything with it
            pool = Pool.from_object(role, obj)
            cm = self.kube.get("v1", "ConfigMap", names.agent_name(role, pool_name), self.settings.namespace)
            if _names_policy(cm, policy.key):
                # The render thread has not written it out yet: nothing the nodes applied counts.
                waiting.append(f"{pool.kind} {pool.name} (its ConfigMap, not yet rendered without it)")
                continue
            waiting += [f"{n} ({pool.kind} {pool.name})" for n in
                        lifecycle.not_applied(pool, reports, nodes, contract.configmap_version(cm))]
        return self._still_waiting(body, waiting, f"stop serving SynProxyPolicy {policy.key}",
                                   "their agents' logs")

    def _still_waiting(self, obj: dict, waiting: list[str], what: str, remedy: str) -> str | None:
        if not waiting:
            return None
        if lifecycle.overdue(obj["metadata"].get("deletionTimestamp"), datetime.now(timezone.utc),
                             self.settings.teardown_timeout_s):
            message = (f"node(s) {', '.join(waiting)} did not confirm within "
                       f"{self.settings.teardown_timeout_s:g} s that they {what}; deleted anyway: see {remedy}")
            log.warning(message)
            self.post_event(obj, "Warning", "TeardownTimeout", message)
            return None
        return f"waiting for node(s) {', '.join(waiting)} to {what}"

    # ---- the whole fleet ----

    def service_changed(self, old: dict | None, new: dict | None) -> None:
        """A Service changed (None: absent before, or gone): a render only if
        the last one depended on it, by name or by an address it had or has."""
        meta = (new or old)["metadata"]
        addresses = {canonical(a) for s in (old, new) if s for a in service_addresses(s, ALL_ADDRESS_TYPES)}
        self._render_if(self._interest is None or
                        self._interest.service((meta["namespace"], meta["name"]), addresses), "service")

    def endpoint_slice_changed(self, old: dict | None, new: dict | None) -> None:
        self._render_if(self._interest is None or self._interest.endpoint_slice(new or old), "endpointslice")

    def pool_gone(self, role: Role, name: str) -> None:
        """What a pool made goes with it (owner references); its policies turn Degraded."""
        if role is Role.PROXY:
            self.metrics.forget_pool(name)
            self.keep_backends_off_proxies()
        self.request_render("pool")

    def _render_if(self, matters: bool, kind: str) -> None:
        if matters:
            self.request_render(kind)
        else:
            self.metrics.unrelated_events.labels(kind).inc()

    def request_render(self, cause: str) -> None:
        """Have the render thread render (once more, if it is rendering now):
        bursts of events (start-up, a node storm) coalesce instead of queueing,
        and no informer or handler waits for a render. `cause` is counted."""
        self.metrics.render_requests.labels(cause).inc()
        self._dirty.set()

    def _render_loop(self) -> None:
        while self._dirty.wait():
            # Renders start once the cache is synced, in the active replica only;
            # the cache requests one when either becomes true.
            if not (self.cache.ready() and self.cache.active()):
                self._dirty.clear()
                continue
            with self._render_lock:
                self._dirty.clear()
                try:
                    self._render_once()
                except Exception:      # the next event, or RETRY_S, renders again
                    log.exception("render failed")
                    self.metrics.errors.labels("render").inc()
                    threading.Timer(RENDER_RETRY_S, self.request_render, ("retry",)).start()

    def _read_view(self) -> tuple[ClusterView, Snapshot, dict[str, dict], dict[tuple[Role, str], dict]]:
        seen = self.cache.snapshot()
        # A pool being deleted is retiring (retire_pool): it serves no policy.
        pool_objs = {(role, name): o for role, pools in ((Role.PROXY, seen.proxy_pools),
                                                         (Role.BACKEND, seen.backend_pools))
                     for name, o in pools.items() if not o["metadata"].get("deletionTimestamp")}
        policy_objs = {f"{namespace}/{name}": o for (namespace, name), o in seen.policies.items()}
        policies = [self._policy_model(o) for o in policy_objs.values()]
        named = {(p.namespace, p.spec.service.name) for p in policies if p.spec.service is not None}
        view = ClusterView(
            proxy_pools=[Pool.from_object(r, o) for (r, _), o in pool_objs.items() if r is Role.PROXY],
            backend_pools=[Pool.from_object(r, o) for (r, _), o in pool_objs.items() if r is Role.BACKEND],
            policies=policies,
            nodes=list(seen.nodes.values()),
            # Every Service: whose namespace an address belongs to is part of the view.
            services=seen.services,
            endpoint_slices=[s for s in seen.endpoint_slices.values()
                             if (s["metadata"]["namespace"],
                                 s["metadata"]["labels"].get("kubernetes.io/service-name")) in named],
            namespace_labels=seen.namespace_labels,
            owners=seen.address_owners,
            ready_backend_agents=ready_agent_nodes(list(seen.agent_pods.values())))
        return view, seen, policy_objs, pool_objs

    def _policy_model(self, obj: dict) -> SynProxyPolicy:
        meta = obj["metadata"]
        known = self._policies.get(meta["uid"])
        if known is None or known[0] != meta.get("resourceVersion"):
            known = self._policies[meta["uid"]] = (meta.get("resourceVersion"), SynProxyPolicy.from_object(obj))
        return known[1]

    def _render_once(self) -> None:
        view, seen, policy_objs, pool_objs = self._read_view()
        live = {o["metadata"]["uid"] for o in [*policy_objs.values(), *pool_objs.values()]}
        self._statuses = {uid: w for uid, w in self._statuses.items() if uid in live}
        self._documents = {uid: d for uid, d in self._documents.items() if uid in live}
        self._validated = {uid: v for uid, v in self._validated.items() if uid in live}
        self._policies = {uid: m for uid, m in self._policies.items() if uid in live}
        rendered = render(view, self.settings)
        self._interest = ServiceInterest.of(view, rendered)
        self.metrics.renders.inc()
        pools = {(p.role, p.name): p for p in view.proxy_pools + view.backend_pools}
        problems: dict[tuple[Role, str], Problem] = {}
        changed = []
        for key, document in rendered.configs.items():
            pool = pools[key]
            checked = (document, address_shapes(view.selected(pool)))
            if self._validated.get(pool.uid) != checked:
                try:
                    validate_for_nodes(pool.role, document, view.selected(pool))
                except ConfigError as err:
                    # The previous ConfigMap stays: agents keep the last good configuration.
                    problems[key] = Problem("InvalidDataplaneConfig", str(err))
                    self.metrics.errors.labels("validate").inc()
                    continue
                self._validated[pool.uid] = checked
            if self._documents.get(pool.uid) != document:
                changed.append((key, pool, document))
        # The pools' ConfigMaps at once: the API server spends its time on each large one.
        for (key, pool, document), err in zip(changed, self._writers.map(self._write_configmap, changed)):
            if err is None:
                self._documents[pool.uid] = document
                continue
            # Too large, refused by admission, the API server unreachable: the
            # previous ConfigMap stays, and the pool and its policies say so.
            problems[key] = Problem("DataplaneConfigNotWritten", f"{pool.kind} {pool.name!r}'s data-plane "
                                    f"ConfigMap could not be written ({_api_message(err)}); its nodes keep "
                                    f"the last configuration written")
            self.metrics.errors.labels("write").inc()

        daemonsets = seen.daemonsets
        reports = Counter((r.role, r.pool) for r in seen.agent_reports.values() if r.ready)
        rollouts = {key: Rollout.from_daemonset(daemonsets.get(names.agent_name(*key)), reports.get(key, 0))
                    for key in pools}
        generations = {name: self._generation_in_force(pool) for (role, name), pool in pools.items()
                       if role is Role.PROXY}
        now = datetime.now(timezone.utc)
        pools_ready = {}
        for key, pool in pools.items():
            obj = pool_objs[key]
            shared = proxy_nodes_in(pool, view) if pool.role is Role.BACKEND else []
            status = pool_status(pool, rollouts[key], problems.get(key), self._conditions(obj),
                                 generations.get(pool.name), shared)
            if pool.role is Role.BACKEND:
                status |= drain_report(pool, view.selected(pool), members(pool, view),
                                       self._status(obj), now)
            ready = self._report(obj, status, problems.get(key) is not None or bool(shared))
            pools_ready[(POOL_KINDS[pool.role], pool.name)] = ready == "True"
        self.metrics.pools_ready(pools_ready)

        reports = []
        for p in view.policies:
            obj = policy_objs[p.key]
            outcome = rendered.policies[p.key]
            unwritten = next((problems[k] for k in ((Role.PROXY, p.spec.proxy_pool), (Role.BACKEND, p.spec.backend_pool))
                              if k in problems and problems[k].reason == "DataplaneConfigNotWritten"), None)
            if outcome.problem is None and unwritten is not None:
                outcome = dataclasses.replace(outcome, problem=unwritten)
            missing = Rollout()
            status = policy_status(p, outcome, rollouts.get((Role.PROXY, p.spec.proxy_pool), missing),
                                   rollouts.get((Role.BACKEND, p.spec.backend_pool), missing),
                                   generations.get(p.spec.proxy_pool), self._conditions(obj))
            reports.append((obj, status, outcome.problem is not None))
        # Side by side, like the ConfigMaps: a burst of policy changes is as
        # many status patches. Only those that change something go to the
        # writers: a thousand policies are a thousand tasks otherwise.
        changed_reports = [r for r in reports if _differs(self._status(r[0]), r[1])]
        list(self._writers.map(lambda report: self._report(*report), changed_reports))
        ready_count = Counter(_ready(status)["status"] for _, status, _ in reports)
        for state in ("True", "False"):
            self.metrics.policies.labels(state).set(ready_count[state])

    def _write_configmap(self, change: tuple) -> ApiException | None:
        _, pool, document = change
        try:
            self.kube.apply(configmap(pool, self.settings, document))
        except ApiException as err:
            return err
        return None

    def _generation_in_force(self, pool: Pool) -> int | None:
        """The generation of the pool's master key that covers the current epoch, if any."""
        keys = self._master_keys.get(pool.name)
        if keys is None:
            keys = contract.secret_salt_keys(self.kube.get("v1", "Secret", names.salts_secret_name(pool.name),
                                                           self.settings.namespace))
        key = key_for(keys, current_epoch(pool.spec.salt.rotation_seconds))
        return key.generation if key else None

    def _status(self, obj: dict) -> dict:
        """The object's status: as the cache has it, or as this operator wrote
        it over the version the cache still has."""
        meta = obj["metadata"]
        written = self._statuses.get(meta["uid"])
        if written is not None and written[0] == meta.get("resourceVersion"):
            return written[1]
        return obj.get("status") or {}

    def _conditions(self, obj: dict) -> list[dict]:
        return self._status(obj).get("conditions") or []

    def _report(self, obj: dict, status: dict, degraded: bool) -> str:
        """Write the status if it changed, with an Event when Ready changes
        status or reason; returns the Ready status."""
        ready = _ready(status)
        current = self._status(obj)
        before = next((c for c in current.get("conditions") or [] if c["type"] == "Ready"), {})
        if (before.get("status"), before.get("reason")) != (ready["status"], ready["reason"]):
            self.post_event(obj, "Warning" if degraded else "Normal", ready["reason"], ready["message"])
        if _differs(current, status):
            try:
                self.kube.patch_status(obj, status)
            except ApiException as err:
                if err.status != 404:
                    raise
                return ready["status"]     # deleted since the cache saw it: its DELETED event renders again
            self._statuses[obj["metadata"]["uid"]] = (obj["metadata"].get("resourceVersion"), {**current, **status})
        return ready["status"]


def _differs(current: dict, status: dict) -> bool:
    """Whether writing `status` over `current` changes it (a new Ready status
    or reason, which _report posts an Event for, is a change too)."""
    return any(current.get(k) != v for k, v in status.items())


def _ready(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def _names_policy(configmap: dict | None, key: str) -> bool:
    """Whether the pool's ConfigMap still serves the policy (namespace/name)."""
    try:
        document = contract.configmap_document(configmap, key)
    except ConfigError:
        return False
    return any(p.get("name") == key for p in document.get("policies") or [])


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{err.status} {err.reason}"

