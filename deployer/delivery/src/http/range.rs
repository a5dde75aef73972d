//! `Range` and `If-Range` (RFC 9110 §14) for a single-part server: what to
//! send for a representation of `len` bytes.
//!
//! - no `Range`, or a unit other than `bytes`: the whole representation;
//! - `If-Range` that matches neither the strong entity tag nor the exact
//!   `Last-Modified` date: the whole representation;
//! - ranges that overlap or touch are coalesced; one range left: 206 with
//!   it; several disjoint ones: the whole representation (a server may
//!   ignore `Range`, and this one sends no multipart bodies);
//! - a suffix longer than the representation means all of it;
//! - no satisfiable range (nothing at all of an empty representation), or
//!   a malformed `bytes` range set: 416 with `Content-Range: bytes */len`.

use std::ops::Range;

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranged {
    /// 200 with the whole representation.
    Full,
    /// 206 with these bytes.
    Partial(Range<u64>),
    /// 416.
    Unsatisfiable,
}

/// Most range specs looked at; a longer list is answered in full.
const MAX_SPECS: usize = 64;

/// The answer to `range` (the `Range` header's value) for `len` bytes.
pub fn evaluate(range: Option<&[u8]>, len: u64) -> Ranged {
    let Some(value) = range else { return Ranged::Full };
    let Some((unit, set)) = split_once(value, b'=') else { return Ranged::Unsatisfiable };
    if !unit.trim_ascii().eq_ignore_ascii_case(b"bytes") {
        return Ranged::Full; // an unknown unit must be ignored
    }
    let mut ranges = Vec::new();
    for (n, spec) in set.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|s| !s.is_empty()).enumerate() {
        if n == MAX_SPECS {
            return Ranged::Full;
        }
        match spec_range(spec, len) {
            Spec::Invalid => return Ranged::Unsatisfiable,
            Spec::Unsatisfiable => {}
            Spec::Bytes(r) => ranges.push(r),
        }
    }
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    match merged.len() {
        0 => Ranged::Unsatisfiable,
        1 => Ranged::Partial(merged.remove(0)),
        _ => Ranged::Full,
    }
}

/// Whether `Range` applies given `If-Range` (absent: it does), the strong
/// entity tag (quoted) and the `Last-Modified` date the answer carries.
pub fn if_range_holds(if_range: Option<&[u8]>, etag: Option<&str>, last_modified: Option<&str>) -> bool {
    let Some(v) = if_range.map(<[u8]>::trim_ascii) else { return true };
    if v.starts_with(b"\"") {
        return etag.is_some_and(|e| e.as_bytes() == v);
    }
    // A date: an exact match of Last-Modified (weak tags never match).
    !v.starts_with(b"W/") && last_modified.is_some_and(|m| m.as_bytes() == v)
}

enum Spec {
    Invalid,
    Unsatisfiable,
    Bytes(Range<u64>),
}

fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn spec_range(spec: &[u8], len: u64) -> Spec {
    let Some((first, last)) = split_once(spec, b'-') else { return Spec::Invalid };
    let (first, last) = (first.trim_ascii(), last.trim_ascii());
    if first.is_empty() {
        return match number(last) {
            None => Spec::Invalid,
            Some(0) => Spec::Unsatisfiable,
            Some(_) if len == 0 => Spec::Unsatisfiable,
            Some(n) => Spec::Bytes(len.saturating_sub(n)..len),
        };
    }
    let Some(first) = number(first) else { return Spec::Invalid };
    let last = if last.is_empty() {
        None
    } else {
        match number(last) {
            Some(l) if l >= first => Some(l),
            _ => return Spec::Invalid,
        }
    };
    if first >= len {
        return Spec::Unsatisfiable;
    }
    Spec::Bytes(first..last.map_or(len, |l| l.saturating_add(1).min(len)))
}

fn split_once(s: &[u8], at: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == at)?;
    Some((&s[..i], &s[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: &str, len: u64) -> Ranged {
        evaluate(Some(v.as_bytes()), len)
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use Ranged::*;
        assert_eq!(evaluate(None, 10), Full);
        assert_eq!(ev("bytes=0-4", 10), Partial(0..5));
        assert_eq!(ev("bytes=5-", 10), Partial(5..10));
        assert_eq!(ev("bytes=5-100", 10), Partial(5..10), "last past the end is clipped");
        assert_eq!(ev("bytes=-3", 10), Partial(7..10));
        assert_eq!(ev("bytes=-100", 10), Partial(0..10), "a suffix longer than the file is all of it");
        assert_eq!(ev("bytes=0-", 0), Unsatisfiable, "nothing of an empty file");
        assert_eq!(ev("bytes=-5", 0), Unsatisfiable);
        assert_eq!(ev("bytes=10-", 10), Unsatisfiable);
        assert_eq!(ev("bytes=-0", 10), Unsatisfiable);
        assert_eq!(ev("bytes=0-1,0-1", 10), Partial(0..2), "repeated ranges coalesce");
        assert_eq!(ev("bytes=4-6, 0-4 ,", 10), Partial(0..7), "overlapping ones too, in any order, empty elements skipped");
        assert_eq!(ev("bytes=0-1,5-6", 10), Full, "disjoint ranges: the whole file");
        assert_eq!(ev("bytes=0-1,20-30", 10), Partial(0..2), "unsatisfiable ones are dropped");
        assert_eq!(ev("items=0-1", 10), Full, "an unknown unit is ignored");
        assert_eq!(ev("BYTES=0-1", 10), Partial(0..2));
        for bad in ["bytes=5-2", "bytes=a-b", "bytes=-", "bytes=1", "bytes", "bytes=0-1-2", "bytes=+1-2", "bytes=99999999999999999999-"] {
            assert_eq!(ev(bad, 10), Unsatisfiable, "{bad}");
        }
        assert_eq!(ev(&format!("bytes={}", vec!["0-0"; 100].join(",")), 10), Full, "too many ranges");
    }

    #[test]
    fn if_range_needs_the_strong_tag_or_the_exact_date() {
        let (tag, date) = (Some("\"abc\""), Some("Tue, 01 Dec 2026 08:00:00 GMT"));
        assert!(if_range_holds(None, tag, date));
        assert!(if_range_holds(Some(b"\"abc\""), tag, date));
        assert!(!if_range_holds(Some(b"\"abd\""), tag, date));
        assert!(!if_range_holds(Some(b"W/\"abc\""), tag, date));
        assert!(if_range_holds(Some(b"Tue, 01 Dec 2026 08:00:00 GMT"), tag, date));
        assert!(!if_range_holds(Some(b"Tue, 01 Dec 2026 08:00:01 GMT"), tag, date));
        assert!(!if_range_holds(Some(b"\"abc\""), None, date));
    }
}
