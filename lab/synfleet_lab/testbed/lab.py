"""A single namespace laid out like a proxy node: forwarding on, a veth with
the node addresses, routes to the backend prefixes. BPF_PROG_TEST_RUN runs in
the caller's namespace, so bpf_fib_lookup() resolves against this one."""

from __future__ import annotations

import contextlib
from typing import Iterator

from synfleet_lab.testbed.netns import NetNS, unique_name


@contextlib.contextmanager
def proxy_node_namespace(node_v4: str, node_v6: str) -> Iterator[NetNS]:
    ns = NetNS(unique_name("sf-lab"))
    try:
        # A proxy forwards: bpf_fib_lookup() answers FWD_DISABLED otherwise.
        ns.sysctl("net.ipv4.conf.all.forwarding", 1)
        ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        ns.ip("link", "add", "sf0", "type", "veth", "peer", "sf1")
        ns.ip("link", "set", "sf0", "up")
        ns.ip("link", "set", "sf1", "up")
        ns.ip("addr", "add", f"{node_v4}/24", "dev", "sf0")
        ns.ip("-6", "addr", "add", f"{node_v6}/64", "dev", "sf0", "nodad")
        with ns.entered():
            yield ns
    finally:
        ns.delete()
