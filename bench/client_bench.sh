#!/usr/bin/env bash
# rpx's client benchmark and ipyparallel's peer benchmark, one after the other in one run, with
# the same shapes (2 engines): apply round trip, 10,000 trivial load-balanced tasks at
# chunksize 1, 100 MB push / pull / scatter / gather; rpx also times a new closure's compile.
# usage: bench/client_bench.sh [PYTHON]   (PYTHON: a Python with ipyparallel 9, psutil, numpy;
#        default /work/venv/bin/python). BENCH_REPS (3) applies to both.
# Results: bench/results/client-<time>-{rpx,ipp}.json
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-/work/venv/bin/python}
stamp=$(date +%Y%m%d-%H%M%S)
out="$here/bench/results"
mkdir -p "$out"
cd "$here"
cargo build --release --workspace --examples >/dev/null
echo "=== rpx ($(date +%T))"
./target/release/examples/bench_ops "$out/client-$stamp-rpx.json" >/dev/null
echo "=== ipyparallel ($(date +%T))"
# The peer scripts keep their state and results next to their own directory: run a copy.
state=$(mktemp -d)
mkdir -p "$state/bench"
cp "$here"/../shared/bench/peers/*.py "$state/bench/"
"$py" "$state/bench/ipp_ops.py" latency throughput data 2>&1 | tail -25
cp "$state"/results/ipp_ops_latency_throughput_data.json "$out/client-$stamp-ipp.json"
rm -rf "$state"
echo "results: $out/client-$stamp-{rpx,ipp}.json"
