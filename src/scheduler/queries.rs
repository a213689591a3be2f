//! The scheduler's queries: their lifecycle (SCHEDULED -> RUNNING -> SUCCESS / FAILED /
//! CANCELED), where each one runs, and what the client gets back. The records are in `query`,
//! the workers they run on in `workers`, split queries run in `stages`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use polars_node_engine as engine;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::proto::{CancelTaskRequest, EngineChoice, RunTaskRequest, WorkerInfo, run_task_response::Outcome};
use crate::scheduler::lineage::Lineage;
use crate::scheduler::query::{HEAD_ROWS, Query, StageStats, Status, Submission};
use crate::scheduler::registry::Registry;
use crate::scheduler::stages::StageRun;
use crate::scheduler::store::{Checkpointer, QueryStore, StoredQuery};
use crate::scheduler::workers::Workers;
use engine::planner::{Limits, Split};
use engine::python::{PythonPlan, PythonVersion};
use engine::stage_graph::StageGraph;

/// `ExecuteUntil::PLAN` of the client protocol: build the physical plan, do not execute.
const PLAN: i32 = 2;
/// Fewest rows of one file worth a task of their own when a single file is split.
const MIN_ROWS_PER_TASK: u64 = 10_000;
/// How long a query resumed after a restart waits for the workers that hold its checkpointed
/// outputs to register again (their outputs are recomputed elsewhere after that).
const RESUME_WAIT: Duration = Duration::from_secs(30);
/// How long a finished query stays in the scheduler's memory (clients poll it right after).
const KEEP_FINISHED: Duration = Duration::from_secs(600);

/// Scheduler-wide bounds (`[scheduler]` keys of the same names).
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerBounds {
    pub default_workers_per_query: Option<u32>,
    pub max_workers_per_query: Option<u32>,
    pub default_partitions_per_worker: Option<u32>,
}

/// Unknown ids and other users' queries get the same answer.
fn not_found(id: &Uuid) -> tonic::Status {
    tonic::Status::not_found(format!("no query {id} on this cluster for this caller"))
}

/// More partitions than this per worker only multiply files and tasks (and a hostile client
/// could ask for 2^32 of them).
const MAX_PARTITIONS_PER_WORKER: u32 = 4096;

/// What the scheduler allows queries to do (`[scheduler]` keys of the same names).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// `scheduler.max_task_attempts`.
    pub max_task_attempts: u32,
    pub allow_local_scans: bool,
    pub allow_local_sinks: bool,
    pub bounds: WorkerBounds,
    /// `scheduler.min_split_bytes`.
    pub min_split_bytes: u64,
    /// How long a query waits for the workers it needs: `workers::WORKER_WAIT`, or
    /// `scaling.registration_timeout` when a scaler starts them.
    pub worker_wait: Duration,
}

#[derive(Clone)]
pub struct Queries {
    inner: Arc<Inner>,
}

struct Inner {
    workers: Workers,
    policy: Policy,
    result_root: PathBuf,
    queries: Mutex<HashMap<Uuid, Arc<Query>>>,
    /// The query table: what a restarted scheduler reads back.
    store: QueryStore,
    /// Finished stages of running split queries, when checkpoints are on.
    checkpoints: Option<Checkpointer>,
    /// OpenLineage events of every query (`[lineage]`).
    lineage: Option<Lineage>,
}

impl Queries {
    /// `checkpoint_period`: `scheduler.checkpoint.period` (checkpoints on when set).
    pub fn new(
        registry: Registry,
        policy: Policy,
        result_root: PathBuf,
        store: QueryStore,
        checkpoint_period: Option<Duration>,
        credentials: crate::security::cluster::Credentials,
        lineage: Option<Lineage>,
    ) -> Self {
        let inner = Inner {
            workers: Workers::new(registry, &policy, credentials),
            lineage,
            policy,
            result_root,
            queries: Mutex::default(),
            checkpoints: checkpoint_period.map(|_| Checkpointer::new(store.clone())),
            store,
        };
        Queries { inner: Arc::new(inner) }
    }

    /// The query a client call (client service or Flight) names by `id`, its text. The id is
    /// the capability: random (122 bits) and told only to the submitting client, and an unknown
    /// id gets the same answer as another user's query, so no call tells which ids exist. A
    /// caller that names a user (`x-polars-user`) must name the query's own; the official
    /// client leaves the name off some calls (the status stream, Flight), so a call without one
    /// is judged by the id alone.
    pub fn find(&self, id: &[u8], caller: Option<&str>) -> Result<Arc<Query>, tonic::Status> {
        let query = self.find_any(id)?;
        match (&query.submission.user, caller.filter(|u| !u.trim().is_empty())) {
            (Some(owner), Some(caller)) if caller != owner => {
                info!(query = %query.id, owner = %owner, caller = %caller, "a call for another user's query was refused");
                Err(not_found(&query.id))
            }
            _ => Ok(query),
        }
    }

    fn find_any(&self, id: &[u8]) -> Result<Arc<Query>, tonic::Status> {
        let text = String::from_utf8_lossy(id);
        let uuid = Uuid::parse_str(&text).map_err(|_| {
            let shown: String = text.chars().take(64).collect();
            tonic::Status::invalid_argument(format!("`{shown}` is not a query id"))
        })?;
        self.get(&uuid).ok_or_else(|| not_found(&uuid))
    }

    /// A query by id: running ones are in memory, finished ones are read back from the query
    /// table (and kept in memory for a while).
    pub fn get(&self, id: &Uuid) -> Option<Arc<Query>> {
        if let Some(query) = self.inner.queries.lock().unwrap().get(id).cloned() {
            return Some(query);
        }
        let stored = match self.inner.store.load_one(*id) {
            Ok(stored) => stored?,
            Err(e) => {
                warn!(query = %id, "cannot read the query from the query table: {e}");
                return None;
            }
        };
        let query = self.query_from(stored, Vec::new());
        let _ = query.ended.set(std::time::Instant::now());
        self.inner.queries.lock().unwrap().entry(*id).or_insert(query).clone().into()
    }

    /// The record of a query the table holds.
    fn query_from(&self, stored: StoredQuery, plan: Vec<u8>) -> Arc<Query> {
        let python = match stored.status.is_terminal() {
            true => None,
            false => PythonPlan::find(&plan),
        };
        Arc::new(Query {
            id: stored.id,
            plan: Mutex::new((!stored.status.is_terminal()).then(|| plan.into())),
            result_dir: self.inner.result_root.join(stored.id.to_string()),
            submission: stored.submission,
            target: stored.target,
            status: watch::channel(stored.status).0,
            outcome: Mutex::new(stored.outcome),
            worker: Mutex::new(stored.worker),
            participants: Mutex::new(stored.participants),
            reads_files: stored.reads_files,
            python,
            store: self.inner.store.clone(),
            ended: std::sync::OnceLock::new(),
        })
    }

    /// Lets finished queries leave memory [`KEEP_FINISHED`] after they ended (the query table
    /// keeps them until `scheduler.result_retention`).
    pub async fn forget_finished(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            self.inner.queries.lock().unwrap().retain(|_, q| q.ended.get().is_none_or(|t| t.elapsed() < KEEP_FINISHED));
        }
    }

    /// Accepts a query. A plan this cluster cannot read fails at once (the query still gets
    /// an id, so the client reads the failure the usual way). Reading the plan and writing it
    /// to the query table happen off the async threads (plans may carry whole data frames, and
    /// heartbeats must not wait behind them).
    pub async fn submit(&self, plan: Vec<u8>, submission: Submission, client_polars: Option<String>) -> Arc<Query> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.submit_now(plan, submission, client_polars.as_deref()))
            .await
            .expect("submitting a query does not panic")
    }

    fn submit_now(&self, plan: Vec<u8>, submission: Submission, client_polars: Option<&str>) -> Arc<Query> {
        let id = Uuid::new_v4();
        // Plans that call Python cannot be read here (no interpreter): what the scheduler needs
        // of them (target, Python versions) is found in their bytes.
        let python = PythonPlan::find(&plan);
        let read = judge_plan(&plan, client_polars, self.inner.policy, python.as_ref());
        let (target, reads_files) = read.clone().unwrap_or((engine::Target::InMemory, false));
        let plan = bytes::Bytes::from(plan);
        let query = Arc::new(Query {
            id,
            plan: Mutex::new(Some(plan.clone())),
            result_dir: self.inner.result_root.join(id.to_string()),
            submission,
            target,
            status: watch::channel(Status::Scheduled).0,
            outcome: Mutex::default(),
            worker: Mutex::default(),
            participants: Mutex::default(),
            reads_files,
            python,
            store: self.inner.store.clone(),
            ended: std::sync::OnceLock::new(),
        });
        self.record(&query, &plan);
        if let Some(lineage) = &self.inner.lineage {
            lineage.follow(query.clone(), plan.clone());
        }
        match read {
            // A refused query lives in the table only (`get` reads it back when its client
            // asks): a flood of unreadable plans costs no memory.
            Err(message) => {
                info!(query = %id, "query refused: {message}");
                query.fail(message);
            }
            Ok(_) => {
                self.inner.queries.lock().unwrap().insert(id, query.clone());
                self.start(query.clone())
            }
        }
        query
    }

    /// Writes a new query, with its plan, to the query table (before its id is handed out).
    fn record(&self, query: &Query, plan: &[u8]) {
        let stored = StoredQuery {
            id: query.id,
            submitted_at: SystemTime::now(),
            submission: query.submission.clone(),
            target: query.target.clone(),
            reads_files: query.reads_files,
            status: query.status(),
            outcome: query.outcome(),
            worker: None,
            participants: Vec::new(),
        };
        if let Err(e) = self.inner.store.insert(&stored, plan) {
            warn!(query = %query.id, "cannot write the query to the query table: {e}");
        }
    }

    /// Starts an accepted query: plans only (`explain`), or runs it.
    fn start(&self, query: Arc<Query>) {
        let id = query.id;
        match () {
            _ if query.submission.plan_only.is_some() => {
                // `explain(plan_stage="physical")` asks for the stage graph: plan, do not run.
                let queries = self.clone();
                let query = query.clone();
                tokio::spawn(async move {
                    if query.submission.plan_only == Some(PLAN) {
                        let split = match query.submission.distribution.is_some() {
                            true => queries.plan(&query).await,
                            false => Ok(None),
                        };
                        let planned = match split {
                            Ok(Some(_)) => Ok(()),
                            Ok(None) => queries.note_whole_plan(&query).await,
                            Err(message) => Err(message),
                        };
                        if let Err(message) = planned {
                            query.fail(message);
                            return;
                        }
                    }
                    query.advance(Status::Success);
                });
            }
            _ => {
                info!(query = %id, user = query.submission.user.as_deref().unwrap_or("-"), "query submitted");
                tokio::spawn(self.clone().run(query));
            }
        }
    }

    /// Reads back the queries an earlier run of this scheduler left in the query table:
    /// finished ones are served as before, queued ones run, and running ones resume from
    /// their checkpoints (checkpoints on) or fail saying how to turn them on.
    pub fn restore(&self) {
        let loaded = match self.inner.store.load() {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(database = %self.inner.store.path().display(), "cannot read the query table: {e}");
                return;
            }
        };
        // Finished queries stay in the table, read back when asked for (`get`).
        let served = self.inner.store.finished().unwrap_or_default();
        let (mut queued, mut resumed, mut failed) = (0, 0, 0);
        for (stored, plan) in loaded {
            let status = stored.status;
            let query = self.query_from(stored, plan);
            self.inner.queries.lock().unwrap().insert(query.id, query.clone());
            match status {
                Status::Scheduled => {
                    info!(query = %query.id, "query queued before the scheduler restarted: it runs now");
                    queued += 1;
                    self.start(query);
                }
                _ if self.inner.checkpoints.is_some() => {
                    info!(query = %query.id, "query running when the scheduler stopped: it resumes from its checkpoint");
                    resumed += 1;
                    self.start(query);
                }
                _ => {
                    failed += 1;
                    query.fail(format!(
                        "ComputeError: the scheduler restarted while query {} ran, and checkpoints are off, so it could not \
                         resume: run it again. To have running queries resume after a scheduler restart, set \
                         scheduler.checkpoint.period (for example \"30s\")",
                        query.id
                    ));
                    let queries = self.clone();
                    tokio::spawn(async move { queries.release_everywhere(&query).await });
                }
            }
        }
        if served + queued + resumed + failed > 0u64 {
            info!(
                served,
                queued, resumed, failed, "queries of the scheduler's previous run read back from the query table"
            );
        }
    }

    /// Writes the finished stages of running queries to the query table every `period`.
    pub async fn write_checkpoints(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let queries = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(checkpoints) = &queries.inner.checkpoints {
                    let written = checkpoints.flush();
                    if written > 0 {
                        info!(outputs = written, "checkpoint written");
                    }
                }
            })
            .await;
        }
    }

    /// Runs a query, traced as a `query` span (exported when `[monitoring]` is on).
    async fn run(self, query: Arc<Query>) {
        let mut span = crate::monitoring::span(
            "query",
            [
                KeyValue::new("polars.query_id", query.id.to_string()),
                KeyValue::new("polars.user", query.submission.user.clone().unwrap_or_default()),
            ],
        );
        match self.resume(&query).await {
            Some(checkpoint) => self.run_split(&query, &checkpoint.graph, checkpoint.workers, checkpoint.outputs).await,
            None => match self.plan(&query).await {
                Ok(Some((graph, workers))) => self.run_split(&query, &graph, workers, Vec::new()).await,
                Ok(None) => self.run_attempts(&query).await,
                Err(message) => query.fail(message),
            },
        }
        if let Some(checkpoints) = &self.inner.checkpoints {
            checkpoints.forget(query.id);
        }
        self.release(&query).await;
        let outcome = query.outcome();
        span.set_attribute(KeyValue::new("polars.status", format!("{:?}", query.status())));
        span.set_attribute(KeyValue::new("polars.rows", outcome.n_rows as i64));
        // What the observatory reports per query (the official client's query detail).
        let engine = match query.submission.engine {
            EngineChoice::Streaming => "Streaming",
            EngineChoice::InMemory => "InMemory",
            EngineChoice::Gpu => "Gpu",
            _ => "Auto",
        };
        span.set_attribute(KeyValue::new("polars.engine", engine));
        let query_type = if query.submission.distribution.is_some() { "Distributed" } else { "Single" };
        span.set_attribute(KeyValue::new("polars.query_type", query_type));
        span.set_attribute(KeyValue::new("polars.total_stages", outcome.stages.len().max(1) as i64));
        let graph = match outcome.stage_graph_json.is_empty() {
            true => serde_json::json!([{ "stage": 0, "label": "whole query", "tasks": 1, "inputs": [], "output": "result" }]).to_string(),
            false => outcome.stage_graph_json.clone(),
        };
        span.set_attribute(KeyValue::new("polars.stage_graph", graph));
        if !outcome.stage_graph.is_empty() {
            span.set_attribute(KeyValue::new("polars.plan.physical", outcome.stage_graph.clone()));
            span.set_attribute(KeyValue::new("polars.plan.ir", outcome.logical_plan.clone()));
        }
        if query.target == engine::Target::InMemory && !outcome.files.is_empty() {
            span.set_attribute(KeyValue::new("polars.output_location", query.result_dir.display().to_string()));
            span.set_attribute(KeyValue::new("polars.output_files", outcome.files.len() as i64));
        }
        if let Some(error) = outcome.error {
            span.set_status(opentelemetry::trace::Status::error(error));
        }
        span.end();
    }

    /// Runs a query on one worker, moving to another when its worker is lost or its execution
    /// process dies, up to the task attempts allowed.
    async fn run_attempts(&self, query: &Arc<Query>) {
        let query = query.clone();
        let mut attempts = self.inner.workers.attempts_for(&query, "the query's task".into());
        let mut lost_workers: Vec<String> = Vec::new();
        loop {
            let can_run = |w: &WorkerInfo| query.python.as_ref().is_none_or(|p| p.refusal(python_of(w)).is_none());
            if let Some(python) = &query.python
                && let Err(message) = python_workers(python, &self.inner.workers.registry().live_worker_infos())
            {
                query.fail(message);
                return;
            }
            let Some(worker) = self.inner.workers.pick_worker(&lost_workers, &can_run).await else {
                query.fail(
                    "ComputeError: no live worker is registered with the scheduler: start a node with [worker] enabled = true \
                     whose static_leader.scheduler_service.public_addr points at this scheduler"
                        .into(),
                );
                return;
            };
            *query.worker.lock().unwrap() = Some(worker.clone());
            query.note_participant(&worker);
            if !query.advance(Status::Running) && query.status().is_terminal() {
                return;
            }
            let mut span = crate::monitoring::span(
                "task",
                [
                    KeyValue::new("polars.query_id", query.id.to_string()),
                    KeyValue::new("polars.stage", 0i64),
                    KeyValue::new("polars.worker", worker.instance_id.clone()),
                ],
            );
            // A worker declared lost (no heartbeats) loses its task even while its connection
            // stays open; its late answer is dropped with the call.
            let result = tokio::select! {
                result = self.run_on(&query, &worker) => result,
                () = self.inner.workers.lost(&worker.instance_id) => {
                    Err(tonic::Status::unavailable("the worker was declared lost (no heartbeats) while it ran the task"))
                }
            };
            if let Ok(Outcome::Success(s)) = &result {
                span.set_attribute(KeyValue::new("polars.rows", s.n_rows as i64));
            }
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
                    outcome.stages = vec![StageStats {
                        label: "whole query".into(),
                        tasks: 1,
                        rows: s.n_rows,
                        workers: vec![worker.instance_id.clone()],
                        finished: true,
                        ..Default::default()
                    }];
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
                Ok(Outcome::Failure(f)) => {
                    warn!(query = %query.id, worker = %worker.instance_id, "the query's task failed on its worker: {}", f.message);
                    // A full disk is the worker's fault, not a crash that repeats elsewhere.
                    if let Some(message) = attempts.failed(&worker.instance_id, &f.message, !f.worker_fault) {
                        query.fail(message);
                    }
                }
                Err(status) => {
                    warn!(query = %query.id, worker = %worker.instance_id, "worker lost during the query: {}", status.message());
                    self.inner.workers.suspect(&worker.instance_id).await;
                    if let Some(message) = attempts.failed(&worker.instance_id, status.message(), false) {
                        query.fail(message);
                    }
                }
            }
            lost_workers.push(worker.instance_id.clone());
            if query.status().is_terminal() {
                return;
            }
        }
    }

    async fn run_on(&self, query: &Query, worker: &WorkerInfo) -> Result<Outcome, tonic::Status> {
        let _running = self.inner.workers.running_on(&worker.instance_id);
        let mut client = self.inner.workers.task_client(&worker.task_addr)?;
        let target = query.result_target();
        let request = RunTaskRequest {
            query_id: query.id.to_string(),
            plan: query.plan().map_err(tonic::Status::internal)?.to_vec(),
            engine: query.submission.engine as i32,
            optimization_flags: query.submission.optimization_flags,
            result_dir: query.result_dir.display().to_string(),
            head_rows: HEAD_ROWS,
            target: target as i32,
            stage: None,
            output_dir: String::new(),
            report_ir_plan: false,
            python: query.python.is_some(),
            python_executable: String::new(),
            checkpoint: false,
            // Set by Workers::with_policy as the task is sent.
            deny_local_scans: false,
            deny_local_sinks: false,
        };
        let response = client.run_task(self.inner.workers.with_policy(request)).await?.into_inner();
        response.outcome.ok_or_else(|| tonic::Status::internal("the worker sent no outcome"))
    }

    /// Stops a query: the worker kills its execution process.
    pub async fn cancel(&self, query: &Query) {
        if !query.advance(Status::Canceled) {
            return;
        }
        info!(query = %query.id, "query canceled");
        let workers = query.participants.lock().unwrap().clone();
        for worker in workers {
            if let Ok(mut client) = self.inner.workers.task_client(&worker.task_addr) {
                let _ = client.cancel_task(CancelTaskRequest { query_id: query.id.to_string() }).await;
            }
        }
    }

    /// Decides how a query runs: split into stages (with the workers it runs on), or whole
    /// on one worker (`None`). Planning reads file metadata: off the async threads.
    async fn plan(&self, query: &Arc<Query>) -> Result<Option<(StageGraph, Vec<String>)>, String> {
        let Some(distribution) = query.submission.distribution.clone() else {
            return Ok(None);
        };
        if query.python.is_some() {
            // py-polars runs the plan on one worker: this engine cannot read it to split it.
            return match distribution.forbid_single_worker {
                true => Err(forbidden("the query calls Python functions, which run whole in one worker's Python")),
                false => Ok(None),
            };
        }
        if !query.reads_files {
            // In-memory frames only: nothing to split, no planning pass needed to know it.
            return match distribution.forbid_single_worker {
                true => Err(forbidden("the query reads no files")),
                false => Ok(None),
            };
        }
        let bounds = self.inner.policy.bounds;
        let cap = bounds.max_workers_per_query.unwrap_or(u32::MAX);
        if distribution.min_workers > cap {
            return Err(format!(
                "InvalidOperationError: the query asks for at least {} workers, and this scheduler allows at most {cap} per query \
                 (scheduler.max_workers_per_query); ask for fewer workers",
                distribution.min_workers
            ));
        }
        let max = distribution
            .max_workers
            .or(bounds.default_workers_per_query)
            .unwrap_or(u32::MAX)
            .min(cap)
            .max(distribution.min_workers);
        let live = self.inner.workers.wait_for_workers(distribution.min_workers.max(1)).await?;
        // Spread queries over the cluster: each starts at the next worker.
        let start = self.inner.workers.next_start();
        let workers: Vec<String> =
            (0..live.len().min(max as usize)).map(|i| live[(start + i) % live.len()].instance_id.clone()).collect();
        let per_worker =
            distribution.partitions_per_worker.or(bounds.default_partitions_per_worker).unwrap_or(1).max(1);
        if per_worker > MAX_PARTITIONS_PER_WORKER {
            return Err(format!(
                "InvalidOperationError: the query asks for {per_worker} partitions per worker, and this cluster plans at most \
                 {MAX_PARTITIONS_PER_WORKER}; ask for fewer (`.distributed(partitions_per_worker=...)`)"
            ));
        }
        let limits = Limits {
            max_tasks: workers.len() * per_worker as usize,
            broadcast_limit: distribution.broadcast_limit,
            min_rows_per_task: MIN_ROWS_PER_TASK,
            // The client asks for a split whatever the size with `single_worker_ops="forbid"`.
            min_split_bytes: match distribution.forbid_single_worker {
                true => 0,
                false => self.inner.policy.min_split_bytes,
            },
            pre_aggregate: distribution.pre_aggregate,
            partitioned_sort: distribution.partitioned_sort,
        };
        let plan = query.plan()?;
        let flags = query.submission.optimization_flags;
        let mut span = crate::monitoring::span(
            "planning",
            [
                KeyValue::new("polars.query_id", query.id.to_string()),
                KeyValue::new("polars.workers", workers.len() as i64),
                KeyValue::new("polars.max_tasks", limits.max_tasks as i64),
            ],
        );
        let split = tokio::task::spawn_blocking(move || {
            engine::init();
            engine::guard_panics(|| engine::Plan::read(&plan).and_then(|p| p.plan_stages(flags, limits)))
        })
        .await
        .map_err(|e| format!("ComputeError: the planner failed: {e}"))
        .and_then(|r| r.map_err(|e| engine::describe_error(&e)));
        match &split {
            Ok(Split::Stages(graph)) => {
                span.set_attribute(KeyValue::new("polars.total_stages", graph.stages.len() as i64))
            }
            Ok(Split::Whole(why)) => span.set_attribute(KeyValue::new("polars.whole_because", why.clone())),
            Err(e) => span.set_status(opentelemetry::trace::Status::error(e.clone())),
        }
        span.end();
        let split = split?;
        match split {
            Split::Stages(graph) => {
                info!(query = %query.id, stages = graph.stages.len(), workers = workers.len(), "query split into stages\n{}", graph.describe());
                let mut outcome = query.outcome.lock().unwrap();
                outcome.stage_graph = graph.describe();
                outcome.stage_graph_json = stage_graph_json(&graph);
                outcome.stage_graph_msgpack = stage_graph_msgpack(&graph, &query.id.to_string());
                outcome.logical_plan = graph.logical_plan.clone();
                drop(outcome);
                Ok(Some((graph, workers)))
            }
            Split::Whole(why) if distribution.forbid_single_worker => Err(forbidden(&why)),
            Split::Whole(why) => {
                info!(query = %query.id, "query runs whole on one worker: {why}");
                Ok(None)
            }
        }
    }

    /// The stage graph of a query that runs whole: one stage, the optimized plan, so that
    /// `explain()` shows what will run for every query.
    async fn note_whole_plan(&self, query: &Arc<Query>) -> Result<(), String> {
        let plan = query.plan()?;
        let flags = query.submission.optimization_flags;
        let ir = match query.python {
            Some(_) => "a plan that calls Python: the worker's py-polars optimizes and runs it".to_string(),
            None => {
                tokio::task::spawn_blocking(move || engine::guard_panics(|| engine::Plan::read(&plan)?.explain(flags)))
                    .await
                    .map_err(|e| format!("ComputeError: the planner failed: {e}"))?
                    .map_err(|e| engine::describe_error(&e))?
            }
        };
        let graph = StageGraph {
            stages: vec![engine::stage_graph::StagePlan {
                tasks: vec![Vec::new()],
                output: engine::stage_graph::StageOutput::Result,
                inputs: Vec::new(),
                label: format!("the whole query on one worker\n{ir}"),
            }],
            logical_plan: ir,
        };
        let mut outcome = query.outcome.lock().unwrap();
        outcome.stage_graph = graph.describe();
        outcome.stage_graph_json = stage_graph_json(&graph);
        outcome.stage_graph_msgpack = stage_graph_msgpack(&graph, &query.id.to_string());
        outcome.logical_plan = graph.logical_plan;
        Ok(())
    }

    /// The checkpoint of a query that was running when the scheduler stopped (checkpoints
    /// on), once the workers holding its outputs registered again (or after [`RESUME_WAIT`]:
    /// the outputs of workers still missing are recomputed).
    async fn resume(&self, query: &Arc<Query>) -> Option<crate::scheduler::store::Checkpoint> {
        self.inner.checkpoints.as_ref()?;
        if query.status() != Status::Running {
            return None;
        }
        let store = self.inner.store.clone();
        let id = query.id;
        let read = tokio::task::spawn_blocking(move || store.checkpoint_of(id)).await;
        let checkpoint = match read.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(Some(checkpoint)) => checkpoint,
            Ok(None) => return None,
            Err(e) => {
                warn!(query = %id, "cannot read the query's checkpoint; it runs from the start: {e}");
                return None;
            }
        };
        // Outputs copied to shared storage need not wait for their worker.
        let holders: std::collections::BTreeSet<String> = checkpoint
            .outputs
            .iter()
            .filter(|(_, _, _, s)| !(s.checkpoint_shared && s.checkpoint_files.len() == s.files.len()))
            .map(|(_, _, w, _)| w.instance_id.clone())
            .collect();
        let deadline = tokio::time::Instant::now() + RESUME_WAIT;
        loop {
            let live: Vec<String> =
                self.inner.workers.registry().live_worker_infos().into_iter().map(|w| w.instance_id).collect();
            let missing: Vec<&String> = holders.iter().filter(|h| !live.contains(h)).collect();
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                let copies = checkpoint.outputs.len()
                    - checkpoint.outputs.iter().filter(|(_, _, w, _)| holders.contains(&w.instance_id)).count();
                info!(query = %id, outputs = checkpoint.outputs.len(), shared_copies = copies, ?missing, "query resumes from its checkpoint");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(checkpoint)
    }

    /// Runs a split query; `done`: outputs of its tasks that ran before (a checkpoint).
    async fn run_split(
        &self,
        query: &Arc<Query>,
        graph: &StageGraph,
        workers: Vec<String>,
        done: Vec<(usize, usize, WorkerInfo, crate::proto::TaskSuccess)>,
    ) {
        if !query.advance(Status::Running) && query.status().is_terminal() {
            return;
        }
        let distribution = query.submission.distribution.clone().expect("split queries are distributed");
        if let Some(checkpoints) = &self.inner.checkpoints
            && done.is_empty()
        {
            checkpoints.graph(query.id, graph, &workers);
        }
        let mut run = StageRun::new(&self.inner.workers, query, graph, &distribution, workers);
        run.checkpoint_to(self.inner.checkpoints.as_ref());
        for (stage, task, worker, success) in done {
            run.restore(stage, task, worker, success);
        }
        match run.run().await {
            _ if query.status().is_terminal() => {}
            Ok((success, worker, stages)) => {
                *query.worker.lock().unwrap() = Some(worker.clone());
                let mut outcome = query.outcome.lock().unwrap();
                outcome.files = success.files;
                outcome.n_rows = success.n_rows;
                outcome.head_ipc = success.head_ipc;
                outcome.flight_schema = success.flight_schema;
                outcome.workers_used = query.participants.lock().unwrap().len() as u32;
                outcome.stages = stages;
                drop(outcome);
                query.advance(Status::Success);
                info!(query = %query.id, "query succeeded");
            }
            Err(message) => {
                info!(query = %query.id, "query failed: {message}");
                query.fail(message);
            }
        }
    }

    /// Removes the query's shuffle files from every worker that ran a part of it.
    async fn release(&self, query: &Query) {
        let workers = query.participants.lock().unwrap().clone();
        self.release_on(query, workers).await;
    }

    /// Removes the query's shuffle files from every worker that registers within
    /// [`RESUME_WAIT`] (after a restart, those that ran a part of it are not all known, and
    /// they register again one by one).
    async fn release_everywhere(&self, query: &Query) {
        let mut released: Vec<String> = Vec::new();
        let deadline = tokio::time::Instant::now() + RESUME_WAIT;
        while tokio::time::Instant::now() < deadline {
            let fresh: Vec<WorkerInfo> = self
                .inner
                .workers
                .registry()
                .live_worker_infos()
                .into_iter()
                .filter(|w| !released.contains(&w.instance_id))
                .collect();
            released.extend(fresh.iter().map(|w| w.instance_id.clone()));
            self.release_on(query, fresh).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn release_on(&self, query: &Query, workers: Vec<WorkerInfo>) {
        for worker in workers {
            if let Ok(mut client) = self.inner.workers.task_client(&worker.task_addr) {
                let request = crate::proto::ReleaseQueryRequest { query_id: query.id.to_string() };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(10), client.release_query(request)).await {
                    warn!(query = %query.id, worker = %worker.instance_id, "cannot release the query's shuffle files: {e}");
                }
            }
        }
    }

    /// Keeps removing stored results older than `retention` (those of earlier runs of the
    /// scheduler too), at start and then every tenth of the retention (at most hourly).
    pub async fn expire_results(self, retention: Duration) {
        let mut tick = tokio::time::interval((retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600)));
        loop {
            tick.tick().await;
            let root = self.inner.result_root.clone();
            match tokio::task::spawn_blocking(move || remove_older_than(&root, retention)).await {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(n)) => tracing::info!(removed = n, retention = ?retention, "stored results expired"),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep the stored results"),
            }
            // The records of finished queries go with their results.
            let store = self.inner.store.clone();
            let before = SystemTime::now().checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
            match tokio::task::spawn_blocking(move || store.prune(before)).await {
                Ok(Ok(ids)) => {
                    let mut queries = self.inner.queries.lock().unwrap();
                    for id in ids {
                        queries.remove(&id);
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune the query table"),
                Err(_) => {}
            }
        }
    }

    /// Removes a query's result files.
    pub async fn delete_result(&self, query: &Query) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&query.result_dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The cluster's workers as queries use them.
    /// Workers that took part in a query still running: they may hold outputs it needs.
    pub fn workers_in_use(&self) -> std::collections::HashSet<String> {
        let queries: Vec<Arc<Query>> = self.inner.queries.lock().unwrap().values().cloned().collect();
        queries
            .iter()
            .filter(|q| !q.status().is_terminal())
            .flat_map(|q| q.participants.lock().unwrap().iter().map(|w| w.instance_id.clone()).collect::<Vec<_>>())
            .collect()
    }

    pub fn workers(&self) -> &Workers {
        &self.inner.workers
    }

    /// The worker that ran a query, as it is registered now (it may have registered again,
    /// at another address, since).
    pub fn worker_of(&self, query: &Query) -> Option<WorkerInfo> {
        let ran = query.worker.lock().unwrap().clone()?;
        let live = self.inner.workers.registry().live_worker_infos();
        Some(live.into_iter().find(|w| w.instance_id == ran.instance_id).unwrap_or(ran))
    }
}

/// The error of a query that would run whole on one worker with `single_worker_ops = FORBID`.
fn forbidden(why: &str) -> String {
    format!(
        "InvalidOperationError: the query would run whole on one worker because {why}, and single_worker_ops is FORBID; \
         allow single-worker operations or run it with .single_node()"
    )
}

/// The stage graph as the observatory stores it (an attribute of the query's span).
fn stage_graph_json(graph: &StageGraph) -> String {
    use engine::stage_graph::StageOutput;
    let stages: Vec<serde_json::Value> = graph
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let output = match &s.output {
                StageOutput::Single => "gather".to_string(),
                StageOutput::Hash { keys, partitions } => format!("hash({}) x{partitions}", keys.join(", ")),
                StageOutput::Result => "result".to_string(),
                StageOutput::Boundaries { key, .. } => format!("boundaries({key})"),
                StageOutput::Range { key, partitions, .. } => format!("range({key}) x{partitions}"),
                StageOutput::KeyRanges { key, lows } => format!("range({key}) x{}", lows.len() + 1),
            };
            serde_json::json!({ "stage": i, "label": s.label, "tasks": s.tasks.len(), "inputs": s.inputs, "output": output })
        })
        .collect();
    serde_json::Value::from(stages).to_string()
}

/// The stage graph as the official client reads it from `GetQueryPlans` (`stage_graph`,
/// MessagePack): stages (the result stage first), each a small chain of nodes: what the stage
/// does, the shuffle it writes and the shuffles it reads, with an edge per shuffle.
fn stage_graph_msgpack(graph: &StageGraph, query_id: &str) -> Vec<u8> {
    use engine::stage_graph::StageOutput;
    use serde_json::json;
    let partitioning = |output: &StageOutput| match output {
        StageOutput::Hash { keys, .. } => json!({ "partition_type": "Hash", "by": keys.join(", ") }),
        StageOutput::Range { key, .. } | StageOutput::KeyRanges { key, .. } => {
            json!({ "partition_type": "Hash", "by": format!("range of {key}") })
        }
        _ => json!({ "partition_type": "Single" }),
    };
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    for (i, stage) in graph.stages.iter().enumerate().rev() {
        let head = match &stage.output {
            StageOutput::Result => json!({ "id": 0, "type_id": "MapFunction", "properties": { "function": "RESULT" } }),
            output => json!({ "id": 0, "type_id": "ShuffleWrite",
                              "properties": { "shuffle_number": i, "is_local": false, "partitioning": partitioning(output) } }),
        };
        let mut data_nodes =
            vec![head, json!({ "id": 1, "type_id": "MapFunction", "properties": { "function": stage.label } })];
        let mut data_edges = vec![json!({ "source": 0, "target": 1 })];
        for &input in &stage.inputs {
            let id = data_nodes.len();
            data_nodes.push(json!({ "id": id, "type_id": "ShuffleRead", "properties": {
                "shuffle_number": input, "is_local": false, "schema_names": [],
                "partitioning": partitioning(&graph.stages[input].output) } }));
            data_edges.push(json!({ "source": 1, "target": id }));
            edges.push(json!({ "source": { "stage": input, "node": 0 }, "target": { "stage": i, "node": id } }));
        }
        nodes.push(json!({
            "stage_number": i,
            "title": format!("stage {i}: {} task(s)", stage.tasks.len()),
            "data": { "title": format!("stage {i}"), "num_roots": 1, "nodes": data_nodes, "edges": data_edges },
            "properties": {},
        }));
    }
    let value = json!({ "title": format!("query {query_id}"), "num_roots": 1, "nodes": nodes, "edges": edges });
    rmp_serde::to_vec_named(&value).unwrap_or_default()
}

/// What the scheduler learns from a submitted plan before it accepts it - the result target
/// and whether the plan reads files - or why it refuses it: a client of another Polars
/// version, unreadable bytes, a policy the plan breaks. `python`: the plan's Python functions
/// (`PythonPlan::find`). Never panics, whatever the bytes (tests/fuzz.rs holds it to that).
pub fn judge_plan(
    plan: &[u8],
    client_polars: Option<&str>,
    policy: Policy,
    python: Option<&PythonPlan>,
) -> Result<(engine::Target, bool), String> {
    check_version(client_polars, plan)?;
    match python {
        Some(python) => check_python_policy(policy).map(|()| (python.target.clone(), false)),
        None => engine::guard_panics(|| engine::Plan::read(plan))
            .map_err(|e| engine::describe_error(&e))
            .and_then(|read| check_policy(policy, &read).map(|()| (read.target.clone(), read.reads_files()))),
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

/// A Python function can read and write any file the worker can: where the scheduler
/// forbids local scans or sinks, it forbids Python functions too.
fn check_python_policy(policy: Policy) -> Result<(), String> {
    let forbidden = match (policy.allow_local_scans, policy.allow_local_sinks) {
        (true, true) => return Ok(()),
        (false, _) => "scheduler.allow_local_scans = false",
        (true, false) => "scheduler.allow_local_sinks = false",
    };
    Err(format!(
        "InvalidOperationError: the query calls Python functions, which can read and write any file of the worker, and this cluster does not allow queries to touch the local file system ({forbidden}); express them with Polars expressions, or run the query locally"
    ))
}

/// The Python of a worker (`worker.python_executable`), as it registered.
fn python_of(worker: &WorkerInfo) -> Option<PythonVersion> {
    PythonVersion::parse(&worker.python_version)
}

/// A query that calls Python needs a live worker whose Python loads its pickles: when workers
/// are live and none can, the query fails before any of them runs it, saying why for each.
fn python_workers(python: &PythonPlan, live: &[WorkerInfo]) -> Result<(), String> {
    let refusals: Vec<String> = live
        .iter()
        .map(|w| python.refusal(python_of(w)).map(|why| format!("{}: {why}", w.instance_id)))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default();
    if refusals.is_empty() {
        return Ok(());
    }
    let wanted = match python.pickled_by.as_slice() {
        [one] => format!("Python {one} (the client's)"),
        _ => "the client's Python".to_string(),
    };
    Err(format!(
        "ComputeError: the query calls Python functions, and no live worker can run them ({}); set worker.python_executable on the workers to {wanted} with polars=={} and cloudpickle installed",
        refusals.join("; "),
        engine::POLARS_VERSION
    ))
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

/// Removes the entries of `root` last modified more than `age` ago; how many.
fn remove_older_than(root: &std::path::Path, age: Duration) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        entries => entries?,
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age));
        if !old {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type().is_ok_and(|t| t.is_dir()) {
            true => std::fs::remove_dir_all(&path),
            false => std::fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
