//! Process trees from `/proc`.

use std::collections::BTreeSet;
use std::fs;

/// Every descendant of `root` (children, their children, ...), from the parent links in
/// `/proc/*/stat`, in pid order. Needed where a process-group kill would miss some: OpenSSH
/// puts its per-connection processes in sessions of their own.
pub fn descendants_of(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(Ok(ppid)) = rest.split_whitespace().nth(1).map(str::parse::<u32>) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && found.insert(pid) {
                frontier.push(pid);
            }
        }
    }
    found.into_iter().collect()
}

/// SIGKILLs `pid` and every descendant at once (collected first: once a parent dies its
/// children are re-parented and could no longer be found).
pub fn kill_tree(pid: u32) {
    let mut pids = vec![pid];
    pids.extend(descendants_of(pid));
    for pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
