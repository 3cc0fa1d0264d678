"""`synfleet bench operator` at a small size (the full size is a benchmark,
docs/benchmarks.md): the operator against a real API server renders only for
what matters, a policy change reaches both of its pools' ConfigMaps, and the
requests a change costs do not grow with the number of policies."""

from __future__ import annotations

import glob
import json
import signal
import subprocess
import sys
import time

from conftest import require_kube

SMALL = ["--nodes", "120", "--proxies", "4", "--backends", "24", "--services", "600", "--policies", "60",
         "--seconds", "10", "--quiet-seconds", "5", "--unrelated-rate", "20", "--change-rate", "3"]


def leftovers() -> list[str]:
    """The bench's work directories, and any control plane or operator it started."""
    procs = subprocess.run(["pgrep", "-f", "synfleet-bench-operator-|synfleet.cli operator"],
                           capture_output=True, text=True).stdout.split()
    return glob.glob("/tmp/synfleet-bench-operator-*") + procs


def test_bench_operator_renders_nothing_for_unrelated_churn_and_every_policy_change_lands():
    require_kube()
    before = leftovers()
    out = subprocess.run([sys.executable, "-m", "synfleet.cli", "bench", "operator", "--json", *SMALL],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["initial_sync_s"] > 0
    assert r["unrelated_events_seen_quiet"] >= 0.9 * r["unrelated_updates_quiet"] > 0, \
        "the operator saw the unrelated updates"
    assert r["renders_from_unrelated_events"] == 0
    assert r["policy_changes"] >= 25 and r["policy_changes_seen"] == r["policy_changes"]
    # A render issues one list (the agents' pods) and writes what changed: not
    # a Service GET and an EndpointSlice LIST per policy (2 x 60 here) as before.
    assert r["api_requests_per_policy_change"] <= 8
    assert r["render_p99_ms"] <= r["aims"]["render_p99_ms"]
    assert r["operator_peak_rss_mib"] <= r["aims"]["operator_peak_rss_mib"]
    assert r["met"] == {"render_p99_ms": True, "operator_peak_rss_mib": True, "renders_from_unrelated_events": True}
    assert leftovers() == before


def test_an_interrupted_bench_operator_stops_the_control_plane_and_the_operator():
    require_kube()
    before = leftovers()
    proc = subprocess.Popen([sys.executable, "-m", "synfleet.cli", "bench", "operator", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:     # interrupted mid-run: once the operator runs
            if "starting the operator" in line or time.monotonic() > deadline:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; everything it created was removed" in err and "Traceback" not in err
    assert leftovers() == before
