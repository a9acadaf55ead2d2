//! The engine namespace on disk, and the code that links it with cell variables.
//!
//! A push writes each value (postcard bytes, as sent) to `<dir>/<name>` and does not touch the
//! worker, so pushing costs one file write whatever the size. The next cell binds the pushed
//! names as variables (`let n: T = ::rpx_runtime::get("n");` before the user's code), so cells
//! see them with the pushed type. A pull reads the file while it still holds the variable's
//! value; otherwise a small cell writes the variables out first (`::rpx_runtime::put`).
//! Closures read pushed values with `rpx::get`, which reads the same files.
//!
//! The directory is private: created fresh (mode 0700) when the engine starts, refusing one that
//! already exists, and every value file is 0600. Its `.owner` file names the engine process, so
//! directories of killed engines are found and removed (by the next engine on the host and by
//! `ipcluster stop`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rpx_protocol::apply::NamedType;

/// The namespace directory of an engine: on tmpfs when there is one (ipcluster's supervisor
/// removes it after the engine crashed, so the rule lives in `rpx_protocol`).
pub fn dir_for(engine_uuid: &str) -> PathBuf {
    rpx_protocol::connection::engine_namespace_dir(engine_uuid)
}

/// Create the engine's namespace directory, fresh and private (0700). A directory (or link) that
/// already exists at that path is refused: nothing planted there is ever read.
pub fn create(engine_uuid: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dir_for(engine_uuid);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| std::io::Error::new(e.kind(), format!("cannot create the engine namespace {}: {e}", dir.display())))?;
    // Who owns it, so that whoever finds it after this engine was killed can tell it is dead.
    let stamp = rpx_protocol::connection::process_stamp(std::process::id()).unwrap_or_default();
    let owner = dir.join(rpx_protocol::connection::NAMESPACE_OWNER);
    write_private(&owner, &dir.join(".owner.tmp"), stamp.as_bytes())?;
    Ok(dir)
}

/// Write `bytes` to `path` through a temporary file, readable by the owner only.
fn write_private(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(tmp, path)
}

/// Whether `name` can be a variable name in a cell.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
    first_ok && chars.all(|c| c == '_' || c.is_ascii_alphanumeric()) && name != "_" && !is_keyword(name)
}

fn is_keyword(name: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern", "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop",
        "match", "mod", "move", "mut", "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where", "while",
    ];
    KEYWORDS.contains(&name)
}

/// Write pushed values: `buffers[i]` becomes `names[i]`. Each file is replaced atomically, so a
/// closure reading it never sees half a value.
pub fn store(dir: &Path, names: &[NamedType], buffers: &[Bytes]) -> Result<(), String> {
    if names.len() != buffers.len() {
        return Err(format!("push of {} names came with {} values", names.len(), buffers.len()));
    }
    if let Some(bad) = names.iter().find(|n| !is_identifier(&n.name)) {
        return Err(format!("`{}` is not a variable name", bad.name));
    }
    if !dir.is_dir() {
        // Removed behind the engine's back (a tmpfs cleaner): make it again, private.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("cannot create the namespace {}: {e}", dir.display()))?;
    }
    for (n, b) in names.iter().zip(buffers) {
        let tmp = dir.join(format!(".{}.push", n.name));
        write_private(&dir.join(&n.name), &tmp, b).map_err(|e| format!("cannot store `{}`: {e}", n.name))?;
    }
    Ok(())
}

/// Read the values of `names` for a pull.
pub fn load(dir: &Path, names: &[String]) -> Result<Vec<Bytes>, String> {
    names.iter().map(|n| std::fs::read(dir.join(n)).map(Bytes::from).map_err(|e| format!("`{n}` has no value in the namespace ({e})"))).collect()
}

/// The user's code preceded by the bindings of pushed values (one line, so rustc's line numbers
/// in the user's code shift by exactly one). Leading evcxr commands (`:dep ...`) stay first.
pub fn with_bindings(unbound: &BTreeMap<String, String>, code: &str) -> String {
    if unbound.is_empty() {
        return code.to_string();
    }
    let bindings: Vec<String> = unbound.iter().map(|(n, t)| format!("let {n}: {t} = ::rpx_runtime::get::<{t}>({n:?});")).collect();
    let mut commands = String::new();
    let mut rest = code;
    while rest.trim_start().starts_with(':') {
        let line_end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        commands.push_str(&rest[..line_end]);
        rest = &rest[line_end..];
    }
    if !commands.is_empty() && !commands.ends_with('\n') {
        commands.push('\n');
    }
    format!("{commands}{}\n{rest}", bindings.join(" "))
}

/// A cell that writes variables to the namespace for a pull.
pub fn put_cell(names: &[String]) -> String {
    names.iter().map(|n| format!("::rpx_runtime::put({n:?}, &{n});")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["n", "_x", "data2", "Big"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "2x", "a-b", "a b", "_", "fn", "let", "x::y", "../etc"] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn bindings_go_before_the_code_and_after_commands() {
        let mut u = BTreeMap::new();
        assert_eq!(with_bindings(&u, "x + 1"), "x + 1");
        u.insert("n".to_string(), "u64".to_string());
        u.insert("v".to_string(), "Vec<String>".to_string());
        assert_eq!(
            with_bindings(&u, "n + 1"),
            "let n: u64 = ::rpx_runtime::get::<u64>(\"n\"); let v: Vec<String> = ::rpx_runtime::get::<Vec<String>>(\"v\");\nn + 1"
        );
        let with_dep = with_bindings(&u, ":dep rand = \"0.8\"\nn");
        assert!(with_dep.starts_with(":dep rand = \"0.8\"\nlet n: u64"), "{with_dep}");
        assert!(with_dep.ends_with("\nn"));
    }

    #[test]
    fn the_namespace_is_created_fresh_and_private_and_its_files_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let uuid = format!("test-{}", std::process::id());
        let dir = create(&uuid).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let err = create(&uuid).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        store(&dir, &[NamedType { name: "x".into(), type_name: "u8".into() }], &[Bytes::from_static(b"\x01")]).unwrap();
        assert_eq!(mode(&dir.join("x")), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
        // A directory planted at the path of another engine is refused, not used.
        let planted = dir_for(&format!("{uuid}-planted"));
        std::fs::create_dir(&planted).unwrap();
        assert!(create(&format!("{uuid}-planted")).is_err());
        std::fs::remove_dir_all(&planted).unwrap();
    }

    #[test]
    fn store_and_load_round_trip_and_refuse_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec![NamedType { name: "a".into(), type_name: "u8".into() }];
        store(dir.path(), &names, &[Bytes::from_static(b"\x05")]).unwrap();
        assert_eq!(load(dir.path(), &["a".to_string()]).unwrap(), vec![Bytes::from_static(b"\x05")]);
        assert!(load(dir.path(), &["b".to_string()]).unwrap_err().contains("`b`"));
        let bad = vec![NamedType { name: "../x".into(), type_name: "u8".into() }];
        assert!(store(dir.path(), &bad, &[Bytes::new()]).unwrap_err().contains("not a variable name"));
        assert!(store(dir.path(), &names, &[]).unwrap_err().contains("1 names came with 0 values"));
    }

    #[test]
    fn put_cell_writes_each_name() {
        assert_eq!(put_cell(&["a".into(), "b".into()]), "::rpx_runtime::put(\"a\", &a);\n::rpx_runtime::put(\"b\", &b);");
    }
}
