#!/usr/bin/env bash
# Installs what building, testing, the demo and the benchmark need on Debian/Ubuntu.
# Idempotent: only missing packages are installed; `apt-get update` runs at most once.
set -euo pipefail

# openssl: certificates of the test control plane; iptables: the tests' Service stand-in (DNAT).
pkgs=(clang clang-format llvm libbpf-dev linux-libc-dev iproute2 iperf3 bpftool containernetworking-plugins pkg-config openssl iptables)
# `deps.sh guest`: also what the guest lab needs (qemu guests with other kernels): qemu,
# a static busybox for the guest's userland and cpio for its initramfs.
if [ "${1:-}" = guest ]; then
  pkgs+=(qemu-system-x86 busybox-static cpio)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing packages: ${missing[*]}; run make as root (with sudo where you are not) to install them" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo not found; install Rust (rustup or Debian's cargo, rustc >= 1.89)" >&2
  exit 1
fi
