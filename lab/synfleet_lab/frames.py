"""Ethernet/IP/TCP/UDP frames with correct checksums, for benchmarks and
`synfleet check` (the tests build theirs with scapy, independently)."""

from __future__ import annotations

import ipaddress
import struct

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _l3(src: str, dst: str, proto: int, l4: bytes, checksum_at: int | None) -> tuple[int, bytes]:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), proto)
    if checksum_at is not None:
        c = internet_checksum(pseudo + l4)
        l4 = l4[:checksum_at] + struct.pack("!H", c) + l4[checksum_at + 2:]
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", internet_checksum(hdr)) + hdr[12:]
        return 0x0800, hdr + l4
    return 0x86DD, struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, s.packed, d.packed) + l4


def ethernet(ethertype: int, payload: bytes) -> bytes:
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + payload


def addressed(frame: bytes, dst_mac: str, src_mac: str) -> bytes:
    """`frame` between these two MACs ("02:00:…") instead of the builders' fixed ones."""
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + frame[12:]


def tcp(src: str, dst: str, sport: int, dport: int, flags: int, seq: int, ack: int,
        options: bytes = b"", payload: bytes = b"", window: int = 64240) -> bytes:
    if len(options) % 4 or len(options) > 40:
        raise ValueError("TCP options must be padded to 4 bytes and at most 40")
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, ack % 2**32, doff << 4, flags,
                      window, 0, 0) + options
    return ethernet(*_l3(src, dst, 6, hdr + payload, 16))


def udp_encap(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return ethernet(*_l3(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload,
                         None))


def linux_syn_options(mss: int, wscale: int, tsval: int) -> bytes:
    """The 20 option bytes a Linux client puts on its SYN."""
    return struct.pack("!BBH", 2, 4, mss) + b"\x04\x02" + struct.pack("!BBII", 8, 10, tsval, 0) \
        + b"\x01" + struct.pack("!BBB", 3, 3, wscale)


def ts_option(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01" + struct.pack("!BBII", 8, 10, tsval, tsecr)
