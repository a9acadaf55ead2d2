"""The real Python `ipyparallel.Client` against an rpx cluster whose Rust engines sit on two other
hosts: network + mount + pid namespaces with a real sshd (`rpx-testhosts`, see tests/src/hosts.rs),
started with `ipcluster start --engines ssh`. The controller and compiler stay on this host, bound
to the test bridge's address.

Checked as a user would: execute runs on the engines of both hosts (their own hostnames), and a
SIGKILLed remote engine is noticed: its task fails with EngineError, it leaves rc.ids, its worker
dies with it, and the other engines keep working."""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import ipyparallel
import pytest
from ipyparallel import error

import rpx_helpers as H


@pytest.fixture(scope="module")
def hosts():
    proc = subprocess.Popen([str(H.RELEASE / "rpx-testhosts"), "up", "h1", "h2"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read()
        proc.wait(timeout=30)
        if os.environ.get("RPX_SKIP_HOST_TESTS") == "1":
            pytest.skip(f"RPX_SKIP_HOST_TESTS=1: {err.strip()}")
        pytest.fail(f"rpx-testhosts could not create the test hosts:\n{err}", pytrace=False)
    info = json.loads(line)
    try:
        yield info
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def ssh(hosts, host_ip, command, timeout=20):
    return subprocess.run(["ssh", "-F", hosts["ssh_config"], host_ip, command], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def remote(hosts):
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-pytest-remote-"))
    env = dict(os.environ, RPX_DIR=str(rpx_dir), RUST_BACKTRACE="0")
    env.pop("RPX_PROFILE", None)
    ips = {h["name"]: h["ip"] for h in hosts["hosts"]}

    def ipcluster(*args, timeout=180):
        return subprocess.run([str(H.RELEASE / "ipcluster"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    r = ipcluster("start", "--daemonize", "--ip", hosts["gateway"], "--engines", "ssh",
                  "--hosts", f"{ips['h1']}:2,{ips['h2']}:2", "--ssh-args", f"-F {hosts['ssh_config']}",
                  "--timeout", "120")
    profile = rpx_dir / "profile_default"
    rc = None
    try:
        if r.returncode != 0:
            pytest.fail(f"ipcluster start --engines ssh exited {r.returncode}\n{r.stdout}\n{r.stderr}\n"
                        f"{H.log_tail(profile)}", pytrace=False)
        rc = ipyparallel.Client(str(profile / "security" / "ipcontroller-client.json"), timeout=30)
        rc.wait_for_engines(4, timeout=60)
        yield rc, ips
    finally:
        if rc is not None:
            rc.close()
        ipcluster("stop", timeout=60)
        H.sweep(rpx_dir)
        shutil.rmtree(rpx_dir, ignore_errors=True)


def hostnames(rc):
    ar, _ = H.run_cell(rc[:], 'println!("{}", std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim());',
                       timeout=H.FIRST_CELL_TIMEOUT)
    return dict(zip(ar.engine_id, [s.strip() for s in ar.stdout]))


def test_execute_runs_on_the_engines_of_both_hosts(remote):
    rc, _ = remote
    where = hostnames(rc)
    assert sorted(where.values()) == ["h1", "h1", "h2", "h2"], where
    ar, _ = H.run_cell(rc[:], "let twice = 2 * std::env::var(\"RPX_ENGINE_ID\").unwrap().parse::<u64>().unwrap();")
    ar, _ = H.run_cell(rc[:], 'println!("{twice}");')
    assert [int(s) for s in ar.stdout] == [2 * e for e in ar.engine_id], "each engine kept its own variable"


def test_sigkill_of_a_remote_engine_mid_task_is_detected(remote, hosts):
    rc, ips = remote
    where = hostnames(rc)
    victim = max(e for e, h in where.items() if h == "h2")
    others = [e for e in rc.ids if e != victim]
    # Pids as the host sees them: the cell runs in the engine's worker, whose parent is the engine.
    ar, _ = H.run_cell(rc[victim], 'println!("{}", std::process::id());')
    worker = int(ar.stdout.strip())
    stat = ssh(hosts, ips["h2"], f"cat /proc/{worker}/stat").stdout
    engine = int(stat.rsplit(")", 1)[1].split()[1])
    assert "ipengine" in ssh(hosts, ips["h2"], f"tr '\\0' ' ' < /proc/{engine}/cmdline").stdout

    ar = rc[victim].execute('use std::io::Write; println!("started"); std::io::stdout().flush().unwrap();'
                            " std::thread::sleep(std::time::Duration::from_secs(30));", block=False)
    H.wait_until(lambda: "started" in (ar.stdout or ""), 60, what="the long cell to start")
    t0 = time.monotonic()
    assert ssh(hosts, ips["h2"], f"kill -KILL {engine}").returncode == 0
    with pytest.raises(error.RemoteError) as ei:
        ar.get(timeout=30)
    H.note("remote kill: EngineError after", f"{time.monotonic() - t0:.3f} s")
    assert ei.value.ename == "EngineError", H.error_text(ei.value)
    H.wait_until(lambda: victim not in rc.ids, 30, what=f"engine {victim} to leave rc.ids")
    H.wait_until(lambda: ssh(hosts, ips["h2"], f"test -e /proc/{worker}").returncode != 0, 10,
                 what="the killed engine's worker to die with it")
    ar, _ = H.run_cell(rc[others], 'println!("survivor");')
    assert [s.strip() for s in ar.stdout] == ["survivor"] * len(others)
