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
cargo test --workspace --locked -- "$@"
