"""A single namespace laid out like a proxy node: forwarding on, a veth with
the node addresses, routes to the backend prefixes. BPF_PROG_TEST_RUN runs in
the caller's namespace, so bpf_fib_lookup() resolves against this one."""

from __future__ import annotations

import contextlib
from typing import Iterator

from synfleet_lab.testbed.fabric import Fabric
from synfleet_lab.testbed.netns import NetNS


@contextlib.contextmanager
def proxy_node_namespace(node_v4: str, node_v6: str) -> Iterator[NetNS]:
    with Fabric("sf-lab") as fabric:
        # A proxy forwards: bpf_fib_lookup() answers FWD_DISABLED otherwise.
        ns = fabric.add("node", router=True)
        fabric.link(ns, "sf0", ns, "sf1", [f"{node_v4}/24", f"{node_v6}/64"])
        with ns.entered():
            yield ns
