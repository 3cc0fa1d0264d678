"""Typed views of the custom resources (group synfleet.io, v1alpha1) as the API
server stores them: after its defaults and validation, so the models only
mirror the CRDs in crds/ and never invent their own defaults."""

from __future__ import annotations

import enum
import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synfleet.config.schema import DEFAULT_DRAIN_SECONDS, Attach, Cookie, FailurePolicy, Mode, Role
from synfleet.contract import POOL_KINDS


class _Spec(BaseModel):
    # The API server already rejected unknown fields; status and metadata are
    # read elsewhere.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class Toleration(_Spec):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds")


class SelectorRequirement(_Spec):
    key: str
    operator: str                      # In, NotIn, Exists, DoesNotExist (the CRD's enum)
    values: list[str] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        inside = present and labels[self.key] in self.values
        return inside if self.operator == "In" else not inside


class LabelSelector(_Spec):
    """Kubernetes' label selector: every label and every expression must hold."""
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[SelectorRequirement] = Field(default_factory=list, alias="matchExpressions")

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and \
            all(e.matches(labels) for e in self.match_expressions)


class MetricsAddress(str, enum.Enum):
    NODE_IP = "nodeIP"        # the node's InternalIP (status.hostIP): what Prometheus scrapes
    LOOPBACK = "loopback"     # 127.0.0.1: for a scraper on the node itself


class SaltSpec(_Spec):
    rotation_seconds: int = Field(60, alias="rotationSeconds")
    master_rotation_seconds: int = Field(86400, alias="masterRotationSeconds")


class PoolSpec(_Spec):
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    interface: str
    xdp: bool = False                              # proxy pools only (the CRD has no xdp for backends)
    image: str | None = None
    image_pull_policy: str = Field("IfNotPresent", alias="imagePullPolicy")
    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str = Field("system-node-critical", alias="priorityClassName")
    metrics_port: int = Field(9478, alias="metricsPort")
    metrics_address: MetricsAddress = Field(MetricsAddress.NODE_IP, alias="metricsAddress")
    drain_seconds: int = Field(DEFAULT_DRAIN_SECONDS, alias="drainSeconds")       # backend pools only
    attach: Attach = Field(default_factory=Attach)
    salt: SaltSpec = Field(default_factory=SaltSpec)       # proxy pools only (the CRD has no salt for backends)
    failure_policy: FailurePolicy = Field(FailurePolicy.OPEN, alias="failurePolicy")     # proxy pools only
    allowed_namespaces: LabelSelector | None = Field(None, alias="allowedNamespaces")    # None: every namespace
    allowed_addresses: list[str] | None = Field(None, alias="allowedAddresses")           # proxy pools; None: any

    def admits_namespace(self, labels: dict[str, str]) -> bool:
        return self.allowed_namespaces is None or self.allowed_namespaces.matches(labels)

    def admits_address(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return self.allowed_addresses is None or any(
            ip in ipaddress.ip_network(cidr, strict=False) for cidr in self.allowed_addresses)


class ServiceRef(_Spec):
    name: str
    address_types: list[str] = Field(default_factory=lambda: ["LoadBalancer", "ExternalIP"],
                                     alias="addressTypes")


class PolicySpec(_Spec):
    service: ServiceRef | None = None
    addresses: list[str] = Field(default_factory=list)
    ports: list[int]
    proxy_pool: str = Field(alias="proxyPool")
    backend_pool: str = Field(alias="backendPool")
    mode: Mode = Mode.ENFORCE
    cookie: Cookie = Field(default_factory=Cookie)


class Pool(BaseModel):
    model_config = ConfigDict(frozen=True)
    role: Role
    name: str
    uid: str
    generation: int
    spec: PoolSpec

    @property
    def kind(self) -> str:
        return POOL_KINDS[self.role]

    @classmethod
    def from_object(cls, role: Role, obj: dict) -> "Pool":
        meta = obj["metadata"]
        return cls(role=role, name=meta["name"], uid=meta["uid"], generation=meta.get("generation", 1),
                   spec=PoolSpec.model_validate(obj.get("spec") or {}))


class SynProxyPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: PolicySpec
    policy_id: int | None = None      # from status: the id allocated earlier
    deleting: bool = False            # its id stays taken until its nodes stop serving it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_object(cls, obj: dict) -> "SynProxyPolicy":
        meta = obj["metadata"]
        return cls(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"],
                   generation=meta.get("generation", 1), created=meta.get("creationTimestamp", ""),
                   spec=PolicySpec.model_validate(obj["spec"]),
                   policy_id=(obj.get("status") or {}).get("policyId"),
                   deleting=bool(meta.get("deletionTimestamp")))
