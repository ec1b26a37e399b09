#!/usr/bin/env bash
# Measures `banger vm workspace prepare` throughput for a generated tree
# (default 20,000 files, 300 MiB of incompressible data) through a real
# daemon whose Firecracker binary is fake-firecracker and whose guest is a
# `banger-agent` in host test mode (guest paths are host paths), and
# compares it with a plain tar pipe: `tar | ssh localhost tar` when sshd
# answers on localhost without a password, else `tar | tar` (the floor).
# Both run with the tree in the page cache.
# Usage: scripts/bench-workspace.sh [FILES] [MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-20000}
mib=${2:-300}
command -v python3 >/dev/null || { echo "python3 is needed to generate the tree" >&2; exit 1; }
cargo build --release --workspace --bins -q
bin="$PWD/target/release"
work=$(mktemp -d /tmp/banger-bench-ws.XXXXXX)
export BANGER_SOCKET="$work/bangerd.sock"
cleanup() {
  "$bin/banger" -q vm delete --force bench >/dev/null 2>&1 || true
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
printf '[network]\nenabled = false\n[vmm]\nbackend = "firecracker"\n[firecracker]\nbinary = "%s"\n[agent]\nwait = true\nready_timeout_seconds = 10\n' \
  "$bin/fake-firecracker" > "$work/config.toml"
mkdir -p "$work/agent-ssh"
truncate -s 64M "$work/disk.ext4" && mkfs.ext4 -q "$work/disk.ext4"
printf '\177ELF\002\001\001' > "$work/vmlinux" && truncate -s 4096 "$work/vmlinux"
FAKE_FIRECRACKER_GUEST_AGENT_BIN="$bin/banger-agent" \
FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR="$work/agent-ssh" \
  "$bin/bangerd" --state-dir "$work/state" --config "$work/config.toml" 2> "$work/bangerd.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$BANGER_SOCKET" ] && break; sleep 0.05; done
"$bin/banger" -q image import default "$work/disk.ext4"
"$bin/banger" -q kernel import default "$work/vmlinux"
"$bin/banger" -q vm create bench >/dev/null

# Mostly small files in 100 directories, plus a few large ones: FILES in
# all, MIB MiB in all, random bytes so nothing compresses.
python3 - "$work/tree" "$files" "$mib" <<'EOF'
import os, sys
root, files, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = mib << 20
large = max(1, files // 200)
small = files - large
small_size = (total // 3) // small
large_size = (total - small_size * small) // large
for index in range(files):
    directory = os.path.join(root, "src", "d%03d" % (index % 100))
    os.makedirs(directory, exist_ok=True)
    size = large_size if index < large else small_size
    with open(os.path.join(directory, "f%05d.dat" % index), "wb") as out:
        out.write(os.urandom(size))
EOF
git -C "$work/tree" init -q -b main
tree_bytes=$(du -sb "$work/tree" | cut -f1)
tree_files=$(find "$work/tree" -type f -not -path '*/.git/*' | wc -l)

now_ns() { date +%s%N; }
# CPU time (user + system, clock ticks) of the daemon and the guest agent:
# wall time on a busy host says little, CPU per MiB says where it goes.
agent=$(pgrep -n -f -- "banger-agent --listen-unix $work/" || true)
ticks() { for pid in "$daemon" $agent; do awk '{ print $14 + $15 }' "/proc/$pid/stat"; done | paste -sd' '; }
agent_split() { [ -n "$agent" ] && awk '{ printf "agent so far: user %d, system %d ticks\n", $14, $15 }' "/proc/$agent/stat"; }
report() { # label, nanoseconds, bytes, [ticks before, ticks after, CLI ticks]
  awk -v label="$1" -v ns="$2" -v bytes="$3" -v before="${4:-}" -v after="${5:-}" -v cli="${6:-}" \
    -v hz="$(getconf CLK_TCK)" 'BEGIN {
    s = ns / 1e9; printf "%-46s %6.2f s  %7.1f MiB/s", label, s, bytes / 1048576 / s
    if (after != "") { split(before, b, " "); split(after, a, " ")
      printf "  cpu: cli %.2f s, bangerd %.2f s, agent %.2f s", cli / hz, (a[1] - b[1]) / hz, (a[2] - b[2]) / hz }
    printf "\n" }'
}
# Runs the CLI; prints its CPU ticks (user + system) on fd 3.
cli_ticks() {
  local -a stat
  read -r -a stat < "/proc/$BASHPID/stat"
  local before=$(( stat[15] + stat[16] ))
  "$@"
  read -r -a stat < "/proc/$BASHPID/stat"
  echo $(( stat[15] + stat[16] - before ))
}
echo "tree: $tree_files files, $(( tree_bytes >> 20 )) MiB (untracked in a fresh repository)"

before=$(ticks); start=$(now_ns)
cli=$(cli_ticks "$bin/banger" -q vm workspace prepare bench "$work/tree" --dest "$work/guest/untracked")
report "workspace prepare (untracked tree)" $(( $(now_ns) - start )) "$tree_bytes" "$before" "$(ticks)" "$cli"

git -C "$work/tree" add -A
# No background auto-gc: it would race with both copies (and the cleanup).
git -C "$work/tree" -c gc.auto=0 -c user.name=bench -c user.email=bench@localhost commit -q -m tree
sent_bytes=$(du -sb "$work/tree" | cut -f1)
before=$(ticks); start=$(now_ns)
cli=$(cli_ticks "$bin/banger" -q vm workspace prepare bench "$work/tree" --dest "$work/guest/committed")
report "workspace prepare (committed, + .git: $(( sent_bytes >> 20 )) MiB)" $(( $(now_ns) - start )) "$sent_bytes" "$before" "$(ticks)" "$cli"

mkdir -p "$work/pipe"
if ssh -o BatchMode=yes -o ConnectTimeout=2 localhost true 2>/dev/null; then
  label="tar | ssh localhost tar (same tree, + .git)"
  start=$(now_ns)
  tar -C "$work/tree" -cf - . | ssh -o BatchMode=yes localhost tar -C "$work/pipe" -xf -
else
  label="tar | tar (no sshd on localhost; the floor)"
  start=$(now_ns)
  tar -C "$work/tree" -cf - . | tar -C "$work/pipe" -xf -
fi
report "$label" $(( $(now_ns) - start )) "$sent_bytes"
agent_split
