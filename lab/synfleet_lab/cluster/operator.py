"""`synfleet operator` as a local process beside a ControlPlane, authenticated
as the chart's ServiceAccount: it can do exactly what the chart's RBAC lets it
do. The operator tests and `synfleet bench operator` run it so."""

from __future__ import annotations

import os
import subprocess
import urllib.request

from synfleet_lab.cluster.controlplane import ControlPlane, free_ports


class OperatorProcess:
    """`synfleet operator` as a local process, authenticated as the chart's
    ServiceAccount: it can do exactly what the chart's RBAC lets it do."""

    def __init__(self, cluster: ControlPlane, namespace: str, service_account: str, peering: str,
                 name: str = "operator", teardown_timeout_s: float = 120.0) -> None:
        self.cluster = cluster
        self.log_path = cluster.workdir / f"{name}.log"
        token = cluster.service_account_token(namespace, service_account)
        kubeconfig = cluster.write_kubeconfig(cluster.workdir / f"{name}.kubeconfig", token, namespace)
        self.metrics_port, liveness_port = free_ports(2)
        self.liveness = f"http://127.0.0.1:{liveness_port}/healthz"
        self.args = ["python3", "-m", "synfleet.cli", "operator", "--namespace", namespace,
                     "--agent-image", "ghcr.io/synfleet/agent:test", "--peering", peering,
                     "--metrics-port", str(self.metrics_port), "--liveness", self.liveness,
                     "--teardown-timeout", str(teardown_timeout_s)]
        # kopf names its peering entry after POD_ID (the chart sets the pod's name).
        self.peer_id = f"{name}-{free_ports(1)[0]}"
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_ID": self.peer_id}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self._proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        """The /metrics page; empty while the process is not serving it."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    def metric(self, sample: str) -> float:
        """The value of one sample line, e.g. 'synfleet_operator_renders_total'; 0 when absent."""
        for line in self.metrics().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        if self.running():
            if kill:
                self._proc.kill()
            else:
                self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None:
            self._log.close()
            self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running() else None
