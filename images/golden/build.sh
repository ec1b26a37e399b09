#!/usr/bin/env bash
# Builds banger's default developer image, Debian stable, with debootstrap
# (for hosts without Docker; images/golden/Dockerfile is the Docker recipe).
#
#   sudo images/golden/build.sh [--minimal] [--force] [options]
#
# Output: an ext4 file (default /var/cache/banger/golden/NAME.ext4) and,
# beside it, NAME.ext4.key, the content key it was built from: a hash of the
# flavour, suite, package list, this script and the optional agent binary.
# A run whose key matches the existing output does not rebuild (--force
# does). Then, when `banger` is on PATH and the daemon answers, the image is
# registered as NAME (`golden`, or `golden-minimal` with --minimal);
# otherwise the command to do so is printed.
#
# What the image is prepared for (banger boots it with its own kernel, and
# the agent sets hostname, network and resolv.conf from the command line):
# systemd as /sbin/init, sshd enabled with fresh host keys generated on each
# VM's first boot, root with no password (reached through the agent, or over
# ssh with a key: PermitRootLogin prohibit-password), no /etc/hostname,
# root on /dev/vda, apt lists removed.
set -euo pipefail

readonly SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_NAME="$(basename "$SCRIPT_PATH")"
readonly SCRIPT_NAME

# Packages every flavour gets: an init, device nodes for virtio ports, and
# the small tools a VM is administered with.
readonly BASE_PACKAGES=(systemd-sysv udev dbus libnss-myhostname iproute2 procps less)
readonly MINIMAL_PACKAGES=(openssh-server ca-certificates git)
readonly FULL_PACKAGES=(openssh-server ca-certificates git curl tmux build-essential sudo)

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

Builds banger's golden developer image (Debian, debootstrap) as an ext4 file.

Options:
  --minimal          openssh-server, ca-certificates and git only (CI); the
                     default adds curl, tmux, build-essential and sudo
  --name NAME        image name to register (default: golden, or
                     golden-minimal with --minimal)
  --output FILE      where the ext4 file goes (default: CACHE_DIR/NAME.ext4)
  --cache-dir DIR    build and cache directory (default: /var/cache/banger/golden)
  --headroom MIB     free space added to the content size (default: 512)
  --suite SUITE      Debian suite (default: bookworm)
  --mirror URL       Debian mirror (default: http://deb.debian.org/debian)
  --security URL     Debian security mirror (default: http://deb.debian.org/debian-security)
  --agent FILE       also install this banger-agent binary as
                     /usr/local/sbin/banger-agent
  --no-import        do not register the image with banger
  --force            rebuild even when the cached output matches
  -h, --help         this help

Must run as root (debootstrap, chroot and file ownership need it).
EOF
}

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

minimal=0
name=
output=
cache_dir=/var/cache/banger/golden
headroom_mib=512
suite=bookworm
mirror=http://deb.debian.org/debian
security_mirror=http://deb.debian.org/debian-security
agent=
do_import=1
force=0

while [ "$#" -gt 0 ]; do
  case "$1" in
    --minimal) minimal=1 ;;
    --name) name="${2:?--name needs a value}"; shift ;;
    --output) output="${2:?--output needs a value}"; shift ;;
    --cache-dir) cache_dir="${2:?--cache-dir needs a value}"; shift ;;
    --headroom) headroom_mib="${2:?--headroom needs a value}"; shift ;;
    --suite) suite="${2:?--suite needs a value}"; shift ;;
    --mirror) mirror="${2:?--mirror needs a value}"; shift ;;
    --security) security_mirror="${2:?--security needs a value}"; shift ;;
    --agent) agent="${2:?--agent needs a value}"; shift ;;
    --no-import) do_import=0 ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

if [ "$minimal" -eq 1 ]; then
  flavour=minimal
  packages=("${BASE_PACKAGES[@]}" "${MINIMAL_PACKAGES[@]}")
  : "${name:=golden-minimal}"
else
  flavour=full
  packages=("${BASE_PACKAGES[@]}" "${FULL_PACKAGES[@]}")
  : "${name:=golden}"
fi
: "${output:=$cache_dir/$name.ext4}"

case "$headroom_mib" in
  ''|*[!0-9]*) die "--headroom must be a whole number of MiB, not '$headroom_mib'" ;;
esac
if [ -n "$agent" ] && [ ! -f "$agent" ]; then
  die "--agent $agent: no such file"
fi
if [ "$(id -u)" -ne 0 ]; then
  die "must run as root (debootstrap, chroot and mkfs.ext4 -d with file ownership need it); run it with sudo"
fi
for tool in debootstrap chroot mkfs.ext4 sha256sum du flock mount umount; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing; run scripts/setup-host.sh (or apt-get install debootstrap e2fsprogs)"
done

# --- progress -------------------------------------------------------------

build_started=$SECONDS
phase_started=$SECONDS
phase_name=
phase() {
  phase_end
  phase_name="$1"
  phase_started=$SECONDS
  echo "==> $phase_name"
}
phase_end() {
  if [ -n "$phase_name" ]; then
    echo "    $phase_name: $((SECONDS - phase_started))s"
  fi
  phase_name=
}

# --- content key ----------------------------------------------------------

content_key() {
  {
    echo "flavour=$flavour"
    echo "suite=$suite"
    echo "packages=${packages[*]}"
    echo "script=$(sha256sum <"$SCRIPT_PATH" | cut -d' ' -f1)"
    if [ -n "$agent" ]; then
      echo "agent=$(sha256sum <"$agent" | cut -d' ' -f1)"
    fi
  } | sha256sum | cut -d' ' -f1
}

# --- registration ---------------------------------------------------------

register() {
  local file="$1" digest shown
  if [ "$do_import" -eq 0 ]; then
    echo "not registering (--no-import); to register: banger image import $name $file"
    return 0
  fi
  if ! command -v banger >/dev/null 2>&1; then
    echo "banger is not on PATH; to register: banger image import $name $file"
    return 0
  fi
  if ! banger daemon status >/dev/null 2>&1; then
    echo "the banger daemon does not answer; to register: banger image import $name $file"
    return 0
  fi
  if shown="$(banger image show "$name" --json 2>/dev/null)"; then
    digest="sha256:$(sha256sum <"$file" | cut -d' ' -f1)"
    if printf '%s' "$shown" | grep -q "\"digest\": *\"$digest\""; then
      echo "image $name is already registered with this content"
    else
      echo "image $name is registered with other content; to replace it:"
      echo "  banger image rm $name && banger image import $name $file"
    fi
    return 0
  fi
  banger image import "$name" "$file"
}

# --- build ----------------------------------------------------------------

mkdir -p "$cache_dir" "$(dirname "$output")"
exec 9>"$cache_dir/.lock"
flock -n 9 || { echo "another build holds $cache_dir/.lock; waiting"; flock 9; }

key="$(content_key)"
if [ "$force" -eq 0 ] && [ -f "$output" ] && [ -f "$output.key" ] \
    && [ "$(cat "$output.key")" = "$key" ]; then
  echo "$output is up to date ($flavour, key ${key:0:12}); --force rebuilds"
  register "$output"
  exit 0
fi

# The cleanup reports on the original stderr even when a signal arrives
# while a phase's output is redirected to its log.
exec 8>&2
work="$(mktemp -d "$cache_dir/build.XXXXXX")"
root="$work/root"
mounted=()

unmount_all() {
  local index
  for ((index = ${#mounted[@]} - 1; index >= 0; index--)); do
    umount "${mounted[index]}" 2>/dev/null || umount -l "${mounted[index]}" 2>/dev/null || true
  done
  mounted=()
}

cleanup() {
  local status=$?
  unmount_all
  # Never delete through a mount point that is still there (/dev is bound in).
  if grep -q " $work/" /proc/self/mountinfo; then
    echo "$SCRIPT_NAME: error: mounts remain under $work; not removing it" >&8
  else
    rm -rf --one-file-system "$work"
  fi
  if [ "$status" -ne 0 ]; then
    local during=
    [ -z "$phase_name" ] || during=" during \"$phase_name\""
    echo "$SCRIPT_NAME: failed$during; $output was not changed" >&8
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bind() {
  mount "$@"
  mounted+=("${*: -1}")
}

in_root() {
  chroot "$root" /usr/bin/env -i \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

echo "building $name ($flavour: ${packages[*]}) from $suite, key ${key:0:12}"

phase "debootstrap $suite (minbase)"
base_list="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
debootstrap --variant=minbase --include="$base_list" \
  --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  die "debootstrap $suite from $mirror failed (log above)"
}

phase "install packages and updates"
bind -t proc proc "$root/proc"
bind -t sysfs sysfs "$root/sys"
bind --bind /dev "$root/dev"
bind --bind /dev/pts "$root/dev/pts"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
# Keep documentation, man pages and translations out (no man-db anyway).
cat >"$root/etc/dpkg/dpkg.cfg.d/banger-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
rm -rf "$root/usr/share/man" "$root/usr/share/info"
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
{
  in_root apt-get update -q
  in_root apt-get -y -q -o Dpkg::Options::=--force-confold dist-upgrade
  in_root apt-get -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
    install "${packages[@]}"
} >"$work/apt.log" 2>&1 || {
  tail -n 20 "$work/apt.log" >&2
  die "installing packages in the chroot failed (log above)"
}

phase "configure for banger"
# systemd is /sbin/init (systemd-sysv); make sure.
[ -L "$root/sbin/init" ] || [ -x "$root/sbin/init" ] || die "/sbin/init is missing in the image"
# Root on the VM's first virtio disk; nothing else mounted from fstab.
cat >"$root/etc/fstab" <<'EOF'
# banger: the root disk is the VM's first virtio block device.
/dev/vda  /  ext4  defaults,noatime,errors=remount-ro  0  0
EOF
# The hostname comes from the kernel command line (the agent sets it).
rm -f "$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# resolv.conf is written by the agent from the kernel command line.
rm -f "$root/etc/resolv.conf"
# Every VM gets its own machine id on first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Nothing to ask on a first boot, and nobody at a console to answer.
ln -sf /dev/null "$root/etc/systemd/system/systemd-firstboot.service"
# root: no password at all (not an empty one): the agent runs commands as
# root, and sshd lets root in with a key only.
in_root usermod -p '*' root
install -d -m 700 "$root/root/.ssh"
cat >"$root/etc/ssh/sshd_config.d/banger.conf" <<'EOF'
# banger: keys only; root may log in with a key (the agent installs them).
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
EOF
# Host keys: none baked in; each VM generates its own before sshd starts.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/banger-ssh-keygen.service" <<'EOF'
[Unit]
Description=Generate this VM's SSH host keys
Before=ssh.service
ConditionPathExists=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=ssh.service multi-user.target
EOF
in_root systemctl enable ssh.service banger-ssh-keygen.service >"$work/systemctl.log" 2>&1 || {
  cat "$work/systemctl.log" >&2
  die "enabling ssh.service in the image failed"
}
# A disposable VM has no use for background package list refreshes.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer >>"$work/systemctl.log" 2>&1 || {
  cat "$work/systemctl.log" >&2
  die "masking the apt timers in the image failed"
}
if [ -n "$agent" ]; then
  install -m 755 "$agent" "$root/usr/local/sbin/banger-agent"
fi
echo "banger golden image ($flavour), $suite, key $key" >"$root/etc/banger-image"

phase "clean up"
in_root apt-get clean
unmount_all
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
  "$root"/var/log/apt/* "$root"/var/log/*.log "$root"/var/log/journal/* \
  "$root"/tmp/* "$root"/var/tmp/* "$root/root/.bash_history"
[ -z "$(ls -A "$root/var/lib/apt/lists" 2>/dev/null)" ] || die "apt lists were not removed"

phase "make ext4"
content_kib="$(du -skx "$root" | cut -f1)"
# ext4 metadata (inode tables, journal) on top of the content, then headroom.
size_mib=$(( content_kib * 11 / 10 / 1024 + 64 + headroom_mib ))
image="$work/image.ext4"
truncate -s "${size_mib}M" "$image"
mkfs.ext4 -q -F -t ext4 -L "${name:0:16}" -E root_owner=0:0 -d "$root" "$image" \
  >"$work/mkfs.log" 2>&1 || {
  cat "$work/mkfs.log" >&2
  die "mkfs.ext4 -d failed (log above)"
}
# Replace the output atomically; the key goes last, so a half-written
# output never looks up to date.
rm -f "$output.key"
mv -f "$image" "$output.partial"
mv -f "$output.partial" "$output"
echo "$key" >"$output.key"
phase_end

echo "built $output: $(du -h --apparent-size "$output" | cut -f1) file (${size_mib} MiB, content $((content_kib / 1024)) MiB) in $((SECONDS - build_started))s"
register "$output"
