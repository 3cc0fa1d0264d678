"""Where the compiled BPF objects live: inside the package, built by `make -C bpf`."""

from __future__ import annotations

from pathlib import Path

OBJECTS_DIR = Path(__file__).resolve().parent / "objects"


def object_path(program: str, directory: Path | str | None = None) -> Path:
    """Path of `proxy` or `backend`'s object (in `directory`, by default the
    package's own); a clear error if it was never built."""
    path = Path(directory or OBJECTS_DIR) / f"{program}.bpf.o"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: build it with `make -C bpf` (the lab's: `make -C lab/bpf`) "
            "(scripts/setup.sh does it)")
    return path
