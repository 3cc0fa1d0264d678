"""Prometheus metrics and the /healthz, /readyz endpoints of one agent.

Counters are read from the per-CPU BPF array at scrape time and summed over
CPUs, so a scrape always shows what the kernel counted, including what a
previous agent process counted into the same pinned map.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from synfleet.abi import Counter


@dataclass
class AgentState:
    """What the agent knows about itself; written by the agent loop, read by scrapes."""

    role: str
    instance: str
    config_generation: int = 0
    config_errors: int = 0
    last_sync: float | None = None      # time.time() of the last successful sync
    salt_epoch: int | None = None       # the epoch the node's clock is in
    salts_published: set[int] = field(default_factory=set)     # epochs whose salt the map holds
    salts_loaded_for: int | None = None     # the epoch the salt window was last laid around
    hooks: list[str] = field(default_factory=list)        # interfaces running the TC program ...
    tc_hook: str = "tcx"                                  # ... through a tcx link, or a clsact filter ("tc")
    xdp_hooks: list[str] = field(default_factory=list)    # interfaces running the XDP front
    hooks_missing: list[tuple[str, str]] = field(default_factory=list)   # (interface, hook) wanted, not in place
    rotation_seconds: float | None = None   # of the salt epochs, once configured
    xdp_fallbacks: dict[str, int] = field(default_factory=dict)   # fronts taken away, by interface
    not_ready: Callable[[], str | None] = lambda: "starting"   # why /readyz fails, or None

    @property
    def salt_epochs_ahead(self) -> int:
        """Epochs after the current one whose salt the map holds."""
        return sum(1 for e in self.salts_published if e > self.salt_epoch)
    alive: Callable[[], bool] = lambda: True


class AgentCollector(Collector):
    def __init__(self, state: AgentState, counters: Callable[[], dict[Counter, int]]) -> None:
        self.state, self.counters = state, counters

    def collect(self) -> Iterator:
        s = self.state
        labels = ["role", "instance"]
        base = [s.role, s.instance]
        packets = CounterMetricFamily(
            "synfleet_dataplane_packets", "Packets by data-plane outcome (per-CPU BPF counters summed)",
            labels=labels + ["event"])
        for counter, value in self.counters().items():
            packets.add_metric(base + [counter.name.lower()], value)
        yield packets
        gen = GaugeMetricFamily("synfleet_config_generation",
                                "Configurations applied by this agent process", labels=labels)
        gen.add_metric(base, s.config_generation)
        yield gen
        errors = CounterMetricFamily("synfleet_config_errors",
                                     "Configuration files rejected (the last good one kept serving)",
                                     labels=labels)
        errors.add_metric(base, s.config_errors)
        yield errors
        attached = GaugeMetricFamily("synfleet_hook_attached",
                                     "Data-plane programs attached (as the kernel shows them), by interface and hook (tcx, tc, xdp)",
                                     labels=labels + ["interface", "hook"])
        for hook, interfaces in ((s.tc_hook, s.hooks), ("xdp", s.xdp_hooks)):
            for name in interfaces:
                attached.add_metric(base + [name, hook], 1)
        for name, hook in s.hooks_missing:
            attached.add_metric(base + [name, hook], 0)
        yield attached
        ready = GaugeMetricFamily("synfleet_agent_ready", "1 when /readyz answers 200 (its body says why not)",
                                  labels=labels)
        ready.add_metric(base, 1 if s.not_ready() is None else 0)
        yield ready
        fallbacks = CounterMetricFamily("synfleet_xdp_fallbacks",
                                        "XDP fronts taken away because the driver failed to send their "
                                        "replies (the TC program answers there)", labels=labels + ["interface"])
        for name, count in sorted(s.xdp_fallbacks.items()):
            fallbacks.add_metric(base + [name], count)
        yield fallbacks
        since = GaugeMetricFamily("synfleet_seconds_since_last_sync",
                                  "Seconds since the maps last matched the configuration", labels=labels)
        since.add_metric(base, float("inf") if s.last_sync is None else time.time() - s.last_sync)
        yield since
        if s.role == "proxy":
            epoch = GaugeMetricFamily("synfleet_salt_epoch", "Salt epoch of the node's clock",
                                      labels=labels)
            if s.salt_epoch is not None:
                epoch.add_metric(base, s.salt_epoch)
            yield epoch
            ahead = GaugeMetricFamily("synfleet_salt_epochs_ahead",
                                      "Salt epochs loaded after the current one", labels=labels)
            horizon = GaugeMetricFamily("synfleet_salt_horizon_seconds",
                                        "How long the loaded salts last without a new master key (at least)",
                                        labels=labels)
            if s.salt_epoch is not None:
                ahead.add_metric(base, s.salt_epochs_ahead)
                if s.rotation_seconds:
                    horizon.add_metric(base, s.salt_epochs_ahead * s.rotation_seconds)
            yield ahead
            yield horizon


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    state: AgentState

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.state.alive()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"agent loop stalled\n")
        elif path == "/readyz":
            why = self.state.not_ready()
            self._reply(200 if why is None else 503, b"ok\n" if why is None else f"{why}\n".encode())
        else:
            self._reply(404, b"try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass   # scrapes are not news


def serve(listen: str, state: AgentState, counters: Callable[[], dict[Counter, int]]) -> ThreadingHTTPServer:
    """Start the metrics and probe server on host:port ([v6]:port for IPv6)
    in a daemon thread."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(state, counters))
    handler = type("AgentHandler", (_Handler,), {"registry": registry, "state": state})
    server_class = type("AgentServer", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
    server = server_class((host, int(port)), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
