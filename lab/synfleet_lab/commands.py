"""The lab's commands in `synfleet`: `demo`, `check` and `bench`. The product's
CLI finds them through the `synfleet.commands` entry-point group and calls each
with its subparsers; what a command runs is imported only when it runs."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from synfleet.bpf.libbpf import in_callback, interrupt_after_call
from synfleet_lab.bench.flood import GENERATORS


def _bench_dataplane(args: argparse.Namespace) -> int:
    from synfleet_lab.bench.dataplane import PARTS, after_a_change, cases, run

    result = run(repeat=args.repeat, rounds=args.rounds)
    if args.json:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    print(f"synfleet data plane, ns per packet ({args.repeat} packets per figure, best of "
          f"{args.rounds}; kernel {result['kernel']}, {result['cpu']})")
    labels = [(c.key, c.label) for c in cases(bytes(16), 0) + after_a_change(bytes(16), 0)]
    for key, label in labels + [(p.key, p.label) for p in PARTS]:
        print(f"  {key:<24} {result[key]:8.1f}  {label}")
    return 0


def _bench_flood(args: argparse.Namespace) -> int:
    from synfleet_lab.bench.flood import DEFENCES, chart, run

    say = (lambda *a, **k: None) if args.json else print
    defences = tuple(args.defences.split(",")) if args.defences else DEFENCES
    try:
        result = run(defences=defences, seconds=args.seconds, progress=say, generator=args.generator)
    except ValueError as err:      # an unknown defence or generator, refused before anything is built
        print(f"synfleet bench flood: {err}", file=sys.stderr)
        return 2
    if args.chart:
        chart(result, args.chart)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nSYN+ACKs answered per second ({args.generator} generator: {result['generator_pps']:,} SYN/s "
          "into a TC drop)")
    for name, r in result["defences"].items():
        cpu = r["cpu_s_per_million"]
        print(f"  {name:<12} {r['max_answered_rate']:>12,.0f}/s   "
              f"{'-' if cpu is None else f'{cpu:.2f}':>6} CPU s per million")
    print("\nlegitimate handshakes ok during floods at 25 / 50 / 100 % of each defence's best rate")
    for name, r in result["defences"].items():
        if r["legit"]:
            print(f"  {name:<12} " + "   ".join(
                f"{100 * v['success']:.1f} % (p50 {v['connect_p50_ms']} ms, p99 {v['connect_p99_ms']} ms)"
                for v in r["legit"].values()))
    print("\ndefence node state as connections established through it grow")
    for name, r in result["defences"].items():
        if r["memory"]:
            print(f"  {name:<12} conntrack entries " + " / ".join(
                f"{m['conntrack_entries']} at {m['connections']:,}" for m in r["memory"][1:])
                + f"  ({r['memory'][-1]['conntrack_bytes']:,} B at the last)")
    for pair, ratio in result["ratios"].items():
        print(f"  {pair:<22} " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print("\ndefence-core busy time per SYN above its floor (TC floor; XDP floor for synfleet's front)")
    for name, us in result["work_above_floor_us"].items():
        print(f"  {name:<12} {us:6.2f} µs")
    if args.chart:
        print(f"\nchart: {args.chart}")
    return 0


def _bench_http(args: argparse.Namespace) -> int:
    from synfleet_lab.bench.http import run

    result = run(seconds=args.seconds, flood_pps=args.flood_rate, connections=args.connections,
                 rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"HTTP requests per second, one connection per request (wrk -c{args.connections}, "
          f"median of {args.rounds} runs of {args.seconds:g} s; flood {result['flood_pps_asked']:,} SYN/s asked, "
          f"at least {result['flood_pps_sent_min']:,} sent)")
    print(f"  {'':<6} {'synfleet':>10} {'baseline':>10} {'ratio':>6}   {'under flood':>11} "
          f"{'baseline':>10} {'ratio':>6}   errors")
    for family in ("ipv4", "ipv6"):
        r = result[family]
        print(f"  {family:<6} {r['synfleet_rps']:>10,.0f} {r['baseline_rps']:>10,.0f} {r['ratio']:>6.2f}   "
              f"{r['synfleet_rps_under_flood']:>11,.0f} {r['baseline_rps_under_flood']:>10,.0f} "
              f"{r['ratio_under_flood']:>6.2f}   {sum(r['errors'].values())}")
    print(f"  TIME_WAIT sockets retired for a reused 4-tuple: {result['tw_recycled']:,}, "
          f"refused: {result['tw_refused']:,}")
    return 0


def _bench_operator(args: argparse.Namespace) -> int:
    from synfleet_lab.bench.operator import Size, run

    size = Size(nodes=args.nodes, proxies=args.proxies, backends=args.backends, pools=args.pools,
                services=args.services, policies=args.policies, seconds=args.seconds,
                quiet_seconds=args.quiet_seconds, unrelated_per_s=args.unrelated_rate,
                changes_per_s=args.change_rate)
    say = (lambda what: None) if args.json else (lambda what: print(f"synfleet bench operator: {what}", flush=True))
    try:
        result = run(size, progress=say, profile=Path(args.profile) if args.profile else None)
    except ValueError as err:
        print(f"synfleet bench operator: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\noperator at {size.nodes:,} nodes, {size.services:,} Services, {size.policies:,} policies "
          f"(cluster written in {result['populate_s']:.0f} s; initial sync {result['initial_sync_s']:.1f} s)")
    print(f"  policy change -> both ConfigMaps: p50 {result['render_p50_ms']:,.0f} ms, "
          f"p99 {result['render_p99_ms']:,.0f} ms (aim <= {result['aims']['render_p99_ms']:,.0f}), "
          f"max {result['render_max_ms']:,.0f} ms; {result['policy_changes_seen']} of "
          f"{result['policy_changes']} seen")
    print(f"  renders from {result['unrelated_updates_quiet']} unrelated updates: "
          f"{result['renders_from_unrelated_events']} (aim 0)")
    print(f"  API requests per policy change: {result['api_requests_per_policy_change']}")
    print(f"  operator: peak RSS {result['operator_peak_rss_mib']:.0f} MiB "
          f"(aim <= {result['aims']['operator_peak_rss_mib']:.0f}), CPU {result['operator_cpu_s_during_load']:.1f} s "
          f"during the {size.seconds:g} s load, {result['operator_cpu_s_total']:.1f} s in all")
    return 0


def _check(args: argparse.Namespace) -> int:
    from synfleet_lab.check import run_check

    return run_check(print)


def _demo(args: argparse.Namespace) -> int:
    from synfleet_lab import demo

    say = (lambda *a, **k: None) if args.json else print
    result = demo.run(flood_rate=args.flood_rate, flood_s=args.flood_seconds, clients=args.clients,
                      progress=say)
    demo.chart(result, args.chart)
    if args.json:
        print(json.dumps(result.summary))
        return 0
    print("\nsynfleet demo summary")
    print(demo.table(result.summary))
    print(f"\nchart: {args.chart}; namespaces, agents and pins removed")
    return 0


def _cluster_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from synfleet_lab.cluster.binaries import kube_tools
    from synfleet_lab.cluster.cluster import LabCluster

    lab = LabCluster(Path(args.dir)).up(progress=lambda what: print(f"synfleet cluster up: {what}", flush=True))
    tools = kube_tools()
    print(f"\nfour nodes Ready; everything is under {args.dir}\n"
          f"  export KUBECONFIG={lab.kubeconfig} PATH={tools['kubectl'].parent}:$PATH\n"
          f"  images: {lab.images.operator.ref}, {lab.images.agent.ref}, {lab.images.web.ref}\n"
          f"  client and attacker: ip netns exec {lab.namespace('client').name} curl ...\n"
          f"take it down with: synfleet cluster down")
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from synfleet_lab.cluster.cluster import LabCluster

    path = Path(args.dir)
    if not (path / "state.json").exists():
        print(f"synfleet cluster down: no lab cluster in {path}", file=sys.stderr)
        return 1
    LabCluster.attach(path).down()
    print("synfleet cluster down: processes, cgroups, namespaces, mounts and files removed")
    return 0


def _interrupt(signum: int, frame) -> None:
    if in_callback(frame):
        # Raised inside libbpf's print callback, ctypes would drop it and the
        # command would go on: the binding raises it when the call returns.
        interrupt_after_call()
        return
    raise KeyboardInterrupt


def _interruptible(name: str, command):
    """Ctrl-C and SIGTERM (`timeout`, a closed session) end a lab command the
    same way: its context managers remove the namespaces, processes and pins it
    made, and one line says so instead of a traceback."""
    def run(args: argparse.Namespace) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _interrupt)
        try:
            return command(args)
        except KeyboardInterrupt:
            print(f"synfleet {name}: interrupted; everything it created was removed", file=sys.stderr)
            return 130
    return run


def check(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check", help="load the data plane, run a real handshake in network "
                                         "namespaces, and print what it did")
    check.set_defaults(func=_interruptible("check", _check))


def bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dp = bench_sub.add_parser("dataplane", help="ns per packet of each data-plane path")
    dp.add_argument("--repeat", type=int, default=1_000_000, help="runs per measurement (default 10^6)")
    dp.add_argument("--rounds", type=int, default=3, help="measurements per path; the best is kept")
    dp.add_argument("--json", action="store_true", help="print one JSON object")
    dp.set_defaults(func=_interruptible("bench dataplane", _bench_dataplane))
    fl = bench_sub.add_parser("flood", help="SYN+ACKs per second of synfleet, kernel SYN cookies, "
                                             "nftables synproxy and a zero-work floor (needs root, "
                                             "nft, two CPUs; trafgen for --generator trafgen)")
    fl.add_argument("--defences", help="comma-separated subset (default: all)")
    fl.add_argument("--generator", choices=GENERATORS, default="xdp",
                    help="xdp: BPF live frames from one CPU, the defence on another (default); "
                         "trafgen: netsniff-ng's trafgen, sharing the defence's CPU")
    fl.add_argument("--seconds", type=float, default=3.0, help="length of each rate step (default 3)")
    fl.add_argument("--json", action="store_true", help="print one JSON object")
    fl.add_argument("--chart", default="synfleet-bench-flood.png", help="PNG chart path ('' for none)")
    fl.set_defaults(func=_interruptible("bench flood", _bench_flood))
    ht = bench_sub.add_parser("http", help="HTTP requests/s (nginx, wrk, a connection per request) "
                              "through synfleet and without it, idle and under a SYN flood")
    ht.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run (default 5)")
    ht.add_argument("--flood-rate", type=int, default=250_000, help="SYNs per second (default 250000)")
    ht.add_argument("--connections", type=int, default=32, help="wrk's concurrent connections")
    ht.add_argument("--rounds", type=int, default=3, help="alternating runs per path; medians reported")
    ht.add_argument("--json", action="store_true", help="print one JSON object")
    ht.set_defaults(func=_interruptible("bench http", _bench_http))
    op = bench_sub.add_parser("operator", help="the operator at cluster scale against a real API server: "
                              "policy change -> ConfigMap latency under unrelated churn, API requests, RSS")
    op.add_argument("--nodes", type=int, default=2000, help="Nodes (default 2000)")
    op.add_argument("--proxies", type=int, default=20, help="of them in proxy pools (default 20)")
    op.add_argument("--backends", type=int, default=500, help="of them in backend pools (default 500)")
    op.add_argument("--pools", type=int, default=4, help="proxy pools, and as many backend pools (default 4)")
    op.add_argument("--services", type=int, default=20000, help="Services, each with an EndpointSlice (default 20000)")
    op.add_argument("--policies", type=int, default=1000, help="policies, each protecting a Service (default 1000)")
    op.add_argument("--seconds", type=float, default=60.0, help="length of the load phase (default 60)")
    op.add_argument("--quiet-seconds", type=float, default=10.0,
                    help="unrelated updates alone, before the load (default 10)")
    op.add_argument("--unrelated-rate", type=float, default=50.0,
                    help="unrelated Service/EndpointSlice updates per second (default 50)")
    op.add_argument("--change-rate", type=float, default=5.0, help="policy changes per second (default 5)")
    op.add_argument("--profile", metavar="FILE", help="write py-spy's samples of the operator during the load "
                                                       "phase to FILE (collapsed stacks, every thread)")
    op.add_argument("--json", action="store_true", help="print one JSON object")
    op.set_defaults(func=_interruptible("bench operator", _bench_operator))


def cluster(sub: argparse._SubParsersAction) -> None:
    from synfleet_lab.cluster.cluster import DEFAULT_DIR

    cl = sub.add_parser("cluster", help="a real four-node Kubernetes cluster in network namespaces "
                                        "(kubelets, containerd, kube-proxy; needs root)")
    cl_sub = cl.add_subparsers(dest="cluster", required=True)
    up = cl_sub.add_parser("up", help="build what is missing (cached), bring the cluster up, and leave it running")
    up.add_argument("--dir", default=str(DEFAULT_DIR), help=f"its state and logs (default {DEFAULT_DIR})")
    up.set_defaults(func=_interruptible("cluster up", _cluster_up))
    down = cl_sub.add_parser("down", help="remove everything `cluster up` made")
    down.add_argument("--dir", default=str(DEFAULT_DIR))
    down.set_defaults(func=_cluster_down)


def demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="a fleet in network namespaces under a SYN flood, with a "
                                       "summary and a chart (needs root)")
    demo.add_argument("--flood-rate", type=int, default=40000, help="SYNs per second (default 40000)")
    demo.add_argument("--flood-seconds", type=float, default=15.0, help="flood length (default 15)")
    demo.add_argument("--clients", type=int, default=4, help="concurrent legitimate clients")
    demo.add_argument("--chart", default="synfleet-demo.png", help="PNG chart path")
    demo.add_argument("--json", action="store_true", help="print only the summary as JSON")
    demo.set_defaults(func=_interruptible("demo", _demo))
