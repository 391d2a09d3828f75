//! Collection index bench (issue 23), in this process, on the db-writer's
//! own index (`sluice_dbwriter::collections::index`):
//!
//! 1. A synthetic network: `--accounts` account numbers (41M), five big
//!    collections holding a share of them each (posts, likes, follows,
//!    reposts, profiles: 143M pairs) and `--small` collections of a few
//!    to a few hundred thousand repos each (Zipf sizes, 7M pairs).
//! 2. Memory: RSS over pairs; the serialized chunks (what Postgres stores,
//!    before its own per-row overhead and compression) over pairs.
//! 3. Pages: `--pages` pages of 2,000 from the biggest collection at
//!    random cursors, and of a small one, in microseconds (the index's
//!    part; the account lookup is measured end to end in sluice-accounts).
//! 4. Maintenance: `--commits` commits' presence lists applied as the
//!    sequencer does (decode, collection id, set), CPU per commit; and the
//!    round's chunk serialization per changed chunk.
//! 5. With `--database-url`: the chunks written to Postgres (COPY) and
//!    the table's size, then read back as the db-writer's start does.
//!
//! `cargo build --release --bins && target/release/sluice-collections`

use clap::Parser;
use rand::{Rng, SeedableRng};
use sluice_common::atproto::commit::{decode_presence, encode_presence, Presence};
use sluice_dbwriter::collections::index::CollectionIndex;
use sluice_tests::procinfo::status as proc_status;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 41_000_000)]
    accounts: u32,
    #[arg(long, default_value_t = 1000)]
    small: u32,
    #[arg(long, default_value_t = 2000)]
    pages: usize,
    #[arg(long, default_value_t = 1_000_000)]
    commits: usize,
    /// Write the chunks to this Postgres and measure them there.
    #[arg(long)]
    database_url: Option<String>,
}

/// The big collections and the share of accounts holding each.
const BIG: [(&str, f64); 5] = [
    ("app.bsky.actor.profile", 0.85),
    ("app.bsky.graph.follow", 0.73),
    ("app.bsky.feed.like", 0.68),
    ("app.bsky.feed.post", 0.62),
    ("app.bsky.feed.repost", 0.61),
];

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let me = std::process::id();
    let rss0 = proc_status(me, "VmRSS:");
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut ix = CollectionIndex::default();
    let t = Instant::now();
    for (name, share) in BIG {
        let id = ix.id_or_add(name).expect("room");
        for no in 1..=a.accounts {
            if rng.gen_bool(share) {
                ix.set(id, no, true);
            }
        }
    }
    // Small collections: sizes Zipf-like from 300k down, members anywhere.
    for k in 0..a.small {
        let id = ix.id_or_add(&format!("com.example.c{k}.record")).expect("room");
        let size = (300_000.0 / f64::from(k + 1).powf(0.9)) as u32 + 5;
        for _ in 0..size {
            ix.set(id, rng.gen_range(1..=a.accounts), true);
        }
    }
    let _ = ix.take_dirty();
    let _ = ix.take_new();
    let pairs = ix.pairs();
    let rss = proc_status(me, "VmRSS:") - rss0;
    println!(
        "index: {} collections, {pairs} pairs over {} accounts, built in {:.1} s",
        ix.collections(),
        a.accounts,
        t.elapsed().as_secs_f64()
    );
    let bytes = ix.bitmap_bytes();
    println!(
        "  memory: RSS +{} MiB = {:.2} B a pair; serialized chunks {} MiB = {:.2} B a pair",
        rss / 1024,
        rss as f64 * 1024.0 / pairs as f64,
        bytes >> 20,
        bytes as f64 / pairs as f64
    );
    pages(&a, &ix, &mut rng);
    maintenance(&a, &mut ix, &mut rng);
    if let Some(url) = &a.database_url {
        postgres_size(url, &mut ix, pairs)?;
    }
    Ok(())
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn pages(a: &Args, ix: &CollectionIndex, rng: &mut rand::rngs::StdRng) {
    for (name, what) in [("app.bsky.actor.profile", "biggest"), ("com.example.c10.record", "small")] {
        let id = ix.id(name).expect("built");
        let mut us = Vec::with_capacity(a.pages);
        for _ in 0..a.pages {
            let after = rng.gen_range(0..a.accounts);
            let t = Instant::now();
            let p = ix.page(&[id], Some(after), 2000);
            us.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(p);
        }
        println!(
            "  page of 2000 from {name} ({what}, {} repos): p50 {:.0} us, p99 {:.0} us",
            ix.len(id),
            percentile(&mut us, 0.5),
            percentile(&mut us, 0.99)
        );
    }
    let all: Vec<u32> = (0..5).map(|i| i as u32).collect();
    let t = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(ix.page(&all, Some(rng.gen_range(0..a.accounts)), 2000));
    }
    println!("  page of 2000 from the five big ones at once: {:.0} us", t.elapsed().as_secs_f64() * 1e4);
}

fn maintenance(a: &Args, ix: &mut CollectionIndex, rng: &mut rand::rngs::StdRng) {
    // Commits as the ring brings them: mostly one create in a big
    // collection; some deletes that empty it; a few small collections.
    let lists: Vec<Vec<u8>> = (0..1024)
        .map(|i| {
            let name = if i % 50 == 0 { format!("com.example.c{}.record", i % 997) } else { BIG[i % 5].0.to_owned() };
            let p = if i % 10 == 3 { Presence::Absent } else { Presence::Present };
            encode_presence(&[(&name, p)]).to_vec()
        })
        .collect();
    let nos: Vec<u32> = (0..4096).map(|_| rng.gen_range(1..=a.accounts)).collect();
    let t = Instant::now();
    let cpu0 = cpu_micros();
    for i in 0..a.commits {
        let no = nos[i % nos.len()];
        for (col, p) in decode_presence(&lists[i % lists.len()]) {
            if let Some(id) = ix.id_or_add(col) {
                ix.set(id, no, p == Presence::Present);
            }
        }
        if i % 2000 == 1999 {
            std::hint::black_box(ix.take_dirty());
        }
    }
    let cpu = cpu_micros() - cpu0;
    println!(
        "  maintenance: {} commits in {:.2} s; {:.3} us CPU a commit (rounds of 2000 commits, their changed chunks \
         serialized)",
        a.commits,
        t.elapsed().as_secs_f64(),
        cpu as f64 / a.commits as f64
    );
}

fn cpu_micros() -> u64 {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    sluice_tests::procinfo::cpu_ticks(std::process::id()) * 1_000_000 / tick
}

fn postgres_size(url: &str, ix: &mut CollectionIndex, pairs: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(
        "DROP TABLE IF EXISTS bench_collection_chunks;
         CREATE TABLE bench_collection_chunks (collection INT NOT NULL, chunk INT NOT NULL, bits BYTEA NOT NULL,
                                               PRIMARY KEY (collection, chunk))",
    )?;
    // Every chunk dirty once: the whole index as a first write would be.
    for id in 0..ix.collections() as u32 {
        let max = ix.page(&[id], None, usize::MAX);
        for no in max {
            ix.set(id, no, false);
            ix.set(id, no, true);
        }
    }
    let chunks = ix.take_dirty();
    let t = Instant::now();
    let mut w = c.copy_in("COPY bench_collection_chunks FROM STDIN (FORMAT text)")?;
    for (id, hi, bits) in &chunks {
        let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(w, "{id}\t{hi}\t\\\\x{hex}")?;
    }
    w.finish()?;
    c.batch_execute("VACUUM ANALYZE bench_collection_chunks")?;
    let size: i64 = c.query_one("SELECT pg_total_relation_size('bench_collection_chunks')", &[])?.get(0);
    println!(
        "  postgres: {} chunks written in {:.1} s; table with TOAST and index {} MiB = {:.2} B a pair",
        chunks.len(),
        t.elapsed().as_secs_f64(),
        size >> 20,
        size as f64 / pairs as f64
    );
    let t = Instant::now();
    let rows = c.query("SELECT collection, chunk, bits FROM bench_collection_chunks", &[])?;
    let mut back = CollectionIndex::default();
    for r in &rows {
        let (id, hi, bits): (i32, i32, &[u8]) = (r.get(0), r.get(1), r.get(2));
        back.load_collection(id as u32, &format!("c{id}"));
        back.load_chunk(id as u32, hi as u16, roaring::RoaringBitmap::deserialize_from(bits)?);
    }
    println!("  read back (the db-writer's start): {:.1} s, {} pairs", t.elapsed().as_secs_f64(), back.pairs());
    c.batch_execute("DROP TABLE bench_collection_chunks")?;
    Ok(())
}
