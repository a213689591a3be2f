//! The node's TOML configuration: the one source of keys, defaults, documentation and parsing.
//!
//! Keys follow Polars on-premises. Field doc comments are the documentation: `default-config`
//! prints them next to every default. Semantic checks that need resolved addresses live in
//! `layout`.

pub mod address;
pub mod layout;

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
    /// Autoscaling hooks of Polars on-premises; accepted, not implemented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Opaque>,
    /// OpenLineage export of Polars on-premises; accepted, not implemented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Opaque>,
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
            scaling: None,
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
    /// Worker registration and heartbeats (gRPC).
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
    /// Periodic checkpoints of the scheduler's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointConfig>,
    /// A worker is marked lost after this many heartbeat periods without a heartbeat.
    pub lost_after_missed_heartbeats: u32,
    /// How many times a task may run before its query fails: a task whose worker is lost, or
    /// whose execution process dies, runs again elsewhere (as Spark's `spark.task.maxFailures`).
    /// A query's `n_retries` adds to it.
    pub max_task_attempts: u32,
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
            checkpoint: None,
            lost_after_missed_heartbeats: 3,
            max_task_attempts: 4,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// How often the scheduler checkpoints its state. Unset: never.
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
    /// Where query checkpoints are written. Unset: no checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_location: Option<StorageLocation>,
    /// Extra environment variables for query execution.
    #[serde(deserialize_with = "env_values")]
    pub env_vars: BTreeMap<String, String>,
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

// ---------------------------------------------------------------------------------------------
// The schema as data: field names, their docs and sub-sections, for `default-config` and for
// suggesting the nearest valid key.

/// One table of the configuration.
#[derive(Clone, Copy)]
pub struct Section {
    pub fields: &'static [&'static str],
    pub docs: &'static [&'static str],
    /// The section a field opens, if the field is a table of keys (not a value).
    pub child: fn(&str) -> Option<Section>,
}

trait Schema: DocumentedFields {
    fn child(_field: &str) -> Option<Section> {
        None
    }
    fn section() -> Section {
        Section { fields: Self::FIELD_NAMES, docs: Self::FIELD_DOCS, child: Self::child }
    }
}

impl Schema for Config {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "scheduler" => SchedulerConfig::section(),
            "worker" => WorkerConfig::section(),
            "observatory" => ObservatoryConfig::section(),
            "monitoring" => MonitoringConfig::section(),
            "static_leader" => StaticLeaderConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for SchedulerConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "client_service" => SecuredServiceConfig::<ClientPort>::section(),
            "worker_service" => ServiceConfig::<WorkerServicePort>::section(),
            "checkpoint" => CheckpointConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for WorkerConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "task_service" => ServiceConfig::<TaskPort>::section(),
            "shuffle_service" => ServiceConfig::<ShufflePort>::section(),
            _ => return None,
        })
    }
}
impl Schema for ObservatoryConfig {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "service" => ServiceConfig::<OtlpPort>::section(),
            "rest_api" => RestApiConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for RestApiConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "service").then(SecuredServiceConfig::<RestPort>::section)
    }
}
impl Schema for MonitoringConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "host_metrics").then(HostMetricsConfig::section)
    }
}
impl Schema for StaticLeaderConfig {
    fn child(field: &str) -> Option<Section> {
        matches!(field, "scheduler_service" | "observatory_service").then(PublicAddrConfig::section)
    }
}
impl<P: DefaultPort> Schema for SecuredServiceConfig<P> {
    fn child(field: &str) -> Option<Section> {
        Some(match field {
            "connection" => ConnectionConfig::section(),
            "auth" => AuthConfig::section(),
            _ => return None,
        })
    }
}
impl Schema for ConnectionConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "tls").then(TlsConfig::section)
    }
}
impl Schema for AuthConfig {
    fn child(field: &str) -> Option<Section> {
        (field == "jwks").then(JwksConfig::section)
    }
}
impl<P: DefaultPort> Schema for ServiceConfig<P> {}
impl Schema for HostMetricsConfig {}
impl Schema for CheckpointConfig {}
impl Schema for PublicAddrConfig {}
impl Schema for TlsConfig {}
impl Schema for JwksConfig {}

/// The top of the schema.
pub fn schema() -> Section {
    Config::section()
}

/// Every dotted key path of the schema (sections and leaves).
pub fn all_key_paths() -> Vec<String> {
    fn walk(section: Section, prefix: &str, out: &mut Vec<String>) {
        for field in section.fields {
            let path = if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") };
            out.push(path.clone());
            if let Some(child) = (section.child)(field) {
                walk(child, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(schema(), "", &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Loading: file text + environment overrides -> Config, with every problem located.

/// Where a configuration problem comes from.
#[derive(Debug, Clone)]
pub enum Origin {
    Line { file: String, line: usize },
    Env(String),
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line { file, line } => write!(f, "{file}:{line}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File(file) => write!(f, "{file}"),
        }
    }
}

/// All problems found in a configuration, one per line when displayed.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "invalid configuration ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub struct Loaded {
    pub config: Config,
    /// Keys of Polars on-premises that are set but not implemented here yet.
    pub warnings: Vec<String>,
}

/// Reads `path` and applies `PC_CUBLET__*` overrides from `env`.
pub fn load_file(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Loaded, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("cannot read configuration file {name}: {e}")]))?;
    load_str(&text, &name, env)
}

pub fn load_str(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigErrors> {
    let original =
        toml_edit::Document::parse(text.to_string()).map_err(|e| ConfigErrors(vec![syntax_error(file, text, &e)]))?;
    let original_spans = key_spans(&original);
    let mut doc = original.clone().into_mut();

    let mut env_keys: BTreeMap<Vec<String>, String> = BTreeMap::new();
    let mut errors = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|s| s.is_empty()) {
            errors.push(format!("environment variable {var}: empty key segment; write {ENV_PREFIX}section__key"));
            continue;
        }
        if let Err(e) = set_path(&mut doc, &path, env_value(&raw)) {
            errors.push(format!("environment variable {var}: {e}"));
            continue;
        }
        env_keys.insert(path, var);
    }

    let origin_of = |path: &[String]| -> Origin {
        if let Some(var) = env_keys.get(path) {
            return Origin::Env(var.clone());
        }
        // The key itself or the nearest enclosing key that appears in the file.
        for len in (1..=path.len()).rev() {
            if let Some(span) = original_spans.get(&path[..len]) {
                return Origin::Line { file: file.to_string(), line: line_of(text, span.start) };
            }
        }
        Origin::File(file.to_string())
    };

    // Deserialize; on each error, record it, drop the offending key and try again, so that one
    // run reports every unknown key and wrong value rather than only the first.
    let config = loop {
        let rendered = doc.to_string();
        match toml_edit::de::from_str::<Config>(&rendered) {
            Ok(config) => break config,
            Err(e) => {
                let reparsed = toml_edit::Document::parse(rendered.clone()).expect("rendered TOML parses");
                let spans = key_spans(&reparsed);
                let at = e.span().map(|s| s.start);
                let path = at.and_then(|offset| innermost_key_at(&spans, offset));
                let Some(path) = path else {
                    errors.push(format!("{file}: {}", e.message()));
                    break Config::default();
                };
                let dotted = path.join(".");
                let origin = origin_of(&path);
                let message = e.message();
                if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                    errors.push(format!("{origin}: unknown key `{dotted}`{}", suggestion(&path, unknown)));
                } else {
                    errors.push(format!("{origin}: `{dotted}`: {message}"));
                }
                if !remove_path(&mut doc, &path) || errors.len() > 100 {
                    break Config::default();
                }
            }
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let warnings = not_yet_implemented(&config);
    Ok(Loaded { config, warnings })
}

fn syntax_error(file: &str, text: &str, e: &toml_edit::TomlError) -> String {
    let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
    format!("{file}:{line}: TOML syntax error: {}", e.message())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Span of every key (the whole `key = value` stretch) by its path.
fn key_spans(doc: &toml_edit::Document<String>) -> BTreeMap<Vec<String>, Range<usize>> {
    fn walk(table: &dyn toml_edit::TableLike, prefix: &[String], out: &mut BTreeMap<Vec<String>, Range<usize>>) {
        for (k, item) in table.iter() {
            let mut path = prefix.to_vec();
            path.push(k.to_string());
            let key_span = table.get_key_value(k).and_then(|(key, _)| key.span());
            let item_span = match item {
                toml_edit::Item::Value(v) => v.span(),
                toml_edit::Item::Table(t) => t.span(),
                _ => None,
            };
            let span = match (key_span, item_span) {
                (Some(a), Some(b)) => a.start.min(b.start)..a.end.max(b.end),
                (a, b) => match a.or(b) {
                    Some(s) => s,
                    None => continue,
                },
            };
            out.insert(path.clone(), span);
            if let Some(inner) = item.as_table_like() {
                walk(inner, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(doc.as_table(), &[], &mut out);
    out
}

fn innermost_key_at(spans: &BTreeMap<Vec<String>, Range<usize>>, offset: usize) -> Option<Vec<String>> {
    spans
        .iter()
        .filter(|(_, span)| span.start <= offset && offset < span.end.max(span.start + 1))
        .max_by_key(|(path, _)| path.len())
        .map(|(path, _)| path.clone())
}

fn remove_path(doc: &mut toml_edit::DocumentMut, path: &[String]) -> bool {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for p in parents {
        match table.get_mut(p).and_then(|i| i.as_table_like_mut()) {
            Some(t) => table = t,
            None => return false,
        }
    }
    table.remove(last).is_some()
}

fn set_path(doc: &mut toml_edit::DocumentMut, path: &[String], value: toml_edit::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (i, p) in parents.iter().enumerate() {
        let entry = table.entry(p).or_insert(toml_edit::table());
        match entry.as_table_like_mut() {
            Some(t) => table = t,
            None => return Err(format!("`{}` is a value, not a table", path[..=i].join("."))),
        }
    }
    table.insert(last, toml_edit::Item::Value(value));
    Ok(())
}

/// An override's value: a TOML value if it reads as one (`true`, `5`, `{ port = 4005 }`),
/// else the text itself (`10s`, `127.0.0.1:4005`).
fn env_value(raw: &str) -> toml_edit::Value {
    raw.parse::<toml_edit::Value>().unwrap_or_else(|_| toml_edit::Value::from(raw))
}

/// " (did you mean `x`?)" for an unknown key at `path`: a sibling with a similar name, or the
/// same name elsewhere in the schema.
fn suggestion(path: &[String], unknown: &str) -> String {
    let parent = &path[..path.len() - 1];
    let mut section = Some(schema());
    for p in parent {
        section = section.and_then(|s| (s.child)(p));
    }
    let siblings = section.map(|s| s.fields).unwrap_or_default();
    let best = siblings
        .iter()
        .map(|f| (strsim::jaro_winkler(f, unknown), *f))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, name)) = best {
        let mut full = parent.to_vec();
        full.push(name.to_string());
        return format!("; did you mean `{}`?", full.join("."));
    }
    if let Some(elsewhere) = all_key_paths().into_iter().find(|p| p.rsplit('.').next() == Some(unknown)) {
        return format!("; `{unknown}` belongs at `{elsewhere}`");
    }
    if siblings.is_empty() { String::new() } else { format!("; valid keys here: {}", siblings.join(", ")) }
}

/// Real Polars on-premises keys that are set in this configuration but have no effect yet.
/// Each later capability removes its keys from this list.
fn not_yet_implemented(c: &Config) -> Vec<String> {
    let mut keys: Vec<&str> = Vec::new();
    let mut check = |set: bool, key: &'static str| {
        if set {
            keys.push(key)
        }
    };
    check(c.license.is_some(), "license");
    check(c.scaling.is_some(), "scaling");
    check(c.lineage.is_some(), "lineage");
    check(c.cpu_reserved.is_some(), "cpu_reserved");
    let s = &c.scheduler;
    check(!s.anonymous_result_location.is_local(), "scheduler.anonymous_result_location");
    check(s.checkpoint.is_some(), "scheduler.checkpoint");
    let w = &c.worker;
    check(w.checkpoint_location.is_some(), "worker.checkpoint_location");
    keys.into_iter().map(|k| format!("`{k}` is accepted but not implemented yet; it has no effect")).collect()
}

// ---------------------------------------------------------------------------------------------
// `default-config`: every key with its default and its documentation.

/// A complete, commented TOML document of the defaults. Keys without a default are shown
/// commented out.
/// A role `default-config --role` turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Scheduler,
    Worker,
    Observatory,
    /// Scheduler, worker and observatory in one node.
    All,
}

/// Every key with its default, documented; with `roles`, a node that runs as printed: those
/// roles on, their services on loopback (one machine), monitoring on where the observatory is.
pub fn default_config_toml(roles: &[Role]) -> String {
    // The real default is the host name, which differs per machine.
    let mut config = Config { instance_id: "polars-node".into(), ..Config::default() };
    let on = |role| roles.iter().any(|r| *r == role || *r == Role::All);
    let loopback = |a: &Address| Address::ip(std::net::Ipv4Addr::LOCALHOST.into(), a.port);
    if on(Role::Scheduler) {
        let s = &mut config.scheduler;
        s.enabled = true;
        s.client_service.bind_addr = loopback(&s.client_service.bind_addr);
        s.worker_service.bind_addr = loopback(&s.worker_service.bind_addr);
    }
    if on(Role::Worker) {
        let w = &mut config.worker;
        w.enabled = true;
        w.task_service.bind_addr = loopback(&w.task_service.bind_addr);
        w.shuffle_service.bind_addr = loopback(&w.shuffle_service.bind_addr);
    }
    // Every node without the scheduler must know where it is (here: on this machine).
    if !roles.is_empty() && !on(Role::Scheduler) {
        config.static_leader.scheduler_service.public_addr =
            Some(loopback(&SchedulerConfig::default().worker_service.bind_addr));
    }
    if on(Role::Observatory) {
        let o = &mut config.observatory;
        o.enabled = true;
        o.service.bind_addr = loopback(&o.service.bind_addr);
        o.rest_api.service.bind_addr = loopback(&o.rest_api.service.bind_addr);
        config.monitoring.enabled = true;
    }
    let doc = toml_edit::ser::to_document(&config).expect("defaults serialize");
    let mut out = String::from(match roles.is_empty() {
        true => {
            "# polars-node configuration: every key with its default.\n\
             # No role is on: `polars-node default-config --role all` prints a node that runs as is.\n\
             # Any key can be overridden by an environment variable PC_CUBLET__section__key.\n"
        }
        false => {
            "# polars-node configuration: every key with its default, and the chosen roles on,\n\
             # their services on loopback. For a cluster of several machines, bind to the\n\
             # machine's address (or 0.0.0.0 with a public_addr) and point static_leader at the\n\
             # scheduler and the observatory.\n\
             # Any key can be overridden by an environment variable PC_CUBLET__section__key.\n"
        }
    });
    render_section(&mut out, "", schema(), Some(doc.as_table()));
    out
}

/// Renders one section; `table` is `None` for an optional section without a default, which is
/// then shown commented out, keys and sub-sections alike.
fn render_section(out: &mut String, header: &str, section: Section, table: Option<&dyn toml_edit::TableLike>) {
    let mut subsections = Vec::new();
    out.push('\n');
    for (field, doc) in section.fields.iter().zip(section.docs) {
        if let Some(child) = (section.child)(field) {
            subsections.push((*field, *doc, child));
            continue;
        }
        for line in doc.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        match table.and_then(|t| t.get(field)).and_then(|item| item.clone().into_value().ok()) {
            Some(mut value) => {
                value.decor_mut().clear();
                out.push_str(&format!("{field} = {value}\n"));
            }
            None => out.push_str(&format!("# {field} =\n")),
        }
    }
    for (field, doc, child) in subsections {
        let name = if header.is_empty() { field.to_string() } else { format!("{header}.{field}") };
        out.push('\n');
        for line in doc.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        let inner = table.and_then(|t| t.get(field)).and_then(|i| i.as_table_like());
        out.push_str(&format!("{}[{name}]", if inner.is_some() { "" } else { "# " }));
        render_section(out, &name, child, inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Loaded, Vec<String>> {
        load_str(text, "node.toml", Vec::new()).map_err(|e| e.0)
    }

    fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Loaded, Vec<String>> {
        load_str(text, "node.toml", env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).map_err(|e| e.0)
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = load("").unwrap().config;
        assert_eq!(c.cluster_id, "polars-onprem");
        assert_eq!(c.scheduler.client_service.bind_addr, Address::any(5051));
        assert_eq!(c.scheduler.worker_service.bind_addr, Address::any(5050));
        assert_eq!(c.worker.task_service.bind_addr, Address::any(5052));
        assert_eq!(c.worker.shuffle_service.bind_addr, Address::any(5053));
        assert_eq!(c.observatory.service.bind_addr, Address::any(5049));
        assert_eq!(c.observatory.rest_api.service.bind_addr, Address::any(3001));
        assert!(c.observatory.rest_api.enabled);
        assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
        assert!(c.scheduler.allow_local_scans && c.scheduler.allow_local_sinks && !c.scheduler.deny_anonymous_users);
        assert_eq!(c.observatory.max_metrics_bytes_total, 104857600);
        assert_eq!(c.observatory.database_path, PathBuf::from("/tmp/polars/observatory/data.db"));
        assert_eq!(
            c.worker.shuffle_location,
            StorageLocation::Local(LocalPath { path: "/tmp/polars/shuffle-data".into() })
        );
        assert!(c.monitoring.host_metrics.enabled);
    }

    #[test]
    fn the_seed_layout_parses() {
        let text = r#"
instance_id = "worker-0"
cluster_id = "polars-onprem"

[worker]
enabled = true
task_service.bind_addr.port = 4005
task_service.public_addr = "192.168.1.1:4005"
shuffle_service.bind_addr.port = 4006
shuffle_service.public_addr = "192.168.1.1:4006"
heartbeat_period = "PT5S"

[static_leader]
leader_instance_id = "scheduler"
scheduler_service.public_addr = "192.168.1.2:5051"
observatory_service.public_addr = "192.168.1.2:5049"
"#;
        let c = load(text).unwrap().config;
        assert!(c.worker.enabled);
        assert_eq!(c.worker.task_service.bind_addr, Address::any(4005));
        assert_eq!(c.worker.shuffle_service.public_addr, Some(Address::parse("192.168.1.1:4006").unwrap()));
        assert_eq!(c.static_leader.leader_instance_id.as_deref(), Some("scheduler"));
    }

    #[test]
    fn jwks_issuers_are_one_string_or_a_list_on_every_service_with_auth() {
        let jwks = |issuers: &str| format!("jwks.url = \"https://idp.example/jwks.json\"\njwks.issuers = {issuers}\n");
        for section in ["scheduler.client_service.auth", "observatory.rest_api.service.auth"] {
            let pick = |c: Config| match section.starts_with("scheduler") {
                true => c.scheduler.client_service.auth,
                false => c.observatory.rest_api.service.auth,
            };
            for (issuers, expected) in [
                ("\"https://idp.example\"", vec!["https://idp.example"]),
                ("[\"https://a.example\", \"https://b.example\"]", vec!["https://a.example", "https://b.example"]),
                ("[]", Vec::<&str>::new()),
            ] {
                let text = format!("[{section}]\n{}", jwks(issuers));
                let c = load(&text).unwrap_or_else(|e| panic!("{text}: {e:?}")).config;
                assert_eq!(pick(c).unwrap().jwks.issuers, expected, "{text}");
            }
            let errors = load(&format!("[{section}]\n{}", jwks("5"))).err().unwrap();
            assert!(errors.iter().any(|e| e.contains("a string or a list of strings")), "{errors:?}");
        }
    }

    /// The forms Polars' own tooling and users write for the same keys: every one is read.
    #[test]
    fn keys_take_every_form_their_writers_use() {
        let c = load(
            "memory_limit = \"16GiB\"\ncpu_reserved = \"1.5\"\n[worker]\nheartbeat_period = 5\n\
             env_vars = { POLARS_MAX_THREADS = 4, POLARS_VERBOSE = true, RATIO = 0.5, NAME = \"x\" }\n\
             [scheduler]\ncheckpoint.period = 60\nclient_service.bind_addr = \":5051\"\n\
             client_service.auth.jwks = { url = \"https://idp/jwks\", audience = [\"a\", \"b\"] }\n\
             [observatory]\nmax_metrics_bytes_total = \"100 MB\"\n\
             rest_api.service.auth.jwks = { url = \"https://idp/jwks\", audience = \"c\" }\n",
        )
        .unwrap()
        .config;
        assert_eq!(c.memory_limit, Some(16 << 30));
        assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
        assert_eq!(c.scheduler.checkpoint.unwrap().period.unwrap().0, Duration::from_secs(60));
        assert_eq!(c.scheduler.client_service.bind_addr, Address::any(5051));
        assert_eq!(c.scheduler.client_service.auth.unwrap().jwks.audience, ["a", "b"]);
        assert_eq!(c.observatory.rest_api.service.auth.unwrap().jwks.audience, ["c"]);
        assert_eq!(c.observatory.max_metrics_bytes_total, 100_000_000);
        let env: Vec<(&str, &str)> = c.worker.env_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, [("NAME", "x"), ("POLARS_MAX_THREADS", "4"), ("POLARS_VERBOSE", "true"), ("RATIO", "0.5")]);
        let c = load("memory_limit = 17179869184\ncpu_reserved = 2\n[observatory]\nmax_metrics_bytes_total = 1000\n")
            .unwrap()
            .config;
        assert_eq!((c.memory_limit, c.observatory.max_metrics_bytes_total), (Some(17179869184), 1000));
        for (size, bytes) in [("512k", 512_000), ("1.5 GiB", 1_610_612_736), ("7", 7), ("2TB", 2_000_000_000_000)] {
            assert_eq!(parse_byte_size(size), Ok(bytes), "{size}");
        }
        let errors = load("memory_limit = \"lots\"\n").err().unwrap();
        assert!(errors[0].contains("`lots` is not a size"), "{errors:?}");
        let errors = load("[worker]\nheartbeat_period = -5\n").err().unwrap();
        assert!(errors[0].contains("a string or a whole number"), "{errors:?}");
    }

    #[test]
    fn durations_in_iso_and_friendly_forms() {
        for (text, secs) in [("PT5S", 5), ("5s", 5), ("5 secs", 5), ("1m 30s", 90), ("PT1M30S", 90), ("2 minutes", 120)]
        {
            assert_eq!(ConfigDuration::parse(text).unwrap().0, Duration::from_secs(secs), "{text}");
        }
        let errors = load("[worker]\nheartbeat_period = \"soon\"\n").err().unwrap();
        assert_eq!(
            errors,
            vec![
                "node.toml:2: `worker.heartbeat_period`: `soon` is not a duration: write it as \"5s\", \"2 mins\", \"1h 30m\" or ISO 8601 \"PT5S\""
            ]
        );
        assert_eq!(ConfigDuration(Duration::from_secs(90)).to_string(), "1m 30s");
    }

    #[test]
    fn unknown_keys_name_the_key_its_line_and_the_nearest_valid_key() {
        let errors = load("[scheduler]\nenabled = true\nclient_sevice.bind_addr = \":1\"\n").err().unwrap();
        assert_eq!(
            errors,
            vec!["node.toml:3: unknown key `scheduler.client_sevice`; did you mean `scheduler.client_service`?"]
        );

        // Every unknown key is reported in one run, each with its own line.
        let errors =
            load("instanc_id = \"a\"\n[worker]\nenabled = true\nheartbeat_perod = \"5s\"\n[observatory]\nbogus = 1\n")
                .err()
                .unwrap();
        assert_eq!(
            errors,
            vec![
                "node.toml:1: unknown key `instanc_id`; did you mean `instance_id`?",
                "node.toml:4: unknown key `worker.heartbeat_perod`; did you mean `worker.heartbeat_period`?",
                "node.toml:6: unknown key `observatory.bogus`; valid keys here: enabled, service, rest_api, database_path, max_metrics_bytes_total, database_export",
            ]
        );

        // A real key in the wrong section.
        let errors = load("[scheduler]\nheartbeat_period = \"5s\"\n").err().unwrap();
        assert_eq!(
            errors,
            vec![
                "node.toml:2: unknown key `scheduler.heartbeat_period`; `heartbeat_period` belongs at `worker.heartbeat_period`"
            ]
        );
    }

    #[test]
    fn wrong_types_are_located() {
        let errors = load("[scheduler]\nenabled = \"yes\"\n\n[worker.task_service]\nbind_addr = 5052\n").err().unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0], "node.toml:2: `scheduler.enabled`: invalid type: string \"yes\", expected a boolean");
        assert!(
            errors[1].starts_with(
                "node.toml:5: `worker.task_service.bind_addr`: invalid type: integer `5052`, expected an address"
            ),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn malformed_toml_is_a_syntax_error_with_its_line() {
        let errors = load("[scheduler]\nenabled = true\n[worker\n").err().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("node.toml:3: TOML syntax error:"), "{}", errors[0]);
    }

    #[test]
    fn environment_overrides_any_key() {
        let c = load_env(
            "[worker]\nenabled = false\n",
            &[
                ("PC_CUBLET__worker__enabled", "true"),
                ("PC_CUBLET__worker__heartbeat_period", "10s"),
                ("PC_CUBLET__worker__task_service__public_addr", "10.0.0.7:5052"),
                ("PC_CUBLET__worker__shuffle_service__bind_addr", "{ port = 4006 }"),
                ("PC_CUBLET__instance_id", "worker-7"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap()
        .config;
        assert!(c.worker.enabled);
        assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(10));
        assert_eq!(c.worker.task_service.public_addr, Some(Address::parse("10.0.0.7:5052").unwrap()));
        assert_eq!(c.worker.shuffle_service.bind_addr, Address::any(4006));
        assert_eq!(c.instance_id, "worker-7");

        let errors = load_env("", &[("PC_CUBLET__worker__heartbeat_perod", "10s")]).err().unwrap();
        assert_eq!(
            errors,
            vec![
                "environment variable PC_CUBLET__worker__heartbeat_perod: unknown key `worker.heartbeat_perod`; did you mean `worker.heartbeat_period`?"
            ]
        );
    }

    #[test]
    fn real_keys_not_implemented_yet_warn_and_load() {
        let loaded = load("[license.on_prem_enterprise]\nlicense_path = \"/etc/polars/license.json\"\n[scheduler]\ncheckpoint.period = \"1m\"\n").unwrap();
        assert_eq!(
            loaded.warnings,
            vec![
                "`license` is accepted but not implemented yet; it has no effect",
                "`scheduler.checkpoint` is accepted but not implemented yet; it has no effect",
            ]
        );
    }

    #[test]
    fn storage_locations() {
        let c = load("[worker]\nshuffle_location = { s3 = { url = \"s3://bucket/shuffle\", region = \"eu-west-1\" } }\n[scheduler]\nanonymous_result_location.shared_filesystem.path = \"/mnt/results\"\n").unwrap().config;
        match &c.worker.shuffle_location {
            StorageLocation::S3(o) => {
                assert_eq!(o.url, "s3://bucket/shuffle");
                assert_eq!(o.options.get("region").map(String::as_str), Some("eu-west-1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!c.worker.shuffle_location.is_local());
        assert_eq!(
            c.scheduler.anonymous_result_location,
            StorageLocation::SharedFilesystem(LocalPath { path: "/mnt/results".into() })
        );
    }

    #[test]
    fn default_config_is_complete_and_reads_back() {
        let text = default_config_toml(&[]);
        let c = load(&text).unwrap().config;
        assert_eq!(c.instance_id, "polars-node");
        assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
        // Every key of the schema appears, set or commented out, with its documentation.
        for path in all_key_paths() {
            let leaf = path.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{leaf} ="))
                    || text.contains(&format!("[{path}]"))
                    || text.contains(&format!("# [{path}]")),
                "{path} missing from:\n{text}"
            );
        }
        assert!(
            text.contains("# How often the worker tells the scheduler it is alive.\nheartbeat_period = \"5s\""),
            "{text}"
        );
        assert!(
            text.contains("[scheduler.client_service]\n# Address the service listens on.\nbind_addr = \":5051\""),
            "{text}"
        );
    }
}
