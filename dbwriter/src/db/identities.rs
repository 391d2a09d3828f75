//! The identity service's store (`crate::identity`, migration V8): each
//! DID as its 16-byte key (`DidKey::stored`), the signing key as its curve
//! code and compressed point, the PDS endpoint as a number into
//! `pds_endpoints`. A row does not keep its DID: loads are by the DIDs
//! asked for, and the PLC export's DIDs are did:plc, whose key is the DID.

use super::accounts::uuid_of;
use super::DbError;
use postgres::Client;
use sluice_common::atproto::did::DidKey;
use sluice_common::ipc::idwire::IdentityRecord;
use std::collections::HashMap;

/// A stored identity's key column: curve code ‖ compressed point.
fn key_col(r: &IdentityRecord) -> Option<Vec<u8>> {
    r.key.as_ref().map(|(c, p)| {
        let mut v = Vec::with_capacity(34);
        v.push(*c);
        v.extend_from_slice(p);
        v
    })
}

/// The record of `did` from a row of (key, url, handle, as_of) at `at`.
fn record_of(did: String, r: &postgres::Row, at: usize) -> IdentityRecord {
    let key = r.get::<_, Option<&[u8]>>(at).and_then(|k| {
        let (c, p) = k.split_first()?;
        Some((*c, <[u8; 33]>::try_from(p).ok()?))
    });
    IdentityRecord { did, key, pds: r.get(at + 1), handle: r.get(at + 2), as_of_micros: r.get(at + 3) }
}

/// The store's frequent statements, prepared once per connection: a load
/// or a save is then one Bind/Execute, where an unprepared one cost
/// PostgreSQL a parse and a plan each time (in sluice-bench's throughput
/// phase, a fresh relay resolving its first 1,240 DIDs, that was over
/// half of PostgreSQL's CPU).
pub struct IdentityStatements {
    load: postgres::Statement,
    save: postgres::Statement,
}

/// Fetched identities (`$1` keys, `$2` signing keys, `$3` endpoints, `$4`
/// handles, `$5` as_of), each stored if newer than what is stored (a
/// slower fetch never overwrites a newer answer), their endpoints given
/// numbers on the way: one statement, its own transaction. The store's
/// thread is the only writer of `pds_endpoints`, so an endpoint is either
/// inserted here (and returned) or already visible.
const SAVE: &str = "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::text[], $5::int8[])
                          AS v(d, k, u, h, a)),
     added AS (INSERT INTO pds_endpoints (url) SELECT DISTINCT v.u FROM v
               WHERE v.u IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pds_endpoints e WHERE e.url = v.u)
               ON CONFLICT (url) DO NOTHING RETURNING id, url),
     ep AS (SELECT id, url FROM added
            UNION ALL SELECT e.id, e.url FROM pds_endpoints e WHERE e.url IN (SELECT v.u FROM v))
INSERT INTO identities (did, key, pds_id, handle, as_of)
SELECT v.d, v.k, ep.id, v.h, v.a FROM v LEFT JOIN ep ON ep.url = v.u
ON CONFLICT (did) DO UPDATE SET key = EXCLUDED.key, pds_id = EXCLUDED.pds_id, handle = EXCLUDED.handle,
  as_of = EXCLUDED.as_of
WHERE identities.as_of <= EXCLUDED.as_of";

impl IdentityStatements {
    /// Prepare on `c` (and [`super::plan_once`] there).
    pub fn prepare(c: &mut Client) -> Result<IdentityStatements, DbError> {
        super::plan_once(c)?;
        Ok(IdentityStatements {
            load: c.prepare(
                "SELECT i.did, i.key, e.url, i.handle, i.as_of FROM identities i
                 LEFT JOIN pds_endpoints e ON e.id = i.pds_id WHERE i.did = ANY($1)",
            )?,
            save: c.prepare(SAVE)?,
        })
    }
}

/// The stored identities of `dids` (those not stored are absent).
pub fn load_identities(
    c: &mut Client,
    s: &IdentityStatements,
    dids: &[&str],
) -> Result<HashMap<String, IdentityRecord>, DbError> {
    let by_key: HashMap<uuid::Uuid, &str> = dids.iter().map(|d| (uuid_of(&DidKey::stored(d)), *d)).collect();
    let keys: Vec<uuid::Uuid> = by_key.keys().copied().collect();
    let rows = c.query(&s.load, &[&keys])?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let did = (*by_key.get(&r.get::<_, uuid::Uuid>(0))?).to_owned();
            Some((did.clone(), record_of(did, r, 1)))
        })
        .collect())
}

/// Make sure every endpoint of `urls` has a number.
fn intern_endpoints<'a>(
    t: &mut impl postgres::GenericClient,
    urls: impl Iterator<Item = &'a str>,
) -> Result<(), DbError> {
    let mut urls: Vec<&str> = urls.collect();
    urls.sort_unstable();
    urls.dedup();
    if !urls.is_empty() {
        t.execute(
            "INSERT INTO pds_endpoints (url) SELECT u FROM unnest($1::text[]) AS u
             WHERE NOT EXISTS (SELECT 1 FROM pds_endpoints e WHERE e.url = u) ON CONFLICT (url) DO NOTHING",
            &[&urls],
        )?;
    }
    Ok(())
}

/// The arrays of (key, signing key, endpoint, handle, as_of) for `recs`.
type Columns<'a> = (Vec<uuid::Uuid>, Vec<Option<Vec<u8>>>, Vec<Option<&'a str>>, Vec<Option<&'a str>>, Vec<i64>);

fn columns<'a>(recs: &[&'a IdentityRecord]) -> Columns<'a> {
    (
        recs.iter().map(|r| uuid_of(&DidKey::stored(&r.did))).collect(),
        recs.iter().map(|r| key_col(r)).collect(),
        recs.iter().map(|r| r.pds.as_deref()).collect(),
        recs.iter().map(|r| r.handle.as_deref()).collect(),
        recs.iter().map(|r| r.as_of_micros).collect(),
    )
}

/// Store fetched identities (newer than what is stored: a slower fetch
/// never overwrites a newer answer). Of one DID twice in `recs`, the newer
/// goes (one statement may not update a row twice).
pub fn save_identities(c: &mut Client, s: &IdentityStatements, recs: &[IdentityRecord]) -> Result<(), DbError> {
    if recs.is_empty() {
        return Ok(());
    }
    let mut newest: HashMap<&str, &IdentityRecord> = HashMap::with_capacity(recs.len());
    for r in recs {
        let e = newest.entry(r.did.as_str()).or_insert(r);
        if r.as_of_micros >= e.as_of_micros {
            *e = r;
        }
    }
    let recs: Vec<&IdentityRecord> = newest.into_values().collect();
    let (dids, keys, pds, handles, as_of) = columns(&recs);
    c.execute(&s.save, &[&dids, &keys, &pds, &handles, &as_of])?;
    Ok(())
}

/// A DID the directory says has no document (any more).
pub fn delete_identity(c: &mut Client, did: &str) -> Result<(), DbError> {
    c.execute("DELETE FROM identities WHERE did = $1", &[&uuid_of(&DidKey::stored(did))])?;
    Ok(())
}

/// Apply the PLC export's operations to the DIDs the store holds (others
/// are skipped), each only if newer than what is stored, and move the
/// export cursor, in one transaction. `ops` holds at most one operation
/// per DID (the latest). Returns the identities that changed (a tombstone
/// as a record with no key and no endpoint).
pub fn apply_plc_ops(
    c: &mut Client,
    ops: &[IdentityRecord],
    tombstones: &[(String, i64)],
    cursor: &str,
) -> Result<Vec<IdentityRecord>, DbError> {
    let mut t = c.transaction()?;
    let mut changed = Vec::new();
    if !ops.is_empty() {
        let all: Vec<uuid::Uuid> = ops.iter().map(|r| uuid_of(&DidKey::stored(&r.did))).collect();
        // Only endpoints of DIDs the store holds get a number.
        let known: std::collections::HashSet<uuid::Uuid> =
            t.query("SELECT did FROM identities WHERE did = ANY($1)", &[&all])?.iter().map(|r| r.get(0)).collect();
        let ops: Vec<&IdentityRecord> =
            ops.iter().zip(&all).filter(|(_, k)| known.contains(k)).map(|(r, _)| r).collect();
        intern_endpoints(&mut t, ops.iter().filter_map(|r| r.pds.as_deref()))?;
        let by_key: HashMap<uuid::Uuid, &str> =
            ops.iter().map(|r| (uuid_of(&DidKey::stored(&r.did)), r.did.as_str())).collect();
        let (dids, keys, pds, handles, as_of) = columns(&ops);
        let rows = t.query(
            "UPDATE identities i SET key = v.k, pds_id = e.id, handle = v.h, as_of = v.a
             FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::text[], $5::int8[]) AS v(d, k, u, h, a)
               LEFT JOIN pds_endpoints e ON e.url = v.u
             WHERE i.did = v.d AND i.as_of < v.a
             RETURNING i.did, i.key, v.u, i.handle, i.as_of",
            &[&dids, &keys, &pds, &handles, &as_of],
        )?;
        for r in &rows {
            if let Some(did) = by_key.get(&r.get::<_, uuid::Uuid>(0)) {
                changed.push(record_of((*did).to_owned(), r, 1));
            }
        }
    }
    if !tombstones.is_empty() {
        let by_key: HashMap<uuid::Uuid, &str> =
            tombstones.iter().map(|(d, _)| (uuid_of(&DidKey::stored(d)), d.as_str())).collect();
        let dids: Vec<uuid::Uuid> = tombstones.iter().map(|(d, _)| uuid_of(&DidKey::stored(d))).collect();
        let at: Vec<i64> = tombstones.iter().map(|(_, a)| *a).collect();
        let rows = t.query(
            "DELETE FROM identities i USING unnest($1::uuid[], $2::int8[]) AS v(d, a)
             WHERE i.did = v.d AND i.as_of < v.a RETURNING i.did, v.a",
            &[&dids, &at],
        )?;
        for r in &rows {
            if let Some(did) = by_key.get(&r.get::<_, uuid::Uuid>(0)) {
                changed.push(IdentityRecord {
                    did: (*did).to_owned(),
                    key: None,
                    pds: None,
                    handle: None,
                    as_of_micros: r.get(1),
                });
            }
        }
    }
    t.execute("UPDATE relay_meta SET plc_cursor = $1 WHERE id = 1", &[&cursor])?;
    t.commit()?;
    Ok(changed)
}

/// Where the PLC export was read up to (None: never followed).
pub fn plc_cursor(c: &mut Client) -> Result<Option<String>, DbError> {
    Ok(c.query_one("SELECT plc_cursor FROM relay_meta WHERE id = 1", &[])?.get(0))
}

pub fn set_plc_cursor(c: &mut Client, cursor: &str) -> Result<(), DbError> {
    c.execute("UPDATE relay_meta SET plc_cursor = $1 WHERE id = 1", &[&cursor])?;
    Ok(())
}
