"""The operator's Prometheus metrics."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.renders = Counter("synfleet_operator_renders", "data-plane renders of the whole fleet",
                               registry=self.registry)
        self.render_requests = Counter("synfleet_operator_render_requests",
                                       "what asked for a render (many coalesce into one)", ["cause"],
                                       registry=self.registry)
        self.render_pending = Gauge("synfleet_operator_render_pending",
                                    "1 while a render runs or is asked for", registry=self.registry)
        self.reconciles = Counter("synfleet_operator_reconciles", "pool reconciles", ["kind"],
                                  registry=self.registry)
        self.unrelated_events = Counter("synfleet_operator_unrelated_events",
                                        "Service and EndpointSlice events no policy depends on: no render",
                                        ["kind"], registry=self.registry)
        self.api_requests = Counter("synfleet_operator_api_requests",
                                    "requests to the API server by verb and kind (kopf's own watches, "
                                    "finalizers and Events not included)", ["verb", "kind"], registry=self.registry)
        self.errors = Counter("synfleet_operator_errors", "reconcile and render failures", ["stage"],
                              registry=self.registry)
        self.rotations = Counter("synfleet_operator_salt_rotations", "salt Secret updates", ["pool"],
                                 registry=self.registry)
        self.policies = Gauge("synfleet_operator_policies", "SynProxyPolicies by Ready state", ["ready"],
                              registry=self.registry)
        self._last_rotation: dict[str, float] = {}
        self._pools_ready: dict[tuple[str, str], bool] = {}
        self.registry.register(self)

    def api_request(self, verb: str, kind: str) -> None:
        self.api_requests.labels(verb, kind).inc()

    def pools_ready(self, ready: dict[tuple[str, str], bool]) -> None:
        """Every pool's Ready condition as the last render reported it, by (kind, name)."""
        self._pools_ready = dict(ready)

    def rotated(self, pool: str) -> None:
        self.rotations.labels(pool).inc()
        self._last_rotation[pool] = time.monotonic()

    def forget_pool(self, pool: str) -> None:
        self._last_rotation.pop(pool, None)

    def collect(self):
        since = GaugeMetricFamily("synfleet_operator_seconds_since_salt_rotation",
                                  "seconds since this operator last updated the pool's salts", labels=["pool"])
        now = time.monotonic()
        for pool, at in sorted(self._last_rotation.items()):
            since.add_metric([pool], now - at)
        yield since
        ready = GaugeMetricFamily("synfleet_operator_pool_ready", "1 while the pool's Ready condition is True",
                                  labels=["kind", "pool"])
        for (kind, pool), ok in sorted(self._pools_ready.items()):
            ready.add_metric([kind, pool], 1 if ok else 0)
        yield ready
