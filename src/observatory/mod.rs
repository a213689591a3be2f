//! The observatory: where an operator sees what the cluster does. `otlp` receives traces and
//! metrics from any OpenTelemetry SDK, `store` keeps them in SQLite, `rest` serves them.
pub mod otlp;
pub mod rest;
pub mod store;
