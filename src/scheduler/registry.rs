//! The scheduler's live set of workers: registrations, heartbeats, and workers marked lost
//! (the membership service workers call, see `crate::worker::registration`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use prost::Message as _;
use std::os::fd::AsFd;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::membership::{self, HeartbeatKey, MAX_DATAGRAM};
use crate::proto::membership_server::Membership;
use crate::proto::{
    DeregisterRequest, DeregisterResponse, HeartbeatDatagram, HeartbeatRequest, HeartbeatResponse, ListWorkersRequest,
    ListWorkersResponse, RegisterRequest, RegisterResponse, WorkerInfo, WorkerState, WorkerStatus,
};
use crate::security::cluster::Credentials;

/// The receive buffer asked for the heartbeat socket (the kernel caps it at net.core.rmem_max).
const HEARTBEAT_RECEIVE_BUFFER: usize = 8 << 20;
/// How long heartbeat datagrams gather in the socket's buffer between reads. The buffer must
/// hold what arrives meanwhile: at Linux's default 208 KiB, about 250 datagrams, 2 ms of
/// 100,000 workers beating every second.
const HEARTBEAT_BATCH_PAUSE: Duration = Duration::from_millis(2);

/// How long the scheduler waits for a worker's task service to answer a health check.
const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(3);

struct Member {
    info: WorkerInfo,
    alive: bool,
    /// Being released to the scaler: alive, but given no new work.
    draining: bool,
    last_heartbeat: Instant,
    registrations: u64,
    /// The key of this registration's heartbeat datagrams.
    key: HeartbeatKey,
    /// The highest datagram sequence accepted in this registration (replays are older).
    sequence: u64,
    /// Whether the last heartbeat came as a datagram.
    by_datagram: bool,
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
    /// Where workers send heartbeat datagrams (0 until the scheduler takes them).
    heartbeat_port: Arc<AtomicU16>,
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
            heartbeat_port: Arc::default(),
        }
    }

    /// Answers heartbeat datagrams on `socket` on a thread of their own until the node stops;
    /// registrations from now on tell workers to send them to `advertised_port` (the worker
    /// service's port as workers reach it). A thread of its own reads the socket on time,
    /// however busy the async runtime is (registrations, queries): a socket read late overflows
    /// its buffer with thousands of workers, and lost heartbeats send workers back to
    /// registering.
    pub fn serve_heartbeat_datagrams(&self, socket: std::net::UdpSocket, advertised_port: u16) -> std::io::Result<()> {
        socket.set_nonblocking(true)?;
        // As large as the host allows (net.core.rmem_max): bursts of heartbeats wait there.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(HEARTBEAT_RECEIVE_BUFFER);
        self.heartbeat_port.store(advertised_port, Ordering::Relaxed);
        let registry = self.clone();
        std::thread::Builder::new().name("heartbeats".into()).spawn(move || {
            let mut buf = [0u8; MAX_DATAGRAM];
            while !*registry.stopping.borrow() {
                // Until a datagram waits (or a while passes, to look at `stopping`).
                let mut waiting = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut waiting, PollTimeout::from(200u8)), Ok(1..)) {
                    continue;
                }
                // Every datagram waiting, then a pause in which the next ones gather: one
                // wake-up serves many heartbeats (a wake-up per heartbeat cost more than the
                // heartbeat itself), and the answers leave at most a pause later.
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    if let Some(answer) = registry.datagram(&buf[..n]) {
                        // A failed send loses the answer, as the network might.
                        let _ = socket.send_to(&answer, from);
                    }
                }
                std::thread::sleep(HEARTBEAT_BATCH_PAUSE);
            }
        })?;
        Ok(())
    }

    /// One heartbeat datagram, and the answer to send back (none to a forged or replayed one).
    fn datagram(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let beat = HeartbeatDatagram::decode(bytes).ok()?;
        let mut members = self.members.lock().unwrap();
        let Some(m) = members.get_mut(&beat.instance_id) else {
            // Not registered here (this scheduler restarted): the worker asks over its call.
            return Some(membership::unauthenticated_unknown(&beat.instance_id, beat.sequence));
        };
        if beat.sequence <= m.sequence || !m.key.verify_beat(&beat) {
            return None;
        }
        m.sequence = beat.sequence;
        // A worker marked lost registers again (and is probed again) to come back.
        if m.alive {
            m.last_heartbeat = Instant::now();
            m.by_datagram = true;
        }
        Some(m.key.ack(&beat.instance_id, beat.sequence, m.alive))
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
            let now = Instant::now();
            for (id, m) in members.iter_mut().filter(|(_, m)| m.alive) {
                let period = Duration::from_millis(m.info.heartbeat_period_ms.max(1));
                let silent = now.saturating_duration_since(m.last_heartbeat);
                if silent > period * self.lost_after {
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
                m.by_datagram = false;
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
        let (key_bytes, key) = HeartbeatKey::generate();
        let mut members = self.members.lock().unwrap();
        let member = members.entry(info.instance_id.clone()).or_insert_with(|| Member {
            info: info.clone(),
            alive: false,
            draining: false,
            last_heartbeat: Instant::now(),
            registrations: 0,
            key: key.clone(),
            sequence: 0,
            by_datagram: false,
        });
        let was_alive = member.alive;
        member.info = info.clone();
        member.alive = true;
        member.draining = false;
        member.last_heartbeat = Instant::now();
        member.registrations += 1;
        member.key = key;
        member.sequence = 0;
        member.by_datagram = false;
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
            heartbeat_port: self.heartbeat_port.load(Ordering::Relaxed).into(),
            heartbeat_key: key_bytes,
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
                heartbeat_datagrams: m.by_datagram,
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { scheduler_instance_id: self.instance_id.clone(), workers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HeartbeatAck;

    /// A registry holding worker `w1` as a registration leaves it, and w1's key.
    fn registered() -> (Registry, HeartbeatKey) {
        let registry = Registry::new("scheduler", "cluster", 3, Credentials::default());
        let (_, key) = HeartbeatKey::generate();
        let member = Member {
            info: WorkerInfo { instance_id: "w1".into(), heartbeat_period_ms: 1000, ..Default::default() },
            alive: true,
            draining: false,
            last_heartbeat: Instant::now() - Duration::from_secs(2),
            registrations: 1,
            key: key.clone(),
            sequence: 0,
            by_datagram: false,
        };
        registry.members.lock().unwrap().insert("w1".into(), member);
        (registry, key)
    }

    fn answer(registry: &Registry, datagram: &[u8]) -> Option<HeartbeatAck> {
        registry.datagram(datagram).map(|a| HeartbeatAck::decode(a.as_slice()).unwrap())
    }

    fn since_heartbeat(registry: &Registry) -> Duration {
        registry.members.lock().unwrap()["w1"].last_heartbeat.elapsed()
    }

    #[test]
    fn a_datagram_heartbeat_counts_once_and_only_with_the_registrations_key() {
        let (registry, key) = registered();
        let (_, stranger) = HeartbeatKey::generate();
        assert!(answer(&registry, &stranger.beat("w1", 1)).is_none(), "forged: no answer");
        assert!(since_heartbeat(&registry) >= Duration::from_secs(2), "and no heartbeat");

        let ack = answer(&registry, &key.beat("w1", 1)).unwrap();
        assert!(ack.known && key.verify_ack(&ack) && ack.sequence == 1);
        assert!(since_heartbeat(&registry) < Duration::from_secs(1));
        assert!(registry.members.lock().unwrap()["w1"].by_datagram);

        // A replayed (or reordered) datagram is ignored; a later one counts.
        registry.members.lock().unwrap().get_mut("w1").unwrap().last_heartbeat -= Duration::from_secs(2);
        assert!(answer(&registry, &key.beat("w1", 1)).is_none());
        assert!(since_heartbeat(&registry) >= Duration::from_secs(2));
        assert!(answer(&registry, &key.beat("w1", 5)).unwrap().known);
        assert!(answer(&registry, &key.beat("w1", 3)).is_none());
        assert!(answer(&registry, b"\xff\xff not a datagram").is_none());
    }

    #[test]
    fn a_worker_marked_lost_or_unknown_is_told_to_register_again() {
        let (registry, key) = registered();
        registry.suspect("w1");
        let ack = answer(&registry, &key.beat("w1", 1)).unwrap();
        assert!(!ack.known && key.verify_ack(&ack), "authenticated: the worker registers again");
        assert!(!registry.is_alive("w1"), "a datagram does not bring a lost worker back");
        // A worker this scheduler never registered (it restarted) gets an answer it cannot
        // trust, which only makes it ask over its authenticated call.
        let hint = answer(&registry, &key.beat("w9", 1)).unwrap();
        assert!(!hint.known && hint.mac.is_empty());
    }
}
