"""Real TCP through proxy and backend in network namespaces."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from conftest import require_bpf
from fleet import ENCAP_PORT, SERVICE_PORT, Capture, EchoServer, pattern, recv_exact, running_fleet, tcp_info_options
from synfleet.abi import Counter
from synfleet.cookie import FourTuple, cookie_check, current_epoch
from synfleet_lab.testbed.topology import V4, V6

ROTATION_S = 3600
SIZE = 1 << 20
TOGGLES = list(itertools.product([True, False], repeat=4))  # wscale, sack, ts, ecn


@pytest.fixture(scope="module")
def fleet():
    require_bpf()
    with running_fleet(ROTATION_S) as f:
        yield f


def syn_frames(frames, want_flags):
    for _, raw in frames:
        pkt = Ether(raw)
        if pkt.haslayer(UDP) and pkt[UDP].dport == ENCAP_PORT:
            inner = bytes(pkt[UDP].payload)[4:]
            pkt = (IP if inner[0] >> 4 == 4 else IPv6)(inner)
        if pkt.haslayer(TCP) and want_flags(pkt[TCP].flags):
            yield pkt[TCP]


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("wscale,sack,ts,ecn", TOGGLES,
                         ids=["-".join(n for n, on in zip(("ws", "sack", "ts", "ecn"), t) if on) or "none"
                              for t in TOGGLES])
def test_client_completes_handshake_and_moves_a_mebibyte_each_way(fleet, family, wscale, sack, ts, ecn):
    a = V4 if family == 4 else V6
    for key, on in (("tcp_window_scaling", wscale), ("tcp_sack", sack), ("tcp_timestamps", ts),
                    ("tcp_ecn", ecn)):
        fleet.topo.client.sysctl(f"net.ipv4.{key}", int(on))
    before = fleet.backend.counter_values()
    server = EchoServer(fleet.topo.backend, a.service, SIZE)
    client_cap = Capture(fleet.topo.client, "c0")
    backend_cap = Capture(fleet.topo.backend, "b0")
    try:
        with fleet.topo.client.entered():
            sock = socket.create_connection((a.service, SERVICE_PORT), timeout=10)
        with sock:
            sock.sendall(pattern(SIZE, b"client"))
            assert recv_exact(sock, SIZE) == pattern(SIZE, b"server")
            client_opts = tcp_info_options(sock)
            local_port = sock.getsockname()[1]
    finally:
        server.close()
        client_frames = client_cap.stop()
        backend_frames = backend_cap.stop()
    assert not server.errors, server.errors
    assert server.received == [pattern(SIZE, b"client")]

    # Both ends agree on what the client asked for.
    for opts in (client_opts, server.options):
        assert (opts["ts"], opts["sack"], opts["ecn"]) == (ts, sack, ecn), opts
        assert (opts["wscale"] is not None) == wscale, opts
    policy = fleet.policies[family]
    if wscale:    # the scale the proxy's SYN+ACK announced is the one the backend receives with
        assert client_opts["wscale"][0] == policy.cookie.window_scale
        assert server.options["wscale"][1] == policy.cookie.window_scale
        assert server.options["wscale"][0] == client_opts["wscale"][1]
    table = policy.cookie.mss_v4 if family == 4 else policy.cookie.mss_v6
    syn = next(syn_frames(client_frames, lambda f: "S" in f and "A" not in f))
    client_mss = dict(syn.options)["MSS"]
    expected_server_mss = max(m for m in table if m <= client_mss)
    assert expected_server_mss - (12 if ts else 0) == server.options["mss"], server.options

    # The server's ISN is the proxy's cookie, and the cookie checks out.
    synack = next(syn_frames(client_frames, lambda f: "S" in f and "A" in f))
    server_data_offsets = [(p.seq - synack.seq) % 2**32
                           for p in syn_frames(client_frames, lambda f: "S" not in f and "A" in f)
                           if p.sport == SERVICE_PORT and len(p.payload) > 0]
    assert min(server_data_offsets) == 1  # the first byte the server sent is ISN + 1
    t = FourTuple(ipaddress.ip_address(a.client), ipaddress.ip_address(a.service), local_port, SERVICE_PORT)
    synack_tsval = dict(synack.options).get("Timestamp", (None,))[0]
    assert (synack_tsval is not None) == ts
    assert cookie_check(fleet.salts, current_epoch(ROTATION_S), t, syn.seq, synack.seq, synack_tsval)

    # The backend's listener never saw a SYN, and never answered one.
    assert list(syn_frames(backend_frames, lambda f: "S" in f)) == []
    after = fleet.backend.counter_values()
    assert after[Counter.REQSK_CREATED] == before[Counter.REQSK_CREATED] + 1


def inject(ns, ifname: str, frame: bytes) -> None:
    with ns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((ifname, 0))
    with sock:
        sock.send(frame)


def wait_counter(dp, counter, value, timeout=3.0) -> int:
    deadline = time.monotonic() + timeout
    while dp.counter_values()[counter] < value and time.monotonic() < deadline:
        time.sleep(0.02)
    return dp.counter_values()[counter]


@pytest.mark.netns
def test_forged_ack_through_the_proxy_is_dropped_and_counted(fleet):
    server = EchoServer(fleet.topo.backend, V4.service, 1)
    try:
        p_before, b_before = fleet.proxy.counter_values(), fleet.backend.counter_values()
        frame = bytes(Ether(dst=fleet.topo.proxy.mac("p0"), src=fleet.topo.client.mac("c0"))
                      / IP(src=V4.client, dst=V4.service)
                      / TCP(sport=33333, dport=SERVICE_PORT, flags="A", seq=1, ack=12345))
        inject(fleet.topo.client, "c0", frame)
        assert wait_counter(fleet.backend, Counter.ACK_UNVALIDATED, b_before[Counter.ACK_UNVALIDATED] + 1) \
            == b_before[Counter.ACK_UNVALIDATED] + 1
        p_after = fleet.proxy.counter_values()
        assert p_after[Counter.COOKIE_VALID] == p_before[Counter.COOKIE_VALID]
        assert p_after[Counter.FORWARDED] == p_before[Counter.FORWARDED] + 1
        assert fleet.backend.counter_values()[Counter.REQSK_CREATED] == b_before[Counter.REQSK_CREATED]
    finally:
        server.close()


@pytest.mark.netns
def test_ack_that_bypasses_the_proxies_meets_a_listener_and_is_dropped(fleet):
    server = EchoServer(fleet.topo.backend, V4.service, 1)
    try:
        before = fleet.backend.counter_values()[Counter.BYPASS_ACK]
        frame = bytes(Ether(dst=fleet.topo.backend.mac("b0"), src=fleet.topo.proxy.mac("p1"))
                      / IP(src=V4.client, dst=V4.service)
                      / TCP(sport=33334, dport=SERVICE_PORT, flags="A", seq=1, ack=12345))
        inject(fleet.topo.proxy, "p1", frame)
        assert wait_counter(fleet.backend, Counter.BYPASS_ACK, before + 1) == before + 1
    finally:
        server.close()
