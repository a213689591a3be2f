//! The OTLP receiver (port 5049): the standard OTLP/gRPC trace and metrics services, so any
//! OpenTelemetry SDK or collector can send to the observatory.

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use tonic::{Request, Response, Status};

use super::store::{MetricRow, SpanRow, Store};

/// Largest export request accepted (the SDKs batch well below this).
pub const MAX_REQUEST: usize = 16 << 20;

#[derive(Clone)]
pub struct Receiver {
    store: Store,
}

impl Receiver {
    pub fn new(store: Store) -> Self {
        Receiver { store }
    }
}

fn value_json(v: &AnyValue) -> serde_json::Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone().into(),
        Some(any_value::Value::BoolValue(b)) => (*b).into(),
        Some(any_value::Value::IntValue(i)) => (*i).into(),
        Some(any_value::Value::DoubleValue(d)) => (*d).into(),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().map(value_json).collect(),
        Some(any_value::Value::KvlistValue(kv)) => attributes_json(&kv.values),
        Some(any_value::Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect::<String>().into(),
        _ => serde_json::Value::Null,
    }
}

fn attributes_json(attrs: &[KeyValue]) -> serde_json::Value {
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map(value_json).unwrap_or_default()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn text(attrs: &serde_json::Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match attrs.get(*k) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(v) if !v.is_null() => Some(v.to_string()),
        _ => None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The node a resource describes: its instance id, else its host name, else its service.
fn node_of(resource: &serde_json::Value) -> String {
    text(resource, &["service.instance.id", "host.name", "service.name"]).unwrap_or_else(|| "unknown".into())
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut rows = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = attributes_json(rs.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or_default());
            let service = text(&resource, &["service.name"]).unwrap_or_default();
            let instance = node_of(&resource);
            for ss in rs.scope_spans {
                for span in ss.spans {
                    if span.trace_id.len() != 16 || span.span_id.len() != 8 {
                        return Err(Status::invalid_argument("a span needs a 16-byte trace id and an 8-byte span id"));
                    }
                    let attributes = attributes_json(&span.attributes);
                    let status = span.status.unwrap_or_default();
                    rows.push(SpanRow {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        service: service.clone(),
                        instance: instance.clone(),
                        start_ns: span.start_time_unix_nano as i64,
                        end_ns: span.end_time_unix_nano as i64,
                        status_code: status.code,
                        status_message: status.message,
                        query_id: text(&attributes, &["polars.query_id", "query_id"]),
                        attributes,
                    });
                }
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.insert_spans(&rows))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot store spans: {e}")))?;
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut rows = Vec::new();
        for rm in request.into_inner().resource_metrics {
            let resource = attributes_json(rm.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or_default());
            let node = node_of(&resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    // Gauges and sums carry plain numbers; histograms and summaries are not kept.
                    let points = match m.data {
                        Some(metric::Data::Gauge(g)) => g.data_points,
                        Some(metric::Data::Sum(s)) => s.data_points,
                        _ => continue,
                    };
                    for p in points {
                        let value = match p.value {
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            None => continue,
                        };
                        rows.push(MetricRow {
                            time_ns: p.time_unix_nano as i64,
                            node: node.clone(),
                            name: m.name.clone(),
                            value,
                            attributes: attributes_json(&p.attributes),
                        });
                    }
                }
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.insert_metrics(&rows))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot store metrics: {e}")))?;
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}
