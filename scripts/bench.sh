#!/usr/bin/env bash
# banger's benchmark suite (crates/banger-bench) on release binaries: every
# case in one run, each figure next to a baseline measured in the same run
# and the goal it is held to. As root, the real-guest case gets the static
# agent (built here) and the golden image when it is there; set
# BANGER_BENCH_FIRECRACKER=PATH for the real-Firecracker case.
# Usage: scripts/bench.sh [--json] [--quick] [--case CASE]...
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --locked >&2
if [ "$(id -u)" = 0 ] && [ -z "${BANGER_AGENT_STATIC:-}" ]; then
    BANGER_AGENT_STATIC="$(scripts/build-agent.sh)"
    export BANGER_AGENT_STATIC
fi
golden=/var/cache/banger/golden/golden-minimal.ext4
if [ -z "${BANGER_GOLDEN_IMAGE:-}" ] && [ -f "$golden" ]; then
    export BANGER_GOLDEN_IMAGE="$golden"
fi
exec target/release/banger-bench "$@"
