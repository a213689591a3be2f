//! A worker's registration with the scheduler and its heartbeat loop (the scheduler side is
//! `crate::scheduler::registry`).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::proto::membership_client::MembershipClient;
use crate::proto::{DeregisterRequest, HeartbeatRequest, RegisterRequest, WorkerInfo};
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
/// heartbeats every period on one open call, registering again whenever the scheduler does
/// not know it (it restarted, or marked the worker lost: then the tasks still running here,
/// which run elsewhere by now, are killed) or the call fails. Ends when `stop` fires,
/// deregistering on the way out.
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
    // Connects lazily and reconnects by itself after the scheduler restarts.
    let mut client = MembershipClient::with_interceptor(endpoint.connect_lazy(), credentials.attach());
    let mut last_problem = String::new();
    loop {
        let registered =
            tokio::time::timeout(CALL_TIMEOUT, client.register(RegisterRequest { worker: Some(info.clone()) }));
        let failure = match registered.await {
            Ok(Ok(response)) => {
                info!(scheduler = %scheduler_addr, "registered with the scheduler");
                last_problem.clear();
                state.send_if_modified(|r| std::mem::replace(r, Registration::Registered) != Registration::Registered);
                let beat = HeartbeatRequest {
                    instance_id: info.instance_id.clone(),
                    scheduler_session: response.into_inner().scheduler_session,
                };
                match heartbeats(client.clone(), beat, period, &mut stop).await {
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
        client.deregister(DeregisterRequest { instance_id: info.instance_id.clone() }),
    )
    .await;
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
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // After a stall (the process was stopped) one beat goes at once: the scheduler says
    // whether it marked the worker lost meanwhile.
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
