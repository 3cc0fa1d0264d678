"""Notice an XDP front whose replies do not leave the node.

XDP_TX hands the SYN+ACK back to the driver; when the driver cannot send it
(a veth whose peer runs no XDP program, a full or absent XDP TX ring) the
frame is dropped and only the driver's own statistics say so, while our
counters show every SYN answered. The drivers count it in an ethtool
statistic ("xdp_tx_errors" per queue on veth, "rx_xdp_tx_err" on mlx5,
"xdp_tx_err" elsewhere), as `ethtool -S` shows.
"""

from __future__ import annotations

import contextlib

from pyroute2.ethtool.ioctl import IoctlEthtool, NoSuchDevice, NotSupportedError

# A look in which the driver failed at least this many XDP_TX replies, and at
# least this share of the SYNs answered since the previous look (one second
# before), means the front is not working. One is enough: the clients whose
# SYN+ACK was lost retransmit only after a second, and a driver whose ring
# overflows at half the replies is not answering either.
MIN_ERRORS = 1
MIN_SHARE = 0.5


def xdp_tx_errors(interface: str) -> int | None:
    """The driver's count of XDP_TX frames it failed to send (summed over
    queues), or None when it reports no such statistic."""
    try:
        with contextlib.closing(IoctlEthtool(interface)) as eth:
            stats = dict(eth.get_statistics())
    except (NoSuchDevice, NotSupportedError, OSError):
        return None
    failed = [v for k, v in stats.items() if k.endswith(("xdp_tx_errors", "xdp_tx_err"))]
    return sum(failed) if failed else None


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
