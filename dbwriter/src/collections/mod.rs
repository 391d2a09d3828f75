//! listReposByCollection's index, kept by the sequencer from the stream.
//!
//! Each relayed `#commit` carries, from its shard, what it leaves of each
//! collection its ops touch (`atproto::commit::collection_presence`: a
//! create or update means present; a delete's MST neighbours in the CAR
//! slice prove whether another record of the collection is left). The
//! sequencer sets or clears the account's bit in that collection's bitmap
//! ([`index`]). The round's transaction appends its changes as rows of
//! `collection_changes` (tens of bytes each); every
//! `limits.collection_changes_max` rows
//! or [`COMPACT_EVERY`], a round writes the changed chunks whole instead
//! and empties that table. Either way the index is durable exactly as far
//! as the event log (a start applies the change rows to the chunks).
//!
//! What the commits cannot tell (a `#sync`, an account first seen
//! mid-history, a delete whose slice does not reach its neighbours) is
//! asked of the account's PDS ([`check`]), its place in `collection_checks`
//! written in the same transaction; the answer replaces the account's
//! collections unless a commit came meanwhile (then it is asked again).
//!
//! Account numbers (`accounts.no`) are given the first time an account is
//! placed, in order; a number is never given twice (the next one is read
//! as max + 1 at start). A failed transaction can leave bits for numbers
//! no account got: the listing skips numbers without an account.

pub mod check;
pub mod index;

use crate::db::IndexChanges;
use check::{Answer, Found};
use index::CollectionIndex;
use sluice_common::atproto::commit::{decode_presence, Presence};
use sluice_common::atproto::did::DidKey;
use sluice_common::atproto::policy::AccountState;
use sluice_common::ipc::ringrec::{EventRecord, Kind};
use sluice_common::ipc::shm::{CollectionStat, ControlBlock};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The index, shared with the query workers (they read pages).
pub type Shared = Arc<RwLock<CollectionIndex>>;

/// Change rows make the next round write the chunks instead, at
/// `limits.collection_changes_max` of them, or this long since the last
/// time.
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);

pub struct Keeper {
    pub index: Shared,
    next_no: u32,
    control: Arc<ControlBlock>,
    /// This round's changes so far.
    round_changes: Vec<(u32, u32, bool)>,
    next_round: i64,
    change_rows: u64,
    changes_max: u64,
    compacted_at: Instant,
}

/// What an answer did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the account's state changed (a number given).
    Placed { numbered: bool },
    /// A commit came since the job was read: asked again later.
    Stale,
}

impl Keeper {
    pub fn new(loaded: crate::db::Loaded, changes_max: u64, control: Arc<ControlBlock>) -> Keeper {
        let k = Keeper {
            index: Arc::new(RwLock::new(loaded.index)),
            next_no: loaded.next_no.max(1),
            control,
            round_changes: Vec::new(),
            next_round: loaded.next_round,
            change_rows: loaded.change_rows,
            changes_max,
            compacted_at: Instant::now(),
        };
        k.gauges();
        k
    }

    fn count(&self, s: CollectionStat, n: u64) {
        if n > 0 {
            self.control.collection_stat(s).fetch_add(n, Ordering::Relaxed);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CollectionIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn number(&mut self, st: &mut AccountState) -> u32 {
        if st.no == 0 {
            st.no = self.next_no;
            self.next_no += 1;
        }
        st.no
    }

    /// A relayed event of `did` from `host` (`first_seen`: the relay had
    /// no state for the account). `st` is the state being stored; it gets
    /// a number when first placed.
    pub fn on_event(
        &mut self,
        e: &EventRecord<'_>,
        first_seen: bool,
        st: &mut AccountState,
        changes: &mut IndexChanges,
    ) {
        let mut ask = first_seen || e.kind == Kind::Sync as u8;
        if e.kind == Kind::Commit as u8 {
            let (mut added, mut removed, mut undecided, mut shed) = (0, 0, 0, 0);
            let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
            for (col, p) in decode_presence(e.collections) {
                match p {
                    Presence::Unknown => undecided += 1,
                    Presence::Absent if st.no == 0 => {}
                    Presence::Present | Presence::Absent => {
                        let Some(id) = ix.id_or_add(col) else {
                            shed += 1;
                            continue;
                        };
                        if st.no == 0 {
                            st.no = self.next_no;
                            self.next_no += 1;
                        }
                        if ix.set(id, st.no, p == Presence::Present) {
                            self.round_changes.push((id, st.no, p == Presence::Present));
                            if p == Presence::Present {
                                added += 1
                            } else {
                                removed += 1
                            }
                        }
                    }
                }
            }
            drop(ix);
            ask |= undecided > 0;
            self.count(CollectionStat::Added, added);
            self.count(CollectionStat::Removed, removed);
            self.count(CollectionStat::Undecided, undecided);
            self.count(CollectionStat::Shed, shed);
        }
        if ask && e.kind != Kind::Identity as u8 {
            changes.checks.push((DidKey::stored(e.did), e.host_id));
        }
    }

    /// A PDS's answer for an account whose state is `st` (None: unknown
    /// to the relay; nothing to place).
    pub fn on_answer(&mut self, a: &Answer, st: Option<&mut AccountState>, changes: &mut IndexChanges) -> Applied {
        let Some(st) = st else {
            changes.checked.push(a.key);
            return Applied::Placed { numbered: false };
        };
        let Found::Collections(list) = &a.found else {
            changes.checked.push(a.key);
            return Applied::Placed { numbered: false };
        };
        if st.rev > a.rev {
            // The relay has a newer commit than the answer knew.
            self.count(CollectionStat::CheckStale, 1);
            return Applied::Stale;
        }
        changes.checked.push(a.key);
        let numbered = st.no == 0;
        let no = self.number(st);
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        let mut want = Vec::with_capacity(list.len());
        let mut shed = 0;
        for c in list {
            match ix.id_or_add(c) {
                Some(id) => want.push(id),
                None => shed += 1,
            }
        }
        let (mut added, mut removed) = (0, 0);
        for id in ix.of_account(no) {
            if !want.contains(&id) && ix.set(id, no, false) {
                self.round_changes.push((id, no, false));
                removed += 1;
            }
        }
        for id in want {
            if ix.set(id, no, true) {
                self.round_changes.push((id, no, true));
                added += 1;
            }
        }
        drop(ix);
        self.count(CollectionStat::Added, added);
        self.count(CollectionStat::Removed, removed);
        self.count(CollectionStat::Shed, shed);
        Applied::Placed { numbered }
    }

    /// The round's changes to write: its change rows, or the changed
    /// chunks whole when the rows have grown (or aged) enough.
    pub fn take(&mut self, changes: &mut IndexChanges) {
        let compact = self.change_rows + self.round_changes.len() as u64 >= self.changes_max
            || (self.change_rows > 0 && self.compacted_at.elapsed() >= COMPACT_EVERY);
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        changes.collections = ix.take_new();
        changes.round = self.next_round;
        self.next_round += 1;
        if compact {
            changes.compact = true;
            changes.chunks = ix.take_dirty();
            self.round_changes.clear();
        } else {
            changes.changes = std::mem::take(&mut self.round_changes);
        }
    }

    /// The round's transaction committed.
    pub fn committed(&mut self, changes: &IndexChanges) {
        if changes.compact {
            self.change_rows = 0;
            self.compacted_at = Instant::now();
        } else {
            self.change_rows += changes.changes.len() as u64;
        }
    }

    /// A failed transaction: what it would have written is written next
    /// time (a compaction that failed leaves its rows; the chunks stay
    /// marked changed).
    pub fn restore(&mut self, changes: IndexChanges) {
        let mut rows = changes.changes;
        rows.append(&mut self.round_changes);
        self.round_changes = rows;
        self.write().restore(changes.collections, &changes.chunks);
        if changes.compact {
            // Its chunks are written by the next compaction; meanwhile the
            // rows must say what they did not.
            self.change_rows = self.changes_max;
        }
    }

    /// Refresh the gauges (after a commit; cheap: sums over chunks).
    pub fn gauges(&self) {
        let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
        let set = |s: CollectionStat, v: u64| self.control.collection_stat(s).store(v, Ordering::Relaxed);
        set(CollectionStat::Collections, ix.collections() as u64);
        set(CollectionStat::Pairs, ix.pairs());
    }

    /// The bitmaps' bytes (costlier: now and then).
    pub fn bytes_gauge(&self) {
        let b = self.index.read().unwrap_or_else(|p| p.into_inner()).bitmap_bytes();
        self.control.collection_stat(CollectionStat::Bytes).store(b, Ordering::Relaxed);
    }
}
