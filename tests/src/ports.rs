//! Host ports for the benches that put the shards' load even: fakenet
//! names its hosts `localhost:PORT`, and rendezvous hashing of those names
//! (`partition::shard_for`) decides each host's shard, so ephemeral ports
//! leave the split to chance (20 such hosts put ~87% of the events on one
//! of 2 shards in one bench; 4 hosts all on one shard in another).

use sluice_common::process::partition::shard_for;

/// A first port such that `base..base + hosts` split over `shards` as
/// evenly as whole hosts allow and, with the `extra` ports after them
/// (fakenet's directory), are free on loopback now.
pub fn balanced_base_port(hosts: usize, extra: usize, shards: u32) -> anyhow::Result<u16> {
    anyhow::ensure!(shards > 0, "{hosts} hosts over {shards} shards");
    // Hosts of equal weight; the most even split of whole hosts differs
    // by one host between shards, or by none.
    let mean = hosts as f64 / f64::from(shards);
    let tolerance = if hosts.is_multiple_of(shards as usize) || mean == 0.0 { 0.0 } else { 1.0 / mean };
    let (base, spread) = weighted_base_port(&vec![1; hosts], extra, shards, tolerance)?;
    anyhow::ensure!(spread <= tolerance + 1e-9, "no free range of {hosts} ports splits evenly over {shards} shards");
    Ok(base)
}

/// Like [`balanced_base_port`] for hosts of unequal traffic (`weights[i]`
/// host i's events): the free range whose shards' shares differ least,
/// the first whose spread ((max - min) / mean) is within `tolerance`.
/// Returns it with its spread.
pub fn weighted_base_port(weights: &[u64], extra: usize, shards: u32, tolerance: f64) -> anyhow::Result<(u16, f64)> {
    let hosts = weights.len();
    anyhow::ensure!(shards > 0 && hosts + extra < 1_000, "{hosts} hosts over {shards} shards");
    let mut best: Option<(u16, f64)> = None;
    let mut base: u16 = 20_000;
    for _ in 0..2_000 {
        let spread = spread(&shares(base, weights, shards));
        let free = || (0..hosts + extra).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i as u16)).is_ok());
        if best.is_none_or(|(_, s)| spread < s) && free() {
            best = Some((base, spread));
            if spread <= tolerance {
                break;
            }
        }
        base += (hosts + extra) as u16;
    }
    best.ok_or_else(|| anyhow::anyhow!("no free range of {hosts} ports"))
}

/// Each shard's events for the names `localhost:base + i` carrying `weights[i]`.
pub fn shares(base: u16, weights: &[u64], shards: u32) -> Vec<u64> {
    let mut per = vec![0u64; shards as usize];
    for (i, w) in weights.iter().enumerate() {
        per[shard_for(&format!("localhost:{}", base as usize + i), shards) as usize] += w;
    }
    per
}

/// (max - min) / mean of the shards' shares (0: even).
pub fn spread(per: &[u64]) -> f64 {
    let (max, min) = (per.iter().max().copied().unwrap_or(0), per.iter().min().copied().unwrap_or(0));
    let mean = per.iter().sum::<u64>() as f64 / per.len().max(1) as f64;
    if mean == 0.0 {
        0.0
    } else {
        (max - min) as f64 / mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_found_split_evenly() {
        for (hosts, shards) in [(20, 2), (4, 2), (7, 3), (1, 1)] {
            let base = balanced_base_port(hosts, 1, shards).unwrap();
            let per = shares(base, &vec![1; hosts], shards);
            assert_eq!(per.iter().sum::<u64>(), hosts as u64);
            assert!(per.iter().max().unwrap() - per.iter().min().unwrap() <= 1, "{hosts} over {shards}: {per:?}");
        }
    }

    #[test]
    fn unequal_hosts_split_within_the_tolerance() {
        // A Zipf-like traffic: host i carries 1000 / (i + 1).
        let weights: Vec<u64> = (0..20).map(|i| 1000 / (i + 1)).collect();
        let (base, s) = weighted_base_port(&weights, 1, 2, 0.1).unwrap();
        assert!(s <= 0.1, "{s}");
        assert_eq!(spread(&shares(base, &weights, 2)), s);
        assert_eq!(shares(base, &weights, 2).iter().sum::<u64>(), weights.iter().sum::<u64>());
        assert_eq!(spread(&[10, 10]), 0.0);
        assert_eq!(spread(&[15, 5]), 1.0);
    }
}
