"""Where an agent instance keeps its programs and maps in bpffs, and how hooks
are found again after the process that attached them is gone.

    <root>/<instance>/program        the program the TC hooks run
    <root>/<instance>/program-xdp    a proxy's XDP front, where node.xdp attached it
    <root>/<instance>/tcx-<if>       the tcx link holding the program on interface <if>
    <root>/<instance>/xdp-<if>       the XDP link holding the front on <if>
    <root>/<instance>/<map name>     every map, re-used by the next agent

Links and filters outlive the agent. A link is ours when it is pinned here; a
clsact filter (mode tc, or an earlier release) is ours when the program it
runs is the one pinned here. That is how `uninstall` and a restarted agent
find them without any state file.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from synfleet.bpf import Program

DEFAULT_ROOT = "/sys/fs/bpf/synfleet"
XDP_PIN = "program-xdp"


@dataclass(frozen=True)
class PinDir:
    root: str
    instance: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.instance)

    def program(self, name: str = "program") -> str:
        return os.path.join(self.path, name)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> None:
        fs = filesystem_of(self.root)
        if fs != "bpf":
            raise OSError(f"{self.root} is on a {fs} filesystem, not bpf: mount one with "
                          f"`mount -t bpf bpf /sys/fs/bpf` (pins must outlive the agent)")
        os.makedirs(self.path, exist_ok=True)

    def pinned_program_id(self, name: str = "program") -> int | None:
        if not os.path.exists(self.program(name)):
            return None
        prog = Program.open_pinned(self.program(name))
        try:
            return prog.id
        finally:
            prog.close()

    def pin_program(self, program: Program, name: str = "program") -> None:
        """Replace the pinned program in one rename: there is always one."""
        staging = self.program(name) + "-next"   # bpffs refuses names with dots
        if os.path.exists(staging):
            os.unlink(staging)
        program.pin(staging)
        os.rename(staging, self.program(name))

    def prune(self, keep: set[str], keep_prefixes: tuple[str, ...] = ()) -> list[str]:
        """Unpin everything here but `keep`, names with `keep_prefixes` (and a
        rename in flight); what went."""
        gone = sorted(n for n in os.listdir(self.path)
                      if n not in keep and not n.startswith(keep_prefixes) and not n.endswith("-next"))
        for name in gone:
            os.unlink(os.path.join(self.path, name))
        return gone

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=False)
        if os.path.isdir(self.root) and not os.listdir(self.root):
            os.rmdir(self.root)


def filesystem_of(path: str) -> str:
    """The type of the innermost mount holding `path` (which need not exist yet)."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _, mountpoint, kind = line.split()[:3]
            inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, fstype = mountpoint, kind
    return fstype

