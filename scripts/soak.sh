#!/usr/bin/env bash
# Soak: for DURATION (seconds, or with an m/h suffix), loops random VM
# operations (create, run, cp, stop, start, delete) against a daemon in a
# temp dir whose VMMs are fake-firecracker with a host-mode guest agent,
# and kills the daemon with SIGKILL at random moments, restarting it. After
# every restart and at the end it checks the invariants below and prints
# each violation. Not part of CI; run before a release. Needs root.
#
#   scripts/soak.sh 10m            # SOAK_MAX_OPS=N bounds the operations
#
# Invariants:
#   I1 every VM listed running has a live VMM whose pid the row records
#   I2 no VMM process of the state dir is unaccounted for by a running VM
#   I3 the VM directories under the state dir are exactly the listed VMs'
#   I4 no two VMs share a name
#   I5 every running VM answers `vm run NAME -- true`
#   I6 no VM is left in a transitional state (creating/starting/stopping)
# Exit status: 0 when no invariant was ever violated, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:?usage: scripts/soak.sh DURATION (e.g. 300, 10m, 1h)}
case "$duration" in
    *h) seconds=$(( ${duration%h} * 3600 )) ;;
    *m) seconds=$(( ${duration%m} * 60 )) ;;
    *s) seconds=${duration%s} ;;
    *) seconds=$duration ;;
esac
max_ops=${SOAK_MAX_OPS:-100000}
[ "$(id -u)" = 0 ] || { echo "soak.sh: needs root (bangerd is a root daemon)" >&2; exit 2; }

profile=${PROFILE:-debug}
if [ "$profile" = release ]; then cargo build --release --workspace --bins; else cargo build --workspace --bins; fi
bin="$PWD/target/$profile"
work=$(mktemp -d /tmp/banger-soak.XXXXXX)
state="$work/state"
export BANGER_SOCKET="$work/bangerd.sock"
daemon=""

# Pids of processes whose command line names this state dir (VMMs and
# their guest agents), bangerd excluded.
state_pids() {
    local pid
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = "${daemon:-x}" ] && continue
        if cat "/proc/$pid/cmdline" 2>/dev/null | tr '\0' ' ' | grep -q -- "$state/vms/"; then
            echo "$pid"
        fi
    done
}

vmm_pids() {
    local pid
    for pid in $(state_pids); do
        cat "/proc/$pid/cmdline" 2>/dev/null | tr '\0' ' ' | grep -q -- "--api-sock" && echo "$pid"
    done
    return 0
}

cleanup() {
    if [ -n "$daemon" ]; then kill -9 "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    for pid in $(state_pids); do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/agent-ssh" "$work/guest"
echo "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@guest" \
    > "$work/agent-ssh/ssh_host_ed25519_key.pub"
printf '[network]\nenabled = false\n[vmm]\nbackend = "firecracker"\n[firecracker]\nbinary = "%s"\njailed = false\n[vm]\nstop_grace_seconds = 3\nmemory_mib = 256\nvcpus = 1\n[agent]\nwait = true\nready_timeout_seconds = 10\n' \
    "$bin/fake-firecracker" > "$work/config.toml"
export FAKE_FIRECRACKER_GUEST_AGENT_BIN="$bin/banger-agent"
export FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR="$work/agent-ssh"
truncate -s 64M "$work/disk.ext4" && mkfs.ext4 -q "$work/disk.ext4"
printf '\177ELF\002\001\001' > "$work/vmlinux" && truncate -s 4096 "$work/vmlinux"
head -c 100000 /dev/urandom > "$work/payload"

start_daemon() {
    "$bin/bangerd" --state-dir "$state" --socket "$BANGER_SOCKET" --config "$work/config.toml" \
        2>> "$work/bangerd.log" &
    daemon=$!
    for _ in $(seq 200); do
        "$bin/banger" daemon status > /dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "soak.sh: bangerd did not come up; log tail:" >&2
    tail -20 "$work/bangerd.log" >&2
    exit 1
}

banger() { timeout 60 "$bin/banger" "$@"; }

violations=0
checks=0
kills=0
ops=0
succeeded=0
attempt() { if banger "$@" > /dev/null 2>&1; then succeeded=$((succeeded + 1)); fi; }
violation() { violations=$((violations + 1)); echo "VIOLATION $*"; }

check_invariants() {
    local list names running id pid dirs ids vmms accounted
    checks=$((checks + 1))
    list=$(banger vm list --json) || { violation "vm list failed"; return; }
    names=$(jq -r '.[].name' <<< "$list" | sort)
    [ "$(uniq -d <<< "$names")" = "" ] || violation "I4 duplicate names: $(uniq -d <<< "$names" | tr '\n' ' ')"
    local transitional
    transitional=$(jq -r '.[] | select(.state == "creating" or .state == "starting" or .state == "stopping") | .name' <<< "$list")
    [ -z "$transitional" ] || violation "I6 left in transition: $transitional"
    accounted=""
    while read -r id pid; do
        [ -n "$id" ] || continue
        if [ "$pid" = null ] || ! kill -0 "$pid" 2>/dev/null; then
            violation "I1 running VM $id has no live VMM (pid $pid)"
        fi
        accounted="$accounted $pid"
    done < <(jq -r '.[] | select(.state == "running") | "\(.id) \(.pid)"' <<< "$list")
    for pid in $(vmm_pids); do
        case " $accounted " in *" $pid "*) ;; *) violation "I2 VMM $pid is no running VM's" ;; esac
    done
    ids=$(jq -r '.[].id' <<< "$list" | sort)
    dirs=$(ls "$state/vms" 2>/dev/null | sort)
    [ "$ids" = "$dirs" ] || violation "I3 VM dirs [$(echo $dirs)] differ from VMs [$(echo $ids)]"
    for name in $(jq -r '.[] | select(.state == "running") | .name' <<< "$list"); do
        banger vm run "$name" -- true > /dev/null 2>&1 || violation "I5 vm run on $name failed"
    done
}

start_daemon
banger image import default "$work/disk.ext4" > /dev/null
banger kernel import default "$work/vmlinux" > /dev/null

deadline=$(( $(date +%s) + seconds ))
echo "soak: ${seconds}s, at most $max_ops operations, state in $state"
while [ "$(date +%s)" -lt "$deadline" ] && [ "$ops" -lt "$max_ops" ]; do
    ops=$((ops + 1))
    name="soak$((RANDOM % 6))"
    case $((RANDOM % 8)) in
        0|1) attempt vm create "$name" ;;
        2) attempt vm run "$name" -- sh -c 'echo $$' ;;
        3) attempt vm cp "$work/payload" "$name:$work/guest/$name.bin" ;;
        4) attempt vm stop "$name" ;;
        5) attempt vm start "$name" ;;
        6) attempt vm delete --force "$name" ;;
        7)
            # A kill while something is under way: start an operation in
            # the background and kill the daemon a random moment later.
            banger vm create "soak-k$((RANDOM % 3))" > /dev/null 2>&1 &
            sleep "0.$((RANDOM % 10))"
            kill -9 "$daemon" 2>/dev/null || true
            wait "$daemon" 2>/dev/null || true
            wait 2>/dev/null || true
            kills=$((kills + 1))
            start_daemon
            check_invariants
            ;;
    esac
done
check_invariants
echo "soak: $ops operations ($succeeded succeeded), $kills daemon kills, $checks invariant checks (I1-I6), $violations violations"
[ "$violations" = 0 ]
