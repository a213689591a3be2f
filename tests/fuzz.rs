//! Hostile input, generated: every parser that takes bytes from outside the node - the
//! configuration file and `PC_CUBLET__` values, address forms, plan bytes as the client
//! service receives them, shuffle-service requests, REST API paths and query parameters, OTLP
//! exports - is fed random and mutated input (proptest, seeded from the checked-in corpus under
//! `fuzz/corpus/`). Nothing may panic, and every rejection must say what was wrong.
//!
//! Each target runs for `FUZZ_SECONDS` (default 5; `.ci/run` gives each 60) in batches of 256
//! cases with seeds derived from the target's name, the batch number and `FUZZ_SEED` (default
//! 0), so a failure names the batch that reproduces it. The README gives the longer run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Runs `check` on values of `strategy` until the target's time is up.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let seconds = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5u64);
    let base: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut batch = 0u64;
    while Instant::now() < deadline {
        let mut seed = [0u8; 32];
        let name_hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        seed[..8].copy_from_slice(&name_hash.to_le_bytes());
        seed[8..16].copy_from_slice(&base.to_le_bytes());
        seed[16..24].copy_from_slice(&batch.to_le_bytes());
        let config = Config { cases: 256, failure_persistence: None, max_shrink_iters: 2000, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        if let Err(e) = runner.run(&strategy, &check) {
            panic!("fuzz target {name}, FUZZ_SEED={base}, batch {batch}: {e}");
        }
        batch += 1;
    }
    eprintln!("fuzz target {name}: {} cases in {seconds} s", batch * 256);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Copies a slice of the input over another place of it.
    Splice(usize, usize, usize),
    /// Writes a boundary value (0, -1, 2^31, 2^63 ...) as 8 little-endian bytes.
    Boundary(usize, u64),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary =
        prop::sample::select(vec![0u64, 1, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 31, 1 << 63, u64::MAX]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), any::<usize>(), 1..64usize).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        (any::<usize>(), boundary).prop_map(|(i, v)| Mutation::Boundary(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut data: Vec<u8>, mutations: Vec<Mutation>) -> Vec<u8> {
    for m in mutations {
        let len = data.len().max(1);
        match m {
            Mutation::Flip(i, b) if !data.is_empty() => data[i % len] ^= b.max(1),
            Mutation::Insert(i, bytes) => {
                let at = i % (data.len() + 1);
                data.splice(at..at, bytes);
            }
            Mutation::Delete(i, n) if !data.is_empty() => {
                let at = i % len;
                data.drain(at..(at + n).min(data.len()));
            }
            Mutation::Splice(from, to, n) if !data.is_empty() => {
                let (from, to) = (from % len, to % len);
                let piece: Vec<u8> = data[from..(from + n).min(data.len())].to_vec();
                let end = (to + piece.len()).min(data.len());
                data.splice(to..end, piece);
            }
            Mutation::Boundary(i, v) if data.len() >= 8 => {
                let at = i % (data.len() - 7);
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Truncate(i) => data.truncate(i % (data.len() + 1)),
            _ => {}
        }
    }
    data
}

/// Seeds, mutated; or bytes from nowhere.
fn inputs(seeds: Vec<Vec<u8>>, max_random: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (prop::sample::select(seeds), prop::collection::vec(mutation(), 0..8)).prop_map(|(s, m)| apply(s, m)),
        1 => prop::collection::vec(any::<u8>(), 0..max_random),
    ]
}

/// A rejection must say something a person can act on.
fn named(error: &str) -> Result<(), TestCaseError> {
    prop_assert!(error.trim().len() >= 10, "a rejection without a reason: {error:?}");
    Ok(())
}

#[test]
fn fuzz_configuration_files() {
    use polars_node::config::layout::{Resolution, plan_with};
    let mut seeds = corpus("config");
    seeds.push(std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("images/node.toml")).unwrap());
    seeds.push(polars_node::config::default_config_toml(&[polars_node::config::Role::All]).into_bytes());
    fuzz("config", inputs(seeds, 512), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        match polars_node::config::load_str(&text, "fuzz.toml", Vec::<(String, String)>::new()) {
            Err(errors) => named(&errors.to_string()),
            Ok(loaded) => match plan_with(&loaded.config, Resolution::Offline) {
                Err(problems) => problems.iter().try_for_each(|p| named(p)),
                Ok(_) => Ok(()),
            },
        }
    });
}

#[test]
fn fuzz_environment_overrides() {
    let base = String::from_utf8(corpus("config")[0].clone()).unwrap();
    let key = prop_oneof![
        prop::sample::select(polars_node::config::all_key_paths()).prop_map(|k| k.replace('.', "__")),
        "[a-zA-Z_]{0,12}(__[a-zA-Z_]{0,12}){0,4}",
    ];
    let value = prop_oneof![
        Just(String::new()),
        "true|false|[0-9]{1,20}|-[0-9]{1,5}|[0-9]+(ms|s|m|h|d|x)|\\[.{0,10}\\]|\\{.{0,10}\\}|\".{0,10}",
        ".{0,40}",
    ];
    let env = prop::collection::vec((key, value), 1..4);
    fuzz("env", env, |vars| {
        let env: Vec<(String, String)> = vars.into_iter().map(|(k, v)| (format!("PC_CUBLET__{k}"), v)).collect();
        match polars_node::config::load_str(&base, "fuzz.toml", env) {
            Err(errors) => named(&errors.to_string()),
            Ok(loaded) => {
                polars_node::config::layout::plan_with(&loaded.config, polars_node::config::layout::Resolution::Offline)
                    .err()
                    .unwrap_or_default()
                    .iter()
                    .try_for_each(|p| named(p))
            }
        }
    });
}

#[test]
fn fuzz_address_forms() {
    use polars_node::config::address::Address;
    let seeds: Vec<Vec<u8>> = corpus("addresses")[0].split(|b| *b == b'\n').map(|l| l.to_vec()).collect();
    fuzz("address", inputs(seeds, 64), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        match Address::parse(&text) {
            Err(e) => named(&e.to_string()),
            // What parses is written back in a form that parses to the same address.
            Ok(address) => {
                let again = Address::parse(&address.to_string());
                prop_assert!(again.is_ok(), "{text:?} parsed but {address} does not: {again:?}");
                Ok(())
            }
        }
    });
}

#[test]
fn fuzz_submitted_plans() {
    use polars_node::scheduler::queries::{Policy, WorkerBounds, judge_plan};
    use polars_node_engine::python::PythonPlan;
    // Quiet: plans that trip a Polars assertion are caught (and named) by the engine's guard,
    // and the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    let policy = Policy {
        max_task_attempts: 1,
        allow_local_scans: false,
        allow_local_sinks: false,
        bounds: WorkerBounds {
            default_workers_per_query: None,
            max_workers_per_query: None,
            default_partitions_per_worker: None,
        },
        min_split_bytes: 0,
        worker_wait: std::time::Duration::from_secs(30),
    };
    let version = prop::option::of(prop::sample::select(vec![
        "2.0.0".to_string(),
        "1.44.2".into(),
        "".into(),
        "2.0.0\u{0}".into(),
    ]));
    fuzz("plan", (inputs(corpus("plans"), 4096), version), |(plan, version)| {
        let python = PythonPlan::find(&plan);
        match judge_plan(&plan, version.as_deref(), policy, python.as_ref()) {
            Err(e) => named(&e),
            Ok(_) => Ok(()),
        }
    });
}

#[test]
fn fuzz_shuffle_requests() {
    use axum::body::Body;
    use axum::http::Request;
    use polars_node::worker::shuffle::ShuffleStore;
    use tower::ServiceExt as _;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shuffle");
    let file = root.join("q").join("w").join("0-0").join("0.arrow");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"shuffle bytes").unwrap();
    std::fs::write(dir.path().join("secret"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), file.with_file_name("link.arrow")).unwrap();
    let store = ShuffleStore::new(root.clone(), false, "w".into());
    let app = polars_node::worker::shuffle::router(store.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seeds: Vec<Vec<u8>> = [
        file.display().to_string(),
        format!("{}/../secret", root.display()),
        file.with_file_name("link.arrow").display().to_string(),
        format!("{}/q/%2e%2e/%2e%2e/secret", root.display()),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let header =
        (prop::sample::select(vec!["upgrade", "x-polars-node-token", "connection", "host", "range"]), ".{0,64}");
    fuzz("shuffle", (inputs(seeds, 256), prop::collection::vec(header, 0..3)), |(path, headers)| {
        let text = String::from_utf8_lossy(&path).to_string();
        // The path as the service takes it, and the query string a peer could send.
        if let Ok(served) = store.servable(&text) {
            let real_root = std::fs::canonicalize(&root).unwrap();
            prop_assert!(served.starts_with(&real_root), "{text:?} escaped the root: {}", served.display());
        }
        let query = url::form_urlencoded::Serializer::new(String::new()).append_pair("path", &text).finish();
        for uri in [format!("/v1/shuffle?{query}"), format!("/v1/shuffle?path={text}")] {
            let mut request = Request::get(uri);
            for (name, value) in &headers {
                request = request.header(*name, value.as_str());
            }
            let Ok(request) = request.body(Body::empty()) else { continue }; // hyper refuses these first
            let response = runtime.block_on(app.clone().oneshot(request)).unwrap();
            let status = response.status().as_u16();
            let body = runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap_or_default();
            prop_assert!(!body.windows(16).any(|w| w == b"outside the root"), "a file outside the root was sent");
            prop_assert!([101, 200, 400, 403, 404].contains(&status), "status {status}");
            if status >= 400 {
                named(&String::from_utf8_lossy(&body))?;
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_rest_api_requests() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    let dir = tempfile::tempdir().unwrap();
    let store = polars_node::observatory::store::Store::open(&dir.path().join("o.db"), 1 << 20).unwrap();
    let app = polars_node::observatory::rest::router(store, None);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let path = prop::sample::select(vec![
        "/",
        "/dashboard.js",
        "/api/v1/openapi.json",
        "/api/v1/queries",
        "/api/v1/query/",
        "/api/v1/nodes",
        "/api/v1/metrics",
        "/metrics",
        "/api/v1/query/00000000-0000-0000-0000-000000000000",
    ]);
    let params = prop::collection::vec(
        (
            prop::sample::select(vec!["limit", "offset", "node", "name", "since", "until", "state", "user", "x"]),
            prop_oneof![".{0,24}", "-?[0-9]{1,25}", Just("18446744073709551616".to_string())],
        ),
        0..4,
    );
    let suffix = prop_oneof![Just(String::new()), ".{0,24}", "(%[0-9a-fA-F]{2}){1,6}"];
    fuzz("rest", (path, suffix, params), |(path, suffix, params)| {
        let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
        let Ok(request) = Request::get(format!("{path}{suffix}?{query}")).body(Body::empty()) else {
            return Ok(()); // not a URI: hyper answers 400 before routing
        };
        let response = runtime.block_on(app.clone().oneshot(request)).unwrap();
        let status = response.status().as_u16();
        prop_assert!(status < 500, "status {status} for {path}{suffix}?{query}");
        if status >= 400 && status != 404 && status != 405 {
            let body = runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
            named(&String::from_utf8_lossy(&body))?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_otlp_exports() {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
    use prost::Message as _;

    let dir = tempfile::tempdir().unwrap();
    let store = polars_node::observatory::store::Store::open(&dir.path().join("o.db"), 1 << 20).unwrap();
    let receiver = polars_node::observatory::otlp::Receiver::new(store);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seeds = otlp_seeds();
    fuzz("otlp", (inputs(seeds, 1024), any::<bool>()), |(bytes, as_metrics)| {
        // Bytes a gRPC frame could carry: prost refuses what is not a message.
        let answer = match as_metrics {
            false => match ExportTraceServiceRequest::decode(bytes.as_slice()) {
                Ok(m) => runtime.block_on(TraceService::export(&receiver, tonic::Request::new(m))).map(|_| ()),
                Err(_) => return Ok(()),
            },
            true => match ExportMetricsServiceRequest::decode(bytes.as_slice()) {
                Ok(m) => runtime.block_on(MetricsService::export(&receiver, tonic::Request::new(m))).map(|_| ()),
                Err(_) => return Ok(()),
            },
        };
        if let Err(status) = answer {
            named(status.message())?;
        }
        Ok(())
    });
}

/// Exports as a node sends them: a task span with the attributes the observatory reads, and
/// host metrics (gauges and a sum).
fn otlp_seeds() -> Vec<Vec<u8>> {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message as _;

    let kv = |k: &str, v: any_value::Value| KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    };
    let resource = Resource {
        attributes: vec![
            kv("service.instance.id", any_value::Value::StringValue("worker-1".into())),
            kv("polars.cluster_id", any_value::Value::StringValue("default".into())),
        ],
        ..Default::default()
    };
    let span = Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        name: "task".into(),
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_001_000_000_000,
        attributes: vec![
            kv("polars.query_id", any_value::Value::StringValue("00000000-0000-0000-0000-000000000001".into())),
            kv("polars.stage", any_value::Value::IntValue(0)),
            kv("polars.task", any_value::Value::IntValue(1)),
            kv("polars.shuffle.bytes_read", any_value::Value::IntValue(1 << 20)),
        ],
        ..Default::default()
    };
    let traces = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    };
    let point = |v: f64| NumberDataPoint {
        time_unix_nano: 1_700_000_000_000_000_000,
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let metrics = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "host.cpu.utilization".into(),
                        data: Some(metric::Data::Gauge(Gauge { data_points: vec![point(0.5)] })),
                        ..Default::default()
                    },
                    Metric {
                        name: "host.disk.io".into(),
                        data: Some(metric::Data::Sum(Sum { data_points: vec![point(1e9)], ..Default::default() })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    vec![traces.encode_to_vec(), metrics.encode_to_vec()]
}
