//! One relay per data directory: `data_dir/sluice.lock`, held with an
//! exclusive `flock` by the supervisor for its whole life (and by nothing
//! else), holding the holder's PID as text.
//!
//! - [`InstanceLock::acquire`]: the supervisor takes the lock before it
//!   touches anything else in the directory; if another process holds it,
//!   the error names that process's PID and nothing was changed.
//! - Children (`sluice db-writer`, `sluice shard`) inherit the locked
//!   descriptor (`ChildFds::lock`, `crate::process::childfds`) and [`check_child`] confirms it is this
//!   directory's lock file (same inode). Started by hand without it, they
//!   try the lock themselves: held by a relay means "exit, naming it".
//!
//! The kernel drops a `flock` when the last descriptor of it closes, so a
//! killed supervisor's lock goes with its children (PR_SET_PDEATHSIG).

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir} is in use by another sluice (PID {pid}); one relay per data_dir")]
    Held { dir: PathBuf, pid: String },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

/// The held lock; dropping it releases the directory.
#[derive(Debug)]
pub struct InstanceLock {
    file: Flock<File>,
    path: PathBuf,
}

pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("sluice.lock")
}

impl InstanceLock {
    /// Take `data_dir`'s lock (the directory must exist) and write our PID.
    pub fn acquire(data_dir: &Path) -> Result<InstanceLock, LockError> {
        let path = lock_path(data_dir);
        let io = |err| LockError::Io { path: path.clone(), err };
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = if pid.trim().is_empty() { "unknown".to_owned() } else { pid.trim().to_owned() };
                return Err(LockError::Held { dir: data_dir.to_owned(), pid });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(InstanceLock { file, path })
    }

    /// The descriptor to pass to children (it must survive exec).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How a child runs: under its supervisor's lock, or holding its own.
#[derive(Debug)]
pub enum ChildLock {
    /// The inherited descriptor is this directory's lock.
    Inherited,
    /// Started by hand on a directory no relay holds.
    Own(InstanceLock),
}

/// A child's check before it touches `data_dir`: the inherited lock
/// descriptor (in `inherited`, from `ChildFds::lock`) must be the lock file
/// of this directory; without one, the lock must be free.
pub fn check_child(data_dir: &Path, inherited: Option<RawFd>) -> Result<ChildLock, LockError> {
    let path = lock_path(data_dir);
    if let Some(fd) = inherited {
        let theirs = nix::sys::stat::fstat(fd);
        if let (Ok(a), Ok(b)) = (theirs, std::fs::metadata(&path)) {
            if a.st_ino == b.ino() && a.st_dev == b.dev() {
                return Ok(ChildLock::Inherited);
            }
        }
    }
    InstanceLock::acquire(data_dir).map(ChildLock::Own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = InstanceLock::acquire(dir.path()).unwrap();
        let e = InstanceLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(&e, LockError::Held { pid, .. } if *pid == std::process::id().to_string()), "{e}");
        assert!(e.to_string().contains("one relay per data_dir"), "{e}");
        // A child with the holder's descriptor runs under it; without it,
        // it is refused while the lock is held.
        assert!(matches!(check_child(dir.path(), Some(a.fd())).unwrap(), ChildLock::Inherited));
        assert!(matches!(check_child(dir.path(), None), Err(LockError::Held { .. })));
        // Another directory's descriptor does not count.
        let other = tempfile::tempdir().unwrap();
        let b = InstanceLock::acquire(other.path()).unwrap();
        assert!(matches!(check_child(dir.path(), Some(b.fd())), Err(LockError::Held { .. })));
        drop(a);
        let c = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(c.path()).unwrap().trim(), std::process::id().to_string());
    }
}
