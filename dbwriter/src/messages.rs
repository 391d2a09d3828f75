//! What the query workers and the recheck thread send the sequencer, and
//! the flagger's jobs: plain data, importing nothing of the crate, so the
//! senders and the sequencer do not import each other.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Commands waiting for the sequencer.
pub const QUEUE_MAX: usize = 64;

/// What the sequencer is asked to do.
pub enum Command {
    /// Take the account down (`true`) or reverse it (`false`); the reply is
    /// the relay seq of the emitted `#account` event, once durable.
    Takedown { did: String, takedown: bool, reply: SyncSender<Result<i64, Refused>> },
    /// Set a host's upstream cursor (after its seq went backwards: a
    /// restored or rebuilt PDS). The reply is the previous cursor.
    HostCursor { host_id: i64, cursor: i64, reply: SyncSender<Result<i64, Refused>> },
    /// What an account's PDS said when asked (`crate::recheck`).
    UpstreamStatus(Answer),
}

pub fn channel() -> (SyncSender<Command>, Receiver<Command>) {
    sync_channel(QUEUE_MAX)
}

/// Flag (or unflag) the records of some DIDs up to a seq in the event log.
/// The relay's own takedown `#account` events stay visible.
pub struct FlagJob {
    pub dids: Vec<String>,
    pub upto_seq: i64,
    pub on: bool,
}

/// What an account's PDS said when asked (`crate::recheck`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub did: String,
    pub host_id: i64,
    pub active: bool,
    pub status: Option<String>,
}

/// Why the sequencer did not carry out an admin command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0:?} is not a DID")]
    NotADid(String),
    #[error("{0} is not an account this relay has seen")]
    UnknownAccount(String),
    /// Postgres or the event log failed; `subject` is the DID or host.
    #[error("{subject}: {detail}")]
    Failed { subject: String, detail: String },
}
