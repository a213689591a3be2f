//! A worker's registration with the scheduler and its heartbeats (the scheduler side is
//! `crate::scheduler::registry`, the datagrams' form `crate::membership`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::Message as _;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::membership::{HeartbeatKey, MAX_DATAGRAM};
use crate::proto::membership_client::MembershipClient;
use crate::proto::{DeregisterRequest, HeartbeatAck, HeartbeatRequest, RegisterRequest, RegisterResponse, WorkerInfo};
use crate::security::cluster::Credentials;
use crate::worker::task::TaskService;

/// What the worker's registration loop reports to the node's readiness.
#[derive(Debug, Clone, PartialEq)]
pub enum Registration {
    Pending(String),
    Registered,
}

/// How long a registration (or deregistration) may take before the worker tries again.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The heartbeat call has no timeout: HTTP/2 pings tell a scheduler that vanished without
/// closing the connection (host gone, network cut) from one that is merely quiet.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a heartbeat call ended.
enum Beats {
    /// The scheduler does not know this worker (it restarted, or marked the worker lost).
    Unknown,
    Failed(tonic::Status),
    Stopped,
}

/// Registers this worker with the scheduler at `scheduler_addr` and keeps it registered:
/// heartbeats every period (as datagrams when the scheduler takes them and they get through,
/// else on one open call), registering again whenever the scheduler does not know it (it
/// restarted, or marked the worker lost: then the tasks still running here, which run
/// elsewhere by now, are killed) or the call fails. Ends when `stop` fires, deregistering on
/// the way out.
pub async fn run_worker(
    info: WorkerInfo,
    scheduler_addr: String,
    tasks: Option<TaskService>,
    credentials: Credentials,
    state: watch::Sender<Registration>,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_millis(info.heartbeat_period_ms);
    let endpoint = match credentials.endpoint(&scheduler_addr) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT),
        Err(e) => {
            state.send_replace(Registration::Pending(format!("cannot reach the scheduler at {scheduler_addr}: {e}")));
            return;
        }
    };
    // A new connection for each registration: with datagram heartbeats it closes once the
    // worker is registered, so the scheduler holds no connection per idle worker.
    let client = || MembershipClient::with_interceptor(endpoint.connect_lazy(), credentials.attach());
    let mut last_problem = String::new();
    let mut datagrams_failed = String::new();
    loop {
        let mut membership = client();
        let registered =
            tokio::time::timeout(CALL_TIMEOUT, membership.register(RegisterRequest { worker: Some(info.clone()) }));
        let failure = match registered.await {
            Ok(Ok(response)) => {
                info!(scheduler = %scheduler_addr, "registered with the scheduler");
                last_problem.clear();
                state.send_if_modified(|r| std::mem::replace(r, Registration::Registered) != Registration::Registered);
                let response = response.into_inner();
                let mut ended = None;
                if let Some((socket, scheduler)) = datagram_socket(&scheduler_addr, &response).await {
                    drop(membership);
                    let key = HeartbeatKey::from_bytes(&response.heartbeat_key);
                    let lost_after = response.lost_after_missed_heartbeats;
                    let instance_id = &info.instance_id;
                    let beats = DatagramBeats { socket, scheduler, key, instance_id, period, lost_after };
                    match beats.run(&AtomicUsize::new(0), &mut stop).await {
                        DatagramsEnded::Stopped => break,
                        DatagramsEnded::Unknown => ended = Some(Beats::Unknown),
                        DatagramsEnded::Unanswered(why) => {
                            if why != datagrams_failed {
                                info!(scheduler = %scheduler_addr, "heartbeat datagrams are not answered ({why}): heartbeats go on a gRPC call instead");
                                datagrams_failed = why;
                            }
                        }
                    }
                    membership = client();
                }
                let beat = HeartbeatRequest {
                    instance_id: info.instance_id.clone(),
                    scheduler_session: response.scheduler_session,
                };
                let ended = match ended {
                    Some(ended) => ended,
                    None => heartbeats(membership, beat, period, &mut stop).await,
                };
                match ended {
                    Beats::Stopped => break,
                    Beats::Unknown => {
                        info!(scheduler = %scheduler_addr, "the scheduler does not know this worker (restarted or marked it lost); registering again");
                        let abandoned = tasks.as_ref().map(TaskService::abandon_all).unwrap_or_default();
                        if abandoned > 0 {
                            warn!(
                                tasks = abandoned,
                                "tasks the scheduler gave up on this worker were killed (they run elsewhere)"
                            );
                        }
                        continue;
                    }
                    Beats::Failed(status) => status,
                }
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
        };
        let why = crate::logging::with_causes(failure.message(), std::error::Error::source(&failure));
        let problem = format!("waiting for the scheduler at {scheduler_addr} to accept registration: {why}");
        if problem != last_problem {
            warn!("{problem}");
            last_problem = problem.clone();
        }
        state.send_replace(Registration::Pending(problem));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        client().deregister(DeregisterRequest { instance_id: info.instance_id.clone() }),
    )
    .await;
}

/// A UDP socket and the scheduler's heartbeat port, when the registration names one (on the
/// host of `scheduler_addr`, the address the worker registered at). None sends the heartbeats
/// on the gRPC call.
async fn datagram_socket(scheduler_addr: &str, registration: &RegisterResponse) -> Option<(UdpSocket, SocketAddr)> {
    let port = u16::try_from(registration.heartbeat_port).ok().filter(|p| *p != 0)?;
    if registration.heartbeat_key.is_empty() {
        return None;
    }
    let host = scheduler_addr.rsplit_once(':').map_or(scheduler_addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let target = match tokio::net::lookup_host((host, port)).await.ok().and_then(|mut a| a.next()) {
        Some(target) => target,
        None => {
            warn!(scheduler = %scheduler_addr, "cannot resolve the scheduler's host for heartbeat datagrams; heartbeats go on a gRPC call");
            return None;
        }
    };
    let unspecified: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Not connected: a scheduler on a host of several addresses may answer from another one
    // than the worker sent to; its answers are known by their MAC, not by their source.
    let socket = UdpSocket::bind(unspecified).await.ok()?;
    Some((socket, target))
}

/// How datagram heartbeats ended.
pub enum DatagramsEnded {
    /// The scheduler answered, authenticated, that it does not know the worker: register again.
    Unknown,
    /// No authenticated answer came in time, or the scheduler has no key for this worker (it
    /// restarted, or the answer was forged): the gRPC call decides.
    Unanswered(String),
    Stopped,
}

/// One registration's heartbeat datagrams.
pub struct DatagramBeats<'a> {
    pub socket: UdpSocket,
    /// The scheduler's heartbeat port.
    pub scheduler: SocketAddr,
    pub key: HeartbeatKey,
    pub instance_id: &'a str,
    pub period: Duration,
    /// The scheduler marks a worker lost after this many periods without a heartbeat.
    pub lost_after: u32,
}

impl DatagramBeats<'_> {
    /// Sends a heartbeat at once and then every period (counting them in `sent`) until the
    /// scheduler does not know the worker, answers stop coming or `stop` fires. The
    /// datagrams give up half a period before the scheduler would mark the worker lost, so
    /// that the call's first heartbeat arrives in time.
    pub async fn run(&self, sent: &AtomicUsize, stop: &mut watch::Receiver<bool>) -> DatagramsEnded {
        let patience = self.period * self.lost_after.saturating_sub(1) + self.period / 2;
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut answered = tokio::time::Instant::now();
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    sequence += 1;
                    // A send that fails (no route yet, a full buffer) is a lost datagram.
                    let beat = self.key.beat(self.instance_id, sequence);
                    if self.socket.try_send_to(&beat, self.scheduler).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                received = self.socket.recv_from(&mut buf) => {
                    let n = match received {
                        Ok((n, _)) => n,
                        Err(e) => return DatagramsEnded::Unanswered(format!("the scheduler's heartbeat port: {e}")),
                    };
                    let Ok(ack) = HeartbeatAck::decode(&buf[..n]) else { continue };
                    if ack.instance_id != self.instance_id {
                        continue;
                    }
                    if !self.key.verify_ack(&ack) {
                        if !ack.known && ack.mac.is_empty() {
                            return DatagramsEnded::Unanswered("the scheduler has no key for this worker".into());
                        }
                        continue; // forged
                    }
                    if !ack.known {
                        return DatagramsEnded::Unknown;
                    }
                    answered = tokio::time::Instant::now();
                }
                _ = tokio::time::sleep_until(answered + patience) => {
                    return DatagramsEnded::Unanswered(format!("no answer for {} ms", patience.as_millis()));
                }
                _ = stop.wait_for(|s| *s) => return DatagramsEnded::Stopped,
            }
        }
    }
}

/// Sends `beat` every `period` on one heartbeat call until the scheduler answers (it does
/// not know the worker), the call fails or `stop` fires.
async fn heartbeats<S>(
    mut client: MembershipClient<S>,
    beat: HeartbeatRequest,
    period: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Beats
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let (sender, beats) = mpsc::channel(4);
    let call = client.heartbeat(ReceiverStream::new(beats));
    tokio::pin!(call);
    // The first beat goes at once (the call may take over from datagrams that went
    // unanswered). After a stall (the process was stopped) one beat goes at once: the
    // scheduler says whether it marked the worker lost meanwhile.
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ended = &mut call => return match ended {
                Ok(response) if !response.get_ref().known => Beats::Unknown,
                Ok(_) => Beats::Failed(tonic::Status::unavailable("the scheduler ended the heartbeat call")),
                Err(status) => Beats::Failed(status),
            },
            // A full queue means the connection is backed up: that beat is skipped.
            _ = tick.tick() => { let _ = sender.try_send(beat.clone()); }
            _ = stop.wait_for(|s| *s) => return Beats::Stopped,
        }
    }
}
