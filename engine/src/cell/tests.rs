//! Unit tests of [`super`]'s decisions.

use super::*;
use rpx_protocol::content::ErrorContent;

fn me() -> Identity {
    Identity { id: 4, uuid: "u-4".into() }
}

fn cell(purpose: Purpose) -> Cell {
    Cell::new(
        Request::for_test("c1", "execute_request", json!({"code": "1"})),
        purpose,
        false,
        7,
        ReplyMetadata::start(&json!({}), "u", String::new()),
    )
}

fn reply(status: &str, ename: &str, evalue: &str) -> CellReply {
    CellReply { cell_id: "c1".into(), status: status.into(), error: ErrorContent::bare(ename, evalue, vec![]), note: None }
}

fn stderr(text: &str) -> StderrTail {
    let mut t = StderrTail::new(20);
    t.feed(text);
    t
}

const PANIC_TEXT: &str =
    "thread 'main' panicked at src/lib.rs:3:5:\nboom 7\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_cell_the_compiler_accepted_succeeds() {
    let mut c = cell(Purpose::Execute);
    c.reply = Some(reply("ok", "", ""));
    assert_eq!(c.verdict(&me(), &stderr("a warning\n")), None);
    assert_eq!(c.ending(None, 4), Ending::Succeeded(None));
}

#[test]
fn a_cell_whose_worker_died_reports_engine_worker_died_even_if_the_compiler_said_ok() {
    let mut c = cell(Purpose::Execute);
    c.reply = Some(reply("ok", "", ""));
    c.panicked = true;
    c.worker_died("signal 6 (SIGABRT)");
    c.worker_died("killed by clear_request");
    let e = c.verdict(&me(), &stderr("about to abort\n")).expect("an error");
    assert_eq!(e.ename, "EngineWorkerDied");
    assert!(e.evalue.contains("engine 4 died (signal 6 (SIGABRT))"), "the first death counts: {}", e.evalue);
    assert_eq!(e.traceback[0], "about to abort", "the traceback shows the worker's last stderr");
}

#[test]
fn a_refused_artifact_is_reported_before_anything_else() {
    let mut c = cell(Purpose::Execute);
    c.reply = Some(reply("error", "Panic", "skipped"));
    c.skipped(&Skip::Refused("artifact abc failed its SHA-256 check".into()));
    c.worker_died("exit status 1");
    let e = c.verdict(&me(), &stderr("")).unwrap();
    assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("ArtifactError", "artifact abc failed its SHA-256 check"));
}

#[test]
fn a_cell_interrupted_before_its_load_ran_reports_keyboard_interrupt_before_it_ran() {
    let mut c = cell(Purpose::Execute);
    c.interrupt_requested = true;
    assert!(c.skips_loads());
    c.skipped(&Skip::Interrupted);
    c.reply = Some(reply("error", "Panic", "the cell panicked"));
    let e = c.verdict(&me(), &stderr("")).unwrap();
    assert_eq!(e.ename, "KeyboardInterrupt");
    assert_eq!(e.evalue, "the cell was interrupted (SIGINT) before it ran; the engine kept its variables");
    assert_eq!(
        Skip::Interrupted.load_done("c1".into()).outcome,
        LoadOutcome::Skipped { reason: "interrupted (SIGINT) before it ran".into() }
    );
}

#[test]
fn a_running_cell_stopped_by_sigint_reports_keyboard_interrupt_not_a_panic() {
    let mut c = cell(Purpose::Execute);
    let mut l = Loading::new("c1".into());
    l.note(StdoutEvent::Interrupted, Some(&mut c));
    l.note(StdoutEvent::Panic, Some(&mut c));
    c.reply = Some(reply("error", "Panic", "panicked"));
    let e = c.verdict(&me(), &stderr(PANIC_TEXT)).unwrap();
    assert_eq!(e.evalue, "the cell was interrupted (SIGINT); the engine kept its variables");
    assert_eq!(l.completed().outcome, LoadOutcome::Complete { panicked: true, error_occurred: false, changed_types: vec![] });
}

#[test]
fn an_interrupt_that_did_not_stop_the_cell_leaves_the_compilers_verdict() {
    let mut c = cell(Purpose::Execute);
    c.interrupted = Some(false);
    c.reply = Some(reply("ok", "", ""));
    assert_eq!(c.verdict(&me(), &stderr("")), None);
}

#[test]
fn a_panicking_cell_reports_the_panic_message_from_stderr() {
    let mut c = cell(Purpose::Execute);
    c.panicked = true;
    c.reply = Some(reply("error", "Panic", "from the compiler"));
    let e = c.verdict(&me(), &stderr(&format!("hello\n{PANIC_TEXT}"))).unwrap();
    assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("Panic", "boom 7"));
    assert!(e.traceback[0].contains("panicked at src/lib.rs:3:5"), "{:?}", e.traceback);
}

#[test]
fn a_panic_without_a_message_says_the_cell_panicked_and_shows_stderr() {
    let mut c = cell(Purpose::Execute);
    c.panicked = true;
    c.reply = Some(reply("ok", "", ""));
    let e = c.verdict(&me(), &stderr("some output\n")).unwrap();
    assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("Panic", "the cell panicked"));
    assert_eq!(e.traceback, vec!["some output".to_string()]);
}

#[test]
fn a_compile_error_reports_the_compilers_error_named_compile_error_when_unnamed() {
    let mut c = cell(Purpose::Execute);
    c.reply = Some(CellReply {
        error: ErrorContent::bare("", "cannot find value `y`", vec!["error[E0425]".into()]),
        ..reply("error", "", "cannot find value `y`")
    });
    let e = c.verdict(&me(), &stderr("")).unwrap();
    assert_eq!(
        (e.ename.as_str(), e.evalue.as_str(), e.traceback.clone()),
        ("CompileError", "cannot find value `y`", vec!["error[E0425]".to_string()])
    );
    c.reply = Some(reply("error", "OutOfSync", "lost"));
    assert_eq!(c.verdict(&me(), &stderr("")).unwrap().ename, "OutOfSync");
    assert_eq!(c.ending(Some(e.clone()), 4), Ending::Failed(e));
}

#[test]
fn a_cell_finishes_only_once_the_compiler_replied_and_its_loads_are_done() {
    let now = Instant::now();
    let mut c = cell(Purpose::Execute);
    assert!(!c.ready_to_finish(false, &stderr(""), now), "no reply yet");
    c.reply = Some(reply("ok", "", ""));
    assert!(!c.ready_to_finish(true, &stderr(""), now), "a load of it still runs");
    assert!(c.ready_to_finish(false, &stderr(""), now));
}

#[test]
fn a_panicked_cell_waits_a_moment_for_its_panic_message() {
    let now = Instant::now();
    let mut c = cell(Purpose::Execute);
    c.panicked = true;
    c.reply = Some(reply("error", "Panic", ""));
    assert!(!c.ready_to_finish(false, &stderr(""), now));
    assert!(c.waits_for_panic_message());
    assert!(!c.ready_to_finish(false, &stderr(""), now + PANIC_GRACE - Duration::from_millis(1)));
    // The message arrives: finish at once.
    assert!(c.ready_to_finish(false, &stderr(PANIC_TEXT), now + Duration::from_millis(10)));
    // Or it never does: finish when the grace period is over.
    assert!(c.ready_to_finish(false, &stderr(""), now + PANIC_GRACE));
}

#[test]
fn a_panicked_cell_whose_worker_died_or_was_interrupted_finishes_without_waiting() {
    let now = Instant::now();
    let marks: [fn(&mut Cell); 2] = [|c| c.worker_died("exit status 3"), |c| c.interrupted = Some(false)];
    for mark in marks {
        let mut c = cell(Purpose::Execute);
        c.panicked = true;
        c.reply = Some(reply("ok", "", ""));
        mark(&mut c);
        assert!(c.ready_to_finish(false, &stderr(""), now));
        assert!(!c.waits_for_panic_message());
    }
}

#[test]
fn a_result_with_text_is_an_execute_result_and_other_content_is_display_data() {
    let mut c = cell(Purpose::Execute);
    let mut l = Loading::new("c1".into());
    l.note(StdoutEvent::Content { mime: "text/plain".into(), data: "42".into() }, Some(&mut c));
    let Ending::Succeeded(Some(p)) = c.ending(None, 4) else { panic!("a result") };
    assert_eq!((p.kind, p.msg_type), ("execute_result", "execute_result"));
    assert_eq!(p.content, json!({"data": {"text/plain": "42"}, "metadata": {}, "execution_count": 7}));

    c.content = BTreeMap::from([("text/html".to_string(), "<b>x</b>".to_string())]);
    let Ending::Succeeded(Some(p)) = c.ending(None, 4) else { panic!("a display") };
    assert_eq!((p.kind, p.msg_type), ("displaypub", "display_data"));
    assert_eq!(p.content, json!({"data": {"text/html": "<b>x</b>"}, "metadata": {}, "transient": {}}));

    c.silent = true;
    assert_eq!(c.ending(None, 4), Ending::Succeeded(None), "a silent cell publishes no result");
}

#[test]
fn markers_of_a_load_of_another_cell_do_not_touch_the_running_cell() {
    let mut c = cell(Purpose::Execute);
    let mut l = Loading::new("old".into());
    l.note(StdoutEvent::Panic, None);
    l.note(StdoutEvent::ErrorOccurred, None);
    l.note(StdoutEvent::ChangedType("x".into()), None);
    l.note(StdoutEvent::Content { mime: "text/plain".into(), data: "1".into() }, None);
    assert!(!c.panicked && c.content.is_empty());
    assert_eq!(
        l.completed(),
        LoadDone {
            cell_id: "old".into(),
            outcome: LoadOutcome::Complete { panicked: true, error_occurred: true, changed_types: vec!["x".into()] }
        }
    );
    c.reply = Some(reply("ok", "", ""));
    assert_eq!(c.verdict(&me(), &stderr("")), None);
    assert_eq!(Loading::new("c1".into()).died("signal 9 (SIGKILL)").outcome, LoadOutcome::Died { status: "signal 9 (SIGKILL)".into() });
}

#[test]
fn the_compilers_note_is_shown_on_its_own_line() {
    let mut c = cell(Purpose::Execute);
    assert_eq!(c.note(), None);
    c.reply = Some(CellReply { note: Some("x was not kept".into()), ..reply("ok", "", "") });
    assert_eq!(c.note().as_deref(), Some("x was not kept\n"));
    c.reply = Some(CellReply { note: Some(String::new()), ..reply("ok", "", "") });
    assert_eq!(c.note(), None);
}

#[test]
fn a_pull_of_an_undefined_name_is_a_name_error() {
    let names = names(&["a", "b"]);
    let e = EngineError::new("CompileError", "error[E0425]: cannot find value `b` in this scope", vec![]);
    let p = pull_error(e, &names, 4);
    assert_eq!((p.ename.as_str(), p.evalue.as_str()), ("NameError", "name `b` is not defined on engine 4"));
    let in_traceback = EngineError::new("CompileError", "1 error", vec!["cannot find value `a` in this scope".into()]);
    assert_eq!(pull_error(in_traceback, &names, 4).evalue, "name `a` is not defined on engine 4");
}

#[test]
fn a_pull_that_does_not_compile_for_another_reason_says_which_names_it_could_not_pull() {
    let e = EngineError::new("CompileError", "the trait `Serialize` is not implemented", vec!["tb".into()]);
    let p = pull_error(e, &names(&["a", "b"]), 4);
    assert_eq!((p.ename.as_str(), p.evalue.as_str()), ("CompileError", "cannot pull a, b: the trait `Serialize` is not implemented"));
    assert_eq!(p.traceback, vec!["tb".to_string()]);
    let panic = EngineError::panic("boom", vec![]);
    assert_eq!(pull_error(panic.clone(), &names(&["a"]), 4), panic, "other errors pass unchanged");
}

#[test]
fn a_pull_cell_answers_with_the_names_or_the_pull_error() {
    let c = cell(Purpose::Pull(names(&["x"])));
    assert_eq!(c.ending(None, 4), Ending::Pulled(names(&["x"])));
    let e = EngineError::new("CompileError", "cannot find value `x` in this scope", vec![]);
    let Ending::PullFailed(p) = c.ending(Some(e), 4) else { panic!("a failed pull") };
    assert_eq!(p.ename, "NameError");
}

fn load(cell_id: &str, sha: char) -> Load {
    Load {
        cell_id: cell_id.into(),
        artifact: Artifact { path: format!("/a/{sha}.so"), sha256: sha.to_string().repeat(64), size: 1 },
        fn_name: "run_user_code_1".into(),
    }
}

/// The running cell with this id.
fn running(id: &str) -> Cell {
    Cell::new(
        Request::for_test(id, "execute_request", json!({"code": "1"})),
        Purpose::Execute,
        false,
        7,
        ReplyMetadata::start(&json!({}), "u", String::new()),
    )
}

fn ready(a: &Artifact) -> Step {
    Step::Ready(PathBuf::from(&a.path))
}

#[test]
fn loads_run_one_at_a_time_in_the_order_the_compiler_sent_them() {
    let mut loads = Loads::default();
    assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Idle);
    loads.push(load("c1", 'a'));
    loads.push(load("c1", 'b'));
    assert!(loads.has("c1") && !loads.has("c2"));
    assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'a'), "/a/a.so".into()));
    assert_eq!(loads.running.as_ref().map(|l| l.cell_id.as_str()), Some("c1"));
    assert_eq!(loads.next(Some(&running("c1")), |_| panic!("no fetch while one runs")), LoadStep::Idle);
    loads.running.take();
    assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'b'), "/a/b.so".into()));
    loads.running.take();
    assert!(!loads.has("c1"));
}

#[test]
fn a_cell_whose_load_was_running_when_the_worker_died_reports_its_death() {
    let mut loads = Loads::default();
    loads.push(load("c1", 'a'));
    loads.next(Some(&running("c1")), ready);
    let mut c = cell(Purpose::Execute);
    let done = loads.worker_died(Some(&mut c), "signal 11 (SIGSEGV)").expect("the load died");
    assert_eq!(done, LoadDone { cell_id: "c1".into(), outcome: LoadOutcome::Died { status: "signal 11 (SIGSEGV)".into() } });
    assert_eq!(c.died.as_deref(), Some("signal 11 (SIGSEGV)"));
    assert!(loads.running.is_none() && loads.completed().is_none());
}

#[test]
fn a_worker_dying_between_loads_still_fails_the_running_cell() {
    let mut loads = Loads::default();
    let mut c = cell(Purpose::Execute);
    assert_eq!(loads.worker_died(Some(&mut c), "killed by clear_request"), None, "the compiler is told the worker restarted");
    assert_eq!(c.died.as_deref(), Some("killed by clear_request"));
    // A load of an older cell dying does not mark the running cell.
    loads.push(load("old", 'a'));
    loads.next(Some(&running("old")), ready);
    let mut fresh = cell(Purpose::Execute);
    assert_eq!(loads.worker_died(Some(&mut fresh), "exit status 1").map(|d| d.cell_id), Some("old".to_string()));
    assert_eq!(fresh.died, None);
}

#[test]
fn a_completed_load_reports_what_it_saw() {
    let mut loads = Loads::default();
    assert_eq!(loads.completed(), None, "a completion nobody asked for");
    loads.push(load("c1", 'a'));
    loads.next(Some(&running("c1")), ready);
    if let Some(l) = &mut loads.running {
        l.note(StdoutEvent::ErrorOccurred, None);
    }
    assert_eq!(
        loads.completed().map(|d| d.outcome),
        Some(LoadOutcome::Complete { panicked: false, error_occurred: true, changed_types: vec![] })
    );
}

#[test]
fn a_load_waits_while_its_artifact_is_fetched() {
    let mut loads = Loads::default();
    loads.push(load("c1", 'a'));
    let sha = "a".repeat(64);
    assert_eq!(loads.next(Some(&running("c1")), |a| Step::Request(a.sha256.clone())), LoadStep::Request(sha));
    assert_eq!(loads.next(Some(&running("c1")), |_| Step::Wait), LoadStep::Wait);
    assert!(loads.running.is_none() && loads.has("c1"), "it still waits");
    assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'a'), "/a/a.so".into()));
}

#[test]
fn a_load_whose_artifact_was_refused_is_skipped_and_the_next_one_runs() {
    let mut loads = Loads::default();
    loads.push(load("c1", 'a'));
    loads.push(load("c2", 'b'));
    let step = loads.next(Some(&running("c1")), |_| Step::Failed("artifact aaaa failed its SHA-256 check".into()));
    assert_eq!(step, LoadStep::Skip(load("c1", 'a'), Skip::Refused("artifact aaaa failed its SHA-256 check".into())));
    assert!(loads.running.is_none());
    assert_eq!(loads.next(Some(&running("c2")), ready), LoadStep::Run(load("c2", 'b'), "/a/b.so".into()));
}

#[test]
fn the_loads_of_a_cell_interrupted_before_they_ran_are_skipped_without_fetching() {
    let mut loads = Loads::default();
    loads.push(load("c1", 'a'));
    loads.push(load("other", 'b'));
    let mut c = cell(Purpose::Execute);
    assert_eq!(loads.next(Some(&c), |_| Step::Wait), LoadStep::Wait, "not interrupted: it waits for its artifact");
    c.interrupt_requested = true;
    assert_eq!(
        loads.next(Some(&c), |_| panic!("an interrupted cell's artifact is not fetched")),
        LoadStep::Skip(load("c1", 'a'), Skip::Interrupted)
    );
    assert_eq!(
        loads.next(Some(&running("other")), ready),
        LoadStep::Run(load("other", 'b'), "/a/b.so".into()),
        "the next cell's load runs"
    );
}

#[test]
fn a_pull_of_values_still_in_their_files_needs_no_cell_and_no_compiler() {
    let mut b = Bindings::default();
    b.pushed("x".into(), "u64".into());
    assert_eq!(b.plan_pull(&names(&["x"]), true), PullPlan::FromFiles);
    assert_eq!(b.plan_pull(&names(&["x", "y"]), false), PullPlan::WriteOut(names(&["y"])), "only the stale ones are written out");
    assert_eq!(b.plan_pull(&names(&["y"]), true), PullPlan::NoCompiler);
    let PullPlan::Refuse(e) = b.plan_pull(&names(&["x", "not a name"]), false) else { panic!("refused") };
    assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("NameError", "`not a name` is not a variable name"));
}

#[test]
fn pushed_values_are_bound_by_the_next_cell_that_compiles() {
    let mut b = Bindings::default();
    b.pushed("n".into(), "u64".into());
    assert_eq!(b.unbound().get("n").map(String::as_str), Some("u64"));
    assert!(b.stale(&names(&["n"])).is_empty(), "a pushed value can be pulled back without a cell");
    // A cell that does not compile for its own reasons keeps them for the next cell.
    let own = EngineError::new("CompileError", "expected `;`", vec![]);
    assert_eq!(b.after_cell(&Purpose::Execute, Some(&own)), None);
    assert_eq!(b.unbound().len(), 1);
    assert!(b.stale(&names(&["n"])).is_empty());
    // A cell that ran (even one that panicked) bound them, and may have changed them.
    assert_eq!(b.after_cell(&Purpose::Execute, Some(&EngineError::panic("boom", vec![]))), None);
    assert!(b.unbound().is_empty());
    assert_eq!(b.stale(&names(&["n"])), names(&["n"]));
}

#[test]
fn a_pushed_value_whose_binding_cannot_compile_is_dropped_and_said_so() {
    let mut b = Bindings::default();
    b.pushed("a".into(), "Foo".into());
    b.pushed("b".into(), "u8".into());
    let e = EngineError::new("CompileError", "cannot find type `Foo`", vec!["let a: Foo = ::rpx_runtime::get(\"a\");".into()]);
    let said = b.after_cell(&Purpose::Execute, Some(&e)).expect("a message");
    assert_eq!(
        said,
        "[rpx] the pushed values a, b could not become variables (see the error); push them again with a type the engines can name\n"
    );
    assert!(b.unbound().is_empty(), "the next cell does not try again");
}

#[test]
fn a_pull_leaves_its_names_fresh_until_a_cell_runs() {
    let mut b = Bindings::default();
    assert_eq!(b.stale(&names(&["x", "y"])), names(&["x", "y"]));
    b.after_cell(&Purpose::Pull(names(&["x"])), None);
    assert_eq!(b.stale(&names(&["x", "y"])), names(&["y"]));
    b.after_cell(&Purpose::Pull(names(&["y"])), Some(&EngineError::panic("", vec![])));
    assert_eq!(b.stale(&names(&["x", "y"])), names(&["y"]), "a failed pull freshens nothing");
    b.after_cell(&Purpose::Execute, None);
    assert_eq!(b.stale(&names(&["x"])), names(&["x"]));
}

#[test]
fn after_the_worker_dies_only_values_not_yet_bound_can_be_pulled_without_a_cell() {
    let mut b = Bindings::default();
    b.pushed("old".into(), "u8".into());
    b.after_cell(&Purpose::Execute, None);
    b.after_cell(&Purpose::Pull(names(&["v"])), None);
    b.pushed("new".into(), "u8".into());
    b.worker_gone();
    assert_eq!(b.stale(&names(&["old", "v", "new"])), names(&["old", "v"]));
}

#[test]
fn loads_of_a_cell_that_already_ended_are_skipped_not_run() {
    // The cell failed while the compiler was unreachable; its load arrives afterwards.
    let mut loads = Loads::default();
    loads.push(load("gone", 'a'));
    loads.push(load("c1", 'b'));
    assert_eq!(loads.next(None, ready), LoadStep::Skip(load("gone", 'a'), Skip::Stale));
    assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'b'), "/a/b.so".into()));
}
