//! The embedded default: without `database_url`, a private PostgreSQL
//! cluster in `data_dir/pg`, listening only on a Unix socket, started from
//! the system's server binaries and stopped when the relay stops. As root
//! the cluster runs as the `postgres` user (initdb refuses root).

use anyhow::{bail, Context};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct EmbeddedPg {
    bin: PathBuf,
    dir: PathBuf,
    socket_dir: PathBuf,
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

impl EmbeddedPg {
    /// Initialise (first time) and start the cluster; returns it running.
    pub fn start(data_dir: &Path) -> anyhow::Result<EmbeddedPg> {
        let bin = find_bin()?;
        let dir = data_dir.join("pg");
        // Unix socket paths are limited to 107 bytes: keep it short.
        let tag = sluice_common::ringrec::did_hash(&data_dir.to_string_lossy());
        let socket_dir = PathBuf::from(format!("/tmp/sluice-pg-{tag:016x}"));
        std::fs::create_dir_all(&socket_dir).with_context(|| format!("creating {}", socket_dir.display()))?;
        let run_as = if is_root() {
            // The package's `postgres` user, else `nobody`: initdb refuses root.
            let (user, u) = match nix::unistd::User::from_name("postgres")? {
                Some(u) => ("postgres", u),
                None => {
                    let u = nix::unistd::User::from_name("nobody")?
                        .context("running as root needs a `postgres` (or `nobody`) user to own the private cluster")?;
                    tracing::warn!("no `postgres` user; the private cluster runs as `nobody`");
                    ("nobody", u)
                }
            };
            // The cluster's user must reach data_dir/pg.
            let mut p = Some(data_dir);
            while let Some(d) = p {
                if let Ok(m) = std::fs::metadata(d) {
                    let mode = m.permissions().mode();
                    if mode & 0o001 == 0 {
                        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))?;
                    }
                }
                p = d.parent();
            }
            std::fs::create_dir_all(&dir)?;
            for d in [&dir, &socket_dir] {
                nix::unistd::chown(d.as_path(), Some(u.uid), Some(u.gid))?;
            }
            Some(user.to_owned())
        } else {
            std::fs::create_dir_all(&dir)?;
            None
        };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let mut pg = EmbeddedPg { bin, dir, socket_dir, run_as, started_here: false };
        if !pg.dir.join("PG_VERSION").exists() {
            tracing::info!(dir = %pg.dir.display(), "initialising the private PostgreSQL cluster");
            let out = pg
                .command("initdb")
                .args(["-D", &pg.dir.to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .stdout(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!("initdb in {} failed: {}", pg.dir.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        let status = pg.command("pg_ctl").args(["-D", &pg.dir.to_string_lossy(), "status"]).output()?;
        if status.status.success() {
            tracing::info!(dir = %pg.dir.display(), "private PostgreSQL already running; using it");
            return Ok(pg);
        }
        pg.start_server()?;
        Ok(pg)
    }

    /// Start the cluster again if it is not running (it crashed or was
    /// killed); a no-op when it runs.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        let status = self.command("pg_ctl").args(["-D", &self.dir.to_string_lossy(), "status"]).output()?;
        if status.status.success() {
            return Ok(());
        }
        tracing::warn!(dir = %self.dir.display(), "private PostgreSQL is not running; starting it");
        self.start_server()
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("postgres.log");
        let opts = format!("-c listen_addresses='' -k {} -c max_connections=50", self.socket_dir.display());
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
            Ok(o) if o.status.success() => tracing::info!("private PostgreSQL stopped"),
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
