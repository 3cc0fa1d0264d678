"""The libbpf binding: errors carry errno and the verifier log; pinned maps
re-open with their contents; a TC slot is replaced atomically."""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile

import pytest

from synfleet.abi import Counter
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


def test_an_upgrade_replaces_a_pinned_counters_map_it_outgrew_and_keeps_the_others(unit_netns):
    """An agent of a release with fewer counters pinned a smaller `counters`
    map: the new object must not run on it (its new counters would never count)."""
    with tempfile.TemporaryDirectory(dir="/sys/fs/bpf") as d:
        with ProxyDataplane() as old:
            old.pin_maps(d)
        os.unlink(os.path.join(d, "counters"))
        subprocess.run(["bpftool", "map", "create", os.path.join(d, "counters"), "type", "percpu_array",
                        "key", "4", "value", "8", "entries", "22", "name", "counters"], check=True)
        with ProxyDataplane(pins=d) as new:
            assert "counters" not in new.reused and "services" in new.reused
            new.pin_maps(d)
            new.counters.raw.update(bytes(ctypes.c_uint32(len(Counter) - 1)), bytes(ctypes.c_uint64(7)))
            pinned = Map.open_pinned(os.path.join(d, "counters"))
            try:
                assert pinned.max_entries == new.obj.map_max_entries("counters") >= len(Counter)
                assert int.from_bytes(pinned.lookup_per_cpu(bytes(ctypes.c_uint32(len(Counter) - 1)))[0],
                                      "little") == 7
            finally:
                pinned.close()
