"""Network namespaces and veth links, driven with iproute2.

Test and demo infrastructure: everything here runs only inside namespaces it
created, and `NetNS.delete()` (or the context manager) removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from typing import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
# The namespace this process started in, the one with the machine's network:
# tests keep their thread inside a test namespace for a whole session, and some
# steps (downloads) must still reach out.
_HOME = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


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


def home_namespace() -> contextlib.AbstractContextManager[None]:
    """Run this thread (and what it starts) in the process's original namespace."""
    home, here = os.fstat(_HOME), os.stat("/proc/thread-self/ns/net")
    if (home.st_dev, home.st_ino) == (here.st_dev, here.st_ino):
        return contextlib.nullcontext()     # already there; setns would need privileges
    return _thread_in(_HOME, "the original network namespace")


def sh(*args: str, check: bool = True) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class NetNS:
    def __init__(self, name: str) -> None:
        self.name = name
        sh("ip", "netns", "add", name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def run(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.name, *args, check=check)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kw)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run this thread inside the namespace (for sockets and BPF test runs)."""
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            with _thread_in(target, self.name):
                yield
        finally:
            os.close(target)

    def delete(self) -> None:
        sh("ip", "netns", "delete", self.name, check=False)

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def veth(a: NetNS, a_if: str, b: NetNS, b_if: str) -> None:
    """A veth pair between two namespaces, up, with TX checksum offload off so
    that packets cross with complete checksums (see docs/operations.md)."""
    sh("ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", b_if, "netns", b.name)
    for ns, ifname in ((a, a_if), (b, b_if)):
        ns.ip("link", "set", ifname, "up")
        ns.run("ethtool", "-K", ifname, "tx", "off")
