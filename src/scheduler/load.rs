//! The scheduler under the membership load of a large cluster (`polars-node bench-scheduler`,
//! run by bench/run.sh): a real scheduler process, and N simulated workers that register and
//! heartbeat every second. Each simulated worker has its own loopback address (127.x.y.z, one
//! port): it registers and sends its heartbeat datagrams from there, as a real worker does
//! from its host, and advertises it, where one listener answers every worker's health check
//! (the scheduler probes a worker before it accepts it). Reports the scheduler's CPU (share of one
//! core) and memory while the workers heartbeat, and how long registering them took.
//!
//! With `dispatch`, the same listener serves the task service of every simulated worker: it
//! notes when each RunTask arrives (and at which worker's address), holds it, and fails it
//! once the stage's tasks have all arrived. The command prints `{"ready": CLIENT_URI}` and
//! waits for two queries (bench/dispatch.py submits them with the official client, each a
//! stage of one task per worker: the first finds no connections to the workers, the second
//! those the first made) and then for its stdin to close; the report gives the arrival times,
//! so the submitter measures planning and dispatch on its own clock.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::membership::HeartbeatKey;
use crate::proto::membership_client::MembershipClient;
use crate::proto::run_task_response::Outcome;
use crate::proto::task_server::{Task, TaskServer};
use crate::proto::{
    CancelTaskRequest, CancelTaskResponse, FetchResultRequest, ListWorkersRequest, RegisterRequest, RegisterResponse,
    ReleaseQueryRequest, ReleaseQueryResponse, ResultChunk, RunTaskRequest, RunTaskResponse, TaskFailure, WorkerInfo,
    WorkerState,
};
use crate::worker::registration::{DatagramBeats, DatagramsEnded};

/// Queries whose first stage is timed: the first on new connections, the second on them.
const DISPATCHED_STAGES: usize = 2;
/// How long a dispatched stage may be quiet before its tasks count as all arrived.
const STAGE_QUIET: Duration = Duration::from_secs(2);

/// Runs the scheduler at `exe` with `workers` simulated workers for `seconds` of heartbeats,
/// then, with `dispatch`, times the dispatch of the first stage of two submitted queries.
pub async fn run(exe: &Path, workers: usize, seconds: u64, dispatch: bool) -> Result<Value, String> {
    let dir = std::env::temp_dir().join(format!("polars-node-bench-scheduler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Health checks of every simulated worker's address. The queue of connections waiting to
    // be accepted is as long as the system allows: a thousand workers' connections arrive at
    // once (each worker has a queue of its own in a real cluster).
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind("0.0.0.0:0".parse().expect("an address")).map_err(|e| e.to_string())?;
    let health = socket.listen(4096).map_err(|e| e.to_string())?;
    let health_port = health.local_addr().map_err(|e| e.to_string())?.port();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let tasks = SimulatedTasks::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(TaskServer::new(tasks.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(health)),
    );

    let (worker_port, client_port) = (free_port()?, free_port()?);
    let config = dir.join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "instance_id = \"scheduler\"\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{client_port}\"\n\
             worker_service.bind_addr = \"127.0.0.1:{worker_port}\"\ndatabase_path = \"{}\"\n\
             anonymous_result_location.local.path = \"{}\"\n",
            dir.join("queries.db").display(),
            dir.join("results").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("scheduler.log")).map_err(|e| e.to_string())?;
    let scheduler = Command::new(exe)
        .args(["service", "--config-path"])
        .arg(&config)
        .env("PLC_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let scheduler = Stopped(scheduler);
    let pid = scheduler.0.id();

    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{worker_port}")).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admin = loop {
        match endpoint.connect().await {
            Ok(channel) => break MembershipClient::new(channel),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(format!("the scheduler does not answer: {e}")),
        }
    };

    // Each simulated worker: registers (64 at a time) on a connection of its own that closes
    // once it is registered, then sends heartbeat datagrams every second from its own address
    // as a worker does (`DatagramBeats`), and registers again when they end.
    let started = Instant::now();
    let registering = Arc::new(tokio::sync::Semaphore::new(64));
    let registered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let unanswered = Arc::new(AtomicUsize::new(0));
    let (_running, stop) = tokio::sync::watch::channel(false);
    let mut beats = tokio::task::JoinSet::new();
    for i in 0..workers {
        let info = simulated(i, health_port);
        let own = info.task_addr.parse::<std::net::SocketAddr>().map_err(|e| e.to_string())?.ip();
        let endpoint = endpoint.clone().local_address(Some(own));
        let (registering, registered, refused, sent, unanswered) =
            (registering.clone(), registered.clone(), refused.clone(), sent.clone(), unanswered.clone());
        let mut stop = stop.clone();
        beats.spawn(async move {
            loop {
                let registration = {
                    let _permit = registering.acquire().await;
                    let mut client = MembershipClient::new(endpoint.connect_lazy());
                    client.register(RegisterRequest { worker: Some(info.clone()) }).await
                };
                let socket = match registration {
                    Ok(r) => datagram_socket(own, r.into_inner()).await,
                    Err(e) => Err(e.message().to_string()),
                };
                let Ok((socket, scheduler, key, lost_after)) = socket else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                registered.fetch_add(1, Ordering::Relaxed);
                let period = Duration::from_secs(1);
                let instance_id = &info.instance_id;
                let beats = DatagramBeats { socket, scheduler, key, instance_id, period, lost_after };
                // Unknown, or unanswered: register again.
                match beats.run(&sent, &mut stop).await {
                    DatagramsEnded::Unanswered(_) => unanswered.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while registered.load(Ordering::Relaxed) < workers {
        if Instant::now() > deadline {
            return Err(format!("only {} of {workers} workers registered", registered.load(Ordering::Relaxed)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registration = started.elapsed();
    let registrations_before = registered.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await; // past the registration burst
    let (cpu_before, beats_before, at) = (cpu_ticks(pid)?, sent.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = at.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second() / elapsed;
    let beat_rate = (sent.load(Ordering::Relaxed) - beats_before) as f64 / elapsed;
    let (rss, peak) = memory(pid)?;
    let listed = admin.list_workers(ListWorkersRequest {}).await.map_err(|s| s.message().to_string())?;
    let alive = listed.into_inner().workers.iter().filter(|w| w.state == WorkerState::Alive as i32).count();
    // Registrations beyond the first of each worker: workers the scheduler lost meanwhile.
    let registered_again = registered.load(Ordering::Relaxed) - registrations_before;
    let dispatched = match dispatch {
        true => Some(tasks.time_stages(client_port, DISPATCHED_STAGES).await?),
        false => None,
    };
    beats.abort_all();
    drop(scheduler);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "dispatch": dispatched,
        "workers": workers,
        "alive_at_end": alive,
        "registered_again_while_measured": registered_again,
        "registrations_refused": refused.load(Ordering::Relaxed),
        // Heartbeat datagrams of a registration that went unanswered for the scheduler's
        // patience (then the worker registers again); the rest of the registrations beyond the
        // first were answered "unknown" (the scheduler marked the worker lost).
        "datagrams_unanswered": unanswered.load(Ordering::Relaxed),
        "registration_s": registration.as_secs_f64(),
        // Datagrams sent; the scheduler answers each one.
        "heartbeats_per_s": beat_rate,
        "scheduler_cpu_of_one_core": cpu,
        "scheduler_rss_mib": rss as f64 / 1024.0,
        "scheduler_peak_rss_mib": peak as f64 / 1024.0,
        "seconds": seconds,
    }))
}

/// The task services of all simulated workers: RunTask calls are noted and held.
#[derive(Clone, Default)]
struct SimulatedTasks {
    /// Arrival (Unix time, ns) and the simulated worker's address of each RunTask of the
    /// stage being timed.
    arrivals: Arc<Mutex<Vec<(u128, String)>>>,
    /// Stages let go so far: a held task fails once the stage it arrived in is let go.
    released: Arc<tokio::sync::watch::Sender<u64>>,
}

impl SimulatedTasks {
    /// Prints the client service's address, then for each of `stages` queries waits for its
    /// stage to arrive (until it has been quiet for `STAGE_QUIET`) and fails its tasks; then
    /// waits for stdin to close. The first query finds no connection to the simulated task
    /// services, the next ones find those the first made (as on a cluster that has run queries).
    async fn time_stages(&self, client_port: u16, stages: usize) -> Result<Value, String> {
        println!("{}", json!({ "ready": format!("http://127.0.0.1:{client_port}") }));
        let mut timed = Vec::new();
        for _ in 0..stages {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut seen = 0;
            loop {
                tokio::time::sleep(STAGE_QUIET).await;
                let now = self.arrivals.lock().unwrap().len();
                if now > 0 && now == seen {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("no stage arrived within 5 minutes ({now} tasks)"));
                }
                seen = now;
            }
            let arrivals = std::mem::take(&mut *self.arrivals.lock().unwrap());
            self.released.send_modify(|n| *n += 1);
            let workers: std::collections::BTreeSet<&String> = arrivals.iter().map(|(_, w)| w).collect();
            timed.push(json!({
                "tasks": arrivals.len(),
                "workers": workers.len(),
                "first_arrival_unix_ns": arrivals.iter().map(|(t, _)| *t).min().unwrap_or(0) as u64,
                "last_arrival_unix_ns": arrivals.iter().map(|(t, _)| *t).max().unwrap_or(0) as u64,
            }));
        }
        let closed = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()));
        let _ = tokio::time::timeout(Duration::from_secs(120), closed).await;
        Ok(Value::Array(timed))
    }
}

#[tonic::async_trait]
impl Task for SimulatedTasks {
    async fn run_task(&self, request: Request<RunTaskRequest>) -> Result<Response<RunTaskResponse>, Status> {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let worker = request.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        let stage = {
            let mut arrivals = self.arrivals.lock().unwrap();
            arrivals.push((at, worker));
            *self.released.borrow()
        };
        let _ = self.released.subscribe().wait_for(|released| *released > stage).await;
        Ok(Response::new(RunTaskResponse {
            outcome: Some(Outcome::Failure(TaskFailure {
                message: "ComputeError: a simulated worker runs no tasks".into(),
                ..Default::default()
            })),
        }))
    }

    async fn cancel_task(&self, _: Request<CancelTaskRequest>) -> Result<Response<CancelTaskResponse>, Status> {
        Ok(Response::new(CancelTaskResponse { was_running: false }))
    }

    type FetchResultStream = tokio_stream::Empty<Result<ResultChunk, Status>>;

    async fn fetch_result(&self, _: Request<FetchResultRequest>) -> Result<Response<Self::FetchResultStream>, Status> {
        Err(Status::unimplemented("a simulated worker holds no results"))
    }

    async fn release_query(&self, _: Request<ReleaseQueryRequest>) -> Result<Response<ReleaseQueryResponse>, Status> {
        Ok(Response::new(ReleaseQueryResponse {}))
    }
}

/// A simulated worker's heartbeat socket at its own address `own`, the port the registration
/// names, the registration's key and the scheduler's patience.
async fn datagram_socket(
    own: std::net::IpAddr,
    registration: RegisterResponse,
) -> Result<(tokio::net::UdpSocket, std::net::SocketAddr, HeartbeatKey, u32), String> {
    if registration.heartbeat_port == 0 {
        return Err("the scheduler takes no heartbeat datagrams".into());
    }
    let socket = tokio::net::UdpSocket::bind((own, 0)).await.map_err(|e| e.to_string())?;
    let scheduler = (std::net::Ipv4Addr::LOCALHOST, registration.heartbeat_port as u16).into();
    let key = HeartbeatKey::from_bytes(&registration.heartbeat_key);
    Ok((socket, scheduler, key, registration.lost_after_missed_heartbeats))
}

/// Worker `i` at its own loopback address (127.x.y.z), all served by one listener.
fn simulated(i: usize, port: u16) -> WorkerInfo {
    let n = i + 1;
    let addr = format!("127.{}.{}.{}:{port}", 1 + n / 65_536, (n / 256) % 256, n % 256);
    WorkerInfo {
        instance_id: format!("sim-{i}"),
        cluster_id: "polars-onprem".into(),
        task_addr: addr.clone(),
        shuffle_addr: Some(addr),
        cpus: 1,
        memory_bytes: 1 << 30,
        version: crate::VERSION.into(),
        heartbeat_period_ms: 1000,
        python_version: String::new(),
    }
}

/// The scheduler is killed when the benchmark ends, however it ends.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// User and system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("the scheduler died: {e}"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Ok(field(11) + field(12)) // utime, stime (fields 14 and 15 of stat)
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

/// Resident and peak resident memory of `pid`, in KiB.
fn memory(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let kib = |key: &str| {
        status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    Ok((kib("VmRSS:"), kib("VmHWM:")))
}
