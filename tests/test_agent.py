"""The agent as a process in one namespace: pins, restarts, reloads, bad
files, signals, probes, uninstall; and the double-buffered flip under load."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from conftest import (
    CLIENT_V4,
    POLICY_FULL,
    PORT_FULL,
    PROXY_V4,
    PROXY_V6,
    ROTATION_S,
    SERVICE_V4,
    UNIT_KEYS,
    master_keys,
    require_bpf,
    tai_epoch,
    unit_config,
)
from fleet import ingress_program_id, wait_for, xdp_program_id, xdp_tx_count
from packets import TC_ACT_REDIRECT, tcp_frame
from synfleet import abi
from synfleet.abi import Counter, SaltValue
from synfleet.agent import notrack
from synfleet.agent.agent import salt_window, uninstall
from synfleet.agent.metrics import AgentState, serve
from synfleet.agent.pins import DEFAULT_ROOT, XDP_PIN, PinDir
from synfleet.bpf import BpfObject, Map, XdpHook
from synfleet.config import schema
from synfleet.cookie import salts_for
from synfleet.dataplane.programs import ProxyDataplane, dataplane_for
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.fabric import Fabric
from synfleet_lab.testbed.fleetlab import AgentProcess, Node
from synfleet_lab.testbed.netns import unique_name

pytestmark = pytest.mark.netns


class OneNode:
    """A namespace with a veth and one proxy agent process driven by a file."""

    def __init__(self, tmp_path) -> None:
        self.fabric = Fabric("sf-agent")
        self.ns = self.fabric.add("node")
        self.fabric.link(self.ns, "sf0", self.ns, "sf1", [f"{PROXY_V4}/24", f"{PROXY_V6}/64"])
        self.path = str(tmp_path / "proxy.yaml")
        self.keys = master_keys()
        self.write(unit_config("proxy", self.keys).to_yaml())
        self.agent = AgentProcess(Node("proxy", self.ns, PROXY_V4, PROXY_V6), "proxy", self.path,
                                  unique_name("test-agent"), str(tmp_path / "agent.log"))

    def salts(self) -> dict[int, bytes]:
        """What the agent loads into the salt map now: the window around the epoch."""
        return salts_for(self.keys, salt_window(ROTATION_S, tai_epoch()))

    def write(self, text: str) -> None:
        with open(self.path + ".tmp", "w") as f:
            f.write(text)
        os.replace(self.path + ".tmp", self.path)

    def tc_program_id(self) -> int | None:
        return ingress_program_id(self.ns, "sf0")

    def pins(self) -> str:
        return os.path.join(DEFAULT_ROOT, self.agent.instance)

    def close(self) -> None:
        self.agent.signal(signal.SIGKILL)
        with self.ns.entered():
            uninstall(self.agent.instance)
        self.fabric.close()


@pytest.fixture
def node(tmp_path):
    require_bpf()
    n = OneNode(tmp_path)
    yield n
    n.close()


def test_agent_pins_attaches_and_serves_probes_and_metrics(node):
    node.agent.start()
    node.agent.wait_ready()
    assert node.agent.http("/healthz") == (200, "ok\n")
    assert sorted(os.listdir(node.pins())) == sorted(ProxyDataplane.MAPS + ("program", "program-xdp", "tcx-sf0"))
    assert node.tc_program_id() is not None
    m = node.agent.metrics()
    assert m["synfleet_config_generation"] == 1 and m["syn_answered"] == 0
    # Two hours of epochs ahead: two at the unit tests' hour-long epochs.
    assert m["synfleet_salt_epoch"] == tai_epoch() and m["synfleet_salt_epochs_ahead"] == 2


def test_a_bad_file_is_rejected_and_the_last_good_configuration_keeps_serving(node):
    node.agent.start()
    node.agent.wait_ready()
    good = node.agent.metrics()
    node.write("apiVersion: synfleet.io/v1alpha1\nkind: DataplaneConfig\nrole: proxy\nrotationSeconds: -1\n")
    wait_for(lambda: node.agent.metrics()["synfleet_config_errors_total"] == 1, "the rejection")
    assert node.agent.http("/readyz")[0] == 200
    assert node.agent.metrics()["synfleet_config_generation"] == good["synfleet_config_generation"]
    assert "rotationSeconds: Input should be greater than or equal to 1" in node.agent.log()
    with node.ns.entered(), ProxyDataplane(node.pins()) as dp:
        assert dp.applied() and dp.published_salts() == node.salts()


def test_a_changed_file_and_sighup_are_applied_into_the_other_half(node):
    node.agent.start()
    node.agent.wait_ready()
    cfg = unit_config("proxy", node.keys)
    node.write(cfg.model_copy(update={"rotation_seconds": ROTATION_S // 2}).to_yaml())
    wait_for(lambda: node.agent.metrics()["synfleet_config_generation"] == 2, "the reload")
    with node.ns.entered(), ProxyDataplane(node.pins()) as dp:
        assert dp.config.get(ctypes.c_uint32(dp.active_slot())).rotation_ns == ROTATION_S // 2 * 10**9
    node.agent.proc.send_signal(signal.SIGHUP)   # same content: nothing to apply
    time.sleep(0.5)
    assert node.agent.metrics()["synfleet_config_generation"] == 2


def test_sigterm_leaves_the_data_plane_and_uninstall_removes_it(node):
    node.agent.start()
    node.agent.wait_ready()
    program = node.tc_program_id()
    node.agent.signal(signal.SIGTERM)
    assert node.agent.proc.returncode == 0
    assert node.tc_program_id() == program and os.path.isdir(node.pins())
    with node.ns.entered():
        assert uninstall(node.agent.instance) == ["sf0"]
        assert uninstall(node.agent.instance) is None
    assert node.tc_program_id() is None and not os.path.exists(node.pins())


def with_xdp(cfg, on: bool):
    return cfg.model_copy(update={"node": cfg.node.model_copy(update={"xdp": on})})


def attached_hooks(node) -> set[tuple[str, str]]:
    """(interface, hook) pairs the agent's synfleet_hook_attached gauge reports."""
    return {(sample.labels["interface"], sample.labels["hook"])
            for family in text_string_to_metric_families(node.agent.http("/metrics")[1])
            if family.name == "synfleet_hook_attached" for sample in family.samples if sample.value == 1}


def test_the_xdp_front_answers_syns_on_the_wire(node):
    node.write(with_xdp(unit_config("proxy", node.keys), True).to_yaml())
    with node.ns.entered(), BpfObject(lab_object("xdp_pass")).load() as peer:
        # The client's end needs a native XDP program to take XDP_TX frames.
        XdpHook(socket.if_nametoindex("sf1")).attach(peer.program("xdp_pass"))
    node.agent.start()
    node.agent.wait_ready()
    assert xdp_program_id(node.ns, "sf0") == PinDir(DEFAULT_ROOT, node.agent.instance).pinned_program_id(XDP_PIN)
    sent_back = xdp_tx_count(node.ns, "sf0")
    with node.ns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        sock.bind(("sf1", 0))
        sock.settimeout(0.2)
        try:
            sock.send(tcp_frame(CLIENT_V4, SERVICE_V4, 4321, PORT_FULL, flags="S", seq=99))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    reply = Ether(sock.recv(2048))
                    if TCP in reply and reply[TCP].dport == 4321:
                        break
            else:
                pytest.fail("no SYN+ACK came back on sf1")
        finally:
            sock.close()
    assert str(reply[TCP].flags) == "SA" and reply[TCP].ack == 100
    assert xdp_tx_count(node.ns, "sf0") == sent_back + 1      # answered by the front, not TC
    assert node.agent.metrics()["syn_answered"] == 1
    assert attached_hooks(node) == {("sf0", "tcx"), ("sf0", "xdp")}


def test_the_xdp_front_follows_the_configuration_across_restarts_and_uninstall(node):
    cfg = unit_config("proxy", node.keys)
    node.write(with_xdp(cfg, True).to_yaml())
    node.agent.start()
    node.agent.wait_ready()
    first = xdp_program_id(node.ns, "sf0")
    assert first is not None
    node.write(with_xdp(cfg, False).to_yaml())
    wait_for(lambda: xdp_program_id(node.ns, "sf0") is None, "the XDP front detached")
    assert node.tc_program_id() is not None
    assert attached_hooks(node) == {("sf0", "tcx")}
    node.write(with_xdp(cfg, True).to_yaml())
    wait_for(lambda: xdp_program_id(node.ns, "sf0") is not None, "the XDP front again")
    node.agent.signal(signal.SIGKILL)
    node.agent.start()
    node.agent.wait_ready()
    assert xdp_program_id(node.ns, "sf0") not in (None, first)   # replaced in place
    node.agent.signal(signal.SIGTERM)
    with node.ns.entered():
        assert sorted(uninstall(node.agent.instance)) == ["sf0", "sf0 (XDP)"]
    assert xdp_program_id(node.ns, "sf0") is None and node.tc_program_id() is None


def test_a_driver_without_native_xdp_keeps_the_tc_program_and_says_why(node):
    Fabric.bridge(node.ns, "sfbr0")
    cfg = unit_config("proxy", node.keys)
    node.write(with_xdp(cfg.model_copy(update={"node": cfg.node.model_copy(
        update={"interfaces": ["sf0", "sfbr0"]})}), True).to_yaml())
    node.agent.start()
    wait_for(lambda: "no XDP front on sfbr0" in node.agent.http("/readyz")[1], "the readiness reason")
    assert node.agent.http("/readyz")[0] == 503
    assert ingress_program_id(node.ns, "sfbr0") is not None and xdp_program_id(node.ns, "sf0") is not None


def test_a_restarted_agent_replaces_the_program_and_keeps_maps_and_counters(node):
    node.agent.start()
    node.agent.wait_ready()
    with node.ns.entered(), ProxyDataplane(node.pins()) as dp:
        dp.counters.put(ctypes.c_uint32(Counter.SYN_ANSWERED), ctypes.c_uint64(0))
        before = dp.counter_values()[Counter.SYN_ANSWERED]
    first = node.tc_program_id()
    node.agent.signal(signal.SIGKILL)
    node.agent.start()
    node.agent.wait_ready()
    assert node.tc_program_id() != first
    assert node.agent.metrics()["syn_answered"] >= before
    assert "replaces_program_id" in node.agent.log() and f'"replaces_program_id": {first}' in node.agent.log()


def test_an_agent_without_a_valid_file_is_not_ready_until_one_arrives(node):
    good = open(node.path).read()
    node.write("role: [")
    node.agent.start()
    status, body = wait_for(lambda: (r := node.agent.http("/readyz"))[0] == 503 and r, "a 503")
    assert "no valid configuration yet: not YAML" in body
    assert node.tc_program_id() is None
    node.write(good)
    node.agent.wait_ready()
    wait_for(node.tc_program_id, "the hook")


def test_a_proxy_without_a_salt_for_the_current_epoch_is_not_ready(node):
    node.agent.start()
    node.agent.wait_ready()
    node.write(unit_config("proxy", master_keys(from_epoch=tai_epoch() + 10)).to_yaml())
    wait_for(lambda: node.agent.metrics()["synfleet_config_generation"] == 2, "the reload")
    assert node.agent.http("/readyz") == (
        503, f"no salt for epoch {tai_epoch()}: SYNs go to the backends unguarded (failurePolicy open)\n")
    node.write(unit_config("proxy", node.keys).to_yaml())
    node.agent.wait_ready()


def test_a_file_for_the_other_role_is_rejected(node):
    node.write(unit_config("backend").to_yaml())
    node.agent.start()
    wait_for(lambda: "this agent runs --role proxy" in node.agent.http("/readyz")[1], "the role error")


def test_packets_never_see_a_half_written_configuration(proxy, salts):
    """Two configurations that differ in which policy owns the service: a
    packet must meet one of them whole (SYN+ACK with its window scale), never
    a service pointing at a policy the other one removed (passed untouched)."""
    a = unit_config("proxy", UNIT_KEYS)
    b_policies = [p.model_copy(update={"id": p.id + 100}) for p in a.policies]
    b_policies[0] = b_policies[0].model_copy(
        update={"cookie": b_policies[0].cookie.model_copy(update={"window_scale": 9})})
    b = a.model_copy(update={"policies": b_policies})
    syn = tcp_frame(CLIENT_V4, SERVICE_V4, 40000, PORT_FULL, "S", options=[("WScale", 2)])
    stop = threading.Event()
    flips = []

    def flip() -> None:
        while not stop.is_set():
            for cfg in (b, a):
                proxy.apply(cfg)
                flips.append(cfg)

    t = threading.Thread(target=flip)
    t.start()
    answers, deadline = [], time.monotonic() + 60
    try:
        # Only the kernel call in this loop: parsing here would starve the
        # flipping thread of the GIL.
        while len(flips) < 10 and time.monotonic() < deadline:
            run = proxy.program.test_run(syn)
            answers.append((run.retval, run.data))
    finally:
        stop.set()
        t.join()
        proxy.apply(a)
    assert len(flips) >= 10 and len(answers) > 100
    assert {retval for retval, _ in answers} == {TC_ACT_REDIRECT}
    seen = {dict(Ether(data)[TCP].options)["WScale"] for _, data in set(answers)}
    assert seen == {POLICY_FULL.cookie.window_scale, 9}


@pytest.mark.parametrize("listen, url", [("127.0.0.1:0", "http://127.0.0.1:{port}"),
                                         ("[::1]:0", "http://[::1]:{port}")])
def test_probes_listen_on_ipv4_and_ipv6(listen, url):
    state = AgentState(role="proxy", instance="t", not_ready=lambda: None)
    server = serve(listen, state, lambda: {c: 0 for c in Counter})
    try:
        base = url.format(port=server.server_address[1])
        with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
            assert b'synfleet_dataplane_packets_total{event="syn_answered"' in r.read()
    finally:
        server.shutdown()
        server.server_close()


def pinned_max_entries(path: str) -> int:
    pinned = Map.open_pinned(path)
    try:
        return pinned.max_entries
    finally:
        pinned.close()


def test_an_upgrade_that_enlarges_a_map_keeps_the_previous_program_until_a_configuration_fills_it(node):
    """A release whose object has a larger map than the pinned one (the salt map
    grew from 4 slots to 4096 in ABI 4) starts on an empty map: swapping its
    program in before a configuration filled it would leave SYNs without a salt.
    Once swapped, pins of maps the release no longer has go."""
    node.agent.start()
    node.agent.wait_ready()
    previous = node.tc_program_id()
    node.agent.signal(signal.SIGTERM)
    # What the previous release left pinned: a four-slot salt map, and a map
    # this release no longer has.
    salts_pin, dropped_pin = os.path.join(node.pins(), "salts"), os.path.join(node.pins(), "salts_v3")
    os.unlink(salts_pin)
    for path, name in ((salts_pin, "salts"), (dropped_pin, "salts_v3")):
        subprocess.run(["bpftool", "map", "create", path, "type", "array", "key", "4",
                        "value", str(ctypes.sizeof(SaltValue)), "entries", "4", "name", name], check=True)
    good = open(node.path).read()
    node.write("role: [")        # the configuration is not there yet
    node.agent.start()
    status, body = wait_for(lambda: (r := node.agent.http("/readyz"))[0] == 503 and "upgrade" in r[1] and r,
                            "the upgrade waiting")
    assert "upgrade waiting for a configuration to fill its new maps (salts)" in body
    assert node.tc_program_id() == previous, "the new program went in on an empty salt map"
    assert pinned_max_entries(salts_pin) == 4, "a crash now must leave the next agent the same choice"
    node.write(good)
    node.agent.wait_ready()
    assert node.tc_program_id() not in (None, previous)
    assert pinned_max_entries(salts_pin) == abi.SALT_SLOTS
    assert not os.path.exists(dropped_pin), "a map no program uses any more stayed pinned"
    with node.ns.entered(), ProxyDataplane(node.pins()) as dp:
        assert dp.published_salts() == node.salts()


@pytest.mark.parametrize("role", list(schema.Role))
def test_the_policy_table_an_abi_5_agent_pinned_is_replaced_by_the_larger_one_not_refused(role):
    """ABI 5 had 256 policy ids (2 x 256 entries); re-using that pin would fail
    the load, and the agent would stay on the old program for good."""
    require_bpf()
    pins = os.path.join("/sys/fs/bpf", f"synfleet-test-{os.getpid()}-{role.value}")
    os.mkdir(pins)
    try:
        subprocess.run(["bpftool", "map", "create", os.path.join(pins, "policies"), "type", "array", "key", "4",
                        "value", str(ctypes.sizeof(abi.PolicyValue)), "entries", "512", "name", "policies"],
                       check=True)
        with dataplane_for(role, pins) as dp:
            assert "policies" in dp.fresh
            dp.pin_maps(pins)
        assert pinned_max_entries(os.path.join(pins, "policies")) == abi.CONFIG_SLOTS * abi.MAX_POLICIES
    finally:
        subprocess.run(["rm", "-rf", pins], check=True)


def test_the_conntrack_exemption_names_every_protected_service_in_both_directions():
    services = [schema.ServiceEndpoint(address="2001:db8::10", port=443),
                schema.ServiceEndpoint(address="198.51.100.10", port=80),
                schema.ServiceEndpoint(address="198.51.100.9", port=8080)]
    text = notrack.ruleset("web-1", services)
    assert text.startswith("table inet synfleet_web_1 {")
    assert "ip daddr . tcp dport { 198.51.100.9 . 8080, 198.51.100.10 . 80 } notrack" in text
    assert "ip6 daddr . tcp dport { 2001:db8::10 . 443 } notrack" in text
    assert "ip saddr . tcp sport { 198.51.100.9 . 8080, 198.51.100.10 . 80 } notrack" in text
    # Before connection tracking (priority -200) sees the segment.
    assert text.count("priority raw;") == 2
    assert "ip6" not in notrack.ruleset("web", services[1:])
