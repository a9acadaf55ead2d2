"""Task results survive a controller crash: `ipcontroller --db sqlite` runs load-balanced tasks on a
stock Python engine for the real `ipyparallel.Client`, is SIGKILLed, and a new controller started
with `--db sqlite --restore` on the same profile answers a fresh Client's `get_result`,
`result_status`, `db_query` and `hub_history` for them (values, stdout, dates), and purges.

Needs only `ipcontroller` from the rpx build (no cluster, no compiler): it starts its own
controller and Python engine in a private RPX_DIR, so it does not use the session cluster.
"""

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import ipyparallel as ipp
from ipyparallel import interactive

import rpx_helpers as H


def _start_controller(rpx_dir, env, *args):
    sec = rpx_dir / "profile_default" / "security"
    for name in ("ipcontroller-client.json", "ipcontroller-engine.json"):
        (sec / name).unlink(missing_ok=True)
    log = open(rpx_dir / f"ipcontroller-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen([str(H.RELEASE / "ipcontroller"), "--ping", "1000", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    H.wait_until(lambda: (sec / "ipcontroller-client.json").exists() and (sec / "ipcontroller-engine.json").exists()
                 or proc.poll() is not None, 20, what="the controller's connection files")
    assert proc.poll() is None, Path(log.name).read_text()
    return proc, sec


def _committed(db):
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            return c.execute("SELECT count(*) FROM tasks").fetchone()[0]
    except sqlite3.Error:
        return -1


def test_results_survive_a_sigkilled_controller_with_restore():
    if not (H.RELEASE / "ipcontroller").is_file():
        pytest.fail(f"ipcontroller missing in {H.RELEASE}: run cargo build --release first", pytrace=False)
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-pytest-restore-"))
    (rpx_dir / "ipython").mkdir()
    env = dict(os.environ, RPX_DIR=str(rpx_dir), IPYTHONDIR=str(rpx_dir / "ipython"))
    env.pop("RPX_PROFILE", None)
    procs = []
    try:
        ctrl, sec = _start_controller(rpx_dir, env, "--db", "sqlite")
        procs.append(ctrl)
        elog = open(rpx_dir / "pyengine.log", "w")
        engine = subprocess.Popen([H.VENV_PYTHON, "-m", "ipyparallel.engine", f"--file={sec / 'ipcontroller-engine.json'}",
                                   "--timeout=30"], env=env, stdout=elog, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(engine)
        rc = ipp.Client(str(sec / "ipcontroller-client.json"), timeout=30)  # positional: url_file= is ignored by 9.2
        rc.wait_for_engines(1, timeout=60)
        lv = rc.load_balanced_view()
        ars = [lv.apply_async(interactive(lambda i: (i, bytes(range(i % 256)) * 50, "x" * i)), i) for i in range(20)]
        results = [ar.get(timeout=30) for ar in ars]
        ids = [ar.msg_ids[0] for ar in ars]
        printed = lv.apply_async(interactive(lambda: print("hello from before the crash") or 7))
        assert printed.get(timeout=30) == 7
        ids.append(printed.msg_ids[0])
        history_before = H.bounded(rc.hub_history)
        H.wait_until(lambda: _committed(sec / "tasks.db") == len(ids), 10, what="the records to be committed")
        rc.close()

        ctrl.kill()
        ctrl.wait(10)
        H.kill_tree(engine)

        ctrl2, _ = _start_controller(rpx_dir, env, "--db", "sqlite", "--restore")
        procs.append(ctrl2)
        rc2 = ipp.Client(str(sec / "ipcontroller-client.json"), timeout=30)  # positional: url_file= is ignored by 9.2
        assert rc2.ids == [], "no engine: everything below comes from the database"
        assert H.bounded(rc2.get_result, ids[:20]).get(timeout=30) == results
        again = H.bounded(rc2.get_result, ids[20])
        assert again.get(timeout=30) == 7
        assert "hello from before the crash" in again.stdout
        status = H.bounded(rc2.result_status, ids, status_only=True)
        assert sorted(status["completed"]) == sorted(ids) and status["pending"] == []
        assert H.bounded(rc2.hub_history) == history_before
        recs = H.bounded(rc2.db_query, {"msg_id": {"$in": ids[:5]}}, keys=["msg_id", "completed", "engine_uuid", "result_buffers"])
        assert [r["msg_id"] for r in recs] == ids[:5]
        assert all(isinstance(r["completed"], datetime) and r["engine_uuid"] for r in recs)
        assert all(r["result_buffers"] for r in recs)
        later = H.bounded(rc2.db_query, {"completed": {"$gte": recs[2]["completed"]}, "msg_id": {"$in": ids[:5]}}, keys=["msg_id"])
        assert [r["msg_id"] for r in later] == ids[2:5]

        H.bounded(rc2.purge_hub_results, ids[0])
        with pytest.raises(Exception, match="No such message"):
            H.bounded(rc2.result_status, [ids[0]], status_only=True)
        rc2.close()
    finally:
        for p in procs:
            H.kill_tree(p)
        if not os.environ.get("RPX_TEST_KEEP_DIR"):
            shutil.rmtree(rpx_dir, ignore_errors=True)
