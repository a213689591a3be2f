//! A running node: serves every enabled service on its listener, reports readiness once all
//! of them serve (and the worker is registered, and the scheduler has the workers it waits
//! for), and stops gracefully on SIGTERM/SIGINT.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::StatusCode;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::config::StorageLocation;
use crate::config::layout::{Layout, ServiceKind};
use crate::monitoring;
use crate::observatory::otlp::{self, Receiver};
use crate::observatory::store::{Store, database_file};
use crate::proto::WorkerInfo;
use crate::proto::client::client_service_server::ClientServiceServer;
use crate::proto::membership_server::MembershipServer;
use crate::proto::task_server::TaskServer;
use crate::scheduler::client_service::ClientApi;
use crate::scheduler::flight::FlightApi;
use crate::scheduler::lineage::Lineage;
use crate::scheduler::queries::{Policy, Queries, WorkerBounds};
use crate::scheduler::registry::Registry;
use crate::scheduler::store::QueryStore;
use crate::security::auth::JwksAuth;
use crate::security::cluster::Credentials;
use crate::systemd::activation::Listeners;
use crate::systemd::cgroup::MemoryWatch;
use crate::systemd::notify;
use crate::worker::python::PythonEnv;
use crate::worker::registration::{self, Registration};
use crate::worker::shuffle::{Checkpoint, ShuffleStore};
use crate::worker::task::TaskService;
use arrow_flight::flight_service_server::FlightServiceServer;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};

/// Plans and results can be large; the default 4 MiB message limit is not enough.
const MAX_MESSAGE: usize = 1 << 30;

/// The gRPC services this node serves, by role.
#[derive(Clone)]
struct Roles {
    registry: Option<Registry>,
    queries: Option<Queries>,
    tasks: Option<TaskService>,
    /// The worker's Python for queries that call Python (`worker.python_executable`).
    python: Option<PythonEnv>,
    /// `[internal]`: checked on the internal ports, carried by internal calls.
    credentials: Credentials,
    /// The worker's shuffle files (served on the shuffle port).
    shuffle: Option<ShuffleStore>,
    deny_anonymous_users: bool,
    /// TLS identity of the client service (`scheduler.client_service.connection.tls`).
    client_tls: Option<Identity>,
    /// Bearer-token checks of the client service (`scheduler.client_service.auth.jwks`).
    client_auth: Option<JwksAuth>,
    /// The observatory's store (observatory role).
    observatory: Option<Store>,
    /// Bearer-token checks of the REST API (`observatory.rest_api.service.auth.jwks`).
    rest_auth: Option<JwksAuth>,
    /// TLS of the REST API (`observatory.rest_api.service.connection.tls`).
    rest_tls: Option<Arc<rustls::ServerConfig>>,
}

impl Roles {
    /// What each enabled role serves with, built before anything serves.
    fn build(config: &Config, layout: &Layout, memory: Option<MemoryWatch>) -> anyhow::Result<Roles> {
        let scheduler = &config.scheduler;
        // The cluster credentials, read before anything binds (an unreadable file stops the node).
        let credentials = Credentials::load(&config.internal).map_err(anyhow::Error::msg)?;
        if !credentials.is_set() && (scheduler.enabled || config.worker.enabled || config.observatory.enabled) {
            warn!(
                "the internal ports (worker service, task service, shuffle service, OTLP receiver) serve anyone who can reach them: \
                 set internal.token_file (the same file on every node) or internal.tls (a cluster CA) to admit only the cluster's nodes"
            );
        }
        let registry = scheduler.enabled.then(|| {
            let lost_after = scheduler.lost_after_missed_heartbeats;
            Registry::new(&layout.instance_id, &layout.cluster_id, lost_after, credentials.clone())
        });
        // The query table is opened before anything binds: a second scheduler on the same
        // file stops here, with nothing half-started.
        let store = match scheduler.enabled {
            true => {
                let path = database_file(&scheduler.database_path, &config.cluster_id);
                let store = QueryStore::open(&path).map_err(anyhow::Error::msg)?;
                info!(database = %path.display(), "scheduler query table open");
                Some(store)
            }
            false => None,
        };
        let checkpoint_period = checkpoint_period(config);
        let queries = registry.as_ref().zip(store).map(|(r, store)| {
            let root = match &scheduler.anonymous_result_location {
                StorageLocation::Local(l) | StorageLocation::SharedFilesystem(l) => l.path.clone(),
                // Object stores arrive with distributed execution; `load` warns about it.
                _ => std::env::temp_dir().join("polars/anonymous-results"),
            };
            let policy = Policy {
                max_task_attempts: scheduler.max_task_attempts,
                allow_local_scans: scheduler.allow_local_scans,
                allow_local_sinks: scheduler.allow_local_sinks,
                bounds: WorkerBounds {
                    default_workers_per_query: scheduler.default_workers_per_query,
                    max_workers_per_query: scheduler.max_workers_per_query,
                    default_partitions_per_worker: scheduler.default_partitions_per_worker,
                },
                min_split_bytes: scheduler.min_split_bytes,
                worker_wait: match config.scaling.enabled {
                    true => config.scaling.registration_timeout.0,
                    false => crate::scheduler::workers::WORKER_WAIT,
                },
            };
            let lineage = config.lineage.as_ref().map(|l| Lineage::start(l, &config.cluster_id));
            Queries::new(r.clone(), policy, root, store, checkpoint_period, credentials.clone(), lineage)
        });
        let checkpoint = match (&config.worker.checkpoint_location, config.worker.enabled) {
            (Some(location), true) => Some(Checkpoint::open(location).map_err(anyhow::Error::msg)?),
            _ => None,
        };
        let shuffle = match (&config.worker.shuffle_location, config.worker.enabled) {
            (_, false) => None,
            (StorageLocation::Local(l), true) => {
                Some(ShuffleStore::new(l.path.clone(), false, layout.instance_id.clone()))
            }
            (StorageLocation::SharedFilesystem(l), true) => {
                Some(ShuffleStore::new(l.path.clone(), true, layout.instance_id.clone()))
            }
            (StorageLocation::S3(o) | StorageLocation::Gcs(o) | StorageLocation::Abs(o), true) => {
                let staging = std::env::temp_dir().join("polars-node-shuffle-staging").join(&layout.instance_id);
                Some(
                    ShuffleStore::object_store(&o.url, &o.options, staging, layout.instance_id.clone())
                        .map_err(anyhow::Error::msg)?,
                )
            }
        };
        let shuffle = shuffle.map(|s| s.with_checkpoint(checkpoint).with_credentials(credentials.clone()));
        // A worker whose Python cannot run plans does not start (rather than fail its first
        // query that calls Python).
        let python = match (&config.worker.python_executable, config.worker.enabled) {
            (Some(path), true) => {
                let env = PythonEnv::probe(path).map_err(anyhow::Error::msg)?;
                info!(python = %env.executable.display(), version = %env.version, "Python environment for Python functions");
                Some(env)
            }
            _ => None,
        };
        let tasks = match &shuffle {
            Some(store) => Some(
                TaskService::new(config.worker.env_vars.clone(), store.clone(), python.clone(), memory)
                    .context("task service")?,
            ),
            None => None,
        };
        let client_tls = if scheduler.enabled { client_identity(config)? } else { None };
        let client_auth =
            scheduler.client_service.auth.as_ref().filter(|_| scheduler.enabled).map(|a| JwksAuth::new(a.jwks.clone()));
        let observatory = match config.observatory.enabled {
            true => {
                let path = database_file(&config.observatory.database_path, &config.cluster_id);
                let store = Store::open(&path, config.observatory.max_metrics_bytes_total).with_context(|| {
                    format!("cannot open the observatory database {} (observatory.database_path)", path.display())
                })?;
                info!(database = %path.display(), "observatory store open");
                Some(store)
            }
            false => None,
        };
        let rest = &config.observatory.rest_api.service;
        let rest_auth =
            rest.auth.as_ref().filter(|_| config.observatory.enabled).map(|a| JwksAuth::new(a.jwks.clone()));
        let rest_tls = match rest.connection.as_ref().and_then(|c| c.tls.as_ref()) {
            Some(tls) if config.observatory.enabled => Some(crate::security::tls::server_config(
                &tls.certificate_key_file,
                &tls.private_key_file,
                "observatory.rest_api.service.connection.tls",
            )?),
            _ => None,
        };
        Ok(Roles {
            rest_tls,
            rest_auth,
            registry,
            queries,
            shuffle,
            tasks,
            python,
            credentials,
            deny_anonymous_users: scheduler.deny_anonymous_users,
            client_tls,
            client_auth,
            observatory,
        })
    }
}

/// Reads the client service's certificate chain and key, naming the key of a file that
/// cannot be read.
fn client_identity(config: &Config) -> anyhow::Result<Option<Identity>> {
    let Some(tls) = config.scheduler.client_service.connection.as_ref().and_then(|c| c.tls.as_ref()) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read {} (scheduler.client_service.connection.tls.{key})", path.display()))
    };
    let cert = read(&tls.certificate_key_file, "certificate_key_file")?;
    let key = read(&tls.private_key_file, "private_key_file")?;
    Ok(Some(Identity::from_pem(cert, key)))
}

/// Keep-alive probes on accepted connections: idle client long polls must survive NAT and
/// load balancers, and dead peers must be noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// `banner` is printed to stdout once the node is ready (the `local` command's instructions).
/// `memory`: the enforced `memory_limit` (the node's cgroup), for the task service to name it
/// when the kernel kills a task for exceeding it.
pub async fn run(
    config: Config,
    layout: Layout,
    listeners: Listeners,
    banner: Option<String>,
    memory: Option<MemoryWatch>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let roles = Roles::build(&config, &layout, memory)?;
    let registry = roles.registry.clone();
    let client_auth = roles.client_auth.clone();
    let monitoring = match &layout.observatory_addr {
        Some(addr) => Some(
            monitoring::start(
                &layout.instance_id,
                &layout.cluster_id,
                addr,
                &config.monitoring.host_metrics,
                &roles.credentials,
            )
            .context("monitoring")?,
        ),
        None => None,
    };
    let mut background = JoinSet::new();
    let export = roles.observatory.clone().zip(config.observatory.database_export.clone());
    if let Some((store, path)) = export.clone() {
        background.spawn(async move {
            let mut tick = tokio::time::interval(DATABASE_EXPORT_PERIOD);
            tick.tick().await;
            loop {
                tick.tick().await;
                export_database(&store, &path).await;
            }
        });
    }
    for auth in [client_auth, roles.rest_auth.clone()].into_iter().flatten() {
        notify::status("fetching a JSON Web Key Set for bearer tokens");
        auth.load().await;
        background.spawn(auth.keep_keys());
    }
    if let Some(registry) = &registry {
        background.spawn(registry.clone().watch_heartbeats());
    }
    if let Some(queries) = roles.queries.clone() {
        background.spawn(queries.clone().expire_results(config.scheduler.result_retention.0));
        background.spawn(queries.clone().forget_finished());
        // Queries an earlier run of the scheduler left: served, run, resumed or failed.
        queries.restore();
        if let Some(period) = checkpoint_period(&config) {
            background.spawn(queries.clone().write_checkpoints(period));
        }
        if config.scaling.enabled {
            background.spawn(crate::scheduler::scaling::run(queries, config.scaling.clone()));
        }
    }
    background.spawn(notify::watchdog());

    // The OTLP receiver stops last: this node's own monitoring flushes into it on the way out.
    let (receiver_stop_tx, receiver_stop_rx) = watch::channel(false);
    let mut servers = JoinSet::new();
    let mut receiver_running = false;
    if let (Some(registry), Some(socket)) = (&registry, listeners.heartbeats) {
        // Behind NAT the public port may differ from the bound one (the datagrams then need the
        // same mapping for UDP; without it workers fall back to gRPC calls).
        let public = layout.endpoint(ServiceKind::Worker).and_then(|e| e.public.as_ref()).map(|a| a.port);
        let port = public.unwrap_or(socket.local_addr().context("heartbeat datagrams")?.port());
        registry.serve_heartbeat_datagrams(socket, port).context("heartbeat datagrams")?;
    }
    for (kind, listener) in listeners.tcp {
        receiver_running |= kind == ServiceKind::Otlp;
        let shutdown = match kind {
            ServiceKind::Otlp => stopped(receiver_stop_rx.clone()),
            _ => stopped(stop_rx.clone()),
        };
        let serve = serve(kind, listener, roles.clone(), ready_rx.clone(), shutdown)?;
        servers.spawn(async move { (kind, serve.await) });
    }

    // The worker role's registration with the scheduler.
    let (registration_tx, mut registration_rx) = watch::channel(Registration::Pending("starting".into()));
    let mut worker_loop = None;
    if config.worker.enabled {
        let task = layout.endpoint(ServiceKind::Task).expect("a worker has a task service");
        let info = WorkerInfo {
            instance_id: layout.instance_id.clone(),
            cluster_id: layout.cluster_id.clone(),
            task_addr: task.advertised(),
            shuffle_addr: layout.endpoint(ServiceKind::Shuffle).map(|e| e.advertised()),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: config.memory_limit.unwrap_or_else(total_memory),
            version: crate::VERSION.into(),
            heartbeat_period_ms: config.worker.heartbeat_period.0.as_millis() as u64,
            python_version: roles.python.as_ref().map(|p| p.version.to_string()).unwrap_or_default(),
        };
        let scheduler_addr = layout.scheduler_addr.clone().expect("a worker knows its scheduler");
        worker_loop = Some(tokio::spawn(registration::run_worker(
            info,
            scheduler_addr,
            roles.tasks.clone(),
            roles.credentials.clone(),
            registration_tx,
            stop_rx.clone(),
        )));
    }

    let mut live_rx = registry.as_ref().map(|r| r.live_workers());
    let wanted_workers = config.scheduler.n_workers.unwrap_or(0) as usize;
    let role_names = role_names(&config);
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut last_status = String::new();
    let mut failure = None;
    loop {
        // What the node still waits for, in order.
        let waiting = match (&*registration_rx.borrow(), config.worker.enabled) {
            (Registration::Pending(why), true) => Some(why.clone()),
            _ => None,
        };
        let live = live_rx.as_ref().map(|rx| *rx.borrow()).unwrap_or(0);
        let waiting = waiting.or_else(|| {
            (live < wanted_workers)
                .then(|| format!("waiting for {wanted_workers} workers to register ({live} registered)"))
        });
        let status = match &waiting {
            Some(w) => w.clone(),
            None if registry.is_some() => format!("ready: {role_names}; {live} live workers"),
            None => format!("ready: {role_names}"),
        };
        if status != last_status {
            if waiting.is_none() && !*ready_rx.borrow() {
                ready_tx.send_replace(true);
                notify::ready(&status);
                if let Some(banner) = &banner {
                    println!("{banner}");
                }
            } else {
                notify::status(&status);
            }
            last_status = status;
        }
        tokio::select! {
            _ = registration_rx.changed() => {}
            _ = async { live_rx.as_mut().unwrap().changed().await }, if live_rx.is_some() => {}
            _ = sigterm.recv() => { info!("SIGTERM received"); break }
            _ = sigint.recv() => { info!("SIGINT received"); break }
            Some(done) = servers.join_next() => {
                let (kind, result) = done.expect("server task");
                receiver_running &= kind != ServiceKind::Otlp;
                failure = Some(match result {
                    Err(e) => format!("the {} failed: {e:#}", kind.title()),
                    Ok(()) => format!("the {} stopped unexpectedly", kind.title()),
                });
                break;
            }
        }
    }

    // Stopping, in order: the servers but the OTLP receiver (letting in-flight work finish),
    // then this node's monitoring (its last spans and metrics, possibly into this node's own
    // receiver), then the receiver, then the observatory's export.
    notify::stopping();
    stop_tx.send_replace(true);
    if let Some(registry) = &registry {
        registry.stop_heartbeats();
    }
    let graceful = async {
        if let Some(w) = worker_loop {
            let _ = w.await;
        }
        // All but the receiver (which has not been told to stop yet).
        while servers.len() > usize::from(receiver_running) {
            if let Some(Ok((kind, Err(e)))) = servers.join_next().await {
                warn!("{} ended with an error while stopping: {e:#}", kind.title());
            }
        }
    };
    let timeout = config.shutdown_timeout.0;
    if tokio::time::timeout(timeout, graceful).await.is_err() {
        warn!("in-flight work did not finish within shutdown_timeout ({}); stopping anyway", config.shutdown_timeout);
    }
    background.abort_all();
    if let Some(m) = monitoring {
        // Flushes what is buffered; bounded by the exporters' timeouts.
        let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
    }
    receiver_stop_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while servers.join_next().await.is_some() {} }).await;
    if let Some((store, path)) = export {
        export_database(&store, &path).await;
    }
    match failure {
        Some(f) => {
            error!("{f}");
            anyhow::bail!(f)
        }
        None => {
            info!("node stopped");
            Ok(())
        }
    }
}

/// How often `observatory.database_export` is refreshed (and once more when the node stops).
const DATABASE_EXPORT_PERIOD: Duration = Duration::from_secs(60);

async fn export_database(store: &Store, path: &std::path::Path) {
    let (store, target) = (store.clone(), path.to_path_buf());
    match tokio::task::spawn_blocking(move || store.export_to(&target)).await {
        Ok(Ok(())) => info!(path = %path.display(), "observatory database exported"),
        Ok(Err(e)) => warn!(path = %path.display(), "cannot export the observatory database: {e}"),
        Err(e) => warn!("export task: {e}"),
    }
}

fn role_names(config: &Config) -> String {
    let mut roles = Vec::new();
    if config.scheduler.enabled {
        roles.push("scheduler");
    }
    if config.worker.enabled {
        roles.push("worker");
    }
    if config.observatory.enabled {
        roles.push("observatory");
    }
    roles.join(", ")
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// The server of one service on its listener.
fn serve(
    kind: ServiceKind,
    listener: TcpListener,
    roles: Roles,
    ready: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ServeFuture> {
    let listener = tokio::net::TcpListener::from_std(listener).with_context(|| format!("{} listener", kind.title()))?;
    if kind == ServiceKind::Rest {
        let mut app = rest_router(ready);
        if let Some(store) = roles.observatory.clone() {
            app = app.merge(crate::observatory::rest::router(store, roles.rest_auth.clone()));
        }
        return Ok(match roles.rest_tls.clone() {
            Some(tls) => {
                let listener = crate::security::tls::TlsListener::new(listener, tls)?;
                Box::pin(async move {
                    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("REST server")
                })
            }
            None => Box::pin(async move {
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("REST server")
            }),
        });
    }
    if kind == ServiceKind::Shuffle {
        // Shuffle files travel over upgraded HTTP/1 connections (src/worker/shuffle/transfer.rs: far
        // faster than gRPC messages); gRPC health checks are answered on the same port.
        let store = roles.shuffle.expect("a worker has shuffle storage");
        let tls = roles.credentials.tls.as_ref().map(|tls| tls.server.clone());
        let (reporter, health) = tonic_health::server::health_reporter();
        let app = tonic::service::Routes::new(health).into_axum_router().merge(crate::worker::shuffle::router(store));
        return Ok(Box::pin(async move {
            reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            crate::worker::shuffle::serve(listener, app, tls, shutdown).await;
            Ok(())
        }));
    }
    let incoming = crate::security::silent::speaking(listener, TCP_KEEPALIVE);
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut builder = tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)));
    if kind == ServiceKind::Client
        && let Some(identity) = roles.client_tls.clone()
    {
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity)).context("TLS of the client service")?;
    }
    // The internal ports take only connections with a certificate of the cluster CA.
    if matches!(kind, ServiceKind::Worker | ServiceKind::Task | ServiceKind::Otlp)
        && let Some(tls) = roles.credentials.server_tls()
    {
        builder = builder.tls_config(tls).context("TLS of the internal ports (internal.tls)")?;
    }
    let mut router = builder.add_service(health);
    // Health checks stay open (they tell nothing); every other internal call shows the token.
    let cluster = roles.credentials.check();
    if kind == ServiceKind::Worker {
        let registry = roles.registry.clone().expect("a scheduler service has a registry");
        router = router.add_service(InterceptedService::new(MembershipServer::new(registry), cluster.clone()));
    }
    if kind == ServiceKind::Client {
        // Registration works on either scheduler port: deployment tools disagree on which one
        // `static_leader.scheduler_service.public_addr` names. The client port has no client
        // certificates, so under a cluster CA workers must come through the worker port.
        let registry = roles.registry.clone().expect("a scheduler service has a registry");
        let membership = MembershipServer::new(registry);
        router = match roles.credentials.tls.is_some() {
            false => router.add_service(InterceptedService::new(membership, cluster.clone())),
            true => router.add_service(InterceptedService::new(membership, refuse_membership_on_client_port)),
        };
    }
    if kind == ServiceKind::Client {
        let queries = roles.queries.expect("a scheduler has queries");
        let api = ClientServiceServer::new(ClientApi::new(queries.clone(), roles.deny_anonymous_users))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        // `.collect()` reads results over Arrow Flight on the same port.
        let flight = FlightServiceServer::new(FlightApi::new(queries)).max_encoding_message_size(MAX_MESSAGE);
        // Registration, also served on this port, checks the cluster token (above).
        router = match roles.client_auth {
            Some(auth) => router
                .add_service(InterceptedService::new(api, auth.clone()))
                .add_service(InterceptedService::new(flight, auth)),
            None => router.add_service(api).add_service(flight),
        };
    }
    if kind == ServiceKind::Otlp {
        let receiver = Receiver::new(roles.observatory.clone().expect("an observatory has a store"));
        router = router
            .add_service(InterceptedService::new(
                TraceServiceServer::new(receiver.clone()).max_decoding_message_size(otlp::MAX_REQUEST),
                cluster.clone(),
            ))
            .add_service(InterceptedService::new(
                MetricsServiceServer::new(receiver).max_decoding_message_size(otlp::MAX_REQUEST),
                cluster.clone(),
            ));
    }
    if kind == ServiceKind::Task {
        let tasks = roles.tasks.expect("a worker has a task service");
        router = router.add_service(InterceptedService::new(
            TaskServer::new(tasks).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE),
            cluster,
        ));
    }
    Ok(Box::pin(async move {
        reporter.set_serving::<MembershipServer<Registry>>().await;
        router.serve_with_incoming_shutdown(incoming, shutdown).await.context("gRPC server")
    }))
}

/// Under `internal.tls`, membership calls on the client port (which has no client
/// certificates to check) are refused, naming the port to use.
fn refuse_membership_on_client_port(_: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    Err(tonic::Status::unauthenticated(
        "with internal.tls set, workers register on the scheduler's worker service (scheduler.worker_service, \
         port 5050), where their certificate is checked: point static_leader.scheduler_service.public_addr there",
    ))
}

/// `/healthz` (the process serves) and `/readyz` (the node is ready) on the REST port.
fn rest_router(ready: watch::Receiver<bool>) -> axum::Router {
    let ready = Arc::new(ready);
    axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" })).route(
        "/readyz",
        axum::routing::get(move || {
            let ready = ready.clone();
            async move {
                if *ready.borrow() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
        }),
    )
}

/// Physical memory of the host, reported to the scheduler when no memory_limit is set.
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// `scheduler.checkpoint.period`, when checkpoints are on.
fn checkpoint_period(config: &Config) -> Option<std::time::Duration> {
    config.scheduler.checkpoint.as_ref().and_then(|c| c.period.as_ref()).map(|p| p.0)
}
