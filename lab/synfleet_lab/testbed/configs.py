"""DataplaneConfig documents for the namespace testbeds: one service port,
one policy per address family (ids 1 and 2) and, on proxies, one backend set
per family, everything else at defaults."""

from __future__ import annotations

from synfleet import contract
from synfleet.config import schema
from synfleet.cookie import MasterKey

SERVICE_PORT = 8080
ENCAP_PORT = 6080
POLICY_IDS = {4: 1, 6: 2}


def testbed_config(role: str, *, interfaces: list[str], node_v4: str, node_v6: str,
                   services: dict[int, str], rotation_s: int,
                   backends: dict[int, list[str]] | None = None,
                   allowed_proxies: list[str] | None = None,
                   peer_backends: list[str] | None = None,
                   salt_keys: list[MasterKey] | None = None, failure_policy: str = "open",
                   mode: str = "enforce",
                   clock_offset_s: float = 0.0, xdp: bool = False) -> schema.DataplaneConfig:
    """`services` and `backends` are keyed by address family."""
    policies = []
    for family, address in sorted(services.items()):
        policy = {"id": POLICY_IDS[family], "name": f"testbed/ipv{family}", "mode": mode,
                  "services": [{"address": address, "port": SERVICE_PORT}]}
        if role == "proxy":
            policy["backendSet"] = f"ipv{family}"
        policies.append(policy)
    return schema.parse({
        "apiVersion": schema.API_VERSION, "kind": schema.KIND, "role": role,
        "rotationSeconds": rotation_s,
        "node": {"interfaces": interfaces, "encapPort": ENCAP_PORT,
                 "addresses": {"ipv4": node_v4, "ipv6": node_v6},
                 "clockOffsetSeconds": clock_offset_s, "xdp": xdp},
        "policies": policies,
        **({"backendSets": [{"name": f"ipv{family}", "backends": (backends or {}).get(family, [])}
                            for family in sorted(services)]} if role == "proxy" else {}),
        "allowedProxies": allowed_proxies or [],
        "peerBackends": peer_backends or [],
        **({"failurePolicy": failure_policy} if role == "proxy" else {}),
        "saltKeys": contract.salt_key_entries(salt_keys or []),
    })
