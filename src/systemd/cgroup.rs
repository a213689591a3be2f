//! `memory_limit`: the node (and so the queries it executes, which run in its threads) is
//! moved into a child cgroup of its own cgroup with the memory limit set. That needs a
//! delegated cgroup: one this process may create children in (systemd `Delegate=yes`, a
//! container with a private writable cgroup namespace, or root on a v1 memory hierarchy).

use std::fs;
use std::path::{Path, PathBuf};

/// The cgroup this node moved into; on drop the node moves back and removes it.
#[derive(Debug)]
pub struct MemoryCgroup {
    pub dir: PathBuf,
    parent_procs: PathBuf,
    pub version: u8,
}

impl MemoryCgroup {
    /// Must run while the process is single-threaded: moving a process moves the threads it
    /// has at that moment (v1) and v2 wants the whole process anyway.
    pub fn enter(limit: u64) -> Result<MemoryCgroup, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut tried = Vec::new();
        let name = format!("polars-node-{}", std::process::id());

        // cgroup v2: the unified hierarchy with the memory controller available to us.
        if let (Some(mount), Some(own)) = (mount_of(&mountinfo, "cgroup2", None), own_path(&membership, "")) {
            let dir = mount.join(own.trim_start_matches('/'));
            match enter_v2(&dir, &name, limit) {
                Ok(cg) => return Ok(cg),
                Err(e) => tried.push(format!("cgroup v2 at {}: {e}", dir.display())),
            }
        }
        // cgroup v1: the memory controller's hierarchy.
        if let (Some(mount), Some(own)) =
            (mount_of(&mountinfo, "cgroup", Some("memory")), own_path(&membership, "memory"))
        {
            let dir = mount.join(own.trim_start_matches('/'));
            match enter_v1(&dir, &name, limit) {
                Ok(cg) => return Ok(cg),
                Err(e) => tried.push(format!("cgroup v1 memory at {}: {e}", dir.display())),
            }
        }
        if tried.is_empty() {
            tried.push("no cgroup hierarchy is mounted".into());
        }
        Err(format!(
            "memory_limit = {limit} needs a delegated cgroup to enforce it, and none is usable here ({}). \
             Run the node under systemd with Delegate=yes (the NixOS module does), with `systemd-run -p Delegate=yes -p MemoryMax=...`, \
             or in a container with a writable cgroup (docker run --cgroupns=private); or remove `memory_limit` from the configuration",
            tried.join("; ")
        ))
    }
}

impl MemoryCgroup {
    /// What the node's tasks need to know of the limit: it, and the kernel's count of OOM
    /// kills in the cgroup.
    pub fn watch(&self, limit: u64) -> MemoryWatch {
        let events = match self.version {
            2 => self.dir.join("memory.events"),
            _ => self.dir.join("memory.oom_control"),
        };
        MemoryWatch { limit, events }
    }
}

/// The enforced `memory_limit`, as the task service sees it: an execution process that dies
/// while the OOM-kill count grows was killed for exceeding it.
#[derive(Debug, Clone)]
pub struct MemoryWatch {
    pub limit: u64,
    /// `memory.events` (v2) or `memory.oom_control` (v1): both have an `oom_kill N` line.
    events: PathBuf,
}

impl MemoryWatch {
    /// OOM kills in the node's cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(&self.events).unwrap_or_default();
        oom_kill_count(&text)
    }
}

fn oom_kill_count(events: &str) -> u64 {
    events.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())).unwrap_or(0)
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A cgroup with a process in it cannot be removed: leave it first.
        let _ = fs::write(&self.parent_procs, std::process::id().to_string());
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Mount point of a cgroup hierarchy (`fstype` cgroup2, or cgroup with `option` among its
/// super options).
fn mount_of(mountinfo: &str, fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let (fs, _source, opts) = (right.next()?, right.next()?, right.next().unwrap_or(""));
        if fs != fstype || option.is_some_and(|o| !opts.split(',').any(|x| x == o)) {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// This process's cgroup path in a hierarchy ("" = the unified one).
fn own_path(membership: &str, controller: &str) -> Option<String> {
    membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_string())
    })
}

fn enter_v2(dir: &Path, name: &str, limit: u64) -> Result<MemoryCgroup, String> {
    let controllers = fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| e.to_string())?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err("the memory controller is not delegated to this cgroup".into());
    }
    // No process may stay in a cgroup that hands controllers to children, so the node moves
    // into its own leaf first, then enables the memory controller for the children.
    let leaf = dir.join(name);
    fs::create_dir_all(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    let undo = |e: String| {
        let _ = fs::remove_dir(&leaf);
        e
    };
    let pid = std::process::id().to_string();
    // Other processes may share our cgroup (e.g. a shell); only ours moves.
    fs::write(leaf.join("cgroup.procs"), &pid)
        .map_err(|e| undo(format!("cannot move into {}: {e}", leaf.display())))?;
    let back = || {
        let _ = fs::write(dir.join("cgroup.procs"), &pid);
    };
    if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), "+memory") {
        back();
        return Err(undo(format!("cannot enable the memory controller for children of {}: {e}", dir.display())));
    }
    if let Err(e) = fs::write(leaf.join("memory.max"), limit.to_string()) {
        back();
        return Err(undo(format!("cannot set memory.max: {e}")));
    }
    Ok(MemoryCgroup { dir: leaf, parent_procs: dir.join("cgroup.procs"), version: 2 })
}

fn enter_v1(dir: &Path, name: &str, limit: u64) -> Result<MemoryCgroup, String> {
    let leaf = dir.join(name);
    fs::create_dir_all(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    let result = fs::write(leaf.join("memory.limit_in_bytes"), limit.to_string())
        .map_err(|e| format!("cannot set memory.limit_in_bytes: {e}"))
        .and_then(|_| {
            fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
                .map_err(|e| format!("cannot move into {}: {e}", leaf.display()))
        });
    match result {
        Ok(()) => Ok(MemoryCgroup { dir: leaf, parent_procs: dir.join("cgroup.procs"), version: 1 }),
        Err(e) => {
            let _ = fs::remove_dir(&leaf);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hierarchies_in_mountinfo() {
        let mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(mount_of(mountinfo, "cgroup2", None), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(mount_of(mountinfo, "cgroup", Some("memory")), Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(mount_of(mountinfo, "cgroup", Some("cpu")), None);
        let membership = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/user.slice\n";
        assert_eq!(own_path(membership, "memory").as_deref(), Some("/process_api/abc"));
        assert_eq!(own_path(membership, "cpu").as_deref(), Some("/"));
        assert_eq!(own_path(membership, "").as_deref(), Some("/user.slice"));
    }

    #[test]
    fn reads_oom_kills_of_both_versions() {
        assert_eq!(oom_kill_count("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n"), 2);
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"), 5);
        assert_eq!(oom_kill_count(""), 0);
    }
}
