#!/usr/bin/env bash
# Installs what building and testing banger needs on a Debian/Ubuntu host.
# Idempotent: packages already present are not reinstalled.
# Recommended packages are not installed: qemu-system-x86's (GTK/SDL/audio
# front ends, OVMF, qemu-utils, block drivers) are not used by banger's
# headless microvm QEMU, which loads no module beyond accel-tcg. What a
# recommendation brought that banger does need is named below:
# debian-archive-keyring (debootstrap verifies the mirror with it) and
# netbase (/etc/services, /etc/protocols for nft).
set -euo pipefail
packages=(e2fsprogs build-essential pkg-config xfsprogs gnupg gpgv nftables netbase iproute2 iputils-ping qemu-system-x86 linux-image-cloud-amd64 busybox-static debootstrap debian-archive-keyring openssh-client python3 xz-utils)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "host packages present: ${packages[*]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
