//! Which shard serves which upstream host: rendezvous (highest random
//! weight) hashing on the hostname. Changing the shard count from N to M
//! moves only the hosts whose winning shard changed, about |N-M|/max(N,M)
//! of them, and every process computes the same answer.

/// 64-bit mix of (hostname, shard): FNV-1a then a SplitMix finaliser.
fn weight(host: &str, shard: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain(shard.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The shard (0..shard_count) for `host`.
pub fn shard_for(host: &str, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "shard_count must be positive");
    (0..shard_count).max_by_key(|&k| (weight(host, k), std::cmp::Reverse(k))).expect("at least one shard")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_and_minimal_movement() {
        let hosts: Vec<String> = (0..10_000).map(|i| format!("pds{i}.example.com")).collect();
        let mut counts = [0u32; 4];
        for h in &hosts {
            counts[shard_for(h, 4) as usize] += 1;
        }
        for c in counts {
            assert!((2_200..2_800).contains(&c), "{counts:?}");
        }
        let moved = hosts.iter().filter(|h| shard_for(h, 4) != shard_for(h, 5)).count();
        // Ideal: 1/5 of hosts move to the new shard, and only to it.
        assert!((1_700..2_300).contains(&moved), "{moved}");
        for h in &hosts {
            let (a, b) = (shard_for(h, 4), shard_for(h, 5));
            assert!(a == b || b == 4);
        }
        assert_eq!(shard_for("x", 1), 0);
    }
}
