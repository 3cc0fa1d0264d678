"""SYN flood generators for `synfleet bench flood`, both sending from the
attacker namespace's eth0 a Linux-like SYN (MSS 1460, SACK permitted, window
scale 7) to the service from random sources in 10.66.0.0/16, random ports and
ISNs, valid checksums.

- `xdp`: lab/bpf/syngen.bpf.c run by BPF_PROG_TEST_RUN in live-frames mode on the
  generator's CPU. A frame costs the generator tens of nanoseconds, so one
  core floods faster than any defence here answers.
- `trafgen`: netsniff-ng's trafgen, one thread, paced with `-b` or flat out
  from its TX ring (whose frames carry their headers in page fragments).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from synfleet.bpf import BpfObject
from synfleet_lab import frames
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.netns import NetNS

FLOOD_SOURCE = "10.66.0.0"        # the /16 the bench generators' sources are drawn from
# Linux's SYN options without timestamps: MSS 1460, SACK permitted, window scale 7.
SYN_OPTIONS = bytes([0x02, 0x04, 0x05, 0xB4, 0x04, 0x02, 0x01, 0x03, 0x03, 0x07, 0x01, 0x01])
# lab/bpf/syngen.bpf.c's struct syngen_pace: interval_ns, next_ns, last_ns, stop_ns, sent.
PACE = struct.Struct("<QQQQQ")
ONLY_KEY = struct.pack("<I", 0)     # both of its maps hold one entry


def syn_template(dst_mac: str, src_mac: str, service: str, port: int) -> bytes:
    return frames.addressed(frames.tcp(FLOOD_SOURCE, service, 0, port, frames.SYN, 0, 0, options=SYN_OPTIONS),
                            dst_mac, src_mac)


@dataclass(frozen=True)
class Sent:
    """What a generator sent in one step, and over how long."""
    frames: int | None      # None: what the attacker's device counted
    seconds: float


class Generator(Protocol):
    def send(self, rate: int | None, seconds: float) -> Sent: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def pinned_to(cpu: int) -> Iterator[None]:
    """Run the calling thread on one CPU only, for the block."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class XdpSynGenerator:
    """lab/bpf/syngen.bpf.c's `syn_flood`, paced by the program itself."""

    # A BPF_PROG_TEST_RUN call sets its page pool up and tears it down, which
    # sleeps for tens of milliseconds (an RCU grace period): threads on the
    # generator's CPU take turns, one sending while the others sleep, and each
    # call is sized (from the one before) to last about CALL_S, so that the
    # sleeps are short beside it and a step ends close to its deadline.
    THREADS = 3
    CALL_S = 0.1
    MIN_RUNS, FIRST_RUNS, MAX_RUNS = 1 << 12, 1 << 18, 1 << 24

    def __init__(self, attacker: NetNS, ifname: str, template: bytes, cpu: int) -> None:
        self.attacker, self.ifname, self.template, self.cpu = attacker, ifname, template, cpu
        self.runs = [self.FIRST_RUNS] * self.THREADS
        self.obj = BpfObject(lab_object("syngen")).load()
        try:
            size = self.obj.btf_struct_size("syngen_frame")
            if size != len(template):
                raise ValueError(f"syngen.bpf.c sends {size}-byte frames; the template has {len(template)}")
            self.program = self.obj.program("syn_flood")
            self.obj.map("template").update(ONLY_KEY, template)
            self.pace = self.obj.map("pace")
        except BaseException:
            self.obj.close()
            raise

    def _sent(self) -> int:
        return PACE.unpack(self.pace.lookup(ONLY_KEY))[4]

    def send(self, rate: int | None, seconds: float) -> Sent:
        """Frames sent, including those the defence's full receive ring then
        dropped. The program stops sending at the deadline (bpf_ktime_get_ns
        is CLOCK_MONOTONIC), however long the last runs take to return."""
        interval_ns = round(1e9 / rate) if rate else 0
        before = self._sent()
        start_ns = time.monotonic_ns()
        stop_ns = start_ns + round(seconds * 1e9)
        self.pace.update(ONLY_KEY, PACE.pack(interval_ns, start_ns, 0, stop_ns, before))
        deadline = stop_ns / 1e9
        failures: list[BaseException] = []

        def sender(i: int) -> None:
            try:
                with self.attacker.entered(), pinned_to(self.cpu):
                    ifindex = socket.if_nametoindex(self.ifname)
                    while (start := time.monotonic()) < deadline and not failures:
                        self.program.run_live_frames(self.template, ifindex, self.runs[i])
                        took = max(time.monotonic() - start, 1e-3)
                        self.runs[i] = min(max(int(self.runs[i] * self.CALL_S / took), self.MIN_RUNS),
                                           self.MAX_RUNS)
            except BaseException as err:     # re-raised in the caller's thread
                failures.append(err)

        threads = [threading.Thread(target=sender, args=(i,), name=f"syngen-{i}") for i in range(self.THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return Sent(self._sent() - before, seconds)

    def close(self) -> None:
        self.obj.close()


class TrafgenSynGenerator:
    """netsniff-ng's trafgen in its own session, killed at the step's end."""

    def __init__(self, attacker: NetNS, ifname: str, template: bytes, workdir: str) -> None:
        self.attacker, self.ifname = attacker, ifname
        eth, ip, tcp = template[:14], template[14:34], template[34:]
        self.config = os.path.join(workdir, "syn.cfg")
        mac = lambda b: ":".join(f"{x:02x}" for x in b)  # noqa: E731
        with open(self.config, "w") as f:
            f.write("{\n"
                    f"  eth(da={mac(eth[:6])}, sa={mac(eth[6:12])}, type=0x0800),\n"
                    f"  ipv4(sa={FLOOD_SOURCE}, sa[2]=drnd(), sa[3]=drnd(), da={socket.inet_ntoa(ip[16:20])},"
                    " ttl=64, df),\n"
                    f"  tcp(sp=drnd(), dp={struct.unpack('!H', tcp[2:4])[0]}, seq=drnd(), syn, window=64240,"
                    f" doff={tcp[12] >> 4}),\n"
                    f"  {', '.join(f'0x{b:02x}' for b in tcp[20:])}\n"
                    "}\n")

    def send(self, rate: int | None, seconds: float) -> Sent:
        """Sent for as long as trafgen ran; the device counts what it sent."""
        args = ["trafgen", "-o", self.ifname, "-i", self.config, "--cpus", "1", "-q"]
        if rate:
            args += ["-b", f"{rate}pps", "-n", str(int(rate * seconds))]
        # trafgen forks its sender: the session groups them for one kill.
        start = time.monotonic()
        gen = self.attacker.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            gen.wait(timeout=seconds * 1.2 if rate else seconds)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # trafgen ignores SIGINT and SIGTERM while sending.
            _kill_group(gen)
        return Sent(None, time.monotonic() - start)

    def close(self) -> None:
        pass


def _kill_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGKILL a process's whole session and wait until none of it is left."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)      # ProcessLookupError once the group is empty
            time.sleep(0.01)
        raise RuntimeError(f"trafgen (session {proc.pid}) still running {timeout} s after SIGKILL")


class PacketSocketGenerator:
    """Pre-built frames, each with its own random source, port and sequence
    number, sent in bursts on an AF_PACKET socket bound to `ifname`, capped at
    a rate. Meant to run in a process of its own (see main())."""

    POOL = 8192
    BURST = 64

    def __init__(self, ifname: str, dst_mac: str, service: str, port: int, kind: str = "syn",
                 source_prefix: str = "10.66.0.0/16", seed: int | None = None) -> None:
        if kind not in ("syn", "ack"):
            raise ValueError(f"kind {kind!r}: syn or ack")
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((ifname, 0))
        src_mac = self.sock.getsockname()[4].hex(":")
        rng, net = random.Random(seed), ipaddress.ip_network(source_prefix)
        flags = frames.SYN if kind == "syn" else frames.ACK
        self.pool = []
        for _ in range(self.POOL):
            source = str(net[rng.randrange(1, net.num_addresses - 1)])
            options = frames.linux_syn_options(1460, 7, rng.getrandbits(32)) if kind == "syn" else b""
            frame = frames.tcp(source, service, rng.randrange(1024, 65536), port, flags, rng.getrandbits(32),
                               0 if kind == "syn" else rng.getrandbits(32), options)
            self.pool.append(frames.addressed(frame, dst_mac, src_mac))

    def send(self, rate: int | None, seconds: float,
             progress: Callable[[dict], None] = lambda _: None) -> Sent:
        if rate is None:
            raise ValueError("a packet socket generator always runs at a capped rate")
        sent, start, next_report = 0, time.monotonic(), 1.0
        while (elapsed := time.monotonic() - start) < seconds:
            if elapsed >= next_report:
                progress({"t": round(elapsed, 2), "sent": sent})
                next_report += 1.0
            ahead = sent / rate - elapsed
            if ahead > 0:
                time.sleep(min(ahead, 0.01))
                continue
            for i in range(self.BURST):
                with contextlib.suppress(BlockingIOError):
                    self.sock.send(self.pool[(sent + i) % self.POOL])
            sent += self.BURST
        return Sent(sent, time.monotonic() - start)

    def close(self) -> None:
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    """A bounded flood from this process's namespace: one JSON line per second
    ({"t", "sent"}), then {"done": true, "sent", "duration_s"}."""
    parser = argparse.ArgumentParser(description=main.__doc__)
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
    generator = PacketSocketGenerator(args.ifname, args.dst_mac, args.service, args.port, args.kind,
                                      args.source_prefix, args.seed)
    try:
        sent = generator.send(args.rate, args.duration, lambda entry: print(json.dumps(entry), flush=True))
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group: stop quietly
        return 130
    finally:
        generator.close()
    print(json.dumps({"done": True, "sent": sent.frames, "duration_s": round(sent.seconds, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
