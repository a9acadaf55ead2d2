"""SIGKILL an engine in the middle of a task: the task fails with EngineError, the engine leaves
rc.ids (a Rust engine of the cluster is then replaced under the same id by ipcluster's
supervisor: a new uuid), the other engines keep answering. (Runs last: it removes engines from
the cluster.) Times are recorded in the output (terminal summary), never asserted."""

import os
import signal
import time

import psutil
import pytest
from ipyparallel import error

import rpx_helpers as H


def rust_engine_pids(rc, cluster, eid):
    """(worker pid, engine pid) of a Rust engine: cells run in the engine's worker child."""
    ar, _ = H.run_cell(rc[eid], 'println!("{}", std::process::id());')
    worker = int(ar.stdout.strip())
    parent = H.ppid_of(worker)
    cpids = cluster.cluster_pids()
    if "ipengine" in H.cmdline(parent) and (not cpids or parent in cpids):
        return worker, parent
    if "ipengine" in H.cmdline(worker) and (not cpids or worker in cpids):
        return worker, worker  # cells run in the engine process itself
    pytest.fail(f"cannot tell engine {eid}'s process: cell ran in pid {worker} ({H.cmdline(worker)}), "
                f"parent {parent} ({H.cmdline(parent)}), cluster.json pids {sorted(cpids)}")


def gone_or_replaced(rc, eid, old_uuid):
    """Engine `eid` left rc.ids, or another engine (a new uuid) holds its id: ipcluster's
    supervisor restarts a dead Rust engine under its id within a second, so its absence can be
    too short to observe."""
    ids = rc.ids  # flushes the registration notifications into rc._engines
    return eid not in ids or rc._engines.get(eid) != old_uuid


def assert_worker_died_with(worker, engine):
    """The worker of a SIGKILLed engine must not outlive it (PDEATHSIG); an orphan is killed,
    then the test fails."""
    try:
        H.wait_until(lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie", 5)
    except TimeoutError:
        cmd = H.cmdline(worker)
        H.kill_pids([worker])
        pytest.fail(f"worker {worker} of SIGKILLed engine {engine} still alive 5 s later: {cmd}")


def test_sigkill_rust_engine_mid_task_direct(rc, cluster):
    ids = cluster.live_rust_ids()
    assert len(ids) >= 2
    victim = ids[-1]
    others = [i for i in ids if i != victim]
    worker, engine = rust_engine_pids(rc, cluster, victim)
    old_uuid = rc._engines[victim]
    ar = rc[victim].execute(
        'use std::io::Write; println!("started"); std::io::stdout().flush().unwrap();'
        " std::thread::sleep(std::time::Duration::from_secs(30));", block=False)
    try:
        H.wait_until(lambda: "started" in (ar.stdout or ""), 60, what="the long cell to start")
        H.note("direct kill", "long cell reported 'started' before the kill")
    except TimeoutError:
        H.note("direct kill", "no 'started' on stdout within 60 s (output not streamed live?); killing anyway")
    assert not ar.ready(), f"the 30 s cell finished early: {ar.get(0)!r}"
    t0 = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(error.RemoteError) as ei:
        ar.get(timeout=20)
    elapsed = time.monotonic() - t0
    H.note("direct kill: EngineError after", f"{elapsed:.3f} s ({ei.value.ename}: {str(ei.value.evalue)[:120]})")
    assert ei.value.ename == "EngineError", H.error_text(ei.value)

    t_leave = H.wait_until(lambda: gone_or_replaced(rc, victim, old_uuid) and time.monotonic(), 20,
                           what=f"engine {victim} to leave rc.ids or be replaced")
    H.note("direct kill: engine left rc.ids (or was replaced) after", f"{t_leave - t0:.3f} s")
    assert_worker_died_with(worker, engine)

    ar2, _ = H.run_cell(rc[others], 'println!("survivor");')
    assert [s.strip() for s in ar2.stdout] == ["survivor"] * len(others)
    # new compiles still work for the survivors
    ar3, _ = H.run_cell(rc[others], "let after_kill = 3u8; println!(\"{}\", after_kill);")
    assert [s.strip() for s in ar3.stdout] == ["3"] * len(others)


def test_sigkill_python_engine_mid_task_load_balanced(rc, cluster, python_engine):
    new_id, proc = python_engine()
    lv = rc.load_balanced_view(targets=[new_id])
    assert lv.apply_async(os.getpid).get(timeout=30) == proc.pid
    ar = lv.apply_async(time.sleep, 30)

    def queued():
        qs = H.bounded(rc.queue_status)
        q = qs.get(new_id, {})
        return q.get("queue", 0) + q.get("tasks", 0) >= 1

    try:
        H.wait_until(queued, 15, interval=0.2, what="the task to reach the engine")
    except TimeoutError:
        H.note("lb kill", "queue_status never showed the task on the engine; killing anyway")
    time.sleep(0.5)  # time.sleep(30) is running on the engine now
    assert not ar.ready(), ar.get(0)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(error.RemoteError) as ei:
        ar.get(timeout=30)
    elapsed = time.monotonic() - t0
    H.note("lb kill: EngineError after", f"{elapsed:.3f} s ({ei.value.ename}: {str(ei.value.evalue)[:120]})")
    assert ei.value.ename == "EngineError", H.error_text(ei.value)
    H.wait_until(lambda: new_id not in rc.ids, 20, what=f"engine {new_id} to leave rc.ids")
    ids = cluster.live_rust_ids()
    ar2, _ = H.run_cell(rc[ids], 'println!("survivor");')
    assert [s.strip() for s in ar2.stdout] == ["survivor"] * len(ids)


def lb_execute(rc, code, targets):
    """A load-balanced execute_request (what a Rust client's view sends), through the Python
    client's task socket: LoadBalancedView has no execute(), so build it as its apply() does."""
    from ipyparallel.client.asyncresult import AsyncResult

    md = dict(after=[], follow=[], timeout=None, targets=[rc._engines[t] for t in targets], retries=0)
    fut = rc.send_execute_request(rc._task_stream, code, silent=False, metadata=md)
    return AsyncResult(rc, fut, fname="execute", owner=True)  # one future: a single result


def test_sigkill_rust_engine_mid_task_load_balanced_execute(rc, cluster):
    ids = cluster.live_rust_ids()
    assert len(ids) >= 2
    victim = ids[-1]
    others = [i for i in ids if i != victim]
    # a load-balanced Rust cell works and reports where it ran
    ok = lb_execute(rc, 'println!("lb rust");', [victim])
    ok.get(timeout=H.CELL_TIMEOUT)
    H.finish_output(ok)
    assert ok.stdout.strip() == "lb rust" and ok.engine_id == victim, (ok.stdout, ok.engine_id)

    worker, engine = rust_engine_pids(rc, cluster, victim)
    old_uuid = rc._engines[victim]
    ar = lb_execute(rc, 'use std::io::Write; println!("started"); std::io::stdout().flush().unwrap();'
                        " std::thread::sleep(std::time::Duration::from_secs(30));", [victim])
    try:
        H.wait_until(lambda: "started" in (ar.stdout or ""), 60, what="the long cell to start")
    except TimeoutError:
        H.note("lb execute kill", "no 'started' on stdout within 60 s; killing anyway")
    assert not ar.ready()
    t0 = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(error.RemoteError) as ei:
        ar.get(timeout=20)
    H.note("lb execute kill (Rust engine): EngineError after",
           f"{time.monotonic() - t0:.3f} s ({ei.value.ename}: {str(ei.value.evalue)[:120]})")
    assert ei.value.ename == "EngineError", H.error_text(ei.value)
    H.wait_until(lambda: gone_or_replaced(rc, victim, old_uuid), 20, what=f"engine {victim} to leave rc.ids or be replaced")
    assert_worker_died_with(worker, engine)
    ar2, _ = H.run_cell(rc[others], 'println!("survivor");')
    assert [s.strip() for s in ar2.stdout] == ["survivor"] * len(others)
