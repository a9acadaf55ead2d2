#!/usr/bin/env python3
"""Registration at scale: N stand-in engines registering at once with rpx's controller and,
in the same run, with ipyparallel 9's.

The stand-ins are `rpx-standin` (tests/src/standin.rs): one process hosting N engines, each with
its own sockets and uuid, that speak only the engine side of ipyparallel's wire protocol:
`registration_request` on the registration socket, then shell DEALERs on mux and task and a
heart (SUB on hb_ping, DEALER on hb_pong) echoing every ping. They run no code.

Per repetition and system (alternating, so drift in machine load hits both alike):
1. start the controller under a private state directory (rpx: `ipcontroller`; ipyparallel:
   its `ipcontroller` from the given Python) and wait for its connection files;
2. start `rpx-standin -n N`, which subscribes to the controller's notifications, starts the N
   stand-ins at once and prints `registered <count> <seconds>` once every
   `registration_notification` has arrived (or its time ran out);
3. then, while the stand-ins answer heartbeats, sample the controller's CPU time (utime+stime
   of it and its child processes, /proc/<pid>/stat) over `--window` seconds, and its RSS (sum
   over the same processes);
4. tell the stand-ins to stop (a line on their stdin); they report the hub's own engine count
   (`connection_request`), failures, resends and any unregistration meanwhile.

Usage (Python with ipyparallel 9.2 installed, e.g. the project's .venv):
    .venv/bin/python bench/scale_bench.py [--n 1000] [--reps 3] [--window 15] [--only rpx|ipp]
Binaries come from --bin-dir (default $CARGO_TARGET_DIR/release, else target/release).
Results: bench/results/scale-<stamp>.{json,md}.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def default_bin_dir():
    t = os.environ.get("CARGO_TARGET_DIR")
    if t:
        p = Path(t)
        return (p if p.is_absolute() else ROOT / p) / "release"
    return ROOT / "target" / "release"


def children_of():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid):
    kids = children_of()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0.0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        total += (int(f[11]) + int(f[12])) / CLK
    return total


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total


def wait_file(paths, proc, limit=60):
    end = time.time() + limit
    while not all(p.is_file() for p in paths):
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited with {proc.returncode}")
        if time.time() > end:
            raise RuntimeError(f"{paths} did not appear within {limit} s")
        time.sleep(0.05)


def stop(proc):
    if proc.poll() is None:
        pids = tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def start_controller(system, args, work):
    log = open(work / "controller.log", "w")
    env = dict(os.environ)
    if system == "rpx":
        env["RPX_DIR"] = str(work)
        env.pop("RPX_PROFILE", None)
        cmd = [str(args.ipcontroller or args.bin_dir / "ipcontroller"), "--profile", "default", "--ping", str(args.rpx_ping)]
        sec = work / "profile_default" / "security"
        period = args.rpx_ping / 1000
    else:
        env["IPYTHONDIR"] = str(work)
        cmd = [args.python, "-m", "ipyparallel.controller", "--ip=127.0.0.1", f"--HeartMonitor.period={args.ipp_ping}"]
        sec = work / "profile_default" / "security"
        period = args.ipp_ping / 1000
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    files = (sec / "ipcontroller-engine.json", sec / "ipcontroller-client.json")
    wait_file(files, proc)
    # ipyparallel's schedulers start beside the hub; give both the same moment to settle.
    time.sleep(1.0)
    return proc, files, period


def one_run(system, args):
    work = Path(tempfile.mkdtemp(prefix=f"scale-{system}-"))
    proc = standin = None
    try:
        proc, (engine_file, client_file), period = start_controller(system, args, work)
        pids = tree(proc.pid)
        rss_idle = rss_bytes(pids)
        cpu_idle0, t_idle0 = cpu_seconds(pids), time.time()
        time.sleep(min(3.0, args.window))
        pids = tree(proc.pid)
        idle_cpu_per_s = (cpu_seconds(pids) - cpu_idle0) / (time.time() - t_idle0)
        cpu0 = cpu_seconds(pids)
        standin = subprocess.Popen(
            [str(args.bin_dir / "rpx-standin"), "--engine-file", str(engine_file), "--client-file", str(client_file), "-n", str(args.n), "--within", str(args.within), "--hold", str(args.within + args.window + 120)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(work / "standin.log", "w"), text=True,
        )
        line = standin.stdout.readline().split()
        if not line or line[0] != "registered":
            raise RuntimeError(f"rpx-standin said {line!r}; see {work}/standin.log")
        announced, last = int(line[1]), float(line[2])
        pids = tree(proc.pid)
        cpu_registration = cpu_seconds(pids) - cpu0
        # Steady state: every stand-in answering heartbeats.
        time.sleep(1.0)
        pids = tree(proc.pid)
        c0, t0 = cpu_seconds(pids), time.time()
        time.sleep(args.window)
        pids = tree(proc.pid)
        c1, t1 = cpu_seconds(pids), time.time()
        rss = rss_bytes(pids)
        cpu_per_s = (c1 - c0) / (t1 - t0)
        standin.stdin.write("stop\n")
        standin.stdin.flush()
        out = standin.stdout.readline().split(" ", 1)
        if not out or out[0] != "result":
            raise RuntimeError(f"rpx-standin said {out!r}; see {work}/standin.log")
        result = json.loads(out[1])
        standin.wait(30)
        return {
            "system": system,
            "n": args.n,
            "heartbeat_period_s": period,
            "announced": announced,
            "all_registered": announced == args.n and result["in_hub"] == args.n,
            "last_registration_s": last,
            "controller_cpu_registration_s": cpu_registration,
            "controller_cpu_per_s": cpu_per_s,
            "controller_cpu_per_period_ms": cpu_per_s * period * 1000,
            "controller_idle_cpu_per_s": idle_cpu_per_s,
            "controller_rss_mib": rss / 2**20,
            "controller_rss_idle_mib": rss_idle / 2**20,
            "controller_processes": len(pids),
            "window_s": t1 - t0,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "standin": result,
        }
    finally:
        if standin and standin.poll() is None:
            standin.kill()
        if proc:
            stop(proc)
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


METRICS = [
    ("all registered (runs)", None),
    ("last_registration_s", "time to the last registration (s)"),
    ("controller_cpu_per_period_ms", "controller CPU per heartbeat period (ms)"),
    ("controller_cpu_per_s", "controller CPU per second, steady (s/s)"),
    ("controller_cpu_registration_s", "controller CPU for the registration storm (s)"),
    ("controller_rss_mib", "controller RSS at N engines (MiB)"),
    ("controller_rss_idle_mib", "controller RSS idle, no engine (MiB)"),
]


def summarize(runs, systems):
    table = {}
    for s in systems:
        rs = [r for r in runs if r["system"] == s and "error" not in r]
        row = {"runs": len([r for r in runs if r["system"] == s]), "all_registered": sum(r["all_registered"] for r in rs)}
        for key, _ in METRICS[1:]:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        table[s] = row
    return table


def markdown(meta, table, systems):
    lines = [f"# Registration at scale: {meta['n']} stand-in engines at once ({meta['stamp']})", ""]
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"Heartbeat periods: rpx {meta['rpx_ping_ms']} ms, ipyparallel {meta['ipp_ping_ms']} ms (each controller's default unless set). "
                 f"CPU sampled over {meta['window_s']} s of steady heartbeats; medians of {meta['reps']} repetitions (min-max).")
    lines.append("")
    head = "| metric | " + " | ".join(systems) + (" | rpx / ipyparallel |" if len(systems) == 2 else "")
    lines.append(head)
    lines.append("|" + "---|" * (len(systems) + 1 + (len(systems) == 2)))
    row = "| all registered (runs) | " + " | ".join(f"{table[s]['all_registered']}/{table[s]['runs']}" for s in systems)
    lines.append(row + (" | |" if len(systems) == 2 else " |"))
    for key, label in METRICS[1:]:
        cells = []
        for s in systems:
            v = table[s].get(key)
            cells.append("-" if not v else f"{v['median']:.3g} ({v['min']:.3g}-{v['max']:.3g})")
        ratio = ""
        if len(systems) == 2 and table["rpx"].get(key) and table["ipp"].get(key) and table["ipp"][key]["median"]:
            ratio = f"{table['rpx'][key]['median'] / table['ipp'][key]['median']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if len(systems) == 2 else " |"))
    lines.append("")
    lines.append("Stand-ins: `rpx-standin` (tests/src/standin.rs), one process hosting all N engines, each with its own "
                 "registration, mux, task, hb_ping and hb_pong sockets and uuid; registration and heartbeat only, no code. "
                 "'Registered' = its `registration_notification` seen by a subscribed client, and the hub's `connection_request` "
                 "lists it. Controller CPU and RSS are summed over the controller and its child processes "
                 "(ipyparallel's schedulers run in their own processes).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window", type=float, default=15.0, help="seconds of steady heartbeats sampled for CPU")
    ap.add_argument("--within", type=float, default=120.0, help="seconds the stand-ins have to register")
    ap.add_argument("--only", choices=["rpx", "ipp"])
    ap.add_argument("--python", default=sys.executable, help="Python with ipyparallel 9 (default: this one)")
    ap.add_argument("--bin-dir", type=Path, default=default_bin_dir())
    ap.add_argument("--ipcontroller", type=Path, help="rpx controller binary (default: BIN_DIR/ipcontroller), e.g. an older build to compare")
    ap.add_argument("--rpx-ping", type=int, default=1000, help="rpx heartbeat period, ms (its default)")
    ap.add_argument("--ipp-ping", type=int, default=3000, help="ipyparallel HeartMonitor.period, ms (its default)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (logs)")
    args = ap.parse_args()
    for b in ("ipcontroller", "rpx-standin"):
        if not (args.bin_dir / b).is_file():
            sys.exit(f"{args.bin_dir / b} is missing: cargo build --release -p rpx-controller -p rpx-tests")
    systems = [args.only] if args.only else ["rpx", "ipp"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    runs = []
    for rep in range(args.reps):
        order = systems if rep % 2 == 0 else list(reversed(systems))
        for s in order:
            print(f"rep {rep + 1}/{args.reps}: {s} ...", file=sys.stderr, flush=True)
            try:
                r = one_run(s, args)
            except Exception as e:  # a failed run is recorded, not hidden
                r = {"system": s, "error": str(e), "all_registered": False}
            r["rep"] = rep
            runs.append(r)
            print("  " + json.dumps({k: v for k, v in r.items() if k != "standin"}), file=sys.stderr, flush=True)
    table = summarize(runs, systems)
    meta = {
        "stamp": stamp, "n": args.n, "reps": args.reps, "window_s": args.window,
        "rpx_ping_ms": args.rpx_ping, "ipp_ping_ms": args.ipp_ping,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": args.python, "cpus": os.cpu_count(),
        "ipcontroller": str(args.ipcontroller or args.bin_dir / "ipcontroller"),
    }
    try:
        import ipyparallel
        meta["ipyparallel"] = ipyparallel.__version__
    except ImportError:
        pass
    try:
        meta["rpx_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"scale-{stamp}.json").write_text(json.dumps({"meta": meta, "summary": table, "runs": runs}, indent=1))
    md = markdown(meta, table, systems)
    (args.out_dir / f"scale-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
