//! A worker: runs query tasks and keeps the shuffle files stages exchange.

pub mod executor;
pub mod python;
pub mod registration;
pub mod shuffle;
pub mod task;
