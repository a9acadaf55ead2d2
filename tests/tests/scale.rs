//! Registration at scale: a few hundred stand-in engines (`rpx_tests::standin`: the real
//! registration and heartbeat protocol, no code) register at once with a real `ipcontroller`;
//! every one is announced to a client and listed by the hub, and the heartbeats keep them all
//! registered. Each step waits for an explicit signal (notifications, the hub's list, a count of
//! answered pings), every wait bounded.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpx_tests::bin;
use rpx_tests::standin::{self, Counters, Endpoints, Observer, Options};

/// Stand-in engines registering at once.
const ENGINES: usize = 300;
/// The controller's heartbeat period (an engine is evicted after 3.5 periods without a pong).
const PING_MS: u64 = 500;

/// `ipcontroller` under a private `RPX_DIR`, killed on drop.
struct Controller(Child);

impl Controller {
    fn start(rpx_dir: &Path) -> Controller {
        let log = std::fs::File::create(rpx_dir.join("ipcontroller.log")).unwrap();
        let child = Command::new(bin("ipcontroller"))
            .args(["--profile", "default", "--ping", &PING_MS.to_string()])
            .env("RPX_DIR", rpx_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ipcontroller");
        Controller(child)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait (bounded) for a file the controller writes once its sockets are bound.
fn wait_for(path: &Path, limit: Duration) {
    let end = Instant::now() + limit;
    while !path.is_file() {
        assert!(Instant::now() < end, "{} did not appear within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hundreds_of_engines_registering_at_once_all_register_and_stay_alive() {
    let dir = tempfile::Builder::new().prefix("rpx-scale-").tempdir().unwrap();
    let _controller = Controller::start(dir.path());
    let security = dir.path().join("profile_default/security");
    let (engine_file, client_file) = (security.join("ipcontroller-engine.json"), security.join("ipcontroller-client.json"));
    wait_for(&engine_file, Duration::from_secs(30));
    wait_for(&client_file, Duration::from_secs(30));
    standin::raise_open_files_limit();
    let engine = Endpoints::read(&engine_file).unwrap();
    let client = Endpoints::read(&client_file).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut observer = Observer::connect(&client).await.expect("a client view of the controller");
        let uuids: Vec<String> = (0..ENGINES).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let want: HashSet<String> = uuids.iter().cloned().collect();
        let counters = Arc::new(Counters::default());
        let opts = Options { register_within: Duration::from_secs(60), ..Options::default() };
        let t0 = Instant::now();
        let handles = standin::spawn_many(&engine, &uuids, &opts, &counters, t0);

        // Signal 1: every stand-in's registration_notification reached the client.
        let announced = observer.wait_registered(&want, Duration::from_secs(90)).await;
        let errors = counters.errors.lock().unwrap().clone();
        assert_eq!(announced, ENGINES, "announced registrations; failures {}: {errors:?}", counters.failures.load(Ordering::Relaxed));
        let last = want.iter().map(|u| observer.registered[u]).max().unwrap().duration_since(t0);
        eprintln!("{ENGINES} stand-ins registered; the last announced {last:?} after the start");
        let mut standins = Vec::new();
        for h in handles {
            standins.push(h.await.unwrap().expect("every stand-in registered"));
        }
        let ids: HashSet<u64> = standins.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), ENGINES, "distinct engine ids");

        // Signal 2: the hub lists them all.
        let hub = observer.engines(Duration::from_secs(30)).await.unwrap();
        assert_eq!(hub.values().filter(|u| want.contains(*u)).count(), ENGINES, "the hub's engine list");

        // Signal 3: every heart has answered (on average) 8 more pings, well past the 3.5 periods
        // after which a silent engine is evicted; none was.
        let from = counters.pongs.load(Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs(60);
        while counters.pongs.load(Ordering::Relaxed) < from + 8 * ENGINES as u64 {
            assert!(Instant::now() < end, "pings stopped: {} answered", counters.pongs.load(Ordering::Relaxed) - from);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        observer.refresh();
        let gone: Vec<&String> = observer.unregistered.iter().filter(|u| want.contains(*u)).collect();
        assert!(gone.is_empty(), "no stand-in was evicted while its heart beat: {gone:?}");
        let hub = observer.engines(Duration::from_secs(30)).await.unwrap();
        assert_eq!(hub.values().filter(|u| want.contains(*u)).count(), ENGINES, "all still registered");
        drop(standins);
    });
}
