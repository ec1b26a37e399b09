#!/usr/bin/env bash
# Round-trip latency of a command in a running guest: `banger vm run NAME --
# true` (through the daemon and the guest agent) against `ssh` to the same
# guest (OpenSSH with banger's managed key, a fresh connection each time, as
# a script would do it). Prints p50/p95/mean/max in milliseconds.
#
# Usage: scripts/bench-run.sh NAME [RUNS]
#   NAME must be running, with sshd in its image (e.g. the golden image).
#   BANGER (default: banger on PATH) picks the CLI binary; BANGER_SOCKET the daemon.
set -euo pipefail
name=${1:?usage: scripts/bench-run.sh NAME [RUNS]}
runs=${2:-200}
banger=${BANGER:-banger}
data=${XDG_DATA_HOME:-$HOME/.local/share}/banger/ssh

now_ns() { date +%s%N; }
stats() { # label, then one number (microseconds) per line on stdin
  sort -n | awk -v label="$1" '{ v[NR] = $1; sum += $1 }
    END { p50 = v[int((NR + 1) * 0.50)]; p95 = v[int((NR * 0.95) + 0.5)]; if (p95 == "") p95 = v[NR];
          printf "%-26s n=%d  p50=%.1f ms  p95=%.1f ms  mean=%.1f ms  max=%.1f ms\n",
                 label, NR, p50 / 1000, p95 / 1000, sum / NR / 1000, v[NR] / 1000 }'
}

# Keys installed and host keys pinned (also proves ssh works at all).
"$banger" vm ssh "$name" -- true
ip=$("$banger" vm show "$name" --json | sed -n 's/.*"ip": *"\([^"]*\)".*/\1/p' | head -1)
dns=$("$banger" vm show "$name" --json | sed -n 's/.*"dns_name": *"\([^"]*\)".*/\1/p' | head -1)
[ -n "$ip" ] || { echo "error: VM $name has no address" >&2; exit 1; }

run_times=() ssh_times=()
for _ in $(seq "$runs"); do
  start=$(now_ns); "$banger" vm run "$name" -- true; run_times+=($(( ($(now_ns) - start) / 1000 )))
done
for _ in $(seq "$runs"); do
  start=$(now_ns)
  ssh -q -i "$data/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
      -o UserKnownHostsFile="$data/known_hosts" -o StrictHostKeyChecking=yes \
      -o HostKeyAlias="$dns" -o ControlMaster=no -o ControlPath=none \
      "root@$ip" true
  ssh_times+=($(( ($(now_ns) - start) / 1000 )))
done
printf '%s\n' "${run_times[@]}" | stats "banger vm run -- true"
printf '%s\n' "${ssh_times[@]}" | stats "ssh (new connection) true"
