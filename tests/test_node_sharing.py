"""The agent on a node it shares: other projects' TC programs (a tcx one and a
legacy clsact filter, as Cilium's and an older CNI's would be) and XDP
programs, interfaces that come and go, and where its metrics listen."""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import pytest

from conftest import CLIENT_V4, PORT_FULL, PROXY_V4, SERVICE_V4, require_bpf, unit_config
from fleet import ingress_program_id, wait_for, xdp_program_id
from packets import tcp_frame
from synfleet.agent.agent import uninstall
from synfleet.agent.hooks import legacy_programs
from synfleet.bpf import BpfObject, TcHook, XdpHook
from synfleet.bpf.links import Link, Order, Position, tcx_programs
from synfleet.config import schema
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.fabric import Fabric
from test_agent import OneNode, attached_hooks, with_xdp

pytestmark = pytest.mark.netns
UNPROTECTED_PORT = 9


class ForeignProgram:
    """lab/bpf/cni_count.bpf.c loaded and attached the way another project would."""

    def __init__(self, node: OneNode) -> None:
        self.ns = node.ns
        self.obj = BpfObject(lab_object("cni_count")).load()
        self.program = self.obj.program("cni_count")
        self.link: Link | None = None
        self.slot: TcHook | None = None

    def attach_tcx(self, ifname: str = "sf0") -> None:
        with self.ns.entered():
            self.link = Link.tcx(self.program, socket.if_nametoindex(ifname), Position(Order.LAST))

    def attach_clsact(self, ifname: str = "sf0", priority: int = 1) -> None:
        with self.ns.entered():
            self.slot = TcHook(socket.if_nametoindex(ifname), handle=1, priority=priority)
            self.slot.attach(self.program, replace=False)

    def seen(self) -> int:
        """IPv4 TCP segments it has seen."""
        return int.from_bytes(self.obj.map("seen").lookup((0).to_bytes(4, "little")), "little")

    def close(self) -> None:
        if self.link:
            self.link.close()       # not pinned: closing the last fd detaches it
        if self.slot:
            with self.ns.entered(), contextlib.suppress(OSError):
                self.slot.detach()
        self.obj.close()


@pytest.fixture
def node(tmp_path):
    require_bpf()
    n = OneNode(tmp_path)
    yield n
    n.close()


@pytest.fixture
def foreign(node):
    programs: list[ForeignProgram] = []

    def load() -> ForeignProgram:
        programs.append(ForeignProgram(node))
        return programs[-1]
    yield load
    for p in programs:
        p.close()


def tcx_names(node: OneNode) -> list[str]:
    with node.ns.entered():
        return [p.name for p in tcx_programs(socket.if_nametoindex("sf0"))]


def clsact_names(node: OneNode) -> list[str]:
    with node.ns.entered():
        return [p.name for p, _ in legacy_programs(socket.if_nametoindex("sf0"))]


def send(node: OneNode, *frames: bytes) -> None:
    """Into sf0's ingress, from its peer."""
    with node.ns.entered(), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("sf1", 0))
        for frame in frames:
            sock.send(frame)


def syn(sport: int, port: int = PORT_FULL) -> bytes:
    return tcp_frame(CLIENT_V4, SERVICE_V4, sport, port, flags="S", seq=7)


def seen_after(node, programs, *frames, answered: int | None) -> list[int]:
    """How many of `frames` each program saw; with `answered`, once the
    running agent answered that many of them (and no more)."""
    before = [p.seen() for p in programs]
    total = None if answered is None else node.agent.metrics()["syn_answered"] + answered
    send(node, *frames)
    if total is not None:
        wait_for(lambda: node.agent.metrics()["syn_answered"] == total, "the agent's answers")
    time.sleep(0.2)      # anything the others would see has arrived by now
    if total is not None:
        assert node.agent.metrics()["syn_answered"] == total
    return [p.seen() - b for p, b in zip(programs, before)]


def with_attach(node: OneNode, **attach):
    cfg = unit_config("proxy", node.keys)
    return cfg.model_copy(update={"node": cfg.node.model_copy(update={"attach": schema.Attach.model_validate(attach)})})


def test_the_agent_runs_beside_a_tcx_program_and_a_clsact_filter_in_the_configured_order(node, foreign):
    cni, old_cni = foreign(), foreign()
    cni.attach_tcx()
    old_cni.attach_clsact(priority=1)       # handle 1 priority 1: the slot earlier releases took
    node.agent.start()
    node.agent.wait_ready()
    assert tcx_names(node) == ["synfleet_proxy", "cni_count"] and clsact_names(node) == ["cni_count"]
    assert "cni_count" in node.agent.log() and "sharing the hook" in node.agent.log()
    # First (the default): the protected SYN is answered and goes no further;
    # what is not ours passes on through both of the others.
    assert seen_after(node, [cni, old_cni], syn(1001), answered=1) == [0, 0]
    assert seen_after(node, [cni, old_cni], syn(1002, UNPROTECTED_PORT), answered=0) == [1, 1]

    node.write(with_attach(node, order="last").to_yaml())
    wait_for(lambda: tcx_names(node) == ["cni_count", "synfleet_proxy"], "synfleet after the tcx program")
    assert seen_after(node, [cni, old_cni], syn(1003), answered=1) == [1, 0]

    with node.ns.entered():
        ours = [p for p in tcx_programs(socket.if_nametoindex("sf0")) if p.name == "synfleet_proxy"][0]
    node.agent.signal(signal.SIGKILL)
    node.agent.start()
    node.agent.wait_ready()
    with node.ns.entered():
        again = [p for p in tcx_programs(socket.if_nametoindex("sf0")) if p.name == "synfleet_proxy"][0]
    assert again.link_id == ours.link_id and again.program_id != ours.program_id, "updated in place"
    assert tcx_names(node) == ["cni_count", "synfleet_proxy"] and clsact_names(node) == ["cni_count"]

    node.agent.signal(signal.SIGTERM)
    with node.ns.entered():
        assert uninstall(node.agent.instance) == ["sf0"]
    assert tcx_names(node) == ["cni_count"] and clsact_names(node) == ["cni_count"]
    assert seen_after(node, [cni, old_cni], syn(1004), answered=None) == [1, 1]


def test_the_agent_runs_just_before_a_named_program(node, foreign):
    first, cni = foreign(), foreign()
    first.attach_tcx()
    cni.attach_tcx()
    with node.ns.entered():
        # Two of the same name would make "before cni_count" ambiguous: the first one wins.
        assert [p.name for p in tcx_programs(socket.if_nametoindex("sf0"))] == ["cni_count", "cni_count"]
    node.write(with_attach(node, after="cni_count").to_yaml())
    node.agent.start()
    node.agent.wait_ready()
    assert tcx_names(node) == ["cni_count", "synfleet_proxy", "cni_count"]


def test_a_named_program_that_is_absent_is_waited_for(node, foreign):
    node.write(with_attach(node, before="cni_count").to_yaml())
    node.agent.start()
    status, body = wait_for(lambda: (r := node.agent.http("/readyz"))[0] == 503 and "cni_count" in r[1] and r,
                            "the reason")
    assert "no program named cni_count on tcx ingress" in body and ingress_program_id(node.ns, "sf0") is None
    foreign().attach_tcx()
    node.agent.wait_ready(timeout=5)
    assert tcx_names(node) == ["synfleet_proxy", "cni_count"]


def test_in_tc_mode_a_taken_clsact_slot_is_not_replaced(node, foreign):
    cni = foreign()
    cni.attach_clsact(priority=1)
    node.write(with_attach(node, mode="tc").to_yaml())
    node.agent.start()
    status, body = wait_for(lambda: (r := node.agent.http("/readyz"))[0] == 503 and "priority 1" in r[1] and r,
                            "the reason")
    assert f"runs cni_count (program id {cni.program.id}): not replaced" in body
    assert clsact_names(node) == ["cni_count"] and tcx_names(node) == []
    node.write(with_attach(node, mode="tc", tcPriority=2).to_yaml())
    node.agent.wait_ready()
    assert clsact_names(node) == ["cni_count", "synfleet_proxy"] and tcx_names(node) == []
    assert seen_after(node, [cni], syn(1005), syn(1006, UNPROTECTED_PORT), answered=1) == [2]   # priority 1 runs first
    # Back to tcx: the link goes in and the filter of mode tc goes.
    node.write(with_attach(node, mode="tcx").to_yaml())
    wait_for(lambda: tcx_names(node) == ["synfleet_proxy"] and clsact_names(node) == ["cni_count"],
             "the move to tcx")


def test_a_foreign_xdp_program_is_never_replaced(node):
    with node.ns.entered(), BpfObject(lab_object("xdp_pass")).load() as other:
        hook = XdpHook(socket.if_nametoindex("sf0"))
        hook.attach(other.program("xdp_pass"))
        theirs = hook.query()
    try:
        node.write(with_xdp(unit_config("proxy", node.keys), True).to_yaml())
        node.agent.start()
        status, body = wait_for(lambda: (r := node.agent.http("/readyz"))[0] == 503 and "XDP" in r[1] and r,
                                "the reason")
        assert f"no XDP front on sf0: the XDP slot runs xdp_pass (program id {theirs})" in body
        assert xdp_program_id(node.ns, "sf0") == theirs and ingress_program_id(node.ns, "sf0") is not None
        node.agent.signal(signal.SIGKILL)
        node.agent.start()
        wait_for(lambda: "xdp_pass" in node.agent.http("/readyz")[1], "the reason again")
        with node.ns.entered():
            assert uninstall(node.agent.instance) == ["sf0"]
        assert xdp_program_id(node.ns, "sf0") == theirs
    finally:
        with node.ns.entered():
            hook.detach()


def test_an_interface_deleted_and_recreated_gets_its_hook_back_within_two_seconds(node):
    node.agent.start()
    node.agent.wait_ready()
    node.ns.run("ip", "link", "del", "sf0")
    wait_for(lambda: node.agent.http("/readyz") == (503, "tcx on sf0: interface sf0 does not exist\n"),
             "not ready while it is gone")
    assert attached_hooks(node) == set()
    Fabric.link(node.ns, "sf0", node.ns, "sf1", [f"{PROXY_V4}/24"])
    recreated = time.monotonic()
    wait_for(lambda: ingress_program_id(node.ns, "sf0") is not None, "the hook back", timeout=2)
    node.agent.wait_ready(timeout=2 - (time.monotonic() - recreated))
    assert seen_after(node, [], syn(1007), answered=1) == []      # and it answers there


def test_metrics_listen_on_loopback_by_default_not_on_the_client_facing_address(node):
    node.agent.start()
    node.agent.wait_ready()          # over 127.0.0.1:9478
    with node.ns.entered():
        for address in (PROXY_V4, "::1"):
            with pytest.raises(ConnectionRefusedError), socket.create_connection((address, 9478), timeout=2):
                pass
