"""The rpx kernel at the protocol level, through jupyter_client's own sockets: messages signed
with the wrong key and malformed frames are dropped without an answer and without harm, the
control channel answers while a cell runs, and a shutdown request ends the kernel and its evcxr
runtime (no orphan)."""

import socket
import time
from queue import Empty

import psutil
from jupyter_client.session import Session

from kernel_fixtures import FIRST_CELL_TIMEOUT

pytest_plugins = ["kernel_fixtures"]


def no_reply_within(kc, seconds):
    """Whatever arrives on shell within `seconds` (expected: nothing)."""
    got = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got.append(kc.get_shell_msg(timeout=0.2))
        except Empty:
            pass
    return got


def test_wrongly_signed_and_malformed_messages_are_dropped(rpx_kernel_no_cluster):
    k = rpx_kernel_no_cluster
    k.run("let kept: u64 = 41;").assert_ok()
    sock = k.kc.shell_channel.socket
    forger = Session(key=b"not-the-kernel-key", username="intruder")
    forger.send(sock, "execute_request", {"code": "let kept: u64 = 0;", "silent": False, "store_history": True,
                                          "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
    unsigned = Session(key=b"", username="intruder")
    unsigned.send(sock, "execute_request", {"code": "let kept: u64 = 1;", "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
    sock.send_multipart([b"<IDS|MSG>", b"deadbeef", b"{not json", b"{}", b"{}", b"{}"])
    sock.send_multipart([b"no delimiter at all"])
    assert no_reply_within(k.kc, 3) == []
    assert k.is_alive()
    # None of them ran: the variable is as it was.
    c = k.run("kept + 1").assert_ok()
    assert c.results[0]["data"]["text/plain"] == "42", c.describe()


def forge_until_closed(ip, port, payload):
    """Send `payload` to a kernel port and wait (bounded) until the kernel closes it."""
    with socket.create_connection((ip, port), timeout=30) as s:
        s.sendall(payload)
        while s.recv(4096):
            pass


def test_a_forged_frame_header_on_every_port_is_cut_off(rpx_kernel_no_cluster):
    """A peer without the key sends a ZMTP greeting and a frame header declaring 2^62 bytes to
    each of the kernel's five sockets (this used to abort the kernel): each connection is
    closed, and the kernel keeps its variables and answers."""
    k = rpx_kernel_no_cluster
    k.run("let guarded: u64 = 6;").assert_ok()
    info = k.km.get_connection_info()
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\0" * 16 + b"\0" * 32
    forged = greeting + b"\x02" + (1 << 62).to_bytes(8, "big")
    ports = [info[name] for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
    for port in ports:
        forge_until_closed(info["ip"], port, forged)
    assert k.is_alive()
    c = k.run("guarded * 7").assert_ok()
    assert c.results[0]["data"]["text/plain"] == "42", c.describe()


def test_control_answers_while_a_cell_runs(start_kernel, no_cluster_env):
    k = start_kernel(env=no_cluster_env)
    k.run("1").assert_ok()
    msg_id = k.kc.execute("std::thread::sleep(std::time::Duration::from_secs(5));")
    # kernel_info on the control channel, while the shell is busy.
    kc = k.kc
    msg = kc.session.msg("kernel_info_request", {})
    kc.control_channel.send(msg)
    reply = kc.control_channel.get_msg(timeout=10)
    assert reply["msg_type"] == "kernel_info_reply"
    assert reply["content"]["language_info"]["name"] == "rust"
    # The cell still finishes normally.
    end = time.monotonic() + 120
    while True:
        assert time.monotonic() < end, "the sleeping cell never replied"
        r = kc.get_shell_msg(timeout=120)
        if r["parent_header"].get("msg_id") == msg_id:
            assert r["content"]["status"] == "ok", r["content"]
            break


def test_shutdown_ends_the_kernel_and_its_runtime(start_kernel, no_cluster_env):
    k = start_kernel(env=no_cluster_env)
    k.run("let x = 1;").assert_ok()
    kernel = psutil.Process(k.km.provisioner.process.pid)
    family = [kernel] + kernel.children(recursive=True)
    assert len(family) >= 2, "the evcxr runtime runs as a child of the kernel"
    k.km.shutdown_kernel(now=False)
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after shutdown: {[p.pid for p in alive]}"


def test_a_local_panic_is_an_error_and_keeps_earlier_variables(rpx_kernel_no_cluster):
    k = rpx_kernel_no_cluster
    k.run("let before: u64 = 6;").assert_ok()
    c = k.run('let during: u64 = 1; panic!("local boom {}", before);')
    assert c.status == "error", c.describe()
    assert c.reply["ename"] == "Panic" and c.reply["evalue"] == "local boom 6", c.describe()
    assert [t for t, _ in c.messages] == ["error"], f"the panic is shown once, as the error\n{c.describe()}"
    assert k.run("before * 7").assert_ok().results[0]["data"]["text/plain"] == "42"


def test_a_question_mark_on_an_err_in_a_local_cell_is_the_error_shown_once(rpx_kernel_no_cluster):
    # "Run all" must stop at this cell: the reply is an error, and the error's text is shown
    # once, as the error (not also on stderr); stderr written before it stays stderr.
    k = rpx_kernel_no_cluster
    k.run("let qm_before: u64 = 5;").assert_ok()
    c = k.run('eprintln!("before"); let qm_during: u64 = 1; let n: u64 = "x1".parse()?; println!("not reached {n}");')
    assert c.status == "error", c.describe()
    assert c.reply["ename"] == "Error" and c.reply["evalue"] == "invalid digit found in string", c.describe()
    assert [t for t, _ in c.messages] == ["stream", "error"], c.describe()
    assert c.stderr == "before\n" and c.stdout == "", c.describe()
    tb = "\n".join(c.errors[0]["traceback"])
    assert "invalid digit found in string" in tb and "`?`" in tb, tb
    assert c.text.count("invalid digit found in string") == 1, c.describe()
    assert k.run("qm_before + 1").assert_ok().results[0]["data"]["text/plain"] == "6"
    # A cell whose `?` meets an Ok is fine.
    ok = k.run('let m: u64 = "7".parse()?; println!("{}", m * 6);').assert_ok()
    assert ok.stdout == "42\n" and not ok.stderr, ok.describe()


def test_output_without_a_final_newline_stays_with_its_own_cell(rpx_kernel_no_cluster):
    # Cells share the toolchain's libstd and its stdout buffer: the worker flushes it after
    # each cell, so the text is this cell's output and not the start of the next one's (evcxr
    # reads stdout by lines, so locally it ends with one).
    k = rpx_kernel_no_cluster
    c = k.run('print!("p1");').assert_ok()
    assert c.stdout == "p1\n", c.describe()
    nxt = k.run('println!("p2");').assert_ok()
    assert nxt.stdout == "p2\n", nxt.describe()


def test_run_all_stops_at_a_failed_cell(rpx_kernel_no_cluster):
    # "Run all" sends every cell at once; with stop_on_error (the default) the cells queued
    # behind a failed one are answered `aborted` and do not run. stop_on_error=False runs them.
    k = rpx_kernel_no_cluster
    kc = k.kc
    k.drain_iopub()
    first = kc.execute('let n: u64 = "x".parse()?;')
    queued = [kc.execute('println!("ran {}", 1);'), kc.execute('println!("ran {}", 2);')]
    replies = {}
    deadline = time.monotonic() + 180
    while len(replies) < 3:
        assert time.monotonic() < deadline, f"replies so far: {replies}"
        try:
            r = kc.get_shell_msg(timeout=1)
        except Empty:
            continue
        replies[r["parent_header"]["msg_id"]] = r["content"]
    assert replies[first]["status"] == "error" and replies[first]["ename"] == "Error", replies
    assert [replies[m]["status"] for m in queued] == ["aborted", "aborted"], replies
    after = k.run('println!("runs again");').assert_ok()
    assert after.stdout == "runs again\n", after.describe()
    assert "ran " not in after.stdout
    # Without stop_on_error the next cells run.
    first = kc.execute('let n: u64 = "x".parse()?;', stop_on_error=False)
    c = k.run('println!("ran anyway");').assert_ok()
    assert c.stdout == "ran anyway\n", c.describe()


def test_user_expressions_are_answered_and_silent_cells_show_no_result(rpx_kernel_no_cluster):
    k = rpx_kernel_no_cluster
    kc = k.kc
    msg_id = kc.execute("let ue: u64 = 2;", user_expressions={"double": "ue * 2"})
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no reply"
        try:
            r = kc.get_shell_msg(timeout=1)
        except Empty:
            continue
        if r["parent_header"].get("msg_id") == msg_id:
            break
    ue = r["content"]["user_expressions"]
    assert list(ue) == ["double"] and ue["double"]["status"] == "error", r["content"]
    assert "user_expressions" in ue["double"]["evalue"], ue
    quiet = k.run("ue + 40", silent=True)
    assert quiet.status == "ok" and quiet.messages == [], quiet.describe()


def test_a_local_cell_reading_input_asks_the_frontend(rpx_kernel_no_cluster):
    k = rpx_kernel_no_cluster
    k.run(':dep evcxr_input = "1"', timeout=300).assert_ok()
    c = k.run('let who = evcxr_input::get_string("your name? "); println!("hello {who}");',
              answer=lambda prompt, password: "Ada")
    c.assert_ok()
    assert c.input_requests == [{"prompt": "your name? ", "password": False}], c.describe()
    assert c.stdout == "hello Ada\n", c.describe()
    pw = k.run('let pw = evcxr_input::get_password("pin: "); println!("{} chars", pw.len());',
               answer=lambda prompt, password: "1234" if password else "wrong")
    pw.assert_ok()
    assert pw.input_requests == [{"prompt": "pin: ", "password": True}] and pw.stdout == "4 chars\n", pw.describe()
    # A frontend that does not take input (allow_stdin false, as nbclient): a clear error.
    no = k.run('let who2 = evcxr_input::get_string("name? "); println!("hi {who2}");')
    assert no.status == "error" and no.reply["ename"] == "StdinNotImplementedError", no.describe()
    assert "allow_stdin" in no.reply["evalue"] and "name? " in no.reply["evalue"], no.describe()


def test_a_plain_stdin_read_in_a_local_cell_gets_its_line_from_the_frontend(rpx_kernel_no_cluster):
    k = rpx_kernel_no_cluster
    k.run("let plain_kept: u64 = 8;").assert_ok()
    code = ('let mut line = String::new(); std::io::stdin().read_line(&mut line).unwrap(); '
            'println!("read {:?}", line);')
    c = k.run(code, answer=lambda prompt, password: "typed here")
    c.assert_ok()
    assert c.input_requests == [{"prompt": "", "password": False}], c.describe()
    assert c.stdout == 'read "typed here\\n"\n', c.describe()
    # Without a frontend that takes input the read is stopped: an error, not a hang.
    no = k.run(code)
    assert no.status == "error" and no.reply["ename"] == "StdinNotImplementedError", no.describe()
    assert "read stdin" in no.reply["evalue"] and "stopped" in no.reply["evalue"], no.describe()
    assert no.stdout == "", no.describe()
    assert k.run("plain_kept + 1").assert_ok().results[0]["data"]["text/plain"] == "9"


def interrupt_local_cell(k, code):
    """Run `code`, interrupt it once it printed `started`, return the reply content."""
    kc = k.kc
    msg_id = kc.execute(code)
    end = time.monotonic() + 120
    started = interrupted = False
    reply = None
    while reply is None:
        assert time.monotonic() < end, "the interrupted cell never replied"
        try:
            m = kc.get_iopub_msg(timeout=0.1)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream" \
                    and "started" in m["content"]["text"]:
                started = True
        except Empty:
            pass
        if started and not interrupted:
            k.km.interrupt_kernel()
            interrupted = True
        try:
            r = kc.get_shell_msg(timeout=0)
            if r["parent_header"].get("msg_id") == msg_id:
                reply = r["content"]
        except Empty:
            pass
    assert interrupted
    return reply


def test_interrupting_a_local_cell_keeps_the_kernels_variables(start_kernel, no_cluster_env):
    k = start_kernel(env=no_cluster_env)
    k.run("let kept: u64 = 41;").assert_ok()
    for body in ["std::thread::sleep(std::time::Duration::from_secs(60));",
                 "let l = std::net::TcpListener::bind(\"127.0.0.1:0\").unwrap(); let _ = l.accept();"]:
        reply = interrupt_local_cell(k, f'println!("started"); {body}')
        assert reply["status"] == "error", reply
        assert reply["ename"] == "KeyboardInterrupt", reply
        assert "kept the variables" in reply["evalue"], reply
        c = k.run("kept + 1").assert_ok()
        assert c.results[0]["data"]["text/plain"] == "42", c.describe()
    # A loop in which nothing can unwind is stopped by killing the runtime, and says so.
    reply = interrupt_local_cell(k, 'println!("started"); let mut x = 0u64; loop { x = std::hint::black_box(x.wrapping_add(1)); }')
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert "lost" in reply["evalue"], reply
    c = k.run("kept + 1")
    assert c.status == "error" and "kept" in c.error_text(), c.describe()


def test_a_local_panic_with_rust_backtrace_is_one_error_holding_the_backtrace(start_kernel, no_cluster_env):
    k = start_kernel(env=dict(no_cluster_env, RUST_BACKTRACE="1"))
    k.run('eprintln!("before");', timeout=FIRST_CELL_TIMEOUT).assert_ok()
    c = k.run('eprintln!("ordinary"); panic!("boom");')
    assert c.status == "error" and c.reply["evalue"] == "boom", c.describe()
    assert [t for t, _ in c.messages] == ["stream", "error"], c.describe()
    assert c.stderr == "ordinary\n", c.describe()
    tb = "\n".join(c.errors[0]["traceback"])
    assert "stack backtrace:" in tb and "panicked at" in tb, tb
    # A `?` on an Err is one error too, backtrace or not.
    q = k.run('eprintln!("ordinary"); let n: i32 = "q".parse()?;')
    assert q.status == "error" and q.reply["ename"] == "Error", q.describe()
    assert q.reply["evalue"] == "invalid digit found in string", q.describe()
    assert [t for t, _ in q.messages] == ["stream", "error"] and q.stderr == "ordinary\n", q.describe()
