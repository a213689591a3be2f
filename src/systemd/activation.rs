//! Listening sockets: taken over from systemd socket activation by descriptor name, or bound
//! here. All of a node's sockets are acquired before any service starts, so a failure leaves
//! nothing listening.

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{SockType, getsockopt, sockopt};
use tracing::warn;

use crate::config::layout::{Endpoint, ServiceKind};

/// Descriptors passed by systemd (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`), by name.
#[derive(Debug, Default)]
pub struct Activated {
    by_name: BTreeMap<String, OwnedFd>,
    /// A datagram socket named `worker` (`ListenDatagram=` beside the worker service's
    /// `ListenStream=`): the scheduler's heartbeat datagrams.
    heartbeats: Option<OwnedFd>,
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
        let mut heartbeats = None;
        let mut problems = Vec::new();
        for (fd, name) in fds {
            // SAFETY: systemd passed these descriptors to this process; nothing else owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let known = ServiceKind::ALL.map(|k| k.fd_name()).join(", ");
            let datagram = getsockopt(&owned, sockopt::SockType).is_ok_and(|t| t == SockType::Datagram);
            let worker = ServiceKind::Worker.fd_name();
            if datagram && name == worker {
                if heartbeats.replace(owned).is_some() {
                    problems.push(format!(
                        "two socket-activated datagram descriptors are named `{worker}`; heartbeats take one"
                    ));
                }
            } else if datagram {
                problems.push(format!(
                    "socket-activated descriptor {fd} (`{name}`) is a datagram socket: only `{worker}` takes one (heartbeat \
                     datagrams, ListenDatagram=); the others need ListenStream="
                ));
            } else if name.is_empty() || name == "unknown" {
                problems.push(format!(
                    "socket-activated descriptor {fd} has no name: set FileDescriptorName= in its socket unit to one of {known}"
                ));
            } else if ServiceKind::from_fd_name(&name).is_none() {
                problems.push(format!("socket-activated descriptor {fd} is named `{name}`, which is not a polars-node service (names: {known})"));
            } else if by_name.insert(name.clone(), owned).is_some() {
                problems.push(format!("two socket-activated descriptors are named `{name}`; each service takes one"));
            }
        }
        if problems.is_empty() { Ok(Activated { by_name, heartbeats }) } else { Err(problems.join("\n")) }
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// Every listener of this node, ready to serve.
pub struct Listeners {
    pub tcp: BTreeMap<ServiceKind, TcpListener>,
    /// The scheduler's heartbeat datagrams, on the worker service's address. None only when
    /// the worker service came from socket activation without a datagram socket and this
    /// process cannot bind one: workers then send their heartbeats on a gRPC call.
    pub heartbeats: Option<UdpSocket>,
}

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
    let mut heartbeats = None;
    for endpoint in endpoints {
        let kind = endpoint.kind;
        let fd = activated.by_name.remove(kind.fd_name());
        let was_activated = fd.is_some();
        let listener = match fd {
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
        if kind == ServiceKind::Worker {
            heartbeats = heartbeat_socket(endpoint, &listener, activated.heartbeats.take(), was_activated)?;
        }
        listeners.insert(kind, listener);
    }
    if activated.heartbeats.is_some() {
        return Err(format!(
            "a socket-activated datagram descriptor is named `{}`, but this node runs no scheduler: drop the socket",
            ServiceKind::Worker.fd_name()
        ));
    }
    Ok(Listeners { tcp: listeners, heartbeats })
}

/// The UDP socket of heartbeat datagrams, on the same address and port as the worker
/// service: passed by systemd, or bound here.
fn heartbeat_socket(
    endpoint: &Endpoint,
    listener: &TcpListener,
    activated: Option<OwnedFd>,
    stream_activated: bool,
) -> Result<Option<UdpSocket>, String> {
    let socket = match activated {
        Some(fd) => UdpSocket::from(fd),
        None if stream_activated => {
            // The stream came from systemd, which may have bound a port this process may not.
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            match UdpSocket::bind(addr) {
                Ok(socket) => socket,
                Err(e) => {
                    warn!(
                        "cannot bind heartbeat datagrams on {addr}/udp ({e}): workers send heartbeats on gRPC calls; \
                         add ListenDatagram={addr} to the socket unit named `{}`",
                        ServiceKind::Worker.fd_name()
                    );
                    return Ok(None);
                }
            }
        }
        None => UdpSocket::bind(endpoint.bind)
            .map_err(|e| format!("{} (heartbeat datagrams, UDP)", bind_error(endpoint, &e)))?,
    };
    Ok(Some(socket))
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
