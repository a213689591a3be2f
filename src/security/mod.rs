//! Who may call: TLS on the client-facing ports, bearer tokens of a JSON Web Key Set, the
//! cluster token on the internal ports.

pub mod auth;
pub mod cluster;
pub mod tls;
