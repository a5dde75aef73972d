//! Presenting oneself to a registry as registries ask: nothing until the
//! registry says how (a 401 with a `WWW-Authenticate` challenge), then
//! HTTP Basic, or the Bearer token flow: a token from the registry's token
//! service for the scope asked (`repository:NAME:pull` or `...:pull,push`),
//! cached per registry and scope, fetched again when the registry refuses
//! it. Credentials go to the registry and to the token service it names,
//! never into a URL, never to a blob's storage URL.

use std::collections::{HashMap, HashSet};

/// What a request does to its repository: the scope its token needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads (manifests, blobs).
    Pull,
    /// Writes (uploads, manifests stored).
    Push,
}

impl Access {
    /// The token scope of `repository` for this access.
    pub(crate) fn scope(self, repository: &str) -> String {
        match self {
            Access::Pull => format!("repository:{repository}:pull"),
            Access::Push => format!("repository:{repository}:pull,push"),
        }
    }
}

/// How a registry asks to be spoken to (the `WWW-Authenticate` header of
/// a 401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A token from the service at `realm`.
    Bearer {
        /// The token service's URL.
        realm: String,
        /// The `service` parameter it wants, if any.
        service: Option<String>,
        /// The scope the registry says the request needs, if it says.
        scope: Option<String>,
    },
}

/// The longest challenge read.
const MAX_CHALLENGE: usize = 4096;

/// Reads a `WWW-Authenticate` value: a scheme, then `key=value` or
/// `key="quoted value"` pairs separated by commas (RFC 9110, section 11.6.1).
///
/// # Errors
/// A value over 4 KiB, an unknown scheme, a Bearer challenge without a
/// realm, a malformed parameter (the message names what).
pub fn challenge(header: &str) -> Result<Challenge, String> {
    if header.len() > MAX_CHALLENGE {
        return Err(format!("a challenge over {MAX_CHALLENGE} bytes"));
    }
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let params = parameters(rest)?;
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!("an unknown authentication scheme {:?}", scheme.chars().take(32).collect::<String>()));
    }
    let get = |k: &str| params.get(k).cloned();
    let realm = get("realm").ok_or("a Bearer challenge without a realm")?;
    Ok(Challenge::Bearer { realm, service: get("service"), scope: get("scope") })
}

fn parameters(mut s: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if s.is_empty() {
            return Ok(out);
        }
        let (key, rest) = s.split_once('=').ok_or("a challenge parameter without a value")?;
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err("a challenge parameter without a name".into());
        }
        let rest = rest.trim_start();
        let (value, after) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("an unterminated quoted challenge parameter".into()),
                    Some((i, '"')) => break i + 1,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err("an unterminated quoted challenge parameter".into()),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            (value, &quoted[end..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (rest[..end].trim().to_owned(), &rest[end..])
        };
        let after = after.trim_start();
        if !after.is_empty() && !after.starts_with(',') {
            return Err("challenge parameters not separated by commas".into());
        }
        out.insert(key, value);
        s = after;
    }
}

/// The token in a token service's answer (`token`, or OAuth's
/// `access_token`): visible ASCII only, so that a header can carry it.
///
/// # Errors
/// Not JSON, no token, a token that is empty, over 16 KiB, or not visible
/// ASCII.
pub fn token_of(answer: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(answer).map_err(|e| format!("its token service answered no JSON: {e}"))?;
    let token = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()).ok_or("its token service gave no token")?;
    if token.is_empty() || token.len() > 16 << 10 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("its token service gave a token that cannot be sent (empty, over 16 KiB, or not visible ASCII)".into());
    }
    Ok(token.to_owned())
}

/// What a client learned of the registries it spoke to: which ask for
/// Basic, and the tokens it holds, by registry and scope.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    pub basic: HashSet<String>,
    pub tokens: HashMap<(String, String), String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_as_registries_send_them() {
        assert_eq!(
            challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#),
            Ok(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(challenge(r#"basic realm="Registry Realm""#), Ok(Challenge::Basic));
        assert_eq!(
            challenge(r#"Bearer realm=http://127.0.0.1:9/t, error="insufficient_scope""#),
            Ok(Challenge::Bearer { realm: "http://127.0.0.1:9/t".into(), service: None, scope: None })
        );
        assert_eq!(challenge(r#"Bearer realm="a\"b""#), Ok(Challenge::Bearer { realm: "a\"b".into(), service: None, scope: None }));
        for bad in ["Bearer service=x", "Negotiate abc", r#"Bearer realm="open"#, "Bearer realm", r#"Bearer realm="a" x="b""#] {
            assert!(challenge(bad).is_err(), "{bad}");
        }
        assert!(challenge(&format!("Bearer realm=\"{}\"", "x".repeat(5000))).is_err());
    }

    #[test]
    fn tokens_are_taken_only_if_a_header_can_carry_them() {
        assert_eq!(token_of(br#"{"token":"abc.def"}"#), Ok("abc.def".into()));
        assert_eq!(token_of(br#"{"access_token":"xyz"}"#), Ok("xyz".into()));
        for bad in [&br#"{"token":""}"#[..], br#"{"token":"a\r\nX-Evil: 1"}"#, br#"{"token":"a b"}"#, b"{}", b"not json"] {
            assert!(token_of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
