"""`synfleet bench http`: real HTTP clients through the fleet lab, with and
without synfleet, idle and under a SYN flood.

    client (wrk, one connection per request) ── proxy-a ── backend-a, backend-b (nginx)
    attacker (XDP live-frames SYN generator) ──┘

Every request opens a new connection (`Connection: close`): the server closes
first and keeps the 4-tuple in TIME_WAIT, and with tens of thousands of
connections a second over ~28k ephemeral ports, the client reuses 4-tuples that
are still in TIME_WAIT on the backend within seconds — the load that matters to
HTTP/1.0 clients, health checkers and clients behind NAT.

The baseline is the same lab with the service taken out of every node's
configuration (`FleetLab.set_protected(False)`): the proxies route it to both
backends (ECMP on the 4-tuple) and the backends' kernels defend with their own
SYN cookies. Both are measured in one run, alternating, per address family,
`rounds` times each; a figure is the median of its rounds, the errors their sum,
a ratio the median of the rounds' ratios (each synfleet round over the
baseline round run next to it: this VM's speed drifts by 15 % within seconds,
and a pair sees the same drift).
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import threading
from dataclasses import asdict, dataclass

from synfleet.bpf import BpfObject, XdpHook
from synfleet_lab.generators import XdpSynGenerator, syn_template
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import SERVICE_PORT
from synfleet_lab.testbed.fleetlab import SERVICE, FleetLab

FLOOD_PPS = 250_000
WARMUP_S = 0.5


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    errors: int          # socket errors (connect, read, write, timeout) and non-2xx answers
    timeouts: int

    @classmethod
    def parse(cls, out: str) -> "WrkResult":
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if not rps or not total:
            raise RuntimeError(f"wrk printed no result:\n{out}")
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        socket_errors = [int(g) for g in sock.groups()] if sock else [0, 0, 0, 0]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return cls(int(total.group(1)), float(rps.group(1)),
                   sum(socket_errors) + (int(non2xx.group(1)) if non2xx else 0), socket_errors[3])


def wrk(lab: FleetLab, family: int, seconds: float, connections: int = 32) -> WrkResult:
    """wrk from the client namespace, one connection per request."""
    host = SERVICE[family] if family == 4 else f"[{SERVICE[family]}]"
    proc = lab.nodes["client"].ns.popen("wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
                                        "--timeout", "2s", "-H", "Connection: close",
                                        f"http://{host}:{SERVICE_PORT}/",
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return WrkResult.parse(out)


class LabFlood:
    """The flood benchmark's XDP generator, sending from the attacker to the
    proxy the client goes through, on one CPU."""

    def __init__(self, lab: FleetLab, cpu: int) -> None:
        # A veth takes its peer's live XDP frames only with a native XDP program of its own.
        with BpfObject(lab_object("xdp_pass")).load() as peer, lab.switch.entered():
            XdpHook(socket.if_nametoindex("p-attacker")).attach(peer.program("xdp_pass"))
        target, attacker = lab.nodes[lab.via], lab.nodes["attacker"]
        template = syn_template(target.mac, attacker.mac, SERVICE[4], SERVICE_PORT)
        self.generator = XdpSynGenerator(attacker.ns, "eth0", template, cpu)
        self.sent_pps = 0.0

    def during(self, rate: int, seconds: float, work):
        """Run `work()` while flooding at `rate` for `seconds` plus a warm-up each side."""
        failures: list[BaseException] = []

        def flood() -> None:
            try:
                sent = self.generator.send(rate, seconds + 2 * WARMUP_S)
                self.sent_pps = sent.frames / sent.seconds
            except BaseException as err:     # re-raised below
                failures.append(err)

        thread = threading.Thread(target=flood, name="flood")
        thread.start()
        try:
            threading.Event().wait(WARMUP_S)
            return work()
        finally:
            thread.join()
            if failures:
                raise failures[0]

    def close(self) -> None:
        self.generator.close()


@dataclass(frozen=True)
class FamilyResult:
    synfleet_rps: float
    baseline_rps: float
    ratio: float
    synfleet_rps_under_flood: float
    baseline_rps_under_flood: float
    ratio_under_flood: float
    errors: dict[str, int]
    timeouts: dict[str, int]


def run(seconds: float = 5.0, flood_pps: int = FLOOD_PPS, connections: int = 32,
        families: tuple[int, ...] = (4, 6), rounds: int = 3) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("the flood generator needs a CPU of its own: two CPUs at least")
    results: dict[str, dict] = {}
    with FleetLab(http=True) as lab:
        lab.start()
        flood = LabFlood(lab, cpus[0])
        try:
            offered = []
            for family in families:
                runs: dict[str, list[WrkResult]] = {}
                for _ in range(rounds):
                    for protected, name in ((True, "synfleet"), (False, "baseline")):
                        lab.set_protected(protected)
                        runs.setdefault(name, []).append(wrk(lab, family, seconds, connections))
                        runs.setdefault(f"{name}_under_flood", []).append(flood.during(
                            flood_pps, seconds, lambda: wrk(lab, family, seconds, connections)))
                        offered.append(flood.sent_pps)
                lab.set_protected(True)
                rps = {k: round(statistics.median(r.rps for r in v), 1) for k, v in runs.items()}
                results[f"ipv{family}"] = asdict(FamilyResult(
                    synfleet_rps=rps["synfleet"], baseline_rps=rps["baseline"],
                    ratio=paired_ratio(runs["synfleet"], runs["baseline"]),
                    synfleet_rps_under_flood=rps["synfleet_under_flood"],
                    baseline_rps_under_flood=rps["baseline_under_flood"],
                    ratio_under_flood=paired_ratio(runs["synfleet_under_flood"], runs["baseline_under_flood"]),
                    errors={k: sum(r.errors for r in v) for k, v in runs.items()},
                    timeouts={k: sum(r.timeouts for r in v) for k, v in runs.items()}))
            proxy = lab.counters(("proxy-a",))
            backends = lab.counters(("backend-a", "backend-b"))
        finally:
            flood.close()
    return {
        "seconds": seconds, "rounds": rounds, "connections": connections, "flood_pps_asked": flood_pps,
        "flood_pps_sent_min": round(min(offered)), **results,
        "tw_recycled": int(backends["tw_recycled"]), "tw_refused": int(backends["tw_refused"]),
        "syn_answered": int(proxy["syn_answered"]),
    }


def paired_ratio(runs: list[WrkResult], baseline: list[WrkResult]) -> float:
    """The median of each round's requests/s over its baseline round's."""
    return round(statistics.median(r.rps / b.rps if b.rps else 0.0 for r, b in zip(runs, baseline)), 3)
