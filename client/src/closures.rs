//! How this client names closures in its calls: with their code until it has seen them compile,
//! by id after ([`rpx_protocol::apply::ClosureRef`]), so a closure's source crosses the wire
//! once per cluster, not once per task. Owns the set of closures seen to compile, what a call's
//! frames say about their closure ([`Naming`]), and what the dispatcher does with a reply to a
//! closure call ([`after_reply`]): learn that the closure compiled, or, when the engines could
//! not resolve the id (the compiler restarted), send the same request again with the code.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rpx_protocol::apply::{ename, Closure, ClosureId, ClosureRef, Op};
use rpx_protocol::content::ErrorName;
use rpx_protocol::Session;
use serde_json::Value;

use crate::io::{Chan, Frames, MsgIds};

/// The closures this client has seen compile: the compiler has their code, and calls name them
/// by id.
#[derive(Debug, Default)]
pub(crate) struct Compiled(Mutex<HashSet<ClosureId>>);

impl Compiled {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<ClosureId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How a new call names `code`.
    pub fn name(&self, code: Closure) -> ClosureRef {
        let id = code.id();
        if self.set().contains(&id) {
            ClosureRef::by_id(id)
        } else {
            ClosureRef::with_code(code)
        }
    }

    pub fn learn(&self, id: ClosureId) {
        self.set().insert(id);
    }

    pub fn forget(&self, id: &ClosureId) {
        self.set().remove(id);
    }
}

/// How the requests built from one [`Frames`] name their closure.
#[derive(Clone)]
pub(crate) enum Naming {
    /// With its code.
    Code(ClosureId),
    /// By id; the frames of the same requests with the code, should the id not resolve.
    Id(ClosureId, Arc<Frames>),
}

/// The op of a closure call (`Op::Apply` or `Op::Map`) with the closure named as it goes.
pub(crate) type MakeOp = fn(ClosureRef) -> Op;

/// The frames of calls of `code` under `op` with `metadata`, naming the closure as `compiled`
/// says: by id once seen to compile, and then holding the frames with the code as well.
pub(crate) fn call_frames(
    compiled: &Compiled,
    session: &Session,
    ids: &Arc<MsgIds>,
    metadata: &Value,
    code: Closure,
    op: MakeOp,
) -> Frames {
    let named = compiled.name(code.clone());
    let id = named.id.clone();
    let naming = if named.code.is_some() {
        Naming::Code(id)
    } else {
        Naming::Id(id, Arc::new(Frames::new(session, ids, metadata, &op(ClosureRef::with_code(code)).to_content())))
    };
    Frames::new(session, ids, metadata, &op(named).to_content()).naming(naming)
}

/// What the dispatcher keeps of one sent closure call until its reply.
pub(crate) enum ClosureCall {
    /// It carried the closure's code.
    Code(ClosureId),
    /// It named the closure by id: what sending it again with the code takes.
    Id { id: ClosureId, code: Arc<Frames>, chan: Chan, ident: Option<String>, buffers: Vec<Bytes> },
}

impl ClosureCall {
    /// The call of one request built from frames named `naming`, sent on `chan` to `ident`
    /// with `buffers`.
    pub fn of(naming: &Naming, chan: Chan, ident: Option<&str>, buffers: &[Bytes]) -> ClosureCall {
        match naming {
            Naming::Code(id) => ClosureCall::Code(id.clone()),
            Naming::Id(id, code) => {
                ClosureCall::Id { id: id.clone(), code: code.clone(), chan, ident: ident.map(str::to_string), buffers: buffers.to_vec() }
            }
        }
    }
}

/// What a reply to a closure call calls for.
pub(crate) enum AfterReply {
    Nothing,
    /// The closure compiled: name it by id from now on.
    Compiled(ClosureId),
    /// Nobody could resolve the id: forget it, and send the request again with the code (built
    /// from these frames, on this channel, to this engine, with these buffers); the caller
    /// never sees the first reply.
    Resend {
        id: ClosureId,
        code: Arc<Frames>,
        chan: Chan,
        ident: Option<String>,
        buffers: Vec<Bytes>,
    },
}

/// What the reply with `status` (and, for an error, `ename`) to `call` calls for.
pub(crate) fn after_reply(call: ClosureCall, status: &str, ename: impl FnOnce() -> ErrorName) -> AfterReply {
    match call {
        ClosureCall::Code(id) if status == "ok" => AfterReply::Compiled(id),
        ClosureCall::Id { id, code, chan, ident, buffers } if status == "error" && ename() == ename::UNKNOWN_CLOSURE => {
            AfterReply::Resend { id, code, chan, ident, buffers }
        }
        _ => AfterReply::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MsgIds;
    use rpx_protocol::Session;
    use serde_json::json;

    fn code() -> Closure {
        Closure { source: "|x: u64| x + 1".into(), arg_types: vec!["u64".into()] }
    }

    fn session() -> (Session, Arc<MsgIds>) {
        let session = Session::new(b"key", "me");
        let ids = Arc::new(MsgIds::new(&session));
        (session, ids)
    }

    fn frames() -> Arc<Frames> {
        let (session, ids) = session();
        Arc::new(Frames::new(&session, &ids, &json!({}), &json!({})))
    }

    /// The content of a request built from `frames`.
    fn content(frames: &Frames) -> Value {
        let (_, built) = frames.build("apply_request", None, &[]);
        session().0.decode(built).expect("signed with the same key").content
    }

    #[test]
    fn a_closure_goes_with_its_code_until_a_call_of_it_succeeds_then_by_id_until_forgotten() {
        let (session, ids) = session();
        let compiled = Compiled::default();
        let make: MakeOp = |closure| Op::Map { closure };
        let first = call_frames(&compiled, &session, &ids, &json!({}), code(), make);
        assert_eq!(content(&first)["rpx"]["closure"]["code"]["source"], "|x: u64| x + 1");
        let Some(Naming::Code(id)) = first.naming_of() else { panic!("with its code") };
        // A failed call teaches nothing (it may not have compiled).
        let call = ClosureCall::of(&Naming::Code(id.clone()), Chan::Task, None, &[]);
        assert!(matches!(after_reply(call, "error", || ErrorName::CompileError), AfterReply::Nothing));
        let call = ClosureCall::of(&Naming::Code(id.clone()), Chan::Task, None, &[]);
        let AfterReply::Compiled(learnt) = after_reply(call, "ok", || unreachable!("an ok has no ename")) else { panic!("compiled") };
        compiled.learn(learnt);

        let later = call_frames(&compiled, &session, &ids, &json!({}), code(), make);
        assert_eq!(content(&later)["rpx"]["closure"], json!({"id": id.as_str()}), "the id alone");
        let Some(Naming::Id(same, with_code)) = later.naming_of() else { panic!("by id") };
        assert_eq!(same, id);
        assert_eq!(content(with_code)["rpx"]["closure"]["code"]["source"], "|x: u64| x + 1", "the code, should the id not resolve");
        compiled.forget(id);
        let again = call_frames(&compiled, &session, &ids, &json!({}), code(), make);
        assert!(matches!(again.naming_of(), Some(Naming::Code(_))), "with its code again");
    }

    #[test]
    fn a_call_by_id_nobody_resolves_is_sent_again_to_the_same_place_with_the_same_buffers() {
        let id = code().id();
        let naming = Naming::Id(id.clone(), frames());
        let buf = Bytes::from_static(b"args");
        let call = ClosureCall::of(&naming, Chan::Mux, Some("engine-uuid"), std::slice::from_ref(&buf));
        let AfterReply::Resend { id: again, chan, ident, buffers, .. } = after_reply(call, "error", || ErrorName::UnknownClosure) else {
            panic!("sent again")
        };
        assert_eq!((again, chan, ident.as_deref(), buffers), (id, Chan::Mux, Some("engine-uuid"), vec![buf]));
        // Any other error is the user's: a panic, a dead worker.
        for other in [ErrorName::Panic, ErrorName::EngineWorkerDied, ErrorName::UnsupportedPayload] {
            let call = ClosureCall::of(&naming, Chan::Task, None, &[]);
            assert!(matches!(after_reply(call, "error", || other.clone()), AfterReply::Nothing), "{other:?}");
        }
        let call = ClosureCall::of(&naming, Chan::Task, None, &[]);
        assert!(matches!(after_reply(call, "ok", || unreachable!()), AfterReply::Nothing), "already known by id");
    }
}
