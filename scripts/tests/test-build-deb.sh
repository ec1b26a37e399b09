#!/usr/bin/env bash
# Builds the Debian package from the debug binaries and checks what it holds
# without installing it: control fields, the conffile, every installed path,
# the unit's ExecStart, the generated config (all defaults, parsed by the
# packaged daemon), manual pages, completions, and that the packaged CLI runs.
#
#   scripts/tests/test-build-deb.sh   (after cargo build --workspace --bins;
#   BANGER_AGENT_STATIC names the static agent, else it is built)
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "test-build-deb: FAIL: $*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
agent=${BANGER_AGENT_STATIC:-$(scripts/build-agent.sh)}
deb=$(scripts/build-deb.sh --binaries target/debug --agent "$agent" --out "$work/out")
[ -f "$deb" ] || fail "no package at $deb"

dpkg-deb --field "$deb" Package | grep -qx banger || fail "Package field"
dpkg-deb --field "$deb" Depends | grep -q nftables || fail "Depends lacks nftables"
dpkg-deb --info "$deb" conffiles | grep -qx /etc/banger/config.toml || fail "config.toml is not a conffile"
for script in postinst prerm postrm; do
    dpkg-deb --info "$deb" "$script" | head -n 1 | grep -q '^#!/bin/sh' || fail "$script missing"
    dpkg-deb --info "$deb" "$script" > "$work/$script"
    sh -n "$work/$script" || fail "$script is not valid sh"
done

dpkg-deb --contents "$deb" | awk '{print $6}' | sed 's|^\./|/|' > "$work/contents"
for path in /usr/bin/bangerd /usr/bin/banger /usr/bin/banger-make-golden \
    /usr/lib/banger/banger-agent /lib/systemd/system/bangerd.service \
    /etc/banger/config.toml /usr/share/man/man1/banger.1.gz \
    /usr/share/man/man1/banger-vm-create.1.gz \
    /usr/share/bash-completion/completions/banger \
    /usr/share/zsh/vendor-completions/_banger \
    /usr/share/fish/vendor_completions.d/banger.fish \
    /usr/share/banger/golden/build.sh /usr/share/doc/banger/README.md \
    /usr/share/doc/banger/copyright; do
    grep -qx "$path" "$work/contents" || fail "$path is not in the package"
done
dpkg-deb --contents "$deb" | awk '{print $2}' | grep -vqx root/root && fail "a file not owned by root"

root="$work/root"
dpkg-deb --extract "$deb" "$root"
grep -qx 'ExecStart=/usr/bin/bangerd' "$root/lib/systemd/system/bangerd.service" || fail "unit ExecStart"
grep -qx 'KillMode=process' "$root/lib/systemd/system/bangerd.service" || fail "unit KillMode"
"$root/usr/bin/banger" --version | grep -q '^banger ' || fail "packaged banger does not run"
bash -n "$root/usr/share/bash-completion/completions/banger" || fail "bash completion syntax"
# The shipped config is every default, commented out: uncommented, the daemon
# must accept it as is.
grep -q '^# \[vm\]' "$root/etc/banger/config.toml" || fail "config.toml lacks the [vm] section"
grep -v '^# banger\|^# commented\|^# /usr' "$root/etc/banger/config.toml" | sed 's/^# //' > "$work/config.toml"
"$root/usr/bin/bangerd" --config "$work/config.toml" --check-config \
    || fail "the packaged daemon refuses the shipped defaults"
"$root/usr/bin/banger-make-golden" --help 2>&1 | grep -q 'Usage:' || true
"$root/usr/share/banger/golden/build.sh" --help | grep -q '^Usage:' || fail "golden recipe does not run"
echo "test-build-deb: ok ($deb: $(wc -l < "$work/contents") entries)"
