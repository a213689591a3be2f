//! How a shuffle file travels from the worker that wrote it to a worker that reads it.
//!
//! The reader asks `GET /v1/shuffle?path=FILE` with `Upgrade: polars-node-shuffle`. The
//! shuffle service answers `101 Switching Protocols` with the file's length in a header and
//! sends the file on the upgraded connection with sendfile(2); the reader moves the bytes from
//! its socket into its copy of the file with splice(2) through a pipe. Neither side copies the
//! bytes through a buffer of its own: on loopback this moves a file at about twice the rate of
//! an HTTP body received and written out (docs/benchmarks.md). A plain GET (curl, a browser)
//! gets the file as an ordinary HTTP body.
//!
//! Under a cluster CA (`internal.tls`) connections are TLS both ways and a fetch is a plain GET
//! whose body is written out: the bytes must pass through the TLS layer, so neither sendfile
//! nor splice applies.
//!
//! The service answers gRPC health checks on the same port, so it tells HTTP/2 connections
//! from HTTP/1 ones itself (hyper-util's automatic builder wraps the socket in a type of its
//! own, and the upgraded connection could no longer be taken back as the TCP socket).

use std::future::Future;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::security::cluster::{self, ClusterTls, Credentials};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};
use tokio::io::{AsyncWriteExt as _, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::ShuffleStore;

/// The protocol a fetch upgrades its connection to, and the header with the file's length.
const PROTOCOL: &str = "polars-node-shuffle";
const LENGTH: &str = "polars-node-shuffle-length";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that takes or sends nothing for this long is taken as gone (a process that died
/// closes its connections; this covers a host that vanished).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes moved per splice call, and the pipe's size: with the default 64 KiB pipe a fetch
/// runs at about half the rate.
const MOVE: usize = 1 << 20;
/// How an HTTP/2 connection (gRPC health checks) starts.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The shuffle service's HTTP routes: `GET /v1/shuffle?path=FILE`, a file of this worker's
/// shuffle location, and nothing else.
pub fn router(store: ShuffleStore) -> axum::Router {
    axum::Router::new().route("/v1/shuffle", axum::routing::get(send)).with_state(store)
}

/// Serves `app` on `listener`, HTTP/1 (with upgrades) and HTTP/2, until `shutdown` completes;
/// then lets open connections finish what they are answering. With `tls`, every connection
/// is TLS with a client certificate of the cluster CA.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let service = TowerToHyperService::new(app);
    let (stop, stopped) = watch::channel(false);
    // Every connection holds a sender: when the last is dropped, all have finished.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of descriptors and the like: keep serving those already open.
                    tracing::warn!("shuffle service cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (service, stopped, open, tls) = (service.clone(), stopped.clone(), open.clone(), tls.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(socket, tls, service, stopped).await {
                tracing::debug!("shuffle service connection: {e}");
            }
            drop(open);
        });
    }
    let _ = stop.send(true);
    drop(open);
    let _ = all_closed.recv().await;
}

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

async fn connection(
    socket: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: TowerToHyperService<axum::Router>,
    stopped: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    socket.set_nodelay(true)?;
    let Some(acceptor) = tls else {
        // A client that sends nothing, or half a preface, is let go rather than polled forever.
        let http2 = tokio::time::timeout(CONNECT_TIMEOUT, speaks_http2(&socket))
            .await
            .map_err(|_| "no request within the connect timeout")??;
        return serve_http(TokioIo::new(socket), http2, service, stopped).await;
    };
    let tls = tokio::time::timeout(cluster::HANDSHAKE_TIMEOUT, acceptor.accept(socket))
        .await
        .map_err(|_| "no TLS handshake within its timeout")??;
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    serve_http(TokioIo::new(tls), http2, service, stopped).await
}

async fn serve_http<I>(
    io: TokioIo<I>,
    http2: bool,
    service: TowerToHyperService<axum::Router>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if http2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
        tokio::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => return Ok(served?),
            _ = stopped.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
        }
        Ok(connection.await?)
    } else {
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => return Ok(served?),
            _ = stopped.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
        }
        Ok(connection.await?)
    }
}

/// Whether the client opened with the HTTP/2 preface (read without taking it off the socket).
async fn speaks_http2(socket: &TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; HTTP2_PREFACE.len()];
    loop {
        let n = socket.peek(&mut head).await?;
        if n == 0 || head[..n] != HTTP2_PREFACE[..n] {
            return Ok(false); // HTTP/1 (or a closed connection, which HTTP/1 serving ends)
        }
        if n == HTTP2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(1)).await; // the rest of the preface is on its way
    }
}

#[derive(serde::Deserialize)]
struct Fetch {
    path: String,
}

async fn send(State(store): State<ShuffleStore>, Query(q): Query<Fetch>, mut request: Request) -> Response {
    if let Some(token) = &store.credentials().token
        && !token.admits(request.headers().get(cluster::HEADER).map(|v| v.as_bytes()))
    {
        return (
            StatusCode::UNAUTHORIZED,
            "this shuffle service serves only nodes of the cluster: send the cluster token (internal.token_file)",
        )
            .into_response();
    }
    let servable = {
        let (store, path) = (store.clone(), q.path.clone());
        tokio::task::spawn_blocking(move || store.servable(&path)).await.map_err(std::io::Error::other).and_then(|p| p)
    };
    let path = match servable {
        Ok(path) => path,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (StatusCode::NOT_FOUND, e.to_string()).into_response();
        }
        Err(e) => return (StatusCode::FORBIDDEN, e.to_string()).into_response(),
    };
    // Over TLS the file goes as a body: sendfile would bypass the encryption.
    let upgrade = request.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes() == PROTOCOL.as_bytes())
        && store.credentials().tls.is_none();
    if !upgrade {
        let mapped =
            tokio::task::spawn_blocking(move || map_file(&path).map_err(|e| format!("{}: {e}", path.display()))).await;
        return match mapped {
            Ok(Ok(bytes)) => {
                ([(header::CONTENT_LENGTH, bytes.len().to_string())], axum::body::Body::from(bytes)).into_response()
            }
            Ok(Err(e)) => (StatusCode::NOT_FOUND, e).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    }
    // Opened before answering: a missing file is an HTTP error, and removing the file (query
    // release) while it is sent unlinks the name only.
    let opened = match tokio::fs::File::open(&path).await {
        Ok(file) => file.into_std().await,
        Err(e) => return (StatusCode::NOT_FOUND, format!("{}: {e}", path.display())).into_response(),
    };
    let length = match opened.metadata() {
        Ok(meta) => meta.len(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", path.display())).into_response(),
    };
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let sent = async {
            let upgraded = upgraded.await.map_err(std::io::Error::other)?;
            let parts = upgraded
                .downcast::<TokioIo<TcpStream>>()
                .map_err(|_| std::io::Error::other("the upgraded connection is not a TCP socket"))?;
            send_file(parts.io.into_inner(), &opened, length).await
        };
        if let Err(e) = sent.await {
            // The reader reports the failure (it names this worker); nothing is kept here.
            tracing::debug!(path = %q.path, "shuffle file not sent whole: {e}");
        }
    });
    let headers = [(header::CONNECTION, "upgrade".to_string()), (header::UPGRADE, PROTOCOL.to_string())];
    (StatusCode::SWITCHING_PROTOCOLS, headers, [(LENGTH, length.to_string())]).into_response()
}

/// Sends `length` bytes of `file` on `socket` with sendfile(2), as fast as the socket takes
/// them (no thread waits on a full socket), and closes the connection.
async fn send_file(mut socket: TcpStream, file: &std::fs::File, length: u64) -> std::io::Result<()> {
    let mut offset: i64 = 0;
    while (offset as u64) < length {
        let want = (length - offset as u64).min(1 << 30) as usize;
        let moved = socket.async_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(socket.as_fd(), file.as_fd(), Some(&mut offset), want)
                .map_err(std::io::Error::from)
        });
        match tokio::time::timeout(STALL_TIMEOUT, moved).await {
            Ok(Ok(0)) => {
                return Err(std::io::Error::other(format!("the file ended {} bytes early", length - offset as u64)));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the reader took nothing")),
        }
    }
    socket.shutdown().await
}

/// A whole shuffle file as bytes backed by a read-only memory map of it (read ahead
/// sequentially): sending it as a body copies from the page cache to the socket once.
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
pub(super) async fn fetch(addr: &str, remote: &str, local: &Path, credentials: &Credentials) -> Result<(), String> {
    let query = url::form_urlencoded::Serializer::new(String::new()).append_pair("path", remote).finish();
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(connected) => connected.map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        Err(_) => return Err(format!("no connection to {addr} within {CONNECT_TIMEOUT:?}")),
    };
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut request = hyper::Request::get(format!("/v1/shuffle?{query}")).header(header::HOST, addr);
    if let Some(token) = &credentials.token {
        request = request.header(cluster::HEADER, token.as_str());
    }
    if let Some(tls) = &credentials.tls {
        return fetch_over_tls(socket, addr, request, tls, local).await;
    }
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(socket))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection.with_upgrades());
    let request = request
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = match tokio::time::timeout(STALL_TIMEOUT, sender.send_request(request)).await {
        Ok(answered) => answered.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("no answer within {STALL_TIMEOUT:?}")),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let length: u64 = response
        .headers()
        .get(LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| format!("the answer to the upgrade has no {LENGTH} header"))?;
    let upgraded = hyper::upgrade::on(response).await.map_err(|e| e.to_string())?;
    // The connection as it was opened above, and what was read of it past the answer's head.
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| "the upgraded connection is not the TCP socket it was".to_string())?;
    let socket = parts.io.into_inner().into_std().map_err(|e| e.to_string())?;
    let (head, local): (bytes::Bytes, PathBuf) = (parts.read_buf, local.to_path_buf());
    tokio::task::spawn_blocking(move || receive(socket, &head, length, &local))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// A fetch under the cluster CA: TLS with this node's certificate, a plain GET, the body
/// written to `local` as it arrives.
async fn fetch_over_tls(
    socket: TcpStream,
    addr: &str,
    request: hyper::http::request::Builder,
    tls: &ClusterTls,
    local: &Path,
) -> Result<(), String> {
    let name = ClusterTls::server_name(addr)?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let socket = match tokio::time::timeout(cluster::HANDSHAKE_TIMEOUT, connector.connect(name, socket)).await {
        Ok(connected) => connected.map_err(|e| format!("TLS with {addr}: {e}"))?,
        Err(_) => return Err(format!("no TLS handshake with {addr} within {:?}", cluster::HANDSHAKE_TIMEOUT)),
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(socket))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = request.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| e.to_string())?;
    let response = match tokio::time::timeout(STALL_TIMEOUT, sender.send_request(request)).await {
        Ok(answered) => answered.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("no answer within {STALL_TIMEOUT:?}")),
    };
    let status = response.status();
    let length: Option<u64> =
        response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let mut file =
        tokio::io::BufWriter::with_capacity(MOVE, tokio::fs::File::create(local).await.map_err(|e| e.to_string())?);
    let mut received = 0u64;
    loop {
        let frame = match tokio::time::timeout(STALL_TIMEOUT, body.frame()).await {
            Ok(Some(frame)) => frame.map_err(|e| format!("{e} after {received} bytes"))?,
            Ok(None) => break,
            Err(_) => return Err(format!("nothing received for {STALL_TIMEOUT:?} after {received} bytes")),
        };
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            file.write_all(&data).await.map_err(|e| e.to_string())?;
        }
    }
    if length.is_some_and(|l| l != received) {
        return Err(format!("the connection closed after {received} of {} bytes", length.unwrap_or_default()));
    }
    file.flush().await.map_err(|e| e.to_string())
}

/// Writes `head` and then the rest of the file's `length` bytes from `socket` into a new file
/// at `path`, moving them with splice(2) through a pipe.
fn receive(socket: std::net::TcpStream, head: &[u8], length: u64, path: &Path) -> std::io::Result<()> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(STALL_TIMEOUT))?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(head)?;
    let mut left = length
        .checked_sub(head.len() as u64)
        .ok_or_else(|| std::io::Error::other("more bytes than the file's length"))?;
    let (from_pipe, into_pipe) = nix::unistd::pipe()?;
    if let Err(e) = fcntl(&into_pipe, FcntlArg::F_SETPIPE_SZ(MOVE as i32)) {
        // Past /proc/sys/fs/pipe-max-size for an unprivileged user: slower, still correct.
        tracing::debug!("shuffle fetch keeps the default pipe size: {e}");
    }
    while left > 0 {
        let moved = match splice(
            socket.as_fd(),
            None,
            &into_pipe,
            None,
            (left as usize).min(MOVE),
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(moved) => moved,
            Err(nix::errno::Errno::EAGAIN) => {
                let message =
                    format!("nothing received for {STALL_TIMEOUT:?}, {left} bytes before the end of the file");
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
