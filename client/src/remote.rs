//! Closures that run on engines: [`Remote`] (built by [`crate::remote!`]) keeps a closure's
//! source next to the closure itself, [`RemoteFn`] gives its arity and argument types, and
//! [`sanitize_type_name`] turns `std::any::type_name` output into types the engines can write.

use rpx_protocol::apply::Closure;

/// A closure to run on engines: its source text (what the engines compile) and the closure
/// itself (so the client type-checks the call and infers argument and result types).
///
/// Build it with [`crate::remote!`]: `rpx::remote!(|x: u64| x * x)`. The closure must be
/// self-contained: it cannot capture local variables (push values to the engines and read
/// them with [`crate::get`] instead), and every type it names must exist on the engines.
#[derive(Clone, Copy)]
pub struct Remote<F> {
    source: &'static str,
    f: F,
}

impl<F> Remote<F> {
    /// Pair a closure with its source text; [`crate::remote!`] does this for you.
    pub const fn new(source: &'static str, f: F) -> Remote<F> {
        Remote { source, f }
    }

    /// The closure's source, as the engines compile it.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The closure itself, to call it locally.
    pub fn local(&self) -> &F {
        &self.f
    }

    /// The payload naming this closure for an argument tuple `Args`.
    pub fn closure<Args>(&self) -> Closure
    where
        F: RemoteFn<Args>,
    {
        Closure { source: self.source.to_string(), arg_types: F::arg_types() }
    }
}

impl<F> std::fmt::Debug for Remote<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("source", &self.source).finish()
    }
}

/// Make a [`Remote`] from a closure literal, keeping its source for the engines:
///
/// ```
/// let square = rpx::remote!(|x: u64| x * x);
/// assert_eq!(square.source(), "|x: u64| x * x");
/// assert_eq!((square.local())(7), 49);
/// ```
///
/// Annotate the argument types: the engines compile the closure on its own. Inside the closure,
/// [`crate::get`] reads values pushed to the engine, and `std::env::var("RPX_ENGINE_ID")` tells
/// which engine runs it.
#[macro_export]
macro_rules! remote {
    ($f:expr $(,)?) => {
        $crate::Remote::new(::core::stringify!($f), $f)
    };
}

/// A closure callable on engines with the argument tuple `Args`: implemented for `Fn() -> R`
/// up to `Fn(A, B, C, D) -> R`.
pub trait RemoteFn<Args> {
    /// What the closure returns.
    type Output;
    /// Number of arguments.
    const ARITY: usize;
    /// The argument types as the engines can write them (see [`sanitize_type_name`]).
    fn arg_types() -> Vec<String>;
}

macro_rules! remote_fn {
    ($n:expr; $($a:ident),*) => {
        impl<Func, Ret, $($a),*> RemoteFn<($($a,)*)> for Func
        where
            Func: Fn($($a),*) -> Ret,
        {
            type Output = Ret;
            const ARITY: usize = $n;
            fn arg_types() -> Vec<String> {
                vec![$(type_name_of::<$a>()),*]
            }
        }
    };
}

remote_fn!(0;);
remote_fn!(1; A);
remote_fn!(2; A, B);
remote_fn!(3; A, B, C);
remote_fn!(4; A, B, C, D);

/// `std::any::type_name::<T>()`, sanitised by [`sanitize_type_name`].
pub fn type_name_of<T: ?Sized>() -> String {
    sanitize_type_name(std::any::type_name::<T>())
}

/// The type under which a pushed value of type `T` is stored on the engines: an unsized `str`
/// becomes `String` and a slice `[T]` becomes `Vec<T>` (they encode the same way).
pub fn storage_type_name<T: ?Sized>() -> String {
    let t = type_name_of::<T>();
    if t == "str" {
        return "String".to_string();
    }
    if let Some(inner) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        if !has_top_level(inner, ';') {
            return format!("Vec<{inner}>");
        }
    }
    t
}

fn has_top_level(s: &str, c: char) -> bool {
    let mut depth = 0i32;
    for ch in s.chars() {
        match ch {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' => depth -= 1,
            x if x == c && depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// Items of the standard prelude: written without a path.
const PRELUDE: &[&str] = &["Vec", "String", "Box", "Option", "Result", "ToString", "ToOwned"];

/// Rewrite a type path from `std::any::type_name` into code that compiles on the engines:
///
/// - prelude types lose their path: `alloc::vec::Vec` → `Vec`, `alloc::string::String` →
///   `String`, `alloc::boxed::Box`, `core::option::Option`, `core::result::Result`;
/// - other standard types go through their public `std` module:
///   `std::collections::hash::map::HashMap` → `std::collections::HashMap`,
///   `alloc::collections::btree::map::BTreeMap` → `std::collections::BTreeMap`,
///   `alloc::sync::Arc` → `std::sync::Arc`, `core::time::Duration` → `std::time::Duration`;
/// - any other path `a::b::C` becomes `C` (define user types on the engines under that name);
/// - primitives, references (`&str`), tuples, arrays and generics are kept as they are.
///
/// ```
/// assert_eq!(
///     rpx::sanitize_type_name("alloc::vec::Vec<(alloc::string::String, core::option::Option<u8>)>"),
///     "Vec<(String, Option<u8>)>"
/// );
/// ```
pub fn sanitize_type_name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c == '\'' {
            // A lifetime like `'_` or `'static` is kept as is.
            out.push(c);
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                out.push(b[i] as char);
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() {
                let ch = b[i] as char;
                if ch.is_ascii_alphanumeric() || ch == '_' {
                    i += 1;
                } else if ch == ':' && i + 1 < b.len() && b[i + 1] == b':' {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push_str(&rewrite_path(&raw[start..i]));
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn rewrite_path(path: &str) -> String {
    let segs: Vec<&str> = path.split("::").collect();
    if segs.len() == 1 {
        return path.to_string();
    }
    let last = segs[segs.len() - 1];
    match segs[0] {
        "std" | "core" | "alloc" => {
            if PRELUDE.contains(&last) && matches!(segs[1], "vec" | "string" | "boxed" | "option" | "result") {
                last.to_string()
            } else {
                // The public re-export lives in the first module: std::collections::HashMap,
                // std::sync::Arc, std::hash::RandomState, std::num::NonZero, ...
                format!("std::{}::{last}", segs[1])
            }
        }
        _ => last.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
    use std::rc::Rc;
    use std::sync::Arc;

    #[derive(serde::Serialize)]
    struct Point;

    #[test]
    fn real_type_names_become_engine_code() {
        assert_eq!(type_name_of::<u64>(), "u64");
        assert_eq!(type_name_of::<Vec<(String, Vec<u64>)>>(), "Vec<(String, Vec<u64>)>");
        assert_eq!(type_name_of::<BTreeMap<String, Option<Vec<f64>>>>(), "std::collections::BTreeMap<String, Option<Vec<f64>>>");
        assert_eq!(type_name_of::<HashMap<String, u64>>(), "std::collections::HashMap<String, u64>");
        assert_eq!(type_name_of::<HashSet<u8>>(), "std::collections::HashSet<u8>");
        assert_eq!(type_name_of::<BTreeSet<i32>>(), "std::collections::BTreeSet<i32>");
        assert_eq!(type_name_of::<VecDeque<u8>>(), "std::collections::VecDeque<u8>");
        assert_eq!(type_name_of::<BinaryHeap<u8>>(), "std::collections::BinaryHeap<u8>");
        assert_eq!(type_name_of::<Arc<str>>(), "std::sync::Arc<str>");
        assert_eq!(type_name_of::<Rc<u8>>(), "std::rc::Rc<u8>");
        assert_eq!(type_name_of::<Box<[u8]>>(), "Box<[u8]>");
        assert_eq!(type_name_of::<&str>(), "&str");
        assert_eq!(type_name_of::<Result<u8, String>>(), "Result<u8, String>");
        assert_eq!(type_name_of::<Point>(), "Point");
        assert_eq!(type_name_of::<[u8; 4]>(), "[u8; 4]");
        assert_eq!(type_name_of::<(u8,)>(), "(u8,)");
        assert_eq!(type_name_of::<()>(), "()");
        assert_eq!(type_name_of::<std::time::Duration>(), "std::time::Duration");
        assert_eq!(type_name_of::<std::path::PathBuf>(), "std::path::PathBuf");
        assert_eq!(type_name_of::<Option<&str>>(), "Option<&str>");
        assert_eq!(type_name_of::<std::borrow::Cow<'static, str>>(), "std::borrow::Cow<'_, str>");
        // The default hasher is not printed; an explicit one is, and must be nameable too.
        type H = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;
        assert_eq!(
            type_name_of::<HashMap<u8, u8, H>>(),
            "std::collections::HashMap<u8, u8, std::hash::BuildHasherDefault<std::hash::DefaultHasher>>"
        );
    }

    #[test]
    fn sanitising_paths() {
        assert_eq!(sanitize_type_name("my_crate::model::Point<alloc::string::String>"), "Point<String>");
        assert_eq!(sanitize_type_name("&[alloc::string::String]"), "&[String]");
        assert_eq!(sanitize_type_name("core::num::nonzero::NonZero<u64>"), "std::num::NonZero<u64>");
        assert_eq!(sanitize_type_name("std::ffi::os_str::OsString"), "std::ffi::OsString");
        assert_eq!(sanitize_type_name("(u8, f64)"), "(u8, f64)");
        assert_eq!(sanitize_type_name("&'static str"), "&'static str");
    }

    #[test]
    fn storage_types_are_owned() {
        assert_eq!(storage_type_name::<str>(), "String");
        assert_eq!(storage_type_name::<[u64]>(), "Vec<u64>");
        assert_eq!(storage_type_name::<[u8; 4]>(), "[u8; 4]");
        assert_eq!(storage_type_name::<Vec<u8>>(), "Vec<u8>");
    }

    #[test]
    fn remote_fn_arity_and_types() {
        fn info<Args, F: RemoteFn<Args>>(_: &Remote<F>) -> (usize, Vec<String>) {
            (F::ARITY, F::arg_types())
        }
        let r0 = crate::remote!(|| 1u8);
        let r1 = crate::remote!(|x: u64| x * x);
        let r2 = crate::remote!(|a: String, b: Vec<u8>| a.len() + b.len());
        let r4 = crate::remote!(|a: u8, b: u16, c: u32, d: (u8, f64)| a as f64 + b as f64 + c as f64 + d.1);
        assert_eq!(info::<(), _>(&r0), (0, vec![]));
        assert_eq!(info::<(u64,), _>(&r1), (1, vec!["u64".to_string()]));
        assert_eq!(info::<(String, Vec<u8>), _>(&r2), (2, vec!["String".to_string(), "Vec<u8>".to_string()]));
        assert_eq!(info::<(u8, u16, u32, (u8, f64)), _>(&r4).1[3], "(u8, f64)");
        assert_eq!(r1.source(), "|x: u64| x * x");
        let c = r2.closure::<(String, Vec<u8>)>();
        assert_eq!(c.arg_types, vec!["String", "Vec<u8>"]);
        assert_eq!((r2.local())("ab".into(), vec![1]), 3);
    }
}
