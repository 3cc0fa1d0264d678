"""Deleting a pool or a policy: what the operator waits for before it lets the
object go (it holds a finalizer until then).

A pool being deleted writes the retirement instruction into its ConfigMap
(contract.RETIRE_KEY); every agent of the pool detaches its hooks, removes its
pins and reports Retired in its NodeAgent. A policy being deleted is rendered
out of its pools' ConfigMaps; every agent that serves them reports the
ConfigMap version it applied. The wait covers the nodes that can answer: Ready
nodes the pool still selects whose agent reported at all. A node that never
answers is waited for until the teardown timeout, then named in a Warning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from synfleet.config.schema import Role
from synfleet.contract import condition, parse_timestamp
from synfleet.resources.dataplane import NodeInfo, selects
from synfleet.resources.model import Pool


@dataclass(frozen=True)
class AgentReport:
    """A NodeAgent object as the operator reads it."""
    role: Role
    pool: str
    node: str
    ready: bool
    retired: bool
    config_version: str | None    # None: nothing applied yet, or an agent from before versions were reported

    @classmethod
    def from_object(cls, obj: dict) -> "AgentReport":
        status = obj.get("status") or {}
        true = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
        return cls(role=Role(obj["spec"]["role"]), pool=obj["spec"]["pool"], node=obj["spec"]["nodeName"],
                   ready="Ready" in true, retired="Retired" in true, config_version=status.get("configVersion"))


def _answering(pool: Pool, reports: list[AgentReport], nodes: list[NodeInfo]) -> list[AgentReport]:
    live = {n.name for n in nodes if n.ready and selects(pool, n)}
    return sorted((r for r in reports if (r.role, r.pool) == (pool.role, pool.name) and r.node in live),
                  key=lambda r: r.node)


def unretired(pool: Pool, reports: list[AgentReport], nodes: list[NodeInfo]) -> list[str]:
    """Nodes of a pool being deleted whose agent has not yet left them bare."""
    return [r.node for r in _answering(pool, reports, nodes) if not r.retired]


def not_applied(pool: Pool, reports: list[AgentReport], nodes: list[NodeInfo], version: str | None) -> list[str]:
    """Nodes whose serving agent has not yet applied the pool's ConfigMap at
    `version`. Agents that report no version cannot be waited for."""
    return [r.node for r in _answering(pool, reports, nodes)
            if r.ready and r.config_version is not None and r.config_version != version]


def overdue(deletion_timestamp: str | None, now: datetime, timeout_s: float) -> bool:
    if not deletion_timestamp:
        return False
    since = parse_timestamp(deletion_timestamp)
    return (now - since).total_seconds() >= timeout_s


def retiring_status(pool: Pool, waiting: list[str], previous: list[dict] | None) -> dict:
    """A pool's status while its agents leave their nodes."""
    g = pool.generation
    message = f"deleting: waiting for {len(waiting)} node(s) to detach: {', '.join(waiting)}" if waiting \
        else "deleting: every node is bare"
    return {"observedGeneration": g, "conditions": [
        condition("Ready", False, "Retiring", message, g, previous),
        condition("Progressing", True, "Retiring", message, g, previous),
        condition("Degraded", False, "AsExpected", "", g, previous)]}
