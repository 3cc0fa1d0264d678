"""`synfleet demo` and `synfleet check` as a user runs them (the lab's
commands through the product's CLI): a subprocess, its output, and nothing
left behind, also when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import network_namespaces, require_bpf
from fleet import wait_for

pytestmark = pytest.mark.netns
KEYS = {"legit_attempts", "legit_ok", "connect_p50_ms", "connect_p99_ms", "flood_syn_sent",
        "proxy_synack_sent", "backend_syn_seen", "duration_s"}


def state() -> tuple[set[str], set[str]]:
    """Network namespaces and synfleet pin directories on this machine now."""
    pins = os.listdir("/sys/fs/bpf/synfleet") if os.path.isdir("/sys/fs/bpf/synfleet") else []
    return {n for n in network_namespaces() if n.startswith("sf-")}, set(pins)


def test_demo_json_summary_and_chart(tmp_path):
    require_bpf()
    before = state()
    chart = tmp_path / "demo.png"
    out = subprocess.run([sys.executable, "-m", "synfleet.cli", "demo", "--json", "--flood-seconds", "3",
                          "--flood-rate", "10000", "--chart", str(chart)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert KEYS <= set(summary)
    assert summary["flood_syn_sent"] >= 0.9 * 30000
    assert summary["proxy_synack_sent"] >= summary["flood_syn_sent"] + summary["legit_ok"]
    assert summary["backend_syn_seen"] == 0
    assert summary["legit_attempts"] > 50 and summary["legit_ok"] >= 0.99 * summary["legit_attempts"]
    assert 0 < summary["connect_p50_ms"] <= summary["connect_p99_ms"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert state() == before


def test_an_interrupted_demo_removes_everything(tmp_path):
    require_bpf()
    before = state()
    proc = subprocess.Popen([sys.executable, "-m", "synfleet.cli", "demo", "--chart", str(tmp_path / "x.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "t=" not in (line := proc.stdout.readline()):
        assert time.monotonic() < deadline and line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "everything it created was removed" in err
    assert state() == before


def test_bench_dataplane_times_every_path_and_part_and_cleans_up():
    """At a small size: the full one (10^6 packets per figure) is the benchmark in docs/benchmarks.md."""
    require_bpf()
    from synfleet_lab.bench.dataplane import PARTS, after_a_change, cases

    before = state()
    out = subprocess.run([sys.executable, "-m", "synfleet.cli", "bench", "dataplane", "--json", "--repeat", "20000",
                          "--rounds", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    paths = {c.key for c in cases(bytes(16), 0) + after_a_change(bytes(16), 0)}
    assert paths | {p.key for p in PARTS} <= set(result)
    assert {"proxy_xdp_syn_ns", "backend_chain_ns"} <= paths
    assert all(result[k] > 0 for k in paths), result
    # A path costs more than one of its pieces: what the subtraction leaves is the path's own work.
    assert result["proxy_syn_ns"] > result["part_siphash_ns"] > 0
    assert result["proxy_ack_ns"] > result["part_siphash_ns"] + result["part_fib_ns"]
    assert state() == before


INTERRUPTED = [
    ("bench dataplane", ["bench", "dataplane", "--repeat", "5000000"], signal.SIGTERM),
    ("bench dataplane", ["bench", "dataplane", "--repeat", "5000000"], signal.SIGINT),
    ("demo", ["demo", "--chart", "{tmp}/x.png"], signal.SIGTERM),
    ("check", ["check"], signal.SIGTERM),
]


@pytest.mark.parametrize("name, args, sig", INTERRUPTED,
                         ids=[f"{n.replace(' ', '-')}-{signal.Signals(s).name}" for n, _, s in INTERRUPTED])
def test_an_interrupted_lab_command_removes_everything_and_says_so_without_a_traceback(name, args, sig, tmp_path):
    """Seen before: SIGTERM (as `timeout` sends) left the bench's namespace
    behind, and Ctrl-C printed a Python traceback."""
    require_bpf()
    before = state()
    proc = subprocess.Popen([sys.executable, "-m", "synfleet.cli", *(a.format(tmp=tmp_path) for a in args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: state()[0] - before[0], f"{name}'s namespaces", timeout=30)
        # `check` ends within a second of making its namespace: frozen, it
        # cannot finish before the signal arrives, wherever it was.
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, f"{name} ended before it could be interrupted"
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"synfleet {name}: interrupted; everything it created was removed" in err
    assert "Traceback" not in err
    assert state() == before


def test_check_runs_a_handshake_per_family_through_the_proxy_and_cleans_up():
    require_bpf()
    before = state()
    out = subprocess.run([sys.executable, "-m", "synfleet.cli", "check"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("handshake through the proxy") == 2
    assert "OK, the backend accepted both connections from cookies; it never saw a SYN" in out.stdout
    assert state() == before
