"""`synfleet bench flood` plumbing on a short, low-rate run: every defence
answers, the figures are sane, everything is removed afterwards. No absolute
rate is asserted (that is the benchmark's job, in docs/benchmarks.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import network_namespaces, require_bpf, skip_unless_required
from synfleet_lab.bench import flood
from synfleet_lab.bench.flood.measure import flood_step

pytestmark = pytest.mark.netns


def require_tools(*tools: str) -> None:
    require_bpf()
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_unless_required("SYNFLEET_REQUIRE_BPF", "flood benchmark",
                              f"lacks {', '.join(missing)} (scripts/setup.sh installs them)")


def test_every_defence_answers_a_low_rate_flood_and_everything_is_removed():
    require_tools("nft")
    before = network_namespaces()
    result = flood.run(rates=[20_000], seconds=1.0, progress=lambda _: None, memory_points=(200,))
    assert set(result["defences"]) == set(flood.DEFENCES)
    for name, r in result["defences"].items():
        first = r["steps"][0]
        assert first["offered_target_pps"] == 20_000
        # The generator keeps its pace over the step's sending window.
        assert first["seconds"] == 1.0
        assert first["offered_pps"] == pytest.approx(20_000, rel=0.05), name
        # At a rate every defence sustains, every SYN gets its SYN+ACK.
        assert first["answered_pps"] == pytest.approx(first["offered_pps"], rel=0.05), name
        assert r["max_answered_rate"] >= first["answered_pps"] > 0
        # Flat out, the generator overruns every defence: what is answered is what it could take.
        flat = r["steps"][-1]
        assert flat["offered_target_pps"] is None
        assert 0 < flat["answered_pps"] <= 1.01 * flat["offered_pps"], name
        assert r["cpu_s_per_million"] > 0
        if name in ("floor", "xdp-floor"):
            assert r["legit"] == {} and r["memory"] == []
            continue
        for pct in ("25", "50", "100"):
            legit = r["legit"][pct]
            assert legit["attempts"] > 0 and 0 <= legit["ok"] <= legit["attempts"]
            assert legit["ok"] == 0 or legit["connect_p50_ms"] <= legit["connect_p99_ms"]
        # Real TCP clients complete their handshakes through every defence (for
        # synfleet: SYN+ACKs from the XDP front, ACKs through the TC program).
        assert r["legit"]["25"]["success"] == 1.0, name
        assert [m["connections"] for m in r["memory"]] == [0, 200]
    # nftables' synproxy tracks every connection it let through; synfleet's proxy nothing.
    nft = result["defences"]["nf-synproxy"]["memory"]
    assert nft[1]["conntrack_entries"] - nft[0]["conntrack_entries"] >= 200
    assert [m["conntrack_entries"] for m in result["defences"]["synfleet"]["memory"]] == [0, 0]
    assert result["generator_pps"] > 20_000
    assert set(result["ratios"]) == {"synfleet/kernel", "synfleet/nf-synproxy", "synfleet/synfleet-tc",
                                     "synfleet/floor", "synfleet/xdp-floor"}
    assert set(result["ratios"]["synfleet/kernel"]) == {"max_answered_rate", "legit_success_at_100"}
    # Each defence's own work: its busy time per SYN less its floor's, the XDP one for synfleet's front.
    cpu = {name: r["cpu_s_per_million"] for name, r in result["defences"].items()}
    assert result["work_above_floor_us"] == {
        "kernel": pytest.approx(cpu["kernel"] - cpu["floor"], abs=1e-3),
        "nf-synproxy": pytest.approx(cpu["nf-synproxy"] - cpu["floor"], abs=1e-3),
        "synfleet": pytest.approx(cpu["synfleet"] - cpu["xdp-floor"], abs=1e-3),
        "synfleet-tc": pytest.approx(cpu["synfleet-tc"] - cpu["floor"], abs=1e-3)}
    assert result["cpu"]
    assert network_namespaces() == before


def test_trafgen_tx_ring_frames_are_answered_in_full():
    """trafgen's TX ring puts the headers in page fragments: the BPF defences
    pull them before reading, and answer every one (trafgen shares the
    defence's CPU, so it goes no faster than they answer)."""
    require_tools("trafgen")
    before = network_namespaces()
    with flood.FloodLab("trafgen") as lab:
        for defence in ("synfleet-tc", "floor"):
            with lab.defended_by(defence):
                ring = flood_step(lab, None, 0.5)
            assert ring.offered_pps > 0
            assert ring.answered_pps == pytest.approx(ring.offered_pps, rel=0.05), defence
    assert network_namespaces() == before
    assert subprocess.run(["pgrep", "-x", "trafgen"], capture_output=True).returncode == 1


# Tasks pinned to the generator's CPU for the next test, each ending by itself
# after 20 s. `shares`: a CPU-bound task, as the clients' thread is during the
# legitimate-client steps. `stalls`: a real-time task that takes the CPU for
# 30 ms every 120 ms, as a stolen vCPU or a long kernel work item would.
CPU_HOGS = {
    "shares": "import time\n"
              "end = time.monotonic() + 20\n"
              "while time.monotonic() < end: pass\n",
    "stalls": "import os, time\n"
              "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))\n"
              "end = time.monotonic() + 20\n"
              "while time.monotonic() < end:\n"
              "    hold = time.monotonic() + 0.03\n"
              "    while time.monotonic() < hold: pass\n"
              "    time.sleep(0.09)\n",
}


@pytest.mark.parametrize("hog", sorted(CPU_HOGS))
def test_paced_generator_makes_up_what_it_owes_when_its_cpu_is_taken(hog):
    """A generator thread held off its CPU catches up afterwards instead of
    losing the frames its schedule missed, and no faster than the defence
    answers them all. What a stall at the very end of a step owes is lost:
    at most 3 % of a 1 s step."""
    require_tools()
    with flood.FloodLab("xdp") as lab, lab.defended_by("floor"):
        task = subprocess.Popen(["taskset", "-c", str(lab.generator_cpu), sys.executable, "-c", CPU_HOGS[hog]])
        try:
            steps = [flood_step(lab, 20_000, 1.0) for _ in range(3)]
        finally:
            task.kill()
            task.wait()
    for step in steps:
        assert step.seconds == 1.0
        assert step.offered_pps == pytest.approx(20_000, rel=0.05)
        assert step.answered_pps == pytest.approx(step.offered_pps, rel=0.01)


def test_unknown_defence_is_refused_before_anything_is_built():
    before = network_namespaces()
    with pytest.raises(ValueError, match="unknown defence 'iptables'"):
        flood.run(defences=("iptables",), rates=[1000], seconds=0.2, progress=lambda _: None)
    with pytest.raises(ValueError, match="unknown generator 'hping3'"):
        flood.run(generator="hping3", rates=[1000], seconds=0.2, progress=lambda _: None)
    assert network_namespaces() == before
