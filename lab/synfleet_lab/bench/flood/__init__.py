"""`synfleet bench flood`: the SYN rate each defence answers, on one topology,
under one generator. Split by concern: topology.py (the namespaces), defences.py
(each defence set up and taken down), synfleet_lab.generators (the generators),
measure.py (steps, legitimate clients, memory), report.py (ratios, chart).

    attacker ──eth0── defence node ──eth1── server
    (generator)       (kernel | nf-synproxy | synfleet | floor | xdp-floor)
                      └──eth2── client

The defences (defences.py): `kernel` (SYN cookies), `nf-synproxy`, `synfleet`
(its XDP front and TC program), `synfleet-tc` (TC only), `floor` (a TC
program that reflects each SYN: packet I/O with zero work) and `xdp-floor`
(the same in XDP). `work_above_floor_us` is each defence's busy time per SYN
above its floor's: its own work.

Generators (synfleet_lab.generators), random sources in 10.66.0.0/16,
Linux-like SYN options, valid checksums:
- `xdp` (default): BPF live frames sent from the first CPU; the defence node's
  receive work (the NAPI of its eth0 and eth2, in threads) runs on the last
  CPU, as a NIC's interrupt affinity would place it, and the attacker's and
  client's receive work on the first.
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

from collections.abc import Callable
from dataclasses import asdict

from synfleet_lab.bench.flood.defences import DEFENCES, check_defences
from synfleet_lab.bench.flood.measure import (
    GENERATORS,
    MEMORY_POINTS,
    FloodLab,
    enough_files,
    generator_rate,
    measure_defence,
)
from synfleet_lab.bench.flood.report import chart, ratios, work_above_floor
from synfleet_lab.bench.machine import cpu_model

__all__ = ["DEFENCES", "GENERATORS", "FloodLab", "chart", "run"]


def run(defences: tuple[str, ...] = DEFENCES, rates: list[int] | None = None, seconds: float = 3.0,
        progress: Callable[[str], None] = print, memory_points: tuple[int, ...] = MEMORY_POINTS,
        generator: str = "xdp") -> dict:
    check_defences(defences)     # (an unknown generator: FloodLab refuses it before building anything)
    rates = rates or [50_000, 100_000, 200_000, 300_000, 400_000, 500_000, 700_000, 1_000_000]

    def measured_generator() -> float:
        pps = generator_rate(generator, rates, seconds)
        progress(f"  generator    {pps:>9.0f}/s into a TC drop")
        return pps

    with enough_files():
        # Fresh namespaces for every defence: nothing (a conntrack table, say) carries over.
        # The generator before and after: the better of the two, as the machine allows.
        first = measured_generator()
        results = {}
        for d in defences:
            with FloodLab(generator) as lab:
                results[d] = measure_defence(lab, d, rates, seconds, progress, memory_points)
        generator_pps = max(first, measured_generator())
    return {"generator": generator, "defences": {d: asdict(r) for d, r in results.items()},
            "generator_pps": round(generator_pps), "ratios": ratios(results),
            "work_above_floor_us": work_above_floor(results), "cpu": cpu_model()}
