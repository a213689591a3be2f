//! How a shuffle file travels from the worker that wrote it to a worker that reads it.
//!
//! The reader asks `GET /v1/shuffle?path=FILE` with `Upgrade: polars-node-shuffle`. The
//! shuffle service answers `101 Switching Protocols` with the file's length in a header, writes
//! the file's bytes on the upgraded connection straight from a memory map of it, and closes
//! the connection. The reader moves them from its socket into its copy of the file with
//! splice(2): the kernel hands them over, nothing passes through a buffer of ours on either
//! side. A plain GET (curl, a browser) gets the file as an ordinary HTTP body.

use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::ShuffleStore;

/// The protocol a fetch upgrades its connection to, and the header with the file's length.
const PROTOCOL: &str = "polars-node-shuffle";
const LENGTH: &str = "polars-node-shuffle-length";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that sends nothing for this long is taken as gone (its process would have closed
/// the connection if it had died; this covers a host that vanished).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes moved per splice call (and the pipe's size, where the kernel allows it).
const MOVE: usize = 1 << 20;

/// The shuffle service's HTTP routes: `GET /v1/shuffle?path=FILE`, a file of this worker's
/// shuffle location, and nothing else.
pub fn router(store: ShuffleStore) -> axum::Router {
    axum::Router::new().route("/v1/shuffle", axum::routing::get(serve)).with_state(store)
}

#[derive(serde::Deserialize)]
struct Fetch {
    path: String,
}

async fn serve(State(store): State<ShuffleStore>, Query(q): Query<Fetch>, mut request: Request) -> Response {
    let Some(path) = store.servable(&q.path) else {
        return (StatusCode::FORBIDDEN, format!("{} is not a shuffle file of this worker", q.path)).into_response();
    };
    let mapped = tokio::task::spawn_blocking(move || map_file(&path).map_err(|e| format!("{}: {e}", path.display()))).await;
    let bytes = match mapped {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return (StatusCode::NOT_FOUND, e).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let upgrade = request.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes() == PROTOCOL.as_bytes());
    if !upgrade {
        return ([(header::CONTENT_LENGTH, bytes.len().to_string())], axum::body::Body::from(bytes)).into_response();
    }
    let upgraded = hyper::upgrade::on(&mut request);
    let length = bytes.len();
    tokio::spawn(async move {
        let sent = async {
            let mut connection = TokioIo::new(upgraded.await.map_err(std::io::Error::other)?);
            connection.write_all(&bytes).await?;
            connection.shutdown().await
        };
        if let Err(e) = sent.await {
            // The reader reports the failure (it names this worker); nothing is kept here.
            tracing::debug!(path = %q.path, "shuffle file not sent whole: {e}");
        }
    });
    let headers = [(header::CONNECTION, "upgrade".to_string()), (header::UPGRADE, PROTOCOL.to_string())];
    (StatusCode::SWITCHING_PROTOCOLS, headers, [(LENGTH, length.to_string())]).into_response()
}

/// A whole shuffle file as bytes backed by a read-only memory map of it (read ahead
/// sequentially): sending it copies from the page cache to the socket once.
fn map_file(path: &Path) -> std::io::Result<bytes::Bytes> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(bytes::Bytes::new()); // an empty file cannot be mapped
    }
    // SAFETY: a shuffle file is written once, by the task that produced it, before its path is
    // reported; nothing writes or truncates it afterwards. Removing it (query release) unlinks
    // the name only: the mapping stays valid until the last response using it is sent.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    map.advise(memmap2::Advice::Sequential)?;
    Ok(bytes::Bytes::from_owner(map))
}

/// Copies the shuffle file `remote` of the worker whose shuffle service is at `addr` to
/// `local`.
pub(super) async fn fetch(addr: &str, remote: &str, local: &Path) -> Result<(), String> {
    let query = url::form_urlencoded::Serializer::new(String::new()).append_pair("path", remote).finish();
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(connected) => connected.map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        Err(_) => return Err(format!("no connection to {addr} within {CONNECT_TIMEOUT:?}")),
    };
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(socket)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection.with_upgrades());
    let request = hyper::Request::get(format!("/v1/shuffle?{query}"))
        .header(header::HOST, addr)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let length: u64 = response
        .headers()
        .get(LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| format!("{addr} answered the upgrade without a {LENGTH} header"))?;
    let upgraded = hyper::upgrade::on(response).await.map_err(|e| e.to_string())?;
    // The connection as it was opened above, and what was read of it past the answer's head.
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().map_err(|_| "the upgraded connection is not the TCP socket it was".to_string())?;
    let socket = parts.io.into_inner().into_std().map_err(|e| e.to_string())?;
    let (head, local): (bytes::Bytes, PathBuf) = (parts.read_buf, local.to_path_buf());
    tokio::task::spawn_blocking(move || receive(socket, &head, length, &local))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{addr}: {e}"))
}

/// Writes `head` and then the rest of the file's `length` bytes from `socket` into a new file
/// at `path`, moving them with splice(2) through a pipe.
fn receive(socket: std::net::TcpStream, head: &[u8], length: u64, path: &Path) -> std::io::Result<()> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(head)?;
    let mut left = length.checked_sub(head.len() as u64).ok_or_else(|| std::io::Error::other("more bytes than the file's length"))?;
    let (from_pipe, into_pipe) = nix::unistd::pipe()?;
    let _ = fcntl(&into_pipe, FcntlArg::F_SETPIPE_SZ(MOVE as i32)); // the default 64 KiB works too
    while left > 0 {
        let moved = match splice(socket.as_fd(), None, &into_pipe, None, (left as usize).min(MOVE), SpliceFFlags::SPLICE_F_MOVE) {
            Ok(moved) => moved,
            Err(nix::errno::Errno::EAGAIN) => {
                let message = format!("nothing received for {READ_TIMEOUT:?}, {left} bytes before the end of the file");
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message));
            }
            Err(e) => return Err(e.into()),
        };
        if moved == 0 {
            let message = format!("the connection closed {left} bytes before the end of the file");
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message));
        }
        let mut in_pipe = moved;
        while in_pipe > 0 {
            in_pipe -= splice(&from_pipe, None, file.as_fd(), None, in_pipe, SpliceFFlags::SPLICE_F_MOVE)?;
        }
        left -= moved as u64;
    }
    Ok(())
}
