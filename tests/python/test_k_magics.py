"""The %px family through a real Jupyter client (jupyter_client) against the `rpx` kernel and a
live 4-engine cluster: output format per engine, every %%px option, %autopx, %pxresult,
%pxconfig (sticky vs per-cell), errors on the engines, bad options, no cluster, and interrupt.

Cells that run on a subset of engines make the engines' histories diverge (the compiler then
compiles per group), so each test defines its own variables and never relies on another test's.
"""

import re
import time
from queue import Empty

import pytest

from kernel_fixtures import CELL_TIMEOUT, PX_FIRST_TIMEOUT, strip_ansi

pytest_plugins = ["kernel_fixtures"]

ENGINES = [0, 1, 2, 3]


def blocks(text, stream="stdout"):
    """`[stdout:N] \\n...` blocks of a stream's text: {engine: text}."""
    out = {}
    for m in re.finditer(rf"\[{stream}:(\d+)\] \n(.*?)(?=\[{stream}:\d+\] \n|\Z)", text, re.S):
        out.setdefault(int(m.group(1)), "")
        out[int(m.group(1))] += m.group(2)
    return out


def results(cell):
    """{engine: text} of the `Out[N:k]: ...` displays."""
    out = {}
    for d in cell.displays:
        m = re.match(r"Out\[(\d+):\d+\]: (.*)", strip_ansi(d["data"].get("text/plain", "")), re.S)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


@pytest.fixture(scope="module")
def k(rpx_kernel):
    # The first %px of a cluster may wait for a cold compiler.
    rpx_kernel.run('println!("kernel warm");').assert_ok()
    rpx_kernel.run('%px println!("engines warm");', timeout=PX_FIRST_TIMEOUT).assert_ok()
    # These tests check what each cell shows; on a loaded machine any %px may run past the
    # default 2 s and add a progress display. It has a test of its own, which turns it on.
    rpx_kernel.run("%pxconfig --progress-after -1").assert_ok()
    return rpx_kernel


def test_px_runs_on_every_engine_and_labels_each_output(k):
    c = k.run('%px println!("hi {}", 6 * 7);').assert_ok()
    got = blocks(c.stdout)
    assert sorted(got) == ENGINES, c.describe()
    assert all(t == "hi 42\n" for t in got.values()), c.describe()
    # ipyparallel's format: the prefix, a newline, the text; no blank lines; no `Out` for `()`.
    assert "\n\n" not in c.stdout, c.describe()
    assert not results(c), c.describe()


def test_results_are_shown_per_engine_as_out_n_k(k):
    c = k.run("%%px\nlet answer: u64 = 6 * 7;\nanswer + 0").assert_ok()
    assert results(c) == {e: "42" for e in ENGINES}, c.describe()
    assert all(d["metadata"].get("engine") in ENGINES for d in c.displays), c.describe()


def test_cell_px_targets_select_engines(k):
    c = k.run('%%px --targets ::2\nprintln!("even");').assert_ok()
    assert sorted(blocks(c.stdout)) == [0, 2], c.describe()
    c = k.run('%%px --targets 1,3\nprintln!("odd");').assert_ok()
    assert sorted(blocks(c.stdout)) == [1, 3], c.describe()
    c = k.run('%%px -t -1\nprintln!("last");').assert_ok()
    assert sorted(blocks(c.stdout)) == [3], c.describe()


def test_group_outputs_type_engine_and_order(k):
    code = 'println!("out"); eprintln!("err"); 7'
    by_type = k.run(f"%%px --no-stream --group-outputs=type\n{code}").assert_ok()
    # type: every stdout, then every stderr, then the results.
    assert [t for t, _ in by_type.messages] == ["stream", "stream"] + ["display_data"] * 4, by_type.describe()
    assert by_type.messages[0][1]["text"] == "".join(f"[stdout:{e}] \nout\n" for e in ENGINES)
    assert by_type.messages[1][1]["text"] == "".join(f"[stderr:{e}] \nerr\n" for e in ENGINES)
    assert results(by_type) == {e: "7" for e in ENGINES}

    by_engine = k.run(f"%%px --no-stream --group-outputs=engine\n{code}").assert_ok()
    # engine: each engine's stdout, stderr, [output:N], Out[N:k], then the next engine.
    text = by_engine.text
    expected = "".join(f"[stdout:{e}] \nout\n[stderr:{e}] \nerr\n[output:{e}]\n" for e in ENGINES)
    squashed = re.sub(r"Out\[\d+:\d+\]: 7\n", "", text)
    assert squashed == expected, by_engine.describe()

    by_order = k.run(f"%%px --no-stream -r\n{code}").assert_ok()
    assert by_order.messages[0][1]["text"] == by_type.messages[0][1]["text"], by_order.describe()


def test_stream_shows_output_as_it_arrives_and_no_stream_gathers_it(k):
    code = 'println!("first"); std::thread::sleep(std::time::Duration::from_millis(300)); println!("second");'
    streamed = k.run(f"%%px --stream --targets 0\n{code}").assert_ok()
    texts = [c["text"] for c in streamed.of_type("stream")]
    # Each print is its own message, the prefix written once for the engine.
    assert len(texts) >= 2, streamed.describe()
    assert "".join(texts) == "[stdout:0] \nfirst\nsecond\n", streamed.describe()
    gathered = k.run(f"%%px --no-stream --targets 0\n{code}").assert_ok()
    assert [c["text"] for c in gathered.of_type("stream")] == ["[stdout:0] \nfirst\nsecond\n"], gathered.describe()


def test_verbose_names_the_engines(k):
    c = k.run("%%px --verbose --targets 1:3\n1 + 1").assert_ok()
    assert c.stdout.startswith("Parallel execution on engine(s): [1, 2]\n"), c.describe()
    c = k.run("%%px --verbose\n1 + 1").assert_ok()
    assert c.stdout.startswith("Parallel execution on engine(s): all\n"), c.describe()


def test_local_also_runs_the_cell_in_the_kernel(k):
    c = k.run('%%px --local --targets 0\nprintln!("both places");').assert_ok()
    assert c.stdout.count("both places\n") == 2, c.describe()
    assert "[stdout:0] \nboth places\n" in c.stdout, c.describe()


def test_autopx_toggles_and_runs_plain_cells_on_the_engines(k):
    c = k.run("%autopx").assert_ok()
    assert c.stdout == "%autopx enabled\n", c.describe()
    try:
        c = k.run('println!("on the engines");').assert_ok()
        assert sorted(blocks(c.stdout)) == ENGINES, c.describe()
        assert all(t == "on the engines\n" for t in blocks(c.stdout).values())
    finally:
        off = k.run("%autopx")
    assert off.stdout == "%autopx disabled\n", off.describe()
    c = k.run('println!("in the kernel");').assert_ok()
    assert c.stdout == "in the kernel\n", c.describe()


def test_noblock_returns_at_once_and_pxresult_shows_the_outputs(k):
    c = k.run('%%px --noblock\nstd::thread::sleep(std::time::Duration::from_millis(500));\nprintln!("late");\n5').assert_ok()
    assert c.stdout == "" and not c.displays, c.describe()
    r = k.run("%pxresult").assert_ok()
    assert blocks(r.stdout) == {e: "late\n" for e in ENGINES}, r.describe()
    assert results(r) == {e: "5" for e in ENGINES}, r.describe()
    # Again, grouped by engine this time.
    again = k.run("%pxresult --group-outputs=engine").assert_ok()
    assert "[stdout:0] \nlate\n[output:0]" in again.text, again.describe()


def test_pxconfig_is_sticky_but_cell_options_are_not(k):
    k.run("%pxconfig --targets 1").assert_ok()
    try:
        c = k.run('%px println!("sticky");').assert_ok()
        assert sorted(blocks(c.stdout)) == [1], c.describe()
        c = k.run('%%px --targets 2\nprintln!("just this cell");').assert_ok()
        assert sorted(blocks(c.stdout)) == [2], c.describe()
        c = k.run('%px println!("sticky again");').assert_ok()
        assert sorted(blocks(c.stdout)) == [1], c.describe()
        # --noblock on a cell does not stick either: the next %px blocks and shows its output.
        k.run('%%px --noblock\nprintln!("async");').assert_ok()
        c = k.run('%px println!("blocking");').assert_ok()
        assert blocks(c.stdout) == {1: "blocking\n"}, c.describe()
        # --noblock in %pxconfig does stick.
        k.run("%pxconfig --noblock").assert_ok()
        c = k.run('%px println!("quiet");').assert_ok()
        assert c.stdout == "", c.describe()
        assert blocks(k.run("%pxresult").assert_ok().stdout) == {1: "quiet\n"}
    finally:
        k.run("%pxconfig --targets all --block").assert_ok()
    c = k.run('%px println!("all again");').assert_ok()
    assert sorted(blocks(c.stdout)) == ENGINES, c.describe()


def test_compile_error_on_the_engines_names_each_engine_and_they_keep_working(k):
    c = k.run('%px let not_a_number: u32 = "text";')
    assert c.status == "error", c.describe()
    text = c.error_text() + c.stderr
    assert "E0308" in text and "mismatched types" in text, c.describe()
    for e in ENGINES:
        assert f"[{e}:execute]" in text, c.describe()
    after = k.run('%px println!("still working");').assert_ok()
    assert blocks(after.stdout) == {e: "still working\n" for e in ENGINES}, after.describe()


def test_compile_error_without_streaming_is_a_composite_error(k):
    c = k.run("%%px --no-stream\nlet broken: u8 = 300u16;")
    assert c.status == "error", c.describe()
    assert c.reply["ename"] == "CompositeError", c.describe()
    assert c.reply["evalue"].startswith("one or more exceptions raised in: %px"), c.describe()
    for e in ENGINES:
        assert f"[{e}:execute]" in c.reply["evalue"], c.describe()


def test_panic_on_some_engines_reports_them_and_all_engines_work_afterwards(k):
    k.run("%px let survivor: u64 = 9;").assert_ok()
    c = k.run('%%px --targets 0:2 --no-stream\npanic!("boom {}", 7);')
    assert c.status == "error", c.describe()
    text = c.error_text()
    assert "boom 7" in text, c.describe()
    assert "[0:execute]" in text and "[1:execute]" in text, c.describe()
    assert "[2:execute]" not in text and "[3:execute]" not in text, c.describe()
    after = k.run("%px survivor + 1", timeout=max(CELL_TIMEOUT, 240)).assert_ok()
    assert results(after) == {e: "10" for e in ENGINES}, after.describe()


def test_a_single_target_error_is_a_remote_error(k):
    c = k.run('%%px --targets 3 --no-stream\npanic!("only three");')
    assert c.status == "error", c.describe()
    assert c.reply["ename"] == "RemoteError", c.describe()
    assert c.reply["evalue"].startswith("[3:execute]"), c.describe()
    assert "only three" in c.error_text(), c.describe()


def test_a_question_mark_on_an_err_is_an_error_on_every_engine(k):
    k.run("%px let qm_kept: u64 = 1;").assert_ok()
    c = k.run('%%px --no-stream\nlet n: u64 = "x1".parse()?;\nprintln!("not reached {n}");')
    assert c.status == "error", c.describe()
    text = c.error_text()
    for e in ENGINES:
        assert f"[{e}:execute]" in text, c.describe()
    assert "invalid digit found in string" in text, c.describe()
    assert "invalid digit" not in c.stderr, "shown once, as the error: " + c.describe()
    assert "not reached" not in c.stdout, c.describe()
    one = k.run('%%px --targets 2 --no-stream\nlet n: u64 = "x1".parse()?;')
    assert one.status == "error" and one.reply["evalue"].startswith("[2:execute]"), one.describe()
    assert "Error: invalid digit found in string" in one.error_text(), one.describe()
    after = k.run("%px qm_kept + 1", timeout=max(CELL_TIMEOUT, 240)).assert_ok()
    assert results(after) == {e: "2" for e in ENGINES}, after.describe()


def test_reading_stdin_on_the_engines_fails_with_a_clear_error(k):
    # evcxr_input's protocol (what `evcxr_input::get_string` prints and reads), without a crate.
    k.run("%px let stdin_kept: u64 = 3;").assert_ok()
    c = k.run('%%px --no-stream\nprintln!("EVCXR_INPUT_REQUEST:your name? ");\n'
              'let mut line = String::new();\nstd::io::stdin().read_line(&mut line).unwrap();\n'
              'println!("got {line:?}");', timeout=max(CELL_TIMEOUT, 240))
    assert c.status == "error", c.describe()
    text = c.error_text()
    assert "StdinNotImplementedError" in text and "your name? " in text, c.describe()
    assert "engines have no frontend" in text, c.describe()
    assert "got " not in c.stdout, f"the cell must stop at the read\n{c.describe()}"
    # A plain read of stdin (no input request first) is stopped too, instead of hanging.
    plain = k.run('%%px --no-stream\nlet mut line = String::new();\n'
                  'std::io::stdin().read_line(&mut line).unwrap();\nprintln!("got {line:?}");',
                  timeout=max(CELL_TIMEOUT, 240))
    assert plain.status == "error", plain.describe()
    text = plain.error_text()
    assert "StdinNotImplementedError" in text and "a plain read of stdin" in text, plain.describe()
    for e in ENGINES:
        assert f"[{e}:execute]" in text, plain.describe()
    assert "got " not in plain.stdout, plain.describe()
    after = k.run("%px stdin_kept + 1", timeout=max(CELL_TIMEOUT, 240)).assert_ok()
    assert results(after) == {e: "4" for e in ENGINES}, after.describe()


def progress_displays(cell):
    """The progress display's messages: [(msg_type, text/plain)], and its final shown text."""
    msgs = [(t, c["data"].get("text/plain", "")) for t, c in cell.messages
            if t in ("display_data", "update_display_data")
            and (c.get("transient") or {}).get("display_id", "").startswith("px-progress-")]
    shown = [o["data"].get("text/plain", "") for o in cell.outputs
             if o["output_type"] == "display_data" and o["data"].get("text/plain", "").startswith("%px: ")]
    return msgs, shown


def test_a_long_blocking_px_shows_progress_after_progress_after_seconds(k):
    c = k.run("%%px --progress-after 1\nstd::thread::sleep(std::time::Duration::from_secs(4));",
              timeout=max(CELL_TIMEOUT, 240)).assert_ok()
    # (The module turned progress off with %pxconfig; a cell's own option wins.)
    msgs, shown = progress_displays(c)
    assert msgs and msgs[0][0] == "display_data", c.describe()
    assert re.match(r"%px: [0-4]/4 engines done after \d+ s", msgs[0][1]), msgs
    assert any(t == "update_display_data" for t, _ in msgs[1:]), f"updated in place\n{msgs}"
    # Finalized at the end: the one display shown reads as done.
    assert len(shown) == 1 and re.match(r"%px: 4/4 engines done in \d+\.\d s", shown[0]), (shown, msgs)
    # Quick cells show none (a cell done before --progress-after); -1 never shows it.
    quick = k.run('%%px --progress-after 5\nprintln!("quick");').assert_ok()
    assert progress_displays(quick) == ([], []), quick.describe()
    never = k.run("%%px --progress-after -1\nstd::thread::sleep(std::time::Duration::from_millis(1500));").assert_ok()
    assert progress_displays(never) == ([], []), never.describe()
    # %pxconfig sets it for later cells.
    try:
        k.run("%pxconfig --progress-after 0").assert_ok()
        at_once = k.run("%px std::thread::sleep(std::time::Duration::from_millis(1500));").assert_ok()
        assert progress_displays(at_once)[1], at_once.describe()
    finally:
        k.run("%pxconfig --progress-after -1").assert_ok()


def test_bad_option_is_refused_and_nothing_runs(k):
    k.run("%px let mut bumped: u64 = 0;").assert_ok()
    c = k.run("%%px --targets 0 --bogus\nbumped += 1;")
    assert c.status == "error", c.describe()
    assert c.reply["ename"] == "UsageError", c.describe()
    assert "`--bogus`" in c.reply["evalue"] and "--targets" in c.reply["evalue"], c.describe()
    assert c.stdout == "", c.describe()
    c = k.run("%%px --group-outputs=sideways\n1")
    assert c.status == "error" and "sideways" in c.reply["evalue"], c.describe()
    assert "engine" in c.reply["evalue"] and "order" in c.reply["evalue"], c.describe()
    c = k.run("%pxx 1")
    assert c.status == "error" and "%pxx" in c.reply["evalue"], c.describe()
    # Nothing reached the engines.
    after = k.run("%px bumped").assert_ok()
    assert results(after) == {e: "0" for e in ENGINES}, after.describe()


def test_targets_that_name_no_engine_are_refused(k):
    c = k.run("%%px --targets 9\n1")
    assert c.status == "error", c.describe()
    assert "no engine 9" in c.reply["evalue"] and "[0, 1, 2, 3]" in c.reply["evalue"], c.describe()


def test_pxresult_before_any_noblock_run_says_so(rpx_kernel_no_cluster):
    c = rpx_kernel_no_cluster.run("%pxresult")
    assert c.status == "error", c.describe()
    assert "has not yet been used" in c.reply["evalue"], c.describe()


def test_no_cluster_says_how_to_start_one(rpx_kernel_no_cluster):
    c = rpx_kernel_no_cluster.run('%px println!("anyone?");')
    assert c.status == "error", c.describe()
    assert "ipcluster start" in c.reply["evalue"], c.describe()
    # Local cells still work.
    rpx_kernel_no_cluster.run('println!("local is fine");').assert_ok()


def test_interrupt_stops_a_blocking_px_and_the_engines_keep_their_state(start_kernel):
    k = start_kernel()
    k.run("%px let kept: u64 = 41;", timeout=PX_FIRST_TIMEOUT).assert_ok()
    kc = k.kc
    msg_id = kc.execute('%%px\nprintln!("started");\nstd::thread::sleep(std::time::Duration::from_secs(120));')
    started, messages, reply, idle = set(), [], None, False
    interrupted = False
    deadline = time.monotonic() + 180
    while not (reply is not None and idle):
        assert time.monotonic() < deadline, f"the interrupted cell did not end: {messages}\n{k.log_tail()}"
        try:
            m = kc.get_iopub_msg(timeout=0.2)
        except Empty:
            m = None
        if m and m["parent_header"].get("msg_id") == msg_id:
            if m["msg_type"] == "stream":
                messages.append(m["content"]["text"])
                started |= {int(e) for e in re.findall(r"\[stdout:(\d+)\] \nstarted", "".join(messages))}
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        if not interrupted and started == set(ENGINES):
            k.km.interrupt_kernel()
            interrupted = True
        if reply is None:
            try:
                r = kc.get_shell_msg(timeout=0)
            except Empty:
                r = None
            if r and r["parent_header"].get("msg_id") == msg_id:
                reply = r["content"]
    assert interrupted, messages
    assert reply["status"] == "error", reply
    shown = "".join(messages) + "\n".join(reply.get("traceback", []))
    assert "Sending signal SIGINT to engines" in shown, shown
    assert "KeyboardInterrupt" in shown + reply["evalue"], shown
    after = k.run('%px println!("{}", kept + 1);').assert_ok()
    assert blocks(after.stdout) == {e: "42\n" for e in ENGINES}, after.describe()
