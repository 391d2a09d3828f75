//! Syntax of AT Protocol identifiers and strings.
//!
//! Validators are plain functions (`is_did`, `is_handle`, ...) written by
//! hand over bytes: they run on every event, and each rule of the spec maps
//! to a line here. The types that travel through the relay ([`Did`],
//! [`Tid`]) can only be built from a valid string ("callers check,
//! callees trust").

use std::fmt;

/// `did:method:identifier`, at most 2 KiB.
pub fn is_did(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > 2048 || !s.starts_with("did:") {
        return false;
    }
    let rest = &b[4..];
    let Some(colon) = rest.iter().position(|&c| c == b':') else {
        return false;
    };
    let (method, id) = (&rest[..colon], &rest[colon + 1..]);
    if method.is_empty() || !method.iter().all(|c| c.is_ascii_lowercase()) {
        return false;
    }
    let Some(&last) = id.last() else { return false };
    if last == b':' || last == b'%' {
        return false;
    }
    id.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'%' | b'-'))
}

/// One DNS-style label: 1..=63 of `[A-Za-z0-9-]`, no hyphen at either end.
fn is_label(l: &[u8]) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && l[0] != b'-'
        && l[l.len() - 1] != b'-'
}

/// A DNS-style handle: at least two labels, TLD starting with a letter.
pub fn is_handle(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 253 {
        return false;
    }
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for l in b.split(|&c| c == b'.') {
        if !is_label(l) {
            return false;
        }
        labels += 1;
        last = l;
    }
    labels >= 2 && last[0].is_ascii_alphabetic()
}

/// Namespaced identifier: reversed domain authority plus a name segment.
pub fn is_nsid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > 317 {
        return false;
    }
    let Some(dot) = b.iter().rposition(|&c| c == b'.') else { return false };
    let (domain, name) = (&b[..dot], &b[dot + 1..]);
    let mut segments = 0;
    for l in domain.split(|&c| c == b'.') {
        if !is_label(l) || (segments == 0 && !l[0].is_ascii_alphabetic()) {
            return false;
        }
        segments += 1;
    }
    segments >= 2
        && !name.is_empty()
        && name.len() <= 63
        && name[0].is_ascii_alphabetic()
        && name.iter().all(|c| c.is_ascii_alphanumeric())
}

/// Record key: 1..=512 of `[A-Za-z0-9._:~-]`, not `.` or `..`.
pub fn is_record_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 512
        && s != "."
        && s != ".."
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'~' | b'-'))
}

const TID_CHARS: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// Timestamp identifier: 13 chars of base32-sortable, high bit clear.
pub fn is_tid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 13 && b"234567abcdefghij".contains(&b[0]) && b.iter().all(|c| TID_CHARS.contains(c))
}

/// `did` or `handle`.
pub fn is_at_identifier(s: &str) -> bool {
    is_did(s) || is_handle(s)
}

/// Strict AT URI: `at://authority[/collection[/rkey]]`, no query/fragment.
pub fn is_at_uri(s: &str) -> bool {
    if s.len() > 8192 {
        return false;
    }
    let Some(rest) = s.strip_prefix("at://") else {
        return false;
    };
    let mut parts = rest.split('/');
    let authority = parts.next().unwrap_or("");
    if !is_at_identifier(authority) {
        return false;
    }
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => true,
        (Some(c), None, _) => is_nsid(c),
        (Some(c), Some(r), None) => is_nsid(c) && is_record_key(r),
        _ => false,
    }
}

/// Loose CID string check (the Lexicon `cid` format), CIDv0 excluded.
pub fn is_cid_string(s: &str) -> bool {
    (8..=256).contains(&s.len())
        && !s.starts_with("Qmb")
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'=')
}

/// Generic URI: a scheme, a colon, and printable non-space ASCII; ≤ 8 KiB.
pub fn is_uri(s: &str) -> bool {
    if s.len() > 8192 {
        return false;
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let sb = scheme.as_bytes();
    !sb.is_empty()
        && sb.len() <= 81
        && sb[0].is_ascii_lowercase()
        && sb.iter().all(|c| c.is_ascii_lowercase() || *c == b'.' || *c == b'-')
        && !rest.is_empty()
        && rest.bytes().all(|c| (b'!'..=b'~').contains(&c))
}

/// BCP-47 language tag, in the relaxed form atproto uses.
pub fn is_language(s: &str) -> bool {
    let mut tags = s.split('-');
    let primary = tags.next().unwrap_or("");
    let pb = primary.as_bytes();
    let primary_ok = matches!(primary, "i" | "x" | "X")
        || ((2..=3).contains(&pb.len()) && pb.iter().all(|c| c.is_ascii_lowercase()));
    primary_ok && tags.all(|t| (1..=8).contains(&t.len()) && t.bytes().all(|c| c.is_ascii_alphanumeric()))
}

/// A syntactically valid tag whose variants and extension singletons do
/// not repeat (RFC 5646 §2.2.9).
pub fn is_valid_language(s: &str) -> bool {
    if !is_language(s) {
        return false;
    }
    let mut variants: Vec<String> = Vec::new();
    let mut singletons: Vec<String> = Vec::new();
    for t in s.split('-').skip(1) {
        let lower = t.to_ascii_lowercase();
        if lower == "x" {
            break; // private use: anything goes after
        }
        if t.len() == 1 {
            if singletons.contains(&lower) {
                return false;
            }
            singletons.push(lower);
        } else if singletons.is_empty() {
            let is_variant = (5..=8).contains(&t.len()) || (t.len() == 4 && t.as_bytes()[0].is_ascii_digit());
            if is_variant {
                if variants.contains(&lower) {
                    return false;
                }
                variants.push(lower);
            }
        }
    }
    true
}

/// A parsed datetime, normalised to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Datetime {
    /// Seconds since 0000-01-01T00:00:00Z.
    pub secs: i64,
    pub nanos: u32,
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |a, &c| a * 10 + (c - b'0') as u32))
}

/// Syntax only: `YYYY-MM-DDTHH:MM:SS[.f+](Z|±HH:MM)`, not `-00:00`.
pub fn is_datetime_syntax(s: &str) -> bool {
    datetime_fields(s).is_some()
}

struct Fields {
    y: u32,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    sec: u32,
    nanos: u32,
    offset_min: i32,
}

fn datetime_fields(s: &str) -> Option<Fields> {
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 64 {
        return None;
    }
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let y = digits(&b[0..4])?;
    let mo = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    let h = digits(&b[11..13])?;
    let mi = digits(&b[14..16])?;
    let sec = digits(&b[17..19])?;
    let mut i = 19;
    let mut nanos = 0u32;
    if b[i] == b'.' {
        let start = i + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            return None;
        }
        let frac = &b[start..end];
        for k in 0..9 {
            nanos = nanos * 10 + frac.get(k).map_or(0, |c| (c - b'0') as u32);
        }
        i = end;
    }
    let tz = &b[i..];
    let offset_min = match tz {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            if tz == b"-00:00" {
                return None;
            }
            let oh = digits(&[*h1, *h2])? as i32;
            let om = digits(&[*m1, *m2])? as i32;
            let v = oh * 60 + om;
            if *sign == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    Some(Fields { y, mo, d, h, mi, sec, nanos, offset_min })
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        _ => 28,
    }
}

/// Days from 0000-03-01 based civil calendar (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe
}

impl Datetime {
    /// Parse and check the calendar; reject times before year 0 in UTC.
    pub fn parse(s: &str) -> Option<Datetime> {
        let f = datetime_fields(s)?;
        if !(1..=12).contains(&f.mo) || f.d == 0 || f.d > days_in_month(f.y, f.mo) {
            return None;
        }
        if f.h > 23 || f.mi > 59 || f.sec > 60 {
            return None;
        }
        let days = days_from_civil(f.y as i64, f.mo, f.d) - days_from_civil(0, 1, 1);
        let secs = days * 86_400 + (f.h * 3600 + f.mi * 60 + f.sec) as i64 - f.offset_min as i64 * 60;
        if secs < 0 {
            return None;
        }
        Some(Datetime { secs, nanos: f.nanos })
    }

    /// Unix time in microseconds.
    pub fn unix_micros(&self) -> i64 {
        let epoch = (days_from_civil(1970, 1, 1) - days_from_civil(0, 1, 1)) * 86_400;
        (self.secs - epoch) * 1_000_000 + (self.nanos / 1000) as i64
    }
}

/// Format unix microseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_datetime_micros(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let millis = unix_micros.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days (Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:path, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<$name, SyntaxError> {
                let s = s.into();
                if $check(&s) {
                    Ok($name(s))
                } else {
                    Err(SyntaxError { what: $what, value: truncate_for_error(&s) })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = SyntaxError;
            fn from_str(s: &str) -> Result<$name, SyntaxError> {
                $name::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {value:?}")]
pub struct SyntaxError {
    pub what: &'static str,
    pub value: String,
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(80).collect()
}

checked_string!(
    /// A syntactically valid DID.
    Did, is_did, "DID"
);
checked_string!(
    /// A syntactically valid TID; ordering of TIDs is ordering of strings.
    Tid, is_tid, "TID"
);

/// A TID's 64-bit number (None: not a TID). Compact storage of revs: the
/// numbers order as the TIDs do.
pub fn tid_value(s: &str) -> Option<u64> {
    if !is_tid(s) {
        return None;
    }
    Some(s.bytes().fold(0u64, |a, c| (a << 5) | TID_CHARS.iter().position(|&x| x == c).unwrap_or(0) as u64))
}
checked_string!(
    /// A syntactically valid handle.
    Handle, is_handle, "handle"
);

impl Tid {
    /// The TID for a unix time in microseconds and a 10-bit clock id.
    pub fn from_micros(micros: u64, clock_id: u16) -> Tid {
        let v = ((micros & ((1 << 53) - 1)) << 10) | (clock_id as u64 & 0x3ff);
        let mut s = [0u8; 13];
        for (i, c) in s.iter_mut().enumerate() {
            let shift = 5 * (12 - i);
            *c = TID_CHARS[((v >> shift) & 31) as usize];
        }
        Tid(String::from_utf8(s.to_vec()).expect("ascii"))
    }

    /// The TID as its 64-bit number (its order is the TID's order).
    pub fn value(&self) -> u64 {
        tid_value(&self.0).expect("valid TID")
    }

    /// The TID whose number is `v` (the top bit is ignored: TIDs have it
    /// clear).
    pub fn from_value(v: u64) -> Tid {
        let v = v & (u64::MAX >> 1);
        let mut s = [0u8; 13];
        for (i, c) in s.iter_mut().enumerate() {
            let shift = 5 * (12 - i);
            *c = TID_CHARS[((v >> shift) & 31) as usize];
        }
        Tid(String::from_utf8(s.to_vec()).expect("ascii"))
    }

    /// Microseconds since the unix epoch encoded in the TID.
    pub fn micros(&self) -> u64 {
        let v = self
            .0
            .bytes()
            .fold(0u64, |a, c| (a << 5) | TID_CHARS.iter().position(|&x| x == c).expect("valid TID") as u64);
        v >> 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_values_round_trip_and_keep_order() {
        let a = Tid::from_micros(1_700_000_000_000_000, 5);
        let b = Tid::from_micros(1_700_000_000_000_001, 0);
        assert_eq!(Tid::from_value(a.value()), a);
        assert!(a.value() < b.value() && a.as_str() < b.as_str());
        assert_eq!(tid_value("3kabc"), None);
        assert_eq!(tid_value(a.as_str()), Some(a.value()));
        assert!(a.value() < 1 << 63, "fits a signed 64-bit column");
    }

    #[test]
    fn tid_round_trip_and_order() {
        let a = Tid::from_micros(1_700_000_000_000_000, 7);
        let b = Tid::from_micros(1_700_000_000_000_001, 0);
        assert!(is_tid(a.as_str()));
        assert!(a < b);
        assert_eq!(a.micros(), 1_700_000_000_000_000);
    }

    #[test]
    fn datetime_round_trip() {
        let d = Datetime::parse("2025-04-16T21:30:26.717Z").unwrap();
        assert_eq!(format_datetime_micros(d.unix_micros()), "2025-04-16T21:30:26.717Z");
        assert_eq!(Datetime::parse("1970-01-01T00:00:00Z").unwrap().unix_micros(), 0);
        assert!(Datetime::parse("2023-02-29T00:00:00Z").is_none());
        assert!(Datetime::parse("2024-02-29T00:00:00Z").is_some());
    }
}
