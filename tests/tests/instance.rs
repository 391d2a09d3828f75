//! One relay per data directory and per listen address: a second `sluice
//! run` on a running relay's data_dir, a second one on its `listen` or
//! `metrics_listen`, and a `sluice db-writer` started by hand on its
//! data_dir all exit at once with an error that says why (and names the
//! holder's PID), having touched nothing; the first relay keeps running.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Run `sluice ARGS` to its end (bounded); (exit success, stderr).
fn run_to_end(args: &[&str]) -> (bool, String) {
    let mut c = Command::new(sluice_bin())
        .args(args)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (st.success(), err);
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = c.kill();
            panic!("sluice {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn second_relay_on_the_same_data_dir_or_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "");
    relay.start();
    let pid = relay.pid().to_string();
    let effective = dir.path().join("data/run/effective.toml");
    let before = std::fs::metadata(&effective).unwrap().modified().unwrap();

    // Same data_dir, other ports.
    let other = tempfile::tempdir().unwrap();
    let cfg = other.path().join("same-dir.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n",
            free_port(),
            free_port(),
            dir.path().join("data")
        ),
    )
    .unwrap();
    let (ok, err) = run_to_end(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("in use by another sluice") && err.contains(&pid), "{err}");
    assert_eq!(std::fs::metadata(&effective).unwrap().modified().unwrap(), before, "the second relay wrote");

    // A db-writer (or shard) by hand on the running relay's directory.
    let (ok, err) = run_to_end(&["db-writer", "--config", effective.to_str().unwrap()]);
    assert!(!ok && err.contains(&pid), "{err}");
    let (ok, err) = run_to_end(&["shard", "--id", "0", "--config", effective.to_str().unwrap()]);
    assert!(!ok && err.contains(&pid), "{err}");

    // Another data_dir on the same listen, then the same metrics_listen.
    for (listen, metrics, what) in [
        (relay.port, free_port(), format!("listen 127.0.0.1:{}", relay.port)),
        (free_port(), relay.metrics_port, format!("metrics_listen 127.0.0.1:{}", relay.metrics_port)),
    ] {
        let cfg = other.path().join("same-port.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\ndata_dir = {:?}\n",
                other.path().join("data")
            ),
        )
        .unwrap();
        let (ok, err) = run_to_end(&["run", "--config", cfg.to_str().unwrap()]);
        assert!(!ok && err.contains(&what) && err.contains("address in use"), "{what}: {err}");
        assert!(!other.path().join("data/pg").exists(), "the refused relay started a database");
    }

    // The first relay never noticed.
    let (st, _) = relay.http("GET", "/xrpc/_health", "").unwrap();
    assert_eq!(st, 200);
    relay.stop();
    // Once it stopped, the directory is free again.
    relay.start();
    relay.stop();
}
