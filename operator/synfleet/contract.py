"""The contract between the operator and the agents it runs: what a pool's
ConfigMap and salt Secret hold, and how one node's agent assembles the
DataplaneConfig it applies from them and from its node's addresses. Both sides
call the same functions, so the operator validates exactly the document every
agent will build, and neither side knows how the other is written."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from datetime import datetime, timezone

from synfleet.config import yamltext
from synfleet.config.schema import ConfigError, Role
from synfleet.cookie.salts import MasterKey

GROUP = "synfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
POOL_KINDS = {Role.PROXY: "ProxyPool", Role.BACKEND: "BackendPool"}
NODE_AGENT_KIND = "NodeAgent"     # one per (pool, node), written by that node's agent
LABEL_POOL = "synfleet.io/pool"
LABEL_ROLE = "synfleet.io/role"
LABEL_NODE = "synfleet.io/node"
# A backend node marked so takes no new connection and keeps its established
# ones for its pool's drainSeconds (as a cordoned one, or one with Kubernetes'
# own exclusion label, which MetalLB and cloud load balancers honour too).
ANNOTATION_DRAINING = "synfleet.io/draining"
LABEL_EXCLUDE_FROM_LB = "node.kubernetes.io/exclude-from-external-load-balancers"

CONFIG_KEY = "dataplane.yaml"     # the pool's ConfigMap: the document minus node addresses and salts, as JSON (YAML)
# Also in the pool's ConfigMap, once the pool is being deleted: why. Every agent
# that reads it detaches its hooks, removes its pins and reports Retired. A
# stopping agent (SIGTERM: a restart or an upgrade) keeps the data plane; only
# this explicit instruction takes it away.
RETIRE_KEY = "retire"
SALTS_KEY = "salts.yaml"          # the proxy pool's Secret: rotationSeconds and the master keys


def configmap_data(document: dict, retire: str | None = None) -> dict[str, str]:
    data = {CONFIG_KEY: yamltext.dump_compact(document)}
    if retire:
        data[RETIRE_KEY] = retire
    return data


def configmap_retirement(configmap: dict | None) -> str | None:
    """Why the pool's agents must leave their nodes bare, if they must."""
    return ((configmap or {}).get("data") or {}).get(RETIRE_KEY) or None


def configmap_version(configmap: dict | None) -> str | None:
    """What an agent reports as the configuration it applied (its NodeAgent's
    configVersion): the ConfigMap's resourceVersion, so the operator knows
    when every node runs what it last wrote."""
    return ((configmap or {}).get("metadata") or {}).get("resourceVersion")


def configmap_document(configmap: dict | None, name: str) -> dict:
    """The pool's document from its ConfigMap object; ConfigError says what is wrong."""
    if configmap is None:
        raise ConfigError(f"ConfigMap {name} does not exist (yet)")
    text = (configmap.get("data") or {}).get(CONFIG_KEY)
    if not text:
        raise ConfigError(f"ConfigMap {name} has no key {CONFIG_KEY}")
    try:
        document = yamltext.load(text)
    except yamltext.YAMLError as err:
        raise ConfigError(f"ConfigMap {name}: not YAML: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("node"), dict):
        raise ConfigError(f"ConfigMap {name}: expected a DataplaneConfig with a node section")
    return document


def salt_key_entries(keys: list[MasterKey]) -> list[dict]:
    """The documents' `saltKeys` (the Secret's and an agent's), oldest generation first."""
    return [{"generation": k.generation, "fromEpoch": k.from_epoch, "key": k.key.hex()}
            for k in sorted(keys, key=lambda k: k.generation)]


def secret_data(rotation_seconds: int, keys: list[MasterKey]) -> dict[str, str]:
    document = {"rotationSeconds": rotation_seconds, "saltKeys": salt_key_entries(keys)}
    return {SALTS_KEY: base64.b64encode(yamltext.dump(document).encode()).decode()}


def _secret_document(secret: dict | None) -> dict:
    data = ((secret or {}).get("data") or {}).get(SALTS_KEY)
    return (yamltext.load(base64.b64decode(data)) or {}) if data else {}


def secret_rotation_seconds(secret: dict | None) -> int | None:
    return _secret_document(secret).get("rotationSeconds")


def secret_salt_keys(secret: dict | None) -> list[MasterKey]:
    """The published master keys, oldest generation first; empty when the
    Secret (or its key) is absent."""
    return [MasterKey(int(k["generation"]), int(k["fromEpoch"]), bytes.fromhex(k["key"]))
            for k in _secret_document(secret).get("saltKeys", [])]


def node_addresses(text: str) -> dict[str, str]:
    """The node's first IPv4 and IPv6 address from a list such as the downward
    API's status.hostIPs ("10.0.0.7,fd00::7"), as the document's node.addresses."""
    found: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(f"node address {item!r} is not an IP address") from None
        found.setdefault(f"ipv{addr.version}", str(addr))
    if not found:
        raise ConfigError("the node has no address (SYNFLEET_NODE_ADDRESSES is empty)")
    return found


def node_document(document: dict, addresses: dict[str, str], salt_keys: list[MasterKey] | None = None) -> dict:
    """The document one node's agent applies (and validates with
    synfleet.config.schema): the ConfigMap's, plus the node's addresses and
    (proxies) the pool's master keys."""
    full = {**document, "node": {**(document.get("node") or {}), "addresses": addresses}}
    if salt_keys is not None:
        full["saltKeys"] = salt_key_entries(salt_keys)
    return full


def timestamp(t: datetime) -> str:
    """A Kubernetes timestamp (RFC 3339, UTC, whole seconds)."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def condition(ctype: str, true: bool, reason: str, message: str, generation: int | None,
              previous: list[dict] | None, now: str | None = None) -> dict:
    """A status condition whose lastTransitionTime moves only when its status
    does (the operator's on the custom resources, an agent's on its NodeAgent)."""
    status = "True" if true else "False"
    old = next((c for c in previous or [] if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and \
        old.get("lastTransitionTime") else (now or timestamp(datetime.now(timezone.utc)))
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            **({} if generation is None else {"observedGeneration": generation}), "lastTransitionTime": since}


def node_agent_name(role: Role, pool: str, node: str) -> str:
    """`<role>-<pool>-<node>`: pool names are at most 40 characters and node
    names 253, so a long node name is shortened with a digest to stay a valid name."""
    name = f"{role.value}-{pool}-{node}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


def node_agent(role: Role, pool: str, pool_uid: str, node: str, namespace: str) -> dict:
    """The NodeAgent object (without status) an agent keeps for its node; owned
    by its pool, so that it goes away with it."""
    return {"apiVersion": API_VERSION, "kind": NODE_AGENT_KIND,
            "metadata": {"name": node_agent_name(role, pool, node), "namespace": namespace,
                         "labels": {LABEL_ROLE: role.value, LABEL_POOL: pool, LABEL_NODE: node[:63]},
                         "ownerReferences": [{"apiVersion": API_VERSION, "kind": POOL_KINDS[role], "name": pool,
                                              "uid": pool_uid}]},
            "spec": {"role": role.value, "pool": pool, "nodeName": node}}
