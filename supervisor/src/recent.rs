//! Recent errors for the status page: a `tracing` layer in each relay
//! process that keeps its last [`KEPT`] WARN and ERROR events and has a
//! helper thread write them to `data_dir/run/recent-<process>.json` (the
//! logging thread, a shard's executor included, only hands the line to a
//! bounded channel; a full channel sheds the line and counts it). The
//! supervisor merges the files into `status.json`.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Entries each process keeps.
pub const KEPT: usize = 20;
/// Lines waiting for the writer thread.
const QUEUE_MAX: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Unix micros.
    pub at: i64,
    pub level: String,
    pub process: String,
    pub target: String,
    /// The message and its fields, as the text log shows them.
    pub text: String,
}

/// What a process's file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct File {
    pub entries: Vec<Entry>,
    /// Lines shed because the writer thread was behind.
    pub shed: u64,
}

pub fn path(run_dir: &Path, process: &str) -> PathBuf {
    run_dir.join(format!("recent-{process}.json"))
}

pub struct Layer {
    process: String,
    tx: SyncSender<Entry>,
    shed: Arc<AtomicU64>,
}

/// The layer for `process`, and its writer thread.
pub fn layer(run_dir: PathBuf, process: &str) -> std::io::Result<Layer> {
    let (tx, rx) = sync_channel::<Entry>(QUEUE_MAX);
    let shed = Arc::new(AtomicU64::new(0));
    let file = path(&run_dir, process);
    let shed2 = shed.clone();
    std::thread::Builder::new().name("recent-errors".into()).spawn(move || {
        let mut kept: VecDeque<Entry> = VecDeque::with_capacity(KEPT);
        while let Ok(e) = rx.recv() {
            if kept.len() == KEPT {
                kept.pop_front();
            }
            kept.push_back(e);
            // Whatever else is queued, then one write.
            while let Ok(e) = rx.try_recv() {
                if kept.len() == KEPT {
                    kept.pop_front();
                }
                kept.push_back(e);
            }
            let body = File { entries: kept.iter().cloned().collect(), shed: shed2.load(Ordering::Relaxed) };
            let _ = std::fs::create_dir_all(&run_dir);
            // Not logged: a WARN here would come back to this thread.
            let _ = sluice_common::process::runfile::write_whole(&file, &serde_json::to_vec(&body).unwrap_or_default());
        }
    })?;
    Ok(Layer { process: process.to_owned(), tx, shed })
}

/// The message first, then `key=value` for each field.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            self.0.push_str(&fields);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let entry = Entry {
            at,
            level: meta.level().to_string(),
            process: self.process.clone(),
            target: meta.target().to_owned(),
            text: text.0,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(entry) {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every process's recent entries in `run_dir`, newest last, at most
/// `max`; and the lines shed in all.
pub fn read_all(run_dir: &Path, max: usize) -> (Vec<Entry>, u64) {
    let files: Vec<File> = sluice_common::process::runfile::read_json_files(run_dir, "recent-");
    let shed = files.iter().map(|f| f.shed).sum();
    let mut all: Vec<Entry> = files.into_iter().flat_map(|f| f.entries).collect();
    all.sort_by_key(|e| e.at);
    let skip = all.len().saturating_sub(max);
    (all.split_off(skip), shed)
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_warnings_and_errors_with_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let layer = super::layer(dir.path().to_owned(), "shard-3").unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            for i in 0..(super::KEPT + 5) {
                tracing::warn!(host = "pds.example", n = i, "host offline");
            }
            tracing::error!(seq = 9, "ring corrupt");
        });
        let t = std::time::Instant::now();
        loop {
            let (entries, shed) = super::read_all(dir.path(), 100);
            if entries.last().is_some_and(|e| e.text.contains("ring corrupt")) {
                assert_eq!(entries.len(), super::KEPT, "{entries:?}");
                assert_eq!(shed, 0);
                let last = entries.last().unwrap();
                assert_eq!(
                    (last.level.as_str(), last.process.as_str(), last.text.as_str()),
                    ("ERROR", "shard-3", "ring corrupt seq=9")
                );
                assert_eq!(entries[0].text, "host offline host=pds.example n=6");
                assert!(!entries.iter().any(|e| e.text.contains("not kept")));
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "{entries:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
