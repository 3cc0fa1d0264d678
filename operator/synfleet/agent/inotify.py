"""Just enough inotify (through libc) to notice a config file being replaced,
including the symlink swap Kubernetes uses for mounted ConfigMaps."""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
_EVENT = struct.Struct("iIII")


class FileWatch:
    """Readable (for select) when `path` is written or replaced. Watches the
    directory, since editors and Kubernetes replace files by renaming; of its
    events only those naming the file, or the `..data` link a ConfigMap
    volume swaps, count."""

    def __init__(self, path: str) -> None:
        directory, self.name = os.path.split(os.path.abspath(path))
        self._names = {os.fsencode(self.name), b"..data"}
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if _libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def changed(self) -> bool:
        """Consume pending events; whether any concerned the file."""
        hit = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            off = 0
            while off < len(buf):
                _, _, _, name_len = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size:off + _EVENT.size + name_len].rstrip(b"\0")
                hit |= name in self._names
                off += _EVENT.size + name_len

    def close(self) -> None:
        os.close(self.fd)
