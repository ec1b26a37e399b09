#!/usr/bin/env bash
# Installs what building and testing banger needs on a Debian/Ubuntu host.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
packages=(e2fsprogs build-essential pkg-config xfsprogs gnupg gpgv nftables iproute2 iputils-ping qemu-system-x86 linux-image-cloud-amd64 busybox-static debootstrap openssh-client python3 xz-utils)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
else
  echo "host packages present: ${packages[*]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
