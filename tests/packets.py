"""Packet builders and independent checks (scapy's own header code)."""

from __future__ import annotations

import ipaddress
import struct

import mmh3
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from synfleet.abi import ENCAP_SPORT_BASE, ENCAP_SPORT_SPAN, RING_SIZE, Counter
from synfleet.cookie import FourTuple
from synfleet_lab.testbed.configs import ENCAP_PORT

CLIENT_MAC, PROXY_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TCX_NEXT = -1   # not ours: the next program on the hook, then the stack


def ip_layer(saddr, daddr, ip_options=(), ip_flags=None, **kw):
    if ip_options:
        kw["options"] = list(ip_options)
    if ip_flags:
        kw["flags"] = ip_flags
    if ipaddress.ip_address(str(saddr)).version == 4:
        return IP(src=str(saddr), dst=str(daddr), **kw)
    return IPv6(src=str(saddr), dst=str(daddr), **{k: v for k, v in kw.items() if k != "flags"})


def tcp_frame(saddr, daddr, sport, dport, flags="S", seq=1000, ack=0, options=(), payload=b"",
              **ip_kw) -> bytes:
    pkt = Ether(src=CLIENT_MAC, dst=PROXY_MAC) / ip_layer(saddr, daddr, **ip_kw) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, options=list(options))
    if payload:
        pkt = pkt / Raw(payload)
    return bytes(pkt)


def checksums_valid(frame: bytes) -> bool:
    """Rebuild the IP and TCP/UDP checksums with scapy and compare."""
    pkt = Ether(frame)
    fresh = pkt.copy()
    l3 = fresh.getlayer(IP) or fresh.getlayer(IPv6)
    if l3.version == 4:
        del l3.chksum
    for proto in (TCP, UDP):
        layer = fresh.getlayer(proto)
        if layer is not None and not (proto is UDP and pkt[UDP].chksum == 0):
            del layer.chksum
    return bytes(Ether(bytes(fresh))) == frame


def tcp_options(frame: bytes) -> dict:
    """Options of the frame's TCP header as a dict, NOPs/EOL dropped."""
    return {k: v for k, v in Ether(frame)[TCP].options if k not in ("NOP", "EOL")}


# bpf/sf_flow.h: MurmurHash3 x86_32 of the packed 4-tuple (the mmh3 library is
# the reference; the product needs no Python twin).
FLOW_SEED = 0x5F1EE7


def flow_hash(t: FourTuple) -> int:
    return mmh3.hash(t.packed(), FLOW_SEED, signed=False)


def ring_slot(t: FourTuple) -> int:
    return flow_hash(t) % RING_SIZE


def encap_source_port(t: FourTuple) -> int:
    return ENCAP_SPORT_BASE + flow_hash(t) % ENCAP_SPORT_SPAN


# ---- the encapsulation (docs/dataplane.md), built and parsed independently of the BPF code ----

def encapsulated(inner_frame: bytes, outer_src: str, outer_dst: str, policy_id: int,
                 flags: int = 0, version: int | None = None, previous: str | None = None) -> bytes:
    """Version 2 (the default with `previous`) carries the flow's previous backend."""
    outer = IP(src=outer_src, dst=outer_dst) if ":" not in outer_src else IPv6(src=outer_src, dst=outer_dst)
    version = version or (2 if previous else 1)
    hdr = struct.pack("!BBH", version, flags, policy_id)
    if previous:
        hdr += ipaddress.ip_address(previous).packed
    return bytes(Ether(src=PROXY_MAC, dst=CLIENT_MAC) / outer / UDP(sport=50000, dport=ENCAP_PORT, chksum=0)
                 / (hdr + inner_frame[14:]))


def decode_encap(frame: bytes) -> dict:
    """The documented encapsulation's fields."""
    outer = Ether(frame)
    l3 = outer[IP] if outer.type == 0x0800 else outer[IPv6]
    udp = outer[UDP]
    sf = bytes(udp.payload)[:4]
    length = 4 + (0 if sf[0] == 1 else 4 if outer.type == 0x0800 else 16)
    previous = bytes(udp.payload)[4:length]
    return dict(outer=l3, udp=udp, version=sf[0], flags=sf[1],
                policy_id=struct.unpack("!H", sf[2:4])[0],
                previous=str(ipaddress.ip_address(previous)) if previous else None,
                inner=bytes(udp.payload)[length:])



def delta(dp, frame):
    """A test run of `frame` and the counters it moved."""
    before = dp.counter_values()
    run = dp.program.test_run(frame)
    after = dp.counter_values()
    return run, {c: after[c] - before[c] for c in Counter if after[c] != before[c]}


