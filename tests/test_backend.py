"""Backend program through BPF_PROG_TEST_RUN: decapsulation, allowed sources,
bypass handling in enforce and monitor mode. (The kfunc path needs a live
listener: tests/test_e2e_handshake.py covers it.)"""

from __future__ import annotations

import pytest
from scapy.layers.inet import UDP
from scapy.layers.l2 import Ether

from conftest import (
    BACKEND_V4,
    BACKEND_V6,
    POLICY_FULL,
    POLICY_MONITOR,
    PORT_FULL,
    PORT_MONITOR,
    PROXY_V4,
    PROXY_V6,
    addr_pair,
)
from packets import TC_ACT_OK, TC_ACT_SHOT, TCX_NEXT, delta, encapsulated, tcp_frame
from synfleet.abi import ENCAP_F_VALIDATED, Counter


@pytest.mark.parametrize("outer", [(PROXY_V4, BACKEND_V4), (PROXY_V6, BACKEND_V6)], ids=["outer4", "outer6"])
@pytest.mark.parametrize("family", [4, 6])
def test_encapsulated_packet_from_an_allowed_proxy_is_decapsulated(backend, outer, family):
    client, service = addr_pair(family)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="PA", seq=5, ack=6, payload=b"hello")
    run, counted = delta(backend, encapsulated(inner, *outer, POLICY_FULL.id))
    assert run.retval == TC_ACT_OK
    assert counted == {Counter.DECAPSULATED: 1}
    assert run.data[14:] == inner[14:]
    assert Ether(run.data).type == (0x0800 if family == 4 else 0x86DD)


@pytest.mark.parametrize("port,verdict,extra", [
    (PORT_FULL, TC_ACT_SHOT, {}), (PORT_MONITOR, TCX_NEXT, {Counter.MONITOR_PASSED: 1})],
    ids=["enforce", "monitor"])
@pytest.mark.parametrize("claimed", [POLICY_FULL, POLICY_MONITOR], ids=["claims-enforce", "claims-monitor"])
def test_encapsulated_packet_from_an_unknown_source_is_judged_by_the_policy_of_its_inner_destination(
        backend, port, verdict, extra, claimed):
    """Not by the policy id in its header, which its sender chose."""
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, port, flags="A", seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, "198.18.9.9", BACKEND_V4, claimed.id,
                                               ENCAP_F_VALIDATED))
    assert run.retval == verdict
    assert counted == {Counter.UNKNOWN_SOURCE: 1, **extra}


# An independent fuzzer's find: from an unknown source, a one-byte inner packet was
# counted bad_encap and dropped even in monitor mode (two bytes: unknown_source, passed).
FUZZ_ONE_BYTE_INNER = bytes.fromhex(
    "020000000001020000000002080045000021000140004011a59bc6120909c6120002c35017c0000d00000100000345")


def test_an_unknown_sources_packet_too_short_to_name_a_destination_is_counted_and_left_alone(backend):
    outer = Ether(FUZZ_ONE_BYTE_INNER)
    assert len(outer[UDP].payload) == 5, "four header bytes and one inner byte"
    run, counted = delta(backend, FUZZ_ONE_BYTE_INNER)
    assert (run.retval, counted) == (TCX_NEXT, {Counter.UNKNOWN_SOURCE: 1})


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("claim", [+1, +200], ids=["one-byte-more", "far-more"])
def test_a_validated_inner_segment_claiming_more_bytes_than_it_has_is_dropped_as_malformed(backend, family, claim):
    """The proxy vouches for the cookie, not for the lengths: the kfunc never
    sees a segment whose IP length exceeds what arrived."""
    client, service = addr_pair(family)
    inner = bytearray(tcp_frame(client, service, 1000, PORT_FULL, flags="A", seq=5, ack=6))
    if family == 4:
        inner[16:18] = (len(inner) - 14 + claim).to_bytes(2, "big")
    else:
        inner[18:20] = (len(inner) - 54 + claim).to_bytes(2, "big")
    run, counted = delta(backend, encapsulated(bytes(inner), PROXY_V4, BACKEND_V4, POLICY_FULL.id,
                                               ENCAP_F_VALIDATED))
    assert (run.retval, counted) == (TC_ACT_SHOT, {Counter.DECAPSULATED: 1, Counter.MALFORMED: 1})


@pytest.mark.parametrize("bad", [dict(version=2), dict(policy_id=999)], ids=["version", "unknown-policy"])
def test_bad_encapsulation_header_is_dropped(backend, bad):
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="A")
    args = dict(policy_id=POLICY_FULL.id) | bad
    run, counted = delta(backend, encapsulated(inner, PROXY_V4, BACKEND_V4, **args))
    assert (run.retval, counted) == (TC_ACT_SHOT, {Counter.BAD_ENCAP: 1})


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port,verdict,extra", [
    (PORT_FULL, TC_ACT_SHOT, {}), (PORT_MONITOR, TCX_NEXT, {Counter.MONITOR_PASSED: 1})],
    ids=["enforce", "monitor"])
def test_syn_that_bypassed_the_proxies_is_counted_and_dropped_when_enforcing(backend, family, port,
                                                                             verdict, extra):
    client, service = addr_pair(family)
    run, counted = delta(backend, tcp_frame(client, service, 1000, port, flags="S"))
    assert run.retval == verdict
    assert counted == {Counter.BYPASS_SYN: 1, **extra}


def test_traffic_to_unprotected_ports_passes_untouched(backend):
    client, service = addr_pair(4)
    frame = tcp_frame(client, service, 1000, 443, flags="S")
    run, counted = delta(backend, frame)
    assert (run.retval, run.data, counted) == (TCX_NEXT, frame, {})


@pytest.mark.parametrize("outer", [(PROXY_V4, BACKEND_V4), (PROXY_V6, BACKEND_V6)], ids=["outer4", "outer6"])
@pytest.mark.parametrize("claimed", [0, 8, +1], ids=["zero", "headers-only", "one-byte-more"])
def test_an_encapsulation_whose_outer_length_does_not_hold_is_not_decapsulated(backend, outer, claimed):
    """Found by tests/test_fuzz.py: an outer IPv6 payload length of 0 was decapsulated."""
    client, service = addr_pair(4)
    frame = bytearray(encapsulated(tcp_frame(client, service, 1000, PORT_FULL, flags="A"), *outer, POLICY_FULL.id))
    field, header = (16, 0) if ":" not in outer[0] else (18, 40)
    length = len(frame) - 14 - header + 1 if claimed == +1 else claimed
    frame[field:field + 2] = length.to_bytes(2, "big")
    run, counted = delta(backend, bytes(frame))
    assert (run.retval, run.data, counted) == (TCX_NEXT, bytes(frame), {})
