//! Compiled files by content: the registry of every artifact this compiler announced (cells,
//! closures, and the runtime libraries they link), hashed once when announced, and the bytes it
//! serves to engines on other hosts. Only registered hashes are served, so an engine can never
//! read an arbitrary file through the compiler.
//!
//! evcxr removes a context's build directory with the context (and reuses it after a reset),
//! so each compiled artifact is copied, once, into the registry's own directory under its hash:
//! an engine that joins later (or another host) still finds every closure and cell it is told
//! to load. Runtime libraries stay where the toolchain keeps them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rpx_protocol::compile::{Artifact, RuntimeLib};
use sha2::{Digest, Sha256};

/// The artifacts this compiler announced, by SHA-256, and how often each host fetched them.
#[derive(Debug, Default)]
pub struct Registry {
    /// Where compiled artifacts are kept (`<sha256>.so`); `None` keeps them where they are.
    store: Option<PathBuf>,
    by_hash: HashMap<String, PathBuf>,
    /// (hash, host) -> times served.
    served: HashMap<(String, String), u32>,
}

/// Hash a file's bytes.
fn describe(path: &Path) -> std::io::Result<Artifact> {
    let bytes = std::fs::read(path)?;
    Ok(Artifact { path: path.display().to_string(), sha256: const_hex::encode(Sha256::digest(&bytes)), size: bytes.len() as u64 })
}

impl Registry {
    /// A registry that keeps compiled artifacts in `store` (created, mode 0700).
    pub fn new(store: &Path) -> std::io::Result<Registry> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(store)?;
        Ok(Registry { store: Some(store.to_path_buf()), ..Registry::default() })
    }

    /// Hash a compiled artifact, keep a copy under its hash, and remember it so engines may
    /// fetch it. The returned artifact names the kept copy.
    pub fn register(&mut self, path: &Path) -> std::io::Result<Artifact> {
        let Some(store) = &self.store else { return self.register_in_place(path) };
        let bytes = std::fs::read(path)?;
        let sha256 = const_hex::encode(Sha256::digest(&bytes));
        let kept = store.join(format!("{sha256}.so"));
        if !kept.exists() {
            let tmp = store.join(format!(".{sha256}.tmp"));
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &kept)?;
        }
        self.by_hash.insert(sha256.clone(), kept.clone());
        Ok(Artifact { path: kept.display().to_string(), sha256, size: bytes.len() as u64 })
    }

    /// Hash a file that stays where it is (a runtime library) and remember it.
    fn register_in_place(&mut self, path: &Path) -> std::io::Result<Artifact> {
        let a = describe(path)?;
        self.by_hash.insert(a.sha256.clone(), path.to_path_buf());
        Ok(a)
    }

    /// The toolchain's `libstd-*.so` in `libdir` (what `-Cprefer-dynamic` cells link), registered.
    pub fn runtime_libs(&mut self, libdir: &Path) -> Vec<RuntimeLib> {
        let Ok(rd) = std::fs::read_dir(libdir) else { return vec![] };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("libstd-") && n.ends_with(".so"))
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|name| match self.register_in_place(&libdir.join(&name)) {
                Ok(artifact) => Some(RuntimeLib { name, artifact }),
                Err(e) => {
                    tracing::warn!(%name, "cannot read a runtime library: {e}");
                    None
                }
            })
            .collect()
    }

    /// The bytes of a registered artifact for `host`, read now (a file changed on disk since it
    /// was announced is sent as it is: the engine's hash check refuses it). Returns the bytes and
    /// how many times `host` has now fetched this hash.
    pub fn serve(&mut self, sha256: &str, host: &str) -> Result<(Vec<u8>, u32, &Path), String> {
        let Some(path) = self.by_hash.get(sha256) else {
            return Err(format!("this compiler announced no artifact with sha256 {sha256}"));
        };
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let n = self.served.entry((sha256.to_string(), host.to_string())).or_insert(0);
        *n += 1;
        Ok((bytes, *n, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_artifacts_are_kept_under_their_hash_after_the_build_directory_goes() {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("ctx-1");
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(build.join("libcode_1.so"), b"cell one").unwrap();
        let mut r = Registry::new(&dir.path().join("artifacts")).unwrap();
        let a = r.register(&build.join("libcode_1.so")).unwrap();
        assert_eq!(a.path, dir.path().join("artifacts").join(format!("{}.so", a.sha256)).display().to_string());
        // evcxr drops the context and reuses the name for other code.
        std::fs::remove_dir_all(&build).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(build.join("libcode_1.so"), b"another cell").unwrap();
        assert_eq!(r.serve(&a.sha256, "h1").unwrap().0, b"cell one");
        let b = r.register(&build.join("libcode_1.so")).unwrap();
        assert_ne!(a.sha256, b.sha256);
        assert_eq!(std::fs::read(&a.path).unwrap(), b"cell one");
    }

    #[test]
    fn only_registered_artifacts_are_served_and_fetches_are_counted_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libstd-abc.so");
        std::fs::write(&lib, b"std").unwrap();
        std::fs::write(dir.path().join("librustc_driver-x.so"), b"no").unwrap();
        let mut r = Registry::default();
        let libs = r.runtime_libs(dir.path());
        assert_eq!(libs.len(), 1);
        assert_eq!(libs[0].name, "libstd-abc.so");
        assert_eq!(libs[0].artifact.size, 3);
        assert_eq!(libs[0].artifact.sha256, const_hex::encode(Sha256::digest(b"std")));
        assert_eq!(r.serve(&libs[0].artifact.sha256, "h1").unwrap(), (b"std".to_vec(), 1, lib.as_path()));
        assert_eq!(r.serve(&libs[0].artifact.sha256, "h1").unwrap().1, 2);
        assert_eq!(r.serve(&libs[0].artifact.sha256, "h2").unwrap().1, 1);
        assert!(r.serve(&"0".repeat(64), "h1").unwrap_err().contains("no artifact"));
    }
}
