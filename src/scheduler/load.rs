//! The scheduler under the membership load of a large cluster (`polars-node bench-scheduler`,
//! run by bench/run.sh): a real scheduler process, and N simulated workers that register and
//! heartbeat every second. Each simulated worker advertises its own loopback address
//! (127.0.x.y, one port), so the scheduler keeps one connection per worker as it would in a
//! real cluster; one listener on every address answers their health checks (the scheduler
//! probes a worker before it accepts it). Reports the scheduler's CPU (share of one core) and
//! memory while the workers heartbeat, and how long registering them took.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::transport::Endpoint;

use crate::proto::membership_client::MembershipClient;
use crate::proto::{HeartbeatRequest, ListWorkersRequest, RegisterRequest, WorkerInfo, WorkerState};

/// gRPC connections the simulated workers share (each carries many workers' calls).
const CONNECTIONS: usize = 16;

/// Runs the scheduler at `exe` with `workers` simulated workers for `seconds` of heartbeats.
pub async fn run(exe: &Path, workers: usize, seconds: u64) -> Result<Value, String> {
    let dir = std::env::temp_dir().join(format!("polars-node-bench-scheduler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Health checks of every simulated worker's address.
    let health = tokio::net::TcpListener::bind("0.0.0.0:0").await.map_err(|e| e.to_string())?;
    let health_port = health.local_addr().map_err(|e| e.to_string())?.port();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(health)),
    );

    let worker_port = free_port()?;
    let config = dir.join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "instance_id = \"scheduler\"\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{}\"\n\
             worker_service.bind_addr = \"127.0.0.1:{worker_port}\"\ndatabase_path = \"{}\"\n\
             anonymous_result_location.local.path = \"{}\"\n",
            free_port()?,
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
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let deadline = Instant::now() + Duration::from_secs(30);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(format!("the scheduler does not answer: {e}")),
            }
        };
        clients.push(MembershipClient::new(channel));
    }

    // Each simulated worker: registers (64 at a time), then heartbeats once a second (spread
    // over the second) and registers again when the scheduler does not know it, as a worker
    // does.
    let started = Instant::now();
    let registering = Arc::new(tokio::sync::Semaphore::new(64));
    let registered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut beats = tokio::task::JoinSet::new();
    for i in 0..workers {
        let mut client = clients[i % CONNECTIONS].clone();
        let (registering, registered, refused) = (registering.clone(), registered.clone(), refused.clone());
        let acknowledged = acknowledged.clone();
        beats.spawn(async move {
            let info = simulated(i, health_port);
            let mut session = None;
            let offset = Duration::from_millis((i * 1000 / workers.max(1)) as u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
            loop {
                match &session {
                    None => {
                        let _permit = registering.acquire().await;
                        match client.register(RegisterRequest { worker: Some(info.clone()) }).await {
                            Ok(r) => {
                                session = Some(r.into_inner().scheduler_session);
                                registered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Some(s) => {
                        let request =
                            HeartbeatRequest { instance_id: info.instance_id.clone(), scheduler_session: s.clone() };
                        match client.heartbeat(request).await.map(|r| r.into_inner().known) {
                            Ok(true) => {
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => session = None, // lost or unknown: register again
                        }
                    }
                }
                tick.tick().await;
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
    let (cpu_before, beats_before, at) = (cpu_ticks(pid)?, acknowledged.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = at.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second() / elapsed;
    let beat_rate = (acknowledged.load(Ordering::Relaxed) - beats_before) as f64 / elapsed;
    let (rss, peak) = memory(pid)?;
    let listed = clients[0].list_workers(ListWorkersRequest {}).await.map_err(|s| s.message().to_string())?;
    let alive = listed.into_inner().workers.iter().filter(|w| w.state == WorkerState::Alive as i32).count();
    // Registrations beyond the first of each worker: workers the scheduler lost meanwhile.
    let registered_again = registered.load(Ordering::Relaxed) - registrations_before;
    beats.abort_all();
    drop(scheduler);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "workers": workers,
        "alive_at_end": alive,
        "registered_again_while_measured": registered_again,
        "registrations_refused": refused.load(Ordering::Relaxed),
        "registration_s": registration.as_secs_f64(),
        "heartbeats_acknowledged_per_s": beat_rate,
        "scheduler_cpu_of_one_core": cpu,
        "scheduler_rss_mib": rss as f64 / 1024.0,
        "scheduler_peak_rss_mib": peak as f64 / 1024.0,
        "seconds": seconds,
    }))
}

/// Worker `i` at its own loopback address (127.0.x.y), all served by one listener.
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
