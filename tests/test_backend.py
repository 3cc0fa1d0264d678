"""Backend program through BPF_PROG_TEST_RUN: decapsulation, allowed sources,
bypass handling in enforce and monitor mode. (The kfunc path needs a live
listener: tests/test_e2e_handshake.py covers it.)"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from conftest import (
    BACKEND_V4,
    BACKEND_V6,
    PEER_V4,
    PEER_V6,
    POLICY_FULL,
    POLICY_MONITOR,
    PORT_FULL,
    PORT_MONITOR,
    PROXY_V4,
    PROXY_V6,
    addr_pair,
)
from packets import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TCX_NEXT, decode_encap, delta, encapsulated, tcp_frame
from synfleet.abi import ENCAP_F_CHAINED, ENCAP_F_UNGUARDED, ENCAP_F_VALIDATED, Counter


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


@pytest.mark.parametrize("bad", [dict(version=3), dict(policy_id=999)], ids=["version", "unknown-policy"])
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


# ---- daisy chaining (docs/dataplane.md) ----

OUTERS = [(PROXY_V4, BACKEND_V4, PEER_V4), (PROXY_V6, BACKEND_V6, PEER_V6)]


@pytest.mark.parametrize("outer", OUTERS, ids=["outer4", "outer6"])
@pytest.mark.parametrize("family", [4, 6])
def test_a_segment_of_a_flow_this_node_has_no_socket_for_goes_on_to_the_previous_backend_named(
        backend, outer, family):
    proxy, own, previous = outer
    client, service = addr_pair(family)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="PA", seq=5, ack=6, payload=b"hello")
    frame = encapsulated(inner, proxy, own, POLICY_FULL.id, previous=previous)
    run, counted = delta(backend, frame)
    assert (run.retval, counted) == (TC_ACT_REDIRECT, {Counter.CHAINED: 1})
    sent, received = decode_encap(run.data), decode_encap(frame)
    # The same segment and header, readdressed from this node to the previous backend, marked chained.
    assert (str(sent["outer"].src), str(sent["outer"].dst)) == (own, previous)
    assert sent["inner"] == received["inner"] == inner[14:]
    assert (sent["version"], sent["flags"], sent["policy_id"], sent["previous"]) == \
        (2, ENCAP_F_CHAINED, POLICY_FULL.id, previous)
    assert sent["udp"].dport == received["udp"].dport and sent["udp"].sport == received["udp"].sport
    hops = "ttl" if ":" not in own else "hlim"
    assert getattr(sent["outer"], hops) == getattr(received["outer"], hops) - 1
    if ":" not in own:
        header = IP(bytes(sent["outer"]))
        written = header.chksum
        del header.chksum
        assert IP(bytes(header)).chksum == written


@pytest.mark.parametrize("flags, inner_flags", [
    (ENCAP_F_VALIDATED, "A"), (ENCAP_F_UNGUARDED, "S"), (0, "S")], ids=["validated-ack", "unguarded-syn", "syn"])
def test_handshakes_are_never_handed_on(backend, flags, inner_flags):
    """A validated ACK without data, or a SYN, starts a flow here, whatever its slot was before."""
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags=inner_flags, seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, PROXY_V4, BACKEND_V4, POLICY_FULL.id, flags,
                                               previous=PEER_V4))
    assert Counter.CHAINED not in counted and Counter.DECAPSULATED in counted
    assert run.data[14:] == inner[14:] or run.retval == TC_ACT_SHOT


@pytest.mark.parametrize("flags", ["PA", "FA"], ids=["data", "fin"])
def test_a_validated_segment_with_data_goes_where_its_handshake_may_have_gone(backend, flags):
    """Right after a change, the handshake's ACK may have reached the previous
    backend by the old table, and the client's next segment still validates."""
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags=flags, seq=5, ack=6, payload=b"GET /")
    run, counted = delta(backend, encapsulated(inner, PROXY_V4, BACKEND_V4, POLICY_FULL.id, ENCAP_F_VALIDATED,
                                               previous=PEER_V4))
    assert (run.retval, counted) == (TC_ACT_REDIRECT, {Counter.CHAINED: 1})
    assert decode_encap(run.data)["flags"] == ENCAP_F_VALIDATED | ENCAP_F_CHAINED


@pytest.mark.parametrize("outer", OUTERS, ids=["outer4", "outer6"])
def test_a_chained_segment_never_travels_a_second_hop(backend, outer):
    """At the previous backend, whatever it has for the flow: decapsulated for
    its own stack (here no socket at all: the kernel answers it; a listener
    only: tests/test_backend_changes.py), never handed on again."""
    _, own, peer = outer
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="A", seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, peer, own, POLICY_FULL.id, ENCAP_F_CHAINED,
                                               previous="198.18.0.77" if ":" not in own else "2001:db8:18::77"))
    assert run.retval == TC_ACT_OK and run.data[14:] == inner[14:]
    assert counted == {Counter.CHAIN_RECEIVED: 1, Counter.DECAPSULATED: 1}


def test_a_chained_segment_from_a_proxy_is_refused_and_counted(backend):
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="A", seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, PROXY_V4, BACKEND_V4, POLICY_FULL.id, ENCAP_F_CHAINED,
                                               previous=PEER_V4))
    assert (run.retval, counted) == (TC_ACT_SHOT, {Counter.CHAIN_REFUSED: 1})


@pytest.mark.parametrize("port,verdict,extra", [
    (PORT_FULL, TC_ACT_SHOT, {}), (PORT_MONITOR, TCX_NEXT, {Counter.MONITOR_PASSED: 1})],
    ids=["enforce", "monitor"])
def test_a_chained_segment_from_a_node_that_is_not_a_backend_of_the_pool_is_never_decapsulated(
        backend, port, verdict, extra):
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, port, flags="A", seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, "198.18.0.99", BACKEND_V4, POLICY_FULL.id,
                                               ENCAP_F_CHAINED, previous=BACKEND_V4))
    assert run.retval == verdict
    assert counted == {Counter.UNKNOWN_SOURCE: 1, **extra}


def test_a_peer_backend_cannot_send_what_only_proxies_send(backend):
    """A backend of the pool vouches for nothing: its unchained segments are an unknown source's."""
    client, service = addr_pair(4)
    inner = tcp_frame(client, service, 1000, PORT_FULL, flags="A", seq=5, ack=6)
    run, counted = delta(backend, encapsulated(inner, PEER_V4, BACKEND_V4, POLICY_FULL.id, ENCAP_F_VALIDATED))
    assert (run.retval, counted) == (TC_ACT_SHOT, {Counter.UNKNOWN_SOURCE: 1})
