# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target agent    -t ghcr.io/synfleet/agent:0.1.0 .
#   docker build --target operator -t ghcr.io/synfleet/operator:0.1.0 .
# The stages run the same steps as scripts/setup.sh (make -C bpf, pip install .),
# which CI runs on every change; tests/test_images.py checks that the files
# these COPY lines bring in are enough to build the package with its BPF objects.

# ---- BPF objects (CO-RE: vmlinux.h from the build host's BTF, types only) ----
FROM debian:bookworm-slim AS bpf
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev bpftool make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY bpf/ bpf/
ARG VMLINUX_BTF=/sys/kernel/btf/vmlinux
RUN make -C bpf VMLINUX_BTF=${VMLINUX_BTF}

# ---- the Python package, with the objects inside ----
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY --from=bpf /src/operator/synfleet/bpf/objects/ operator/synfleet/bpf/objects/
RUN pip install --no-cache-dir --prefix=/install .

# ---- node agent: runs as root with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (set by the DaemonSet) ----
FROM python:3.11-slim-bookworm AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends libbpf1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
ENTRYPOINT ["synfleet"]
CMD ["agent", "--help"]

# ---- operator: no privileges at all ----
FROM python:3.11-slim-bookworm AS operator
COPY --from=build /install /usr/local
USER 65532:65532
ENTRYPOINT ["synfleet"]
CMD ["operator"]
