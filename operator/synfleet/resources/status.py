"""Status subresources: conditions (Ready, Progressing, Degraded) with reasons,
observedGeneration and node counts, from what the operator observed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from synfleet.contract import condition, parse_timestamp, timestamp
from synfleet.resources.dataplane import NodeInfo, PolicyOutcome, Problem
from synfleet.resources.model import Pool, SynProxyPolicy


@dataclass(frozen=True)
class Rollout:
    """The DaemonSet's progress, as its controller reports it, and how many of
    the pool's agents report their node Ready in their NodeAgent objects."""
    desired: int = 0
    ready: int = 0
    updated: int = 0
    current: bool = False     # the controller has seen the latest template
    reported: int | None = None

    @classmethod
    def from_daemonset(cls, ds: dict | None, reported: int | None = None) -> "Rollout":
        if not ds:
            return cls(reported=reported)
        st = ds.get("status") or {}
        return cls(desired=st.get("desiredNumberScheduled", 0), ready=st.get("numberReady", 0),
                   updated=st.get("updatedNumberScheduled", 0),
                   current=st.get("observedGeneration", 0) >= ds["metadata"].get("generation", 1),
                   reported=reported)

    @property
    def ready_nodes(self) -> int:
        """Nodes whose agent reports Ready in its NodeAgent (the pods' readiness without reports)."""
        return self.ready if self.reported is None else self.reported

    @property
    def nodes(self) -> str:
        return f"{self.ready_nodes}/{self.desired}"

    @property
    def complete(self) -> bool:
        return self.current and self.desired > 0 and self.ready == self.desired == self.updated


def drain_report(pool: Pool, selected: list[NodeInfo], members: list[NodeInfo], previous: dict,
                 now: datetime) -> dict:
    """A backend pool's `members` (where new connections go) and `draining`
    nodes, each with why and until when its established flows still reach it
    (the proxies' previous generation: docs/dataplane.md). A node that left
    the pool (label removed, deleted) is listed until its drain period ends;
    one that is cordoned or marked, for as long as it is. `since` survives
    from the previous status, whatever the reason now (a cordoned node that then
    leaves has been out of the proxies' tables since the cordon): a drain is
    timed from when it was first seen."""
    period = timedelta(seconds=pool.spec.drain_seconds)
    before = {e["node"]: e for e in previous.get("draining") or []}

    def entry(node: str, reason: str) -> dict:
        earlier = before.get(node)
        since = earlier["since"] if earlier else timestamp(now)
        return {"node": node, "reason": reason, "since": since, "until": timestamp(parse_timestamp(since) + period)}

    here = {n.name for n in selected}
    draining = [entry(n.name, n.draining) for n in selected if n.draining]
    gone = (set(previous.get("members") or []) | set(before)) - here
    for node in sorted(gone):
        left = entry(node, "LeftPool")
        if left["until"] > timestamp(now):
            draining.append(left)
    return {"members": sorted(n.name for n in members),
            "draining": sorted(draining, key=lambda e: e["node"])}


def pool_status(pool: Pool, rollout: Rollout, problem: Problem | None, previous: list[dict] | None,
                salt_generation: int | None = None, proxy_nodes: list[str] = ()) -> dict:
    """`proxy_nodes`: nodes a backend pool selects that run a proxy instead
    (Degraded, while its other nodes make it Ready)."""
    g = pool.generation
    if problem is not None:
        ready = (False, problem.reason, problem.message)
    elif rollout.desired == 0 and rollout.current:
        ready = (False, "NoNodes", f"no node matches nodeSelector {pool.spec.node_selector or '{}'}")
    elif rollout.complete:
        ready = (True, "AgentsReady", f"{rollout.nodes} agents ready")
    else:
        ready = (False, "RollingOut", f"{rollout.nodes} agents ready, {rollout.updated} updated")
    progressing = not rollout.complete and problem is None and not (rollout.current and rollout.desired == 0)
    degraded = problem
    if degraded is None and proxy_nodes:
        degraded = Problem("NodesRunAProxy", f"not on {', '.join(proxy_nodes)}: a proxy pool selects "
                                             f"{'them' if len(proxy_nodes) > 1 else 'it'} too, and a node is a "
                                             f"proxy or a backend (narrow one of the nodeSelectors)")
    conditions = [
        condition("Ready", *ready, g, previous),
        condition("Progressing", progressing, "RollingOut" if progressing else "Stable",
                  f"{rollout.updated}/{rollout.desired} agents run the current template", g, previous),
        condition("Degraded", degraded is not None, degraded.reason if degraded else "AsExpected",
                  degraded.message if degraded else "", g, previous),
    ]
    status = {"observedGeneration": g, "nodes": rollout.nodes,
              "nodesReady": rollout.ready_nodes,
              "nodesDesired": rollout.desired, "conditions": conditions}
    if salt_generation is not None:
        status["saltGeneration"] = salt_generation
    return status


def policy_status(policy: SynProxyPolicy, outcome: PolicyOutcome, proxy_rollout: Rollout,
                  backend_rollout: Rollout, salt_generation: int | None, previous: list[dict] | None) -> dict:
    g = policy.generation
    problem = outcome.problem
    if problem is not None:
        ready = (False, problem.reason, problem.message)
    elif proxy_rollout.complete and backend_rollout.complete:
        ready = (True, "Protected", f"{len(outcome.addresses)} addresses protected by "
                                    f"{proxy_rollout.ready} proxies, {outcome.backends} backends")
    else:
        ready = (False, "PoolsNotReady", f"proxies {proxy_rollout.nodes}, backends {backend_rollout.nodes} ready")
    progressing = problem is None and not ready[0]
    status = {"observedGeneration": g, "nodes": proxy_rollout.nodes, "addresses": outcome.addresses,
              "backends": outcome.backends, "conditions": [
                  condition("Ready", *ready, g, previous),
                  condition("Progressing", progressing, "PoolsRollingOut" if progressing else "Stable",
                            ready[2] if progressing else "", g, previous),
                  condition("Degraded", problem is not None, problem.reason if problem else "AsExpected",
                            problem.message if problem else "", g, previous)]}
    if outcome.policy_id is not None:
        status["policyId"] = outcome.policy_id
    if salt_generation is not None:
        status["saltGeneration"] = salt_generation
    return status
