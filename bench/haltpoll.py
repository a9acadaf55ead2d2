"""Round trips with this VM's idle CPUs halting at once, and with them polling first: rpx, the
floor under it and ipyparallel 9, by turns (root).

usage: sudo .venv/bin/python bench/haltpoll.py [--pairs N] [--poll-ns NS] [--bin-dir DIR] [OUT.json]

A virtual machine's idle CPU either halts at once (the host takes the CPU back, and waking it
means the host must run it again) or first polls for a while in case work comes (the guest's
cpuidle `haltpoll` driver, `/sys/module/haltpoll/parameters/guest_halt_poll_ns`; the kernel's
default is 200,000 ns). A round trip wakes a process on the other CPU at every hop, so the
setting is part of every round trip's cost, whoever's it is. Each pair runs, with the guest's
halt-polling at 0 and then at NS: `hop_floor 3` (the floor: the round trip's processes and hops
with nothing but zeromq and a pipe), `bench_ops` with BENCH_ONLY=latency (rpx's direct and
load-balanced round trips) and `../shared/bench/peers/ipp_ops.py latency` (ipyparallel's). The
machine's own value is put back when the script ends, also on an error or SIGTERM (not on
SIGKILL: then write it back by hand). Run with the Python that has ipyparallel (the project's
.venv). Writes bench/results/haltpoll-<time>.json unless OUT is given.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import client_summary
from tasks_alternated import ROOT, copy_peers, ipp_doc, rpx_doc

HERE = Path(__file__).resolve().parent
PARAM = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def floor_run(bins, out):
    subprocess.run([str(bins / "examples" / "hop_floor"), "3", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    doc = json.loads(out.read_text())
    return {"one_hop_us": doc["one_hop_us"]["median"], "guarded_us": doc["two_hops_pipe_guarded_us"]["median"]}


def round_trips(rpx, ipp):
    """Direct and load-balanced round trips (µs) from `bench_ops`'s and ipyparallel's latency
    reports, read as `client_summary.py` reads them."""
    out = {}
    for kind, key in [("direct", "apply_direct_mean_s"), ("lb", "apply_lb_mean_s")]:
        out[f"rpx_{kind}_us"] = client_summary.rpx_value(rpx, key, "µs")
        out[f"ipp_{kind}_us"] = client_summary.peer_value(ipp, client_summary.ROWS_BY_KEY[key]["ipp"], "µs")
    return out


def summarize(runs):
    """Each measure's median over the pairs, and ipyparallel's round trips over rpx's."""
    keys = [k for k in runs[0] if k not in ("pair", "poll_ns")]
    s = {k: statistics.median(r[k] for r in runs) for k in keys}
    s["ipp_over_rpx_direct"] = s["ipp_direct_us"] / s["rpx_direct_us"]
    s["ipp_over_rpx_lb"] = s["ipp_lb_us"] / s["rpx_lb_us"]
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--poll-ns", type=int, default=200_000, help="the polling setting (ns); the other is 0")
    ap.add_argument("--bin-dir", type=Path, default=Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release")
    ap.add_argument("out", nargs="?", type=Path)
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    if args.poll_ns <= 0:
        ap.error("--poll-ns must be above 0 (the other setting is 0)")
    if not PARAM.exists():
        sys.exit(f"{PARAM} does not exist: this kernel has no guest halt-polling to compare (not a VM, or no cpuidle haltpoll)")
    if not os.access(PARAM, os.W_OK):
        sys.exit(f"{PARAM} is not writable: run as root")
    out = args.out or HERE / "results" / f"haltpoll-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = int(PARAM.read_text())
    # SIGTERM ends the script through `finally`, so the machine's setting is put back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="rpx-haltpoll-") as tmp:
            state = Path(tmp)
            copy_peers(state)
            for pair in range(args.pairs):
                for ns in (0, args.poll_ns):
                    PARAM.write_text(str(ns))
                    f = floor_run(args.bin_dir, state / "floor.json")
                    t = round_trips(rpx_doc(args.bin_dir, state / "rpx.json", "latency"), ipp_doc(state, "latency"))
                    runs.append({"pair": pair + 1, "poll_ns": ns, "floor_one_hop_us": f["one_hop_us"],
                                 "floor_guarded_us": f["guarded_us"], **t})
                    print(f"pair {pair + 1}, halt-polling {ns} ns: floor {f['guarded_us']:.0f} µs (one hop {f['one_hop_us']:.0f}),"
                          f" rpx {t['rpx_direct_us']:.0f} / {t['rpx_lb_us']:.0f} µs, ipyparallel {t['ipp_direct_us']:,.0f} /"
                          f" {t['ipp_lb_us']:,.0f} µs (direct / load-balanced)", flush=True)
    finally:
        PARAM.write_text(str(machine))
    summary = {str(ns): summarize([r for r in runs if r["poll_ns"] == ns]) for ns in (0, args.poll_ns)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_poll_ns": machine, "poll_ns": args.poll_ns, "pairs": args.pairs,
                               "runs": runs, "summary": summary}, indent=2))
    for ns, s in summary.items():
        print(f"halt-polling {ns} ns, medians: floor {s['floor_guarded_us']:.0f} µs, rpx {s['rpx_direct_us']:.0f} / {s['rpx_lb_us']:.0f} µs,"
              f" 1/{s['ipp_over_rpx_direct']:.1f} / 1/{s['ipp_over_rpx_lb']:.1f} of ipyparallel's")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
