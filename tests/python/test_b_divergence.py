"""Engines whose histories differ: per-engine cells and a panic on one engine only."""

from ipyparallel import error

import rpx_helpers as H


def test_per_engine_cells_and_panic_on_one(rc, cluster):
    ids = cluster.live_rust_ids()
    assert len(ids) >= 2
    for i in ids:  # a different cell on each engine
        H.run_cell(rc[i], f"let eid: usize = {i};")
    victim = ids[1]
    ar = rc[ids].execute(f'if eid == {victim} {{ panic!("boom on one") }}', block=False)
    res = ar.get(timeout=H.CELL_TIMEOUT, return_exceptions=True)
    H.finish_output(ar)
    for eid, r in zip(ids, res):
        if eid == victim:
            assert isinstance(r, error.RemoteError), f"engine {eid} should have panicked, got {r!r}"
            assert "boom on one" in H.error_text(r), H.error_text(r)
        else:
            assert not isinstance(r, Exception), f"engine {eid} failed: {H.error_text(r)}"
    # the blocking form raises, naming the failed engine
    try:
        H.run_cell(rc[ids], f'if eid == {victim} {{ panic!("boom on one") }}')
        raise AssertionError("expected the panic to raise")
    except error.CompositeError as e:
        assert len(e.elist) == 1, e.elist
        assert (e.elist[0][3] or {}).get("engine_id") == victim, f"error should name engine {victim}: {e.elist[0]}"

    # afterwards: every engine still runs cells and still has its own eid
    ar, _ = H.run_cell(rc[ids], 'println!("{}", eid);')
    assert [s.strip() for s in ar.stdout] == [str(i) for i in ids], ar.stdout
    ar, _ = H.run_cell(rc[ids], 'let after_panic = eid * 10; println!("{}", after_panic);')
    assert [s.strip() for s in ar.stdout] == [str(i * 10) for i in ids], ar.stdout


def test_cell_on_a_subset_then_all(rc, cluster):
    ids = cluster.live_rust_ids()
    sub = ids[:2]
    H.run_cell(rc[sub], "let only_some = 5i32;")
    ar, _ = H.run_cell(rc[sub], 'println!("{}", only_some);')
    assert [s.strip() for s in ar.stdout] == ["5"] * len(sub)
    # engines that never saw the variable say so, per engine; the others still work
    ar = rc[ids].execute('println!("{}", only_some);', block=False)
    res = ar.get(timeout=H.CELL_TIMEOUT, return_exceptions=True)
    H.finish_output(ar)
    for eid, r in zip(ids, res):
        if eid in sub:
            assert not isinstance(r, Exception), f"engine {eid}: {H.error_text(r)}"
        else:
            assert isinstance(r, error.RemoteError), f"engine {eid} should not know only_some"
            assert "only_some" in H.error_text(r)
    ar, _ = H.run_cell(rc[ids], 'println!("ok");')
    assert [s.strip() for s in ar.stdout] == ["ok"] * len(ids)
