//! Counting glommio's stalls. Its stall detector reports a task queue that
//! ran past its budget only as a log line (the report's type is not
//! public, so a handler of ours cannot take it); this `tracing` layer,
//! installed in every process, counts those lines into the shard's slot
//! (`sluice_shard_stalls_total`) once the shard has said where.

use sluice_common::shm::ControlBlock;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;

/// The log target of glommio's stall reports.
pub const STALL_TARGET: &str = "glommio::executor::stall";

static SLOT: OnceLock<(Arc<ControlBlock>, usize)> = OnceLock::new();

/// This process is shard `id`: count its stalls there.
pub fn count_into(control: Arc<ControlBlock>, id: usize) {
    let _ = SLOT.set((control, id));
}

/// The layer (does nothing outside a shard).
pub struct Layer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target().starts_with(STALL_TARGET) {
            if let Some((control, id)) = SLOT.get() {
                control.shard(*id).stalls.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn stall_reports_are_counted_in_the_shards_slot() {
        let control = std::sync::Arc::new(sluice_common::shm::ControlBlock::create().unwrap());
        super::count_into(control.clone(), 2);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(super::Layer), || {
            tracing::warn!(target: "glommio::executor::stall", "task queue went over-budget");
            tracing::warn!(target: "glommio::executor::stall", "task queue went over-budget");
            tracing::warn!("something else");
        });
        assert_eq!(control.shard(2).stalls.load(Ordering::Relaxed), 2);
    }
}
