"""The lab cluster's cgroups (v1, the machine's only kind; NOTES.md): one tree
per cluster in every hierarchy, holding the nodes' daemons and, as each
kubelet's --cgroup-root, their pods. Killing what is in the tree stops
everything the cluster ever started, shims and containers included, whoever
started it (the tree outlives the command that made it: `synfleet cluster down`
finds it by name)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
KILL_TIMEOUT_S = 30


def joining(procs_file: Path, name: str, args: list[str]) -> list[str]:
    """`args` started through a shell that first joins the cgroup of
    `procs_file`: nothing the program starts escapes it."""
    return ["sh", "-c", f'echo $$ > {procs_file} && exec "$@"', name, *args]


def hierarchies() -> list[Path]:
    """Mount points of the v1 hierarchies (cpu, memory, pids, name=systemd, ...)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if fstype == "cgroup" and target.startswith(str(CGROUP_FS)):
            found.append(Path(target))
    return found


class CgroupTree:
    def __init__(self, name: str) -> None:
        self.name = name

    def path(self, *parts: str) -> str:
        """A cgroup of the tree as kubelet and runc name it."""
        return "/" + "/".join((self.name, *parts))

    def procs_file(self, *parts: str) -> Path:
        return CGROUP_FS / "pids" / self.name / Path(*parts) / "cgroup.procs"

    def create(self, *children: str) -> None:
        for h in hierarchies():
            for rel in ("", *children):
                d = h / self.name / rel
                d.mkdir(parents=True, exist_ok=True)
                if (h / "cpuset.cpus").exists():
                    # A new cpuset has no CPUs or memory nodes: no task could join it.
                    for key in ("cpuset.cpus", "cpuset.mems"):
                        (d / key).write_text((d.parent / key).read_text())

    def exists(self) -> bool:
        return any((h / self.name).is_dir() for h in hierarchies())

    def pids(self) -> set[int]:
        root = CGROUP_FS / "pids" / self.name
        found: set[int] = set()
        for dirpath, _, files in os.walk(root):
            if "cgroup.procs" in files:
                found.update(int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in the tree until nothing is left (new children
        of a dying daemon are caught by the next round)."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cgroup tree {self.name}: processes {sorted(pids)} survive SIGKILL")
            time.sleep(0.1)

    def remove(self) -> None:
        """Kill what runs in the tree, then remove its cgroups, deepest first."""
        self.kill()
        for h in hierarchies():
            root = h / self.name
            if not root.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
                deadline = time.monotonic() + KILL_TIMEOUT_S
                while True:
                    try:
                        os.rmdir(dirpath)
                        break
                    except OSError:
                        # A killed task leaves its cgroup a moment after it is reaped.
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
