"""Mutation fuzzing of all three programs (proxy TC, its XDP front, backend)
through BPF_PROG_TEST_RUN, bounded in examples and time, checked against what
docs/dataplane.md promises for any input:

- the only kernel refusal is the documented one (a frame that ends inside the
  IP header: EINVAL before the program runs);
- the verdict is one of the program's, and the counters moved agree with it (a
  drop is counted as one of the documented reasons; a frame passed untouched
  is unchanged);
- a SYN+ACK mirrors the SYN and carries a cookie the Python reference accepts;
- an encapsulated output has the documented outer headers and carries the
  input's IP packet unchanged, flagged VALIDATED only with a valid cookie;
- the XDP front either passes the frame untouched or answers exactly as the
  TC program does;
- the backend decapsulates only from an allowed proxy, giving back the inner
  packet byte for byte.

Seeds: SYNs, handshake ACKs with valid cookies, data and control segments,
ICMPv6 and UDP to protected addresses, IPv6 extension headers, encapsulated
segments from a proxy and from a stranger; mutations: bit flips, byte writes,
writes at header fields, truncation, extension."""

from __future__ import annotations

import errno
import ipaddress
import os

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether

from conftest import (
    BACKEND_V4,
    BACKEND_V6,
    ENCAP_PORT,
    PEER_V4,
    PEER_V6,
    POLICY_FULL,
    PORT_FULL,
    PORT_MONITOR,
    PROXY_V4,
    PROXY_V6,
    ROTATION_S,
    UNIT_CLOCK_OFFSET_S,
    addr_pair,
    tai_epoch,
)
from packets import (
    CLIENT_MAC,
    PROXY_MAC,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TCX_NEXT,
    checksums_valid,
    decode_encap,
    encapsulated,
    tcp_frame,
)
from synfleet.abi import ENCAP_F_CHAINED, ENCAP_F_UNGUARDED, ENCAP_F_VALIDATED, Counter
from synfleet.cookie import CookieAttributes, FourTuple, cookie_check, cookie_make, current_epoch
from test_proxy_xdp import XDP_PASS, XDP_TX

# CI runs a fixed sequence of examples (a red run is reproducible); a developer
# hunting sets SYNFLEET_FUZZ_RANDOM=1 and as many examples as patience allows.
EXAMPLES = int(os.environ.get("SYNFLEET_FUZZ_EXAMPLES", "1500"))
RANDOM = bool(os.environ.get("SYNFLEET_FUZZ_RANDOM"))
LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
# Below this the kernel refuses the run (the frame ends inside any IP header).
SHORTEST_RUN = 14 + 20

PROXY_DROPS = {Counter.MALFORMED, Counter.FRAGMENT, Counter.EXT_HEADER, Counter.SALT_MISSING, Counter.NO_BACKEND,
               Counter.ROUTE_FAILED, Counter.ENCAP_FAILED, Counter.MARTIAN, Counter.BAD_CHECKSUM}
PROXY_ACK_VERDICTS = {Counter.COOKIE_VALID, Counter.COOKIE_REJECTED, Counter.COOKIE_STALE}
BACKEND_DROPS = {Counter.BAD_ENCAP, Counter.MALFORMED, Counter.BYPASS_SYN, Counter.BYPASS_ACK,
                 Counter.ACK_UNVALIDATED, Counter.UNKNOWN_SOURCE, Counter.REQSK_FAILED,
                 Counter.CHAIN_REFUSED, Counter.CHAIN_FAILED}


def seeds(salts) -> list[bytes]:
    out = []
    epoch = tai_epoch()
    attrs = CookieAttributes(mss_index=3, wscale=7, sack=True, ecn=False)
    for family in (4, 6):
        client, service = addr_pair(family)
        cookie = cookie_make(salts[epoch], epoch, FourTuple(client, service, 40000, PORT_FULL), 777, attrs)
        out += [
            tcp_frame(client, service, 40000, PORT_FULL, flags="S", seq=777, options=LINUX_SYN_OPTS),
            tcp_frame(client, service, 40001, PORT_MONITOR, flags="S", seq=9, options=LINUX_SYN_OPTS[:2]),
            tcp_frame(client, service, 40000, PORT_FULL, flags="A", seq=778, ack=(cookie + 1) % 2**32),
            tcp_frame(client, service, 40000, PORT_FULL, flags="PA", seq=778, ack=5, payload=b"GET / HTTP/1.1\r\n"),
            tcp_frame(client, service, 40000, PORT_FULL, flags="FA", seq=900, ack=5),
            tcp_frame(client, service, 40000, PORT_FULL, flags="R", seq=900),
            tcp_frame(client, service, 40000, 443, flags="S"),
            # too big for the 1,500-byte link once encapsulated
            tcp_frame(client, service, 40000, PORT_FULL, flags="PA", seq=778, ack=5,
                      payload=b"x" * (1500 - (20 if family == 4 else 40) - 24),
                      **({"ip_flags": "DF"} if family == 4 else {})),
        ]
        proxy_addr, backend_addr, peer_addr = (PROXY_V4, BACKEND_V4, PEER_V4) if family == 4 else \
            (PROXY_V6, BACKEND_V6, PEER_V6)
        inner = tcp_frame(client, service, 40000, PORT_FULL, flags="A", seq=778, ack=(cookie + 1) % 2**32)
        out += [encapsulated(inner, proxy_addr, backend_addr, POLICY_FULL.id, ENCAP_F_VALIDATED),
                encapsulated(inner, proxy_addr, backend_addr, POLICY_FULL.id),
                encapsulated(inner, "198.18.9.9" if family == 4 else "2001:db8:9::9", backend_addr,
                             POLICY_FULL.id, ENCAP_F_VALIDATED),
                # daisy chaining: named by a proxy, handed on by a peer
                encapsulated(inner, proxy_addr, backend_addr, POLICY_FULL.id, previous=peer_addr),
                encapsulated(inner, peer_addr, backend_addr, POLICY_FULL.id, ENCAP_F_CHAINED, previous=backend_addr)]
    client6, service6 = addr_pair(6)
    out += [bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IPv6(src=str(client6), dst=str(service6))
                  / ICMPv6EchoRequest()),
            bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IPv6(src=str(client6), dst=str(service6))
                  / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=PORT_FULL, flags="S")),
            bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IP(src="198.18.1.7", dst="198.19.0.10")
                  / UDP(sport=1, dport=ENCAP_PORT) / b"\x01\x00\x00\x01E")]
    return out


# Offsets worth writing: Ethernet type; IPv4 ihl, length, flags/offset, protocol, addresses; IPv6
# payload length and next header; TCP/UDP ports, sequence numbers, data offset, flags, checksum;
# the encapsulation's version, flags and policy id.
FIELDS = [12, 14, 16, 17, 20, 21, 23, 26, 30, 18, 19, 20, 34, 36, 38, 42, 46, 47, 50, 54, 56, 58, 60, 62]


@st.composite
def mutated(draw, pool: list[bytes]) -> bytes:
    frame = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "field", "truncate", "extend"]))
        if kind == "flip":
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        elif kind == "field":
            i = draw(st.sampled_from([f for f in FIELDS if f < len(frame)]))
            frame[i] = draw(st.sampled_from([0, 1, 4, 5, 6, 17, 0x40, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "truncate":
            frame = frame[:draw(st.integers(SHORTEST_RUN, len(frame)))]
        else:
            frame += draw(st.binary(min_size=1, max_size=64))
    return bytes(frame)


def fuzz_run(dp, program, frame: bytes):
    """The frame, its test run and the counters it moved; a frame the kernel
    refuses as documented is no example."""
    before = dp.counter_values()
    try:
        result = program.test_run(frame)
    except OSError as err:
        assert err.errno == errno.EINVAL and len(frame) < 14 + 40, f"{err} for a {len(frame)}-byte frame"
        reject()
    after = dp.counter_values()
    return frame, result, {c: after[c] - before[c] for c in Counter if after[c] != before[c]}


def check_synack(frame: bytes, out: bytes, salts) -> None:
    syn, reply = Ether(frame), Ether(out)
    l3_in = syn[IP] if IP in syn else syn[IPv6]
    l3_out = reply[IP] if IP in reply else reply[IPv6]
    assert (reply.src, reply.dst) == (syn.dst, syn.src)
    assert (l3_out.src, l3_out.dst) == (l3_in.src, l3_in.dst)[::-1]
    t_in, t_out = syn[TCP], reply[TCP]
    assert (t_out.sport, t_out.dport) == (t_in.dport, t_in.sport)
    assert "S" in str(t_out.flags) and "A" in str(t_out.flags) and t_out.ack == (t_in.seq + 1) % 2**32
    assert checksums_valid(out)
    now = current_epoch(ROTATION_S, UNIT_CLOCK_OFFSET_S)
    t = FourTuple(ipaddress.ip_address(l3_in.src), ipaddress.ip_address(l3_in.dst), t_in.sport, t_in.dport)
    tsval = dict(t_out.options).get("Timestamp", (None,))[0]
    assert cookie_check(salts, now, t, t_in.seq, t_out.seq, tsval), "a cookie the reference rejects"


def check_too_big(frame: bytes, out: bytes) -> None:
    """An ICMP(v6) "too big" error to the segment's sender, quoting its IP header and 8 TCP bytes."""
    seg, err = Ether(frame), Ether(out)
    assert checksums_valid(out) and (err.src, err.dst) == (seg.dst, seg.src)
    if err.type == 0x0800:
        assert IP in seg and err[IP].dst == seg[IP].src and (err[ICMP].type, err[ICMP].code) == (3, 4)
        assert bytes(err[ICMP].payload) == frame[14:14 + 28]
    else:
        assert err[IPv6].dst == seg[IPv6].src and err[IPv6].nh == 58
        assert bytes(err[ICMPv6PacketTooBig].payload) == frame[14:14 + 48]


def check_encapsulated(frame: bytes, out: bytes, counted: dict) -> None:
    e = decode_encap(out)
    assert e["udp"].dport == ENCAP_PORT and e["version"] == 1
    assert str(e["outer"].src) in (PROXY_V4, PROXY_V6) and str(e["outer"].dst) in (BACKEND_V4, BACKEND_V6)
    assert e["inner"] == frame[14:], "the inner packet changed on the way"
    assert bool(e["flags"] & ENCAP_F_VALIDATED) == (Counter.COOKIE_VALID in counted)
    assert bool(e["flags"] & ENCAP_F_UNGUARDED) == (Counter.FAIL_OPEN in counted)


def outer_source_and_inner(frame: bytes) -> tuple[str, bytes]:
    """An encapsulated frame's outer source and inner packet, by the documented
    layout (no dissector: a mutated frame need not parse); the outer IP length
    must cover the headers and at most the frame."""
    if frame[12:14] == b"\x08\x00":
        l3 = (frame[14] & 0x0F) * 4
        headers = 12 + (4 if frame[14 + l3 + 8] == 2 else 0)      # version 2 names a previous backend
        claimed = int.from_bytes(frame[16:18], "big")
        assert l3 + headers < claimed <= len(frame) - 14, "decapsulated despite its outer IPv4 length"
        return str(ipaddress.ip_address(frame[26:30])), frame[14 + l3 + headers:]
    headers = 12 + (16 if frame[14 + 40 + 8] == 2 else 0)
    claimed = int.from_bytes(frame[18:20], "big")
    assert headers < claimed <= len(frame) - 54, "decapsulated despite its outer IPv6 payload length"
    return str(ipaddress.ip_address(frame[22:38])), frame[14 + 40 + headers:]


@pytest.fixture(scope="module")
def pool(salts) -> list[bytes]:
    return seeds(salts)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None if not RANDOM else
                settings.default.database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzz_proxy_tc_keeps_every_documented_promise(proxy, salts, pool, data):
    frame, result, counted = fuzz_run(proxy, proxy.program, data.draw(mutated(pool)))
    assert result.retval in (TCX_NEXT, TC_ACT_SHOT, TC_ACT_REDIRECT), "never ends the hook's chain"
    if result.retval == TCX_NEXT:
        assert result.data == frame and set(counted) <= {Counter.NO_POLICY}
    elif result.retval == TC_ACT_SHOT:
        assert len(set(counted) & PROXY_DROPS) == 1, counted
    elif Counter.SYN_ANSWERED in counted:
        assert counted == {Counter.SYN_ANSWERED: 1}
        check_synack(frame, result.data, salts)
    elif Counter.TOO_BIG in counted:
        assert set(counted) <= {Counter.TOO_BIG, Counter.FAIL_OPEN, Counter.SALT_MISSING} | PROXY_ACK_VERDICTS
        check_too_big(frame, result.data)
    else:
        assert counted.get(Counter.FORWARDED) == 1, counted
        assert set(counted) <= {Counter.FORWARDED, Counter.FAIL_OPEN, Counter.SALT_MISSING} | PROXY_ACK_VERDICTS
        check_encapsulated(frame, result.data, counted)


@FUZZ
@given(data=st.data())
def test_fuzz_proxy_xdp_front_answers_like_tc_or_passes_untouched(proxy, pool, data):
    frame, result, counted = fuzz_run(proxy, proxy.xdp_program, data.draw(mutated(pool)))
    assert result.retval in (XDP_PASS, XDP_TX)
    if result.retval == XDP_PASS:
        assert result.data == frame and counted == {}
        return
    assert counted == {Counter.SYN_ANSWERED: 1}
    tc = proxy.program.test_run(frame)
    assert tc.retval == TC_ACT_REDIRECT and result.data == tc.data


@FUZZ
@given(data=st.data())
def test_fuzz_backend_decapsulates_only_what_an_allowed_proxy_sent(backend, pool, data):
    frame, result, counted = fuzz_run(backend, backend.program, data.draw(mutated(pool)))
    assert result.retval in (TC_ACT_OK, TCX_NEXT, TC_ACT_SHOT, TC_ACT_REDIRECT), "no socket here: nothing to reset"
    if result.retval == TC_ACT_REDIRECT:
        # Handed on to the previous backend its proxy named: same inner packet, one hop.
        assert counted == {Counter.CHAINED: 1}, counted
        source, inner = outer_source_and_inner(frame)
        assert source in (PROXY_V4, PROXY_V6), "handed on for a stranger"
        sent_source, sent_inner = outer_source_and_inner(result.data)
        assert sent_source in (BACKEND_V4, BACKEND_V6) and sent_inner == inner
        return
    if result.retval == TC_ACT_SHOT:
        assert len(set(counted) & BACKEND_DROPS) >= 1, counted
    if Counter.DECAPSULATED in counted:
        source, inner = outer_source_and_inner(frame)
        senders = (PEER_V4, PEER_V6) if Counter.CHAIN_RECEIVED in counted else (PROXY_V4, PROXY_V6)
        assert source in senders, "decapsulated from a stranger"
        assert result.retval != TCX_NEXT, "the next program would see a packet that is gone"
        if result.retval == TC_ACT_OK:
            assert result.data[14:] == inner
    else:
        assert result.retval != TC_ACT_OK, "an untouched packet ends the chain: other programs skipped"
        if result.retval == TCX_NEXT:
            assert result.data == frame
