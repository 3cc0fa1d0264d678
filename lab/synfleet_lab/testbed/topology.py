"""Client -- proxy -- backend in three network namespaces.

    client (c0) ---- (p0) proxy (p1) ---- (b0) backend, service address on lo
The proxy program sits on p0's ingress. The backend owns the service address
and answers the client directly (direct server return): its replies are routed
back through the proxy namespace as plain IP forwarding, untouched by synfleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from synfleet_lab.testbed.fabric import Fabric


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


class Topology:
    def __init__(self) -> None:
        self.fabric = Fabric("sf")
        with self.fabric.building():
            self.client = self.fabric.add("client")
            self.proxy = self.fabric.add("proxy", router=True, rp_filter=False)
            self.backend = self.fabric.add("backend", rp_filter=False)
            self.backend.sysctl("net.ipv4.tcp_syncookies", 1)
            addresses = (V4, V6)
            self.fabric.link(self.client, "c0", self.proxy, "p0",
                             [f"{a.client}/{a.prefix}" for a in addresses],
                             [f"{a.proxy_client_side}/{a.prefix}" for a in addresses])
            self.fabric.link(self.proxy, "p1", self.backend, "b0",
                             [f"{a.proxy}/{a.prefix}" for a in addresses],
                             [f"{a.backend}/{a.prefix}" for a in addresses])
            for a in addresses:
                self.backend.add_address("lo", a.service)
                self.client.route("add", "default", a.proxy_client_side)
                self.backend.route("add", "default", a.proxy)

    def delete(self) -> None:
        self.fabric.close()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
