//! The scheduler: the official client's services, its queries and how they run.

pub mod client_service;
pub mod flight;
pub mod lineage;
pub mod load;
pub mod queries;
pub mod query;
pub mod registry;
pub mod scaling;
pub mod stages;
pub mod store;
pub mod workers;
