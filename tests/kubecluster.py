"""The operator tests' Kubernetes: the lab's control plane (kube-apiserver with
an embedded etcd, and the garbage collector) alone on loopback, the envtest
way: no kubelet, scheduler or other controllers run, so tests write what those
would (Node objects, DaemonSet status) themselves; and `synfleet operator` as a
local process with the chart's ServiceAccount."""

from __future__ import annotations

from synfleet_lab.cluster.binaries import kube_tools
from synfleet_lab.cluster.controlplane import ControlPlane as KubeCluster
from synfleet_lab.cluster.controlplane import free_ports
from synfleet_lab.cluster.operator import OperatorProcess

__all__ = ["KubeCluster", "OperatorProcess", "free_port", "free_ports", "kube_tools"]


def free_port() -> int:
    return free_ports(1)[0]
