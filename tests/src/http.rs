//! The benches' tiny HTTP client (loopback, `Connection: close`) and the
//! Prometheus page read as sums.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One request; (status, body), or None if the relay did not answer.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Some((status, body))
}

/// Sum of the metric `name` over its series (0 if the page is missing);
/// `name` may carry a label (`x_total{outcome="ok"` without the closing
/// brace picks that series).
pub fn metric(port: u16, name: &str) -> u64 {
    let Some((_, page)) = request(port, "GET", "/metrics", "") else { return 0 };
    page.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l[name.len()..].starts_with(['{', ' ', ',', '}']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}
