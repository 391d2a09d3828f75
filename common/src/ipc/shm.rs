//! Shared memory between the relay's processes: memfd-backed mappings that
//! children inherit by file descriptor, the futex used as a doorbell, and
//! the [`ControlBlock`] (committed watermark, lifecycle flags, per-shard
//! slots).
//!
//! Every shared word is an atomic at a fixed, aligned offset inside a
//! mapping that outlives every reference handed out (the mapping is owned by
//! the struct that hands the references out). This module and `ring` are
//! the only places with `unsafe`.

use memmap2::MmapMut;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("memfd {name}: {err}")]
    Create { name: String, err: std::io::Error },
    #[error("mapping fd {fd}: {err}")]
    Map { fd: RawFd, err: std::io::Error },
    #[error("shared block at fd {fd} has magic {found:#x}, expected {expected:#x}")]
    Magic { fd: RawFd, found: u64, expected: u64 },
    #[error("shared block at fd {fd} is {len} bytes, expected at least {need}")]
    Size { fd: RawFd, len: usize, need: usize },
}

/// A shared mapping of a memfd.
pub struct Shm {
    file: File,
    map: MmapMut,
}

impl Shm {
    /// Create a zeroed memfd of `len` bytes and map it.
    pub fn create(name: &str, len: usize) -> Result<Shm, ShmError> {
        let err = |err| ShmError::Create { name: name.to_owned(), err };
        let cname = std::ffi::CString::new(name).expect("no NUL in shm names");
        // Not CLOEXEC: the supervisor hands these to its children by number.
        let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::empty())
            .map_err(|e| err(std::io::Error::from(e)))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(err)?;
        Shm::map(file)
    }

    /// Map an inherited descriptor.
    ///
    /// # Safety
    /// `fd` must be an open memfd (or file) owned by nobody else in this
    /// process; ownership passes to the returned value.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Shm, ShmError> {
        // SAFETY: the caller hands over an open descriptor it owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Shm::map(file)
    }

    fn map(file: File) -> Result<Shm, ShmError> {
        let fd = file.as_raw_fd();
        // SAFETY: a MAP_SHARED mapping of a memfd; other processes write it
        // concurrently, which is why every access goes through atomics or
        // through the ring's ownership protocol, never through plain
        // references that assume exclusivity across processes.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|err| ShmError::Map { fd, err })?;
        Ok(Shm { file, map })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    /// An atomic u64 at `off` (8-byte aligned, inside the mapping).
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.len(), "u64 at {off} outside {}", self.len());
        // SAFETY: in bounds and aligned (checked above; mappings are
        // page-aligned); the mapping lives as long as `self`, and shared
        // words are only ever accessed atomically.
        unsafe { &*(self.as_ptr().add(off) as *const AtomicU64) }
    }

    /// An atomic u32 at `off` (4-byte aligned, inside the mapping).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len(), "u32 at {off} outside {}", self.len());
        // SAFETY: as in `u64_at`.
        unsafe { &*(self.as_ptr().add(off) as *const AtomicU32) }
    }
}

/// Wait while `*word == expected`, at most `timeout` (process-shared futex).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // FUTEX_WAIT only reads it. Errors (EAGAIN when the value changed,
    // EINTR, ETIMEDOUT) all mean "go and look again".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wake every waiter on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<u32>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// A doorbell: a sleeper announces itself, a ringer wakes it only then.
/// `word` counts rings; `sleeping` is 1 while someone waits.
pub struct Doorbell<'a> {
    pub word: &'a AtomicU32,
    pub sleeping: &'a AtomicU32,
}

impl Doorbell<'_> {
    /// Ring (cheap when nobody sleeps: two atomic operations).
    pub fn ring(&self) {
        self.word.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) != 0 {
            futex_wake(self.word);
        }
    }

    /// Sleep until rung or `timeout`, unless `ready()` says there is work
    /// (checked after announcing, so a ring between the check and the wait
    /// is never lost).
    pub fn wait(&self, timeout: Duration, ready: impl Fn() -> bool) {
        let seen = self.word.load(Ordering::SeqCst);
        self.sleeping.store(1, Ordering::SeqCst);
        if !ready() {
            futex_wait(self.word, seen, timeout);
        }
        self.sleeping.store(0, Ordering::SeqCst);
    }
}

/// Lifecycle of the db-writer, as the supervisor and shards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WriterState {
    Starting = 0,
    Ready = 1,
    Stopping = 2,
    Stopped = 3,
    /// The event log or Postgres is out of space: intake is paused (the
    /// rings fill, the shards stop reading their hosts) until a retry
    /// succeeds.
    DiskFull = 4,
    /// Postgres does not answer (restarting, or down on a full disk):
    /// intake is paused while the db-writer reconnects.
    DbUnavailable = 5,
}

pub const CONTROL_MAGIC: u64 = 0x534c_5549_4345_4331; // "SLUICEC1"
pub const SHARDS_MAX: usize = 256;
const SHARD_SLOT_BYTES: usize = 512;
const SHARDS_OFF: usize = 4096;
const _: () = assert!(64 + 8 * UpstreamClose::ALL.len() <= SLOT_CUT_LAG, "shard slot fields overlap");
/// Offset of the consumer-cut counters in a shard slot.
const SLOT_CUT_LAG: usize = 192;
const _: () = assert!(SLOT_CUT_LAG + 24 <= SLOT_DROPS, "shard slot fields overlap");
/// Offset of the per-reason drop counters in a shard slot.
const SLOT_DROPS: usize = 256;
const _: () = assert!(SLOT_DROPS + 8 * DropReason::ALL.len() <= SLOT_IDENTITY, "shard slot fields overlap");
/// Offset of the identity cache and window words in a shard slot.
const SLOT_IDENTITY: usize = 448;
const _: () = assert!(SLOT_IDENTITY + 8 * 5 <= SHARD_SLOT_BYTES, "shard slot too small");
/// Size of the control block mapping.
pub const CONTROL_BYTES: usize = SHARDS_OFF + SHARDS_MAX * SHARD_SLOT_BYTES;

// Offsets in the control block; each hot word on its own cache line.
const OFF_MAGIC: usize = 0;
const OFF_COMMITTED: usize = 64;
const OFF_WRITER_DOORBELL: usize = 128;
const OFF_WRITER_SLEEPING: usize = 132;
const OFF_WRITER_STATE: usize = 192;
const OFF_STOP_READING: usize = 256;
const OFF_OLDEST_SEQ: usize = 320;
const OFF_SHARD_COUNT: usize = 384;
const OFF_WRITER_HEARTBEAT: usize = 448;
const OFF_FLAGS_GENERATION: usize = 512;
/// The db-writer's counters, one u64 each (see [`WriterCounter`]).
const OFF_WRITER_COUNTERS: usize = 1024;
/// The identity service's counters and gauges ([`IdentityStat`]).
const OFF_IDENTITY_STATS: usize = OFF_WRITER_COUNTERS + 8 * 48;
/// The collection index's counters and gauges ([`CollectionStat`]).
const OFF_COLLECTION_STATS: usize = OFF_IDENTITY_STATS + 8 * 32;
/// The relay-wide histograms ([`Hist`]), [`HIST_STRIDE`] bytes each.
const OFF_HISTOGRAMS: usize = 2048;
const HIST_STRIDE: usize = 8 * (HIST_BOUNDS_MAX + 3);
const _: () = assert!(OFF_WRITER_COUNTERS + 8 * WriterCounter::ALL.len() <= OFF_IDENTITY_STATS, "counters overlap");
const _: () = assert!(OFF_IDENTITY_STATS + 8 * IdentityStat::ALL.len() <= OFF_COLLECTION_STATS, "counters overlap");
const _: () = assert!(OFF_COLLECTION_STATS + 8 * CollectionStat::ALL.len() <= OFF_HISTOGRAMS, "counters overlap");
const _: () = assert!(OFF_HISTOGRAMS + HIST_STRIDE * Hist::ALL.len() <= SHARDS_OFF, "histograms overlap the slots");

/// Bounds per histogram at most (one more bucket holds what is above).
pub const HIST_BOUNDS_MAX: usize = 16;

/// The relay-wide histograms in the control block: each process adds its
/// observations with atomic adds; the supervisor renders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Hist {
    /// Shard: the stateless checks of one event (decode, CAR, MST proof,
    /// identity, signature), in microseconds.
    Validation = 0,
    /// Shard: time a validated record waited for room in the ring.
    RingWait = 1,
    /// Db-writer: one group commit (log append and fsync, Postgres).
    GroupCommit = 2,
    /// Db-writer: from the shard reading an event to it being durable.
    IngestToDurable = 3,
    /// Shard: how many committed events a consumer is behind after each
    /// batch it was sent (events, not time).
    ConsumerLag = 4,
    /// Db-writer: one request to an identity directory (a DID document
    /// from the PLC directory or a did:web host, or an export page), from
    /// sending it to its answer.
    IdentityFetch = 5,
}

const SECONDS_BOUNDS_US: [u64; HIST_BOUNDS_MAX] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];
const EVENT_BOUNDS: [u64; 8] = [0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000];

impl Hist {
    pub const ALL: [Hist; 6] = [
        Hist::Validation,
        Hist::RingWait,
        Hist::GroupCommit,
        Hist::IngestToDurable,
        Hist::ConsumerLag,
        Hist::IdentityFetch,
    ];

    /// Metric name, help, and whether values are microseconds (rendered
    /// as seconds) rather than counts.
    pub fn describe(self) -> (&'static str, &'static str, bool) {
        match self {
            Hist::Validation => ("sluice_validation_seconds", "Stateless checks of one upstream event (shard).", true),
            Hist::RingWait => ("sluice_ring_wait_seconds", "Wait for room in the ring per record (shard).", true),
            Hist::GroupCommit => ("sluice_group_commit_seconds", "One group commit: log fsync and Postgres.", true),
            Hist::IngestToDurable => {
                ("sluice_ingest_to_durable_seconds", "From the shard reading an event to it being durable.", true)
            }
            Hist::ConsumerLag => {
                ("sluice_consumer_lag_events", "Committed events a consumer is behind after each batch sent.", false)
            }
            Hist::IdentityFetch => (
                "sluice_identity_fetch_seconds",
                "One request to an identity directory (PLC or did:web), sent to answered (db-writer).",
                true,
            ),
        }
    }

    /// The bucket `v` falls in: the first bound at or above it, else the
    /// last (`+Inf`).
    pub fn bucket(self, v: u64) -> usize {
        let bounds = self.bounds();
        bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
    }

    pub fn bounds(self) -> &'static [u64] {
        match self {
            Hist::ConsumerLag => &EVENT_BOUNDS,
            _ => &SECONDS_BOUNDS_US,
        }
    }
}

/// Observations gathered in one thread and added to the shared histogram
/// in one go ([`LocalHist::flush`]): on a hot path they then cost no
/// writes to cache lines every process shares (the consumer-lag histogram
/// is observed after every batch of every consumer of every shard).
#[derive(Debug, Clone)]
pub struct LocalHist {
    kind: Hist,
    buckets: [u64; HIST_BOUNDS_MAX + 1],
    count: u64,
    sum: u64,
}

impl LocalHist {
    pub fn new(kind: Hist) -> LocalHist {
        LocalHist { kind, buckets: [0; HIST_BOUNDS_MAX + 1], count: 0, sum: 0 }
    }

    pub fn observe(&mut self, v: u64) {
        let i = self.kind.bucket(v);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum += v;
    }

    /// Add what was observed since the last flush to `into` (the same
    /// kind's shared histogram), and start again from nothing.
    pub fn flush(&mut self, into: &Histogram<'_>) {
        debug_assert_eq!(into.kind, self.kind);
        if self.count == 0 {
            return;
        }
        for (shared, n) in into.buckets.iter().zip(self.buckets.iter_mut()) {
            if *n > 0 {
                shared.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        into.count.fetch_add(std::mem::take(&mut self.count), Ordering::Relaxed);
        into.sum.fetch_add(std::mem::take(&mut self.sum), Ordering::Relaxed);
    }
}

/// One histogram's words: a count per bucket (not cumulative), the count
/// and the sum of observations.
pub struct Histogram<'a> {
    pub kind: Hist,
    pub buckets: [&'a AtomicU64; HIST_BOUNDS_MAX + 1],
    pub count: &'a AtomicU64,
    pub sum: &'a AtomicU64,
}

impl Histogram<'_> {
    pub fn observe(&self, v: u64) {
        let i = self.kind.bucket(v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, then the total (the `+Inf` bucket).
    pub fn cumulative(&self) -> Vec<u64> {
        let n = self.kind.bounds().len();
        let mut acc = 0;
        let mut out: Vec<u64> = (0..n)
            .map(|i| {
                acc += self.buckets[i].load(Ordering::Relaxed);
                acc
            })
            .collect();
        out.push(acc + self.buckets[n].load(Ordering::Relaxed));
        out
    }
}

/// Why a shard dropped an upstream event (the connection stays up):
/// `sluice_shard_drops_total{reason}` and the per-host drop counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// An `#info` message (counted, never relayed).
    Info = 0,
    /// A message type this relay does not know.
    UnknownType = 1,
    /// A seq not above the last one read from the host.
    OldSeq = 2,
    /// A frame whose body has no usable seq.
    Malformed = 3,
    /// A `#commit` failing the stateless checks (CAR, MST proof, fields).
    InvalidCommit = 4,
    /// A `#sync` failing them.
    InvalidSync = 5,
    /// The DID's document names another PDS, or none.
    WrongHost = 6,
    /// The DID's document has no signing key.
    NoSigningKey = 7,
    /// The commit's signature does not verify.
    BadSignature = 8,
    /// The DID has no usable document: the directory said so (not
    /// registered, tombstoned, invalid, a name that does not exist), or it
    /// could not be fetched within `identity_wait_max_s` while the
    /// directory answered for others.
    IdentityUnresolved = 9,
    /// The record would not fit the ring.
    TooLarge = 10,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Info,
        DropReason::UnknownType,
        DropReason::OldSeq,
        DropReason::Malformed,
        DropReason::InvalidCommit,
        DropReason::InvalidSync,
        DropReason::WrongHost,
        DropReason::NoSigningKey,
        DropReason::BadSignature,
        DropReason::IdentityUnresolved,
        DropReason::TooLarge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Info => "info",
            DropReason::UnknownType => "unknown_type",
            DropReason::OldSeq => "old_seq",
            DropReason::Malformed => "malformed",
            DropReason::InvalidCommit => "invalid_commit",
            DropReason::InvalidSync => "invalid_sync",
            DropReason::WrongHost => "wrong_host",
            DropReason::NoSigningKey => "no_signing_key",
            DropReason::BadSignature => "bad_signature",
            DropReason::IdentityUnresolved => "identity_unresolved",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// Counters the db-writer keeps in the control block (metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum WriterCounter {
    Relayed = 0,
    Dropped = 1,
    Duplicates = 2,
    ChainBreaks = 3,
    ProofFailed = 4,
    CorruptRings = 5,
    Commits = 6,
    Restarts = 7,
    HostAccountLimit = 8,
    AccountLoads = 9,
    AdminAuthFailures = 10,
    DiskFullPauses = 11,
    DbPauses = 12,
}

impl WriterCounter {
    pub const ALL: [WriterCounter; 13] = [
        WriterCounter::Relayed,
        WriterCounter::Dropped,
        WriterCounter::Duplicates,
        WriterCounter::ChainBreaks,
        WriterCounter::ProofFailed,
        WriterCounter::CorruptRings,
        WriterCounter::Commits,
        WriterCounter::Restarts,
        WriterCounter::HostAccountLimit,
        WriterCounter::AccountLoads,
        WriterCounter::AdminAuthFailures,
        WriterCounter::DiskFullPauses,
        WriterCounter::DbPauses,
    ];

    /// Metric name and help text.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            WriterCounter::Relayed => ("sluice_events_relayed_total", "Events sequenced into the event log."),
            WriterCounter::Dropped => {
                ("sluice_events_dropped_stateful_total", "Events dropped by the stateful checks.")
            }
            WriterCounter::Duplicates => {
                ("sluice_events_duplicate_total", "Ring records at or below a host's durable cursor (re-reads).")
            }
            WriterCounter::ChainBreaks => {
                ("sluice_commit_chain_breaks_total", "Commits whose prevData did not follow.")
            }
            WriterCounter::ProofFailed => {
                ("sluice_commit_proof_failed_total", "Lenient mode: commits passed with a failed proof.")
            }
            WriterCounter::CorruptRings => ("sluice_ring_corrupt_total", "Rings found corrupt and discarded."),
            WriterCounter::Commits => {
                ("sluice_group_commits_total", "Group commits (log fsync + Postgres transaction).")
            }
            WriterCounter::Restarts => ("sluice_child_restarts_total", "Child processes the supervisor restarted."),
            WriterCounter::HostAccountLimit => (
                "sluice_events_dropped_host_account_limit_total",
                "Events of new accounts on a host already at its account limit.",
            ),
            WriterCounter::AccountLoads => (
                "sluice_account_loads_total",
                "Postgres queries for account state (account cache misses, batched per ring turn).",
            ),
            WriterCounter::AdminAuthFailures => {
                ("sluice_admin_auth_failures_total", "Admin API requests with wrong or missing credentials.")
            }
            WriterCounter::DiskFullPauses => (
                "sluice_disk_full_pauses_total",
                "Times intake paused because the event log or Postgres ran out of space.",
            ),
            WriterCounter::DbPauses => (
                "sluice_db_unavailable_pauses_total",
                "Times intake paused because Postgres stopped answering (the db-writer reconnects).",
            ),
        }
    }
}

/// The db-writer's identity service, in the control block (metrics): what
/// it asked the directories and how they answered, where its answers to
/// the shards came from, the PLC export it follows, and its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum IdentityStat {
    /// Requests from the shards.
    Requests = 0,
    /// Directory requests by outcome: a document (or export page), not
    /// registered or gone (404/410), not a valid document, 429/503, other
    /// failures (5xx, timeouts, connections), refused before sending (a
    /// did:web name that does not exist or resolves to a refused address).
    FetchOk = 1,
    FetchNotFound = 2,
    FetchInvalid = 3,
    FetchRateLimited = 4,
    FetchError = 5,
    FetchRefused = 6,
    /// Answers to the shards: from the store (no directory request), after
    /// a directory request, unresolved.
    AnsweredStored = 7,
    AnsweredFetched = 8,
    AnsweredUnresolved = 9,
    /// `#identity` refreshes not made: within the DID's or the host's rate.
    RefreshSkipped = 10,
    /// Changed identities pushed to the shards.
    Pushed = 11,
    /// PLC export pages read, operations applied to known DIDs, failures.
    ExportPages = 12,
    ExportApplied = 13,
    ExportErrors = 14,
    /// Gauges: DIDs waiting for a directory request, DIDs being resolved,
    /// requests at a directory now, seconds the export is behind (0: off
    /// or caught up within its poll).
    QueueDepth = 15,
    Pending = 16,
    InFlight = 17,
    ExportLagSeconds = 18,
}

/// The collection index's counters and gauges (listReposByCollection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CollectionStat {
    /// (account, collection) pairs added and removed by commits, and
    /// collections a commit left undecided (the account is checked).
    Added = 0,
    Removed = 1,
    Undecided = 2,
    /// Checks of an account's collections at its PDS, by outcome; answers
    /// not applied because a commit came meanwhile (asked again).
    CheckOk = 3,
    CheckGone = 4,
    CheckFailed = 5,
    CheckStale = 6,
    /// New collections past the index's bound, not indexed.
    Shed = 7,
    /// Gauges: checks waiting, collections, pairs, the bitmaps' bytes,
    /// the backfill's position in thousandths (0: not running).
    ChecksWaiting = 8,
    Collections = 9,
    Pairs = 10,
    Bytes = 11,
    BackfillPermille = 12,
}

impl CollectionStat {
    pub const ALL: [CollectionStat; 13] = [
        CollectionStat::Added,
        CollectionStat::Removed,
        CollectionStat::Undecided,
        CollectionStat::CheckOk,
        CollectionStat::CheckGone,
        CollectionStat::CheckFailed,
        CollectionStat::CheckStale,
        CollectionStat::Shed,
        CollectionStat::ChecksWaiting,
        CollectionStat::Collections,
        CollectionStat::Pairs,
        CollectionStat::Bytes,
        CollectionStat::BackfillPermille,
    ];

    /// As [`IdentityStat::describe`].
    pub fn describe(self) -> (&'static str, &'static str, &'static str, bool) {
        const CHANGES: &str = "sluice_collections_changes_total";
        const CHANGES_HELP: &str = "Changes to the collection index from relayed commits, by kind.";
        const CHECKS: &str = "sluice_collections_checks_total";
        const CHECKS_HELP: &str = "Checks of an account's collections at its PDS (describeRepo), by outcome.";
        match self {
            CollectionStat::Added => (CHANGES, "{change=\"added\"}", CHANGES_HELP, false),
            CollectionStat::Removed => (CHANGES, "{change=\"removed\"}", CHANGES_HELP, false),
            CollectionStat::Undecided => (CHANGES, "{change=\"undecided\"}", CHANGES_HELP, false),
            CollectionStat::CheckOk => (CHECKS, "{outcome=\"ok\"}", CHECKS_HELP, false),
            CollectionStat::CheckGone => (CHECKS, "{outcome=\"gone\"}", CHECKS_HELP, false),
            CollectionStat::CheckFailed => (CHECKS, "{outcome=\"failed\"}", CHECKS_HELP, false),
            CollectionStat::CheckStale => (CHECKS, "{outcome=\"stale\"}", CHECKS_HELP, false),
            CollectionStat::Shed => {
                ("sluice_collections_shed_total", "", "Collections past the index's bound, not indexed.", false)
            }
            CollectionStat::ChecksWaiting => {
                ("sluice_collections_checks_waiting", "", "Accounts waiting for a check of their collections.", true)
            }
            CollectionStat::Collections => ("sluice_collections", "", "Collections in the index.", true),
            CollectionStat::Pairs => {
                ("sluice_collections_pairs", "", "(account, collection) pairs in the index.", true)
            }
            CollectionStat::Bytes => {
                ("sluice_collections_index_bytes", "", "Bytes of the index's bitmaps (serialized).", true)
            }
            CollectionStat::BackfillPermille => (
                "sluice_collections_backfill_permille",
                "",
                "The collection backfill's position in thousandths of the accounts (0: not running).",
                true,
            ),
        }
    }
}

impl IdentityStat {
    pub const ALL: [IdentityStat; 19] = [
        IdentityStat::Requests,
        IdentityStat::FetchOk,
        IdentityStat::FetchNotFound,
        IdentityStat::FetchInvalid,
        IdentityStat::FetchRateLimited,
        IdentityStat::FetchError,
        IdentityStat::FetchRefused,
        IdentityStat::AnsweredStored,
        IdentityStat::AnsweredFetched,
        IdentityStat::AnsweredUnresolved,
        IdentityStat::RefreshSkipped,
        IdentityStat::Pushed,
        IdentityStat::ExportPages,
        IdentityStat::ExportApplied,
        IdentityStat::ExportErrors,
        IdentityStat::QueueDepth,
        IdentityStat::Pending,
        IdentityStat::InFlight,
        IdentityStat::ExportLagSeconds,
    ];

    /// Metric name, its labels (with braces, or empty), help, and whether
    /// it is a gauge. Variants sharing a name are one labelled family.
    pub fn describe(self) -> (&'static str, &'static str, &'static str, bool) {
        const FETCHES: &str = "sluice_identity_fetches_total";
        const FETCHES_HELP: &str = "Requests to identity directories (PLC, did:web), by outcome.";
        const ANSWERS: &str = "sluice_identity_answers_total";
        const ANSWERS_HELP: &str = "The identity service's answers to the shards, by where they came from.";
        match self {
            IdentityStat::Requests => (
                "sluice_identity_requests_total",
                "",
                "Identity requests from the shards (cache misses, refreshes).",
                false,
            ),
            IdentityStat::FetchOk => (FETCHES, "{outcome=\"ok\"}", FETCHES_HELP, false),
            IdentityStat::FetchNotFound => (FETCHES, "{outcome=\"not_found\"}", FETCHES_HELP, false),
            IdentityStat::FetchInvalid => (FETCHES, "{outcome=\"invalid\"}", FETCHES_HELP, false),
            IdentityStat::FetchRateLimited => (FETCHES, "{outcome=\"rate_limited\"}", FETCHES_HELP, false),
            IdentityStat::FetchError => (FETCHES, "{outcome=\"error\"}", FETCHES_HELP, false),
            IdentityStat::FetchRefused => (FETCHES, "{outcome=\"refused\"}", FETCHES_HELP, false),
            IdentityStat::AnsweredStored => (ANSWERS, "{source=\"stored\"}", ANSWERS_HELP, false),
            IdentityStat::AnsweredFetched => (ANSWERS, "{source=\"fetched\"}", ANSWERS_HELP, false),
            IdentityStat::AnsweredUnresolved => (ANSWERS, "{source=\"unresolved\"}", ANSWERS_HELP, false),
            IdentityStat::RefreshSkipped => (
                "sluice_identity_refreshes_skipped_total",
                "",
                "#identity refreshes not made: the DID or its host was within its refresh rate.",
                false,
            ),
            IdentityStat::Pushed => {
                ("sluice_identity_changes_pushed_total", "", "Changed identities pushed to the shards' caches.", false)
            }
            IdentityStat::ExportPages => {
                ("sluice_identity_export_pages_total", "", "PLC export pages read (following the directory).", false)
            }
            IdentityStat::ExportApplied => (
                "sluice_identity_export_applied_total",
                "",
                "PLC operations from the export applied to DIDs the relay knows.",
                false,
            ),
            IdentityStat::ExportErrors => {
                ("sluice_identity_export_errors_total", "", "PLC export pages that failed (retried).", false)
            }
            IdentityStat::QueueDepth => {
                ("sluice_identity_queue_depth", "", "DIDs waiting for a directory request.", true)
            }
            IdentityStat::Pending => ("sluice_identity_pending", "", "DIDs the identity service is resolving.", true),
            IdentityStat::InFlight => {
                ("sluice_identity_fetches_in_flight", "", "Requests at an identity directory now.", true)
            }
            IdentityStat::ExportLagSeconds => (
                "sluice_identity_export_lag_seconds",
                "",
                "How far behind the PLC export the relay is (0: off, or caught up at its last poll).",
                true,
            ),
        }
    }
}

/// The relay-wide shared words.
pub struct ControlBlock {
    shm: Shm,
}

/// One shard's slot in the control block.
pub struct ShardSlot<'a> {
    /// 0, or the [`ShardSlot::generation`] whose ring the db-writer found
    /// corrupt. The ring protocol after a corruption:
    /// 1. The db-writer discards the ring, stores the generation here, and
    ///    reads nothing more from that ring.
    /// 2. The shard of that generation sees its own number and exits (the
    ///    supervisor restarts it; it re-reads from the durable cursors).
    /// 3. The supervisor, having reaped it, starts the successor with the
    ///    next generation; the successor pushes nothing while this is
    ///    non-zero.
    /// 4. The db-writer sees a generation other than the poisoned one,
    ///    discards what the dead shard left in the ring, and stores 0.
    ///
    /// So no record written after the corrupt one is ever applied, and no
    /// host cursor passes a discarded event.
    pub poisoned: &'a AtomicU32,
    /// Which start of this shard runs now (1, 2, ...; 0: none yet). Set by
    /// the supervisor before each spawn, after the previous one is reaped.
    pub generation: &'a AtomicU32,
    /// Upstream hosts currently connected.
    pub hosts_connected: &'a AtomicU64,
    /// Consumers currently subscribed.
    pub consumers: &'a AtomicU64,
    /// Unix seconds of the shard's last heartbeat.
    pub heartbeat: &'a AtomicU64,
    /// Validated events the shard wrote into its ring.
    pub events_in: &'a AtomicU64,
    /// Frames the shard sent to consumers.
    pub frames_out: &'a AtomicU64,
    /// Events the shard dropped (invalid), and connection faults.
    pub dropped: &'a AtomicU64,
    /// Bytes of frames sent to consumers.
    pub bytes_out: &'a AtomicU64,
    /// Times a task queue ran past its budget (glommio's stall detector).
    pub stalls: &'a AtomicU64,
    /// Events dropped, by [`DropReason`].
    pub drops: [&'a AtomicU64; DropReason::ALL.len()],
    /// Upstream connections ended, by [`UpstreamClose`].
    pub upstream_closes: [&'a AtomicU64; UpstreamClose::ALL.len()],
    /// Consumers cut for lagging past `consumer_lag_events_max`.
    pub consumers_cut_lag: &'a AtomicU64,
    /// Consumers cut because their socket took nothing for
    /// `consumer_write_timeout_s`.
    pub consumers_cut_unwritable: &'a AtomicU64,
    /// Events whose DID the shard's identity cache held, and did not.
    pub identity_hits: &'a AtomicU64,
    pub identity_misses: &'a AtomicU64,
    /// The identity cache now: entries, and the bytes they take.
    pub identity_cache_entries: &'a AtomicU64,
    pub identity_cache_bytes: &'a AtomicU64,
    /// Frames read from hosts and waiting, behind an identity lookup, to
    /// enter the ring in their host's order (all host windows).
    pub window_frames: &'a AtomicU64,
}

impl ShardSlot<'_> {
    /// Zero the gauges, which say what the running process holds now
    /// (hosts connected, consumers, its identity cache, frames in its
    /// windows). A process that is killed never takes its share back, so
    /// the supervisor clears them before it starts the next one; the
    /// counters (events, drops, closes...) keep adding up across starts.
    pub fn clear_gauges(&self) {
        for g in [
            self.hosts_connected,
            self.consumers,
            self.identity_cache_entries,
            self.identity_cache_bytes,
            self.window_frames,
        ] {
            g.store(0, Ordering::Release);
        }
    }
}

/// Why an upstream connection ended (or never came up): the reasons the
/// shards count per slot, `sluice_shard_upstream_closes_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum UpstreamClose {
    /// DNS, TCP connect, TLS or the upgrade failed.
    Connect = 0,
    /// Connect + TLS + upgrade did not finish within the deadline.
    HandshakeTimeout = 1,
    /// No frame and no pong for `upstream_idle_timeout_s`.
    Idle = 2,
    /// Bytes without a complete message past the bound (fragment or
    /// control-frame floods, an oversized message), or a head too large.
    Oversized = 3,
    /// More pings than the rate allows.
    PingFlood = 4,
    /// A frame that does not decode, an error frame, a WebSocket protocol
    /// error.
    BadFrame = 5,
    /// The host closed the stream or the socket.
    Remote = 6,
    /// Unassigned, banned or the relay stopping.
    Local = 7,
}

impl UpstreamClose {
    pub const ALL: [UpstreamClose; 8] = [
        UpstreamClose::Connect,
        UpstreamClose::HandshakeTimeout,
        UpstreamClose::Idle,
        UpstreamClose::Oversized,
        UpstreamClose::PingFlood,
        UpstreamClose::BadFrame,
        UpstreamClose::Remote,
        UpstreamClose::Local,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UpstreamClose::Connect => "connect",
            UpstreamClose::HandshakeTimeout => "handshake_timeout",
            UpstreamClose::Idle => "idle",
            UpstreamClose::Oversized => "oversized",
            UpstreamClose::PingFlood => "ping_flood",
            UpstreamClose::BadFrame => "bad_frame",
            UpstreamClose::Remote => "remote",
            UpstreamClose::Local => "local",
        }
    }
}

impl ControlBlock {
    pub fn create() -> Result<ControlBlock, ShmError> {
        let shm = Shm::create("sluice-control", CONTROL_BYTES)?;
        shm.u64_at(OFF_MAGIC).store(CONTROL_MAGIC, Ordering::Release);
        Ok(ControlBlock { shm })
    }

    /// # Safety
    /// As [`Shm::from_raw_fd`].
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<ControlBlock, ShmError> {
        // SAFETY: forwarded to the caller.
        let shm = unsafe { Shm::from_raw_fd(fd) }?;
        if shm.len() < CONTROL_BYTES {
            return Err(ShmError::Size { fd, len: shm.len(), need: CONTROL_BYTES });
        }
        let found = shm.u64_at(OFF_MAGIC).load(Ordering::Acquire);
        if found != CONTROL_MAGIC {
            return Err(ShmError::Magic { fd, found, expected: CONTROL_MAGIC });
        }
        Ok(ControlBlock { shm })
    }

    pub fn fd(&self) -> RawFd {
        self.shm.fd()
    }

    /// The highest relay seq that is durable (0 = none yet).
    pub fn committed(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_COMMITTED)
    }

    /// The lowest relay seq still in the event log (0 = empty).
    pub fn oldest(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_OLDEST_SEQ)
    }

    /// Bumped by the db-writer each time takedown flags in the event log
    /// changed: shards drop the frames they cached before.
    pub fn flags_generation(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_FLAGS_GENERATION)
    }

    pub fn writer_doorbell(&self) -> Doorbell<'_> {
        Doorbell { word: self.shm.u32_at(OFF_WRITER_DOORBELL), sleeping: self.shm.u32_at(OFF_WRITER_SLEEPING) }
    }

    pub fn writer_state(&self) -> WriterState {
        match self.shm.u32_at(OFF_WRITER_STATE).load(Ordering::Acquire) {
            0 => WriterState::Starting,
            1 => WriterState::Ready,
            2 => WriterState::Stopping,
            4 => WriterState::DiskFull,
            5 => WriterState::DbUnavailable,
            _ => WriterState::Stopped,
        }
    }

    pub fn set_writer_state(&self, s: WriterState) {
        self.shm.u32_at(OFF_WRITER_STATE).store(s as u32, Ordering::Release);
    }

    pub fn writer_heartbeat(&self) -> &AtomicU64 {
        self.shm.u64_at(OFF_WRITER_HEARTBEAT)
    }

    pub fn writer_counter(&self, c: WriterCounter) -> &AtomicU64 {
        self.shm.u64_at(OFF_WRITER_COUNTERS + 8 * c as usize)
    }

    pub fn identity_stat(&self, c: IdentityStat) -> &AtomicU64 {
        self.shm.u64_at(OFF_IDENTITY_STATS + 8 * c as usize)
    }

    pub fn collection_stat(&self, c: CollectionStat) -> &AtomicU64 {
        self.shm.u64_at(OFF_COLLECTION_STATS + 8 * c as usize)
    }

    /// Set on shutdown: shards stop reading upstream.
    pub fn stop_reading(&self) -> &AtomicU32 {
        self.shm.u32_at(OFF_STOP_READING)
    }

    /// The shard count the supervisor runs now.
    pub fn shard_count(&self) -> &AtomicU32 {
        self.shm.u32_at(OFF_SHARD_COUNT)
    }

    pub fn histogram(&self, h: Hist) -> Histogram<'_> {
        let base = OFF_HISTOGRAMS + HIST_STRIDE * h as usize;
        Histogram {
            kind: h,
            buckets: std::array::from_fn(|i| self.shm.u64_at(base + 8 * i)),
            count: self.shm.u64_at(base + 8 * (HIST_BOUNDS_MAX + 1)),
            sum: self.shm.u64_at(base + 8 * (HIST_BOUNDS_MAX + 2)),
        }
    }

    pub fn shard(&self, k: usize) -> ShardSlot<'_> {
        assert!(k < SHARDS_MAX, "shard {k} beyond {SHARDS_MAX}");
        let base = SHARDS_OFF + k * SHARD_SLOT_BYTES;
        ShardSlot {
            poisoned: self.shm.u32_at(base),
            generation: self.shm.u32_at(base + 4),
            hosts_connected: self.shm.u64_at(base + 8),
            consumers: self.shm.u64_at(base + 16),
            heartbeat: self.shm.u64_at(base + 24),
            events_in: self.shm.u64_at(base + 32),
            frames_out: self.shm.u64_at(base + 40),
            dropped: self.shm.u64_at(base + 48),
            bytes_out: self.shm.u64_at(base + 56),
            stalls: self.shm.u64_at(base + SLOT_CUT_LAG + 16),
            drops: std::array::from_fn(|i| self.shm.u64_at(base + SLOT_DROPS + 8 * i)),
            upstream_closes: std::array::from_fn(|i| self.shm.u64_at(base + 64 + 8 * i)),
            consumers_cut_lag: self.shm.u64_at(base + SLOT_CUT_LAG),
            consumers_cut_unwritable: self.shm.u64_at(base + SLOT_CUT_LAG + 8),
            identity_hits: self.shm.u64_at(base + SLOT_IDENTITY),
            identity_misses: self.shm.u64_at(base + SLOT_IDENTITY + 8),
            identity_cache_entries: self.shm.u64_at(base + SLOT_IDENTITY + 16),
            identity_cache_bytes: self.shm.u64_at(base + SLOT_IDENTITY + 24),
            window_frames: self.shm.u64_at(base + SLOT_IDENTITY + 32),
        }
    }
}

/// Clear FD_CLOEXEC on `fd` so a child started with exec keeps it.
pub fn inheritable(fd: RawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map(|_| ()).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_shard_process_starts_its_gauges_at_zero_and_keeps_the_counters() {
        let cb = ControlBlock::create().unwrap();
        let s = cb.shard(1);
        for g in [s.hosts_connected, s.consumers, s.identity_cache_entries, s.identity_cache_bytes, s.window_frames] {
            g.store(7, Ordering::Relaxed);
        }
        s.events_in.store(100, Ordering::Relaxed);
        s.drops[DropReason::WrongHost as usize].store(3, Ordering::Relaxed);
        cb.shard(2).hosts_connected.store(4, Ordering::Relaxed);
        s.clear_gauges();
        let s = cb.shard(1);
        for g in [s.hosts_connected, s.consumers, s.identity_cache_entries, s.identity_cache_bytes, s.window_frames] {
            assert_eq!(g.load(Ordering::Relaxed), 0);
        }
        assert_eq!(s.events_in.load(Ordering::Relaxed), 100);
        assert_eq!(s.drops[DropReason::WrongHost as usize].load(Ordering::Relaxed), 3);
        assert_eq!(cb.shard(2).hosts_connected.load(Ordering::Relaxed), 4, "another shard's slot is its own");
    }

    #[test]
    fn control_block_round_trip_through_fd() {
        let cb = ControlBlock::create().unwrap();
        cb.committed().store(42, Ordering::Release);
        cb.shard(3).consumers.store(5, Ordering::Release);
        let dup = nix::unistd::dup(cb.fd()).unwrap();
        // SAFETY: a fresh dup we own.
        let other = unsafe { ControlBlock::from_raw_fd(dup) }.unwrap();
        assert_eq!(other.committed().load(Ordering::Acquire), 42);
        assert_eq!(other.shard(3).consumers.load(Ordering::Acquire), 5);
        other.committed().store(43, Ordering::Release);
        assert_eq!(cb.committed().load(Ordering::Acquire), 43);
    }

    #[test]
    fn a_local_histogram_flushes_what_it_gathered_once() {
        let cb = ControlBlock::create().unwrap();
        let (mut local, mut direct) = (LocalHist::new(Hist::ConsumerLag), Vec::new());
        for v in [0, 1, 5, 5, 99, 2_000_000] {
            local.observe(v);
            direct.push(v);
        }
        local.flush(&cb.histogram(Hist::ConsumerLag));
        local.flush(&cb.histogram(Hist::ConsumerLag));
        let other = ControlBlock::create().unwrap();
        for v in direct {
            other.histogram(Hist::ConsumerLag).observe(v);
        }
        let (a, b) = (cb.histogram(Hist::ConsumerLag), other.histogram(Hist::ConsumerLag));
        assert_eq!(a.cumulative(), b.cumulative());
        assert_eq!(a.sum.load(Ordering::Relaxed), 2_000_110);
        assert_eq!(a.count.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn histograms_and_slots_do_not_overlap() {
        let cb = ControlBlock::create().unwrap();
        // Every word of every histogram and of the last slot is distinct:
        // writing each once leaves each at 1.
        let mut words: Vec<&AtomicU64> = Vec::new();
        for h in Hist::ALL {
            let g = cb.histogram(h);
            words.extend(g.buckets.iter().copied());
            words.extend([g.count, g.sum]);
        }
        let last = cb.shard(SHARDS_MAX - 1);
        words.extend(last.drops.iter().copied());
        words.extend(last.upstream_closes.iter().copied());
        words.extend([
            last.bytes_out,
            last.dropped,
            last.consumers_cut_lag,
            last.consumers_cut_unwritable,
            last.stalls,
        ]);
        for w in &words {
            w.fetch_add(1, Ordering::Relaxed);
        }
        assert!(words.iter().all(|w| w.load(Ordering::Relaxed) == 1));
        assert_eq!(cb.writer_counter(WriterCounter::DbPauses).load(Ordering::Relaxed), 0);
        assert_eq!(cb.shard(0).drops[0].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn histogram_buckets_by_bound() {
        let cb = ControlBlock::create().unwrap();
        let h = cb.histogram(Hist::Validation);
        for v in [10, 50, 51, 20_000_000] {
            h.observe(v);
        }
        let c = h.cumulative();
        assert_eq!(c.len(), HIST_BOUNDS_MAX + 1);
        assert_eq!((c[0], c[1], c[HIST_BOUNDS_MAX - 1], c[HIST_BOUNDS_MAX]), (2, 3, 3, 4));
        assert_eq!(h.sum.load(Ordering::Relaxed), 20_000_111);
        let lag = cb.histogram(Hist::ConsumerLag);
        lag.observe(0);
        lag.observe(5);
        assert_eq!(lag.cumulative(), [1, 1, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn doorbell_wakes_a_sleeper() {
        let cb = std::sync::Arc::new(ControlBlock::create().unwrap());
        let c2 = cb.clone();
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            c2.writer_doorbell().wait(Duration::from_secs(5), || false);
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        cb.writer_doorbell().ring();
        let waited = t.join().unwrap();
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }
}
