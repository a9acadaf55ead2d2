"""A Python apply_request (pickled Python) sent to a Rust engine gets a clear error, never a crash."""

import pytest
from ipyparallel import error

from ipyparallel import interactive

import rpx_helpers as H


def test_python_apply_to_rust_engine_direct(rc, cluster):
    eid = cluster.live_rust_ids()[0]
    with pytest.raises(error.RemoteError) as ei:
        rc[eid].apply_async(interactive(lambda: 1)).get(timeout=30)
    text = H.error_text(ei.value)
    assert "rust" in text.lower(), text
    H.note("apply to a Rust engine", f"{ei.value.ename}: {str(ei.value.evalue)[:200]}")
    # the engine keeps working
    ar, _ = H.run_cell(rc[eid], 'println!("still here");')
    assert ar.stdout.strip() == "still here"
    assert eid in rc.ids


def test_python_apply_load_balanced_over_rust_engines(rc, cluster):
    ids = cluster.live_rust_ids()
    lv = rc.load_balanced_view(targets=ids)
    with pytest.raises(error.RemoteError) as ei:
        lv.apply_async(interactive(lambda x: x), 1).get(timeout=30)
    assert "rust" in H.error_text(ei.value).lower(), H.error_text(ei.value)
    ar, _ = H.run_cell(rc[ids], 'println!("ok");')
    assert [s.strip() for s in ar.stdout] == ["ok"] * len(ids)
