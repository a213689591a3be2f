//! systemd integration through its real tools: `systemd-socket-activate` passes named
//! listening sockets, and a NOTIFY_SOCKET listener here receives what the node reports.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

/// Starts the node under systemd-socket-activate with one socket per (name, port), and
/// connects once so that it launches the node (it waits for the first connection).
fn activate(dir: &Path, name: &str, sockets: &[(&str, u16)], config: &str, env: &[(&str, &str)]) -> Node {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    for (_, port) in sockets {
        cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
    }
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).filter(|n| !n.is_empty()).collect();
    if !names.is_empty() {
        cmd.arg(format!("--fdname={}", names.join(":")));
    }
    cmd.arg("-E").arg(format!("{DATABASE_ENV}={}", dir.join(format!("{name}-queries.db")).display()));
    for (k, v) in env {
        cmd.arg("-E").arg(format!("{k}={v}"));
    }
    cmd.args([BIN, "service", "--config-path"]).arg(&path);
    let node = Node::spawn(name, dir, cmd, dir.join(format!("{name}.log")), &[]);
    let first = sockets[0].1;
    wait_until("the activation sockets", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", first)).ok()
    });
    node
}

struct Notifications {
    socket: UnixDatagram,
    pub received: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Notifications { socket, received: Vec::new() }
    }

    /// Reads messages until one contains `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < timeout {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = msg.lines().any(|l| l == needle || l.starts_with(needle));
                self.received.push(msg);
                if found {
                    return;
                }
            }
        }
        panic!("no `{needle}` within {timeout:?}; received: {:?}", self.received);
    }

    fn position(&self, needle: &str) -> Option<usize> {
        self.received.iter().position(|m| m.lines().any(|l| l.starts_with(needle)))
    }
}

#[test]
fn named_socket_activation_and_readiness_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    let ports: Vec<u16> = (0..4).map(|_| free_port("127.0.0.1")).collect();
    // The configured binds are ports held by this test: the node can only serve through
    // the activated sockets.
    let held: Vec<std::net::TcpListener> =
        (0..4).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let h = |i: usize| held[i].local_addr().unwrap().port();
    let config = format!(
        "instance_id = \"node\"\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{}\"\nworker_service.bind_addr = \"127.0.0.1:{}\"\n\
         [worker]\nenabled = true\nheartbeat_period = \"200ms\"\ntask_service.bind_addr = \"127.0.0.1:{}\"\nshuffle_service.bind_addr = \"127.0.0.1:{}\"\n\
         task_service.public_addr = \"127.0.0.1:{}\"\nshuffle_service.public_addr = \"127.0.0.1:{}\"\n\
         [static_leader]\nscheduler_service.public_addr = \"127.0.0.1:{}\"\n",
        h(0),
        h(1),
        h(2),
        h(3),
        ports[2],
        ports[3],
        ports[1]
    );
    let sockets = [("client", ports[0]), ("worker", ports[1]), ("task", ports[2]), ("shuffle", ports[3])];
    let mut node = activate(
        dir.path(),
        "node",
        &sockets,
        &config,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")],
    );

    notifications.wait_for("READY=1", Duration::from_secs(20));
    // The worker registered over the activated worker socket before READY.
    assert_eq!(worker_states(&format!("127.0.0.1:{}", ports[1])), pairs(&[("node", "alive")]));
    // ListWorkers also answers on the activated client socket.
    assert_eq!(worker_states(&format!("127.0.0.1:{}", ports[0])), pairs(&[("node", "alive")]));
    notifications.wait_for("WATCHDOG=1", Duration::from_secs(5));
    notifications.wait_for("WATCHDOG=1", Duration::from_secs(5));

    node.terminate_async();
    notifications.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = node.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", node.log());

    let status_at = notifications.position("STATUS=").unwrap();
    let ready_at = notifications.position("READY=1").unwrap();
    let stopping_at = notifications.position("STOPPING=1").unwrap();
    // A status may come with READY itself (the worker registered before the first report).
    assert!(status_at <= ready_at && ready_at < stopping_at, "order: {:?}", notifications.received);
    let ready_msg = &notifications.received[ready_at];
    assert!(ready_msg.contains("STATUS=ready: scheduler, worker; 1 live workers"), "{ready_msg}");
    assert_eq!(notifications.received.iter().filter(|m| m.contains("READY=1")).count(), 1);
    // Nothing listened on the configured addresses.
    drop(held);
}

trait TerminateAsync {
    fn terminate_async(&mut self);
}

impl TerminateAsync for Node {
    fn terminate_async(&mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM).unwrap();
    }
}

fn activation_failure(sockets: &[(&str, u16)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{}\"\nworker_service.bind_addr = \"127.0.0.1:{}\"\n",
        free_port("127.0.0.1"),
        free_port("127.0.0.1")
    );
    let mut node = activate(dir.path(), "node", sockets, &config, &[]);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    node.log()
}

#[test]
fn an_unknown_descriptor_name_is_an_error() {
    let log = activation_failure(&[("bogus", free_port("127.0.0.1"))]);
    assert!(
        log.contains(
            "is named `bogus`, which is not a polars-node service (names: client, worker, task, shuffle, otlp, rest)"
        ),
        "{log}"
    );
}

#[test]
fn an_unnamed_descriptor_is_an_error() {
    let log = activation_failure(&[("", free_port("127.0.0.1"))]);
    assert!(log.contains("has no name: set FileDescriptorName= in its socket unit"), "{log}");
}

#[test]
fn a_descriptor_for_a_service_the_node_does_not_run_is_an_error() {
    let log = activation_failure(&[("client", free_port("127.0.0.1")), ("task", free_port("127.0.0.1"))]);
    assert!(
        log.contains("a socket-activated descriptor is named `task`, but this node runs no worker task service"),
        "{log}"
    );
}

/// Starts the node with `fds` passed as systemd passes them (descriptors 3.. named by
/// LISTEN_FDNAMES, LISTEN_PID set by the shell that becomes the node): unlike
/// systemd-socket-activate, this can pass stream and datagram sockets together.
fn pass_descriptors(dir: &Path, name: &str, config: &str, fds: Vec<(std::os::fd::OwnedFd, &str)>) -> Node {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$@\"", "sh", BIN, "service", "--config-path"]).arg(&path);
    cmd.env("LISTEN_FDS", fds.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
    let mut raw = [-1i32; 8];
    for (slot, (fd, _)) in raw.iter_mut().zip(&fds) {
        *slot = fd.as_raw_fd();
    }
    let n = fds.len();
    // SAFETY: only fcntl and dup2 (no allocation) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first, so that moving one into place cannot close another.
            let mut high = [-1i32; 8];
            for (h, &fd) in high.iter_mut().zip(&raw).take(n) {
                *h = nix::libc::fcntl(fd, nix::libc::F_DUPFD, 100);
            }
            for (i, &fd) in high.iter().enumerate().take(n) {
                if fd < 0 || nix::libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let node = Node::spawn(name, dir, cmd, dir.join(format!("{name}.log")), &[]);
    drop(fds);
    node
}

/// A scheduler and a worker in one node, its worker service at `worker_port` (the configured
/// binds are ports held by the caller, so only passed sockets can serve).
fn one_node_config(worker_port: u16, held: &[std::net::TcpListener]) -> String {
    let h = |i: usize| held[i].local_addr().unwrap().port();
    let (task, shuffle) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    format!(
        "instance_id = \"node\"\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{}\"\nworker_service.bind_addr = \"127.0.0.1:{}\"\n\
         [worker]\nenabled = true\nheartbeat_period = \"200ms\"\ntask_service.bind_addr = \"127.0.0.1:{task}\"\nshuffle_service.bind_addr = \"127.0.0.1:{shuffle}\"\n\
         [static_leader]\nscheduler_service.public_addr = \"127.0.0.1:{worker_port}\"\n",
        h(0),
        h(1),
    )
}

fn held_ports() -> Vec<std::net::TcpListener> {
    (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect()
}

fn heartbeats_of(scheduler: &str) -> Option<String> {
    workers(scheduler)?.first().map(|w| w["heartbeats"].as_str().unwrap().to_string())
}

#[test]
fn a_datagram_socket_named_worker_takes_the_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), free_port("127.0.0.1"));
    let stream = std::net::TcpListener::bind(("127.0.0.1", worker)).unwrap();
    let datagrams = std::net::UdpSocket::bind(("127.0.0.1", worker)).unwrap();
    let held = held_ports();
    let fds = vec![(client.into(), "client"), (stream.into(), "worker"), (datagrams.into(), "worker")];
    let node = pass_descriptors(dir.path(), "node", &one_node_config(worker, &held), fds);
    let scheduler = format!("127.0.0.1:{worker}");
    let beats = wait_until("heartbeat datagrams", T, || heartbeats_of(&scheduler).filter(|h| h == "datagram"));
    assert_eq!(beats, "datagram", "{}", node.log());
}

#[test]
fn heartbeats_take_grpc_calls_when_the_udp_port_cannot_be_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), free_port("127.0.0.1"));
    let stream = std::net::TcpListener::bind(("127.0.0.1", worker)).unwrap();
    // Another process has the UDP port; only the stream socket is passed.
    let _taken = std::net::UdpSocket::bind(("127.0.0.1", worker)).unwrap();
    let held = held_ports();
    let fds = vec![(client.into(), "client"), (stream.into(), "worker")];
    let node = pass_descriptors(dir.path(), "node", &one_node_config(worker, &held), fds);
    node.wait_log("add ListenDatagram=", T);
    let scheduler = format!("127.0.0.1:{worker}");
    wait_until("a live worker", T, || (worker_states(&scheduler) == pairs(&[("node", "alive")])).then_some(()));
    std::thread::sleep(Duration::from_secs(1)); // five heartbeat periods
    assert_eq!(worker_states(&scheduler), pairs(&[("node", "alive")]), "{}", node.log());
    assert_eq!(heartbeats_of(&scheduler).as_deref(), Some("call"));
}

#[test]
fn a_datagram_socket_of_another_service_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let client = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let datagrams = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let held = held_ports();
    let fds = vec![(client.into(), "client"), (datagrams.into(), "client")];
    let mut node = pass_descriptors(dir.path(), "node", &one_node_config(free_port("127.0.0.1"), &held), fds);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    assert!(node.log().contains("is a datagram socket: only `worker` takes one"), "{}", node.log());
}
