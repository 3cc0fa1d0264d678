"""Pure-Python reference of the synfleet SYN cookie (the BPF code's twin)."""

from synfleet.cookie.cookie import (
    HASH_BITS,
    TSVAL_BITS,
    WSCALE_NONE,
    CookieAttributes,
    FourTuple,
    cookie_check,
    cookie_make,
    cookie_message,
    current_epoch,
    epoch_bits,
    mss_index,
    salt_in_window,
    synack_tsval,
)
from synfleet.cookie.salts import MasterKey, derive_salt, fresh_key, key_for, salts_for
from synfleet.cookie.siphash import siphash24

__all__ = [
    "HASH_BITS", "TSVAL_BITS", "WSCALE_NONE", "CookieAttributes", "FourTuple", "MasterKey", "cookie_check", "cookie_make",
    "cookie_message", "current_epoch", "derive_salt", "epoch_bits", "fresh_key", "key_for", "mss_index", "salt_in_window",
    "salts_for", "siphash24", "synack_tsval",
]
