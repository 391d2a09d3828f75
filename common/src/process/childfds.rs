//! The descriptors a child process inherits from the supervisor, named in
//! one type ([`ChildFds`]) and passed in one environment variable
//! ([`ENV_FDS`]) as JSON: the supervisor encodes it, the child decodes it,
//! and nothing else parses descriptor numbers. The descriptors themselves
//! stay open across `exec` (the supervisor clears their close-on-exec flag
//! in the child only).

use serde::{Deserialize, Serialize};
use std::os::fd::RawFd;

/// The environment variable the supervisor sets for each child.
pub const ENV_FDS: &str = "SLUICE_FDS";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildFds {
    /// The control block (memfd).
    pub control: RawFd,
    /// The rings: every shard's for the db-writer, its own for a shard.
    pub rings: Vec<RawFd>,
    /// A shard's assignment pipe (read end); None for the db-writer.
    pub assign: Option<RawFd>,
    /// The locked `data_dir/sluice.lock` (`instance`).
    pub lock: RawFd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdsError {
    #[error("{ENV_FDS} not set: this subcommand is started by `sluice run`")]
    Missing,
    #[error("{ENV_FDS}={0:?} is not a descriptor set")]
    Invalid(String),
    #[error("{ENV_FDS} lacks {0}")]
    Lacks(&'static str),
}

impl ChildFds {
    /// The value of [`ENV_FDS`].
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("descriptor sets serialise")
    }

    pub fn decode(v: &str) -> Result<ChildFds, FdsError> {
        let fds: ChildFds = serde_json::from_str(v).map_err(|_| FdsError::Invalid(v.to_owned()))?;
        if fds.rings.is_empty() {
            return Err(FdsError::Lacks("a ring"));
        }
        if fds.all().iter().any(|fd| *fd < 0) {
            return Err(FdsError::Invalid(v.to_owned()));
        }
        Ok(fds)
    }

    /// This process's set, from its environment.
    pub fn from_env() -> Result<ChildFds, FdsError> {
        ChildFds::decode(&std::env::var(ENV_FDS).map_err(|_| FdsError::Missing)?)
    }

    /// Every descriptor in the set (those the child must inherit).
    pub fn all(&self) -> Vec<RawFd> {
        let mut v = vec![self.control, self.lock];
        v.extend(&self.rings);
        v.extend(self.assign);
        v
    }

    /// A shard's set: exactly one ring and the assignment pipe.
    pub fn shard(&self) -> Result<(RawFd, RawFd), FdsError> {
        match (self.rings.as_slice(), self.assign) {
            ([ring], Some(assign)) => Ok((*ring, assign)),
            (_, None) => Err(FdsError::Lacks("the assignment pipe")),
            _ => Err(FdsError::Invalid(self.encode())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let shard = ChildFds { control: 3, rings: vec![5], assign: Some(7), lock: 4 };
        assert_eq!(ChildFds::decode(&shard.encode()), Ok(shard.clone()));
        assert_eq!(shard.shard(), Ok((5, 7)));
        assert_eq!(shard.all(), vec![3, 4, 5, 7]);
        let writer = ChildFds { control: 3, rings: vec![5, 6], assign: None, lock: 4 };
        assert_eq!(writer.shard(), Err(FdsError::Lacks("the assignment pipe")));
        assert!(matches!(ChildFds::decode("3,4"), Err(FdsError::Invalid(_))));
        assert_eq!(
            ChildFds::decode(r#"{"control":3,"rings":[],"assign":null,"lock":4}"#),
            Err(FdsError::Lacks("a ring"))
        );
        assert!(ChildFds::decode(r#"{"control":-1,"rings":[5],"assign":null,"lock":4}"#).is_err());
    }
}
