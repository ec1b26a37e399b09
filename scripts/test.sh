#!/usr/bin/env bash
# Runs banger's whole test suite. Root-only tests skip with a printed reason
# when not run as root; CI runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# The integration tests drive the real binaries (bangerd, banger,
# fake-firecracker) from the target dir, so build them all first.
cargo build --workspace --bins --locked
# The static guest agent, for the tests that boot real guests with it.
BANGER_AGENT_STATIC="$(scripts/build-agent.sh)"
export BANGER_AGENT_STATIC
# The golden image (minimal flavour) for the end-to-end suite; debootstrap
# needs root and the Debian mirror. Cached by content key across runs. If it
# cannot be built, the suite prints SKIPPED with the reason.
golden=/var/cache/banger/golden/golden-minimal.ext4
if [ "$(id -u)" = 0 ]; then
    if images/golden/build.sh --minimal --no-import --output "$golden" >&2; then
        export BANGER_GOLDEN_IMAGE="$golden"
    else
        echo "warning: the golden image did not build; the real-guest suite will skip" >&2
    fi
fi
# The kernel-source verification of make-generic-kernel.sh, offline.
scripts/tests/test-make-generic-kernel.sh
# --no-fail-fast: one failing test binary must not hide the results of the
# ones after it; the exit status is still non-zero.
status=0
cargo test --workspace --locked --no-fail-fast -- "$@" || status=$?
# The Debian package, from the debug binaries: contents, conffile, unit,
# the shipped config accepted by the packaged daemon.
scripts/tests/test-build-deb.sh || status=$?
# The benchmark suite, quick (each case two or three times, tiny sizes, on
# the debug binaries built above), so it cannot rot. It fails only when a
# case errors, never on a time; figures come from scripts/bench.sh.
target/debug/banger-bench --quick || status=$?
exit "$status"
