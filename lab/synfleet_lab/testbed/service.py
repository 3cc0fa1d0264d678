"""The protected service the fleet testbed runs on each backend: it greets
every connection with its backend's name (so a client knows where its flow
landed), then echoes what it reads until the client closes — or, once what it
echoed ends with `BYE`, closes first itself, as an HTTP/1.0 server does, so
that the 4-tuple stays in TIME_WAIT on the backend.

    python -m synfleet_lab.testbed.service --name backend-a --port 8080 ADDRESS...
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

BYE = b"bye\n"


def _serve(conn: socket.socket, greeting: bytes) -> None:
    with conn:
        try:
            conn.sendall(greeting)
            tail = b""
            while chunk := conn.recv(1 << 18):
                conn.sendall(chunk)
                tail = (tail + chunk)[-len(BYE):]
                if tail == BYE:
                    return
        except OSError:
            pass   # the client reset or went away: nothing to serve


def _accept_forever(listener: socket.socket, greeting: bytes) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn, greeting), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("addresses", nargs="+")
    args = parser.parse_args(argv)
    greeting = f"{args.name}\n".encode()
    listeners = []
    for address in args.addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, args.port))
        s.listen(4096)
        listeners.append(s)
    for s in listeners[1:]:
        threading.Thread(target=_accept_forever, args=(s, greeting), daemon=True).start()
    print("ready", flush=True)
    _accept_forever(listeners[0], greeting)
    return 0


if __name__ == "__main__":
    sys.exit(main())
