//! The command line on good and bad input: every failure exits non-zero with one clear
//! message and leaves no listener behind.

mod common;

use std::time::Duration;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn service_with(config: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let db = dir.path().join("queries.db");
    let out = run(&["service", "--config-path", path.to_str().unwrap()], &[(DATABASE_ENV, db.to_str().unwrap())]);
    (out, dir)
}

/// The one message of a failed start (after the `polars-node:` prefix).
fn failure(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected failure, got {:?}\n{}", out.status, stderr(out));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("polars-node:")).collect();
    assert_eq!(lines.len(), 1, "exactly one error message expected:\n{err}");
    err[err.find("polars-node:").unwrap()..].to_string()
}

#[test]
fn malformed_toml() {
    let (out, _d) = service_with("[scheduler\nenabled = true\n");
    let msg = failure(&out);
    assert!(msg.contains("node.toml:1: TOML syntax error"), "{msg}");
}

#[test]
fn wrong_type() {
    let (out, _d) = service_with("[scheduler]\nenabled = true\nclient_service.bind_addr = 5051\n");
    let msg = failure(&out);
    assert!(
        msg.contains(
            "node.toml:3: `scheduler.client_service.bind_addr`: invalid type: integer `5051`, expected an address"
        ),
        "{msg}"
    );
}

#[test]
fn unknown_key() {
    let (out, _d) = service_with("[scheduler]\nenabled = true\nallow_local_scan = false\n");
    let msg = failure(&out);
    assert!(
        msg.contains(
            "node.toml:3: unknown key `scheduler.allow_local_scan`; did you mean `scheduler.allow_local_scans`?"
        ),
        "{msg}"
    );
}

#[test]
fn missing_interface() {
    let (out, _d) = service_with(
        "[worker]\nenabled = true\ntask_service.bind_addr = { interface = \"nosuch9\", port = 4005 }\n\
         shuffle_service.bind_addr = \"127.0.0.1:4006\"\n[static_leader]\nscheduler_service.public_addr = \"127.0.0.1:5050\"\n",
    );
    let msg = failure(&out);
    assert!(
        msg.contains(
            "`worker.task_service.bind_addr`: network interface `nosuch9` does not exist on this host (interfaces: "
        ),
        "{msg}"
    );
}

#[test]
fn busy_port_leaves_no_listener_behind() {
    let client = free_port("127.0.0.1");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap().port();
    let (out, _d) = service_with(&format!(
        "[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{client}\"\nworker_service.bind_addr = \"127.0.0.1:{busy}\"\n"
    ));
    let msg = failure(&out);
    assert!(
        msg.contains(&format!(
            "cannot listen on 127.0.0.1:{busy} for the scheduler worker service (`scheduler.worker_service.bind_addr`): the port is in use by another process"
        )),
        "{msg}"
    );
    // The client service, bound first, was released.
    std::net::TcpListener::bind(("127.0.0.1", client)).expect("the other service's port is free again");
}

#[test]
fn every_problem_of_a_config_is_listed_at_once() {
    let (out, _d) = service_with("[worker]\nenabled = true\n");
    let msg = failure(&out);
    assert!(msg.contains("invalid configuration (3 problems):"), "{msg}");
    assert!(msg.contains("set `worker.task_service.public_addr`"));
    assert!(msg.contains("set `worker.shuffle_service.public_addr`"));
    assert!(msg.contains("set `static_leader.scheduler_service.public_addr`"));
}

#[test]
fn missing_config_file() {
    let out = run(&["service", "--config-path", "/nonexistent/node.toml"], &[]);
    let msg = failure(&out);
    assert!(msg.contains("cannot read configuration file /nonexistent/node.toml"), "{msg}");
}

#[test]
fn check_config_prints_resolved_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.toml");
    std::fs::write(
        &path,
        "instance_id = \"worker-0\"\n[worker]\nenabled = true\n\
         task_service.bind_addr = { interface = \"lo\", port = 4005 }\n\
         shuffle_service.bind_addr.port = 4006\nshuffle_service.public_addr = \"localhost:4006\"\n\
         [static_leader]\nscheduler_service.public_addr = \"127.0.0.1:5051\"\n[license.on_prem]\nclient_id = \"x\"\n",
    )
    .unwrap();
    let out = run(&["check-config", path.to_str().unwrap()], &[("PC_CUBLET__worker__heartbeat_period", "PT10S")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(stdout.contains("heartbeat_period = \"10s\""), "{stdout}");
    assert!(stdout.contains("[resolved.worker.task_service]"), "{stdout}");
    assert!(stdout.contains("bind_addr = \"127.0.0.1:4005\"\nadvertised_addr = \"127.0.0.1:4005\""), "{stdout}");
    assert!(stdout.contains("bind_addr = \"0.0.0.0:4006\"\nadvertised_addr = \"localhost:4006\""), "{stdout}");
    assert!(stdout.contains("registers_with = \"127.0.0.1:5051\""), "{stdout}");
    assert!(stderr(&out).contains("warning: `license` is accepted but not implemented yet"), "{}", stderr(&out));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[worker]\nenabled = true\n").unwrap();
    let out = run(&["check-config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid configuration (3 problems)"));
}

/// The documented starting point runs as printed: `default-config --role ...` passes
/// `check-config` for every role and for all of them, and a node started with `--role all`'s
/// output serves (its scheduler registers its own worker).
#[test]
fn default_config_with_roles_checks_clean_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    for roles in [&["all"][..], &["scheduler"], &["worker"], &["observatory"], &["scheduler", "observatory"]] {
        let args: Vec<&str> =
            std::iter::once("default-config").chain(roles.iter().flat_map(|r| ["--role", r])).collect();
        let out = run(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let path = dir.path().join(format!("{}.toml", roles.join("-")));
        std::fs::write(&path, &out.stdout).unwrap();
        let checked = run(&["check-config", path.to_str().unwrap()], &[]);
        assert!(checked.status.success(), "{roles:?}: {}", stderr(&checked));
    }
    // The whole node, moved off the default ports (other tests may hold them) and data paths.
    let text = std::fs::read_to_string(dir.path().join("all.toml")).unwrap();
    let mut text = text.replace("/tmp/polars", &dir.path().join("data").display().to_string());
    for port in [5049, 5050, 5051, 5052, 5053, 3001] {
        text = text.replace(&format!("127.0.0.1:{port}\""), &format!("127.0.0.1:{}\"", free_port("127.0.0.1")));
    }
    let node = Node::start("all", dir.path(), &text);
    node.wait_log("worker registered", Duration::from_secs(20));
}

#[test]
fn default_config_with_a_role_enabled_checks_clean() {
    let out = run(&["default-config"], &[]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let out = run(&["check-config", path.to_str().unwrap()], &[("PC_CUBLET__scheduler__enabled", "true")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bind_addr = \"0.0.0.0:5051\""));
}

#[test]
fn a_real_unimplemented_key_warns_and_the_node_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let node = Node::start(
        "scheduler",
        dir.path(),
        &format!(
            "cpu_reserved = 1\n[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{client}\"\n\
             worker_service.bind_addr = \"127.0.0.1:{worker}\"\n"
        ),
    );
    node.wait_log("node ready", Duration::from_secs(10));
    let log = node.log();
    assert_eq!(log.matches("`cpu_reserved` is accepted but not implemented yet").count(), 1, "{log}");
}

#[test]
fn json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (client, worker) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let mut cmd = std::process::Command::new(BIN);
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        format!("[scheduler]\nenabled = true\nclient_service.bind_addr = \"127.0.0.1:{client}\"\nworker_service.bind_addr = \"127.0.0.1:{worker}\"\n"),
    )
    .unwrap();
    cmd.args(["--log-format", "json", "service", "--config-path"]).arg(&path);
    let node = Node::spawn("json", dir.path(), cmd, dir.path().join("json.log"), &[("PLC_LOG_LEVEL", "debug")]);
    node.wait_log("node ready", Duration::from_secs(10));
    for line in node.log().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
}

#[test]
fn the_scheduler_load_benchmark_keeps_its_simulated_workers_alive() {
    let out = run(&["bench-scheduler", "--workers", "300", "--seconds", "2"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["alive_at_end"], 300, "{report}");
    assert!(report["heartbeats_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["scheduler_cpu_of_one_core"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["scheduler_rss_mib"].as_f64().unwrap() > 1.0, "{report}");
}
