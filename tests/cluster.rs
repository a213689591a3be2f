//! A scheduler and two workers as separate processes on distinct loopback addresses.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn scheduler_config(client: u16, worker: u16) -> String {
    format!(
        "instance_id = \"scheduler\"\n[scheduler]\nenabled = true\nlost_after_missed_heartbeats = 3\n\
         client_service.bind_addr = \"127.0.0.1:{client}\"\nworker_service.bind_addr = \"127.0.0.1:{worker}\"\n"
    )
}

/// A worker bound to `ip`, pointed at the scheduler port `leader`.
fn worker_config(name: &str, ip: &str, leader: u16) -> String {
    let (task, shuffle) = (free_port(ip), free_port(ip));
    format!(
        "instance_id = \"{name}\"\n[worker]\nenabled = true\nheartbeat_period = \"200ms\"\n\
         task_service.bind_addr = \"{ip}:{task}\"\nshuffle_service.bind_addr = \"{ip}:{shuffle}\"\n\
         [static_leader]\nleader_instance_id = \"scheduler\"\nscheduler_service.public_addr = \"127.0.0.1:{leader}\"\n"
    )
}

#[test]
fn workers_register_are_marked_lost_and_come_back_after_a_scheduler_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let sched_addr = format!("127.0.0.1:{worker_port}");
    let mut scheduler = Node::start("scheduler", dir.path(), &scheduler_config(client, worker_port));

    // One worker names the worker service port, the other the client port: both register.
    let w1_config = worker_config("worker-1", "127.0.0.2", worker_port);
    let w2_config = worker_config("worker-2", "127.0.0.3", client);
    let _w1 = Node::start("worker-1", dir.path(), &w1_config);
    let mut w2 = Node::start("worker-2", dir.path(), &w2_config);

    let both_alive = pairs(&[("worker-1", "alive"), ("worker-2", "alive")]);
    wait_until("both workers to register", T, || (worker_states(&sched_addr) == both_alive).then_some(()));
    let listed = workers(&sched_addr).unwrap();
    let w1 = listed.iter().find(|w| w["instance_id"] == "worker-1").unwrap();
    assert!(w1["task_addr"].as_str().unwrap().starts_with("127.0.0.2:"), "{w1}");
    assert!(w1["shuffle_addr"].as_str().unwrap().starts_with("127.0.0.2:"), "{w1}");
    assert!(w1["cpus"].as_u64().unwrap() >= 1);
    assert!(w1["memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(w1["version"], env!("CARGO_PKG_VERSION"));
    // Heartbeats come as datagrams, whichever port the worker registered at.
    wait_until("heartbeat datagrams from both workers", T, || {
        workers(&sched_addr)?.iter().all(|w| w["heartbeats"] == "datagram").then_some(())
    });

    // A killed worker is marked lost after missed heartbeats...
    w2.kill();
    let lost = pairs(&[("worker-1", "alive"), ("worker-2", "lost")]);
    wait_until("worker-2 to be marked lost", T, || (worker_states(&sched_addr) == lost).then_some(()));
    // ... and accepted back when it returns.
    let _w2 = Node::start("worker-2b", dir.path(), &w2_config);
    wait_until("worker-2 to come back", T, || (worker_states(&sched_addr) == both_alive).then_some(()));

    // A restarted scheduler knows nobody; the workers register again by themselves.
    scheduler.kill();
    let _scheduler = Node::start("scheduler-2", dir.path(), &scheduler_config(client, worker_port));
    wait_until("both workers after the scheduler restart", T, || {
        (worker_states(&sched_addr) == both_alive).then_some(())
    });
}

#[test]
fn a_stopping_worker_leaves_the_live_set_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let sched_addr = format!("127.0.0.1:{worker_port}");
    let _scheduler = Node::start("scheduler", dir.path(), &scheduler_config(client, worker_port));
    let mut w = Node::start("worker-1", dir.path(), &worker_config("worker-1", "127.0.0.2", worker_port));
    wait_until("registration", T, || (worker_states(&sched_addr) == pairs(&[("worker-1", "alive")])).then_some(()));
    let status = w.terminate();
    assert!(status.success(), "graceful stop exits 0: {status:?}\n{}", w.log());
    assert!(worker_states(&sched_addr).is_empty(), "deregistered on SIGTERM");
    assert!(w.log().contains("node stopping"));
}

#[test]
fn a_scheduler_waiting_for_n_workers_is_ready_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker_port, rest) = (free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.1"));
    // The observatory's REST port beside the scheduler exposes the node's readiness.
    let config = format!(
        "{}n_workers = 1\n[observatory]\nenabled = true\nservice.bind_addr = \"127.0.0.1:{}\"\nrest_api.service.bind_addr = \"127.0.0.1:{rest}\"\n",
        scheduler_config(client, worker_port),
        free_port("127.0.0.1")
    );
    let scheduler = Node::start("scheduler", dir.path(), &config);
    scheduler.wait_log("waiting for 1 workers to register (0 registered)", T);
    assert_eq!(http_status(&format!("127.0.0.1:{rest}"), "/readyz"), 503);
    assert_eq!(http_status(&format!("127.0.0.1:{rest}"), "/healthz"), 200);
    let _w = Node::start("worker-1", dir.path(), &worker_config("worker-1", "127.0.0.2", worker_port));
    wait_until("readiness", T, || (http_status(&format!("127.0.0.1:{rest}"), "/readyz") == 200).then_some(()));
    scheduler.wait_log("ready: scheduler, observatory; 1 live workers", T);
}

/// A worker whose advertised task address the scheduler cannot reach is refused with a
/// message that says which setting to fix, and is not counted as live.
#[test]
fn an_unreachable_advertised_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let sched_addr = format!("127.0.0.1:{worker_port}");
    let _scheduler = Node::start("scheduler", dir.path(), &scheduler_config(client, worker_port));
    let dead = free_port("127.0.0.1");
    let config = format!(
        "instance_id = \"worker-1\"\n[worker]\nenabled = true\nheartbeat_period = \"200ms\"\n\
         task_service.bind_addr = \"127.0.0.2:{}\"\ntask_service.public_addr = \"127.0.0.1:{dead}\"\n\
         shuffle_service.bind_addr = \"127.0.0.2:{}\"\n\
         [static_leader]\nscheduler_service.public_addr = \"127.0.0.1:{worker_port}\"\n",
        free_port("127.0.0.2"),
        free_port("127.0.0.2")
    );
    let w = Node::start("worker-1", dir.path(), &config);
    w.wait_log("set `worker.task_service.public_addr` to an address the scheduler can connect to", T);
    assert!(worker_states(&sched_addr).is_empty());
}

fn http_status(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return 0 };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}
