//! polars-node: one binary for every role of a self-hosted Polars cluster.
//!
//! `config` is the schema, `layout` checks it as a whole and resolves addresses, `activation`
//! acquires the listening sockets, `node` runs the services, `membership` keeps the live set
//! of workers, `notify` talks to systemd and `cgroup` enforces the memory limit.
pub mod activation;
pub mod address;
pub mod cgroup;
pub mod config;
pub mod layout;
pub mod logging;
pub mod membership;
pub mod node;
pub mod notify;

/// Code generated from `proto/`.
pub mod proto {
    tonic::include_proto!("polars_node.v1");
}
