//! systemd integration through its real tools: `systemd-socket-activate` passes named
//! listening sockets, and a NOTIFY_SOCKET listener here receives what the node reports.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

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
