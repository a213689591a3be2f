//! The seed layout on separate hosts: each host is a network namespace with its own address
//! on a private bridge that this test creates (and removes). One worker is configured by
//! interface name; one sits on a private subnet reachable only through a NAT'd public address.
//!
//! ```text
//!            router namespace: bridge br0 10.231.1.254, DNAT 10.231.1.10 -> 10.231.2.1
//!   sched 10.231.1.2     w1 10.231.1.1     w2 10.231.1.3      w3 10.231.2.1 (behind NAT)
//!   scheduler+observatory  seed worker      bind by interface  public_addr 10.231.1.10
//! ```

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Network namespaces of one test run, removed on drop.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

impl Hosts {
    fn new() -> Hosts {
        Hosts { prefix: format!("pn{}", std::process::id()), names: Vec::new() }
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn add(&mut self, host: &str) -> String {
        let ns = self.ns(host);
        sh(&["ip", "netns", "add", &ns]);
        self.names.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, host: &str, args: &[&str]) {
        let ns = self.ns(host);
        let mut full = vec!["ip", "netns", "exec", &ns];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Connects `host` to the router with a veth pair: `eth1` on the host with `addr`, and
    /// `peer` on the router (bridged when `bridge`).
    fn wire(&self, host: &str, peer: &str, addr: &str, gateway: Option<&str>, bridge: bool) {
        let (ns, router) = (self.ns(host), self.ns("router"));
        sh(&["ip", "link", "add", peer, "netns", &router, "type", "veth", "peer", "name", "eth1", "netns", &ns]);
        sh(&["ip", "-n", &ns, "addr", "add", addr, "dev", "eth1"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth1", "up"]);
        if bridge {
            sh(&["ip", "-n", &router, "link", "set", peer, "master", "br0"]);
        }
        sh(&["ip", "-n", &router, "link", "set", peer, "up"]);
        if let Some(gw) = gateway {
            sh(&["ip", "-n", &ns, "route", "add", "default", "via", gw]);
        }
    }

    /// A node process inside `host`.
    fn node(&self, host: &str, dir: &std::path::Path, config: &str) -> Node {
        let path = dir.join(format!("{host}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host), BIN, "service", "--config-path"]).arg(&path);
        Node::spawn(host, dir, cmd, dir.join(format!("{host}.log")), &[])
    }

    fn run(&self, host: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip").args(["netns", "exec", &self.ns(host), BIN]).args(args).output().unwrap()
    }

    fn can_connect(&self, host: &str, addr: &str) -> bool {
        // bash's /dev/tcp: a plain TCP connect from inside the namespace.
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "timeout", "2", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.split(':').next().unwrap(), addr.split(':').nth(1).unwrap()))
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn seed_worker(name: &str, task_bind: &str, shuffle_bind: &str, public: Option<&str>, leader: &str) -> String {
    let public = public
        .map(|ip| format!("task_service.public_addr = \"{ip}:4005\"\nshuffle_service.public_addr = \"{ip}:4006\"\n"))
        .unwrap_or_default();
    format!(
        "instance_id = \"{name}\"\n[worker]\nenabled = true\nheartbeat_period = \"300ms\"\n\
         task_service.bind_addr = {task_bind}\nshuffle_service.bind_addr = {shuffle_bind}\n{public}\
         [static_leader]\nleader_instance_id = \"scheduler\"\nscheduler_service.public_addr = \"{leader}\"\n\
         observatory_service.public_addr = \"10.231.1.2:5049\"\n"
    )
}

#[test]
fn seed_layout_across_hosts_with_interface_names_and_nat() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut hosts = Hosts::new();
    let router = hosts.add("router");
    for h in ["sched", "w1", "w2", "w3"] {
        hosts.add(h);
    }
    sh(&["ip", "-n", &router, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &router, "addr", "add", "10.231.1.254/24", "dev", "br0"]);
    // The NAT'd worker's public address lives on the router.
    sh(&["ip", "-n", &router, "addr", "add", "10.231.1.10/32", "dev", "br0"]);
    sh(&["ip", "-n", &router, "link", "set", "br0", "up"]);
    hosts.wire("sched", "v-sched", "10.231.1.2/24", None, true);
    hosts.wire("w1", "v-w1", "10.231.1.1/24", None, true);
    hosts.wire("w2", "v-w2", "10.231.1.3/24", None, true);
    hosts.wire("w3", "v-w3", "10.231.2.1/24", Some("10.231.2.254"), false);
    sh(&["ip", "-n", &router, "addr", "add", "10.231.2.254/24", "dev", "v-w3"]);
    hosts.exec("router", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for port in ["4005", "4006"] {
        hosts.exec(
            "router",
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                "10.231.1.10",
                "-p",
                "tcp",
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
                &format!("10.231.2.1:{port}"),
            ],
        );
    }
    // The NAT'd worker's own address never appears on the LAN.
    hosts.exec(
        "router",
        &["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.231.2.0/24", "-o", "br0", "-j", "MASQUERADE"],
    );

    // A firewall on the scheduler's host drops worker-2's UDP: its heartbeats take the gRPC
    // call instead, and it stays alive.
    hosts.exec("sched", &["iptables", "-A", "INPUT", "-p", "udp", "-s", "10.231.1.3", "-j", "DROP"]);

    // Scheduler + observatory with the defaults: every interface, standard ports.
    let _sched = hosts.node(
        "sched",
        dir.path(),
        "instance_id = \"scheduler\"\n[scheduler]\nenabled = true\n[observatory]\nenabled = true\n\
         [static_leader]\nleader_instance_id = \"scheduler\"\n",
    );
    // The seed's worker: ports 4005/4006 on every interface, published at its address, and
    // registering through the scheduler's client port as the seed's example does.
    let mut w1 = hosts.node(
        "w1",
        dir.path(),
        &seed_worker("worker-1", "{ port = 4005 }", "{ port = 4006 }", Some("10.231.1.1"), "10.231.1.2:5051"),
    );
    // Bound by interface name, registering through the worker service port.
    let _w2 = hosts.node(
        "w2",
        dir.path(),
        &seed_worker(
            "worker-2",
            "{ interface = \"eth1\", port = 4005 }",
            "{ interface = \"eth1\", port = 4006 }",
            None,
            "10.231.1.2:5050",
        ),
    );
    // Behind NAT: reachable only at the router's public address.
    let _w3 = hosts.node(
        "w3",
        dir.path(),
        &seed_worker("worker-3", "\":4005\"", "\":4006\"", Some("10.231.1.10"), "10.231.1.2:5050"),
    );

    let workers = || -> Vec<(String, String, String, String)> {
        let out = hosts.run("w1", &["workers", "--json", "--scheduler", "10.231.1.2:5050"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut rows: Vec<_> = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["instance_id"].as_str().unwrap().to_string(),
                    w["state"].as_str().unwrap().to_string(),
                    w["task_addr"].as_str().unwrap().to_string(),
                    w["heartbeats"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let beating = |a: &str, b: &str, c: &str, d: &str| (a.to_string(), b.to_string(), c.to_string(), d.to_string());
    // Datagrams through NAT too (worker-3), and from a worker that registered at the client port.
    let expected = vec![
        beating("worker-1", "alive", "10.231.1.1:4005", "datagram"),
        beating("worker-2", "alive", "10.231.1.3:4005", "call"),
        beating("worker-3", "alive", "10.231.1.10:4005", "datagram"),
    ];
    wait_until("three workers registered across hosts", T, || (workers() == expected).then_some(()));
    // Several heartbeat periods later, all three are still alive, heartbeating as before.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(workers(), expected);
    let row = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());

    // The NAT'd worker is reachable only through its public address.
    assert!(hosts.can_connect("sched", "10.231.1.10:4005"));
    assert!(!hosts.can_connect("sched", "10.231.2.1:4005"), "the private address must not be reachable");
    // The observatory's services answer from another host.
    assert!(hosts.can_connect("w2", "10.231.1.2:5049"));
    let health = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns("w2"),
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.231.1.2/3001; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&health.stdout).starts_with("HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );

    // A worker host that dies is marked lost across the network.
    w1.kill();
    let lost = vec![
        row("worker-1", "lost", "10.231.1.1:4005"),
        row("worker-2", "alive", "10.231.1.3:4005"),
        row("worker-3", "alive", "10.231.1.10:4005"),
    ];
    let out = || hosts.run("w2", &["workers", "--json", "--scheduler", "10.231.1.2:5051"]);
    wait_until("worker-1 marked lost", T, || {
        let o = out();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let mut rows: Vec<_> = v["workers"]
            .as_array()?
            .iter()
            .map(|w| {
                row(w["instance_id"].as_str().unwrap(), w["state"].as_str().unwrap(), w["task_addr"].as_str().unwrap())
            })
            .collect();
        rows.sort();
        (rows == lost).then_some(())
    });
}

/// An interface that exists but has no address of the asked family is a clear error, and one
/// with it resolves; checked in a namespace holding an interface with only IPv6.
#[test]
fn an_interface_without_an_address_of_the_family() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let mut hosts = Hosts { prefix: format!("pn{}f", std::process::id()), names: Vec::new() };
    let ns = hosts.add("host");
    sh(&["ip", "-n", &ns, "link", "add", "data0", "type", "veth", "peer", "name", "data1"]);
    sh(&["ip", "-n", &ns, "addr", "add", "fc00:231::7/64", "dev", "data0", "nodad"]);
    sh(&["ip", "-n", &ns, "link", "set", "data0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let check = |family: &str| {
        let path = dir.path().join(format!("{family}.toml"));
        std::fs::write(
            &path,
            format!("[scheduler]\nenabled = true\nclient_service.bind_addr = {{ interface = \"data0\", port = 5051, family = \"{family}\" }}\n"),
        )
        .unwrap();
        hosts.run("host", &["check-config", path.to_str().unwrap()])
    };
    let v4 = check("ipv4");
    assert_eq!(v4.status.code(), Some(1));
    let err = String::from_utf8_lossy(&v4.stderr);
    assert!(
        err.contains("`scheduler.client_service.bind_addr`: network interface `data0` has no IPv4 address; give it one or set family = \"ipv6\""),
        "{err}"
    );
    let v6 = check("ipv6");
    assert!(v6.status.success(), "{}", String::from_utf8_lossy(&v6.stderr));
    assert!(String::from_utf8_lossy(&v6.stdout).contains("bind_addr = \"[fc00:231::7]:5051\""));
}
