//! The scheduler's queries: their lifecycle (SCHEDULED -> RUNNING -> SUCCESS / FAILED /
//! CANCELED), where each one runs, and what the client gets back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Tracer as _};
use polars_node_engine as engine;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::membership::Registry;
use crate::proto::task_client::TaskClient;
use crate::proto::{CancelTaskRequest, EngineChoice, ResultTarget, RunTaskRequest, WorkerInfo, run_task_response::Outcome};

/// How long a query waits for a live worker before it fails.
const WORKER_WAIT: Duration = Duration::from_secs(30);
/// Rows returned inline with a stored result (`.head`).
const HEAD_ROWS: u32 = 10;

/// Lifecycle states, numbered as the client protocol's QueryStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Scheduled = 1,
    Running = 2,
    Success = 3,
    Failed = 4,
    Canceled = 5,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Success | Status::Failed | Status::Canceled)
    }
}

/// What a query asked for.
#[derive(Debug, Clone)]
pub struct Submission {
    pub plan: Vec<u8>,
    pub engine: EngineChoice,
    pub optimization_flags: Option<u32>,
    pub n_retries: u32,
    /// Plan only (`explain`): OPTIMIZE_IR or PLAN of the protocol's ExecuteUntil.
    pub plan_only: Option<i32>,
    pub user: Option<String>,
}

/// The outcome the client reads once the query is terminal.
#[derive(Debug, Clone, Default)]
pub struct QueryOutcome {
    pub files: Vec<String>,
    pub n_rows: u64,
    pub head_ipc: Vec<u8>,
    /// Schema message of a Flight result.
    pub flight_schema: Vec<u8>,
    /// `"<PolarsException>: message"` of a failed query.
    pub error: Option<String>,
    pub workers_used: u32,
}

pub struct Query {
    pub id: Uuid,
    pub submission: Submission,
    pub target: engine::Target,
    status: watch::Sender<Status>,
    outcome: Mutex<QueryOutcome>,
    /// Where the query runs now.
    worker: Mutex<Option<WorkerInfo>>,
    pub result_dir: PathBuf,
}

impl Query {
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub fn outcome(&self) -> QueryOutcome {
        self.outcome.lock().unwrap().clone()
    }

    /// Moves to `next` unless the query is already terminal (a canceled query stays canceled).
    fn advance(&self, next: Status) -> bool {
        self.status.send_if_modified(|s| {
            if s.is_terminal() || *s == next {
                false
            } else {
                *s = next;
                true
            }
        })
    }

    fn fail(&self, message: String) {
        self.outcome.lock().unwrap().error = Some(message);
        self.advance(Status::Failed);
    }
}

/// What the scheduler allows queries to do (`[scheduler]` keys of the same names).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub allow_local_scans: bool,
    pub allow_local_sinks: bool,
}

#[derive(Clone)]
pub struct Queries {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    policy: Policy,
    result_root: PathBuf,
    /// One HTTP/2 connection per worker task service, shared by all queries.
    workers: Mutex<HashMap<String, TaskClient<tonic::transport::Channel>>>,
    queries: Mutex<HashMap<Uuid, Arc<Query>>>,
    next_worker: AtomicUsize,
}

impl Queries {
    pub fn new(registry: Registry, policy: Policy, result_root: PathBuf) -> Self {
        let inner = Inner {
            registry,
            policy,
            result_root,
            workers: Mutex::default(),
            queries: Mutex::default(),
            next_worker: AtomicUsize::new(0),
        };
        Queries { inner: Arc::new(inner) }
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Query>> {
        self.inner.queries.lock().unwrap().get(id).cloned()
    }

    /// Accepts a query. A plan this cluster cannot read fails at once (the query still gets
    /// an id, so the client reads the failure the usual way).
    pub fn submit(&self, submission: Submission, client_polars: Option<&str>) -> Arc<Query> {
        let id = Uuid::new_v4();
        let read = check_version(client_polars, &submission.plan)
            .and_then(|()| engine::Plan::read(&submission.plan).map_err(|e| engine::describe_error(&e)))
            .and_then(|plan| check_policy(self.inner.policy, &plan).map(|()| plan));
        let target = read.as_ref().map(|p| p.target.clone()).unwrap_or(engine::Target::InMemory);
        let query = Arc::new(Query {
            id,
            result_dir: self.inner.result_root.join(id.to_string()),
            submission,
            target,
            status: watch::channel(Status::Scheduled).0,
            outcome: Mutex::default(),
            worker: Mutex::default(),
        });
        self.inner.queries.lock().unwrap().insert(id, query.clone());
        match read {
            Err(message) => {
                info!(query = %id, "query refused: {message}");
                query.fail(message);
            }
            Ok(_) if query.submission.plan_only.is_some() => {
                query.advance(Status::Success);
            }
            Ok(_) => {
                info!(query = %id, user = query.submission.user.as_deref().unwrap_or("-"), "query submitted");
                tokio::spawn(self.clone().run(query.clone()));
            }
        }
        query
    }

    /// Runs a query, traced as a `query` span (exported when `[monitoring]` is on).
    async fn run(self, query: Arc<Query>) {
        let tracer = opentelemetry::global::tracer("polars-node");
        let mut span = tracer
            .span_builder("query")
            .with_attributes([
                KeyValue::new("polars.query_id", query.id.to_string()),
                KeyValue::new("polars.user", query.submission.user.clone().unwrap_or_default()),
            ])
            .start(&tracer);
        self.run_attempts(&query).await;
        let outcome = query.outcome();
        span.set_attribute(KeyValue::new("polars.status", format!("{:?}", query.status())));
        span.set_attribute(KeyValue::new("polars.rows", outcome.n_rows as i64));
        if let Some(error) = outcome.error {
            span.set_status(opentelemetry::trace::Status::error(error));
        }
        span.end();
    }

    /// Runs a query on one worker, moving to another when its worker is lost, up to the
    /// query's `n_retries`.
    async fn run_attempts(&self, query: &Arc<Query>) {
        let query = query.clone();
        let mut attempts = 0;
        let mut lost_workers: Vec<String> = Vec::new();
        loop {
            let Some(worker) = self.pick_worker(&lost_workers).await else {
                query.fail(
                    "ComputeError: no live worker is registered with the scheduler: start a node with [worker] enabled = true \
                     whose static_leader.scheduler_service.public_addr points at this scheduler"
                        .into(),
                );
                return;
            };
            *query.worker.lock().unwrap() = Some(worker.clone());
            if !query.advance(Status::Running) && query.status().is_terminal() {
                return;
            }
            let tracer = opentelemetry::global::tracer("polars-node");
            let mut span = tracer
                .span_builder("task")
                .with_attributes([
                    KeyValue::new("polars.query_id", query.id.to_string()),
                    KeyValue::new("polars.stage", 0i64),
                    KeyValue::new("polars.worker", worker.instance_id.clone()),
                ])
                .start(&tracer);
            let result = self.run_on(&query, &worker).await;
            if !matches!(result, Ok(Outcome::Success(_))) {
                span.set_status(opentelemetry::trace::Status::error("the task did not succeed"));
            }
            span.end();
            if query.status().is_terminal() {
                return; // canceled meanwhile
            }
            match result {
                Ok(Outcome::Success(s)) => {
                    let mut outcome = query.outcome.lock().unwrap();
                    outcome.files = s.files;
                    outcome.n_rows = s.n_rows;
                    outcome.head_ipc = s.head_ipc;
                    outcome.flight_schema = s.flight_schema;
                    outcome.workers_used = 1;
                    drop(outcome);
                    query.advance(Status::Success);
                    info!(query = %query.id, worker = %worker.instance_id, "query succeeded");
                    return;
                }
                Ok(Outcome::Failure(f)) if !f.retryable => {
                    info!(query = %query.id, "query failed: {}", f.message);
                    query.fail(f.message);
                    return;
                }
                Ok(Outcome::Failure(f)) => self.lost(&query, &worker, &f.message, &mut attempts),
                Err(status) => {
                    self.inner.registry.suspect(&worker.instance_id);
                    self.lost(&query, &worker, status.message(), &mut attempts)
                }
            }
            lost_workers.push(worker.instance_id.clone());
            if query.status().is_terminal() {
                return;
            }
        }
    }

    /// A worker stopped answering mid-task: retry elsewhere or fail naming it.
    fn lost(&self, query: &Query, worker: &WorkerInfo, why: &str, attempts: &mut u32) {
        *attempts += 1;
        warn!(query = %query.id, worker = %worker.instance_id, attempt = *attempts, "worker lost during the query: {why}");
        if *attempts > query.submission.n_retries {
            query.fail(format!(
                "ComputeError: worker `{}` ({}) was lost while running the query ({why}); retried {} time(s), as n_retries allows",
                worker.instance_id,
                worker.task_addr,
                *attempts - 1
            ));
        }
    }

    async fn run_on(&self, query: &Query, worker: &WorkerInfo) -> Result<Outcome, tonic::Status> {
        let mut client = self.task_client(&worker.task_addr)?;
        let target = match query.target {
            engine::Target::InMemory => ResultTarget::Stored,
            engine::Target::Flight => ResultTarget::Flight,
            engine::Target::User => ResultTarget::User,
        };
        let request = RunTaskRequest {
            query_id: query.id.to_string(),
            plan: query.submission.plan.clone(),
            engine: query.submission.engine as i32,
            optimization_flags: query.submission.optimization_flags,
            result_dir: query.result_dir.display().to_string(),
            head_rows: HEAD_ROWS,
            target: target as i32,
        };
        let response = client.run_task(request).await?.into_inner();
        response.outcome.ok_or_else(|| tonic::Status::internal("the worker sent no outcome"))
    }

    /// The next live worker, round robin, preferring those that have not failed this query;
    /// waits a bounded time for one to register.
    async fn pick_worker(&self, avoid: &[String]) -> Option<WorkerInfo> {
        let mut live = self.inner.registry.live_workers();
        let deadline = tokio::time::Instant::now() + WORKER_WAIT;
        loop {
            let mut workers = self.inner.registry.live_worker_infos();
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

    /// Stops a query: the worker kills its execution process.
    pub async fn cancel(&self, query: &Query) {
        if !query.advance(Status::Canceled) {
            return;
        }
        info!(query = %query.id, "query canceled");
        let worker = query.worker.lock().unwrap().clone();
        if let Some(worker) = worker
            && let Ok(mut client) = self.task_client(&worker.task_addr)
        {
            let _ = client.cancel_task(CancelTaskRequest { query_id: query.id.to_string() }).await;
        }
    }

    /// Removes a query's result files.
    pub async fn delete_result(&self, query: &Query) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&query.result_dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A client of the task service at `addr`, over the connection kept for that worker (made
    /// lazily, re-established by itself when the worker comes back).
    pub fn task_client(&self, addr: &str) -> Result<TaskClient<tonic::transport::Channel>, tonic::Status> {
        let mut workers = self.inner.workers.lock().unwrap();
        if let Some(client) = workers.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        let client = TaskClient::new(endpoint.connect_lazy()).max_decoding_message_size(256 << 20);
        workers.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The worker that ran a query.
    pub fn worker_of(&self, query: &Query) -> Option<WorkerInfo> {
        query.worker.lock().unwrap().clone()
    }
}

/// Refuses plans that touch the local file system where the scheduler forbids it, before
/// any worker runs them.
fn check_policy(policy: Policy, plan: &engine::Plan) -> Result<(), String> {
    let local = plan.local_paths();
    if !policy.allow_local_scans && !local.scans.is_empty() {
        return Err(format!(
            "InvalidOperationError: this cluster does not allow queries to read the local file system \
             (scheduler.allow_local_scans = false), and the query reads {}; read from object storage (s3://, gs://, az://, https://) instead",
            local.scans.join(", ")
        ));
    }
    if !policy.allow_local_sinks && !local.sinks.is_empty() {
        return Err(format!(
            "InvalidOperationError: this cluster does not allow queries to write to the local file system \
             (scheduler.allow_local_sinks = false), and the query writes {}; sink to object storage instead, or use execute() for a stored result",
            local.sinks.join(", ")
        ));
    }
    Ok(())
}

/// A client of another Polars version sends plans this cluster cannot read: say which
/// versions are involved and which client to install.
fn check_version(client_polars: Option<&str>, plan: &[u8]) -> Result<(), String> {
    let advice = format!(
        "this cluster runs Polars {v}: install the client that pins it, `pip install polars-cloud==0.12.0` (polars=={v})",
        v = engine::POLARS_VERSION
    );
    if let Some(version) = client_polars
        && version != engine::POLARS_VERSION
    {
        return Err(format!("ComputeError: the client runs Polars {version}, but {advice}"));
    }
    match engine::schema_hash_of(plan) {
        Some(hash) if hash == engine::own_schema_hash() => Ok(()),
        Some(hash) => Err(format!(
            "ComputeError: the plan was written by another Polars version (DSL schema hash {hash}, Polars {} reads {}); {advice}",
            engine::POLARS_VERSION,
            engine::own_schema_hash()
        )),
        None => Err("ComputeError: the request does not hold a serialized Polars plan".into()),
    }
}
