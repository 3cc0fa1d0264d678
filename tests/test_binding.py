"""The libbpf binding: errors carry errno and the verifier log; pinned maps
re-open with their contents; a TC slot is replaced atomically."""

from __future__ import annotations

import ctypes
import os
import tempfile

import pytest

from synfleet.bpf import BpfError, BpfObject, Map
from synfleet.dataplane.programs import ProxyDataplane


def test_opening_a_missing_object_raises_with_errno(unit_netns):
    with pytest.raises(BpfError) as e:
        BpfObject("/nonexistent/proxy.bpf.o")
    assert e.value.errno == 2


def test_pinned_map_reopens_with_its_contents(unit_netns):
    with ProxyDataplane() as dp, tempfile.TemporaryDirectory(dir="/sys/fs/bpf") as d:
        dp.counters.raw.update(bytes(ctypes.c_uint32(0)), bytes(ctypes.c_uint64(41)))
        path = os.path.join(d, "counters")
        dp.map("counters").pin(path)
        again = Map.open_pinned(path)
        try:
            assert [int.from_bytes(v, "little") for v in again.lookup_per_cpu(bytes(4))][0] == 41
        finally:
            again.close()
            os.unlink(path)  # unpin


def test_attach_replaces_the_program_in_place(unit_netns):
    with ProxyDataplane() as first, ProxyDataplane() as second:
        hook = first.attach("sf1")
        try:
            first_id = hook.query()
            second.attach("sf1")
            assert hook.query() not in (None, first_id)
        finally:
            hook.detach()
            hook.destroy_clsact()
        assert hook.query() is None
