"""No Docker engine runs here, so the images are checked by running their build
steps: the files the Dockerfile's COPY lines bring in (minus .dockerignore)
must be enough to build the BPF objects and a package that carries them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from synfleet_lab.testbed.netns import home_namespace

ROOT = Path(__file__).resolve().parent.parent


def copied_from_context() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line)
        if m:
            sources += m.group(1).split()
    return sources


def test_dockerfile_build_steps_produce_a_package_with_the_bpf_objects(tmp_path):
    ignored = shutil.ignore_patterns("__pycache__", "*.egg-info", "objects")   # as .dockerignore
    context = tmp_path / "context"
    for src in copied_from_context():
        path = ROOT / src
        assert path.exists(), f"Dockerfile copies {src}, which is not in the repository"
        if path.is_dir():
            shutil.copytree(path, context / src, ignore=ignored)
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(path, context / src)
    # The bpf stage, then the package stage (as a wheel, to look inside).
    subprocess.run(["make", "-s", "-C", str(context / "bpf")], check=True)
    # pip fetches the build backend (setuptools) as `docker build` would.
    with home_namespace():
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", str(tmp_path / "wheel"), str(context)], check=True)
    (wheel,) = (tmp_path / "wheel").glob("synfleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if n.endswith(".bpf.o")} == {
        f"synfleet/bpf/objects/{p}.bpf.o" for p in ("proxy", "proxy_xdp", "backend")}
    assert "synfleet/operator/handlers.py" in names and "synfleet/agent/sources.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "synfleet = synfleet.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # The product only: no lab module, no lab dependency.
    lab = [n for n in names if n.startswith("synfleet_lab") or
           any(part in ("testbed", "bench", "demo.py", "check.py", "net") for part in n.split("/"))]
    assert not lab, f"lab files in the product wheel: {lab}"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = {r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert runtime == {"pydantic", "PyYAML", "prometheus-client", "kopf", "kubernetes"}


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for src in copied_from_context():
        assert src.rstrip("/") not in ignored, f"{src} is copied but .dockerignore drops it"
