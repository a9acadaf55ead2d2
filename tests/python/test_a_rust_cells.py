"""Rust cells on rpx engines through the Python client's DirectView.execute."""

import time
import pytest
from ipyparallel import error

import rpx_helpers as H


def strip_all(xs):
    return [(x or "").strip() for x in H.as_list(xs)]


def test_stdout_from_every_engine(rc, cluster):
    ids = cluster.live_rust_ids()
    assert len(ids) == 4
    ar, res = H.run_cell(rc[ids], 'println!("hello from rpx");', timeout=H.FIRST_CELL_TIMEOUT)
    assert len(res) == len(ids)
    assert strip_all(ar.stdout) == ["hello from rpx"] * len(ids), ar.stdout
    # each output is labelled with the engine that produced it
    assert ar.engine_id == ids


def test_blocking_execute_returns_with_outputs(rc, cluster):
    ids = cluster.live_rust_ids()
    view = rc[ids]
    # the plain blocking API (what %px does); bounded so a missing reply fails instead of hanging
    ar = H.bounded(view.execute, 'println!("blocking {}", 6 * 7);', block=True, timeout=H.CELL_TIMEOUT,
                   what="execute(block=True)")
    assert ar.ready()
    assert strip_all(ar.stdout) == ["blocking 42"] * len(ids)


def test_last_expression_is_the_result(rc, cluster):
    ids = cluster.live_rust_ids()
    ar, replies = H.run_cell(rc[ids], "40 + 2", silent=False)
    results = H.as_list(ar.execute_result)
    assert len(results) == len(ids)
    for r in results:
        assert r is not None, "no execute_result published on iopub"
        assert r["data"]["text/plain"].strip() == "42"
    for rep in replies:
        assert rep.data["text/plain"].strip() == "42"
        assert "42" in repr(rep)  # Out[<engine>:<count>]: 42


def test_state_carries_across_cells(rc, cluster):
    ids = cluster.live_rust_ids()
    H.run_cell(rc[ids], "let x = 41u64;")
    ar, _ = H.run_cell(rc[ids], 'println!("{}", x + 1);')
    assert strip_all(ar.stdout) == ["42"] * len(ids)
    # and once more, with a value that changes state
    H.run_cell(rc[ids], "let x = x * 2;")
    ar, _ = H.run_cell(rc[ids], 'println!("{}", x);')
    assert strip_all(ar.stdout) == ["82"] * len(ids)


def test_compile_error_shows_rustc_diagnostic(rc, cluster):
    ids = cluster.live_rust_ids()
    H.run_cell(rc[ids], "let kept = 7u8;")
    with pytest.raises(error.RemoteError) as ei:
        H.run_cell(rc[ids], "let y = not_defined_anywhere + 1;")
    exc = ei.value
    text = H.error_text(exc)
    assert "cannot find value" in text, text
    assert "not_defined_anywhere" in text, text
    if isinstance(exc, error.CompositeError):
        assert len(exc.elist) == len(ids), f"every engine should report the error: {exc.elist}"
    # the failed cell changed nothing: earlier state is still there, later cells still run
    ar, _ = H.run_cell(rc[ids], 'println!("{}", kept);')
    assert strip_all(ar.stdout) == ["7"] * len(ids)


def test_runtime_output_on_stderr(rc, cluster):
    ids = cluster.live_rust_ids()
    ar, _ = H.run_cell(rc[ids], 'eprintln!("to stderr");')
    assert strip_all(ar.stderr) == ["to stderr"] * len(ids), ar.stderr


def test_long_cell_on_one_engine_does_not_hold_up_the_others(rc, cluster, tmp_path):
    # Ordered by signals: the long cell says it started, then waits until the test opens its
    # gate, so the others' answers are known to come while it still runs.
    ids = cluster.live_rust_ids()
    slow, rest = ids[0], ids[1:]
    started, gate = tmp_path / "started", tmp_path / "open"
    hold = (f'std::fs::write("{started}", b"").unwrap(); let t0 = std::time::Instant::now(); '
            f'while !std::path::Path::new("{gate}").exists() && t0.elapsed() < std::time::Duration::from_secs(120) '
            '{ std::thread::sleep(std::time::Duration::from_millis(5)); }')
    long_ar = rc[slow].execute(hold, block=False)
    try:
        deadline = time.monotonic() + H.CELL_TIMEOUT
        while not started.exists():
            assert time.monotonic() < deadline, "the long cell never started"
            assert not long_ar.ready(), long_ar.get()
            time.sleep(0.01)
        ar, _ = H.run_cell(rc[rest], 'println!("not waiting");', timeout=H.CELL_TIMEOUT)
        assert strip_all(ar.stdout) == ["not waiting"] * len(rest)
        assert not long_ar.ready(), "the others only answered after the long cell on engine %d ended" % slow
    finally:
        gate.touch()
        long_ar.get(timeout=H.CELL_TIMEOUT)
        H.finish_output(long_ar)
