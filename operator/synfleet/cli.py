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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
