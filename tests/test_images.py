"""The container images: both Dockerfile targets built for real with buildah on
base images made here with debootstrap (no registry is reachable), then run;
and the product wheel the images carry, built from exactly the files the
Dockerfile's COPY lines bring in (minus .dockerignore)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from synfleet_lab.cluster.images import ImageBuilder
from synfleet_lab.testbed.netns import home_namespace

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SYNFLEET_CACHE", Path.home() / ".cache" / "synfleet"))


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
    assert runtime == {"pydantic", "PyYAML", "aiohttp", "prometheus-client", "kopf", "kubernetes", "pyroute2"}


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for src in copied_from_context():
        assert src.rstrip("/") not in ignored, f"{src} is copied but .dockerignore drops it"


@pytest.fixture(scope="module")
def images(lab_images):
    return ImageBuilder(CACHE, ROOT), {"agent": lab_images.agent, "operator": lab_images.operator}


def test_both_targets_build_with_buildah_on_local_base_images_and_export_for_containerd(images):
    builder, built = images
    assert {t: i.ref for t, i in built.items()} == {"agent": "localhost/synfleet/agent:lab",
                                                    "operator": "localhost/synfleet/operator:lab"}
    for image in built.values():
        with tarfile.open(image.archive) as oci:
            assert "index.json" in oci.getnames() and "oci-layout" in oci.getnames()


def test_the_agent_image_runs_the_agent_with_libbpf(images):
    builder, built = images
    ref = built["agent"].ref
    config = builder.config(ref)
    assert config["Entrypoint"] == ["synfleet"] and not config.get("User")
    r = builder.run(ref, "synfleet", "agent", "--help")
    assert r.returncode == 0 and "--kubernetes" in r.stdout, r.stderr
    r = builder.run(ref, "python3", "-c", "import ctypes, synfleet.bpf.libbpf, synfleet.agent.agent;"
                                          "ctypes.CDLL('libbpf.so.1'); print('ok')")
    assert r.stdout.strip() == "ok", r.stderr
    r = builder.run(ref, "nft", "--version")       # backends' conntrack exemption (agent/notrack.py)
    assert r.returncode == 0 and r.stdout.startswith("nftables"), r.stderr
    # The objects are inside, compiled for this kernel's BTF at build time.
    r = builder.run(ref, "sh", "-c", "ls /opt/synfleet/lib/python3*/site-packages/synfleet/bpf/objects/")
    assert {"proxy.bpf.o", "proxy_xdp.bpf.o", "backend.bpf.o"} <= set(r.stdout.split()), r.stderr


def test_the_operator_image_runs_unprivileged_and_carries_no_lab(images):
    builder, built = images
    ref = built["operator"].ref
    config = builder.config(ref)
    assert config["User"] == "65532:65532" and config["Cmd"] == ["operator"]
    r = builder.run(ref, "synfleet", "operator", "--help", user="65532:65532")
    assert r.returncode == 0 and "--teardown-timeout" in r.stdout, r.stderr
    r = builder.run(ref, "python3", "-c", "import synfleet.operator.handlers, kopf; import synfleet_lab",
                    user="65532:65532")
    assert "No module named 'synfleet_lab'" in r.stderr
