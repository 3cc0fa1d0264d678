"""The libbpf ctypes binding and the compiled data-plane objects."""

from synfleet.bpf.libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    BpfError,
    BpfObject,
    Map,
    Program,
    RunStatistics,
    TcHook,
    TestRun,
    TypedMap,
    XdpHook,
    possible_cpus,
    run_statistics_enabled,
)
from synfleet.bpf.objects import object_path

__all__ = [
    "BPF_TC_EGRESS", "BPF_TC_INGRESS", "BpfError", "BpfObject", "Map", "Program", "RunStatistics",
    "TcHook", "TestRun", "TypedMap", "XdpHook", "object_path", "possible_cpus", "run_statistics_enabled",
]
