"""Legitimate clients for the fleet lab: real kernel TCP from the client
namespace, each attempt timed from connect() to the service's greeting."""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from synfleet_lab.testbed.configs import SERVICE_PORT
from synfleet_lab.testbed.fleetlab import SERVICE, FleetLab
from synfleet_lab.testbed.service import BYE

CONNECT_TIMEOUT_S = 5.0
CHURN_PORT_BASE = 45000
PORTS_PER_CLIENT = 16


@dataclass(frozen=True)
class Attempt:
    started: float          # time.monotonic()
    ok: bool
    connect_ms: float | None
    backend: str | None
    error: str | None = None


class PortStillClosing(Exception):
    """The fixed source port's previous connection is still closing on the
    client (its FIN not yet acknowledged): connect() sent nothing. A client
    whose kernel picks the port would have taken another one."""


def _read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        line += chunk
    return bytes(line)


def attempt(lab: FleetLab, family: int = 4, source_port: int = 0, payload: bytes = b"ping",
            timeout: float = CONNECT_TIMEOUT_S, server_closes: bool = False) -> Attempt:
    """One connection: connect, read the greeting, echo `payload`, then either
    reset-close (so a fixed source port can be used again at once) or, with
    `server_closes`, let the service close first and leave the 4-tuple in
    TIME_WAIT on the backend, where the next use of the port meets it."""
    started = time.monotonic()
    sock = lab.client_socket(family)
    if server_closes:
        payload += BYE
    try:
        sock.settimeout(timeout)
        if not server_closes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0" if family == 4 else "::", source_port))
        try:
            sock.connect((SERVICE[family], SERVICE_PORT))
        except OSError as err:
            if source_port and err.errno == errno.EADDRNOTAVAIL:
                raise PortStillClosing(source_port) from err
            raise
        connect_ms = (time.monotonic() - started) * 1000
        backend = _read_line(sock).decode().strip()
        sock.sendall(payload)
        echoed = bytearray()
        while len(echoed) < len(payload):
            chunk = sock.recv(len(payload) - len(echoed))
            if not chunk:
                raise ConnectionError("closed during the echo")
            echoed += chunk
        if echoed != payload:
            raise ValueError("echo differs")
        if server_closes and sock.recv(1):
            raise ValueError("the service did not close")
        return Attempt(started, True, connect_ms, backend)
    except (OSError, ValueError) as err:
        return Attempt(started, False, None, None, f"{type(err).__name__}: {err}")
    finally:
        sock.close()


@dataclass
class ClientLoad:
    """`concurrency` threads connecting back to back (IPv4 and IPv6 alternate)
    until stopped; every attempt is kept. Each thread cycles through
    PORTS_PER_CLIENT fixed source ports and the service closes first, so that
    most connections reuse a 4-tuple the backend still holds in TIME_WAIT (as
    a busy client behind NAT or an HTTP/1.0 load does)."""

    lab: FleetLab
    concurrency: int = 4
    pause_s: float = 0.01
    attempts: list[Attempt] = field(default_factory=list)
    ports_still_closing: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.concurrency)]

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            port = CHURN_PORT_BASE + index * PORTS_PER_CLIENT + n % PORTS_PER_CLIENT
            try:
                self.attempts.append(attempt(self.lab, 4 if (index + n) % 2 == 0 else 6, port,
                                             server_closes=True))
            except PortStillClosing:
                self.ports_still_closing += 1
            n += 1
            self._stop.wait(self.pause_s)

    def start(self) -> "ClientLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Attempt]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.attempts


def pattern(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


@dataclass
class Transfer:
    """One long connection that sends `size` bytes at `rate` bytes/s and reads
    the echo back in a second thread; `result()` says whether every byte came
    back in order."""

    lab: FleetLab
    size: int
    rate: float
    family: int = 4
    backend: str | None = None
    error: str | None = None
    received: int = 0

    def __post_init__(self) -> None:
        self.data = pattern(self.size, b"synfleet-transfer")
        self._digest = hashlib.sha256()
        self._threads: list[threading.Thread] = []
        self.sent = 0

    def start(self) -> "Transfer":
        self.sock = self.lab.client_socket(self.family)
        self.sock.settimeout(30)
        self.sock.connect((SERVICE[self.family], SERVICE_PORT))
        self.backend = _read_line(self.sock).decode().strip()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        start, chunk = time.monotonic(), 1 << 16
        try:
            while self.sent < self.size:
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                self.sock.sendall(self.data[self.sent:self.sent + chunk])
                self.sent = min(self.size, self.sent + chunk)
        except OSError as err:
            self.error = f"send: {err}"

    def _receive(self) -> None:
        try:
            while self.received < self.size:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    raise ConnectionError(f"closed after {self.received} bytes")
                self._digest.update(chunk)
                self.received += len(chunk)
        except OSError as err:
            self.error = f"receive: {err}"

    def result(self, timeout: float = 60) -> bool:
        for t in self._threads:
            t.join(timeout)
        self.sock.close()
        return self.error is None and self._digest.digest() == hashlib.sha256(self.data).digest()
