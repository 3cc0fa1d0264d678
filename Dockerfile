# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target agent    -t ghcr.io/synfleet/agent:0.1.0 .
#   docker build --target operator -t ghcr.io/synfleet/operator:0.1.0 .
# The stages run the same steps as scripts/setup.sh (make -C bpf, pip install .);
# tests/test_images.py builds both targets for real with buildah, on base images
# made locally with debootstrap, and runs them.

# Base images: the defaults come from Docker Hub; where no registry is reachable
# build them locally and pass them in (the lab does: synfleet_lab.cluster.images).
# Any Debian bookworm with python3 and its venv module will do for PYTHON_IMAGE.
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- BPF objects (CO-RE: vmlinux.h from the build host's BTF, types only) ----
FROM ${DEBIAN_IMAGE} AS bpf
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev bpftool make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY bpf/ bpf/
ARG VMLINUX_BTF=/sys/kernel/btf/vmlinux
RUN make -C bpf VMLINUX_BTF=${VMLINUX_BTF}

# ---- the Python package, with the objects inside, in a virtual environment ----
# (a venv lives at the same path whichever Python the base image has, and its
# bytecode is compiled here: the containers' root filesystems are read-only)
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY --from=bpf /src/operator/synfleet/bpf/objects/ operator/synfleet/bpf/objects/
RUN python3 -m venv /opt/synfleet \
 && /opt/synfleet/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/synfleet/bin/python -m compileall -q /opt/synfleet

# ---- node agent: runs as root with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (set by the DaemonSet) ----
# nftables: backends exempt their protected services from connection tracking (agent/notrack.py).
FROM ${PYTHON_IMAGE} AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends libbpf1 nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/synfleet /opt/synfleet
ENV PATH=/opt/synfleet/bin:$PATH PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["synfleet"]
CMD ["agent", "--help"]

# ---- operator: no privileges at all ----
FROM ${PYTHON_IMAGE} AS operator
COPY --from=build /opt/synfleet /opt/synfleet
ENV PATH=/opt/synfleet/bin:$PATH PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
ENTRYPOINT ["synfleet"]
CMD ["operator"]
