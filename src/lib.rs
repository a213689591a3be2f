//! polars-node: one binary for every role of a self-hosted Polars cluster.
//!
//! `config` is the schema, `layout` checks it as a whole and resolves addresses, `activation`
//! acquires the listening sockets, `node` runs the services, `membership` keeps the live set
//! of workers, `notify` talks to systemd and `cgroup` enforces the memory limit.
//! `client_service` is the API of the official client, `queries` the lifecycle of its queries
//! on the scheduler, `stages` the execution of split queries stage by stage, `task` the
//! execution of tasks on a worker, `executor` the processes that run them, and `shuffle` the data stages exchange.
pub mod activation;
pub mod address;
pub mod auth;
pub mod cgroup;
pub mod client_service;
pub mod config;
pub mod executor;
pub mod flight;
pub mod layout;
pub mod logging;
pub mod membership;
pub mod monitoring;
pub mod node;
pub mod notify;
pub mod observatory;
pub mod queries;
pub mod shuffle;
pub mod stages;
pub mod task;
pub mod tls;

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
