//! Connection files in ipyparallel 9's format and the profile directories that hold them.
//!
//! A profile lives at `$RPX_DIR/profile_<name>/` (default `~/.rpx/profile_default`) with
//! `security/` (connection files, 0600), `log/` and `pid/`. File names follow ipyparallel:
//! `ipcontroller[-<cluster_id>]-{client,engine}.json`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A Jupyter kernel's connection file (`jupyter-protocol`'s type), as rpx-kernel reads it.
pub use jupyter_protocol::ConnectionInfo as KernelConnection;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Error, Result};

/// What clients read: `ipcontroller-client.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientConnection {
    #[serde(default)]
    pub ssh: String,
    /// `tcp://<ip>`
    pub interface: String,
    pub registration: u16,
    pub control: u16,
    pub mux: u16,
    pub task: u16,
    #[serde(default = "default_scheme")]
    pub task_scheme: String,
    pub iopub: u16,
    pub notification: u16,
    pub broadcast: u16,
    pub key: String,
    #[serde(default)]
    pub curve_serverkey: Option<String>,
    #[serde(default)]
    pub location: String,
    #[serde(default = "json_str")]
    pub pack: String,
    #[serde(default = "json_str")]
    pub unpack: String,
    #[serde(default = "default_sig")]
    pub signature_scheme: String,
}

/// What engines read: `ipcontroller-engine.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConnection {
    #[serde(default)]
    pub ssh: String,
    pub interface: String,
    pub registration: u16,
    pub control: u16,
    pub mux: u16,
    pub task: u16,
    pub iopub: u16,
    pub hb_ping: u16,
    pub hb_pong: u16,
    /// One port per leaf broadcast scheduler.
    pub broadcast: Vec<u16>,
    pub key: String,
    #[serde(default)]
    pub curve_serverkey: Option<String>,
    #[serde(default)]
    pub location: String,
    #[serde(default = "json_str")]
    pub pack: String,
    #[serde(default = "json_str")]
    pub unpack: String,
    #[serde(default = "default_sig")]
    pub signature_scheme: String,
}

fn default_scheme() -> String {
    "leastload".into()
}
fn json_str() -> String {
    "json".into()
}
fn default_sig() -> String {
    "hmac-sha256".into()
}

impl ClientConnection {
    /// `tcp://ip:port` for a port of this file.
    pub fn url(&self, port: u16) -> String {
        format!("{}:{}", self.interface, port)
    }
}

impl EngineConnection {
    /// `tcp://ip:port` for a port of this file.
    pub fn url(&self, port: u16) -> String {
        format!("{}:{}", self.interface, port)
    }
}

/// A new random cluster key, in the shape ipyparallel writes.
pub fn new_key() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", &u[..8], &u[8..])
}

/// `$RPX_DIR`, or `~/.rpx`.
pub fn rpx_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RPX_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".rpx")
}

/// The namespace directory of the engine with this uuid (its pushed values): under
/// `/dev/shm` when it exists, else the temporary directory. Created by the engine, removed by
/// it when it stops, and by ipcluster's supervisor after the engine crashed.
pub fn engine_namespace_dir(engine_uuid: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("rpx-ns-{engine_uuid}"))
}

/// The file in an engine's namespace directory that names the process owning it:
/// `<pid> <start time>`, as [`process_stamp`] gives them.
pub const NAMESPACE_OWNER: &str = ".owner";

/// How old a namespace directory without an owner file must be to count as abandoned (an engine
/// writes the file right after creating the directory).
const UNOWNED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// `<pid> <start time>` of a live process (start time in clock ticks since boot, from
/// `/proc/<pid>/stat`), so that a reused pid never passes for the original process.
pub fn process_stamp(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: start time is 22.
    let rest = &stat[stat.rfind(')')? + 2..];
    let start = rest.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Remove the engine namespace directories of this host whose engine is gone (killed before it
/// could remove its own): the owner file names a process that no longer runs, or there is no
/// owner file and the directory is older than a minute. Directories of other users are
/// unreadable (0700) and left alone. Returns what was removed.
pub fn sweep_dead_namespaces() -> Vec<PathBuf> {
    match engine_namespace_dir("x").parent() {
        Some(base) => sweep_dead_namespaces_in(base),
        None => Vec::new(),
    }
}

/// [`sweep_dead_namespaces`] in the directory `base`.
pub fn sweep_dead_namespaces_in(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry.file_name().to_str().is_some_and(|n| n.starts_with("rpx-ns-"));
        if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dead = match std::fs::read_to_string(path.join(NAMESPACE_OWNER)) {
            Ok(owner) => {
                let pid = owner.split(' ').next().and_then(|p| p.parse::<u32>().ok());
                pid.is_none_or(|pid| process_stamp(pid).as_deref() != Some(owner.trim()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNOWNED_GRACE))
            }
            Err(_) => false,
        };
        if dead && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The profile named by `RPX_PROFILE`, or `default`.
pub fn default_profile_name() -> String {
    std::env::var("RPX_PROFILE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into())
}

/// A profile directory and the cluster id within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub dir: PathBuf,
    /// Empty for the default cluster of the profile.
    pub cluster_id: String,
}

impl Profile {
    /// The profile `name` under `$RPX_DIR`.
    pub fn new(name: &str, cluster_id: &str) -> Profile {
        Profile { name: name.to_string(), dir: rpx_dir().join(format!("profile_{name}")), cluster_id: cluster_id.to_string() }
    }

    /// The profile named by `RPX_PROFILE` (or `default`).
    pub fn from_env() -> Profile {
        Profile::new(&default_profile_name(), "")
    }

    pub fn security_dir(&self) -> PathBuf {
        self.dir.join("security")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }
    pub fn pid_dir(&self) -> PathBuf {
        self.dir.join("pid")
    }

    fn base(&self) -> String {
        if self.cluster_id.is_empty() {
            "ipcontroller".into()
        } else {
            format!("ipcontroller-{}", self.cluster_id)
        }
    }

    /// `security/ipcontroller[-cid]-client.json`
    pub fn client_file(&self) -> PathBuf {
        self.security_dir().join(format!("{}-client.json", self.base()))
    }
    /// `security/ipcontroller[-cid]-engine.json`
    pub fn engine_file(&self) -> PathBuf {
        self.security_dir().join(format!("{}-engine.json", self.base()))
    }
    /// `security/rpx-compiler[-cid].json`: where rpx engines find the shared compiler.
    pub fn compiler_file(&self) -> PathBuf {
        let name =
            if self.cluster_id.is_empty() { "rpx-compiler.json".to_string() } else { format!("rpx-compiler-{}.json", self.cluster_id) };
        self.security_dir().join(name)
    }
    /// `security/cluster[-cid].json`: the running cluster's processes, for `ipcluster list/stop`.
    pub fn cluster_file(&self) -> PathBuf {
        let name = if self.cluster_id.is_empty() { "cluster.json".to_string() } else { format!("cluster-{}.json", self.cluster_id) };
        self.security_dir().join(name)
    }

    /// Create `security/` (0700), `log/` and `pid/`.
    pub fn create_dirs(&self) -> Result<()> {
        for d in [self.security_dir(), self.log_dir(), self.pid_dir()] {
            std::fs::create_dir_all(&d).map_err(|source| Error::Io { path: d.clone(), source })?;
        }
        set_mode(&self.security_dir(), 0o700)
    }
}

/// Where the shared compiler listens, written next to the engine connection file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompilerConnection {
    /// `tcp://<ip or location>:<port>`
    pub url: String,
    pub key: String,
    /// The compiler's pid on its own host (for `ipcluster`; engines never use it).
    #[serde(default)]
    pub pid: u32,
    /// The compiler's private work directory on its own host (evcxr's builds, artifacts), for
    /// ipcluster's supervisor to remove after the compiler crashed; engines never use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
}

/// The environment variable that carries an engine's whole [`ConnectionInfo`] as JSON, as
/// ipyparallel's `IPP_CONNECTION_INFO` does: engines on other hosts need no file.
pub const CONNECTION_INFO_ENV: &str = "RPX_CONNECTION_INFO";

/// Set by ipcluster's supervisor on an engine it restarts: a one-line notice (why the engine
/// was restarted, and that its variables are lost) that the engine publishes on stderr with
/// the first request it runs, so clients see it (`[stderr:2] ...` under `%px`).
pub const ENGINE_RESTARTED_ENV: &str = "RPX_ENGINE_RESTARTED";

/// Everything an engine needs to join a cluster: the controller and the compiler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub engine: EngineConnection,
    pub compiler: CompilerConnection,
}

impl ConnectionInfo {
    /// One line of JSON (the value of [`CONNECTION_INFO_ENV`]).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("connection info serializes")
    }

    /// Parse the value of [`CONNECTION_INFO_ENV`].
    pub fn parse(s: &str) -> Result<ConnectionInfo> {
        Ok(serde_json::from_str(s)?)
    }

    /// Read the controller's engine file and the compiler's file of a profile.
    pub fn read(engine_file: &Path, compiler_file: &Path) -> Result<ConnectionInfo> {
        Ok(ConnectionInfo { engine: read_json(engine_file)?, compiler: read_json(compiler_file)? })
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Write `value` as pretty JSON to `path` atomically (temporary file in the same directory,
/// then rename), readable only by its owner (0600).
pub fn write_private_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    let body = serde_json::to_vec_pretty(value).expect("connection data serializes");
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Read a JSON file into `T`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let body = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_atomic_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("security/ipcontroller-client.json");
        let c = ClientConnection {
            ssh: String::new(),
            interface: "tcp://127.0.0.1".into(),
            registration: 1,
            control: 2,
            mux: 3,
            task: 4,
            task_scheme: "leastload".into(),
            iopub: 5,
            notification: 6,
            broadcast: 7,
            key: new_key(),
            curve_serverkey: None,
            location: "host".into(),
            pack: "json".into(),
            unpack: "json".into(),
            signature_scheme: "hmac-sha256".into(),
        };
        write_private_json(&p, &c).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back: ClientConnection = read_json(&p).unwrap();
        assert_eq!(back, c);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        // ipyparallel's keys, exactly.
        let v: serde_json::Value = read_json(&p).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "broadcast",
                "control",
                "curve_serverkey",
                "interface",
                "iopub",
                "key",
                "location",
                "mux",
                "notification",
                "pack",
                "registration",
                "signature_scheme",
                "ssh",
                "task",
                "task_scheme",
                "unpack"
            ]
        );
    }

    #[test]
    fn connection_info_is_one_line_that_parses_back() {
        let engine = EngineConnection {
            ssh: String::new(),
            interface: "tcp://10.0.0.1".into(),
            registration: 1,
            control: 2,
            mux: 3,
            task: 4,
            iopub: 5,
            hb_ping: 6,
            hb_pong: 7,
            broadcast: vec![8, 9],
            key: new_key(),
            curve_serverkey: None,
            location: "head".into(),
            pack: "json".into(),
            unpack: "json".into(),
            signature_scheme: "hmac-sha256".into(),
        };
        let info = ConnectionInfo {
            compiler: CompilerConnection { url: "tcp://10.0.0.1:9".into(), key: engine.key.clone(), pid: 0, work_dir: None },
            engine,
        };
        let line = info.to_line();
        assert!(!line.contains('\n'));
        assert_eq!(ConnectionInfo::parse(&line).unwrap(), info);
        assert!(ConnectionInfo::parse("{}").is_err());
    }

    #[test]
    fn profile_paths() {
        let p = Profile { name: "x".into(), dir: "/r/profile_x".into(), cluster_id: String::new() };
        assert_eq!(p.client_file(), PathBuf::from("/r/profile_x/security/ipcontroller-client.json"));
        let p = Profile { cluster_id: "c1".into(), ..p };
        assert_eq!(p.engine_file(), PathBuf::from("/r/profile_x/security/ipcontroller-c1-engine.json"));
    }

    #[test]
    fn only_namespaces_of_dead_engines_are_swept() {
        let base = tempfile::tempdir().unwrap();
        let dir = |name: &str, owner: Option<String>| {
            let d = base.path().join(name);
            std::fs::create_dir(&d).unwrap();
            if let Some(o) = owner {
                std::fs::write(d.join(NAMESPACE_OWNER), o).unwrap();
            }
            d
        };
        let me = process_stamp(std::process::id()).expect("our own stamp");
        let live = dir("rpx-ns-live", Some(me.clone()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = dir("rpx-ns-dead", Some(format!("{dead_pid} 1")));
        let reused = dir("rpx-ns-reused-pid", Some(format!("{} 1", std::process::id())));
        let fresh_unowned = dir("rpx-ns-just-created", None);
        let other = dir("not-a-namespace", Some(format!("{dead_pid} 1")));
        let mut removed = sweep_dead_namespaces_in(base.path());
        removed.sort();
        assert_eq!(removed, vec![dead.clone(), reused.clone()]);
        assert!(live.exists() && fresh_unowned.exists() && other.exists());
        assert_eq!(me.split(' ').next(), Some(std::process::id().to_string().as_str()));
    }
}
