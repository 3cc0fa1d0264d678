"""Malformed input gets its documented verdict (docs/dataplane.md) and never a
kernel error; the proxy and backend programs both see every case."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from conftest import PORT_FULL, SERVICE_V6, addr_pair
from fleet import wait_for
from packets import CLIENT_MAC, PROXY_MAC, TC_ACT_REDIRECT, TC_ACT_SHOT, TCX_NEXT, delta, tcp_frame
from synfleet.abi import Counter

LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def counted(dp, counter, frame) -> int:
    before = dp.counter_values()[counter]
    retval = dp.program.test_run(frame).retval
    assert dp.counter_values()[counter] == before + 1, counter
    return retval


@pytest.fixture
def proxy_on_wire(proxy, unit_netns):
    """The proxy on sf0's ingress; frames written to sf1 arrive there live."""
    hook = proxy.attach("sf0")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind(("sf1", 0))
    yield sock
    sock.close()
    hook.detach()
    hook.destroy_clsact()


@pytest.mark.parametrize("family", [4, 6])
def test_truncation_at_every_header_offset_gets_the_documented_verdict(proxy, backend, proxy_on_wire,
                                                                     family):
    client, service = addr_pair(family)
    frame = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)
    ip_end = 14 + (20 if family == 4 else 40)
    for cut in range(ip_end, len(frame)):
        # The address is known but the TCP header is incomplete, or the frame
        # is shorter than the IP header says: malformed.
        assert counted(proxy, Counter.MALFORMED, frame[:cut]) == TC_ACT_SHOT, cut
        assert backend.program.test_run(frame[:cut]).retval in (TCX_NEXT, TC_ACT_SHOT), cut
    # BPF_PROG_TEST_RUN refuses frames that end inside the IP header (EINVAL
    # before the program runs), so those cuts go over a live veth; a frame
    # shorter than the Ethernet header never reaches TC (the kernel refuses to
    # send it). Too short to name a protected address: untouched, not counted.
    before = proxy.counter_values()
    for cut in range(14, ip_end):
        proxy_on_wire.send(frame[:cut])
    proxy_on_wire.send(frame[:ip_end])  # a marker that is counted once it arrives
    wait_for(lambda: proxy.counter_values()[Counter.MALFORMED] >= before[Counter.MALFORMED] + 1,
             "the MALFORMED counter", timeout=2.0)
    after = proxy.counter_values()
    assert {c: after[c] - before[c] for c in Counter if after[c] != before[c]} == {Counter.MALFORMED: 1}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("doff", [0, 1, 4, 15])
def test_bad_data_offset_is_dropped_as_malformed(proxy, family, doff):
    client, service = addr_pair(family)
    frame = bytearray(tcp_frame(client, service, 1000, PORT_FULL, flags="S"))
    tcp_off = 14 + (20 if family == 4 else 40)
    frame[tcp_off + 12] = doff << 4
    assert counted(proxy, Counter.MALFORMED, bytes(frame)) == TC_ACT_SHOT


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("options", [b"\x02\x00\x00\x00", b"\x03\x01\x00\x00", b"\x08\x0c" + bytes(10),
                                     b"\x02\x05\x05\xb4", b"\x01\x01\x01\x02"],
                         ids=["len0", "len1", "overlong", "mss-len5", "kind-without-length"])
def test_bad_option_lengths_in_a_syn_are_dropped_as_malformed(proxy, family, options):
    client, service = addr_pair(family)
    pkt = Ether(tcp_frame(client, service, 1000, PORT_FULL, flags="S"))
    pkt[TCP].options = []
    tcp = bytearray(bytes(pkt[TCP]))
    tcp[12] = (5 + len(options) // 4) << 4
    l3 = pkt[IP] if family == 4 else pkt[IPv6]
    l3.remove_payload()
    if family == 4:
        del l3.len, l3.chksum
    else:
        del l3.plen
    frame = bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / l3 / (bytes(tcp) + options))
    assert counted(proxy, Counter.MALFORMED, frame) == TC_ACT_SHOT


def test_syn_with_ipv4_options_is_answered_without_them(proxy):
    client, service = addr_pair(4)
    frame = tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS,
                      ip_options=[IPOption_Router_Alert()])
    run = proxy.program.test_run(frame)
    assert run.retval == TC_ACT_REDIRECT
    out = Ether(run.data)
    assert out[IP].ihl == 5 and str(out[TCP].flags) == "SA"


@pytest.mark.parametrize("frag", [dict(ip_flags="MF"), dict(frag=8)], ids=["first", "later"])
def test_ipv4_fragments_to_a_protected_address_are_dropped(proxy, frag):
    client, service = addr_pair(4)
    frame = tcp_frame(client, service, 1000, PORT_FULL, flags="S", **frag)
    assert counted(proxy, Counter.FRAGMENT, frame) == TC_ACT_SHOT


@pytest.mark.parametrize("ext", [IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment()], ids=["hop-by-hop", "fragment"])
def test_ipv6_extension_headers_to_a_protected_address_are_dropped(proxy, ext):
    client, service = addr_pair(6)
    frame = bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IPv6(src=str(client), dst=str(service)) / ext
                  / TCP(sport=1000, dport=PORT_FULL, flags="S"))
    assert counted(proxy, Counter.EXT_HEADER, frame) == TC_ACT_SHOT


# An independent fuzzer's find: ICMPv6 echo to a protected IPv6 address was dropped as an extension header.
FUZZ_ICMPV6_ECHO = bytes.fromhex(
    "02000000000202000000000186dd6000000000083a4020010db800010000000000000000000720010db800190000"
    "00000000000000108000241800010001")


def test_icmpv6_to_a_protected_address_is_untouched(proxy):
    ip6 = IPv6(FUZZ_ICMPV6_ECHO[14:])
    assert ip6.nh == 58 and ip6.dst == SERVICE_V6, "the fuzzer's frame names the protected address"
    run, counted = delta(proxy, FUZZ_ICMPV6_ECHO)
    assert (run.retval, run.data, counted) == (TCX_NEXT, FUZZ_ICMPV6_ECHO, {})


@pytest.mark.parametrize("upper", [
    ICMPv6PacketTooBig(mtu=1280) / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(),
    IPv6ExtHdrHopByHop() / ICMPv6EchoRequest(),
    IPv6ExtHdrDestOpt() / UDP(dport=443),
    IPv6ExtHdrFragment(nh=17, offset=8) / Raw(b"x" * 16),
    UDP(dport=PORT_FULL)], ids=["packet-too-big", "hop-by-hop-icmpv6", "destopt-udp", "later-udp-fragment",
                                "udp"])
def test_ipv6_that_is_not_tcp_passes_whatever_extension_headers_lead_to_it(proxy, upper):
    client, service = addr_pair(6)
    frame = bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IPv6(src=str(client), dst=str(service)) / upper)
    run, counted = delta(proxy, frame)
    assert (run.retval, run.data, counted) == (TCX_NEXT, frame, {})


@pytest.mark.parametrize("chain", [
    IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(),
    IPv6ExtHdrFragment(nh=6, offset=8) / Raw(b"x" * 16)], ids=["two-headers", "later-tcp-fragment"])
def test_tcp_behind_any_ipv6_extension_header_chain_to_a_protected_address_is_dropped(proxy, chain):
    client, service = addr_pair(6)
    frame = bytes(Ether(src=CLIENT_MAC, dst=PROXY_MAC) / IPv6(src=str(client), dst=str(service)) / chain
                  / TCP(sport=1000, dport=PORT_FULL, flags="S"))
    assert counted(proxy, Counter.EXT_HEADER, frame) == TC_ACT_SHOT


MARTIAN_SOURCES = {4: ["0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255"],
                   6: ["::", "::1", "ff02::1", "::ffff:198.18.1.7"]}


def martian_syns() -> list:
    cases = [pytest.param(tcp_frame(src, addr_pair(fam)[1], 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS),
                          id=f"from-{src}") for fam, sources in MARTIAN_SOURCES.items() for src in sources]
    for fam in (4, 6):
        _, service = addr_pair(fam)
        syn = tcp_frame(service, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS)
        cases.append(pytest.param(syn, id=f"from-itself-v{fam}"))
        client, _ = addr_pair(fam)
        syn = bytearray(tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS))
        cases.append(pytest.param(b"\xff" * 6 + bytes(syn[6:]), id=f"to-broadcast-mac-v{fam}"))
        cases.append(pytest.param(bytes(syn[:6]) + b"\x01\x00\x5e\x00\x00\x01" + bytes(syn[12:]),
                                  id=f"from-multicast-mac-v{fam}"))
    return cases


@pytest.mark.parametrize("frame", martian_syns())
def test_a_syn_no_host_would_answer_is_dropped_and_counted(proxy, frame):
    """An independent fuzzer's find: SYNs to the broadcast MAC (answered from
    ff:ff:ff:ff:ff:ff) and from martian sources were answered."""
    assert counted(proxy, Counter.MARTIAN, frame) == TC_ACT_SHOT


@pytest.mark.parametrize("ihl", [5, 6])
def test_a_syn_with_a_bad_ipv4_header_checksum_is_dropped_and_counted(proxy, ihl):
    client, service = addr_pair(4)
    options = [IPOption_Router_Alert()] if ihl == 6 else []
    frame = bytearray(tcp_frame(client, service, 1000, PORT_FULL, flags="S", options=LINUX_SYN_OPTS,
                                ip_options=options))
    assert frame[14] & 0x0F == ihl
    frame[24] ^= 0x40                                   # the header checksum's first byte
    assert counted(proxy, Counter.BAD_CHECKSUM, bytes(frame)) == TC_ACT_SHOT


def test_syn_with_fin_or_rst_is_dropped(proxy):
    client, service = addr_pair(4)
    for flags in ("SF", "SR"):
        assert counted(proxy, Counter.MALFORMED, tcp_frame(client, service, 1, PORT_FULL, flags=flags)) == TC_ACT_SHOT
