//! polars-node: one binary for every role of a self-hosted Polars cluster, a folder per role:
//!
//! - `config`: the schema (defaults, docs, loading), `config::address` (address forms) and
//!   `config::layout` (whole-configuration checks, the services this node runs).
//! - `scheduler`: the client service and Arrow Flight of the official client, the query record
//!   (`query`) that its lifecycle (`queries`) and the stage runner (`stages`) share, the
//!   scheduler's hold on its workers (`workers`), the registry of live workers.
//! - `worker`: the task service, the execution processes that run tasks, the shuffle storage and
//!   service, the registration with the scheduler.
//! - `membership`: the heartbeat datagrams workers send the scheduler (wire form, MACs).
//! - `observatory`: the OTLP receiver, its store, the REST API and dashboard.
//! - `systemd` (socket activation, sd-notify, the memory cgroup), `security` (TLS, bearer
//!   tokens), `monitoring` (this node's traces and metrics), `logging`.
//! - `node` assembles the roles a configuration enables; `main.rs` is the command line.
pub mod config;
pub mod logging;
pub mod membership;
pub mod monitoring;
pub mod node;
pub mod observatory;
pub mod scheduler;
pub mod security;
pub mod systemd;
pub mod worker;

/// This build's version: a worker registers only with a scheduler of the same one.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Code generated from `proto/`: the project's own protocols (`polars_node.v1`) and the
/// client protocol of the official `polars-cloud` client, nested as its packages are.
pub mod proto {
    tonic::include_proto!("polars_node.v1");

    pub mod polars_cloud {
        pub mod common {
            tonic::include_proto!("polars_cloud.common");
        }
        pub mod compute_plane {
            pub mod client {
                pub mod v1 {
                    tonic::include_proto!("polars_cloud.compute_plane.client.v1");
                }
            }
        }
    }
    pub use polars_cloud::common;
    pub use polars_cloud::compute_plane::client::v1 as client;
}
