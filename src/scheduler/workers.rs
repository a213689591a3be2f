//! The scheduler's hold on its workers as queries use them: the live set (from the registry),
//! one connection per worker's task service, waits for workers, and how often a task may fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::proto::task_client::TaskClient;
use crate::proto::{RunTaskRequest, WorkerInfo};
use crate::security::cluster::{Attach, Credentials};

/// A connection to a worker's task service, carrying the cluster token.
pub type TaskConnection = TaskClient<InterceptedService<Channel, Attach>>;
use crate::scheduler::queries::Policy;
use crate::scheduler::query::{Attempts, Query};
use crate::scheduler::registry::Registry;

/// How long a query waits for a live worker before it fails (without a scaler).
pub const WORKER_WAIT: Duration = Duration::from_secs(30);
/// How long a suspected worker has to answer a health check on a fresh connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// `scheduler.max_task_attempts`.
    max_task_attempts: u32,
    /// `scheduler.allow_local_scans` and `allow_local_sinks`, sent with every task.
    allow_local: (bool, bool),
    /// One HTTP/2 connection per worker task service, shared by all queries.
    clients: Mutex<HashMap<String, TaskConnection>>,
    /// Per worker: tasks running there, and when the last one ended (for releasing idle ones).
    activity: Mutex<HashMap<String, Activity>>,
    /// Worker counts that waiting queries need (what the scaler is asked for), by waiter.
    demand: Mutex<HashMap<u64, u32>>,
    next_waiter: AtomicU64,
    /// How long a query waits for workers: longer when a scaler is starting them.
    worker_wait: Duration,
    /// `[internal]`: carried by every call to a worker.
    credentials: Credentials,
    next_worker: AtomicUsize,
}

impl Workers {
    /// Resolves once `instance_id` is no longer live (its heartbeats stopped, or it was
    /// suspected): a task running there is then given up, whatever its connection says (a
    /// frozen machine keeps its TCP connections open).
    pub(crate) async fn lost(&self, instance_id: &str) {
        let mut live = self.inner.registry.live_workers();
        loop {
            if !self.inner.registry.is_alive(instance_id) {
                return;
            }
            if live.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub fn new(registry: Registry, policy: &Policy, credentials: Credentials) -> Self {
        let inner = Inner {
            registry,
            max_task_attempts: policy.max_task_attempts,
            allow_local: (policy.allow_local_scans, policy.allow_local_sinks),
            clients: Mutex::default(),
            activity: Mutex::default(),
            demand: Mutex::default(),
            next_waiter: AtomicU64::new(0),
            worker_wait: policy.worker_wait,
            credentials,
            next_worker: AtomicUsize::new(0),
        };
        Workers { inner: Arc::new(inner) }
    }

    /// `request` with the scheduler's file-system policy, which the worker checks again.
    pub(crate) fn with_policy(&self, request: RunTaskRequest) -> RunTaskRequest {
        let (scans, sinks) = self.inner.allow_local;
        RunTaskRequest { deny_local_scans: !scans, deny_local_sinks: !sinks, ..request }
    }

    /// The next worker a whole query starts at, round robin (queries spread over the cluster).
    pub(crate) fn next_start(&self) -> usize {
        self.inner.next_worker.fetch_add(1, Ordering::Relaxed)
    }

    /// The failed runs one task of `query` may have before the query fails.
    pub(crate) fn attempts_for(&self, query: &Query, task: String) -> Attempts {
        Attempts::new(task, self.inner.max_task_attempts.saturating_add(query.submission.n_retries))
    }
    /// The next live worker, round robin, preferring those that have not failed this query;
    /// waits a bounded time for one to register.
    pub(crate) async fn pick_worker(
        &self,
        avoid: &[String],
        can_run: &(dyn Fn(&WorkerInfo) -> bool + Sync),
    ) -> Option<WorkerInfo> {
        let mut live = self.inner.registry.live_workers();
        let deadline = tokio::time::Instant::now() + self.inner.worker_wait;
        let mut waiting = None;
        loop {
            let mut workers = self.inner.registry.live_worker_infos();
            if workers.is_empty() {
                waiting.get_or_insert_with(|| Demand::new(self, 1)); // for the scaler
            }
            workers.retain(|w| can_run(w));
            if workers.iter().any(|w| !avoid.contains(&w.instance_id)) {
                workers.retain(|w| !avoid.contains(&w.instance_id));
            }
            if !workers.is_empty() {
                let i = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % workers.len();
                return Some(workers[i].clone());
            }
            if tokio::time::timeout_at(deadline, live.changed()).await.is_err() {
                return None;
            }
        }
    }
    /// The live workers once there are at least `min`, or an error naming the shortfall after
    /// a bounded wait.
    pub(crate) async fn wait_for_workers(&self, min: u32) -> Result<Vec<WorkerInfo>, String> {
        let deadline = tokio::time::Instant::now() + self.inner.worker_wait;
        let mut changed = self.inner.registry.live_workers();
        let mut waiting = None;
        loop {
            let live = self.inner.registry.live_worker_infos();
            if live.len() >= min as usize {
                return Ok(live);
            }
            // Known to the scaling loop while it waits (dropped with the guard).
            waiting.get_or_insert_with(|| Demand::new(self, min));
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(format!(
                    "ComputeError: the query needs at least {min} live worker(s) and {} are live (waited {}s); start more workers or ask for fewer (n_workers)",
                    live.len(),
                    self.inner.worker_wait.as_secs()
                ));
            }
        }
    }

    /// The most workers any waiting query needs (0 when none waits).
    pub(crate) fn demand(&self) -> u32 {
        self.inner.demand.lock().unwrap().values().copied().max().unwrap_or(0)
    }

    /// Counts a task running on `instance_id` until the returned guard is dropped.
    pub(crate) fn running_on(&self, instance_id: &str) -> Running {
        let mut activity = self.inner.activity.lock().unwrap();
        let a = activity.entry(instance_id.to_string()).or_insert(Activity { running: 0, last: Instant::now() });
        a.running += 1;
        Running { workers: self.clone(), instance_id: instance_id.to_string() }
    }

    /// Forgets the task activity of workers that are gone (autoscaling names new ones).
    pub(crate) fn forget_gone(&self, alive: impl Fn(&str) -> bool) {
        self.inner.activity.lock().unwrap().retain(|id, a| a.running > 0 || alive(id));
    }

    /// How long `instance_id` has run no task: None while one runs; since `otherwise` when it
    /// never ran one.
    pub(crate) fn idle_for(&self, instance_id: &str, otherwise: Instant) -> Option<Duration> {
        match self.inner.activity.lock().unwrap().get(instance_id) {
            Some(a) if a.running > 0 => None,
            Some(a) => Some(a.last.elapsed()),
            None => Some(otherwise.elapsed()),
        }
    }
    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A call to `instance_id` failed (or its shuffle files could not be fetched): it is
    /// declared lost unless its task service answers a health check on a fresh connection
    /// within [`PROBE_TIMEOUT`]. A connection broken by an earlier restart of the worker, or
    /// an answer slowed by load, does not cost a live worker the tasks it runs for others.
    pub(crate) async fn suspect(&self, instance_id: &str) {
        let live = self.inner.registry.live_worker_infos();
        let Some(worker) = live.iter().find(|w| w.instance_id == instance_id) else {
            return;
        };
        // The next call makes a new connection, whatever becomes of this one.
        self.inner.clients.lock().unwrap().remove(&worker.task_addr);
        if probe(&worker.task_addr, &self.inner.credentials).await {
            tracing::info!(worker = %instance_id, "a call to the worker failed, but it answers a health check: it stays in service");
            return;
        }
        self.inner.registry.suspect(instance_id);
    }
    /// A client of the task service at `addr`, over the connection kept for that worker (made
    /// lazily, re-established by itself when the worker comes back).
    pub fn task_client(&self, addr: &str) -> Result<TaskConnection, tonic::Status> {
        let mut workers = self.inner.clients.lock().unwrap();
        if let Some(client) = workers.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = (self.inner.credentials.endpoint(addr))
            .map_err(tonic::Status::internal)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        let client = TaskClient::with_interceptor(endpoint.connect_lazy(), self.inner.credentials.attach())
            .max_decoding_message_size(256 << 20);
        workers.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

struct Activity {
    running: usize,
    last: Instant,
}

/// A task running on a worker (see `Workers::running_on`).
pub(crate) struct Running {
    workers: Workers,
    instance_id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(a) = self.workers.inner.activity.lock().unwrap().get_mut(&self.instance_id) {
            a.running -= 1;
            a.last = Instant::now();
        }
    }
}

/// A query waiting for `count` workers (see `Workers::demand`).
struct Demand {
    workers: Workers,
    id: u64,
}

impl Demand {
    fn new(workers: &Workers, count: u32) -> Demand {
        let id = workers.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        workers.inner.demand.lock().unwrap().insert(id, count);
        Demand { workers: workers.clone(), id }
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.workers.inner.demand.lock().unwrap().remove(&self.id);
    }
}

/// Whether the task service at `addr` answers SERVING to a health check on a new connection.
async fn probe(addr: &str, credentials: &Credentials) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(endpoint) = credentials.endpoint(addr) else {
        return false;
    };
    let check = async {
        let channel = endpoint.connect_timeout(PROBE_TIMEOUT).connect().await.ok()?;
        let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(answer.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(PROBE_TIMEOUT, check).await.ok().flatten().unwrap_or(false)
}
