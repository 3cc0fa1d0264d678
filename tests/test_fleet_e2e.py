"""The whole fleet in namespaces with real agent processes: two proxies, two
backends, a client and an attacker (synfleet_lab.testbed.fleetlab)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from conftest import require_bpf
from fleet import ingress_program_id, wait_for, xdp_program_id, xdp_tx_count
from synfleet.abi import SaltValue
from synfleet.agent import notrack
from synfleet.agent.agent import uninstall
from synfleet.agent.pins import DEFAULT_ROOT
from synfleet.bpf import objects
from synfleet_lab import frames
from synfleet_lab.testbed.clients import ClientLoad, Transfer, attempt
from synfleet_lab.testbed.configs import ENCAP_PORT, POLICY_IDS, SERVICE_PORT
from synfleet_lab.testbed.fleetlab import BACKENDS, PROXIES, SERVICE, FleetLab

pytestmark = pytest.mark.netns
MiB = 1 << 20


@pytest.fixture
def lab():
    require_bpf()
    with FleetLab() as lab:
        yield lab.start()


def success_rate(attempts) -> float:
    return sum(a.ok for a in attempts) / len(attempts)


class RawPort:
    """Hand-made frames from a namespace's eth0 (AF_PACKET), and what comes back."""

    def __init__(self, lab: FleetLab, node: str) -> None:
        self.node = lab.nodes[node]
        with self.node.ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
            self.sock.bind(("eth0", 0))
        self.sock.settimeout(2)

    def send(self, dst_mac: str, frame: bytes) -> None:
        self.sock.send(frames.addressed(frame, dst_mac, self.node.mac))

    def syn_ack_for(self, source: str, sport: int) -> tuple[int, int]:
        """(cookie, ack) of the SYN+ACK answering source:sport."""
        deadline = time.monotonic() + 2
        want = socket.inet_aton(source)
        while time.monotonic() < deadline:
            f = self.sock.recv(2048)
            ip = f[14:]
            if ip[9] != 6 or ip[16:20] != want:
                continue
            tcp = ip[(ip[0] & 0xF) * 4:]
            dport, seq, ack, flags = struct.unpack("!2xHIIxB", tcp[:14])
            if dport == sport and flags & (frames.SYN | frames.ACK) == frames.SYN | frames.ACK:
                return seq, ack
        raise TimeoutError(f"no SYN+ACK for {source}:{sport}")

    def close(self) -> None:
        self.sock.close()


# A source the client namespace does not own: its kernel drops the SYN+ACK
# silently instead of resetting, so the test plays the client's part by hand.
RAW_CLIENT = "198.18.0.200"


def raw_handshake(port: RawPort, syn_proxy, ack_proxy, sport: int, wait_s: float = 0.0) -> None:
    isn = random.getrandbits(32)
    port.send(syn_proxy.mac, frames.tcp(RAW_CLIENT, SERVICE[4], sport, SERVICE_PORT, frames.SYN, isn, 0))
    cookie, _ = port.syn_ack_for(RAW_CLIENT, sport)
    time.sleep(wait_s)
    port.send(ack_proxy.mac, frames.tcp(RAW_CLIENT, SERVICE[4], sport, SERVICE_PORT, frames.ACK,
                                        isn + 1, cookie + 1))


def test_flows_spread_over_both_backends_and_keep_their_backend_on_either_proxy(lab):
    ports = range(41000, 41048)
    via_a = {(fam, p): attempt(lab, fam, p, payload=bytes(64 << 10)) for fam in (4, 6) for p in ports}
    lab.route_via("proxy-b")
    via_b = {(fam, p): attempt(lab, fam, p, payload=bytes(64 << 10)) for fam in (4, 6) for p in ports}
    assert all(a.ok for a in via_a.values()) and all(a.ok for a in via_b.values()), \
        [a.error for a in (*via_a.values(), *via_b.values()) if not a.ok]
    for fam in (4, 6):
        landed = [via_a[(fam, p)].backend for p in ports]
        assert min(landed.count(b) for b in BACKENDS) >= 8, landed   # 24 expected of 48
    assert {k: a.backend for k, a in via_a.items()} == {k: a.backend for k, a in via_b.items()}
    proxies = lab.counters(PROXIES)
    assert proxies["syn_answered"] >= 4 * len(ports) and proxies["cookie_valid"] >= 4 * len(ports)
    assert lab.counters(BACKENDS)["reqsk_created"] >= 4 * len(ports)


# What kube-proxy puts on every Kubernetes node: NAT hooks, and rules that
# consult connection tracking (together, they made the kernel reset every
# validated handshake: agent/notrack.py).
KUBE_PROXY_LIKE = [(tool, *rule) for tool in ("iptables", "ip6tables") for rule in (
    ("-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "30000", "-j", "RETURN"),
    ("-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"))]


def test_backends_with_kube_proxy_style_netfilter_accept_validated_handshakes(lab):
    for name in BACKENDS:
        for rule in KUBE_PROXY_LIKE:
            lab.nodes[name].ns.run(*rule)
    before = lab.counters(BACKENDS)["reqsk_created"]
    results = [attempt(lab, family) for family in (4, 6) for _ in range(10)]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert lab.counters(BACKENDS)["reqsk_created"] - before == len(results)
    # The exemption is the agent's own nftables table, and leaves with its data plane.
    name = BACKENDS[0]
    table = notrack.table_name(lab.agents[name].instance)
    assert table in lab.nodes[name].ns.run("nft", "list", "tables")
    lab.agents[name].signal(signal.SIGTERM)
    with lab.nodes[name].ns.entered():
        uninstall(lab.agents[name].instance)
    assert table not in lab.nodes[name].ns.run("nft", "list", "tables")


def test_syn_flood_never_reaches_backends_while_legitimate_clients_connect(lab):
    before = lab.counters(PROXIES)["syn_answered"]
    flood = lab.flood("syn", rate=30000, duration=10.0)
    load = ClientLoad(lab, concurrency=4).start()
    sent = flood.wait()
    attempts = load.stop()
    answered = lab.counters(PROXIES)["syn_answered"] - before
    backends = lab.counters(BACKENDS)
    assert sent >= 0.9 * 30000 * 10
    assert answered >= 0.99 * sent, (answered, sent)
    assert backends["bypass_syn"] == 0
    assert len(attempts) >= 100
    assert success_rate(attempts) >= 0.99, [a.error for a in attempts if not a.ok][:5]
    # The clients cycle through a few source ports and the service closes first:
    # most handshakes met the TIME_WAIT socket of the port's previous connection.
    assert backends["tw_recycled"] >= 0.5 * len(attempts), backends["tw_recycled"]
    assert backends["tw_refused"] == 0


@pytest.fixture
def xdp_lab():
    require_bpf()
    with FleetLab(xdp=True) as lab:
        yield lab.start()


def xdp_tx(lab: FleetLab) -> int:
    """Frames the proxies' XDP front sent back (veth's own count)."""
    return sum(xdp_tx_count(lab.nodes[name].ns, "eth0") for name in PROXIES)


def test_proxies_with_the_xdp_front_serve_clients_through_a_syn_flood(xdp_lab):
    lab = xdp_lab
    before, front_before = lab.counters(PROXIES)["syn_answered"], xdp_tx(lab)
    flood = lab.flood("syn", rate=30000, duration=5.0)
    load = ClientLoad(lab, concurrency=4).start()
    sent = flood.wait()
    attempts = load.stop()
    answered = lab.counters(PROXIES)["syn_answered"] - before
    assert answered >= 0.99 * sent, (answered, sent)
    assert xdp_tx(lab) - front_before >= 0.99 * sent      # answered in XDP, not by TC
    assert lab.counters(BACKENDS)["bypass_syn"] == 0
    assert len(attempts) >= 50
    assert success_rate(attempts) >= 0.99, [a.error for a in attempts if not a.ok][:5]
    big = attempt(lab, 4, 41999, payload=bytes(MiB))
    assert big.ok, big.error


def test_an_xdp_front_whose_replies_are_lost_gives_way_to_the_tc_program():
    """The switch ports run no XDP program, so the veth drops every SYN+ACK
    the proxies' XDP front sends back (a new user's bridge, or a driver whose
    XDP_TX fails): the agent notices, takes the front away, and says so."""
    require_bpf()
    with FleetLab(xdp=True, peer_xdp=False) as lab:
        lab.start()
        proxy = lab.agents["proxy-a"]
        assert xdp_program_id(lab.nodes["proxy-a"].ns, "eth0") is not None
        attempts = [attempt(lab, 4) for _ in range(10)]
        assert success_rate(attempts) == 1.0, [a.error for a in attempts if not a.ok][:3]
        status, reason = proxy.http("/readyz")
        assert status == 503 and reason.startswith("XDP front on eth0 taken away: the driver failed to send"), reason
        assert xdp_program_id(lab.nodes["proxy-a"].ns, "eth0") is None
        assert ingress_program_id(lab.nodes["proxy-a"].ns, "eth0") is not None
        assert proxy.metrics()["synfleet_xdp_fallbacks_total"] == 1
        assert "XDP front taken away" in proxy.log()


def test_ack_flood_with_random_cookies_is_dropped_and_counted(lab):
    proxies_before, backends_before = lab.counters(PROXIES), lab.counters(BACKENDS)
    flood = lab.flood("ack", rate=20000, duration=3.0)
    load = ClientLoad(lab, concurrency=2).start()
    sent = flood.wait()
    attempts = load.stop()
    proxies, backends = lab.counters(PROXIES), lab.counters(BACKENDS)
    rejected = sum(proxies[k] - proxies_before[k] for k in ("cookie_rejected", "cookie_stale"))
    assert rejected >= sent
    assert backends["ack_unvalidated"] - backends_before["ack_unvalidated"] >= sent
    assert backends["reqsk_created"] - backends_before["reqsk_created"] == \
        sum(a.ok for a in attempts)
    assert success_rate(attempts) == 1.0, [a.error for a in attempts if not a.ok][:5]


def _bypass_frames(lab: FleetLab, sport: int) -> dict[str, bytes]:
    attacker = lab.nodes["attacker"]
    # The ACK has its own port: in monitor mode the passed SYN opens a request
    # socket, and an ACK that meets one is no bypass but the kernel's business.
    inner = frames.tcp(attacker.v4, SERVICE[4], sport + 1000, SERVICE_PORT, frames.ACK, 1, 2)
    return {
        "syn": frames.tcp(attacker.v4, SERVICE[4], sport, SERVICE_PORT, frames.SYN, 1, 0),
        "ack": inner,
        "encap": frames.udp_encap(attacker.v4, lab.nodes["backend-a"].v4, 50000, ENCAP_PORT,
                                  struct.pack("!BBH", 1, 1, POLICY_IDS[4]) + inner[14:]),
    }


def _send_bypass(lab: FleetLab, port: RawPort, n: int) -> dict[str, float]:
    before = lab.agents["backend-a"].metrics()
    for i in range(n):
        for frame in _bypass_frames(lab, 42000 + i).values():
            port.send(lab.nodes["backend-a"].mac, frame)
    time.sleep(0.3)
    after = lab.agents["backend-a"].metrics()
    return {k: after[k] - before[k] for k in after}


def test_bypass_attempts_are_dropped_in_enforce_and_passed_and_counted_in_monitor(lab):
    port = RawPort(lab, "attacker")
    try:
        enforced = _send_bypass(lab, port, 20)
        assert enforced["bypass_syn"] == 20 and enforced["bypass_ack"] == 20
        assert enforced["unknown_source"] == 20
        assert enforced["monitor_passed"] == 0

        generation = lab.agents["backend-a"].metrics()["synfleet_config_generation"]
        lab.set_mode("monitor")
        wait_for(lambda: lab.agents["backend-a"].metrics()["synfleet_config_generation"] > generation,
                 "backend-a to apply monitor mode")
        monitored = _send_bypass(lab, port, 20)
        assert monitored["bypass_syn"] == 20 and monitored["bypass_ack"] == 20
        assert monitored["unknown_source"] == 20
        assert monitored["monitor_passed"] == 60
    finally:
        port.close()
    assert attempt(lab, 4).ok and attempt(lab, 6).ok


def test_proxy_failover_mid_transfer_completes_with_identical_bytes(lab):
    transfer = Transfer(lab, 50 * MiB, rate=25 * MiB).start()
    while transfer.received < 12 * MiB:
        time.sleep(0.05)
    lab.route_via("proxy-b")
    assert transfer.result(), transfer.error
    assert transfer.received == 50 * MiB
    assert lab.agents["proxy-b"].metrics()["forwarded"] > 1000


def test_agent_kill_restart_and_upgrade_mid_transfer_keep_the_connection(lab, tmp_path):
    upgrade = tmp_path / "objects-next"
    shutil.copytree(objects.OBJECTS_DIR, upgrade)
    counters_before = lab.counters(PROXIES + BACKENDS)
    programs_before = {n: ingress_program_id(lab.nodes[n].ns, "eth0") for n in ("proxy-a", "backend-a", "backend-b")}
    transfer = Transfer(lab, 40 * MiB, rate=3 * MiB).start()
    time.sleep(0.5)
    for name in ("proxy-a", "backend-a", "backend-b"):
        lab.restart_agent(name, signal.SIGKILL)
    time.sleep(0.5)
    for name in ("proxy-a", "backend-a", "backend-b"):
        lab.restart_agent(name, signal.SIGTERM, objects_dir=str(upgrade))
    assert transfer.sent < transfer.size, "the transfer ended before the restarts: slow it down"
    assert transfer.result(), transfer.error
    for name, old in programs_before.items():
        assert ingress_program_id(lab.nodes[name].ns, "eth0") != old
    after = lab.counters(PROXIES + BACKENDS)
    assert after["forwarded"] >= counters_before["forwarded"] + (40 * MiB) // (64 << 10)
    assert after["decapsulated"] >= counters_before["decapsulated"]
    assert attempt(lab, 4).ok and attempt(lab, 6).ok


def test_an_upgrade_that_replaces_an_outgrown_map_drops_no_handshake(lab):
    """The proxy's salt map pinned as a release before ABI 4 left it (four
    slots): the upgraded agent starts a larger one, fills it from the
    configuration, and only then swaps its program in."""
    agent = lab.agents["proxy-a"]
    salts_pin = os.path.join(DEFAULT_ROOT, agent.instance, "salts")
    load = ClientLoad(lab, concurrency=4).start()
    time.sleep(0.5)
    agent.signal(signal.SIGTERM)
    os.unlink(salts_pin)
    subprocess.run(["bpftool", "map", "create", salts_pin, "type", "array", "key", "4",
                    "value", str(ctypes.sizeof(SaltValue)), "entries", "4", "name", "salts"], check=True)
    agent.start()
    agent.wait_ready()
    time.sleep(0.5)
    attempts = load.stop()
    assert '"new_maps": ["salts"]' in agent.log()
    assert len(attempts) >= 50
    assert all(a.ok for a in attempts), [a.error for a in attempts if not a.ok][:5]
    print(f"{len(attempts)} handshakes across the upgrade, none failed")


@pytest.fixture
def skewed_lab():
    """2-second epochs; proxy-b's clock runs 1 s ahead (node.clockOffsetSeconds)."""
    require_bpf()
    with FleetLab(rotation_s=2, clock_offsets={"proxy-b": 1.0}) as lab:
        yield lab.start()


def test_short_epochs_skewed_proxies_and_stale_cookies(skewed_lab):
    lab = skewed_lab
    epoch0 = lab.agents["proxy-a"].metrics()["synfleet_salt_epoch"]
    load = ClientLoad(lab, concurrency=4).start()
    time.sleep(7)   # at least three epoch boundaries
    attempts = load.stop()
    assert lab.agents["proxy-a"].metrics()["synfleet_salt_epoch"] >= epoch0 + 3
    assert len(attempts) >= 100
    assert all(a.ok for a in attempts), [a.error for a in attempts if not a.ok][:5]

    # Cookies made by one proxy validate on the other, a second apart in clock.
    port = RawPort(lab, "client")
    a, b = lab.nodes["proxy-a"], lab.nodes["proxy-b"]
    try:
        before = lab.counters(BACKENDS)["reqsk_created"]
        for i in range(12):
            raw_handshake(port, a if i % 2 else b, b if i % 2 else a, 43000 + i)
            time.sleep(0.35)
        time.sleep(0.3)
        assert lab.counters(BACKENDS)["reqsk_created"] - before == 12

        # A cookie three epochs old is refused, whichever proxy sees it.
        proxies = lab.counters(PROXIES)
        raw_handshake(port, a, a, 43100, wait_s=3 * lab.rotation_s + 0.5)
        time.sleep(0.3)
        after = lab.counters(PROXIES)
        assert after["cookie_valid"] == proxies["cookie_valid"]
        assert after["cookie_stale"] + after["cookie_rejected"] > \
            proxies["cookie_stale"] + proxies["cookie_rejected"]
        assert lab.counters(BACKENDS)["reqsk_created"] - before == 12
    finally:
        port.close()
