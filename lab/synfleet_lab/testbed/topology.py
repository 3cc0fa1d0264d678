"""Client -- proxy -- backend in three network namespaces.

    client (c0) ---- (p0) proxy (p1) ---- (b0) backend, service address on lo
The proxy program sits on p0's ingress. The backend owns the service address
and answers the client directly (direct server return): its replies are routed
back through the proxy namespace as plain IP forwarding, untouched by synfleet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from synfleet_lab.testbed.netns import NetNS, unique_name, veth


@dataclass(frozen=True)
class Addresses:
    client: str
    proxy_client_side: str
    proxy: str
    backend: str
    service: str
    prefix: int


V4 = Addresses("198.18.1.7", "198.18.1.1", "198.18.0.1", "198.18.0.2", "198.19.0.10", 24)
V6 = Addresses("2001:db8:1::7", "2001:db8:1::1", "2001:db8:18::1", "2001:db8:18::2",
               "2001:db8:19::10", 64)


@dataclass
class Topology:
    client: NetNS = field(init=False)
    proxy: NetNS = field(init=False)
    backend: NetNS = field(init=False)

    def __post_init__(self) -> None:
        created: list[NetNS] = []
        try:
            for role in ("client", "proxy", "backend"):
                ns = NetNS(unique_name(f"sf-{role}"))
                created.append(ns)
                setattr(self, role, ns)
            self._wire()
        except BaseException:
            for ns in created:
                ns.delete()
            raise

    def _wire(self) -> None:
        veth(self.client, "c0", self.proxy, "p0")
        veth(self.proxy, "p1", self.backend, "b0")
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
            self.proxy.sysctl(key, 1)
        self.backend.sysctl("net.ipv4.tcp_syncookies", 1)
        for ns in (self.proxy, self.backend):
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        for a in (V4, V6):
            fam = "-4" if a is V4 else "-6"
            nodad = [] if a is V4 else ["nodad"]
            self.client.ip(fam, "addr", "add", f"{a.client}/{a.prefix}", "dev", "c0", *nodad)
            self.proxy.ip(fam, "addr", "add", f"{a.proxy_client_side}/{a.prefix}", "dev", "p0", *nodad)
            self.proxy.ip(fam, "addr", "add", f"{a.proxy}/{a.prefix}", "dev", "p1", *nodad)
            self.backend.ip(fam, "addr", "add", f"{a.backend}/{a.prefix}", "dev", "b0", *nodad)
            self.backend.ip(fam, "addr", "add", f"{a.service}/{32 if a is V4 else 128}", "dev", "lo")
            self.client.ip(fam, "route", "add", "default", "via", a.proxy_client_side)
            self.backend.ip(fam, "route", "add", "default", "via", a.proxy)

    def delete(self) -> None:
        for ns in (self.client, self.proxy, self.backend):
            ns.delete()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
