"""The proxy's XDP front (bpf/proxy_xdp.bpf.c) through BPF_PROG_TEST_RUN: it
answers exactly the SYNs the TC program answers, with the same SYN+ACK, and
passes everything else on to the TC program untouched and uncounted."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether

from conftest import PORT_FULL, UNIT_KEYS, addr_pair, unit_config
from packets import TC_ACT_REDIRECT, checksums_valid, tcp_frame
from synfleet.abi import Counter
from synfleet.dataplane.programs import ProxyDataplane
from test_malformed import martian_syns
from test_proxy_syn import syns

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=syns())
def test_xdp_front_answers_a_syn_with_the_tc_programs_synack(proxy, case):
    client, service = addr_pair(case["family"])
    ip_kw = {"tos": case["tos"]} if case["family"] == 4 else {"tc": case["tos"]}
    frame = tcp_frame(client, service, case["sport"], case["port"], flags="S" + case["ecn_flags"],
                      seq=case["isn"], options=case["options"], payload=case["payload"], **ip_kw)
    before = proxy.counter_values()[Counter.SYN_ANSWERED]

    xdp = proxy.xdp_program.test_run(frame)
    tc = proxy.program.test_run(frame)

    assert (xdp.retval, tc.retval) == (XDP_TX, TC_ACT_REDIRECT)
    assert proxy.counter_values()[Counter.SYN_ANSWERED] == before + 2
    assert checksums_valid(xdp.data)
    assert xdp.data == tc.data


def passed_untouched(proxy: ProxyDataplane, frame: bytes) -> None:
    before = proxy.counter_values()
    run = proxy.xdp_program.test_run(frame)
    assert run.retval == XDP_PASS
    assert run.data == frame
    assert proxy.counter_values() == before


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("flags", ["A", "SA", "SR", "SF", "R", "PA", "F"])
def test_anything_but_a_plain_syn_goes_on_to_the_tc_program(proxy, family, flags):
    client, service = addr_pair(family)
    passed_untouched(proxy, tcp_frame(client, service, 1000, PORT_FULL, flags=flags, ack=77,
                                      options=LINUX_SYN_OPTS))


@pytest.mark.parametrize("family", [4, 6])
def test_syn_to_an_unprotected_port_or_address_goes_on_untouched(proxy, family):
    client, service = addr_pair(family)
    passed_untouched(proxy, tcp_frame(client, service, 1000, 9, options=LINUX_SYN_OPTS))
    passed_untouched(proxy, tcp_frame(service, client, 1000, PORT_FULL, options=LINUX_SYN_OPTS))


@pytest.mark.parametrize("family", [4, 6])
def test_truncated_or_malformed_syns_are_left_to_the_tc_program(proxy, family):
    """The TC program drops and counts these (test_malformed.py); the front
    must neither answer nor count them."""
    client, service = addr_pair(family)
    frame = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)
    for cut in range(14, len(frame)):
        passed_untouched(proxy, frame[:cut])
    bad_option = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=[("MSS", 1460)])
    bad_option = bad_option[:-3] + b"\x05" + bad_option[-2:]     # MSS option length 5
    passed_untouched(proxy, bad_option)
    short_doff = Ether(tcp_frame(client, service, 1000, PORT_FULL, flags="S"))
    short_doff[TCP].dataofs = 4
    passed_untouched(proxy, bytes(short_doff))


def test_fragments_and_extension_headers_go_on_to_the_tc_program(proxy):
    client, service = addr_pair(4)
    frag = Ether(tcp_frame(client, service, 1000, PORT_FULL, flags="S"))
    frag[IP].flags = "MF"
    del frag[IP].chksum
    passed_untouched(proxy, bytes(frag))
    client6, service6 = addr_pair(6)
    ext = Ether() / IPv6(src=str(client6), dst=str(service6)) / IPv6ExtHdrHopByHop() / TCP(
        sport=1000, dport=PORT_FULL, flags="S")
    passed_untouched(proxy, bytes(ext))


def test_without_a_salt_for_the_epoch_the_syn_goes_on_to_be_counted_by_tc(unit_netns):
    with ProxyDataplane() as proxy:
        proxy.apply(unit_config("proxy", UNIT_KEYS))      # configured, no salt loaded
        client, service = addr_pair(4)
        frame = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)
        passed_untouched(proxy, frame)
        before = proxy.counter_values()[Counter.SALT_MISSING]
        proxy.program.test_run(frame)
        assert proxy.counter_values()[Counter.SALT_MISSING] == before + 1


def test_before_any_configuration_everything_passes(unit_netns):
    with ProxyDataplane() as proxy:
        client, service = addr_pair(4)
        passed_untouched(proxy, tcp_frame(client, service, 1000, PORT_FULL, flags="S"))


@pytest.mark.parametrize("size", [3000, 3500, 3550, 4000, 9000, 16000])
def test_a_syn_in_a_frame_of_any_size_gets_the_tc_programs_answer_or_goes_on_untouched(proxy, size):
    """An independent fuzzer's find: a SYN in a frame of more than one buffer
    (here: padded past its IP length, above ~3,500 bytes) was answered with a
    reply of the wrong length (the frame's first buffer was taken for all of
    it). Such frames now go on to the TC program."""
    client, service = addr_pair(4)
    syn = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)
    frame = syn + bytes(size - len(syn))
    xdp = proxy.xdp_program.test_run(frame)
    if xdp.retval == XDP_PASS:
        assert xdp.data == frame
    else:
        tc = proxy.program.test_run(frame)
        assert xdp.retval == XDP_TX and xdp.data == tc.data


@pytest.mark.parametrize("frame", martian_syns())
def test_a_syn_no_host_would_answer_goes_on_to_be_counted_by_tc(proxy, frame):
    passed_untouched(proxy, frame)


def test_a_syn_with_a_bad_ipv4_header_checksum_goes_on_to_be_counted_by_tc(proxy):
    client, service = addr_pair(4)
    frame = bytearray(tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS))
    frame[24] ^= 0x40
    passed_untouched(proxy, bytes(frame))
