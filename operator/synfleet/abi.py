"""The data plane's ABI: ctypes mirrors of bpf/synfleet.h (map keys and values,
the encapsulation header, counters) and its limits. A `...Value` is what a
BPF map holds, not a configuration entry. Tests check every size against the
objects' BTF."""

from __future__ import annotations

import ctypes
import enum
import ipaddress

ENCAP_VERSION = 1
ENCAP_VERSION_PREVIOUS = 2      # the header, then the flow's previous backend
ENCAP_F_VALIDATED = 0x01
ENCAP_F_UNGUARDED = 0x02
ENCAP_F_CHAINED = 0x04
ENCAP_HDR_LEN = 4
ENCAP_PREVIOUS_LEN = {4: 4, 6: 16}
# At its longest (a previous backend named): what the advertised MSS leaves room for.
ENCAP_OVERHEAD = {4: 20 + 8 + ENCAP_HDR_LEN + ENCAP_PREVIOUS_LEN[4],
                  6: 40 + 8 + ENCAP_HDR_LEN + ENCAP_PREVIOUS_LEN[6]}
ENCAP_SPORT_BASE = 49152
ENCAP_SPORT_SPAN = 16384

MAX_POLICIES = 8192
MAX_SERVICES = 65536
MAX_BACKENDS = 4096
MAX_PROXIES = 4096
CONFIG_SLOTS = 2
RING_SIZE = 4099
MAX_TABLES = 256
SALT_SLOTS = 4096
RING_NONE = 0xFFFF

SOURCE_PROXY = 0x1
SOURCE_PEER = 0x2

POLICY_ACTIVE = 0x01
POLICY_ENFORCE = 0x02
POLICY_TIMESTAMPS = 0x04
POLICY_ECN = 0x08
POLICY_SACK = 0x10
POLICY_FAIL_OPEN = 0x20


class Counter(enum.IntEnum):
    """enum sf_counter, in order."""

    SYN_ANSWERED = 0
    COOKIE_VALID = enum.auto()
    COOKIE_REJECTED = enum.auto()
    COOKIE_STALE = enum.auto()
    FORWARDED = enum.auto()
    SALT_MISSING = enum.auto()
    NO_BACKEND = enum.auto()
    ROUTE_FAILED = enum.auto()
    ENCAP_FAILED = enum.auto()
    MALFORMED = enum.auto()
    FRAGMENT = enum.auto()
    EXT_HEADER = enum.auto()
    NO_POLICY = enum.auto()
    DECAPSULATED = enum.auto()
    REQSK_CREATED = enum.auto()
    REQSK_FAILED = enum.auto()
    ACK_UNVALIDATED = enum.auto()
    BYPASS_SYN = enum.auto()
    BYPASS_ACK = enum.auto()
    UNKNOWN_SOURCE = enum.auto()
    BAD_ENCAP = enum.auto()
    MONITOR_PASSED = enum.auto()
    TW_RECYCLED = enum.auto()
    TW_REFUSED = enum.auto()
    FAIL_OPEN = enum.auto()
    MARTIAN = enum.auto()
    BAD_CHECKSUM = enum.auto()
    TOO_BIG = enum.auto()
    PREVIOUS_NAMED = enum.auto()
    CHAINED = enum.auto()
    CHAIN_RECEIVED = enum.auto()
    CHAIN_REFUSED = enum.auto()
    CHAIN_FAILED = enum.auto()


class Endpoint(ctypes.Structure):
    """struct sf_endpoint: key of services / protected_addrs / encap_sources, a backend."""

    _fields_ = [("family", ctypes.c_uint8), ("slot", ctypes.c_uint8),
                ("port_be", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
           port: int = 0) -> "Endpoint":
        ip = ipaddress.ip_address(address)
        ep = cls(family=ip.version, port_be=int.from_bytes(port.to_bytes(2, "big"), "little"))
        ctypes.memmove(ep.addr, ip.packed, len(ip.packed))
        return ep

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        raw = bytes(self.addr)
        return ipaddress.ip_address(raw[:4] if self.family == 4 else raw)

    @property
    def port(self) -> int:
        return int.from_bytes(self.port_be.to_bytes(2, "little"), "big")


class RingSlotValue(ctypes.Structure):
    """struct sf_ring_slot: a Maglev slot's current and previous backend (RING_NONE: none)."""

    _fields_ = [("current", ctypes.c_uint16), ("previous", ctypes.c_uint16)]


class ServiceValue(ctypes.Structure):
    _fields_ = [("policy_id", ctypes.c_uint32)]


class PolicyValue(ctypes.Structure):
    _fields_ = [("mss_v4", ctypes.c_uint16 * 4), ("mss_v6", ctypes.c_uint16 * 4),
                ("adv_mss_v4", ctypes.c_uint16), ("adv_mss_v6", ctypes.c_uint16),
                ("wscale", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("table", ctypes.c_uint16)]


class SaltValue(ctypes.Structure):
    _fields_ = [("epoch", ctypes.c_uint64), ("k0", ctypes.c_uint64), ("k1", ctypes.c_uint64),
                ("valid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]

    @classmethod
    def of(cls, epoch: int, key: bytes) -> "SaltValue":
        if len(key) != 16:
            raise ValueError(f"a salt is 16 bytes, got {len(key)}")
        return cls(epoch=epoch, k0=int.from_bytes(key[:8], "little"),
                   k1=int.from_bytes(key[8:], "little"), valid=1)


class ConfigValue(ctypes.Structure):
    """struct sf_config."""

    _fields_ = [("rotation_ns", ctypes.c_uint64), ("encap_port_be", ctypes.c_uint16),
                ("slot", ctypes.c_uint16), ("node_addr_v4", ctypes.c_uint8 * 4),
                ("node_addr_v6", ctypes.c_uint8 * 16), ("clock_offset_ns", ctypes.c_int64)]


class EncapHeader(ctypes.BigEndianStructure):
    _pack_ = 1
    _fields_ = [("version", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("policy_id", ctypes.c_uint16)]


# struct name in BTF -> mirror, for the layout test
BTF_MIRRORS = {
    "sf_endpoint": Endpoint, "sf_service": ServiceValue, "sf_policy": PolicyValue, "sf_salt": SaltValue,
    "sf_config": ConfigValue, "sf_ring_slot": RingSlotValue,
}
