//! Unit tests of [`super`]'s decisions.

use super::*;

fn id(n: u8) -> Ident {
    Bytes::from(vec![b'e', n])
}

fn art(path: &str) -> Artifact {
    Artifact { path: path.into(), sha256: "0".repeat(64), size: 1 }
}

fn ok() -> LoadOutcome {
    LoadOutcome::Complete { panicked: false, error_occurred: false, changed_types: vec![] }
}

fn panicked() -> LoadOutcome {
    LoadOutcome::Complete { panicked: true, error_occurred: false, changed_types: vec![] }
}

fn evals(a: &[Action]) -> Vec<(CtxId, String)> {
    a.iter().filter_map(|x| if let Action::Eval { ctx, code } = x { Some((*ctx, code.clone())) } else { None }).collect()
}

fn sends(a: &[Action], t: &str) -> Vec<(Ident, Value)> {
    a.iter()
        .filter_map(|x| {
            if let Action::Send { to, msg_type, content } = x {
                (*msg_type == t).then(|| (to.clone(), content.clone()))
            } else {
                None
            }
        })
        .collect()
}

/// n engines, all in the first group.
fn cluster(n: u8) -> (Compiler, CtxId) {
    let mut c = Compiler::new(Duration::from_millis(10));
    let a = c.start();
    assert_eq!(a, vec![Action::NewContext { ctx: 1 }]);
    for i in 0..n {
        c.on_hello(id(i), i as u64, vec![]);
    }
    assert_eq!(c.groups(), vec![(0..n as u64).collect::<Vec<_>>()]);
    c.mark_all_started();
    (c, 1)
}

/// Run one cell on the given engines through a whole eval with the given outcomes; every eval
/// reports that it changed its context.
fn run(c: &mut Compiler, engines: &[u8], code: &str, outcomes: &[LoadOutcome]) -> Vec<Action> {
    run_changing(c, engines, code, outcomes, true)
}

/// [`run`], with evals that report `changed`.
fn run_changing(c: &mut Compiler, engines: &[u8], code: &str, outcomes: &[LoadOutcome], changed: bool) -> Vec<Action> {
    c.mark_all_started();
    let now = Instant::now();
    let mut acts = Vec::new();
    for &e in engines {
        acts.extend(c.on_cell_request(id(e), format!("cell-{e}"), code.into(), now));
    }
    acts.extend(c.on_tick(now + Duration::from_secs(1)));
    let ev = evals(&acts);
    for (ctx, _) in &ev {
        acts.extend(c.on_load_requested(*ctx, &art("/x.so"), "f"));
        for (&e, o) in engines.iter().zip(outcomes) {
            if c.engines[&id(e)].group == Some(*ctx) {
                acts.extend(c.on_load_done(id(e), o.clone()));
            }
        }
        acts.extend(c.on_eval_done(*ctx, EvalResult::Ok { has_vars: true, changed }));
    }
    acts
}

#[test]
fn identical_cells_from_a_whole_group_compile_once_without_waiting() {
    let (mut c, g) = cluster(3);
    let now = Instant::now();
    assert!(evals(&c.on_cell_request(id(0), "a".into(), "let x = 1;".into(), now)).is_empty());
    assert!(evals(&c.on_cell_request(id(1), "b".into(), "let x = 1;".into(), now)).is_empty());
    let a = c.on_cell_request(id(2), "c".into(), "let x = 1;".into(), now);
    assert_eq!(evals(&a), vec![(g, "let x = 1;".to_string())]);
    let loads = c.on_load_requested(g, &art("/t/libcode_3.so"), "run_user_code_2");
    assert_eq!(sends(&loads, msg_type::LOAD).len(), 3);
    let mut replies = 0;
    for i in 0..3 {
        let a = c.on_load_done(id(i), ok());
        replies += sends(&a, msg_type::CELL_REPLY).len();
        if i == 2 {
            assert!(a.contains(&Action::Verdict { ctx: g, lines: vec![] }));
        }
    }
    assert_eq!(replies, 3, "each engine is answered as soon as its own load completes");
    c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: true });
    assert_eq!(c.groups(), vec![vec![0, 1, 2]]);
}

#[test]
fn a_subset_cell_forks_the_subset_with_a_replayed_history() {
    let (mut c, g) = cluster(4);
    run(&mut c, &[0, 1, 2, 3], "let x = 1;", &[ok(), ok(), ok(), ok()]);
    let a = run(&mut c, &[0, 1], "let y = 2;", &[ok(), ok()]);
    let replay = a.iter().find_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).unwrap();
    assert_eq!(replay, vec![Hist { code: "let x = 1;".into(), verdict: Verdict::Ok }]);
    let ev = evals(&a);
    assert_eq!(ev.len(), 1);
    assert_ne!(ev[0].0, g);
    assert_eq!(c.groups(), vec![vec![2, 3], vec![0, 1]]);
    // A cell on all engines now compiles once per group.
    let a = run(&mut c, &[0, 1, 2, 3], "println!(\"{x}\");", &[ok(), ok(), ok(), ok()]);
    assert_eq!(evals(&a).len(), 2);
    assert_eq!(sends(&a, msg_type::CELL_REPLY).len(), 4);
}

fn replays(a: &[Action]) -> Vec<Vec<Hist>> {
    a.iter().filter_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).collect()
}

/// The trivial cell on one engine after the same cell on all: it runs in the group's context,
/// and the next cell on all engines still compiles once.
#[test]
fn a_subset_cell_that_leaves_the_context_alone_runs_in_the_group_without_forking() {
    let (mut c, g) = cluster(4);
    run(&mut c, &[0, 1, 2, 3], "let _t = 1;", &[ok(), ok(), ok(), ok()]);
    let a = run_changing(&mut c, &[0], "let _t = 1;", &[ok()], false);
    assert_eq!(evals(&a), vec![(g, "let _t = 1;".to_string())]);
    assert_eq!(sends(&a, msg_type::LOAD).iter().map(|(to, _)| to.clone()).collect::<Vec<_>>(), vec![id(0)], "only engine 0 runs it");
    assert_eq!(sends(&a, msg_type::CELL_REPLY).len(), 1);
    assert!(replays(&a).is_empty() && new_contexts(&a) == 0, "no fork: {a:?}");
    assert_eq!(c.groups(), vec![vec![0, 1, 2, 3]]);
    let a = run(&mut c, &[0, 1, 2, 3], "let _t = 1;", &[ok(), ok(), ok(), ok()]);
    assert_eq!(evals(&a).len(), 1);
    // A cell without `let` that prints a value on two engines, likewise.
    let a = run_changing(&mut c, &[1, 2], "println!(\"{_t}\");", &[ok(), ok()], false);
    assert_eq!(evals(&a), vec![(g, "println!(\"{_t}\");".to_string())]);
    assert_eq!(c.groups(), vec![vec![0, 1, 2, 3]]);
}

/// A candidate cell that did change the context (it moved a variable): the context now
/// matches the engines that ran it, and the others fork off with the history they have.
#[test]
fn a_subset_cell_that_changed_the_context_forks_the_others_with_their_history() {
    let (mut c, g) = cluster(4);
    run(&mut c, &[0, 1, 2, 3], "let x = String::new();", &[ok(), ok(), ok(), ok()]);
    let a = run_changing(&mut c, &[0, 1], "drop(x);", &[ok(), ok()], true);
    assert_eq!(evals(&a), vec![(g, "drop(x);".to_string())]);
    assert_eq!(replays(&a), vec![vec![Hist { code: "let x = String::new();".into(), verdict: Verdict::Ok }]]);
    assert_eq!(c.groups(), vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(c.engines[&id(0)].group, Some(g));
    let a = run(&mut c, &[0, 1, 2, 3], "1", &[ok(), ok(), ok(), ok()]);
    assert_eq!(evals(&a).len(), 2, "one compile per group now");
    assert_eq!(sends(&a, msg_type::CELL_REPLY).len(), 4);
}

/// The other members' requests wait while a cell run in place on a part of their group
/// compiles, then go out in the group they turn out to belong to; while such a cell runs (it may
/// run for long) they fork off with the history they have, not as if they had run it.
#[test]
fn requests_of_the_other_members_wait_for_a_compile_in_place_but_not_for_its_run() {
    let (mut c, g) = cluster(3);
    run(&mut c, &[0, 1, 2], "let k = 1;", &[ok(), ok(), ok()]);
    let now = Instant::now();
    c.on_cell_request(id(0), "p0".into(), "k".into(), now);
    let a = c.on_tick(now + Duration::from_secs(1));
    assert_eq!(evals(&a), vec![(g, "k".to_string())]);
    for e in 1..3 {
        c.on_cell_request(id(e), format!("n{e}"), "k + 1".into(), now);
    }
    let a = c.on_tick(now + Duration::from_secs(2));
    assert!(evals(&a).is_empty() && replays(&a).is_empty(), "engines 1 and 2 wait while it compiles: {a:?}");
    c.on_load_requested(g, &art("/k.so"), "f");
    c.on_load_done(id(0), ok());
    let a = c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: false });
    assert_eq!(evals(&a), vec![(g, "k + 1".to_string())], "{a:?}");
    assert!(replays(&a).is_empty());
    assert_eq!(c.groups(), vec![vec![0, 1, 2]]);
    let loads = c.on_load_requested(g, &art("/k1.so"), "f");
    assert_eq!(sends(&loads, msg_type::LOAD).iter().map(|(to, _)| to.clone()).collect::<Vec<_>>(), vec![id(1), id(2)]);
    c.on_load_done(id(1), ok());
    c.on_load_done(id(2), ok());
    c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: false });

    // Engine 1 runs a cell in place; engine 2 asks while it runs.
    c.on_cell_request(id(1), "s1".into(), "k * 2".into(), now);
    c.on_tick(now + Duration::from_secs(3));
    c.on_load_requested(g, &art("/k2.so"), "f");
    c.on_cell_request(id(2), "m2".into(), "k - 1".into(), now);
    let a = c.on_tick(now + Duration::from_secs(4));
    assert_eq!(replays(&a), vec![vec![Hist { code: "let k = 1;".into(), verdict: Verdict::Ok }]], "{a:?}");
    let ev = evals(&a);
    assert_eq!(ev.len(), 1);
    assert_ne!(ev[0].0, g);
    assert_eq!(c.groups(), vec![vec![0, 1], vec![2]]);
}

#[test]
fn a_panic_on_one_engine_splits_clean_engines_into_a_context_that_keeps_the_variables() {
    let (mut c, _) = cluster(3);
    let a = run(&mut c, &[0, 1, 2], "let z = 7; maybe_panic();", &[ok(), panicked(), ok()]);
    assert!(a.contains(&Action::Verdict { ctx: 1, lines: vec!["EVCXR_PANIC_NOTIFICATION".into()] }));
    let replay = a.iter().find_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).unwrap();
    assert_eq!(replay.last().unwrap().verdict, Verdict::Ok);
    assert_eq!(c.groups(), vec![vec![1], vec![0, 2]]);
}

/// Regression: engines that asked for their next cell while a cell that panicked elsewhere
/// was finishing were split into a group of their own, and their deferred request was
/// dropped: they waited forever (the 8-engine cells test hung on engines 0 and 1).
#[test]
fn requests_deferred_across_a_panic_split_follow_their_engines() {
    let (mut c, g) = cluster(3);
    let now = Instant::now();
    for e in 0..3 {
        c.on_cell_request(id(e), format!("p{e}"), "let k = 1; maybe_panic();".into(), now);
    }
    c.on_load_requested(g, &art("/p.so"), "f");
    c.on_load_done(id(0), ok());
    c.on_load_done(id(1), panicked());
    c.on_load_done(id(2), ok());
    // Every load is in; the eval has not returned yet. Engines 0 and 2 ask for the next cell.
    c.on_cell_request(id(0), "n0".into(), "k".into(), now);
    assert!(evals(&c.on_cell_request(id(2), "n2".into(), "k".into(), now)).is_empty());
    let a = c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: true });
    let mut a: Vec<Action> = a.into_iter().chain(c.on_tick(now + Duration::from_secs(1))).collect();
    a.extend(start_new(&mut c, &a, now));
    let ev = evals(&a);
    assert_eq!(ev.len(), 1, "{a:?}");
    assert_ne!(ev[0].0, g, "the next cell runs in the clean engines' new group");
    assert_eq!(ev[0].1, "k");
    assert_eq!(c.groups(), vec![vec![1], vec![0, 2]]);
}

#[test]
fn engines_done_with_a_slow_cell_fork_instead_of_waiting() {
    let (mut c, g) = cluster(3);
    let now = Instant::now();
    for e in 0..3 {
        c.on_cell_request(id(e), format!("s{e}"), "slow_on_0();".into(), now);
    }
    c.on_load_requested(g, &art("/s.so"), "f");
    // Engines 1 and 2 finish; engine 0 is still running.
    c.on_load_done(id(1), ok());
    c.on_load_done(id(2), ok());
    c.on_cell_request(id(1), "n1".into(), "next();".into(), now);
    let a = c.on_cell_request(id(2), "n2".into(), "next();".into(), now);
    assert!(evals(&a).is_empty(), "waits for the batch window, not for engine 0");
    let a = c.on_tick(now + Duration::from_millis(20));
    let ev = evals(&a);
    assert_eq!(ev.len(), 1);
    assert_ne!(ev[0].0, g);
    let replay = a.iter().find_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).unwrap();
    assert_eq!(replay, vec![Hist { code: "slow_on_0();".into(), verdict: Verdict::Ok }]);
    // Engine 0 finishes later; the old group's verdict only covers engine 0.
    let a = c.on_load_done(id(0), ok());
    assert!(a.contains(&Action::Verdict { ctx: g, lines: vec![] }));
    c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: true });
    assert_eq!(c.groups(), vec![vec![0], vec![1, 2]]);
}

#[test]
fn a_dead_worker_moves_its_engine_to_a_fresh_context() {
    let (mut c, g) = cluster(2);
    run(&mut c, &[0, 1], "let v = vec![1];", &[ok(), ok()]);
    let now = Instant::now();
    c.on_cell_request(id(0), "a".into(), "std::process::abort();".into(), now);
    c.on_cell_request(id(1), "b".into(), "std::process::abort();".into(), now);
    c.on_load_requested(g, &art("/a.so"), "f");
    let a = c.on_load_done(id(0), LoadOutcome::Died { status: "signal 6 (SIGABRT)".into() });
    let r = sends(&a, msg_type::CELL_REPLY);
    assert_eq!(r[0].1["ename"], "EngineWorkerDied");
    assert!(r[0].1["evalue"].as_str().unwrap().contains("variables were lost"));
    let a = c.on_load_done(id(1), ok());
    assert!(a.contains(&Action::Verdict { ctx: g, lines: vec!["EVCXR_PANIC_NOTIFICATION".into()] }));
    c.on_eval_done(g, EvalResult::Ok { has_vars: true, changed: true });
    assert_eq!(c.groups().len(), 2);
}

#[test]
fn a_disconnected_engine_never_leaves_a_load_waiting() {
    let (mut c, g) = cluster(2);
    let now = Instant::now();
    c.on_cell_request(id(0), "a".into(), "x".into(), now);
    c.on_cell_request(id(1), "b".into(), "x".into(), now);
    c.on_load_requested(g, &art("/a.so"), "f");
    c.on_load_done(id(0), ok());
    let a = c.on_engine_gone(&id(1));
    assert!(a.contains(&Action::Verdict { ctx: g, lines: vec!["EVCXR_PANIC_NOTIFICATION".into()] }));
}

#[test]
fn compile_errors_reach_every_engine_and_change_nothing() {
    let (mut c, g) = cluster(2);
    let now = Instant::now();
    c.on_cell_request(id(0), "a".into(), "bad".into(), now);
    c.on_cell_request(id(1), "b".into(), "bad".into(), now);
    let a = c.on_eval_done(g, EvalResult::CompileError { evalue: "cannot find value `bad`".into(), traceback: vec![] });
    let r = sends(&a, msg_type::CELL_REPLY);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|(_, c)| c["ename"] == "CompileError"));
    assert_eq!(c.groups(), vec![vec![0, 1]]);
    assert!(c.groups[&g].history.is_empty());
}

#[test]
fn groups_with_identical_histories_merge() {
    let (mut c, _) = cluster(2);
    run(&mut c, &[0], "let a = 1;", &[ok()]);
    assert_eq!(c.groups().len(), 2);
    run(&mut c, &[1], "let a = 1;", &[ok()]);
    assert_eq!(c.groups(), vec![vec![0, 1]]);
}

#[test]
fn verdict_reduction() {
    let ct = |v: &[&str]| LoadOutcome::Complete {
        panicked: false,
        error_occurred: false,
        changed_types: v.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(Verdict::reduce(&[ok(), ok()]), Verdict::Ok);
    assert_eq!(Verdict::reduce(&[ok(), panicked()]), Verdict::Panic);
    assert_eq!(Verdict::reduce(&[ct(&["q"]), ct(&["q"])]), Verdict::ChangedTypes(vec!["q".into()]));
    assert_eq!(Verdict::reduce(&[ct(&["q"]), ok()]), Verdict::Panic);
}

#[test]
fn engines_reconnecting_after_a_compiler_crash_share_a_replayed_context_per_history() {
    let mut c = Compiler::new(Duration::from_millis(10));
    c.start();
    let ok = LoadOutcome::Complete { panicked: false, error_occurred: false, changed_types: vec![] };
    let boom = LoadOutcome::Complete { panicked: true, error_occurred: false, changed_types: vec![] };
    let h = |outs: &[&LoadOutcome]| -> Vec<Hist> {
        outs.iter().enumerate().map(|(i, o)| Hist::from_engine(format!("let v{i} = {i};"), o)).collect()
    };
    // Two engines ran the same two cells fine; a third panicked in the second.
    let a = c.on_hello(id(0), 0, h(&[&ok, &ok]));
    let replay = a.iter().find_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).expect("a replay");
    assert_eq!(replay, h(&[&ok, &ok]));
    let b = c.on_hello(id(1), 1, h(&[&ok, &ok]));
    assert!(!b.iter().any(|x| matches!(x, Action::Replay { .. })), "the same history joins the replayed group: {b:?}");
    let d = c.on_hello(id(2), 2, h(&[&ok, &boom]));
    let replay =
        d.iter().find_map(|x| if let Action::Replay { cells, .. } = x { Some(cells.clone()) } else { None }).expect("its own replay");
    assert_eq!(replay[1].verdict, Verdict::Panic, "the panicked cell's variables are forgotten in its context");
    // A fresh engine joins no group that believes in variables.
    c.on_hello(id(3), 3, vec![]);
    let mut groups = c.groups();
    groups.sort();
    assert_eq!(groups, vec![vec![0, 1], vec![2], vec![3]]);
    // An engine the compiler already knows keeps its group whatever it says.
    assert!(c.on_hello(id(2), 2, vec![]).is_empty());
}

/// Start every context created in `a` (as their Ready events would), with what that sends.
fn start_new(c: &mut Compiler, a: &[Action], now: Instant) -> Vec<Action> {
    let new: Vec<CtxId> = a.iter().filter_map(|x| if let Action::NewContext { ctx } = x { Some(*ctx) } else { None }).collect();
    new.into_iter().flat_map(|ctx| c.on_context_started(ctx, now)).collect()
}

fn new_contexts(a: &[Action]) -> usize {
    a.iter().filter(|x| matches!(x, Action::NewContext { .. })).count()
}

#[test]
fn after_fork_a_cluster_that_never_diverges_keeps_one_context() {
    let (mut c, _) = cluster(4);
    assert_eq!(c.context_count(), 1, "no spare before any fork");
    let a = run(&mut c, &[0, 1, 2, 3], "let x = 1;", &[ok(), ok(), ok(), ok()]);
    assert_eq!(new_contexts(&a), 0);
    assert_eq!(c.context_count(), 1);
}

#[test]
fn after_fork_the_first_fork_creates_its_context_then_a_spare_is_kept() {
    let (mut c, _) = cluster(4);
    let a = run(&mut c, &[0, 1], "let x = 1;", &[ok(), ok()]);
    assert_eq!(c.groups(), vec![vec![2, 3], vec![0, 1]]);
    assert_eq!(new_contexts(&a), 2, "the forked group's context and a spare for the next fork");
    assert_eq!(c.context_count(), 3);
    let a = run(&mut c, &[0], "let y = 2;", &[ok()]);
    assert_eq!(new_contexts(&a), 1, "the next fork takes the spare and a new spare is made");
    assert_eq!(c.context_count(), 4);
}

#[test]
fn always_keeps_a_spare_from_the_start_and_never_keeps_none() {
    for (policy, at_start, after_fork) in [(SparePolicy::Always, 2, 3), (SparePolicy::Never, 1, 2)] {
        let mut c = Compiler::with_spare_policy(Duration::from_millis(10), policy);
        c.start();
        for i in 0..4 {
            c.on_hello(id(i), i as u64, vec![]);
        }
        assert_eq!(c.context_count(), at_start, "{policy:?}");
        run(&mut c, &[0, 1], "let x = 1;", &[ok(), ok()]);
        assert_eq!(c.context_count(), after_fork, "{policy:?}");
    }
}

#[test]
fn a_group_asking_while_its_context_starts_runs_the_cell_once_without_forking() {
    let mut c = Compiler::new(Duration::from_millis(10));
    assert_eq!(c.start(), vec![Action::NewContext { ctx: 1 }]);
    for i in 0..3 {
        c.on_hello(id(i), i as u64, vec![]);
    }
    let now = Instant::now();
    let code = "let x = 1;";
    c.on_cell_request(id(0), "c0".into(), code.into(), now);
    let a = c.on_tick(now + Duration::from_secs(1));
    assert!(evals(&a).is_empty(), "the window closed, but the context has not started: nothing runs yet ({a:?})");
    assert_eq!(new_contexts(&a), 0, "no fork and no spare for the engine that asked first");
    assert!(!a.iter().any(|x| matches!(x, Action::WakeAt(_))), "a parked batch needs no timer: {a:?}");
    let mut a = c.on_cell_request(id(1), "c1".into(), code.into(), now + Duration::from_secs(2));
    a.extend(c.on_cell_request(id(2), "c2".into(), code.into(), now + Duration::from_secs(3)));
    assert!(evals(&a).is_empty() && new_contexts(&a) == 0, "still waiting for the context: {a:?}");
    let a = c.on_context_started(1, now + Duration::from_secs(4));
    assert_eq!(evals(&a), vec![(1, code.to_string())], "the whole group asked: one eval in the first context");
    assert_eq!(new_contexts(&a), 0);
    assert_eq!(c.groups(), vec![vec![0, 1, 2]]);
    assert_eq!(c.context_count(), 1);
}

#[test]
fn a_part_of_a_group_still_alone_when_the_context_starts_forks_as_before() {
    let mut c = Compiler::new(Duration::from_millis(10));
    c.start();
    for i in 0..2 {
        c.on_hello(id(i), i as u64, vec![]);
    }
    let now = Instant::now();
    let mut a = c.on_cell_request(id(0), "c0".into(), "let y = 2;".into(), now);
    a.extend(c.on_tick(now + Duration::from_secs(1)));
    assert!(evals(&a).is_empty());
    let a = c.on_context_started(1, now + Duration::from_secs(5));
    assert_eq!(
        new_contexts(&a),
        2,
        "engine 0 forks into a context of its own once waiting cannot help (and a spare is kept after a fork): {a:?}"
    );
    assert_eq!(evals(&a).len(), 1);
    assert_eq!(c.groups().len(), 2);
}

#[test]
fn engines_introducing_themselves_while_the_first_context_starts_join_its_first_cell() {
    let mut c = Compiler::new(Duration::from_millis(10));
    c.start();
    let now = Instant::now();
    let code = "let z = 3;";
    c.on_hello(id(0), 0, vec![]);
    c.on_hello(id(1), 1, vec![]);
    let mut a = c.on_cell_request(id(0), "c0".into(), code.into(), now);
    a.extend(c.on_cell_request(id(1), "c1".into(), code.into(), now));
    assert!(evals(&a).is_empty(), "the group asked whole, but its context is starting: the batch waits ({a:?})");
    // A third engine introduces itself (late, on a loaded machine) and asks for the same cell.
    let a = c.on_hello(id(2), 2, vec![]);
    assert_eq!(new_contexts(&a), 0, "it joins the starting group: no context of its own, no spare");
    assert_eq!(c.groups(), vec![vec![0, 1, 2]]);
    c.on_cell_request(id(2), "c2".into(), code.into(), now);
    let a = c.on_context_started(1, now + Duration::from_secs(5));
    assert_eq!(evals(&a), vec![(1, code.to_string())], "one eval for all three: {a:?}");
    assert_eq!(new_contexts(&a), 0);
    assert_eq!(c.context_count(), 1);
}
