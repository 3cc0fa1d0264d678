#!/usr/bin/env bash
# Installs everything synfleet needs on a fresh Debian/Ubuntu machine, idempotently
# and without prompts, then builds the BPF objects. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(clang llvm libbpf-dev bpftool iproute2 make python3-pip openssl netsniff-ng nftables
          nginx-light wrk buildah debootstrap containerd runc containernetworking-plugins iptables
          gcc libc6-dev prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The product, and the lab (testbeds, demo, check, benchmarks) beside it.
python3 -m pip install -q --disable-pip-version-check -e ".[test]" -e ./lab 2>&1 \
  | grep -v "Running pip as the 'root' user" || true
make -s -C bpf
make -s -C lab/bpf
