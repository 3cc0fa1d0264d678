"""`synfleet demo`: a whole fleet under a SYN flood, on this machine.

Builds the fleet lab (client, attacker, two proxies, two backends in network
namespaces, real agent processes), runs legitimate clients throughout and a
bounded SYN flood from random sources in the middle, shows progress each
second, then prints a summary and writes a PNG chart. Everything it created
is removed on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

from synfleet.agent.pins import DEFAULT_ROOT
from synfleet.bpf import Map
from synfleet_lab.testbed.clients import Attempt, ClientLoad
from synfleet_lab.testbed.fleetlab import BACKENDS, PROXIES, FleetLab

WARMUP_S = 3.0
COOLDOWN_S = 2.0


@dataclass
class Sample:
    t: float
    flood_pps: float
    synacks_pps: float
    legit_ok: int
    legit_total: int


@dataclass
class DemoResult:
    summary: dict
    samples: list[Sample] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _proxy_state_entries(lab: FleetLab) -> int:
    """Entries in every hash map of both proxies (the only kind that could grow per connection)."""
    total = 0
    for name in PROXIES:
        pins = os.path.join(DEFAULT_ROOT, lab.agents[name].instance)
        for map_name in ("services", "protected_addrs"):
            m = Map.open_pinned(os.path.join(pins, map_name))
            try:
                total += sum(1 for _ in m.keys())
            finally:
                m.close()
    return total


def run(flood_rate: int = 40000, flood_s: float = 15.0, clients: int = 4, progress=print) -> DemoResult:
    t0 = time.monotonic()
    progress("synfleet demo: building client, attacker, 2 proxies, 2 backends in network namespaces")
    with FleetLab() as lab:
        lab.start()
        progress(f"synfleet demo: agents ready in {time.monotonic() - t0:.1f} s; legitimate clients "
                 f"start, a {flood_rate} SYN/s flood from random sources follows in {WARMUP_S:.0f} s")
        proxies0, backends0 = lab.counters(PROXIES), lab.counters(BACKENDS)
        state0 = _proxy_state_entries(lab)
        load = ClientLoad(lab, concurrency=clients).start()
        start = time.monotonic()
        flood = None
        samples: list[Sample] = []
        last = (start, proxies0["syn_answered"])
        total_s = WARMUP_S + flood_s + COOLDOWN_S
        flood_sent = 0
        try:
            while (now := time.monotonic()) - start < total_s:
                if flood is None and now - start >= WARMUP_S:
                    flood = lab.flood("syn", rate=flood_rate, duration=flood_s)
                time.sleep(1.0 - ((time.monotonic() - start) % 1.0))
                now = time.monotonic()
                answered = lab.counters(PROXIES)["syn_answered"]
                attempts = [a for a in load.attempts if last[0] <= a.started < now]
                dt = now - last[0]
                synacks = (answered - last[1]) / dt
                sample = Sample(round(now - start, 1), max(0.0, synacks - len(attempts) / dt), synacks,
                                sum(a.ok for a in attempts), len(attempts))
                samples.append(sample)
                last = (now, answered)
                progress(f"  t={sample.t:5.1f}s  flood {sample.flood_pps:8.0f} SYN/s absorbed   "
                         f"legitimate {sample.legit_ok:3d}/{sample.legit_total:<3d} ok")
        finally:
            all_attempts = load.stop()
            if flood is not None:
                flood_sent = flood.wait(timeout=flood_s + 30)
        proxies, backends = lab.counters(PROXIES), lab.counters(BACKENDS)
        state1 = _proxy_state_entries(lab)
        summary = _summarize(all_attempts, flood_sent, flood_s, proxies, proxies0, backends, backends0,
                             state0, state1, time.monotonic() - t0)
    return DemoResult(summary, samples)


def _summarize(attempts: list[Attempt], flood_sent: int, flood_s: float, proxies: dict, proxies0: dict,
               backends: dict, backends0: dict, state0: int, state1: int, duration: float) -> dict:
    times = [a.connect_ms for a in attempts if a.ok]
    return {
        "legit_attempts": len(attempts),
        "legit_ok": sum(a.ok for a in attempts),
        "connect_p50_ms": round(statistics.median(times), 2) if times else None,
        "connect_p99_ms": round(_percentile(times, 0.99), 2) if times else None,
        "flood_syn_sent": flood_sent,
        "flood_rate_pps": round(flood_sent / flood_s),
        "proxy_synack_sent": int(proxies["syn_answered"] - proxies0["syn_answered"]),
        "backend_syn_seen": int(backends["bypass_syn"] - backends0["bypass_syn"]),
        "backend_connections_from_cookies": int(backends["reqsk_created"] - backends0["reqsk_created"]),
        "proxy_state_entries_added": state1 - state0,
        "duration_s": round(duration, 1),
    }


def table(summary: dict) -> str:
    ok, total = summary["legit_ok"], summary["legit_attempts"]
    rows = [
        ("flood sent", f"{summary['flood_syn_sent']:,} SYNs from random sources "
                       f"({summary['flood_rate_pps']:,}/s)"),
        ("legitimate handshakes", f"{ok}/{total} ok ({100 * ok / max(total, 1):.2f} %)"),
        ("connect time", f"p50 {summary['connect_p50_ms']} ms, p99 {summary['connect_p99_ms']} ms"),
        ("SYN+ACKs sent by proxies", f"{summary['proxy_synack_sent']:,}"),
        ("SYNs that reached backends", f"{summary['backend_syn_seen']}"),
        ("connections made from cookies", f"{summary['backend_connections_from_cookies']:,}"),
        ("proxy state per connection", f"{summary['proxy_state_entries_added']} map entries added "
                                       "(stateless: the cookie is the state)"),
        ("duration", f"{summary['duration_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def chart(result: DemoResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in result.samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s.flood_pps for s in result.samples], color="tab:red", label="flood SYN/s absorbed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("SYN/s answered with a cookie", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(t, [100 * s.legit_ok / s.legit_total if s.legit_total else float("nan") for s in result.samples],
             color="tab:blue", marker="o", label="legitimate handshakes ok %")
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("legitimate handshakes ok (%)", color="tab:blue")
    s = result.summary
    ax.set_title(f"synfleet demo: {s['legit_ok']}/{s['legit_attempts']} legitimate handshakes ok, "
                 f"{s['backend_syn_seen']} SYNs reached backends")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
