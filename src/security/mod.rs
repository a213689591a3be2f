//! Who may call: TLS on the client-facing ports, bearer tokens of a JSON Web Key Set, the
//! cluster token and TLS on the internal ports, and connections that say nothing let go.

pub mod auth;
pub mod cluster;
pub mod silent;
pub mod tls;
