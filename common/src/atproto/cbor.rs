//! A strict, zero-copy DAG-CBOR reader and a canonical writer.
//!
//! The relay decodes a handful of fixed shapes (frame header and bodies,
//! commit objects, MST nodes, the CAR header) millions of times a second, and
//! needs three things a generic serde decoder does not give it: byte offsets
//! (to re-sequence a frame by splicing one integer, and to derive the
//! unsigned commit bytes), borrowed slices for every string and byte string
//! (blocks are never copied), and the parse limits of the protocol (nesting
//! 32, containers of 131,072 items, keys of 8 KiB) enforced on every value,
//! including the ones we skip. So [`Reader`] is a small pull parser: the
//! typed decoders in `frame`, `mst`, `car` and `commit` drive it directly.
//!
//! Strictness: definite lengths only, tag 42 (CID links) only, 64-bit floats
//! only and never NaN/Infinity, UTF-8 text, simple values false/true/null.
//! Map keys must be text. Minimal integer encoding and key order are checked
//! by [`Value::decode`] (the generic path) but not on frames, which are
//! accepted as any PDS writes them; the bytes we hash are hashed as received.
//!
//! [`Writer`] always produces canonical DAG-CBOR: shortest heads, and callers
//! write map keys in canonical order (length first, then bytes); [`Value`]
//! sorts for them.

use crate::atproto::cid::{Cid, CidError, CID_BINARY_LEN};
use std::collections::BTreeMap;

/// Parse limits from PROTOCOL.md §2.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub depth_max: usize,
    pub container_len_max: u64,
    pub key_bytes_max: usize,
}

pub const LIMITS: Limits = Limits { depth_max: 32, container_len_max: 131_072, key_bytes_max: 8192 };

pub const MAJOR_UINT: u8 = 0;
pub const MAJOR_NINT: u8 = 1;
pub const MAJOR_BYTES: u8 = 2;
pub const MAJOR_TEXT: u8 = 3;
pub const MAJOR_ARRAY: u8 = 4;
pub const MAJOR_MAP: u8 = 5;
pub const MAJOR_TAG: u8 = 6;
pub const MAJOR_SIMPLE: u8 = 7;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CborError {
    #[error("unexpected end of input at byte {0}")]
    Eof(usize),
    #[error("reserved additional info {1} at byte {0}")]
    Reserved(usize, u8),
    #[error("indefinite length item at byte {0} (not allowed in DAG-CBOR)")]
    Indefinite(usize),
    #[error("expected {expected} at byte {pos}, found major type {found}")]
    Type { pos: usize, expected: &'static str, found: u8 },
    #[error("invalid UTF-8 text at byte {0}")]
    Utf8(usize),
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    #[error("container of {1} items at byte {0} exceeds the limit")]
    TooLong(usize, u64),
    #[error("map key of {1} bytes at byte {0} exceeds the limit")]
    KeyTooLong(usize, usize),
    #[error("tag {1} at byte {0} (only 42 is allowed)")]
    Tag(usize, u64),
    #[error("float at byte {0} is not a finite 64-bit float")]
    Float(usize),
    #[error("simple value {1} at byte {0} is not allowed")]
    Simple(usize, u8),
    #[error("bad CID link at byte {0}: {1}")]
    Cid(usize, CidError),
    #[error("integer at byte {0} does not fit")]
    Overflow(usize),
    #[error("integer or length at byte {0} is not minimally encoded")]
    NonMinimal(usize),
    #[error("map keys at byte {0} are not in canonical order or repeat")]
    KeyOrder(usize),
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    #[error("missing field {0:?}")]
    Missing(&'static str),
    #[error("field {0:?}: {1}")]
    Field(&'static str, &'static str),
}

pub type Result<T, E = CborError> = std::result::Result<T, E>;

/// A pull parser over a borrowed buffer.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Fail unless the whole input was consumed.
    pub fn finish(&self) -> Result<()> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(CborError::Trailing(n)),
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(CborError::Eof(self.pos))?;
        if end > self.buf.len() {
            return Err(CborError::Eof(self.pos));
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Major type of the next item, without consuming it.
    pub fn peek_major(&self) -> Result<u8> {
        self.buf.get(self.pos).map(|b| b >> 5).ok_or(CborError::Eof(self.pos))
    }

    /// Is the next item `null`?
    #[inline]
    pub fn peek_null(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xf6)
    }

    /// Read an item head: (major type, argument, minimal?).
    #[inline]
    fn head_full(&mut self) -> Result<(u8, u64, bool)> {
        let at = self.pos;
        let b = *self.buf.get(self.pos).ok_or(CborError::Eof(at))?;
        self.pos += 1;
        let major = b >> 5;
        let ai = b & 0x1f;
        let (arg, minimal) = match ai {
            0..=23 => (ai as u64, true),
            24 => {
                let v = self.take(1)?[0] as u64;
                (v, v >= 24)
            }
            25 => {
                let s = self.take(2)?;
                let v = u16::from_be_bytes([s[0], s[1]]) as u64;
                (v, v > 0xff)
            }
            26 => {
                let s = self.take(4)?;
                let v = u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64;
                (v, v > 0xffff)
            }
            27 => {
                let s = self.take(8)?;
                let v = u64::from_be_bytes(s.try_into().expect("8 bytes"));
                (v, v > 0xffff_ffff)
            }
            31 => return Err(CborError::Indefinite(at)),
            _ => return Err(CborError::Reserved(at, ai)),
        };
        // Floats keep their width in the additional info; minimality does
        // not apply to them.
        Ok((major, arg, minimal || major == MAJOR_SIMPLE))
    }

    #[inline]
    fn head(&mut self) -> Result<(u8, u64)> {
        self.head_full().map(|(m, a, _)| (m, a))
    }

    #[inline]
    fn expect(&mut self, major: u8, what: &'static str) -> Result<u64> {
        let at = self.pos;
        let (m, arg) = self.head()?;
        if m != major {
            self.pos = at;
            return Err(CborError::Type { pos: at, expected: what, found: m });
        }
        Ok(arg)
    }

    #[inline]
    pub fn u64(&mut self) -> Result<u64> {
        self.expect(MAJOR_UINT, "unsigned integer")
    }

    /// A signed integer that fits in i64.
    pub fn i64(&mut self) -> Result<i64> {
        let at = self.pos;
        let (m, arg) = self.head()?;
        match m {
            MAJOR_UINT => i64::try_from(arg).map_err(|_| CborError::Overflow(at)),
            MAJOR_NINT => {
                let v = i64::try_from(arg).map_err(|_| CborError::Overflow(at))?;
                Ok(-1 - v)
            }
            found => {
                self.pos = at;
                Err(CborError::Type { pos: at, expected: "integer", found })
            }
        }
    }

    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.expect(MAJOR_BYTES, "byte string")?;
        self.take(usize::try_from(n).map_err(|_| CborError::Eof(self.pos))?)
    }

    #[inline]
    pub fn text(&mut self) -> Result<&'a str> {
        let at = self.pos;
        let n = self.expect(MAJOR_TEXT, "text string")?;
        let s = self.take(usize::try_from(n).map_err(|_| CborError::Eof(self.pos))?)?;
        std::str::from_utf8(s).map_err(|_| CborError::Utf8(at))
    }

    /// A map key: text within the key length limit.
    #[inline]
    pub fn key(&mut self) -> Result<&'a str> {
        let at = self.pos;
        let k = self.text()?;
        if k.len() > LIMITS.key_bytes_max {
            return Err(CborError::KeyTooLong(at, k.len()));
        }
        Ok(k)
    }

    /// A map key as bytes, for decoders that match known ASCII keys: UTF-8
    /// is checked only when the key is not plain ASCII.
    #[inline]
    pub fn key_bytes(&mut self) -> Result<&'a [u8]> {
        let at = self.pos;
        let n = self.expect(MAJOR_TEXT, "text string")?;
        let k = self.take(usize::try_from(n).map_err(|_| CborError::Eof(self.pos))?)?;
        if k.len() > LIMITS.key_bytes_max {
            return Err(CborError::KeyTooLong(at, k.len()));
        }
        if !k.is_ascii() && std::str::from_utf8(k).is_err() {
            return Err(CborError::Utf8(at));
        }
        Ok(k)
    }

    pub fn array(&mut self) -> Result<usize> {
        let at = self.pos;
        let n = self.expect(MAJOR_ARRAY, "array")?;
        check_len(at, n)
    }

    pub fn map(&mut self) -> Result<usize> {
        let at = self.pos;
        let n = self.expect(MAJOR_MAP, "map")?;
        check_len(at, n)
    }

    pub fn bool(&mut self) -> Result<bool> {
        let at = self.pos;
        match self.buf.get(self.pos) {
            Some(0xf4) => {
                self.pos += 1;
                Ok(false)
            }
            Some(0xf5) => {
                self.pos += 1;
                Ok(true)
            }
            Some(b) => Err(CborError::Type { pos: at, expected: "boolean", found: b >> 5 }),
            None => Err(CborError::Eof(at)),
        }
    }

    /// Consume a `null` if one is next; report whether it was.
    #[inline]
    pub fn null(&mut self) -> bool {
        if self.peek_null() {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A CID link: tag 42 over a byte string `0x00 ‖ cid`.
    #[inline]
    pub fn cid(&mut self) -> Result<Cid> {
        let at = self.pos;
        let tag = self.expect(MAJOR_TAG, "CID link")?;
        if tag != 42 {
            return Err(CborError::Tag(at, tag));
        }
        let b = self.bytes()?;
        match b.split_first() {
            Some((0, rest)) => Cid::from_bytes(rest).map_err(|e| CborError::Cid(at, e)),
            Some(_) => Err(CborError::Cid(at, CidError::Version(b[0]))),
            None => Err(CborError::Cid(at, CidError::Length(0))),
        }
    }

    /// `null` or a CID link.
    #[inline]
    pub fn opt_cid(&mut self) -> Result<Option<Cid>> {
        if self.null() {
            Ok(None)
        } else {
            self.cid().map(Some)
        }
    }

    /// `null` or text.
    pub fn opt_text(&mut self) -> Result<Option<&'a str>> {
        if self.null() {
            Ok(None)
        } else {
            self.text().map(Some)
        }
    }

    /// Skip one complete value of any type at nesting level `depth`,
    /// enforcing every limit on the way. Returns the skipped bytes.
    pub fn skip(&mut self, depth: usize) -> Result<&'a [u8]> {
        let start = self.pos;
        self.skip_inner(depth)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip_inner(&mut self, depth: usize) -> Result<()> {
        if depth > LIMITS.depth_max {
            return Err(CborError::TooDeep(LIMITS.depth_max));
        }
        let at = self.pos;
        let (major, arg) = self.head()?;
        match major {
            MAJOR_UINT | MAJOR_NINT => Ok(()),
            MAJOR_BYTES => self.take(arg as usize).map(|_| ()),
            MAJOR_TEXT => {
                let s = self.take(arg as usize)?;
                std::str::from_utf8(s).map(|_| ()).map_err(|_| CborError::Utf8(at))
            }
            MAJOR_ARRAY => {
                let n = check_len(at, arg)?;
                for _ in 0..n {
                    self.skip_inner(depth + 1)?;
                }
                Ok(())
            }
            MAJOR_MAP => {
                let n = check_len(at, arg)?;
                for _ in 0..n {
                    self.key()?;
                    self.skip_inner(depth + 1)?;
                }
                Ok(())
            }
            MAJOR_TAG => {
                self.pos = at;
                self.cid().map(|_| ())
            }
            _ => check_simple(at, self.buf[at], arg),
        }
    }
}

fn check_len(at: usize, n: u64) -> Result<usize> {
    if n > LIMITS.container_len_max {
        return Err(CborError::TooLong(at, n));
    }
    Ok(n as usize)
}

fn check_simple(at: usize, initial: u8, arg: u64) -> Result<()> {
    match initial {
        0xf4..=0xf6 => Ok(()),
        0xfb => {
            let f = f64::from_bits(arg);
            if f.is_finite() {
                Ok(())
            } else {
                Err(CborError::Float(at))
            }
        }
        0xf9 | 0xfa => Err(CborError::Float(at)),
        _ => Err(CborError::Simple(at, (arg & 0xff) as u8)),
    }
}

/// Canonical DAG-CBOR key order: shorter keys first, then bytewise.
pub fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Writes canonical DAG-CBOR into a growable buffer.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { buf: Vec::new() }
    }

    pub fn with_capacity(n: usize) -> Writer {
        Writer { buf: Vec::with_capacity(n) }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub fn head(&mut self, major: u8, n: u64) {
        write_head(&mut self.buf, major, n);
    }

    pub fn u64(&mut self, v: u64) {
        self.head(MAJOR_UINT, v);
    }

    pub fn i64(&mut self, v: i64) {
        if v >= 0 {
            self.head(MAJOR_UINT, v as u64);
        } else {
            self.head(MAJOR_NINT, (-1 - v) as u64);
        }
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.head(MAJOR_BYTES, b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub fn text(&mut self, s: &str) {
        self.head(MAJOR_TEXT, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn array(&mut self, n: usize) {
        self.head(MAJOR_ARRAY, n as u64);
    }

    pub fn map(&mut self, n: usize) {
        self.head(MAJOR_MAP, n as u64);
    }

    pub fn bool(&mut self, b: bool) {
        self.buf.push(if b { 0xf5 } else { 0xf4 });
    }

    pub fn null(&mut self) {
        self.buf.push(0xf6);
    }

    pub fn cid(&mut self, c: &Cid) {
        self.head(MAJOR_TAG, 42);
        self.head(MAJOR_BYTES, (CID_BINARY_LEN + 1) as u64);
        self.buf.push(0);
        self.buf.extend_from_slice(&c.to_bytes());
    }

    pub fn opt_cid(&mut self, c: Option<&Cid>) {
        match c {
            Some(c) => self.cid(c),
            None => self.null(),
        }
    }

    pub fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }

    /// Append already-encoded CBOR.
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Append a minimal item head to `out`.
pub fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let mut b = [0u8; 9];
    out.extend_from_slice(head(&mut b, major, n));
}

/// A minimal item head, written into `buf`; returns its bytes.
pub fn head(buf: &mut [u8; 9], major: u8, n: u64) -> &[u8] {
    let m = major << 5;
    let len = head_len(n);
    match len {
        1 => buf[0] = m | n as u8,
        2 => buf[..2].copy_from_slice(&[m | 24, n as u8]),
        3 => {
            buf[0] = m | 25;
            buf[1..3].copy_from_slice(&(n as u16).to_be_bytes());
        }
        5 => {
            buf[0] = m | 26;
            buf[1..5].copy_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            buf[0] = m | 27;
            buf[1..9].copy_from_slice(&n.to_be_bytes());
        }
    }
    &buf[..len]
}

/// Length in bytes of the minimal head for argument `n`.
pub fn head_len(n: u64) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Any DAG-CBOR value, for the generic paths (JSON conversion, records in
/// the synthetic network, tests). The hot paths never build one.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// -2^64 ..= 2^64-1
    Integer(i128),
    Float(f64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Value>),
    Map(BTreeMap<String, Value>),
    Link(Cid),
}

/// Why atproto JSON does not convert to DAG-CBOR ([`Value::from_json`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FromJsonError {
    #[error("number {0} is not an integer")]
    NotAnInteger(String),
    #[error("$link: {0}")]
    Link(String),
    #[error("$bytes: {0}")]
    Bytes(String),
}

impl Value {
    /// Decode exactly one value from `buf` with full canonical checks.
    pub fn decode(buf: &[u8]) -> Result<Value> {
        let mut r = Reader::new(buf);
        let v = Value::read(&mut r, 0)?;
        r.finish()?;
        Ok(v)
    }

    pub fn read(r: &mut Reader<'_>, depth: usize) -> Result<Value> {
        if depth > LIMITS.depth_max {
            return Err(CborError::TooDeep(LIMITS.depth_max));
        }
        let at = r.pos;
        let (major, arg, minimal) = r.head_full()?;
        if !minimal {
            return Err(CborError::NonMinimal(at));
        }
        Ok(match major {
            MAJOR_UINT => Value::Integer(arg as i128),
            MAJOR_NINT => Value::Integer(-1 - arg as i128),
            MAJOR_BYTES => Value::Bytes(r.take(arg as usize)?.to_vec()),
            MAJOR_TEXT => {
                let s = r.take(arg as usize)?;
                Value::Text(std::str::from_utf8(s).map_err(|_| CborError::Utf8(at))?.to_owned())
            }
            MAJOR_ARRAY => {
                let n = check_len(at, arg)?;
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    v.push(Value::read(r, depth + 1)?);
                }
                Value::Array(v)
            }
            MAJOR_MAP => {
                let n = check_len(at, arg)?;
                let mut m = BTreeMap::new();
                let mut prev: Option<&str> = None;
                for _ in 0..n {
                    let kat = r.pos;
                    let (_, _, minimal) = r.head_full()?;
                    r.pos = kat;
                    let k = r.key()?;
                    // Key lengths are heads too: canonical means shortest.
                    if !minimal {
                        return Err(CborError::NonMinimal(kat));
                    }
                    if let Some(p) = prev {
                        if key_order(p.as_bytes(), k.as_bytes()) != std::cmp::Ordering::Less {
                            return Err(CborError::KeyOrder(kat));
                        }
                    }
                    prev = Some(k);
                    m.insert(k.to_owned(), Value::read(r, depth + 1)?);
                }
                Value::Map(m)
            }
            MAJOR_TAG => {
                r.pos = at;
                Value::Link(r.cid()?)
            }
            _ => {
                check_simple(at, r.buf[at], arg)?;
                match r.buf[at] {
                    0xf4 => Value::Bool(false),
                    0xf5 => Value::Bool(true),
                    0xf6 => Value::Null,
                    _ => Value::Float(f64::from_bits(arg)),
                }
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.write(&mut w);
        w.into_inner()
    }

    pub fn write(&self, w: &mut Writer) {
        match self {
            Value::Null => w.null(),
            Value::Bool(b) => w.bool(*b),
            Value::Integer(i) => {
                if *i >= 0 {
                    w.head(MAJOR_UINT, *i as u64)
                } else {
                    w.head(MAJOR_NINT, (-1 - *i) as u64)
                }
            }
            Value::Float(f) => {
                w.buf.push(0xfb);
                w.buf.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            Value::Bytes(b) => w.bytes(b),
            Value::Text(s) => w.text(s),
            Value::Array(a) => {
                w.array(a.len());
                for v in a {
                    v.write(w);
                }
            }
            Value::Map(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| key_order(a.as_bytes(), b.as_bytes()));
                w.map(keys.len());
                for k in keys {
                    w.text(k);
                    m[k].write(w);
                }
            }
            Value::Link(c) => w.cid(c),
        }
    }

    /// Convert from the atproto JSON form (`{"$link": cid}`, `{"$bytes": b64}`).
    pub fn from_json(j: &serde_json::Value) -> Result<Value, FromJsonError> {
        use base64::Engine;
        Ok(match j {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i as i128),
                None => match n.as_u64() {
                    Some(u) => Value::Integer(u as i128),
                    None => return Err(FromJsonError::NotAnInteger(n.to_string())),
                },
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(Value::from_json).collect::<Result<_, _>>()?),
            serde_json::Value::Object(o) => {
                if o.len() == 1 {
                    if let Some(serde_json::Value::String(s)) = o.get("$link") {
                        return Cid::parse(s).map(Value::Link).map_err(|e| FromJsonError::Link(e.to_string()));
                    }
                    if let Some(serde_json::Value::String(s)) = o.get("$bytes") {
                        return base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(s.trim_end_matches('='))
                            .map(Value::Bytes)
                            .map_err(|e| FromJsonError::Bytes(e.to_string()));
                    }
                }
                let mut m = BTreeMap::new();
                for (k, v) in o {
                    m.insert(k.clone(), Value::from_json(v)?);
                }
                Value::Map(m)
            }
        })
    }

    /// Convert to the atproto JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine;
        use serde_json::json;
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => json!(b),
            Value::Integer(i) => {
                if let Ok(v) = i64::try_from(*i) {
                    json!(v)
                } else if let Ok(v) = u64::try_from(*i) {
                    json!(v)
                } else {
                    json!(i.to_string())
                }
            }
            Value::Float(f) => json!(f),
            Value::Bytes(b) => {
                json!({"$bytes": base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)})
            }
            Value::Text(s) => json!(s),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Map(m) => serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Value::Link(c) => json!({"$link": c.to_string()}),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m.get(key),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_minimal() {
        for n in [0u64, 23, 24, 255, 256, 65535, 65536, u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX] {
            let mut v = Vec::new();
            write_head(&mut v, MAJOR_UINT, n);
            assert_eq!(v.len(), head_len(n));
            let mut r = Reader::new(&v);
            assert_eq!(r.u64().unwrap(), n);
            r.finish().unwrap();
            assert_eq!(Value::decode(&v).unwrap(), Value::Integer(n as i128));
        }
    }

    #[test]
    fn rejects_non_minimal_and_indefinite() {
        assert_eq!(Value::decode(&[0x18, 0x01]), Err(CborError::NonMinimal(0)));
        assert_eq!(Value::decode(&[0x9f, 0xff]), Err(CborError::Indefinite(0)));
        assert_eq!(Value::decode(&[0x1c]), Err(CborError::Reserved(0, 28)));
        // half float
        assert_eq!(Value::decode(&[0xf9, 0x3c, 0x00]), Err(CborError::Float(0)));
        // NaN as f64
        let mut nan = vec![0xfb];
        nan.extend_from_slice(&f64::NAN.to_bits().to_be_bytes());
        assert_eq!(Value::decode(&nan), Err(CborError::Float(0)));
        // undefined
        assert_eq!(Value::decode(&[0xf7]), Err(CborError::Simple(0, 23)));
        // other tag
        assert_eq!(Value::decode(&[0xc1, 0x00]), Err(CborError::Tag(0, 1)));
        // unsorted keys {"b":1,"a":2}
        assert_eq!(Value::decode(&[0xa2, 0x61, b'b', 1, 0x61, b'a', 2]), Err(CborError::KeyOrder(4)));
        // trailing
        assert_eq!(Value::decode(&[0x01, 0x02]), Err(CborError::Trailing(1)));
        // A map key whose length is not in its shortest form (found by the
        // cbor_value fuzz target: 0x78 0x0e where 0x6e says the same).
        let mut long_key = vec![0xa1, 0x78, 0x0e];
        long_key.extend_from_slice(&[0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        long_key.push(0x00);
        assert_eq!(Value::decode(&long_key), Err(CborError::NonMinimal(1)));
        assert!(Value::decode(&[0xa1, 0x61, b'a', 0x00]).is_ok());
    }

    #[test]
    fn depth_and_length_limits() {
        let mut deep = vec![0x81; 40];
        deep.push(0x01);
        assert!(matches!(Value::decode(&deep), Err(CborError::TooDeep(_))));
        assert!(matches!(Reader::new(&deep).skip(0), Err(CborError::TooDeep(_))));
        let mut ok = vec![0x81; 32];
        ok.push(0x01);
        Reader::new(&ok).skip(0).unwrap();
        // array claiming 2^20 items
        let mut long = Vec::new();
        write_head(&mut long, MAJOR_ARRAY, 1 << 20);
        assert!(matches!(Reader::new(&long).skip(0), Err(CborError::TooLong(0, _))));
        // huge byte string length does not allocate or panic
        let mut huge = Vec::new();
        write_head(&mut huge, MAJOR_BYTES, u64::MAX);
        assert!(matches!(Reader::new(&huge).skip(0), Err(CborError::Eof(_))));
        assert!(Value::decode(&huge).is_err());
    }

    #[test]
    fn value_round_trip() {
        let j = serde_json::json!({"b": [1, -2, "x", null, true], "aa": {"$bytes": "AAEC"}, "c": {"$link": "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"}});
        let v = Value::from_json(&j).unwrap();
        let bytes = v.encode();
        let back = Value::decode(&bytes).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.to_json(), j);
    }
}
