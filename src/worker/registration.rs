//! A worker's registration with the scheduler and its heartbeat loop (the scheduler side is
//! `crate::scheduler::registry`).

use std::time::Duration;

use tokio::sync::watch;
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

/// Registers this worker with the scheduler at `scheduler_addr` and keeps it registered:
/// heartbeats every period, registering again whenever the scheduler does not know it (it
/// restarted, or marked the worker lost: then the tasks still running here, which run
/// elsewhere by now, are killed). Ends when `stop` fires, deregistering on the way out.
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
        Ok(e) => e.connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(10)),
        Err(e) => {
            state.send_replace(Registration::Pending(format!("cannot reach the scheduler at {scheduler_addr}: {e}")));
            return;
        }
    };
    // Connects lazily and reconnects by itself after the scheduler restarts.
    let mut client = MembershipClient::with_interceptor(endpoint.connect_lazy(), credentials.attach());
    let mut session: Option<String> = None;
    let mut last_problem = String::new();
    loop {
        let outcome = match &session {
            None => client
                .register(RegisterRequest { worker: Some(info.clone()) })
                .await
                .map(|r| Some(r.into_inner().scheduler_session)),
            Some(s) => client
                .heartbeat(HeartbeatRequest { instance_id: info.instance_id.clone(), scheduler_session: s.clone() })
                .await
                .map(|r| if r.into_inner().known { Some(s.clone()) } else { None }),
        };
        match outcome {
            Ok(Some(s)) => {
                if session.is_none() {
                    info!(scheduler = %scheduler_addr, "registered with the scheduler");
                }
                session = Some(s);
                last_problem.clear();
                state.send_if_modified(|r| std::mem::replace(r, Registration::Registered) != Registration::Registered);
            }
            Ok(None) => {
                info!(scheduler = %scheduler_addr, "the scheduler does not know this worker (restarted or marked it lost); registering again");
                let abandoned = tasks.as_ref().map(TaskService::abandon_all).unwrap_or_default();
                if abandoned > 0 {
                    warn!(
                        tasks = abandoned,
                        "tasks the scheduler gave up on this worker were killed (they run elsewhere)"
                    );
                }
                session = None;
                continue;
            }
            Err(status) => {
                let why = crate::logging::with_causes(status.message(), std::error::Error::source(&status));
                let problem = format!("waiting for the scheduler at {scheduler_addr} to accept registration: {why}");
                if problem != last_problem {
                    warn!("{problem}");
                    last_problem = problem.clone();
                }
                if session.is_some() {
                    // The next successful call must be a registration: the scheduler may be new.
                    session = None;
                }
                state.send_replace(Registration::Pending(problem));
            }
        }
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
