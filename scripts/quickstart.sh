#!/usr/bin/env bash
# Sets up this Debian/Ubuntu host for banger and proves it works, from a
# fresh machine to a command running in a VM. Idempotent: every step checks
# what is already there; run it again and it only does what is missing.
#
#   sudo ./scripts/quickstart.sh [--minimal] [--vm NAME]
#
#   --minimal   the small golden image (openssh-server, ca-certificates, git)
#               instead of the full developer image (build tools, tmux, curl…)
#   --vm NAME   the VM to create and run a command in (default: hello)
#
# Steps: apt packages; release build (needs Rust >= 1.85, e.g. from rustup);
# binaries into /usr/local; /etc/banger/config.toml; the daemon (a systemd
# unit where systemd runs, else a background process logging to
# /var/log/bangerd.log); NAME.banger resolving on the host where
# systemd-resolved does not (a NetworkManager or dnsmasq drop-in, or the
# line to add); the default kernel (the host's Debian cloud kernel
# with banger's initramfs and agent); the golden image; then
# `banger vm create NAME` and `banger vm run NAME -- uname -a`.
set -euo pipefail
cd "$(dirname "$0")/.."

minimal=0
vm=hello
while [ $# -gt 0 ]; do
    case "$1" in
        --minimal) minimal=1; shift ;;
        --vm) vm="${2:?--vm needs a name}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "quickstart: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "quickstart: error: run as root (sudo $0)" >&2; exit 1; }

total_start=$(date +%s)
step_start=$total_start
step() {
    local now
    now=$(date +%s)
    if [ -n "${step_name:-}" ]; then
        printf '    done in %ss\n' "$((now - step_start))"
    fi
    step_name=$1
    step_start=$now
    printf '\n==> %s\n' "$1"
}

step "Host packages (scripts/setup-host.sh)"
./scripts/setup-host.sh

step "Build (cargo build --release)"
if ! command -v cargo >/dev/null; then
    echo "quickstart: error: cargo not found; install Rust >= 1.85 (https://rustup.rs) and run again" >&2
    exit 1
fi
cargo build --release --locked --workspace --bins
agent=$(scripts/build-agent.sh)

step "Install binaries into /usr/local"
install -m 0755 target/release/bangerd target/release/banger /usr/local/bin/
install -d -m 0755 /usr/local/lib/banger
install -m 0755 "$agent" /usr/local/lib/banger/banger-agent
export PATH="/usr/local/bin:$PATH"

image=golden
[ "$minimal" -eq 1 ] && image=golden-minimal
step "Configuration (/etc/banger/config.toml)"
if [ -e /etc/banger/config.toml ]; then
    echo "kept the existing /etc/banger/config.toml"
else
    install -d -m 0755 /etc/banger
    cat > /etc/banger/config.toml <<EOF
# Written by scripts/quickstart.sh; every key is documented in README.md.
[vm]
image = "$image"
kernel = "default"
EOF
    echo "wrote /etc/banger/config.toml (default image $image)"
fi
getent group banger >/dev/null || groupadd --system banger
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    id -nG "$SUDO_USER" | grep -qw banger || {
        usermod -aG banger "$SUDO_USER"
        echo "added $SUDO_USER to group banger (log in again to use banger without sudo)"
    }
fi

step "Daemon"
if banger daemon status >/dev/null 2>&1; then
    echo "bangerd already answers"
elif [ -d /run/systemd/system ]; then
    install -m 0644 contrib/systemd/bangerd.service /etc/systemd/system/bangerd.service
    systemctl daemon-reload
    systemctl enable --now bangerd
else
    echo "systemd is not running: starting bangerd in the background (log: /var/log/bangerd.log)"
    nohup /usr/local/bin/bangerd >>/var/log/bangerd.log 2>&1 &
fi
for _ in $(seq 100); do
    banger daemon status >/dev/null 2>&1 && break
    sleep 0.1
done
banger daemon status >/dev/null || { echo "quickstart: error: bangerd does not answer; see its log" >&2; exit 1; }
echo "bangerd is up"

step "Host resolution of NAME.banger (scripts/host-dns.sh)"
./scripts/host-dns.sh

step "Default kernel (the host's Debian cloud kernel + banger's initramfs)"
BANGER=banger scripts/make-debian-kernel.sh

step "Golden image ($image)"
if banger image show "$image" >/dev/null 2>&1; then
    echo "image $image is registered"
else
    golden_args=()
    [ "$minimal" -eq 1 ] && golden_args+=(--minimal)
    images/golden/build.sh "${golden_args[@]}"
    banger image show "$image" >/dev/null
fi

step "VM $vm"
state=$(banger vm show "$vm" --json 2>/dev/null | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' | head -1 || true)
case "$state" in
    running) echo "$vm is running" ;;
    "") banger vm create "$vm" ;;
    *) banger vm start "$vm" ;;
esac

step "Run a command in it"
banger vm run "$vm" -- uname -a
step_name=
printf '\nbanger is ready (%ss in all). Next: banger vm run -t %s -- bash, banger vm ssh %s, banger vm delete %s\n' \
    "$(($(date +%s) - total_start))" "$vm" "$vm" "$vm"
