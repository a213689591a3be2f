//! The observatory's REST API (port 3001), next to `/healthz`, `/readyz` and Prometheus
//! `/metrics`.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::store::Store;
use crate::auth::JwksAuth;

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
            })
        })
        .collect();
    Ok(Json(json!({ "queries": queries })))
}

async fn query(State(store): State<Store>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, Response> {
    let canonical = uuid::Uuid::parse_str(&id)
        .map_err(|_| (StatusCode::BAD_REQUEST, Json(json!({ "error": format!("`{id}` is not a query id") }))).into_response())?
        .to_string();
    let lookup = canonical.clone();
    let spans = blocking(move || store.spans_of_query(&lookup)).await?;
    if spans.is_empty() {
        return Err((StatusCode::NOT_FOUND, Json(json!({ "error": format!("no query {canonical} is known") }))).into_response());
    }
    // Stages and workers as the spans name them (`polars.stage`, the sending node).
    let mut stages: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for s in &spans {
        if let Some(stage) = s.attributes.get("polars.stage") {
            let entry = stages.entry(stage.to_string()).or_insert_with(|| json!({ "stage": stage, "workers": [], "spans": 0 }));
            entry["spans"] = (entry["spans"].as_i64().unwrap_or(0) + 1).into();
            // The worker a span is about: named by the span, else the node that sent it.
            let worker = s.attributes.get("polars.worker").cloned().unwrap_or_else(|| json!(s.instance));
            let workers = entry["workers"].as_array_mut().expect("array");
            if !workers.contains(&worker) {
                workers.push(worker);
            }
        }
    }
    let workers: std::collections::BTreeSet<_> = spans.iter().map(|s| s.instance.clone()).collect();
    let start = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
    // The optimized logical plan, as the engine reported it with its task.
    let ir_plan = spans.iter().find_map(|s| s.attributes.get("polars.plan.ir").and_then(|p| p.as_str()).map(str::to_string));
    Ok(Json(json!({
        "query_id": canonical, "start_ns": start, "end_ns": end,
        "plans": { "ir": ir_plan },
        "status": if spans.iter().any(|s| s.status_code == 2) { "failed" } else { "ok" },
        "stages": stages.into_values().collect::<Vec<_>>(), "workers": workers, "spans": spans,
    })))
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

async fn metric_points(State(store): State<Store>, Query(q): Query<MetricsQuery>) -> Result<Json<serde_json::Value>, Response> {
    let points = blocking(move || store.metrics(q.node.as_deref(), q.name.as_deref(), q.since_ns)).await?;
    Ok(Json(json!({ "points": points })))
}

/// Prometheus text exposition of the observatory's own figures.
async fn prometheus(State(store): State<Store>) -> Result<String, Response> {
    let (spans, points, bytes) = blocking(move || {
        let (spans, points) = store.counts();
        Ok((spans, points, store.metric_bytes()))
    })
    .await?;
    Ok(format!(
        "# HELP polars_observatory_spans Spans stored.\n# TYPE polars_observatory_spans gauge\npolars_observatory_spans {spans}\n\
         # HELP polars_observatory_metric_points Metric points stored.\n# TYPE polars_observatory_metric_points gauge\npolars_observatory_metric_points {points}\n\
         # HELP polars_observatory_metric_bytes Bytes of stored metric points (bounded by max_metrics_bytes_total).\n# TYPE polars_observatory_metric_bytes gauge\npolars_observatory_metric_bytes {bytes}\n"
    ))
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
            let code = if status.code() == tonic::Code::Unavailable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::UNAUTHORIZED };
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
    axum::Router::new()
        .route("/", get(|| async { axum::response::Html(DASHBOARD_HTML) }))
        .route(
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
