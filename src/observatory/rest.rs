//! The observatory's REST API (port 3001), next to `/healthz`, `/readyz` and Prometheus
//! `/metrics`.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::store::{SpanRow, Store};
use crate::security::auth::JwksAuth;

fn internal(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e.to_string() }))).into_response()
}

/// Store reads are blocking SQLite calls: they run off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?.map_err(internal)
}

async fn queries(State(store): State<Store>) -> Result<Json<serde_json::Value>, Response> {
    let rows = blocking(move || store.queries()).await?;
    let queries: Vec<_> = rows
        .into_iter()
        .map(|q| {
            json!({
                "query_id": q.query_id, "start_ns": q.start_ns, "end_ns": q.end_ns,
                "duration_ms": (q.end_ns - q.start_ns) as f64 / 1e6, "spans": q.spans,
                "status": if q.failed_spans > 0 { "failed" } else { "ok" },
                "user": q.user, "query_type": q.query_type,
            })
        })
        .collect();
    Ok(Json(json!({ "queries": queries })))
}

async fn query(State(store): State<Store>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, Response> {
    let canonical = uuid::Uuid::parse_str(&id)
        .map_err(|_| {
            (StatusCode::BAD_REQUEST, Json(json!({ "error": format!("`{id}` is not a query id") }))).into_response()
        })?
        .to_string();
    let lookup = canonical.clone();
    let spans = blocking(move || store.spans_of_query(&lookup)).await?;
    if spans.is_empty() {
        return Err(
            (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no query {canonical} is known") }))).into_response()
        );
    }
    Ok(Json(query_detail(&canonical, &spans)))
}

/// One query as the official client reads it (`QueryDetailModel` of polars-cloud >= 0.7: the
/// fields it requires and those it shows), with the stage graph, per-stage figures, plans and
/// spans that the dashboard shows.
fn query_detail(id: &str, spans: &[SpanRow]) -> serde_json::Value {
    let attr = |s: &SpanRow, key: &str| s.attributes.get(key).cloned();
    let int = |s: &SpanRow, key: &str| attr(s, key).and_then(|v| v.as_i64()).unwrap_or(0);
    // The scheduler's span of the whole query (exported once the query ends) and its spans
    // per task.
    let root = spans.iter().find(|s| s.name == "query");
    let tasks: Vec<&SpanRow> = spans.iter().filter(|s| s.name == "task").collect();
    let graph: Vec<serde_json::Value> = root
        .and_then(|r| attr(r, "polars.stage_graph"))
        .and_then(|g| g.as_str().and_then(|g| serde_json::from_str(g).ok()))
        .unwrap_or_default();
    let mut stages: BTreeMap<i64, serde_json::Value> =
        graph.into_iter().filter_map(|g| Some((g.get("stage")?.as_i64()?, g))).collect();
    for s in spans {
        if let Some(stage) = attr(s, "polars.stage").and_then(|v| v.as_i64()) {
            stages.entry(stage).or_insert_with(|| json!({ "stage": stage, "inputs": [] }));
        }
    }
    // Every stage has its figures, zero for a stage that ran no task of its own.
    for entry in stages.values_mut() {
        let obj = entry.as_object_mut().expect("object");
        for key in ["workers", "spans", "rows", "bytes_shuffled", "start_ns", "end_ns", "failed_tasks", "task_runs"] {
            obj.entry(key).or_insert(if key == "workers" { json!([]) } else { json!(0) });
        }
        obj.entry("fused").or_insert(json!(false));
    }
    for s in spans {
        if let Some(stage) = attr(s, "polars.stage").and_then(|v| v.as_i64()) {
            let obj = stages.get_mut(&stage).and_then(|e| e.as_object_mut()).expect("every stage has an entry");
            // A small gather stage the result task ran inside itself (no tasks of its own).
            if s.name == "stage" && attr(s, "polars.stage.fused").and_then(|v| v.as_bool()) == Some(true) {
                obj["fused"] = json!(true);
            }
            obj["spans"] = (obj["spans"].as_i64().unwrap_or(0) + 1).into();
            // The worker a span is about: named by the span, else the node that sent it (the
            // scheduler's own span of the whole stage is about no worker).
            let worker = attr(s, "polars.worker").unwrap_or_else(|| json!(s.instance));
            let workers = obj["workers"].as_array_mut().expect("array");
            if s.name != "stage" && !workers.contains(&worker) {
                workers.push(worker);
            }
            if s.name == "task" {
                obj["task_runs"] = (obj["task_runs"].as_i64().unwrap_or(0) + 1).into();
                if s.status_code == 2 {
                    obj["failed_tasks"] = (obj["failed_tasks"].as_i64().unwrap_or(0) + 1).into();
                } else {
                    obj["rows"] = (obj["rows"].as_i64().unwrap_or(0) + int(s, "polars.rows")).into();
                    obj["bytes_shuffled"] =
                        (obj["bytes_shuffled"].as_i64().unwrap_or(0) + int(s, "polars.shuffle.bytes_written")).into();
                }
                let start = obj["start_ns"].as_i64().filter(|v| *v > 0).map_or(s.start_ns, |v| v.min(s.start_ns));
                obj["start_ns"] = start.into();
                obj["end_ns"] = obj["end_ns"].as_i64().unwrap_or(0).max(s.end_ns).into();
            }
        }
    }
    for stage in stages.values_mut() {
        let (start, end) = (stage["start_ns"].as_i64().unwrap_or(0), stage["end_ns"].as_i64().unwrap_or(0));
        stage["time_ms"] = json!(if end > start { (end - start) as f64 / 1e6 } else { 0.0 });
    }
    let workers: std::collections::BTreeSet<_> = spans.iter().map(|s| s.instance.clone()).collect();
    let start = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
    // The optimized logical plan, as the engine reported it with its task.
    // The query's (split queries) or else its task's.
    let ir_plan = root.into_iter().chain(spans).find_map(|s| {
        s.attributes.get("polars.plan.ir").and_then(|p| p.as_str()).filter(|p| !p.is_empty()).map(str::to_string)
    });
    let physical = root.and_then(|r| attr(r, "polars.plan.physical")).and_then(|p| p.as_str().map(str::to_string));
    let failed = spans.iter().any(|s| s.status_code == 2 && (s.name == "query" || s.name == "task.execute"));
    // Client statuses: Queued, Scheduled, InProgress, Success, Failed, Canceled.
    let status =
        match root.and_then(|r| attr(r, "polars.status")).and_then(|v| v.as_str().map(str::to_string)).as_deref() {
            Some("Success") => "Success",
            Some("Canceled") => "Canceled",
            Some(_) => "Failed",
            None if failed => "Failed",
            None => "InProgress",
        };
    let finished: Vec<i64> = stages
        .iter()
        .filter(|(_, s)| {
            s["fused"] == json!(true) || s["task_runs"].as_i64().unwrap_or(0) > s["failed_tasks"].as_i64().unwrap_or(0)
        })
        .map(|(i, _)| *i)
        .collect();
    let failed_stage =
        stages.iter().find(|(_, s)| s["failed_tasks"].as_i64().unwrap_or(0) > 0 && status == "Failed").map(|(i, _)| *i);
    let rfc3339 = |ns: i64| jiff::Timestamp::from_nanosecond(ns as i128).map(|t| t.to_string()).unwrap_or_default();
    let bytes_shuffled: i64 = stages.values().map(|s| s["bytes_shuffled"].as_i64().unwrap_or(0)).sum();
    let node_time: i64 = tasks.iter().map(|s| s.end_ns - s.start_ns).sum();
    let errors: Vec<String> =
        spans.iter().filter(|s| s.status_code == 2 && s.name == "query").map(|s| s.status_message.clone()).collect();
    json!({
        // The official client's fields.
        "id": id,
        "user": { "name": root.and_then(|r| attr(r, "polars.user")).and_then(|u| u.as_str().map(str::to_string)).unwrap_or_default() },
        "status": status,
        "request_time": rfc3339(root.map_or(start, |r| r.start_ns)),
        "start_time": tasks.iter().map(|s| s.start_ns).min().map(rfc3339),
        "end_time": root.map(|r| rfc3339(r.end_ns)),
        "query_plan_timing": {},
        "total_num_stages": root.map(|r| int(r, "polars.total_stages")).filter(|n| *n > 0).unwrap_or(stages.len() as i64),
        "failed_stage": failed_stage,
        "in_progress_stages": if status == "InProgress" { stages.keys().filter(|i| !finished.contains(i)).copied().collect() } else { Vec::new() },
        "finished_stages": finished,
        "total_bytes_shuffled": bytes_shuffled,
        "total_node_time_ns": node_time,
        "errors": if errors.is_empty() { None } else { Some(errors) },
        "engine": root.and_then(|r| attr(r, "polars.engine")).unwrap_or(json!("Auto")),
        "query_type": root.and_then(|r| attr(r, "polars.query_type")).unwrap_or(json!("Single")),
        "output_location": root.and_then(|r| attr(r, "polars.output_location")),
        "output_files": root.and_then(|r| attr(r, "polars.output_files")),
        "output_rows": root.map(|r| int(r, "polars.rows")),
        // The dashboard's.
        "query_id": id, "start_ns": start, "end_ns": end,
        "plans": { "ir": ir_plan, "physical": physical },
        "stages": stages.into_values().collect::<Vec<_>>(), "workers": workers, "spans": spans,
    })
}

async fn nodes(State(store): State<Store>) -> Result<Json<serde_json::Value>, Response> {
    let rows = blocking(move || store.nodes()).await?;
    let nodes: Vec<_> = rows.into_iter().map(|(node, last)| json!({ "node": node, "last_metric_ns": last })).collect();
    Ok(Json(json!({ "nodes": nodes })))
}

#[derive(Deserialize)]
struct MetricsQuery {
    node: Option<String>,
    name: Option<String>,
    #[serde(default)]
    since_ns: i64,
}

async fn metric_points(
    State(store): State<Store>,
    Query(q): Query<MetricsQuery>,
) -> Result<Json<serde_json::Value>, Response> {
    let points = blocking(move || store.metrics(q.node.as_deref(), q.name.as_deref(), q.since_ns)).await?;
    Ok(Json(json!({ "points": points })))
}

/// Prometheus text exposition of the observatory's own figures, and the latest autoscaling
/// figures each scheduler reported (`polars.scaling.*`, one sample per node).
async fn prometheus(State(store): State<Store>) -> Result<String, Response> {
    let (spans, points, bytes, scaling) = blocking(move || {
        let (spans, points) = store.counts();
        Ok((spans, points, store.metric_bytes(), store.latest("polars.scaling.")?))
    })
    .await?;
    let mut text = format!(
        "# HELP polars_observatory_spans Spans stored.\n# TYPE polars_observatory_spans gauge\npolars_observatory_spans {spans}\n\
         # HELP polars_observatory_metric_points Metric points stored.\n# TYPE polars_observatory_metric_points gauge\npolars_observatory_metric_points {points}\n\
         # HELP polars_observatory_metric_bytes Bytes of stored metric points (bounded by max_metrics_bytes_total).\n# TYPE polars_observatory_metric_bytes gauge\npolars_observatory_metric_bytes {bytes}\n"
    );
    let mut typed = std::collections::BTreeSet::new();
    for (node, name, value) in scaling {
        let metric = name.replace('.', "_");
        if typed.insert(metric.clone()) {
            let kind = if metric.ends_with("_requests") { "counter" } else { "gauge" };
            text.push_str(&format!("# TYPE {metric} {kind}\n"));
        }
        let node = node.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        text.push_str(&format!("{metric}{{node=\"{node}\"}} {value}\n"));
    }
    Ok(text)
}

/// The dashboard, compiled into the binary: it works offline and needs no build step.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
/// The API's description (OpenAPI 3.1).
const OPENAPI: &str = include_str!("openapi.json");

/// Refuses API calls without a valid bearer token (`rest_api.service.auth.jwks`).
async fn require_token(
    State(auth): State<JwksAuth>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match auth.check_authorization(header) {
        Ok(_) => next.run(request).await,
        Err(status) => {
            let code = if status.code() == tonic::Code::Unavailable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            (code, Json(json!({ "error": status.message() }))).into_response()
        }
    }
}

/// The REST API over `store`, and the dashboard at `/`. With `auth`, the API and `/metrics`
/// need a bearer token; the dashboard's page itself and the health checks stay open.
pub fn router(store: Store, auth: Option<JwksAuth>) -> axum::Router {
    let api = api(store.clone());
    let api = match auth {
        Some(auth) => api.layer(axum::middleware::from_fn_with_state(auth, require_token)),
        None => api,
    };
    dashboard().merge(api)
}

fn dashboard() -> axum::Router {
    axum::Router::new().route("/", get(|| async { axum::response::Html(DASHBOARD_HTML) })).route(
        "/dashboard.js",
        get(|| async { ([(axum::http::header::CONTENT_TYPE, "text/javascript; charset=utf-8")], DASHBOARD_JS) }),
    )
}

fn api(store: Store) -> axum::Router {
    axum::Router::new()
        .route(
            "/api/v1/openapi.json",
            get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/api/v1/queries", get(queries))
        .route("/api/v1/query/{id}", get(query))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/metrics", get(metric_points))
        .route("/metrics", get(prometheus))
        .with_state(store)
}
