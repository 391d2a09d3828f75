//! Accounts stuck inactive (the Go relay's indigo#1161): a commit from an
//! account the relay holds as inactive upstream, from the host the account
//! lives on, makes the sequencer ask that PDS once
//! (`com.atproto.sync.getRepoStatus`). The asking happens here, on a
//! thread of its own, never on the sequencer's. The answer goes back as an
//! admin command. If the PDS says active, the sequencer corrects the
//! status (an `#account` event of its own) and applies the commits it
//! held meanwhile.
//!
//! Bounded: at most [`QUEUE_MAX`] requests wait (more are refused, and the
//! sequencer drops those commits), one request per [`SPACING`] (10 a
//! second), [`TIMEOUT`] each. The sequencer asks about an account at most
//! once per `RECHECK_EVERY` and holds at most a few MiB of commits.

use crate::messages::Command;
use serde_json::Value;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const QUEUE_MAX: usize = 256;
pub const SPACING: Duration = Duration::from_millis(100);
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Ask `hostname` about `did`.
#[derive(Debug, Clone)]
pub struct Request {
    pub did: String,
    pub host_id: i64,
    pub hostname: String,
    pub insecure: bool,
}

pub use crate::messages::Answer;

/// Parse a getRepoStatus answer.
pub fn parse(did: &str, host_id: i64, body: &str) -> Option<Answer> {
    let v: Value = serde_json::from_str(body).ok()?;
    if v["did"].as_str() != Some(did) {
        return None;
    }
    Some(Answer {
        did: did.to_owned(),
        host_id,
        active: v["active"].as_bool()?,
        status: v["status"].as_str().map(str::to_owned),
    })
}

/// Start the thread; requests go in through the returned sender.
pub fn start(tls: Arc<rustls::ClientConfig>, answers: SyncSender<Command>) -> std::io::Result<SyncSender<Request>> {
    let (tx, rx) = sync_channel::<Request>(QUEUE_MAX);
    std::thread::Builder::new().name("recheck".into()).spawn(move || {
        let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).redirects(0).tls_config(tls).build();
        let mut last = Instant::now() - SPACING;
        while let Ok(r) = rx.recv() {
            if let Some(wait) = SPACING.checked_sub(last.elapsed()) {
                std::thread::sleep(wait);
            }
            last = Instant::now();
            let scheme = if r.insecure { "http" } else { "https" };
            let url = format!("{scheme}://{}/xrpc/com.atproto.sync.getRepoStatus", r.hostname);
            let answer = match agent.get(&url).query("did", &r.did).call() {
                Ok(resp) => resp.into_string().ok().and_then(|b| parse(&r.did, r.host_id, &b)),
                Err(e) => {
                    tracing::debug!(did = r.did, host = r.hostname, error = %e, "getRepoStatus failed");
                    None
                }
            };
            // No usable answer still answers: the sequencer drops (and
            // counts) what it held instead of holding it for ever.
            let a = answer.unwrap_or(Answer { did: r.did.clone(), host_id: r.host_id, active: false, status: None });
            match answers.try_send(Command::UpstreamStatus(a)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => tracing::debug!(did = r.did, "sequencer queue full; answer dropped"),
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_must_name_the_account() {
        let a = parse("did:plc:a", 3, r#"{"did":"did:plc:a","active":true}"#).unwrap();
        assert_eq!(a, Answer { did: "did:plc:a".into(), host_id: 3, active: true, status: None });
        let b = parse("did:plc:a", 3, r#"{"did":"did:plc:a","active":false,"status":"deactivated"}"#).unwrap();
        assert_eq!(b.status.as_deref(), Some("deactivated"));
        assert!(parse("did:plc:a", 3, r#"{"did":"did:plc:b","active":true}"#).is_none());
        assert!(parse("did:plc:a", 3, r#"{"did":"did:plc:a"}"#).is_none());
        assert!(parse("did:plc:a", 3, "<html>").is_none());
    }
}
