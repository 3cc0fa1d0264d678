"""`synfleet check`: the data plane end to end on this machine, in network
namespaces it creates and removes: load both programs, answer a real client's
handshake through proxy and backend (IPv4 and IPv6), and print what happened."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

from synfleet.abi import Counter
from synfleet.cookie import fresh_key
from synfleet_lab.testbed.fleet import SERVICE_PORT, Fleet, recv_exact
from synfleet_lab.testbed.topology import V4, V6

ROTATION_S = 60
PAYLOAD = b"synfleet check " * 4096


def _serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(recv_exact(conn, len(PAYLOAD))[::-1])


def _round_trip(fleet: Fleet, service: str) -> float:
    family = socket.AF_INET6 if ":" in service else socket.AF_INET
    with fleet.topo.backend.entered():
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((service, SERVICE_PORT))
        listener.listen(8)
    listener.settimeout(10)
    server = threading.Thread(target=_serve, args=(listener,), daemon=True)
    server.start()
    try:
        start = time.monotonic()
        with fleet.topo.client.entered():
            sock = socket.create_connection((service, SERVICE_PORT), timeout=10)
        connect_ms = (time.monotonic() - start) * 1000
        with sock:
            sock.sendall(PAYLOAD)
            if recv_exact(sock, len(PAYLOAD)) != PAYLOAD[::-1]:
                raise RuntimeError(f"{service}: the reply does not match what was sent")
        return connect_ms
    finally:
        server.join(10)
        listener.close()


def run_check(say: Callable[[str], None]) -> int:
    say("synfleet check: building client -- proxy -- backend namespaces, loading the data plane")
    fleet = Fleet.start([fresh_key()], ROTATION_S)
    try:
        for a in (V4, V6):
            ms = _round_trip(fleet, a.service)
            say(f"  {a.client} -> {a.service}:{SERVICE_PORT}: handshake through the proxy in "
                f"{ms:.2f} ms, {len(PAYLOAD)} bytes each way")
        proxy, backend = fleet.proxy.counter_values(), fleet.backend.counter_values()
        say("  proxy counters:   " + ", ".join(f"{c.name.lower()}={v}" for c, v in proxy.items() if v))
        say("  backend counters: " + ", ".join(f"{c.name.lower()}={v}" for c, v in backend.items() if v))
        ok = proxy[Counter.SYN_ANSWERED] == 2 and backend[Counter.REQSK_CREATED] == 2
        say("synfleet check: " + ("OK, the backend accepted both connections from cookies; "
                                  "it never saw a SYN" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        fleet.stop()
        say("synfleet check: namespaces removed")
