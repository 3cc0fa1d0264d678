"""The one builder of namespace topologies. The unit tests' proxy node, the
client–proxy–backend path, the fleet lab and the flood benchmark's lab all
describe their namespaces and links with it; `close()` removes every namespace
it made (also when building fails half-way: build inside `with fabric.building():`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from pyroute2 import netns

from synfleet_lab.testbed.netns import NetNS, namespaces, unique_name, veth


class Fabric:
    def __init__(self, prefix: str) -> None:
        self.prefix = unique_name(prefix)
        self.namespaces: dict[str, NetNS] = {}

    def __getitem__(self, role: str) -> NetNS:
        return self.namespaces[role]

    @contextlib.contextmanager
    def building(self) -> Iterator["Fabric"]:
        try:
            yield self
        except BaseException:
            self.close()
            raise

    def add(self, role: str, *, router: bool = False, rp_filter: bool = True) -> NetNS:
        """A namespace for `role`. A router forwards IPv4 and IPv6; without
        rp_filter, packets from sources it has no route back to (a flood's
        spoofed ones, a DSR reply's service address) are not dropped."""
        ns = NetNS(f"{self.prefix}-{role}")
        self.namespaces[role] = ns
        if router:
            ns.sysctl("net.ipv4.conf.all.forwarding", 1)
            ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        if not rp_filter:
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        return ns

    @staticmethod
    def link(a: NetNS, a_if: str, b: NetNS, b_if: str,
             a_addresses: Iterable[str] = (), b_addresses: Iterable[str] = ()) -> None:
        """A veth between two namespaces (or within one), up, with addresses (CIDR) on each end."""
        veth(a, a_if, b, b_if)
        for cidr in a_addresses:
            a.add_address(a_if, cidr)
        for cidr in b_addresses:
            b.add_address(b_if, cidr)

    @staticmethod
    def bridge(ns: NetNS, name: str, ports: Iterable[str] = ()) -> None:
        ns.add_link(name, "bridge")
        ns.link_up(name)
        for port in ports:
            ns.set_master(port, name)

    @staticmethod
    def pin_neighbours(entries: Iterable[tuple[NetNS, str, str, str]]) -> None:
        """Permanent neighbours, (namespace, interface, address, MAC): nobody
        waits for ARP or ND mid-measurement, and spoofed sources never answer."""
        for ns, ifname, address, mac in entries:
            ns.neighbour(ifname, address, mac)

    def close(self) -> None:
        for ns in reversed(list(self.namespaces.values())):
            ns.delete()
        self.namespaces.clear()
        # One that an interrupt caught between its creation and add()'s return:
        # the prefix is this fabric's alone.
        for name in namespaces():
            if name.startswith(self.prefix + "-"):
                with contextlib.suppress(OSError):
                    netns.remove(name)

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
