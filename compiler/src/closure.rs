//! Closures: the wrapper that turns a client's closure into an exported function, and the cache
//! that makes each distinct closure compile once per cluster and resolves the ids that later
//! calls name closures by.
//!
//! A closure `|x: u64| x * x` with argument types `["u64"]` becomes an item
//! `rpx_closure_<id prefix>(mode, input, len, sink, ctx) -> u32` calling
//! `rpx_runtime::abi::serve1::<u64, _, _>(closure, ...)`; the type arguments let rustc infer
//! unannotated closures exactly as the client did. Pure: no evcxr here.

use std::collections::HashMap;

use bytes::Bytes;
use rpx_protocol::apply::{Closure, ClosureId, ClosureRef};
use rpx_protocol::compile::Artifact;

/// Most arguments a remote closure may take (`rpx_runtime::abi::serve0..serve4`).
pub const MAX_ARITY: usize = 4;

/// The generated item and the symbol it exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapper {
    pub fn_name: String,
    pub code: String,
}

/// Wrap a closure into an exported function, or say why it cannot be.
pub fn wrap(c: &Closure) -> Result<Wrapper, String> {
    let arity = c.arg_types.len();
    if arity > MAX_ARITY {
        return Err(format!("remote closures take at most {MAX_ARITY} arguments; this one takes {arity}"));
    }
    if c.source.trim().is_empty() {
        return Err("the closure's source is empty".into());
    }
    let fn_name = format!("rpx_closure_{}", &c.id().as_str()[..32]);
    let mut generics: Vec<&str> = c.arg_types.iter().map(String::as_str).collect();
    generics.extend(["_", "_"]);
    let code = format!(
        "#[unsafe(no_mangle)]\npub unsafe extern \"C\" fn {fn_name}(mode: u32, input: *const u8, len: usize, sink: ::rpx_runtime::abi::Sink, ctx: *mut ::std::ffi::c_void) -> u32 {{\n    #[allow(unused_imports)]\n    use ::rpx_runtime as rpx;\n    unsafe {{ ::rpx_runtime::abi::serve{arity}::<{}>(\n{}\n    , mode, input, len, sink, ctx) }}\n}}",
        generics.join(", "),
        c.source
    );
    Ok(Wrapper { fn_name, code })
}

/// Where a closure stands in the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// Compiling; these engines (identity, request id) wait for it.
    Compiling {
        waiters: Vec<(Bytes, String)>,
    },
    Ready {
        artifact: Artifact,
        fn_name: String,
    },
    /// It did not compile; the same source never will.
    Failed {
        evalue: String,
        traceback: Vec<String>,
    },
}

/// What to do about a closure request.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Answer at once from the cache.
    Answer(Entry),
    /// Start compiling this wrapper (the first request for it).
    Compile(Wrapper),
    /// Someone else's compile of it is running; the request waits.
    Wait,
}

/// The closures this compiler has seen: their code by id, and where each stands by the symbol
/// of its wrapper.
#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<String, Entry>,
    codes: HashMap<ClosureId, Closure>,
}

impl Cache {
    /// The code of the closure a request names: kept when the request carries it, looked up
    /// when it names the closure by id alone; `Err` says why an id cannot be resolved.
    pub fn resolve(&mut self, named: ClosureRef) -> Result<Closure, String> {
        match named.code {
            Some(code) => {
                self.codes.entry(named.id).or_insert_with(|| code.clone());
                Ok(code)
            }
            None => self.codes.get(&named.id).cloned().ok_or_else(|| {
                format!(
                    "the compiler does not know closure {}: it was started after the closure was \
                     last compiled; the client sends the closure's code again",
                    named.id
                )
            }),
        }
    }

    /// A request for `wrapper` from engine `from` with its request id.
    pub fn request(&mut self, wrapper: Wrapper, from: Bytes, request_id: String) -> Next {
        match self.entries.get_mut(&wrapper.fn_name) {
            Some(Entry::Compiling { waiters }) => {
                waiters.push((from, request_id));
                Next::Wait
            }
            Some(done) => Next::Answer(done.clone()),
            None => {
                self.entries.insert(wrapper.fn_name.clone(), Entry::Compiling { waiters: vec![(from, request_id)] });
                Next::Compile(wrapper)
            }
        }
    }

    /// A compile finished: record it (a compile error is final; any other failure is forgotten
    /// so a later request tries again) and return who waited.
    pub fn finish(&mut self, fn_name: &str, outcome: Entry, cache_it: bool) -> Vec<(Bytes, String)> {
        let waiters = match self.entries.remove(fn_name) {
            Some(Entry::Compiling { waiters }) => waiters,
            _ => vec![],
        };
        if cache_it {
            self.entries.insert(fn_name.to_string(), outcome);
        }
        waiters
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closure(src: &str, types: &[&str]) -> Closure {
        Closure { source: src.into(), arg_types: types.iter().map(|t| t.to_string()).collect() }
    }

    #[test]
    fn wrappers_name_a_symbol_per_source_and_types() {
        let w = wrap(&closure("|x| x * x", &["u64"])).unwrap();
        assert!(w.fn_name.starts_with("rpx_closure_"));
        assert!(w.code.contains(&format!("fn {}(", w.fn_name)));
        assert!(w.code.contains("serve1::<u64, _, _>(\n|x| x * x\n"), "{}", w.code);
        assert_eq!(w, wrap(&closure("|x| x * x", &["u64"])).unwrap());
        assert_ne!(w.fn_name, wrap(&closure("|x| x * x", &["u32"])).unwrap().fn_name);
        assert!(wrap(&closure("|| 1", &[])).unwrap().code.contains("serve0::<_, _>("));
        assert!(wrap(&closure("|a, b, c, d, e| a", &["u8"; 5])).unwrap_err().contains("at most 4"));
        assert!(wrap(&closure("  ", &[])).is_err());
    }

    #[test]
    fn a_closure_sent_with_its_code_once_is_resolved_by_its_id_after() {
        let mut c = Cache::default();
        let code = closure("|x: u8| x", &["u8"]);
        let id = code.id();
        let err = c.resolve(ClosureRef::by_id(id.clone())).unwrap_err();
        assert!(err.contains(&format!("does not know closure {id}")), "{err}");
        assert_eq!(c.resolve(ClosureRef::with_code(code.clone())), Ok(code.clone()));
        assert_eq!(c.resolve(ClosureRef::by_id(id)), Ok(code.clone()));
        // Its symbol is named after its id, the same in every compiler and every Rust version.
        assert_eq!(wrap(&code).unwrap().fn_name, format!("rpx_closure_{}", &code.id().as_str()[..32]));
    }

    #[test]
    fn one_compile_per_closure_and_waiters_share_it() {
        let mut c = Cache::default();
        let w = wrap(&closure("|x: u8| x", &["u8"])).unwrap();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert_eq!(c.request(w.clone(), a.clone(), "r1".into()), Next::Compile(w.clone()));
        assert_eq!(c.request(w.clone(), b.clone(), "r2".into()), Next::Wait);
        let artifact = Artifact { path: "/x.so".into(), sha256: "1".repeat(64), size: 9 };
        let ready = Entry::Ready { artifact, fn_name: w.fn_name.clone() };
        assert_eq!(c.finish(&w.fn_name, ready.clone(), true), vec![(a.clone(), "r1".into()), (b, "r2".into())]);
        assert_eq!(c.request(w.clone(), a.clone(), "r3".into()), Next::Answer(ready));

        // A failure that is not the closure's fault is not cached.
        let w2 = wrap(&closure("|x: u8| x + 1", &["u8"])).unwrap();
        assert!(matches!(c.request(w2.clone(), a.clone(), "r4".into()), Next::Compile(_)));
        c.finish(&w2.fn_name, Entry::Failed { evalue: "context died".into(), traceback: vec![] }, false);
        assert!(matches!(c.request(w2, a, "r5".into()), Next::Compile(_)));
    }
}
