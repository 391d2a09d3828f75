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

fn alive(pid: i32) -> bool {
    // A zombie is dead for this purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

fn postmaster(data: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(data.join("pg/postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

/// `psql -c 'select 1'` on the embedded cluster's socket as OS user `user`
/// (root only); (success, stderr).
fn psql_as(user: &str, socket_dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "/usr/lib/postgresql/15/bin/psql", "-w", "-h"])
        .arg(socket_dir)
        .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The embedded database is the relay's alone: its socket directory is in
/// data_dir, mode 0700; authentication is peer-only (no `trust`), so
/// another OS user cannot connect even where it reaches the socket; a
/// planted symlink is refused, not followed. A postmaster left behind by a
/// SIGKILLed supervisor is stopped by the next `sluice run`, and none is
/// left running after it exits.
#[test]
fn embedded_database_is_private_and_never_left_running() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "");
    relay.start();
    let sock = data.join("pgsock");
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o700, "socket directory mode");
    let hba = std::fs::read_to_string(data.join("pg/pg_hba.conf")).unwrap();
    let rules: Vec<&str> = hba.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).collect();
    assert_eq!(rules, ["local all postgres peer map=sluice"], "{hba}");
    let pidfile = std::fs::read_to_string(data.join("pg/postmaster.pid")).unwrap();
    assert_eq!(pidfile.lines().nth(5).map(str::trim), Some(""), "listens on TCP: {pidfile}");
    if nix::unistd::geteuid().is_root() {
        // Another user cannot reach the socket...
        let (ok, err) = psql_as("nobody", &sock);
        assert!(!ok, "nobody connected");
        assert!(err.contains("ermission denied") || err.contains("No such file"), "{err}");
        // ...and where it can, authentication refuses it.
        let file = sock.join(".s.PGSQL.5432");
        let (dmode, fmode) = (m.mode() & 0o7777, std::fs::metadata(&file).unwrap().mode() & 0o7777);
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (ok, err) = psql_as("nobody", &sock);
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(dmode)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(fmode)).unwrap();
        assert!(!ok, "nobody connected through an open socket");
        assert!(err.contains("authentication failed") || err.contains("no pg_ident.conf"), "{err}");
    }
    // SIGKILL the supervisor: its postmaster stays behind (own process group).
    let pm = postmaster(&data).expect("postmaster.pid");
    let sup = relay.pid();
    let kids = children_matching(sup, "sluice");
    assert!(!kids.is_empty());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = relay.child.take().unwrap().wait();
    // The children follow their parent (and release the instance lock).
    let t = Instant::now();
    while kids.iter().any(|k| alive(*k)) {
        assert!(t.elapsed() < Duration::from_secs(20), "children outlived the supervisor");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(pm), "the postmaster died with the supervisor; nothing to adopt");
    relay.start();
    assert!(!alive(pm), "the leftover postmaster {pm} still runs");
    assert!(relay.log_all().contains("left running by an earlier sluice"), "{}", relay.log_tail());
    let pm2 = postmaster(&data).expect("postmaster.pid");
    assert_ne!(pm, pm2);
    relay.stop();
    assert!(!alive(pm2), "postmaster {pm2} left running after sluice run exited");
    assert!(!data.join("pg/postmaster.pid").exists());

    // A symlink planted where the socket directory goes is refused and
    // its target left as it was.
    let dir2 = tempfile::tempdir().unwrap();
    let target = dir2.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = std::fs::metadata(&target).unwrap();
    std::fs::create_dir_all(dir2.path().join("data")).unwrap();
    std::os::unix::fs::symlink(&target, dir2.path().join("data/pgsock")).unwrap();
    let relay2 = Relay::new(dir2.path(), "http://127.0.0.1:9", 1, "");
    let (ok, err) = run_to_end(&["run", "--config", &relay2.config.to_string_lossy()]);
    assert!(!ok);
    assert!(err.contains("not a directory (a symlink?)"), "{err}");
    let after = std::fs::metadata(&target).unwrap();
    assert_eq!((before.uid(), before.gid(), before.mode()), (after.uid(), after.gid(), after.mode()));
}

/// `Type=notify`: the supervisor tells systemd READY=1 once it runs,
/// RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 at the end,
/// and WATCHDOG=1 every half of `WATCHDOG_USEC` meanwhile.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let watchdogs = std::cell::Cell::new(0);
    let next = || loop {
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).expect("a notification within 60 s");
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m == "WATCHDOG=1" {
            watchdogs.set(watchdogs.get() + 1);
            continue;
        }
        return m;
    };
    let mut relay = Relay::new(dir.path(), "http://127.0.0.1:9", 1, "");
    relay.env =
        vec![("NOTIFY_SOCKET".into(), sock.to_string_lossy().into_owned()), ("WATCHDOG_USEC".into(), "400000".into())];
    relay.start();
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    let again = next();
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");
    relay.stop();
    assert_eq!(next(), "STOPPING=1");
    // 1.5 s at one per 200 ms, with room for a slow machine.
    assert!(watchdogs.get() >= 4, "{} WATCHDOG=1 in 1.5 s", watchdogs.get());
}

/// `log_format = "json"`: every line of every process is one JSON object
/// (no colour codes), and the summary line comes every
/// `log_summary_interval_s`.
#[test]
fn json_logs_and_a_periodic_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay =
        Relay::new(dir.path(), "http://127.0.0.1:9", 1, "log_format = \"json\"\nlog_summary_interval_s = 1");
    relay.start();
    let t = std::time::Instant::now();
    while relay.log_all().matches("\"summary\"").count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "no summary lines:\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.stop();
    let log = relay.log_all();
    let mut targets = std::collections::BTreeSet::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        targets.insert(v["target"].as_str().unwrap_or("").split("::").next().unwrap_or("").to_owned());
        if v["message"] == "summary" {
            for k in ["events_in_per_s", "frames_out_per_s", "hosts_connected", "hosts_offline", "consumers", "seq"] {
                assert!(!v[k].is_null(), "summary lacks {k}: {line}");
            }
        }
    }
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    // The supervisor, the db-writer and the shard all logged as JSON.
    for t in ["sluice", "sluice_dbwriter", "sluice_shard"] {
        assert!(targets.contains(t), "no JSON line from {t}: {targets:?}");
    }
}
