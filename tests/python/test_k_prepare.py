"""The rpx client crate compiled ahead of the first cell that uses it (`rpx-kernel prepare`).

Each test gets its own XDG_CACHE_HOME, so what it sees was prepared by the test itself.
`test_prepare_then_a_kernel_uses_the_prepared_crate` compiles the client crate inside evcxr once
(minutes on a loaded 2-core machine); the others start nothing long.
"""

import os
import subprocess

import psutil

import pytest

import rpx_helpers as H
from kernel_fixtures import CELL_TIMEOUT, FIRST_CELL_TIMEOUT, KERNEL_BINARY

pytest_plugins = ["kernel_fixtures"]

PREPARE_TIMEOUT = 1800  # the whole dependency tree of the client crate, built inside evcxr

SLOW_PATH = "its first build takes minutes"


def kernel_pid(k):
    return k.km.provisioner.pid


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and H.ppid_of(int(d)) == pid:
                out.append(int(d))
        except FileNotFoundError:
            pass  # it exited between the listing and the read
    return out


def nice_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def argv(pid):
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def background_prepares(kpid):
    return [p for p in children(kpid) if argv(p)[1:2] == ["prepare"]]


def test_prepare_then_a_kernel_uses_the_prepared_crate(jupyter_env, no_cluster_env, start_kernel, tmp_path):
    env = dict(no_cluster_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([str(KERNEL_BINARY), "prepare"], env=env, capture_output=True, text=True,
                       timeout=PREPARE_TIMEOUT)
    assert r.returncode == 0, f"stdout: {r.stdout}\nstderr: {r.stderr[-4000:]}"
    assert "Prepared the rpx client crate" in r.stdout, r.stdout
    root = tmp_path / "cache" / "rpx" / "kernel"
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    seeds = [d for d in root.iterdir() if d.name.startswith("seed-")]
    assert len(seeds) == 1 and (seeds[0] / "READY").is_file(), list(root.iterdir())
    assert not [d for d in root.iterdir() if d.name.startswith("building-")]

    again = subprocess.run([str(KERNEL_BINARY), "prepare"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "prepared already" in again.stdout, again.stdout + again.stderr

    k = start_kernel(env=env)
    kpid = kernel_pid(k)
    assert k.run("1 + 1", timeout=FIRST_CELL_TIMEOUT).status == "ok"
    # The kernel's private evcxr build directory, as its runtime (a child) inherited it.
    dirs = {environ_of(p).get(b"EVCXR_TMPDIR") for p in children(kpid)} - {None}
    assert len(dirs) == 1, dirs
    build_dir = dirs.pop().decode()
    assert os.path.isdir(build_dir) and oct(os.stat(build_dir).st_mode & 0o777) == "0o700"
    assert background_prepares(kpid) == [], "a kernel started a prepare although one is ready"
    cell = k.run('println!("{}", std::any::type_name::<rpx::Client>());', timeout=FIRST_CELL_TIMEOUT)
    assert cell.status == "ok", cell.text
    assert "Client" in cell.stdout, cell.text
    assert SLOW_PATH not in cell.stderr and "Could not use the prepared" not in cell.stderr, cell.stderr
    # The kernel's evcxr build directory holds the prepared dependencies, and goes with the kernel.
    assert _has_rlib(build_dir, "librpx-"), os.listdir(build_dir)
    k.shutdown()
    H.wait_until(lambda: not os.path.exists(build_dir), timeout=30, what=f"{build_dir} removed at shutdown")


def _has_rlib(build_dir, prefix):
    for dirpath, _, files in os.walk(os.path.join(build_dir, "target")):
        if any(f.startswith(prefix) and f.endswith(".rlib") for f in files):
            return True
    return False


def test_a_kernel_prepares_in_the_background_at_low_priority_and_the_prepare_dies_with_it(
        jupyter_env, no_cluster_env, start_kernel, tmp_path):
    env = dict(no_cluster_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("RPX_KERNEL_PREPARE", None)
    k = start_kernel(env=env)
    kpid = kernel_pid(k)
    H.wait_until(lambda: background_prepares(kpid), timeout=CELL_TIMEOUT, what="a background `rpx-kernel prepare`")
    (prep,) = background_prepares(kpid)
    assert argv(prep)[1:] == ["prepare", "--background"], argv(prep)
    assert nice_of(prep) == 19
    # A second kernel sees the prepare running and does not start another.
    k2 = start_kernel(env=env)
    assert k2.run("1 + 1", timeout=FIRST_CELL_TIMEOUT).status == "ok"
    assert background_prepares(kernel_pid(k2)) == []
    k.shutdown()
    H.wait_until(lambda: not os.path.exists(f"/proc/{prep}") or _zombie(prep), timeout=30,
                 what="the background prepare ends with its kernel")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_no_background_prepare_when_turned_off(jupyter_env, no_cluster_env, start_kernel, tmp_path):
    env = dict(no_cluster_env, XDG_CACHE_HOME=str(tmp_path / "cache"), RPX_KERNEL_PREPARE="0")
    k = start_kernel(env=env)
    # The background prepare would start with the kernel's evcxr context, before any cell runs.
    assert k.run("1 + 1", timeout=FIRST_CELL_TIMEOUT).status == "ok"
    assert background_prepares(kernel_pid(k)) == []
    assert not (tmp_path / "cache" / "rpx").exists()
