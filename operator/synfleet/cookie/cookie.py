"""The synfleet SYN cookie, bit for bit as bpf/sf_cookie.h computes it.

    31                  10 9   8 7   6  5     4     3      0
   +----------------------+-----+-----+-----+------+--------+
   |   SipHash bits (22)  |epoch| MSS | ECN | SACK | WScale |
   +----------------------+-----+-----+-----+------+--------+

Hash input (SipHash-2-4, key = the epoch's 128-bit salt), all fields as bytes:
  IPv4 (24 bytes): saddr(4) daddr(4) sport(2) dport(2) client_isn(4, big-endian)
                   epoch(4, little-endian, low 32 bits) attrs(4, little-endian)
  IPv6 (48 bytes): saddr(16) daddr(16) then the same 16 bytes.
attrs is the low 10 bits of the cookie, plus HASHED_TS (bit 16) when the
SYN+ACK carries timestamps. The hash bits are the top 22 bits of the upper half
of the 64-bit SipHash; the lower half is that SYN+ACK's TSval, which the ACK's
TSecr must echo. docs/cookie.md explains the choices.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from dataclasses import dataclass

from synfleet.cookie.siphash import siphash24

WSCALE_NONE = 15
MAX_WSCALE = 14
SACK_BIT = 0x10
ECN_BIT = 0x20
MSS_SHIFT = 6
EPOCH_SHIFT = 8
ATTR_MASK = 0x3FF
HASH_MASK = 0xFFFFFC00
HASH_BITS = 22
HASHED_TS = 0x10000
TSVAL_BITS = 32

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FourTuple:
    """Client -> service, as the client's packets carry it."""

    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: int

    def __post_init__(self) -> None:
        if self.saddr.version != self.daddr.version:
            raise ValueError("source and destination address families differ")

    @property
    def family(self) -> int:
        return self.saddr.version

    def packed(self) -> bytes:
        return self.saddr.packed + self.daddr.packed + struct.pack("!HH", self.sport, self.dport)


@dataclass(frozen=True)
class CookieAttributes:
    """What the backend decodes from the cookie."""

    mss_index: int
    wscale: int | None      # the client's window scale, None when it sent none
    sack: bool
    ecn: bool

    def __post_init__(self) -> None:
        if not 0 <= self.mss_index <= 3:
            raise ValueError(f"mss_index {self.mss_index} is not 0..3")
        if self.wscale is not None and not 0 <= self.wscale <= MAX_WSCALE:
            raise ValueError(f"wscale {self.wscale} is not 0..{MAX_WSCALE}")

    def bits(self) -> int:
        ws = WSCALE_NONE if self.wscale is None else self.wscale
        return ws | (SACK_BIT if self.sack else 0) | (ECN_BIT if self.ecn else 0) \
            | self.mss_index << MSS_SHIFT

    @classmethod
    def from_cookie(cls, cookie: int) -> "CookieAttributes":
        ws = cookie & 0xF
        if ws > MAX_WSCALE and ws != WSCALE_NONE:
            raise ValueError(f"cookie {cookie:#010x} carries window scale {ws}")
        return cls(mss_index=(cookie >> MSS_SHIFT) & 3, wscale=None if ws == WSCALE_NONE else ws,
                   sack=bool(cookie & SACK_BIT), ecn=bool(cookie & ECN_BIT))


def cookie_message(t: FourTuple, client_isn: int, epoch: int, hashed_bits: int) -> bytes:
    return t.packed() + struct.pack("!I", client_isn & 0xFFFFFFFF) \
        + struct.pack("<II", epoch & 0xFFFFFFFF, hashed_bits & (ATTR_MASK | HASHED_TS))


def _siphash(salt: bytes, t: FourTuple, client_isn: int, epoch: int, cookie: int, timestamps: bool) -> int:
    hashed = (cookie & ATTR_MASK) | (HASHED_TS if timestamps else 0)
    return siphash24(salt, cookie_message(t, client_isn, epoch, hashed))


def cookie_make(salt: bytes, epoch: int, t: FourTuple, client_isn: int,
                attrs: CookieAttributes, timestamps: bool = False) -> int:
    """The ISN of the SYN+ACK answering a SYN with sequence number `client_isn`;
    `timestamps`: that SYN+ACK carries the option (see synack_tsval)."""
    bits = attrs.bits() | (epoch & 3) << EPOCH_SHIFT
    return (_siphash(salt, t, client_isn, epoch, bits, timestamps) >> 32) & HASH_MASK | bits


def synack_tsval(salt: bytes, epoch: int, t: FourTuple, client_isn: int, cookie: int) -> int:
    """The TSval of the SYN+ACK with timestamps whose ISN is `cookie`."""
    return _siphash(salt, t, client_isn, epoch, cookie, True) & 0xFFFFFFFF


def epoch_bits(cookie: int) -> int:
    return (cookie >> EPOCH_SHIFT) & 3


def current_epoch(rotation_seconds: float, clock_offset_seconds: float = 0.0) -> int:
    """The salt epoch a node is in now, as the proxy derives it:
    (TAI ns + the node's clock offset) / rotation (bpf/proxy.bpf.c now_epoch)."""
    clock = time.clock_gettime_ns(time.CLOCK_TAI) + round(clock_offset_seconds * 1e9)
    return clock // round(rotation_seconds * 1e9)


def salt_in_window(salt_epoch: int, now_epoch: int) -> bool:
    """A salt validates in its own epoch, the next one, and the one before it."""
    return now_epoch - 1 <= salt_epoch <= now_epoch + 1


def cookie_check(salts: dict[int, bytes], now_epoch: int, t: FourTuple, client_isn: int,
                 cookie: int, tsecr: int | None = None) -> bool:
    """Validate as the proxy does: pick the salt by the cookie's epoch bits
    among the published epochs, then one hash. `salts` maps epoch -> key;
    `tsecr` is the ACK's, None when it carries no timestamps."""
    want = epoch_bits(cookie)
    for epoch, salt in salts.items():
        if epoch & 3 == want and salt_in_window(epoch, now_epoch):
            h = _siphash(salt, t, client_isn, epoch, cookie, tsecr is not None)
            return (h >> 32) & HASH_MASK == cookie & HASH_MASK \
                and (tsecr is None or h & 0xFFFFFFFF == tsecr)
    return False


def mss_index(table: tuple[int, int, int, int], client_mss: int) -> int:
    """The largest table entry not above the client's MSS (entry 0 if none)."""
    for i in (3, 2, 1):
        if client_mss >= table[i]:
            return i
    return 0
