"""rpx engines on other hosts, measured in one run: a trivial cell on 8 engines spread over 2 hosts
vs 8 engines on one host, and the first cell on a fresh host (libstd and cell artifacts fetched
from the compiler) vs a later one.

The other hosts are network + mount + pid namespaces with a real sshd on a private bridge
(`target/release/rpx-testhosts`, root only); engines reach them through
`ipcluster start --engines ssh`. The controller and compiler bind the bridge's address in every
setup, so the only difference between the setups is where the engines run.

    cargo build --release --workspace
    .venv/bin/python bench/multihost_bench.py                 # 3 repetitions, ~4 min
    .venv/bin/python bench/multihost_bench.py --reps 5 --cells 20

Prints a markdown table and writes every sample to bench/results/multihost-<time>.json.
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

import ipyparallel

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "target" / "release"
TRIVIAL = "let _t = 1;"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Cluster:
    """An rpx cluster in a private RPX_DIR, driven by ipcluster and the Python client."""

    def __init__(self, hosts):
        self.hosts = hosts
        self.dir = Path(tempfile.mkdtemp(prefix="rpx-bench-mh-"))
        self.env = dict(os.environ, RPX_DIR=str(self.dir), RUST_BACKTRACE="0")
        self.env.pop("RPX_PROFILE", None)
        self.rc = None

    def ipcluster(self, *args):
        r = subprocess.run([str(BIN / "ipcluster"), *args], env=self.env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ipcluster {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def ssh_args(self, spec):
        return ["--engines", "ssh", "--hosts", spec, "--ssh-args", f"-F {self.hosts['ssh_config']}"]

    def start(self, n, *launcher):
        args = ["start", "--daemonize", "--ip", self.hosts["gateway"], "--timeout", "180"]
        if launcher:
            args += list(launcher)
        else:
            args += ["-n", str(n)]
        self.ipcluster(*args)
        self.rc = ipyparallel.Client(str(self.dir / "profile_default/security/ipcontroller-client.json"), timeout=30)
        self.rc.wait_for_engines(n, timeout=120)

    def stop(self):
        if self.rc is not None:
            self.rc.close()
        subprocess.run([str(BIN / "ipcluster"), "stop"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


def timed_cell(view, code=TRIVIAL, timeout=300):
    t0 = time.perf_counter()
    ar = view.execute(code, block=False)
    ar.get(timeout=timeout)
    ar.wait_for_output(timeout=30)
    return time.perf_counter() - t0


def cells_on_8(hosts, spread, cells):
    """Median-able samples of a trivial cell on all 8 engines: on this host, or 4 + 4 on h1 and h2."""
    c = Cluster(hosts)
    try:
        if spread:
            ips = [h["ip"] for h in hosts["hosts"]]
            c.start(8, *c.ssh_args(f"{ips[0]}:4,{ips[1]}:4"))
        else:
            c.start(8)
        view = c.rc[:]
        timed_cell(view)  # first cell: warm-up (and the artifact fetches)
        timed_cell(view)
        return [timed_cell(view) for _ in range(cells)]
    finally:
        c.stop()


def first_cell_on_new_engines(hosts, remote, cells):
    """A warm cluster gets 4 new engines (on a fresh host, or on this host): the first cell on
    them vs later ones. The new engines form a new group, so both cases compile alike; the
    difference is the fetch of libstd and the cell's artifact."""
    c = Cluster(hosts)
    try:
        c.start(1)
        timed_cell(c.rc[:])
        timed_cell(c.rc[:])
        if remote:
            ip = hosts["hosts"][0]["ip"]
            # A fresh host: nothing in its artifact cache.
            subprocess.run(["ssh", "-F", hosts["ssh_config"], ip, "rm -rf ~/.cache/rpx"], check=True, timeout=30)
            c.ipcluster("engines", "-n", "4", "--timeout", "180", *c.ssh_args(f"{ip}:4"))
        else:
            c.ipcluster("engines", "-n", "4", "--timeout", "180")
        c.rc.wait_for_engines(5, timeout=120)
        new = sorted(c.rc.ids)[1:]
        view = c.rc[new]
        first = timed_cell(view)
        later = [timed_cell(view) for _ in range(cells)]
        return first, later
    finally:
        c.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", type=int, default=10)
    args = ap.parse_args()
    proc = subprocess.Popen([str(BIN / "rpx-testhosts"), "up", "h1", "h2"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    hosts = json.loads(proc.stdout.readline())
    record = {"reps": [], "cells": args.cells}
    try:
        for rep in range(args.reps):
            r = {}
            # Alternate the order so that drift in machine load hits both setups alike.
            for spread in ([False, True] if rep % 2 == 0 else [True, False]):
                key = "two_hosts" if spread else "one_host"
                r[key] = cells_on_8(hosts, spread, args.cells)
                log(f"rep {rep}: trivial cell on 8 engines, {key}: median {statistics.median(r[key]) * 1e3:.1f} ms")
            for remote in ([True, False] if rep % 2 == 0 else [False, True]):
                key = "fresh_host" if remote else "new_local"
                first, later = first_cell_on_new_engines(hosts, remote, args.cells)
                r[key] = {"first": first, "later": later}
                log(f"rep {rep}: first cell on 4 new engines ({key}): {first * 1e3:.0f} ms, later median "
                    f"{statistics.median(later) * 1e3:.1f} ms")
            record["reps"].append(r)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    one = med([med(r["one_host"]) for r in record["reps"]])
    two = med([med(r["two_hosts"]) for r in record["reps"]])
    fresh_first = med([r["fresh_host"]["first"] for r in record["reps"]])
    fresh_later = med([med(r["fresh_host"]["later"]) for r in record["reps"]])
    local_first = med([r["new_local"]["first"] for r in record["reps"]])
    local_later = med([med(r["new_local"]["later"]) for r in record["reps"]])
    record["summary"] = {"one_host_ms": one * 1e3, "two_hosts_ms": two * 1e3, "ratio_two_over_one": two / one,
                         "fresh_host_first_ms": fresh_first * 1e3, "fresh_host_later_ms": fresh_later * 1e3,
                         "new_local_first_ms": local_first * 1e3, "new_local_later_ms": local_later * 1e3}
    print(f"| measure (median of {args.reps} reps' medians) | ms |")
    print("|---|---|")
    print(f"| trivial cell on 8 engines, one host | {one * 1e3:.1f} |")
    print(f"| trivial cell on 8 engines, 4 + 4 on two hosts | {two * 1e3:.1f} (x{two / one:.2f}) |")
    print(f"| first cell on 4 new engines of a fresh host (libstd + cell fetched) | {fresh_first * 1e3:.0f} |")
    print(f"| later cell on them | {fresh_later * 1e3:.1f} |")
    print(f"| first cell on 4 new engines of this host (no fetch) | {local_first * 1e3:.0f} |")
    print(f"| later cell on them | {local_later * 1e3:.1f} |")
    out = REPO / "bench" / "results" / f"multihost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
