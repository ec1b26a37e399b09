#!/usr/bin/env bash
# Measures `banger vm create` latency (CLI call to VM running) and
# `vm delete --force`, through a real daemon whose Firecracker binary is
# fake-firecracker: what banger itself costs, without a guest kernel.
# Usage: scripts/bench-create.sh [RUNS] [IMAGE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
image_mib=${2:-1024}
cargo build --release --workspace --bins -q
bin="$PWD/target/release"
work=$(mktemp -d /tmp/banger-bench.XXXXXX)
export BANGER_SOCKET="$work/bangerd.sock"
cleanup() {
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  pkill -f -- "--api-sock $work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
printf '[network]\nenabled = false\n[vmm]\nbackend = "firecracker"\n[firecracker]\nbinary = "%s"\n' "$bin/fake-firecracker" > "$work/config.toml"
truncate -s "${image_mib}M" "$work/disk.ext4" && mkfs.ext4 -q "$work/disk.ext4"
printf '\177ELF\002\001\001' > "$work/vmlinux" && truncate -s 4096 "$work/vmlinux"
"$bin/bangerd" --state-dir "$work/state" --config "$work/config.toml" 2> "$work/bangerd.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$BANGER_SOCKET" ] && break; sleep 0.05; done
"$bin/banger" -q image import default "$work/disk.ext4"
"$bin/banger" -q kernel import default "$work/vmlinux"

now_ms() { date +%s%3N; }
stats() { # label, then one number per line on stdin
  sort -n | awk -v label="$1" '{ v[NR] = $1; sum += $1 }
    END { p50 = v[int((NR + 1) * 0.50)]; p95 = v[int((NR * 0.95) + 0.5)]; if (p95 == "") p95 = v[NR];
          printf "%-28s n=%d  p50=%d ms  p95=%d ms  mean=%.1f ms  max=%d ms\n", label, NR, p50, p95, sum / NR, v[NR] }'
}
create_times=() delete_times=()
for i in $(seq "$runs"); do
  start=$(now_ms); "$bin/banger" -q vm create "bench-$i" >/dev/null; create_times+=($(( $(now_ms) - start )))
done
for i in $(seq "$runs"); do
  start=$(now_ms); "$bin/banger" -q vm delete --force "bench-$i" >/dev/null; delete_times+=($(( $(now_ms) - start )))
done
echo "image: ${image_mib} MiB ext4 (sparse), backend: fake-firecracker, clone: sparse copy"
printf '%s\n' "${create_times[@]}" | stats "vm create (to running)"
printf '%s\n' "${delete_times[@]}" | stats "vm delete --force"
start=$(now_ms)
creators=()
for i in $(seq 10); do "$bin/banger" -q vm create "par-$i" >/dev/null & creators+=($!); done
wait "${creators[@]}"
echo "10 concurrent creates: $(( $(now_ms) - start )) ms wall"
