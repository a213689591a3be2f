//! Process-test harness: runs the real `polars-node` binary with a configuration file and
//! observes it through its sockets, its exit status and its `workers` command.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_polars-node");

/// A port that is free on `ip` right now.
/// A port free on `ip` now, never one this test binary handed out before (the kernel may give
/// the same ephemeral port twice in a row once the probing socket is closed).
pub fn free_port(ip: &str) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind((ip, 0)).expect("bind probe").local_addr().unwrap().port();
        let mut seen = HANDED_OUT.lock().unwrap();
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn listening(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A running node; killed when dropped.
pub struct Node {
    pub name: String,
    pub child: Child,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Node {
    pub fn start(name: &str, dir: &Path, config: &str) -> Node {
        Self::start_with(name, dir, config, &[])
    }

    pub fn start_with(name: &str, dir: &Path, config: &str, env: &[(&str, &str)]) -> Node {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(BIN);
        cmd.args(["service", "--config-path"]).arg(&path);
        Self::spawn(name, dir, cmd, log, env)
    }

    pub fn spawn(name: &str, dir: &Path, mut cmd: Command, log: PathBuf, env: &[(&str, &str)]) -> Node {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file).stdin(Stdio::null());
        cmd.env("PLC_LOG_LEVEL", "info").env_remove("NOTIFY_SOCKET");
        // Each scheduler its own query table (one scheduler per file), in the test's directory.
        cmd.env(DATABASE_ENV, dir.join(format!("{name}-queries.db")));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn polars-node");
        Node { name: name.into(), child, dir: dir.into(), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_until(&format!("`{needle}` in the log of {}", self.name), timeout, || {
            self.log().contains(needle).then_some(())
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM).unwrap();
        wait_until("the node to exit after SIGTERM", Duration::from_secs(20), || self.child.try_wait().unwrap())
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_until(&format!("{} to exit", self.name), timeout, || self.child.try_wait().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
    }
}

/// Overrides `scheduler.database_path` (the default is shared by every scheduler of a host).
pub const DATABASE_ENV: &str = "PC_CUBLET__scheduler__database_path";

/// Runs the binary to completion.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("NOTIFY_SOCKET").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run polars-node")
}

/// The scheduler's workers, as `polars-node workers --json` prints them.
pub fn workers(scheduler: &str) -> Option<Vec<serde_json::Value>> {
    let out = run(&["workers", "--json", "--scheduler", scheduler], &[]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["workers"].as_array().cloned()
}

/// The state ("alive"/"lost") of each worker the scheduler knows, sorted by instance id.
pub fn worker_states(scheduler: &str) -> Vec<(String, String)> {
    let mut states: Vec<(String, String)> = workers(scheduler)
        .unwrap_or_default()
        .iter()
        .map(|w| (w["instance_id"].as_str().unwrap().to_string(), w["state"].as_str().unwrap().to_string()))
        .collect();
    states.sort();
    states
}

pub fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}
