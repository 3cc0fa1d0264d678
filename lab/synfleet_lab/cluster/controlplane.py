"""A real Kubernetes control plane: kube-apiserver with an embedded etcd, and
kube-controller-manager; for a cluster with nodes also kube-scheduler and
every default controller.

Two uses: the operator tests run it alone on loopback, the envtest way (the
garbage collector is the only controller, and tests write what kubelets and the
DaemonSet controller would); the lab cluster runs it on the fabric's address
for its kubelets (`nodes=True`: Node authorization, all controllers, the
scheduler). Admin access is a static token in group system:masters;
authorization is RBAC as in any cluster."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from synfleet_lab.cluster.binaries import kube_binaries, kube_tools
from synfleet_lab.cluster.cgroups import joining

ADMIN_TOKEN = "synfleet-test-admin"
SERVICE_CIDR = "10.96.0.0/16"
STOP_TIMEOUT_S = 20


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now. Held open together while they
    are chosen: ports taken one at a time can come back twice (a real flake:
    an operator's metrics and liveness endpoints got the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> int:
    """A port whose next one is free too (etcd's peer port is its client
    port + 1): a flake when a busy machine's connection held the next one."""
    for _ in range(100):
        held = socket.socket()
        try:
            held.bind((host, 0))
            port = held.getsockname()[1]
            if {port, port + 1} & avoid:
                continue
            following = socket.socket()
            try:
                following.bind((host, port + 1))
                return port
            except OSError:
                continue
            finally:
                following.close()
        finally:
            held.close()
    raise OSError(f"no two consecutive free ports on {host}")


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ControlPlane:
    def __init__(self, workdir: Path, address: str = "127.0.0.1", nodes: bool = False,
                 tokens: dict[str, tuple[str, str]] | None = None, cgroup_procs: Path | None = None) -> None:
        """`tokens`: more static tokens, token -> (user, group); `cgroup_procs`:
        a cgroup.procs file every process of the control plane joins."""
        self.workdir = workdir
        self.address = address
        self.nodes = nodes
        self.tokens = tokens or {}
        self.port = free_ports(1, address)[0]
        self._etcd_port = free_port_pair(address, avoid=frozenset({self.port}))
        self.url = f"https://{address}:{self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.ca_file = workdir / "certs" / "apiserver.crt"
        self.tools = kube_tools()
        self.cgroup_procs = cgroup_procs
        self._procs: list[tuple[subprocess.Popen, object]] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        if self.cgroup_procs:
            args = joining(self.cgroup_procs, name, args)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append((proc, log))
        return proc

    def start(self) -> "ControlPlane":
        names = ("kube-apiserver-with-etcd", "kube-controller-manager") + (("kube-scheduler",) if self.nodes else ())
        binaries = kube_binaries(names)
        w = self.workdir
        subprocess.run(["openssl", "genrsa", "-out", w / "sa.key", "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", w / "sa.key", "-pubout", "-out", w / "sa.pub"],
                       check=True, capture_output=True)
        (w / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n' + "".join(
            f'{token},{user},{user},"{group}"\n' for token, (user, group) in self.tokens.items()))
        apiserver = self._spawn("apiserver", [
            str(binaries["kube-apiserver-with-etcd"]), "-etcd-dir", str(w / "etcd"),
            "-etcd-port", str(self._etcd_port), "--",
            "--cert-dir", str(w / "certs"), "--secure-port", str(self.port),
            "--bind-address", self.address, "--advertise-address", self.address,
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(w / "sa.pub"),
            "--service-account-signing-key-file", str(w / "sa.key"),
            "--token-auth-file", str(w / "tokens.csv"),
            "--authorization-mode", "Node,RBAC" if self.nodes else "RBAC",
            *(["--enable-admission-plugins", "NodeRestriction",
               # Node names are not in any DNS here: logs and exec go to the node's address.
               "--kubelet-preferred-address-types", "InternalIP"] if self.nodes else []),
            "--service-cluster-ip-range", SERVICE_CIDR])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited: {(w / 'apiserver.log').read_text()[-3000:]}")
            try:
                if self.ca_file.exists() and self.get("/readyz", raw=True) == b"ok":
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError("kube-apiserver not ready after 120 s")
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        common = ["--kubeconfig", str(self.kubeconfig), "--leader-elect=false", "--secure-port=0"]
        if self.nodes:
            self._spawn("controller-manager", [
                str(binaries["kube-controller-manager"]), *common, "--controllers=*",
                "--root-ca-file", str(self.ca_file), "--service-account-private-key-file", str(w / "sa.key"),
                "--use-service-account-credentials=false", "--service-cluster-ip-range", SERVICE_CIDR])
            self._spawn("scheduler", [str(binaries["kube-scheduler"]), *common])
        else:
            # Only the garbage collector: owner references work as in a
            # cluster, while the tests write DaemonSet status as its controller would.
            self._spawn("controller-manager", [
                str(binaries["kube-controller-manager"]), *common, "--controllers=garbagecollector",
                "--use-service-account-credentials=false"])
        return self

    def stop(self) -> None:
        for proc, log in reversed(self._procs):
            stop_process(proc)
            log.close()
        self._procs.clear()

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            # kube-apiserver writes its self-signed serving certificate and the
            # CA that signed it into --cert-dir on start.
            "clusters": [{"name": "lab", "cluster": {"server": self.url,
                                                     "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "user",
                                                     "namespace": namespace}}]}))
        return path

    # ---- access ----

    def _request(self, method: str, path: str, body: dict | None = None, token: str = ADMIN_TOKEN,
                 content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": content_type})
        ctx = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.read()

    def get(self, path: str, raw: bool = False, token: str = ADMIN_TOKEN):
        data = self._request("GET", path, token=token)
        return data if raw else json.loads(data)

    def post(self, path: str, body: dict) -> dict:
        return json.loads(self._request("POST", path, body))

    def merge_patch(self, path: str, body: dict) -> dict:
        return json.loads(self._request("PATCH", path, body, content_type="application/merge-patch+json"))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        return _tool([str(self.tools["kubectl"]), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
                     input, check, timeout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _tool([str(self.tools["helm"]), "--kubeconfig", str(self.kubeconfig), *args], None, check, None)

    def service_account_token(self, namespace: str, name: str, pod: dict | None = None) -> str:
        """A bound token for the ServiceAccount (TokenRequest), as a pod would
        mount; bound to `pod`, it names the pod's node as the kubelet's does."""
        spec: dict = {"expirationSeconds": 3600}
        if pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                      "uid": pod["metadata"]["uid"]}
        resp = self.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                         {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return resp["status"]["token"]


class ToolFailed(subprocess.CalledProcessError):
    """A kubectl or helm call that failed, with what it said (a bare
    CalledProcessError shows only the exit status)."""

    def __str__(self) -> str:
        return f"{' '.join(self.cmd[:1] + self.cmd[3:])} exited {self.returncode}: {(self.stderr or '').strip()}"


def _tool(cmd: list[str], input: str | None, check: bool, timeout: float | None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, input=input, text=True, capture_output=True, timeout=timeout)
    if check and done.returncode:
        raise ToolFailed(done.returncode, cmd, done.stdout, done.stderr)
    return done
