//! Logs through `tracing` to stderr: level from `PLC_LOG_LEVEL` (info, debug, trace or any
//! `tracing` filter), JSON lines with `--log-format json` or `PLC_LOG_FORMAT=json`.
//!
//! Text is coloured only on a terminal, and never with `NO_COLOR` set (no escapes in
//! `docker logs`, files or pipes). Under systemd (`JOURNAL_STREAM` names stderr) lines carry
//! no timestamp: the journal stamps each line itself.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PLC_LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match (format, stderr_is_journal()) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is `DEVICE:INODE` of it.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var("JOURNAL_STREAM").ok() else { return false };
    let Some((dev, ino)) = stream.split_once(':') else { return false };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// An error with its causes, `outer: cause: root cause` (a transport error's message alone
/// says only "transport error"; its causes say which certificate or connection failed).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(&e.to_string(), e.source())
}

/// `message` followed by each of `cause` and its sources that it does not already say.
pub fn with_causes(message: &str, mut cause: Option<&dyn std::error::Error>) -> String {
    let mut out = message.to_string();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
