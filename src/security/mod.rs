//! Who may call: TLS on the client-facing ports, bearer tokens of a JSON Web Key Set.

pub mod auth;
pub mod tls;
