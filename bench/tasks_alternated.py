"""10,000 trivial load-balanced tasks at chunksize 1: rpx and ipyparallel 9 run by turns.

usage: python bench/tasks_alternated.py [--pairs N] [--bin-dir DIR] [OUT.json]

Task throughput moves with the machine's load more than any other row (on a shared 2-core host,
rpx's CPU per task varies by half between runs an hour apart), and client_bench.sh measures the
two systems minutes apart. Here each pair runs rpx (`bench_ops`, BENCH_ONLY=throughput) and then
ipyparallel (`../shared/bench/peers/ipp_ops.py throughput`), both the median of their
BENCH_REPS (3) maps, so drift hits both alike; the summary gives each system's median over the
runs, their ratio, and the ratio pair by pair. Run with the Python that has ipyparallel (the
project's .venv). Writes bench/results/tasks-alternated-<time>.json unless OUT is given.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def copy_peers(state):
    """Copy the peer scripts into `state/bench`: they keep their state and results next to their
    own directory (`state/results`)."""
    (state / "bench").mkdir()
    for f in (ROOT.parent / "shared" / "bench" / "peers").glob("*.py"):
        shutil.copy(f, state / "bench")


def rpx_doc(bins, out, only):
    """`bench_ops` with BENCH_ONLY=`only` (`throughput`, `latency`): its report, written to `out`."""
    env = dict(os.environ, BENCH_ONLY=only, RPX_BIN_DIR=str(bins))
    subprocess.run([str(bins / "examples" / "bench_ops"), str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return json.loads(out.read_text())


def ipp_doc(state, part):
    """ipyparallel's peer script (copied into `state` by `copy_peers`) with one part
    (`throughput`, `latency`): its report."""
    subprocess.run([sys.executable, str(state / "bench" / "ipp_ops.py"), part], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    return json.loads((state / "results" / f"ipp_ops_{part}.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--bin-dir", type=Path, default=Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release")
    ap.add_argument("out", nargs="?", type=Path)
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    out = args.out or HERE / "results" / f"tasks-alternated-{time.strftime('%Y%m%d-%H%M%S')}.json"
    runs = []
    with tempfile.TemporaryDirectory(prefix="rpx-tasks-alt-") as tmp:
        state = Path(tmp)
        copy_peers(state)
        for pair in range(args.pairs):
            r = rpx_doc(args.bin_dir, state / f"rpx-{pair}.json", "throughput")["lb_map_tasks_per_s"]["median"]
            i = ipp_doc(state, "throughput")["throughput"]["lview_map_async_chunk1"]["tasks_per_s"]["median"]
            runs.append({"pair": pair + 1, "rpx_tasks_per_s": r, "ipp_tasks_per_s": i, "ratio": r / i})
            print(f"pair {pair + 1}: rpx {r:,.0f} tasks/s, ipyparallel {i:,.0f} tasks/s, x{r / i:.1f}", flush=True)
    rpx = statistics.median(x["rpx_tasks_per_s"] for x in runs)
    ipp = statistics.median(x["ipp_tasks_per_s"] for x in runs)
    summary = {"rpx_tasks_per_s": rpx, "ipp_tasks_per_s": ipp, "ratio_of_medians": rpx / ipp,
               "ratio_per_pair": [x["ratio"] for x in runs], "pairs": args.pairs,
               "reps_per_run": int(os.environ.get("BENCH_REPS", "3"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    print(f"medians: rpx {rpx:,.0f}, ipyparallel {ipp:,.0f} tasks/s: x{rpx / ipp:.1f} -> {out}")


if __name__ == "__main__":
    main()
