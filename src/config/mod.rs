//! The node's TOML configuration: the one source of keys, defaults, documentation and parsing.
//!
//! Keys follow Polars on-premises. Field doc comments are the documentation: `default-config`
//! prints them next to every default. Semantic checks that need resolved addresses live in
//! `layout`.

pub mod address;
pub mod layout;
mod load;
mod schema;
#[cfg(test)]
mod tests;

pub use load::{ConfigErrors, Loaded, Origin, load_file, load_str};
pub use schema::{Role, Section, all_key_paths, default_config_toml, schema};

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use documented::DocumentedFields;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::address::Address;

/// Prefix of environment variables that override keys: `PC_CUBLET__worker__heartbeat_period=10s`.
pub const ENV_PREFIX: &str = "PC_CUBLET__";

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name (e.g. "scheduler", "worker-0"). Default: the host name.
    pub instance_id: String,
    /// Cluster name; goes into file names (observatory database) and metrics.
    pub cluster_id: String,
    /// Memory limit for query execution, in bytes, enforced through a delegated cgroup
    /// (v2, or the v1 memory controller). Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "optional_byte_size")]
    pub memory_limit: Option<u64>,
    /// CPUs reserved for the node itself; a scheduling hint, not enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_reserved: Option<CpuReserved>,
    /// How long a stopping node waits for in-flight work before it exits.
    pub shutdown_timeout: ConfigDuration,
    /// Licensing of Polars on-premises; accepted and ignored: this project needs no license.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<Opaque>,
    /// The scheduler role: accepts queries from clients and workers' registrations.
    pub scheduler: SchedulerConfig,
    /// The worker role: runs query tasks and serves shuffle data.
    pub worker: WorkerConfig,
    /// The observatory role: receives traces and metrics, serves the REST API and dashboard.
    pub observatory: ObservatoryConfig,
    /// Sends this node's traces and host metrics to the observatory.
    pub monitoring: MonitoringConfig,
    /// How every node finds the scheduler and the observatory.
    pub static_leader: StaticLeaderConfig,
    /// Who may call the ports between the nodes (worker service, task service, shuffle service).
    pub internal: InternalConfig,
    /// Autoscaling: the scheduler asks a scaler (Polars' Ray launcher, or any service speaking
    /// its REST protocol) for workers when queries need more than are live, and releases
    /// workers that stay idle.
    pub scaling: ScalingConfig,
    /// OpenLineage run events for every query (START, COMPLETE, FAIL, ABORT), with the
    /// datasets it reads and writes; sent by the scheduler. Unset: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lineage: Option<LineageConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance_id: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "polars-node".into()),
            cluster_id: "polars-onprem".into(),
            memory_limit: None,
            cpu_reserved: None,
            shutdown_timeout: ConfigDuration(Duration::from_secs(30)),
            license: None,
            scheduler: SchedulerConfig::default(),
            worker: WorkerConfig::default(),
            observatory: ObservatoryConfig::default(),
            monitoring: MonitoringConfig::default(),
            static_leader: StaticLeaderConfig::default(),
            internal: InternalConfig::default(),
            scaling: ScalingConfig::default(),
            lineage: None,
        }
    }
}

/// A table that is accepted as a whole and not interpreted.
pub type Opaque = BTreeMap<String, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CpuReserved {
    Count(f64),
    Text(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Run the scheduler on this node.
    pub enabled: bool,
    /// The service the Python client talks to (gRPC, `pc.ClusterContext(uri="http://HOST:5051")`).
    pub client_service: SecuredServiceConfig<ClientPort>,
    /// Worker registration (gRPC) and heartbeats (UDP datagrams on the same port, else gRPC).
    pub worker_service: ServiceConfig<WorkerServicePort>,
    /// Allow queries that scan the worker's local file system.
    pub allow_local_scans: bool,
    /// Allow queries that write to the worker's local file system.
    pub allow_local_sinks: bool,
    /// Require a user name (header `x-polars-user`) on every query.
    pub deny_anonymous_users: bool,
    /// Wait for this many registered workers before the scheduler reports ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_workers: Option<u32>,
    /// Workers a query uses when it asks for none. Unset: every live worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workers_per_query: Option<u32>,
    /// Upper bound on the workers of one query. Unset: the cluster size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers_per_query: Option<u32>,
    /// Partitions per worker when a query asks for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_partitions_per_worker: Option<u32>,
    /// Where results of `execute()` without a sink are written (one directory per query).
    pub anonymous_result_location: StorageLocation,
    /// How long a stored result is kept after it was written; older ones are removed (also
    /// those a previous run of the scheduler left). `delete()` removes one at once.
    pub result_retention: ConfigDuration,
    /// The scheduler's query table (SQLite): every query's plan, state and result survive a
    /// restart of the scheduler. The cluster_id goes into the file name; one scheduler per file.
    pub database_path: PathBuf,
    /// Checkpoints of running queries: with a period set, the finished stages of split
    /// queries are recorded, and a query that was running when the scheduler stopped resumes
    /// from them after a restart. Unset: such queries fail at restart, saying how to turn it on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointConfig>,
    /// A worker is marked lost after this many heartbeat periods without a heartbeat.
    pub lost_after_missed_heartbeats: u32,
    /// How many times a task may run before its query fails: a task whose worker is lost, or
    /// whose execution process dies, runs again elsewhere (as Spark's `spark.task.maxFailures`).
    /// A query's `n_retries` adds to it.
    pub max_task_attempts: u32,
    /// A distributed query whose scans read less than this in all (bytes on disk of the
    /// columns they read) runs whole on one worker: each stage of a split costs milliseconds
    /// (tasks, their fragments planned again, data handed over) that small inputs do not win
    /// back. A query with `single_worker_ops="forbid"` is split whatever its size; 0 splits
    /// every query that can be.
    #[serde(deserialize_with = "byte_size")]
    pub min_split_bytes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            enabled: false,
            client_service: SecuredServiceConfig::default(),
            worker_service: ServiceConfig::default(),
            allow_local_scans: true,
            allow_local_sinks: true,
            deny_anonymous_users: false,
            n_workers: None,
            default_workers_per_query: None,
            max_workers_per_query: None,
            default_partitions_per_worker: None,
            anonymous_result_location: StorageLocation::Local(LocalPath {
                path: "/tmp/polars/anonymous-results".into(),
            }),
            result_retention: ConfigDuration(Duration::from_secs(24 * 3600)),
            database_path: "/tmp/polars/scheduler/queries.db".into(),
            checkpoint: None,
            lost_after_missed_heartbeats: 3,
            max_task_attempts: 4,
            min_split_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct InternalConfig {
    /// A file holding the cluster token (one line, at least 16 characters; the same file on
    /// every node): every call between nodes carries it and every internal port refuses calls
    /// without it. Unset: the internal ports serve anyone who can reach them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS between the nodes with a cluster CA: every internal port (worker service,
    /// task service, shuffle service, OTLP receiver) takes only connections whose client
    /// certificate the CA signed, and every node checks the certificate of the node it calls.
    /// A node's certificate must name the host (DNS name or IP address) that the others reach
    /// it at. Unset: plaintext between the nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<InternalTlsConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct InternalTlsConfig {
    /// The cluster CA's certificate (PEM): the only issuer this node trusts for other nodes.
    pub ca_file: PathBuf,
    /// This node's certificate chain (PEM), signed by the cluster CA.
    pub certificate_key_file: PathBuf,
    /// This node's private key (PEM).
    pub private_key_file: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct LineageConfig {
    /// Where events go: `http`, `stdio`, or both.
    pub transport: LineageTransportConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct LineageTransportConfig {
    /// POSTed as JSON to an OpenLineage HTTP endpoint (Marquez: `http://host:5000/api/v1/lineage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<LineageHttpConfig>,
    /// Written as one JSON line each to the scheduler's standard output or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdio: Option<LineageStdioConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct LineageHttpConfig {
    /// The URL events are POSTed to.
    pub endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct LineageStdioConfig {
    /// `"stdout"` or `"stderr"`.
    pub output_stream: OutputStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingConfig {
    /// Drive the scaler at `rest.uri` (the scheduler node only). Needs
    /// `scheduler.default_workers_per_query`.
    pub enabled: bool,
    /// Where the scaler serves `GET /scale_config` and `POST /scale_to`.
    pub rest: ScalingRestConfig,
    /// A worker that has run no task for this long, and holds nothing a running query still
    /// needs, is released (never below the scaler's minimum).
    pub idle_timeout: ConfigDuration,
    /// How long a query waits for the workers it asked the scaler for to register.
    pub registration_timeout: ConfigDuration,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            enabled: false,
            rest: ScalingRestConfig::default(),
            idle_timeout: ConfigDuration(std::time::Duration::from_secs(60)),
            registration_timeout: ConfigDuration(std::time::Duration::from_secs(120)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingRestConfig {
    /// Base URL of the scaler (what Polars' Ray launcher renders).
    pub uri: String,
}

impl Default for ScalingRestConfig {
    fn default() -> Self {
        ScalingRestConfig { uri: "http://127.0.0.1:4001".into() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// How often the finished stages of running queries are recorded (at most this long after
    /// a stage finished). Unset: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<ConfigDuration>,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Run a worker on this node.
    pub enabled: bool,
    /// Receives query tasks from the scheduler (gRPC).
    pub task_service: ServiceConfig<TaskPort>,
    /// Serves this worker's shuffle partitions to other workers; bound only with local shuffle storage.
    pub shuffle_service: ServiceConfig<ShufflePort>,
    /// How often the worker tells the scheduler it is alive.
    pub heartbeat_period: ConfigDuration,
    /// Where shuffle partitions are written.
    pub shuffle_location: StorageLocation,
    /// Where stage outputs of checkpointed queries (`scheduler.checkpoint.period`) are copied
    /// as they finish: on a shared file system or an object store the copies outlive this
    /// worker, and a query resumed after a scheduler restart reads them. Unset: a checkpointed
    /// output lives as long as this worker's shuffle files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_location: Option<StorageLocation>,
    /// Extra environment variables for query execution.
    #[serde(deserialize_with = "env_values")]
    pub env_vars: BTreeMap<String, String>,
    /// Python that runs queries calling Python functions (`map_elements`, `map_batches`, Python scans): an environment with polars==2.0.0 and cloudpickle, of the clients' exact 3.minor.micro. Unset: such queries are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_executable: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            enabled: false,
            task_service: ServiceConfig::default(),
            shuffle_service: ServiceConfig::default(),
            heartbeat_period: ConfigDuration(Duration::from_secs(5)),
            shuffle_location: StorageLocation::Local(LocalPath { path: "/tmp/polars/shuffle-data".into() }),
            checkpoint_location: None,
            env_vars: BTreeMap::new(),
            python_executable: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct ObservatoryConfig {
    /// Run the observatory on this node.
    pub enabled: bool,
    /// OTLP gRPC receiver for traces and metrics.
    pub service: ServiceConfig<OtlpPort>,
    /// REST API and dashboard.
    pub rest_api: RestApiConfig,
    /// SQLite database; the cluster_id goes into the file name.
    pub database_path: PathBuf,
    /// Bound on stored metrics; the oldest are dropped first.
    #[serde(deserialize_with = "byte_size")]
    pub max_metrics_bytes_total: u64,
    /// Path the database is periodically exported to. Unset: no export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_export: Option<PathBuf>,
}

impl Default for ObservatoryConfig {
    fn default() -> Self {
        ObservatoryConfig {
            enabled: false,
            service: ServiceConfig::default(),
            rest_api: RestApiConfig::default(),
            database_path: "/tmp/polars/observatory/data.db".into(),
            max_metrics_bytes_total: 104_857_600,
            database_export: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RestApiConfig {
    /// Serve the REST API and dashboard.
    pub enabled: bool,
    /// Address of the REST API and dashboard (HTTP).
    pub service: SecuredServiceConfig<RestPort>,
}

impl Default for RestApiConfig {
    fn default() -> Self {
        RestApiConfig { enabled: true, service: SecuredServiceConfig::default() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    /// Send this node's traces and host metrics to `static_leader.observatory_service.public_addr`.
    pub enabled: bool,
    /// Which host metrics are sent.
    pub host_metrics: HostMetricsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct HostMetricsConfig {
    /// Send CPU and memory metrics.
    pub enabled: bool,
    /// Also send disk usage.
    pub disk_usage_metrics: bool,
    /// Also send disk IO.
    pub disk_io_metrics: bool,
}

impl Default for HostMetricsConfig {
    fn default() -> Self {
        HostMetricsConfig { enabled: true, disk_usage_metrics: false, disk_io_metrics: false }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct StaticLeaderConfig {
    /// The scheduler's instance_id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_instance_id: Option<String>,
    /// Where workers register: the scheduler's worker service (5050) or client service (5051); both work.
    pub scheduler_service: PublicAddrConfig,
    /// The observatory's OTLP receiver (5049).
    pub observatory_service: PublicAddrConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct PublicAddrConfig {
    /// Address other nodes use to reach this service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<Address>,
}

/// The default port of a service, bound on every interface unless configured.
pub trait DefaultPort {
    const PORT: u16;
}

macro_rules! default_ports {
    ($($name:ident = $port:literal),* $(,)?) => {$(
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name;
        impl DefaultPort for $name {
            const PORT: u16 = $port;
        }
    )*};
}

default_ports!(
    ClientPort = 5051,
    WorkerServicePort = 5050,
    TaskPort = 5052,
    ShufflePort = 5053,
    OtlpPort = 5049,
    RestPort = 3001
);

/// A network service of this node; `P` gives its default port.
/// Field docs are in `SERVICE_DOCS` (the docs derive does not take generics).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct ServiceConfig<P: DefaultPort> {
    pub bind_addr: Address,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<Address>,
    #[serde(skip)]
    port: PhantomData<P>,
}

const SERVICE_FIELDS: [&str; 4] = ["bind_addr", "public_addr", "connection", "auth"];
const SERVICE_DOCS: [&str; 4] = [
    "Address the service listens on.",
    "Address other nodes use to reach the service; required when bound to 0.0.0.0 / [::],\nand the way through NAT or a load balancer.",
    "Transport settings (TLS). Unset: plaintext.",
    "Client authentication (JWKS). Unset: none.",
];

impl<P: DefaultPort> DocumentedFields for ServiceConfig<P> {
    const FIELD_DOCS: &'static [&'static str] = SERVICE_DOCS.split_at(2).0;
    const FIELD_NAMES: &'static [&'static str] = SERVICE_FIELDS.split_at(2).0;
    fn __documented_get_index<T: AsRef<str>>(name: T) -> Option<usize> {
        Self::FIELD_NAMES.iter().position(|f| *f == name.as_ref())
    }
}

impl<P: DefaultPort> DocumentedFields for SecuredServiceConfig<P> {
    const FIELD_DOCS: &'static [&'static str] = &SERVICE_DOCS;
    const FIELD_NAMES: &'static [&'static str] = &SERVICE_FIELDS;
    fn __documented_get_index<T: AsRef<str>>(name: T) -> Option<usize> {
        Self::FIELD_NAMES.iter().position(|f| *f == name.as_ref())
    }
}

impl<P: DefaultPort> Default for ServiceConfig<P> {
    fn default() -> Self {
        ServiceConfig { bind_addr: Address::any(P::PORT), public_addr: None, port: PhantomData }
    }
}

/// A service that clients reach from outside the cluster: it can also have TLS and auth.
/// Field docs are in `SERVICE_DOCS`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct SecuredServiceConfig<P: DefaultPort> {
    pub bind_addr: Address,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    #[serde(skip)]
    port: PhantomData<P>,
}

impl<P: DefaultPort> Default for SecuredServiceConfig<P> {
    fn default() -> Self {
        SecuredServiceConfig {
            bind_addr: Address::any(P::PORT),
            public_addr: None,
            connection: None,
            auth: None,
            port: PhantomData,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// TLS certificate and key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain file (PEM).
    pub certificate_key_file: PathBuf,
    /// Private key file (PEM).
    pub private_key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens validated against a JSON Web Key Set.
    pub jwks: JwksConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// URL of the key set.
    pub url: String,
    /// Accepted token issuers: one issuer as a string (as Polars' own tooling writes it) or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub issuers: Vec<String>,
    /// Required token audience: one string or a list (a token for any of them is accepted).
    #[serde(default, deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
}

/// Where a role keeps files: `{ local = { path } }`, `{ shared_filesystem = { path } }`,
/// or an object store (`s3`, `gcs`, `abs`) with a `url` and object_store options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageLocation {
    Local(LocalPath),
    SharedFilesystem(LocalPath),
    S3(ObjectStoreLocation),
    Gcs(ObjectStoreLocation),
    Abs(ObjectStoreLocation),
}

impl StorageLocation {
    pub fn is_local(&self) -> bool {
        matches!(self, StorageLocation::Local(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPath {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectStoreLocation {
    pub url: String,
    /// Options passed to the object store (region, endpoint, credentials, ...).
    #[serde(flatten)]
    pub options: BTreeMap<String, String>,
}

/// A duration written as ISO 8601 (`"PT5S"`) or in friendly form (`"5s"`, `"5 secs"`, `"1m 30s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parsed: jiff::SignedDuration = text.trim().parse().map_err(|_| {
            format!("`{text}` is not a duration: write it as \"5s\", \"2 mins\", \"1h 30m\" or ISO 8601 \"PT5S\"")
        })?;
        if parsed.is_negative() {
            return Err(format!("`{text}` is negative; durations must be positive"));
        }
        Ok(ConfigDuration(parsed.unsigned_abs()))
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = jiff::SignedDuration::try_from(self.0).map_err(|_| fmt::Error)?;
        write!(f, "{d:#}")
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match TextOrNumber::deserialize(d)? {
            TextOrNumber::Text(text) => ConfigDuration::parse(&text).map_err(serde::de::Error::custom),
            // A bare number is seconds, as tools that write `heartbeat_period = 5` mean it.
            TextOrNumber::Number(secs) => Ok(ConfigDuration(Duration::from_secs(secs))),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a whole number")]
enum TextOrNumber {
    Number(u64),
    Text(String),
}

/// A size in bytes: a whole number, or a string with a unit (`"16GiB"`, `"100 MB"`, `"512k"`:
/// decimal units are powers of 1000, binary ones of 1024).
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match TextOrNumber::deserialize(d)? {
        TextOrNumber::Number(n) => Ok(n),
        TextOrNumber::Text(text) => parse_byte_size(&text).map_err(serde::de::Error::custom),
    }
}

fn optional_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size(d).map(Some)
}

fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}` is not a size: write bytes (17179869184) or with a unit (\"16GiB\", \"100 MB\")"
            ));
        }
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a size: it starts with no number"))?;
    Ok((value * factor as f64).round() as u64)
}

/// Environment variables: strings, or numbers and booleans written as TOML values (`4`, `true`).
fn env_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string, a number or a boolean")]
    enum Value {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Value>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Text(t) => t,
                Value::Int(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

/// A key that takes one string or a list of strings; both become a list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}
