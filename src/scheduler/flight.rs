//! Arrow Flight on the scheduler's client port: `.collect()` of the official client polls
//! `PollFlightInfo` with the query id as descriptor path, then calls `DoGet` with the ticket.
//!
//! The worker writes a Flight result as an Arrow IPC stream. `DoGet` streams that file from
//! the worker (bounded chunks) and cuts it into IPC messages, each one Flight data message,
//! without decoding any data.

use std::pin::Pin;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::FetchResultRequest;
use crate::scheduler::queries::Queries;
use crate::scheduler::query::{Query, Status as QState};

/// How long one PollFlightInfo waits for the query before telling the client to poll again.
const POLL_WAIT: Duration = Duration::from_secs(20);

pub struct FlightApi {
    queries: Queries,
}

impl FlightApi {
    pub fn new(queries: Queries) -> Self {
        FlightApi { queries }
    }

    /// The query a ticket or descriptor names, if its caller may address it (see `Queries::find`).
    fn query<T>(&self, request: &Request<T>, id: &[u8]) -> Result<std::sync::Arc<Query>, Status> {
        let user = request.metadata().get("x-polars-user").and_then(|v| v.to_str().ok());
        self.queries.find(id, user)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not offered by this cluster; results are read with PollFlightInfo and DoGet"
    )))
}

#[tonic::async_trait]
impl FlightService for FlightApi {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        let descriptor = request.get_ref();
        let id = descriptor.path.first().map(|p| p.as_bytes().to_vec()).unwrap_or_else(|| descriptor.cmd.to_vec());
        let query = self.query(&request, &id)?;
        tracing::debug!(query = %query.id, status = ?query.status(), "PollFlightInfo");
        let mut watch = query.watch();
        let status = tokio::time::timeout(POLL_WAIT, watch.wait_for(|s| s.is_terminal()))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|s| *s);
        match status {
            // Still running: the descriptor tells the client to poll again.
            None => Ok(Response::new(PollInfo {
                info: Some(FlightInfo { flight_descriptor: Some(descriptor.clone()), ..Default::default() }),
                flight_descriptor: Some(descriptor.clone()),
                progress: Some(0.0),
                expiration_time: None,
            })),
            Some(QState::Success) => {
                let outcome = query.outcome();
                let info = FlightInfo {
                    schema: Bytes::from(outcome.flight_schema),
                    flight_descriptor: Some(descriptor.clone()),
                    endpoint: vec![FlightEndpoint {
                        ticket: Some(Ticket { ticket: Bytes::from(query.id.to_string()) }),
                        location: Vec::new(),
                        expiration_time: None,
                        app_metadata: Bytes::new(),
                    }],
                    total_records: outcome.n_rows as i64,
                    total_bytes: -1,
                    ordered: true,
                    app_metadata: Bytes::new(),
                };
                Ok(Response::new(PollInfo {
                    info: Some(info),
                    flight_descriptor: None,
                    progress: Some(1.0),
                    expiration_time: None,
                }))
            }
            Some(QState::Canceled) => Err(Status::cancelled("the query was canceled")),
            Some(_) => {
                Err(Status::failed_precondition(query.outcome().error.unwrap_or_else(|| "the query failed".into())))
            }
        }
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let query = self.query(&request, &request.get_ref().ticket)?;
        if query.status() != QState::Success {
            return Err(Status::failed_precondition("the query has no result to read"));
        }
        let worker = self.queries.worker_of(&query).ok_or_else(|| Status::internal("no worker ran this query"))?;
        let path =
            query.outcome().files.first().cloned().ok_or_else(|| Status::internal("the query wrote no result"))?;
        let chunks = self
            .queries
            .workers()
            .task_client(&worker.task_addr)?
            .fetch_result(FetchResultRequest { path })
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(ipc_messages(chunks))))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unsupported("Handshake")
    }
    async fn list_flights(&self, _: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("ListFlights")
    }
    async fn get_flight_info(&self, _: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        unsupported("GetFlightInfo")
    }
    async fn get_schema(&self, _: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        unsupported("GetSchema")
    }
    async fn do_put(&self, _: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        unsupported("DoPut")
    }
    async fn do_exchange(&self, _: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }
    async fn do_action(&self, _: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        unsupported("DoAction")
    }
    async fn list_actions(&self, _: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        unsupported("ListActions")
    }
}

/// Cuts a byte stream of an Arrow IPC stream into its messages, as Flight data.
fn ipc_messages(
    chunks: impl Stream<Item = Result<crate::proto::ResultChunk, Status>> + Send + Unpin + 'static,
) -> impl Stream<Item = Result<FlightData, Status>> + Send {
    futures_util::stream::unfold((chunks, BytesMut::new(), false), |(mut chunks, mut buf, mut eof)| async move {
        loop {
            match next_message(&mut buf) {
                Ok(Some(data)) => return Some((Ok(data), (chunks, buf, eof))),
                Ok(None) if eof => {
                    if buf.is_empty() {
                        return None;
                    }
                    let err = Status::data_loss("the result stream ended inside a message");
                    return Some((Err(err), (chunks, BytesMut::new(), true)));
                }
                Ok(None) => match chunks.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk.data),
                    Some(Err(status)) => return Some((Err(status), (chunks, BytesMut::new(), true))),
                    None => eof = true,
                },
                Err(status) => return Some((Err(status), (chunks, BytesMut::new(), true))),
            }
        }
    })
}

/// Takes one complete message off the front of `buf`, if it holds one. The end-of-stream
/// marker is consumed and produces nothing.
fn next_message(buf: &mut BytesMut) -> Result<Option<FlightData>, Status> {
    loop {
        if buf.len() < 4 {
            return Ok(None);
        }
        // Current format: 0xFFFFFFFF, then the metadata length; legacy: the length alone.
        let (prefix, len) = if buf[..4] == [0xff; 4] {
            if buf.len() < 8 {
                return Ok(None);
            }
            (8, u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize)
        } else {
            (4, u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize)
        };
        if len == 0 {
            buf.advance(prefix);
            continue; // end of stream
        }
        if buf.len() < prefix + len {
            return Ok(None);
        }
        let message = arrow_ipc::root_as_message(&buf[prefix..prefix + len])
            .map_err(|e| Status::data_loss(format!("unreadable IPC message: {e}")))?;
        let body_len =
            usize::try_from(message.bodyLength()).map_err(|_| Status::data_loss("negative IPC body length"))?;
        if buf.len() < prefix + len + body_len {
            return Ok(None);
        }
        buf.advance(prefix);
        let header = buf.split_to(len).freeze();
        let body = buf.split_to(body_len).freeze();
        return Ok(Some(FlightData {
            flight_descriptor: None,
            data_header: header,
            app_metadata: Bytes::new(),
            data_body: body,
        }));
    }
}
