"""Link events from the kernel (rtnetlink): an interface that appears, goes,
is renamed or changes state wakes the agent, which then asks the kernel what
its hooks look like (agent/hooks.py) rather than reading the event."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK


class LinkEvents:
    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._ipr.bind(groups=RTMGRP_LINK)

    def fileno(self) -> int:
        return self._ipr.fileno()

    def drain(self) -> int:
        """Read what is queued (without blocking); how many messages."""
        return len(self._ipr.get())

    def close(self) -> None:
        self._ipr.close()
