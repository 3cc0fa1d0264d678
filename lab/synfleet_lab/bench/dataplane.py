"""`synfleet bench dataplane`: ns per packet of each data-plane path, and of
the pieces a path is made of (see lab/bpf/bench.bpf.c for the harness).

Two ways to time a program, both with at least 10^6 packets per figure:
- repeated: BPF_PROG_TEST_RUN runs it `repeat` times on one packet that
  bench_restore puts back each time; the restore's own cost is subtracted.
- live: paths that encapsulate cannot run twice on one skb, so the program sits
  on the tcx hook of a veth and receives fresh skbs (XDP live frames passed to
  the stack); the kernel's run-time statistics time it, and a no-op program
  timed the same way gives the statistics' own cost, which is subtracted.
"""

from __future__ import annotations

import ctypes
import ipaddress
import platform
import struct
from collections.abc import Callable
from dataclasses import dataclass

from synfleet.abi import Counter, SaltValue
from synfleet.bpf import BpfObject, Program, TypedMap, run_statistics_enabled
from synfleet.bpf.links import Link, Position
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
from synfleet_lab.bench.machine import cpu_model
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import ENCAP_PORT, testbed_config
from synfleet_lab.testbed.configs import SERVICE_PORT as PORT
from synfleet_lab.testbed.lab import proxy_node_namespace

NODE_V4, NODE_V6, BACKEND_V4 = "198.18.0.1", "2001:db8:18::1", "198.18.0.2"
PEER_V4 = "198.18.0.3"      # the backend a flow had before a change of the backend set
CLIENT, SERVICE = "198.18.1.7", "198.19.0.10"
ROTATION_S = 3600
TC_ACT_OK, TC_ACT_REDIRECT, XDP_TX = 0, 7, 3
FRAME_MAX = 256
# The veth the live paths run on (its peer drops what they send).
HOOK, PEER = "sf0", "sf1"


class _BenchFrame(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("bytes", ctypes.c_uint8 * FRAME_MAX)]


class _PartInput(ctypes.Structure):
    """struct part_input of lab/bpf/bench.bpf.c."""

    _fields_ = [("rotation_ns", ctypes.c_uint64), ("salt", SaltValue), ("addr", ctypes.c_uint64 * 4),
                ("ports", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("src", ctypes.c_uint32),
                ("dst", ctypes.c_uint32)]


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    program: str          # "proxy", "proxy_xdp" or "backend"
    frame: bytes
    expect: int           # verdict that proves the intended path ran (repeated)
    # Live: the counter that must move once per packet to prove the path.
    proof: Counter | None = None


@dataclass(frozen=True)
class Part:
    key: str
    program: str          # the part_* program in bench.bpf.c
    label: str


PARTS = (
    Part("part_clock_ns", "part_clock", "clock read (bpf_ktime_get_tai_ns)"),
    Part("part_epoch_ns", "part_epoch", "clock read + epoch division"),
    Part("part_options_ns", "part_options", "copy + parse a Linux SYN's 20 option bytes"),
    Part("part_siphash_ns", "part_siphash", "SipHash-2-4 of an IPv4 cookie message"),
    Part("part_checksums_ns", "part_checksums", "SYN+ACK IPv4 + TCP checksums"),
    Part("part_fib_ns", "part_fib", "route + neighbour lookup (bpf_fib_lookup)"),
)


class Harness:
    def __init__(self, programs: dict[str, Program], ifindex: int) -> None:
        self.obj = BpfObject(lab_object("bench")).load()
        self.programs = programs
        self.ifindex = ifindex
        self.template = TypedMap(self.obj.map("template"), ctypes.c_uint32, _BenchFrame)
        self.targets = {"tc": TypedMap(self.obj.map("target"), ctypes.c_uint32, ctypes.c_uint32),
                        "xdp": TypedMap(self.obj.map("xdp_target"), ctypes.c_uint32, ctypes.c_uint32)}
        self.restore = {"tc": self.obj.program("bench_restore"), "xdp": self.obj.program("bench_restore_xdp")}
        self.noop = {"tc": self.obj.program("bench_noop"), "xdp": self.obj.program("bench_noop_xdp")}
        self.inject = self.obj.program("bench_inject")
        self.part_inputs = TypedMap(self.obj.map("part_inputs"), ctypes.c_uint32, _PartInput)

    def _set_template(self, frame: bytes) -> None:
        f = _BenchFrame(len=len(frame))
        ctypes.memmove(f.bytes, frame, len(frame))
        self.template.put(ctypes.c_uint32(0), f)

    def _repeated_run(self, hook: str, frame: bytes, program: Program, repeat: int) -> tuple[int, int]:
        self._set_template(frame)
        self.targets[hook].put(ctypes.c_uint32(0), ctypes.c_uint32(program.fd))
        r = self.restore[hook].test_run(frame, repeat=repeat)
        return r.retval, r.duration_ns

    def repeated(self, case: Case, repeat: int, rounds: int) -> float:
        hook = "xdp" if case.program == "proxy_xdp" else "tc"
        program = self.programs[case.program]
        retval, _ = self._repeated_run(hook, case.frame, program, 1)
        if retval != case.expect:
            raise RuntimeError(f"{case.key}: verdict {retval}, expected {case.expect}: "
                               "the benchmark would not measure the intended path")
        return _above_baseline(lambda: self._repeated_run(hook, case.frame, program, repeat)[1],
                               lambda: self._repeated_run(hook, case.frame, self.noop[hook], repeat)[1], rounds)

    def _live_ns(self, program: Program, frame: bytes, packets: int) -> float:
        self._set_template(frame)
        with Link.tcx(program, self.ifindex, Position()) as link:
            before = program.run_statistics()
            self.inject.run_live_frames(frame, self.ifindex, packets)
            after = program.run_statistics()
            link.detach()
        if after.runs - before.runs < packets:
            raise RuntimeError(f"{program.name} ran {after.runs - before.runs} times for {packets} packets")
        return (after.run_time_ns - before.run_time_ns) / (after.runs - before.runs)

    def live(self, case: Case, dataplane: ProxyDataplane | BackendDataplane, packets: int, rounds: int) -> float:
        def timed() -> float:
            before = dataplane.counter_values()[case.proof]
            ns = self._live_ns(self.programs[case.program], case.frame, packets)
            moved = dataplane.counter_values()[case.proof] - before
            if moved != packets:
                raise RuntimeError(f"{case.key}: {case.proof.name.lower()} moved {moved} times for {packets} "
                                   "packets: the benchmark would not measure the intended path")
            return ns
        return _above_baseline(timed, lambda: self._live_ns(self.noop["tc"], case.frame, packets), rounds)

    def part(self, part: Part, frame: bytes, repeat: int, rounds: int) -> float:
        program = self.obj.program(part.program)

        def timed() -> int:
            r = program.test_run(frame, repeat=repeat)
            if r.retval != TC_ACT_OK:
                raise RuntimeError(f"{part.key}: verdict {r.retval}: the part did not run through")
            return r.duration_ns
        return _above_baseline(timed, lambda: self.noop["tc"].test_run(frame, repeat=repeat).duration_ns, rounds)

    def set_part_inputs(self, salt: SaltValue) -> None:
        src, dst = (int.from_bytes(ipaddress.ip_address(a).packed, "little") for a in (NODE_V4, BACKEND_V4))
        self.part_inputs.put(ctypes.c_uint32(0), _PartInput(
            rotation_ns=ROTATION_S * 10**9, salt=salt, addr=(ctypes.c_uint64 * 4)(src << 32 | dst),
            ports=0x50009C40, ifindex=self.ifindex, src=src, dst=dst))


def _above_baseline(timed: Callable[[], float], baseline: Callable[[], float], rounds: int) -> float:
    """The best of `rounds` timings less the best of as many baseline timings,
    taken alternately. Each side's best is its least disturbed run; pairing a
    run with one baseline run instead lets a single preempted baseline cancel
    a ~30 ns piece out entirely."""
    runs = [(timed(), baseline()) for _ in range(rounds)]
    return max(min(r for r, _ in runs) - min(b for _, b in runs), 0)


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
        Case("proxy_xdp_syn_ns", "proxy XDP front SYN -> SYN+ACK", "proxy_xdp", syn, XDP_TX),
        Case("proxy_ack_ns", "proxy ACK validate + encapsulate + redirect", "proxy", ack, TC_ACT_REDIRECT,
             Counter.COOKIE_VALID),
        Case("proxy_passthrough_ns", "proxy established data, encapsulated", "proxy", data, TC_ACT_REDIRECT,
             Counter.FORWARDED),
        Case("backend_decap_ns", "backend decapsulation", "backend", encap, TC_ACT_OK),
        Case("backend_chain_ns", "backend hands a flow on to its previous backend", "backend", chained,
             TC_ACT_REDIRECT),
    ]


def after_a_change(salt: bytes, epoch: int) -> list[Case]:
    """Paths once the backend set changed: every slot names a previous backend."""
    ack = next(c for c in cases(salt, epoch) if c.key == "proxy_ack_ns")
    return [Case("proxy_ack_previous_ns", "proxy ACK validate + encapsulate, naming the previous backend",
                 "proxy", ack.frame, TC_ACT_REDIRECT, Counter.PREVIOUS_NAMED)]


def run(repeat: int = 1_000_000, rounds: int = 3) -> dict:
    """Best of `rounds` for each path and part (the least disturbed measurement)."""
    epoch = current_epoch(ROTATION_S)
    key = fresh_key()
    salt = derive_salt(key.key, key.generation, epoch)
    with proxy_node_namespace(NODE_V4, NODE_V6) as ns:
        peer_mac = ns.mac(PEER)
        for address in (BACKEND_V4, PEER_V4):
            ns.neighbour(HOOK, address, peer_mac)
        with ProxyDataplane() as proxy, BackendDataplane() as backend, BpfObject(lab_object("sink")).load() as sink, \
                Link.tcx(sink.program("sink"), ns.index(PEER), Position()), run_statistics_enabled():
            common = dict(node_v6=NODE_V6, services={4: SERVICE}, rotation_s=ROTATION_S)
            proxy_config = lambda backend: testbed_config(  # noqa: E731
                "proxy", interfaces=[HOOK], node_v4=NODE_V4, backends={4: [backend]}, salt_keys=[key], **common)
            proxy.apply(proxy_config(BACKEND_V4))
            backend.apply(testbed_config("backend", interfaces=[HOOK], node_v4=BACKEND_V4,
                                         allowed_proxies=[NODE_V4], peer_backends=[PEER_V4], **common))
            proxy.set_salts({epoch: salt})
            harness = Harness({"proxy": proxy.program, "proxy_xdp": proxy.xdp_program,
                               "backend": backend.program}, ns.index(HOOK))
            dataplanes = {"proxy": proxy, "backend": backend}

            def measure(case: Case) -> float:
                if case.proof is None:
                    return harness.repeated(case, repeat, rounds)
                return harness.live(case, dataplanes[case.program], repeat, rounds)

            paths = cases(salt, epoch)
            results = {c.key: measure(c) for c in paths}
            harness.set_part_inputs(SaltValue.of(epoch, salt))
            syn = next(c.frame for c in paths if c.key == "proxy_syn_ns")
            results |= {p.key: harness.part(p, syn, repeat, rounds) for p in PARTS}
            proxy.apply(proxy_config(PEER_V4))
            results |= {c.key: measure(c) for c in after_a_change(salt, epoch)}
    return results | {"repeat": repeat, "kernel": platform.release(), "cpu": cpu_model()}
