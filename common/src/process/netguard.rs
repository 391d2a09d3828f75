//! Which hosts a public relay may dial (PROTOCOL §8: anyone can call
//! requestCrawl, so a hostname is hostile input, and a name may resolve to
//! any internal address, now or at the next reconnect).
//!
//! [`name_refused`] rules out names that only mean something inside a
//! network (`localhost`, `*.local`, `*.internal`, single labels, ...);
//! [`address_refused`] rules out every address in the IANA IPv4 and IPv6
//! special-purpose registries that is not globally reachable (loopback,
//! unspecified, private, shared, link-local, documentation, benchmarking,
//! multicast, reserved...), and looks through IPv4-mapped, IPv4-compatible,
//! NAT64 and 6to4 forms to the IPv4 address inside. Both are pure; the
//! query workers apply them at requestCrawl and the shards to every address
//! they are about to connect to, unless `allow_insecure_hosts`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a name may not be crawled, if it may not.
pub fn name_refused(host: &str) -> Option<&'static str> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if let Ok(ip) = h.parse::<IpAddr>() {
        return address_refused(ip);
    }
    if h == "localhost" || h.ends_with(".localhost") {
        return Some("localhost names are this machine");
    }
    if !h.contains('.') {
        return Some("single-label names are local to a network");
    }
    const LOCAL_SUFFIXES: [(&str, &str); 6] = [
        (".local", "mDNS (.local) names are local to a network"),
        (".internal", ".internal names are private to a network"),
        (".home.arpa", ".home.arpa names are private to a home network"),
        (".lan", ".lan names are local to a network"),
        (".intranet", ".intranet names are private to a network"),
        (".corp", ".corp names are private to a network"),
    ];
    for (suffix, why) in LOCAL_SUFFIXES {
        if h.ends_with(suffix) {
            return Some(why);
        }
    }
    if h.ends_with(".arpa") {
        return Some("reverse-lookup (.arpa) names are not hosts");
    }
    None
}

/// Why an address may not be dialed, if it may not.
pub fn address_refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_refused(v4),
        IpAddr::V6(v6) => v6_refused(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// IANA IPv4 special-purpose registry, less what is globally reachable.
const V4_RANGES: [([u8; 4], u32, &str); 17] = [
    ([0, 0, 0, 0], 8, "\"this network\" (0.0.0.0/8)"),
    ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
    ([100, 64, 0, 0], 10, "shared address space (100.64.0.0/10)"),
    ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
    ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
    ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
    ([192, 0, 0, 0], 24, "IETF protocol assignments (192.0.0.0/24)"),
    ([192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"),
    ([192, 31, 196, 0], 24, "AS112-v4 (192.31.196.0/24)"),
    ([192, 52, 193, 0], 24, "AMT (192.52.193.0/24)"),
    ([192, 88, 99, 0], 24, "deprecated 6to4 relay anycast (192.88.99.0/24)"),
    ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
    ([192, 175, 48, 0], 24, "direct delegation AS112 (192.175.48.0/24)"),
    ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
    ([198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"),
    ([203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"),
    ([224, 0, 0, 0], 3, "multicast or reserved (224.0.0.0/3, broadcast included)"),
];

fn v4_refused(ip: Ipv4Addr) -> Option<&'static str> {
    V4_RANGES.iter().find(|(net, bits, _)| in_v4(ip, *net, *bits)).map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], bits: u32) -> bool {
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

fn v6_refused(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    // Forms that carry an IPv4 address: judge the address inside.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_refused(v4);
    }
    if in_v6(ip, [0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48) {
        return Some("local-use NAT64 (64:ff9b:1::/48)");
    }
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        // Well-known NAT64: the IPv4 address it translates to.
        return v4_refused(Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32));
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        // 6to4: the IPv4 address of the relay router inside.
        return v4_refused(Ipv4Addr::new((seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8));
    }
    const V6_RANGES: [([u16; 8], u32, &str); 14] = [
        ([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified (::)"),
        ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback (::1)"),
        ([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible (::/96, deprecated)"),
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (100::/64)"),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, "IETF protocol assignments (2001::/23)"),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation (2001:db8::/32)"),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation (3fff::/20)"),
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing SIDs (5f00::/16)"),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (fc00::/7)"),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local (fe80::/10)"),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (fec0::/10, deprecated)"),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast (ff00::/8)"),
        ([0, 0, 0, 0, 0, 0, 0, 0], 8, "reserved (::/8)"),
        ([0x4000, 0, 0, 0, 0, 0, 0, 0], 2, "not global unicast (outside 2000::/3)"),
    ];
    if let Some((_, _, why)) = V6_RANGES.iter().find(|(net, bits, _)| in_v6(ip, *net, *bits)) {
        return Some(why);
    }
    // Only 2000::/3 is global unicast; 4000::/2 above caught 4000-7fff,
    // this catches 8000::/1.
    if seg[0] & 0xe000 != 0x2000 {
        return Some("not global unicast (outside 2000::/3)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        address_refused(s.parse().unwrap()).is_some()
    }

    /// Every IPv4 range, at its first and last address, and the public
    /// addresses just outside.
    #[test]
    fn ipv4_ranges() {
        for (net, bits, why) in V4_RANGES {
            let first = u32::from(Ipv4Addr::from(net));
            let last = first | if bits == 32 { 0 } else { u32::MAX >> bits };
            assert!(v4_refused(Ipv4Addr::from(first)).is_some(), "{why} first");
            assert!(v4_refused(Ipv4Addr::from(last)).is_some(), "{why} last");
        }
        for s in [
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.31.255.255",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "198.19.0.1",
        ] {
            assert!(refused(s), "{s}");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "192.0.1.1",
            "9.255.255.255",
            "11.0.0.0",
        ] {
            assert!(!refused(s), "{s}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        for s in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001:db8::1",
            "3fff::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001::1",
            "2001:2::1",
            "5f00::1",
            "4000::1",
            "8000::1",
            "::2",
        ] {
            assert!(refused(s), "{s}");
        }
        for s in [
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2a00:1450::1",
        ] {
            assert!(!refused(s), "{s}");
        }
    }

    #[test]
    fn names() {
        for s in [
            "localhost",
            "LOCALHOST.",
            "a.localhost",
            "printer.local",
            "metadata.google.internal",
            "foo.internal",
            "nas.home.arpa",
            "router.lan",
            "intranet",
            "1.0.0.127.in-addr.arpa",
            "169.254.169.254",
            "::1",
        ] {
            assert!(name_refused(s).is_some(), "{s}");
        }
        for s in ["pds.example.com", "bsky.network", "morel.us-east.host.bsky.network", "8.8.8.8"] {
            assert!(name_refused(s).is_none(), "{s}");
        }
    }
}
