"""A stock Python ipyparallel engine joins the rpx cluster and takes direct and load-balanced work."""

import os

from ipyparallel import interactive

import rpx_helpers as H


def test_python_engine_joins_and_leaves(rc, cluster, python_engine):
    rust_before = cluster.live_rust_ids()
    new_id, proc = python_engine()
    assert new_id not in cluster.rust_ids, "engine ids are never reused"

    # direct
    assert rc[new_id].apply_async(interactive(lambda x: x * 2), 21).get(timeout=30) == 42
    assert rc[new_id].apply_async(os.getpid).get(timeout=30) == proc.pid

    # load-balanced, restricted to the Python engine
    lv = rc.load_balanced_view(targets=[new_id])
    assert lv.map_async(interactive(lambda x: x + 1), range(10)).get(timeout=60) == list(range(1, 11))
    ar = lv.apply_async(interactive(lambda a, b: a + b), 20, 22)
    assert ar.get(timeout=30) == 42
    assert ar.engine_id == new_id
    assert lv.apply_async(os.getpid).get(timeout=30) == proc.pid

    # Python execute and push/pull on it
    rc[new_id].execute("a = 6 * 7", block=False).get(timeout=30)
    assert rc[new_id].pull("a", block=False).get(timeout=30) == 42

    # shutdown through the controller; it leaves rc.ids and the process exits
    rc.shutdown(targets=[new_id], block=False)
    H.wait_until(lambda: new_id not in rc.ids, 30, what=f"engine {new_id} to leave rc.ids")
    proc.wait(30)
    assert sorted(set(rc.ids) & set(cluster.rust_ids)) == rust_before

    # the Rust engines are unaffected
    ar, _ = H.run_cell(rc[rust_before], 'println!("still rust");')
    assert [s.strip() for s in ar.stdout] == ["still rust"] * len(rust_before)


def test_rust_cell_sent_to_python_engine_fails_there(rc, cluster, python_engine):
    new_id, proc = python_engine()
    ar = rc[new_id].execute("let z: u64 = 1;", block=False)
    try:
        ar.get(timeout=30)
        raise AssertionError("Rust code ran on a Python engine?")
    except Exception as e:  # noqa: BLE001  a SyntaxError from IPython, as a RemoteError
        assert "SyntaxError" in H.error_text(e) or "invalid syntax" in H.error_text(e), H.error_text(e)
    assert rc[new_id].apply_async(interactive(lambda: "alive")).get(timeout=30) == "alive"
