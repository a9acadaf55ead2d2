#!/usr/bin/env python3
"""Soak benchmark: N trivial load-balanced tasks with a backlog of B outstanding, controller RSS
sampled over time, rpx and ipyparallel 9 on the same run shape (issue 9, must-show 3).

usage:
  .venv/bin/python bench/soak_bench.py [--tasks 1000000] [--backlog 40000] [--engines 2]
        [--ipp-time-limit 600] [--ipp-tasks N] [--rpx-time-limit S] [--only rpx|ipp]
        [--bound-mib 256] [--interval 1.0] [--rpx-bin DIR] [--soak PATH]

Shape (both sides): a 2-engine cluster started as a user would (rpx: `ipcluster start -n 2
--daemonize` under a private RPX_DIR; ipyparallel: its `ipcluster start -n 2 --daemonize
--ip=127.0.0.1` under a private IPYTHONDIR, default settings otherwise). One driver process per
side submits one load-balanced task per item (rpx: `client.view().chunksize(1).apply_async(
remote!(|x: u64| x + 1), (i,))`; ipyparallel: `lview.apply_async(lambda x: x + 1, i)`), B at
first, then waits for the oldest outstanding task, checks its value, drops its handle, collects
every finished task behind it, and tops up to B outstanding, until N were submitted. Nothing
is purged on either controller (no `purge_results`, no `purge_everything`); the ipyparallel
client keeps its own `rc.results` / `rc.metadata` / `rc.history` as it always does (not
cleared, so its client RSS grows; the rpx client keeps nothing of a finished task). ipyparallel
is much slower: its submission stops after `--ipp-time-limit` s (or `--ipp-tasks`), and the
backlog then drains; the record says where it stopped.

Sampled every `--interval` s: VmRSS (/proc/<pid>/status) of the controller (rpx: the
`ipcontroller` process; ipyparallel: the `ipyparallel.controller` process plus every process
under it, i.e. its scheduler subprocesses, summed and also recorded one by one), of the driver
(client) and of the engines (summed), with tasks done and elapsed time.

Writes bench/results/soak-<timestamp>.json (parameters, binaries, every sample of both), .md
(summary) and .svg (controller RSS against tasks done). The `ipp-driver` subcommand is the
ipyparallel driver this script runs; `report A.json B.json` makes one report of two runs made
separately (`--only rpx`, then `--only ipp`).
"""
import argparse
import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# /proc helpers (no psutil needed)
# ------------------------------------------------------------------------------------------------

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    """Proportional set size: shared pages split among the processes sharing them (a fairer sum
    over forked processes than VmRSS)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def has_env(pid, key, value):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{key}={value}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def pids_with_env(key, value):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid() and has_env(int(d), key, value):
            out.append(int(d))
    return out


def children(pid, kids=None):
    """Direct and indirect children of pid (`kids`: a parent map from `parent_map()`)."""
    kids = kids if kids is not None else parent_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def parent_map():
    kids = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids[ppid].append(int(d))
    return kids


def kill_pids(pids, why):
    for p in pids:
        try:
            log(f"  killing {p} ({why}): {' '.join(cmdline(p))[:120]}")
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
# the two systems
# ------------------------------------------------------------------------------------------------

class System:
    name = ""
    env_var = ""

    def __init__(self, args):
        self.args = args
        self.state = Path(tempfile.mkdtemp(prefix=f"soak-{self.name}-"))
        self.env = dict(os.environ)
        self.env.pop("RPX_PROFILE", None)
        self.env["IPYTHONDIR"] = str(self.state / "ipython")
        (self.state / "ipython").mkdir()

    def procs(self):
        return pids_with_env(self.env_var, self.env[self.env_var])

    def cleanup(self):
        try:
            r = subprocess.run(self.stop_cmd(), env=self.env, capture_output=True, text=True, timeout=90)
            if r.returncode != 0:
                log(f"  {self.name} stop exited {r.returncode}: {r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            log(f"  {self.name} stop did not return in 90 s")
        deadline = time.monotonic() + 20
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.procs()
        if left:
            kill_pids(left, f"left after {self.name} stop")
        shutil.rmtree(self.state, ignore_errors=True)
        return len(left)

    def engines(self):
        return [p for p in self.procs() if self.is_engine(p)]


class Rpx(System):
    name = "rpx"
    env_var = "RPX_DIR"

    def __init__(self, args):
        super().__init__(args)
        self.bin = Path(args.rpx_bin)
        self.env["RPX_DIR"] = str(self.state / "rpx")
        self.client_file = self.state / "rpx" / "profile_default" / "security" / "ipcontroller-client.json"

    def start(self):
        r = subprocess.run([str(self.bin / "ipcluster"), "start", "-n", str(self.args.engines), "--daemonize"],
                           env=self.env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"rpx ipcluster start exited {r.returncode}: {r.stderr[-2000:]}")

    def stop_cmd(self):
        return [str(self.bin / "ipcluster"), "stop"]

    def controller(self):
        """(main pid, [pids summed])"""
        main = [p for p in self.procs() if os.path.basename((cmdline(p) or [""])[0]) == "ipcontroller"]
        if len(main) != 1:
            raise RuntimeError(f"expected one rpx ipcontroller, found {main}")
        return main[0], [main[0]] + children(main[0])

    def is_engine(self, p):
        return os.path.basename((cmdline(p) or [""])[0]) == "ipengine"

    def driver_cmd(self, tasks, backlog, time_limit):
        cmd = [str(self.args.soak), "--file", str(self.client_file), "--tasks", str(tasks), "--backlog", str(backlog),
               "--engines", str(self.args.engines)]
        if time_limit:
            cmd += ["--time-limit", str(time_limit)]
        return cmd

    def describe(self):
        out = {}
        for b in ("ipcluster", "ipcontroller", "ipengine", "rpx-compiler"):
            p = self.bin / b
            out[b] = {"path": str(p), "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.stat().st_mtime))}
        out["soak"] = {"path": str(self.args.soak)}
        try:
            out["git"] = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                                        text=True).stdout.strip()
        except OSError:
            pass
        out["controller_settings"] = "ipcluster defaults: --hwm 16, --record-limit 1024, --record-bytes 1 GiB, --db memory"
        return out


class Ipp(System):
    name = "ipyparallel"
    env_var = "IPYTHONDIR"
    profile = "soak"

    def __init__(self, args):
        super().__init__(args)
        self.client_file = self.state / "ipython" / f"profile_{self.profile}" / "security" / "ipcontroller-client.json"

    def start(self):
        r = subprocess.run([str(VENV_BIN / "ipcluster"), "start", f"-n={self.args.engines}", "--daemonize",
                            "--ip=127.0.0.1", f"--profile={self.profile}", "--log-level=WARN"],
                           env=self.env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ipyparallel ipcluster start exited {r.returncode}: {r.stderr[-2000:]}")
        deadline = time.monotonic() + 120
        while not self.client_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.client_file}")
            time.sleep(0.1)

    def stop_cmd(self):
        return [str(VENV_BIN / "ipcluster"), "stop", f"--profile={self.profile}"]

    def controller(self):
        main = [p for p in self.procs() if "ipyparallel.controller" in " ".join(cmdline(p))]
        # the scheduler subprocesses carry the same command line: keep the topmost one
        kids = parent_map()
        below = {c for q in main for c in children(q, kids)}
        top = [p for p in main if p not in below]
        if len(top) != 1:
            raise RuntimeError(f"expected one ipyparallel controller, found {top} (of {main})")
        return top[0], [top[0]] + children(top[0], kids)

    def is_engine(self, p):
        cmd = " ".join(cmdline(p))
        return "ipyparallel.engine" in cmd and "nanny" not in cmd

    def driver_cmd(self, tasks, backlog, time_limit):
        cmd = [sys.executable, str(Path(__file__).resolve()), "ipp-driver", "--file", str(self.client_file),
               "--tasks", str(tasks), "--backlog", str(backlog), "--engines", str(self.args.engines)]
        if time_limit:
            cmd += ["--time-limit", str(time_limit), "--drain-limit", str(self.args.ipp_drain_limit)]
        return cmd

    def describe(self):
        import ipyparallel
        import zmq
        return {"ipyparallel": ipyparallel.__version__, "pyzmq": zmq.__version__, "python": platform.python_version(),
                "controller_settings": "ipcluster defaults: DictDB (record_limit 1024, size_limit 1 GiB), "
                                       "scheme leastload, hwm 1"}


# ------------------------------------------------------------------------------------------------
# one run: start, drive, sample, stop
# ------------------------------------------------------------------------------------------------

def run_one(system, tasks, backlog, time_limit, interval):
    log(f"=== {system.name}: {tasks} tasks, backlog {backlog}" + (f", submission stops after {time_limit} s" if time_limit else ""))
    rec = {"system": system.name, "tasks_requested": tasks, "backlog": backlog, "time_limit_s": time_limit,
           "drain_limit_s": system.args.ipp_drain_limit if (time_limit and system.name == "ipyparallel") else None,
           "describe": system.describe(), "samples": []}
    t_start = time.monotonic()
    system.start()
    rec["cluster_start_s"] = time.monotonic() - t_start
    try:
        main_pid, _ = system.controller()
        rec["controller_cmd"] = cmdline(main_pid)
        rec["controller_procs"] = {str(p): " ".join(cmdline(p))[:300] for p in system.controller()[1]}
        drv = subprocess.Popen(system.driver_cmd(tasks, backlog, time_limit), env=system.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, bufsize=1)
        state = {"done": 0, "submitted": 0, "elapsed": None, "summary": None, "lines": 0}
        err_tail = collections.deque(maxlen=40)

        def read_out():
            for line in drv.stdout:
                line = line.strip()
                if line.startswith("progress "):
                    _, d, s, e = line.split()
                    state.update(done=int(d), submitted=int(s), elapsed=float(e))
                elif line.startswith("{"):
                    state["summary"] = json.loads(line)

        def read_err():
            for line in drv.stderr:
                err_tail.append(line.rstrip())

        threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        next_sample = t0
        last_print = t0
        ctl_pids, eng_pids, found_at = None, None, 0.0
        while True:
            if ctl_pids is None or time.monotonic() - found_at > 30:
                # the process tree, found again every 30 s (a /proc scan costs CPU the run needs)
                _, ctl_pids = system.controller()
                eng_pids = system.engines()
                found_at = time.monotonic()
            per = {p: rss_kib(p) for p in ctl_pids}
            eng = sum(rss_kib(p) for p in eng_pids)
            s = {"t": round(time.monotonic() - t0, 3), "phase": "run" if state["elapsed"] is not None else "connect",
                 "done": state["done"], "submitted": state["submitted"],
                 "driver_elapsed": state["elapsed"], "controller_kib": sum(per.values()),
                 "controller_pss_kib": sum(pss_kib(p) for p in ctl_pids),
                 "client_kib": rss_kib(drv.pid), "engines_kib": eng}
            if len(per) > 1:
                s["controller_procs_kib"] = {str(p): v for p, v in per.items()}
            rec["samples"].append(s)
            if time.monotonic() - last_print >= 15:
                log(f"  {system.name} t={s['t']:.0f}s done={s['done']} controller={s['controller_kib'] / 1024:.1f} MiB "
                    f"client={s['client_kib'] / 1024:.1f} MiB")
                last_print = time.monotonic()
            if drv.poll() is not None:
                break
            next_sample += interval
            time.sleep(max(0.0, next_sample - time.monotonic()))
        for t in threads:
            t.join(timeout=10)
        rec["driver_exit"] = drv.returncode
        rec["driver_stderr_tail"] = list(err_tail)
        rec["summary"] = state["summary"]
        # the controller after the run, the backlog gone: a few more samples of it alone
        for _ in range(3):
            time.sleep(interval)
            _, ctl_pids = system.controller()
            rec["samples"].append({"t": round(time.monotonic() - t0, 3), "phase": "after", "done": state["done"],
                                   "submitted": state["submitted"], "driver_elapsed": state["elapsed"],
                                   "controller_kib": sum(rss_kib(p) for p in ctl_pids), "client_kib": None,
                                   "engines_kib": sum(rss_kib(p) for p in system.engines())})
        if drv.returncode != 0:
            log(f"  {system.name} driver exited {drv.returncode}:\n    " + "\n    ".join(err_tail))
    finally:
        rec["left_after_stop"] = system.cleanup()
    summarize(rec)
    log(f"  {system.name}: {rec['stats']}")
    return rec


def summarize(rec):
    ss = [s for s in rec["samples"] if s["phase"] == "run"]
    if not ss:
        rec["stats"] = {}
        return
    idle = [s for s in rec["samples"] if s["phase"] == "connect"] or ss
    ctl = [s["controller_kib"] for s in ss]
    cli = [s["client_kib"] for s in ss if s["client_kib"]]
    summ = rec.get("summary") or {}
    done = summ.get("done", ss[-1]["done"])
    elapsed = summ.get("elapsed_s", ss[-1]["driver_elapsed"] or ss[-1]["t"])
    # the first sample with the whole backlog submitted
    steady = [s for s in ss if s["submitted"] >= min(rec["backlog"], summ.get("submitted", rec["backlog"]))] or ss
    # halves of the run by tasks done
    half = [s for s in ss if s["done"] >= done / 2] or ss
    first_half = [s for s in ss if s["done"] < done / 2] or ss
    # growth over the second half of the run (by tasks done), least squares: a flat controller
    # shows ~0 MiB per 100k tasks there
    slope = None
    if len(half) >= 3 and half[-1]["done"] > half[0]["done"]:
        xs = [x["done"] / 100_000 for x in half]
        ys = [x["controller_kib"] / 1024 for x in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    rec["stats"] = {
        "controller_mib_idle": round(idle[0]["controller_kib"] / 1024, 1),
        "done": done, "elapsed_s": round(elapsed, 2), "tasks_per_s": round(done / elapsed, 1) if elapsed else None,
        "controller_mib_start": round(ctl[0] / 1024, 1), "controller_mib_peak": round(max(ctl) / 1024, 1),
        "controller_mib_end": round(ctl[-1] / 1024, 1),
        "controller_pss_mib_start": round(ss[0].get("controller_pss_kib", 0) / 1024, 1),
        "controller_pss_mib_peak": round(max(s.get("controller_pss_kib", 0) for s in ss) / 1024, 1),
        "controller_pss_mib_end": round(ss[-1].get("controller_pss_kib", 0) / 1024, 1),
        "controller_mib_steady_start": round(steady[0]["controller_kib"] / 1024, 1),
        "controller_mib_max_first_half": round(max(s["controller_kib"] for s in first_half) / 1024, 1),
        "controller_mib_max_second_half": round(max(s["controller_kib"] for s in half) / 1024, 1),
        "controller_growth_mib_per_100k_tasks": round(slope, 2) if slope is not None else None,
        "client_mib_start": round(cli[0] / 1024, 1) if cli else None,
        "client_mib_peak": round(max(cli) / 1024, 1) if cli else None,
        "client_mib_end": round(cli[-1] / 1024, 1) if cli else None,
        "engines_mib_end": round(ss[-1]["engines_kib"] / 1024, 1),
        "stopped_by_time": summ.get("stopped_by_time"),
        "abandoned": summ.get("abandoned", 0),
    }
    if ss[-1].get("controller_procs_kib"):
        # per process, at the first run sample and at the end (ipyparallel: hub + schedulers)
        first = ss[0].get("controller_procs_kib") or {}
        rec["stats"]["controller_procs_mib_start_end"] = {
            p: [round(first.get(p, 0) / 1024, 1), round(v / 1024, 1)] for p, v in ss[-1]["controller_procs_kib"].items()}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def svg_chart(res, path, bound):
    """Controller RSS (MiB) against tasks done, one line per system, the bound dashed."""
    runs = [r for r in res["runs"] if any(s["phase"] == "run" for s in r.get("samples", []))]
    if not runs:
        return
    W, H, L, B, T, R = 760, 380, 64, 44, 30, 150
    xmax = max(s["done"] for r in runs for s in r["samples"]) or 1
    ymax = max([s["controller_kib"] / 1024 for r in runs for s in r["samples"]] + [bound]) * 1.08
    X = lambda v: L + (W - L - R) * v / xmax  # noqa: E731
    Y = lambda v: H - B - (H - B - T) * v / ymax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">Controller RSS vs tasks done (backlog {res["args"]["backlog"]:,})</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(6):
        xv, yv = xmax * i / 5, ymax * i / 5
        out.append(f'<text x="{X(xv):.0f}" y="{H - B + 16}" text-anchor="middle">{xv / 1000:,.0f}k</text>')
        out.append(f'<text x="{L - 6}" y="{Y(yv) + 4:.0f}" text-anchor="end">{yv:.0f}</text>')
        out.append(f'<line x1="{L}" y1="{Y(yv):.1f}" x2="{W - R}" y2="{Y(yv):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">tasks done</text>')
    out.append(f'<text x="14" y="{(T + H - B) / 2:.0f}" transform="rotate(-90 14 {(T + H - B) / 2:.0f})" '
               f'text-anchor="middle">MiB (VmRSS)</text>')
    out.append(f'<line x1="{L}" y1="{Y(bound):.1f}" x2="{W - R}" y2="{Y(bound):.1f}" stroke="gray" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{W - R + 6}" y="{Y(bound) + 4:.0f}" fill="gray">bound {bound:.0f}</text>')
    colors = {"rpx": "#c0392b", "ipyparallel": "#2c6fbb"}
    for k, r in enumerate(runs):
        pts = " ".join(f"{X(s['done']):.1f},{Y(s['controller_kib'] / 1024):.1f}" for s in r["samples"] if s["phase"] == "run")
        c = colors.get(r["system"], "black")
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{W - R + 6}" y="{T + 16 + 18 * k}" fill="{c}">{r["system"]}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def md_report(res, path):
    a = res["args"]
    lines = [f"# Soak: trivial load-balanced tasks, backlog {a['backlog']:,}, {a['engines']} engines",
             "", f"Run {res['started']} on {res['host']} ({os.cpu_count()} cores, shared). "
                 f"Command: `{res['command']}`", ""]
    rows = [("backlog (tasks outstanding)", "backlog", "{:,}"), ("tasks requested", "tasks_requested", "{:,}"), ("tasks done", "done", "{:,}"), ("duration (s)", "elapsed_s", "{:.1f}"), ("tasks/s", "tasks_per_s", "{:,.0f}"),
            ("controller RSS, idle cluster (MiB)", "controller_mib_idle", "{:.1f}"),
            ("controller RSS when the driver's clock starts (MiB)", "controller_mib_start", "{:.1f}"),
            ("controller RSS when the backlog was first full (MiB)", "controller_mib_steady_start", "{:.1f}"),
            ("controller RSS peak (MiB)", "controller_mib_peak", "{:.1f}"),
            ("controller RSS peak, 1st half of run (MiB)", "controller_mib_max_first_half", "{:.1f}"),
            ("controller RSS peak, 2nd half of run (MiB)", "controller_mib_max_second_half", "{:.1f}"),
            ("controller RSS at end (MiB)", "controller_mib_end", "{:.1f}"),
            ("controller PSS start / peak / end (MiB)", "pss", None),
            ("controller growth over the 2nd half of the run (MiB / 100k tasks, least squares)", "controller_growth_mib_per_100k_tasks", "{:+.2f}"),
            ("client RSS start / peak / end (MiB)", None, None),
            ("engines RSS at end, sum (MiB)", "engines_mib_end", "{:.1f}")]
    systems = [r for r in res["runs"]]
    lines.append("| | " + " | ".join(r["system"] for r in systems) + " |")
    lines.append("|---|" + "---:|" * len(systems))
    for label, key, fmt in rows:
        cells = []
        for r in systems:
            st = dict(r.get("stats", {}), tasks_requested=r.get("tasks_requested"), backlog=r.get("backlog"))
            if key is None or key == "pss":
                v = ([st.get("client_mib_start"), st.get("client_mib_peak"), st.get("client_mib_end")] if key is None else
                     [st.get("controller_pss_mib_start"), st.get("controller_pss_mib_peak"), st.get("controller_pss_mib_end")])
                cells.append(" / ".join("-" if x is None else f"{x:.1f}" for x in v))
            else:
                v = st.get(key)
                cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in systems:
        st = r.get("stats", {})
        note = f"- **{r['system']}**: {r['describe'].get('controller_settings', '')}."
        if r["system"] == "ipyparallel" and r.get("time_limit_s"):
            note += (f" Submission capped at {r['time_limit_s']} s" +
                     (" (reached: submission stopped, the backlog then drained" +
                      (f" for {r.get('drain_limit_s')} s and {st['abandoned']:,} tasks were abandoned)" if st.get("abandoned") else ")")
                      if st.get("stopped_by_time") else " (not reached)") + ".")
        procs = st.get("controller_procs_mib_start_end")
        if procs:
            main_pid = next(iter(r.get("controller_procs", {})), None)
            note += (f" Its {len(procs)} controller processes, VmRSS MiB at start → end: " +
                     ", ".join(f"{'main ' if p == main_pid else ''}{a:.0f} → {b:.0f}" for p, (a, b) in procs.items()) + ".")
        if r.get("driver_exit"):
            note += f" The driver FAILED (exit {r['driver_exit']}): {' / '.join(r.get('driver_stderr_tail', [])[-3:])}"
        lines.append(note)
    v = res.get("verdict")
    if v:
        lines += ["", f"**Bound**: rpx controller RSS under {v['bound_mib']} MiB for the whole run: "
                      f"{'yes' if v['under_bound'] else 'NO'} (peak {v['peak_mib']} MiB). "
                      f"Flat (2nd-half peak within {v['flat_tolerance_mib']} MiB of the 1st-half peak): "
                      f"{'yes' if v['flat'] else 'NO'} ({v['first_half_mib']} -> {v['second_half_mib']} MiB)."]
    lines += ["", "Controller RSS over tasks done (every ~10% of each run):", ""]
    for r in systems:
        ss = [s for s in r["samples"] if s["phase"] == "run"]
        if not ss:
            continue
        step = max(1, len(ss) // 10)
        pts = ss[::step] + ([ss[-1]] if (len(ss) - 1) % step else [])
        lines.append(f"- {r['system']}: " + ", ".join(f"{s['done']:,} → {s['controller_kib'] / 1024:.0f}" for s in pts)
                     + " (tasks → MiB)")
    lines += ["", "Each side: one driver process; B tasks submitted, then wait for the oldest, drop it, top up to B.",
              "Nothing purged on either controller. RSS = VmRSS; ipyparallel's controller = its main process + "
              "scheduler subprocesses, summed (their VmRSS sum counts shared pages once per process; PSS splits "
              "them). Full time series in the .json next to this file; chart: the .svg.", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# ipyparallel driver (subcommand)
# ------------------------------------------------------------------------------------------------

def ipp_driver(argv):
    p = argparse.ArgumentParser(prog="soak_bench.py ipp-driver")
    p.add_argument("--file", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--backlog", type=int, required=True)
    p.add_argument("--time-limit", type=float)
    p.add_argument("--drain-limit", type=float, help="after --time-limit, wait at most this long for the backlog")
    p.add_argument("--engines", type=int, default=2)
    a = p.parse_args(argv)
    import ipyparallel as ipp
    rc = ipp.Client(a.file, timeout=60)
    rc.wait_for_engines(a.engines, timeout=120)
    lview = rc.load_balanced_view()
    f = lambda x: x + 1  # noqa: E731
    assert lview.apply_sync(f, 41) == 42
    outstanding = collections.deque()
    submitted = done = max_out = 0
    stopped = False
    start = time.monotonic()
    deadline = start + a.time_limit if a.time_limit else None
    next_report = start
    out = sys.stdout
    out.write("progress 0 0 0.000\n")
    out.flush()
    abandoned = 0
    while True:
        while len(outstanding) < a.backlog and submitted < a.tasks and not stopped:
            if deadline is not None and time.monotonic() >= deadline:
                stopped = True
                break
            outstanding.append((submitted, lview.apply_async(f, submitted)))
            submitted += 1
            if submitted % 1000 == 0 and time.monotonic() >= next_report:
                out.write(f"progress {done} {submitted} {time.monotonic() - start:.3f}\n")
                out.flush()
                next_report = time.monotonic() + 0.25
        max_out = max(max_out, len(outstanding))
        if not outstanding:
            break
        if stopped and a.drain_limit is not None and time.monotonic() >= deadline + a.drain_limit:
            abandoned = len(outstanding)
            break
        i, ar = outstanding.popleft()
        v = ar.get()
        assert v == i + 1, (i, v)
        done += 1
        while outstanding and outstanding[0][1].ready():
            i, ar = outstanding.popleft()
            assert ar.get() == i + 1, i
            done += 1
        now = time.monotonic()
        if now >= next_report:
            out.write(f"progress {done} {submitted} {now - start:.3f}\n")
            out.flush()
            next_report = now + 0.25
    elapsed = time.monotonic() - start
    out.write(f"progress {done} {submitted} {elapsed:.3f}\n")
    out.write(json.dumps({"done": done, "submitted": submitted, "elapsed_s": elapsed, "tasks_per_s": done / elapsed,
                          "max_outstanding": max_out, "backlog": a.backlog, "stopped_by_time": stopped,
                          "abandoned": abandoned, "client_results_kept": len(rc.results), "client_history_kept": len(rc.history)}) + "\n")
    out.flush()
    if abandoned:
        os._exit(0)  # do not wait for the abandoned backlog on close
    rc.close()


# ------------------------------------------------------------------------------------------------

def main():
    if len(sys.argv) > 1 and sys.argv[1] == "ipp-driver":
        return ipp_driver(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        return combine(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--backlog", type=int, default=40_000)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--ipp-time-limit", type=float, default=600.0,
                   help="seconds after which ipyparallel's submission stops (0: none); the backlog then drains")
    p.add_argument("--ipp-drain-limit", type=float, default=90.0,
                   help="after --ipp-time-limit, wait at most this long for the backlog, then abandon it")
    p.add_argument("--ipp-tasks", type=int, help="tasks for ipyparallel (default: --tasks)")
    p.add_argument("--rpx-time-limit", type=float, default=0.0, help="the same for rpx (0: none, the default)")
    p.add_argument("--only", choices=["rpx", "ipp"])
    p.add_argument("--bound-mib", type=float, default=256.0, help="the stated bound on rpx's controller RSS")
    p.add_argument("--flat-tolerance-mib", type=float, default=16.0,
                   help="rpx counts as flat if its 2nd-half peak is within this of its 1st-half peak")
    p.add_argument("--interval", type=float, default=1.0, help="sampling period, s")
    p.add_argument("--rpx-bin", default=str(REPO / "target" / "release"),
                   help="directory with ipcluster, ipcontroller, ipengine, rpx-compiler")
    p.add_argument("--soak", help="the soak driver (default: <rpx-bin>/examples/soak)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    if not args.soak:
        args.soak = str(Path(args.rpx_bin) / "examples" / "soak")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    res = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "command": " ".join([Path(sys.executable).name] + sys.argv), "args": vars(args), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"soak-{stamp}.json", out / f"soak-{stamp}.md"
    systems = []
    if args.only != "ipp":
        systems.append((Rpx(args), args.tasks, args.rpx_time_limit or None))
    if args.only != "rpx":
        systems.append((Ipp(args), args.ipp_tasks or args.tasks, args.ipp_time_limit or None))
    for system, tasks, limit in systems:
        try:
            res["runs"].append(run_one(system, tasks, args.backlog, limit, args.interval))
        except Exception as e:  # noqa: BLE001  (record it, go on with the other side)
            log(f"  {system.name} failed: {e!r}")
            res["runs"].append({"system": system.name, "error": repr(e), "samples": [], "describe": {}})
            system.cleanup()
        jpath.write_text(json.dumps(res, indent=1))
    finish(res, jpath, mpath, args.bound_mib, args.flat_tolerance_mib)


def finish(res, jpath, mpath, bound, tolerance):
    """The verdict on rpx's controller, then the .json, .md and .svg."""
    rpx = next((r for r in res["runs"] if r["system"] == "rpx" and r.get("stats")), None)
    if rpx:
        st = rpx["stats"]
        res["verdict"] = {"bound_mib": bound, "peak_mib": st["controller_mib_peak"],
                          "under_bound": st["controller_mib_peak"] <= bound,
                          "flat_tolerance_mib": tolerance,
                          "first_half_mib": st["controller_mib_max_first_half"],
                          "second_half_mib": st["controller_mib_max_second_half"],
                          "flat": st["controller_mib_max_second_half"] - st["controller_mib_max_first_half"] <= tolerance}
    jpath.write_text(json.dumps(res, indent=1))
    md_report(res, mpath)
    svg_chart(res, mpath.with_suffix(".svg"), bound)
    print(mpath.read_text())
    log(f"results: {jpath}, {mpath} and {mpath.with_suffix('.svg')}")


def combine(argv):
    """`report A.json B.json`: one report from runs made by separate invocations (e.g. rpx, then
    ipyparallel with a time limit chosen from the time left), written next to the first."""
    p = argparse.ArgumentParser(prog="soak_bench.py report")
    p.add_argument("files", nargs="+")
    p.add_argument("--bound-mib", type=float, default=256.0)
    p.add_argument("--flat-tolerance-mib", type=float, default=16.0)
    a = p.parse_args(argv)
    parts = [json.loads(Path(f).read_text()) for f in a.files]
    res = dict(parts[0])
    res["runs"] = [r for part in parts for r in part["runs"]]
    for r in res["runs"]:
        if r.get("samples"):
            summarize(r)
    res["command"] = " ; ".join(part["command"] for part in parts)
    res["combined_from"] = [str(Path(f).name) for f in a.files]
    first = Path(a.files[0])
    stamp = first.stem.removeprefix("soak-")
    jpath = first.with_name(f"soak-{stamp}-combined.json")
    finish(res, jpath, jpath.with_suffix(".md"), a.bound_mib, a.flat_tolerance_mib)


if __name__ == "__main__":
    main()
