"""Maglev backend tables, which the agent writes into the proxy's maglev_slots.
The flow hash that picks a slot runs only in BPF (bpf/sf_flow.h)."""

from __future__ import annotations

import hashlib

from synfleet.abi import RING_SIZE


def _h(name: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, key=salt).digest(), "little")


def maglev_table(backends: list[str], size: int = RING_SIZE) -> list[int]:
    """Maglev lookup table (Eisenbud et al., NSDI 2016): slot -> index into
    `backends`. Deterministic in the backends' names, so every proxy and every
    operator replica computes the same table; removing one backend moves only
    the slots that were its own (plus a small fraction)."""
    if not backends:
        return []
    n = len(backends)
    offsets = [_h(b, b"offset") % size for b in backends]
    skips = [_h(b, b"skip") % (size - 1) + 1 for b in backends]
    nexts = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            while True:
                slot = (offsets[i] + nexts[i] * skips[i]) % size
                nexts[i] += 1
                if table[slot] < 0:
                    break
            table[slot] = i
            filled += 1
            if filled == size:
                return table
