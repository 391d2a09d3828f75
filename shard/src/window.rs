//! A host's read-ahead window: no head-of-line wait on an identity lookup.
//!
//! A frame whose DID the cache holds is validated and written to the ring
//! at once, without a copy (the common case). A frame that needs the
//! identity service (a miss, or a fresher document) is copied into the
//! host's window and waits there for its answer; the frames read after it,
//! whatever their DIDs, are validated as they come (their proofs checked,
//! their signatures verified from the cache) and wait behind it, ready. So
//! one account's lookup costs the others only the lookup's latency, and
//! records still enter the ring in the host's order: the host's cursor
//! never passes an event that is not delivered (a connection that ends
//! loses the window, and the host is read again from the last delivered
//! seq).
//!
//! The window is bounded in frames and bytes
//! (`limits.host_window_frames_max`, `limits.host_window_bytes_max`):
//! full, the host is read no further, so TCP backpressure reaches the PDS
//! as before. A frame that ends the connection (bad framing) stops the
//! reading too; the frames before it are delivered first.

use crate::idcache::Entry;
use crate::resolver::{Cached, Lookup, Slot};
use crate::upstream::{why, Rejected};
use crate::validate::{self, IdCheck, Prepared};
use crate::Shared;
use sluice_common::atproto::commit::CheckedCommit;
use sluice_common::atproto::frame::Event;
use sluice_common::ipc::idwire::Reason;
use sluice_common::ipc::shm::DropReason;
use sluice_common::process::host::HostAssignment;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// What the host task knows of its host for the identity checks.
pub struct HostCtx<'a> {
    pub host: &'a HostAssignment,
    /// The host's name as an identity cache entry holds a PDS.
    pub pds: u64,
}

/// What one attempt at a frame comes to.
pub enum Step {
    /// Passed: the record is in the scratch buffer; the upstream seq.
    Push(i64),
    Reject(Rejected, Option<i64>),
    /// Needs the identity service's answer.
    Wait(Box<Waiting>),
}

/// A frame waiting for an identity.
pub struct Waiting {
    pub slot: Rc<Slot>,
    /// The proof as checked (the frame is only decoded again).
    checked: Option<CheckedCommit>,
    attempt: Attempt,
}

/// Where a frame stands with its identity.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// The answer awaited (or used) is already a refresh: a failure with
    /// it drops the event (one refresh per event).
    refreshed: bool,
    /// When the frame was read (unix micros).
    received: i64,
}

/// A frame in the window.
enum Item {
    /// Validated: its ring record.
    Ready {
        seq: i64,
        record: Vec<u8>,
    },
    Rejected(Rejected, Option<i64>),
    Waiting {
        frame: Vec<u8>,
        wait: Box<Waiting>,
    },
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Ready { record, .. } => record.len(),
            Item::Rejected(..) => 64,
            Item::Waiting { frame, .. } => frame.len(),
        }
    }
}

/// What the head of the window comes to when delivered.
pub enum Delivery {
    Push { seq: i64, record: Vec<u8> },
    Reject(Rejected, Option<i64>),
}

pub struct Window<'a> {
    sh: &'a Shared,
    /// Items, each with the bytes it counted for when it came.
    items: VecDeque<(usize, Item)>,
    bytes: usize,
    /// A frame in it ends the connection: read no more.
    closing: bool,
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        self.sh.slot().window_frames.fetch_sub(self.items.len() as u64, Ordering::Relaxed);
    }
}

impl<'a> Window<'a> {
    pub fn new(sh: &'a Shared) -> Window<'a> {
        Window { sh, items: VecDeque::new(), bytes: 0, closing: false }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// May another frame be read?
    pub fn has_room(&self) -> bool {
        let s = self.sh.settings();
        !self.closing
            && self.items.len() < s.host_window_frames_max as usize
            && self.bytes < s.host_window_bytes_max as usize
    }

    fn push(&mut self, item: Item) {
        if matches!(item, Item::Rejected(Rejected::Close(..), _)) {
            self.closing = true;
        }
        let n = item.bytes();
        self.bytes += n;
        self.items.push_back((n, item));
        self.sh.slot().window_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// The slot the head waits on, if it waits.
    pub fn head_slot(&self) -> Option<Rc<Slot>> {
        match self.items.front() {
            Some((_, Item::Waiting { wait, .. })) => Some(wait.slot.clone()),
            _ => None,
        }
    }

    /// A frame just read: validated now if its identity is known, queued
    /// behind the window otherwise (or when the window is not empty).
    /// `Some` when it can go to the ring (or be dropped) at once.
    pub fn on_frame(
        &mut self,
        ctx: &HostCtx<'_>,
        data: &[u8],
        last_read: &mut i64,
        now: i64,
        out: &mut Vec<u8>,
    ) -> Option<Step> {
        let (step, seq) = first_try(self.sh, ctx, data, *last_read, now, out);
        if let Some(s) = seq {
            *last_read = s;
        }
        if self.items.is_empty() && !matches!(step, Step::Wait(_)) {
            return Some(step);
        }
        let item = match step {
            Step::Push(seq) => Item::Ready { seq, record: out.clone() },
            Step::Reject(r, seq) => Item::Rejected(r, seq),
            Step::Wait(wait) => Item::Waiting { frame: data.to_vec(), wait },
        };
        self.push(item);
        None
    }

    /// Take the head if it is ready (its answer in: validated now). None
    /// while it waits, or when the window is empty.
    pub fn take_ready(&mut self, ctx: &HostCtx<'_>, out: &mut Vec<u8>) -> Option<Delivery> {
        let (_, head) = self.items.front_mut()?;
        if let Item::Waiting { frame, wait } = head {
            let lookup = wait.slot.result()?;
            *head = match after_wait(self.sh, ctx, frame, wait, lookup, out) {
                Step::Push(seq) => Item::Ready { seq, record: out.clone() },
                Step::Reject(r, seq) => Item::Rejected(r, seq),
                Step::Wait(w) => {
                    *wait = w;
                    return None;
                }
            };
        }
        let (n, item) = self.items.pop_front().expect("a head");
        self.bytes -= n;
        self.sh.slot().window_frames.fetch_sub(1, Ordering::Relaxed);
        match item {
            Item::Ready { seq, record } => Some(Delivery::Push { seq, record }),
            Item::Rejected(r, seq) => Some(Delivery::Reject(r, seq)),
            Item::Waiting { .. } => unreachable!("replaced above"),
        }
    }
}

/// Ask the identity service for `p`'s DID.
fn ask(sh: &Shared, ctx: &HostCtx<'_>, p: &Prepared<'_>, reason: Reason, attempt: Attempt) -> Box<Waiting> {
    let did = p.did();
    let slot = sh.resolver.request(did, sh.resolver.key(did), ctx.host.id, ctx.pds, reason, attempt.received);
    Box::new(Waiting { slot, checked: p.checked.clone(), attempt })
}

/// The identity known, the rest of the checks: a pass is encoded; a
/// failure asks for a fresher document once, then drops.
fn with_identity(
    sh: &Shared,
    ctx: &HostCtx<'_>,
    data: &[u8],
    p: &Prepared<'_>,
    e: &Entry,
    attempt: Attempt,
    out: &mut Vec<u8>,
) -> Step {
    let Attempt { refreshed, received } = attempt;
    match validate::check_identity(sh, ctx.host, ctx.pds, p, e) {
        IdCheck::Pass { identity_micros } => {
            if let (Event::Identity(_), false) = (&p.ev, refreshed) {
                // The stored document names this host already: the event
                // passes now, and the service looks for news in the
                // background (rate-limited per DID and host).
                let did = p.did();
                sh.resolver.refresh(did, sh.resolver.key(did), ctx.host.id, ctx.pds, received);
            }
            match validate::encode(sh, ctx.host, data, p, identity_micros, received, out) {
                Ok(seq) => Step::Push(seq),
                Err((r, seq)) => Step::Reject(r, seq),
            }
        }
        IdCheck::Fail { refresh, .. } if !refreshed => {
            Step::Wait(ask(sh, ctx, p, refresh, Attempt { refreshed: true, received }))
        }
        IdCheck::Fail { reason, why, .. } => Step::Reject(Rejected::Drop(reason, why), Some(p.seq)),
    }
}

fn unresolved(p: &Prepared<'_>, why: &str) -> Step {
    let why = why!("{}: identity unresolved: {why}", p.did());
    Step::Reject(Rejected::Drop(DropReason::IdentityUnresolved, why), Some(p.seq))
}

/// A frame's first attempt: the stateless checks, then the identity from
/// the cache if it is there. Also the frame's seq, once it is known to be
/// above `last_read`.
fn first_try(
    sh: &Shared,
    ctx: &HostCtx<'_>,
    data: &[u8],
    last_read: i64,
    now: i64,
    out: &mut Vec<u8>,
) -> (Step, Option<i64>) {
    let p = match validate::prepare(sh, ctx.host, data, last_read, now) {
        Ok(p) => p,
        Err((r, seq)) => return (Step::Reject(r, seq), seq),
    };
    (identity_of(sh, ctx, data, &p, now, out), Some(p.seq))
}

fn identity_of(sh: &Shared, ctx: &HostCtx<'_>, data: &[u8], p: &Prepared<'_>, now: i64, out: &mut Vec<u8>) -> Step {
    let k = sh.resolver.key(p.did());
    match sh.resolver.cached(&k) {
        Cached::Hit(e) => {
            sh.slot().identity_hits.fetch_add(1, Ordering::Relaxed);
            with_identity(sh, ctx, data, p, &e, Attempt { refreshed: false, received: now }, out)
        }
        Cached::Unresolved(why) => unresolved(p, &why),
        Cached::Miss => {
            sh.slot().identity_misses.fetch_add(1, Ordering::Relaxed);
            Step::Wait(ask(sh, ctx, p, Reason::Miss, Attempt { refreshed: false, received: now }))
        }
    }
}

/// A waiting frame's answer came.
fn after_wait(sh: &Shared, ctx: &HostCtx<'_>, data: &[u8], wait: &Waiting, lookup: Lookup, out: &mut Vec<u8>) -> Step {
    let p = match validate::reprepare(ctx.host, data, wait.checked.clone()) {
        Ok(p) => p,
        Err((r, seq)) => return Step::Reject(r, seq),
    };
    match lookup {
        Lookup::Found(e) => with_identity(sh, ctx, data, &p, &e, wait.attempt, out),
        Lookup::Unresolved { why } => unresolved(&p, &why),
    }
}
