"""The Python mirrors of bpf/synfleet.h agree with the C side."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from synfleet import abi
from synfleet.abi import BTF_MIRRORS, Counter
from synfleet.bpf import BpfObject, object_path

HEADER = Path(__file__).resolve().parents[1] / "bpf" / "synfleet.h"


def test_counter_enum_matches_the_c_header_name_for_name_in_order():
    body = re.search(r"enum sf_counter \{(.*?)\};", HEADER.read_text(), re.S).group(1)
    names = re.findall(r"SF_CTR_([A-Z_]+),", body)
    assert names[-1] == "MAX"
    assert names[:-1] == [c.name for c in Counter]


def test_every_limit_and_flag_the_python_side_mirrors_has_the_c_headers_value():
    defines = {name: int(value.rstrip("u"), 0) for name, value in
               re.findall(r"#define SF_(\w+) (0x[0-9a-fA-F]+u?|\d+)\b", HEADER.read_text())}
    mirrored = {name: getattr(abi, name) for name in defines if hasattr(abi, name)}
    assert {"MAX_POLICIES", "MAX_TABLES", "RING_SIZE", "MAX_BACKENDS", "ENCAP_F_CHAINED"} <= set(mirrored)
    assert mirrored == {name: defines[name] for name in mirrored}


def test_struct_mirrors_have_the_sizes_the_objects_btf_gives(unit_netns):
    for program in ("proxy", "backend"):
        obj = BpfObject(object_path(program))
        try:
            for name, mirror in BTF_MIRRORS.items():
                if name in ("sf_salt", "sf_ring_slot") and program == "backend":
                    continue  # the backend never holds salts or backend tables
                assert obj.btf_struct_size(name) == ctypes.sizeof(mirror), (program, name)
        finally:
            obj.close()
