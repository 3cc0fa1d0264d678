"""BPF links on network interfaces: tcx ingress (several programs, ordered) and
native XDP, made with the bpf() system call itself.

libbpf 1.1 (Debian 12's) predates tcx: `bpf_link_create` there cannot pass a
relative program or an expected revision, and `bpf_prog_query` returns no link
ids. The attributes below follow `union bpf_attr` in include/uapi/linux/bpf.h;
every field this module does not set is zero, which the kernel requires.

A link belongs to whoever holds it (a pin in bpffs): nobody else can replace
or detach the program through netlink, and `update` swaps the program it runs
in place, so a restarted agent never leaves a gap.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
import struct
from dataclasses import dataclass
from enum import Enum

from synfleet.bpf.libbpf import BpfError, Program, _lib, _libc, _obj_get, program_name

_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_libc.syscall.restype = ctypes.c_long

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_F_ID = 1 << 5
XDP_FLAGS_DRV_MODE = 1 << 2

_ATTR_SIZE = 128     # at least the largest member this module fills; the rest stays zero


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    rc = _libc.syscall(_NR_BPF, cmd, attr, len(attr))
    if rc < 0:
        raise BpfError(ctypes.get_errno() or errno_mod.EINVAL, what)
    return rc


def _attr(fmt: str, *values: int) -> ctypes.Array:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


class Order(str, Enum):
    FIRST = "first"
    LAST = "last"
    BEFORE = "before"     # the program `anchor_id`
    AFTER = "after"


@dataclass(frozen=True)
class Position:
    """Where a new tcx program runs among those already on the hook."""

    order: Order = Order.FIRST
    anchor_id: int = 0

    def flags(self) -> tuple[int, int]:
        if self.order in (Order.FIRST, Order.BEFORE):
            flags = BPF_F_BEFORE
        else:
            flags = BPF_F_AFTER
        # Without a relative program BEFORE means the head, AFTER the tail.
        if self.order in (Order.BEFORE, Order.AFTER):
            return flags | BPF_F_ID, self.anchor_id
        return flags, 0


@dataclass(frozen=True)
class HookProgram:
    """One program on a hook, as the kernel lists it."""

    program_id: int
    name: str
    link_id: int = 0       # 0: attached without a link (netlink XDP, legacy clsact)

    def describe(self) -> str:
        return f"{self.name or '?'} (program id {self.program_id})"


def program_fd_by_id(program_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _attr("=I", program_id), f"open program id {program_id}")


def name_of_program(program_id: int) -> str:
    """The program's name, or "" when it went away meanwhile."""
    try:
        fd = program_fd_by_id(program_id)
    except BpfError:
        return ""
    try:
        return program_name(fd)
    finally:
        os.close(fd)


def tcx_programs(ifindex: int) -> list[HookProgram]:
    """The programs on the interface's tcx ingress, in the order they run."""
    capacity = 64
    ids = (ctypes.c_uint32 * capacity)()
    links = (ctypes.c_uint32 * capacity)()
    attr = _attr("=IIII QI4x QQQQ", ifindex, BPF_TCX_INGRESS, 0, 0, ctypes.addressof(ids), capacity,
                 0, ctypes.addressof(links), 0, 0)
    try:
        _bpf(BPF_PROG_QUERY, attr, f"query tcx ingress of ifindex {ifindex}")
    except BpfError as err:
        if err.errno in (errno_mod.ENODEV, errno_mod.ENOENT):
            return []
        raise
    count = struct.unpack_from("=I", attr, 24)[0]
    return [HookProgram(ids[i], name_of_program(ids[i]), links[i]) for i in range(min(count, capacity))]


@dataclass(frozen=True)
class LinkInfo:
    link_id: int
    program_id: int
    ifindex: int          # 0 once the interface is gone: the link is defunct


class Link:
    """A tcx or XDP link we hold (created here or opened from its pin)."""

    def __init__(self, fd: int, what: str) -> None:
        self.fd, self.what = fd, what

    @classmethod
    def open_pinned(cls, path: str) -> "Link":
        return cls(_obj_get(path, "link"), path)

    @classmethod
    def tcx(cls, program: Program, ifindex: int, position: Position) -> "Link":
        flags, relative = position.flags()
        attr = _attr("=IIII I4x Q", program.fd, ifindex, BPF_TCX_INGRESS, flags, relative, 0)
        what = f"tcx link of {program.name} on ifindex {ifindex}"
        return cls(_bpf(BPF_LINK_CREATE, attr, what), what)

    @classmethod
    def xdp(cls, program: Program, ifindex: int) -> "Link":
        """Native XDP; EBUSY when any other program has the slot (never replaced)."""
        attr = _attr("=IIII", program.fd, ifindex, BPF_XDP, XDP_FLAGS_DRV_MODE)
        what = f"XDP link of {program.name} on ifindex {ifindex}"
        return cls(_bpf(BPF_LINK_CREATE, attr, what), what)

    def info(self) -> LinkInfo:
        buf = ctypes.create_string_buffer(64)
        attr = _attr("=IIQ", self.fd, len(buf), ctypes.addressof(buf))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of {self.what}")
        _, link_id, program_id = struct.unpack_from("=III", buf, 0)
        ifindex = struct.unpack_from("=I", buf, 16)[0]   # tcx and xdp alike: first in the union
        return LinkInfo(link_id, program_id, ifindex)

    def update(self, program: Program) -> None:
        """Run `program` instead, atomically: no packet meets an empty hook."""
        _bpf(BPF_LINK_UPDATE, _attr("=II", self.fd, program.fd), f"update {self.what} to {program.name}")

    def detach(self) -> None:
        try:
            _bpf(BPF_LINK_DETACH, _attr("=I", self.fd), f"detach {self.what}")
        except BpfError as err:
            if err.errno != errno_mod.ENOLINK:      # already defunct
                raise

    def pin(self, path: str) -> None:
        staging = path + "-next"          # bpffs refuses names with dots
        if os.path.exists(staging):
            os.unlink(staging)
        rc = _lib.bpf_obj_pin(self.fd, staging.encode())
        if rc < 0:
            raise BpfError(-rc, f"pin {self.what} at {path}")
        os.rename(staging, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

