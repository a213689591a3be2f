//! Connections that say nothing are let go. A gRPC port hands a connection to its server only
//! once the peer has sent as many bytes as an HTTP/2 preface (a whole preface, or the start of
//! a TLS hello) within `FIRST_BYTES_TIMEOUT`: a peer that opens connections and stays silent,
//! or stops half way through its opening, holds each one for at most that long and never
//! reaches the server. (The shuffle service, which serves HTTP itself,
//! has the same rule in `worker::shuffle::transfer`.)

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long a new connection may stay silent.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections of `listener` whose peers have spoken, with TCP_NODELAY and keep-alive
/// probes after `keepalive` of idleness (what tonic's own listener sets). Accepting stops when
/// the stream is dropped.
pub fn speaking(listener: TcpListener, keepalive: Duration) -> ReceiverStream<std::io::Result<TcpStream>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let socket = match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of descriptors and the like: keep serving those already open.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let probes = socket2::TcpKeepalive::new().with_time(keepalive);
                let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&probes);
                if let Ok(Ok(true)) = tokio::time::timeout(FIRST_BYTES_TIMEOUT, opening(&socket)).await {
                    let _ = tx.send(Ok(socket)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Bytes of an HTTP/2 connection preface (`PRI * HTTP/2.0...`); a TLS hello is longer.
const OPENING: usize = 24;

/// Whether the peer sent its opening (read without taking it off the socket); false when it
/// closed first.
async fn opening(socket: &TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; OPENING];
    loop {
        match socket.peek(&mut head).await? {
            0 => return Ok(false),
            OPENING => return Ok(true),
            _ => tokio::time::sleep(Duration::from_millis(5)).await, // the rest is on its way
        }
    }
}
