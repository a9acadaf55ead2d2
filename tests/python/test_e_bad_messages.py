"""Messages with a wrong HMAC and malformed multiparts, sent with pyzmq straight to the controller's
registration, mux and task sockets: dropped, nothing changes, everything keeps working."""

import json
import time
import uuid

import psutil
import zmq

import rpx_helpers as H

MARKER = "SHOULD_NOT_RUN_" + uuid.uuid4().hex[:8]


def controller_pid(cluster):
    for p in H.procs_with_env("RPX_DIR", str(cluster.rpx_dir)):
        cmd = H.cmdline(p.pid)
        if cmd.split(" ")[0].endswith("ipcontroller") or "ipyparallel.controller" in cmd:
            return p.pid
    return None


def drain(sock, seconds):
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            got.append(sock.recv_multipart())
    return got


def test_bad_signatures_and_malformed_frames_are_dropped(rc, cluster):
    info = json.loads(cluster.client_file.read_text())
    key, iface = info["key"], info["interface"]
    ctl = controller_pid(cluster)
    assert ctl, "no ipcontroller process found for this cluster"
    ids_before = sorted(rc.ids)
    target = cluster.live_rust_ids()[0]
    engine_uuid = rc._engines[target].encode()
    qs_before = H.bounded(rc.queue_status)

    ctx = zmq.Context()
    socks = {}
    try:
        sub = ctx.socket(zmq.SUB)  # watch iopub: the marker cell must never run
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"{iface}:{info['iopub']}")
        for name in ("registration", "mux", "task"):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(f"{iface}:{info[name]}")
            socks[name] = s
        time.sleep(0.5)  # let the connections settle

        code = f'println!("{MARKER}");'
        exec_content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": False}
        bad = {
            "registration": [
                H.raw_msg(key, "queue_request", {"targets": None, "verbose": False}, sign_with="wrong-key")[1],
                H.raw_msg(key, "registration_request", {"uuid": str(uuid.uuid4())}, sign_with="wrong-key")[1],
                H.raw_msg(key, "shutdown_request", {}, sign_with="wrong-key")[1],
            ],
            "mux": [[engine_uuid] + H.raw_msg(key, "execute_request", exec_content, sign_with="x")[1]],
            "task": [H.raw_msg(key, "execute_request", exec_content, sign_with="x")[1]],
        }
        junk = [
            [b"junk"],                                   # one junk frame
            [b"a", b"b", b"c", b"d", b"e", b"f"],         # no delimiter
            [b"{}", b"{}", b"{}", b"{}"],                 # JSON-ish but no delimiter, no signature
            [H.DELIM],                                    # delimiter only
            [H.DELIM, b"deadbeef", b"{}"],                # too few frames
            [H.DELIM, b"", b"{}", b"{}", b"{}", b"{}"],   # empty signature
            [H.DELIM, b"\xff" * 64, b"\x00", b"\x01", b"\x02", b"\x03"],  # binary garbage
        ]
        # correctly signed but not JSON, and correctly signed with an unknown msg_type
        hdr = json.dumps({"msg_id": "x", "msg_type": "queue_request", "session": "s", "username": "u",
                          "date": "2020-01-01T00:00:00Z", "version": "5.4"}).encode()
        import hashlib
        import hmac as _hmac
        frames = [hdr, b"{}", b"{}", b"not json at all"]
        mac = _hmac.new(key.encode(), digestmod=hashlib.sha256)
        for f in frames:
            mac.update(f)
        signed_garbage = [H.DELIM, mac.hexdigest().encode()] + frames
        unknown_type = H.raw_msg(key, "no_such_request", {})[1]

        for name, s in socks.items():
            for frames in bad[name] + junk + [signed_garbage]:
                s.send_multipart(frames)
                if name == "mux":  # also with the routing frame in front
                    s.send_multipart([engine_uuid] + frames)
        socks["registration"].send_multipart(unknown_type)

        replies = {name: drain(s, 1.0) for name, s in socks.items()}
        seen = drain(sub, 2.0)

        # a correctly signed request on the same raw socket is answered: the framing above was right,
        # so the silence was the HMAC check
        hdr_ok, good = H.raw_msg(key, "queue_request", {"targets": None, "verbose": False})
        socks["registration"].send_multipart(good)
        answered = None
        deadline = time.monotonic() + 15
        while answered is None and time.monotonic() < deadline:
            if socks["registration"].poll(100):
                frames = socks["registration"].recv_multipart()
                h, c = H.parse_reply(frames)
                if h.get("msg_type") == "queue_reply":
                    answered = c
        assert answered is not None, "a correctly signed queue_request from pyzmq got no queue_reply"
        assert answered.get("status") == "ok", answered
    finally:
        for s in list(socks.values()) + ([sub] if "sub" in locals() else []):
            s.close(0)
        ctx.term()

    # nothing answered the forged requests with a success
    for name, msgs in replies.items():
        for frames in msgs:
            try:
                h, c = H.parse_reply(frames)
            except Exception:  # noqa: BLE001
                continue
            assert c.get("status") != "ok", f"{name}: a forged/malformed message was answered: {h} {c}"
    if any(replies.values()):
        summary = {}
        for name, msgs in replies.items():
            for frames in msgs:
                try:
                    h, c = H.parse_reply(frames)
                    summary.setdefault(name, []).append(
                        f"{h.get('msg_type')} status={c.get('status')} {c.get('ename', '')}: {str(c.get('evalue', ''))[:100]}")
                except Exception:  # noqa: BLE001
                    summary.setdefault(name, []).append(repr(frames)[:100])
        H.note("replies to bad messages", summary)
    # the forged cell never ran anywhere
    assert not any(MARKER.encode() in b"".join(m) for m in seen), "a wrongly signed execute_request ran"

    # controller alive, engine set unchanged, still working
    assert psutil.pid_exists(ctl) and psutil.Process(ctl).status() != psutil.STATUS_ZOMBIE
    assert sorted(rc.ids) == ids_before
    qs = H.bounded(rc.queue_status)
    assert set(qs) >= set(ids_before), qs
    assert set(qs) - {"unassigned"} == set(qs_before) - {"unassigned"}
    ids = cluster.live_rust_ids()
    ar, _ = H.run_cell(rc[ids], 'println!("after junk");')
    assert [s.strip() for s in ar.stdout] == ["after junk"] * len(ids)
    # and no bad message is left counted as queued on an engine (it would stay pending forever)
    qs_after = H.bounded(rc.queue_status)
    stuck = {eid: (qs_before[eid]["queue"], qs_after[eid]["queue"]) for eid in ids_before
             if qs_after[eid]["queue"] != qs_before[eid]["queue"]}
    assert not stuck, (f"bad messages left queued on engines {{eid: (queue before, after)}}: {stuck}; "
                       f"the correctly signed message with a non-JSON content frame is routed to the engine, "
                       f"which never answers it")
    assert qs_after["unassigned"] == qs_before["unassigned"], (qs_before, qs_after)
