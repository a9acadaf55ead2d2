#!/usr/bin/env bash
# Two builds of rpx, alternated on the load-balanced task benchmark (bench_ops
# BENCH_ONLY=throughput: 10,000 trivial tasks at chunksize 1 on 2 engines, and the CPU each
# process spends per task), so that drift in the machine's load hits both alike.
#
# usage: bench/ab_tasks.sh DIR_A DIR_B [ROUNDS (5)] [OUT (bench/results/ab-tasks-<time>.txt)]
#   DIR_A, DIR_B: directories holding one build's ipcluster, ipcontroller, ipengine,
#   rpx-compiler and bench_ops, e.g. for the checked-out revision:
#     cargo build --release --workspace --examples
#     mkdir -p /path/to/a && cp target/release/{ipcluster,ipcontroller,ipengine,rpx-compiler} \
#         target/release/examples/bench_ops /path/to/a
#   BENCH_REPS (3) maps per run. Each run starts its own cluster from its directory
#   (RPX_BIN_DIR) and waits for the machine to be quiet first.
set -eu
a=$(cd "$1" && pwd)
b=$(cd "$2" && pwd)
rounds=${3:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
out=${4:-$here/bench/results/ab-tasks-$(date +%Y%m%d-%H%M%S).txt}
py=$(command -v python3)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for d in "$a" "$b"; do
    for f in ipcluster ipcontroller ipengine rpx-compiler bench_ops; do
        [ -x "$d/$f" ] || { echo "$d/$f is missing" >&2; exit 2; }
    done
done
{
    echo "# bench/ab_tasks.sh, $(date -u +%FT%TZ), $(nproc) cores, BENCH_REPS=${BENCH_REPS:-3}"
    echo "# A = $a"
    echo "# B = $b"
    echo "# round build tasks/s(median of the run's maps) then CPU µs per task by process"
} > "$out"
for r in $(seq 1 "$rounds"); do
    for v in A B; do
        d=$a
        [ "$v" = B ] && d=$b
        RPX_BIN_DIR=$d BENCH_ONLY=throughput "$d/bench_ops" "$tmp/$v-$r.json" > "$tmp/$v-$r.log" 2>&1
        "$py" - "$tmp/$v-$r.json" "$r" "$v" >> "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
cpu = " ".join(f"{k.rsplit('_', 1)[1]}={d[k]['median']:.1f}" for k in sorted(d)
               if k.startswith("lb_map_cpu_us_per_task_") and not k.endswith("compiler"))
print(sys.argv[2], sys.argv[3], round(d["lb_map_tasks_per_s"]["median"]), cpu)
PY
        tail -1 "$out"
    done
done
"$py" - "$out" >> "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l[:1].isdigit()]
by = {v: [int(r[2]) for r in rows if r[1] == v] for v in "AB"}
a, b = statistics.median(by["A"]), statistics.median(by["B"])
wins = sum(y > x for x, y in zip(by["A"], by["B"]))
print(f"# medians: A {a:.0f}, B {b:.0f} tasks/s (B/A {b / a:.3f}); B faster in {wins} of {len(by['B'])} rounds")
PY
tail -1 "$out"
echo "results: $out"
