//! Shuffle storage on a worker: where stage tasks write their output partitions, the shuffle
//! service (default port 5053: `GET /v1/shuffle?path=...`, see `transfer`) that lets other
//! workers fetch them, and the fetching of a task's inputs before it runs.
//!
//! Layout: `<shuffle_location>/<query id>/<worker instance id>/<stage>-<task>/<partition>.<ext>`
//! for outputs, and `.../<worker instance id>/fetched/...` for inputs copied from other
//! workers. With `shared_filesystem` storage every worker reads the files in place; with an
//! object store (`s3`, `gcs`, `abs`) outputs are uploaded under the same layout below the
//! store's URL and readers download them: in both cases the shuffle service is not bound.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use url::Url;

use crate::proto::StageTask;
use crate::security::cluster::Credentials;

mod checkpoint;
mod transfer;
pub use checkpoint::Checkpoint;
pub use transfer::{router, serve};

/// Concurrent fetches of one task's inputs.
const PARALLEL_FETCHES: usize = 4;

#[derive(Clone)]
pub struct ShuffleStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Local files: the shuffle location itself, or a staging directory for an object store.
    root: PathBuf,
    /// Readers open shuffle files in place (`shared_filesystem`).
    shared: bool,
    /// Shuffle files live in an object store (its URL, the store, the path of that URL).
    remote: Option<Remote>,
    instance_id: String,
    /// `worker.checkpoint_location`: copies of stage outputs for checkpointed queries.
    checkpoint: Option<Checkpoint>,
    /// `[internal]`: required of peers, shown to them.
    credentials: Credentials,
}

/// An object store location (`s3://bucket/prefix`, ...): its URL, the store, the path of that URL.
pub struct Remote {
    url: String,
    store: Box<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl Remote {
    /// The store at `url`, configured by object_store `options` (region, endpoint,
    /// credentials; the environment's AWS_*/GOOGLE_*/AZURE_* variables apply too); `key`
    /// names the configuration key in errors.
    pub fn open(url: &str, options: &BTreeMap<String, String>, key: &str) -> Result<Remote, String> {
        let parsed = Url::parse(url).map_err(|e| format!("{key}: `{url}` is not a URL: {e}"))?;
        let (store, prefix) = object_store::parse_url_opts(&parsed, options)
            .map_err(|e| format!("{key}: cannot use the object store at {url}: {e}"))?;
        Ok(Remote { url: url.trim_end_matches('/').to_string(), store, prefix })
    }

    /// Uploads a local file as `relative` (below the store's prefix); returns its URL.
    async fn put_file(&self, local: &Path, relative: &[String]) -> Result<String, String> {
        let mut path = self.prefix.clone();
        for part in relative {
            path = path.join(part.as_str());
        }
        let bytes = tokio::fs::read(local).await.map_err(|e| format!("cannot read {}: {e}", local.display()))?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| format!("cannot upload {} to {}: {e}", local.display(), self.url))?;
        Ok(format!("{}/{}", self.url, relative.join("/")))
    }

    /// Whether `url` names an object of this store.
    fn owns(&self, url: &str) -> bool {
        url.starts_with(&format!("{}/", self.url))
    }

    async fn download(&self, url: &str, local: &Path) -> Result<(), String> {
        let relative = url.strip_prefix(&self.url).ok_or_else(|| format!("{url} is not in {}", self.url))?;
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        let data = self.store.get(&path).await.map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
        tokio::fs::write(local, &data).await.map_err(|e| e.to_string())
    }

    /// Removes every object below `relative`.
    async fn remove_all(&self, relative: &[String], query_id: &str) {
        let mut prefix = self.prefix.clone();
        for part in relative {
            prefix = prefix.join(part.as_str());
        }
        let listed: Vec<_> = self.store.list(Some(&prefix)).collect().await;
        for meta in listed.into_iter().flatten() {
            if let Err(e) = self.store.delete(&meta.location).await {
                tracing::warn!(query = query_id, "cannot remove {} from {}: {e}", meta.location, self.url);
            }
        }
    }
}

impl ShuffleStore {
    pub fn new(root: PathBuf, shared: bool, instance_id: String) -> Self {
        ShuffleStore {
            inner: Arc::new(Inner {
                root,
                shared,
                remote: None,
                instance_id,
                checkpoint: None,
                credentials: Credentials::default(),
            }),
        }
    }

    /// Requires the cluster credentials of peers that fetch, and shows them to those it
    /// fetches from.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        Arc::get_mut(&mut self.inner).expect("set while the store is built").credentials = credentials;
        self
    }

    fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    /// Copies stage outputs to `checkpoint` when the scheduler checkpoints their query.
    pub fn with_checkpoint(mut self, checkpoint: Option<Checkpoint>) -> Self {
        Arc::get_mut(&mut self.inner).expect("set while the store is built").checkpoint = checkpoint;
        self
    }

    /// Shuffle files in an object store at `url` (`s3://bucket/prefix`, ...), configured by
    /// object_store `options` (region, endpoint, credentials; the environment's AWS_*/GOOGLE_*/
    /// AZURE_* variables apply too). Files are staged locally under `staging`.
    pub fn object_store(
        url: &str,
        options: &BTreeMap<String, String>,
        staging: PathBuf,
        instance_id: String,
    ) -> Result<Self, String> {
        let remote = Remote::open(url, options, "worker.shuffle_location")?;
        let inner = Inner {
            root: staging,
            shared: false,
            remote: Some(remote),
            instance_id,
            checkpoint: None,
            credentials: Credentials::default(),
        };
        Ok(ShuffleStore { inner: Arc::new(inner) })
    }

    /// Publishes a stage task's output files: with an object store they are uploaded (and the
    /// local copies removed) and named by their URLs; otherwise they stay where they are.
    pub async fn publish(&self, query_id: &str, files: Vec<String>) -> Result<Vec<String>, String> {
        let Some(remote) = &self.inner.remote else {
            return Ok(files);
        };
        let mut published = Vec::with_capacity(files.len());
        for file in files {
            let local = PathBuf::from(&file);
            published.push(remote.put_file(&local, &self.layout_of(query_id, &local)?).await?);
            let _ = tokio::fs::remove_file(&local).await;
        }
        Ok(published)
    }

    /// A shuffle file's place in the layout: `[query, worker, stage-task, file]`.
    fn layout_of(&self, query_id: &str, local: &Path) -> Result<Vec<String>, String> {
        let relative = local
            .strip_prefix(self.query_dir(query_id))
            .map_err(|_| format!("{} is not a shuffle file of this worker", local.display()))?;
        Ok([sanitize(query_id), sanitize(&self.inner.instance_id)]
            .into_iter()
            .chain(relative.iter().map(|p| p.to_string_lossy().into_owned()))
            .collect())
    }

    /// Copies a stage task's output files to `worker.checkpoint_location`, when set: the
    /// copies' names, and whether every worker can read them (shared storage).
    pub async fn checkpoint(&self, query_id: &str, files: &[String]) -> Result<Option<(Vec<String>, bool)>, String> {
        let Some(checkpoint) = &self.inner.checkpoint else {
            return Ok(None);
        };
        let mut copies = Vec::with_capacity(files.len());
        for file in files {
            let local = PathBuf::from(file);
            copies.push(checkpoint.copy(&local, &self.layout_of(query_id, &local)?).await?);
        }
        Ok(Some((copies, checkpoint.shared())))
    }

    /// This worker's local shuffle directory (or staging directory of an object store).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// This worker's name.
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
    /// service. Rewrites the paths in `stage` to the local ones. Then checks every file
    /// against its checksum. A failure names the worker whose files could not be fetched, or
    /// the files that are damaged.
    pub async fn fetch_inputs(&self, query_id: &str, stage: &mut StageTask) -> Result<(), InputError> {
        let dir = self.query_dir(query_id).join("fetched").join(format!("{}-{}", stage.stage, stage.task));
        let mut jobs = Vec::new();
        // (the path the scheduler knows, the path read here, the checksum written, its writer)
        let mut checks: Vec<(String, PathBuf, u32, String)> = Vec::new();
        for (i, input) in stage.inputs.iter_mut().enumerate() {
            for (j, file) in input.files.iter_mut().enumerate() {
                let in_store = self.inner.remote.as_ref().is_some_and(|r| r.owns(&file.path))
                    || self.inner.checkpoint.as_ref().is_some_and(|c| c.owns(&file.path));
                if !in_store
                    && (self.inner.shared || file.worker_id == self.inner.instance_id || file.shuffle_addr.is_empty())
                {
                    if let Some(sum) = file.checksum {
                        checks.push((file.path.clone(), PathBuf::from(&file.path), sum, file.worker_id.clone()));
                    }
                    continue;
                }
                let ext = Path::new(&file.path).extension().and_then(|e| e.to_str()).unwrap_or("bin").to_string();
                let local = dir.join(format!("{i}-{j}.{ext}"));
                if let Some(sum) = file.checksum {
                    checks.push((file.path.clone(), local.clone(), sum, file.worker_id.clone()));
                }
                jobs.push((
                    file.shuffle_addr.clone(),
                    file.worker_id.clone(),
                    std::mem::take(&mut file.path),
                    local.clone(),
                ));
                file.path = local.display().to_string();
            }
        }
        if !jobs.is_empty() {
            tokio::fs::create_dir_all(&dir).await.map_err(|e| InputError {
                message: format!("cannot create {}: {e}", dir.display()),
                ..Default::default()
            })?;
            self.fetch_all(query_id, stage, jobs).await?;
        }
        verify(checks).await
    }

    /// Copies `jobs` (shuffle address, worker, remote path, local path) here.
    async fn fetch_all(
        &self,
        query_id: &str,
        stage: &StageTask,
        jobs: Vec<(String, String, String, PathBuf)>,
    ) -> Result<(), InputError> {
        use opentelemetry::trace::Span as _;
        let mut span = crate::monitoring::span(
            "shuffle.read",
            crate::monitoring::task_attributes(query_id, stage.stage as i64, stage.task as i64)
                .into_iter()
                .chain([opentelemetry::KeyValue::new("polars.shuffle.files", jobs.len() as i64)]),
        );
        let locals: Vec<PathBuf> = jobs.iter().map(|j| j.3.clone()).collect();
        let fetched = futures_util::stream::iter(jobs)
            .map(|(addr, worker, remote, local)| async move {
                let fetched = match (&self.inner.remote, &self.inner.checkpoint) {
                    (Some(store), _) if store.owns(&remote) => store.download(&remote, &local).await,
                    (_, Some(checkpoint)) if checkpoint.owns(&remote) => checkpoint.download(&remote, &local).await,
                    _ => self.fetch(&addr, &remote, &local).await,
                };
                let copy = self.inner.checkpoint.as_ref().is_some_and(|c| c.owns(&remote));
                fetched.map_err(|e| match copy {
                    // A checkpoint copy that cannot be read is written again, whoever wrote it.
                    true => InputError {
                        message: format!("cannot read the checkpoint copy {remote}: {e}"),
                        lost_worker: String::new(),
                        corrupt_files: vec![remote.clone()],
                    },
                    false => InputError {
                        message: format!("cannot fetch shuffle file {remote} from worker `{worker}` at {addr}: {e}"),
                        lost_worker: worker.clone(),
                        corrupt_files: Vec::new(),
                    },
                })
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ());
        let mut bytes = 0u64;
        for local in &locals {
            bytes += tokio::fs::metadata(local).await.map(|m| m.len()).unwrap_or(0);
        }
        span.set_attribute(opentelemetry::KeyValue::new("polars.shuffle.bytes_read", bytes as i64));
        if let Err(e) = &fetched {
            span.set_status(opentelemetry::trace::Status::error(e.message.clone()));
        }
        span.end();
        fetched
    }

    async fn fetch(&self, addr: &str, remote: &str, local: &Path) -> Result<(), String> {
        transfer::fetch(addr, remote, local, &self.inner.credentials).await
    }

    /// Removes this worker's shuffle files of a query (and the query's directory once empty),
    /// and the query's checkpoint copies (those of every worker, on shared storage).
    pub async fn release(&self, query_id: &str) {
        if let Some(remote) = &self.inner.remote {
            remote.remove_all(&[sanitize(query_id), sanitize(&self.inner.instance_id)], query_id).await;
        }
        if let Some(checkpoint) = &self.inner.checkpoint {
            checkpoint.release(&sanitize(query_id)).await;
        }
        let dir = self.query_dir(query_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(query = query_id, "cannot remove {}: {e}", dir.display())
            }
            _ => {}
        }
        if let Some(parent) = dir.parent() {
            let _ = tokio::fs::remove_dir(parent).await; // only succeeds when empty
        }
    }

    /// A file a peer may read: a regular file inside this worker's shuffle root (or its local
    /// checkpoint directory) once every symbolic link is resolved - a link planted in the root
    /// that points elsewhere is refused - and nothing else. Errors: `NotFound` for a missing
    /// file of the root, `PermissionDenied` for anything outside. Blocking (it asks the file
    /// system).
    pub fn servable(&self, path: &str) -> std::io::Result<PathBuf> {
        use std::io::{Error, ErrorKind};
        let outside =
            || Error::new(ErrorKind::PermissionDenied, format!("{path} is not a shuffle file of this worker"));
        let lexical = Path::new(path);
        let roots = [Some(self.inner.root.as_path()), self.inner.checkpoint.as_ref().and_then(|c| c.local_root())];
        let Some(root) = roots.into_iter().flatten().find(|root| lexical.starts_with(root)) else {
            return Err(outside());
        };
        if !lexical.is_absolute() || lexical.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(outside());
        }
        let real = std::fs::canonicalize(lexical).map_err(|e| Error::new(e.kind(), format!("{path}: {e}")))?;
        let inside = std::fs::canonicalize(root).is_ok_and(|root| real.starts_with(root));
        match inside && std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
            true => Ok(real),
            false => Err(outside()),
        }
    }
}

/// Why a task's inputs cannot be read here.
#[derive(Debug, Default)]
pub struct InputError {
    pub message: String,
    /// The worker whose files could not be fetched (gone, or its files are).
    pub lost_worker: String,
    /// Files (as the scheduler names them) whose contents do not match their checksums.
    pub corrupt_files: Vec<String>,
}

/// CRC-32 of a file's contents.
pub fn checksum(path: &Path) -> std::io::Result<u32> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// Checks input files against the checksums their writers reported.
async fn verify(checks: Vec<(String, PathBuf, u32, String)>) -> Result<(), InputError> {
    if checks.is_empty() {
        return Ok(());
    }
    let bad = tokio::task::spawn_blocking(move || {
        checks
            .into_iter()
            .filter_map(|(name, path, sum, worker)| match checksum(&path) {
                Ok(found) if found == sum => None,
                Ok(found) => Some((name, format!("checksum {found:08x}, written as {sum:08x}"), worker)),
                Err(e) => Some((name, e.to_string(), worker)),
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| InputError { message: format!("cannot check the input files: {e}"), ..Default::default() })?;
    if bad.is_empty() {
        return Ok(());
    }
    let described: Vec<String> = bad.iter().map(|(f, why, w)| format!("{f} of worker `{w}` ({why})")).collect();
    Err(InputError {
        message: format!("damaged shuffle files, to be written again: {}", described.join("; ")),
        lost_worker: String::new(),
        corrupt_files: bad.into_iter().map(|(f, _, _)| f).collect(),
    })
}

/// Throughput figures for the benchmark harness (`polars-node bench-shuffle`): fetching one
/// shuffle file from a worker's shuffle service, the way tasks fetch their inputs, and raw TCP
/// over loopback in the same process, for comparison. Returns (bytes, seconds) of each. The
/// fetched copy is left at `copy_to` when given (tests compare it), removed otherwise.
pub async fn measure(
    peer: &str,
    path: &str,
    tcp_bytes: u64,
    copy_to: Option<&Path>,
) -> Result<((u64, f64), (u64, f64)), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let store = ShuffleStore::new(std::env::temp_dir(), false, "bench".into());
    let dest = match copy_to {
        Some(path) => path.to_path_buf(),
        None => std::env::temp_dir().join(format!("polars-node-bench-{}", std::process::id())),
    };
    let started = std::time::Instant::now();
    store.fetch(peer, path, &dest).await?;
    let fetch = (tokio::fs::metadata(&dest).await.map_err(|e| e.to_string())?.len(), started.elapsed().as_secs_f64());
    if copy_to.is_none() {
        let _ = tokio::fs::remove_file(&dest).await;
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sender = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let chunk = vec![7u8; 1 << 20];
        let mut left = tcp_bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            socket.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        socket.shutdown().await
    });
    let started = std::time::Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    loop {
        match socket.read(&mut buf).await.map_err(|e| e.to_string())? {
            0 => break,
            n => received += n as u64,
        }
    }
    let tcp = (received, started.elapsed().as_secs_f64());
    sender.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    Ok((fetch, tcp))
}

/// Query ids and instance ids become directory names: keep them to one safe component.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// Reads `file` in 1 MiB pieces on the calling (blocking) thread and hands each to `send`
/// until it returns false; a read error is handed over and ends the read. One thread for the
/// whole file, not a blocking call per chunk.
pub(crate) fn read_chunks(file: std::fs::File, mut send: impl FnMut(std::io::Result<Vec<u8>>) -> bool) -> bool {
    use std::io::Read;
    const CHUNK: u64 = 1 << 20;
    let mut file = file;
    loop {
        // Whole chunks (fewer, larger messages), into a buffer that is not zeroed first.
        let mut buf = Vec::with_capacity(CHUNK as usize);
        match (&mut file).take(CHUNK).read_to_end(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if !send(Ok(buf)) {
                    return false;
                }
            }
            Err(e) => {
                send(Err(e));
                return false;
            }
        }
    }
}
