//! Stall detection. A task that runs without yielding holds every host and
//! consumer of its shard, so a stall is a bug worth a counter and a line.
//!
//! A heartbeat task in its own latency-sensitive task queue sleeps
//! [`TICK`] and measures how late it woke. The queue asks glommio to
//! preempt whatever runs within 10 ms of the heartbeat becoming due, so a
//! wake more than [`STALL_MIN`] late means the running task did not yield
//! (or the whole process was not scheduled). Each such wake adds one to
//! the shard's `stalls` counter (`sluice_shard_stalls_total`) and its
//! lateness to the shard's worst; a WARN names the shard and the lateness
//! at most once per [`LOG_EVERY`], with how many more came since.
//!
//! glommio's own detector is not used: on every stall it resolves a full
//! backtrace on the executor thread, which loads the binary's debug
//! information into a cache kept for the life of the process (measured:
//! 30 MiB per shard with the shipped, stripped binary, 60 MiB with debug
//! information; 1,000 TLS upstreams connecting at once stall a shard often
//! enough to pay it) and takes hundreds of milliseconds the first time.

use sluice_common::ipc::shm::ControlBlock;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the heartbeat wakes (40 wakes a second: nothing on an idle
/// shard's profile).
pub const TICK: Duration = Duration::from_millis(25);
/// Lateness from which a wake counts as a stall: the 10 ms preemption
/// budget plus a margin for the kernel's scheduling.
pub const STALL_MIN: Duration = Duration::from_millis(25);
/// At most one WARN line per this long; the rest are counted.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// The heartbeat's queue: the latency glommio keeps for it.
const QUEUE_LATENCY: Duration = Duration::from_millis(10);

/// The counting and the rate limit, apart from the clock (tested alone).
pub struct Detector {
    control: Arc<ControlBlock>,
    id: usize,
    last_line: Option<Instant>,
    since_line: u64,
    worst_since_line: Duration,
}

impl Detector {
    pub fn new(control: Arc<ControlBlock>, id: usize) -> Detector {
        Detector { control, id, last_line: None, since_line: 0, worst_since_line: Duration::ZERO }
    }

    /// A wake `late` past its time, at `now`: counts a stall, and returns
    /// the line to log when one is due.
    pub fn observe(&mut self, late: Duration, now: Instant) -> Option<String> {
        if late < STALL_MIN {
            return None;
        }
        self.control.shard(self.id).stalls.fetch_add(1, Ordering::Relaxed);
        self.since_line += 1;
        self.worst_since_line = self.worst_since_line.max(late);
        if self.last_line.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        let line = format!(
            "shard {} stalled: its executor reached a due timer {} ms late (a task ran without yielding, or the \
             process was not scheduled); {} stall(s), the worst {} ms, since the last such line",
            self.id,
            late.as_millis(),
            self.since_line,
            self.worst_since_line.as_millis()
        );
        self.last_line = Some(now);
        self.since_line = 0;
        self.worst_since_line = Duration::ZERO;
        Some(line)
    }
}

/// Start the heartbeat on the current executor.
pub fn spawn(control: Arc<ControlBlock>, id: usize) -> anyhow::Result<()> {
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(QUEUE_LATENCY),
        "stall-watch",
    );
    let mut detector = Detector::new(control, id);
    glommio::spawn_local_into(
        async move {
            loop {
                let due = Instant::now() + TICK;
                glommio::timer::sleep(TICK).await;
                let now = Instant::now();
                if let Some(line) = detector.observe(now.saturating_duration_since(due), now) {
                    tracing::warn!("{line}");
                }
            }
        },
        queue,
    )
    .map_err(|e| anyhow::anyhow!("shard {id}: starting the stall watch: {e}"))?
    .detach();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stalls(c: &ControlBlock, id: usize) -> u64 {
        c.shard(id).stalls.load(Ordering::Relaxed)
    }

    #[test]
    fn late_wakes_are_counted_and_logged_once_a_minute() {
        let control = Arc::new(ControlBlock::create().unwrap());
        let mut d = Detector::new(control.clone(), 2);
        let t0 = Instant::now();
        assert_eq!(d.observe(STALL_MIN - Duration::from_millis(1), t0), None);
        assert_eq!(stalls(&control, 2), 0);
        let first = d.observe(Duration::from_millis(120), t0).expect("the first stall is logged");
        assert!(first.contains("shard 2") && first.contains("120 ms"), "{first}");
        assert_eq!(d.observe(Duration::from_millis(300), t0 + Duration::from_secs(1)), None);
        assert_eq!(d.observe(Duration::from_millis(40), t0 + Duration::from_secs(2)), None);
        let next = d.observe(Duration::from_millis(30), t0 + LOG_EVERY).expect("a line again after a minute");
        assert!(next.contains("3 stall(s), the worst 300 ms"), "{next}");
        assert_eq!(stalls(&control, 2), 4);
        assert_eq!(stalls(&control, 1), 0);
    }

    #[test]
    fn a_task_that_blocks_the_executor_is_counted() {
        let control = Arc::new(ControlBlock::create().unwrap());
        let c = control.clone();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .preempt_timer(Duration::from_millis(10))
            .make()
            .unwrap();
        ex.run(async move {
            spawn(c, 1).unwrap();
            glommio::timer::sleep(TICK * 2).await;
            // What a shard must never do: block its executor.
            std::thread::sleep(Duration::from_millis(150));
            glommio::timer::sleep(TICK * 2).await;
        });
        assert!(stalls(&control, 1) >= 1, "a 150 ms block went uncounted");
    }
}
