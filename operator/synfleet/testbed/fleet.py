"""A live fleet on the three-namespace topology: proxy and backend programs
loaded, configured and attached, one policy per address family."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from synfleet.dataplane.programs import BackendDataplane, PolicySpec, ProxyDataplane, node_config
from synfleet.testbed.topology import V4, V6, Topology

SERVICE_PORT = 8080
ENCAP_PORT = 6080
POLICIES = {4: PolicySpec(policy_id=1), 6: PolicySpec(policy_id=2)}


@dataclass
class Fleet:
    topo: Topology
    proxy: ProxyDataplane
    backend: BackendDataplane
    salts: dict[int, bytes]

    @classmethod
    def start(cls, salts: dict[int, bytes], rotation_s: int) -> "Fleet":
        topo = Topology()
        try:
            with topo.proxy.entered():
                proxy = ProxyDataplane()
                proxy.set_config(node_config(rotation_s, ENCAP_PORT, V4.proxy, V6.proxy))
                proxy.set_salts(salts)
                for fam, a in ((4, V4), (6, V6)):
                    proxy.set_policy(POLICIES[fam])
                    proxy.add_service(a.service, SERVICE_PORT, POLICIES[fam].policy_id)
                    proxy.set_backends(POLICIES[fam].policy_id, [a.backend])
                proxy.attach("p0")
            with topo.backend.entered():
                backend = BackendDataplane()
                backend.set_config(node_config(rotation_s, ENCAP_PORT, V4.backend, V6.backend))
                for fam, a in ((4, V4), (6, V6)):
                    backend.set_policy(POLICIES[fam])
                    backend.add_service(a.service, SERVICE_PORT, POLICIES[fam].policy_id)
                    backend.allow_proxy(a.proxy)
                backend.attach("b0")
        except BaseException:
            topo.delete()
            raise
        return cls(topo, proxy, backend, salts)

    def stop(self) -> None:
        self.proxy.close()
        self.backend.close()
        self.topo.delete()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 16, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
