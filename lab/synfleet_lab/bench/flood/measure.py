"""What the flood benchmark measures, on a FloodLab (the topology, one
generator and the defence in place): the SYN rate a defence answers, its
legitimate clients' handshakes during a flood, and what it holds as
connections through it grow."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from synfleet_lab.bench.flood.defences import FLOORS, Attached, defended_by
from synfleet_lab.bench.flood.topology import ATTACKER, DEFENCE_NEAR, SERVICE, FloodTopology
from synfleet_lab.generators import Generator, TrafgenSynGenerator, XdpSynGenerator, pinned_to, syn_template
from synfleet_lab.testbed.configs import SERVICE_PORT

GENERATORS = ("xdp", "trafgen")
LEGIT_FRACTIONS = (25, 50, 100)        # % of a defence's best answered rate
MEMORY_POINTS = (2_500, 5_000, 10_000)     # established connections
CONNECT_TIMEOUT_S = 3.0
MAX_STEP_S = 30.0


@dataclass
class Step:
    offered_target_pps: int | None     # None: as fast as the generator goes
    offered_pps: float
    answered_pps: float
    cpu_busy_s: float
    seconds: float


@dataclass
class Legit:
    """Legitimate clients' handshakes during a flood step."""
    flood_pps: float
    attempts: int
    ok: int
    success: float
    connect_p50_ms: float | None
    connect_p99_ms: float | None

    @classmethod
    def of(cls, connect_ms: list[float | None], flood_pps: float) -> "Legit":
        done = sorted(ms for ms in connect_ms if ms is not None)
        pick = lambda q: round(done[min(len(done) - 1, int(q * len(done)))], 3) if done else None  # noqa: E731
        return cls(round(flood_pps), len(connect_ms), len(done),
                   round(len(done) / len(connect_ms), 4) if connect_ms else 0.0, pick(0.50), pick(0.99))


@dataclass
class Memory:
    """What the defence node holds with `connections` established through it."""
    connections: int
    conntrack_entries: int
    conntrack_bytes: int
    tcp_sockets: int


@dataclass
class DefenceResult:
    max_answered_rate: float = 0.0
    cpu_s_per_million: float | None = None
    steps: list[Step] = field(default_factory=list)
    legit: dict[str, Legit] = field(default_factory=dict)      # by % of max_answered_rate
    memory: list[Memory] = field(default_factory=list)


class FloodLab:
    """A fresh FloodTopology with one generator on the attacker; `close()`
    removes everything. xdp: the generator, the clients and the receive work
    of the attacker's and client's links on the first CPU, the defence node's
    receive work on the last. trafgen: wherever the
    scheduler puts them."""

    def __init__(self, generator: str = "xdp") -> None:
        if generator not in GENERATORS:
            raise ValueError(f"unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
        cpus = sorted(os.sched_getaffinity(0))
        if generator == "xdp" and len(cpus) < 2:
            raise RuntimeError("the xdp generator needs two CPUs: one floods, the other defends")
        self.generator_cpu, self.defence_cpu = (cpus[0], cpus[-1]) if generator == "xdp" else (None, None)
        self.generator_name = generator
        self.workdir = tempfile.mkdtemp(prefix="synfleet-bench-")
        self.generator: Generator | None = None
        self.topology: FloodTopology | None = None
        self._sink: Attached | None = None
        try:
            self.topology = FloodTopology(self.defence_cpu, self.generator_cpu)
            template = syn_template(self.topology.mac[DEFENCE_NEAR], self.topology.mac[ATTACKER], SERVICE,
                                    SERVICE_PORT)
            self.generator = (XdpSynGenerator(self.topology.attacker, "eth0", template, self.generator_cpu)
                              if generator == "xdp" else
                              TrafgenSynGenerator(self.topology.attacker, "eth0", template, self.workdir))
            # The attacker drops the answers at TC ingress, counted on its link (an
            # XDP front's XDP_TX frames already in XDP: defences.py).
            self._sink = Attached()
            self._sink.attach_lab_program(self.topology.attacker, "eth0", "sink")
        except BaseException:
            self.close()
            raise

    def defended_by(self, defence: str) -> contextlib.AbstractContextManager[None]:
        return defended_by(self.topology, defence, self.workdir)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
        if self.generator is not None:
            self.generator.close()
        if self.topology is not None:
            self.topology.close()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.workdir):
                os.unlink(os.path.join(self.workdir, name))
            os.rmdir(self.workdir)

    def __enter__(self) -> "FloodLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect_ms() -> float | None:
    """One handshake to the service, timed; None when it fails. Reset-closed."""
    sock = socket.socket()
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        start = time.monotonic()
        sock.connect((SERVICE, SERVICE_PORT))
        return (time.monotonic() - start) * 1000
    except OSError:
        return None
    finally:
        sock.close()


def _conntrack_object_bytes() -> int:
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith("nf_conntrack "):
                return int(line.split()[3])
    return 0


def _cpu_busy_s(cpu: int | None) -> float:
    """Busy seconds so far (all but idle and iowait) of one CPU, or of the whole machine."""
    label = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        ticks = next([int(x) for x in line.split()[1:]] for line in f if line.split()[0] == label)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def flood_step(lab: FloodLab, rate: int | None, seconds: float) -> Step:
    """Offer `rate` SYNs per second (None: as fast as the generator goes) for `seconds`."""
    if not 0 < seconds <= MAX_STEP_S:
        raise ValueError(f"a step lasts (0, {MAX_STEP_S}] seconds")
    tx0, rx0 = lab.topology.attacker_packets()
    cpu0 = _cpu_busy_s(lab.defence_cpu)
    sent = lab.generator.send(rate, seconds)
    # Frames still queued drain: the step ends when the counters stop, and
    # their answers count as the sending window's.
    counters = lab.topology.attacker_packets()
    while True:
        cpu1 = _cpu_busy_s(lab.defence_cpu)
        time.sleep(0.05)
        settled, counters = counters, lab.topology.attacker_packets()
        if counters == settled:
            break
    tx1, rx1 = counters
    offered = tx1 - tx0 if sent.frames is None else sent.frames
    return Step(rate, offered / sent.seconds, (rx1 - rx0) / sent.seconds, cpu1 - cpu0, sent.seconds)


def legit_during(lab: FloodLab, rate: int, seconds: float) -> Legit:
    """Clients connect one after another from their namespace while a flood of
    `rate` SYN/s runs."""
    connects: list[float | None] = []
    stop = threading.Event()

    def clients() -> None:
        pin = pinned_to(lab.generator_cpu) if lab.generator_cpu is not None else contextlib.nullcontext()
        with lab.topology.client.entered(), pin:
            while not stop.is_set():
                connects.append(_connect_ms())

    worker = threading.Thread(target=clients)
    worker.start()
    try:
        step = flood_step(lab, rate, seconds)
    finally:
        stop.set()
        worker.join()
    return Legit.of(connects, step.offered_pps)


def _defence_memory(lab: FloodLab, connections: int) -> Memory:
    defence = lab.topology.defence
    try:
        entries = int(defence.sysctl_get("net.netfilter.nf_conntrack_count"))
    except FileNotFoundError:       # conntrack never loaded in this namespace
        entries = 0
    with defence.entered(), open("/proc/thread-self/net/sockstat") as f:
        tcp = next(line.split() for line in f if line.startswith("TCP:"))
    # "inuse" is this namespace's; "alloc" would count the whole machine.
    return Memory(connections, entries, entries * _conntrack_object_bytes(), int(tcp[tcp.index("inuse") + 1]))


def memory_with_established(lab: FloodLab, counts: tuple[int, ...]) -> list[Memory]:
    """Open connections through the defence up to each count, measuring the
    defence node at each; all are reset afterwards."""
    held: list[socket.socket] = []
    points = [_defence_memory(lab, 0)]
    try:
        with lab.topology.client.entered():
            for target in counts:
                while len(held) < target:
                    sock = socket.create_connection((SERVICE, SERVICE_PORT), timeout=CONNECT_TIMEOUT_S)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    held.append(sock)
                points.append(_defence_memory(lab, target))
    finally:
        for sock in held:
            sock.close()
    return points


def measure_defence(lab: FloodLab, defence: str, rates: list[int], seconds: float,
                    progress: Callable[[str], None],
                    memory_points: tuple[int, ...] = MEMORY_POINTS) -> DefenceResult:
    """Step the offered rate up until the answered rate stops rising by 2 %,
    then offer as much as the generator can (trafgen's TX ring is faster
    than its paced mode on some machines; live frames overrun any defence).
    Then, for the defences that serve TCP, legitimate clients during floods
    at fractions of that rate, and the defence node's memory as established
    connections grow."""
    result = DefenceResult()

    def offer(rate: int | None) -> bool:
        step = flood_step(lab, rate, seconds)
        result.steps.append(step)
        progress(f"  {defence:<12} offered {step.offered_pps:>9.0f}/s  answered {step.answered_pps:>9.0f}/s")
        if step.answered_pps <= result.max_answered_rate:
            return False
        grew = step.answered_pps > 1.02 * result.max_answered_rate
        result.max_answered_rate = step.answered_pps
        answered = step.answered_pps * step.seconds
        result.cpu_s_per_million = step.cpu_busy_s / (answered / 1e6) if answered else None
        return grew

    with lab.defended_by(defence):
        for rate in rates:
            if not offer(rate):
                break
        offer(None)
        if defence in FLOORS:
            return result       # it answers SYNs and serves nothing
        # Memory first, while the conntrack table holds nothing from earlier clients.
        result.memory = memory_with_established(lab, memory_points)
        last = result.memory[-1]
        progress(f"  {defence:<12} {last.connections} established: {last.conntrack_entries} conntrack entries "
                 f"({last.conntrack_bytes} B), {last.tcp_sockets} TCP sockets on the defence node")
        for pct in LEGIT_FRACTIONS:
            legit = legit_during(lab, max(1, round(result.max_answered_rate * pct / 100)), seconds)
            result.legit[str(pct)] = legit
            progress(f"  {defence:<12} {pct:>3} % flood: {legit.ok}/{legit.attempts} handshakes, "
                     f"p50 {legit.connect_p50_ms} ms, p99 {legit.connect_p99_ms} ms")
    return result


def generator_rate(generator: str, rates: list[int], seconds: float) -> float:
    """What the generator sends into a TC drop, stepped like the defences."""
    best = 0.0
    with FloodLab(generator) as lab, lab.defended_by("generator"):
        for rate in [*rates, None]:
            pps = flood_step(lab, rate, seconds).offered_pps
            grew, best = pps > 1.02 * best, max(best, pps)
            if rate is not None and not grew:
                break
    return best


@contextlib.contextmanager
def enough_files(n: int = 65536) -> Iterator[None]:
    """Room for `n` sockets held at once (the memory points), for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
