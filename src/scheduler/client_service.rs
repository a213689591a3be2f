//! The scheduler's client service (port 5051): the gRPC API the official `polars-cloud`
//! client calls, mapped onto `queries`.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::EngineChoice;
use crate::proto::client::client_service_server::ClientService;
use crate::proto::client::{
    CancelQueryRequest, CancelQueryResponse, ClientQueryPlans, ComputeQueryInfo, DeleteQueryResultRequest,
    DeleteQueryResultResponse, Engine, ExecuteUntil, GetComputeVersionsRequest, GetComputeVersionsResponse,
    GetQueryPlansRequest, GetQueryPlansResponse, GetQueryResultRequest, GetQueryResultResponse, GetQueryStatusRequest,
    GetQueryStatusResponse, QueryStageStatistics, QueryStatus, StageStatistics, SubmitQueryRequest,
    SubmitQueryResponse, compute_query_info,
};
use crate::proto::common::{
    self, ComputeVersions, Destination, FileType, PlanFormat, QueryId, QueryOutput, QueryPlans,
};
use crate::scheduler::queries::Queries;
use crate::scheduler::query::{Distribution, Query, ShuffleSettings, Status as QState, Submission};
use polars_node_engine as engine;

pub struct ClientApi {
    queries: Queries,
    /// `scheduler.deny_anonymous_users`: every query needs `x-polars-user`.
    deny_anonymous_users: bool,
}

impl ClientApi {
    pub fn new(queries: Queries, deny_anonymous_users: bool) -> Self {
        ClientApi { queries, deny_anonymous_users }
    }

    /// The query a call names, if its caller may address it (see `Queries::find`).
    fn query<T>(&self, request: &Request<T>, id: Option<&QueryId>) -> Result<std::sync::Arc<Query>, Status> {
        let text = id.map(|q| q.query_id.as_str()).unwrap_or_default();
        self.queries.find(text.as_bytes(), header(request, "x-polars-user"))
    }
}

fn header<'a, T>(request: &'a Request<T>, name: &str) -> Option<&'a str> {
    request.metadata().get(name).and_then(|v| v.to_str().ok())
}

fn wire_status(s: QState) -> QueryStatus {
    match s {
        QState::Scheduled => QueryStatus::Scheduled,
        QState::Running => QueryStatus::Running,
        QState::Success => QueryStatus::Success,
        QState::Failed => QueryStatus::Failed,
        QState::Canceled => QueryStatus::Canceled,
    }
}

/// The failure text as the client expects it: a JSON object keyed by "scheduler".
fn client_error(message: &str) -> common::Error {
    common::Error { message: serde_json::json!({ "scheduler": message }).to_string() }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<GetQueryStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientService for ClientApi {
    async fn submit_query(
        &self,
        request: Request<SubmitQueryRequest>,
    ) -> Result<Response<SubmitQueryResponse>, Status> {
        let client_polars = header(&request, "x-polars-version").map(str::to_string);
        let user = header(&request, "x-polars-user").filter(|u| !u.trim().is_empty()).map(str::to_string);
        if self.deny_anonymous_users && user.is_none() {
            return Err(Status::unauthenticated(
                "this cluster does not accept anonymous queries (scheduler.deny_anonymous_users = true): \
                 the client must send a user name (header x-polars-user)",
            ));
        }
        let body = request.into_inner();
        let settings = body.settings.unwrap_or_default();
        let engine = match Engine::try_from(settings.engine).unwrap_or(Engine::Auto) {
            Engine::Streaming => EngineChoice::Streaming,
            Engine::InMemory => EngineChoice::InMemory,
            Engine::Gpu => EngineChoice::Gpu,
            Engine::Auto | Engine::Unspecified => EngineChoice::Auto,
        };
        let plan_only = match ExecuteUntil::try_from(settings.execute_until).unwrap_or(ExecuteUntil::Execute) {
            e @ (ExecuteUntil::OptimizeIr | ExecuteUntil::Plan) => Some(e as i32),
            _ => None,
        };
        let distribution = distribution_of(&settings);
        let submission = Submission {
            distribution,
            engine,
            optimization_flags: settings.optimization_flags,
            n_retries: settings.n_retries,
            plan_only,
            user,
        };
        let query = self.queries.submit(body.plan, submission, client_polars).await;
        Ok(Response::new(SubmitQueryResponse { query_id: Some(QueryId { query_id: query.id.to_string() }) }))
    }

    async fn get_query_result(
        &self,
        request: Request<GetQueryResultRequest>,
    ) -> Result<Response<GetQueryResultResponse>, Status> {
        let query = self.query(&request, request.get_ref().query_id.as_ref())?;
        // Long poll: the client holds the call open until the query is terminal.
        let mut watch = query.watch();
        let status = *watch.wait_for(|s| s.is_terminal()).await.map_err(|_| Status::internal("query state lost"))?;
        let outcome = query.outcome();
        let stages = outcome.stages.len().max(1) as u32;
        let mut result = common::QueryResult { total_stages: stages, ..Default::default() };
        let mut info = ComputeQueryInfo {
            execute_until: query.submission.plan_only.unwrap_or(ExecuteUntil::Execute as i32),
            ..Default::default()
        };
        match status {
            QState::Success if query.submission.plan_only.is_none() => {
                result.finished_stages = stages;
                let destination = match query.target {
                    engine::Target::InMemory => {
                        outcome.files.iter().map(|f| Destination { destination: f.clone() }).collect()
                    }
                    _ => Vec::new(),
                };
                result.output = Some(QueryOutput {
                    destination,
                    file_type: FileType::Parquet as i32,
                    n_rows_result: outcome.n_rows,
                });
                if !outcome.head_ipc.is_empty() {
                    info.head = Some(compute_query_info::Head::Data(outcome.head_ipc));
                }
                info.stage_statistics = Some(QueryStageStatistics {
                    stage_statistics: outcome
                        .stages
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (i as u32, StageStatistics { num_workers_used: s.workers.len() as u32 }))
                        .collect(),
                });
            }
            QState::Failed => {
                result.finished_stages = outcome.stages.iter().filter(|s| s.finished).count() as u32;
                result.failed_stages = 1;
                result.errors = outcome.error.iter().map(|e| client_error(e)).collect();
            }
            _ => {}
        }
        Ok(Response::new(GetQueryResultResponse {
            query_result: Some(result),
            compute_info: Some(info),
            query_status: wire_status(status) as i32,
        }))
    }

    type GetQueryStatusStream = StatusStream;

    async fn get_query_status(
        &self,
        request: Request<GetQueryStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let query = self.query(&request, request.get_ref().query_id.as_ref())?;
        tracing::debug!(query = %query.id, status = ?query.status(), "GetQueryStatus");
        // A `.collect()` client reads this stream until RUNNING or SUCCESS, then asks Flight for
        // the result; a failure after RUNNING would reach it as a transport error rather than
        // the query's Polars exception. So a Flight query reports RUNNING only once its
        // result is ready, which lets a failure reach the client as FAILED.
        let hide_running = query.target == engine::Target::Flight;
        let stream = status_stream(query.watch(), hide_running);
        Ok(Response::new(stream))
    }

    async fn get_query_plans(
        &self,
        request: Request<GetQueryPlansRequest>,
    ) -> Result<Response<GetQueryPlansResponse>, Status> {
        let query = self.query(&request, request.get_ref().query_id.as_ref())?;
        let outcome = query.outcome();
        // A split query's optimized plan is already known from planning; otherwise the plan is
        // read and optimized here.
        let ir = match outcome.logical_plan.is_empty() {
            false => outcome.logical_plan.clone(),
            true => {
                let bytes = query.plan().map_err(Status::unavailable)?;
                let plan =
                    engine::Plan::read(&bytes).map_err(|e| Status::failed_precondition(engine::describe_error(&e)))?;
                let flags = query.submission.optimization_flags;
                tokio::task::spawn_blocking(move || plan.explain(flags))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::failed_precondition(engine::describe_error(&e)))?
            }
        };
        // The stage graph of a split query (once planned): MessagePack for 0.12 clients, text
        // for older ones.
        let stage_graph = Some(outcome.stage_graph_msgpack).filter(|g| !g.is_empty());
        let phys_plan = Some(outcome.stage_graph).filter(|g| !g.is_empty());
        Ok(Response::new(GetQueryPlansResponse {
            legacy_plans: Some(QueryPlans { format: PlanFormat::Explain as i32, ir_plan: Some(ir.clone()), phys_plan }),
            plans: Some(ClientQueryPlans { format: PlanFormat::Explain as i32, ir_plan: Some(ir), stage_graph }),
        }))
    }

    async fn cancel_query(
        &self,
        request: Request<CancelQueryRequest>,
    ) -> Result<Response<CancelQueryResponse>, Status> {
        let query = self.query(&request, request.get_ref().query_id.as_ref())?;
        self.queries.cancel(&query).await;
        Ok(Response::new(CancelQueryResponse {}))
    }

    async fn delete_query_result(
        &self,
        request: Request<DeleteQueryResultRequest>,
    ) -> Result<Response<DeleteQueryResultResponse>, Status> {
        let query = self.query(&request, request.get_ref().query_id.as_ref())?;
        self.queries
            .delete_result(&query)
            .await
            .map_err(|e| Status::internal(format!("cannot remove {}: {e}", query.result_dir.display())))?;
        Ok(Response::new(DeleteQueryResultResponse {}))
    }

    async fn get_compute_versions(
        &self,
        _: Request<GetComputeVersionsRequest>,
    ) -> Result<Response<GetComputeVersionsResponse>, Status> {
        Ok(Response::new(GetComputeVersionsResponse {
            versions: Some(ComputeVersions {
                compute_plane_version: format!("polars-node {}", env!("CARGO_PKG_VERSION")),
                polars_python_version: engine::POLARS_VERSION.into(),
                polars_rust_revision: format!(
                    "polars-runtime-64 {} source (DSL schema {})",
                    engine::POLARS_VERSION,
                    engine::own_schema_hash()
                ),
            }),
        }))
    }
}

/// Every status change until the query is terminal, starting with the current one. With
/// `hide_running`, RUNNING is reported as SCHEDULED.
fn status_stream(watch: tokio::sync::watch::Receiver<QState>, hide_running: bool) -> StatusStream {
    let shown = move |s: QState| if hide_running && s == QState::Running { QState::Scheduled } else { s };
    let stream = futures_util::stream::unfold((watch, None::<QState>), move |(mut watch, last)| async move {
        if last.is_some_and(QState::is_terminal) {
            return None;
        }
        loop {
            let status = shown(*watch.borrow_and_update());
            if Some(status) != last {
                let item = Ok(GetQueryStatusResponse { status: wire_status(status) as i32 });
                return Some((item, (watch, Some(status))));
            }
            if watch.changed().await.is_err() {
                return None;
            }
        }
    });
    Box::pin(stream)
}

/// The distribution a query asks for: `execute()` sends `distributed` (with shuffle options and
/// worker bounds), `.single_node()` sends `single`.
fn distribution_of(settings: &crate::proto::client::QuerySettings) -> Option<Distribution> {
    use crate::proto::client::query_settings::{NWorkers, NWorkersOneOf, QueryType};
    use crate::proto::client::{ShuffleCompression as WireCompression, ShuffleFormat as WireFormat, SingleWorkerOps};
    use crate::proto::{ShuffleCompression, ShuffleFormat};
    let Some(QueryType::Distributed(opts)) = &settings.query_type else {
        return None;
    };
    let shuffle = opts.shuffle_opts.unwrap_or_default();
    let format = match WireFormat::try_from(shuffle.format).unwrap_or(WireFormat::Auto) {
        WireFormat::Parquet => ShuffleFormat::Parquet,
        _ => ShuffleFormat::Ipc,
    };
    let compression = match WireCompression::try_from(shuffle.compression).unwrap_or(WireCompression::Auto) {
        WireCompression::Zstd => ShuffleCompression::Zstd,
        WireCompression::Uncompressed => ShuffleCompression::Uncompressed,
        _ => ShuffleCompression::Lz4,
    };
    let (min_workers, max_workers) = match &settings.n_workers {
        Some(NWorkersOneOf::SingleNumber(n)) => (*n, Some(*n)),
        Some(NWorkersOneOf::MinMax(NWorkers { min, max })) => (min.unwrap_or(1), *max),
        None => (1, None),
    };
    Some(Distribution {
        shuffle: ShuffleSettings { format, compression, level: shuffle.compression_level },
        min_workers,
        max_workers,
        partitions_per_worker: opts.partitions_per_worker,
        broadcast_limit: opts.allow_equi_join_broadcast_limit,
        forbid_single_worker: opts.single_worker_ops == Some(SingleWorkerOps::Forbid as i32),
        pre_aggregate: opts.allow_pre_aggregation,
        partitioned_sort: opts.allow_partitioned_sort,
    })
}
