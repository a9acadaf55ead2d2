#!/usr/bin/env bash
# Build rpx, start a local cluster (a controller, the shared compiler and 4 engines), run real
# Rust cells on every engine (each counts the primes in its slice of 0..2,000,000), print each
# engine's output and the total, then stop the cluster.
#
#   scripts/demo.sh            # 4 engines in a private temporary RPX_DIR
#   N=8 scripts/demo.sh        # 8 engines
#   RPX_DIR=~/.rpx scripts/demo.sh   # use (and keep) a given RPX_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}

# evcxr needs the standard library's source to type cells.
if command -v rustup >/dev/null 2>&1 && ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src
fi

echo "==> cargo build --release --workspace (a cold build compiles evcxr: ~15 min on 2 cores)"
cargo build --release --workspace

BIN=$PWD/target/release
own_dir=
if [ -z "${RPX_DIR:-}" ]; then
    RPX_DIR=$(mktemp -d -t rpx-demo.XXXXXX)
    own_dir=1
fi
export RPX_DIR
unset RPX_PROFILE

finish() {
    status=$?
    "$BIN/ipcluster" stop >/dev/null 2>&1 || true
    if [ "$status" -ne 0 ]; then
        echo "demo failed; logs are in $RPX_DIR/profile_default/log" >&2
    elif [ -n "$own_dir" ]; then
        rm -rf "$RPX_DIR"
    fi
    exit "$status"
}
trap finish EXIT

echo "==> ipcluster start -n $N --daemonize   (RPX_DIR=$RPX_DIR)"
"$BIN/ipcluster" start -n "$N" --daemonize
"$BIN/ipcluster" list
echo "==> rpx-demo: a first cell gives every engine its rank, then one cell runs on all engines"
cargo run --release -q -p rpx-tests --bin rpx-demo
echo "==> the rpx client: a load-balanced map of a closure (compiled once by the cluster), then push / scatter / execute / gather"
cargo run --release -q -p rpx --example map_squares
cargo run --release -q -p rpx --example data_movement
echo "==> ipcluster stop"
"$BIN/ipcluster" stop
