"""A backend joins the pool, then one drains and leaves: every established
connection lives on, though the proxies keep no per-flow state (daisy
chaining, docs/dataplane.md). The whole fleet in namespaces with real agents
in file mode; the operator's side is in tests/test_operator.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from conftest import require_bpf
from synfleet_lab.testbed.clients import attempt
from synfleet_lab.testbed.configs import SERVICE_PORT
from synfleet_lab.testbed.fleetlab import BACKENDS, SERVICE, FleetLab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab():
    require_bpf()
    with FleetLab(pool=("backend-a",)) as lab:
        yield lab.start()


class Connections:
    """Connections through the proxies (IPv4 and IPv6 alternate), each greeted
    by the backend that holds it, kept open for more exchanges."""

    def __init__(self, lab: FleetLab, count: int) -> None:
        self.socks: list[socket.socket] = []
        self.backends: list[str] = []
        try:
            for i in range(count):
                family = 4 if i % 2 == 0 else 6
                sock = lab.client_socket(family)
                self.socks.append(sock)
                sock.settimeout(5)
                sock.connect((SERVICE[family], SERVICE_PORT))
                self.backends.append(self._line(sock))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _line(sock: socket.socket) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                raise ConnectionError("closed before its greeting")
            data += chunk
        return data.decode().strip()

    def exchange(self, payload: bytes) -> list[str]:
        """One more echo on every connection; what failed, and how."""
        failed = []
        for i, sock in enumerate(self.socks):
            try:
                sock.sendall(payload)
                echoed = b""
                while len(echoed) < len(payload):
                    chunk = sock.recv(len(payload) - len(echoed))
                    if not chunk:
                        raise ConnectionError("closed")
                    echoed += chunk
                assert echoed == payload
            except (OSError, AssertionError) as err:
                failed.append(f"#{i} on {self.backends[i]}: {err!r}")
        return failed

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


class Burst:
    """New connections back to back while the backend set changes (bounded:
    at most `limit` of them, and only until stopped)."""

    def __init__(self, lab: FleetLab, limit: int = 400) -> None:
        self.lab, self.limit = lab, limit
        self.attempts = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.attempts) < self.limit:
            self.attempts.append(attempt(self.lab, 4 if len(self.attempts) % 2 == 0 else 6))

    def __enter__(self) -> "Burst":
        self._thread.start()
        time.sleep(0.2)     # under way before the change
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)     # and still after it
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_backend_joining_and_another_draining_lose_no_established_connection(lab):
    first = Connections(lab, 200)
    later = None
    try:
        assert set(first.backends) == {"backend-a"}
        assert first.exchange(b"one\n") == []

        # backend-b joins: Maglev hands it about half the slots, and the flows in them.
        with Burst(lab) as joining:
            lab.set_pool(BACKENDS)
        assert len(joining.attempts) >= 10 and all(a.ok for a in joining.attempts), \
            [a.error for a in joining.attempts if not a.ok]
        assert first.exchange(b"two\n") == []
        chained = lab.counters(("backend-b",))["chained"]
        assert chained >= 50, "the newcomer handed no flow back"     # about half of 200
        assert lab.counters(("backend-a",))["chain_received"] >= chained

        later = Connections(lab, 100)
        assert set(later.backends) == set(BACKENDS)

        # backend-a drains: no new handshake reaches it; its flows follow it there.
        handshakes_a = lab.counters(("backend-a",))["reqsk_created"]
        with Burst(lab) as draining:
            lab.set_pool(("backend-b",))
        assert len(draining.attempts) >= 10 and all(a.ok for a in draining.attempts), \
            [a.error for a in draining.attempts if not a.ok]
        assert first.exchange(b"three\n") == [] and later.exchange(b"three\n") == []
        fresh = [attempt(lab, 4 if i % 2 == 0 else 6) for i in range(40)]
        assert all(a.ok for a in fresh) and {a.backend for a in fresh} == {"backend-b"}
        started_on_a = lab.counters(("backend-a",))["reqsk_created"] - handshakes_a
        during = sum(a.backend == "backend-a" for a in draining.attempts)
        assert started_on_a == during, "a handshake reached the drained backend after the change"
        counted = lab.counters(BACKENDS)
        assert counted["chain_refused"] == 0 and counted["chain_failed"] == 0
    finally:
        first.close()
        if later:
            later.close()
