//! A query as the scheduler keeps it: what the client submitted, its state (SCHEDULED ->
//! RUNNING -> SUCCESS / FAILED / CANCELED), what it produced, and the failed runs of its tasks.
//! The lifecycle (`queries`) and the stage runner (`stages`) both work on these records.

use std::path::PathBuf;
use std::sync::Mutex;

use polars_node_engine as engine;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::proto::{EngineChoice, ResultTarget, WorkerInfo};
use crate::scheduler::store::QueryStore;

/// Rows returned inline with a stored result (`.head`).
pub(crate) const HEAD_ROWS: u32 = 10;
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

    /// The state as the query table keeps it (the protocol's number).
    pub fn from_number(n: i64) -> Option<Status> {
        [Status::Scheduled, Status::Running, Status::Success, Status::Failed, Status::Canceled]
            .into_iter()
            .find(|s| *s as i64 == n)
    }
}

/// What a query asked for, but its plan (kept in the query table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub engine: EngineChoice,
    pub optimization_flags: Option<u32>,
    pub n_retries: u32,
    /// Plan only (`explain`): OPTIMIZE_IR or PLAN of the protocol's ExecuteUntil.
    pub plan_only: Option<i32>,
    pub user: Option<String>,
    /// Set for `execute()` in distributed mode (the client's default); unset for `.single_node()`.
    pub distribution: Option<Distribution>,
}

/// How a distributed query may be split (the client's `DistributedOpts` and worker bounds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Distribution {
    pub shuffle: ShuffleSettings,
    /// Workers asked for: `n_workers` (a number is min = max), unset = scheduler defaults.
    pub min_workers: u32,
    pub max_workers: Option<u32>,
    pub partitions_per_worker: Option<u32>,
    pub broadcast_limit: u64,
    /// `single_worker_ops = FORBID`: fail rather than run the whole query on one worker.
    pub forbid_single_worker: bool,
    /// Aggregate within each part before shuffling (`allow_pre_aggregation`).
    pub pre_aggregate: bool,
    /// Sort by range partitions (`allow_partitioned_sort`).
    pub partitioned_sort: bool,
}

/// Shuffle file format, resolved (AUTO = IPC with LZ4).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ShuffleSettings {
    pub format: crate::proto::ShuffleFormat,
    pub compression: crate::proto::ShuffleCompression,
    pub level: Option<i32>,
}

/// What one stage did, for the client (`num_workers_used`) and the observatory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageStats {
    pub label: String,
    pub tasks: u32,
    pub rows: u64,
    pub bytes: u64,
    pub workers: Vec<String>,
    pub finished: bool,
}

/// The outcome the client reads once the query is terminal.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryOutcome {
    pub files: Vec<String>,
    pub n_rows: u64,
    pub head_ipc: Vec<u8>,
    /// Schema message of a Flight result.
    pub flight_schema: Vec<u8>,
    /// `"<PolarsException>: message"` of a failed query.
    pub error: Option<String>,
    pub workers_used: u32,
    /// One entry per stage (one stage for a query run whole).
    pub stages: Vec<StageStats>,
    /// The stage graph, as text (empty for a query run whole).
    pub stage_graph: String,
    /// The stage graph as JSON for the observatory: `[{stage, label, tasks, inputs, output}]`.
    pub stage_graph_json: String,
    /// The optimized logical plan of a split query (EXPLAIN format).
    pub logical_plan: String,
    /// The stage graph in the MessagePack form the official client draws (GetQueryPlans).
    pub stage_graph_msgpack: Vec<u8>,
}

pub struct Query {
    pub id: Uuid,
    /// The serialized plan, while the query may still need it: a finished query's plan is
    /// read back from the query table when asked for (`explain`), not kept in memory.
    pub(crate) plan: Mutex<Option<bytes::Bytes>>,
    pub submission: Submission,
    pub target: engine::Target,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) outcome: Mutex<QueryOutcome>,
    /// Where the query runs now (for a split query: where its result task ran).
    pub(crate) worker: Mutex<Option<WorkerInfo>>,
    /// Every worker that ran a task of the query (to cancel and release it there).
    pub(crate) participants: Mutex<Vec<WorkerInfo>>,
    pub result_dir: PathBuf,
    /// The plan scans files (only such plans are split).
    pub(crate) reads_files: bool,
    /// The plan calls Python functions (it runs whole, in a worker's py-polars).
    pub(crate) python: Option<engine::python::PythonPlan>,
    /// The query table, where every state is written before anyone can see it.
    pub(crate) store: QueryStore,
    /// When it reached a final state (it then leaves the scheduler's memory after a while,
    /// and is read back from the query table when asked for).
    pub(crate) ended: std::sync::OnceLock<std::time::Instant>,
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
    /// The new state (with the outcome and workers as they are) is in the query table before
    /// it is published: a client told SUCCESS finds the query again after a restart.
    pub(crate) fn advance(&self, next: Status) -> bool {
        self.status.send_if_modified(|s| {
            if s.is_terminal() || *s == next {
                return false;
            }
            self.save(next);
            *s = next;
            if next.is_terminal() {
                // Plans may carry whole data frames: a finished query's is read back if needed.
                self.plan.lock().unwrap().take();
                let _ = self.ended.set(std::time::Instant::now());
            }
            true
        })
    }

    /// The query's serialized plan.
    pub fn plan(&self) -> Result<bytes::Bytes, String> {
        if let Some(plan) = self.plan.lock().unwrap().clone() {
            return Ok(plan);
        }
        match self.store.plan_of(self.id) {
            Ok(Some(plan)) => Ok(plan.into()),
            Ok(None) => Err(format!("the plan of query {} is no longer kept", self.id)),
            Err(e) => Err(format!("cannot read the plan of query {} from the query table: {e}", self.id)),
        }
    }

    /// Writes the query's record in state `status` to the query table.
    pub(crate) fn save(&self, status: Status) {
        let outcome = self.outcome();
        let worker = self.worker.lock().unwrap().clone();
        let participants = self.participants.lock().unwrap().clone();
        if let Err(e) = self.store.update(self.id, status, &outcome, worker.as_ref(), &participants) {
            tracing::warn!(query = %self.id, "cannot write the query's state to the query table: {e}");
        }
    }

    pub(crate) fn fail(&self, message: String) {
        self.outcome.lock().unwrap().error = Some(message);
        self.advance(Status::Failed);
    }

    /// Notes a worker that runs a task of the query (to cancel and release it there).
    pub(crate) fn note_participant(&self, worker: &WorkerInfo) {
        let mut all = self.participants.lock().unwrap();
        if !all.iter().any(|w| w.instance_id == worker.instance_id) {
            all.push(worker.clone());
        }
    }

    /// A stage of a split query finished (progress for the client and the observatory).
    pub(crate) fn stage_finished(&self, stage: usize, stats: &[StageStats]) {
        let mut outcome = self.outcome.lock().unwrap();
        outcome.stages = stats.to_vec();
        if let Some(s) = outcome.stages.get_mut(stage) {
            s.finished = true;
        }
        for (i, s) in outcome.stages.iter_mut().enumerate() {
            s.finished |= i < stage;
        }
    }

    /// Where the query's result task writes.
    pub(crate) fn result_target(&self) -> ResultTarget {
        match self.target {
            engine::Target::InMemory => ResultTarget::Stored,
            engine::Target::Flight => ResultTarget::Flight,
            engine::Target::User => ResultTarget::User,
        }
    }
}

/// The failed runs of one task: a lost worker or a dead execution process means another run
/// elsewhere, until the task has failed `allowed` times, or its execution process died twice
/// with the same error (an engine crash that a rerun would only repeat).
pub(crate) struct Attempts {
    task: String,
    allowed: u32,
    /// (worker, why, whether the worker answered: its execution process died).
    failed: Vec<(String, String, bool)>,
}

impl Attempts {
    /// No failed run yet of `task`, which may fail `allowed` times.
    pub(crate) fn new(task: String, allowed: u32) -> Attempts {
        Attempts { task, allowed, failed: Vec::new() }
    }

    /// Records a failed run; the query's error when the task may not run again.
    pub(crate) fn failed(&mut self, worker: &str, why: &str, crashed: bool) -> Option<String> {
        let same_crash = crashed && self.failed.iter().any(|(_, w, c)| *c && w == why);
        self.failed.push((worker.to_string(), why.to_string(), crashed));
        let runs = || self.failed.iter().map(|(w, why, _)| format!("on `{w}`: {why}")).collect::<Vec<_>>().join("; ");
        if same_crash {
            return Some(format!(
                "ComputeError: {} crashed its execution process twice with the same error ({})",
                self.task,
                runs()
            ));
        }
        (self.failed.len() as u32 >= self.allowed).then(|| {
            format!(
                "ComputeError: {} failed {} time(s), as many as scheduler.max_task_attempts (plus the query's n_retries) allows ({})",
                self.task,
                self.failed.len(),
                runs()
            )
        })
    }
}
