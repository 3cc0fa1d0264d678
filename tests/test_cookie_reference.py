"""The pure-Python reference: SipHash against published
vectors, cookie bit layout, epoch window and forgery odds."""

from __future__ import annotations

import ipaddress
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synfleet.cookie import (
    HASH_BITS,
    TSVAL_BITS,
    CookieAttributes,
    FourTuple,
    cookie_check,
    cookie_make,
    derive_salt,
    fresh_key,
    salts_for,
    siphash24,
    synack_tsval,
)
from synfleet.dataplane.flow import maglev_table

KEY = bytes(range(16))
T4 = FourTuple(ipaddress.ip_address("198.18.1.7"), ipaddress.ip_address("198.19.0.10"), 40000, 80)


def test_siphash24_matches_the_papers_vectors():
    # Aumasson & Bernstein, "SipHash: a fast short-input PRF", appendix A and vectors.h.
    assert siphash24(KEY, b"") == 0x726FDB47DD0E0E31
    assert siphash24(KEY, bytes(range(15))) == 0xA129CA6149BE45E5


@given(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 14)), st.booleans(), st.booleans(),
       st.integers(0, 2**32 - 1), st.integers(0, 2**40))
def test_cookie_low_bits_carry_the_attributes_and_epoch(mss, ws, sack, ecn, isn, epoch):
    attrs = CookieAttributes(mss, ws, sack, ecn)
    cookie = cookie_make(KEY, epoch, T4, isn, attrs)
    assert CookieAttributes.from_cookie(cookie) == attrs
    assert (cookie >> 8) & 3 == epoch & 3


def test_epoch_window_is_previous_current_next():
    salts = {e: secrets.token_bytes(16) for e in (9, 10, 11)}
    for minted in (9, 10, 11):
        cookie = cookie_make(salts[minted], minted, T4, 1, CookieAttributes(0, None, False, False))
        assert cookie_check(salts, 10, T4, 1, cookie)
        assert not cookie_check(salts, minted + 2, T4, 1, cookie)


def test_forgery_odds_are_two_to_the_minus_twenty_two():
    """22 hash bits are checked: random cookies pass about 1 in 4 million
    times per epoch-bits value. Measure it on 2**16 guesses with the hash cut
    to its bits: none of them may match more often than chance allows."""
    assert HASH_BITS == 22
    salts = {10: secrets.token_bytes(16)}
    hits = sum(cookie_check(salts, 10, T4, 1, secrets.randbits(32)) for _ in range(1 << 16))
    assert hits <= 2  # expected 2**16 / 2**22 / 4 ≈ 0.004


def test_a_timestamped_cookie_checks_all_tsecr_bits_and_the_options_presence():
    salts = {10: secrets.token_bytes(16)}
    attrs = CookieAttributes(1, 7, True, False)
    cookie = cookie_make(salts[10], 10, T4, 5, attrs, timestamps=True)
    tsval = synack_tsval(salts[10], 10, T4, 5, cookie)
    assert TSVAL_BITS == 32 and cookie_check(salts, 10, T4, 5, cookie, tsval)
    assert not any(cookie_check(salts, 10, T4, 5, cookie, tsval ^ 1 << bit) for bit in range(TSVAL_BITS))
    assert not cookie_check(salts, 10, T4, 5, cookie)      # the option stripped
    # The same SYN answered without timestamps gets another cookie (presence is hashed).
    assert cookie_make(salts[10], 10, T4, 5, attrs) != cookie


def test_maglev_spreads_evenly_and_moves_little_when_a_backend_leaves():
    names = [f"10.0.0.{i}" for i in range(10)]
    table = maglev_table(names)
    counts = [table.count(i) for i in range(10)]
    assert max(counts) - min(counts) <= len(table) * 0.02
    smaller = maglev_table(names[:-1])
    moved = sum(1 for a, b in zip(table, smaller) if names[a] != names[:-1][b] and a != 9)
    assert moved / len(table) < 0.1


def test_attributes_reject_out_of_range_values():
    with pytest.raises(ValueError):
        CookieAttributes(4, None, False, False)
    with pytest.raises(ValueError):
        CookieAttributes(0, 15, False, False)


def test_every_proxy_derives_the_same_salt_per_epoch_from_the_generation_in_force():
    old, new = fresh_key(1, 10), fresh_key(2, 20)
    salts = salts_for([new, old], range(8, 23))
    assert sorted(salts) == list(range(10, 23))       # nothing before the first generation
    assert salts[19] == derive_salt(old.key, 1, 19) and salts[20] == derive_salt(new.key, 2, 20)
    assert salts == salts_for([old, new], range(8, 23))
    assert len(set(salts.values())) == len(salts) and all(len(s) == 16 for s in salts.values())
    # The generation is part of the input: the same key under another generation gives other salts.
    assert derive_salt(old.key, 1, 12) != derive_salt(old.key, 2, 12)
