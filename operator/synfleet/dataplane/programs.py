"""Loaded data-plane programs, and how a DataplaneConfig becomes map contents.

Every configuration table has two halves (bpf/sf_maps.h). `apply()` writes the
whole inactive half, then flips the one-word `active` map: a packet sees the
old configuration or the new one, never a mix. Salts are not double-buffered:
an epoch's key never changes once published, so each slot is written while no
packet can be using it (see set_salts).
"""

from __future__ import annotations

import ctypes
import os
import socket
import time

from synfleet import abi
from synfleet.abi import ConfigValue, Counter, Endpoint, PolicyValue, RingSlotValue, SaltValue, ServiceValue
from synfleet.bpf import BpfObject, Map, Program, TcHook, TypedMap, object_path
from synfleet.config import schema
from synfleet.dataplane.flow import maglev_table
from synfleet.dataplane.generations import Previous, SlotTable, next_table

# A packet holds the half it read for one program run (microseconds); the half
# just left is not rewritten before this much time has passed.
FLIP_GRACE_S = 0.05


def policy_value(policy: schema.PolicyEntry, fail_open: bool, table: int = 0) -> PolicyValue:
    c = policy.cookie
    flags = abi.POLICY_ACTIVE
    for on, bit in ((policy.mode is schema.Mode.ENFORCE, abi.POLICY_ENFORCE),
                    (c.timestamps, abi.POLICY_TIMESTAMPS), (c.ecn, abi.POLICY_ECN),
                    (c.sack, abi.POLICY_SACK), (fail_open, abi.POLICY_FAIL_OPEN)):
        flags |= bit if on else 0
    p = PolicyValue(adv_mss_v4=c.advertised_mss(4), adv_mss_v6=c.advertised_mss(6),
                    wscale=c.window_scale, flags=flags, table=table)
    p.mss_v4[:] = c.mss_v4
    p.mss_v6[:] = c.mss_v6
    return p


def config_value(cfg: schema.DataplaneConfig, slot: int) -> ConfigValue:
    node = cfg.node
    nc = ConfigValue(rotation_ns=cfg.rotation_seconds * 10**9,
                    encap_port_be=socket.htons(node.encap_port), slot=slot,
                    clock_offset_ns=round(node.clock_offset_seconds * 1e9))
    if node.addresses.ipv4:
        nc.node_addr_v4[:] = list(node.addresses.ipv4.packed)
    if node.addresses.ipv6:
        nc.node_addr_v6[:] = list(node.addresses.ipv6.packed)
    return nc


def _u32(v: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(v)


def _sync_keys(table: TypedMap, slot: int, wanted: dict[bytes, object]) -> None:
    """Make the `slot` half of a hash map keyed by Endpoint hold exactly `wanted`."""
    for raw in list(table.raw.keys()):
        key = Endpoint.from_buffer_copy(raw)
        if key.slot == slot and raw not in wanted:
            table.raw.delete(raw)
    for raw, value in wanted.items():
        table.raw.update(raw, bytes(value))


def _address_order(address: schema.IPAddress) -> tuple[int, bytes]:
    return address.version, address.packed


def _keyed(endpoint: Endpoint, slot: int) -> bytes:
    endpoint.slot = slot
    return bytes(endpoint)


class Dataplane:
    """One loaded object (proxy or backend) and its maps. With `pins`, maps
    already pinned there are re-used (their contents survive a restart)."""

    program_name: str
    object_name: str
    MAPS: tuple[str, ...] = ("counters", "active", "node_config", "services", "policies")
    # Maps an upgrade may enlarge whose contents can start over: an agent built
    # with fewer counters pinned a smaller `counters` map; ABI 6 has 8192 policy
    # ids where ABI 5 had 256.
    OUTGROWN: tuple[str, ...] = ("counters", "policies")

    def __init__(self, pins: str | None = None, objects_dir: str | None = None) -> None:
        self.obj = BpfObject(object_path(self.object_name, objects_dir))
        self.reused: list[str] = []
        if pins:
            for name in self.MAPS:
                path = os.path.join(pins, name)
                if os.path.exists(path):
                    pinned = Map.open_pinned(path)
                    try:
                        if name in self.OUTGROWN and pinned.max_entries < self.obj.map_max_entries(name):
                            continue   # pin_maps() puts the new, larger map in its place
                        self.obj.reuse_map(name, pinned)
                    finally:
                        pinned.close()
                    self.reused.append(name)
        self.obj.load()
        # Maps that start empty: not pinned before (new in this release, or
        # renamed because their layout changed), or outgrown.
        self.fresh = [name for name in self.MAPS if name not in self.reused]
        self.program: Program = self.obj.program(self.program_name)
        self.counters = TypedMap(self.obj.map("counters"), ctypes.c_uint32, ctypes.c_uint64)
        self.active = TypedMap(self.obj.map("active"), ctypes.c_uint32, ctypes.c_uint32)
        self.services = TypedMap(self.obj.map("services"), Endpoint, ServiceValue)
        self.policies = TypedMap(self.obj.map("policies"), ctypes.c_uint32, PolicyValue)
        self.config = TypedMap(self.obj.map("node_config"), ctypes.c_uint32, ConfigValue)
        self._last_flip = 0.0
        # Per half, the policy ids written active there (None: unknown, a
        # previous agent's): only those are cleared, not all MAX_POLICIES ids.
        self._ids_in_half: list[set[int] | None] = [None] * abi.CONFIG_SLOTS

    def close(self) -> None:
        self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, name: str) -> Map:
        return self.obj.map(name)

    def pin_maps(self, directory: str) -> None:
        """Pin every map not pinned there yet (re-used maps already are); a pinned
        map this object outgrew is replaced."""
        for name in self.MAPS:
            path = os.path.join(directory, name)
            if os.path.exists(path) and name not in self.reused:
                os.unlink(path)    # outgrown: the programs now run on the new map
            if not os.path.exists(path):
                self.map(name).pin(path)

    def counter_values(self) -> dict[Counter, int]:
        """Per-CPU counters summed."""
        return {c: sum(v.value for v in self.counters.per_cpu(_u32(c))) for c in Counter}

    def active_slot(self) -> int:
        return self.active.get(_u32(0)).value

    def applied(self) -> bool:
        """Whether the active half holds a configuration (after a restart: the previous agent's)."""
        return self.config.get(_u32(self.active_slot())).rotation_ns != 0

    def apply(self, cfg: schema.DataplaneConfig) -> int:
        """Write `cfg` into the inactive half, then make it the active one."""
        target = 1 - self.active_slot()
        wait = self._last_flip + FLIP_GRACE_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._write_half(cfg, target)
        self.active.put(_u32(0), _u32(target))
        self._last_flip = time.monotonic()
        return target

    def _table_of(self, policy: schema.PolicyEntry) -> int:
        """The Maglev table the policy's connections use (proxies only)."""
        return 0

    def _write_half(self, cfg: schema.DataplaneConfig, slot: int) -> None:
        fail_open = cfg.failure_policy is schema.FailurePolicy.OPEN
        base = slot * abi.MAX_POLICIES
        stale = self._ids_in_half[slot]
        for pid in range(abi.MAX_POLICIES) if stale is None else stale - {p.id for p in cfg.policies}:
            self.policies.put(_u32(base + pid), PolicyValue())
        for p in cfg.policies:
            self.policies.put(_u32(base + p.id), policy_value(p, fail_open, self._table_of(p)))
        self._ids_in_half[slot] = {p.id for p in cfg.policies}
        _sync_keys(self.services, slot, {
            _keyed(Endpoint.of(s.address, s.port), slot): ServiceValue(p.id)
            for p in cfg.policies for s in p.services})
        self.config.put(_u32(slot), config_value(cfg, slot))

    def attach(self, ifname: str) -> TcHook:
        hook = TcHook(socket.if_nametoindex(ifname))
        hook.attach(self.program)
        return hook


class ProxyDataplane(Dataplane):
    """The TC program, and its XDP front (bpf/proxy_xdp.bpf.c) loaded on the
    same maps, for interfaces whose driver runs XDP natively."""

    program_name = "synfleet_proxy"
    object_name = "proxy"
    MAPS = Dataplane.MAPS + ("salts", "protected_addrs", "maglev_slots", "backends")
    XDP_MAPS = Dataplane.MAPS + ("salts",)
    # ABI 4 keeps thousands of epochs ahead where ABI 3 kept four. (ABI 6's
    # tables are per backend set, not per policy: a new map, maglev_slots.)
    OUTGROWN = Dataplane.OUTGROWN + ("salts",)

    def __init__(self, pins: str | None = None, objects_dir: str | None = None) -> None:
        super().__init__(pins, objects_dir)
        self.xdp_obj = BpfObject(object_path("proxy_xdp", objects_dir))
        try:
            for name in self.XDP_MAPS:
                self.xdp_obj.reuse_map(name, self.obj.map(name))
            self.xdp_obj.load()
            self.xdp_program: Program = self.xdp_obj.program("synfleet_proxy_xdp")
        except BaseException:
            self.xdp_obj.close()
            self.obj.close()
            raise
        self.salts = TypedMap(self.obj.map("salts"), ctypes.c_uint32, SaltValue)
        self.protected_addrs = TypedMap(self.obj.map("protected_addrs"), Endpoint, ServiceValue)
        self.slots = TypedMap(self.obj.map("maglev_slots"), ctypes.c_uint32, RingSlotValue)
        self.backends = TypedMap(self.obj.map("backends"), ctypes.c_uint32, Endpoint)
        self._salt_slots: list[bytes] | None = None     # the salt map's slots as last written here
        # Per backend set: the table the active half holds (None until this object's
        # first apply), and the one being written; when the earliest previous
        # backend named stops being named (derived once per write, not per tick).
        self._tables: dict[str, SlotTable] | None = None
        self._written: dict[str, SlotTable] = {}
        self._expiry: float | None = None
        self._written_expiry: float | None = None
        self._table_index: dict[str, int] = {}     # backend set -> its table in the half being written

    def close(self) -> None:
        self.xdp_obj.close()
        super().close()

    def published_salts(self) -> dict[int, bytes]:
        out = {}
        for slot in range(abi.SALT_SLOTS):
            s = self.salts.get(_u32(slot))
            if s.valid:
                out[s.epoch] = s.k0.to_bytes(8, "little") + s.k1.to_bytes(8, "little")
        return out

    def set_salts(self, salts: dict[int, bytes]) -> None:
        """Make the salt map hold exactly these salts by epoch (a window around
        now, SALT_SLOTS epochs at most). A slot changes only for an epoch that no
        packet uses: one that has passed, or one still ahead of the next (a
        future epoch's salt changes when a new master key generation is learnt,
        which is announced well ahead of its first epoch)."""
        slots = {epoch % abi.SALT_SLOTS: SaltValue.of(epoch, key) for epoch, key in salts.items()}
        if len(slots) != len(salts):
            raise ValueError(f"epochs {sorted(salts)} collide in the {abi.SALT_SLOTS} salt slots")
        if self._salt_slots is None:     # what the map holds (a previous agent's, after a restart)
            self._salt_slots = [bytes(self.salts.get(_u32(slot))) for slot in range(abi.SALT_SLOTS)]
        for slot in range(abi.SALT_SLOTS):
            want = bytes(slots.get(slot, SaltValue()))
            if self._salt_slots[slot] != want:
                self.salts.put(_u32(slot), SaltValue.from_buffer_copy(want))
                self._salt_slots[slot] = want

    def apply(self, cfg: schema.DataplaneConfig) -> int:
        slot = super().apply(cfg)
        self._tables, self._expiry = self._written, self._written_expiry
        return slot

    def next_expiry(self) -> float | None:
        """When a previous backend's drain period ends (time.monotonic()): apply
        the configuration again then, and the slot stops naming it."""
        return self._expiry

    def previous_backends(self) -> dict[str, set]:
        """Per backend set, the previous backends its slots still name."""
        now = time.monotonic()
        return {name: {a for a in t.previous_at(now) if a} for name, t in (self._tables or {}).items()}

    def _tables_in_force(self, cfg: schema.DataplaneConfig, now: float) -> dict[str, SlotTable]:
        """The tables the active half holds: this object's own once it applied
        one; before that, after a restart, the previous agent's, read from the
        pinned map for each backend set it served (once: a set added later
        starts with no previous backends, whatever an earlier set left)."""
        if self._tables is not None:
            return self._tables
        if "maglev_slots" not in self.reused or "policies" not in self.reused or not self.applied():
            return {}
        half = self.active_slot()
        tables = {}
        for s in cfg.backend_sets:
            # The previous agent's table of the set: the one its policies used.
            # A set none of whose policies it served starts afresh.
            values = [self.policies.get(_u32(half * abi.MAX_POLICIES + p.id))
                      for p in cfg.policies if p.backend_set == s.name]
            found = {v.table for v in values if v.flags & abi.POLICY_ACTIVE}
            if len(found) == 1 and (t := self._table_in_maps(half, found.pop(), s.drain_seconds, now)):
                tables[s.name] = t
        return tables

    def _table_in_maps(self, half: int, table: int, drain_s: float, now: float) -> SlotTable | None:
        """A table of the active half, as the previous agent left it. Its
        drain periods start again (their ends were in its memory)."""
        if table >= abi.MAX_TABLES:
            return None
        base = (half * abi.MAX_TABLES + table) * abi.RING_SIZE
        slots = [self.slots.get(_u32(base + i)) for i in range(abi.RING_SIZE)]
        if any(s.current >= abi.MAX_BACKENDS for s in slots):
            return None
        known: dict[int, schema.IPAddress] = {}

        def backend(index: int) -> schema.IPAddress:
            if index not in known:
                known[index] = self.backends.get(_u32(half * abi.MAX_BACKENDS + index)).address
            return known[index]
        return SlotTable(tuple(backend(s.current) for s in slots),
                         tuple(Previous(backend(s.previous), now + drain_s)
                               if s.previous < abi.MAX_BACKENDS else None for s in slots))

    def _table_of(self, policy: schema.PolicyEntry) -> int:
        return self._table_index[policy.backend_set]

    def _write_half(self, cfg: schema.DataplaneConfig, slot: int) -> None:
        now = time.monotonic()
        before = self._tables_in_force(cfg, now)
        tables = {}
        for s in cfg.backend_sets:
            # Sorted so that every proxy, whatever order its document lists the
            # backends in, builds the same table: a flow keeps its backend.
            members = sorted(s.backends, key=_address_order)
            owners = [members[m] for m in maglev_table([str(a) for a in members])]
            tables[s.name] = next_table(before.get(s.name), owners, now, s.drain_seconds)
        previous = {name: t.previous_at(now) for name, t in tables.items()}
        addresses = sorted({a for t in tables.values() for a in t.current} |
                           {a for named in previous.values() for a in named if a}, key=_address_order)
        if len(addresses) > abi.MAX_BACKENDS:
            raise ValueError(f"{len(addresses)} backends, current and previous: more than {abi.MAX_BACKENDS}")
        index = {a: i for i, a in enumerate(addresses)}
        for a, i in index.items():
            self.backends.put(_u32(slot * abi.MAX_BACKENDS + i), Endpoint.of(a))
        self._table_index = {name: i for i, name in enumerate(tables)}
        for name, t in tables.items():
            base = (slot * abi.MAX_TABLES + self._table_index[name]) * abi.RING_SIZE
            for i, (current, prev) in enumerate(zip(t.current, previous[name])):
                self.slots.put(_u32(base + i), RingSlotValue(index[current],
                                                             index[prev] if prev else abi.RING_NONE))
        self._written = tables
        ends = [e for t in tables.values() if (e := t.next_expiry(now)) is not None]
        self._written_expiry = min(ends) if ends else None
        _sync_keys(self.protected_addrs, slot, {
            _keyed(Endpoint.of(s.address), slot): ServiceValue(p.id)
            for p in cfg.policies for s in p.services})
        super()._write_half(cfg, slot)


class BackendDataplane(Dataplane):
    program_name = "synfleet_backend"
    object_name = "backend"
    MAPS = Dataplane.MAPS + ("encap_sources",)

    def __init__(self, pins: str | None = None, objects_dir: str | None = None) -> None:
        super().__init__(pins, objects_dir)
        self.encap_sources = TypedMap(self.obj.map("encap_sources"), Endpoint, ctypes.c_uint32)

    def _write_half(self, cfg: schema.DataplaneConfig, slot: int) -> None:
        kinds: dict[schema.IPAddress, int] = {}
        for a in cfg.allowed_proxies:
            kinds[a] = kinds.get(a, 0) | abi.SOURCE_PROXY
        own = {cfg.node.addresses.ipv4, cfg.node.addresses.ipv6}
        for a in cfg.peer_backends:
            if a not in own:
                kinds[a] = kinds.get(a, 0) | abi.SOURCE_PEER
        _sync_keys(self.encap_sources, slot, {_keyed(Endpoint.of(a), slot): _u32(k) for a, k in kinds.items()})
        super()._write_half(cfg, slot)


def dataplane_for(role: schema.Role, pins: str | None = None,
                  objects_dir: str | None = None) -> Dataplane:
    kind = ProxyDataplane if role is schema.Role.PROXY else BackendDataplane
    return kind(pins, objects_dir)
