//! OpenLineage run events (`[lineage]`): for every query the scheduler accepts or refuses, a
//! START event and then one of COMPLETE, FAIL (with the error) or ABORT (canceled), naming the
//! datasets the plan reads and writes with their schema where Polars can tell it. Events go to
//! an HTTP endpoint and/or a standard stream through a bounded queue: delivery never blocks or
//! fails a query; a full queue or an endpoint that is down costs a warning (at most once a
//! minute) and the event.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::{LineageConfig, OutputStream};
use crate::scheduler::query::{Query, Status};
use polars_node_engine as engine;

/// Events waiting for delivery; more are dropped (with a warning).
const QUEUE: usize = 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const SCHEMA_URL: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";
/// A URI naming this program and version (the spec asks for one; the project has no public URL).
const PRODUCER: &str = concat!("urn:polars-node:", env!("CARGO_PKG_VERSION"));

#[derive(Clone)]
pub struct Lineage {
    events: mpsc::Sender<String>,
    /// The job namespace: the cluster.
    namespace: String,
    warned: Arc<Mutex<Option<Instant>>>,
}

impl Lineage {
    /// Starts delivering events as `config` says. Must run inside the Tokio runtime.
    pub fn start(config: &LineageConfig, cluster_id: &str) -> Lineage {
        let (events, mut queue) = mpsc::channel::<String>(QUEUE);
        let warned = Arc::new(Mutex::new(None));
        let lineage = Lineage { events, namespace: cluster_id.to_string(), warned: warned.clone() };
        let (http, stdio) = (config.transport.http.clone(), config.transport.stdio.clone());
        let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("HTTP client");
        let sender = lineage.clone();
        tokio::spawn(async move {
            while let Some(event) = queue.recv().await {
                if let Some(stdio) = &stdio {
                    let line = format!("{event}\n");
                    let _ = match stdio.output_stream {
                        OutputStream::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
                        OutputStream::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
                    };
                }
                if let Some(http) = &http {
                    let sent = client
                        .post(&http.endpoint)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(event)
                        .send()
                        .await;
                    let problem = match sent {
                        Ok(r) if r.status().is_success() => None,
                        Ok(r) => Some(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => Some(crate::logging::error_chain(&e)),
                    };
                    if let Some(problem) = problem {
                        sender.warn(&format!("cannot send a lineage event to {} (dropped): {problem}", http.endpoint));
                    }
                }
            }
        });
        lineage
    }

    fn warn(&self, what: &str) {
        let mut last = self.warned.lock().unwrap();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            warn!("{what}");
        }
    }

    fn send(&self, event: Value) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event.to_string()) {
            self.warn("the lineage queue is full: events are dropped until the endpoint takes them again");
        }
    }

    /// Follows `query` (whose serialized plan is `plan`) to its end: START now, then COMPLETE,
    /// FAIL or ABORT.
    pub fn follow(&self, query: Arc<Query>, plan: bytes::Bytes) {
        let this = self.clone();
        tokio::spawn(async move {
            // Reading the plan (and file metadata for schemas) stays off the async threads.
            let datasets = tokio::task::spawn_blocking(move || {
                engine::init();
                engine::Plan::read(&plan).map(|p| p.datasets()).unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            this.send(this.event(&query, "START", &datasets, None));
            let mut watch = query.watch();
            let Ok(end) = watch.wait_for(|s| s.is_terminal()).await.map(|s| *s) else {
                return;
            };
            let (kind, error) = match end {
                Status::Success => ("COMPLETE", None),
                Status::Canceled => ("ABORT", None),
                _ => ("FAIL", Some(query.outcome().error.unwrap_or_else(|| "the query failed".into()))),
            };
            this.send(this.event(&query, kind, &datasets, error));
        });
    }

    fn event(&self, query: &Query, kind: &str, datasets: &engine::Datasets, error: Option<String>) -> Value {
        let mut run_facets = json!({
            "processing_engine": facet(
                "https://openlineage.io/spec/facets/1-1-1/ProcessingEngineRunFacet.json#/$defs/ProcessingEngineRunFacet",
                json!({ "version": engine::POLARS_VERSION, "name": "polars", "openlineageAdapterVersion": crate::VERSION }),
            ),
        });
        if let Some(message) = error {
            run_facets["errorMessage"] = facet(
                "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet",
                json!({ "message": message, "programmingLanguage": "Rust" }),
            );
        }
        let user = query.submission.user.as_deref().unwrap_or("anonymous");
        json!({
            "eventType": kind,
            "eventTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "producer": PRODUCER,
            "schemaURL": SCHEMA_URL,
            "run": { "runId": query.id.to_string(), "facets": run_facets },
            "job": {
                "namespace": self.namespace,
                "name": format!("{user}.{}", query.id),
                "facets": {
                    "jobType": facet(
                        "https://openlineage.io/spec/facets/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet",
                        json!({ "processingType": "BATCH", "integration": "POLARS", "jobType": "QUERY" }),
                    ),
                },
            },
            "inputs": datasets.inputs.iter().map(|d| dataset(d, "inputFacets")).collect::<Vec<_>>(),
            "outputs": datasets.outputs.iter().map(|d| dataset(d, "outputFacets")).collect::<Vec<_>>(),
        })
    }
}

fn facet(schema_url: &str, mut fields: Value) -> Value {
    fields["_producer"] = PRODUCER.into();
    fields["_schemaURL"] = schema_url.into();
    fields
}

/// A dataset (with its `inputFacets` or `outputFacets`) as the OpenLineage naming spec names it: a local path in namespace `file`; an
/// object in `scheme://bucket` by its key; an HTTP resource in `scheme://host` by its path.
fn dataset(d: &engine::Dataset, direction_facets: &str) -> Value {
    let (namespace, name) = match url::Url::parse(&d.url) {
        Ok(u) if u.scheme() == "file" => ("file".to_string(), u.path().to_string()),
        Ok(u) if u.scheme().len() > 1 && u.host_str().is_some() => {
            let authority = match u.port() {
                Some(port) => format!("{}:{port}", u.host_str().unwrap_or_default()),
                None => u.host_str().unwrap_or_default().to_string(),
            };
            let name = match u.scheme() {
                "http" | "https" => u.path().to_string(),
                _ => u.path().trim_start_matches('/').to_string(),
            };
            (format!("{}://{authority}", u.scheme()), name)
        }
        _ => ("file".to_string(), d.url.clone()),
    };
    let mut value = json!({ "namespace": namespace, "name": name, "facets": {}, direction_facets: {} });
    if let Some(schema) = &d.schema {
        let fields: Vec<Value> =
            schema.iter().map(|(name, dtype)| json!({ "name": name, "type": dtype, "fields": [] })).collect();
        value["facets"]["schema"] = facet(
            "https://openlineage.io/spec/facets/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet",
            json!({ "fields": fields }),
        );
    }
    value
}
