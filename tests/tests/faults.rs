//! Faults inside the relay that must lose nothing: a ring record that does
//! not decode (the db-writer discards the ring and reads nothing more from
//! it until the shard's successor runs, so no host cursor passes a
//! discarded event).

mod support;

use fakenet::runner::{self, ServeConfig};
use std::time::{Duration, Instant};
use support::*;

/// Sum of the metric `name` over its series.
fn metric(relay: &Relay, name: &str) -> u64 {
    metrics_page(relay)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// A garbage record mid-stream (failpoint `shard-ring-garbage`, once):
/// the ring is discarded, the shard restarts, and the stream is exact.
#[test]
fn a_corrupt_ring_record_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = runner::start(ServeConfig {
        hosts: 4,
        accounts: 10,
        seed: 81,
        rate: 400.0,
        max_events: Some(3000),
        ledger: dir.path().join("ledger.jsonl"),
        ..ServeConfig::default()
    })
    .unwrap();
    let fired = dir.path().join("failpoints");
    std::fs::create_dir_all(&fired).unwrap();
    let mut relay = Relay::new(dir.path(), &net.info.plc_url, 1, "");
    relay.env = vec![
        ("SLUICE_FAILPOINTS".into(), "shard-ring-garbage=on@500".into()),
        ("SLUICE_FAILPOINT_DIR".into(), fired.to_string_lossy().into_owned()),
    ];
    relay.start();
    crawl_all(&relay, &net, "");
    net.wait_generation().unwrap();
    let report = check_exact(&relay, dir.path(), Duration::from_secs(90));
    eprintln!("{}", report.summary());
    assert!(fired.join("shard-ring-garbage.fired").exists(), "the failpoint never fired");
    assert_eq!(metric(&relay, "sluice_ring_corrupt_total"), 1);
    let t = Instant::now();
    while metric(&relay, "sluice_child_restarts_total") < 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "the shard was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.stop();
}
