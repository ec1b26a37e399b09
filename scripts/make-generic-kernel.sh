#!/usr/bin/env bash
# Builds a Firecracker-compatible guest kernel from kernel.org sources.
#
#   scripts/make-generic-kernel.sh --version 6.1.119
#   scripts/make-generic-kernel.sh --tarball linux-6.1.119.tar.xz --signature linux-6.1.119.tar.sign
#
# 1. Gets linux-VERSION.tar.xz and its detached signature linux-VERSION.tar.sign
#    (downloaded from cdn.kernel.org, or the local files given).
# 2. Verifies the signature with gpgv against keys/kernel.org-release-keys.gpg
#    (Linus Torvalds, Greg Kroah-Hartman; see keys/README.md). kernel.org signs
#    the uncompressed tar, so the check runs over `xz -cd`. Nothing is built
#    from a tarball that does not verify. --verify-only stops here.
# 3. Configures: `make defconfig` + images/kernel/microvm.config (virtio-mmio,
#    virtio blk/net/console/vsock, ext4, devtmpfs, 8250 console, no modules).
# 4. Builds vmlinux (what Firecracker boots; QEMU microvm boots it via PVH)
#    and bzImage, copies them with the .config to the output directory.
# 5. Registers vmlinux with `banger kernel import` when banger is on PATH and
#    the daemon answers; otherwise prints the command.
#
# Idempotent: a verified, unpacked source tree and finished outputs are reused
# (--force rebuilds). Building needs no root.
set -euo pipefail

SCRIPT_NAME="$(basename "${BASH_SOURCE[0]}")"
readonly SCRIPT_NAME
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly TORVALDS_FPR=ABAF11C65A2970B130ABE3C479BE3E4300411886
readonly KROAH_HARTMAN_FPR=647F28654894E3BD457199BE38DBBDC86092693E
readonly DEFAULT_CMDLINE="console=ttyS0 reboot=k panic=1"
# Options the guest cannot boot without; the build stops if the merged
# config lost any of them.
readonly REQUIRED_OPTIONS=(CONFIG_VIRTIO_MMIO CONFIG_VIRTIO_BLK CONFIG_VIRTIO_NET
  CONFIG_VIRTIO_CONSOLE CONFIG_VIRTIO_VSOCKETS CONFIG_EXT4_FS CONFIG_DEVTMPFS
  CONFIG_SERIAL_8250_CONSOLE)

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME (--version X.Y.Z | --tarball FILE --signature FILE) [options]

Builds a Firecracker-compatible kernel (vmlinux and bzImage) from verified
kernel.org sources and registers it with banger.

Options:
  --version X.Y.Z     kernel version (taken from --tarball's name when omitted)
  --tarball FILE      a local linux-X.Y.Z.tar.xz instead of downloading
  --signature FILE    its detached signature linux-X.Y.Z.tar.sign
  --keyring FILE      gpgv keyring (default: keys/kernel.org-release-keys.gpg)
  --config FILE       config fragment over defconfig (default: images/kernel/microvm.config)
  --work-dir DIR      downloads, sources and builds (default: \$XDG_CACHE_HOME/banger/kernel,
                      /var/cache/banger/kernel for root)
  --output DIR        where vmlinux, bzImage and config go (default: WORK_DIR/out/VERSION)
  --jobs N            parallel make jobs (default: $(nproc 2>/dev/null || echo 1))
  --name NAME         kernel name to register (default: generic-VERSION)
  --no-import         do not register the kernel with banger
  --verify-only       stop after the signature check
  --force             re-verify, re-unpack and rebuild
  -h, --help          this help
EOF
}

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

version=
tarball=
signature=
keyring="$REPO_ROOT/keys/kernel.org-release-keys.gpg"
keyring_is_default=1
fragment="$REPO_ROOT/images/kernel/microvm.config"
work_dir=
output=
jobs="$(nproc 2>/dev/null || echo 1)"
name=
do_import=1
verify_only=0
force=0

while [ "$#" -gt 0 ]; do
  case "$1" in
    --version) version="${2:?--version needs a value}"; shift ;;
    --tarball) tarball="${2:?--tarball needs a value}"; shift ;;
    --signature) signature="${2:?--signature needs a value}"; shift ;;
    --keyring) keyring="${2:?--keyring needs a value}"; keyring_is_default=0; shift ;;
    --config) fragment="${2:?--config needs a value}"; shift ;;
    --work-dir) work_dir="${2:?--work-dir needs a value}"; shift ;;
    --output) output="${2:?--output needs a value}"; shift ;;
    --jobs) jobs="${2:?--jobs needs a value}"; shift ;;
    --name) name="${2:?--name needs a value}"; shift ;;
    --no-import) do_import=0 ;;
    --verify-only) verify_only=1 ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

# --- arguments ------------------------------------------------------------

if [ -n "$tarball" ] && [ -z "$version" ]; then
  case "$(basename "$tarball")" in
    linux-*.tar.xz) version="$(basename "$tarball" .tar.xz)"; version="${version#linux-}" ;;
    *) die "cannot tell the version from '$tarball' (not linux-X.Y.Z.tar.xz); pass --version" ;;
  esac
fi
[ -n "$version" ] || { usage >&2; die "give --version X.Y.Z or --tarball FILE"; }
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?(-rc[0-9]+)?$ ]]; then
  die "'$version' is not a kernel version like 6.1.119"
fi
if [ -n "$tarball" ] && [ -z "$signature" ]; then
  die "--tarball needs --signature (the detached linux-$version.tar.sign); unsigned sources are not built"
fi
if [ -n "$signature" ] && [ -z "$tarball" ]; then
  die "--signature needs --tarball"
fi
case "$jobs" in ''|*[!0-9]*|0) die "--jobs must be a positive number, not '$jobs'" ;; esac
if [ -z "$work_dir" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    work_dir=/var/cache/banger/kernel
  else
    work_dir="${XDG_CACHE_HOME:-$HOME/.cache}/banger/kernel"
  fi
fi
: "${output:=$work_dir/out/$version}"
: "${name:=generic-$version}"

for tool in xz gpgv tar sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing; install it (apt-get install xz-utils gpgv tar coreutils)"
done

absolute() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "$1" ;;
  esac
}

fetch_keys_hint() {
  cat >&2 <<EOF
  The kernel.org release keys can be fetched with:
    gpg --locate-keys torvalds@kernel.org gregkh@kernel.org     # or
    gpg --keyserver hkps://keys.openpgp.org --recv-keys $TORVALDS_FPR $KROAH_HARTMAN_FPR
    gpg --export $TORVALDS_FPR $KROAH_HARTMAN_FPR > keys/kernel.org-release-keys.gpg
  Check the fingerprints against https://www.kernel.org/signature.html first.
EOF
}

keyring="$(absolute "$keyring")"
if [ ! -s "$keyring" ]; then
  echo "$SCRIPT_NAME: error: keyring $keyring is missing or empty; refusing to use unverified sources" >&2
  fetch_keys_hint
  exit 1
fi

# --- temp dir -------------------------------------------------------------

mkdir -p "$work_dir"
tmp="$(mktemp -d "$work_dir/.tmp.XXXXXX")"
cleanup() {
  local status=$?
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step_started=$SECONDS
step() {
  step_started=$SECONDS
  echo "==> $*"
}
step_done() {
  echo "    $1: $((SECONDS - step_started))s"
}

# --- 1. sources -----------------------------------------------------------

if [ -z "$tarball" ]; then
  command -v curl >/dev/null 2>&1 || die "curl is missing (apt-get install curl), or pass --tarball and --signature"
  major="${version%%.*}"
  base_url="https://cdn.kernel.org/pub/linux/kernel/v$major.x"
  mkdir -p "$work_dir/downloads"
  tarball="$work_dir/downloads/linux-$version.tar.xz"
  signature="$work_dir/downloads/linux-$version.tar.sign"
  for file in "$tarball" "$signature"; do
    if [ -s "$file" ] && [ "$force" -eq 0 ]; then
      continue
    fi
    step "download $(basename "$file")"
    curl --fail --location --silent --show-error --proto '=https' \
      --output "$tmp/download" "$base_url/$(basename "$file")" \
      || die "downloading $base_url/$(basename "$file") failed; download it elsewhere and pass --tarball and --signature"
    mv "$tmp/download" "$file"
    step_done download
  done
fi
tarball="$(absolute "$tarball")"
signature="$(absolute "$signature")"
[ -f "$tarball" ] || die "tarball $tarball: no such file"
[ -f "$signature" ] || die "signature $signature: no such file"

# --- 2. signature ---------------------------------------------------------

verify() {
  step "verify $(basename "$tarball") against $(basename "$signature")"
  local gnupg_home="$tmp/gnupg" status="$tmp/gpgv.status" errors="$tmp/gpgv.err"
  local codes xz_status gpgv_status key signer
  mkdir -m 700 "$gnupg_home"
  set +e
  xz -cd -- "$tarball" 2>"$tmp/xz.err" \
    | GNUPGHOME="$gnupg_home" gpgv --status-fd 3 --keyring "$keyring" -- "$signature" - \
      3>"$status" 2>"$errors"
  codes=("${PIPESTATUS[@]}")
  xz_status=${codes[0]}
  gpgv_status=${codes[1]}
  set -e
  # xz killed by SIGPIPE (141) only means gpgv stopped reading early.
  if [ "$xz_status" -ne 0 ] && [ "$xz_status" -ne 141 ]; then
    die "cannot decompress $tarball ($(head -n 1 "$tmp/xz.err")); refusing to build"
  fi
  if grep -q '^\[GNUPG:\] BADSIG' "$status"; then
    die "BAD signature: $tarball does not match $signature (tampered or corrupt); refusing to build"
  fi
  if grep -q '^\[GNUPG:\] NO_PUBKEY' "$status"; then
    key="$(awk '$2 == "NO_PUBKEY" {print $3; exit}' "$status")"
    if [ "$keyring_is_default" -eq 1 ]; then
      echo "$SCRIPT_NAME: error: $signature is signed by key $key, which is not a kernel.org release key in $keyring; refusing to build" >&2
      fetch_keys_hint
      exit 1
    fi
    die "$signature is signed by key $key, which is not in $keyring; refusing to build"
  fi
  if grep -q '^\[GNUPG:\] NODATA' "$status"; then
    die "$signature is not an OpenPGP signature; refusing to build"
  fi
  if [ "$gpgv_status" -ne 0 ] || ! grep -q '^\[GNUPG:\] VALIDSIG' "$status"; then
    die "signature check failed: $(grep -v '^gpgv: *$' "$errors" | tail -n 1); refusing to build"
  fi
  # VALIDSIG <signing key fpr> ... <primary key fpr> (the last field).
  signer="$(awk '$2 == "VALIDSIG" {print $NF; exit}' "$status")"
  echo "    good signature from $signer ($(sed -n 's/^\[GNUPG:\] GOODSIG [0-9A-F]* //p' "$status" | head -n 1))"
  step_done verify
}

# A verified tarball is remembered by its hash together with the signature's
# and the keyring's, so a changed file is always checked again.
verified_stamp="$work_dir/verified/linux-$version"
verification_key="$( { sha256sum <"$tarball"; sha256sum <"$signature"; sha256sum <"$keyring"; } | sha256sum | cut -d' ' -f1)"
if [ "$force" -eq 0 ] && [ -f "$verified_stamp" ] && [ "$(cat "$verified_stamp")" = "$verification_key" ] && [ "$verify_only" -eq 0 ]; then
  echo "==> linux-$version was verified before (same tarball, signature and keyring)"
else
  verify
  mkdir -p "$(dirname "$verified_stamp")"
  echo "$verification_key" >"$verified_stamp"
fi
if [ "$verify_only" -eq 1 ]; then
  echo "verified linux-$version; stopping before the build (--verify-only)"
  exit 0
fi

# --- 3. configure ---------------------------------------------------------

[ -f "$fragment" ] || die "config fragment $fragment: no such file"
fragment="$(absolute "$fragment")"
missing=()
for tool in make gcc flex bison bc perl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -f /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  die "missing build tools: ${missing[*]}; run: apt-get install build-essential flex bison bc libelf-dev libssl-dev"
fi

source_dir="$work_dir/src/linux-$version"
build_dir="$work_dir/build/linux-$version"
if [ "$force" -eq 1 ] || [ ! -f "$source_dir/.banger-unpacked" ] \
    || [ "$(cat "$source_dir/.banger-unpacked")" != "$verification_key" ]; then
  step "unpack linux-$version"
  rm -rf "$source_dir" "$build_dir"
  mkdir -p "$tmp/src"
  tar -xJf "$tarball" -C "$tmp/src" --no-same-owner
  [ -d "$tmp/src/linux-$version" ] || die "$tarball does not hold linux-$version/"
  mkdir -p "$(dirname "$source_dir")"
  mv "$tmp/src/linux-$version" "$source_dir"
  echo "$verification_key" >"$source_dir/.banger-unpacked"
  step_done unpack
fi

step "configure (defconfig + $(basename "$fragment"))"
mkdir -p "$build_dir"
make -s -C "$source_dir" O="$build_dir" ARCH=x86_64 defconfig >"$tmp/config.log" 2>&1 \
  || { tail -n 20 "$tmp/config.log" >&2; die "make defconfig failed (log above)"; }
"$source_dir/scripts/kconfig/merge_config.sh" -m -O "$build_dir" \
  "$build_dir/.config" "$fragment" >>"$tmp/config.log" 2>&1 \
  || { tail -n 20 "$tmp/config.log" >&2; die "merging $fragment failed (log above)"; }
make -s -C "$source_dir" O="$build_dir" ARCH=x86_64 olddefconfig >>"$tmp/config.log" 2>&1 \
  || { tail -n 20 "$tmp/config.log" >&2; die "make olddefconfig failed (log above)"; }
# Report what the fragment asked for and Kconfig did not keep.
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      option="${line%%=*}"
      grep -qxF "$line" "$build_dir/.config" \
        || echo "    warning: $line requested, got: $(grep -E "^(# )?${option}[= ]" "$build_dir/.config" || echo "absent")"
      ;;
    "# CONFIG_"*" is not set")
      option="${line#\# }"; option="${option%% *}"
      if grep -qE "^$option=[ym]" "$build_dir/.config"; then
        echo "    warning: $option requested off, is on (something selects it)"
      fi
      ;;
  esac
done <"$fragment"
for option in "${REQUIRED_OPTIONS[@]}"; do
  grep -qx "$option=y" "$build_dir/.config" \
    || die "$option is not built in after merging $fragment; a banger guest cannot boot without it"
done
step_done configure

# --- 4. build -------------------------------------------------------------

config_hash="$(sha256sum <"$build_dir/.config" | cut -d' ' -f1)"
if [ "$force" -eq 0 ] && [ -f "$output/vmlinux" ] && [ -f "$output/bzImage" ] \
    && [ -f "$output/build-key" ] && [ "$(cat "$output/build-key")" = "$verification_key $config_hash" ]; then
  echo "==> $output is up to date"
else
  step "build vmlinux and bzImage (-j$jobs)"
  make -C "$source_dir" O="$build_dir" ARCH=x86_64 -j"$jobs" vmlinux bzImage >"$build_dir/build.log" 2>&1 \
    || { tail -n 30 "$build_dir/build.log" >&2; die "the kernel build failed (log above; whole log: $build_dir/build.log)"; }
  step_done build
  mkdir -p "$output"
  rm -f "$output/build-key"
  install -m 644 "$build_dir/vmlinux" "$output/vmlinux"
  install -m 644 "$build_dir/arch/x86/boot/bzImage" "$output/bzImage"
  install -m 644 "$build_dir/.config" "$output/config"
  echo "$verification_key $config_hash" >"$output/build-key"
fi
echo "vmlinux: $output/vmlinux ($(du -h "$output/vmlinux" | cut -f1)), bzImage: $output/bzImage ($(du -h "$output/bzImage" | cut -f1))"

# --- 5. register ----------------------------------------------------------

import_command="banger kernel import $name $output/vmlinux --cmdline '$DEFAULT_CMDLINE'"
if [ "$do_import" -eq 0 ]; then
  echo "not registering (--no-import); to register: $import_command"
elif ! command -v banger >/dev/null 2>&1; then
  echo "banger is not on PATH; to register: $import_command"
elif ! banger daemon status >/dev/null 2>&1; then
  echo "the banger daemon does not answer; to register: $import_command"
elif banger kernel show "$name" >/dev/null 2>&1; then
  echo "kernel $name is already registered; to replace it: banger kernel rm $name && $import_command"
else
  banger kernel import "$name" "$output/vmlinux" --cmdline "$DEFAULT_CMDLINE"
fi
