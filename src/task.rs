//! The worker's task service: runs each query task in its own execution process (this same
//! binary, `polars-node exec-task`), so that a task can be stopped for real by killing it, a
//! crash in the engine costs one task rather than the worker, and `worker.env_vars` reach
//! the engine without touching the worker's own environment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::{Span as _, Tracer as _};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::proto::task_server::Task;
use crate::proto::{
    CancelTaskRequest, CancelTaskResponse, FetchResultRequest, ResultChunk, RunTaskRequest, RunTaskResponse,
    TaskFailure, run_task_response::Outcome,
};

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    exe: PathBuf,
    env_vars: BTreeMap<String, String>,
    /// Execution process id of each running task, by query id.
    running: Mutex<HashMap<String, u32>>,
    /// Queries canceled while running: their process was killed on purpose.
    canceled: Mutex<HashSet<String>>,
    /// Result files this worker wrote: the only files FetchResult serves.
    written: Mutex<HashSet<PathBuf>>,
}

impl TaskService {
    pub fn new(env_vars: BTreeMap<String, String>) -> std::io::Result<Self> {
        Ok(TaskService {
            inner: Arc::new(Inner {
                exe: std::env::current_exe()?,
                env_vars,
                running: Mutex::default(),
                canceled: Mutex::default(),
                written: Mutex::default(),
            }),
        })
    }

    /// Tasks still running (for a graceful stop).
    pub fn running(&self) -> usize {
        self.inner.running.lock().unwrap().len()
    }

    async fn execute(&self, request: RunTaskRequest) -> Result<RunTaskResponse, String> {
        let query_id = request.query_id.clone();
        let mut command = tokio::process::Command::new(&self.inner.exe);
        command
            .arg("exec-task")
            .envs(&self.inner.env_vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only an async-signal-safe prctl between fork and exec. It makes the task die
        // with its worker, so a killed worker leaves no work behind.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start the execution process: {e}"))?;
        if let Some(pid) = child.id() {
            self.inner.running.lock().unwrap().insert(query_id.clone(), pid);
        }
        let mut stdin = child.stdin.take().expect("piped");
        let input = request.encode_to_vec();
        let write = async move {
            stdin.write_all(&input).await?;
            stdin.shutdown().await
        };
        let (mut stdout, mut stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (written, read_out, read_err) =
            tokio::join!(write, stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        let status = child.wait().await;
        self.inner.running.lock().unwrap().remove(&query_id);
        let canceled = self.inner.canceled.lock().unwrap().remove(&query_id);
        let err_text = String::from_utf8_lossy(&err);
        if !err_text.trim().is_empty() {
            for line in err_text.lines() {
                info!(query = %query_id, "engine: {line}");
            }
        }
        if canceled {
            return Ok(failure("ComputeError: the query was canceled", false));
        }
        let status = status.map_err(|e| e.to_string())?;
        if !status.success() || written.is_err() || read_out.is_err() || read_err.is_err() {
            let tail: String = err_text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(format!("the execution process exited with {status}: {tail}"));
        }
        let response = RunTaskResponse::decode(out.as_slice()).map_err(|e| format!("unreadable task result: {e}"))?;
        if let Some(Outcome::Success(s)) = &response.outcome {
            self.inner.written.lock().unwrap().extend(s.files.iter().map(PathBuf::from));
        }
        Ok(response)
    }
}

fn failure(message: &str, retryable: bool) -> RunTaskResponse {
    RunTaskResponse { outcome: Some(Outcome::Failure(TaskFailure { message: message.into(), retryable })) }
}

#[tonic::async_trait]
impl Task for TaskService {
    async fn run_task(&self, request: Request<RunTaskRequest>) -> Result<Response<RunTaskResponse>, Status> {
        let request = request.into_inner();
        let query_id = request.query_id.clone();
        info!(query = %query_id, "task started");
        let tracer = opentelemetry::global::tracer("polars-node");
        let mut span = tracer
            .span_builder("task.execute")
            .with_attributes([
                opentelemetry::KeyValue::new("polars.query_id", query_id.clone()),
                opentelemetry::KeyValue::new("polars.stage", 0i64),
                opentelemetry::KeyValue::new("polars.plan_bytes", request.plan.len() as i64),
            ])
            .start(&tracer);
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
                span.set_attribute(opentelemetry::KeyValue::new("polars.plan.ir", s.ir_plan.clone()));
            }
            Some(Outcome::Failure(f)) => span.set_status(opentelemetry::trace::Status::error(f.message.clone())),
            None => {}
        }
        span.end();
        Ok(Response::new(response))
    }

    async fn cancel_task(&self, request: Request<CancelTaskRequest>) -> Result<Response<CancelTaskResponse>, Status> {
        let query_id = request.into_inner().query_id;
        let pid = self.inner.running.lock().unwrap().get(&query_id).copied();
        if let Some(pid) = pid {
            self.inner.canceled.lock().unwrap().insert(query_id.clone());
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            info!(query = %query_id, "task canceled");
        }
        Ok(Response::new(CancelTaskResponse { was_running: pid.is_some() }))
    }

    type FetchResultStream = ReceiverStream<Result<ResultChunk, Status>>;

    async fn fetch_result(&self, request: Request<FetchResultRequest>) -> Result<Response<Self::FetchResultStream>, Status> {
        let path = PathBuf::from(request.into_inner().path);
        if !self.inner.written.lock().unwrap().contains(&path) {
            return Err(Status::not_found(format!("{} is not a result of this worker", path.display())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(stream_file(path, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Streams a file in 1 MiB chunks; the bounded channel keeps memory bounded.
async fn stream_file(path: PathBuf, tx: tokio::sync::mpsc::Sender<Result<ResultChunk, Status>>) {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(Status::not_found(format!("{}: {e}", path.display())))).await;
            return;
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx.send(Ok(ResultChunk { data: buf[..n].to_vec() })).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
        }
    }
}

/// The execution process: reads a RunTaskRequest on stdin, runs it with the engine, writes
/// the RunTaskResponse on stdout. Engine errors are outcomes, not process failures.
pub fn exec_task() -> Result<(), String> {
    use crate::proto::{EngineChoice, ResultTarget, TaskSuccess};
    use polars_node_engine as engine;
    use std::io::{Read, Write};

    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).map_err(|e| e.to_string())?;
    let request = RunTaskRequest::decode(input.as_slice()).map_err(|e| format!("unreadable task: {e}"))?;
    engine::init();
    let choice = match EngineChoice::try_from(request.engine).unwrap_or(EngineChoice::Auto) {
        EngineChoice::Streaming => engine::EngineChoice::Streaming,
        EngineChoice::InMemory => engine::EngineChoice::InMemory,
        EngineChoice::Gpu => engine::EngineChoice::Gpu,
        EngineChoice::Auto | EngineChoice::Unspecified => engine::EngineChoice::Auto,
    };
    let outcome = engine::Plan::read(&request.plan).and_then(|plan| {
        let expected = match ResultTarget::try_from(request.target).unwrap_or(ResultTarget::Unspecified) {
            ResultTarget::Flight => engine::Target::Flight,
            ResultTarget::User => engine::Target::User,
            _ => engine::Target::InMemory,
        };
        if plan.target != expected {
            polars_node_engine::polars::prelude::polars_bail!(ComputeError: "the plan's sink does not match the task's result target");
        }
        // The plan as optimized for this run, for the observatory (an unexplainable plan
        // still runs).
        let ir_plan = plan.explain(request.optimization_flags).unwrap_or_default();
        plan.execute(choice, request.optimization_flags, Path::new(&request.result_dir), request.head_rows as usize)
            .map(|done| (done, ir_plan))
    });
    let response = match outcome {
        Ok((done, ir_plan)) => RunTaskResponse {
            outcome: Some(Outcome::Success(TaskSuccess {
                files: done.files.iter().map(|p| p.display().to_string()).collect(),
                n_rows: done.n_rows,
                head_ipc: done.head_ipc,
                flight_schema: done.flight_schema,
                ir_plan,
            })),
        },
        Err(e) => failure(&engine::describe_error(&e), false),
    };
    std::io::stdout().write_all(&response.encode_to_vec()).map_err(|e| e.to_string())
}
