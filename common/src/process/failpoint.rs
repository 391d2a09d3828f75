//! Failpoints: named places on the durable path that a test can turn into
//! a crash, so the steps between two writes are each tested, not only
//! where a random `kill -9` happens to land.
//!
//! `SLUICE_FAILPOINTS="name=crash@N[,name=crash@N]"` aborts the process the
//! N-th time it passes `name` (counting from 1 in this process);
//! `name=on@N` makes [`fires`] answer true that one time, for points that
//! do something other than crash; `name=switch` makes [`switched_on`]
//! answer true while the file `SLUICE_FAILPOINT_DIR/NAME.on` exists (a
//! test turns a fault on and off). With
//! `SLUICE_FAILPOINT_DIR=DIR` a point fires at most once across restarts:
//! firing leaves `DIR/NAME.fired`, and a point whose file exists stays
//! quiet (the supervisor restarts the process with the same environment).
//!
//! Unset, a failpoint costs one atomic load. The points:
//! - `sequencer-after-log-sync`: the event log is fsynced, Postgres is not
//!   committed (the restart must cut the log back to Postgres' last_seq).
//! - `sequencer-after-pg-commit`: Postgres is committed, the watermark is
//!   not published and the rings are not released (the restart must drop
//!   the re-read records as duplicates).
//! - `flags-after-segment`: a takedown's flagging has done one segment
//!   (the restart's re-flag pass must finish the job).
//! - `eventlog-enospc` (`switch`): writing the event log fails with
//!   ENOSPC (disk full) while the switch is on.
//! - `shard-ring-garbage` (`on@N`): before its N-th ring record the shard
//!   writes one record that does not decode (its checksum is right): the
//!   db-writer must discard the ring and lose nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Point {
    /// 0 for a switch.
    nth: u64,
    crash: bool,
    hits: AtomicU64,
}

struct Failpoints {
    points: HashMap<String, Point>,
    dir: Option<PathBuf>,
}

static CONFIG: OnceLock<Option<Failpoints>> = OnceLock::new();

/// Parse `name=crash@N,name=on@N,...`; malformed entries are reported and
/// ignored.
fn parse(spec: &str) -> HashMap<String, Point> {
    let mut points = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item.split_once('=').and_then(|(name, action)| {
            if action == "switch" {
                return Some((name, false, u64::MAX));
            }
            let (crash, n) = match action.strip_prefix("crash@") {
                Some(n) => (true, n),
                None => (false, action.strip_prefix("on@")?),
            };
            Some((name, crash, n.parse::<u64>().ok()?))
        });
        match parsed {
            Some((name, crash, nth)) if nth > 0 => {
                let nth = if nth == u64::MAX { 0 } else { nth };
                points.insert(name.to_owned(), Point { nth, crash, hits: AtomicU64::new(0) });
            }
            _ => eprintln!("SLUICE_FAILPOINTS: ignoring {item:?} (expected name=crash@N or name=on@N, N >= 1)"),
        }
    }
    points
}

fn config() -> Option<&'static Failpoints> {
    CONFIG
        .get_or_init(|| {
            let spec = std::env::var("SLUICE_FAILPOINTS").ok()?;
            let points = parse(&spec);
            (!points.is_empty())
                .then(|| Failpoints { points, dir: std::env::var_os("SLUICE_FAILPOINT_DIR").map(PathBuf::from) })
        })
        .as_ref()
}

/// Would passing `name` now crash? Counts the pass. Split from [`hit`] so
/// the counting is testable without aborting.
fn due(f: &Failpoints, name: &str) -> bool {
    let Some(p) = f.points.get(name).filter(|p| p.nth > 0) else { return false };
    if p.hits.fetch_add(1, Ordering::Relaxed) + 1 != p.nth {
        return false;
    }
    match &f.dir {
        None => true,
        Some(dir) => {
            let marker = dir.join(format!("{name}.fired"));
            // create_new: exactly one process ever fires it.
            std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok()
        }
    }
}

/// Pass the failpoint `name`: aborts the process if a test asked for it.
pub fn hit(name: &str) {
    if let Some(f) = config() {
        if f.points.get(name).is_some_and(|p| p.crash) && due(f, name) {
            eprintln!("failpoint {name}: crashing on purpose (SLUICE_FAILPOINTS)");
            std::process::abort();
        }
    }
}

/// Pass the failpoint `name` (an `on@N` point): true the one time a test
/// asked for it to fire.
pub fn fires(name: &str) -> bool {
    config().is_some_and(|f| f.points.get(name).is_some_and(|p| !p.crash) && due(f, name))
}

/// Is the switch failpoint `name` on now (its file exists)? One `stat`
/// per call, only when the point is configured.
pub fn switched_on(name: &str) -> bool {
    let Some(f) = config() else { return false };
    match (f.points.get(name), &f.dir) {
        (Some(p), Some(dir)) if p.nth == 0 => dir.join(format!("{name}.on")).exists(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_on_the_nth_pass_once_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let f = Failpoints {
            points: parse("a=crash@3, b=crash@1,bad,c=crash@0,d=crash@x,e=on@2,f=off@1,g=switch"),
            dir: None,
        };
        assert_eq!(f.points.len(), 4);
        assert!(!due(&f, "g"), "a switch never fires as a count");
        assert!(!f.points["e"].crash && f.points["a"].crash);
        assert_eq!((0..5).map(|_| due(&f, "a")).collect::<Vec<_>>(), [false, false, true, false, false]);
        assert!(!due(&f, "unknown"));
        // With a marker directory, a second process (same spec) stays quiet.
        let first = Failpoints { points: parse("b=crash@1"), dir: Some(dir.path().to_owned()) };
        assert!(due(&first, "b"));
        assert!(dir.path().join("b.fired").exists());
        let restarted = Failpoints { points: parse("b=crash@1"), dir: Some(dir.path().to_owned()) };
        assert!(!due(&restarted, "b"));
    }
}
