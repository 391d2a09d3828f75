//! The embedded default: without `database_url`, a private PostgreSQL
//! cluster in `data_dir/pg`, listening only on a Unix socket, started from
//! the system's server binaries and stopped when the relay stops. As root
//! the cluster runs as the `postgres` user (initdb refuses root).
//!
//! Access rules (ARCHITECTURE.md invariants):
//! - The socket is in `data_dir/pgsock` (mode 0700, the cluster user's),
//!   or, when that path is too long for a Unix socket, in a fresh
//!   `mkdtemp` directory; no TCP listener.
//! - `pg_hba.conf` and `pg_ident.conf` are rewritten at every start: peer
//!   authentication only, for the relay's OS user (and the cluster's), as
//!   role `postgres`; no `trust`, so another local user cannot connect even
//!   where it can reach the socket.
//! - Directories are created and chowned through `O_NOFOLLOW` descriptors
//!   (a planted symlink is refused, never followed); nothing outside
//!   data_dir changes mode (as root, an ancestor the cluster's user cannot
//!   traverse is an error naming it).
//! - A postmaster running on the data directory at start was left by a
//!   killed supervisor (the instance lock is held): it is stopped and
//!   started afresh, and always stopped when `sluice run` exits.

use anyhow::{bail, Context};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct EmbeddedPg {
    bin: PathBuf,
    dir: PathBuf,
    socket_dir: PathBuf,
    /// A directory of this start's own in /tmp (data_dir's path was too
    /// long for a socket): removed on stop.
    fresh_socket_dir: bool,
    run_as: Option<String>,
    started_here: bool,
}

/// Directory holding `initdb` and `pg_ctl`: PATH first, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("pg_ctl").is_file() {
                return Ok(d);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, b)) => Ok(b),
        None => bail!(
            "no PostgreSQL server binaries found (initdb, pg_ctl on PATH or under /usr/lib/postgresql/*/bin): \
             install the Debian package `postgresql` (e.g. `apt-get install postgresql-15`), or set database_url"
        ),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Unix socket paths hold at most 107 bytes; the server's is the
/// directory plus `/.s.PGSQL.5432`.
const SOCKET_DIR_BYTES_MAX: usize = 107 - "/.s.PGSQL.5432".len();

/// Open `path` as a directory without following a symlink at its last
/// component, creating it (mode 0700) if it is missing; then make it
/// owned by `owner` (as root) and mode 0700, through the descriptor, so a
/// symlink or a swapped path is never chowned.
fn private_dir(path: &Path, owner: Option<&nix::unistd::User>) -> anyhow::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_dir() => {
            bail!("{} exists and is not a directory (a symlink?); refusing to use it", path.display())
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating {}", path.display()))?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let fd = open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if let Some(u) = owner {
        nix::unistd::fchown(fd.as_raw_fd(), Some(u.uid), Some(u.gid))
            .with_context(|| format!("chown {} to {}", path.display(), u.name))?;
    }
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))
        .with_context(|| format!("chmod 0700 {}", path.display()))?;
    Ok(())
}

/// As root, the cluster's user must be able to walk from `/` down to
/// `data_dir`. Nothing outside data_dir is changed for it: a directory it
/// cannot pass is an error that says what to do.
fn check_reachable(data_dir: &Path, u: &nix::unistd::User) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut blocked = None;
    for d in data_dir.ancestors().skip(1) {
        let m = std::fs::metadata(d).with_context(|| format!("reading {}", d.display()))?;
        let mode = m.mode();
        let ok = if m.uid() == u.uid.as_raw() {
            mode & 0o100 != 0
        } else if m.gid() == u.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            blocked = Some((d.to_path_buf(), mode & 0o7777));
        }
    }
    if let Some((d, mode)) = blocked {
        bail!(
            "the private PostgreSQL cluster runs as `{}` (root may not run it), which cannot enter {} (mode {mode:o}) \
             on the way to data_dir; put data_dir under a directory it can traverse (e.g. /var/lib/sluice), \
             allow it (chmod o+x {}), or set database_url",
            u.name,
            d.display(),
            d.display()
        );
    }
    Ok(())
}

/// The cluster's access rules, written at every start: only peer
/// authentication on the socket, for the relay's own OS user (and the
/// cluster's), both as the `postgres` role; nothing over TCP.
fn write_access_rules(dir: &Path, relay_user: &str, cluster_user: &str) -> anyhow::Result<()> {
    let hba = "# Written by sluice at every start; edits are replaced.\n\
               # Only the relay's own OS user may connect, on the Unix socket, by peer identity.\n\
               local all postgres peer map=sluice\n";
    let mut ident = "# Written by sluice at every start.\n".to_owned();
    for u in [relay_user, cluster_user] {
        ident += &format!("sluice {u} postgres\n");
    }
    std::fs::write(dir.join("pg_hba.conf"), hba)?;
    std::fs::write(dir.join("pg_ident.conf"), ident)?;
    Ok(())
}

/// `postmaster.pid`'s first line: the postmaster of this data directory.
fn postmaster_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

impl EmbeddedPg {
    /// The running postmaster's pid (for the metrics), if any.
    pub fn postmaster_pid(&self) -> Option<u32> {
        postmaster_pid(&self.dir).and_then(|p| u32::try_from(p).ok())
    }

    /// Initialise (first time) and start the cluster; returns it running.
    /// A postmaster still running on this data directory is one a killed
    /// supervisor left behind (the caller holds the instance lock): it is
    /// stopped first and started again with this start's settings.
    pub fn start(data_dir: &Path) -> anyhow::Result<EmbeddedPg> {
        let bin = find_bin()?;
        let dir = data_dir.join("pg");
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())?
            .context("the relay's OS user has no name (needed for the database's peer authentication)")?;
        let cluster_user = if is_root() {
            // The package's `postgres` user, else `nobody`: initdb refuses root.
            let u = match nix::unistd::User::from_name("postgres")? {
                Some(u) => u,
                None => {
                    tracing::warn!("no `postgres` user; the private cluster runs as `nobody`");
                    nix::unistd::User::from_name("nobody")?
                        .context("running as root needs a `postgres` (or `nobody`) user to own the private cluster")?
                }
            };
            check_reachable(data_dir, &u)?;
            Some(u)
        } else {
            None
        };
        // data_dir itself is ours: the cluster's user passes through it.
        if cluster_user.is_some() {
            let mode = std::fs::metadata(data_dir)?.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(mode | 0o001))?;
            }
        }
        private_dir(&dir, cluster_user.as_ref())?;
        // The socket lives in data_dir unless that path is too long; then in
        // a fresh directory of its own (never an existing path).
        let near = data_dir.join("pgsock");
        let (socket_dir, fresh) = if near.as_os_str().len() <= SOCKET_DIR_BYTES_MAX {
            private_dir(&near, cluster_user.as_ref())?;
            (near, false)
        } else {
            let d = nix::unistd::mkdtemp("/tmp/sluice-pg-XXXXXX").context("creating a socket directory in /tmp")?;
            private_dir(&d, cluster_user.as_ref())?;
            (d, true)
        };
        let run_as = cluster_user.as_ref().map(|u| u.name.clone());
        let mut pg = EmbeddedPg { bin, dir, socket_dir, fresh_socket_dir: fresh, run_as, started_here: false };
        if !pg.dir.join("PG_VERSION").exists() {
            tracing::info!(dir = %pg.dir.display(), "initialising the private PostgreSQL cluster");
            let out = pg
                .command("initdb")
                .args(["-D", &pg.dir.to_string_lossy(), "-U", "postgres", "--auth-local=peer", "--auth-host=reject"])
                .args(["-E", "UTF8"])
                .stdout(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!("initdb in {} failed: {}", pg.dir.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        let cluster_name = cluster_user.as_ref().map_or(me.name.as_str(), |u| u.name.as_str());
        write_access_rules(&pg.dir, &me.name, cluster_name)?;
        if pg.running()? {
            let pid = postmaster_pid(&pg.dir);
            tracing::warn!(
                dir = %pg.dir.display(),
                pid,
                "a private PostgreSQL left running by an earlier sluice (killed?); stopping it to start it afresh"
            );
            pg.started_here = true;
            pg.stop();
        }
        pg.start_server()?;
        Ok(pg)
    }

    fn running(&self) -> anyhow::Result<bool> {
        Ok(self.command("pg_ctl").args(["-D", &self.dir.to_string_lossy(), "status"]).output()?.status.success())
    }

    /// Start the cluster again if it is not running (it crashed or was
    /// killed); a no-op when it runs.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.running()? {
            return Ok(());
        }
        tracing::warn!(dir = %self.dir.display(), "private PostgreSQL is not running; starting it");
        self.start_server()
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("postgres.log");
        let mut opts = format!(
            "-c listen_addresses='' -k {} -c unix_socket_permissions=0700 -c max_connections=50 -c jit=off",
            self.socket_dir.display()
        );
        let ram = memory_bytes();
        for (k, v) in server_settings(ram) {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let out = self
            .command("pg_ctl")
            .args([
                "-D",
                &self.dir.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ])
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "pg_ctl start in {} failed: {} {:?}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                tail
            );
        }
        self.started_here = true;
        tracing::info!(socket = %self.socket_dir.display(), "private PostgreSQL started");
        Ok(())
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // Its own process group: a terminal's Ctrl-C must not stop the
        // database before the relay has flushed.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c
    }

    pub fn url(&self) -> String {
        format!("host={} user=postgres dbname=postgres", self.socket_dir.display())
    }

    pub fn stop(&mut self) {
        if !self.started_here {
            return;
        }
        self.started_here = false;
        let out = self.command("pg_ctl").args(["-D", &self.dir.to_string_lossy(), "-m", "fast", "-w", "stop"]).output();
        match out {
            Ok(o) if o.status.success() => {
                tracing::info!("private PostgreSQL stopped");
                if self.fresh_socket_dir {
                    let _ = std::fs::remove_dir_all(&self.socket_dir);
                }
            }
            Ok(o) => tracing::warn!(error = %String::from_utf8_lossy(&o.stderr).trim(), "pg_ctl stop failed"),
            Err(e) => tracing::warn!(error = %e, "pg_ctl stop failed"),
        }
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The memory the relay may use: the machine's, or its cgroup's limit
/// when lower (systemd's `MemoryMax`).
fn memory_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim();
            kb.parse::<u64>().ok()
        })
        .map_or(1 << 30, |kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|v| v.trim().parse::<u64>().ok());
    cgroup.map_or(total, |c| c.min(total))
}

/// The embedded cluster's settings for a machine of `ram` bytes
/// (ARCHITECTURE.md, "The embedded PostgreSQL"):
/// - `shared_buffers` an eighth of the memory, 128 MiB to 8 GiB: the
///   accounts' hot pages and the primary key stay in it; the rest of the
///   memory is the page cache's and the relay's own.
/// - `effective_cache_size` half the memory (a planner hint only).
/// - Checkpoints at most every 15 minutes or 4 GiB of WAL, spread over
///   90% of the interval: every first change of a page after a checkpoint
///   writes the whole page to the WAL, so rarer checkpoints are most of
///   the WAL saved per event; `wal_compression` shrinks those pages.
/// - `wal_level=minimal`, no WAL senders: nothing replicates a private
///   cluster (an operator who wants replicas or point-in-time recovery
///   runs their own PostgreSQL and sets `database_url`).
/// - Commits stay synchronous: a cursor never runs ahead of what is
///   durable.
pub fn server_settings(ram: u64) -> Vec<(&'static str, String)> {
    const MIB: u64 = 1 << 20;
    let shared = (ram / 8).clamp(128 * MIB, 8192 * MIB) / MIB;
    let cache = (ram / 2).max(256 * MIB) / MIB;
    vec![
        ("shared_buffers", format!("{shared}MB")),
        ("effective_cache_size", format!("{cache}MB")),
        ("max_wal_size", "4GB".to_owned()),
        ("min_wal_size", "256MB".to_owned()),
        ("checkpoint_timeout", "15min".to_owned()),
        ("checkpoint_completion_target", "0.9".to_owned()),
        ("wal_compression", "on".to_owned()),
        ("wal_level", "minimal".to_owned()),
        ("max_wal_senders", "0".to_owned()),
        ("synchronous_commit", "on".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_machine_within_bounds() {
        let get = |ram: u64, k: &str| server_settings(ram).into_iter().find(|(n, _)| *n == k).unwrap().1;
        assert_eq!(get(24 << 30, "shared_buffers"), "3072MB");
        assert_eq!(get(24 << 30, "effective_cache_size"), "12288MB");
        assert_eq!(get(512 << 20, "shared_buffers"), "128MB", "never below PostgreSQL's default");
        assert_eq!(get(256 << 30, "shared_buffers"), "8192MB");
        assert!(memory_bytes() >= 64 << 20);
    }

    /// V14 packs host ids into `accounts.host` below 2^23: a database
    /// with a host id at or past it stops the migration with a message
    /// saying so, before anything is rewritten.
    #[test]
    fn v14_refuses_a_host_id_past_its_packing() {
        use sluice_dbwriter::db;
        let (_dir, mut pg, url) = at_version("before_v14", 13);
        let mut c = db::connect(&url).unwrap();
        c.batch_execute("INSERT INTO hosts (id, hostname) VALUES (8388608, 'far.example.com')").unwrap();
        let err = format!("{:#}", db::migrate(&url, 1).unwrap_err());
        assert!(err.contains("8388608 (2^23)"), "{err}");
        let v: i64 = c.query_one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'flags'", &[]).unwrap().get(0);
        assert_eq!(v, 1, "V13's accounts table untouched");
        drop(c);
        pg.stop();
    }

    /// Migration V10 (compact accounts) keeps every row of today's schema
    /// and stores each as the db-writer's Rust reads and writes it; the
    /// SQL functions it brings (`sluice_did_key`, `sluice_tid_value`)
    /// agree with `DidKey::stored` and `tid_value`.
    #[test]
    fn compact_accounts_migration_keeps_every_row() {
        use sluice_common::atproto::cid::{binary_digest, binary_fingerprint, Cid, Codec};
        use sluice_common::atproto::did::{plc_did, DidKey};
        use sluice_common::atproto::policy::{AccountState, UpstreamStatus};
        use sluice_common::atproto::syntax::{tid_value, Tid};
        use sluice_dbwriter::db;
        let (_dir, mut pg, url) = at_version("before_v10", 9);
        let mut c = db::connect(&url).unwrap();
        let host: i64 =
            c.query_one("INSERT INTO hosts (hostname) VALUES ('pds.example.com') RETURNING id", &[]).unwrap().get(0);
        let cid = |n: u32| Cid::compute(Codec::DagCbor, &n.to_be_bytes()).to_bytes().to_vec();
        // (did, active, status word, taken down, throttled, rev, commit, data)
        type Row = (String, bool, Option<&'static str>, bool, bool, Option<String>, Option<Vec<u8>>, Option<Vec<u8>>);
        let words = [None, Some("deactivated"), Some("deleted"), Some("takendown"), Some("on-vacation")];
        let mut rows: Vec<Row> = (0..600u32)
            .map(|i| {
                let id: [u8; 15] = Cid::compute(Codec::Raw, &i.to_le_bytes()).digest()[..15].try_into().unwrap();
                let did = if i % 7 == 3 { format!("did:web:pds{i}.example.com") } else { plc_did(&id) };
                let word = words[i as usize % words.len()];
                let rev =
                    (i % 5 != 4).then(|| Tid::from_micros(1_700_000_000_000_000 + u64::from(i) * 977, 3).into_string());
                let commit = rev.as_ref().map(|_| cid(i));
                (
                    did,
                    word.is_none(),
                    word,
                    i % 11 == 0,
                    i % 13 == 0,
                    rev,
                    commit.clone(),
                    commit.map(|_| cid(i + 10_000)),
                )
            })
            .collect();
        rows.push(("did:plc:short".into(), true, None, false, false, None, None, None));
        // Host checks in microseconds; V14 keeps whole seconds, rounded
        // down (the first row's 0, never, stays 0).
        let checked = |k: usize| if k == 0 { 0 } else { 1_750_000_000_000_000 + k as i64 * 1_234_567 };
        for (k, r) in rows.iter().enumerate() {
            let status = if r.3 {
                "takendown"
            } else if r.1 {
                "active"
            } else {
                "deactivated"
            };
            c.execute(
                "INSERT INTO accounts (did, host_id, status, upstream_active, upstream_status, takendown, throttled, rev,
                   commit_cid, data_cid, host_checked_micros) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[&r.0, &host, &status, &r.1, &r.2, &r.3, &r.4, &r.5, &r.6, &r.7, &checked(k)],
            )
            .unwrap();
        }
        // Ids repeated requestCrawls took from the sequence before V14:
        // past the 2^23 that V14's packed `host` column allows.
        c.batch_execute("SELECT setval(pg_get_serial_sequence('hosts', 'id'), 9000000)").unwrap();
        db::migrate(&url, 1).unwrap();
        let next: i64 =
            c.query_one("INSERT INTO hosts (hostname) VALUES ('next.example.com') RETURNING id", &[]).unwrap().get(0);
        assert_eq!(next, host + 1, "the sequence goes on from the largest id in use");
        let keys: Vec<DidKey> = rows.iter().map(|r| DidKey::stored(&r.0)).collect();
        let got = db::load_accounts(&mut c, &keys).unwrap();
        assert_eq!(got.len(), rows.len(), "every row kept");
        for (k, r) in rows.iter().enumerate() {
            let want = AccountState {
                host_id: host,
                upstream_active: r.1,
                upstream_status: UpstreamStatus::from_word(r.2),
                takendown: r.3,
                throttled: r.4,
                rev: r.5.as_deref().and_then(tid_value),
                commit: r.6.as_deref().and_then(binary_digest),
                data_fp: r.7.as_deref().and_then(binary_fingerprint),
                host_checked_micros: db::checked_micros(db::checked_secs(checked(k))),
                // Migrated rows are not in the collection index yet.
                no: 0,
            };
            assert_eq!(got[&keys[k]], want, "{}", r.0);
            assert!(checked(k) - want.host_checked_micros < 1_000_000);
        }
        // The word the lexicons do not know is kept as the host said it;
        // every account is listed under its DID again.
        let odd: i64 =
            c.query_one("SELECT count(*) FROM accounts WHERE upstream_status = 'on-vacation'", &[]).unwrap().get(0);
        assert_eq!(odd, rows.iter().filter(|r| r.2 == Some("on-vacation")).count() as i64);
        let listed: std::collections::HashSet<String> =
            db::repos_page(&mut c, "", 10_000).unwrap().into_iter().map(|h| h.did).collect();
        for r in rows.iter().filter(|r| r.5.is_some()) {
            assert!(listed.contains(&r.0), "{} not listed", r.0);
        }
        // The SQL functions agree with Rust, including on what is not a
        // did:plc or a TID.
        for r in &rows {
            let k: uuid::Uuid = c.query_one("SELECT sluice_did_key($1)", &[&r.0]).unwrap().get(0);
            assert_eq!(*k.as_bytes(), DidKey::stored(&r.0).0, "{}", r.0);
            if let Some(rev) = &r.5 {
                let v: Option<i64> = c.query_one("SELECT sluice_tid_value($1)", &[rev]).unwrap().get(0);
                assert_eq!(v.map(|v| v as u64), tid_value(rev));
            }
        }
        for odd in ["did:plc:UPPERCASEUPPERCASEUPPERC", "did:plc:0123456789abcdefghijklmn", "did:web:a"] {
            let k: uuid::Uuid = c.query_one("SELECT sluice_did_key($1)", &[&odd]).unwrap().get(0);
            assert_eq!(*k.as_bytes(), DidKey::stored(odd).0, "{odd}");
        }
        let none: Option<i64> = c.query_one("SELECT sluice_tid_value('not-a-tid')", &[]).unwrap().get(0);
        assert_eq!(none, None);
        drop(c);
        pg.stop();
    }

    /// A migrated database's `accounts` (V12), for the tests below.
    fn migrated(name: &str) -> (tempfile::TempDir, EmbeddedPg, postgres::Client) {
        use sluice_dbwriter::db;
        let (dir, pg, url) = at_version(name, 0);
        db::migrate(&url, 1).unwrap();
        let c = db::connect(&url).unwrap();
        (dir, pg, c)
    }

    /// A private cluster with database `name` migrated up to `version`
    /// (0: none yet), and its URL.
    fn at_version(name: &str, version: u32) -> (tempfile::TempDir, EmbeddedPg, String) {
        use sluice_dbwriter::db;
        let dir = tempfile::tempdir().unwrap();
        let pg = EmbeddedPg::start(dir.path()).unwrap();
        db::connect(&pg.url()).unwrap().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let url = pg.url().replace("dbname=postgres", &format!("dbname={name}"));
        if version > 0 {
            db::migrate_to(&url, version).unwrap();
        }
        (dir, pg, url)
    }

    /// V12: no column takes NULL, and the queries on account numbers go
    /// through the partial index `accounts_no`.
    #[test]
    fn accounts_rows_carry_no_nulls_and_numbers_use_their_index() {
        use sluice_dbwriter::db;
        let (_dir, mut pg, mut c) = migrated("v12_plans");
        // V12: no column may hold NULL (a null bitmap costs 8 bytes a row).
        let nullable: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND is_nullable = 'YES'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(nullable, 0, "accounts columns that take NULL");
        // The queries on account numbers go through the partial index
        // (`no <> 0`), never a scan of 40 million rows. (A page's 2,000
        // numbers: past 100 constants the planner no longer proves
        // `no = ANY(..)` implies `no <> 0` by itself.)
        c.batch_execute("SET enable_seqscan = off").unwrap();
        let range = db::accounts_in_range_sql().replace("$1", "1000").replace("$2", "3000");
        for q in [db::accounts_by_no_sql(), range, "SELECT max(no) FROM accounts WHERE no <> 0".to_owned()] {
            let plan: Vec<String> = c
                .query(&format!("EXPLAIN {}", q.replace("$1", "ARRAY(SELECT generate_series(1, 2000))")), &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(plan.iter().any(|l| l.contains("accounts_no")), "{q}: {plan:#?}");
        }
        drop(c);
        pg.stop();
    }

    /// V13: an event's write (rev, commit, data fingerprint) is a HOT
    /// update: the page's one version of room (fillfactor 98), pruned
    /// between group commits, takes it and the key's index is untouched.
    /// Rounds as the db-writer's: 50 accounts of 100,000 each, a
    /// transaction each: with V14's 80 rows a page, 1,961 and 1,965 of
    /// 2,000 HOT in two runs (the rest are two updates to one page in one
    /// round); at fillfactor 100, 957.
    #[test]
    fn an_events_write_is_a_hot_update() {
        use sluice_common::atproto::did::DidKey;
        use sluice_common::atproto::policy::AccountState;
        use sluice_dbwriter::db;
        let (_dir, mut pg, mut c) = migrated("v13_hot");
        c.batch_execute("INSERT INTO hosts (hostname) VALUES ('pds.example.com')").unwrap();
        let stmt = c.prepare(db::UPSERT).unwrap();
        let keys: Vec<DidKey> = (0..100_000).map(|i| DidKey::stored(&format!("did:web:a{i}.example.com"))).collect();
        // Accounts that have committed before: a row keeps its size.
        let fresh = AccountState {
            host_id: 1,
            upstream_active: true,
            rev: Some(1 << 10),
            commit: Some([0; 32]),
            data_fp: Some(1),
            ..AccountState::default()
        };
        let states: std::collections::HashMap<_, _> = keys.iter().map(|k| (*k, fresh)).collect();
        c.execute(&stmt, &db::UpsertColumns::new(&states, &Default::default()).params()).unwrap();
        // V14: a row is 96 bytes (72 of data), and 80 fill a page: 1,250
        // pages (81 at fillfactor 100 would be 1,235; 74 before V14, 1,352).
        let r = c
            .query_one("SELECT max(pg_column_size(a.*)), count(DISTINCT (ctid::text::point)[0]) FROM accounts a", &[])
            .unwrap();
        assert_eq!((r.get::<_, i32>(0), r.get::<_, i64>(1)), (96, 1250), "row bytes, pages");
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(13);
        for round in 1..=40u64 {
            let st = AccountState {
                rev: Some(round << 10),
                commit: Some([round as u8; 32]),
                data_fp: Some(round as i16),
                ..fresh
            };
            let states: std::collections::HashMap<_, _> =
                rand::seq::index::sample(&mut rng, keys.len(), 50).iter().map(|i| (keys[i], st)).collect();
            c.execute(&stmt, &db::UpsertColumns::new(&states, &Default::default()).params()).unwrap();
        }
        // The counters as this backend reports them when it goes idle.
        c.batch_execute("SELECT pg_stat_force_next_flush()").unwrap();
        let r = c
            .query_one("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'accounts'", &[])
            .unwrap();
        let (updated, hot): (i64, i64) = (r.get(0), r.get(1));
        eprintln!("HOT updates: {hot} of {updated}");
        assert_eq!(updated, 2000, "every account of every round rewritten once");
        assert!(hot * 100 >= updated * 95, "HOT updates {hot} of {updated}");
        drop(c);
        pg.stop();
    }

    #[test]
    fn upsert_round_trips_what_the_db_writer_writes() {
        use sluice_common::atproto::did::DidKey;
        use sluice_common::atproto::policy::{AccountState, UpstreamStatus};
        use sluice_dbwriter::db;
        let (_dir, mut pg, mut c) = migrated("v12_upsert");
        c.batch_execute("INSERT INTO hosts (hostname) VALUES ('pds.example.com')").unwrap();
        // What the db-writer writes (V12's "none" values included) reads
        // back as written; an unknown word is kept until a known code
        // replaces it; a number, once given, stays.
        let stmt = c.prepare(db::UPSERT).unwrap();
        // The round statement the db-writer prepares at start numbers its
        // parameters after UPSERT's.
        db::CommitStatements::prepare(&mut c).unwrap();
        let mut states = std::collections::HashMap::new();
        let mut words = std::collections::HashMap::new();
        let bare = DidKey::stored("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        states.insert(bare, AccountState { host_id: 1, ..AccountState::default() });
        let full = DidKey::stored("did:web:full.example.com");
        let mut st = AccountState {
            host_id: 1,
            rev: Some(7 << 10),
            commit: Some([9; 32]),
            data_fp: Some(-5),
            upstream_status: UpstreamStatus::Other,
            host_checked_micros: 1_800_000_000_000_000,
            no: 17,
            ..AccountState::default()
        };
        states.insert(full, st);
        words.insert(full, "on-vacation".to_owned());
        c.execute(&stmt, &db::UpsertColumns::new(&states, &words).params()).unwrap();
        let got = db::load_accounts(&mut c, &[bare, full]).unwrap();
        assert_eq!(got[&bare], states[&bare]);
        assert_eq!(got[&full], st);
        st.no = 18;
        st.rev = Some(8 << 10);
        states.insert(full, st);
        c.execute(&stmt, &db::UpsertColumns::new(&states, &Default::default()).params()).unwrap();
        let got = db::load_accounts(&mut c, &[full]).unwrap();
        assert_eq!((got[&full].no, got[&full].rev), (17, Some(8 << 10)), "number kept, rev moved");
        let word = |c: &mut postgres::Client| -> String {
            c.query_one("SELECT upstream_status FROM accounts WHERE did = $1", &[&db::uuid_of(&full)]).unwrap().get(0)
        };
        assert_eq!(word(&mut c), "on-vacation");
        st.upstream_status = UpstreamStatus::None;
        states.insert(full, st);
        c.execute(&stmt, &db::UpsertColumns::new(&states, &Default::default()).params()).unwrap();
        assert_eq!(word(&mut c), "");
        // A host check reads back in whole seconds, rounded down; the
        // largest host id and every flag in the packed `host` column.
        st.host_checked_micros += 999_999;
        st.host_id = db::HOST_ID_LIMIT - 1;
        st.takendown = true;
        st.throttled = true;
        st.data_fp = Some(i16::MIN);
        states.insert(full, st);
        c.execute(&stmt, &db::UpsertColumns::new(&states, &Default::default()).params()).unwrap();
        let got = db::load_accounts(&mut c, &[full]).unwrap()[&full];
        assert_eq!(got, AccountState { host_checked_micros: 1_800_000_000_000_000, no: 17, ..st });
        let takendown: i64 = c.query_one("SELECT count(*) FROM accounts WHERE (host & 2) <> 0", &[]).unwrap().get(0);
        assert_eq!(takendown, 1);
        drop(c);
        pg.stop();
    }
    /// The identity store's prepared statements: a save gives new
    /// endpoints numbers and reuses known ones, keeps the newer of one DID
    /// twice in a batch, never lets an older answer overwrite a newer one,
    /// and a load returns what was saved (and nothing for a DID not
    /// stored).
    #[test]
    fn identity_statements_save_and_load() {
        use sluice_common::ipc::idwire::IdentityRecord;
        use sluice_dbwriter::db;
        let (_dir, mut pg, mut c) = migrated("identities");
        let s = db::IdentityStatements::prepare(&mut c).unwrap();
        let rec = |did: &str, pds: Option<&str>, handle: &str, at: i64| IdentityRecord {
            did: did.to_owned(),
            key: Some((0, [2; 33])),
            pds: pds.map(str::to_owned),
            handle: Some(handle.to_owned()),
            as_of_micros: at,
        };
        let (a, b, web) = ("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "did:web:c.test");
        db::save_identities(&mut c, &s, &[rec(a, Some("https://one.test"), "a.test", 10)]).unwrap();
        db::save_identities(
            &mut c,
            &s,
            &[
                rec(b, Some("https://one.test"), "b.test", 10),
                rec(b, Some("https://two.test"), "b2.test", 20),
                rec(web, None, "c.test", 5),
                // Older than what is stored: not written.
                rec(a, Some("https://two.test"), "old.test", 9),
            ],
        )
        .unwrap();
        let endpoints: i64 = c.query_one("SELECT count(*) FROM pds_endpoints", &[]).unwrap().get(0);
        assert_eq!(endpoints, 2, "one.test kept its number, two.test got one");
        let got = db::load_identities(&mut c, &s, &[a, b, web, "did:plc:cccccccccccccccccccccccc"]).unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[a], rec(a, Some("https://one.test"), "a.test", 10));
        assert_eq!(got[b], rec(b, Some("https://two.test"), "b2.test", 20));
        assert_eq!(got[web], rec(web, None, "c.test", 5));
        drop(c);
        pg.stop();
    }
}
