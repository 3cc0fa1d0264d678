"""`synfleet bench dataplane`: ns per packet of each data-plane path, through
BPF_PROG_TEST_RUN with a large repeat count (see lab/bpf/bench.bpf.c for how the
frame is restored between repetitions and how that cost is taken off)."""

from __future__ import annotations

import ctypes
import ipaddress
import platform
import struct
from dataclasses import dataclass

from synfleet.bpf import BpfObject, Program, TypedMap
from synfleet.cookie import (
    CookieAttributes,
    FourTuple,
    cookie_make,
    current_epoch,
    derive_salt,
    fresh_key,
    synack_tsval,
)
from synfleet.dataplane.programs import BackendDataplane, ProxyDataplane
from synfleet_lab import frames
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import ENCAP_PORT, testbed_config
from synfleet_lab.testbed.configs import SERVICE_PORT as PORT
from synfleet_lab.testbed.lab import proxy_node_namespace

NODE_V4, NODE_V6, BACKEND_V4 = "198.18.0.1", "2001:db8:18::1", "198.18.0.2"
PEER_V4 = "198.18.0.3"      # the backend a flow had before a change of the backend set
CLIENT, SERVICE = "198.18.1.7", "198.19.0.10"
ROTATION_S = 3600
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
FRAME_MAX = 256


class _BenchFrame(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("bytes", ctypes.c_uint8 * FRAME_MAX)]


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    program: str          # "proxy" or "backend"
    frame: bytes
    expect: int           # verdict that proves the intended path ran
    # The kernel refuses to encapsulate an skb twice, and BPF cannot clear the
    # mark, so encapsulating paths are timed one fresh skb per run instead.
    repeatable: bool = True


class Harness:
    def __init__(self, proxy: Program, backend: Program) -> None:
        self.obj = BpfObject(lab_object("bench")).load()
        self.restore = self.obj.program("bench_restore")
        self.noop = self.obj.program("bench_noop")
        self.template = TypedMap(self.obj.map("template"), ctypes.c_uint32, _BenchFrame)
        self.target = TypedMap(self.obj.map("target"), ctypes.c_uint32, ctypes.c_uint32)
        self.programs = {"proxy": proxy, "backend": backend}

    def run(self, frame: bytes, program: Program, repeat: int) -> tuple[int, int]:
        f = _BenchFrame(len=len(frame))
        ctypes.memmove(f.bytes, frame, len(frame))
        self.template.put(ctypes.c_uint32(0), f)
        self.target.put(ctypes.c_uint32(0), ctypes.c_uint32(program.fd))
        r = self.restore.test_run(frame, repeat=repeat)
        return r.retval, r.duration_ns

    def measure(self, case: Case, repeat: int) -> float:
        program = self.programs[case.program]
        retval, _ = self.run(case.frame, program, 1)
        if retval != case.expect:
            raise RuntimeError(f"{case.key}: verdict {retval}, expected {case.expect}: "
                               "the benchmark would not measure the intended path")
        if case.repeatable:
            _, with_prog = self.run(case.frame, program, repeat)
            _, restore_only = self.run(case.frame, self.noop, repeat)
            return max(with_prog - restore_only, 0)
        return max(_single_shot_ns(program, case.frame, repeat)
                   - _single_shot_ns(self.noop, case.frame, repeat), 0)


def _single_shot_ns(program: Program, frame: bytes, runs: int) -> float:
    """Mean of `runs` kernel-timed single runs, each on a fresh skb."""
    total = 0
    for _ in range(runs):
        r = program.test_run(frame)
        total += r.duration_ns
    return total / runs


def cases(salt: bytes, epoch: int) -> list[Case]:
    t = FourTuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(SERVICE), 40000, PORT)
    isn = 0x12345678
    cookie = cookie_make(salt, epoch, t, isn, CookieAttributes(3, 7, True, True), timestamps=True)
    syn = frames.tcp(CLIENT, SERVICE, 40000, PORT, frames.SYN | frames.ECE | frames.CWR, isn, 0,
                     frames.linux_syn_options(1460, 7, tsval=1000))
    ack = frames.tcp(CLIENT, SERVICE, 40000, PORT, frames.ACK, isn + 1, cookie + 1,
                     frames.ts_option(1001, synack_tsval(salt, epoch, t, isn, cookie)))
    data = frames.tcp(CLIENT, SERVICE, 40000, PORT, frames.ACK | frames.PSH, isn + 1000, cookie + 5000,
                      frames.ts_option(1050, 2050), payload=bytes(100))
    encap = frames.udp_encap(NODE_V4, BACKEND_V4, 50000, ENCAP_PORT,
                             struct.pack("!BBH", 1, 0, 1) + data[14:])
    # Version 2, naming the flow's previous backend: this node has no socket for it.
    chained = frames.udp_encap(NODE_V4, BACKEND_V4, 50000, ENCAP_PORT,
                               struct.pack("!BBH4s", 2, 0, 1, ipaddress.ip_address(PEER_V4).packed) + data[14:])
    return [
        Case("proxy_syn_ns", "proxy SYN -> SYN+ACK", "proxy", syn, TC_ACT_REDIRECT),
        Case("proxy_ack_ns", "proxy ACK validate + encapsulate", "proxy", ack, TC_ACT_REDIRECT, False),
        Case("proxy_passthrough_ns", "proxy established data, encapsulated", "proxy", data, TC_ACT_REDIRECT,
             False),
        Case("backend_decap_ns", "backend decapsulation", "backend", encap, TC_ACT_OK),
        Case("backend_chain_ns", "backend hands a flow on to its previous backend", "backend", chained,
             TC_ACT_REDIRECT),
    ]


def after_a_change(salt: bytes, epoch: int) -> list[Case]:
    """Paths once the backend set changed: every slot names a previous backend."""
    ack = next(c for c in cases(salt, epoch) if c.key == "proxy_ack_ns")
    return [Case("proxy_ack_previous_ns", "proxy ACK validate + encapsulate, naming the previous backend",
                 "proxy", ack.frame, TC_ACT_REDIRECT, False)]


def run(repeat: int = 1_000_000, rounds: int = 3) -> dict:
    """Best of `rounds` for each path (the least disturbed measurement)."""
    epoch = current_epoch(ROTATION_S)
    key = fresh_key()
    salt = derive_salt(key.key, key.generation, epoch)
    with proxy_node_namespace(NODE_V4, NODE_V6):
        with ProxyDataplane() as proxy, BackendDataplane() as backend:
            common = dict(node_v6=NODE_V6, services={4: SERVICE}, rotation_s=ROTATION_S)
            proxy_config = lambda backend: testbed_config(  # noqa: E731
                "proxy", interfaces=["sf0"], node_v4=NODE_V4, backends={4: [backend]}, salt_keys=[key], **common)
            proxy.apply(proxy_config(BACKEND_V4))
            backend.apply(testbed_config("backend", interfaces=["sf0"], node_v4=BACKEND_V4,
                                         allowed_proxies=[NODE_V4], peer_backends=[PEER_V4], **common))
            proxy.set_salts({epoch: salt})
            harness = Harness(proxy.program, backend.program)
            results = {c.key: min(harness.measure(c, repeat) for _ in range(rounds))
                       for c in cases(salt, epoch)}
            proxy.apply(proxy_config(PEER_V4))
            results |= {c.key: min(harness.measure(c, repeat) for _ in range(rounds))
                        for c in after_a_change(salt, epoch)}
    return results | {"repeat": repeat, "kernel": platform.release(), "cpu": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
