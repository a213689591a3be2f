//! Bearer-token authentication of clients (`auth.jwks` of a client-facing service): every
//! call must carry `authorization: Bearer <JWT>` signed by a key of the JSON Web Key Set at
//! `url`, unexpired, from one of `issuers`, for `audience`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use tokio::sync::Notify;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::config::JwksConfig;

/// How often the key set is fetched again (keys rotate).
const REFRESH: Duration = Duration::from_secs(300);
/// A token with an unknown key id triggers a fetch, at most this often.
const MIN_REFETCH: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct JwksAuth {
    inner: Arc<Inner>,
}

struct Inner {
    config: JwksConfig,
    keys: RwLock<Option<JwkSet>>,
    /// Why the last fetch failed, told to refused clients.
    fetch_error: RwLock<Option<String>>,
    refetch: Notify,
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

impl JwksAuth {
    pub fn new(config: JwksConfig) -> Self {
        JwksAuth {
            inner: Arc::new(Inner {
                config,
                keys: RwLock::new(None),
                fetch_error: RwLock::new(None),
                refetch: Notify::new(),
            }),
        }
    }

    /// Fetches the key set once. The node does this before it serves, so that the first
    /// clients are not refused while the keys are on their way.
    pub async fn load(&self) -> bool {
        let client = http_client();
        self.fetch_into(&client).await
    }

    async fn fetch_into(&self, client: &reqwest::Client) -> bool {
        match fetch(client, &self.inner.config.url).await {
            Ok(set) => {
                info!(url = %self.inner.config.url, keys = set.keys.len(), "JWKS loaded");
                *self.inner.keys.write().unwrap() = Some(set);
                *self.inner.fetch_error.write().unwrap() = None;
                true
            }
            Err(e) => {
                warn!(url = %self.inner.config.url, "cannot fetch the JWKS: {e}");
                *self.inner.fetch_error.write().unwrap() = Some(e);
                false
            }
        }
    }

    /// Keeps the key set current. Runs until dropped.
    pub async fn keep_keys(self) {
        let client = http_client();
        let mut last = self.inner.keys.read().unwrap().is_some().then(Instant::now);
        loop {
            if last.is_none_or(|t: Instant| t.elapsed() >= MIN_REFETCH) {
                last = Some(Instant::now());
                self.fetch_into(&client).await;
            }
            let retry = if self.inner.keys.read().unwrap().is_some() { REFRESH } else { MIN_REFETCH };
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = self.inner.refetch.notified() => {}
            }
        }
    }

    /// Checks the bearer token of a gRPC call; returns the token's subject.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
        self.check_authorization(metadata.get("authorization").and_then(|v| v.to_str().ok()))
    }

    /// Checks an `authorization` header value (gRPC metadata or HTTP header alike).
    pub fn check_authorization(&self, header: Option<&str>) -> Result<Option<String>, Status> {
        let token = header
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this cluster requires a bearer token: pass extra_headers={\"authorization\": \"Bearer <token>\"} to pc.ClusterContext",
                )
            })?;
        let refused = |why: String| Status::unauthenticated(format!("the bearer token was refused: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| refused(e.to_string()))?;
        let keys = self.inner.keys.read().unwrap();
        let Some(keys) = keys.as_ref() else {
            let why = self.inner.fetch_error.read().unwrap().clone().unwrap_or_else(|| "not fetched yet".into());
            return Err(Status::unavailable(format!(
                "cannot validate tokens: the key set at {} is unavailable ({why})",
                self.inner.config.url
            )));
        };
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        };
        let Some(jwk) = jwk else {
            self.inner.refetch.notify_one();
            return Err(refused(format!(
                "no key `{}` in the key set at {}",
                header.kid.unwrap_or_default(),
                self.inner.config.url
            )));
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| refused(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        if !self.inner.config.issuers.is_empty() {
            validation.set_issuer(&self.inner.config.issuers);
        }
        match self.inner.config.audience.is_empty() {
            false => validation.set_audience(&self.inner.config.audience),
            true => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| refused(e.to_string()))?;
        Ok(data.claims.sub)
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("HTTP client")
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<JwkSet, String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let response = response.error_for_status().map_err(|e| e.to_string())?;
    response.json::<JwkSet>().await.map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

impl tonic::service::Interceptor for JwksAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}
