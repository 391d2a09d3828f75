//! One process's resource use from /proc (the metrics' per-process series).

/// What /proc says about one process now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    pub rss_bytes: u64,
    pub fds: u64,
    pub threads: u64,
    pub cpu_seconds: f64,
}

/// `None` if the process is gone (or /proc is not readable).
pub fn read(pid: u32) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    // utime and stime: fields 14 and 15, counted after the command's ")".
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as f64;
    Some(ProcStat {
        rss_bytes: field("VmRSS:").unwrap_or(0) * 1024,
        fds,
        threads: field("Threads:").unwrap_or(0),
        cpu_seconds: (ticks(11) + ticks(12)) as f64 / hz,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let s = super::read(std::process::id()).unwrap();
        assert!(s.rss_bytes > 1 << 20 && s.fds >= 3 && s.threads >= 1, "{s:?}");
        assert!(super::read(u32::MAX).is_none());
    }
}
