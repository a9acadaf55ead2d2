#!/usr/bin/env bash
# Every row of issue 11's table, rpx next to ipyparallel 9 (each benchmark runs both in one run),
# then the table itself (bench/issue_table.py: values, ratios, targets, met or not).
# usage: bench/all.sh [PYTHON]
#   PYTHON: a Python with ipyparallel 9, psutil, numpy and jupyter_client (default: the
#   project's .venv/bin/python, made by scripts/test.sh). BENCH_PEERS is passed to
#   client_bench.sh ("ipp dask ray" adds Dask and Ray). The cross-host rows need root (network
#   namespaces); without it they are skipped. BENCH_KERNEL_CACHE: where the kernel's prepared
#   client crate is kept between runs (default: target/bench-kernel-cache). BENCH_PAIRS (3):
#   rpx / ipyparallel pairs of the alternated task benchmark. BENCH_LOOP_REPS (7): transfers of
#   the second data run, whose medians are the steady state (client_bench.sh's 3 repetitions
#   are mostly first transfers of a size). BENCH_HALTPOLL_PAIRS (2): pairs of bench/haltpoll.py
#   (root, on a VM with cpuidle's haltpoll: the round trips with idle CPUs halting at once and
#   polling first; the machine's setting is put back).
# About 50 minutes on 2 cores. Results: bench/results/*, the table in
# bench/results/issue11-<time>.md.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$here/.venv/bin/python}
stamp=$(date +%Y%m%d-%H%M%S)
cd "$here"
cargo build --release --workspace --examples >/dev/null
echo "=== client benchmark: round trips, tasks, 100 MB, closures ($(date +%T))"
bash bench/client_bench.sh "$py"
echo "=== 100 MB transfers in a loop of ${BENCH_LOOP_REPS:-7}, rpx then ipyparallel ($(date +%T))"
BENCH_ONLY=data BENCH_REPS=${BENCH_LOOP_REPS:-7} BENCH_PEERS=ipp BENCH_NAME=data-loop bash bench/client_bench.sh "$py" | tail -12
echo "=== 10,000 tasks, rpx and ipyparallel run by turns ($(date +%T))"
"$py" bench/tasks_alternated.py --pairs "${BENCH_PAIRS:-3}" "bench/results/tasks-alternated-$stamp.json"
echo "=== 10,000 tasks of a 4.7 KB closure and of a one-line one, by turns ($(date +%T))"
target/release/examples/closure_size 5 "bench/results/closure-size-$stamp.json" | tail -1
echo "=== cluster benchmark: start-up, cells on 8 vs 1 engine, memory ($(date +%T))"
"$py" bench/cluster_bench.py --reps "${BENCH_REPS:-3}" | tail -20
if [ "$(id -u)" = 0 ]; then
    echo "=== 100 MB to engines on another host ($(date +%T))"
    "$py" bench/multihost_data.py --reps "${BENCH_REPS:-3}" --with-buffers
else
    echo "=== not root: the cross-host rows are skipped"
fi
echo "=== the first rpx:: cell of a fresh kernel ($(date +%T))"
cache=${BENCH_KERNEL_CACHE:-$here/target/bench-kernel-cache}
mkdir -p "$cache" && chmod 700 "$cache"
"$py" bench/kernel_bench.py --first-rpx "$cache" --reps 3 2>&1 | grep -v '^ *Compiling'
echo "=== the transport floor under a round trip and a 100 MB push ($(date +%T))"
target/release/examples/hop_floor 5 "bench/results/hop-floor-$stamp.json" >/dev/null
echo "=== the same floor and rpx's round trips with every process on one CPU ($(date +%T))"
cpu=$("$py" -c 'import os; print(min(os.sched_getaffinity(0)))')
taskset -c "$cpu" target/release/examples/hop_floor 5 "bench/results/hop-floor-one-cpu-$stamp.json" >/dev/null
BENCH_ONLY=latency taskset -c "$cpu" target/release/examples/bench_ops "bench/results/latency-one-cpu-$stamp.json" >/dev/null 2>&1
if [ "$(id -u)" = 0 ] && [ -e /sys/module/haltpoll/parameters/guest_halt_poll_ns ]; then
    echo "=== round trips by turns, this VM's idle CPUs halting at once and polling first ($(date +%T))"
    "$py" bench/haltpoll.py --pairs "${BENCH_HALTPOLL_PAIRS:-2}" "bench/results/haltpoll-$stamp.json" | tail -3
fi
echo "=== the wire protocol's own CPU under a round trip ($(date +%T))"
target/release/examples/protocol_cost 7 "bench/results/protocol-cost-$stamp.json" >/dev/null
if [ "$(id -u)" = 0 ] && command -v perf >/dev/null; then
    echo "=== where a round trip's time goes, process by process ($(date +%T))"
    "$py" bench/roundtrip_profile.py target/release "bench/results/roundtrip-profile-$stamp.md"
    echo "=== where the same-host 100 MB transfers' time goes ($(date +%T))"
    "$py" bench/data_profile.py target/release "bench/results/data-profile-$stamp.md"
fi
"$py" bench/issue_table.py | tee "bench/results/issue11-$stamp.md"
