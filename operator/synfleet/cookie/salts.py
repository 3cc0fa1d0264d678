"""Salts from a pool's master keys, as every proxy derives them.

A master key (32 random bytes, one per generation) is what the control plane
publishes; the salt of an epoch is keyed BLAKE2b over (generation, epoch),
16 bytes, with a personalisation that no other use of the key shares. Each
generation is in force from its first epoch until the next generation's: every
proxy that knows the same keys derives the same salt for every epoch, now and
hours ahead, with no message from the control plane per epoch.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MASTER_KEY_BYTES = 32
SALT_BYTES = 16
PERSON = b"synfleet-salt-v1"     # BLAKE2b personalisation, 16 bytes


@dataclass(frozen=True)
class MasterKey:
    generation: int
    from_epoch: int      # the first epoch whose salt this generation makes
    key: bytes


def fresh_key(generation: int = 1, from_epoch: int = 0) -> MasterKey:
    """A new random master key."""
    return MasterKey(generation, from_epoch, secrets.token_bytes(MASTER_KEY_BYTES))


def derive_salt(key: bytes, generation: int, epoch: int) -> bytes:
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"a master key is {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return hashlib.blake2b(struct.pack("<QQ", generation, epoch), digest_size=SALT_BYTES, key=key,
                           person=PERSON).digest()


def key_for(keys: Sequence[MasterKey], epoch: int) -> MasterKey | None:
    """The generation in force in `epoch`: the latest whose first epoch has come."""
    return max((k for k in keys if k.from_epoch <= epoch), key=lambda k: k.from_epoch, default=None)


def salts_for(keys: Sequence[MasterKey], epochs: Iterable[int]) -> dict[int, bytes]:
    """The salt of every epoch some generation covers."""
    out = {}
    for epoch in epochs:
        k = key_for(keys, epoch)
        if k is not None:
            out[epoch] = derive_salt(k.key, k.generation, epoch)
    return out
