//! `memory_limit`: enforced in a child cgroup when a delegated cgroup is available, refused
//! with instructions when not.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

fn scheduler_config(limit: u64) -> String {
    format!(
        "memory_limit = {limit}\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{}\"\nworker_service.bind_addr = \"127.0.0.1:{}\"\n",
        free_port("127.0.0.1"),
        free_port("127.0.0.1")
    )
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The node's cgroup directory holding the memory limit, from /proc/PID/cgroup.
fn memory_cgroup_of(pid: i32) -> Option<(std::path::PathBuf, String)> {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = |fstype: &str, opt: Option<&str>| {
        mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fs, _, opts) = (r.next()?, r.next()?, r.next()?);
            (fs == fstype && opt.is_none_or(|o| opts.split(',').any(|x| x == o)))
                .then(|| left.split_whitespace().nth(4).unwrap().to_string())
        })
    };
    for line in membership.lines() {
        let parts: Vec<&str> = line.splitn(3, ':').collect();
        if !parts[2].contains(&format!("polars-node-{pid}")) {
            continue;
        }
        if parts[1].split(',').any(|c| c == "memory") {
            let dir = std::path::Path::new(&mount("cgroup", Some("memory"))?).join(parts[2].trim_start_matches('/'));
            return Some((dir, "memory.limit_in_bytes".into()));
        }
        if parts[1].is_empty() {
            let dir = std::path::Path::new(&mount("cgroup2", None)?).join(parts[2].trim_start_matches('/'));
            return Some((dir, "memory.max".into()));
        }
    }
    None
}

#[test]
fn memory_limit_is_enforced_in_a_child_cgroup() {
    if !is_root() {
        eprintln!("skipped: needs root to own a cgroup here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let limit: u64 = 512 * 1024 * 1024;
    let mut node = Node::start("scheduler", dir.path(), &scheduler_config(limit));
    node.wait_log("node ready", Duration::from_secs(10));
    assert!(node.log().contains("memory limit enforced"), "{}", node.log());
    let (cgroup, file) = memory_cgroup_of(node.pid()).expect("the node runs in its own memory cgroup");
    let written: u64 = std::fs::read_to_string(cgroup.join(&file)).unwrap().trim().parse().unwrap();
    assert_eq!(written, limit);
    // Every thread of the node is inside.
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|p| p == node.pid().to_string()), "{procs}");

    assert!(node.terminate().success());
    assert!(!cgroup.exists(), "the node removes its cgroup when it stops");
}

#[test]
fn without_a_delegated_cgroup_the_node_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("polars-node");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, scheduler_config(1 << 30)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // An unprivileged user owns no cgroup on this host.
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let out = cmd.args(["service", "--config-path"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("polars-node: memory_limit = {} needs a delegated cgroup to enforce it", 1u64 << 30)),
        "{err}"
    );
    assert!(err.contains("Delegate=yes") && err.contains("or remove `memory_limit` from the configuration"), "{err}");
}
