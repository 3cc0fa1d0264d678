"""The flood benchmark's report: synfleet's figures against each other
defence's, and the chart."""

from __future__ import annotations

from synfleet_lab.bench.flood.defences import FLOOR_OF
from synfleet_lab.bench.flood.measure import LEGIT_FRACTIONS, DefenceResult


def ratios(results: dict[str, DefenceResult]) -> dict[str, dict[str, float]]:
    """synfleet's best answered rate (and its clients' success at 100 % flood)
    over every other defence's."""
    out: dict[str, dict[str, float]] = {}
    ours = results.get("synfleet")
    for name, other in results.items():
        if ours is None or name == "synfleet" or not other.max_answered_rate:
            continue
        ratio = {"max_answered_rate": round(ours.max_answered_rate / other.max_answered_rate, 3)}
        if "100" in other.legit and other.legit["100"].success:
            ratio["legit_success_at_100"] = round(ours.legit["100"].success / other.legit["100"].success, 3)
        out[f"synfleet/{name}"] = ratio
    return out


def work_above_floor(results: dict[str, DefenceResult]) -> dict[str, float]:
    """Each defence's busy time per SYN answered above its floor's (the TC
    floor for TC defences, the XDP floor for synfleet's XDP front), in µs:
    the defence's own work, without the packet I/O every defence pays."""
    out = {}
    for name, floor in FLOOR_OF.items():
        ours, base = results.get(name), results.get(floor)
        if ours and base and ours.cpu_s_per_million is not None and base.cpu_s_per_million is not None:
            out[name] = round(ours.cpu_s_per_million - base.cpu_s_per_million, 3)
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
