"""Helpers for the namespace end-to-end tests: a live fleet and packet captures."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

from synfleet.agent.hooks import legacy_programs
from synfleet.bpf import XdpHook
from synfleet.bpf.links import tcx_programs
from synfleet.cookie import fresh_key
from synfleet_lab.testbed.clients import pattern  # noqa: F401
from synfleet_lab.testbed.fleet import ENCAP_PORT, SERVICE_PORT, Fleet, recv_exact  # noqa: F401
from synfleet_lab.testbed.netns import NetNS

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by Python 3.11


@contextlib.contextmanager
def running_fleet(rotation_s: int):
    """A three-namespace fleet with a fresh master key."""
    f = Fleet.start([fresh_key()], rotation_s)
    try:
        yield f
    finally:
        f.stop()


class Capture:
    """Every frame seen on an interface (both directions), from a thread."""

    def __init__(self, ns: NetNS, ifname: str) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames: list[tuple[int, bytes]] = []   # (pkttype, frame)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.frames.append((addr[2], data))

    def stop(self) -> list[tuple[int, bytes]]:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.frames


class EchoServer:
    """Reads `size` bytes, answers with `size` bytes of its own, then holds the
    connection until told to close (so `ss` can look at it)."""

    def __init__(self, ns: NetNS, address: str, size: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with ns.entered():
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, SERVICE_PORT))
            self.sock.listen(64)
        self.size = size
        self.received: list[bytes] = []
        self.options: dict = {}
        self.release = threading.Event()
        self.errors: list[BaseException] = []
        self.sock.settimeout(15)
        self._thread = threading.Thread(target=self._serve_one, daemon=True)
        self._thread.start()

    def _serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(15)
                self.received.append(recv_exact(conn, self.size))
                conn.sendall(pattern(self.size, b"server"))
                self.options = tcp_info_options(conn)
                self.release.wait(15)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def close(self) -> None:
        self.release.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        except OSError:
            pass
        self._thread.join(20)
        self.sock.close()


TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE, TCPI_OPT_ECN = 1, 2, 4, 8


def tcp_info_options(sock: socket.socket) -> dict:
    """What the kernel negotiated for a connection (struct tcp_info): options,
    window scales (send, receive) and the MSS it sends with."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    opts, scales = info[5], info[6]
    return {"ts": bool(opts & TCPI_OPT_TIMESTAMPS), "sack": bool(opts & TCPI_OPT_SACK),
            "ecn": bool(opts & TCPI_OPT_ECN),
            "wscale": (scales & 0xF, scales >> 4) if opts & TCPI_OPT_WSCALE else None,
            "mss": int.from_bytes(info[16:20], sys.byteorder)}


def wait_for(predicate, what: str, timeout: float = 10.0):
    """Poll until `predicate()` is truthy and return its value; fail naming `what`."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")


def xdp_tx_count(ns: NetNS, ifname: str) -> int:
    """Frames an XDP program on the veth `ifname` sent back with XDP_TX (veth's own count)."""
    return ns.ethtool_stats(ifname)["rx_queue_0_xdp_tx"]


def xdp_program_id(ns: NetNS, ifname: str) -> int | None:
    """The id of the program in `ifname`'s native XDP slot, or None."""
    with ns.entered():
        return XdpHook(socket.if_nametoindex(ifname)).query()


def ingress_program_id(ns: NetNS, ifname: str) -> int | None:
    """The id of the synfleet program on `ifname`'s TC ingress in `ns`."""
    with ns.entered():
        return synfleet_ingress_program(ifname)


def synfleet_ingress_program(ifname: str) -> int | None:
    """The id of the synfleet program on `ifname`'s TC ingress (a tcx link or a
    clsact filter) in this thread's network namespace, or None."""
    ifindex = socket.if_nametoindex(ifname)
    found = tcx_programs(ifindex) + [p for p, _ in legacy_programs(ifindex)]
    ids = [p.program_id for p in found if p.name.startswith("synfleet_")]
    assert len(ids) <= 1, f"more than one synfleet program on {ifname}: {found}"
    return ids[0] if ids else None
