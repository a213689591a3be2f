//! Execution processes: the worker runs every task in a child process (this same binary,
//! `polars-node exec-task`), so that a task can be stopped for real by killing it and a crash
//! in the engine costs one task rather than the worker.
//!
//! A process serves one task after another: starting one and warming up its engine costs
//! milliseconds that a query of many short stage tasks pays again and again. A task is
//! framed on the process's stdin (little-endian u32 length, then the protobuf
//! `RunTaskRequest`) and answered the same way on stdout; the process exits at end of input.
//! The worker keeps a few idle processes, one of them always started ahead of the next task,
//! and retires a process after [`TASKS_PER_PROCESS`] tasks so that nothing a task leaves
//! behind (memory the allocator keeps, caches) grows without bound. A killed (canceled) or
//! failed process is never reused.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tracing::{info, warn};

/// Tasks one process runs before it is retired.
pub const TASKS_PER_PROCESS: u32 = 256;
/// Idle processes a worker keeps (each holds an initialised engine and its thread pools).
const MAX_IDLE: usize = 4;
/// Lines of a process's stderr kept to explain its failure.
const TAIL_LINES: usize = 8;

/// The worker's execution processes.
pub struct Executors {
    exe: PathBuf,
    env_vars: BTreeMap<String, String>,
    idle: Mutex<Vec<Executor>>,
}

/// One execution process, between tasks or running one.
pub struct Executor {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    pid: u32,
    log: Arc<Mutex<EngineLog>>,
    stderr: tokio::task::JoinHandle<()>,
    tasks: u32,
    /// It waited among the idle processes before its current task.
    waited: bool,
}

/// What the process writes on stderr: logged as it comes, with the query it works for; the
/// last lines are kept for the error of a process that died.
#[derive(Default)]
struct EngineLog {
    query: String,
    tail: VecDeque<String>,
}

impl Executors {
    pub fn new(env_vars: BTreeMap<String, String>) -> std::io::Result<Self> {
        Ok(Executors { exe: std::env::current_exe()?, env_vars, idle: Mutex::default() })
    }

    /// An idle process if one is alive, else a new one; when that leaves no idle process, one
    /// is started for the next task.
    pub fn take(&self) -> std::io::Result<Executor> {
        let (reused, none_left) = {
            let mut idle = self.idle.lock().unwrap();
            let mut reused = None;
            while let Some(mut e) = idle.pop() {
                if e.alive() {
                    e.waited = true;
                    reused = Some(e);
                    break;
                }
            }
            (reused, idle.is_empty())
        };
        let executor = match reused {
            Some(e) => e,
            None => self.start()?,
        };
        if none_left {
            match self.start() {
                Ok(spare) => self.idle.lock().unwrap().push(spare),
                Err(e) => warn!("cannot start a spare execution process: {e}"),
            }
        }
        Ok(executor)
    }

    /// A process whose task ended normally goes back to the idle ones (unless it has served
    /// its share of tasks or enough are idle already).
    pub fn give_back(&self, executor: Executor) {
        let mut idle = self.idle.lock().unwrap();
        if executor.tasks < TASKS_PER_PROCESS && idle.len() < MAX_IDLE {
            idle.push(executor);
        }
    }

    /// A new process (for a task, or to wait as a spare).
    pub fn start(&self) -> std::io::Result<Executor> {
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("exec-task")
            .envs(&self.env_vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only an async-signal-safe prctl between fork and exec. It makes the process
        // die with its worker, so a killed worker leaves no work (and no idle process) behind.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        let (stdin, stdout, stderr) = (
            child.stdin.take().expect("piped"),
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
        );
        let log = Arc::new(Mutex::new(EngineLog::default()));
        let stderr = tokio::spawn(forward_stderr(stderr, pid, log.clone()));
        Ok(Executor { child, stdin, stdout, pid, log, stderr, tasks: 0, waited: false })
    }
}

impl Executor {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it came from the idle processes (rather than being started for its task).
    pub fn waited(&self) -> bool {
        self.waited
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends one encoded `RunTaskRequest` and returns the encoded response. An error means
    /// the process is gone (killed, crashed): it says how it ended and what it last wrote.
    pub async fn run(&mut self, query_id: &str, request: &[u8]) -> Result<Vec<u8>, String> {
        {
            let mut log = self.log.lock().unwrap();
            log.query = query_id.to_string();
            log.tail.clear();
        }
        self.tasks += 1;
        let exchange = async {
            self.stdin.write_all(&(request.len() as u32).to_le_bytes()).await?;
            self.stdin.write_all(request).await?;
            self.stdin.flush().await?;
            let mut len = [0u8; 4];
            self.stdout.read_exact(&mut len).await?;
            let mut response = vec![0u8; u32::from_le_bytes(len) as usize];
            self.stdout.read_exact(&mut response).await?;
            std::io::Result::Ok(response)
        };
        match exchange.await {
            Ok(response) => Ok(response),
            Err(e) => {
                let status = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    _ => format!("a broken pipe ({e})"),
                };
                // The rest of its stderr (a panic message) arrives once the process is gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.stderr).await;
                let tail: Vec<String> = self.log.lock().unwrap().tail.iter().cloned().collect();
                Err(format!("the execution process exited with {status}: {}", tail.join("\n")))
            }
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.stderr.abort();
    }
}

async fn forward_stderr(stderr: tokio::process::ChildStderr, pid: u32, log: Arc<Mutex<EngineLog>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let mut log = log.lock().unwrap();
        info!(query = %log.query, pid, "engine: {line}");
        if log.tail.len() == TAIL_LINES {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
}

/// The execution process's side: answers every framed request on stdin with `run` until
/// stdin ends.
pub fn serve(mut run: impl FnMut(&[u8]) -> Vec<u8>) -> Result<(), String> {
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    loop {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let mut request = vec![0u8; u32::from_le_bytes(len) as usize];
        input.read_exact(&mut request).map_err(|e| format!("a truncated task: {e}"))?;
        let response = run(&request);
        output.write_all(&(response.len() as u32).to_le_bytes()).map_err(|e| e.to_string())?;
        output.write_all(&response).map_err(|e| e.to_string())?;
        output.flush().map_err(|e| e.to_string())?;
    }
}
