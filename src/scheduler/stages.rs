//! Runs a split query on the scheduler: stage after stage, each task on one of the query's
//! workers, reading the shuffle files earlier stages wrote.
//!
//! Faults: a task whose worker stops answering reruns on another live worker; when a worker
//! is lost, the stage outputs it held are recomputed before any task that reads them runs
//! (the shuffle files lived on that worker). Each task may fail `scheduler.max_task_attempts`
//! times (plus the query's `n_retries`) before its query fails, whatever the client's settings.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use polars_node_engine::planner;
use polars_node_engine::stage_graph::{StageGraph, StageOutput, input_path};
use tracing::{info, warn};

use crate::proto::{
    RangeOutput, ResultTarget, RunTaskRequest, ShuffleFile, StageInput, StageTask, TaskSuccess, WorkerInfo,
    run_task_response::Outcome,
};
use crate::scheduler::query::{Attempts, Distribution, Query, StageStats};
use crate::scheduler::store::Checkpointer;
use crate::scheduler::workers::Workers;

/// What a finished task left behind.
#[derive(Clone)]
struct Done {
    worker: WorkerInfo,
    success: TaskSuccess,
    /// Its files are checkpoint copies on shared storage: they do not go with their worker.
    durable: bool,
}

pub(crate) struct StageRun<'a> {
    /// The cluster's workers: connections, the live set, task attempts.
    cluster: &'a Workers,
    query: &'a Arc<Query>,
    graph: &'a StageGraph,
    distribution: &'a Distribution,
    /// The workers this query runs on (ids), in the order tasks are dealt to them.
    workers: Vec<String>,
    /// Per stage, per task: the output of the task's last successful run.
    outputs: Vec<Vec<Option<Done>>>,
    stats: Vec<StageStats>,
    /// Failed runs per (stage, task).
    attempts: HashMap<(usize, usize), Attempts>,
    next: usize,
    /// The result task, once gather stages were fused into it (see [`StageRun::fuse_small_gathers`]).
    result_task: Option<Vec<u8>>,
    /// Per stage, the stages it reads (the plan's, but a fused result reads what the fused
    /// stages read).
    inputs: Vec<Vec<usize>>,
    fused: Vec<bool>,
    /// Where finished tasks are recorded (checkpoints on).
    checkpoints: Option<&'a Checkpointer>,
    /// Workers whose own resources failed during this query (a full disk): given no more of
    /// its tasks while others are live.
    avoid: Vec<String>,
}

/// A gather stage whose only reader is the result, and whose inputs add up to at most this
/// many bytes of shuffle files, runs inside the result task instead of as tasks of its own.
const FUSE_LIMIT: u64 = 16 << 20;

/// A task that did not succeed.
enum TaskError {
    /// The query fails with this message (`"<PolarsException>: message"`).
    Fatal(String),
    /// The task may run again: its worker was lost (`worker`), it could not read the
    /// shuffle files of `lost_input`, or some of its input files were damaged (`corrupt`).
    /// `crashed`: the worker answered (its execution process died), it was not lost.
    /// `worker_fault`: the worker's own resources failed (a full disk): the rest of the query
    /// avoids it.
    Retry {
        worker: String,
        lost_input: Option<String>,
        corrupt: Vec<String>,
        crashed: bool,
        worker_fault: bool,
        why: String,
    },
}

impl<'a> StageRun<'a> {
    pub(crate) fn new(
        cluster: &'a Workers,
        query: &'a Arc<Query>,
        graph: &'a StageGraph,
        distribution: &'a Distribution,
        workers: Vec<String>,
    ) -> Self {
        StageRun {
            cluster,
            query,
            graph,
            distribution,
            workers,
            outputs: graph.stages.iter().map(|s| vec![None; s.tasks.len()]).collect(),
            stats: graph
                .stages
                .iter()
                .map(|s| StageStats { tasks: s.tasks.len() as u32, label: s.label.clone(), ..Default::default() })
                .collect(),
            attempts: HashMap::new(),
            next: 0,
            result_task: None,
            inputs: graph.stages.iter().map(|s| s.inputs.clone()).collect(),
            fused: vec![false; graph.stages.len()],
            checkpoints: None,
            avoid: Vec::new(),
        }
    }

    /// Records every finished task (but the result's) in `checkpoints`.
    pub(crate) fn checkpoint_to(&mut self, checkpoints: Option<&'a Checkpointer>) {
        self.checkpoints = checkpoints;
    }

    /// A task's output from before a restart (a checkpoint): it is not run again while its
    /// worker is live (and recomputed like any lost output when it is not).
    pub(crate) fn restore(&mut self, stage: usize, task: usize, worker: WorkerInfo, success: TaskSuccess) {
        if self.outputs.get(stage).and_then(|s| s.get(task)).is_none() {
            warn!(query = %self.query.id, stage, task, "the checkpoint names a task the stage graph does not have");
            return;
        }
        self.note_output(stage, &worker, &success);
        let copies = success.checkpoint_files.len() == success.files.len() && !success.files.is_empty();
        let mut success = success;
        let durable = copies && success.checkpoint_shared;
        if copies {
            // Read from the copies: on shared storage whoever wrote them, else from their worker.
            success.files = std::mem::take(&mut success.checkpoint_files);
        }
        if !durable {
            self.query.note_participant(&worker);
        }
        self.outputs[stage][task] = Some(Done { worker, success, durable });
    }

    /// Counts a task's output in its stage's figures.
    fn note_output(&mut self, stage: usize, worker: &WorkerInfo, success: &TaskSuccess) {
        let stats = &mut self.stats[stage];
        stats.rows += success.n_rows;
        stats.bytes += success.bytes_written;
        if !stats.workers.contains(&worker.instance_id) {
            stats.workers.push(worker.instance_id.clone());
        }
    }

    /// Runs every stage; the last one's output is the query's result. Stages whose inputs are
    /// all done run together (the two sides of a hash join, say).
    pub(crate) async fn run(mut self) -> Result<(TaskSuccess, WorkerInfo, Vec<StageStats>), String> {
        let last = self.graph.stages.len() - 1;
        let mut depth = vec![0usize; self.graph.stages.len()];
        for (i, stage) in self.graph.stages.iter().enumerate() {
            depth[i] = stage.inputs.iter().map(|&d| depth[d] + 1).max().unwrap_or(0);
        }
        for level in 0..=depth[last] {
            let mut stages: Vec<usize> = (0..=last).filter(|&s| depth[s] == level).collect();
            self.fuse_small_gathers(&mut stages);
            if stages.is_empty() {
                continue;
            }
            let mut spans: Vec<_> = stages.iter().map(|&stage| self.stage_span(stage)).collect();
            let ran = self.ensure(&stages).await;
            for (span, &stage) in spans.iter_mut().zip(&stages) {
                span.set_attribute(KeyValue::new("polars.rows", self.stats[stage].rows as i64));
                span.set_attribute(KeyValue::new("polars.shuffle.bytes_written", self.stats[stage].bytes as i64));
                if let Err(e) = &ran {
                    span.set_status(opentelemetry::trace::Status::error(e.clone()));
                }
                span.end();
            }
            ran?;
            if self.query.status().is_terminal() {
                return Err("ComputeError: the query was canceled".into());
            }
            for &stage in &stages {
                self.query.stage_finished(stage, &self.stats);
            }
        }
        let done = self.outputs[last][0].clone().expect("the result stage ran");
        for s in (0..last).filter(|&s| self.fused[s]) {
            self.stats[s].workers = self.stats[last].workers.clone();
        }
        Ok((done.success, done.worker, self.stats))
    }

    /// The scheduler's span of a stage (its tasks and label as they are now: a fused stage has
    /// no tasks of its own).
    fn stage_span(&self, stage: usize) -> opentelemetry::global::BoxedSpan {
        crate::monitoring::span(
            "stage",
            [
                KeyValue::new("polars.query_id", self.query.id.to_string()),
                KeyValue::new("polars.stage", stage as i64),
                KeyValue::new("polars.tasks", self.stats[stage].tasks as i64),
                KeyValue::new("polars.stage.label", self.stats[stage].label.clone()),
            ],
        )
    }

    /// Takes out of `stages` the gather stages that the result task may as well compute: read
    /// only by the result, reading only other stages' outputs, and those small (the outputs
    /// are known by now). Their fragments move into the result task.
    fn fuse_small_gathers(&mut self, stages: &mut Vec<usize>) {
        let last = self.graph.stages.len() - 1;
        stages.retain(|&s| {
            let stage = &self.graph.stages[s];
            let readers: Vec<usize> = (0..=last).filter(|&r| self.inputs[r].contains(&s)).collect();
            let input_bytes: u64 = self.inputs[s].iter().map(|&i| self.stats[i].bytes).sum();
            let fusable = s != last
                && stage.output == StageOutput::Single
                && readers == [last]
                && !self.inputs[s].is_empty()
                && input_bytes <= FUSE_LIMIT
                && stage.tasks.iter().all(|t| planner::reads_only_inputs(t).unwrap_or(false));
            if !fusable {
                return true;
            }
            let consumer = self.result_task.clone().unwrap_or_else(|| self.graph.stages[last].tasks[0].clone());
            match planner::fuse(&consumer, s, &stage.tasks) {
                Ok(task) => {
                    info!(query = %self.query.id, stage = s, input_bytes, "small gather stage runs inside the result task");
                    self.result_task = Some(task);
                    let moved = self.inputs[s].clone();
                    self.inputs[last].retain(|&i| i != s);
                    self.inputs[last].extend(moved);
                    self.fused[s] = true;
                    self.stats[s].tasks = 0;
                    self.stats[s].label.push_str(" (run inside the result task)");
                    self.stats[s].finished = true;
                    let mut span = self.stage_span(s);
                    span.set_attribute(KeyValue::new("polars.stage.fused", true));
                    span.end();
                    false
                }
                Err(e) => {
                    warn!(query = %self.query.id, stage = s, "cannot fuse a gather stage into the result task: {e}");
                    true
                }
            }
        });
    }

    /// Makes sure every task of `stages` has an output on a live worker: their inputs first
    /// (recomputing outputs lost with a worker), then all their missing tasks at once.
    async fn ensure(&mut self, stages: &[usize]) -> Result<(), String> {
        loop {
            self.forget_lost_outputs();
            let inputs: BTreeSet<usize> = stages.iter().flat_map(|&s| self.inputs[s].iter().copied()).collect();
            if !inputs.is_empty() {
                Box::pin(self.ensure(&inputs.into_iter().collect::<Vec<_>>())).await?;
            }
            let outputs = &self.outputs;
            let missing: Vec<(usize, usize)> = stages
                .iter()
                .flat_map(|&s| outputs[s].iter().enumerate().filter(|(_, o)| o.is_none()).map(move |(t, _)| (s, t)))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if self.query.status().is_terminal() {
                return Err("ComputeError: the query was canceled".into());
            }
            let live = self.live_workers().await?;
            let assigned: Vec<(usize, usize, WorkerInfo, RunTaskRequest)> = missing
                .iter()
                .map(|&(stage, task)| (stage, task, self.deal(&live), self.request(stage, task)))
                .collect();
            let this = &*self;
            let runs = assigned.into_iter().map(|(stage, task, worker, request)| async move {
                let result = this.run_task(stage, task, &worker, request).await;
                (stage, task, worker, result)
            });
            let results = join_all(runs).await;
            for (stage, task, worker, result) in results {
                match result {
                    Ok(success) => {
                        self.note_output(stage, &worker, &success);
                        if let Some(checkpoints) = self.checkpoints
                            && stage != self.graph.stages.len() - 1
                        {
                            checkpoints.task_done(self.query.id, stage, task, &worker, &success);
                        }
                        self.outputs[stage][task] = Some(Done { worker, success, durable: false });
                    }
                    Err(TaskError::Fatal(message)) => return Err(message),
                    Err(TaskError::Retry { worker: ran_on, lost_input, corrupt, crashed, worker_fault, why }) => {
                        warn!(query = %self.query.id, stage, task, worker = %ran_on, "task must run again: {why}");
                        match (corrupt.is_empty(), worker_fault) {
                            // Damaged files are written again; their worker is not lost.
                            (false, _) => self.forget_outputs_with(&corrupt),
                            // A worker whose disk is full serves, but not the rest of this query.
                            (true, true) => self.avoid.push(ran_on.clone()),
                            (true, false) => {
                                self.cluster.suspect(lost_input.as_deref().unwrap_or(&ran_on)).await;
                                // Files that could not be fetched are written again, even where
                                // their worker still answers.
                                if let Some(holder) = &lost_input {
                                    self.forget_outputs_of(holder);
                                }
                            }
                        }
                        // The task itself did not crash when its inputs were the problem.
                        let input_problem = lost_input.is_some() || !corrupt.is_empty();
                        let label = format!("task {task} of stage {stage} ({})", self.graph.stages[stage].label);
                        let attempts = self
                            .attempts
                            .entry((stage, task))
                            .or_insert_with(|| self.cluster.attempts_for(self.query, label));
                        if let Some(message) = attempts.failed(&ran_on, &why, crashed && !input_problem) {
                            return Err(message);
                        }
                    }
                }
            }
        }
    }

    /// Drops the outputs that wrote any of `files` (damaged on disk or on the way): they are
    /// computed again before the tasks that read them run.
    fn forget_outputs_with(&mut self, files: &[String]) {
        self.forget_outputs("damaged", |done| done.success.files.iter().any(|f| files.contains(f)));
    }

    /// Drops the outputs `worker` holds for this query.
    fn forget_outputs_of(&mut self, worker: &str) {
        self.forget_outputs("could not be fetched", |done| !done.durable && done.worker.instance_id == worker);
    }

    /// Drops outputs held by workers that are no longer live: their files are gone with them.
    fn forget_lost_outputs(&mut self) {
        let live: BTreeSet<String> =
            self.cluster.registry().live_worker_infos().into_iter().map(|w| w.instance_id).collect();
        self.forget_outputs("lost with its worker", |done| !done.durable && !live.contains(&done.worker.instance_id));
    }

    /// Drops the outputs `gone` picks (saying `why`): they are recomputed before anything reads them.
    fn forget_outputs(&mut self, why: &str, gone: impl Fn(&Done) -> bool) {
        for (stage, tasks) in self.outputs.iter_mut().enumerate() {
            for (task, out) in tasks.iter_mut().enumerate() {
                if let Some(done) = out
                    && gone(done)
                {
                    info!(query = %self.query.id, stage, task, worker = %done.worker.instance_id, "stage output {why}; it will be recomputed");
                    *out = None;
                }
            }
        }
    }

    /// The query's workers that are live now, with other live workers in place of lost ones;
    /// waits a bounded time when there are fewer than the query's minimum.
    async fn live_workers(&self) -> Result<Vec<WorkerInfo>, String> {
        let mut all = self.cluster.wait_for_workers(self.distribution.min_workers.max(1)).await?;
        if all.iter().any(|w| !self.avoid.contains(&w.instance_id)) {
            all.retain(|w| !self.avoid.contains(&w.instance_id));
        }
        let mut chosen: Vec<WorkerInfo> =
            self.workers.iter().filter_map(|id| all.iter().find(|w| &w.instance_id == id).cloned()).collect();
        for w in &all {
            if chosen.len() >= self.workers.len() {
                break;
            }
            if !chosen.iter().any(|c| c.instance_id == w.instance_id) {
                chosen.push(w.clone());
            }
        }
        Ok(chosen)
    }

    /// The next worker for a task, round robin over the query's live workers.
    fn deal(&mut self, live: &[WorkerInfo]) -> WorkerInfo {
        let w = live[self.next % live.len()].clone();
        self.next += 1;
        w
    }

    fn request(&self, stage: usize, task: usize) -> RunTaskRequest {
        let plan = &self.graph.stages[stage];
        let fused_result = stage == self.graph.stages.len() - 1 && self.result_task.is_some();
        let mut inputs = Vec::new();
        for &input in &self.inputs[stage] {
            let output = &self.graph.stages[input].output;
            let partitions = match output.is_partitioned() {
                // Consumer task `i` reads partition `i`; a result that does a fused stage's
                // work reads every partition.
                true if fused_result => (0..output.partitions()).map(Some).collect(),
                true => vec![Some(task)],
                false => vec![None],
            };
            for part in partitions {
                let files = self.outputs[input]
                    .iter()
                    .map(|out| {
                        let done = out.as_ref().expect("inputs run first");
                        ShuffleFile {
                            path: done.success.files[part.unwrap_or(0)].clone(),
                            // Copies on shared storage are read where they are.
                            shuffle_addr: match done.durable {
                                true => String::new(),
                                false => done.worker.shuffle_addr.clone().unwrap_or_default(),
                            },
                            worker_id: done.worker.instance_id.clone(),
                            checksum: done.success.checksums.get(part.unwrap_or(0)).copied(),
                        }
                    })
                    .collect();
                inputs.push(StageInput { placeholder: input_path(input, part), files });
            }
        }
        let (hash_keys, partitions) = match &plan.output {
            StageOutput::Hash { keys, partitions } => (keys.clone(), *partitions as u32),
            StageOutput::Range { partitions, .. } | StageOutput::Boundaries { partitions, .. } => {
                (Vec::new(), *partitions as u32)
            }
            StageOutput::KeyRanges { lows, .. } => (Vec::new(), lows.len() as u32 + 1),
            _ => (Vec::new(), 1),
        };
        let range = match &plan.output {
            StageOutput::Boundaries { key, descending, nulls_last, .. } => Some(RangeOutput {
                key: key.clone(),
                descending: *descending,
                nulls_last: *nulls_last,
                boundaries_only: true,
                boundaries_input: String::new(),
                lows: Vec::new(),
            }),
            StageOutput::Range { key, descending, nulls_last, boundaries, .. } => Some(RangeOutput {
                key: key.clone(),
                descending: *descending,
                nulls_last: *nulls_last,
                boundaries_only: false,
                boundaries_input: input_path(*boundaries, None),
                lows: Vec::new(),
            }),
            StageOutput::KeyRanges { key, lows } => Some(RangeOutput {
                key: key.clone(),
                descending: false,
                nulls_last: false,
                boundaries_only: false,
                boundaries_input: String::new(),
                lows: lows.clone(),
            }),
            _ => None,
        };
        let shuffle = &self.distribution.shuffle;
        let target = match plan.output {
            StageOutput::Result => self.query.result_target(),
            _ => ResultTarget::Shuffle,
        };
        RunTaskRequest {
            query_id: self.query.id.to_string(),
            plan: match (&self.result_task, fused_result) {
                (Some(fused), true) => fused.clone(),
                _ => plan.tasks[task].clone(),
            },
            engine: self.query.submission.engine as i32,
            optimization_flags: self.query.submission.optimization_flags,
            result_dir: self.query.result_dir.display().to_string(),
            head_rows: crate::scheduler::query::HEAD_ROWS,
            target: target as i32,
            stage: Some(StageTask {
                stage: stage as u32,
                task: task as u32,
                inputs,
                hash_keys,
                partitions,
                format: shuffle.format as i32,
                compression: shuffle.compression as i32,
                compression_level: shuffle.level,
                range,
            }),
            output_dir: String::new(),
            report_ir_plan: false,
            python: false,
            python_executable: String::new(),
            checkpoint: self.checkpoints.is_some(),
            // Set by Workers::with_policy as the task is sent.
            deny_local_scans: false,
            deny_local_sinks: false,
        }
    }

    async fn run_task(
        &self,
        stage: usize,
        task: usize,
        worker: &WorkerInfo,
        request: RunTaskRequest,
    ) -> Result<TaskSuccess, TaskError> {
        let mut span = crate::monitoring::span(
            "task",
            [
                KeyValue::new("polars.query_id", self.query.id.to_string()),
                KeyValue::new("polars.stage", stage as i64),
                KeyValue::new("polars.task", task as i64),
                KeyValue::new("polars.worker", worker.instance_id.clone()),
            ],
        );
        self.query.note_participant(worker);
        let _running = self.cluster.running_on(&worker.instance_id);
        let started = Instant::now();
        let result = match self.cluster.task_client(&worker.task_addr) {
            // Given up when the worker is declared lost, even if its connection stays open (a
            // frozen machine); its late answer is dropped with the call.
            Ok(mut client) => tokio::select! {
                result = client.run_task(self.cluster.with_policy(request)) => result.map(|r| r.into_inner().outcome),
                () = self.cluster.lost(&worker.instance_id) => {
                    Err(tonic::Status::unavailable("the worker was declared lost (no heartbeats) while it ran the task"))
                }
            },
            Err(status) => Err(status),
        };
        let result = match result {
            Ok(Some(Outcome::Success(s))) => {
                span.set_attribute(KeyValue::new("polars.rows", s.n_rows as i64));
                span.set_attribute(KeyValue::new("polars.shuffle.bytes_written", s.bytes_written as i64));
                Ok(s)
            }
            Ok(Some(Outcome::Failure(f))) if !f.retryable => Err(TaskError::Fatal(f.message)),
            Ok(Some(Outcome::Failure(f))) => Err(TaskError::Retry {
                worker: worker.instance_id.clone(),
                lost_input: Some(f.lost_worker).filter(|w| !w.is_empty()),
                corrupt: f.corrupt_files,
                crashed: !f.worker_fault,
                worker_fault: f.worker_fault,
                why: f.message,
            }),
            Ok(None) => Err(TaskError::Retry {
                worker: worker.instance_id.clone(),
                lost_input: None,
                corrupt: Vec::new(),
                crashed: false,
                worker_fault: false,
                why: "the worker sent no outcome".into(),
            }),
            Err(status) => Err(TaskError::Retry {
                worker: worker.instance_id.clone(),
                lost_input: None,
                corrupt: Vec::new(),
                crashed: false,
                worker_fault: false,
                why: status.message().to_string(),
            }),
        };
        if result.is_err() {
            span.set_status(opentelemetry::trace::Status::error("the task did not succeed"));
        }
        span.set_attribute(KeyValue::new("polars.duration_ms", started.elapsed().as_millis() as i64));
        span.end();
        result
    }
}
