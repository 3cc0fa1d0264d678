"""Proxy handshake-ACK validation and encapsulation, through BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from conftest import (
    BACKEND_V4,
    BACKEND_V6,
    ENCAP_PORT,
    PEER_V4,
    POLICY_FULL,
    PORT_FULL,
    PROXY_V4,
    PROXY_V6,
    UNIT_BACKEND_SET,
    UNIT_KEYS,
    addr_pair,
    tai_epoch,
    unit_config,
)
from packets import (
    CLIENT_MAC,
    PROXY_MAC,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TCX_NEXT,
    checksums_valid,
    decode_encap,
    delta,
    encap_source_port,
    ring_slot,
    tcp_frame,
)
from synfleet.abi import ENCAP_F_VALIDATED, Counter
from synfleet.config import schema
from synfleet.cookie import CookieAttributes, FourTuple, cookie_make, synack_tsval
from synfleet.dataplane.flow import maglev_table
from synfleet.dataplane.programs import ProxyDataplane

ATTRS = CookieAttributes(mss_index=3, wscale=7, sack=True, ecn=False)


def handshake_ack(family, sport, isn, cookie, payload=b""):
    client, service = addr_pair(family)
    return tcp_frame(client, service, sport, PORT_FULL, flags="A", seq=isn + 1,
                     ack=(cookie + 1) % 2**32, payload=payload)


def timestamped_ack(family, sport, isn, cookie, tsecr, layout=("NOP", "NOP", "Timestamp")):
    """The handshake ACK of a client that agreed to timestamps; `layout` orders its options."""
    options = {"NOP": ("NOP", None), "Timestamp": ("Timestamp", (4242, tsecr)),
               "SAck": ("SAck", (1000, 2000)), "EOL": ("EOL", None)}
    client, service = addr_pair(family)
    return tcp_frame(client, service, sport, PORT_FULL, flags="A", seq=isn + 1, ack=(cookie + 1) % 2**32,
                     options=[options[kind] for kind in layout])


def timestamped_cookie(salts, family, sport, isn) -> tuple[int, int]:
    """The cookie and TSval of the proxy's SYN+ACK with timestamps."""
    client, service = addr_pair(family)
    epoch = tai_epoch()
    t = FourTuple(client, service, sport, PORT_FULL)
    cookie = cookie_make(salts[epoch], epoch, t, isn, ATTRS, timestamps=True)
    return cookie, synack_tsval(salts[epoch], epoch, t, isn, cookie)


def validated(proxy, frame) -> bool:
    run = proxy.program.test_run(frame)
    assert run.retval == TC_ACT_REDIRECT
    return decode_encap(run.data)["flags"] == ENCAP_F_VALIDATED


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), sport=st.integers(1, 65535),
       isn=st.integers(0, 2**32 - 2), bit=st.integers(0, 31))
def test_fresh_cookie_validates_and_any_flipped_bit_is_rejected(proxy, salts, family, sport, isn, bit):
    client, service = addr_pair(family)
    epoch = tai_epoch()
    cookie = cookie_make(salts[epoch], epoch, FourTuple(client, service, sport, PORT_FULL), isn, ATTRS)

    assert validated(proxy, handshake_ack(family, sport, isn, cookie))
    assert not validated(proxy, handshake_ack(family, sport, isn, cookie ^ (1 << bit)))


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), sport=st.integers(1, 65535),
       isn=st.integers(0, 2**32 - 2), bit=st.integers(0, 31))
def test_a_timestamped_handshake_needs_its_keyed_tsecr_and_a_flipped_tsecr_bit_is_rejected(
        proxy, salts, family, sport, isn, bit):
    cookie, tsval = timestamped_cookie(salts, family, sport, isn)
    before = proxy.counter_values()[Counter.COOKIE_REJECTED]

    assert validated(proxy, timestamped_ack(family, sport, isn, cookie, tsval))
    assert not validated(proxy, timestamped_ack(family, sport, isn, cookie, tsval ^ (1 << bit)))
    assert proxy.counter_values()[Counter.COOKIE_REJECTED] == before + 1


@pytest.mark.parametrize("family", [4, 6])
def test_stripping_the_timestamps_from_a_timestamped_handshake_fails_validation(proxy, salts, family):
    """Presence is hashed too: without it a forger would drop the option and face 22 bits again."""
    cookie, tsval = timestamped_cookie(salts, family, 40010, 1234)
    assert validated(proxy, timestamped_ack(family, 40010, 1234, cookie, tsval))
    assert not validated(proxy, handshake_ack(family, 40010, 1234, cookie))

    client, service = addr_pair(family)
    epoch = tai_epoch()
    plain = cookie_make(salts[epoch], epoch, FourTuple(client, service, 40011, PORT_FULL), 99, ATTRS)
    assert validated(proxy, handshake_ack(family, 40011, 99, plain))
    assert not validated(proxy, timestamped_ack(family, 40011, 99, plain, tsval))


@pytest.mark.parametrize("layout", [("Timestamp", "EOL"), ("SAck", "NOP", "NOP", "Timestamp"),
                                    ("NOP", "Timestamp", "NOP")], ids=["alone", "after-sack", "misaligned"])
def test_timestamps_are_found_wherever_the_client_puts_them(proxy, salts, layout):
    cookie, tsval = timestamped_cookie(salts, 4, 40012, 555)
    assert validated(proxy, timestamped_ack(4, 40012, 555, cookie, tsval, layout))
    assert not validated(proxy, timestamped_ack(4, 40012, 555, cookie, tsval + 1, layout))


def test_an_ack_whose_options_cannot_be_read_is_not_validated(proxy, salts):
    cookie, tsval = timestamped_cookie(salts, 4, 40013, 556)
    frame = bytearray(timestamped_ack(4, 40013, 556, cookie, tsval, ("SAck", "NOP", "NOP", "Timestamp")))
    frame[14 + 20 + 20 + 1] = 0       # the SACK option's length: zero never ends
    before = proxy.counter_values()[Counter.COOKIE_REJECTED]
    assert not validated(proxy, bytes(frame))
    assert proxy.counter_values()[Counter.COOKIE_REJECTED] == before + 1


@pytest.mark.parametrize("family", [4, 6])
def test_previous_and_next_epoch_cookies_validate(proxy, salts, family):
    client, service = addr_pair(family)
    t = FourTuple(client, service, 40000, PORT_FULL)
    for epoch in (tai_epoch() - 1, tai_epoch() + 1):
        assert validated(proxy, handshake_ack(family, 40000, 77, cookie_make(salts[epoch], epoch, t, 77, ATTRS)))


@pytest.mark.parametrize("family", [4, 6])
def test_cookie_from_another_salt_is_rejected_and_counted(proxy, family):
    client, service = addr_pair(family)
    epoch = tai_epoch()
    cookie = cookie_make(secrets.token_bytes(16), epoch, FourTuple(client, service, 40001, PORT_FULL), 5, ATTRS)
    before = proxy.counter_values()[Counter.COOKIE_REJECTED]
    assert not validated(proxy, handshake_ack(family, 40001, 5, cookie))
    assert proxy.counter_values()[Counter.COOKIE_REJECTED] == before + 1


@pytest.mark.parametrize("family", [4, 6])
def test_cookie_for_another_four_tuple_is_rejected(proxy, salts, family):
    client, service = addr_pair(family)
    epoch = tai_epoch()
    cookie = cookie_make(salts[epoch], epoch, FourTuple(client, service, 40002, PORT_FULL), 9, ATTRS)
    assert not validated(proxy, handshake_ack(family, 40003, 9, cookie))   # other source port
    assert not validated(proxy, handshake_ack(family, 40002, 10, cookie))  # other client ISN


@pytest.mark.parametrize("family", [4, 6])
def test_cookie_older_than_two_epochs_is_rejected_as_stale(proxy, salts, family):
    client, service = addr_pair(family)
    now = tai_epoch()
    old_salt = secrets.token_bytes(16)
    proxy.set_salts({now - 2: old_salt, now - 1: salts[now - 1], now: salts[now], now + 1: salts[now + 1]})
    try:
        cookie = cookie_make(old_salt, now - 2, FourTuple(client, service, 40004, PORT_FULL), 3, ATTRS)
        before = proxy.counter_values()[Counter.COOKIE_STALE]
        assert not validated(proxy, handshake_ack(family, 40004, 3, cookie))
        assert proxy.counter_values()[Counter.COOKIE_STALE] == before + 1
    finally:
        proxy.set_salts(salts)


@settings(max_examples=200, deadline=None)
@given(family=st.sampled_from([4, 6]), sport=st.integers(1, 65535), isn=st.integers(0, 2**32 - 2))
def test_flow_hash_is_murmur3_of_the_four_tuple(proxy, salts, family, sport, isn):
    """The encapsulation's source port and the backend the proxy picks both come
    from MurmurHash3 x86_32 of the tuple (the mmh3 library as the reference)."""
    client, service = addr_pair(family)
    epoch = tai_epoch()
    t = FourTuple(client, service, sport, PORT_FULL)
    e = decode_encap(proxy.program.test_run(handshake_ack(family, sport, isn, cookie_make(
        salts[epoch], epoch, t, isn, ATTRS))).data)
    assert e["udp"].sport == encap_source_port(t)
    assert str(e["outer"].dst) == [BACKEND_V4, BACKEND_V6][maglev_table([BACKEND_V4, BACKEND_V6])[ring_slot(t)]]


@pytest.mark.parametrize("family", [4, 6])
def test_encapsulation_bytes_are_exactly_as_documented(proxy, salts, family):
    client, service = addr_pair(family)
    sport, isn, epoch = 45678, 123456, tai_epoch()
    t = FourTuple(client, service, sport, PORT_FULL)
    frame = handshake_ack(family, sport, isn, cookie_make(salts[epoch], epoch, t, isn, ATTRS),
                          payload=b"GET / HTTP/1.1\r\n")

    run = proxy.program.test_run(frame)

    assert run.retval == TC_ACT_REDIRECT
    e = decode_encap(run.data)
    backend = [BACKEND_V4, BACKEND_V6][maglev_table([BACKEND_V4, BACKEND_V6])[ring_slot(t)]]
    outer_family = ipaddress.ip_address(backend).version
    assert e["outer"].version == outer_family
    assert e["outer"].dst == backend
    assert e["outer"].src == (PROXY_V4 if outer_family == 4 else PROXY_V6)
    if outer_family == 4:
        assert e["outer"].flags == "DF" and e["outer"].ttl == 64 and e["outer"].proto == socket.IPPROTO_UDP
    else:
        assert e["outer"].hlim == 64 and e["outer"].nh == socket.IPPROTO_UDP
    assert (e["udp"].sport, e["udp"].dport) == (encap_source_port(t), ENCAP_PORT)
    assert e["udp"].len == 8 + 4 + len(frame) - 14
    assert e["udp"].chksum == 0
    assert (e["version"], e["flags"], e["policy_id"]) == (1, ENCAP_F_VALIDATED, POLICY_FULL.id)
    assert e["inner"] == frame[14:]
    assert checksums_valid(run.data)


@pytest.mark.parametrize("family", [4, 6])
def test_established_traffic_is_encapsulated_without_the_flag(proxy, family):
    client, service = addr_pair(family)
    for flags in ("PA", "FA", "R", "RA"):
        run = proxy.program.test_run(tcp_frame(client, service, 50000, PORT_FULL, flags=flags,
                                               seq=99, ack=12345, payload=b"data"))
        assert run.retval == TC_ACT_REDIRECT
        assert decode_encap(run.data)["flags"] == 0


def test_one_flow_always_picks_the_same_backend_and_flows_spread(proxy):
    client, service = addr_pair(4)
    seen = {}
    for sport in range(20000, 20200):
        outs = {decode_encap(proxy.program.test_run(tcp_frame(client, service, sport, PORT_FULL,
                                                              flags="A", seq=1, ack=2)).data)["outer"].dst
                for _ in range(2)}
        assert len(outs) == 1
        seen[sport] = outs.pop()
    counts = {b: list(seen.values()).count(b) for b in (BACKEND_V4, BACKEND_V6)}
    assert min(counts.values()) > 60, counts


def test_traffic_to_unprotected_ports_and_other_protocols_is_untouched(proxy):
    client, service = addr_pair(4)
    frame = tcp_frame(client, service, 1234, 443, flags="S")
    run = proxy.program.test_run(frame)
    assert (run.retval, run.data) == (TCX_NEXT, frame)
    arp = bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28)
    assert proxy.program.test_run(arp).retval == TCX_NEXT


ENCAP_OVERHEAD = {4: 20 + 8 + 4, 6: 40 + 8 + 4}
LINK_MTU = 1500     # the unit namespace's veth


@pytest.mark.parametrize("family", [4, 6])
def test_a_segment_too_big_once_encapsulated_is_answered_with_the_mtu_that_fits(proxy, family):
    """An independent fuzzer's find: such segments were dropped (route_failed)
    with nothing sent back, a path-MTU black hole for clients that exceed the
    advertised MSS."""
    client, service = addr_pair(family)
    header = 20 if family == 4 else 40
    frame = tcp_frame(client, service, 45000, PORT_FULL, flags="PA", seq=7, ack=9,
                      payload=b"x" * (LINK_MTU - header - 20 - 4), **({"ip_flags": "DF"} if family == 4 else {}))
    t = FourTuple(client, service, 45000, PORT_FULL)
    backend = [BACKEND_V4, BACKEND_V6][maglev_table([BACKEND_V4, BACKEND_V6])[ring_slot(t)]]
    fits = LINK_MTU - ENCAP_OVERHEAD[ipaddress.ip_address(backend).version]

    run, counted = delta(proxy, frame)

    assert run.retval == TC_ACT_REDIRECT
    assert counted.get(Counter.TOO_BIG) == 1 and Counter.FORWARDED not in counted
    out = Ether(run.data)
    assert (out.src, out.dst) == (PROXY_MAC, CLIENT_MAC) and checksums_valid(run.data)
    if family == 4:
        assert (out[IP].src, out[IP].dst) == (PROXY_V4, str(client))
        assert (out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (3, 4, fits)
        assert bytes(out[ICMP].payload) == frame[14:14 + 28]
    else:
        assert (out[IPv6].src, out[IPv6].dst) == (PROXY_V6, str(client))
        assert (out[ICMPv6PacketTooBig].mtu) == max(1280, fits)
        assert bytes(out[ICMPv6PacketTooBig].payload) == frame[14:14 + 48]


def test_a_segment_too_big_without_dont_fragment_is_dropped(proxy):
    client, service = addr_pair(4)
    frame = tcp_frame(client, service, 45000, PORT_FULL, flags="PA", seq=7, ack=9,
                      payload=b"x" * (LINK_MTU - 44))     # scapy leaves DF clear
    run, counted = delta(proxy, frame)
    assert run.retval == TC_ACT_SHOT and counted.get(Counter.ROUTE_FAILED) == 1


# ---- daisy chaining: the previous backend of a flow's slot (docs/dataplane.md) ----

def with_backends(backends: list[str], drain_s: int = 300):
    """The unit proxy's configuration, its one backend set changed."""
    cfg = unit_config("proxy", UNIT_KEYS)
    addresses = [ipaddress.ip_address(b) for b in backends]
    return cfg.model_copy(update={"backend_sets": [s.model_copy(update={"backends": addresses, "drain_seconds": drain_s})
                                                   for s in cfg.backend_sets]})


@pytest.fixture
def changing_proxy(unit_netns, salts):
    """A proxy of its own: these tests change its backend set."""
    dp = ProxyDataplane()
    dp.set_salts(salts)
    yield dp
    dp.close()


def test_after_a_backend_change_a_flow_names_its_previous_backend_until_the_drain_ends(changing_proxy, salts):
    dp = changing_proxy
    dp.apply(with_backends([BACKEND_V4], drain_s=1))
    dp.apply(with_backends([PEER_V4], drain_s=1))     # every slot changes hands
    client, service = addr_pair(4)
    established = tcp_frame(client, service, 40000, PORT_FULL, flags="PA", seq=5, ack=6, payload=b"more")
    run, counted = delta(dp, established)
    sent = decode_encap(run.data)
    assert run.retval == TC_ACT_REDIRECT
    assert (str(sent["outer"].dst), sent["version"], sent["previous"]) == (PEER_V4, 2, BACKEND_V4)
    assert sent["inner"] == established[14:] and sent["outer"].len == len(established) - 14 + 20 + 8 + 4 + 4
    assert counted[Counter.PREVIOUS_NAMED] == 1 and counted[Counter.FORWARDED] == 1
    # A validated ACK names it too: the backend tells a handshake from a flow's later segments.
    epoch = tai_epoch()
    cookie = cookie_make(salts[epoch], epoch, FourTuple(client, service, 40001, PORT_FULL), 99, ATTRS)
    handshake = decode_encap(dp.program.test_run(handshake_ack(4, 40001, 99, cookie)).data)
    assert (handshake["version"], handshake["flags"], handshake["previous"]) == (2, ENCAP_F_VALIDATED, BACKEND_V4)
    syn = dp.program.test_run(tcp_frame(client, service, 40002, PORT_FULL, flags="S", seq=1))
    assert syn.retval == TC_ACT_REDIRECT and Ether(syn.data)[TCP].flags == "SA"   # answered, never forwarded
    # The drain period ends: applied again (the agent does it at next_expiry()), the slot names no one.
    ends = dp.next_expiry()
    assert ends is not None
    time.sleep(max(0.0, ends - time.monotonic()) + 0.01)
    dp.apply(with_backends([PEER_V4], drain_s=1))
    assert dp.next_expiry() is None
    after = decode_encap(dp.program.test_run(established).data)
    assert (after["version"], after["previous"]) == (1, None)


def test_a_backend_that_keeps_its_slots_names_no_previous_one(changing_proxy):
    """Joining moves only the newcomer's share of the slots (Maglev): the flows
    elsewhere carry no previous backend and cost nothing more."""
    dp = changing_proxy
    dp.apply(with_backends([BACKEND_V4]))
    dp.apply(with_backends([BACKEND_V4, PEER_V4]))
    client, service = addr_pair(4)
    named = 0
    for sport in range(40000, 40200):
        sent = decode_encap(dp.program.test_run(
            tcp_frame(client, service, sport, PORT_FULL, flags="A", seq=5, ack=6)).data)
        moved = str(sent["outer"].dst) == PEER_V4
        assert sent["previous"] == (BACKEND_V4 if moved else None)
        named += moved
    assert 60 < named < 140    # about half the slots went to the newcomer


def test_a_restarted_agent_keeps_naming_the_previous_backends_its_pinned_table_holds(unit_netns, salts):
    """The drain periods were in the previous agent's memory: they start again,
    the previous backends stay named."""
    pins = f"/sys/fs/bpf/synfleet-test-{secrets.token_hex(3)}"
    os.mkdir(pins)
    try:
        with ProxyDataplane() as before:
            before.apply(with_backends([BACKEND_V4]))
            before.apply(with_backends([PEER_V4]))
            before.pin_maps(pins)
        with ProxyDataplane(pins) as after:
            assert {"maglev_slots", "policies"} <= set(after.reused)
            after.set_salts(salts)
            after.apply(with_backends([PEER_V4]))
            assert after.previous_backends() == {UNIT_BACKEND_SET: {ipaddress.ip_address(BACKEND_V4)}}
            client, service = addr_pair(4)
            sent = decode_encap(after.program.test_run(
                tcp_frame(client, service, 40000, PORT_FULL, flags="A", seq=5, ack=6)).data)
            assert (str(sent["outer"].dst), sent["previous"]) == (PEER_V4, BACKEND_V4)
    finally:
        shutil.rmtree(pins)


def test_after_a_restart_a_backend_set_the_previous_agent_did_not_serve_names_no_previous_backend(unit_netns, salts):
    """The pinned tables hold only the sets the previous agent served: a set
    new to this agent (here the one policy 3 moves to) starts afresh, and
    the set that stayed keeps naming its previous backend."""
    pins = f"/sys/fs/bpf/synfleet-test-{secrets.token_hex(3)}"
    os.mkdir(pins)
    moved = with_backends([PEER_V4])
    try:
        with ProxyDataplane() as before:
            before.apply(with_backends([BACKEND_V4]))
            before.apply(moved)
            before.apply(moved.model_copy(update={"policies": moved.policies[:2]}))   # policy 3 goes
            before.pin_maps(pins)
        other = schema.BackendSetEntry(name="other", backends=[ipaddress.ip_address(PEER_V4)])
        with ProxyDataplane(pins) as after:
            after.set_salts(salts)
            after.apply(moved.model_copy(update={                                 # and comes back elsewhere
                "policies": moved.policies[:2] + [moved.policies[2].model_copy(update={"backend_set": "other"})],
                "backend_sets": moved.backend_sets + [other]}))
            assert after.previous_backends() == {UNIT_BACKEND_SET: {ipaddress.ip_address(BACKEND_V4)},
                                                 "other": set()}
    finally:
        shutil.rmtree(pins)
