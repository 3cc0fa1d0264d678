"""A live fleet on the three-namespace topology: proxy and backend programs
loaded, configured and attached, one policy per address family."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from synfleet.agent.agent import salt_window
from synfleet.config.schema import DataplaneConfig, PolicyEntry
from synfleet.cookie import MasterKey, current_epoch, salts_for
from synfleet.dataplane.programs import BackendDataplane, ProxyDataplane
from synfleet_lab.testbed.configs import ENCAP_PORT, SERVICE_PORT, testbed_config
from synfleet_lab.testbed.topology import V4, V6, Topology

__all__ = ["ENCAP_PORT", "SERVICE_PORT", "Fleet", "recv_exact"]


@dataclass
class Fleet:
    topo: Topology
    proxy: ProxyDataplane
    backend: BackendDataplane
    salts: dict[int, bytes]
    proxy_config: DataplaneConfig

    @property
    def policies(self) -> dict[int, PolicyEntry]:
        """The proxy's policy by address family."""
        by_id = {p.id: p for p in self.proxy_config.policies}
        return {4: by_id[1], 6: by_id[2]}

    @classmethod
    def start(cls, keys: list[MasterKey], rotation_s: int) -> "Fleet":
        """The programs loaded as an agent loads them: the configuration, and the
        salts its master keys give around the current epoch."""
        salts = salts_for(keys, salt_window(rotation_s, current_epoch(rotation_s)))
        topo = Topology()
        services = {4: V4.service, 6: V6.service}
        proxy_cfg = testbed_config("proxy", interfaces=["p0"], node_v4=V4.proxy, node_v6=V6.proxy,
                                   services=services, rotation_s=rotation_s, salt_keys=keys,
                                   backends={4: [V4.backend], 6: [V6.backend]})
        backend_cfg = testbed_config("backend", interfaces=["b0"], node_v4=V4.backend,
                                     node_v6=V6.backend, services=services, rotation_s=rotation_s,
                                     allowed_proxies=[V4.proxy, V6.proxy])
        try:
            with topo.proxy.entered():
                proxy = ProxyDataplane()
                proxy.set_salts(salts)
                proxy.apply(proxy_cfg)
                proxy.attach("p0")
            with topo.backend.entered():
                backend = BackendDataplane()
                backend.apply(backend_cfg)
                backend.attach("b0")
        except BaseException:
            topo.delete()
            raise
        return cls(topo, proxy, backend, salts, proxy_cfg)

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
