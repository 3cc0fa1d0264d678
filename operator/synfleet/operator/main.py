"""`synfleet operator`: run the kopf operator cluster-wide, with its metrics
and liveness endpoints."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import socket
from dataclasses import dataclass

import kopf
from prometheus_client import start_http_server

from synfleet.operator.cache import Peering
from synfleet.operator.metrics import OperatorMetrics
from synfleet.resources.agents import OperatorSettings


@dataclass(frozen=True)
class OperatorOptions:
    settings: OperatorSettings
    peering: str = "synfleet"
    metrics_port: int | None = 8080
    liveness: str | None = "http://0.0.0.0:8081/healthz"


M_ARENA_MAX = -8      # glibc's mallopt() parameter


def _few_malloc_arenas() -> None:
    """glibc gives threads that allocate at once arenas of their own (up to
    8 per CPU) and keeps what they freed: an informer thread per kind, each
    parsing thousands of objects, would hold its peak for good."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass    # not glibc: its allocator has no such parameter


def run(opts: OperatorOptions) -> None:
    import synfleet.operator.handlers  # noqa: F401  (registers the handlers with kopf)

    _few_malloc_arenas()      # before any thread starts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every successful handler run at INFO (a line per watch event and
    # per timer tick); failures stay visible at WARNING and above.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    if opts.metrics_port:
        start_http_server(opts.metrics_port, registry=metrics.registry)
    # Who this replica is among its peers: kopf pauses its handlers by this, the
    # cache its renders (a tie pauses both: the priority is random, not fixed).
    peering = Peering(name=opts.peering, priority=random.randint(1, 2**31 - 1),
                      identity=os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}")
    kopf.run(clusterwide=True, peering_name=opts.peering, identity=peering.identity,
             liveness_endpoint=opts.liveness,
             memo=kopf.Memo(settings=opts.settings, metrics=metrics, peering=peering))
