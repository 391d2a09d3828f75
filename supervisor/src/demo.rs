//! `sluice demo`: fakenet (a few fake PDS hosts, a PLC directory, gentle
//! traffic with the default fault mix) and the relay on loopback with the
//! embedded PostgreSQL, plus a one-line summary every second.
//!
//! Every run starts afresh: a new fakenet seed (from the clock), and the
//! relay's state in `DATA_DIR/relay` (event log, database) removed first,
//! so the network's events are new to the relay each time. Only a
//! directory this command made (it holds `.sluice-demo`) is ever removed.

use crate::supervise::Supervisor;
use fakenet::runner::{self, ServeConfig};
use fakenet::world::FaultRates;
use sluice_common::process::config::RawConfig;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn run(data_dir: &Path, port: u16, hosts: usize, rate: f64) -> anyhow::Result<()> {
    let (data_dir, relay_dir) = fresh_dirs(data_dir)?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_secs());
    let net = runner::start(ServeConfig {
        hosts,
        accounts: 10,
        seed,
        rate,
        faults: FaultRates::default_mix(),
        migrations: true,
        ledger: data_dir.join("fakenet-ledger.jsonl"),
        ..ServeConfig::default()
    })?;
    let toml = format!(
        "shard_count = \"auto\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\nplc_url = {:?}\nallow_insecure_hosts = true\n",
        data_dir.join("relay").to_string_lossy(),
        net.info.plc_url
    );
    let mut raw = RawConfig::from_toml(&toml, Path::new("demo"))?;
    raw.apply_env(|k| std::env::var(k).ok())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let cfg = raw.validate(cores)?;
    let term = crate::signals()?;
    let mut sup = Supervisor::start(cfg)?;
    crawl_when_healthy(net.info.hosts.clone(), port);
    say(format_args!("sluice demo: {} fake PDS hosts, PLC at {}", net.info.hosts.len(), net.info.plc_url));
    say(format_args!("subscribe:   ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos"));
    say(format_args!("health:      http://127.0.0.1:{port}/xrpc/_health      (Ctrl-C to stop)"));
    say(format_args!("follow:      sluice tail ws://127.0.0.1:{port}"));
    say(format_args!("fresh run:   seed {seed}, relay state in {} (both new each run)", relay_dir.display()));
    say(format_args!("drops:       `sluice demo --drops` logs each one with its reason"));
    let tick = Box::new(progress_line());
    let hup = crate::hangup()?;
    let r = sup.run(term, hup, Some(tick));
    drop(net);
    r
}

/// `data_dir` made (canonical) and its `relay/` from an earlier demo
/// removed, refusing a directory the demo did not make.
fn fresh_dirs(data_dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let marker = data_dir.join(".sluice-demo");
    let relay_dir = data_dir.join("relay");
    if relay_dir.exists() {
        if !marker.exists() {
            anyhow::bail!(
                "{} exists and was not made by `sluice demo`; choose another --data-dir",
                relay_dir.display()
            );
        }
        std::fs::remove_dir_all(&relay_dir)
            .map_err(|e| anyhow::anyhow!("removing the previous demo's {}: {e}", relay_dir.display()))?;
    }
    std::fs::write(&marker, "made by `sluice demo`: its relay/ is removed at each start\n")?;
    Ok((data_dir, relay_dir))
}

/// Ask the relay to crawl every fake host once it answers (a thread).
fn crawl_when_healthy(host_list: Vec<String>, port: u16) {
    let base = format!("http://127.0.0.1:{port}");
    std::thread::spawn(move || {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && agent.get(&format!("{base}/xrpc/_health")).call().is_err() {
            std::thread::sleep(Duration::from_millis(200));
        }
        for h in host_list {
            let r = agent
                .post(&format!("{base}/xrpc/com.atproto.sync.requestCrawl"))
                .set("content-type", "application/json")
                .send_string(&serde_json::json!({ "hostname": h }).to_string());
            if let Err(e) = r {
                tracing::warn!(host = h, error = %e, "demo: requestCrawl failed");
            }
        }
    });
}

/// The demo's line per second: hosts, rates, consumers, drops, seq.
fn progress_line() -> impl FnMut(&sluice_common::ipc::shm::ControlBlock) {
    let mut last = (Instant::now(), crate::summary::Totals::default());
    move |cb: &sluice_common::ipc::shm::ControlBlock| {
        if last.0.elapsed() < Duration::from_secs(1) {
            return;
        }
        let t = crate::summary::Totals::read(cb);
        let dt = last.0.elapsed().as_secs_f64();
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        // Every drop: the shards' stateless ones and the sequencer's.
        say(format_args!(
            "hosts={} in={:.0}/s out={:.0}/s consumers={} dropped={} (stateless {}, stateful {}) seq={}",
            t.hosts_connected,
            rate(t.events_in, last.1.events_in),
            rate(t.frames_out, last.1.frames_out),
            t.consumers,
            t.dropped_shard + t.dropped_stateful,
            t.dropped_shard,
            t.dropped_stateful,
            cb.committed().load(Ordering::Relaxed)
        ));
        last = (Instant::now(), t);
    }
}

/// One line to stdout; a closed stdout (the pipe reader gone, Ctrl-C
/// through `| tee`) is not an error worth dying for: the relay stops in
/// order on the signal instead of a panic on EPIPE.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
