"""The defences the flood benchmark compares, each set up on a FloodTopology
and taken down again without a trace.

- `kernel`: the defence node is the server itself: a listener on the service
  address with net.ipv4.tcp_syncookies=2 (cookies for every SYN).
- `nf-synproxy`: the defence node forwards to the server through nftables'
  `synproxy` statement (set up as the nftables wiki does: SYNs untracked in
  raw prerouting, synproxy on invalid/untracked in forward, loose tracking off).
- `synfleet`: the proxy on the defence node's eth0 and eth2, its XDP front
  answering SYNs in native XDP (veth has it) and its TC program the rest (the
  backend program and the service on the server). The client runs an XDP_PASS
  program and the attacker an XDP drop: a veth takes its peer's XDP_TX frames
  only with a program of its own. `synfleet-tc`: the same without the XDP front.
- `floor`: a TC program that swaps addresses and sends the packet back
  (lab/bpf/reflect.bpf.c): packet I/O with zero work, the limit of any TC
  defence. `xdp-floor`: the same in XDP with XDP_TX (lab/bpf/xdp_reflect.bpf.c),
  the limit of an XDP front such as synfleet's.
- `generator` (not a defence): a TC drop on the defence node, to measure what
  the generator sends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator

from synfleet.bpf import BpfObject, TcHook, XdpHook
from synfleet.cookie import current_epoch, fresh_key, salts_for
from synfleet.dataplane.programs import BackendDataplane, ProxyDataplane
from synfleet_lab.bench.flood.topology import DEFENCE_NEAR, SERVER, SERVICE, FloodTopology
from synfleet_lab.objects import lab_object
from synfleet_lab.testbed.configs import SERVICE_PORT, testbed_config
from synfleet_lab.testbed.netns import NetNS

DEFENCES = ("kernel", "nf-synproxy", "synfleet", "synfleet-tc", "floor", "xdp-floor")
# The zero-work reflectors, and which one bounds each defence.
FLOORS = ("floor", "xdp-floor")
FLOOR_OF = {"kernel": "floor", "nf-synproxy": "floor", "synfleet": "xdp-floor", "synfleet-tc": "floor"}
ROTATION_S = 3600
NFT_SYNPROXY = f"""
table ip synfleet_bench {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr {SERVICE} tcp dport {SERVICE_PORT} tcp flags syn notrack
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ip daddr {SERVICE} tcp dport {SERVICE_PORT} ct state invalid,untracked \\
            synproxy mss 1460 wscale 7 timestamp sack-perm
        ct state invalid drop
    }}
}}
"""


def check_defences(defences: tuple[str, ...]) -> None:
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defence {unknown[0]!r}; choose from {', '.join(DEFENCES)}")


class Attached:
    """BPF objects loaded and programs attached for one purpose; `close()`
    detaches and unloads them all, last first."""

    def __init__(self) -> None:
        self._objects: list = []
        self._hooks: list[tuple[NetNS, TcHook | XdpHook]] = []

    def keep(self, obj):
        self._objects.append(obj)
        return obj

    def attach(self, ns: NetNS, ifname: str, program, kind: type[TcHook] | type[XdpHook] = TcHook) -> None:
        with ns.entered():
            hook = kind(socket.if_nametoindex(ifname))
            hook.attach(program)
        self._hooks.append((ns, hook))

    def attach_lab_program(self, ns: NetNS, ifname: str, name: str,
                           kind: type[TcHook] | type[XdpHook] = TcHook) -> None:
        """A lab program (lab/bpf/<name>.bpf.c, whose program is called `name`)."""
        self.attach(ns, ifname, self.keep(BpfObject(lab_object(name)).load()).program(name), kind)

    def close(self) -> None:
        for ns, hook in reversed(self._hooks):
            with ns.entered():
                if isinstance(hook, XdpHook):
                    hook.detach()
                else:
                    hook.destroy_clsact()
        self._hooks.clear()
        for obj in reversed(self._objects):
            obj.close()
        self._objects.clear()


class Listener:
    """A listener on the service port that accepts and holds connections (the
    memory figure needs them established), the oldest closed when the file
    limit nears."""

    PROGRAM = ("import collections, resource, socket\n"
               "limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
               "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
               f"s = socket.create_server(('{SERVICE}', {SERVICE_PORT}), backlog=4096)\n"
               "held = collections.deque()\n"
               "print('ready', flush=True)\n"
               "while True:\n"
               "    held.append(s.accept()[0])\n"
               "    if len(held) > limit - 64:\n"
               "        held.popleft().close()\n")

    def __init__(self, ns: NetNS) -> None:
        self.proc = ns.popen("python3", "-c", self.PROGRAM, stdout=subprocess.PIPE)
        if self.proc.stdout.readline().strip() != b"ready":
            self.close()
            raise RuntimeError("the benchmark's listener did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def _xdp_tx_receivable(topo: FloodTopology, attached: Attached) -> None:
    """A veth takes its peer's XDP_TX frames only with an XDP program of its
    own: the client's passes them on, the attacker's drops them before an skb
    exists (the cost a NIC's hardware drop would have; its link still counts
    them). Only for XDP defences: a veth with XDP copies every skb it
    receives into a new buffer first, which would make the attacker's core,
    not the defence's, bound the TC defences."""
    attached.attach_lab_program(topo.client, "eth0", "xdp_pass", XdpHook)
    attached.attach_lab_program(topo.attacker, "eth0", "xdp_sink", XdpHook)


def _synfleet(topo: FloodTopology, attached: Attached, xdp: bool) -> None:
    """The proxy on the attacker- and client-facing links (with its XDP front
    unless `xdp` is off), the backend on the server's."""
    epoch = current_epoch(ROTATION_S)
    keys = [fresh_key()]
    salts = salts_for(keys, range(epoch - 1, epoch + 2))
    services = {4: SERVICE}
    proxy = attached.keep(ProxyDataplane())
    proxy.set_salts(salts)
    proxy.apply(testbed_config("proxy", interfaces=["eth0"], node_v4=DEFENCE_NEAR, node_v6="2001:db8:77::1",
                               services=services, rotation_s=ROTATION_S, backends={4: [SERVER]}, salt_keys=keys))
    attached.attach(topo.defence, "eth0", proxy.program)
    attached.attach(topo.defence, "eth2", proxy.program)
    if xdp:
        _xdp_tx_receivable(topo, attached)
        attached.attach(topo.defence, "eth0", proxy.xdp_program, XdpHook)
        attached.attach(topo.defence, "eth2", proxy.xdp_program, XdpHook)
    backend = attached.keep(BackendDataplane())
    backend.apply(testbed_config("backend", interfaces=["eth0"], node_v4=SERVER, node_v6="2001:db8:77::2",
                                 services=services, rotation_s=ROTATION_S, allowed_proxies=[DEFENCE_NEAR]))
    attached.attach(topo.server, "eth0", backend.program)


@contextlib.contextmanager
def defended_by(topo: FloodTopology, defence: str, workdir: str) -> Iterator[None]:
    """Set the defence up, yield, and take it down again."""
    if defence != "generator":
        check_defences((defence,))
    attached, undo = Attached(), []
    listener: Listener | None = None
    try:
        if defence == "generator":
            attached.attach_lab_program(topo.defence, "eth0", "sink")
        elif defence == "floor":
            attached.attach_lab_program(topo.defence, "eth0", "reflect")
        elif defence == "xdp-floor":
            _xdp_tx_receivable(topo, attached)
            attached.attach_lab_program(topo.defence, "eth0", "xdp_reflect", XdpHook)
        elif defence == "kernel":
            topo.defence.add_address("lo", SERVICE)
            undo.append(lambda: topo.defence.del_address("lo", SERVICE))
            topo.defence.sysctl("net.ipv4.tcp_syncookies", 2)
            listener = Listener(topo.defence)
        elif defence == "nf-synproxy":
            topo.defence.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
            rules = os.path.join(workdir, "synproxy.nft")
            with open(rules, "w") as f:
                f.write(NFT_SYNPROXY)
            topo.defence.run("nft", "-f", rules)
            undo.append(lambda: topo.defence.run("nft", "delete", "table", "ip", "synfleet_bench"))
            listener = Listener(topo.server)
        else:
            _synfleet(topo, attached, xdp=defence == "synfleet")
            listener = Listener(topo.server)
        yield
    finally:
        if listener is not None:
            listener.close()
        for step in reversed(undo):
            step()
        attached.close()
