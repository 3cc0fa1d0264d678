"""Backend table generations for daisy chaining (Beamer, NSDI 2018): when a
backend set changes, each Maglev slot whose backend changed keeps the
backend it had as its *previous* one for the set's drain period. The
proxy names that previous backend in the encapsulation of every segment that
is not a handshake; a current backend with no socket for the flow hands the
segment on to it (bpf/backend.bpf.c). No per-flow state anywhere: one
previous backend per slot, one hop.

Pure: the proxy's Dataplane writes what `next_table` returns into its
maglev_slots map.
"""

from __future__ import annotations

from dataclasses import dataclass

from synfleet.config.schema import IPAddress


@dataclass(frozen=True)
class Previous:
    backend: IPAddress
    until: float        # time.monotonic() deadline


@dataclass(frozen=True)
class SlotTable:
    """One backend set's Maglev table: per slot, its backend and (while a drain
    period lasts) the backend it had before."""

    current: tuple[IPAddress, ...]
    previous: tuple[Previous | None, ...]

    def previous_at(self, now: float) -> list[IPAddress | None]:
        return [p.backend if p and p.until > now else None for p in self.previous]

    def next_expiry(self, now: float) -> float | None:
        """When the earliest previous backend still named stops being named."""
        left = [p.until for p in self.previous if p and p.until > now]
        return min(left) if left else None


def next_table(old: SlotTable | None, current: list[IPAddress], now: float,
               drain_s: float) -> SlotTable:
    """The table after a (possible) change of backend set from `old` to
    `current` at `now`. A slot that changed names its old backend until
    now + drain_s; a slot that did not keeps the previous backend it had, if
    still in its period. A slot that changed twice within a period names the
    most recent one only: flows two changes old are lost (one hop)."""
    if old is None or len(old.current) != len(current):
        return SlotTable(tuple(current), (None,) * len(current))
    previous = []
    for new, was, prev in zip(current, old.current, old.previous):
        if new != was and drain_s > 0:
            previous.append(Previous(was, now + drain_s))
        elif prev is not None and prev.until > now and prev.backend != new:
            previous.append(prev)
        else:
            previous.append(None)
    return SlotTable(tuple(current), tuple(previous))
