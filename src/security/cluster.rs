//! The cluster credential (`internal.token_file`): a shared secret that every call between the
//! nodes carries (gRPC metadata or an HTTP header `x-polars-node-token`) and that every internal
//! service checks, in constant time, before it does anything: worker registration and
//! heartbeats (5050, and on 5051 where registration is also served), tasks, cancellation and
//! result streaming (5052), shuffle fetches (5053). Unset: those ports serve anyone who can
//! reach them, and the node says so once at start.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// The header and metadata key that carries the token.
pub const HEADER: &str = "x-polars-node-token";

#[derive(Clone)]
pub struct ClusterToken(Arc<str>);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(..)") // never the secret itself
    }
}

impl ClusterToken {
    /// Reads the token file (its first line, without surrounding white space).
    pub fn load(path: &Path) -> Result<ClusterToken, String> {
        let problem = |why: String| format!("internal.token_file = {:?}: {why}", path.display().to_string());
        let text = std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.len() < 16 {
            return Err(problem(
                "the token must be at least 16 characters (for example `openssl rand -hex 32 > FILE`)".into(),
            ));
        }
        if MetadataValue::try_from(token).is_err() {
            return Err(problem("the token must be printable ASCII (it travels in a header)".into()));
        }
        Ok(ClusterToken(token.into()))
    }

    /// Whether `presented` is the token (constant time: no timing tells how much matched).
    pub fn admits(&self, presented: Option<&[u8]>) -> bool {
        presented.is_some_and(|p| bool::from(p.ct_eq(self.0.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the token on a server's calls (a gRPC interceptor); lets everything through when
/// the cluster has no token.
#[derive(Clone, Default)]
pub struct Check(pub Option<ClusterToken>);

impl tonic::service::Interceptor for Check {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        match token.admits(request.metadata().get(HEADER).map(|v| v.as_bytes())) {
            true => Ok(request),
            false => Err(Status::unauthenticated(
                "this internal port takes calls only from nodes of the cluster: the caller must send the cluster \
                 token (internal.token_file, the same file on every node)",
            )),
        }
    }
}

/// Adds the token to a client's calls (a gRPC interceptor); nothing when the cluster has none.
#[derive(Clone, Default)]
pub struct Attach(pub Option<ClusterToken>);

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(token.as_str()).expect("checked when loaded");
            request.metadata_mut().insert(HEADER, value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn a_short_or_missing_token_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        assert!(ClusterToken::load(&short).unwrap_err().contains("at least 16 characters"));
        let missing = ClusterToken::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.starts_with("internal.token_file = ") && missing.contains("cannot read it"), "{missing}");
    }

    #[test]
    fn only_the_token_passes_and_it_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  0123456789abcdef0123  \nignored\n").unwrap();
        let token = ClusterToken::load(&file).unwrap();
        assert_eq!(format!("{token:?}"), "ClusterToken(..)");
        let mut check = Check(Some(token.clone()));
        assert!(check.call(Request::new(())).is_err());
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(HEADER, MetadataValue::from_static("0123456789abcdef0124"));
        assert_eq!(check.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        let attached = Attach(Some(token)).call(Request::new(())).unwrap();
        assert!(check.call(attached).is_ok());
        assert!(Check(None).call(Request::new(())).is_ok());
    }
}
