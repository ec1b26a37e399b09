#!/usr/bin/env bash
# Tests the signature checks of scripts/make-generic-kernel.sh without kernel
# sources or network: a throwaway GnuPG home, local keys, a fake tarball and
# detached signatures. Each case runs the script with --verify-only (and a
# work dir in a temp dir), so nothing is ever built.
#
#   scripts/tests/test-make-generic-kernel.sh
#
# Needs gpg, gpgv, xz and tar; no root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/../make-generic-kernel.sh"
shipped_keyring="$here/../../keys/kernel.org-release-keys.gpg"

for tool in gpg gpgv gpgconf xz tar; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: $tool is missing (apt-get install gnupg gpgv xz-utils)" >&2
    exit 1
  }
done

tmp="$(mktemp -d)"
export GNUPGHOME="$tmp/gnupg"
cleanup() {
  local status=$?
  gpgconf --kill all >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT

mkdir -m 700 "$GNUPGHOME"
new_key() {
  gpg --batch --quiet --passphrase '' --quick-generate-key "$1" ed25519 sign never 2>/dev/null
  gpg --batch --with-colons --list-keys "$1" 2>/dev/null | awk -F: '$1 == "fpr" {print $10; exit}'
}
trusted="$(new_key 'banger test release key <trusted@example.invalid>')"
stranger="$(new_key 'someone else <stranger@example.invalid>')"
gpg --batch --export "$trusted" >"$tmp/keyring.gpg"

version=6.1.999
make_tarball() { # DIR CONTENT: DIR/linux-$version.tar and .tar.xz
  mkdir -p "$1/tree/linux-$version"
  printf '%s\n' "$2" >"$1/tree/linux-$version/Makefile"
  tar -C "$1/tree" -cf "$1/linux-$version.tar" "linux-$version"
  xz -k -T1 "$1/linux-$version.tar"
}
sign() { # KEY TAR SIGNATURE (armored, as kernel.org's .tar.sign)
  gpg --batch --quiet --yes --armor --local-user "$1" --output "$3" --detach-sign "$2"
}

good="$tmp/good"
make_tarball "$good" "the real thing"
sign "$trusted" "$good/linux-$version.tar" "$good/linux-$version.tar.sign"
sign "$stranger" "$good/linux-$version.tar" "$good/stranger.tar.sign"

tampered="$tmp/tampered"
make_tarball "$tampered" "the real thing, with a backdoor"
cp "$good/linux-$version.tar.sign" "$tampered/"

printf 'not a signature\n' >"$tmp/garbage.sign"
printf 'not xz at all\n' >"$tmp/linux-$version.tar.xz"

passed=0
failed=0
out="$tmp/out"
run() { # run the script; sets $status, output in $out
  local work="$tmp/work"
  set +e
  "$script" --work-dir "$work" --no-import "$@" >"$out" 2>&1
  status=$?
  set -e
}
pass() { passed=$((passed + 1)); echo "ok - $1"; }
fail() {
  failed=$((failed + 1))
  echo "not ok - $1: $2"
  sed 's/^/    | /' "$out"
}
expect_success() { # NAME PATTERN ARGS...
  local name="$1" pattern="$2"; shift 2
  run "$@"
  if [ "$status" -ne 0 ]; then fail "$name" "exit status $status, expected 0"
  elif ! grep -qE -- "$pattern" "$out"; then fail "$name" "output lacks /$pattern/"
  else pass "$name"; fi
}
expect_refusal() { # NAME PATTERN ARGS...
  local name="$1" pattern="$2"; shift 2
  run "$@"
  if [ "$status" -eq 0 ]; then fail "$name" "exit status 0, expected a refusal"
  elif ! grep -qE -- "$pattern" "$out"; then fail "$name" "output lacks /$pattern/"
  else pass "$name"; fi
}

out="$tmp/shipped-keys"
gpg --batch --with-colons --show-keys "$shipped_keyring" >"$out" 2>&1 || true
if grep -q "^fpr:*ABAF11C65A2970B130ABE3C479BE3E4300411886:" "$out" \
    && grep -q "^fpr:*647F28654894E3BD457199BE38DBBDC86092693E:" "$out"; then
  pass "the shipped keyring holds the Torvalds and Kroah-Hartman keys"
else
  fail "the shipped keyring holds the Torvalds and Kroah-Hartman keys" "fingerprints not found"
fi

out="$tmp/out"
expect_success "a good signature is accepted" "good signature from $trusted" \
  --tarball "$good/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only
if grep -q "stopping before the build" "$out" && [ ! -e "$tmp/work/src" ] && [ ! -e "$tmp/work/build" ]; then
  pass "--verify-only stops before unpacking or building"
else
  fail "--verify-only stops before unpacking or building" "found $(ls "$tmp/work")"
fi
if compgen -G "$tmp/work/.tmp.*" >/dev/null; then
  fail "temp dirs are removed" "left: $(ls -a "$tmp/work")"
else
  pass "temp dirs are removed"
fi

expect_success "the version comes from the tarball's name" "verified linux-$version" \
  --tarball "$good/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only

expect_refusal "a tampered tarball is refused" "BAD signature.*refusing to build" \
  --tarball "$tampered/linux-$version.tar.xz" --signature "$tampered/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only

expect_refusal "a signature from an unknown key is refused" \
  "signed by key [0-9A-F]+, which is not in .*keyring.gpg; refusing to build" \
  --tarball "$good/linux-$version.tar.xz" --signature "$good/stranger.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only

expect_refusal "the shipped kernel.org keyring refuses a non-kernel.org key and says how to fetch keys" \
  "recv-keys ABAF11C65A2970B130ABE3C479BE3E4300411886 647F28654894E3BD457199BE38DBBDC86092693E" \
  --tarball "$good/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --verify-only

expect_refusal "a missing keyring is refused with how to fetch the keys" \
  "keyring .* is missing or empty" \
  --tarball "$good/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/no-such-keyring.gpg" --verify-only
if grep -q "gpg --keyserver" "$out"; then
  pass "the missing-keyring error shows the recv-keys command"
else
  fail "the missing-keyring error shows the recv-keys command" "no gpg --keyserver line"
fi

expect_refusal "a file that is not a signature is refused" "is not an OpenPGP signature" \
  --tarball "$good/linux-$version.tar.xz" --signature "$tmp/garbage.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only

expect_refusal "a tarball that is not xz is refused" "cannot decompress" \
  --tarball "$tmp/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only

expect_refusal "a tarball without a signature is refused" "unsigned sources are not built" \
  --tarball "$good/linux-$version.tar.xz" --keyring "$tmp/keyring.gpg"

expect_refusal "a bad version is refused" "is not a kernel version" \
  --version 'v6.1; rm -rf /' --verify-only

# A verification is remembered only for the same files: after a tampered
# file takes the good one's place, the next run checks again and refuses.
cp "$good/linux-$version.tar.xz" "$tmp/swap.tar.xz"
mkdir -p "$tmp/swap" && cp "$tmp/swap.tar.xz" "$tmp/swap/linux-$version.tar.xz"
run --tarball "$tmp/swap/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --verify-only
cp "$tampered/linux-$version.tar.xz" "$tmp/swap/linux-$version.tar.xz"
expect_refusal "a cached verification does not cover a changed tarball" "BAD signature" \
  --tarball "$tmp/swap/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --config /dev/null

# Without --verify-only a good tarball goes on to the build, which this fake
# tree cannot do: what matters is that it got past verification.
run --tarball "$good/linux-$version.tar.xz" --signature "$good/linux-$version.tar.sign" \
  --keyring "$tmp/keyring.gpg" --jobs 1
if grep -q "good signature\|was verified before" "$out" && ! grep -q "BAD signature" "$out"; then
  pass "a verified tarball proceeds past verification"
else
  fail "a verified tarball proceeds past verification" "status $status"
fi

echo
echo "test-make-generic-kernel: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
