//! Listening sockets: taken over from systemd socket activation by descriptor name, or bound
//! here. All of a node's sockets are acquired before any service starts, so a failure leaves
//! nothing listening.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::config::layout::{Endpoint, ServiceKind};

/// Descriptors passed by systemd (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`), by name.
#[derive(Debug, Default)]
pub struct Activated {
    by_name: BTreeMap<String, OwnedFd>,
}

impl Activated {
    /// Takes the passed descriptors and removes the variables from the environment, so that
    /// processes this node starts do not inherit them.
    ///
    /// # Safety
    /// Must run before any other thread exists (it changes the environment).
    pub unsafe fn take_from_env() -> Result<Activated, String> {
        // SAFETY: the caller guarantees the process is still single-threaded.
        let fds: Vec<(RawFd, String)> = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
            .map_err(|e| {
                format!(
                    "socket activation: {e} (LISTEN_FDS and LISTEN_FDNAMES must list the same number of descriptors)"
                )
            })?
            .collect();
        let mut by_name = BTreeMap::new();
        let mut problems = Vec::new();
        for (fd, name) in fds {
            // SAFETY: systemd passed these descriptors to this process; nothing else owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let known = ServiceKind::ALL.map(|k| k.fd_name()).join(", ");
            if name.is_empty() || name == "unknown" {
                problems.push(format!(
                    "socket-activated descriptor {fd} has no name: set FileDescriptorName= in its socket unit to one of {known}"
                ));
            } else if ServiceKind::from_fd_name(&name).is_none() {
                problems.push(format!("socket-activated descriptor {fd} is named `{name}`, which is not a polars-node service (names: {known})"));
            } else if by_name.insert(name.clone(), owned).is_some() {
                problems.push(format!("two socket-activated descriptors are named `{name}`; each service takes one"));
            }
        }
        if problems.is_empty() { Ok(Activated { by_name }) } else { Err(problems.join("\n")) }
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// Every listener of this node, ready to serve.
pub struct Listeners(pub BTreeMap<ServiceKind, TcpListener>);

/// Takes activated descriptors for the services that have one and binds the others. A
/// descriptor for a service this node does not run is an error: it would silently listen
/// nowhere.
pub fn acquire(endpoints: &[Endpoint], mut activated: Activated) -> Result<Listeners, String> {
    let mut problems = Vec::new();
    for name in activated.names() {
        let kind = ServiceKind::from_fd_name(name).expect("checked when taken");
        if !endpoints.iter().any(|e| e.kind == kind) {
            problems.push(format!(
                "a socket-activated descriptor is named `{name}`, but this node runs no {} (`{}`): enable that role or drop the socket",
                kind.title(),
                kind.key()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let mut listeners = BTreeMap::new();
    for endpoint in endpoints {
        let kind = endpoint.kind;
        let listener = match activated.by_name.remove(kind.fd_name()) {
            Some(fd) => {
                let listener = TcpListener::from(fd);
                if let Err(e) = listener.local_addr() {
                    return Err(format!(
                        "socket-activated descriptor `{}` is not a listening TCP socket ({e}): use ListenStream= in its socket unit",
                        kind.fd_name()
                    ));
                }
                listener
            }
            None => TcpListener::bind(endpoint.bind).map_err(|e| bind_error(endpoint, &e))?,
        };
        listener.set_nonblocking(true).map_err(|e| format!("{}: {e}", kind.title()))?;
        listeners.insert(kind, listener);
    }
    Ok(Listeners(listeners))
}

fn bind_error(endpoint: &Endpoint, e: &std::io::Error) -> String {
    let what = format!(
        "cannot listen on {} for the {} (`{}.bind_addr`)",
        endpoint.bind,
        endpoint.kind.title(),
        endpoint.kind.key()
    );
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the port is in use by another process: stop it or choose another port".to_string()
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!(
                "{} is not an address of this host: bind to one of its addresses, an interface, or \":{}\"",
                endpoint.bind.ip(),
                endpoint.bind.port()
            )
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE".to_string()
        }
        _ => e.to_string(),
    };
    format!("{what}: {hint}")
}
