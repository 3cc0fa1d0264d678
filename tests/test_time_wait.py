"""A client that reuses its source port meets the backend's TIME_WAIT socket of
its previous connection (the server closed first). The backend must do what the
kernel does with a SYN there (RFC 6191), though the proxy hid the SYN from it."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import threading
import time

import pytest

from conftest import require_bpf
from fleet import SERVICE_PORT, Fleet, recv_exact, running_fleet
from synfleet.abi import Counter
from synfleet_lab.testbed.topology import V4, V6

ROTATION_S = 3600
CLIENT_PORTS = itertools.count(40000)   # one per test: no TIME_WAIT from another test
BANNER = b"220 synfleet test service\n"
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def fleet():
    require_bpf()
    with running_fleet(ROTATION_S) as f:
        yield f


@pytest.fixture
def port():
    return next(CLIENT_PORTS)


class CloseFirstServer:
    """Per connection: an optional banner, then a request `<n>\\n` followed by n
    bytes, answered `ok <n>\\n`; then the server closes first, so the 4-tuple
    stays in TIME_WAIT on the backend."""

    def __init__(self, fleet: Fleet, family: int, banner: bool) -> None:
        address = (V4 if family == 4 else V6).service
        with fleet.topo.backend.entered():
            self.sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, SERVICE_PORT))
            self.sock.listen(64)
        self.banner = banner
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return      # closed by the test
            with conn:
                try:
                    conn.settimeout(TIMEOUT_S)
                    if self.banner:
                        conn.sendall(BANNER)
                    line = _read_line(conn)
                    n = int(line)
                    recv_exact(conn, n)
                    conn.sendall(b"ok %d\n" % n)
                except (OSError, ValueError) as err:
                    self.errors.append(err)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


def _read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(line)!r}")
        line += chunk
    return bytes(line)


def exchange(fleet: Fleet, family: int, port: int, banner: bool, upload: int = 16) -> None:
    """One connection from `port`: banner, request, answer, the server's close."""
    a = V4 if family == 4 else V6
    with fleet.topo.client.entered():
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    with sock:
        sock.settimeout(TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.client, port))
        sock.connect((a.service, SERVICE_PORT))
        if banner:
            assert _read_line(sock) == BANNER
        sock.sendall(b"%d\n" % upload + secrets.token_bytes(upload))
        assert _read_line(sock) == b"ok %d\n" % upload
        assert sock.recv(1) == b"", "the server closes first"


def counters(fleet: Fleet, *names: Counter) -> dict[Counter, int]:
    values = fleet.backend.counter_values()
    return {n: values[n] for n in names}


@contextlib.contextmanager
def sysctl(ns, key: str, value: int):
    old = int(ns.sysctl_get(key))
    ns.sysctl(key, value)
    try:
        yield
    finally:
        ns.sysctl(key, old)


def time_wait_left(fleet: Fleet, family: int, port: int) -> bool:
    a = V4 if family == 4 else V6
    peer = f"[{a.client}]" if family == 6 else a.client
    return bool(fleet.topo.backend.run("ss", "-tanH", "state", "time-wait",
                                       f"dst {peer}:{port}").strip())


def wait_client_port_free(fleet: Fleet, port: int) -> None:
    """The client's previous socket leaves LAST_ACK when the server's ACK of its
    FIN arrives: a few ms after the exchange."""
    deadline = time.monotonic() + 2
    while fleet.topo.client.run("ss", "-tanH", f"sport = :{port}").strip():
        assert time.monotonic() < deadline, "client socket never closed"
        time.sleep(0.005)


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("banner", [False, True], ids=["client-speaks-first", "server-banner"])
def test_fifty_connections_from_one_port_each_complete_a_request(fleet, port, family, banner):
    server = CloseFirstServer(fleet, family, banner)
    before = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED, Counter.REQSK_CREATED)
    try:
        for i in range(50):
            wait_client_port_free(fleet, port)
            started = time.monotonic()
            exchange(fleet, family, port, banner)
            assert time.monotonic() - started < 1.0, f"connection {i} stalled"
    finally:
        server.close()
    after = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED, Counter.REQSK_CREATED)
    assert not server.errors, server.errors
    assert after[Counter.REQSK_CREATED] - before[Counter.REQSK_CREATED] == 50
    # Every connection but the first met the TIME_WAIT socket its predecessor left.
    assert after[Counter.TW_RECYCLED] - before[Counter.TW_RECYCLED] == 49
    assert after[Counter.TW_REFUSED] == before[Counter.TW_REFUSED]


def reuse_after_upload(fleet: Fleet, family: int, port: int) -> None:
    """A 64 MiB upload moves the server's rcv_nxt far past where the client's
    clock-driven ISN will be a moment later (64 ns a step: ~16 MB/s), so the
    next connection's ISN lies behind the TIME_WAIT socket's rcv_nxt."""
    exchange(fleet, family, port, banner=True, upload=64 << 20)
    wait_client_port_free(fleet, port)
    time.sleep(0.01)   # a newer timestamp (1 ms clock) when the client sends them


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_reuse_with_an_older_sequence_and_no_timestamps_is_refused_with_a_reset(fleet, port, family):
    server = CloseFirstServer(fleet, family, banner=True)
    try:
        with sysctl(fleet.topo.client, "net.ipv4.tcp_timestamps", 0):
            reuse_after_upload(fleet, family, port)
            before = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED)
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                exchange(fleet, family, port, banner=True)
            assert time.monotonic() - started < 1.0, "the client was left hanging"
            after = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED)
    finally:
        server.close()
    assert after[Counter.TW_REFUSED] - before[Counter.TW_REFUSED] == 1
    assert after[Counter.TW_RECYCLED] == before[Counter.TW_RECYCLED]
    # The old connection's TIME_WAIT socket is untouched, as the kernel leaves it.
    assert time_wait_left(fleet, family, port)


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_reuse_with_an_older_sequence_but_a_newer_timestamp_is_accepted(fleet, port, family):
    server = CloseFirstServer(fleet, family, banner=True)
    try:
        reuse_after_upload(fleet, family, port)
        before = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED)
        exchange(fleet, family, port, banner=True)
        after = counters(fleet, Counter.TW_RECYCLED, Counter.TW_REFUSED)
    finally:
        server.close()
    assert not server.errors, server.errors
    assert after[Counter.TW_RECYCLED] - before[Counter.TW_RECYCLED] == 1
    assert after[Counter.TW_REFUSED] == before[Counter.TW_REFUSED]


@pytest.mark.netns
def test_backend_with_rfc1337_refuses_reuse_with_a_reset_instead_of_hanging(fleet, port):
    """With net.ipv4.tcp_rfc1337=1 the kernel ignores RSTs in TIME_WAIT, so the
    backend cannot retire the socket: it refuses, and says so."""
    server = CloseFirstServer(fleet, 4, banner=True)
    try:
        with sysctl(fleet.topo.backend, "net.ipv4.tcp_rfc1337", 1):
            exchange(fleet, 4, port, banner=True)
            wait_client_port_free(fleet, port)
            before = counters(fleet, Counter.TW_REFUSED)
            with pytest.raises(ConnectionResetError):
                exchange(fleet, 4, port, banner=True)
            after = counters(fleet, Counter.TW_REFUSED)
    finally:
        server.close()
    assert after[Counter.TW_REFUSED] - before[Counter.TW_REFUSED] == 1
