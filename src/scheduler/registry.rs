//! The scheduler's live set of workers: registrations, heartbeats, and workers marked lost
//! (the membership service workers call, see `crate::worker::registration`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::proto::membership_server::Membership;
use crate::proto::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, ListWorkersRequest,
    ListWorkersResponse, RegisterRequest, RegisterResponse, WorkerInfo, WorkerState, WorkerStatus,
};
use crate::security::cluster::Credentials;

/// How long the scheduler waits for a worker's task service to answer a health check.
const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(3);

struct Member {
    info: WorkerInfo,
    alive: bool,
    /// Being released to the scaler: alive, but given no new work.
    draining: bool,
    last_heartbeat: Instant,
    registrations: u64,
}

/// The scheduler's view of its workers.
#[derive(Clone)]
pub struct Registry {
    instance_id: String,
    cluster_id: String,
    /// Changes on every scheduler start; heartbeats from an earlier session mean the worker
    /// must register again.
    session: String,
    lost_after: u32,
    members: Arc<Mutex<BTreeMap<String, Member>>>,
    live: watch::Sender<usize>,
    /// Set when the node stops: open heartbeat calls end, so the server can stop.
    stopping: watch::Sender<bool>,
    /// How the scheduler reaches a registering worker's task service (`[internal]`).
    credentials: Credentials,
}

impl Registry {
    pub fn new(instance_id: &str, cluster_id: &str, lost_after: u32, credentials: Credentials) -> Self {
        Registry {
            instance_id: instance_id.into(),
            cluster_id: cluster_id.into(),
            session: uuid::Uuid::new_v4().to_string(),
            lost_after,
            members: Arc::default(),
            live: watch::channel(0).0,
            stopping: watch::channel(false).0,
            credentials,
        }
    }

    /// Ends the open heartbeat calls (the node stops; a server waits for its calls to end).
    pub fn stop_heartbeats(&self) {
        self.stopping.send_replace(true);
    }

    /// The number of live workers, updated as it changes.
    pub fn live_workers(&self) -> watch::Receiver<usize> {
        self.live.subscribe()
    }

    /// The live workers that take new work (not being released), in a stable order.
    pub fn live_worker_infos(&self) -> Vec<WorkerInfo> {
        self.members.lock().unwrap().values().filter(|m| m.alive && !m.draining).map(|m| m.info.clone()).collect()
    }

    /// Whether `instance_id` is alive (heartbeating), taking new work or being released.
    pub fn is_alive(&self, instance_id: &str) -> bool {
        self.members.lock().unwrap().get(instance_id).is_some_and(|m| m.alive)
    }

    /// Stops (or resumes, `draining = false`) giving new work to these workers while the
    /// scaler releases them.
    pub fn set_draining(&self, instance_ids: &[String], draining: bool) {
        let mut members = self.members.lock().unwrap();
        for id in instance_ids {
            if let Some(m) = members.get_mut(id) {
                m.draining = draining;
            }
        }
        self.publish(&members);
    }

    /// Marks a worker lost at once (its task service stopped answering). If it is in fact
    /// alive, its next heartbeat is refused and it registers again, probed anew.
    pub fn suspect(&self, instance_id: &str) {
        let mut members = self.members.lock().unwrap();
        if let Some(m) = members.get_mut(instance_id)
            && m.alive
        {
            m.alive = false;
            warn!(worker = %instance_id, "worker lost: its task service stopped answering");
        }
        self.publish(&members);
    }

    /// Marks workers lost after `lost_after` heartbeat periods of silence. Runs until dropped.
    pub async fn watch_heartbeats(self) {
        const TICK: Duration = Duration::from_millis(200);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            // A scheduler that did not run for a while (starved of CPU, stopped) received no
            // heartbeats meanwhile: that time does not count against its workers.
            let stalled = last.elapsed().saturating_sub(TICK * 2);
            last = tokio::time::Instant::now();
            let mut members = self.members.lock().unwrap();
            if !stalled.is_zero() {
                warn!(
                    stalled_ms = stalled.as_millis() as u64,
                    "the scheduler did not run for a while; its workers are given that time back"
                );
                for m in members.values_mut() {
                    m.last_heartbeat += stalled;
                }
            }
            for (id, m) in members.iter_mut() {
                let period = Duration::from_millis(m.info.heartbeat_period_ms.max(1));
                let silent = m.last_heartbeat.elapsed();
                if m.alive && silent > period * self.lost_after {
                    m.alive = false;
                    warn!(worker = %id, silent_ms = silent.as_millis() as u64, "worker lost: no heartbeat for {} periods", self.lost_after);
                }
            }
            self.publish(&members);
        }
    }

    /// One heartbeat: whether the scheduler knows the worker (this session, and alive).
    fn beat(&self, hb: &HeartbeatRequest) -> bool {
        if hb.scheduler_session != self.session {
            return false;
        }
        match self.members.lock().unwrap().get_mut(&hb.instance_id) {
            // A worker marked lost registers again (and is probed again) to come back.
            Some(m) if m.alive => {
                m.last_heartbeat = Instant::now();
                true
            }
            _ => false,
        }
    }

    fn publish(&self, members: &BTreeMap<String, Member>) {
        let live = members.values().filter(|m| m.alive && !m.draining).count();
        self.live.send_if_modified(|n| std::mem::replace(n, live) != live);
    }

    fn check_compatible(&self, w: &WorkerInfo) -> Result<(), Status> {
        if w.instance_id.is_empty() {
            return Err(Status::invalid_argument("a worker must have an instance_id"));
        }
        if w.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "worker `{}` belongs to cluster `{}` but this scheduler runs cluster `{}`: make `cluster_id` equal on both",
                w.instance_id, w.cluster_id, self.cluster_id
            )));
        }
        if w.version != crate::VERSION {
            return Err(Status::failed_precondition(format!(
                "worker `{}` runs polars-node {} but the scheduler runs {}: run the same version on every node",
                w.instance_id,
                w.version,
                crate::VERSION
            )));
        }
        Ok(())
    }
}

/// Asks the worker's task service for its health at the advertised address, so that a
/// worker advertising an address the scheduler cannot reach is refused at once rather than
/// failing queries later.
async fn probe(addr: &str, credentials: &Credentials) -> Result<(), String> {
    let endpoint = credentials.endpoint(addr)?.connect_timeout(REACHABILITY_TIMEOUT).timeout(REACHABILITY_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| crate::logging::error_chain(&e))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(())
}

#[tonic::async_trait]
impl Membership for Registry {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let info = request.into_inner().worker.ok_or_else(|| Status::invalid_argument("missing worker"))?;
        self.check_compatible(&info)?;
        if let Err(e) = probe(&info.task_addr, &self.credentials).await {
            warn!(worker = %info.instance_id, addr = %info.task_addr, "refusing registration: task service unreachable: {e}");
            return Err(Status::failed_precondition(format!(
                "the scheduler cannot reach worker `{}`'s task service at {} ({e}): set `worker.task_service.public_addr` \
                 to an address the scheduler can connect to",
                info.instance_id, info.task_addr
            )));
        }
        let mut members = self.members.lock().unwrap();
        let member = members.entry(info.instance_id.clone()).or_insert_with(|| Member {
            info: info.clone(),
            alive: false,
            draining: false,
            last_heartbeat: Instant::now(),
            registrations: 0,
        });
        let was_alive = member.alive;
        member.info = info.clone();
        member.alive = true;
        member.draining = false;
        member.last_heartbeat = Instant::now();
        member.registrations += 1;
        info!(
            worker = %info.instance_id, task = %info.task_addr, shuffle = info.shuffle_addr.as_deref().unwrap_or("-"),
            cpus = info.cpus, memory_bytes = info.memory_bytes, rejoined = member.registrations > 1, was_alive,
            "worker registered"
        );
        self.publish(&members);
        Ok(Response::new(RegisterResponse {
            scheduler_instance_id: self.instance_id.clone(),
            scheduler_session: self.session.clone(),
            lost_after_missed_heartbeats: self.lost_after,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let mut beats = request.into_inner();
        let mut stopping = self.stopping.subscribe();
        loop {
            let hb = tokio::select! {
                hb = beats.message() => hb?,
                _ = stopping.wait_for(|s| *s) => return Err(Status::unavailable("the scheduler is stopping")),
            };
            match hb {
                Some(hb) if self.beat(&hb) => {}
                Some(_) => return Ok(Response::new(HeartbeatResponse { known: false })),
                // The worker ended its heartbeats (it stops, and deregisters on its way out).
                None => return Ok(Response::new(HeartbeatResponse { known: true })),
            }
        }
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let id = request.into_inner().instance_id;
        let mut members = self.members.lock().unwrap();
        if members.remove(&id).is_some() {
            info!(worker = %id, "worker left");
        }
        self.publish(&members);
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let members = self.members.lock().unwrap();
        let workers = members
            .values()
            .map(|m| WorkerStatus {
                info: Some(m.info.clone()),
                state: if m.alive { WorkerState::Alive } else { WorkerState::Lost } as i32,
                millis_since_heartbeat: m.last_heartbeat.elapsed().as_millis() as u64,
                registrations: m.registrations,
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { scheduler_instance_id: self.instance_id.clone(), workers }))
    }
}
