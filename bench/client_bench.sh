#!/usr/bin/env bash
# rpx's client benchmark and ipyparallel's peer benchmark, one after the other in one run, with
# the same shapes (2 engines): apply round trip, 10,000 trivial load-balanced tasks at
# chunksize 1, 100 MB push / pull / scatter / gather; rpx also times a new closure's compile.
# usage: bench/client_bench.sh [PYTHON]   (PYTHON: a Python with ipyparallel 9, psutil, numpy,
#        and dask[distributed] / ray for those peers; default: the project's .venv/bin/python).
#        BENCH_REPS (3) applies to all. BENCH_PEERS (default "ipp"; "ipp dask ray" for all three)
#        picks the peers from ../shared/bench/peers, run one after the other after rpx.
#        BENCH_ONLY=data: only the 100 MB transfers (both systems).
#        BENCH_DATA_PLANE=both: rpx also measures the buffer path (shared memory off).
#        BENCH_NAME (client): the results' name (all.sh names its run of the transfers in a loop
#        "data-loop"). CARGO_TARGET_DIR is honoured.
# Results: bench/results/<name>-<time>-{rpx,<peer>}.json and <name>-<time>-summary.md (medians,
# and how many times rpx is faster than each peer: bench/client_summary.py).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$here/.venv/bin/python}
target=${CARGO_TARGET_DIR:-$here/target}
stamp=${BENCH_NAME:-client}-$(date +%Y%m%d-%H%M%S)
out="$here/bench/results"
mkdir -p "$out"
cd "$here"
cargo build --release --workspace --examples >/dev/null
parts="latency throughput data"
[ "${BENCH_ONLY:-}" = data ] && parts="data"
echo "=== rpx ($(date +%T))"
"$target/release/examples/bench_ops" "$out/$stamp-rpx.json" >/dev/null
# The peer scripts keep their state and results next to their own directory: run copies.
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
mkdir -p "$state/bench"
cp "$here"/../shared/bench/peers/*.py "$state/bench/"
peers=()
for peer in ${BENCH_PEERS:-ipp}; do
    echo "=== $peer ($(date +%T))"
    # shellcheck disable=SC2086
    "$py" "$state/bench/${peer}_ops.py" $parts 2>&1 | tail -25
    cp "$state"/results/${peer}_ops_${parts// /_}.json "$out/$stamp-$peer.json"
    peers+=("$peer=$out/$stamp-$peer.json")
done
"$py" "$here/bench/client_summary.py" "$out/$stamp-rpx.json" "${peers[@]}" > "$out/$stamp-summary.md"
if [ -f "$out/$stamp-ipp.json" ]; then
    "$py" - "$out/$stamp-rpx.json" "$out/$stamp-ipp.json" >> "$out/$stamp-summary.md" <<'PY'
import json, sys
rpx, ipp = (json.load(open(p)) for p in sys.argv[1:3])
d = ipp.get("data", {})
if any(k.endswith("_buffers") for k in rpx):
    print()
    print("| 100 MB, rpx's buffer path (shared memory off) | rpx GB/s (median) | ipyparallel GB/s (median) | rpx / ipyparallel |")
    print("|---|---|---|---|")
    for op, key in [("push (1 engine)", "push_1engine_MBps"), ("pull (1 engine)", "pull_1engine_MBps"), ("scatter (2 engines)", "scatter_2engines_MBps"), ("gather (2 engines)", "gather_2engines_MBps")]:
        name = op.split()[0]
        r = rpx.get(f"{name}_gb_per_s_buffers")
        if r and key in d:
            i = d[key]["median"] / 1000
            print(f"| {op} | {r['median']:.2f} (n={r['n']}, {r['min']:.2f}-{r['max']:.2f}) | {i:.2f} | x{r['median'] / i:.1f} |")
PY
fi
cat "$out/$stamp-summary.md"
echo "results: $out/$stamp-*.json, $out/$stamp-summary.md"
