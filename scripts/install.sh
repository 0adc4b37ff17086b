#!/usr/bin/env bash
# Install what uniframe needs on a fresh Debian (bookworm) machine, as root.
# Idempotent: packages already present are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils         # microVMs and full VMs
  runc iproute2 nftables debootstrap # containers, their networks and ports, the Debian baseline
  linux-source-6.1 bc flex bison libelf-dev libssl-dev build-essential  # the tailored kernel
  cpio lz4 zstd gzip squashfs-tools  # unikernel roots: initramfs compression, squashfs disks
  e2fsprogs fdisk dosfstools mtools syslinux syslinux-common xorriso  # VM disks, cloud-init seeds
  wrk curl                           # benchmarks and demos
  postgresql                         # the control plane's PostgreSQL backend (tests start their own server)
  openssl                            # TLS certificates for the daemon's TCP listener (tests make a self-signed one)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

extras="${1:-build}"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[${extras}]"
