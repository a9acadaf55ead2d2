"""100 MB push / pull / scatter / gather to engines on another host: rpx next to ipyparallel 9,
in one run (the issue's row "engine on another host").

The other host is a network + mount + pid namespace with a real sshd on a private bridge
(`target/release/rpx-testhosts`, root only; no uplink, no route out). Both systems put their
controller on this host, bound to the bridge's address, and 2 engines on the other host:
- rpx: `ipcluster start --engines ssh`; the values stream over the engines' data links
  (client <-> engine, the controller routing only the signed requests), measured by the client
  benchmark `bench_ops` (`BENCH_ONLY=data`, `BENCH_CLIENT_FILE` pointing at this cluster):
  a Vec<f64> of 1e8 bytes; with `--with-buffers`, also rpx with `RPX_DATA_PLANE=buffers`
  (message buffers stored and forwarded by the controller), as a third system;
- ipyparallel: `ipcontroller --ip <bridge address>` here, two `ipengine --file` started on the
  other host over ssh; a float64 numpy array of 1e8 bytes, measured as
  `../shared/bench/peers/ipp_ops.py` does (`rc[0].push`, `rc[0].pull`, `rc[:].scatter`,
  `rc[:].gather`, blocking).
The two alternate, `--reps` times each; each run reports medians of 3 transfers. Each repetition
also times 100 MB over one plain TCP connection each way (the transport's ceiling), and bench_ops
times 100 MB copied into fresh memory on this host (what a pulled value costs at least here).

    cargo build --release --workspace --examples
    .venv/bin/python bench/multihost_data.py             # or PYTHON with ipyparallel + numpy
    .venv/bin/python bench/multihost_data.py --reps 3 --with-buffers

Prints a markdown table and writes every sample to bench/results/multihost-data-<time>.json.
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
import numpy as np

from multihost_bench import BIN, REPO, Cluster, log

NBYTES = 100_000_000
TRANSFERS = 3


def rpx_run(hosts, buffers=False):
    ip = hosts["hosts"][0]["ip"]
    c = Cluster(hosts)
    try:
        c.start(2, *c.ssh_args(f"{ip}:2"))
        c.rc.close()
        c.rc = None
        out = Path(tempfile.mkstemp(prefix="rpx-mhdata-", suffix=".json")[1])
        env = dict(c.env, BENCH_ONLY="data", BENCH_N="2", BENCH_REPS=str(TRANSFERS), BENCH_NBYTES=str(NBYTES),
                   BENCH_CLIENT_FILE=str(c.dir / "profile_default/security/ipcontroller-client.json"))
        if buffers:
            env["RPX_DATA_PLANE"] = "buffers"
        subprocess.run([str(BIN / "examples" / "bench_ops"), str(out)], env=env, check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        out.unlink()
        assert r["same_host_engines"] == 0, "the engines must be on the other host"
        assert r["data_link_engines"] == (0 if buffers else 2), f"data links in use: {r['data_link_engines']}"
        suffix = "_buffers" if buffers else ""
        got = {k: r[f"{k}_gb_per_s{suffix}"]["median"] for k in ("push", "pull", "scatter", "gather")}
        if not buffers:
            # This host's floor for a value that lands in new memory (a pulled vector), same run.
            got["fresh_memory"] = r["fresh_memory_copy_gb_per_s"]["median"]
        return got
    finally:
        c.stop()


def ipp_run(hosts):
    ip = hosts["hosts"][0]["ip"]
    ssh = ["ssh", "-F", hosts["ssh_config"], ip]
    # Under the repository: the other host has its own /tmp but shares this file system.
    state = Path(tempfile.mkdtemp(prefix="ipp-mhdata-", dir=REPO / "target"))
    env = dict(os.environ, IPYTHONDIR=str(state))
    ctl = subprocess.Popen([sys.executable, "-m", "ipyparallel.controller", "--ip", hosts["gateway"],
                            "--profile-dir", str(state / "profile")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engines = None
    rc = None
    try:
        security = state / "profile" / "security"
        deadline = time.monotonic() + 60
        while not (security / "ipcontroller-engine.json").exists() or not (security / "ipcontroller-client.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("ipcontroller wrote no connection files")
            time.sleep(0.1)
        time.sleep(0.5)  # the files are written whole before the controller listens; be safe
        cmd = "; ".join(f"(IPYTHONDIR={state} {sys.executable} -m ipyparallel.engine "
                       f"--file={security / 'ipcontroller-engine.json'} >/dev/null 2>&1 &)" for _ in range(2))
        engines = subprocess.run(ssh + [cmd], timeout=60, check=True)
        rc = ipyparallel.Client(str(security / "ipcontroller-client.json"), timeout=30)
        rc.wait_for_engines(2, timeout=120)
        hostnames = rc[:].apply_sync(lambda: __import__("socket").gethostname())
        assert all(h != __import__("socket").gethostname() for h in hostnames), f"engines on this host: {hostnames}"
        arr = np.arange(NBYTES // 8, dtype=np.float64)
        mb = arr.nbytes / 1e9
        e0, dv = rc[0], rc[:]
        e0.push({"a": arr[:1000]}, block=True)
        rates = {"push": [], "pull": [], "scatter": [], "gather": []}

        def timed(op, call):
            t0 = time.perf_counter()
            out = call()
            rates[op].append(mb / (time.perf_counter() - t0))
            return out

        def check(back):
            assert back.shape == arr.shape and np.array_equal(back[::4099], arr[::4099])

        pairs = [("push", lambda: e0.push({"a": arr}, block=True), "pull", lambda: e0.pull("a", block=True), e0, "a"),
                 ("scatter", lambda: dv.scatter("x", arr, block=True), "gather", lambda: dv.gather("x", block=True), dv, "x")]
        for _ in range(TRANSFERS):
            for put_op, put, get_op, get, view, name in pairs:
                timed(put_op, put)
                check(timed(get_op, get))
                view.execute(f"del {name}", block=True)  # as ipp_ops.py does
        return {op: statistics.median(v) for op, v in rates.items()}
    finally:
        if rc is not None:
            try:
                rc.shutdown(hub=False, block=True)
            except Exception as e:  # noqa: BLE001
                log("  ipp engine shutdown:", e)
            rc.close()
        ctl.terminate()
        try:
            ctl.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ctl.kill()
        if engines is not None:
            subprocess.run(ssh + ["pkill -f ipyparallel.engine || true"], timeout=30)
        shutil.rmtree(state, ignore_errors=True)


def receive_timed(s, n):
    """`n` bytes from socket `s` into a buffer allocated once: the buffer, and GB/s from the
    first byte to the last."""
    import time
    buf = bytearray(n)
    mv = memoryview(buf)
    got = s.recv_into(mv, n)
    t = time.perf_counter()
    while got < n:
        k = s.recv_into(mv[got:], n - got)
        assert k, "connection closed early"
        got += k
    return buf, n / 1e9 / (time.perf_counter() - t)


def raw_tcp(hosts):
    """The transport's ceiling: 100 MB over one plain TCP connection between this host and the
    other, each way (Python sockets: `sendall`, and `receive_timed` on the receiving side)."""
    import inspect
    import shlex
    import socket
    ip = hosts["hosts"][0]["ip"]
    gw = hosts["gateway"]
    srv = socket.socket()
    srv.bind((gw, 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = (f"import socket\n{inspect.getsource(receive_timed)}s = socket.create_connection(({gw!r}, {port}))\n"
            f"buf, rate = receive_timed(s, {NBYTES})\nprint(rate, flush=True)\ns.sendall(buf)\ns.close()\n")
    remote = subprocess.Popen(["ssh", "-F", hosts["ssh_config"], ip, "python3 -c " + shlex.quote(code)],
                              stdout=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    conn.sendall(bytes(NBYTES))
    _, from_host = receive_timed(conn, NBYTES)
    to_host = float(remote.communicate(timeout=60)[0].strip())
    conn.close()
    srv.close()
    return {"to_host": to_host, "from_host": from_host}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--with-buffers", action="store_true",
                    help="also measure rpx with RPX_DATA_PLANE=buffers (through the controller)")
    args = ap.parse_args()
    systems = ["rpx", "ipp"] + (["rpx_buffers"] if args.with_buffers else [])
    proc = subprocess.Popen([str(BIN / "rpx-testhosts"), "up", "h1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    hosts = json.loads(proc.stdout.readline())
    record = {"nbytes": NBYTES, "transfers_per_run": TRANSFERS, **{name: [] for name in systems}}
    runs = {"rpx": lambda: rpx_run(hosts), "ipp": lambda: ipp_run(hosts), "rpx_buffers": lambda: rpx_run(hosts, buffers=True)}
    record["raw_tcp"] = []
    try:
        for rep in range(args.reps):
            for system in (systems if rep % 2 == 0 else systems[::-1]):
                r = runs[system]()
                record[system].append(r)
                log(f"rep {rep} {system}: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in r.items()))
            record["raw_tcp"].append(raw_tcp(hosts))
            log(f"rep {rep} plain TCP: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in record["raw_tcp"][-1].items()))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    med = statistics.median
    extra = " rpx through the controller GB/s |" if args.with_buffers else ""
    print(f"| 100 MB, engines on another host (median of {args.reps} runs' medians) | rpx GB/s | ipyparallel GB/s | rpx / ipp |{extra}")
    print("|---|---|---|---|" + ("---|" if extra else ""))
    summary = {}
    for k in ("push", "pull", "scatter", "gather"):
        a, b = med([r[k] for r in record["rpx"]]), med([r[k] for r in record["ipp"]])
        summary[k] = {"rpx": a, "ipp": b, "ratio": a / b}
        row = f"| {k} | {a:.2f} | {b:.2f} | x{a / b:.2f} |"
        if args.with_buffers:
            summary[k]["rpx_buffers"] = med([r[k] for r in record["rpx_buffers"]])
            row += f" {summary[k]['rpx_buffers']:.2f} |"
        print(row)
    raw = {k: med([r[k] for r in record["raw_tcp"]]) for k in ("to_host", "from_host")}
    summary["raw_tcp"] = raw
    fresh = med([r["fresh_memory"] for r in record["rpx"]])
    summary["fresh_memory_copy"] = fresh
    print(f"\nplain TCP, one connection, 100 MB (the transport's ceiling): to the host {raw['to_host']:.2f} GB/s, "
          f"from it {raw['from_host']:.2f} GB/s; ipyparallel x2 would be "
          f"{2 * summary['push']['ipp']:.2f} GB/s push, {2 * summary['pull']['ipp']:.2f} GB/s pull")
    print(f"100 MB copied into fresh memory on this host (the floor under a pulled or gathered value): {fresh:.2f} GB/s")
    record["summary"] = summary
    out = REPO / "bench" / "results" / f"multihost-data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
