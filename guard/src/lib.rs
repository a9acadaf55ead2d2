//! The front of every socket rpx binds (controller, compiler, kernel): peers connect to a TCP
//! listener owned here, and their bytes reach zeromq only after a streaming ZMTP check has
//! bounded every frame and message. (Stub: binds directly until the front lands.)

use zeromq::{Endpoint, Socket, ZmqError};

/// Bind `socket` on `endpoint` (`tcp://ip:port`, port 0 for any) behind the guard.
pub async fn bind<S: Socket>(socket: &mut S, endpoint: &str) -> Result<Endpoint, ZmqError> {
    socket.bind(endpoint).await
}
