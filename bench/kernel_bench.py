"""The rpx kernel, measured through a real Jupyter client (jupyter_client), in one run:

1. start-up: from `KernelManager.start_kernel()` until the reply to a first trivial cell
   (`1 + 1`), for the `rpx` kernel and for evcxr_jupyter (the plain evcxr kernel) side by side,
   interleaved, --reps times each. Also until `kernel_info_reply` (the kernel is up).
2. `%px` of a trivial cell on N engines (default 8) vs the same cell run locally in the kernel
   (target: at most 1.5x). The cell is `let _t: u64 = K;` with K fresh each run, so neither side
   can reuse an earlier compile; runs interleaved, 2 warm-ups, then --cells timed runs each; a run
   is execute until the reply and the cell's `status: idle`.

3. with --first-rpx CACHE_DIR (only this): the first `rpx::` cell of fresh kernels whose
   XDG_CACHE_HOME is CACHE_DIR, after `rpx-kernel prepare` (timed too), --reps times; with
   --cold also one kernel whose caches are empty (the build a user waited on before `prepare`).
   Also records the crates cargo compiled in each prepared first cell (expected: none).
   Writes bench/results/kernel-first-rpx-<timestamp>.json.

usage: .venv/bin/python bench/kernel_bench.py [--reps 3] [--cells 10] [--n 8]
       [--evcxr-jupyter PATH] [--first-rpx CACHE_DIR [--cold]]   (default: `evcxr_jupyter` on PATH)
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


def run_cell(kc, code, timeout=600, streams=None):
    """Execute and wait for the reply and the cell's idle status; returns (seconds, reply content).
    With `streams` (a list), the cell's stream output is appended to it."""
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
                elif m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream" and streams is not None:
                    streams.append(m["content"]["text"])
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
    for c in [arg, shutil.which("evcxr_jupyter")]:
        if c and Path(c).is_file():
            return c
    return None


RPX_CELL = 'println!("{}", std::any::type_name::<rpx::Client>());'


def first_rpx_cell(env):
    """A fresh kernel: its first (plain) cell, then the time of its first `rpx::` cell and the
    crates cargo compiled for it (evcxr shows `Compiling <crate>`; with a sound prepared crate,
    none: a list here means the prepared build was not fresh for the kernel's cargo)."""
    km = KernelManager(kernel_name="rpx")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        run_cell(kc, "1 + 1")
        streams = []
        took, reply = run_cell(kc, RPX_CELL, timeout=3600, streams=streams)
        if reply.get("status") != "ok":
            raise RuntimeError(f"the rpx cell failed: {reply}")
        compiled = [ln.split()[1] for ln in "".join(streams).splitlines() if ln.strip().startswith("Compiling ")]
        return took, compiled
    finally:
        stop(km, kc)


def first_rpx(args, tmp):
    """--first-rpx: the first `rpx::` cell of a kernel, with the client crate prepared (and cold)."""
    cache = Path(args.first_rpx).resolve()
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), RPX_DIR=str(tmp / "rpx"), RPX_KERNEL_PREPARE="0",
               RUST_BACKTRACE="0")
    os.environ["JUPYTER_PATH"] = str(tmp / "share" / "jupyter")
    results = {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}
    t0 = time.perf_counter()
    r = subprocess.run([str(RELEASE / "rpx-kernel"), "prepare"], env=env, capture_output=True, text=True, check=True)
    results["prepare"] = {"seconds": time.perf_counter() - t0, "output": r.stdout.strip()}
    print(f"prepare: {results['prepare']['seconds']:.1f} s ({r.stdout.strip()})", file=sys.stderr)
    prepared, recompiled = [], []
    for _ in range(args.reps):
        took, compiled = first_rpx_cell(env)
        prepared.append(took)
        recompiled.append(compiled)
        print(f"first rpx cell, prepared: {took:.2f} s; crates compiled: {len(compiled)} {compiled}", file=sys.stderr)
    results["prepared"] = summary(prepared)
    results["prepared_crates_compiled"] = recompiled
    if args.cold:
        cold_cache = Path(tempfile.mkdtemp(prefix="rpx-kbench-cold-"))
        cold, _ = first_rpx_cell(dict(env, XDG_CACHE_HOME=str(cold_cache)))
        shutil.rmtree(cold_cache, ignore_errors=True)
        print(f"first rpx cell, cold: {cold:.2f} s", file=sys.stderr)
        results["cold"] = cold
    out = ROOT / "bench" / "results" / f"kernel-first-rpx-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"| first `rpx::` cell of a fresh kernel | seconds |\n|---|---|")
    print(f"| prepared (median of {args.reps}) | {results['prepared']['median']:.2f} |")
    print(f"| crates compiled by those cells (prepared) | {max(len(c) for c in recompiled)} at most |")
    if "cold" in results:
        print(f"| nothing prepared, empty caches | {results['cold']:.2f} |")
    print(f"\n(`rpx-kernel prepare` took {results['prepare']['seconds']:.1f} s; results in {out})")
    shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--evcxr-jupyter")
    ap.add_argument("--first-rpx", metavar="CACHE_DIR",
                    help="measure only the first `rpx::` cell of fresh kernels whose XDG_CACHE_HOME is CACHE_DIR "
                         "(prepared first with `rpx-kernel prepare` if it is not)")
    ap.add_argument("--cold", action="store_true",
                    help="with --first-rpx: also one kernel with an empty cache (evcxr's too): minutes")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rpx-kbench-"))
    kernels = tmp / "share" / "jupyter" / "kernels"
    subprocess.run([str(RELEASE / "rpx-kernel"), "install", "--no-prepare", "--prefix", str(tmp)], check=True,
                   capture_output=True)
    if args.first_rpx:
        return first_rpx(args, tmp)
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
