"""rpx vs ipyparallel 9, side by side in one run: start-up, trivial cell on 8 vs 1 engine, idle memory.

usage: .venv/bin/python bench/cluster_bench.py [--reps 3] [--n 8] [--cells 10] [--only rpx|ipp]
       (cargo build --release first; needs ipyparallel and psutil in the Python that runs it)

For each system, --reps times (fresh cluster each time, 8 engines):
  1. start-up: rpx: `target/release/ipcluster start -n 8 --daemonize`, timed until it returns (it
     returns once the engines are registered), then checked with Client.wait_for_engines(8).
     ipyparallel: `ipcluster start -n 8 --daemonize --ip=127.0.0.1` (its own IPYTHONDIR), then poll
     for the client connection file, Client(), wait_for_engines(8), as shared/bench/peers/startup_ipp.py.
     Also: time until the first trivial cell has returned on all 8 engines (includes rpx's compiler
     warm-up, which `start` does not wait for).
  2. trivial cell: rpx `execute('let _t = 1;')`, ipyparallel `execute('pass')`, on all 8 engines and on
     engine 0 alone, interleaved, 2 warm-ups then --cells timed runs each; a run = submit, reply on
     every engine, and all outputs in (what execute(block=True) waits for). Per repetition the median.
     Before that, --cells runs on all 8 alone, while the engines are still in step: for rpx one
     compile serves them all; after a cell on engine 0 alone, engine 0 has a history of its own and
     each cell on all 8 is compiled for two groups.
  3. memory (psutil VmRSS): one idle engine (rpx: engine + its worker and any other descendants;
     ipyparallel: engine + nanny) and the whole cluster (every process of it: ipcluster daemon,
     controller and its children, compiler and its children, engines, workers / nannies). Taken
     after start-up + 2 s ("idle") and again after the cell benchmark ("after cells").
Reports min / median / max over repetitions and the rpx/ipyparallel ratio of medians, prints a
markdown table and writes JSON to bench/results/<timestamp>.json. Records the CPU load of other
processes during each measurement (the machine is shared) as `foreign_cores`.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

try:
    import ipyparallel as ipp
except ImportError:  # pragma: no cover
    sys.exit("needs ipyparallel: run with the project .venv/bin/python (see bench/README.md)")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
VENV_BIN = Path(sys.executable).parent


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "max": max(xs), "all": xs}


# ------------------------------------------------------------------------------------------------
# CPU of other processes during a measurement (the machine is shared)
# ------------------------------------------------------------------------------------------------

def _busy_s():
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pids):
    tot = 0.0
    for pid in pids:
        try:
            ct = psutil.Process(pid).cpu_times()
            tot += ct.user + ct.system + ct.children_user + ct.children_system
        except psutil.Error:
            pass
    return tot


class Probe:
    """foreign_cores = cores busy in processes that are neither this script nor the cluster."""

    def __init__(self, cluster_pids=lambda: []):
        self.cluster_pids = cluster_pids

    def _own(self):
        me = psutil.Process()
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)} | set(self.cluster_pids())
        return _tree_cpu_s(pids)

    def __enter__(self):
        self.t0, self.b0, self.o0 = time.time(), _busy_s(), self._own()
        return self

    def __exit__(self, *exc):
        wall = max(time.time() - self.t0, 1e-9)
        self.foreign_cores = max(0.0, (_busy_s() - self.b0 - (self._own() - self.o0)) / wall)
        return False


def foreign_load(seconds=2.0):
    with Probe() as p:
        time.sleep(seconds)
    return p.foreign_cores


def wait_quiet(threshold, max_wait):
    t0 = time.time()
    while True:
        fl = foreign_load()
        if fl < threshold or time.time() - t0 > max_wait:
            r = {"foreign_cores_before": round(fl, 3), "waited_s": round(time.time() - t0, 1),
                 "quiet": fl < threshold}
            log("  wait_quiet:", r)
            return r
        time.sleep(3)


# ------------------------------------------------------------------------------------------------
# processes of a cluster, found by the unique state directory in their environment
# ------------------------------------------------------------------------------------------------

def procs_with_env(var, value):
    needle = f"{var}={value}".encode()
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(p)
        except OSError:
            pass
    return out


def rss_kib(p):
    try:
        return p.memory_info().rss // 1024
    except psutil.Error:
        return 0


def describe(p):
    try:
        return " ".join(p.cmdline())[:100]
    except psutil.Error:
        return "?"


def kill_all(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


# ------------------------------------------------------------------------------------------------
# the two systems behind one interface
# ------------------------------------------------------------------------------------------------

class System:
    name = ""
    trivial = ""
    env_var = ""

    def __init__(self, args):
        self.args = args
        self.state = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.env = dict(os.environ)
        self.env["IPYTHONDIR"] = str(self.state / "ipython")
        self.env.pop("RPX_PROFILE", None)
        (self.state / "ipython").mkdir()
        self.rc = None

    def procs(self):
        return procs_with_env(self.env_var, self.env[self.env_var])

    def pids(self):
        return [p.pid for p in self.procs()]

    def connect(self, n, timeout=120):
        t0 = time.monotonic()
        while not self.client_file.exists():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no {self.client_file}")
            time.sleep(0.01)
        rc = None
        while rc is None:
            try:
                rc = ipp.Client(str(self.client_file), timeout=30)  # positional: url_file= is ignored by 9.2
            except Exception as e:  # noqa: BLE001  (file half-written)
                if time.monotonic() - t0 > timeout:
                    raise
                log("  client retry:", e)
                time.sleep(0.05)
        rc.wait_for_engines(n, timeout=timeout)
        self.rc = rc
        return rc

    def close_client(self):
        if self.rc is not None:
            try:
                self.rc.close()
            except Exception:  # noqa: BLE001
                pass
            self.rc = None

    def stop(self):
        self.close_client()
        try:
            r = subprocess.run(self.stop_cmd(), env=self.env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                log(f"  {self.name} stop exited {r.returncode}: {r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            log(f"  {self.name} stop did not return in 60 s")
        deadline = time.monotonic() + 20
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.procs()
        if left:
            log(f"  {self.name}: {len(left)} processes left after stop, killing:",
                [f"{p.pid} {describe(p)}" for p in left])
            kill_all(left)
        return len(left)

    def memory(self):
        """{'engine_kib': [...one per engine...], 'cluster_kib': int, 'nprocs': int, 'procs': [...]}"""
        procs = self.procs()
        by_pid = {p.pid: p for p in procs}
        engines = [p for p in procs if self.is_engine(p)]
        per_engine = []
        for e in engines:
            tree = [e]
            try:
                tree += [c for c in e.children(recursive=True)]
            except psutil.Error:
                pass
            tree += [p for p in procs if p not in tree and self.belongs_to_engine(p, e)]
            per_engine.append(sum(rss_kib(p) for p in tree))
        rows = [(p.pid, rss_kib(p), describe(p)) for p in by_pid.values()]
        return {"engine_kib": sorted(per_engine), "cluster_kib": sum(r[1] for r in rows),
                "nprocs": len(rows), "n_engines": len(engines), "procs": rows}

    def belongs_to_engine(self, p, engine):
        return False

    def notes(self):
        return []


class Rpx(System):
    name = "rpx"
    trivial = "let _t = 1;"
    env_var = "RPX_DIR"

    def __init__(self, args):
        super().__init__(args)
        self.bin = Path(args.rpx_bin)
        self.env["RPX_DIR"] = str(self.state / "rpx")
        sec = self.state / "rpx" / "profile_default" / "security"
        self.client_file = sec / "ipcontroller-client.json"

    def start(self, n):
        """Returns seconds until `ipcluster start --daemonize` returned, and until n engines seen."""
        t0 = time.monotonic()
        r = subprocess.run([str(self.bin / "ipcluster"), "start", "-n", str(n), "--daemonize"], env=self.env,
                           capture_output=True, text=True, timeout=300)
        t_cmd = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"rpx ipcluster start exited {r.returncode}: {r.stderr[-2000:]}")
        self.connect(n)
        return t_cmd, time.monotonic() - t0

    def stop_cmd(self):
        return [str(self.bin / "ipcluster"), "stop"]

    def notes(self):
        """The compiler's log lines about its contexts (how many there are, and why)."""
        lines = []
        for f in sorted((self.state / "rpx" / "profile_default" / "log").glob("rpx-compiler-*.log")):
            lines += [l.strip()[:240] for l in f.read_text(errors="replace").splitlines()
                      if "context ready" in l or "group" in l or "spare" in l]
        return lines[-30:]

    def is_engine(self, p):
        try:
            cmd = p.cmdline()
            return bool(cmd) and os.path.basename(cmd[0]) == "ipengine" and \
                not (p.parent() and p.parent().cmdline() and os.path.basename(p.parent().cmdline()[0]) == "ipengine")
        except psutil.Error:
            return False


class Ipp(System):
    name = "ipyparallel"
    trivial = "pass"
    env_var = "IPYTHONDIR"
    profile = "bench_cmp"

    def __init__(self, args):
        super().__init__(args)
        self.client_file = self.state / "ipython" / f"profile_{self.profile}" / "security" / "ipcontroller-client.json"

    def start(self, n):
        if self.client_file.exists():
            self.client_file.unlink()
        t0 = time.monotonic()
        r = subprocess.run([str(VENV_BIN / "ipcluster"), "start", f"-n={n}", "--daemonize", "--ip=127.0.0.1",
                            f"--profile={self.profile}", "--log-level=WARN"], env=self.env,
                           capture_output=True, text=True, timeout=300)
        t_cmd = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"ipyparallel ipcluster start exited {r.returncode}: {r.stderr[-2000:]}")
        self.connect(n)
        return t_cmd, time.monotonic() - t0

    def stop_cmd(self):
        return [str(VENV_BIN / "ipcluster"), "stop", f"--profile={self.profile}"]

    def is_engine(self, p):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            return False
        return "ipyparallel.engine" in cmd and "nanny" not in cmd

    def belongs_to_engine(self, p, engine):
        # the nanny is started by the engine but may be re-parented; it names its engine's pid
        try:
            cmd = " ".join(p.cmdline())
            return "nanny" in cmd and (p.ppid() == engine.pid or f"--parent-pid={engine.pid}" in cmd
                                       or f"{engine.pid}" in cmd.split())
        except psutil.Error:
            return False


# ------------------------------------------------------------------------------------------------
# one repetition
# ------------------------------------------------------------------------------------------------

def settle(system, max_wait=180.0, quiet=0.05, hold=2.0):
    """Wait (at most `max_wait` s) until the cluster's processes together use under `quiet`
    of a core for `hold` s and no process of it started or ended meanwhile: start-up work in
    the background (rpx's closure builder warm-up, its cargo and rustc children, some of which
    live for less than one sample) is over. Returns the seconds waited."""
    t0 = time.monotonic()
    calm_since = None
    while time.monotonic() - t0 < max_wait:
        procs = system.procs()
        before = {}
        for p in procs:
            try:
                before[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        time.sleep(0.5)
        used = 0.0
        for p in procs:
            try:
                used += sum(p.cpu_times()[:2]) - before.get(p.pid, 0.0)
            except psutil.Error:
                pass
        same = {p.pid for p in system.procs()} == set(before)
        if same and used / 0.5 < quiet:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since >= hold:
                break
        else:
            calm_since = None
    return time.monotonic() - t0


def timed_cell(view, code, timeout=180):
    t0 = time.perf_counter()
    ar = view.execute(code, block=False)
    ar.get(timeout=timeout)
    complete = ar.wait_for_output(timeout=30)
    return time.perf_counter() - t0, complete


def one_rep(system, args):
    n = args.n
    out = {}
    with Probe(system.pids) as pr:
        t_cmd, t_reg = system.start(n)
        rc = system.rc
        assert len(rc.ids) >= n, rc.ids
        t_first, _ = timed_cell(rc[:], system.trivial, timeout=300)
    out["start_cmd_s"] = t_cmd
    out["start_registered_s"] = t_reg
    out["start_first_cell_s"] = t_reg + t_first
    out["start_foreign_cores"] = pr.foreign_cores
    log(f"  {system.name}: start returned {t_cmd:.2f} s, {n} engines seen {t_reg:.2f} s, "
        f"first cell on all done {t_reg + t_first:.2f} s")
    time.sleep(2)
    out["mem_idle"] = system.memory()
    m = out["mem_idle"]
    log(f"  {system.name}: idle engine {[k // 1024 for k in m['engine_kib']]} MiB, "
        f"cluster {m['cluster_kib'] // 1024} MiB in {m['nprocs']} processes")
    out["settle_s"] = settle(system)
    out["mem_settled"] = system.memory()
    out["notes_settled"] = system.notes()
    log(f"  {system.name}: settled after {out['settle_s']:.1f} s: cluster {out['mem_settled']['cluster_kib'] // 1024} MiB "
        f"in {out['mem_settled']['nprocs']} processes")

    all_v, one_v = rc[:], rc[rc.ids[0]]
    # All engines in step first: for rpx one compile serves all 8. A cell on engine 0 alone
    # then gives it a history of its own, and every later cell on all 8 is compiled for both
    # groups (engine 0's and the others').
    timed_cell(all_v, system.trivial)
    in_step = []
    with Probe(system.pids) as pr:
        for _ in range(args.cells):
            in_step.append(timed_cell(all_v, system.trivial)[0])
    out["cell_all_in_step_s"] = in_step
    out["cell_all_in_step_median_s"] = statistics.median(in_step)
    for _ in range(2):
        timed_cell(all_v, system.trivial)
        timed_cell(one_v, system.trivial)
    t_all, t_one, incomplete = [], [], 0
    with Probe(system.pids) as pr:
        for _ in range(args.cells):
            dt, ok = timed_cell(all_v, system.trivial)
            t_all.append(dt)
            incomplete += not ok
            dt, ok = timed_cell(one_v, system.trivial)
            t_one.append(dt)
            incomplete += not ok
    out["cell_all_s"] = t_all
    out["cell_one_s"] = t_one
    out["cell_all_median_s"] = statistics.median(t_all)
    out["cell_one_median_s"] = statistics.median(t_one)
    out["cell_ratio_all_over_one"] = out["cell_all_median_s"] / out["cell_one_median_s"]
    out["cell_ratio_in_step_over_one"] = out["cell_all_in_step_median_s"] / out["cell_one_median_s"]
    out["cell_outputs_incomplete"] = incomplete
    out["cell_foreign_cores"] = pr.foreign_cores
    log(f"  {system.name}: trivial cell on {n}: {out['cell_all_median_s'] * 1e3:.1f} ms, on 1: "
        f"{out['cell_one_median_s'] * 1e3:.1f} ms, ratio {out['cell_ratio_all_over_one']:.2f}; "
        f"on {n} in step: {out['cell_all_in_step_median_s'] * 1e3:.1f} ms, ratio {out['cell_ratio_in_step_over_one']:.2f}")
    time.sleep(1)
    out["mem_after_cells"] = system.memory()
    out["leftovers_after_stop"] = system.stop()
    return out


MEASURES = [
    # key, label, unit, scale, extractor(rep) -> value
    ("start_cmd_s", "`ipcluster start -n 8 --daemonize` returns", "s", 1, lambda r: r["start_cmd_s"]),
    ("start_registered_s", "start-up until 8 engines registered (Client sees them)", "s", 1,
     lambda r: r["start_registered_s"]),
    ("start_first_cell_s", "start-up until a first trivial cell returned on all 8", "s", 1,
     lambda r: r["start_first_cell_s"]),
    ("cell_all_ms", "trivial cell on 8 engines (median of reps' medians)", "ms", 1e3, lambda r: r["cell_all_median_s"]),
    ("cell_one_ms", "trivial cell on 1 engine", "ms", 1e3, lambda r: r["cell_one_median_s"]),
    ("cell_ratio", "ratio 8 engines / 1 engine", "x", 1, lambda r: r["cell_ratio_all_over_one"]),
    ("cell_in_step_ms", "trivial cell on 8 engines in step (before any cell on 1 engine)", "ms", 1e3,
     lambda r: r["cell_all_in_step_median_s"]),
    ("cell_in_step_ratio", "ratio 8 engines in step / 1 engine", "x", 1, lambda r: r["cell_ratio_in_step_over_one"]),
    ("engine_idle_mib", "idle engine RSS (rpx: engine+worker; ipp: engine+nanny), median engine", "MiB",
     1 / 1024, lambda r: statistics.median(r["mem_idle"]["engine_kib"]) if r["mem_idle"]["engine_kib"] else None),
    ("cluster_idle_mib", "whole cluster RSS, n=8, idle", "MiB", 1 / 1024, lambda r: r["mem_idle"]["cluster_kib"]),
    ("cluster_nprocs", "processes in the cluster", "", 1, lambda r: r["mem_idle"]["nprocs"]),
    ("cluster_settled_mib", "whole cluster RSS, n=8, idle once settled (under 5% of a core for 2 s)", "MiB", 1 / 1024,
     lambda r: r["mem_settled"]["cluster_kib"]),
    ("settle_s", "seconds until settled after the first cell", "s", 1, lambda r: r["settle_s"]),
    ("engine_after_mib", "engine RSS after the cell benchmark, median engine", "MiB", 1 / 1024,
     lambda r: statistics.median(r["mem_after_cells"]["engine_kib"]) if r["mem_after_cells"]["engine_kib"] else None),
    ("cluster_after_mib", "whole cluster RSS after the cell benchmark", "MiB", 1 / 1024,
     lambda r: r["mem_after_cells"]["cluster_kib"]),
]


def summarize(reps):
    out = {}
    for key, _label, _unit, scale, fn in MEASURES:
        vals = []
        for r in reps:
            try:
                v = fn(r)
            except (KeyError, TypeError, statistics.StatisticsError):
                v = None
            vals.append(None if v is None else v * scale)
        out[key] = stats(vals)
    return out


def fmt(s, unit):
    if not s:
        return "-"
    p = 0 if unit in ("MiB", "") else (2 if unit in ("s", "x") else 1)
    return f"{s['median']:.{p}f} ({s['min']:.{p}f}-{s['max']:.{p}f})"


def table(summary):
    lines = ["| measure | unit | rpx median (min-max) | ipyparallel median (min-max) | rpx / ipyparallel |",
             "|---|---|---|---|---|"]
    for key, label, unit, _s, _f in MEASURES:
        a, b = summary.get("rpx", {}).get(key), summary.get("ipyparallel", {}).get(key)
        ratio = f"{a['median'] / b['median']:.3f}" if a and b and b["median"] else "-"
        lines.append(f"| {label} | {unit} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    return "\n".join(lines)


def versions(args):
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "ipyparallel": ipp.__version__,
           "nproc": os.cpu_count()}
    try:
        out["rpx_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    for b in ("ipcluster", "ipcontroller", "ipengine", "rpx-compiler"):
        p = Path(args.rpx_bin) / b
        out[f"{b}_mtime"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.stat().st_mtime)) if p.exists() else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", "3")))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--only", choices=["rpx", "ipp"])
    ap.add_argument("--rpx-bin", default=str(REPO / "target" / "release"))
    ap.add_argument("--quiet-cores", type=float, default=float(os.environ.get("BENCH_QUIET_CORES", "0.5")))
    ap.add_argument("--quiet-wait", type=float, default=float(os.environ.get("BENCH_QUIET_WAIT", "60")))
    args = ap.parse_args()

    systems = []
    if args.only in (None, "rpx"):
        missing = [b for b in ("ipcluster", "ipcontroller", "ipengine", "rpx-compiler")
                   if not (Path(args.rpx_bin) / b).exists()]
        if missing:
            sys.exit(f"{missing} missing in {args.rpx_bin}: run cargo build --release first")
        systems.append(Rpx)
    if args.only in (None, "ipp"):
        systems.append(Ipp)

    result = {"args": vars(args), "versions": versions(args), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "reps": {}, "errors": {}}
    # alternate the systems rep by rep so that drift in machine load hits both alike
    for i in range(args.reps):
        for cls in systems:
            sysobj = cls(args)
            log(f"=== {sysobj.name} rep {i + 1}/{args.reps}")
            gate = wait_quiet(args.quiet_cores, args.quiet_wait)
            try:
                r = one_rep(sysobj, args)
                r["quiet_gate"] = gate
                result["reps"].setdefault(sysobj.name, []).append(r)
            except Exception as e:  # noqa: BLE001  record, clean up, go on with the other system
                log(f"  {sysobj.name} rep {i + 1} FAILED: {e!r}")
                result["errors"].setdefault(sysobj.name, []).append(repr(e))
                sysobj.stop()
            finally:
                shutil.rmtree(sysobj.state, ignore_errors=True)
            time.sleep(1)

    result["summary"] = {name: summarize(reps) for name, reps in result["reps"].items()}
    result["table_md"] = table(result["summary"])
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["loadavg_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (time.strftime("%Y%m%d-%H%M%S") + ".json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print(result["table_md"])
    if result["errors"]:
        print("\nerrors:", json.dumps(result["errors"], indent=1))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
