"""Backend table generations (synfleet.dataplane.generations): which previous
backend each Maglev slot names, and until when. Pure: the BPF side is in
tests/test_proxy_ack.py and tests/test_backend.py."""

from __future__ import annotations

import ipaddress

from synfleet.dataplane.generations import Previous, SlotTable, next_table

A, B, C = (ipaddress.ip_address(f"198.18.0.{i}") for i in (1, 2, 3))


def test_the_first_table_names_no_previous_backend():
    t = next_table(None, [A, B, A], now=0, drain_s=300)
    assert t.previous_at(0) == [None, None, None] and t.next_expiry(0) is None


def test_a_slot_that_changed_names_its_old_backend_for_the_drain_period():
    t = next_table(SlotTable((A, B, A), (None,) * 3), [A, C, C], now=10, drain_s=300)
    assert t.previous_at(10) == [None, B, A]
    assert t.next_expiry(10) == 310
    assert t.previous_at(310) == [None, None, None]


def test_an_unchanged_slot_keeps_its_previous_backend_until_its_own_period_ends():
    first = next_table(SlotTable((A, B), (None, None)), [A, C], now=0, drain_s=300)
    second = next_table(first, [B, C], now=100, drain_s=300)      # slot 0 changes now, slot 1 did before
    assert second.previous == (Previous(A, 400), Previous(B, 300))
    assert next_table(second, [B, C], now=350, drain_s=300).previous_at(350) == [A, None]


def test_a_slot_that_changes_twice_names_only_the_most_recent_backend():
    first = next_table(SlotTable((A,), (None,)), [B], now=0, drain_s=300)
    assert next_table(first, [C], now=5, drain_s=300).previous == (Previous(B, 305),)


def test_a_slot_that_returns_to_its_previous_backend_names_the_one_it_leaves():
    first = next_table(SlotTable((A,), (None,)), [B], now=0, drain_s=300)
    assert next_table(first, [A], now=5, drain_s=300).previous == (Previous(B, 305),)


def test_no_drain_period_names_nobody():
    assert next_table(SlotTable((A, B), (None, None)), [C, C], now=0, drain_s=0).previous == (None, None)
