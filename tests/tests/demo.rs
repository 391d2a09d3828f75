//! The README's first command, twice: `sluice demo` relays `#commit`
//! events on every run (each starts from a fresh seed and relay state),
//! and Ctrl-C with its stdout (and, the second time, stderr) piped and
//! already closed stops it in order
//! with exit status 0, leaving nothing behind in the temporary directory.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The sluice binary with `demo` in it (built with the feature if the one
/// at hand lacks it).
fn demo_bin() -> std::path::PathBuf {
    let bin = sluice_bin();
    let has = Command::new(&bin).args(["demo", "--help"]).output().is_ok_and(|o| o.status.success());
    if !has {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--bin", "sluice", "--features", "sluice/demo"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(ok.success(), "building sluice with the demo feature failed");
    }
    bin
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /xrpc/_health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn sluice_pg_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sluice-pg-"))
        .collect()
}

#[test]
fn demo_relays_commits_on_every_run_and_stops_cleanly_through_a_closed_pipe() {
    let bin = demo_bin();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let before = sluice_pg_dirs();
    for run in 0..2 {
        let port = free_port();
        let log = dir.path().join(format!("demo-{run}.log"));
        let mut cmd = Command::new(&bin);
        cmd.args(["demo", "--port", &port.to_string(), "--hosts", "2", "--data-dir"])
            .arg(&data)
            .env_remove("SLUICE_LOG")
            .env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{}", free_port()))
            .stdout(Stdio::piped());
        if run == 0 {
            // The first run logs every drop with its reason (--drops).
            cmd.args(["--rate", "200", "--drops"]).stderr(std::fs::File::create(&log).unwrap());
        } else {
            // The second run's logs go to a pipe that is closed too.
            cmd.args(["--rate", "40"]).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        drop(child.stderr.take());
        // Read a few status lines, then close our end of the pipe.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let banner: Vec<String> = lines.by_ref().take(3).map(|l| l.unwrap()).collect();
        assert!(banner[0].starts_with("sluice demo:"), "{banner:?}");
        drop(lines);
        let t = Instant::now();
        while !healthy(port) {
            assert!(t.elapsed() < Duration::from_secs(120), "run {run}: demo relay not healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        // New #commit events flow live (a second run on stale state would
        // see its network's commits dropped as replays).
        let mut tail = Command::new(&bin)
            .args(["tail", &format!("ws://127.0.0.1:{port}"), "--limit", "20"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while tail.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = tail.kill();
        let out = tail.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let commits = text.lines().filter(|l| l.contains(" #commit ")).count();
        assert!(commits > 0, "run {run}: no live #commit in 60 s:\n{text}");
        eprintln!("run {run}: {commits} live #commit of 20 frames in {:?}", t.elapsed());
        if run == 0 {
            let t = Instant::now();
            let dropped = loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<String> = text
                    .lines()
                    .filter(|l| l.contains("dropped") && (l.contains("reason=") || l.contains("why=")))
                    .map(str::to_owned)
                    .collect();
                if !lines.is_empty() {
                    break lines;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "--drops logged no drop with a reason");
                std::thread::sleep(Duration::from_millis(200));
            };
            eprintln!("run 0: a drop with its reason: {}", dropped[0]);
        }
        // Ctrl-C (SIGINT) with stdout closed: an orderly stop, exit 0.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "run {run}: demo did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "run {run}: demo exited with {status}");
        assert!(!data.join("relay/pg/postmaster.pid").exists(), "run {run}: PostgreSQL left running");
    }
    let after = sluice_pg_dirs();
    assert!(after.iter().all(|d| before.contains(d)), "left in the temporary directory: {after:?}");
}
