"""The lab's own BPF objects (lab/bpf/*.bpf.c), built by `make -C lab/bpf` into
this package; the product's programs come from synfleet.bpf."""

from __future__ import annotations

from pathlib import Path

from synfleet.bpf import object_path

LAB_OBJECTS_DIR = Path(__file__).resolve().parent / "objects"


def lab_object(program: str) -> Path:
    """Path of a lab program's object (syngen, sink, reflect, xdp_reflect, xdp_pass, cni_count, bench)."""
    return object_path(program, LAB_OBJECTS_DIR)
