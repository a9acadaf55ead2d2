"""The rpx kernel, measured through a real Jupyter client (jupyter_client), in one run:

1. start-up: from `KernelManager.start_kernel()` until the reply to a first trivial cell
   (`1 + 1`), for the `rpx` kernel and for evcxr_jupyter (the plain evcxr kernel) side by side,
   interleaved, --reps times each. Also until `kernel_info_reply` (the kernel is up).
2. `%px` of a trivial cell on N engines (default 8) vs the same cell run locally in the kernel
   (target: at most 1.5x). The cell is `let _t: u64 = K;` with K fresh each run, so neither side
   can reuse an earlier compile; runs interleaved, 2 warm-ups, then --cells timed runs each; a run
   is execute until the reply and the cell's `status: idle`.

usage: .venv/bin/python bench/kernel_bench.py [--reps 3] [--cells 10] [--n 8]
       [--evcxr-jupyter PATH]   (default: `evcxr_jupyter` on PATH or /work/tools/evcxr/bin)
(cargo build --release first.) Starts its own cluster (`ipcluster start -n N --daemonize`) in a
temporary RPX_DIR and stops it at the end. Prints a markdown table and writes JSON to
bench/results/kernel-<timestamp>.json.
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
from queue import Empty

from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"


def run_cell(kc, code, timeout=600):
    """Execute and wait for the reply and the cell's idle status; returns (seconds, reply content)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    reply, idle = None, False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{code!r} did not finish in {timeout} s")
        if not idle:
            try:
                m = kc.get_iopub_msg(timeout=0.05)
                if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status" \
                        and m["content"]["execution_state"] == "idle":
                    idle = True
            except Empty:
                pass
        if reply is None:
            try:
                r = kc.get_shell_msg(timeout=0.01)
                if r["parent_header"].get("msg_id") == msg_id:
                    reply = r["content"]
            except Empty:
                pass
    return time.perf_counter() - t0, reply


def start_and_first_cell(kernel_name, env):
    km = KernelManager(kernel_name=kernel_name)
    t0 = time.perf_counter()
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    ready = time.perf_counter() - t0
    _, reply = run_cell(kc, "1 + 1")
    first = time.perf_counter() - t0
    if reply["status"] != "ok":
        raise RuntimeError(f"{kernel_name}: first cell failed: {reply}")
    return km, kc, ready, first


def stop(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def summary(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def find_evcxr_jupyter(arg):
    for c in [arg, shutil.which("evcxr_jupyter"), "/work/tools/evcxr/bin/evcxr_jupyter"]:
        if c and Path(c).is_file():
            return c
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--evcxr-jupyter")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rpx-kbench-"))
    kernels = tmp / "share" / "jupyter" / "kernels"
    subprocess.run([str(RELEASE / "rpx-kernel"), "install", "--prefix", str(tmp)], check=True, capture_output=True)
    evcxr = find_evcxr_jupyter(args.evcxr_jupyter)
    if evcxr:
        (kernels / "evcxr").mkdir(parents=True, exist_ok=True)
        (kernels / "evcxr" / "kernel.json").write_text(json.dumps({
            "argv": [evcxr, "--control_file", "{connection_file}"], "display_name": "Rust (evcxr)",
            "language": "rust", "interrupt_mode": "message"}))
    else:
        print("evcxr_jupyter not found: start-up is measured for rpx only", file=sys.stderr)
    os.environ["JUPYTER_PATH"] = str(tmp / "share" / "jupyter")
    rpx_dir = tmp / "rpx"
    env = dict(os.environ, RPX_DIR=str(rpx_dir), RPX_PROFILE="default", RUST_BACKTRACE="0")
    env.pop("RUST_LOG", None)

    results = {"machine": {"cpus": os.cpu_count()}, "startup": {}, "px": {}}
    # 1. start-up, interleaved.
    starts = {"rpx": {"ready": [], "first_cell": []}}
    if evcxr:
        starts["evcxr"] = {"ready": [], "first_cell": []}
    for _ in range(args.reps):
        for name in starts:
            km, kc, ready, first = start_and_first_cell(name, env)
            stop(km, kc)
            starts[name]["ready"].append(ready)
            starts[name]["first_cell"].append(first)
            print(f"start-up {name}: ready {ready:.2f} s, first cell {first:.2f} s", file=sys.stderr)
    results["startup"] = {k: {m: summary(v) for m, v in d.items()} for k, d in starts.items()}

    # 2. %px on N engines vs local.
    subprocess.run([str(RELEASE / "ipcluster"), "start", "-n", str(args.n), "--daemonize"], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        km, kc, _, _ = start_and_first_cell("rpx", env)
        try:
            _, r = run_cell(kc, "%px let _warm: u64 = 0;")
            if r["status"] != "ok":
                raise RuntimeError(f"%px failed: {r}")
            local, px = [], []
            k = 0
            for i in range(2 + args.cells):
                k += 1
                t_local, r1 = run_cell(kc, f"let _t: u64 = {k};")
                k += 1
                t_px, r2 = run_cell(kc, f"%px let _t: u64 = {k};")
                if r1["status"] != "ok" or r2["status"] != "ok":
                    raise RuntimeError(f"cell failed: {r1} {r2}")
                if i >= 2:
                    local.append(t_local)
                    px.append(t_px)
            results["px"] = {"engines": args.n, "local": summary(local), "px": summary(px),
                             "ratio_of_medians": statistics.median(px) / statistics.median(local)}
        finally:
            stop(km, kc)
    finally:
        subprocess.run([str(RELEASE / "ipcluster"), "stop"], env=env, capture_output=True, timeout=120)

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"kernel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n| measure | rpx | evcxr_jupyter | ratio |\n|---|---|---|---|")
    s = results["startup"]
    for m in ("ready", "first_cell"):
        r = s["rpx"][m]["median"]
        e = s.get("evcxr", {}).get(m, {}).get("median")
        print(f"| start until {m.replace('_', ' ')} (median of {args.reps}) | {r:.2f} s | "
              f"{'-' if e is None else f'{e:.2f} s'} | {'-' if e is None else f'{r / e:.2f}x'} |")
    p = results["px"]
    print(f"\n| trivial cell (median of {args.cells}) | time |\n|---|---|")
    print(f"| local (kernel's evcxr) | {p['local']['median'] * 1000:.0f} ms |")
    print(f"| %px on {p['engines']} engines | {p['px']['median'] * 1000:.0f} ms |")
    print(f"| ratio %px / local | {p['ratio_of_medians']:.2f}x (target <= 1.5x) |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
