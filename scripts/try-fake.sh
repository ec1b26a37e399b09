#!/usr/bin/env bash
# A first try of banger without Firecracker: a daemon in a temp dir whose
# Firecracker binary is fake-firecracker. Needs root (the daemon's job).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --workspace --bins; else cargo build --workspace --bins; fi
bin="$PWD/target/$profile"
work=$(mktemp -d /tmp/banger-try.XXXXXX)
export BANGER_SOCKET="$work/bangerd.sock"
cleanup() {
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  pkill -f -- "--api-sock $work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
printf '[network]\nenabled = false\n[vmm]\nbackend = "firecracker"\n[firecracker]\nbinary = "%s"\n' "$bin/fake-firecracker" > "$work/config.toml"
truncate -s 64M "$work/disk.ext4" && mkfs.ext4 -q "$work/disk.ext4"
# A stand-in kernel: fake-firecracker checks the file exists, it does not boot it.
printf '\177ELF\002\001\001' > "$work/vmlinux" && truncate -s 4096 "$work/vmlinux"
"$bin/bangerd" --state-dir "$work/state" --config "$work/config.toml" 2> "$work/bangerd.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$BANGER_SOCKET" ] && break; sleep 0.05; done
set -x
"$bin/banger" image import default "$work/disk.ext4"
"$bin/banger" kernel import default "$work/vmlinux"
"$bin/banger" vm create dev
"$bin/banger" vm list
"$bin/banger" daemon status
"$bin/banger" vm stop dev
"$bin/banger" vm delete dev
