"""A controller SIGKILLed and restarted with `ipcontroller --reuse`: the Python `ipyparallel.Client`
made before the restart keeps working (libzmq reconnects to the same ports, the key is the same),
the Rust engines come back under their ids with their variables, and a new Client reading the
same connection file connects. Uses a cluster of its own (the session cluster is not touched).
Times are recorded in the output (terminal summary), never asserted beyond the bounded waits."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import ipyparallel
import pytest

import rpx_helpers as H


@pytest.fixture
def own_cluster():
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-pytest-restart-"))
    env = dict(os.environ, RPX_DIR=str(rpx_dir), RUST_BACKTRACE="0")
    env.pop("RPX_PROFILE", None)
    started = []
    try:
        r = subprocess.run([str(H.RELEASE / "ipcluster"), "start", "-n", "2", "--daemonize", "--no-restart"], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        yield rpx_dir, env, started
    finally:
        for p in started:
            H.kill_tree(p)
        subprocess.run([str(H.RELEASE / "ipcluster"), "stop"], env=env, capture_output=True, timeout=60)
        H.sweep(rpx_dir)
        shutil.rmtree(rpx_dir, ignore_errors=True)


def test_python_client_survives_a_controller_restart_with_reuse(own_cluster):
    rpx_dir, env, started = own_cluster
    sec = rpx_dir / "profile_default" / "security"
    client_file = sec / "ipcontroller-client.json"
    rc = ipyparallel.Client(str(client_file), timeout=30)
    try:
        rc.wait_for_engines(2, timeout=60)
        ids = sorted(rc.ids)
        H.run_cell(rc[ids], 'let kept: String = String::from("survives");')
        controller = H.read_json(sec / "cluster.json")["controller_pid"]
        os.kill(controller, signal.SIGKILL)
        H.wait_until(lambda: not os.path.exists(f"/proc/{controller}") or H.cmdline(controller) == "", 10,
                     what="the controller to die")
        log = open(rpx_dir / "ipcontroller-reuse.log", "w")
        t0 = time.monotonic()
        started.append(subprocess.Popen([str(H.RELEASE / "ipcontroller"), "--reuse"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))
        # A new client from the same connection file reaches the restarted controller, and the
        # engines are back under their ids.
        try:
            rc2 = ipyparallel.Client(str(client_file), timeout=30)
        except Exception as e:
            log.flush()
            pytest.fail(f"no client could connect to the restarted controller ({e!r}); its log:\n"
                        + (rpx_dir / "ipcontroller-reuse.log").read_text(), pytrace=False)
        try:
            try:
                rc2.wait_for_engines(2, timeout=10)
            except TimeoutError as e:
                log.flush()
                pytest.fail(f"{e}; the restarted controller's log:\n" + (rpx_dir / "ipcontroller-reuse.log").read_text(),
                            pytrace=False)
            H.note("controller restart (--reuse)", f"engines back after {time.monotonic() - t0:.2f} s")
            assert sorted(rc2.ids) == ids
        finally:
            rc2.close()
        # The client made before the restart still works (libzmq reconnected it), and the
        # engines kept their variables.
        ar, _ = H.run_cell(rc[ids], "kept.clone()")
        results = H.as_list(ar.execute_result)
        assert [r["data"]["text/plain"].strip() for r in results] == ['"survives"'] * 2, results
    finally:
        rc.close()
