"""The proxy pool's master keys, held in one Secret that only the pool's agents
can read. Every proxy derives each epoch's salt from them itself
(synfleet.cookie.salts), hours ahead, so epochs roll over with no write to the
API server and the data plane keeps its cookies while the control plane is
away.

A generation is in force for `masterRotationSeconds`. Its successor is
announced ANNOUNCE_S (at most half a generation) before it takes over, so every
agent has rewritten the salts it loaded ahead before any proxy signs with the
new key; at the switch, cookies of the epoch before still validate under the
old generation (a cookie is good for its own epoch and the next). A generation
is dropped once no valid cookie can name an epoch it covered."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

from synfleet import contract
from synfleet.cookie.salts import MASTER_KEY_BYTES, MasterKey
from synfleet.resources import names
from synfleet.resources.agents import OperatorSettings, owner_reference
from synfleet.resources.model import Pool

ANNOUNCE_S = 3600     # an agent cut off from the API server for longer may miss a switch (docs/operator.md)


def announce_epochs(rotation_s: int, master_rotation_s: int) -> int:
    return max(2, min(math.ceil(ANNOUNCE_S / rotation_s), master_rotation_s // rotation_s // 2))


def rotate(published: list[MasterKey], now_epoch: int, rotation_s: int, master_rotation_s: int,
           new_key: Callable[[], bytes] = lambda: secrets.token_bytes(MASTER_KEY_BYTES)) -> list[MasterKey]:
    """The master keys to publish in `now_epoch`: the first generation when there
    is none, the next one announced ahead of its turn, and none that no valid
    cookie needs any more."""
    keys = sorted(published, key=lambda k: k.generation)
    if not keys:
        keys = [MasterKey(1, now_epoch - 1, new_key())]     # covers the previous epoch's cookies too
    period = max(1, master_rotation_s // rotation_s)
    lead = announce_epochs(rotation_s, master_rotation_s)
    newest = keys[-1]
    if newest.from_epoch + period - lead <= now_epoch:
        # Late (the operator was away): the next generation still gets its whole lead.
        start = max(newest.from_epoch + period, now_epoch + lead)
        keys.append(MasterKey(newest.generation + 1, start, new_key()))
    # Cookies of epoch now-1 still validate: keep the generation in force then, and what follows.
    return [k for i, k in enumerate(keys) if i + 1 == len(keys) or keys[i + 1].from_epoch > now_epoch - 1]


def restart(published: list[MasterKey], now_epoch: int,
            new_key: Callable[[], bytes] = lambda: secrets.token_bytes(MASTER_KEY_BYTES)) -> list[MasterKey]:
    """A new generation from now on, for a pool whose epoch length changed (old
    epoch numbers mean nothing any more)."""
    generation = max((k.generation for k in published), default=0) + 1
    return [MasterKey(generation, now_epoch - 1, new_key())]


def secret(pool: Pool, settings: OperatorSettings, keys: list[MasterKey]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": names.salts_secret_name(pool.name), "namespace": settings.namespace,
                         "labels": names.labels(pool.role, pool.name),
                         "ownerReferences": [owner_reference(pool)]},
            "data": contract.secret_data(pool.spec.salt.rotation_seconds, keys)}
