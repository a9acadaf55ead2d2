//! Shared by the engine's integration tests: building a cdylib of test cells the way evcxr
//! builds cells (`-C prefer-dynamic`, so they use the toolchain's libstd).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain's `libstd-*.so` directory, which the worker needs to load the cells.
pub fn rustc_libdir() -> String {
    let out = Command::new("rustc").args(["--print", "target-libdir"]).output().expect("rustc runs");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The toolchain's `libstd-*.so`.
#[allow(dead_code)]
pub fn libstd() -> PathBuf {
    let dir = PathBuf::from(rustc_libdir());
    let name = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libstd-") && n.ends_with(".so"))
        .expect("the toolchain has a libstd-*.so");
    dir.join(name)
}

/// Compile `source` into `dir/libcells.so` with the extra rustc `flags`.
pub fn build_cells(dir: &Path, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join("cells.rs");
    std::fs::write(&src, source).unwrap();
    let out = dir.join("libcells.so");
    let st = Command::new("rustc")
        .args(["--edition", "2021", "--crate-type", "cdylib", "-C", "prefer-dynamic"])
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("rustc runs");
    assert!(st.success(), "building the test cells failed");
    out
}
