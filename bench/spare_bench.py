"""What the compiler's spare context buys and costs: `rpx-compiler --spare-context` (set through
RPX_COMPILER_SPARE) `after-fork` (the default) vs `always`, interleaved, --reps fresh clusters each.

Per cluster (n engines): start, one cell on every engine (`let _a = 1;`), then wait until the
compiler's process tree has used no CPU for 3 s (its warm-ups are over) and read its RSS (compiler
and descendants, psutil) and the whole cluster's; then time the first cell that only engine 0
runs (a fork: its group needs a context of its own), then one on engine 1 only (the second fork).
A run = execute(block=True) through ipyparallel's client against rpx's controller.

usage: .venv/bin/python bench/spare_bench.py [--reps 3] [--n 4]
(cargo build --release first.) Writes bench/results/spare-<timestamp>.{json,md}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ipyparallel as ipp
import psutil

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"


def tree(p):
    try:
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def rss_mib(procs):
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_s(procs):
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def find(name, rpx_dir):
    for p in psutil.process_iter(["name", "environ", "cmdline"]):
        try:
            if p.info["name"] == name and (p.info["environ"] or {}).get("RPX_DIR") == str(rpx_dir):
                return p
        except psutil.Error:
            pass
    return None


def wait_quiet(procs_fn, quiet_s=3.0, limit=600):
    """Until the processes used < 2% of a core over quiet_s seconds (bounded)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        a = cpu_s(procs_fn())
        time.sleep(quiet_s)
        if cpu_s(procs_fn()) - a < 0.02 * quiet_s:
            return True
    return False


def timed(view, code):
    t0 = time.perf_counter()
    view.execute(code, block=True)
    return time.perf_counter() - t0


def one(policy, n):
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-spare-"))
    env = dict(os.environ, RPX_DIR=str(rpx_dir), RPX_COMPILER_SPARE=policy)
    subprocess.run([str(RELEASE / "ipcluster"), "start", "-n", str(n), "--daemonize"], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        conn = rpx_dir / "profile_default" / "security" / "ipcontroller-client.json"
        rc = ipp.Client(str(conn), timeout=30)  # positional: url_file= is ignored by 9.2
        rc.wait_for_engines(n, timeout=60)
        first = timed(rc[:], "let _a = 1;")
        comp = find("rpx-compiler", rpx_dir)
        wait_quiet(lambda: tree(comp))
        daemon = find("ipcluster", rpx_dir)
        r = {"policy": policy, "first_cell_s": first, "compiler_idle_mib": rss_mib(tree(comp)),
             "cluster_idle_mib": rss_mib(tree(daemon)) if daemon else None}
        r["fork1_s"] = timed(rc[0], "let _b = 2;")
        r["fork2_s"] = timed(rc[1], "let _c = 3;")
        wait_quiet(lambda: tree(comp))
        r["compiler_after_mib"] = rss_mib(tree(comp))
        rc.close()
        return r
    finally:
        subprocess.run([str(RELEASE / "ipcluster"), "stop"], env=env, capture_output=True, timeout=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    runs = []
    for i in range(args.reps):
        for policy in ("after-fork", "always"):
            r = one(policy, args.n)
            runs.append(r)
            print(json.dumps(r), file=sys.stderr)
    keys = ["compiler_idle_mib", "cluster_idle_mib", "fork1_s", "fork2_s", "compiler_after_mib", "first_cell_s"]
    med = {p: {k: statistics.median([r[k] for r in runs if r["policy"] == p and r[k] is not None] or [0])
               for k in keys} for p in ("after-fork", "always")}
    lines = [f"| measure (median of {args.reps}, n={args.n}, load {os.getloadavg()[0]:.1f}) | after-fork | always |",
             "|---|---:|---:|"]
    for k in keys:
        lines.append(f"| {k} | {med['after-fork'][k]:.2f} | {med['always'][k]:.2f} |")
    md = "\n".join(lines)
    print(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench" / "results" / f"spare-{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "median": med}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(f"results: {out}.json / .md", file=sys.stderr)


if __name__ == "__main__":
    main()
