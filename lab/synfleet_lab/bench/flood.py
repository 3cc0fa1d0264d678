"""`synfleet bench flood`: the SYN rate each defence answers, on one topology,
under one generator.

    attacker ──eth0── defence node ──eth1── server
    (generator)       (kernel | nf-synproxy | synfleet | floor)
                      └──eth2── client

- `kernel`: the defence node is the server itself: a listener on the service
  address with net.ipv4.tcp_syncookies=2 (cookies for every SYN).
- `nf-synproxy`: the defence node forwards to the server through nftables'
  `synproxy` statement (set up as the nftables wiki does: SYNs untracked in
  raw prerouting, synproxy on invalid/untracked in forward, loose tracking off).
- `synfleet`: the proxy on the defence node's eth0 and eth2, its XDP front
  answering SYNs in native XDP (veth has it) and its TC program the rest (the
  backend program and the service on the server). The attacker and the
  client run an XDP_PASS program: a veth takes its peer's XDP_TX frames only
  then. `synfleet-tc`: the same without the XDP front.
- `floor`: a TC program that swaps addresses and sends the packet back
  (lab/bpf/reflect.bpf.c): packet I/O with zero work.

Generators (synfleet_lab.bench.generators), random sources in 10.66.0.0/16,
Linux-like SYN options, valid checksums:
- `xdp` (default): BPF live frames sent from the first CPU; the defence node's
  receive work (the NAPI of its eth0 and eth2, in threads) runs on the last
  CPU, as a NIC's interrupt affinity would place it.
  Figures are then a defence core's capacity: `cpu_s_per_million` is that
  core's busy time per million SYNs answered.
- `trafgen`: one trafgen thread. On veth the receiver's work runs on the
  sender's CPU, so an answered rate is the defence's per-packet cost plus
  trafgen's; `cpu_s_per_million` is the whole machine's busy time.

The attacker drops the answers at TC ingress (lab/bpf/sink.bpf.c) and counts them
on its interface. `generator_pps` is what the generator sends into a TC drop;
`floor` puts each figure in proportion to the cost of the packet I/O alone.

Each defence is offered rising rates until the answered rate stops rising,
then the generator's flat-out rate; the best answered rate is its
`max_answered_rate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from synfleet.bpf import BpfObject, TcHook, XdpHook
from synfleet.cookie import current_epoch
from synfleet.dataplane.programs import BackendDataplane, ProxyDataplane
from synfleet_lab.bench import GENERATORS
from synfleet_lab.bench.generators import TrafgenSynGenerator, XdpSynGenerator, pinned_to, syn_template
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import SERVICE_PORT, testbed_config
from synfleet_lab.testbed.netns import NetNS, unique_name, veth

DEFENCES = ("kernel", "nf-synproxy", "synfleet", "synfleet-tc", "floor")
SERVICE = "198.19.0.10"
FLOOD_PREFIX = "10.66.0.0/16"
ATTACKER, DEFENCE_NEAR, DEFENCE_FAR, SERVER = "10.77.0.66", "10.77.0.1", "10.77.1.1", "10.77.1.2"
CLIENT, DEFENCE_CLIENT_SIDE = "10.77.2.2", "10.77.2.1"
LEGIT_FRACTIONS = (25, 50, 100)        # % of a defence's best answered rate
MEMORY_POINTS = (2_500, 5_000, 10_000)     # established connections
CONNECT_TIMEOUT_S = 3.0
ROTATION_S = 3600
MAX_STEP_S = 30.0
NFT_SYNPROXY = f"""
table ip synfleet_bench {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr {SERVICE} tcp dport {SERVICE_PORT} tcp flags syn notrack
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ip daddr {SERVICE} tcp dport {SERVICE_PORT} ct state invalid,untracked \\
            synproxy mss 1460 wscale 7 timestamp sack-perm
        ct state invalid drop
    }}
}}
"""


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


def _napi_threads() -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("napi/"):
                pids.add(int(pid))
    return pids


class FloodLab:
    """The three namespaces and their links; `close()` removes everything."""

    def __init__(self, generator: str = "xdp") -> None:
        if generator not in GENERATORS:
            raise ValueError(f"unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
        cpus = sorted(os.sched_getaffinity(0))
        if generator == "xdp" and len(cpus) < 2:
            raise RuntimeError("the xdp generator needs two CPUs: one floods, the other defends")
        # xdp: the generator and the clients on the first CPU, the defence node's
        # receive work on the last. trafgen: wherever the scheduler puts them.
        self.generator_cpu, self.defence_cpu = (cpus[0], cpus[-1]) if generator == "xdp" else (None, None)
        self.generator_name = generator
        self.generator = None
        tag = unique_name("sfb")[4:]
        self.workdir = tempfile.mkdtemp(prefix=f"synfleet-bench-{tag}-")
        self.attacker = NetNS(f"sfb-{tag}-att")
        self.defence = NetNS(f"sfb-{tag}-dfn")
        self.server = NetNS(f"sfb-{tag}-srv")
        self.client = NetNS(f"sfb-{tag}-cli")
        self._objects: list = []
        self._hooks: list[tuple[NetNS, TcHook | XdpHook]] = []
        self._listener: subprocess.Popen | None = None
        self._kept = (0, 0)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        veth(self.attacker, "eth0", self.defence, "eth0")
        veth(self.defence, "eth1", self.server, "eth0")
        veth(self.client, "eth0", self.defence, "eth2")
        self.client.ip("addr", "add", f"{CLIENT}/24", "dev", "eth0")
        self.defence.ip("addr", "add", f"{DEFENCE_CLIENT_SIDE}/24", "dev", "eth2")
        self.client.ip("route", "add", f"{SERVICE}/32", "via", DEFENCE_CLIENT_SIDE)
        self.attacker.ip("addr", "add", f"{ATTACKER}/24", "dev", "eth0")
        self.defence.ip("addr", "add", f"{DEFENCE_NEAR}/24", "dev", "eth0")
        self.defence.ip("addr", "add", f"{DEFENCE_FAR}/24", "dev", "eth1")
        self.server.ip("addr", "add", f"{SERVER}/24", "dev", "eth0")
        self.server.ip("addr", "add", f"{SERVICE}/32", "dev", "lo")
        self.server.ip("route", "add", "default", "via", DEFENCE_FAR)
        self.defence.ip("route", "add", FLOOD_PREFIX, "via", ATTACKER)
        self.defence.ip("route", "add", f"{SERVICE}/32", "via", SERVER)
        self.attacker.ip("route", "add", f"{SERVICE}/32", "via", DEFENCE_NEAR)
        self.defence.sysctl("net.ipv4.conf.all.forwarding", 1)
        for ns in (self.attacker, self.defence, self.server, self.client):
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
        self.mac = {}
        for ns, ifname, addr in ((self.attacker, "eth0", ATTACKER), (self.defence, "eth0", DEFENCE_NEAR),
                                 (self.defence, "eth1", DEFENCE_FAR), (self.server, "eth0", SERVER),
                                 (self.client, "eth0", CLIENT), (self.defence, "eth2", DEFENCE_CLIENT_SIDE)):
            self.mac[addr] = json.loads(ns.ip("-j", "link", "show", ifname))[0]["address"]
        # Permanent neighbours: no ARP under load, and none for the spoofed sources.
        for ns, ifname, peer in ((self.attacker, "eth0", DEFENCE_NEAR), (self.defence, "eth0", ATTACKER),
                                 (self.defence, "eth1", SERVER), (self.server, "eth0", DEFENCE_FAR),
                                 (self.client, "eth0", DEFENCE_CLIENT_SIDE), (self.defence, "eth2", CLIENT)):
            ns.ip("neigh", "replace", peer, "lladdr", self.mac[peer], "dev", ifname, "nud", "permanent")
        if self.defence_cpu is not None:
            self._defence_core()
        template = syn_template(self.mac[DEFENCE_NEAR], self.mac[ATTACKER], SERVICE, SERVICE_PORT)
        self.generator = (XdpSynGenerator(self.attacker, "eth0", template, self.generator_cpu)
                          if self.generator_name == "xdp"
                          else TrafgenSynGenerator(self.attacker, "eth0", template, self.workdir))
        self._attach_object(self.attacker, "eth0", "sink")
        # The attacker's sink stays for every defence; what comes after is per defence.
        self._kept = (len(self._objects), len(self._hooks))

    def _defence_core(self) -> None:
        """Give the defence node's receive work a CPU of its own, as a NIC's
        interrupt affinity would: its flood-facing and client-facing links run
        their NAPI in kernel threads pinned there (live frames need the
        receiver's NAPI anyway), so that legitimate handshakes compete with
        the flood for the same core."""
        for ifname in ("eth0", "eth2"):
            self.defence.run("ethtool", "-K", ifname, "gro", "on")
            before = _napi_threads()
            self.defence.run("sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded")
            threads = _napi_threads() - before
            if not threads:
                raise RuntimeError(f"no NAPI thread appeared for the defence node's {ifname}")
            for pid in threads:
                os.sched_setaffinity(pid, {self.defence_cpu})

    # ---- BPF helpers ----

    def _attach(self, ns: NetNS, ifname: str, program,
                kind: type[TcHook] | type[XdpHook] = TcHook) -> None:
        with ns.entered():
            hook = kind(socket.if_nametoindex(ifname))
            hook.attach(program)
        self._hooks.append((ns, hook))

    def _attach_object(self, ns: NetNS, ifname: str, name: str) -> None:
        obj = BpfObject(lab_object(name)).load()
        self._objects.append(obj)
        self._attach(ns, ifname, obj.program(name))

    def _detach(self, keep: tuple[int, int] = (0, 0)) -> None:
        """Detach and close what was attached after the first `keep` objects and hooks."""
        keep_objects, keep_hooks = keep
        for ns, hook in reversed(self._hooks[keep_hooks:]):
            with ns.entered():
                if isinstance(hook, XdpHook):
                    hook.detach()
                else:
                    hook.destroy_clsact()
        del self._hooks[keep_hooks:]
        for obj in self._objects[keep_objects:]:
            obj.close()
        del self._objects[keep_objects:]

    # ---- defences ----

    def _listen(self, ns: NetNS) -> None:
        """A listener on the service port that accepts and holds connections
        (the memory figure needs them established), the oldest closed when
        the file limit nears."""
        self._listener = ns.popen("python3", "-c", (
            "import collections, resource, socket\n"
            "limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
            f"s = socket.create_server(('{SERVICE}', {SERVICE_PORT}), backlog=4096)\n"
            "held = collections.deque()\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    held.append(s.accept()[0])\n"
            "    if len(held) > limit - 64:\n"
            "        held.popleft().close()\n"), stdout=subprocess.PIPE)
        if self._listener.stdout.readline().strip() != b"ready":
            raise RuntimeError("the benchmark's listener did not start")

    def _stop_listener(self) -> None:
        if self._listener is not None:
            self._listener.kill()
            self._listener.wait()
            self._listener = None

    @contextlib.contextmanager
    def defended_by(self, defence: str) -> Iterator[None]:
        """Set the defence up, yield, and take it down again."""
        undo: list[Callable[[], None]] = []
        try:
            if defence == "generator":
                self._attach_object(self.defence, "eth0", "sink")
            elif defence == "floor":
                self._attach_object(self.defence, "eth0", "reflect")
            elif defence == "kernel":
                self.defence.ip("addr", "add", f"{SERVICE}/32", "dev", "lo")
                undo.append(lambda: self.defence.ip("addr", "del", f"{SERVICE}/32", "dev", "lo"))
                self.defence.sysctl("net.ipv4.tcp_syncookies", 2)
                self._listen(self.defence)
            elif defence == "nf-synproxy":
                self.defence.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
                rules = os.path.join(self.workdir, "synproxy.nft")
                with open(rules, "w") as f:
                    f.write(NFT_SYNPROXY)
                self.defence.run("nft", "-f", rules)
                undo.append(lambda: self.defence.run("nft", "delete", "table", "ip", "synfleet_bench"))
                self._listen(self.server)
            elif defence in ("synfleet", "synfleet-tc"):
                self._synfleet(xdp=defence == "synfleet")
                self._listen(self.server)
            else:
                raise ValueError(f"unknown defence {defence!r}; choose from {', '.join(DEFENCES)}")
            yield
        finally:
            self._stop_listener()
            for step in reversed(undo):
                step()
            self._detach(keep=self._kept)

    def _synfleet(self, xdp: bool) -> None:
        """The proxy on the attacker- and client-facing links (with its XDP
        front unless `xdp` is off), the backend on the server's."""
        epoch = current_epoch(ROTATION_S)
        salts = {e: secrets.token_bytes(16) for e in (epoch - 1, epoch, epoch + 1)}
        services = {4: SERVICE}
        proxy = ProxyDataplane()
        self._objects.append(proxy)
        proxy.set_salts(salts)
        proxy.apply(testbed_config("proxy", interfaces=["eth0"], node_v4=DEFENCE_NEAR, node_v6="2001:db8:77::1",
                                   services=services, rotation_s=ROTATION_S, backends={4: [SERVER]},
                                   salts=salts))
        self._attach(self.defence, "eth0", proxy.program)
        self._attach(self.defence, "eth2", proxy.program)
        if xdp:
            # A veth takes its peer's XDP_TX frames only with an XDP program of its own.
            peer = BpfObject(lab_object("xdp_pass")).load()
            self._objects.append(peer)
            self._attach(self.attacker, "eth0", peer.program("xdp_pass"), XdpHook)
            self._attach(self.client, "eth0", peer.program("xdp_pass"), XdpHook)
            self._attach(self.defence, "eth0", proxy.xdp_program, XdpHook)
            self._attach(self.defence, "eth2", proxy.xdp_program, XdpHook)
        backend = BackendDataplane()
        self._objects.append(backend)
        backend.apply(testbed_config("backend", interfaces=["eth0"], node_v4=SERVER, node_v6="2001:db8:77::2",
                                     services=services, rotation_s=ROTATION_S, allowed_proxies=[DEFENCE_NEAR]))
        self._attach(self.server, "eth0", backend.program)

    # ---- traffic ----

    def _counters(self) -> tuple[int, int]:
        stats = json.loads(self.attacker.ip("-j", "-s", "link", "show", "eth0"))[0]["stats64"]
        return stats["tx"]["packets"], stats["rx"]["packets"]

    def flood_step(self, rate: int | None, seconds: float) -> Step:
        """Offer `rate` SYNs per second (None: as fast as the generator goes) for `seconds`."""
        if not 0 < seconds <= MAX_STEP_S:
            raise ValueError(f"a step lasts (0, {MAX_STEP_S}] seconds")
        tx0, rx0 = self._counters()
        cpu0 = _cpu_busy_s(self.defence_cpu)
        sent = self.generator.send(rate, seconds)
        # Frames still queued drain: the step ends when the counters stop, and
        # their answers count as the sending window's.
        counters = self._counters()
        while True:
            cpu1 = _cpu_busy_s(self.defence_cpu)
            time.sleep(0.05)
            settled, counters = counters, self._counters()
            if counters == settled:
                break
        tx1, rx1 = counters
        offered = tx1 - tx0 if sent.frames is None else sent.frames
        return Step(rate, offered / sent.seconds, (rx1 - rx0) / sent.seconds, cpu1 - cpu0, sent.seconds)

    def legit_during(self, rate: int, seconds: float) -> Legit:
        """Clients connect one after another from their namespace while a
        flood of `rate` SYN/s runs."""
        connects: list[float | None] = []
        stop = threading.Event()

        def clients() -> None:
            pin = pinned_to(self.generator_cpu) if self.generator_cpu is not None else contextlib.nullcontext()
            with self.client.entered(), pin:
                while not stop.is_set():
                    connects.append(_connect_ms())

        worker = threading.Thread(target=clients)
        worker.start()
        try:
            step = self.flood_step(rate, seconds)
        finally:
            stop.set()
            worker.join()
        return Legit.of(connects, step.offered_pps)

    def _defence_memory(self, connections: int) -> Memory:
        count = self.defence.run("sh", "-c", "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0")
        sockstat = self.defence.run("cat", "/proc/net/sockstat")
        tcp = next(line.split() for line in sockstat.splitlines() if line.startswith("TCP:"))
        entries = int(count.strip() or 0)
        # "inuse" is this namespace's; "alloc" would count the whole machine.
        return Memory(connections, entries, entries * _conntrack_object_bytes(),
                      int(tcp[tcp.index("inuse") + 1]))

    def memory_with_established(self, counts: tuple[int, ...]) -> list[Memory]:
        """Open connections through the defence up to each count, measuring the
        defence node at each; all are reset afterwards."""
        held: list[socket.socket] = []
        points = [self._defence_memory(0)]
        try:
            with self.client.entered():
                for target in counts:
                    while len(held) < target:
                        sock = socket.create_connection((SERVICE, SERVICE_PORT), timeout=CONNECT_TIMEOUT_S)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        held.append(sock)
                    points.append(self._defence_memory(target))
        finally:
            for sock in held:
                sock.close()
        return points

    def close(self) -> None:
        self._stop_listener()
        self._detach()
        if self.generator is not None:
            self.generator.close()
        for ns in (self.attacker, self.defence, self.server, self.client):
            ns.delete()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.workdir):
                os.unlink(os.path.join(self.workdir, name))
            os.rmdir(self.workdir)

    def __enter__(self) -> "FloodLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        step = lab.flood_step(rate, seconds)
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
        if defence == "floor":
            return result       # it answers SYNs and serves nothing
        # Memory first, while the conntrack table holds nothing from earlier clients.
        result.memory = lab.memory_with_established(memory_points)
        last = result.memory[-1]
        progress(f"  {defence:<12} {last.connections} established: {last.conntrack_entries} conntrack entries "
                 f"({last.conntrack_bytes} B), {last.tcp_sockets} TCP sockets on the defence node")
        for pct in LEGIT_FRACTIONS:
            legit = lab.legit_during(max(1, round(result.max_answered_rate * pct / 100)), seconds)
            result.legit[str(pct)] = legit
            progress(f"  {defence:<12} {pct:>3} % flood: {legit.ok}/{legit.attempts} handshakes, "
                     f"p50 {legit.connect_p50_ms} ms, p99 {legit.connect_p99_ms} ms")
    return result


def run(defences: tuple[str, ...] = DEFENCES, rates: list[int] | None = None, seconds: float = 3.0,
        progress: Callable[[str], None] = print, memory_points: tuple[int, ...] = MEMORY_POINTS,
        generator: str = "xdp") -> dict:
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defence {unknown[0]!r}; choose from {', '.join(DEFENCES)}")
    rates = rates or [50_000, 100_000, 200_000, 300_000, 400_000, 500_000, 700_000, 1_000_000]
    # 10,000 client sockets held at once, plus everything else.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    def generator_rate() -> float:
        """What the generator sends into a TC drop, stepped like the defences."""
        best = 0.0
        with FloodLab(generator) as lab, lab.defended_by("generator"):
            for rate in [*rates, None]:
                pps = lab.flood_step(rate, seconds).offered_pps
                grew, best = pps > 1.02 * best, max(best, pps)
                if rate is not None and not grew:
                    break
        progress(f"  generator    {best:>9.0f}/s into a TC drop")
        return best

    # Fresh namespaces for every defence: nothing (a conntrack table, say) carries over.
    # The generator before and after: the better of the two, as the machine allows.
    first = generator_rate()
    results = {}
    for d in defences:
        with FloodLab(generator) as lab:
            results[d] = measure_defence(lab, d, rates, seconds, progress, memory_points)
    generator_pps = max(first, generator_rate())
    out = {"generator": generator, "defences": {d: asdict(r) for d, r in results.items()},
           "generator_pps": round(generator_pps), "ratios": {}}
    ours = results.get("synfleet")
    for name, other in results.items():
        if ours is None or name == "synfleet" or not other.max_answered_rate:
            continue
        ratio = {"max_answered_rate": round(ours.max_answered_rate / other.max_answered_rate, 3)}
        if "100" in other.legit and other.legit["100"].success:
            ratio["legit_success_at_100"] = round(ours.legit["100"].success / other.legit["100"].success, 3)
        out["ratios"][f"synfleet/{name}"] = ratio
    return out


def chart(result: dict, path: str) -> None:
    """Answered against offered rate per defence, and legitimate handshake
    success under each defence's floods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rates, legit) = plt.subplots(1, 2, figsize=(12, 4.8))
    # Every SYN a defence sees is answered below its knee; above it what is
    # offered depends on the generator (trafgen slows on the shared CPU), so
    # the paced target is the x axis.
    targets = sorted({s["offered_target_pps"] for r in result["defences"].values() for s in r["steps"]
                      if s["offered_target_pps"]})
    ring_x = len(targets)
    for name, r in result["defences"].items():
        xs = [targets.index(s["offered_target_pps"]) if s["offered_target_pps"] else ring_x for s in r["steps"]]
        rates.plot(xs, [s["answered_pps"] / 1e3 for s in r["steps"]], marker="o",
                   label=f"{name} (best {r['max_answered_rate'] / 1e3:.0f}k)")
    top = 1.15 * max(r["max_answered_rate"] for r in result["defences"].values()) / 1e3
    generator_k = result["generator_pps"] / 1e3
    off_scale = " (off the scale)" if generator_k > top else ""
    rates.axhline(min(generator_k, top), color="grey", linestyle=":",
                  label=f"generator into a drop {generator_k:.0f}k{off_scale}")
    rates.set_ylim(0, max(top, min(generator_k, top) * 1.02))
    rates.set_xticks(range(ring_x + 1))
    rates.set_xticklabels([f"{t / 1e3:.0f}k" for t in targets] + ["flat out"])
    rates.set_xlabel(f"{result['generator']} generator's paced rate (SYN/s), then flat out")
    rates.set_ylabel("SYN+ACKs answered per second (thousands)")
    rates.set_title("SYN flood answered: " + ("one defence core, generator on another"
                                             if result["generator"] == "xdp" else
                                             "one trafgen thread sharing the defence's CPU"))
    rates.legend(fontsize=8)
    served = {n: r for n, r in result["defences"].items() if r["legit"]}
    width = 0.8 / max(1, len(served))
    for i, (name, r) in enumerate(served.items()):
        xs = [j + i * width for j in range(len(LEGIT_FRACTIONS))]
        ys = [100 * r["legit"][str(p)]["success"] for p in LEGIT_FRACTIONS]
        bars = legit.bar(xs, ys, width, label=name)
        for bar, p in zip(bars, LEGIT_FRACTIONS):
            p99 = r["legit"][str(p)]["connect_p99_ms"]
            legit.annotate(f"p99 {p99} ms" if p99 is not None else "none", (bar.get_x(), 2), rotation=90,
                           fontsize=7, color="white")
    legit.set_xticks([j + 0.4 - width / 2 for j in range(len(LEGIT_FRACTIONS))])
    legit.set_xticklabels([f"{p} % of its best rate" for p in LEGIT_FRACTIONS])
    legit.set_ylim(0, 105)
    legit.set_ylabel("legitimate handshakes ok (%)")
    legit.set_title("clients connecting during each defence's flood")
    legit.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
