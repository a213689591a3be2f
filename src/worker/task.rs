//! The worker's task service: runs each query task in an execution process (see
//! [`crate::worker::executor`]), where `worker.env_vars` reach the engine without touching the
//! worker's own environment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opentelemetry::trace::Span as _;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::proto::ResultTarget;
use crate::proto::task_server::Task;
use crate::proto::{
    CancelTaskRequest, CancelTaskResponse, FetchResultRequest, ReleaseQueryRequest, ReleaseQueryResponse, ResultChunk,
    RunTaskRequest, RunTaskResponse, TaskFailure, run_task_response::Outcome,
};
use crate::systemd::cgroup::MemoryWatch;
use crate::worker::executor::Executors;
use crate::worker::python::{self, PythonEnv};
use crate::worker::shuffle::ShuffleStore;
use polars_node_engine as engine;

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    executors: Executors,
    shuffle: ShuffleStore,
    /// `worker.python_executable`, for plans that call Python.
    python: Option<PythonEnv>,
    /// The enforced `memory_limit`, to tell an execution process the kernel killed for it.
    memory: Option<MemoryWatch>,
    /// Execution process id of each running task (by query id, stage and task), with its query.
    running: Mutex<HashMap<String, (String, u32)>>,
    /// Queries canceled while running: their process was killed on purpose.
    canceled: Mutex<HashSet<String>>,
    /// Result files this worker wrote: the only files FetchResult serves.
    written: Mutex<HashSet<PathBuf>>,
}

impl TaskService {
    pub fn new(
        env_vars: BTreeMap<String, String>,
        shuffle: ShuffleStore,
        python: Option<PythonEnv>,
        memory: Option<MemoryWatch>,
    ) -> std::io::Result<Self> {
        Ok(TaskService {
            inner: Arc::new(Inner {
                executors: Executors::new(env_vars)?,
                shuffle,
                python,
                memory,
                running: Mutex::default(),
                canceled: Mutex::default(),
                written: Mutex::default(),
            }),
        })
    }

    /// Runs a task in `executor`, known as running (for cancellation) while it does.
    async fn run_in(
        &self,
        executor: &mut crate::worker::executor::Executor,
        key: &str,
        query_id: &str,
        request: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.inner.running.lock().unwrap().insert(key.to_string(), (query_id.to_string(), executor.pid()));
        let out = executor.run(query_id, request).await;
        self.inner.running.lock().unwrap().remove(key);
        out
    }

    /// Kills every running task: the scheduler no longer knows this worker (it declared it
    /// lost, or restarted), so their results would be dropped and they run elsewhere; a
    /// worker that wakes from a freeze must not go on writing what its reruns write.
    pub fn abandon_all(&self) -> usize {
        let pids: Vec<u32> = self.inner.running.lock().unwrap().values().map(|(_, p)| *p).collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        pids.len()
    }

    /// Tasks still running (for a graceful stop).
    pub fn running(&self) -> usize {
        self.inner.running.lock().unwrap().len()
    }

    async fn execute(&self, mut request: RunTaskRequest) -> Result<RunTaskResponse, String> {
        let query_id = request.query_id.clone();
        let key = match &request.stage {
            Some(stage) => format!("{query_id}/{}/{}", stage.stage, stage.task),
            None => query_id.clone(),
        };
        if let Some(stage) = request.stage.as_mut() {
            if let Err(e) = self.inner.shuffle.fetch_inputs(&query_id, stage).await {
                let mut response = failure(&format!("ComputeError: {}", e.message), true);
                if let Some(Outcome::Failure(f)) = response.outcome.as_mut() {
                    f.lost_worker = e.lost_worker;
                    f.corrupt_files = e.corrupt_files;
                }
                return Ok(response);
            }
            request.output_dir =
                self.inner.shuffle.output_dir(&query_id, stage.stage, stage.task).display().to_string();
        }
        request.report_ir_plan = crate::monitoring::exporting();
        if request.python {
            match &self.inner.python {
                Some(env) => request.python_executable = env.executable.display().to_string(),
                // The scheduler sends such plans only to workers with Python: another may have one.
                None => {
                    return Ok(failure(
                        "ComputeError: this worker has no Python environment (worker.python_executable)",
                        true,
                    ));
                }
            }
        }
        let encoded = request.encode_to_vec();
        let mut executor =
            self.inner.executors.take().map_err(|e| format!("cannot start an execution process: {e}"))?;
        let oom_kills = self.inner.memory.as_ref().map(MemoryWatch::oom_kills);
        let mut out = self.run_in(&mut executor, &key, &query_id, &encoded).await;
        if let (Err(_), Some(memory), Some(before)) = (&out, &self.inner.memory, oom_kills)
            && memory.oom_kills() > before
            && !self.inner.canceled.lock().unwrap().contains(&query_id)
        {
            // The same words each time: a second worker's identical failure ends the query.
            return Err(format!(
                "the query needs more memory than the worker's memory_limit = {} bytes ({:.1} GiB) allows: the kernel's \
                 OOM killer stopped its execution process. Give the workers more memory (memory_limit) or make the \
                 query need less (the streaming engine, fewer columns, a filter first)",
                memory.limit,
                memory.limit as f64 / (1u64 << 30) as f64
            ));
        }
        if out.is_err() && executor.waited() && !self.inner.canceled.lock().unwrap().contains(&query_id) {
            // A process can die while it waits (the OOM killer, an operator): the task was
            // maybe never read, so it gets one new process before it counts as failed.
            warn!(query = %query_id, pid = executor.pid(), "an idle execution process died; the task runs in a new one");
            executor = self.inner.executors.start().map_err(|e| format!("cannot start an execution process: {e}"))?;
            out = self.run_in(&mut executor, &key, &query_id, &encoded).await;
        }
        if self.inner.canceled.lock().unwrap().contains(&query_id) {
            return Ok(failure("ComputeError: the query was canceled", false));
        }
        let out = out?;
        info!(query = %query_id, pid = executor.pid(), "task ran in execution process");
        self.inner.executors.give_back(executor);
        let mut response =
            RunTaskResponse::decode(out.as_slice()).map_err(|e| format!("unreadable task result: {e}"))?;
        if let Some(Outcome::Failure(f)) = &mut response.outcome
            && out_of_space(&f.message)
        {
            // The worker's disk is full, not the query wrong: the task runs elsewhere.
            let place = match request.target == ResultTarget::Shuffle as i32 {
                true => format!("its shuffle files under {}", self.inner.shuffle.root().display()),
                false => format!("the result under {}", request.result_dir),
            };
            f.message = format!(
                "ComputeError: worker `{}` has no space left on device for {place}: {}",
                self.inner.shuffle.instance_id(),
                f.message
            );
            f.retryable = true;
            f.worker_fault = true;
        }
        if let Some(Outcome::Success(s)) = &mut response.outcome {
            if request.target == ResultTarget::Shuffle as i32 {
                // Shuffle outputs go where readers find them (an object store uploads them).
                let (stage, task) = request.stage.as_ref().map(|s| (s.stage as i64, s.task as i64)).unwrap_or_default();
                let mut span = crate::monitoring::span(
                    "shuffle.write",
                    crate::monitoring::task_attributes(&query_id, stage, task).into_iter().chain([
                        opentelemetry::KeyValue::new("polars.shuffle.files", s.files.len() as i64),
                        opentelemetry::KeyValue::new("polars.shuffle.bytes_written", s.bytes_written as i64),
                    ]),
                );
                // Checksums of the files as written, for their readers to check.
                let files = s.files.clone();
                s.checksums = tokio::task::spawn_blocking(move || {
                    files.iter().map(|f| crate::worker::shuffle::checksum(Path::new(f))).collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read back a shuffle file to checksum it: {e}"))?;
                if request.checkpoint
                    && let Some((copies, shared)) = self.inner.shuffle.checkpoint(&query_id, &s.files).await?
                {
                    s.checkpoint_files = copies;
                    s.checkpoint_shared = shared;
                }
                let published = self.inner.shuffle.publish(&query_id, std::mem::take(&mut s.files)).await;
                if let Err(e) = &published {
                    span.set_status(opentelemetry::trace::Status::error(e.clone()));
                }
                span.end();
                s.files = published?;
            } else {
                self.inner.written.lock().unwrap().extend(s.files.iter().map(PathBuf::from));
            }
        }
        Ok(response)
    }
}

/// An error of a full file system (ENOSPC), as the engine reports it.
fn out_of_space(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("os error 28")
}

fn failure(message: &str, retryable: bool) -> RunTaskResponse {
    RunTaskResponse {
        outcome: Some(Outcome::Failure(TaskFailure {
            message: message.into(),
            retryable,
            lost_worker: String::new(),
            corrupt_files: Vec::new(),
            worker_fault: false,
        })),
    }
}

#[tonic::async_trait]
impl Task for TaskService {
    async fn run_task(&self, request: Request<RunTaskRequest>) -> Result<Response<RunTaskResponse>, Status> {
        let request = request.into_inner();
        let query_id = request.query_id.clone();
        let (stage, task) = request.stage.as_ref().map(|s| (s.stage as i64, s.task as i64)).unwrap_or((0, 0));
        info!(query = %query_id, stage, task, "task started");
        let mut span = crate::monitoring::span(
            "task.execute",
            crate::monitoring::task_attributes(&query_id, stage, task)
                .into_iter()
                .chain([opentelemetry::KeyValue::new("polars.plan_bytes", request.plan.len() as i64)]),
        );
        let response = match self.execute(request).await {
            Ok(r) => r,
            Err(e) => {
                warn!(query = %query_id, "task failed: {e}");
                failure(&format!("ComputeError: {e}"), true)
            }
        };
        info!(query = %query_id, ok = matches!(response.outcome, Some(Outcome::Success(_))), "task ended");
        match &response.outcome {
            Some(Outcome::Success(s)) => {
                span.set_attribute(opentelemetry::KeyValue::new("polars.rows", s.n_rows as i64));
                span.set_attribute(opentelemetry::KeyValue::new(
                    "polars.shuffle.bytes_written",
                    s.bytes_written as i64,
                ));
                if !s.ir_plan.is_empty() {
                    span.set_attribute(opentelemetry::KeyValue::new("polars.plan.ir", s.ir_plan.clone()));
                }
            }
            Some(Outcome::Failure(f)) => span.set_status(opentelemetry::trace::Status::error(f.message.clone())),
            None => {}
        }
        span.end();
        Ok(Response::new(response))
    }

    async fn cancel_task(&self, request: Request<CancelTaskRequest>) -> Result<Response<CancelTaskResponse>, Status> {
        let query_id = request.into_inner().query_id;
        // Marked first, so that a task starting now is reported as canceled too.
        self.inner.canceled.lock().unwrap().insert(query_id.clone());
        let pids: Vec<u32> =
            self.inner.running.lock().unwrap().values().filter(|(q, _)| *q == query_id).map(|(_, p)| *p).collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        if !pids.is_empty() {
            info!(query = %query_id, tasks = pids.len(), "tasks canceled");
        }
        Ok(Response::new(CancelTaskResponse { was_running: !pids.is_empty() }))
    }

    async fn release_query(
        &self,
        request: Request<ReleaseQueryRequest>,
    ) -> Result<Response<ReleaseQueryResponse>, Status> {
        let query_id = request.into_inner().query_id;
        self.inner.shuffle.release(&query_id).await;
        self.inner.canceled.lock().unwrap().remove(&query_id);
        Ok(Response::new(ReleaseQueryResponse {}))
    }

    type FetchResultStream = ReceiverStream<Result<ResultChunk, Status>>;

    async fn fetch_result(
        &self,
        request: Request<FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let path = PathBuf::from(request.into_inner().path);
        if !self.inner.written.lock().unwrap().contains(&path) {
            return Err(Status::not_found(format!("{} is not a result of this worker", path.display())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            // A Flight result is read once: streamed whole, it is removed with its directory.
            if stream_file(path.clone(), tx).await {
                inner.written.lock().unwrap().remove(&path);
                let _ = tokio::fs::remove_file(&path).await;
                if let Some(dir) = path.parent() {
                    let _ = tokio::fs::remove_dir(dir).await; // only when nothing else is in it
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Streams a file in 1 MiB chunks; the bounded channel keeps memory bounded. True when the
/// whole file went out.
async fn stream_file(path: PathBuf, tx: tokio::sync::mpsc::Sender<Result<ResultChunk, Status>>) -> bool {
    tokio::task::spawn_blocking(move || match std::fs::File::open(&path) {
        Ok(file) => crate::worker::shuffle::read_chunks(file, |chunk| {
            tx.blocking_send(chunk.map(|data| ResultChunk { data }).map_err(|e| Status::internal(e.to_string())))
                .is_ok()
        }),
        Err(e) => {
            let _ = tx.blocking_send(Err(Status::not_found(format!("{}: {e}", path.display()))));
            false
        }
    })
    .await
    .unwrap_or(false)
}

/// The execution process: runs each RunTaskRequest it reads on stdin with the engine and
/// answers with a RunTaskResponse on stdout. Engine errors are outcomes, not process failures.
pub fn exec_task() -> Result<(), String> {
    // Initialise before a task arrives: a spare process is ready when it does.
    engine::init();
    engine::warm_up();
    crate::worker::executor::serve(|input| match RunTaskRequest::decode(input) {
        Ok(request) => engine::guard_panics(|| Ok(run_task_here(&request)))
            .unwrap_or_else(|e| failure(&engine::describe_error(&e), false))
            .encode_to_vec(),
        Err(e) => failure(&format!("ComputeError: unreadable task: {e}"), false).encode_to_vec(),
    })
}

fn run_task_here(request: &RunTaskRequest) -> RunTaskResponse {
    use crate::proto::EngineChoice;
    let choice = match EngineChoice::try_from(request.engine).unwrap_or(EngineChoice::Auto) {
        EngineChoice::Streaming => engine::EngineChoice::Streaming,
        EngineChoice::InMemory => engine::EngineChoice::InMemory,
        EngineChoice::Gpu => engine::EngineChoice::Gpu,
        EngineChoice::Auto | EngineChoice::Unspecified => engine::EngineChoice::Auto,
    };
    let target = match ResultTarget::try_from(request.target).unwrap_or(ResultTarget::Unspecified) {
        ResultTarget::Flight => engine::Target::Flight,
        ResultTarget::User => engine::Target::User,
        ResultTarget::Shuffle => engine::Target::User, // not a result: see run_stage
        _ => engine::Target::InMemory,
    };
    match &request.stage {
        Some(stage) => run_stage(request, stage, choice, target),
        None => run_whole(request, choice, target),
    }
}

/// A whole query, as the client sent it.
fn run_whole(request: &RunTaskRequest, choice: engine::EngineChoice, target: engine::Target) -> RunTaskResponse {
    use polars_node_engine as engine;
    if request.python {
        return run_in_python(request, choice, target);
    }
    let outcome = engine::Plan::read(&request.plan).and_then(|plan| {
        check_policy(request, &plan)?;
        if plan.target != target {
            polars_node_engine::polars::prelude::polars_bail!(ComputeError: "the plan's sink does not match the task's result target");
        }
        // The plan as optimized for this run, for the observatory (an unexplainable plan
        // still runs); another optimisation pass, so only when traces go somewhere.
        let ir_plan = match request.report_ir_plan {
            true => plan.explain(request.optimization_flags).unwrap_or_default(),
            false => String::new(),
        };
        plan.execute(choice, request.optimization_flags, Path::new(&request.result_dir), request.head_rows as usize)
            .map(|done| (done, ir_plan))
    });
    match outcome {
        Ok((done, ir_plan)) => RunTaskResponse { outcome: Some(Outcome::Success(result_success(done, ir_plan))) },
        Err(e) => failure(&engine::describe_error(&e), false),
    }
}

/// A whole query that calls Python: py-polars runs it in a directory of its own, where the
/// client's placeholder sink writes its output; that output then becomes the result as any
/// other query's does (a user's sink was written by py-polars itself).
fn run_in_python(request: &RunTaskRequest, choice: engine::EngineChoice, target: engine::Target) -> RunTaskResponse {
    if request.deny_local_scans || request.deny_local_sinks {
        let setting = if request.deny_local_scans { "allow_local_scans" } else { "allow_local_sinks" };
        return failure(
            &format!(
                "InvalidOperationError: refused by the worker: the task calls Python functions, which can read and write \
                 any file of the worker, and this cluster does not allow queries to touch the local file system \
                 (scheduler.{setting} = false)"
            ),
            false,
        );
    }
    let dir = Path::new(&request.result_dir).join(format!("python-{}", std::process::id()));
    let engine_name = match choice {
        engine::EngineChoice::Streaming => "streaming",
        engine::EngineChoice::InMemory => "in-memory",
        _ => "auto",
    };
    let ran = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("ComputeError: cannot create {}: {e}", dir.display()))
        .and_then(|()| python::run(Path::new(&request.python_executable), &request.plan, engine_name, &dir));
    let outcome = ran.and_then(|()| {
        let output = match target {
            engine::Target::InMemory => dir.join("<in-memory>"),
            engine::Target::Flight => dir.join("<flight>"),
            engine::Target::User => {
                return Ok(engine::Executed {
                    n_rows: 0,
                    files: Vec::new(),
                    head_ipc: Vec::new(),
                    flight_schema: Vec::new(),
                });
            }
        };
        engine::Plan::python_output(&output, target)
            .and_then(|plan| plan.execute(choice, None, Path::new(&request.result_dir), request.head_rows as usize))
            .map_err(|e| engine::describe_error(&e))
    });
    let _ = std::fs::remove_dir_all(&dir);
    match outcome {
        Ok(done) => RunTaskResponse { outcome: Some(Outcome::Success(result_success(done, String::new()))) },
        Err(message) => failure(&message, false),
    }
}

/// The scheduler's file-system policy, sent with the task, checked again here (defence in
/// depth: the scheduler refused such queries already). Shuffle inputs are checked before they
/// are pointed at local files.
fn check_policy(request: &RunTaskRequest, plan: &engine::Plan) -> engine::polars::prelude::PolarsResult<()> {
    use engine::polars::prelude::polars_bail;
    let local = plan.local_paths();
    if request.deny_local_scans && !local.scans.is_empty() {
        polars_bail!(InvalidOperation: "refused by the worker: this cluster does not allow queries to read the local file system (scheduler.allow_local_scans = false), and the task reads {}", local.scans.join(", "));
    }
    if request.deny_local_sinks && !local.sinks.is_empty() {
        polars_bail!(InvalidOperation: "refused by the worker: this cluster does not allow queries to write to the local file system (scheduler.allow_local_sinks = false), and the task writes {}", local.sinks.join(", "));
    }
    Ok(())
}

/// What a task that wrote the query's result reports.
fn result_success(done: engine::Executed, ir_plan: String) -> crate::proto::TaskSuccess {
    crate::proto::TaskSuccess {
        files: done.files.iter().map(|p| p.display().to_string()).collect(),
        n_rows: done.n_rows,
        head_ipc: done.head_ipc,
        flight_schema: done.flight_schema,
        ir_plan,
        ..Default::default()
    }
}

/// One task of a split query: the scheduler's fragment, reading the fetched shuffle files in
/// place of its input placeholders, writing shuffle partitions or the query's result.
fn run_stage(
    request: &RunTaskRequest,
    stage: &crate::proto::StageTask,
    choice: engine::EngineChoice,
    target: engine::Target,
) -> RunTaskResponse {
    use crate::proto::{ShuffleCompression, ShuffleFormat, TaskSuccess};
    use engine::stage_graph::StageOutput;

    let codec = match ShuffleCompression::try_from(stage.compression).unwrap_or_default() {
        ShuffleCompression::Zstd => engine::shuffle::Codec::Zstd,
        ShuffleCompression::Uncompressed => engine::shuffle::Codec::Uncompressed,
        _ => engine::shuffle::Codec::Lz4,
    };
    let parquet = stage.format == ShuffleFormat::Parquet as i32;
    let format = match engine::shuffle::ShuffleFormat::new(parquet, codec, stage.compression_level) {
        Ok(f) => f,
        Err(e) => return failure(&engine::describe_error(&e), false),
    };
    let inputs: std::collections::HashMap<String, Vec<PathBuf>> = stage
        .inputs
        .iter()
        .map(|i| (i.placeholder.clone(), i.files.iter().map(|f| PathBuf::from(&f.path)).collect()))
        .collect();
    let is_result = request.target != ResultTarget::Shuffle as i32;
    let outcome = engine::Plan::fragment(&request.plan, target).and_then(|mut plan| {
        check_policy(request, &plan)?;
        plan.with_inputs(&inputs)?;
        if is_result {
            // The scheduler reports the whole query's plan of a split query.
            let ir_plan = String::new();
            let done = plan.execute(
                choice,
                request.optimization_flags,
                Path::new(&request.result_dir),
                request.head_rows as usize,
            )?;
            return Ok(result_success(done, ir_plan));
        }
        let (output, boundaries) = match &stage.range {
            Some(r) if r.boundaries_only => (
                StageOutput::Boundaries {
                    key: r.key.clone(),
                    descending: r.descending,
                    nulls_last: r.nulls_last,
                    partitions: stage.partitions.max(1) as usize,
                },
                None,
            ),
            Some(r) if !r.lows.is_empty() => {
                (StageOutput::KeyRanges { key: r.key.clone(), lows: r.lows.clone() }, None)
            }
            Some(r) => {
                let files = inputs.get(&r.boundaries_input).cloned().unwrap_or_default();
                let boundaries = engine::shuffle::read_boundaries(&files)?;
                let output = StageOutput::Range {
                    key: r.key.clone(),
                    descending: r.descending,
                    nulls_last: r.nulls_last,
                    partitions: stage.partitions.max(1) as usize,
                    boundaries: 0, // the boundaries themselves were read above
                };
                (output, Some(boundaries))
            }
            None if stage.hash_keys.is_empty() => (StageOutput::Single, None),
            None => (
                StageOutput::Hash { keys: stage.hash_keys.clone(), partitions: stage.partitions.max(1) as usize },
                None,
            ),
        };
        let written = plan.execute_stage(
            choice,
            request.optimization_flags,
            &output,
            boundaries.as_ref(),
            format,
            Path::new(&request.output_dir),
        )?;
        Ok(TaskSuccess {
            files: written.files.iter().map(|p| p.display().to_string()).collect(),
            n_rows: written.rows,
            bytes_written: written.bytes,
            ..Default::default()
        })
    });
    match outcome {
        Ok(success) => RunTaskResponse { outcome: Some(Outcome::Success(success)) },
        Err(e) => failure(&engine::describe_error(&e), false),
    }
}
