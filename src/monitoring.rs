//! `[monitoring]`: this node's traces and host metrics, exported over OTLP/gRPC to the
//! observatory. Spans go through a batch processor with a bounded queue and metrics through a
//! periodic reader: neither ever blocks a query, and an unreachable observatory costs the
//! exporter's warnings, not errors.

use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::config::HostMetricsConfig;

/// How often host metrics are sampled and sent.
const METRICS_INTERVAL: Duration = Duration::from_secs(2);

pub struct Monitoring {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
}

/// Whether this node exports traces (`[monitoring]` started).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans of this node go anywhere (extra span attributes cost work only then).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts exporting to the observatory at `observatory_addr`. Must run inside the Tokio
/// runtime: the gRPC channels live on it.
pub fn start(
    instance_id: &str,
    cluster_id: &str,
    observatory_addr: &str,
    host: &HostMetricsConfig,
    credentials: &crate::security::cluster::Credentials,
) -> anyhow::Result<Monitoring> {
    use opentelemetry_otlp::WithTonicConfig as _;
    // Over TLS with this node's certificate when the cluster has a CA.
    let channel = || -> anyhow::Result<tonic::transport::Channel> {
        let endpoint = credentials.endpoint(observatory_addr).map_err(anyhow::Error::msg)?;
        Ok(endpoint.timeout(Duration::from_secs(3)).connect_lazy())
    };
    // The cluster token, for an observatory that requires it (internal.token_file there too).
    let metadata = || {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(token) = &credentials.token
            && let Ok(value) = token.as_str().parse()
        {
            metadata.insert(crate::security::cluster::HEADER, value);
        }
        metadata
    };
    let resource = Resource::builder()
        .with_service_name("polars-node")
        .with_attributes([
            KeyValue::new("service.instance.id", instance_id.to_string()),
            KeyValue::new("polars.cluster_id", cluster_id.to_string()),
        ])
        .build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_metadata(metadata())
        .with_channel(channel()?)
        .with_timeout(Duration::from_secs(3))
        .build()?;
    let spans = Quiet::new(spans, "spans", observatory_addr);
    let tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build();
    opentelemetry::global::set_tracer_provider(tracer.clone());
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);

    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_metadata(metadata())
        .with_channel(channel()?)
        .with_timeout(Duration::from_secs(3))
        .build()?;
    let metrics = Quiet::new(metrics, "host metrics", observatory_addr);
    let reader = PeriodicReader::builder(metrics).with_interval(METRICS_INTERVAL).build();
    let meter = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
    // The scheduler's scaling metrics are registered on the global meter.
    opentelemetry::global::set_meter_provider(meter.clone());
    if host.enabled {
        register_host_metrics(&meter, host);
    }
    Ok(Monitoring { tracer, meter })
}

/// The attributes naming a stage task, which the observatory groups spans by.
pub fn task_attributes(query_id: &str, stage: i64, task: i64) -> [KeyValue; 3] {
    [
        KeyValue::new("polars.query_id", query_id.to_string()),
        KeyValue::new("polars.stage", stage),
        KeyValue::new("polars.task", task),
    ]
}

/// Starts a span of this node's tracer (exported when `[monitoring]` is on, a no-op
/// otherwise); end it with `.end()`.
pub fn span(name: &'static str, attributes: impl IntoIterator<Item = KeyValue>) -> opentelemetry::global::BoxedSpan {
    use opentelemetry::trace::Tracer as _;
    let tracer = opentelemetry::global::tracer("polars-node");
    tracer.span_builder(name).with_attributes(attributes).start(&tracer)
}

/// An exporter whose failures (an observatory that is down or unreachable) are a warning in
/// this node's log, at most once a minute, instead of errors: the data is dropped and the node
/// carries on.
#[derive(Debug)]
struct Quiet<E> {
    inner: E,
    what: &'static str,
    observatory: String,
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl<E> Quiet<E> {
    fn new(inner: E, what: &'static str, observatory: &str) -> Self {
        Quiet { inner, what, observatory: observatory.to_string(), last_warning: Mutex::new(None) }
    }

    fn absorb(&self, result: opentelemetry_sdk::error::OTelSdkResult) -> opentelemetry_sdk::error::OTelSdkResult {
        if let Err(e) = result {
            let mut last = self.last_warning.lock().unwrap();
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *last = Some(std::time::Instant::now());
                tracing::warn!(
                    "cannot export {} to the observatory at {} (dropped; retried with the next batch): {e}",
                    self.what,
                    self.observatory
                );
            }
        }
        Ok(())
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for Quiet<E> {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.absorb(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>
    opentelemetry_sdk::metrics::exporter::PushMetricExporter for Quiet<E>
{
    async fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.absorb(result)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

impl Monitoring {
    /// Sends what is buffered (bounded by the exporters' timeouts).
    pub fn shutdown(self) {
        let _ = self.tracer.shutdown();
        let _ = self.meter.shutdown();
    }
}

/// Host metrics, read when the reader samples them: from this node's cgroup where it has
/// one (what the node may use), else from /proc (the host).
fn register_host_metrics(provider: &SdkMeterProvider, host: &HostMetricsConfig) {
    let meter = provider.meter("polars-node.host");
    let cpu = Mutex::new(None::<(u64, u64)>);
    meter
        .f64_observable_gauge("host.cpu.utilization")
        .with_description("Share of CPU time busy since the previous sample (0..1), all cores")
        .with_callback(move |obs| {
            if let Some((busy, total)) = cpu_times() {
                let mut last = cpu.lock().unwrap();
                if let Some((b0, t0)) = *last
                    && total > t0
                {
                    obs.observe((busy - b0) as f64 / (total - t0) as f64, &[]);
                }
                *last = Some((busy, total));
            }
        })
        .build();
    meter
        .u64_observable_gauge("host.memory.used")
        .with_unit("By")
        .with_callback(|obs| {
            if let Some((used, _)) = memory() {
                obs.observe(used, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("host.memory.total")
        .with_unit("By")
        .with_callback(|obs| {
            if let Some((_, total)) = memory() {
                obs.observe(total, &[]);
            }
        })
        .build();
    if host.disk_usage_metrics {
        meter
            .u64_observable_gauge("host.disk.used")
            .with_unit("By")
            .with_callback(|obs| {
                if let Ok(s) = nix::sys::statvfs::statvfs("/") {
                    let used = (s.blocks() - s.blocks_free()) * s.fragment_size();
                    obs.observe(used, &[KeyValue::new("mount", "/")]);
                }
            })
            .build();
    }
    if host.disk_io_metrics {
        meter
            .u64_observable_counter("host.disk.io")
            .with_unit("By")
            .with_callback(|obs| {
                if let Some((read, written)) = disk_io() {
                    obs.observe(read, &[KeyValue::new("direction", "read")]);
                    obs.observe(written, &[KeyValue::new("direction", "write")]);
                }
            })
            .build();
    }
}

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// (used, total) bytes: the cgroup's usage and limit when limited, else the host's.
fn memory() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let (total, available) = (field("MemTotal:")?, field("MemAvailable:")?);
    Some((total.saturating_sub(available), total))
}

/// Cumulative bytes read and written by all disks.
fn disk_io() -> Option<(u64, u64)> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    let (mut read, mut written) = (0u64, 0u64);
    for line in stats.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Whole devices only (partitions would count twice).
        if f.len() > 9 && !f[2].starts_with("loop") && !f[2].chars().last().is_some_and(|c| c.is_ascii_digit()) {
            read += f[5].parse::<u64>().unwrap_or(0) * 512;
            written += f[9].parse::<u64>().unwrap_or(0) * 512;
        }
    }
    Some((read, written))
}
