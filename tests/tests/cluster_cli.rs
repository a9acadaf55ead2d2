//! `ipcluster` as an operator uses it: start in the background, list, refuse a second start,
//! add engines, stop with no process left behind, and refuse to stop nothing.

use std::time::Duration;

use rpx_tests::{processes_mentioning, show, wait_no_process_mentioning, TestCluster};

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn start_list_refuse_grow_stop() {
    let cluster = TestCluster::start(2);
    let dir = cluster.rpx_dir().to_string_lossy().into_owned();

    // list: the profile, running, 2 engines, with pids.
    let out = cluster.ipcluster(&["list"]);
    assert!(out.status.success(), "{}", show(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = listing.lines().find(|l| l.starts_with("default")).unwrap_or_else(|| panic!("no row for profile default:\n{listing}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[2], "true", "running: {row}");
    assert_eq!(cols[3], "2", "engines: {row}");
    let state = cluster.cluster_state().expect("cluster file");
    for e in state["engines"].as_array().unwrap() {
        assert!(row.contains(&e["pid"].to_string()), "engine pid {} listed: {row}", e["pid"]);
    }
    assert!(row.contains(&state["controller_pid"].to_string()), "{row}");

    // The JSON listing says the same.
    let out = cluster.ipcluster(&["list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("list -o json: {e}\n{}", show(&out)));
    assert_eq!(v[0]["profile"], "default");
    assert_eq!(v[0]["running"], true);
    assert_eq!(v[0]["engines"], 2);

    // A second start under the same profile is refused.
    let out = cluster.ipcluster(&["start", "-n", "1", "--daemonize"]);
    assert!(!out.status.success(), "second start must fail\n{}", show(&out));
    assert!(text(&out).contains("already running"), "{}", show(&out));
    assert!(text(&out).contains("ipcluster stop"), "says how to stop it: {}", show(&out));

    // The running cluster is untouched by the refused start.
    let mut client = cluster.client();
    assert_eq!(client.ids().unwrap().len(), 2);

    // engines -n 2 brings the cluster to 4 engines.
    let out = cluster.ipcluster(&["engines", "-n", "2", "--timeout", "120"]);
    assert!(out.status.success(), "{}", show(&out));
    let ids = client.wait_for_engines(4, Duration::from_secs(60)).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(cluster.cluster_state().unwrap()["engines"].as_array().unwrap().len(), 4);
    drop(client);

    // Every engine, its worker, the compiler and its relays, and the controller are ours.
    assert!(processes_mentioning(&dir).len() >= 6, "{:?}", processes_mentioning(&dir));

    // stop: nothing that mentions this RPX_DIR survives, and the files are gone.
    let out = cluster.ipcluster(&["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped cluster"), "{}", show(&out));
    let left = wait_no_process_mentioning(&dir, Duration::from_secs(5));
    assert!(left.is_empty(), "processes survived ipcluster stop: {left:#?}");
    assert!(!cluster.profile().cluster_file().exists());
    assert!(!cluster.client_file().exists());

    // Stopping again: nothing is running, so it fails and says so.
    let out = cluster.ipcluster(&["stop"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out).contains("no cluster is running"), "{}", show(&out));

    // The listing is empty now.
    let out = cluster.ipcluster(&["list", "-o", "json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

#[test]
fn stop_with_nothing_running_fails() {
    let c = TestCluster::empty();
    let out = c.ipcluster(&["stop"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text(&out).contains("no cluster is running"), "{}", show(&out));
    let out = c.ipcluster(&["engines", "-n", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}

#[test]
fn unsupported_launcher_exits_2() {
    let c = TestCluster::empty();
    let out = c.ipcluster(&["start", "-n", "1", "--engines", "lsf", "--daemonize"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out).contains("invalid value 'lsf'"), "{}", show(&out));
    let out = c.ipcluster(&["start", "-n", "1", "--engines", "slurm", "--queue", "q", "--daemonize"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out).contains("--queue goes with --engines sge|pbs"), "{}", show(&out));
    assert!(c.processes().is_empty());
}

#[test]
fn foreground_cluster_stops_on_sigterm_without_orphans() {
    let c = TestCluster::empty();
    let mut child = c.command(&["start", "-n", "2", "--timeout", "120"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Wait for the cluster file and the two engines, as a user would with `ipcluster list`.
    let mut registered = false;
    for _ in 0..600 {
        if c.client_file().exists() {
            if let Ok(mut client) = rpx_tests::Client::connect(&c.client_file(), Duration::from_secs(5)) {
                if client.wait_for_engines(2, Duration::from_secs(120)).is_ok() {
                    registered = true;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(registered, "the foreground cluster's engines registered");
    let state = c.cluster_state().unwrap();
    assert_eq!(state["ipcluster_pid"], child.id());
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "foreground ipcluster exits 0 after SIGTERM: {status}");
    let left = wait_no_process_mentioning(&c.rpx_dir().to_string_lossy(), Duration::from_secs(5));
    assert!(left.is_empty(), "{left:#?}");
    assert!(!c.profile().cluster_file().exists());
}

#[test]
fn test_client_runs_a_cell_on_chosen_engines() {
    let cluster = TestCluster::start(2);
    let mut client = cluster.client();
    let ids = client.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    let outs = client.execute(&ids, "let answer: u64 = 40 + 2;\nprintln!(\"answer {answer}\");", Duration::from_secs(300)).unwrap();
    assert_eq!(outs.len(), 2);
    for (o, id) in outs.iter().zip(&ids) {
        assert_eq!(o.engine_id, *id);
        assert_eq!(o.status, "ok", "engine {id}: {:?}", o.reply);
        assert_eq!(o.stdout, "answer 42\n", "engine {id}");
    }
    // The variable persists; a cell sent to one engine runs there only.
    let o = client.execute_one(ids[1], "println!(\"{}\", answer + 1);", Duration::from_secs(300)).unwrap();
    assert_eq!((o.engine_id, o.status.as_str(), o.stdout.as_str()), (ids[1], "ok", "43\n"));
    let q = client.queue_request(None).unwrap();
    assert_eq!(q["status"], "ok", "{q}");
    for id in &ids {
        assert!(q.get(id.to_string()).is_some(), "queue_reply has engine {id}: {q}");
    }
}
