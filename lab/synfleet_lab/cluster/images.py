"""synfleet's container images, built for real where no registry is reachable.

Base image: a Debian bookworm root filesystem made with `debootstrap
--variant=minbase` from the machine's own Debian mirror (python3, its venv
module, CA certificates), trusting what this machine trusts (its CA bundle and
pip's `cert` setting, so that builds behind a TLS-inspecting proxy reach PyPI),
imported into buildah. It is cached under the cache directory by a digest of
everything that goes into it.

Images: both targets of the project's Dockerfile (`agent`, `operator`), built
with buildah from the repository as the build context, with only the base
images passed as build arguments (DEBIAN_IMAGE, PYTHON_IMAGE), and exported as
OCI archives that a node's containerd imports (`ctr images import`). For the
lab cluster two more: the pod sandbox (`pause`, a static program of ours: no
registry.k8s.io here) and a web server for backend pods (`web`: Debian's nginx).

Everything lives in one buildah storage under the cache directory; nothing is
pulled and nothing is pushed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TARGETS = ("agent", "operator")
REPOSITORY = "localhost/synfleet"
HERE = Path(__file__).resolve().parent


def debian_mirror() -> str:
    """The machine's own Debian mirror (deb822 sources or the classic list)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _digest(paths: list[Path], extra: str) -> str:
    """Of the files under `paths` that a build copies (not bytecode, egg-info
    or the BPF objects the build makes itself)."""
    h = hashlib.sha256(extra.encode())
    for top in paths:
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for f in files:
            if f.is_file() and not {"__pycache__", "objects"} & set(f.parts) and \
                    not any(part.endswith(".egg-info") for part in f.parts):
                h.update(str(f.relative_to(top.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Image:
    target: str
    ref: str            # what the chart's image values name: repository:tag
    archive: Path       # OCI archive of the image, for containerd


class ImageBuilder:
    def __init__(self, cache: Path, context: Path, tag: str = "lab") -> None:
        self.cache = cache
        self.context = context
        self.tag = tag
        self.storage = cache / "buildah"
        # buildah's run state (locks, mounts of running builds) must not outlive the machine.
        self.runroot = Path(tempfile.gettempdir()) / f"synfleet-buildah-{os.getuid()}"

    def _cmd(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.storage), "--runroot", str(self.runroot),
                "--storage-driver", "overlay", *args]

    def _buildah(self, *args: str, capture: bool = False) -> str:
        cmd = self._cmd(*args)
        r = subprocess.run(cmd, check=False, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
        return r.stdout.strip() if capture else ""

    # ---- the base image ----

    def _base_digest(self) -> str:
        parts = [SUITE, *BASE_PACKAGES, debian_mirror()]
        h = hashlib.sha256("\n".join(parts).encode())
        h.update(HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b"")
        return h.hexdigest()[:12]

    def base_image(self) -> str:
        """The local base image (built once per digest): its reference."""
        ref = f"{REPOSITORY}-base/debian:{SUITE}-{self._base_digest()}"
        if self._buildah("images", "--quiet", "--filter", f"reference={ref}", capture=True):
            return ref
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                            str(rootfs), debian_mirror()], check=True, capture_output=True)
            for junk in (rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"):
                for entry in junk.glob("*"):
                    if entry.is_file():
                        entry.unlink()
            if HOST_CA_BUNDLE.exists():
                shutil.copy(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
                (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
            layer = Path(tmp) / "rootfs.tar"
            with tarfile.open(layer, "w") as tar:
                tar.add(rootfs, arcname=".")
            container = self._buildah("from", "--quiet", "scratch", capture=True)
            try:
                self._buildah("add", container, str(layer), "/")
                self._buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                              "--cmd", "/bin/bash", container)
                self._buildah("commit", "--quiet", container, ref)
            finally:
                self._buildah("rm", container)
        return ref

    # ---- the project's images ----

    def build(self, target: str) -> Image:
        """Build one Dockerfile target from the repository and export it."""
        inputs = [self.context / p for p in ("Dockerfile", "pyproject.toml", "README.md", "bpf", "operator")]
        return self._bud(target, self.context / "Dockerfile", self.context, inputs, target)

    def _bud(self, name: str, dockerfile: Path, context: Path, inputs: list[Path],
             target: str | None = None) -> Image:
        """Build unless the exported archive was made from the same inputs."""
        base = self.base_image()
        ref = f"{REPOSITORY}/{name}:{self.tag}"
        digest = _digest([dockerfile, *inputs], f"{base} {target}")
        archive = self.cache / "images" / f"{name}-{self.tag}.oci.tar"
        stamp = archive.with_suffix(".digest")
        if archive.exists() and stamp.exists() and stamp.read_text() == digest and \
                self._buildah("images", "--quiet", "--filter", f"reference={ref}", capture=True):
            return Image(name, ref, archive)
        self._buildah("bud", "--isolation", "chroot", "--network", "host", "--layers=false", "--quiet",
                      "--build-arg", f"DEBIAN_IMAGE={base}", "--build-arg", f"PYTHON_IMAGE={base}",
                      *(["--target", target] if target else []), "--tag", ref, "--file", str(dockerfile),
                      str(context))
        image = self._export(name, ref)
        stamp.write_text(digest)
        return image

    def _export(self, name: str, ref: str) -> Image:
        archive = self.cache / "images" / f"{name}-{self.tag}.oci.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        self._buildah("push", "--quiet", ref, f"oci-archive:{archive}:{ref}")
        return Image(name, ref, archive)

    def pause(self) -> Image:
        """The pod sandbox image: pause.c, statically linked, alone in the image."""
        ref = f"{REPOSITORY}/pause:{self.tag}"
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            binary = Path(tmp) / "pause"
            subprocess.run(["gcc", "-static", "-Os", "-o", str(binary), str(HERE / "pause.c")],
                           check=True, capture_output=True)
            container = self._buildah("from", "--quiet", "scratch", capture=True)
            try:
                self._buildah("copy", container, str(binary), "/pause")
                self._buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container)
                self._buildah("commit", "--quiet", container, ref)
            finally:
                self._buildah("rm", container)
        return self._export("pause", ref)

    def web(self) -> Image:
        """A web server for the lab's backend pods: Debian's nginx."""
        return self._bud("web", HERE / "web.Dockerfile", HERE, [])

    def build_all(self) -> dict[str, Image]:
        built = {target: self.build(target) for target in TARGETS}
        self._buildah("rmi", "--prune")     # the images these tags named before: the cache stays bounded
        return built

    def run(self, ref: str, *command: str, user: str | None = None) -> subprocess.CompletedProcess:
        """`command` in a throw-away container of the image (buildah's chroot
        isolation: a smoke test of the image's contents, not of a runtime)."""
        container = self._buildah("from", "--quiet", "--pull=never", ref, capture=True)
        try:
            return subprocess.run(self._cmd("run", "--isolation", "chroot", *(["--user", user] if user else []),
                                            container, "--", *command), check=False, text=True, capture_output=True)
        finally:
            self._buildah("rm", container)

    def config(self, ref: str) -> dict:
        """The image's OCI configuration (Entrypoint, Cmd, Env, User, ...)."""
        return json.loads(self._buildah("inspect", "--type", "image", ref, capture=True))["OCIv1"]["config"]
