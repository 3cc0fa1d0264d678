"""Flow hashing and Maglev backend tables, the Python side of bpf/sf_flow.h."""

from __future__ import annotations

import hashlib
import struct

from synfleet.cookie import FourTuple
from synfleet.dataplane.layout import ENCAP_SPORT_BASE, ENCAP_SPORT_SPAN, RING_SIZE

FLOW_SEED = 0x5F1EE7
_M32 = 0xFFFFFFFF


def _rotl32(x: int, b: int) -> int:
    return ((x << b) | (x >> (32 - b))) & _M32


def murmur3_32(data: bytes, seed: int) -> int:
    """MurmurHash3 x86_32."""
    h = seed & _M32
    whole = len(data) - len(data) % 4
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = _rotl32((k * 0xCC9E2D51) & _M32, 15) * 0x1B873593 & _M32
        h = (_rotl32(h ^ k, 13) * 5 + 0xE6546B64) & _M32
    tail = data[whole:]
    if tail:
        k = int.from_bytes(tail, "little")
        h ^= _rotl32((k * 0xCC9E2D51) & _M32, 15) * 0x1B873593 & _M32
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def flow_hash(t: FourTuple) -> int:
    return murmur3_32(t.packed(), FLOW_SEED)


def ring_slot(t: FourTuple) -> int:
    return flow_hash(t) % RING_SIZE


def encap_source_port(t: FourTuple) -> int:
    return ENCAP_SPORT_BASE + flow_hash(t) % ENCAP_SPORT_SPAN


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
