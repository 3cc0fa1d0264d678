"""`synfleet bench flood` plumbing on a short, low-rate run: every defence
answers, the figures are sane, everything is removed afterwards. No absolute
rate is asserted (that is the benchmark's job, in docs/benchmarks.md)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import skip_unless_required, require_bpf
from synfleet.bench import flood

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _tools():
    require_bpf()
    missing = [t for t in ("trafgen", "nft") if shutil.which(t) is None]
    if missing:
        skip_unless_required("SYNFLEET_REQUIRE_BPF", "flood benchmark",
                              f"lacks {', '.join(missing)} (scripts/setup.sh installs them)")


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line}


def test_every_defence_answers_a_low_rate_flood_and_everything_is_removed():
    before = namespaces()
    result = flood.run(rates=[20_000], seconds=0.5, progress=lambda _: None, memory_points=(200,))
    assert set(result["defences"]) == set(flood.DEFENCES)
    for name, r in result["defences"].items():
        first = r["steps"][0]
        assert first["offered_target_pps"] == 20_000
        # At a rate every defence sustains, every SYN gets its SYN+ACK.
        assert first["answered_pps"] == pytest.approx(first["offered_pps"], rel=0.05), name
        assert r["max_answered_rate"] >= first["answered_pps"] > 0
        # trafgen's TX ring puts the headers in page fragments: answered all the same.
        ring = r["steps"][-1]
        assert ring["offered_target_pps"] is None
        assert ring["answered_pps"] == pytest.approx(ring["offered_pps"], rel=0.05), name
        assert r["cpu_s_per_million"] > 0
        if name == "floor":
            assert r["legit"] == {} and r["memory"] == []
            continue
        for pct in ("25", "50", "100"):
            legit = r["legit"][pct]
            assert legit["attempts"] > 0 and 0 <= legit["ok"] <= legit["attempts"]
            assert legit["ok"] == 0 or legit["connect_p50_ms"] <= legit["connect_p99_ms"]
        assert [m["connections"] for m in r["memory"]] == [0, 200]
    # nftables' synproxy tracks every connection it let through; synfleet's proxy nothing.
    nft = result["defences"]["nf-synproxy"]["memory"]
    assert nft[1]["conntrack_entries"] - nft[0]["conntrack_entries"] >= 200
    assert [m["conntrack_entries"] for m in result["defences"]["synfleet"]["memory"]] == [0, 0]
    assert result["generator_pps"] > 20_000
    assert set(result["ratios"]) == {"synfleet/kernel", "synfleet/nf-synproxy", "synfleet/floor"}
    assert set(result["ratios"]["synfleet/kernel"]) == {"max_answered_rate", "legit_success_at_100"}
    assert namespaces() == before
    assert subprocess.run(["pgrep", "-x", "trafgen"], capture_output=True).returncode == 1


def test_unknown_defence_is_refused_before_anything_is_built():
    before = namespaces()
    with pytest.raises(ValueError, match="unknown defence 'iptables'"):
        flood.run(defences=("iptables",), rates=[1000], seconds=0.2, progress=lambda _: None)
    assert namespaces() == before
