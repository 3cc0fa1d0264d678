"""Network namespaces and what is in them, through netlink (pyroute2): links,
addresses, routes, neighbours, sysctls, socket diagnostics and HTTP GETs, no `ip`, `ss`,
`sysctl` or `ethtool` processes.

Test and demo infrastructure: everything here runs only inside namespaces it
created, and `NetNS.delete()` (or the context manager) removes them.

Programs started with `popen()`/`run()` join the namespace's network only (as
`nsenter --net` does): they keep the host's mounts, so an agent pins into the
host's /sys/fs/bpf. `run_with_sysfs()` is `ip netns exec`, for the few
programs that need the namespace's own /sys (a sysfs mount shows the devices
of the namespace that mounted it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

from pyroute2 import DiagSocket, IPRoute, netns
from pyroute2.ethtool import Ethtool
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink.diag import SS_LISTEN

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
# The namespace this process started in, the one with the machine's network:
# tests keep their thread inside a test namespace for a whole session, and some
# steps (downloads) must still reach out.
_HOME = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
NUD_PERMANENT = 0x80


@contextlib.contextmanager
def _thread_in(target_fd: int, name: str) -> Iterator[None]:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        yield
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(own)


@contextlib.contextmanager
def whole_request() -> Iterator[None]:
    """A pyroute2 request that Ctrl-C or SIGTERM cannot cut in half. pyroute2
    runs each request as an asyncio task; a KeyboardInterrupt raised inside it
    abandons the task, whose clean-up prints a traceback at exit. The signal
    waits (milliseconds) and is handled when the request returned."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def home_namespace() -> contextlib.AbstractContextManager[None]:
    """Run this thread (and what it starts) in the process's original namespace."""
    home, here = os.fstat(_HOME), os.stat("/proc/thread-self/ns/net")
    if (home.st_dev, home.st_ino) == (here.st_dev, here.st_ino):
        return contextlib.nullcontext()     # already there; setns would need privileges
    return _thread_in(_HOME, "the original network namespace")


def namespaces() -> set[str]:
    """The named network namespaces (/run/netns) that exist now."""
    return set(netns.listnetns())


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _finished(args: tuple[str, ...], res: subprocess.CompletedProcess, check: bool) -> str:
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout



def _create(name: str) -> None:
    """`ip netns add`: a new namespace, bind-mounted at /run/netns/<name>. Made
    from this thread (unshare, then back), not from a forked child: a child
    forked from a process with Python signal handlers can run its parent's code."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare for {name}")
        netns.attach(name, "thread-self")
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(own)


class NetNS:
    def __init__(self, name: str) -> None:
        self.name = name
        try:
            _create(name)
            # Netlink sockets belong to the namespace of the thread that opens
            # them: every use of `_ipr` is from inside the namespace (see _netlink).
            with self.entered(), whole_request():
                self._ipr = IPRoute()
            self.link_up("lo")
        except BaseException:
            # Also when an interrupt came after the mount but before _create returned.
            if os.path.exists(f"/run/netns/{name}"):
                netns.remove(name)
            raise

    def _netlink(self, method: str, *args, **kw):
        # pyroute2 opens a socket per thread on first use: inside, so it is this namespace's.
        with self.entered(), whole_request():
            return getattr(self._ipr, method)(*args, **kw)

    # ---- programs and sysctls ----

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run this thread inside the namespace (for sockets, BPF test runs, and
        the processes it starts)."""
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            with _thread_in(target, self.name):
                yield
        finally:
            os.close(target)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        # A child inherits the network namespace of the thread that forks it.
        with self.entered():
            return subprocess.Popen(args, **kw)

    def run(self, *args: str, check: bool = True) -> str:
        with self.entered():
            return _finished(args, subprocess.run(args, capture_output=True, text=True), check)

    def run_with_sysfs(self, *args: str, check: bool = True) -> str:
        full = ("ip", "netns", "exec", self.name, *args)
        return _finished(full, subprocess.run(full, capture_output=True, text=True), check)

    @staticmethod
    def _sysctl_path(key: str) -> str:
        # /proc/sys/net answers for the network namespace of the thread that opens it.
        return "/proc/sys/" + key.replace(".", "/")

    def sysctl(self, key: str, value: str | int) -> None:
        with self.entered(), open(self._sysctl_path(key), "w") as f:
            f.write(str(value))

    def sysctl_get(self, key: str) -> str:
        with self.entered(), open(self._sysctl_path(key)) as f:
            return f.read().strip()

    # ---- links ----

    def index(self, ifname: str) -> int:
        found = self._netlink("link_lookup", ifname=ifname)
        if not found:
            raise LookupError(f"no interface {ifname} in {self.name}")
        return found[0]

    def link_up(self, ifname: str) -> None:
        self._netlink("link", "set", index=self.index(ifname), state="up")

    def add_link(self, ifname: str, kind: str, **attrs) -> None:
        self._netlink("link", "add", ifname=ifname, kind=kind, **attrs)

    def set_master(self, ifname: str, master: str) -> None:
        self._netlink("link", "set", index=self.index(ifname), master=self.index(master))

    def mac(self, ifname: str) -> str:
        return self._netlink("get_links", self.index(ifname))[0].get_attr("IFLA_ADDRESS")

    def link_packets(self, ifname: str) -> tuple[int, int]:
        """(tx, rx) packets of an interface."""
        stats = self._netlink("get_links", self.index(ifname))[0].get_attr("IFLA_STATS64")
        return stats["tx_packets"], stats["rx_packets"]

    def ethtool_stats(self, ifname: str) -> dict[str, int]:
        """The driver's own counters (`ethtool -S`)."""
        with self.entered(), whole_request(), contextlib.closing(IoctlEthtool(ifname)) as eth:
            return dict(eth.get_statistics())

    def set_feature(self, ifname: str, feature: str, on: bool) -> None:
        """An offload feature (`ethtool -K`), by its long name, e.g. rx-gro."""
        with self.entered(), whole_request(), contextlib.closing(Ethtool()) as eth:
            features = eth.get_features(ifname)
            features.features[feature].enable = on
            eth.set_features(ifname, features)

    # ---- addresses, routes, neighbours ----

    def add_address(self, ifname: str, cidr: str) -> None:
        """An address; IPv6 ones without duplicate address detection (usable at once)."""
        iface = ipaddress.ip_interface(cidr)
        extra = {} if iface.version == 4 else {"flags": 0x02}     # IFA_F_NODAD
        self._netlink("addr", "add", index=self.index(ifname), address=str(iface.ip),
                      prefixlen=iface.network.prefixlen, **extra)

    def del_address(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        self._netlink("addr", "del", index=self.index(ifname), address=str(iface.ip),
                      prefixlen=iface.network.prefixlen)

    def route(self, command: str, dst: str, via: str | list[str] | None = None) -> None:
        """Add, replace or delete ("del") a route to `dst` ("default", an address
        or a prefix) via one gateway or, with a list, several (ECMP)."""
        if dst == "default":
            family = ipaddress.ip_address(via if isinstance(via, str) else via[0]).version
            dst = "0.0.0.0/0" if family == 4 else "::/0"
        network = ipaddress.ip_network(dst)
        spec = {"dst": str(network.network_address), "dst_len": network.prefixlen,
                "family": socket.AF_INET if network.version == 4 else socket.AF_INET6}
        if isinstance(via, str):
            spec["gateway"] = via
        elif via:
            spec["multipath"] = [{"gateway": g} for g in via]
        self._netlink("route", command, **spec)

    def neighbour(self, ifname: str, address: str, mac: str) -> None:
        """A permanent neighbour entry: nobody waits for ARP or ND."""
        family = socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6
        self._netlink("neigh", "replace", ifindex=self.index(ifname), dst=address, lladdr=mac,
                       state=NUD_PERMANENT, family=family)

    # ---- sockets ----

    def listening(self, port: int) -> bool:
        """Whether a TCP socket listens on `port` (sock_diag, as `ss -tl` asks)."""
        with self.entered(), whole_request(), DiagSocket() as diag:
            diag.bind()
            return any(s["idiag_sport"] == port for family in (socket.AF_INET, socket.AF_INET6)
                       for s in diag.get_sock_stats(family=family, states=1 << SS_LISTEN))

    def http_get(self, url: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET from inside the namespace: (status, body), or (0, why) when
        nothing answered. A thread of its own enters it (setns applies to
        the calling thread only)."""
        result: list[tuple[int, str]] = []

        def fetch() -> None:
            with self.entered():
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r:
                        result.append((r.status, r.read().decode()))
                except urllib.error.HTTPError as err:
                    result.append((err.code, err.read().decode()))
                except OSError as err:
                    result.append((0, str(err)))

        t = threading.Thread(target=fetch)
        t.start()
        t.join()
        return result[0]

    # ---- lifetime ----

    def delete(self) -> None:
        with contextlib.suppress(Exception), whole_request():
            self._ipr.close()
        with contextlib.suppress(OSError):
            netns.remove(self.name)

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def veth(a: NetNS, a_if: str, b: NetNS, b_if: str) -> None:
    """A veth pair between two namespaces, both ends up. Checksum offloads stay
    at their defaults, as on a real node (docs/dataplane.md)."""
    a.add_link(a_if, "veth", peer={"ifname": b_if, "net_ns_fd": b.name})
    a.link_up(a_if)
    b.link_up(b_if)
