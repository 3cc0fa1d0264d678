"""The flood benchmark's namespaces and links.

    attacker ──eth0── defence node ──eth1── server
    (generator)       └──eth2── client

Addresses are IPv4 only; every neighbour is permanent (no ARP under load, and
none for the spoofed sources). With a defence CPU, the defence node's receive
work on its flood- and client-facing links runs in NAPI threads pinned there,
and the attacker's and client's receive work (of the answers) in NAPI threads
pinned to the generator's CPU: on a veth the receiver's work otherwise runs
where the frame is sent, which would charge the defence core for the
attacker's receive of every answer, a cost a physical NIC's transmit does not
have.
"""

from __future__ import annotations

import contextlib
import os

from synfleet_lab.testbed.fabric import Fabric

SERVICE = "198.19.0.10"
FLOOD_PREFIX = "10.66.0.0/16"
ATTACKER, DEFENCE_NEAR, DEFENCE_FAR, SERVER = "10.77.0.66", "10.77.0.1", "10.77.1.1", "10.77.1.2"
CLIENT, DEFENCE_CLIENT_SIDE = "10.77.2.2", "10.77.2.1"

def _napi_threads() -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("napi/"):
                pids.add(int(pid))
    return pids


def _threaded_napi(ns, ifnames: tuple[str, ...], cpu: int, realtime: bool = False) -> None:
    """Receive work of `ifnames` in NAPI kernel threads pinned to `cpu` (a
    veth has NAPI once GRO is on); `realtime`: they preempt whatever else runs
    there, as a NIC's interrupt would (else a CPU-bound generator keeps them
    waiting and their 256-frame ring overflows)."""
    for ifname in ifnames:
        ns.set_feature(ifname, "rx-gro", True)
        before = _napi_threads()
        # Threaded NAPI is a sysfs switch, and sysfs shows a namespace's devices only in its own mount.
        ns.run_with_sysfs("sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded")
        threads = _napi_threads() - before
        if not threads:
            raise RuntimeError(f"no NAPI thread appeared for {ns.name}'s {ifname}")
        for pid in threads:
            os.sched_setaffinity(pid, {cpu})
            if realtime:
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(50))


class FloodTopology:
    def __init__(self, defence_cpu: int | None, generator_cpu: int | None = None) -> None:
        self.fabric = Fabric("sfb")
        with self.fabric.building():
            self.attacker = self.fabric.add("att", rp_filter=False)
            self.defence = self.fabric.add("dfn", rp_filter=False)
            self.defence.sysctl("net.ipv4.conf.all.forwarding", 1)
            self.server = self.fabric.add("srv", rp_filter=False)
            self.client = self.fabric.add("cli", rp_filter=False)
            self.fabric.link(self.attacker, "eth0", self.defence, "eth0", [f"{ATTACKER}/24"], [f"{DEFENCE_NEAR}/24"])
            self.fabric.link(self.defence, "eth1", self.server, "eth0", [f"{DEFENCE_FAR}/24"], [f"{SERVER}/24"])
            self.fabric.link(self.client, "eth0", self.defence, "eth2", [f"{CLIENT}/24"],
                             [f"{DEFENCE_CLIENT_SIDE}/24"])
            self.server.add_address("lo", SERVICE)
            self.client.route("add", SERVICE, DEFENCE_CLIENT_SIDE)
            self.server.route("add", "default", DEFENCE_FAR)
            self.defence.route("add", FLOOD_PREFIX, ATTACKER)
            self.defence.route("add", SERVICE, SERVER)
            self.attacker.route("add", SERVICE, DEFENCE_NEAR)
            ends = ((self.attacker, "eth0", ATTACKER), (self.defence, "eth0", DEFENCE_NEAR),
                    (self.defence, "eth1", DEFENCE_FAR), (self.server, "eth0", SERVER),
                    (self.client, "eth0", CLIENT), (self.defence, "eth2", DEFENCE_CLIENT_SIDE))
            self.mac = {address: ns.mac(ifname) for ns, ifname, address in ends}
            self.fabric.pin_neighbours((ns, ifname, peer, self.mac[peer]) for ns, ifname, peer in (
                (self.attacker, "eth0", DEFENCE_NEAR), (self.defence, "eth0", ATTACKER),
                (self.defence, "eth1", SERVER), (self.server, "eth0", DEFENCE_FAR),
                (self.client, "eth0", DEFENCE_CLIENT_SIDE), (self.defence, "eth2", CLIENT)))
            if defence_cpu is not None:
                # The defence node's receive work gets a CPU of its own, as a NIC's
                # interrupt affinity would give it (live frames need the receiver's
                # NAPI anyway); legitimate handshakes compete with the flood there.
                _threaded_napi(self.defence, ("eth0", "eth2"), defence_cpu)
            if generator_cpu is not None:
                _threaded_napi(self.attacker, ("eth0",), generator_cpu, realtime=True)
                _threaded_napi(self.client, ("eth0",), generator_cpu, realtime=True)

    def attacker_packets(self) -> tuple[int, int]:
        """(sent, received) frames on the attacker's link: floods out, answers in."""
        return self.attacker.link_packets("eth0")

    def close(self) -> None:
        self.fabric.close()
