"""The `synfleet` command."""

from __future__ import annotations

import argparse
import json
import sys


def _bench_dataplane(args: argparse.Namespace) -> int:
    from synfleet.bench.dataplane import run

    result = run(repeat=args.repeat, rounds=args.rounds)
    if args.json:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    print(f"synfleet data plane, ns per packet (BPF_PROG_TEST_RUN, {args.repeat} runs, best of "
          f"{args.rounds}; kernel {result['kernel']}, {result['cpu']})")
    for key in ("proxy_syn_ns", "proxy_ack_ns", "proxy_passthrough_ns", "backend_decap_ns"):
        print(f"  {key:<22} {result[key]:8.1f}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from synfleet.check import run_check

    return run_check(print)


def _agent(args: argparse.Namespace) -> int:
    from synfleet.agent import logs
    from synfleet.agent.agent import Agent, AgentOptions, uninstall
    from synfleet.config.schema import Role

    logs.setup(args.log_level)
    instance = args.instance or args.role
    if args.action == "uninstall":
        if not instance:
            print("synfleet agent uninstall: give --instance (or --role, its default)", file=sys.stderr)
            return 2
        detached = uninstall(instance, args.pin_root)
        if detached is None:
            print(f"synfleet agent: nothing installed at {args.pin_root}/{instance}")
            return 0
        print(f"synfleet agent: removed {args.pin_root}/{instance}; detached from "
              f"{', '.join(detached) or 'no interface'}")
        return 0
    if not args.role or not args.config:
        print("synfleet agent: --role and --config are required to run", file=sys.stderr)
        return 2
    role = Role(args.role)
    agent = Agent(AgentOptions(role=role, config_path=args.config, instance=instance,
                               pin_root=args.pin_root, listen=args.listen or None,
                               objects_dir=args.objects))
    agent.start()
    agent.run()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from synfleet import demo

    say = (lambda *a, **k: None) if args.json else print
    try:
        result = demo.run(flood_rate=args.flood_rate, flood_s=args.flood_seconds, clients=args.clients,
                          progress=say)
    except KeyboardInterrupt:
        print("synfleet demo: interrupted; everything it created was removed", file=sys.stderr)
        return 130
    demo.chart(result, args.chart)
    if args.json:
        print(json.dumps(result.summary))
        return 0
    print("\nsynfleet demo summary")
    print(demo.table(result.summary))
    print(f"\nchart: {args.chart}; namespaces, agents and pins removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load the data plane, run a real handshake in network "
                                         "namespaces, and print what it did")
    check.set_defaults(func=_check)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dp = bench_sub.add_parser("dataplane", help="ns per packet of each data-plane path")
    dp.add_argument("--repeat", type=int, default=1_000_000, help="runs per measurement (default 10^6)")
    dp.add_argument("--rounds", type=int, default=3, help="measurements per path; the best is kept")
    dp.add_argument("--json", action="store_true", help="print one JSON object")
    dp.set_defaults(func=_bench_dataplane)
    demo = sub.add_parser("demo", help="a fleet in network namespaces under a SYN flood, with a "
                                       "summary and a chart (needs root)")
    demo.add_argument("--flood-rate", type=int, default=40000, help="SYNs per second (default 40000)")
    demo.add_argument("--flood-seconds", type=float, default=15.0, help="flood length (default 15)")
    demo.add_argument("--clients", type=int, default=4, help="concurrent legitimate clients")
    demo.add_argument("--chart", default="synfleet-demo.png", help="PNG chart path")
    demo.add_argument("--json", action="store_true", help="print only the summary as JSON")
    demo.set_defaults(func=_demo)
    agent = sub.add_parser("agent", help="run the node agent (or `agent uninstall`)",
                           description="Run the node agent: load, pin and configure this node's "
                                       "data plane from a DataplaneConfig file. `synfleet agent "
                                       "uninstall --instance NAME` detaches and unpins it.")
    agent.add_argument("action", nargs="?", choices=["run", "uninstall"], default="run")
    agent.add_argument("--role", choices=["proxy", "backend"])
    agent.add_argument("--config", help="DataplaneConfig YAML file; re-read on change and on SIGHUP")
    agent.add_argument("--instance", help="pin directory name under --pin-root (default: the role)")
    agent.add_argument("--pin-root", default="/sys/fs/bpf/synfleet", help="bpffs directory for pins")
    agent.add_argument("--listen", default="0.0.0.0:9478",
                       help="host:port for /metrics, /healthz, /readyz ('' to disable)")
    agent.add_argument("--objects", help="directory with proxy.bpf.o and backend.bpf.o "
                                         "(default: the ones installed with synfleet)")
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    agent.set_defaults(func=_agent)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
