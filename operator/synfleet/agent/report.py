"""The node's NodeAgent object (cluster mode): what this agent runs, as the
kernel and its own maps say, written to the API server by a thread of its own.
It writes when something other than the counters changed (at most once per
tick) and refreshes the counters every COUNTERS_S; a failed write is logged
and retried, and never touches the data plane."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from synfleet import contract
from synfleet.config.schema import Role
from synfleet.kube import Kube

log = logging.getLogger("synfleet.agent")
CHECK_S = 1.0
COUNTERS_S = 60.0
MAX_BACKOFF_S = 30.0


def _summary(err: Exception) -> str:
    """An API error's status and message, without the response headers."""
    body = getattr(err, "body", None)
    if body:
        try:
            return f"{getattr(err, 'status', '')} {json.loads(body).get('message', body)}"
        except (ValueError, AttributeError):
            return f"{getattr(err, 'status', '')} {body}"
    return str(err)


@dataclass(frozen=True)
class ReportOptions:
    namespace: str
    pool: str
    pool_uid: str
    node_name: str


def conditions(not_ready: str | None, degraded: str | None, retired: str | None,
               previous: list[dict]) -> list[dict]:
    """Ready, Degraded and Retired (the node left bare on the pool's
    instruction), each keeping its lastTransitionTime while its status holds."""
    ready_reason = "Serving" if not_ready is None else "Retired" if retired else "NotReady"
    return [contract.condition("Ready", not_ready is None, ready_reason, not_ready or "", None, previous),
            contract.condition("Degraded", degraded is not None, "Degraded" if degraded else "AsExpected",
                               degraded or "", None, previous),
            contract.condition("Retired", retired is not None, "Retired" if retired else "Serving",
                               retired or "", None, previous)]


class NodeReporter:
    """`snapshot(counters)` returns the status without conditions (with the
    counters only when asked: reading them walks every per-CPU slot) plus
    `notReady`, `degraded` and `retired` (reasons or None); the reporter adds
    the conditions and writes."""

    def __init__(self, kube: Kube, role: Role, opts: ReportOptions, snapshot: Callable[[bool], dict]) -> None:
        self.kube, self.role, self.opts, self.snapshot = kube, role, opts, snapshot
        self.obj = contract.node_agent(role, opts.pool, opts.pool_uid, opts.node_name, opts.namespace)
        self._written: dict | None = None     # the last status written, counters aside
        self._conditions: list[dict] = []
        self._counters_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-report", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        wait, failed = CHECK_S, None
        while not self._stop.wait(wait):
            try:
                self.report()
                wait, failed = CHECK_S, None
            except Exception as err:     # the API server being away must never end the agent
                why = _summary(err)
                if why != failed:
                    log.warning("node report failed; retrying", extra={
                        "node_agent": self.obj["metadata"]["name"], "error": why})
                wait, failed = min(wait * 2, MAX_BACKOFF_S), why
                self._written = None

    def report(self) -> bool:
        """Write the status if it changed; True when it wrote."""
        counters_due = time.monotonic() - self._counters_at >= COUNTERS_S
        status = self.snapshot(counters_due)
        not_ready, degraded, retired = status.pop("notReady"), status.pop("degraded"), status.pop("retired")
        counters = status.pop("counters", None)
        self._conditions = conditions(not_ready, degraded, retired, self._conditions)
        status["conditions"] = self._conditions
        if status == self._written and not counters_due:
            return False
        if self._written is None:
            self.kube.apply(self.obj)       # create (or take over) the object; its spec never changes
        # A merge patch: counters left out keep their last written values.
        self.kube.patch_status(self.obj, {**status, "counters": counters} if counters_due else status)
        self._written = status
        if counters_due:
            self._counters_at = time.monotonic()
        return True
