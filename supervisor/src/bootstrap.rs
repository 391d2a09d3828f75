//! `bootstrap_relay`: at start, list the hosts another relay crawls
//! (`com.atproto.sync.listHosts`, paged, bounded) and add the active ones,
//! with the same rules as requestCrawl. Runs on its own thread; failures
//! are logged, the relay runs regardless.

use sluice_common::process::host::HostStatus;
use sluice_dbwriter::{db, query::crawl_target};
use std::time::Duration;

/// Pages of listHosts read at most (500 hosts each).
const PAGES_MAX: usize = 200;

pub fn spawn(base: String, database_url: String, allow_insecure: bool) {
    let r = std::thread::Builder::new().name("bootstrap".into()).spawn(move || {
        match run(&base, &database_url, allow_insecure) {
            Ok((seen, added)) => tracing::info!(relay = base, seen, added, "bootstrap from listHosts done"),
            Err(e) => tracing::warn!(relay = base, error = %e, "bootstrap from listHosts failed"),
        }
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "bootstrap thread not started");
    }
}

pub fn run(base: &str, database_url: &str, allow_insecure: bool) -> anyhow::Result<(usize, usize)> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let mut pg = db::connect(database_url)?;
    let (mut seen, mut added) = (0, 0);
    let mut cursor: Option<String> = None;
    for _ in 0..PAGES_MAX {
        let mut req =
            agent.get(&format!("{}/xrpc/com.atproto.sync.listHosts", base.trim_end_matches('/'))).query("limit", "500");
        if let Some(c) = &cursor {
            req = req.query("cursor", c);
        }
        let body: serde_json::Value = serde_json::from_str(&req.call()?.into_string()?)?;
        let hosts = body["hosts"].as_array().cloned().unwrap_or_default();
        for h in &hosts {
            let Some(name) = h["hostname"].as_str() else {
                continue;
            };
            seen += 1;
            // Only hosts the other relay crawls (no status: active).
            let status = h["status"].as_str().map_or(Ok(HostStatus::Active), HostStatus::parse);
            if !status.is_ok_and(|s| s == HostStatus::Active) {
                continue;
            }
            match crawl_target(name, allow_insecure) {
                Ok(host) if db::domain_banned(&mut pg, host.hostname())? => {
                    tracing::debug!(host = name, "bootstrap skips a host under a banned domain");
                }
                Ok(host) => {
                    if db::add_host(&mut pg, &host)? {
                        added += 1;
                    }
                }
                Err(why) => tracing::debug!(host = name, why = %why, "bootstrap skips a host"),
            }
        }
        cursor = body["cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || hosts.is_empty() {
            break;
        }
    }
    Ok((seen, added))
}
