//! A tiny synchronous client of the controller's registration socket: asks
//! `connection_request` to learn which engines are registered. Runs its own tokio
//! current-thread runtime; every call is bounded by a timeout.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

use rpx_protocol::connection::read_json;
use rpx_protocol::hub::{ConnectionReply, OK};
use rpx_protocol::{ClientConnection, Session};

/// A client of the controller's hub: a DEALER connected to its registration (query) socket.
pub struct HubClient {
    rt: tokio::runtime::Runtime,
    sock: DealerSocket,
    session: Session,
}

impl HubClient {
    /// Read the client connection file and connect within `timeout`.
    pub fn connect(client_file: &Path, timeout: Duration) -> anyhow::Result<HubClient> {
        let conn: ClientConnection = read_json(client_file).with_context(|| format!("cannot read {}", client_file.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a tokio runtime")?;
        // zeromq sockets may spawn tasks when created: create them inside the runtime.
        let _guard = rt.enter();
        let mut opts = SocketOptions::default();
        opts.connect_timeout(timeout);
        let mut sock = DealerSocket::with_options(opts);
        let url = conn.url(conn.registration);
        rt.block_on(async { tokio::time::timeout(timeout, sock.connect(&url)).await })
            .map_err(|_| anyhow!("timed out connecting to the controller at {url}"))?
            .with_context(|| format!("cannot connect to the controller at {url}"))?;
        let session = Session::new(conn.key.as_bytes(), "ipcluster");
        drop(_guard);
        Ok(HubClient { rt, sock, session })
    }

    /// Registered engines, id -> uuid, from one `connection_request`.
    pub fn engines(&mut self, timeout: Duration) -> anyhow::Result<BTreeMap<u64, String>> {
        let (header, frames) = self.session.msg(&[], "connection_request", json!({}), None, json!({}), &[]);
        let deadline = Instant::now() + timeout;
        let session = &self.session;
        let sock = &mut self.sock;
        let reply = self.rt.block_on(async {
            tokio::time::timeout_at(deadline.into(), sock.send(rpx_guard::zmq::message(frames)))
                .await
                .map_err(|_| anyhow!("timed out sending connection_request"))?
                .map_err(|e| anyhow!("cannot send connection_request: {e}"))?;
            loop {
                let msg = tokio::time::timeout_at(deadline.into(), sock.recv())
                    .await
                    .map_err(|_| anyhow!("the controller did not answer connection_request within {timeout:?}"))?
                    .map_err(|e| anyhow!("receive from the controller failed: {e}"))?;
                // Replies to earlier, timed-out requests and bad messages are skipped.
                let Ok(m) = session.decode(rpx_guard::zmq::frames(msg)) else { continue };
                if m.parent_msg_id() == Some(header.msg_id.as_str()) {
                    return Ok::<_, anyhow::Error>(m);
                }
            }
        })?;
        parse_engines(&reply.content)
    }
}

/// `{status: ok, engines: {"0": uuid, ...}}` into a map.
pub fn parse_engines(content: &Value) -> anyhow::Result<BTreeMap<u64, String>> {
    let reply = ConnectionReply::deserialize(content).with_context(|| format!("bad connection_reply: {content}"))?;
    if reply.status != OK {
        bail!("connection_request failed: {content}");
    }
    let mut out = BTreeMap::new();
    for (k, v) in reply.engines {
        let id: u64 = k.parse().with_context(|| format!("engine id {k:?} is not a number"))?;
        out.insert(id, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_reply() {
        let m = parse_engines(&json!({"status": "ok", "engines": {"0": "a", "10": "b"}})).unwrap();
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(0, "a".to_string()), (10, "b".to_string())]);
        assert!(parse_engines(&json!({"status": "ok"})).unwrap().is_empty());
        assert!(parse_engines(&json!({"status": "error"})).is_err());
        assert!(parse_engines(&json!({"status": "ok", "engines": {"x": "a"}})).is_err());
    }
}
