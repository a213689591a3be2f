//! Autoscaling (`[scaling]`): the scheduler drives a scaler over the REST protocol of Polars'
//! Ray launcher (`polars-cloud-ray`): `GET /scale_config` answers
//! `{"available", "desired", "min", "max"}` (`available` counts workers not dead, starting ones
//! included); `POST /scale_to` takes `{"amount", "workers_to_keep", "workers_to_delete"}`
//! (names are instance ids), answers 204 before new workers exist, and clamps `amount` to its
//! bounds.
//!
//! The policy, checked every second:
//! - Up: a query waiting for more workers than are live (`.distributed(min_workers=N)`, or
//!   `scheduler.default_workers_per_query`, capped by `max_workers_per_query`) makes the
//!   scheduler ask for that many; the query waits up to `scaling.registration_timeout` for
//!   them to register. Asked again only if the need grows or 30 s pass.
//! - Down: a live worker that has run no task for `scaling.idle_timeout` and holds nothing a
//!   running query still needs (it took part in none) is drained (given no new work) and named
//!   in `workers_to_delete`, never below the scaler's `min` and never while a query waits.
//! - A scaler that fails or does not answer costs a warning (at most once a minute): queries
//!   run on the workers there are.
//!
//! Every decision is logged and published as metrics (`polars.scaling.*`, this node's
//! monitoring): the observatory shows them on the nodes page and in `/metrics`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use tracing::{info, warn};

use crate::config::ScalingConfig;
use crate::proto::WorkerInfo;
use crate::scheduler::queries::Queries;
use crate::scheduler::workers::Workers;

const CHECK_PERIOD: Duration = Duration::from_secs(1);
/// A scale-up request not yet answered by registrations is repeated after this long.
const ASK_AGAIN: Duration = Duration::from_secs(30);
/// A released worker the scaler keeps alive this long is given work again.
const RELEASE_GRACE: Duration = Duration::from_secs(120);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /scale_config` answers.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ScaleConfig {
    pub available: u32,
    pub desired: u32,
    pub min: u32,
    pub max: Option<u32>,
}

/// The scaler's REST API.
pub struct Scaler {
    base: String,
    http: reqwest::Client,
}

impl Scaler {
    pub fn new(uri: &str) -> Scaler {
        let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("HTTP client");
        Scaler { base: uri.trim_end_matches('/').to_string(), http }
    }

    pub async fn config(&self) -> Result<ScaleConfig, String> {
        let url = format!("{}/scale_config", self.base);
        let response = self.http.get(&url).send().await.map_err(|e| format!("GET {url}: {}", chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url}: {status}: {}", response.text().await.unwrap_or_default()));
        }
        response.json().await.map_err(|e| format!("GET {url}: not a scale configuration: {e}"))
    }

    pub async fn scale_to(&self, amount: u32, delete: &[String]) -> Result<(), String> {
        let url = format!("{}/scale_to", self.base);
        let body = serde_json::json!({
            "amount": amount,
            "workers_to_keep": null,
            "workers_to_delete": if delete.is_empty() { serde_json::Value::Null } else { delete.into() },
        });
        let response =
            self.http.post(&url).json(&body).send().await.map_err(|e| format!("POST {url}: {}", chain(&e)))?;
        let status = response.status();
        match status.is_success() {
            true => Ok(()),
            false => Err(format!("POST {url}: {status}: {}", response.text().await.unwrap_or_default())),
        }
    }
}

fn chain(e: &reqwest::Error) -> String {
    crate::logging::error_chain(e)
}

/// What the loop last saw and did, published as metrics.
#[derive(Default)]
struct Published {
    live: u64,
    available: u64,
    desired: u64,
    demand: u64,
}

/// Runs the scaling loop for `queries`' workers until dropped.
pub async fn run(queries: Queries, config: ScalingConfig) {
    info!(scaler = %config.rest.uri, idle_timeout = %config.idle_timeout, "autoscaling on");
    let published = Arc::new(Mutex::new(Published::default()));
    let mut scaling = Loop {
        scaler: Scaler::new(&config.rest.uri),
        requests: publish(published.clone()),
        published,
        queries,
        idle_timeout: config.idle_timeout.0,
        first_seen: HashMap::new(),
        released: HashMap::new(),
        asked: None,
        last_warning: None,
    };
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        scaling.step().await;
    }
}

/// The scaling loop's memory between checks.
struct Loop {
    scaler: Scaler,
    queries: Queries,
    idle_timeout: Duration,
    published: Arc<Mutex<Published>>,
    requests: opentelemetry::metrics::Counter<u64>,
    /// When each live worker was first seen (idle since then if it never ran a task).
    first_seen: HashMap<String, Instant>,
    /// Workers named to the scaler for release, and when.
    released: HashMap<String, Instant>,
    /// The last scale-up request: how many workers, when.
    asked: Option<(u32, Instant)>,
    last_warning: Option<Instant>,
}

impl Loop {
    async fn step(&mut self) {
        let workers = self.queries.workers().clone();
        let registry = workers.registry();
        let live = registry.live_worker_infos();
        let now = Instant::now();
        self.first_seen.retain(|id, _| registry.is_alive(id));
        workers.forget_gone(|id| registry.is_alive(id));
        for w in &live {
            self.first_seen.entry(w.instance_id.clone()).or_insert(now);
        }
        // Released workers the scaler kept take work again.
        let kept: Vec<String> = (self.released.iter())
            .filter(|(id, at)| at.elapsed() > RELEASE_GRACE && registry.is_alive(id))
            .map(|(id, _)| id.clone())
            .collect();
        if !kept.is_empty() {
            warn!(workers = ?kept, "the scaler kept workers it was asked to release; they take work again");
            registry.set_draining(&kept, false);
        }
        self.released.retain(|id, at| registry.is_alive(id) && at.elapsed() <= RELEASE_GRACE);

        let demand = workers.demand();
        {
            let mut p = self.published.lock().unwrap();
            p.live = live.len() as u64;
            p.demand = demand as u64;
        }
        if demand as usize > live.len() {
            self.grow(demand, live.len()).await;
        } else {
            self.asked = None;
            if demand == 0 {
                self.release(&workers, &live).await; // never while a query waits
            }
        }
    }

    /// Asks the scaler for the `demand` workers a waiting query needs (`live` there are).
    async fn grow(&mut self, demand: u32, live: usize) {
        if self.asked.is_some_and(|(n, at)| n >= demand && at.elapsed() < ASK_AGAIN) {
            return;
        }
        let scale = match self.scaler.config().await {
            Ok(c) => c,
            Err(e) => {
                return self.trouble(format!(
                    "a query needs {demand} workers and {live} are live, but the scaler did not answer: {e}"
                ));
            }
        };
        self.note(&scale);
        let amount = scale.max.map_or(demand, |max| demand.min(max));
        if scale.max.is_some_and(|max| max < demand) {
            warn!(needed = demand, max = scale.max, "a query needs more workers than the scaler allows");
        }
        if amount > scale.available || amount > scale.desired {
            match self.scaler.scale_to(amount, &[]).await {
                Ok(()) => {
                    info!(
                        amount,
                        live,
                        available = scale.available,
                        needed = demand,
                        "asked the scaler for more workers"
                    );
                    self.requests.add(1, &[KeyValue::new("direction", "up")]);
                }
                Err(e) => self.trouble(format!("the scaler refused to grow to {amount} workers: {e}")),
            }
        }
        self.asked = Some((demand, Instant::now()));
    }

    /// Releases the live workers idle for the idle timeout that no running query uses.
    async fn release(&mut self, workers: &Workers, live: &[WorkerInfo]) {
        let in_use: HashSet<String> = self.queries.workers_in_use();
        let idle: Vec<String> = (live.iter().map(|w| &w.instance_id))
            .filter(|id| !in_use.contains(*id) && !self.released.contains_key(*id))
            .filter(|id| workers.idle_for(id, self.first_seen[*id]).is_some_and(|d| d >= self.idle_timeout))
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        let scale = match self.scaler.config().await {
            Ok(c) => c,
            Err(e) => {
                return self.trouble(format!("{} workers are idle, but the scaler did not answer: {e}", idle.len()));
            }
        };
        self.note(&scale);
        let releasable = scale.available.saturating_sub(scale.min) as usize;
        let release: Vec<String> = idle.into_iter().take(releasable).collect();
        if release.is_empty() {
            return;
        }
        // Drained first; a task that started meanwhile keeps its worker.
        let registry = workers.registry();
        registry.set_draining(&release, true);
        let now = Instant::now();
        let (release, busy): (Vec<String>, Vec<String>) =
            release.into_iter().partition(|id| workers.idle_for(id, now).is_some());
        registry.set_draining(&busy, false);
        if release.is_empty() {
            return;
        }
        let amount = scale.available - release.len() as u32;
        match self.scaler.scale_to(amount, &release).await {
            Ok(()) => {
                info!(workers = ?release, amount, idle_timeout = ?self.idle_timeout, "released idle workers to the scaler");
                self.requests.add(1, &[KeyValue::new("direction", "down")]);
                self.released.extend(release.into_iter().map(|id| (id, now)));
            }
            Err(e) => {
                registry.set_draining(&release, false);
                self.trouble(format!("the scaler refused to release idle workers {release:?}: {e}"));
            }
        }
    }

    fn note(&self, scale: &ScaleConfig) {
        let mut p = self.published.lock().unwrap();
        p.available = scale.available as u64;
        p.desired = scale.desired as u64;
    }

    /// A warning, at most once a minute: the scaler failed.
    fn trouble(&mut self, what: String) {
        if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            self.last_warning = Some(Instant::now());
            warn!("{what}; queries run on the workers there are");
        }
    }
}

/// Registers the scaling metrics on this node's meter (exported when `[monitoring]` is on);
/// returns the counter of requests sent to the scaler.
fn publish(state: Arc<Mutex<Published>>) -> opentelemetry::metrics::Counter<u64> {
    let meter = opentelemetry::global::meter("polars-node");
    let gauge = |name: &'static str, description: &'static str, read: fn(&Published) -> u64| {
        let state = state.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(&state.lock().unwrap()), &[]))
            .build()
    };
    // Kept alive by the meter provider's registry.
    gauge("polars.scaling.live_workers", "Workers taking work", |p| p.live);
    gauge("polars.scaling.available_workers", "Workers the scaler runs or starts", |p| p.available);
    gauge("polars.scaling.desired_workers", "Workers the scaler was last asked for", |p| p.desired);
    gauge("polars.scaling.needed_workers", "Most workers a waiting query needs", |p| p.demand);
    meter.u64_counter("polars.scaling.requests").with_description("Requests sent to the scaler").build()
}
