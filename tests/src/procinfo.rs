//! What the benches read about a process from `/proc` (Linux only):
//! memory, threads, descriptors, CPU time, children.

/// A `/proc/PID/status` field in its unit (kB for memory), 0 if absent.
pub fn status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// Proportional set size in kB (shared pages divided among their users),
/// from `smaps_rollup`: what summing processes' memory should use.
pub fn pss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// Open descriptors.
pub fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// utime + stime, in clock ticks (100 per second here).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU ticks of each thread of `pid`, by thread id, with its name
/// (`comm`).
pub fn thread_ticks(pid: u32) -> std::collections::HashMap<u32, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some((head, after)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        out.insert(tid, (name, ticks));
    }
    out
}

/// Direct children of `pid`: (pid, the first three arguments after the
/// program name, or the program name if it has none).
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if after.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let mut words = cmd.split_whitespace();
            let prog = words.next().unwrap_or("").rsplit('/').next().unwrap_or("").to_owned();
            let rest: Vec<&str> = words.take(3).collect();
            out.push((p, if rest.is_empty() { prog } else { rest.join(" ") }));
        }
    }
    out
}

/// A relay's processes by role, under its supervisor `pid` whose data
/// directory is `data`: each child by its first arguments (`shard --id
/// 0`, `db-writer`), the supervisor, and PostgreSQL's postmaster with all
/// its backends as one ("postgres (all)").
pub fn relay_processes(pid: u32, data: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = children(pid)
        .into_iter()
        .map(|(p, name)| (name.split(" --config").next().unwrap_or("").to_owned(), vec![p]))
        .collect();
    out.push(("supervisor".into(), vec![pid]));
    let pm = std::fs::read_to_string(data.join("pg/postmaster.pid")).unwrap_or_default();
    if let Some(pm) = pm.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) {
        out.retain(|(_, p)| p[0] != pm);
        out.push(("postgres (all)".into(), tree(pm)));
    }
    out
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let kids: Vec<u32> = children(out[i]).into_iter().map(|(p, _)| p).collect();
        out.extend(kids);
        i += 1;
    }
    out
}

/// Processes whose command line contains `needle` (any parent).
pub fn matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(needle) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(status(me, "VmRSS:") > 0);
        assert!(status(me, "Threads:") >= 1);
        assert!(pss_kb(me) > 0);
        assert!(fds(me) >= 3);
        assert!(tree(me).contains(&me));
    }
}
