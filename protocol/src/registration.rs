//! Engine registration on the controller's `registration` socket: ipyparallel 9's
//! `registration_request` / `registration_reply` contents, with the optional fields rpx engines
//! add to come back after an eviction or a controller restart, and the [`EvictionNotice`] the
//! controller sends to such an engine when it hears from it after evicting it.
//!
//! Python engines send `{uuid, id?}` and never see a notice: the controller sends notices only to
//! engines that asked for them with [`RegistrationRequest::notify_eviction`].

use serde::{Deserialize, Serialize};

/// `registration_request` content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRequest {
    pub uuid: String,
    /// The id asked for: `ipengine --mpi`'s rank, or the id an engine held before it was evicted
    /// or its controller restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// rpx engines: send an [`EvictionNotice`] to the registration socket this request came
    /// from if this registration ends while the engine is still alive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub notify_eviction: bool,
    /// rpx engines: where the engine keeps its values, so that clients on its host can hand
    /// them over as files ([`crate::dataplane`]). The controller forwards it to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<crate::dataplane::HostIdentity>,
    /// rpx engines: the engine reads [`crate::batch`] batches of task requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batches: bool,
}

/// `registration_reply` content (`status: "ok"`; a refusal is an error content instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationReply {
    pub status: String,
    pub id: u64,
    /// The controller's heartbeat period in milliseconds.
    pub hb_period: u64,
    /// The engine connection dict (the engine connection file's content).
    #[serde(default)]
    pub connection_info: serde_json::Value,
    /// rpx controllers: the controller reads [`crate::batch`] batches of replies from this
    /// engine (absent from ipyparallel's controller, so an engine never batches to it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batches: bool,
}

/// `eviction_notice`: the controller no longer has this engine registered (it missed
/// heartbeats, or a send to it failed), so it must register again to serve. `registration` tells
/// which registration ended, so a late notice cannot end a newer one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvictionNotice {
    pub id: u64,
    pub uuid: String,
    /// The msg_id of the `registration_request` whose registration ended.
    pub registration: String,
    pub reason: String,
    /// Requests the controller had sent to this engine and answered itself (failed with
    /// `EngineError`, or queued again for another engine): the engine must not run them.
    #[serde(default)]
    pub answered: Vec<String>,
    /// The controller lost one of the engine's connections: register again over new sockets
    /// (otherwise the existing ones still work and only registration is needed).
    #[serde(default)]
    pub reconnect: bool,
}

/// Message type names of this module.
pub mod msg_type {
    pub const REGISTRATION_REQUEST: &str = "registration_request";
    pub const REGISTRATION_REPLY: &str = "registration_reply";
    pub const EVICTION_NOTICE: &str = "eviction_notice";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_python_engines_request_parses_and_ours_adds_only_optional_fields() {
        let py: RegistrationRequest = serde_json::from_value(json!({"uuid": "u"})).unwrap();
        assert_eq!(py, RegistrationRequest { uuid: "u".into(), id: None, notify_eviction: false, host: None, batches: false });
        assert_eq!(serde_json::to_value(&py).unwrap(), json!({"uuid": "u"}), "the plain request is ipyparallel's");
        let ours = RegistrationRequest { uuid: "u".into(), id: Some(3), notify_eviction: true, host: None, batches: false };
        assert_eq!(serde_json::to_value(&ours).unwrap(), json!({"uuid": "u", "id": 3, "notify_eviction": true}));
    }
}
