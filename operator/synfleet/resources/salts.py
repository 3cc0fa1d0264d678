"""The proxy pool's rolling salts, held in one Secret that only the pool's
agents can read. Epoch n's key is published while epoch n-2 is current, so
every key is on every proxy at least one whole epoch before it signs a cookie,
and stays until no valid cookie can name it."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from synfleet import contract
from synfleet.resources import names
from synfleet.resources.agents import OperatorSettings, owner_reference
from synfleet.resources.model import Pool

KEY_BYTES = 16
PUBLISHED_BEHIND, PUBLISHED_AHEAD = 1, 2    # epochs kept before and published after the current one


def wanted_epochs(now_epoch: int) -> range:
    return range(now_epoch - PUBLISHED_BEHIND, now_epoch + PUBLISHED_AHEAD + 1)


def rotate(published: dict[int, bytes], now_epoch: int,
           new_key: Callable[[], bytes] = lambda: secrets.token_bytes(KEY_BYTES)) -> dict[int, bytes]:
    """The salts to publish in `now_epoch`: keys already published are kept
    (a proxy may have signed with them), expired ones dropped, missing ones made."""
    return {e: published[e] if e in published else new_key() for e in wanted_epochs(now_epoch)}


def secret(pool: Pool, settings: OperatorSettings, salts: dict[int, bytes]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": names.salts_secret_name(pool.name), "namespace": settings.namespace,
                         "labels": names.labels(pool.role, pool.name),
                         "ownerReferences": [owner_reference(pool)]},
            "data": contract.secret_data(pool.spec.salt.rotation_seconds, salts)}
