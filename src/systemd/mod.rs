//! What a systemd service does: socket activation, sd-notify, and the delegated memory cgroup.

pub mod activation;
pub mod cgroup;
pub mod notify;
