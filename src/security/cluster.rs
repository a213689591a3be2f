//! The cluster credentials (`[internal]`): what every call between the nodes carries and every
//! internal service checks before it does anything - worker registration and heartbeats (5050,
//! and on 5051 where registration is also served), tasks, cancellation and result streaming
//! (5052), shuffle fetches (5053) and monitoring exports (5049).
//!
//! Two forms, either or both: a shared secret (`token_file`, sent as gRPC metadata or an HTTP
//! header `x-polars-node-token`, compared in constant time) and mutual TLS with a cluster CA
//! (`tls.{ca_file,certificate_key_file,private_key_file}`: a node takes only connections whose
//! client certificate the CA signed, and checks the certificate of every node it calls).
//! Neither: those ports serve anyone who can reach them, and the node says so once at start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::{InternalConfig, InternalTlsConfig};

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

/// Everything a node needs to call other nodes and to check their calls: built once, before
/// anything binds, from `[internal]`.
#[derive(Clone, Default, Debug)]
pub struct Credentials {
    pub token: Option<ClusterToken>,
    pub tls: Option<Arc<ClusterTls>>,
}

impl Credentials {
    /// Reads and checks the files `[internal]` names; every problem names its key.
    pub fn load(internal: &InternalConfig) -> Result<Credentials, String> {
        let token = internal.token_file.as_deref().map(ClusterToken::load).transpose()?;
        let tls = internal.tls.as_ref().map(ClusterTls::load).transpose()?.map(Arc::new);
        Ok(Credentials { token, tls })
    }

    /// Whether anything admits only the cluster's nodes.
    pub fn is_set(&self) -> bool {
        self.token.is_some() || self.tls.is_some()
    }

    /// A gRPC endpoint of another node's service at `addr` (`host:port`): TLS with this node's
    /// certificate when the cluster has a CA.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint =
            Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| format!("invalid address {addr}: {e}"))?;
        match &self.tls {
            Some(tls) => endpoint.tls_config(tls.tonic_client()).map_err(|e| format!("TLS to {addr}: {e}")),
            None => Ok(endpoint),
        }
    }

    /// The token check of a gRPC server (`Check`).
    pub fn check(&self) -> Check {
        Check(self.token.clone())
    }

    /// Adds the token to a gRPC client's calls (`Attach`).
    pub fn attach(&self) -> Attach {
        Attach(self.token.clone())
    }

    /// TLS of a gRPC server on an internal port: clients must show a certificate of the CA.
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        self.tls.as_ref().map(|tls| {
            ServerTlsConfig::new()
                .identity(tls.identity.clone())
                .client_ca_root(Certificate::from_pem(&tls.ca_pem))
                .timeout(HANDSHAKE_TIMEOUT)
        })
    }
}

/// A TLS handshake not done by then is dropped (a peer that connects and sends nothing).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's TLS material under the cluster CA (`internal.tls`).
pub struct ClusterTls {
    ca_pem: Vec<u8>,
    /// This node's own certificate (the first of its chain).
    certificate: CertificateDer<'static>,
    identity: Identity,
    /// For the shuffle service (HTTP, served without tonic): client certificates required.
    pub server: Arc<rustls::ServerConfig>,
    /// For shuffle fetches: this node's certificate, and only the CA trusted.
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls(..)")
    }
}

impl ClusterTls {
    fn load(config: &InternalTlsConfig) -> Result<ClusterTls, String> {
        let read = |path: &Path, key: &str| {
            std::fs::read(path)
                .map_err(|e| format!("internal.tls.{key} = {:?}: cannot read it: {e}", path.display().to_string()))
        };
        let certs_in = |pem: &[u8], path: &Path, key: &str| {
            let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
                format!("internal.tls.{key} = {:?}: not a PEM certificate: {e}", path.display().to_string())
            })?;
            match certs.is_empty() {
                true => Err(format!("internal.tls.{key} = {:?}: holds no certificate", path.display().to_string())),
                false => Ok(certs),
            }
        };
        let ca_pem = read(&config.ca_file, "ca_file")?;
        let cert_pem = read(&config.certificate_key_file, "certificate_key_file")?;
        let key_pem = read(&config.private_key_file, "private_key_file")?;
        let ca = certs_in(&ca_pem, &config.ca_file, "ca_file")?;
        let certs = certs_in(&cert_pem, &config.certificate_key_file, "certificate_key_file")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "internal.tls.private_key_file = {:?}: not a PEM private key: {e}",
                config.private_key_file.display().to_string()
            )
        })?;

        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| format!("internal.tls.ca_file: not a CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        // The provider is named: more than one is compiled into this binary.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("internal.tls.ca_file: {e}"))?;
        // This node's certificate must be one the others accept: say so now, not at the first call.
        verifier.verify_client_cert(&certs[0], &certs[1..], UnixTime::now()).map_err(|e| {
            format!(
                "internal.tls.certificate_key_file = {:?} is not accepted under the cluster CA (internal.tls.ca_file): {}{}",
                config.certificate_key_file.display().to_string(),
                e.to_string().trim_start_matches("invalid peer certificate: "),
                match e {
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
                    ) => " (the CA did not sign it)",
                    _ => "",
                }
            )
        })?;
        let mismatch = |e: rustls::Error| {
            format!("internal.tls.certificate_key_file and internal.tls.private_key_file do not belong together: {e}")
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(mismatch)?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let certificate = certs[0].clone();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(mismatch)?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClusterTls {
            certificate,
            identity: Identity::from_pem(cert_pem, key_pem),
            ca_pem,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Whether this node's certificate names `host` (a DNS name or an IP address), as a peer
    /// dialing it there checks.
    pub fn names(&self, host: &str) -> Result<(), String> {
        let name = ClusterTls::server_name(&format!("{host}:0"))?;
        let certificate = webpki::EndEntityCert::try_from(&self.certificate).map_err(|e| e.to_string())?;
        certificate.verify_is_valid_for_subject_name(&name).map_err(|e| format!("{e:?}"))
    }

    fn tonic_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem)).identity(self.identity.clone())
    }

    /// The name a peer's certificate must carry: the host of `addr` (`host:port`).
    pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host} cannot be checked against a certificate: {e}"))
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
