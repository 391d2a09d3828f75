//! The checks of one upstream frame, synchronous, in two halves: what the
//! frame alone can prove ([`prepare`]: decode, seq order, the commit's CAR,
//! fields and Sync 1.1 proof), and what needs the DID's identity
//! ([`check_identity`]: the document names this host; the signature
//! verifies with its key). [`encode`] writes the ring record of an event
//! that passed both.
//!
//! The host task ([`crate::upstream`]) runs the first half at once and the
//! second as soon as the identity is known: from the cache on the spot,
//! or later, when the identity service answers (the frame waits in its
//! host's window meanwhile, its proof already checked: [`Prepared::checked`]
//! is kept, the frame is decoded again, which is cheap).

use crate::upstream::{why, Rejected, Why};
use crate::Shared;
use sluice_common::atproto::commit::{check_commit, check_sync, CheckedCommit, Mode};
use sluice_common::atproto::frame::{self, Event};
use sluice_common::ipc::idwire::Reason;
use sluice_common::ipc::ringrec::{self, Origin};
use sluice_common::ipc::shm::{DropReason, UpstreamClose};
use sluice_common::process::host::HostAssignment;

/// A check's outcome: what it found, or why the event is rejected (with
/// its seq when known, so the cursor can pass it).
pub type Verdict<T> = Result<T, (Rejected, Option<i64>)>;

/// A frame through the checks that need nothing but the frame.
pub struct Prepared<'a> {
    pub ev: Event<'a>,
    pub seq: i64,
    /// Byte range of the body's `seq` value inside the frame.
    pub span: (usize, usize),
    /// `#commit` and `#sync`: the commit as checked (owned: it outlives
    /// the frame's buffer while the identity is looked up).
    pub checked: Option<CheckedCommit>,
}

impl Prepared<'_> {
    pub fn did(&self) -> &str {
        self.ev.did().expect("events with a seq have a DID")
    }
}

/// Decode a frame into an event with a seq above `last_seq`, and the byte
/// span of that seq in the frame.
fn decode_event<'a>(host: &HostAssignment, data: &'a [u8], last_seq: i64) -> Verdict<(Event<'a>, i64, (usize, usize))> {
    let decoded =
        frame::decode(data).map_err(|e| (Rejected::Close(UpstreamClose::BadFrame, format!("frame: {e}")), None))?;
    let ev = match decoded.message {
        frame::Message::Error { error, message } => {
            let why = format!("error frame {error}: {}", message.unwrap_or(""));
            return Err((Rejected::Close(UpstreamClose::BadFrame, why), None));
        }
        frame::Message::Event(ev) => ev,
    };
    let seq = match (&ev, ev.seq()) {
        (Event::Info(i), _) => {
            tracing::info!(host = host.hostname, name = i.name, message = i.message, "upstream #info");
            return Err((Rejected::Drop(DropReason::Info, Why::Borrowed("info")), None));
        }
        (_, None) => {
            let why = why!("unknown message type {}", ev.type_name());
            return Err((Rejected::Drop(DropReason::UnknownType, why), None));
        }
        (_, Some(s)) => s,
    };
    if seq <= last_seq {
        return Err((Rejected::Drop(DropReason::OldSeq, why!("seq {seq} not above {last_seq}")), None));
    }
    let span =
        decoded.seq_span.ok_or((Rejected::Drop(DropReason::Malformed, Why::Borrowed("no seq span")), Some(seq)))?;
    Ok((ev, seq, span))
}

/// The first half: decode, seq order, and for a commit or sync its CAR,
/// fields and proof.
pub fn prepare<'a>(
    sh: &Shared,
    host: &HostAssignment,
    data: &'a [u8],
    last_seq: i64,
    now: i64,
) -> Verdict<Prepared<'a>> {
    let (ev, seq, span) = decode_event(host, data, last_seq)?;
    let drop = |reason, why: Why| (Rejected::Drop(reason, why), Some(seq));
    let mode = if sh.settings().strict { Mode::Strict } else { Mode::Lenient };
    let checked = match &ev {
        Event::Commit(c) => {
            Some(check_commit(c, mode, now).map_err(|e| drop(DropReason::InvalidCommit, why!("{}: {e}", c.repo)))?)
        }
        Event::Sync(s) => Some(check_sync(s, now).map_err(|e| drop(DropReason::InvalidSync, why!("{}: {e}", s.did)))?),
        _ => None,
    };
    Ok(Prepared { ev, seq, span, checked })
}

/// A waiting frame again, with the proof already checked: decode only.
pub fn reprepare<'a>(host: &HostAssignment, data: &'a [u8], checked: Option<CheckedCommit>) -> Verdict<Prepared<'a>> {
    let (ev, seq, span) = decode_event(host, data, i64::MIN)?;
    Ok(Prepared { ev, seq, span, checked })
}

/// What the identity says of an event.
pub enum IdCheck {
    /// Its host is the DID's PDS (and a commit's signature verifies):
    /// when the document was known current.
    Pass { identity_micros: i64 },
    /// It fails; a fresher document (asked with `refresh`) may pass it.
    Fail { reason: DropReason, why: Why, refresh: Reason },
}

/// The second half, with the DID's identity: host authority, then for a
/// commit or sync the signature. `host_pds`: the host's own PDS hash.
pub fn check_identity(
    sh: &Shared,
    host: &HostAssignment,
    host_pds: u64,
    p: &Prepared<'_>,
    e: &crate::idcache::Entry,
) -> IdCheck {
    let did = p.did();
    if e.pds == 0 {
        return IdCheck::Fail {
            reason: DropReason::WrongHost,
            why: why!("{did} has no PDS endpoint"),
            refresh: Reason::WrongHost,
        };
    }
    if e.pds != host_pds {
        return IdCheck::Fail {
            reason: DropReason::WrongHost,
            why: why!("{did}'s document names another PDS than {}", host.hostname),
            refresh: Reason::WrongHost,
        };
    }
    let Some(c) = &p.checked else { return IdCheck::Pass { identity_micros: e.as_of_micros } };
    let Some(key) = &e.key else {
        return IdCheck::Fail {
            reason: DropReason::NoSigningKey,
            why: why!("{did} has no signing key"),
            refresh: Reason::BadSignature,
        };
    };
    match sh.resolver.verify(key, &c.unsigned_sha256, &c.sig) {
        Ok(()) => IdCheck::Pass { identity_micros: e.as_of_micros },
        Err(err) => IdCheck::Fail {
            reason: DropReason::BadSignature,
            why: why!("{did}: signature: {err}"),
            refresh: Reason::BadSignature,
        },
    }
}

/// The ring record of an event that passed both halves, into `out`;
/// returns its seq.
pub fn encode(
    sh: &Shared,
    host: &HostAssignment,
    data: &[u8],
    p: &Prepared<'_>,
    identity_micros: i64,
    now: i64,
    out: &mut Vec<u8>,
) -> Verdict<i64> {
    let did = p.did();
    let at = Origin { host_id: host.id, frame: data, seq_span: p.span, time_micros: now, identity_micros };
    let encoded = ringrec::encode_event(&p.ev, p.checked.as_ref(), at, out);
    if !encoded {
        // `prepare` lets none of these through; counted, never a panic.
        let why = why!("{did}: {} has no ring record", p.ev.type_name());
        return Err((Rejected::Drop(DropReason::UnknownType, why), Some(p.seq)));
    }
    if out.len() > sh.payload_max {
        let why = why!("{did}: record of {} bytes exceeds the ring's limit", out.len());
        return Err((Rejected::Drop(DropReason::TooLarge, why), Some(p.seq)));
    }
    Ok(p.seq)
}
