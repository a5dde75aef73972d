//! The lab file as written: YAML read in order, every value with its
//! place, so that what is wrong is said with its line.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

use super::LabError;
use crate::Name;

/// A YAML mapping read in order, each key with its place.
#[derive(Clone)]
pub(super) struct Entries<T>(pub(super) Vec<(Spanned<String>, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Entries<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLab {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) segments: Option<Spanned<Entries<RawSegment>>>,
    pub(super) instances: Spanned<Entries<RawInstance>>,
    /// Values every instance takes unless it sets its own.
    #[serde(default)]
    pub(super) defaults: Option<Spanned<RawInstance>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegment {
    pub(super) subnet: Option<Spanned<String>>,
    pub(super) bridge: Option<Spanned<String>>,
    pub(super) gateway: Option<Spanned<String>>,
}

/// `segments: [lan, wan]` or `segments: {lan: 10.20.0.10, wan: }`.
#[derive(Clone)]
pub(super) enum RawAttach {
    Names(Vec<Spanned<String>>),
    Addresses(Entries<Option<Spanned<String>>>),
}

// Not `#[serde(untagged)]`: that buffers the value and loses its places.
impl<'de> Deserialize<'de> for RawAttach {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAttach;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of segment names or a mapping of segment names to addresses")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawAttach, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element()? {
                    out.push(n);
                }
                Ok(RawAttach::Names(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawAttach, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(RawAttach::Addresses(Entries(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file's content: the text itself, or `{from: NAME}`, a file beside
/// the lab file that `bootcache deploy` sends with it.
#[derive(Clone)]
pub(super) enum RawContent {
    Inline(String),
    From(String),
}

impl<'de> Deserialize<'de> for RawContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawContent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a file's content, or {from: a file beside the lab file}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawContent, E> {
                Ok(RawContent::Inline(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawContent, A::Error> {
                let mut from = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "from" || from.is_some() {
                        return Err(de::Error::custom(format!(
                            "a file is its content, or {{from: NAME}} (a file beside the lab file), not {key}:"
                        )));
                    }
                    from = Some(map.next_value::<String>()?);
                }
                from.map(RawContent::From).ok_or_else(|| de::Error::custom("{from: NAME} names a file beside the lab file"))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInstance {
    pub(super) kind: Option<Spanned<String>>,
    pub(super) image: Option<Spanned<String>>,
    pub(super) count: Option<Spanned<u64>>,
    pub(super) cpus: Option<Spanned<u64>>,
    pub(super) memory: Option<Spanned<MemoryText>>,
    pub(super) segments: Option<Spanned<RawAttach>>,
    pub(super) node: Option<Spanned<String>>,
    pub(super) ready: Option<Spanned<String>>,
    pub(super) command: Option<Spanned<Vec<String>>>,
    pub(super) delivery: Option<Spanned<String>>,
    #[serde(rename = "cloud-init")]
    pub(super) cloud_init: Option<Spanned<serde_json::Value>>,
    pub(super) env: Option<Spanned<Entries<Spanned<Scalar>>>>,
    pub(super) files: Option<Spanned<Entries<Spanned<RawContent>>>>,
    pub(super) exec: Option<Spanned<Vec<Vec<String>>>>,
    pub(super) hostname: Option<Spanned<String>>,
    pub(super) sysctls: Option<Spanned<Entries<Spanned<Scalar>>>>,
    #[serde(rename = "ready-command")]
    pub(super) ready_command: Option<Spanned<Vec<String>>>,
    pub(super) firmware: Option<Spanned<String>>,
    pub(super) routes: Option<Spanned<Vec<RawRoute>>>,
}

/// A route an instance takes: a destination through an address on one of
/// its segments.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) to: Spanned<String>,
    pub(super) via: Spanned<String>,
}

impl RawInstance {
    /// This instance with `defaults` where it sets nothing of its own.
    pub(super) fn with_defaults(&self, defaults: &RawInstance) -> RawInstance {
        macro_rules! or {
            ($($f:ident),*) => { RawInstance { $($f: self.$f.clone().or_else(|| defaults.$f.clone()),)* } };
        }
        or!(
            kind,
            image,
            count,
            cpus,
            memory,
            segments,
            node,
            ready,
            command,
            delivery,
            cloud_init,
            env,
            files,
            exec,
            hostname,
            sysctls,
            ready_command,
            firmware,
            routes
        )
    }
}

/// A scalar written as text, a number or a boolean (an environment
/// variable's value, a sysctl's), as text.
#[derive(Clone)]
pub(super) struct Scalar(pub(super) String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text, a number or true/false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `512MiB`, `1G`, `64M`, `1TiB` or a number of bytes.
#[derive(Clone)]
pub(super) struct MemoryText(pub(super) String);

impl<'de> Deserialize<'de> for MemoryText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MemoryText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 512MiB or 1G")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    num.checked_mul(mult)
}

pub(super) fn at<T>(s: &Spanned<T>) -> Option<u32> {
    let line = u32::try_from(s.referenced.line()).unwrap_or(0);
    (line > 0).then_some(line)
}

pub(super) fn err(line: Option<u32>, message: impl Into<String>) -> LabError {
    LabError { line, message: message.into() }
}

pub(super) fn name_at(s: &Spanned<String>, what: &str) -> Result<Name, LabError> {
    s.value.parse().map_err(|e: crate::BadName| err(at(s), format!("{what}: {e}")))
}

/// The library's message without its snippet, place and advice (the line
/// is given once, by [`LabError`]).
pub(super) fn plain_message(msg: &str) -> String {
    let mut m = msg.lines().next().unwrap_or("not a lab file").trim();
    m = m.strip_prefix("error: ").unwrap_or(m);
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
    {
        m = after;
    }
    let m = m.split(", set DuplicateKeyPolicy").next().unwrap_or(m);
    m.replace("duplicate mapping key: ", "given twice: ")
}
