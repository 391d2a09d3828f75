//! The Debian package: `packaging/build-deb` assembles what DESIGN.md
//! promises (binary, hardened systemd unit with raised limits, default
//! config, maintainer scripts), and the default config is valid.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn default_config_is_valid() {
    let text = std::fs::read_to_string(root().join("packaging/sluice.toml")).unwrap();
    let raw = sluice_common::process::config::RawConfig::from_toml(&text, std::path::Path::new("sluice.toml")).unwrap();
    let cfg = raw.validate(4).unwrap();
    assert_eq!(cfg.shard_count, 4, "auto = one shard per core");
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/sluice"));
    assert!(!cfg.allow_insecure_hosts);
    assert_eq!(cfg.retention_hours, 72.0);
}

#[test]
fn unit_file_raises_limits_and_maps_signals() {
    let unit = std::fs::read_to_string(root().join("packaging/sluice.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/sluice run --config /etc/sluice/sluice.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=1048576",
        "User=sluice",
        "StateDirectory=sluice",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "sluice.service lacks {line:?}");
    }
    // systemd's own check, against the binary we built.
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let dir = tempfile::tempdir().unwrap();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
        let u = unit.replace("/usr/bin/sluice", bin.to_str().unwrap());
        let p = dir.path().join("sluice.service");
        std::fs::write(&p, u).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Only complaints about this unit count (the host may lack others).
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("sluice.service")).collect();
        assert!(ours.is_empty(), "systemd-analyze verify: {ours:?}");
    }
}

#[test]
fn deb_holds_binary_unit_config_and_scripts() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
    assert!(bin.exists(), "build the binaries first (scripts/test does)");
    let out = Command::new(root().join("packaging/build-deb")).arg("--binary").arg(&bin).output().unwrap();
    assert!(out.status.success(), "build-deb failed: {}", String::from_utf8_lossy(&out.stderr));
    let deb = root().join(String::from_utf8_lossy(&out.stdout).trim());
    let contents = Command::new("dpkg-deb").arg("--contents").arg(&deb).output().unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout);
    for f in ["./usr/bin/sluice", "./lib/systemd/system/sluice.service", "./etc/sluice/sluice.toml"] {
        assert!(contents.contains(f), "{f} missing from the package:\n{contents}");
    }
    let field = |name: &str| {
        let o = Command::new("dpkg-deb").args(["--field"]).arg(&deb).arg(name).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "sluice");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Recommends").contains("postgresql"));
    let info = Command::new("dpkg-deb").arg("--info").arg(&deb).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    for s in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        assert!(info.contains(s), "{s} missing:\n{info}");
    }
    for f in ["./usr/share/doc/sluice/copyright", "./usr/share/doc/sluice/changelog.gz"] {
        assert!(contents.contains(f), "{f} missing from the package:\n{contents}");
    }
    // Unpacked: md5sums match, the copyright names the linked crates,
    // Installed-Size is the unpacked size (KiB, within a block per file).
    let x = tempfile::tempdir().unwrap();
    let st = Command::new("dpkg-deb").arg("-R").arg(&deb).arg(x.path()).status().unwrap();
    assert!(st.success());
    let sums =
        Command::new("md5sum").args(["--check", "--quiet", "DEBIAN/md5sums"]).current_dir(x.path()).output().unwrap();
    assert!(sums.status.success(), "md5sums: {}", String::from_utf8_lossy(&sums.stdout));
    let copyright = std::fs::read_to_string(x.path().join("usr/share/doc/sluice/copyright")).unwrap();
    for c in [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        " glommio v",
        " tokio-postgres v",
    ] {
        assert!(copyright.contains(c), "copyright lacks {c:?}");
    }
    let size: u64 = field("Installed-Size").parse().unwrap();
    let files = contents.lines().count() as u64;
    let bytes = std::fs::metadata(x.path().join("usr/bin/sluice")).unwrap().len();
    assert!(size * 1024 >= bytes && size <= bytes / 1024 + 4 * files + 64, "Installed-Size {size} KiB");
    // Depends is what dpkg-shlibdeps computes for the binary, plus the
    // maintainer scripts' own needs.
    let depends = field("Depends");
    for d in ["libc6 (>= ", "libgcc-s1", "adduser", "init-system-helpers"] {
        assert!(depends.contains(d), "Depends: {depends}");
    }
    let postinst = std::fs::read_to_string(x.path().join("DEBIAN/postinst")).unwrap();
    assert!(postinst.contains("try-restart sluice.service"), "an upgrade restarts a running relay");
    // lintian: no errors (warnings: systemctl daemon-reload, no man page).
    let lint = Command::new("lintian").arg(&deb).output().expect("lintian (scripts/test installs it)");
    let report = String::from_utf8_lossy(&lint.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    let _ = std::fs::remove_file(&deb);
}

/// The shipped binary holds no test code: the `sluice` package's normal
/// dependencies (what packaging/build-deb builds, without the `demo`
/// feature) include neither fakenet nor this test crate.
#[test]
fn shipped_binary_links_no_test_code() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", "sluice", "--edges", "normal", "--offline", "--prefix", "none"])
        .current_dir(root())
        .output()
        .expect("cargo tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("sluice-shard ")), "unexpected tree:\n{tree}");
    for banned in ["fakenet ", "sluice-tests ", "rcgen ", "tokio-rustls "] {
        assert!(!tree.lines().any(|l| l.starts_with(banned)), "sluice depends on {banned}:\n{tree}");
    }
}

/// `sluice config check` prints the effective configuration of the
/// packaged default (every default filled in) and names the key of a bad
/// one, with a non-zero exit.
#[test]
fn config_check_prints_the_effective_config_and_names_bad_keys() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
    let out = Command::new(&bin)
        .args(["config", "check", "--config"])
        .arg(root().join("packaging/sluice.toml"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for key in ["shard_count = ", "retention_hours = 72.0", "upstream_idle_timeout_s = 120", "[limits]"] {
        assert!(text.contains(key), "no {key:?} in:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "upstream_ping_interval_s = 0\ndatabase_url = \"postgres://u:s3cret@db/x\"\n").unwrap();
    let out = Command::new(&bin).args(["config", "check", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream_ping_interval_s"));
    std::fs::write(&bad, "database_url = \"postgres://u:s3cret@db/x\"\n").unwrap();
    let out = Command::new(&bin).args(["config", "check", "--config"]).arg(&bad).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("u:***@db") && !text.contains("s3cret"), "{text}");
}

/// The unit's `Key=value` lines for `key`, in order.
fn unit_values(key: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(root().join("packaging/sluice.service")).unwrap();
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned).collect()
}

/// `systemd-analyze security` rates the unit at most 2.5 (it was 5.0
/// MEDIUM before the hardening).
#[test]
fn unit_is_rated_at_most_2_5_by_systemd_analyze_security() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sluice.service");
    std::fs::copy(root().join("packaging/sluice.service"), &p).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&p)
        .output()
        .expect("systemd-analyze (scripts/test installs the systemd package)");
    let text = String::from_utf8_lossy(&out.stdout);
    let level = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for sluice.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall level in:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(level <= 2.5, "exposure {level}:\n{text}");
}

/// Every name a `SystemCallFilter=` item stands for (groups expanded).
fn expand_filter(items: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo: Vec<String> = items.split_whitespace().map(str::to_owned).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(item) = todo.pop() {
        if !item.starts_with('@') {
            out.insert(item);
            continue;
        }
        if !seen.insert(item.clone()) {
            continue;
        }
        let o = Command::new("systemd-analyze").args(["syscall-filter", "--no-pager", &item]).output().unwrap();
        assert!(o.status.success(), "systemd-analyze syscall-filter {item}");
        for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
            let l = l.trim();
            if !l.is_empty() && !l.starts_with('#') {
                todo.push(l.to_owned());
            }
        }
    }
    out
}

/// The unit's system call filter allows every call the relay makes: `sluice
/// demo` (supervisor, db-writer, shard, private PostgreSQL, a consumer, a
/// reload) runs under strace as an unprivileged user, as under systemd, and
/// every call it made must pass the allow list minus the deny list.
#[test]
fn unit_syscall_filter_allows_every_call_the_relay_makes() {
    let filters = unit_values("SystemCallFilter");
    let (allow, deny): (Vec<&String>, Vec<&String>) = filters.iter().partition(|f| !f.starts_with('~'));
    let allowed: std::collections::BTreeSet<String> =
        allow.iter().flat_map(|f| expand_filter(f)).collect::<std::collections::BTreeSet<_>>();
    let denied: std::collections::BTreeSet<String> = deny.iter().flat_map(|f| expand_filter(&f[1..])).collect();
    assert!(allowed.contains("io_uring_setup") && denied.contains("reboot"), "{filters:?}");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice-bench")).with_file_name("sluice");
    let dir = tempfile::tempdir().unwrap();
    let root_user = nix::unistd::geteuid().is_root();
    // As under systemd: not root (no runuser, no chown in the relay).
    let user = "nobody";
    if root_user {
        let nobody = nix::unistd::User::from_name(user).unwrap().unwrap();
        nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let trace = dir.path().join("strace.out");
    let mut cmd = if root_user {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--", "strace"]);
        c
    } else {
        Command::new("strace")
    };
    let mut child = cmd
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(&bin)
        .args(["demo", "--port", &port.to_string(), "--rate", "50", "--data-dir"])
        .arg(dir.path().join("demo"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
        .spawn()
        .expect("strace (scripts/test installs it)");
    let log = || std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    // Ready, then a consumer reads 20 events, then a reload.
    let t = std::time::Instant::now();
    loop {
        let tail = Command::new(&bin)
            .args(["tail", &format!("ws://127.0.0.1:{port}"), "--cursor", "0", "--limit", "20"])
            .output()
            .unwrap();
        if tail.status.success() && String::from_utf8_lossy(&tail.stdout).lines().count() == 20 {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(120), "demo not streaming:\n{}", log());
        assert!(child.try_wait().unwrap().is_none(), "demo exited:\n{}", log());
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let supervisor = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .find(|l| l.contains("execve(") && l.contains("\"demo\""))
        .and_then(|l| l.split_whitespace().next()?.parse::<i32>().ok())
        .expect("the demo's execve in the trace");
    let hup = nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), nix::sys::signal::Signal::SIGHUP);
    hup.unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), nix::sys::signal::Signal::SIGINT).unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("demo did not stop:\n{}", log());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut called = std::collections::BTreeSet::new();
    for l in text.lines() {
        let Some(rest) = l.split_once(' ').map(|(_, r)| r.trim_start()) else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && rest[name.len()..].starts_with('(') {
            called.insert(name);
        }
    }
    assert!(called.contains("io_uring_enter") && called.contains("execve"), "{called:?}");
    let refused: Vec<&String> = called.iter().filter(|c| !allowed.contains(*c) || denied.contains(*c)).collect();
    assert!(refused.is_empty(), "the unit's SystemCallFilter refuses {refused:?} (called: {called:?})");
}
