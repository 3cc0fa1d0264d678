"""The agent's programs on its interfaces, as the kernel has them.

TC ingress: a tcx link (Linux 6.6+) placed first, last, or next to a named
program, beside whatever else is there; or, on older kernels or by choice, a
clsact filter at a configured handle and priority that is taken only when
free. XDP (proxies): a native-mode XDP link, made only when no other program
has the slot. Links are pinned next to the maps (`tcx-<interface>`,
`xdp-<interface>`), so a new agent updates them in place and `uninstall`
finds them; a link whose interface went away is defunct and is replaced.

`reconcile` is idempotent and cheap (one query per hook): the agent runs it on
every link event and every tick, and what it reports is what the kernel said.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from synfleet.agent.pins import PinDir
from synfleet.bpf import BpfError, Program, TcHook, XdpHook
from synfleet.bpf.links import HookProgram, Link, Order, Position, name_of_program, tcx_programs
from synfleet.config import schema

log = logging.getLogger("synfleet.agent")
CLSACT_INGRESS = 0xFFFFFFF2     # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)


def tcx_supported() -> bool:
    """Whether this kernel has tcx (asked of the loopback interface)."""
    try:
        tcx_programs(socket.if_nametoindex("lo"))
    except BpfError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    return True


def _pin_name(kind: str, interface: str) -> str:
    # bpffs refuses dots (VLAN interfaces have them); interface names cannot hold ':'.
    return f"{kind}-{interface.replace('.', ':')}"


def interface_of_pin(pin: str) -> str:
    return pin.split("-", 1)[1].replace(":", ".")


@dataclass
class HookStatus:
    """One interface's hook as last seen in the kernel."""

    interface: str
    hook: str                       # "tcx", "tc" or "xdp"
    program_id: int = 0             # ours, 0 when not attached
    error: str | None = None        # why ours is not there
    sharing: list[str] = field(default_factory=list)   # the other programs on the hook

    @property
    def attached(self) -> bool:
        return self.program_id != 0


class Hooks:
    """With `place`, a link found where `attach` does not put it is moved
    once (the configuration changed); without, links stay where they are (an
    agent that has no configuration yet keeps the previous one's order).
    Moving means detach and attach again: the kernel refuses one program
    twice on a hook, so for microseconds the interface runs without it."""

    def __init__(self, pins: PinDir, attach: schema.Attach, place: bool = True) -> None:
        self.pins = pins
        self.attach = attach
        self._placed: set[str] = set() if place else None   # interfaces whose link position was checked
        self.tcx = attach.mode is schema.AttachMode.TCX or (
            attach.mode is schema.AttachMode.AUTO and tcx_supported())
        if attach.mode is schema.AttachMode.TCX and not tcx_supported():
            raise BpfError(errno.EOPNOTSUPP, "attach mode tcx: this kernel has no tcx (Linux 6.6+); "
                                             "use mode auto or tc")

    @property
    def tc_kind(self) -> str:
        return "tcx" if self.tcx else "tc"

    def legacy_slot(self, ifindex: int) -> TcHook:
        return TcHook(ifindex, handle=self.attach.tc_handle, priority=self.attach.tc_priority)

    # ---- TC ingress ----

    def ensure_tc(self, interface: str, program: Program, ours: set[int]) -> HookStatus:
        """Make `program` run on the interface's TC ingress. `ours`: ids of
        programs an earlier agent of this instance attached (replaced here)."""
        status = HookStatus(interface, self.tc_kind)
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            status.error = f"interface {interface} does not exist"
            return status
        try:
            if self.tcx:
                self._ensure_tcx(interface, ifindex, program, status)
                # A clsact filter of an earlier release (or of mode tc) goes once the link is in.
                self._remove_legacy(ifindex, ours | {program.id})
            else:
                self._ensure_legacy(ifindex, program, ours, status)
                self._remove_link(_pin_name("tcx", interface))
        except BpfError as err:
            status.error = str(err)
        return status

    def _ensure_tcx(self, interface: str, ifindex: int, program: Program, status: HookStatus) -> None:
        pin = self.pins.program(_pin_name("tcx", interface))
        link = self._pinned_link(pin, ifindex)
        if link is not None and self._placed is not None and interface not in self._placed:
            if not self._in_place(ifindex, link.info().program_id):
                link.detach()
                link.close()
                os.unlink(pin)
                link = None
                log.info("moving to the configured position", extra={"interface": interface, "hook": "tcx"})
        try:
            if link is None:
                link = Link.tcx(program, ifindex, self._position(ifindex))
                link.pin(pin)
                log.info("attached", extra={"interface": interface, "hook": "tcx", "program_id": program.id})
            elif link.info().program_id != program.id:
                link.update(program)
                log.info("program replaced in place", extra={"interface": interface, "hook": "tcx",
                                                             "program_id": program.id})
        finally:
            if link is not None:
                link.close()
        if self._placed is not None:
            self._placed.add(interface)
        status.program_id = program.id
        status.sharing = [p.describe() + ", tcx" for p in tcx_programs(ifindex) if p.program_id != program.id]
        status.sharing += [p.describe() + ", clsact" for p, _ in legacy_programs(ifindex)]

    def _position(self, ifindex: int) -> Position:
        name = self.attach.before or self.attach.after
        if not name:
            return Position(Order.FIRST if self.attach.order is schema.Order.FIRST else Order.LAST)
        anchor = [p for p in tcx_programs(ifindex) if p.name == name[:15]]
        if not anchor:
            raise BpfError(errno.ENOENT, f"attach.{'before' if self.attach.before else 'after'}: no program "
                                         f"named {name} on tcx ingress (waiting for it)")
        return Position(Order.BEFORE if self.attach.before else Order.AFTER, anchor[0].program_id)

    def _in_place(self, ifindex: int, program_id: int) -> bool:
        ids = [p.program_id for p in tcx_programs(ifindex)]
        names = [p.name for p in tcx_programs(ifindex)]
        at = ids.index(program_id) if program_id in ids else -1
        if self.attach.before:
            return 0 <= at < len(ids) - 1 and names[at + 1] == self.attach.before[:15]
        if self.attach.after:
            return at > 0 and names[at - 1] == self.attach.after[:15]
        return at == (0 if self.attach.order is schema.Order.FIRST else len(ids) - 1)

    def _pinned_link(self, pin: str, ifindex: int) -> Link | None:
        """The pinned link if it still holds this interface; a defunct one is unpinned."""
        if not os.path.exists(pin):
            return None
        link = Link.open_pinned(pin)
        if link.info().ifindex == ifindex:
            return link
        link.close()
        os.unlink(pin)      # the interface it held was deleted (perhaps recreated since)
        return None

    def _ensure_legacy(self, ifindex: int, program: Program, ours: set[int], status: HookStatus) -> None:
        slot = self.legacy_slot(ifindex)
        running = slot.query()
        if running is not None and running not in ours | {program.id}:
            status.error = (f"clsact ingress handle {slot.handle} priority {slot.priority} runs "
                            f"{HookProgram(running, name_of_program(running)).describe()}: not replaced "
                            f"(choose another attach.tcPriority, or mode tcx)")
            return
        if running != program.id:
            slot.attach(program, replace=running is not None)
        for other, at in legacy_programs(ifindex):     # where an earlier tcPriority put it
            if other.program_id in ours | {program.id} and at != slot:
                at.detach()
        status.program_id = program.id
        status.sharing = [p.describe() + ", clsact" for p, _ in legacy_programs(ifindex)
                          if p.program_id != program.id]

    @staticmethod
    def _remove_legacy(ifindex: int, ours: set[int]) -> None:
        """Our clsact filters, at whatever slot an earlier configuration put them."""
        for program, slot in legacy_programs(ifindex):
            if program.program_id in ours:
                slot.detach()

    def _remove_link(self, pin_name: str) -> bool:
        pin = self.pins.program(pin_name)
        if not os.path.exists(pin):
            return False
        with Link.open_pinned(pin) as link:
            link.detach()
        os.unlink(pin)
        return True

    def remove_tc(self, interface: str, ours: set[int]) -> None:
        self._remove_link(_pin_name("tcx", interface))
        try:
            self._remove_legacy(socket.if_nametoindex(interface), ours)
        except OSError:
            pass        # the interface went, and its filters with it

    # ---- XDP ----

    def ensure_xdp(self, interface: str, program: Program, ours: set[int]) -> HookStatus:
        status = HookStatus(interface, "xdp")
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            status.error = f"interface {interface} does not exist"
            return status
        pin = self.pins.program(_pin_name("xdp", interface))
        try:
            link = self._pinned_link(pin, ifindex)
            if link is not None:
                with link:
                    if link.info().program_id != program.id:
                        link.update(program)
                status.program_id = program.id
                return status
            running = XdpHook(ifindex).query()
            if running is not None and running in ours:
                XdpHook(ifindex).detach()     # an earlier release attached it without a link
            elif running is not None:
                status.error = (f"the XDP slot runs {HookProgram(running, name_of_program(running)).describe()}, "
                                f"which synfleet does not own: not replaced; the TC program answers SYNs here")
                status.sharing = [HookProgram(running, name_of_program(running)).describe()]
                return status
            with Link.xdp(program, ifindex) as link:
                link.pin(pin)
            log.info("attached", extra={"interface": interface, "hook": "xdp", "program_id": program.id})
            status.program_id = program.id
        except BpfError as err:
            if err.errno == errno.EOPNOTSUPP:
                status.error = f"{interface} has no native XDP (leave xdp off for it); the TC program answers"
            else:
                status.error = str(err)
        return status

    def remove_xdp(self, interface: str) -> bool:
        return self._remove_link(_pin_name("xdp", interface))

    # ---- what is ours ----

    def linked_interfaces(self, kind: str) -> list[str]:
        """Interfaces with a pinned link of this kind (tcx or xdp), defunct or not."""
        if not self.pins.exists():
            return []
        return sorted(interface_of_pin(n) for n in os.listdir(self.pins.path)
                      if n.startswith(kind + "-") and not n.endswith("-next"))


def legacy_programs(ifindex: int) -> list[tuple[HookProgram, TcHook]]:
    """BPF filters on the interface's clsact ingress, by priority, with their slots."""
    found = []
    with IPRoute() as ipr:
        try:
            filters = ipr.get_filters(index=ifindex, parent=CLSACT_INGRESS)
        except NetlinkError:      # no clsact qdisc
            return []
        slots = {TcHook(ifindex, handle=f["handle"], priority=f["info"] >> 16) for f in filters
                 if f.get_attr("TCA_KIND") == "bpf" and f["handle"]}
    # pyroute2 does not decode TCA_BPF_ID; libbpf's query of each slot gives it.
    for slot in sorted(slots, key=lambda h: (h.priority, h.handle)):
        program_id = _query(slot)
        if program_id is not None:
            found.append((HookProgram(program_id, name_of_program(program_id)), slot))
    return found


def legacy_interfaces_running(programs: set[int]) -> list[str]:
    """Interfaces whose clsact ingress runs one of `programs` (an earlier agent's)."""
    return sorted(name for index, name in socket.if_nameindex()
                  if any(p.program_id in programs for p, _ in legacy_programs(index)))


def detach_everything(pins: PinDir, ours: set[int], ours_xdp: set[int]) -> list[str]:
    """`uninstall`: every hook of this instance, links and filters alike; what went."""
    detached = []
    for pin in sorted(os.listdir(pins.path)) if pins.exists() else []:
        kind = pin.split("-", 1)[0]
        if kind in ("tcx", "xdp") and not pin.endswith("-next"):
            with Link.open_pinned(pins.program(pin)) as link:
                link.detach()
            os.unlink(pins.program(pin))
            detached.append(interface_of_pin(pin) + (" (XDP)" if kind == "xdp" else ""))
    # Filters and netlink XDP programs of an earlier release, or of mode tc.
    for index, name in socket.if_nameindex():
        for program, slot in legacy_programs(index):
            if program.program_id in ours:
                slot.detach()
                detached.append(name)
        try:
            xdp = XdpHook(index).query()
        except BpfError:
            continue
        if xdp in ours_xdp:
            XdpHook(index).detach()
            detached.append(name + " (XDP)")
    return detached


def _query(hook: TcHook) -> int | None:
    try:
        return hook.query()
    except BpfError:
        return None
