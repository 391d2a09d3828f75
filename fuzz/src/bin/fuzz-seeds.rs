//! Writes the starting corpus of every fuzz target into `fuzz/corpus/`:
//! real frames from the fixtures (the relay scenarios and indigo's
//! firehose commits, found through `SLUICE_FIXTURES` or
//! `../shared/fixtures`), commits with full proofs made by the write side
//! (`repo`), and a few hand-made inputs for the targets that take no
//! frames (ring records, log records, HTTP heads, handshake answers).

use rand::SeedableRng;
use sluice_common::atproto::car::CarSlice;
use sluice_common::atproto::cbor::{Value, Writer};
use sluice_common::atproto::crypto::{Curve, PrivateKey};
use sluice_common::atproto::frame::{self, Event, Message};
use sluice_common::atproto::repo::{Repo, WriteOp};
use sluice_common::atproto::syntax::Tid;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("SLUICE_FIXTURES").map_or_else(|| root.join("../shared/fixtures"), PathBuf::from);
    assert!(dir.join("SOURCES.md").is_file(), "fixtures not found at {} (set SLUICE_FIXTURES)", dir.display());
    dir
}

fn frame_from_json(header: &serde_json::Value, body: &serde_json::Value) -> Vec<u8> {
    let mut w = Writer::new();
    Value::from_json(header).expect("header").write(&mut w);
    Value::from_json(body).expect("body").write(&mut w);
    w.into_inner()
}

fn fixture_frames() -> Vec<Vec<u8>> {
    let fx = fixtures();
    let mut out = Vec::new();
    for e in std::fs::read_dir(fx.join("indigo/relay-scenarios")).expect("scenarios").flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
        for m in s["messages"].as_array().into_iter().flatten() {
            out.push(frame_from_json(&m["frame"]["header"], &m["frame"]["body"]));
        }
    }
    for e in std::fs::read_dir(fx.join("indigo/repo")).expect("indigo/repo").flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("firehose_commit_")) {
            let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
            out.push(frame_from_json(&serde_json::json!({"op": 1, "t": "#commit"}), &body));
        }
    }
    out
}

/// Commits with proofs over trees of a few layers, and a `#sync`.
fn made_frames() -> Vec<Vec<u8>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut out = Vec::new();
    for curve in [Curve::K256, Curve::P256] {
        let mut repo = Repo::new("did:plc:fuzzseedaaaaaaaaaaaaaaaa", PrivateKey::generate(curve, &mut rng));
        let record = |i: u64| {
            let mut w = Writer::new();
            w.map(1);
            w.text("text");
            w.text(&format!("post {i}"));
            w.into_inner()
        };
        let path = |i: u64| format!("app.bsky.feed.post/{}", Tid::from_micros(1_700_000_000_000_000 + i, 0));
        repo.bulk_load((0..200).map(|i| (path(i), record(i)))).expect("bulk load");
        for n in 0..12u64 {
            let ops = match n % 3 {
                0 => vec![WriteOp::Create { path: path(1000 + n), record: record(n) }],
                1 => vec![WriteOp::Update { path: path(n), record: record(n + 7) }],
                _ => {
                    vec![WriteOp::Delete { path: path(n) }, WriteOp::Create { path: path(2000 + n), record: record(n) }]
                }
            };
            let c = repo.commit(&ops, Tid::from_micros(1_735_689_600_000_000 + n, 0)).expect("commit");
            out.push(c.frame(10 + n as i64, "2025-01-01T00:00:00.000Z"));
        }
        out.extend(repo.sync_frame(99, "2025-01-01T00:00:00.000Z"));
    }
    out
}

fn write(dir: &Path, target: &str, inputs: &[Vec<u8>]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    for (i, b) in inputs.iter().enumerate() {
        std::fs::write(d.join(format!("seed-{i:04}")), b).expect("write seed");
    }
    println!("{target}: {} seeds", inputs.len());
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut frames = fixture_frames();
    frames.extend(made_frames());
    let mut cars = Vec::new();
    let mut cbor = Vec::new();
    let mut nodes = Vec::new();
    let mut inversions = Vec::new();
    for f in &frames {
        let Ok(d) = frame::decode(f) else { continue };
        let Message::Event(ev) = d.message else { continue };
        let blocks = match &ev {
            Event::Commit(c) => c.blocks,
            Event::Sync(s) => s.blocks,
            _ => continue,
        };
        cars.push(blocks.to_vec());
        if let Ok(car) = CarSlice::parse(blocks) {
            for (cid, b) in car.iter() {
                cbor.push(b.to_vec());
                if sluice_common::atproto::mst::decode_node(&cid, b).is_ok() {
                    nodes.push(b.to_vec());
                }
            }
        }
        if let Event::Commit(c) = &ev {
            let mut inv = vec![(blocks.len() >> 8) as u8, blocks.len() as u8];
            inv.extend_from_slice(blocks);
            for (i, op) in c.ops.iter().enumerate() {
                inv.extend_from_slice(&[op.action as u8, i as u8, i as u8]);
            }
            inversions.push(inv);
        }
    }
    write(&dir, "frame_decode", &frames);
    write(&dir, "check_commit", &frames);
    write(&dir, "car_slice", &cars);
    write(&dir, "cbor_value", &cbor);
    write(&dir, "mst_node", &nodes);
    write(&dir, "mst_inversion", &inversions);
    write(&dir, "ring_record", &ring_records(&frames));
    write(&dir, "eventlog_record", &log_segments(&frames));
    write(&dir, "http_head", &http_heads());
    write(&dir, "ws_handshake", &handshakes(&frames));
}

fn ring_records(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use sluice_common::ipc::ringrec::{EventRecord, Kind, RingRecord, PROOF_VERIFIED};
    let mut out = Vec::new();
    for f in frames.iter().take(20) {
        let mut b = Vec::new();
        RingRecord::Event(EventRecord {
            host_id: 3,
            upstream_seq: 42,
            kind: Kind::Commit as u8,
            did: "did:plc:fuzzseedaaaaaaaaaaaaaaaa",
            rev: "3lbprhgqz5g2z",
            since: "",
            commit_cid: &[1; 36],
            data_cid: &[2; 36],
            prev_data: &[3; 36],
            proof: PROOF_VERIFIED,
            active: true,
            status: "",
            time_micros: 1,
            identity_micros: 2,
            frame: f,
            seq_start: 0,
            seq_end: 0,
            collections: &[],
        })
        .encode(&mut b);
        out.push(b);
    }
    let mut b = Vec::new();
    RingRecord::Cursor { host_id: 1, upstream_seq: 2 }.encode(&mut b);
    out.push(b);
    out
}

/// Segments written by the real writer.
fn log_segments(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use sluice_common::ipc::eventlog::LogWriter;
    let tmp = std::env::temp_dir().join(format!("sluice-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut w = LogWriter::open(&tmp, 1 << 20, 0).expect("log");
    for (i, f) in frames.iter().take(40).enumerate() {
        w.append(1 + i as i64, 1, 0, 7, 1_735_689_600_000_000, f).expect("append");
    }
    w.sync().expect("sync");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&tmp).expect("log dir").flatten() {
        let b = std::fs::read(e.path()).expect("segment");
        out.push(b[..b.len().min(256 * 1024)].to_vec());
    }
    let _ = std::fs::remove_dir_all(&tmp);
    out
}

fn http_heads() -> Vec<Vec<u8>> {
    [
        "GET /xrpc/com.atproto.sync.subscribeRepos?cursor=5 HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"hostname\":\"pds.example\"}",
        "GET /admin/pds/list HTTP/1.1\r\nAuthorization: Basic YWRtaW46cGFzc3dvcmQ=\r\n\r\n",
        "GET /xrpc/_health HTTP/1.0\r\n\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn handshakes(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    // The accept key does not match the client's random key, so these stop
    // at the key check; the fuzzer finds its way past what it can.
    let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let mut out = vec![ok.to_vec(), b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}".to_vec()];
    if let Some(f) = frames.first() {
        let mut b = ok.to_vec();
        b.extend_from_slice(&[0x82, 126, (f.len() >> 8) as u8, f.len() as u8]);
        b.extend_from_slice(&f[..f.len().min(65535)]);
        out.push(b);
    }
    out
}
