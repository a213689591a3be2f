//! `worker.checkpoint_location`: copies of finished stage outputs, made as each stage task of a
//! checkpointed query finishes (the scheduler records them every `scheduler.checkpoint.period`).
//! On a shared file system or an object store the copies outlive the worker that wrote them: a
//! query resumed after a scheduler restart reads them in place of outputs whose worker is gone.
//! On a local directory they outlive only the worker's process, and peers fetch them through
//! its shuffle service. Layout as the shuffle files': `<location>/<query>/<worker>/<stage>-<task>/<file>`.

use std::path::{Path, PathBuf};

use super::Remote;
use crate::config::StorageLocation;

pub enum Checkpoint {
    /// A directory: this worker's own disk (`local`), or one every worker mounts (`shared_filesystem`).
    Dir { root: PathBuf, shared: bool },
    /// An object store (`s3`, `gcs`, `abs`).
    Remote(Remote),
}

impl Checkpoint {
    /// The checkpoint location a worker's configuration names.
    pub fn open(location: &StorageLocation) -> Result<Checkpoint, String> {
        Ok(match location {
            StorageLocation::Local(l) => Checkpoint::Dir { root: l.path.clone(), shared: false },
            StorageLocation::SharedFilesystem(l) => Checkpoint::Dir { root: l.path.clone(), shared: true },
            StorageLocation::S3(o) | StorageLocation::Gcs(o) | StorageLocation::Abs(o) => {
                Checkpoint::Remote(Remote::open(&o.url, &o.options, "worker.checkpoint_location")?)
            }
        })
    }

    /// Every worker reads the copies directly (not through this worker).
    pub fn shared(&self) -> bool {
        !matches!(self, Checkpoint::Dir { shared: false, .. })
    }

    /// The directory of copies only this worker has (its shuffle service serves them).
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            Checkpoint::Dir { root, shared: false } => Some(root),
            _ => None,
        }
    }

    /// Whether `path` names a copy in this worker's object store.
    pub(super) fn owns(&self, path: &str) -> bool {
        matches!(self, Checkpoint::Remote(r) if r.owns(path))
    }

    pub(super) async fn download(&self, url: &str, local: &Path) -> Result<(), String> {
        match self {
            Checkpoint::Remote(r) => r.download(url, local).await,
            Checkpoint::Dir { .. } => Err(format!("{url} is not in an object store")),
        }
    }

    /// Copies `local` to its place `relative` (`[query, worker, stage-task, file]`); returns the
    /// copy's path or URL.
    pub(super) async fn copy(&self, local: &Path, relative: &[String]) -> Result<String, String> {
        match self {
            Checkpoint::Remote(r) => r.put_file(local, relative).await,
            Checkpoint::Dir { root, .. } => {
                let target = relative.iter().fold(root.clone(), |p, part| p.join(part));
                let problem = |e: std::io::Error| {
                    format!("cannot copy {} to {} (worker.checkpoint_location): {e}", local.display(), target.display())
                };
                if let Some(dir) = target.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(problem)?;
                }
                tokio::fs::copy(local, &target).await.map_err(problem)?;
                Ok(target.display().to_string())
            }
        }
    }

    /// Removes a query's copies (every worker's, on shared storage).
    pub(super) async fn release(&self, query_dir: &str) {
        match self {
            Checkpoint::Remote(r) => r.remove_all(&[query_dir.to_string()], query_dir).await,
            Checkpoint::Dir { root, .. } => match tokio::fs::remove_dir_all(root.join(query_dir)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(query = query_dir, "cannot remove the query's checkpoint copies: {e}")
                }
                _ => {}
            },
        }
    }
}
