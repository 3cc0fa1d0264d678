"""The data-plane configuration document: what one node's agent programs into
its maps. The agent reads it from a file (`synfleet agent --config FILE`); the
operator renders the same document into a ConfigMap. One schema for both.

    apiVersion: synfleet.io/v1alpha1
    kind: DataplaneConfig
    role: proxy                      # or backend
    rotationSeconds: 60              # salt epoch length, the same on every node
    node:
      interfaces: [eth0]             # TC ingress hooks
      xdp: false                     # proxies: also answer SYNs in native XDP (driver support needed)
      attach: {mode: auto, order: first}   # tcx (or clsact) beside other programs: docs/agent.md
      addresses: {ipv4: 198.18.0.1, ipv6: "2001:db8:18::1"}
      encapPort: 6080
    policies:
      - id: 1
        name: default/web
        mode: enforce                # or monitor
        services: [{address: 198.19.0.10, port: 443}]
        cookie: {windowScale: 7, timestamps: true, ecn: true, sack: true, mtu: 1500}
        backendSet: web              # proxies only: the backendSets entry its connections go to
    backendSets:                     # proxies only: one Maglev table each, shared by its policies
      - name: web
        backends: [198.18.0.2, 198.18.0.3]
        drainSeconds: 300            # a backend's flows follow it this long after a change
    allowedProxies: [198.18.0.1]     # backends only
    peerBackends: [198.18.0.2, 198.18.0.3]      # backends only: who may hand on a flow (daisy chaining)
    saltKeys:                        # proxies only: the pool's master keys (synfleet.cookie.salts)
      - generation: 1
        fromEpoch: 29348812          # the first epoch whose salt it derives
        key: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
    failurePolicy: open              # proxies: no salt for an epoch -> SYNs go to the backends
                                     # unguarded (their kernels' SYN cookies); closed: dropped
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synfleet.abi import ENCAP_OVERHEAD, MAX_BACKENDS, MAX_POLICIES, MAX_PROXIES, MAX_SERVICES, MAX_TABLES
from synfleet.config import yamltext
from synfleet.cookie.salts import MasterKey

API_VERSION = "synfleet.io/v1alpha1"
KIND = "DataplaneConfig"


# Long enough for most request/response connections to end, short enough that
# a node leaving is gone within minutes (docs/dataplane.md, "Daisy chaining").
DEFAULT_DRAIN_SECONDS = 300

# Linux's own syncookie MSS tables (net/ipv4/syncookies.c, net/ipv6/syncookies.c).
DEFAULT_MSS_V4 = [536, 1300, 1440, 1460]
DEFAULT_MSS_V6 = [1220, 1420, 1440, 8940]
KERNEL_MIN_MSS = {4: 536, 6: 1220}   # bpf_sk_assign_tcp_reqsk() rejects less


class ConfigError(ValueError):
    """A document that cannot be applied; the message lists what to fix."""


class Role(str, enum.Enum):
    PROXY = "proxy"
    BACKEND = "backend"


class Mode(str, enum.Enum):
    ENFORCE = "enforce"
    MONITOR = "monitor"


class FailurePolicy(str, enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


MAX_SALT_KEYS = 8     # generations a document may hold (the operator keeps two or three)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Port = Annotated[int, Field(ge=1, le=65535)]


def advertised_mss(mtu: int, family: int) -> int:
    """The MSS a proxy may advertise so that an encapsulated segment still fits
    `mtu`: the inner headers and the larger (IPv6) encapsulation come off."""
    inner_headers = 40 if family == 4 else 60
    return mtu - inner_headers - ENCAP_OVERHEAD[6]


class NodeAddresses(_Strict):
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None

    @model_validator(mode="after")
    def _one_at_least(self) -> "NodeAddresses":
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("give the node's ipv4 or ipv6 address (or both)")
        return self


class AttachMode(str, enum.Enum):
    AUTO = "auto"      # tcx where the kernel has it (Linux 6.6+), else a clsact filter
    TCX = "tcx"        # a tcx link: several programs on one hook, in a given order
    TC = "tc"          # a clsact filter at tcHandle/tcPriority (older kernels)


class Order(str, enum.Enum):
    FIRST = "first"
    LAST = "last"


class Attach(_Strict):
    """How the TC program shares the interface's ingress hook with others (a CNI's)."""

    mode: AttachMode = AttachMode.AUTO
    order: Order = Field(Order.FIRST, description="tcx: run before (first) or after (last) the "
                                                  "programs already there")
    before: str | None = Field(None, min_length=1, max_length=15,
                               description="tcx: run just before the program of this name")
    after: str | None = Field(None, min_length=1, max_length=15,
                              description="tcx: run just after the program of this name")
    tc_handle: int = Field(1, alias="tcHandle", ge=1, le=0xFFFF, description="tc mode: filter handle")
    tc_priority: int = Field(1, alias="tcPriority", ge=1, le=0xFFFF,
                             description="tc mode: filter priority (lower runs first)")

    @model_validator(mode="after")
    def _one_anchor(self) -> "Attach":
        if self.before and self.after:
            raise ValueError("give attach.before or attach.after, not both")
        if (self.before or self.after) and self.mode is AttachMode.TC:
            raise ValueError("attach.before/after order tcx programs; with mode tc use tcPriority")
        return self


class Node(_Strict):
    interfaces: list[Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[^/\s]+$")]] = \
        Field(min_length=1)
    addresses: NodeAddresses
    encap_port: Port = Field(6080, alias="encapPort")
    clock_offset_seconds: float = Field(0.0, alias="clockOffsetSeconds", ge=-3600, le=3600,
                                        description="added to this node's clock when it derives "
                                                    "the salt epoch; corrects a known skew")
    xdp: bool = Field(False, description="proxies: attach the XDP front (native mode) to every "
                                         "interface as well, answering SYNs before an skb exists")
    attach: Attach = Field(default_factory=Attach)


class Cookie(_Strict):
    mtu: int = Field(1500, ge=1280, le=9000)
    mss_v4: list[int] = Field(default_factory=lambda: list(DEFAULT_MSS_V4), alias="mssV4",
                              min_length=4, max_length=4)
    mss_v6: list[int] = Field(default_factory=lambda: list(DEFAULT_MSS_V6), alias="mssV6",
                              min_length=4, max_length=4)
    window_scale: int = Field(7, alias="windowScale", ge=0, le=14)
    timestamps: bool = True
    ecn: bool = True
    sack: bool = True

    @model_validator(mode="after")
    def _mss_tables(self) -> "Cookie":
        for family, table in ((4, self.mss_v4), (6, self.mss_v6)):
            if table != sorted(table) or len(set(table)) != 4:
                raise ValueError(f"mssV{family} {table} must hold 4 strictly ascending values")
            if table[0] < KERNEL_MIN_MSS[family]:
                raise ValueError(f"mssV{family} starts at {table[0]}; the kernel needs at least "
                                 f"{KERNEL_MIN_MSS[family]}")
            if table[-1] > 65535:
                raise ValueError(f"mssV{family} value {table[-1]} is above 65535")
        return self

    def advertised_mss(self, family: int) -> int:
        return advertised_mss(self.mtu, family)


class ServiceEndpoint(_Strict):
    address: IPAddress
    port: Port


class PolicyEntry(_Strict):
    id: int = Field(ge=1, lt=MAX_POLICIES)
    name: str = ""
    mode: Mode = Mode.ENFORCE
    services: list[ServiceEndpoint] = Field(min_length=1)
    cookie: Cookie = Field(default_factory=Cookie)
    backend_set: str | None = Field(None, alias="backendSet", min_length=1,
                                    description="proxies: the name of the backendSets entry whose "
                                                "Maglev table picks each connection's backend")

    @field_validator("services")
    @classmethod
    def _unique_services(cls, services: list[ServiceEndpoint]) -> list[ServiceEndpoint]:
        seen = set()
        for s in services:
            if (s.address, s.port) in seen:
                raise ValueError(f"{s.address} port {s.port} is listed twice")
            seen.add((s.address, s.port))
        return services


class BackendSetEntry(_Strict):
    """Backends that policies share: one Maglev table on the proxy, however
    many policies name it (a pool's policies all go to the same nodes)."""
    name: str = Field(min_length=1, max_length=253)
    backends: list[IPAddress] = Field(min_length=1, max_length=MAX_BACKENDS)
    drain_seconds: int = Field(DEFAULT_DRAIN_SECONDS, alias="drainSeconds", ge=0, le=86400,
                               description="how long a backend that left the set (or whose flows "
                                           "moved to a newcomer) still gets its established flows, "
                                           "handed on by the new owner (0: never)")

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, backends: list[IPAddress]) -> list[IPAddress]:
        if len(set(backends)) != len(backends):
            raise ValueError("a backend address is listed twice")
        return backends


class SaltKeyEntry(_Strict):
    """One generation of the pool's master key; salts are derived from it."""
    generation: int = Field(ge=1)
    from_epoch: int = Field(alias="fromEpoch", ge=0, description="the first epoch this generation covers")
    key: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="256-bit master key, 64 hex digits")

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)


class DataplaneConfig(_Strict):
    api_version: Literal["synfleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DataplaneConfig"]
    role: Role
    rotation_seconds: int = Field(alias="rotationSeconds", ge=1, le=86400)
    node: Node
    policies: list[PolicyEntry] = Field(default_factory=list, max_length=MAX_POLICIES - 1)
    backend_sets: list[BackendSetEntry] = Field(default_factory=list, alias="backendSets", max_length=MAX_TABLES)
    allowed_proxies: list[IPAddress] = Field(default_factory=list, alias="allowedProxies",
                                             max_length=MAX_PROXIES)
    peer_backends: list[IPAddress] = Field(default_factory=list, alias="peerBackends", max_length=MAX_BACKENDS,
                                           description="backends: the pool's backend nodes, which may hand "
                                                       "this node segments of flows it owned (daisy chaining)")
    salt_keys: list[SaltKeyEntry] = Field(default_factory=list, alias="saltKeys", max_length=MAX_SALT_KEYS)
    failure_policy: FailurePolicy = Field(FailurePolicy.OPEN, alias="failurePolicy")

    @model_validator(mode="after")
    def _consistent(self) -> "DataplaneConfig":
        ids = Counter(p.id for p in self.policies)
        dupes = sorted(i for i, n in ids.items() if n > 1)
        if dupes:
            raise ValueError(f"policy ids {dupes} are used twice; give each policy its own id")
        owner: dict[tuple, int] = {}
        for p in self.policies:
            for s in p.services:
                other = owner.setdefault((s.address, s.port), p.id)
                if other != p.id:
                    raise ValueError(f"{s.address} port {s.port} is in policies {other} and {p.id}; "
                                     f"a service belongs to one policy")
        if sum(len(p.services) for p in self.policies) > MAX_SERVICES:
            raise ValueError(f"more than {MAX_SERVICES} services")
        if self.role is Role.PROXY:
            self._check_proxy()
        else:
            self._check_backend()
        return self

    def _check_proxy(self) -> None:
        names = Counter(b.name for b in self.backend_sets)
        twice = sorted(n for n, count in names.items() if count > 1)
        if twice:
            raise ValueError(f"backendSets {twice} are listed twice; give each set its own name")
        for i, p in enumerate(self.policies):
            if p.backend_set is None:
                raise ValueError(f"policies[{i}] (id {p.id}): a proxy needs the policy's backendSet")
            if p.backend_set not in names:
                raise ValueError(f"policies[{i}] (id {p.id}): backendSet {p.backend_set!r} is not in "
                                 f"backendSets ({', '.join(names) or 'none'})")
        if self.allowed_proxies:
            raise ValueError("allowedProxies is for backends; remove it from a proxy's config")
        if self.peer_backends:
            raise ValueError("peerBackends is for backends; remove it from a proxy's config")
        if not self.salt_keys:
            raise ValueError("a proxy needs saltKeys (the pool's master key, one per generation)")
        by_generation = sorted(self.salt_keys, key=lambda k: k.generation)
        generations = [k.generation for k in by_generation]
        if len(set(generations)) != len(generations):
            raise ValueError(f"saltKeys generations {generations} must be distinct")
        starts = [k.from_epoch for k in by_generation]
        if starts != sorted(set(starts)):
            raise ValueError(f"saltKeys: a later generation must start at a later epoch "
                             f"(generations {generations} start at {starts})")
        families = {b.version for s in self.backend_sets for b in s.backends}
        for family, own in ((4, self.node.addresses.ipv4), (6, self.node.addresses.ipv6)):
            if family in families and own is None:
                raise ValueError(f"IPv{family} backends need node.addresses.ipv{family} "
                                 f"(the encapsulation source)")

    def _check_backend(self) -> None:
        if self.node.xdp:
            raise ValueError("node.xdp is for proxies (the XDP front answers SYNs); remove it "
                             "from a backend's config")
        if any(p.backend_set for p in self.policies) or self.backend_sets:
            raise ValueError("backendSets and policies[].backendSet are for proxies; remove them "
                             "from a backend's config")
        if self.salt_keys:
            raise ValueError("saltKeys are for proxies only; a backend must not hold them")
        if self.policies and not self.allowed_proxies:
            raise ValueError("a backend needs allowedProxies (the proxy nodes' addresses)")

    @property
    def master_keys(self) -> list[MasterKey]:
        return [MasterKey(k.generation, k.from_epoch, k.key_bytes) for k in self.salt_keys]

    def to_document(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yamltext.dump(self.to_document())


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where or '(document)'}: {msg}")
    return "\n".join(lines)


def parse(document: object) -> DataplaneConfig:
    """Validate a loaded document; ConfigError names every field to fix."""
    if not isinstance(document, dict):
        raise ConfigError(f"(document): expected a mapping with apiVersion {API_VERSION} and "
                          f"kind {KIND}, got {type(document).__name__}")
    version = document.get("apiVersion")
    if version != API_VERSION:
        raise ConfigError(f"apiVersion: {version!r} is not supported; this agent reads {API_VERSION}")
    try:
        return DataplaneConfig.model_validate(document)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def loads(text: str) -> DataplaneConfig:
    try:
        document = yamltext.load(text)
    except yamltext.YAMLError as err:
        raise ConfigError(f"not YAML: {err}") from None
    return parse(document)


def load(path: str) -> DataplaneConfig:
    with open(path, encoding="utf-8") as f:
        return loads(f.read())
