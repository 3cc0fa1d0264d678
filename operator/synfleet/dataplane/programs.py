"""Loaded data-plane programs with typed access to their maps."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass

from synfleet.bpf import BpfObject, Map, Program, TcHook, TypedMap, object_path
from synfleet.dataplane import layout
from synfleet.dataplane.flow import maglev_table
from synfleet.dataplane.layout import Counter, Endpoint, NodeConfig, Policy, Salt, Service

# Linux's own syncookie MSS tables (net/ipv4/syncookies.c, net/ipv6/syncookies.c).
DEFAULT_MSS_V4 = (536, 1300, 1440, 1460)
DEFAULT_MSS_V6 = (1220, 1420, 1440, 8940)
KERNEL_MIN_MSS = {4: 536, 6: 1220}   # bpf_sk_assign_tcp_reqsk() rejects less


def advertised_mss(mtu: int, family: int) -> int:
    """The MSS a proxy may advertise so that an encapsulated segment still fits
    `mtu`: the inner headers and the larger (IPv6) encapsulation come off."""
    inner_headers = 40 if family == 4 else 60
    return mtu - inner_headers - layout.ENCAP_OVERHEAD[6]


@dataclass(frozen=True)
class PolicySpec:
    policy_id: int
    mtu: int = 1500
    mss_v4: tuple[int, int, int, int] = DEFAULT_MSS_V4
    mss_v6: tuple[int, int, int, int] = DEFAULT_MSS_V6
    wscale: int = 7
    enforce: bool = True
    timestamps: bool = True
    ecn: bool = True
    sack: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.policy_id < layout.MAX_POLICIES:
            raise ValueError(f"policy id {self.policy_id} is not 0..{layout.MAX_POLICIES - 1}")
        for fam, table in ((4, self.mss_v4), (6, self.mss_v6)):
            if list(table) != sorted(table) or table[0] < KERNEL_MIN_MSS[fam]:
                raise ValueError(f"IPv{fam} MSS table {table} must ascend from at least "
                                 f"{KERNEL_MIN_MSS[fam]}")
        if not 0 <= self.wscale <= 14:
            raise ValueError(f"window scale {self.wscale} is not 0..14")
        if advertised_mss(self.mtu, 6) < KERNEL_MIN_MSS[6]:
            raise ValueError(f"MTU {self.mtu} leaves no room for encapsulated IPv6 segments")

    def to_struct(self) -> Policy:
        flags = layout.POLICY_ACTIVE
        for on, bit in ((self.enforce, layout.POLICY_ENFORCE), (self.timestamps, layout.POLICY_TIMESTAMPS),
                        (self.ecn, layout.POLICY_ECN), (self.sack, layout.POLICY_SACK)):
            flags |= bit if on else 0
        p = Policy(adv_mss_v4=advertised_mss(self.mtu, 4), adv_mss_v6=advertised_mss(self.mtu, 6),
                   wscale=self.wscale, flags=flags)
        p.mss_v4[:] = list(self.mss_v4)
        p.mss_v6[:] = list(self.mss_v6)
        return p


def node_config(rotation_seconds: float, encap_port: int, node_v4: str | None = None,
                node_v6: str | None = None) -> NodeConfig:
    cfg = NodeConfig(rotation_ns=int(rotation_seconds * 1e9),
                     encap_port_be=socket.htons(encap_port))
    if node_v4:
        cfg.node_addr_v4[:] = list(ipaddress.IPv4Address(node_v4).packed)
    if node_v6:
        cfg.node_addr_v6[:] = list(ipaddress.IPv6Address(node_v6).packed)
    return cfg


class Dataplane:
    """One loaded object (proxy or backend) and its shared maps."""

    program_name: str
    object_name: str

    def __init__(self) -> None:
        self.obj = BpfObject(object_path(self.object_name)).load()
        self.program: Program = self.obj.program(self.program_name)
        self.counters = TypedMap(self.obj.map("counters"), ctypes.c_uint32, ctypes.c_uint64)
        self.services = TypedMap(self.obj.map("services"), Endpoint, Service)
        self.policies = TypedMap(self.obj.map("policies"), ctypes.c_uint32, Policy)
        self.config = TypedMap(self.obj.map("node_config"), ctypes.c_uint32, NodeConfig)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, name: str) -> Map:
        return self.obj.map(name)

    def counter_values(self) -> dict[Counter, int]:
        """Per-CPU counters summed."""
        return {c: sum(v.value for v in self.counters.per_cpu(ctypes.c_uint32(c))) for c in Counter}

    def set_config(self, cfg: NodeConfig) -> None:
        self.config.put(ctypes.c_uint32(0), cfg)

    def set_policy(self, spec: PolicySpec) -> None:
        self.policies.put(ctypes.c_uint32(spec.policy_id), spec.to_struct())

    def add_service(self, address: str, port: int, policy_id: int) -> None:
        self.services.put(Endpoint.of(address, port), Service(policy_id))

    def attach(self, ifname: str) -> TcHook:
        hook = TcHook(socket.if_nametoindex(ifname))
        hook.attach(self.program)
        return hook


class ProxyDataplane(Dataplane):
    program_name = "synfleet_proxy"
    object_name = "proxy"

    def __init__(self) -> None:
        super().__init__()
        self.salts = TypedMap(self.obj.map("salts"), ctypes.c_uint32, Salt)
        self.protected_addrs = TypedMap(self.obj.map("protected_addrs"), Endpoint, Service)
        self.ring = TypedMap(self.obj.map("backend_ring"), ctypes.c_uint32, ctypes.c_uint32)
        self.backends = TypedMap(self.obj.map("backends"), ctypes.c_uint32, Endpoint)
        self._backend_index: dict[str, int] = {}

    def add_service(self, address: str, port: int, policy_id: int) -> None:
        super().add_service(address, port, policy_id)
        self.protected_addrs.put(Endpoint.of(address), Service(policy_id))

    def set_salts(self, salts: dict[int, bytes]) -> None:
        """Publish salts by epoch (previous, current, next); other slots are cleared."""
        slots = {epoch & 3: Salt.of(epoch, key) for epoch, key in salts.items()}
        if len(slots) != len(salts):
            raise ValueError(f"epochs {sorted(salts)} collide in the {layout.SALT_SLOTS} salt slots")
        for slot in range(layout.SALT_SLOTS):
            self.salts.put(ctypes.c_uint32(slot), slots.get(slot, Salt()))

    def set_backends(self, policy_id: int, addresses: list[str]) -> None:
        """The policy's Maglev table over these backend node addresses."""
        for a in addresses:
            if a not in self._backend_index:
                idx = len(self._backend_index)
                self.backends.put(ctypes.c_uint32(idx), Endpoint.of(a))
                self._backend_index[a] = idx
        table = maglev_table(addresses)
        base = policy_id * layout.RING_SIZE
        for slot in range(layout.RING_SIZE):
            value = self._backend_index[addresses[table[slot]]] if table else layout.BACKEND_NONE
            self.ring.put(ctypes.c_uint32(base + slot), ctypes.c_uint32(value))


class BackendDataplane(Dataplane):
    program_name = "synfleet_backend"
    object_name = "backend"

    def __init__(self) -> None:
        super().__init__()
        self.allowed_proxies = TypedMap(self.obj.map("allowed_proxies"), Endpoint, ctypes.c_uint32)

    def allow_proxy(self, address: str) -> None:
        self.allowed_proxies.put(Endpoint.of(address), ctypes.c_uint32(1))

