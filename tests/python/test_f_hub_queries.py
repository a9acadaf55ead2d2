"""Hub queries from the Python client: queue_status, hub_history, result_status, get_result."""

import ipyparallel

import rpx_helpers as H


def test_queue_status(rc, cluster):
    qs = H.bounded(rc.queue_status)
    assert "unassigned" in qs, qs
    for eid in rc.ids:
        assert eid in qs, qs
        assert {"queue", "completed", "tasks"} <= set(qs[eid]), qs[eid]
    ids = cluster.live_rust_ids()
    H.run_cell(rc[ids], "let _q = 1;")
    qs2 = H.bounded(rc.queue_status)
    for eid in ids:
        assert qs2[eid]["completed"] >= qs[eid]["completed"] + 1, (qs, qs2)
        assert qs2[eid]["queue"] == qs[eid]["queue"], (eid, qs, qs2)  # nothing left queued by the cell
    one = H.bounded(rc.queue_status, targets=ids[0])
    assert {"queue", "completed", "tasks"} <= set(one)
    verbose = H.bounded(rc.queue_status, verbose=True)
    assert isinstance(verbose[ids[0]]["completed"], list)


def test_hub_history_contains_submitted_ids(rc, cluster):
    ids = cluster.live_rust_ids()
    ar, _ = H.run_cell(rc[ids], "let _h = 2;")
    hist = H.bounded(rc.hub_history)
    for m in ar.msg_ids:
        assert m in hist, f"{m} not in hub history ({len(hist)} entries)"
    # ordered by submission: these are the latest ones
    assert set(ar.msg_ids) <= set(hist[-(len(ids) + 10):])


def test_result_status_completed_and_pending(rc, cluster):
    ids = cluster.live_rust_ids()
    done_ar, _ = H.run_cell(rc[ids[0]], 'println!("done");')
    done = done_ar.msg_ids[0]
    # the submitting client answers from its cache
    st = rc.result_status([done])
    assert done in st["completed"]
    # another client has no cache, so it asks the hub
    rc2 = ipyparallel.Client(str(cluster.client_file), timeout=30)
    try:
        slow = rc[ids[0]].execute("std::thread::sleep(std::time::Duration::from_secs(8));", block=False)
        st = H.bounded(rc2.result_status, [done], status_only=True)
        assert done in st["completed"] and done not in st["pending"], st
        H.wait_until(lambda: slow.msg_ids[0] in H.bounded(rc.hub_history), 20, what="slow cell in history")
        st = H.bounded(rc2.result_status, slow.msg_ids, status_only=True)
        assert slow.msg_ids[0] in st["pending"], st
        slow.get(timeout=H.CELL_TIMEOUT)
        st = H.bounded(rc2.result_status, slow.msg_ids, status_only=True)
        assert slow.msg_ids[0] in st["completed"], st
    finally:
        rc2.close()


def test_get_result_from_another_client(rc, cluster):
    ids = cluster.live_rust_ids()
    ar, _ = H.run_cell(rc[ids[0]], 'println!("kept by the hub");')
    rc2 = ipyparallel.Client(str(cluster.client_file), timeout=30)
    try:
        hub_ar = rc2.get_result(ar.msg_ids[0], block=False)
        H.bounded(hub_ar.get, timeout=30, what="AsyncHubResult.get")
        assert (hub_ar.stdout or "").strip() == "kept by the hub", hub_ar.stdout
    finally:
        rc2.close()
