//! polars-node: one binary for every role of a self-hosted Polars cluster.
pub mod address;
pub mod config;
pub mod layout;
