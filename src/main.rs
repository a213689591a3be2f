//! The `polars-node` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use polars_node::config::layout::{self, Layout};
use polars_node::config::{self, Loaded};
use polars_node::logging::{self, LogFormat};
use polars_node::node;
use polars_node::proto::{ListWorkersRequest, WorkerState, membership_client::MembershipClient};
use polars_node::security::cluster::Credentials;
use polars_node::systemd::activation::{self, Activated};
use polars_node::systemd::cgroup::MemoryCgroup;

/// Polars runs as it does in the client's wheel: on jemalloc (glibc's malloc is markedly slower
/// for its many-threaded allocations), with its memory estimate kept.
#[global_allocator]
static ALLOCATOR: polars_node_engine::Allocator = polars_node_engine::Allocator;

#[derive(Parser)]
#[command(
    name = "polars-node",
    version,
    about = "A node of a self-hosted Polars cluster: scheduler, worker and observatory in one binary"
)]
struct Cli {
    /// Log format on stderr (also PLC_LOG_FORMAT); the level comes from PLC_LOG_LEVEL.
    #[arg(long, global = true, value_enum, env = "PLC_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role the configuration file enables.
    Service {
        #[arg(long)]
        config_path: PathBuf,
    },
    /// Validate a configuration and print it with every address resolved; exit 1 listing
    /// every problem otherwise.
    CheckConfig {
        config_path: PathBuf,
        /// Check for another host: look up no interface or host name (for build-time checks).
        #[arg(long)]
        no_resolve: bool,
    },
    /// Print a complete, commented configuration with every default; with `--role`, one that
    /// runs as printed (those roles on, on loopback).
    DefaultConfig {
        /// Turn a role on (repeatable): scheduler, worker, observatory or all.
        #[arg(long = "role", value_enum)]
        roles: Vec<config::Role>,
    },
    /// Run a whole cluster in this process on loopback: scheduler, one worker, observatory.
    Local {
        /// Directory for results, shuffle data and the observatory database.
        #[arg(long, default_value = "/tmp/polars/local")]
        data_dir: PathBuf,
    },
    /// Serve query tasks: a worker's execution process (framed tasks on stdin, outcomes on stdout).
    #[command(hide = true)]
    ExecTask,
    /// Measure shuffle fetch throughput from a worker against raw loopback TCP (the benchmark
    /// harness in bench/ runs it).
    #[command(hide = true)]
    BenchShuffle {
        /// The worker's shuffle service address.
        #[arg(long)]
        peer: String,
        /// A file under that worker's shuffle location.
        #[arg(long)]
        path: String,
        /// Bytes sent over raw TCP for comparison.
        #[arg(long, default_value_t = 1 << 30)]
        tcp_bytes: u64,
        /// Leave the fetched copy at this path (removed otherwise).
        #[arg(long)]
        copy_to: Option<std::path::PathBuf>,
    },
    /// Measure a scheduler under the membership load of a large cluster: simulated workers
    /// register and heartbeat every second (the benchmark harness in bench/ runs it).
    #[command(hide = true)]
    BenchScheduler {
        /// Simulated workers.
        #[arg(long, default_value_t = 10_000)]
        workers: usize,
        /// Seconds of heartbeats measured.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Then print the client service's address and time the dispatch of the first stage
        /// of two queries submitted there, the first on new connections to the simulated
        /// workers, the second on those (the workers hold the tasks, then fail them).
        #[arg(long)]
        dispatch: bool,
    },
    /// List the workers a scheduler knows, live or lost.
    Workers {
        /// The scheduler's worker service (or client service) address.
        #[arg(long, default_value = "127.0.0.1:5050")]
        scheduler: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The cluster token file (`internal.token_file`), when the cluster has one.
        #[arg(long, env = "POLARS_NODE_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
        /// Call as this node configuration's `[internal]` credentials (token file and TLS
        /// under the cluster CA), for example the scheduler's own file.
        #[arg(long, conflicts_with = "token_file")]
        config_path: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = || std::env::vars().collect::<Vec<_>>();
    let result = match cli.command {
        Command::BenchShuffle { peer, path, tcp_bytes, copy_to } => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(polars_node::worker::shuffle::measure(&peer, &path, tcp_bytes, copy_to.as_deref()))
            })
            .map(|((fb, fs), (tb, ts))| {
                println!(
                    "{}",
                    serde_json::json!({ "shuffle_bytes": fb, "shuffle_secs": fs, "tcp_bytes": tb, "tcp_secs": ts })
                )
            }),
        Command::DefaultConfig { roles } => {
            print!("{}", config::default_config_toml(&roles));
            Ok(())
        }
        Command::CheckConfig { config_path, no_resolve } => check_config(&config_path, no_resolve, env()),
        Command::Service { config_path } => {
            logging::init(cli.log_format);
            config::load_file(&config_path, env()).map_err(|e| e.to_string()).and_then(|loaded| run_node(loaded, None))
        }
        Command::Local { data_dir } => {
            logging::init(cli.log_format);
            let banner = "local cluster ready (scheduler, worker, observatory). Connect a client with:\n\n    \
                          import polars_cloud as pc\n    ctx = pc.ClusterContext(uri=\"http://127.0.0.1:5051\")\n\n\
                          Dashboard: http://127.0.0.1:3001   Stop: Ctrl-C"
                .to_string();
            config::load_str(&local_config(&data_dir), "<local>", env())
                .map_err(|e| e.to_string())
                .and_then(|loaded| run_node(loaded, Some(banner)))
        }
        Command::BenchScheduler { workers, seconds, dispatch } => {
            raise_open_files_limit();
            std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| {
                    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
                    runtime.block_on(polars_node::scheduler::load::run(&exe, workers, seconds, dispatch))
                })
                .map(|report| println!("{report}"))
        }
        Command::Workers { scheduler, json, token_file, config_path } => {
            cluster_credentials(token_file, config_path, env()).and_then(|c| list_workers(&scheduler, json, c))
        }
        Command::ExecTask => polars_node::worker::task::exec_task(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("polars-node: {}", message.trim_end());
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path, no_resolve: bool, env: Vec<(String, String)>) -> Result<(), String> {
    let loaded = config::load_file(path, env).map_err(|e| e.to_string())?;
    let resolution = if no_resolve { layout::Resolution::Offline } else { layout::Resolution::Here };
    let layout = layout::plan_with(&loaded.config, resolution).map_err(|p| config::ConfigErrors(p).to_string())?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let effective = toml_edit::ser::to_string_pretty(&loaded.config).map_err(|e| e.to_string())?;
    println!("# effective configuration of {}\n{effective}\n{}", path.display(), layout.describe());
    if no_resolve {
        println!("# --no-resolve: interfaces and host names were not looked up; 198.18.x.y addresses stand for them");
    }
    Ok(())
}

/// Everything that can fail on bad input happens here, before the runtime and before any
/// service serves: configuration, addresses, activated sockets, cgroup, binding.
/// A scheduler holds a connection per worker (and a worker one per peer it fetches from):
/// the soft limit on open files, often 1024, is raised to the hard limit the system allows.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, "cannot raise the limit on open files: {e}");
    }
}

fn run_node(loaded: Loaded, banner: Option<String>) -> Result<(), String> {
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let config = loaded.config;
    let layout: Layout = layout::plan(&config).map_err(|p| config::ConfigErrors(p).to_string())?;
    // SAFETY: no thread has been started yet; the runtime is built below.
    let activated = unsafe { Activated::take_from_env() }?;
    raise_open_files_limit();
    let cgroup = match config.memory_limit {
        Some(limit) => {
            let cg = MemoryCgroup::enter(limit)?;
            tracing::info!(cgroup = %cg.dir.display(), version = cg.version, limit, "memory limit enforced");
            Some(cg)
        }
        None => None,
    };
    let listeners = activation::acquire(&layout.endpoints, activated)?;
    for e in &layout.endpoints {
        tracing::info!(service = e.kind.fd_name(), bind = %e.bind, advertised = %e.advertised(), "{} listening", e.kind.title());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let memory = cgroup.as_ref().zip(config.memory_limit).map(|(cg, limit)| cg.watch(limit));
    let ran = runtime.block_on(node::run(config, layout, listeners, banner, memory)).map_err(|e| format!("{e:#}"));
    drop(cgroup); // leaves and removes the cgroup, once the node has stopped
    ran
}

/// The embedded default: every role on loopback, data under `data_dir`.
fn local_config(data_dir: &Path) -> String {
    let d = data_dir.display();
    format!(
        r#"instance_id = "local"
[scheduler]
enabled = true
client_service.bind_addr = "127.0.0.1:5051"
worker_service.bind_addr = "127.0.0.1:5050"
anonymous_result_location.local.path = "{d}/anonymous-results"
database_path = "{d}/scheduler/queries.db"
[worker]
enabled = true
task_service.bind_addr = "127.0.0.1:5052"
shuffle_service.bind_addr = "127.0.0.1:5053"
shuffle_location.local.path = "{d}/shuffle-data"
[observatory]
enabled = true
service.bind_addr = "127.0.0.1:5049"
rest_api.service.bind_addr = "127.0.0.1:3001"
database_path = "{d}/observatory/data.db"
# Queries, stages and host metrics of this node show on the dashboard.
[monitoring]
enabled = true
"#
    )
}

/// The credentials a command calls the cluster's internal ports with: a token file, or the
/// `[internal]` section of a node's configuration.
fn cluster_credentials(
    token_file: Option<std::path::PathBuf>,
    config_path: Option<std::path::PathBuf>,
    env: Vec<(String, String)>,
) -> Result<Credentials, String> {
    let internal = match config_path {
        Some(path) => config::load_file(&path, env).map_err(|e| e.to_string())?.config.internal,
        None => config::InternalConfig { token_file, ..Default::default() },
    };
    Credentials::load(&internal)
}

fn list_workers(scheduler: &str, json: bool, credentials: Credentials) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let response = runtime.block_on(async {
        let channel = credentials
            .endpoint(scheduler)?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to the scheduler at {scheduler}: {e}"))?;
        let mut client = MembershipClient::with_interceptor(channel, credentials.attach());
        client.list_workers(ListWorkersRequest {}).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
    })?;
    let rows: Vec<serde_json::Value> = response
        .workers
        .iter()
        .map(|w| {
            let info = w.info.clone().unwrap_or_default();
            let state = match WorkerState::try_from(w.state) {
                Ok(WorkerState::Alive) => "alive",
                Ok(WorkerState::Lost) => "lost",
                _ => "unknown",
            };
            serde_json::json!({
                "instance_id": info.instance_id, "state": state, "task_addr": info.task_addr,
                "shuffle_addr": info.shuffle_addr, "cpus": info.cpus, "memory_bytes": info.memory_bytes,
                "version": info.version, "millis_since_heartbeat": w.millis_since_heartbeat,
                "registrations": w.registrations,
                "heartbeats": if w.heartbeat_datagrams { "datagram" } else { "call" },
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::json!({ "scheduler": response.scheduler_instance_id, "workers": rows }));
    } else {
        println!("{:<20} {:<6} {:<24} {:<24} {:>4}", "INSTANCE", "STATE", "TASK", "SHUFFLE", "CPUS");
        for r in rows {
            println!(
                "{:<20} {:<6} {:<24} {:<24} {:>4}",
                r["instance_id"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["task_addr"].as_str().unwrap_or(""),
                r["shuffle_addr"].as_str().unwrap_or("-"),
                r["cpus"]
            );
        }
    }
    Ok(())
}
