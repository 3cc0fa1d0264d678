"""Notice an XDP front whose replies do not leave the node.

XDP_TX hands the SYN+ACK back to the driver; when the driver cannot send it
(a veth whose peer runs no XDP program, a full or absent XDP TX ring) the
frame is dropped and only the driver's own statistics say so, while our
counters show every SYN answered. The drivers count it in an ethtool
statistic ("xdp_tx_errors" per queue on veth, "rx_xdp_tx_err" on mlx5,
"xdp_tx_err" elsewhere); read here with the SIOCETHTOOL ioctl.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSTATS = 0x1D
ETHTOOL_GSSET_INFO = 0x37
ETH_SS_STATS = 1
ETH_GSTRING_LEN = 32

# A tick with at least this many failed XDP_TX, and at least this share of the
# SYNs answered in it, means the front is not working (rather than a burst
# that overran the ring once).
MIN_ERRORS = 8
MIN_SHARE = 0.5


def _ethtool(sock: socket.socket, interface: str, request: array.array) -> None:
    ifreq = struct.pack("16sP16x", interface.encode(), request.buffer_info()[0])   # struct ifreq
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def xdp_tx_errors(interface: str) -> int | None:
    """The driver's count of XDP_TX frames it failed to send (summed over
    queues), or None when it reports no such statistic."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        info = array.array("B", struct.pack("=IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_STATS, 0))
        try:
            _ethtool(sock, interface, info)
        except OSError:
            return None
        count = struct.unpack_from("=I", info, 16)[0]
        if count == 0:
            return None
        strings = array.array("B", struct.pack("=III", ETHTOOL_GSTRINGS, ETH_SS_STATS, count)
                              + bytes(count * ETH_GSTRING_LEN))
        _ethtool(sock, interface, strings)
        names = [bytes(strings[12 + i * ETH_GSTRING_LEN:12 + (i + 1) * ETH_GSTRING_LEN]).split(b"\0", 1)[0]
                 for i in range(count)]
        wanted = [i for i, n in enumerate(names) if n.endswith((b"xdp_tx_errors", b"xdp_tx_err"))]
        if not wanted:
            return None
        stats = array.array("B", struct.pack("=II", ETHTOOL_GSTATS, count) + bytes(count * 8))
        _ethtool(sock, interface, stats)
        values = struct.unpack_from(f"={count}Q", stats, 8)
        return sum(values[i] for i in wanted)


class XdpTxWatch:
    """Per interface: the driver's XDP_TX errors and our answered SYNs at the
    last look."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def failing(self, interface: str, answered: int) -> str | None:
        """Why the front on `interface` is failing since the last call, or None."""
        errors = xdp_tx_errors(interface)
        if errors is None:
            return None
        last = self._last.get(interface)
        self._last[interface] = (errors, answered)
        if last is None:
            return None
        failed, replied = errors - last[0], answered - last[1]
        if failed >= MIN_ERRORS and failed >= MIN_SHARE * replied:
            return (f"the driver failed to send {failed} XDP_TX replies while {replied} SYNs were answered "
                    f"(ethtool xdp_tx_errors)")
        return None
