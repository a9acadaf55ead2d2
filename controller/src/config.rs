//! Command-line arguments and the checked configuration the controller runs with.

use std::time::Duration;

use clap::Parser;
use rpx_protocol::Profile;

use crate::scheduler::Scheme;
use crate::store::DbKind;
use crate::{Error, Result};

/// Default per-engine high-water mark for load-balanced tasks.
///
/// ipyparallel defaults to 1 (every task pays a full round trip while the engine idles). rpx
/// keeps up to 16 tasks in flight per engine: enough pipelining for high throughput of small
/// tasks, while still holding most of a large backlog in the controller so that engines that
/// join later, or finish early, get work. An engine that finishes tasks quickly may hold up to
/// 4 times the mark, as long as that is under 20 ms of its work (`crate::scheduler::Pace`:
/// measured with `bench_ops`, 10,000 trivial tasks on 2 engines, three alternated pairs: a mark
/// of 16 gave 16.6k, 16.3k, 21.9k tasks/s, 64 gave 20.7k, 23.5k, 23.7k). `--hwm 0` means unlimited.
pub const DEFAULT_HWM: usize = 16;
/// Default `--queue-limit`.
pub const DEFAULT_QUEUE_LIMIT: usize = 1_000_000;

/// `ipcontroller`: the rpx hub.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ipcontroller",
    version,
    about = "rpx controller: registration, routing, load-balanced scheduling, heartbeats and results, wire-compatible with ipyparallel 9"
)]
pub struct Args {
    /// Profile name (directory `$RPX_DIR/profile_<name>`).
    #[arg(long, env = "RPX_PROFILE", default_value = "default")]
    pub profile: String,
    /// Cluster id: connection files are `ipcontroller-<id>-{client,engine}.json`.
    #[arg(long, default_value = "")]
    pub cluster_id: String,
    /// Interface to bind (`*` or `0.0.0.0` for all interfaces).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Address written into the connection files when binding all interfaces.
    #[arg(long)]
    pub location: Option<String>,
    /// Load-balancing scheme: leastload, lru, plainrandom, twobin or weighted.
    #[arg(long, default_value = "leastload")]
    pub scheme: String,
    /// Load-balanced tasks in flight per engine (0 = unlimited); an engine that finishes tasks
    /// quickly may hold up to 4 times as many, within 20 ms of its recent pace.
    #[arg(long, default_value_t = DEFAULT_HWM)]
    pub hwm: usize,
    /// Heartbeat period in milliseconds; engines missing 3 periods are evicted.
    #[arg(long, default_value_t = 1000)]
    pub ping: u64,
    /// Task records kept in memory for `result_request` and history (oldest dropped first).
    #[arg(long, default_value_t = 1024)]
    pub record_limit: usize,
    /// Bytes of buffers kept in task records (oldest dropped first).
    #[arg(long, default_value_t = 1 << 30)]
    pub record_bytes: usize,
    /// Load-balanced tasks the controller holds unfinished (queued or running); a task beyond
    /// it is refused at once with a `QueueFull` error reply.
    #[arg(long, default_value_t = DEFAULT_QUEUE_LIMIT)]
    pub queue_limit: usize,
    /// Task record storage: `memory` (bounded, lost when the controller stops; ipyparallel 9's
    /// default) or `sqlite` (also written to `<profile>/security/tasks.db`).
    #[arg(long, default_value = "memory")]
    pub db: String,
    /// With `--db sqlite`: serve the records of the previous controller's database (after a
    /// crash). Without it a new database is started and the old file kept as `tasks.db.prev`.
    #[arg(long)]
    pub restore: bool,
    /// Reuse the profile's existing connection files: bind the same ports with the same key, so
    /// that engines and clients of a controller that died find this one (ipyparallel's flag).
    /// The files are kept when this controller exits.
    #[arg(long)]
    pub reuse: bool,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub profile: Profile,
    /// Address to bind, e.g. `127.0.0.1` or `0.0.0.0`.
    pub bind_ip: String,
    /// Address written into the connection files.
    pub public_ip: String,
    pub scheme: Scheme,
    pub hwm: usize,
    pub ping: Duration,
    pub record_limit: usize,
    pub record_bytes: usize,
    pub queue_limit: usize,
    pub db: DbKind,
    /// Serve the task records of the previous database (`--restore`).
    pub restore: bool,
    /// The cluster key (a fresh one by default).
    pub key: String,
    /// Write (and at exit remove) the connection files.
    pub write_files: bool,
    /// `--reuse`: the ports and key of the profile's connection files, read and checked.
    pub reuse: Option<Reused>,
}

/// The ports and key a `--reuse` controller takes over from the profile's connection files.
#[derive(Debug, Clone, PartialEq)]
pub struct Reused {
    pub client: rpx_protocol::ClientConnection,
    pub engine: rpx_protocol::EngineConnection,
}

impl Reused {
    /// Read both connection files of `profile` and check they describe one controller.
    pub fn read(profile: &Profile) -> Result<Reused> {
        fn read<T: serde::de::DeserializeOwned>(path: std::path::PathBuf) -> Result<T> {
            let hint = "start ipcontroller without --reuse to write new ones";
            let text = std::fs::read(&path)
                .map_err(|e| Error::Config(format!("--reuse: cannot read the connection file {} ({e}); {hint}", path.display())))?;
            serde_json::from_slice(&text)
                .map_err(|e| Error::Config(format!("--reuse: {} is not a connection file ({e}); {hint}", path.display())))
        }
        let client: rpx_protocol::ClientConnection = read(profile.client_file())?;
        let engine: rpx_protocol::EngineConnection = read(profile.engine_file())?;
        Reused::check(client, engine).map_err(|why| {
            Error::Config(format!("--reuse: the connection files in {} do not match: {why}", profile.dir.join("security").display()))
        })
    }

    /// The two files must share key and registration port, and name a port for every socket.
    pub fn check(client: rpx_protocol::ClientConnection, engine: rpx_protocol::EngineConnection) -> std::result::Result<Reused, String> {
        if client.key != engine.key {
            return Err("the client and engine files have different keys".into());
        }
        if client.key.is_empty() {
            return Err("the key is empty".into());
        }
        if client.registration != engine.registration {
            return Err(format!("registration port {} (client) vs {} (engine)", client.registration, engine.registration));
        }
        if engine.broadcast.len() != 1 {
            return Err(format!("the engine file names {} broadcast ports; rpx binds one", engine.broadcast.len()));
        }
        let ports = [
            client.registration,
            client.control,
            client.mux,
            client.task,
            client.iopub,
            client.notification,
            client.broadcast,
            engine.control,
            engine.mux,
            engine.task,
            engine.iopub,
            engine.hb_ping,
            engine.hb_pong,
            engine.broadcast[0],
        ];
        if ports.contains(&0) {
            return Err("a port is 0".into());
        }
        Ok(Reused { client, engine })
    }
}

impl Args {
    /// Validate the raw arguments.
    pub fn check(self) -> Result<Config> {
        let scheme: Scheme = self.scheme.parse().map_err(Error::Config)?;
        let db: DbKind = self.db.parse().map_err(Error::Config)?;
        if self.restore && db != DbKind::Sqlite {
            return Err(Error::Config("--restore needs --db sqlite (an in-memory database has nothing to restore)".into()));
        }
        if self.ping == 0 {
            return Err(Error::Config("--ping must be at least 1 ms".into()));
        }
        let bind_ip = match self.ip.as_str() {
            "*" | "0.0.0.0" => "0.0.0.0".to_string(),
            "localhost" => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        };
        let public_ip = if bind_ip == "0.0.0.0" { self.location.clone().unwrap_or_else(|| "127.0.0.1".into()) } else { bind_ip.clone() };
        let profile = Profile::new(&self.profile, &self.cluster_id);
        let reuse = if self.reuse { Some(Reused::read(&profile)?) } else { None };
        Ok(Config {
            key: reuse.as_ref().map_or_else(rpx_protocol::connection::new_key, |r| r.client.key.clone()),
            reuse,
            profile,
            bind_ip,
            public_ip,
            scheme,
            hwm: self.hwm,
            ping: Duration::from_millis(self.ping),
            record_limit: self.record_limit.max(1),
            record_bytes: self.record_bytes,
            queue_limit: self.queue_limit.max(1),
            db,
            restore: self.restore,
            write_files: true,
        })
    }
}

impl Config {
    /// A configuration for in-process tests: loopback, fresh key, no files written.
    pub fn for_tests(profile: Profile) -> Config {
        Config {
            profile,
            bind_ip: "127.0.0.1".into(),
            public_ip: "127.0.0.1".into(),
            scheme: Scheme::LeastLoad,
            hwm: DEFAULT_HWM,
            ping: Duration::from_millis(1000),
            record_limit: 1024,
            record_bytes: 1 << 30,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            db: DbKind::Memory,
            restore: false,
            key: rpx_protocol::connection::new_key(),
            write_files: false,
            reuse: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_scheme_is_rejected() {
        let a = Args::parse_from(["ipcontroller", "--scheme", "nope"]);
        assert!(matches!(a.check(), Err(Error::Config(_))));
    }

    #[test]
    fn db_options_are_checked() {
        let c = Args::parse_from(["ipcontroller"]).check().unwrap();
        assert_eq!((c.db, c.restore), (DbKind::Memory, false));
        let c = Args::parse_from(["ipcontroller", "--db", "sqlite", "--restore"]).check().unwrap();
        assert_eq!((c.db, c.restore), (DbKind::Sqlite, true));
        assert!(matches!(Args::parse_from(["ipcontroller", "--restore"]).check(), Err(Error::Config(_))));
        assert!(matches!(Args::parse_from(["ipcontroller", "--db", "mongodb"]).check(), Err(Error::Config(_))));
    }

    #[test]
    fn reuse_needs_readable_matching_connection_files() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile { name: "p".into(), dir: dir.path().join("profile_p"), cluster_id: String::new() };
        let err = Reused::read(&profile).unwrap_err().to_string();
        assert!(err.contains("--reuse: cannot read the connection file") && err.contains("without --reuse"), "{err}");
        profile.create_dirs().unwrap();
        std::fs::write(profile.client_file(), "{not json").unwrap();
        let err = Reused::read(&profile).unwrap_err().to_string();
        assert!(err.contains("is not a connection file"), "{err}");
    }

    #[test]
    fn reused_files_must_describe_one_controller() {
        let client: rpx_protocol::ClientConnection = serde_json::from_value(serde_json::json!({
            "interface": "tcp://127.0.0.1", "registration": 1, "control": 2, "mux": 3, "task": 4, "iopub": 5,
            "notification": 6, "broadcast": 7, "key": "k"}))
        .unwrap();
        let engine: rpx_protocol::EngineConnection = serde_json::from_value(serde_json::json!({
            "interface": "tcp://127.0.0.1", "registration": 1, "control": 12, "mux": 13, "task": 14, "iopub": 15,
            "hb_ping": 16, "hb_pong": 17, "broadcast": [18], "key": "k"}))
        .unwrap();
        assert!(Reused::check(client.clone(), engine.clone()).is_ok());
        let other_key = rpx_protocol::EngineConnection { key: "j".into(), ..engine.clone() };
        assert!(Reused::check(client.clone(), other_key).unwrap_err().contains("different keys"));
        let other_reg = rpx_protocol::EngineConnection { registration: 9, ..engine };
        assert!(Reused::check(client, other_reg).unwrap_err().contains("registration port"));
    }

    #[test]
    fn wildcard_ip_binds_all() {
        let c = Args::parse_from(["ipcontroller", "--ip", "*"]).check().unwrap();
        assert_eq!(c.bind_ip, "0.0.0.0");
        assert_eq!(c.public_ip, "127.0.0.1");
        assert_eq!(c.hwm, DEFAULT_HWM);
    }
}
