//! Readiness and liveness reports to the service manager (sd_notify). Every call is a no-op
//! when the node does not run under systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info};

/// `STATUS=`: what the node is doing or waiting for. Also logged, so the same line is seen
/// with or without systemd.
pub fn status(text: &str) {
    info!(status = text, "node status");
    send(&[NotifyState::Status(text)]);
}

pub fn ready(text: &str) {
    info!(status = text, "node ready");
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

pub fn stopping() {
    info!("node stopping");
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing in-flight work")]);
}

/// `WATCHDOG=1` at half the watchdog interval systemd asked for, until the task is dropped.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return std::future::pending().await;
    };
    let half = (interval / 2).max(Duration::from_millis(10));
    debug!(interval_ms = interval.as_millis() as u64, "watchdog enabled");
    let mut tick = tokio::time::interval(half);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}
