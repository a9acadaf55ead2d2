//! `rpx-kernel install`: writes the Jupyter kernelspec `rpx` (`kernel.json`) where Jupyter looks
//! for kernels: the user's data dir (`--user`), `<prefix>/share/jupyter` (`--prefix`), or the
//! system-wide `/usr/local/share/jupyter`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::json;

/// The kernelspec's name (`jupyter kernelspec list`, notebook metadata).
pub const KERNEL_NAME: &str = "rpx";
/// What front ends show.
pub const DISPLAY_NAME: &str = "Rust (rpx)";

/// Where the kernelspec goes.
pub fn kernels_dir(user: bool, prefix: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = prefix {
        return Ok(p.join("share/jupyter/kernels"));
    }
    if user {
        if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR") {
            return Ok(PathBuf::from(d).join("kernels"));
        }
        let data = match std::env::var_os("XDG_DATA_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; use --prefix")?).join(".local/share"),
        };
        return Ok(data.join("jupyter/kernels"));
    }
    Ok(PathBuf::from("/usr/local/share/jupyter/kernels"))
}

/// The `kernel.json` for the kernel binary at `exe`.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    json!({
        "argv": [exe.to_string_lossy(), "kernel", "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rust",
        "interrupt_mode": "message",
        "metadata": { "debugger": false },
    })
}

/// Write the kernelspec; returns its directory.
pub fn install(user: bool, prefix: Option<&Path>) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the rpx-kernel executable")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let dir = kernels_dir(user, prefix)?.join(KERNEL_NAME);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&kernel_json(&exe))? + "\n";
    std::fs::write(dir.join("kernel.json"), text).with_context(|| format!("cannot write {}", dir.join("kernel.json").display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_install_writes_the_rpx_kernelspec() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = install(false, Some(tmp.path())).unwrap();
        assert_eq!(dir, tmp.path().join("share/jupyter/kernels/rpx"));
        let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap();
        assert_eq!(spec["display_name"], "Rust (rpx)");
        assert_eq!(spec["language"], "rust");
        let argv: Vec<&str> = spec["argv"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(Path::new(argv[0]).is_absolute(), "{argv:?}");
        assert_eq!(&argv[1..], ["kernel", "--connection-file", "{connection_file}"]);
    }
}
