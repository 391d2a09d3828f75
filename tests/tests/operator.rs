//! What an operator looks at, on a relay carrying a fakenet network with
//! a consumer attached: every metric the Grafana dashboard
//! (`packaging/grafana-dashboard.json`) queries is on `/metrics`, with the
//! per-host series capped; and the status page (`GET /`) loads in headless
//! Chromium and shows the relay's live numbers (a screenshot is kept in
//! the target directory).

mod support;

use fakenet::runner::ServeConfig;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// Every `sluice_*` metric name in the dashboard's queries.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    let panels = dash["panels"].as_array().unwrap();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("sluice_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 25, "{names:?}");
    names
}

/// Headless Chromium as the machine allows it (root: no sandbox; no
/// background connections on a closed network).
fn chromium(profile: &std::path::Path) -> Command {
    let mut c = Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1500",
        // Time for the page's script to fetch /status.json and draw.
        "--virtual-time-budget=5000",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The text inside the element with `id` in a dumped DOM.
fn element_text<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')?;
    Some(rest[start..start + end].trim())
}

#[test]
fn dashboard_metrics_exist_and_the_status_page_shows_live_numbers() {
    let Setup { dir, net, mut relay } = Setup::start(
        ServeConfig { hosts: 4, accounts: 12, seed: 31, rate: 100.0, max_events: Some(6000), ..ServeConfig::default() },
        2,
        "",
    );
    let until = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let consumer = watch(relay.port, 0, until.clone(), Duration::from_secs(120));
    wait_events(&net, 400);

    // The dashboard's metrics, once traffic (and some drops) went through.
    let wanted = dashboard_metrics();
    let t = Instant::now();
    let missing = loop {
        let page = metrics_page(&relay);
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|n| !page.lines().any(|l| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} "))))
            .collect();
        if missing.is_empty() || t.elapsed() > Duration::from_secs(30) {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(missing.is_empty(), "the dashboard queries metrics /metrics lacks: {missing:?}");
    let page = metrics_page(&relay);
    let hosts_named = page.lines().filter(|l| l.starts_with("sluice_host_events_total{")).count();
    assert!((1..=51).contains(&hosts_named), "{hosts_named} per-host series");
    for p in ["supervisor", "db-writer", "shard-0", "shard-1", "postgres"] {
        let line = format!("sluice_process_resident_memory_bytes{{process=\"{p}\"}}");
        assert!(page.lines().any(|l| l.starts_with(&line)), "no {line}");
    }
    let relayed = sluice_tests::http::metric(relay.metrics_port, "sluice_committed_seq");
    assert!(relayed > 0);
    // status.json is written each second: one later, it is past `relayed`.
    std::thread::sleep(Duration::from_millis(1500));

    // The status page in a browser: live numbers from this relay.
    let url = format!("http://127.0.0.1:{}/", relay.port);
    let out = chromium(&dir.path().join("chromium-1"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("chromium (scripts/test installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    let seq: u64 = element_text(&dom, "seq")
        .and_then(|s| s.replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("no seq on the page:\n{dom}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(seq >= relayed, "page seq {seq} below the relay's {relayed} before the page loaded");
    assert_eq!(element_text(&dom, "state"), Some("Ready"), "{dom}");
    let connected: u64 = element_text(&dom, "hosts-connected").unwrap().parse().unwrap();
    assert!(connected >= 1, "{dom}");
    assert_eq!(element_text(&dom, "consumers-total"), Some("1"), "{dom}");
    assert!(net.info.hosts.iter().any(|h| dom.contains(h.as_str())), "no fakenet host on the page:\n{dom}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&dir.path().join("chromium-2"))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot of {} bytes", png.len());

    until.store(0, std::sync::atomic::Ordering::Release);
    let w = consumer.join().unwrap();
    assert!(w.dropped.is_none() && !w.seqs.is_empty(), "{w:?}");
    relay.stop();
}
