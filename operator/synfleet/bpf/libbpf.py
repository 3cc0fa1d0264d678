"""A small, typed ctypes binding to the system libbpf (``libbpf.so.1``).

Only what synfleet needs: open/load objects (a failed load raises
:class:`BpfError` with errno and libbpf's log, which carries the verifier log),
programs and maps, pinning, map element access including per-CPU values,
TC clsact hooks, ``BPF_PROG_TEST_RUN``, run-time statistics and BTF type sizes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import os
import threading
from dataclasses import dataclass
from typing import Iterator

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class BpfError(OSError):
    """A libbpf or kernel call failed; ``log`` holds what libbpf printed (verifier log)."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


def _check(rc: int, what: str, log: str = "") -> int:
    _raise_deferred_interrupt()
    if rc < 0:
        err = -rc if rc != -1 else (ctypes.get_errno() or errno_mod.EINVAL)
        raise BpfError(err, what, log)
    return rc


# ---- libbpf's log: captured per thread so a failed load can report it ----

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_log_state = threading.local()


def _print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(8192)
    n = _libc.vsnprintf(buf, len(buf), fmt, args)
    lines = getattr(_log_state, "lines", None)
    if lines is not None:
        lines.append(buf.value.decode(errors="replace"))
    return n


_print_cb = _PRINT_FN(_print)


_interrupted = False


def interrupt_after_call() -> None:
    """For a signal handler that found itself in_callback: the libbpf call
    raises KeyboardInterrupt when it returns."""
    global _interrupted
    _interrupted = True


def _raise_deferred_interrupt() -> None:
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise KeyboardInterrupt


def in_callback(frame) -> bool:
    """Whether a signal handler's `frame` runs inside libbpf's print callback:
    an exception raised there is printed and dropped by ctypes, so a handler
    that raises (KeyboardInterrupt) must wait until the libbpf call returned."""
    while frame is not None:
        if frame.f_code is _print.__code__:
            return True
        frame = frame.f_back
    return False


_lib.libbpf_set_print.restype = ctypes.c_void_p
_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print(_print_cb)


class _CapturedLog:
    def __enter__(self) -> "_CapturedLog":
        _log_state.lines = []
        return self

    def __exit__(self, *exc: object) -> None:
        self.text = "".join(_log_state.lines)
        _log_state.lines = None
        _raise_deferred_interrupt()


# ---- prototypes ----

def _proto(name: str, restype, *argtypes) -> None:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_vp, _int, _u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
_proto("bpf_object__open_file", _vp, ctypes.c_char_p, _vp)
_proto("bpf_enable_stats", _int, _int)
_proto("bpf_object__load", _int, _vp)
_proto("bpf_object__close", None, _vp)
_proto("bpf_object__find_program_by_name", _vp, _vp, ctypes.c_char_p)
_proto("bpf_object__find_map_by_name", _vp, _vp, ctypes.c_char_p)
_proto("bpf_object__btf", _vp, _vp)
_proto("bpf_program__fd", _int, _vp)
_proto("bpf_map__fd", _int, _vp)
_proto("bpf_map__reuse_fd", _int, _vp, _int)
_proto("bpf_map__max_entries", _u32, _vp)
_proto("bpf_obj_pin", _int, _int, ctypes.c_char_p)
_proto("bpf_obj_get", _int, ctypes.c_char_p)
_proto("bpf_obj_get_info_by_fd", _int, _int, _vp, ctypes.POINTER(_u32))
_proto("bpf_map_lookup_elem", _int, _int, _vp, _vp)
_proto("bpf_map_update_elem", _int, _int, _vp, _vp, ctypes.c_uint64)
_proto("bpf_map_delete_elem", _int, _int, _vp)
_proto("bpf_map_get_next_key", _int, _int, _vp, _vp)
_proto("libbpf_num_possible_cpus", _int)
_proto("btf__find_by_name_kind", ctypes.c_int32, _vp, ctypes.c_char_p, _u32)
_proto("btf__resolve_size", ctypes.c_int64, _vp, _u32)
_proto("bpf_prog_test_run_opts", _int, _int, _vp)
_proto("bpf_tc_hook_create", _int, _vp)
_proto("bpf_tc_hook_destroy", _int, _vp)
_proto("bpf_tc_attach", _int, _vp, _vp)
_proto("bpf_tc_detach", _int, _vp, _vp)
_proto("bpf_tc_query", _int, _vp, _vp)
_proto("bpf_xdp_attach", _int, _int, _int, _u32, _vp)
_proto("bpf_xdp_detach", _int, _int, _u32, _vp)
_proto("bpf_xdp_query_id", _int, _int, _int, ctypes.POINTER(_u32))

BTF_KIND_STRUCT = 4
BPF_ANY = 0
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6


def possible_cpus() -> int:
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
        ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * 16),
        ("rest", ctypes.c_uint8 * 64),
    ]


class _OwnedFd:
    """A BPF object fd that is closed with the Python object when we opened it
    (a pin), and left to libbpf when it belongs to a loaded BpfObject."""

    fd: int
    _owns_fd: bool

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _obj_get(path: str, what: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pinned {what} {path}")


# ---- maps ----

class Map(_OwnedFd):
    """A BPF map by file descriptor, with raw bytes access."""

    def __init__(self, fd: int, name: str, owns_fd: bool = False) -> None:
        info = _MapInfo()
        size = _u32(ctypes.sizeof(info))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               f"map info of {name}")
        self.fd = fd
        self.name = name
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self._owns_fd = owns_fd
        self.per_cpu = info.type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)
        # Per-CPU values come as one 8-byte-aligned slot per possible CPU.
        self._slot = (self.value_size + 7) & ~7
        self._value_buf_size = self._slot * possible_cpus() if self.per_cpu else self.value_size

    @classmethod
    def open_pinned(cls, path: str) -> "Map":
        return cls(_obj_get(path, "map"), os.path.basename(path), owns_fd=True)

    def pin(self, path: str) -> None:
        _check(_lib.bpf_obj_pin(self.fd, path.encode()), f"pin map {self.name} at {path}")

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, map wants {self.key_size}")
        return ctypes.create_string_buffer(bytes(key), self.key_size)

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self._value_buf_size)
        rc = _lib.bpf_map_lookup_elem(self.fd, self._key(key), out)
        if rc < 0:
            if ctypes.get_errno() == errno_mod.ENOENT or rc == -errno_mod.ENOENT:
                return None
            _check(rc, f"lookup in {self.name}")
        return out.raw

    def lookup_per_cpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i:i + self.value_size] for i in range(0, len(raw), self._slot)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if self.per_cpu:
            value = b"".join(bytes(value).ljust(self._slot, b"\0")
                             for _ in range(self._value_buf_size // self._slot))
        elif len(value) != self.value_size:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, map wants {self.value_size}")
        buf = ctypes.create_string_buffer(bytes(value), len(value))
        _check(_lib.bpf_map_update_elem(self.fd, self._key(key), buf, flags), f"update {self.name}")

    def delete(self, key: bytes) -> bool:
        rc = _lib.bpf_map_delete_elem(self.fd, self._key(key))
        if rc < 0 and (ctypes.get_errno() == errno_mod.ENOENT or rc == -errno_mod.ENOENT):
            return False
        _check(rc, f"delete from {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        cur = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            rc = _lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if rc < 0:
                if ctypes.get_errno() == errno_mod.ENOENT or rc == -errno_mod.ENOENT:
                    return
                _check(rc, f"iterate {self.name}")
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, self.key_size)


class TypedMap:
    """A map whose keys and values are ctypes types (structures or scalars)."""

    def __init__(self, raw: Map, key_type: type, value_type: type) -> None:
        for what, t, size in (("key", key_type, raw.key_size), ("value", value_type, raw.value_size)):
            if ctypes.sizeof(t) != size:
                raise ValueError(f"{raw.name}: {what} type {t.__name__} is {ctypes.sizeof(t)} "
                                 f"bytes, the map's {what} is {size}")
        self.raw, self.key_type, self.value_type = raw, key_type, value_type

    def get(self, key):
        data = self.raw.lookup(bytes(self._k(key)))
        return None if data is None else self.value_type.from_buffer_copy(data[:self.raw.value_size])

    def put(self, key, value) -> None:
        self.raw.update(bytes(self._k(key)), bytes(self._v(value)))

    def delete(self, key) -> bool:
        return self.raw.delete(bytes(self._k(key)))

    def items(self) -> Iterator[tuple]:
        for k in list(self.raw.keys()):
            v = self.get(self.key_type.from_buffer_copy(k))
            if v is not None:
                yield self.key_type.from_buffer_copy(k), v

    def per_cpu(self, key) -> list:
        return [self.value_type.from_buffer_copy(v) for v in self.raw.lookup_per_cpu(bytes(self._k(key)))]

    def _k(self, key):
        return key if isinstance(key, ctypes._SimpleCData) or isinstance(key, ctypes.Structure) \
            else self.key_type(key)

    def _v(self, value):
        return value if isinstance(value, (ctypes._SimpleCData, ctypes.Structure)) \
            else self.value_type(value)


# ---- programs and BPF_PROG_TEST_RUN ----

class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", _vp), ("data_out", _vp),
        ("data_size_in", _u32), ("data_size_out", _u32), ("ctx_in", _vp), ("ctx_out", _vp),
        ("ctx_size_in", _u32), ("ctx_size_out", _u32), ("retval", _u32), ("repeat", _int),
        ("duration", _u32), ("flags", _u32), ("cpu", _u32), ("batch_size", _u32),
    ]


class _XdpMd(ctypes.Structure):
    _fields_ = [(name, _u32) for name in ("data", "data_end", "data_meta", "ingress_ifindex",
                                          "rx_queue_index", "egress_ifindex")]


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", _u32), ("id", _u32), ("_skipped", ctypes.c_uint8 * 56),
                ("name", ctypes.c_char * 16), ("_middle", ctypes.c_uint8 * 112),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 48)]


@dataclass(frozen=True)
class RunStatistics:
    """What the kernel counts for a program while run-time statistics are on."""

    run_time_ns: int
    runs: int


BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def run_statistics_enabled() -> Iterator[None]:
    """The kernel times every program run while this is held (BPF_ENABLE_STATS:
    released with the fd, also when the process dies)."""
    fd = _lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    _check(fd, "enable BPF run-time statistics")
    try:
        yield
    finally:
        os.close(fd)


def _prog_info(fd: int, what: str) -> _ProgInfo:
    info = _ProgInfo()
    size = _u32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"program info of {what}")
    return info


def program_name(fd: int) -> str:
    """The name the program was loaded with (the kernel keeps 15 characters)."""
    return _prog_info(fd, f"fd {fd}").name.decode(errors="replace")


class Program(_OwnedFd):
    def __init__(self, fd: int, name: str, owns_fd: bool = False) -> None:
        self.fd, self.name = fd, name
        self._owns_fd = owns_fd

    @classmethod
    def open_pinned(cls, path: str) -> "Program":
        return cls(_obj_get(path, "program"), os.path.basename(path), owns_fd=True)

    @property
    def id(self) -> int:
        return _prog_info(self.fd, self.name).id

    def run_statistics(self) -> RunStatistics:
        info = _prog_info(self.fd, self.name)
        return RunStatistics(info.run_time_ns, info.run_cnt)

    def test_run(self, data: bytes, repeat: int = 1, out_size: int = 0) -> TestRun:
        out = ctypes.create_string_buffer(max(out_size, len(data) + 256))
        inp = ctypes.create_string_buffer(bytes(data), len(data))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(inp, _vp),
                            data_out=ctypes.cast(out, _vp), data_size_in=len(data),
                            data_size_out=len(out), repeat=repeat)
        _check(_lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"test run of {self.name}")
        # TC verdicts are signed: TCX_NEXT (TC_ACT_UNSPEC) is -1.
        return TestRun(ctypes.c_int32(opts.retval).value, out.raw[:opts.data_size_out], opts.duration)

    def run_live_frames(self, frame: bytes, ifindex: int, repeat: int, batch_size: int = 64) -> None:
        """Run an XDP program `repeat` times on copies of `frame` as if received
        on `ifindex` (in the caller's network namespace), and carry out its
        verdicts: XDP_TX sends the frame out of that interface."""
        inp = ctypes.create_string_buffer(bytes(frame), len(frame))
        ctx = _XdpMd(data_end=len(frame), ingress_ifindex=ifindex)
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(inp, _vp),
                            data_size_in=len(frame), ctx_in=ctypes.cast(ctypes.pointer(ctx), _vp),
                            ctx_size_in=ctypes.sizeof(ctx), repeat=repeat,
                            flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
        _check(_lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"live-frames run of {self.name}")

    def pin(self, path: str) -> None:
        _check(_lib.bpf_obj_pin(self.fd, path.encode()), f"pin program {self.name} at {path}")


# ---- objects ----

class BpfObject:
    """An ELF BPF object: open, optionally re-use pinned maps, load."""

    def __init__(self, path: str) -> None:
        with _CapturedLog() as log:
            ptr = _lib.bpf_object__open_file(str(path).encode(), None)
        if not ptr:
            raise BpfError(ctypes.get_errno() or errno_mod.EINVAL, f"open {path}", log.text)
        self._ptr = ptr
        self.path = str(path)
        self.loaded = False

    def _map_ptr(self, name: str) -> int:
        ptr = _lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise KeyError(f"{self.path} has no map {name!r}")
        return ptr

    def reuse_map(self, name: str, pinned: Map) -> None:
        """Before load: make map `name` the already existing `pinned` map (keeps its contents)."""
        _check(_lib.bpf_map__reuse_fd(self._map_ptr(name), pinned.fd), f"reuse map {name}")

    def map_max_entries(self, name: str) -> int:
        """Before or after load: the entries map `name` is declared with."""
        return _lib.bpf_map__max_entries(self._map_ptr(name))

    def load(self) -> "BpfObject":
        with _CapturedLog() as log:
            rc = _lib.bpf_object__load(self._ptr)
        _check(rc, f"load {self.path}", log.text)
        self.loaded = True
        return self

    def program(self, name: str) -> Program:
        ptr = _lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise KeyError(f"{self.path} has no program {name!r}")
        return Program(_check(_lib.bpf_program__fd(ptr), f"fd of {name}"), name)

    def map(self, name: str) -> Map:
        return Map(_check(_lib.bpf_map__fd(self._map_ptr(name)), f"fd of map {name}"), name)

    def btf_struct_size(self, name: str) -> int:
        btf = _lib.bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(errno_mod.ENOENT, f"{self.path} carries no BTF")
        type_id = _check(_lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_STRUCT),
                         f"BTF struct {name}")
        return _check(_lib.btf__resolve_size(btf, type_id), f"BTF size of {name}")

    def close(self) -> None:
        if self._ptr:
            _lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- TC (clsact) ----

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", _int), ("attach_point", _int),
                ("parent", _u32), ("_pad", _u32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", _int), ("flags", _u32), ("prog_id", _u32),
                ("handle", _u32), ("priority", _u32), ("_pad", _u32)]


@dataclass(frozen=True)
class TcHook:
    """A classifier slot on an interface's clsact qdisc (ingress or egress)."""

    ifindex: int
    attach_point: int = BPF_TC_INGRESS
    handle: int = 1
    priority: int = 1

    def _hook(self) -> _TcHook:
        return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=self.ifindex, attach_point=self.attach_point)

    def _opts(self, prog_fd: int = 0, flags: int = 0) -> _TcOpts:
        return _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=flags,
                       handle=self.handle, priority=self.priority)

    def attach(self, prog: Program, replace: bool = True) -> int:
        """Attach, or atomically replace what this slot runs (with replace=False,
        EEXIST when the slot is taken). Returns the program id."""
        hook = self._hook()
        rc = _lib.bpf_tc_hook_create(ctypes.byref(hook))
        if rc < 0 and rc != -errno_mod.EEXIST:
            _check(rc, f"create clsact on ifindex {self.ifindex}")
        opts = self._opts(prog.fd, BPF_TC_F_REPLACE if replace else 0)
        _check(_lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
               f"attach {prog.name} to ifindex {self.ifindex}")
        return opts.prog_id

    def query(self) -> int | None:
        """The id of the attached program, or None."""
        opts = self._opts()
        rc = _lib.bpf_tc_query(ctypes.byref(self._hook()), ctypes.byref(opts))
        if rc == -errno_mod.ENOENT or rc == -errno_mod.EINVAL:
            return None
        _check(rc, f"query tc on ifindex {self.ifindex}")
        return opts.prog_id

    def detach(self) -> None:
        rc = _lib.bpf_tc_detach(ctypes.byref(self._hook()), ctypes.byref(self._opts()))
        if rc < 0 and rc != -errno_mod.ENOENT:
            _check(rc, f"detach from ifindex {self.ifindex}")

    def destroy_clsact(self) -> None:
        hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=self.ifindex,
                       attach_point=BPF_TC_INGRESS | BPF_TC_EGRESS)
        rc = _lib.bpf_tc_hook_destroy(ctypes.byref(hook))
        if rc < 0 and rc not in (-errno_mod.ENOENT, -errno_mod.EINVAL):
            _check(rc, f"destroy clsact on ifindex {self.ifindex}")


# ---- XDP ----

XDP_FLAGS_DRV_MODE = 1 << 2


@dataclass(frozen=True)
class XdpHook:
    """An interface's native (driver) XDP slot. Generic XDP is not offered: it
    runs after the skb is allocated, where the TC program already is."""

    ifindex: int

    def attach(self, prog: Program) -> None:
        """Attach, or atomically replace what the slot runs."""
        rc = _lib.bpf_xdp_attach(self.ifindex, prog.fd, XDP_FLAGS_DRV_MODE, None)
        if rc == -errno_mod.EOPNOTSUPP:
            raise BpfError(-rc, f"attach {prog.name} to ifindex {self.ifindex}: "
                                "the driver has no native XDP (leave xdp off for this interface)")
        _check(rc, f"attach {prog.name} to ifindex {self.ifindex} (native XDP)")

    def query(self) -> int | None:
        """The id of the attached program, or None."""
        prog_id = _u32(0)
        _check(_lib.bpf_xdp_query_id(self.ifindex, XDP_FLAGS_DRV_MODE, ctypes.byref(prog_id)),
               f"query XDP on ifindex {self.ifindex}")
        return prog_id.value or None

    def detach(self) -> None:
        rc = _lib.bpf_xdp_detach(self.ifindex, XDP_FLAGS_DRV_MODE, None)
        if rc < 0 and rc != -errno_mod.ENODEV:
            _check(rc, f"detach XDP from ifindex {self.ifindex}")
