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
    let raw = sluice_common::config::RawConfig::from_toml(&text, std::path::Path::new("sluice.toml")).unwrap();
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
    for s in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(s), "{s} missing:\n{info}");
    }
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
