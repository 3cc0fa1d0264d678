"""Keep a backend's protected services out of netfilter connection tracking.

Why (measured in the lab cluster, reproduced in tests/test_fleet_e2e.py): on a
node where netfilter NAT hooks and connection tracking are both active, as on
every node running kube-proxy, a handshake ACK that the backend program hands
to the kernel with bpf_sk_assign_tcp_reqsk() reaches the listener without its
request socket, and the listener answers it with an RST: no client connects.
Exempting the protected 4-tuples from connection tracking (a notrack rule at
the raw priority, before conntrack) restores it, as Cilium's no-conntrack rules
and direct-server-return load balancers do for the same traffic. Nothing is
lost: the backend holds each connection in its socket; a tracked entry for
these flows only duplicated it.

One nftables table per agent instance (`synfleet_<instance>`), replaced in one
transaction whenever the configuration changes and deleted when the data plane
is uninstalled. Requires the `nft` program (the agent image has it)."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

from synfleet.config import schema

NFT = "nft"
TIMEOUT_S = 10


class NotrackError(Exception):
    """nft refused the table, or is not installed."""


def table_name(instance: str) -> str:
    return "synfleet_" + re.sub(r"[^A-Za-z0-9_]", "_", instance)


def ruleset(instance: str, services: list[schema.ServiceEndpoint]) -> str:
    """The instance's table: inbound segments to each protected address and
    port, and the listener's replies from them, untracked."""
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for s in sorted(services, key=lambda s: (s.address.version, int(s.address), s.port)):
        by_family[s.address.version].append(f"{ipaddress.ip_address(s.address)} . {s.port}")
    lines = [f"table inet {table_name(instance)} {{"]
    for chain, hook, direction in (("inbound", "prerouting", ("daddr", "dport")),
                                   ("replies", "output", ("saddr", "sport"))):
        lines += [f"  chain {chain} {{", f"    type filter hook {hook} priority raw; policy accept;"]
        for family, proto in ((4, "ip"), (6, "ip6")):
            if by_family[family]:
                lines.append(f"    {proto} {direction[0]} . tcp {direction[1]} "
                             f"{{ {', '.join(by_family[family])} }} notrack")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _run(script: str) -> None:
    if shutil.which(NFT) is None:
        raise NotrackError("the nft program is not installed (Debian: nftables)")
    r = subprocess.run([NFT, "-f", "-"], input=script, text=True, capture_output=True, timeout=TIMEOUT_S)
    if r.returncode != 0:
        raise NotrackError(f"nft: {r.stderr.strip()}")


def install(instance: str, services: list[schema.ServiceEndpoint]) -> None:
    """Replace the instance's table in one transaction (declaring it first
    makes the delete valid when it does not exist yet)."""
    name = table_name(instance)
    body = ruleset(instance, services) if services else ""
    _run(f"table inet {name}\ndelete table inet {name}\n{body}")


def remove(instance: str) -> None:
    name = table_name(instance)
    _run(f"table inet {name}\ndelete table inet {name}\n")
