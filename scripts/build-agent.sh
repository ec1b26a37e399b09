#!/usr/bin/env bash
# Builds the guest agent as a static binary and prints its path.
# `--target` keeps crt-static away from build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked -p banger-agent --target "$target" >&2
binary="$PWD/target/$target/release/banger-agent"
# A dynamic agent would not run in a root file system without our libc.
if ! file -L "$binary" | grep -Eq 'static(ally|-pie) linked'; then
    echo "error: $binary is not statically linked: $(file -L "$binary")" >&2
    exit 1
fi
echo "$binary"
