//! Real frames and documents: indigo's firehose commits and relay
//! scenarios, DID documents, repository CARs, data-model round trips.
mod support;
use sluice_common::atproto::car::{write_car, CarSlice};
use sluice_common::atproto::cbor::Value;
use sluice_common::atproto::cid::{Cid, Codec};
use sluice_common::atproto::commit::{check_commit, check_sync, Mode, Proof};
use sluice_common::atproto::crypto::PublicKey;
use sluice_common::atproto::frame::{decode, Action, Event, Message};
use sluice_common::atproto::identity::Identity;
use sluice_common::atproto::mst::Mst;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

#[test]
fn indigo_firehose_commits() {
    let dir = support::fixtures().join("indigo/repo");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("firehose_commit_") {
            continue;
        }
        let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let frame = support::frame_from_json(&serde_json::json!({"op": 1, "t": "#commit"}), &body);
        let d = decode(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Message::Event(Event::Commit(c)) = d.message else { panic!("{name}: not a commit") };
        assert_eq!(c.seq, body["seq"].as_i64().unwrap());
        assert_eq!(c.ops.len(), body["ops"].as_array().unwrap().len());
        // Every block hashes to its CID (checked by the parser).
        let car = CarSlice::parse(c.blocks).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(car.root(), c.commit, "{name}");
        let checked = check_commit(&c, Mode::Strict, now()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(checked.proof, Proof::Absent, "{name}: these predate prevData");
        // Created and updated records are in the new tree the slice proves.
        let mut mst = Mst::load(&car, checked.data).unwrap();
        for op in &c.ops {
            if op.action != Action::Delete {
                assert_eq!(mst.get(op.path.as_bytes()).unwrap(), op.cid, "{name}: {}", op.path);
            }
        }
        n += 1;
    }
    assert_eq!(n, 4);
}

struct Account {
    did: String,
    key: PublicKey,
}

fn scenario_accounts(s: &serde_json::Value) -> Vec<Account> {
    s["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let id = &a["identity"];
            let k = &id["keys"]["atproto"];
            Account {
                did: id["did"].as_str().unwrap().to_owned(),
                key: PublicKey::from_legacy(k["type"].as_str().unwrap(), k["publicKeyMultibase"].as_str().unwrap())
                    .unwrap(),
            }
        })
        .collect()
}

/// Every frame of every scenario decodes; every `#commit`/`#sync` that
/// passes the stateless checks has a valid signature (no scenario marks a
/// signature failure), and every frame not marked `drop` passes them.
#[test]
fn relay_scenarios_stateless() {
    let dir = support::fixtures().join("indigo/relay-scenarios");
    let (mut files, mut signed, mut stateless_drops) = (0, 0, 0);
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json") {
            continue;
        }
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let mode = if s["lenient"].as_bool().unwrap_or(false) { Mode::Lenient } else { Mode::Strict };
        let accounts = scenario_accounts(&s);
        for (i, m) in s["messages"].as_array().unwrap().iter().enumerate() {
            let ctx = format!("{name}#{i}");
            let drop = m["drop"].as_bool().unwrap_or(false);
            let frame = support::frame_from_json(&m["frame"]["header"], &m["frame"]["body"]);
            let d = decode(&frame).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let Message::Event(ev) = d.message else { panic!("{ctx}: error frame") };
            assert!(d.seq_span.is_some(), "{ctx}");
            let checked = match &ev {
                Event::Commit(c) => check_commit(c, mode, now()),
                Event::Sync(s) => check_sync(s, now()),
                _ => continue,
            };
            let key = &accounts.iter().find(|a| Some(a.did.as_str()) == ev.did()).expect("account").key;
            match checked {
                Ok(c) => {
                    assert_eq!(c.verify_signature(key), Ok(()), "{ctx}: signature");
                    if let (Event::Commit(ev), Mode::Strict) = (&ev, mode) {
                        if ev.prev_data.is_some() {
                            assert!(matches!(c.proof, Proof::Verified(_)), "{ctx}: {:?}", c.proof);
                        }
                    }
                    signed += 1;
                }
                Err(err) => {
                    assert!(drop, "{ctx}: not marked drop but fails: {err}");
                    stateless_drops += 1;
                }
            }
        }
        files += 1;
    }
    assert_eq!(files, 7);
    assert!(signed >= 20, "{signed}");
    assert!(stateless_drops >= 1);
}

#[test]
fn did_documents() {
    let doc = Identity::from_did_document(&support::read("indigo/identity/did_plc_doc.json"), None).unwrap();
    assert_eq!(doc.did.as_str(), "did:plc:ewvi7nxzyoun6zhxrhs64oiz");
    assert_eq!(doc.handle.as_ref().unwrap().as_str(), "atproto.com");
    assert_eq!(doc.pds_endpoint.as_deref(), Some("https://bsky.social"));
    assert_eq!(doc.pds_host().unwrap().name, "bsky.social");
    let key = doc.signing_key.clone().unwrap();
    assert_eq!(key.to_multikey(), "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF");
    let legacy = Identity::from_did_document(&support::read("indigo/identity/did_plc_doc_legacy.json"), None).unwrap();
    assert_eq!(legacy.signing_key.unwrap(), key, "legacy uncompressed form is the same key");
    assert_eq!(legacy.pds_endpoint.as_deref(), Some("https://bsky.social"));
    let web = Identity::from_did_document(&support::read("indigo/identity/did_web_doc.json"), None).unwrap();
    assert_eq!(web.did.as_str(), "did:web:discover.bsky.social");
    assert!(web.signing_key.is_none() && web.pds_endpoint.is_none() && web.handle.is_none());
    assert!(
        Identity::from_did_document(&support::read("indigo/identity/did_plc_doc.json"), Some("did:plc:other")).is_err()
    );
}

/// Whole repositories: every MST node and record present and hashed, the
/// tree rebuilt from its entries, and the DID document where the fixtures
/// carry it.
#[test]
fn repository_cars() {
    let mut verified = 0;
    for file in ["indigo/misc/divy.repo", "indigo/misc/bafyreieovfuizojpw3zresz7sx3nk4trm2by23pt5rxbey3jme4uo5ogiu.car"]
    {
        let bytes = support::read(file);
        let car = CarSlice::parse(&bytes).unwrap();
        let commit = Value::decode(car.get(&car.root()).unwrap()).unwrap();
        let Some(Value::Link(data)) = commit.get("data") else { panic!("{file}: no data") };
        let Some(Value::Text(did)) = commit.get("did") else { panic!("{file}: no did") };
        let mut mst = Mst::load(&car, *data).unwrap();
        let entries = mst.entries().unwrap();
        assert!(!entries.is_empty());
        for (k, v) in &entries {
            assert!(car.get(v).is_some(), "{file}: record {} missing", String::from_utf8_lossy(k));
        }
        let rebuilt = Mst::from_entries(&sluice_common::atproto::mst::NoBlocks, entries).unwrap().root();
        assert_eq!(rebuilt, *data, "{file}");
        let doc_path = format!("indigo/misc/{}.didDoc.json", did.replace(':', "_"));
        if support::fixtures().join(&doc_path).exists() {
            // A version-2 commit from a local test PDS; its document uses
            // the legacy key form and an http://localhost endpoint.
            let id = Identity::from_did_document(&support::read(&doc_path), Some(did)).unwrap();
            assert!(id.signing_key.is_some());
            let host = id.pds_host().unwrap();
            assert_eq!((host.name.as_str(), host.insecure, host.is_local()), ("localhost:2583", true, true));
            assert_eq!(commit.get("version"), Some(&Value::Integer(2)));
            verified += 1;
        }
    }
    assert_eq!(verified, 1);
}

#[test]
fn car_file_fixtures() {
    let cases = support::json("atproto-repo/car-file-fixtures.json");
    for c in cases.as_array().unwrap() {
        let root = Cid::parse(c["root"].as_str().unwrap()).unwrap();
        let blocks: Vec<(Cid, Vec<u8>)> = c["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (Cid::parse(b["cid"].as_str().unwrap()).unwrap(), support::b64(b["bytes"].as_str().unwrap())))
            .collect();
        let car = write_car(&root, blocks.iter().map(|(c, b)| (c, b.as_slice())));
        let parsed = CarSlice::parse(&car).unwrap();
        assert_eq!(parsed.root(), root);
        for (cid, b) in &blocks {
            assert_eq!(parsed.get(cid), Some(b.as_slice()));
        }
        // Any flipped byte in a block is caught.
        let mut bad = car.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(CarSlice::parse(&bad).is_err());
    }
}

#[test]
fn data_model_round_trips() {
    let cases = support::json("atproto-interop-tests/data-model/data-model-fixtures.json");
    for c in cases.as_array().unwrap() {
        let cbor = support::b64(c["cbor_base64"].as_str().unwrap());
        let v = Value::from_json(&c["json"]).unwrap();
        assert_eq!(v.encode(), cbor, "JSON -> CBOR");
        let back = Value::decode(&cbor).unwrap();
        assert_eq!(back.to_json(), c["json"], "CBOR -> JSON");
        assert_eq!(Cid::compute(Codec::DagCbor, &cbor).to_string(), c["cid"].as_str().unwrap());
    }
}
