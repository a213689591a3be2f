//! Shuffle storage on a worker: where stage tasks write their output partitions, the shuffle
//! service (default port 5053) that lets other workers fetch them, and the fetching of a
//! task's inputs before it runs.
//!
//! Layout: `<shuffle_location>/<query id>/<worker instance id>/<stage>-<task>/<partition>.<ext>`
//! for outputs, and `.../<worker instance id>/fetched/...` for inputs copied from other
//! workers. With `shared_filesystem` storage every worker reads the files in place and the
//! shuffle service is not needed.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::proto::shuffle_client::ShuffleClient;
use crate::proto::shuffle_server::Shuffle;
use crate::proto::{FetchPartitionRequest, ResultChunk, StageTask};

/// Concurrent fetches of one task's inputs.
const PARALLEL_FETCHES: usize = 4;

#[derive(Clone)]
pub struct ShuffleStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Readers open shuffle files in place (`shared_filesystem`).
    shared: bool,
    instance_id: String,
    /// One HTTP/2 connection per peer shuffle service.
    peers: Mutex<HashMap<String, ShuffleClient<tonic::transport::Channel>>>,
}

impl ShuffleStore {
    pub fn new(root: PathBuf, shared: bool, instance_id: String) -> Self {
        ShuffleStore { inner: Arc::new(Inner { root, shared, instance_id, peers: Mutex::default() }) }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    fn query_dir(&self, query_id: &str) -> PathBuf {
        self.inner.root.join(sanitize(query_id)).join(sanitize(&self.inner.instance_id))
    }

    /// Where a stage task of this worker writes its partitions.
    pub fn output_dir(&self, query_id: &str, stage: u32, task: u32) -> PathBuf {
        self.query_dir(query_id).join(format!("{stage}-{task}"))
    }

    /// Makes every input file of `stage` readable here: files of this worker and files on
    /// shared storage are read in place, others are copied from their worker's shuffle
    /// service. Rewrites the paths in `stage` to the local ones.
    /// A failure names the worker whose files could not be fetched.
    pub async fn fetch_inputs(&self, query_id: &str, stage: &mut StageTask) -> Result<(), (String, String)> {
        let dir = self.query_dir(query_id).join("fetched").join(format!("{}-{}", stage.stage, stage.task));
        let mut jobs = Vec::new();
        for (i, input) in stage.inputs.iter_mut().enumerate() {
            for (j, file) in input.files.iter_mut().enumerate() {
                if self.inner.shared || file.worker_id == self.inner.instance_id || file.shuffle_addr.is_empty() {
                    continue;
                }
                let ext = Path::new(&file.path).extension().and_then(|e| e.to_str()).unwrap_or("bin").to_string();
                let local = dir.join(format!("{i}-{j}.{ext}"));
                jobs.push((file.shuffle_addr.clone(), file.worker_id.clone(), std::mem::take(&mut file.path), local.clone()));
                file.path = local.display().to_string();
            }
        }
        if jobs.is_empty() {
            return Ok(());
        }
        tokio::fs::create_dir_all(&dir).await.map_err(|e| (String::new(), format!("cannot create {}: {e}", dir.display())))?;
        futures_util::stream::iter(jobs)
            .map(|(addr, worker, remote, local)| async move {
                self.fetch(&addr, &remote, &local)
                    .await
                    .map_err(|e| (worker.clone(), format!("cannot fetch shuffle file {remote} from worker `{worker}` at {addr}: {e}")))
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn fetch(&self, addr: &str, remote: &str, local: &Path) -> Result<(), String> {
        let mut client = self.peer(addr)?;
        let mut stream =
            client.fetch_partition(FetchPartitionRequest { path: remote.to_string() }).await.map_err(|s| s.message().to_string())?.into_inner();
        let mut file = tokio::fs::File::create(local).await.map_err(|e| e.to_string())?;
        while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_string())? {
            file.write_all(&chunk.data).await.map_err(|e| e.to_string())?;
        }
        file.flush().await.map_err(|e| e.to_string())
    }

    fn peer(&self, addr: &str) -> Result<ShuffleClient<tonic::transport::Channel>, String> {
        let mut peers = self.inner.peers.lock().unwrap();
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        let client = ShuffleClient::new(endpoint.connect_lazy());
        peers.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Removes this worker's shuffle files of a query (and the query's directory once empty).
    pub async fn release(&self, query_id: &str) {
        let dir = self.query_dir(query_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(query = query_id, "cannot remove {}: {e}", dir.display()),
            _ => {}
        }
        if let Some(parent) = dir.parent() {
            let _ = tokio::fs::remove_dir(parent).await; // only succeeds when empty
        }
    }

    /// A path a peer may read: inside this worker's shuffle root, nothing else.
    fn servable(&self, path: &str) -> Option<PathBuf> {
        let path = PathBuf::from(path);
        let inside = path.starts_with(&self.inner.root) && !path.components().any(|c| matches!(c, Component::ParentDir));
        inside.then_some(path)
    }
}

/// Query ids and instance ids become directory names: keep them to one safe component.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

#[tonic::async_trait]
impl Shuffle for ShuffleStore {
    type FetchPartitionStream = ReceiverStream<Result<ResultChunk, Status>>;

    async fn fetch_partition(&self, request: Request<FetchPartitionRequest>) -> Result<Response<Self::FetchPartitionStream>, Status> {
        let path = request.into_inner().path;
        let Some(path) = self.servable(&path) else {
            return Err(Status::permission_denied(format!("{path} is not a shuffle file of this worker")));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(crate::task::stream_file(path, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
