"""Names and labels of what the operator makes for a pool. Pool names are at
most 40 characters (a CRD rule), so every derived name is a valid label value."""

from __future__ import annotations

from synfleet import contract
from synfleet.config.schema import Role

MANAGED_BY = "synfleet-operator"
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"    # what the operator made
# On pools and policies: their deletion waits for the nodes (resources.lifecycle).
FINALIZER = "synfleet.io/teardown"


def agent_name(role: Role, pool: str) -> str:
    """DaemonSet, ConfigMap, ServiceAccount, Role and RoleBinding of a pool."""
    return f"synfleet-{role.value}-{pool}"


def salts_secret_name(pool: str) -> str:
    return f"synfleet-salts-{pool}"


def selector_labels(role: Role, pool: str) -> dict[str, str]:
    return {contract.LABEL_ROLE: role.value, contract.LABEL_POOL: pool}


def labels(role: Role, pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "synfleet-agent", "app.kubernetes.io/component": role.value,
            "app.kubernetes.io/managed-by": MANAGED_BY, **selector_labels(role, pool)}
