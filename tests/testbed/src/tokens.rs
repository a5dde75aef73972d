//! A token service for the reference registry's Bearer flow, as Docker
//! Hub's, Harbor's and GitLab's are: it takes HTTP Basic (one user), gives
//! a JWT signed with RS256 whose `x5c` header carries its certificate (the
//! registry trusts that certificate: its `rootcertbundle`), granting the
//! scopes asked for to that user and nothing to anyone else, and counts
//! what it gave. `openssl` makes the key and signs; the registry that
//! checks the tokens is real. Stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;

/// The `service` the registry is configured with and tokens are for.
pub const SERVICE: &str = "bootcache-test-registry";
/// The issuer the registry trusts.
pub const ISSUER: &str = "bootcache-test-issuer";

/// The token service.
pub struct TokenIssuer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// The certificate (PEM) the registry is to trust.
    pub cert: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    user: String,
    password: String,
    dir: PathBuf,
    /// The signing key's file and the certificate's DER, base64.
    key: Mutex<(PathBuf, String)>,
    issued: AtomicUsize,
    refused: AtomicUsize,
    stop: AtomicBool,
}

pub(crate) fn openssl(args: &[&str], input: Option<&[u8]>) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("openssl is needed by the token service")?;
    if let Some(i) = input {
        child.stdin.take().expect("piped").write_all(i)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// A new key and self-signed certificate in `dir` (generation `n`):
/// the key's path and the certificate's DER, base64; the PEM certificate
/// is written to `cert`.
fn new_key(dir: &Path, n: usize, cert: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join(format!("issuer-{n}.key"));
    let pem = dir.join(format!("issuer-{n}.pem"));
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bootcache test token issuer",
            "-keyout",
            key.to_str().unwrap_or_default(),
            "-out",
            pem.to_str().unwrap_or_default(),
        ],
        None,
    )?;
    let der = openssl(&["x509", "-in", pem.to_str().unwrap_or_default(), "-outform", "DER"], None)?;
    std::fs::copy(&pem, cert)?;
    Ok((key, base64::engine::general_purpose::STANDARD.encode(der)))
}

impl TokenIssuer {
    /// Starts one on a loopback port, granting `user` with `password`
    /// whatever it asks; its key and certificate under `dir`.
    ///
    /// # Errors
    /// No `openssl`, no port.
    pub fn start(dir: &Path, user: &str, password: &str) -> anyhow::Result<TokenIssuer> {
        TokenIssuer::start_in(dir, user, password, None, "127.0.0.1")
    }

    /// Like [`TokenIssuer::start`], listening on `ip` inside network
    /// namespace `netns` (a testbed host's) when one is given.
    ///
    /// # Errors
    /// As [`TokenIssuer::start`]; the namespace cannot be entered.
    pub fn start_in(dir: &Path, user: &str, password: &str, netns: Option<&str>, ip: &str) -> anyhow::Result<TokenIssuer> {
        let cert = dir.join("issuer.pem");
        let key = new_key(dir, 0, &cert)?;
        // The listener is made on a thread that enters the namespace (only
        // that thread does, and ends); the socket stays the namespace's.
        let (ns, ip_owned) = (netns.map(str::to_owned), ip.to_owned());
        let entered = std::thread::spawn(move || {
            (|| -> anyhow::Result<(TcpListener, u16)> {
                if let Some(ns) = &ns {
                    let f = std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("network namespace {ns}"))?;
                    // SAFETY: setns on a descriptor this thread owns, for this thread only.
                    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
                        bail!("entering network namespace {ns}: {}", std::io::Error::last_os_error());
                    }
                }
                let l = TcpListener::bind((ip_owned.as_str(), 0))?;
                let port = l.local_addr()?.port();
                Ok((l, port))
            })()
        });
        let (listener, port) = entered.join().map_err(|_| anyhow::anyhow!("the token service's thread panicked"))??;
        let shared = Arc::new(Shared {
            user: user.to_owned(),
            password: password.to_owned(),
            dir: dir.to_owned(),
            key: Mutex::new(key),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        listener.set_nonblocking(true)?;
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = serve(&s, c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(TokenIssuer { realm: format!("http://{ip}:{port}/token"), cert, shared, thread: Some(thread) })
    }

    /// Tokens given so far.
    pub fn issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// Requests refused so far (a wrong user or password).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Signs with a new key from now on and writes its certificate over
    /// [`TokenIssuer::cert`]: a registry started again trusts only the new
    /// one, so every token given before is refused.
    ///
    /// # Errors
    /// openssl.
    pub fn rotate(&self) -> anyhow::Result<()> {
        let n = self.issued() + 1000;
        let key = new_key(&self.shared.dir, n, &self.cert)?;
        *self.shared.key.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
        Ok(())
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(mut c: TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

fn serve(s: &Shared, mut c: TcpStream) -> anyhow::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let target = lines.next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or_default().to_owned();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if path != "/token" {
        return Ok(respond(c, "404 Not Found", "", "{}")?);
    }
    let user = match authorization {
        None => None,
        Some(a) => {
            let given = a
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            if given.as_deref() != Some(&format!("{}:{}", s.user, s.password)) {
                s.refused.fetch_add(1, Ordering::SeqCst);
                return Ok(respond(
                    c,
                    "401 Unauthorized",
                    "WWW-Authenticate: Basic realm=\"token\"\r\n",
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                )?);
            }
            Some(s.user.clone())
        }
    };
    let mut service = String::new();
    let mut access = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = url_decode(v);
        match k {
            "service" => service = v,
            "scope" => {
                // repository:NAME:ACTIONS (NAME may hold no colon here).
                let parts: Vec<&str> = v.splitn(3, ':').collect();
                if let [kind, name, actions] = parts[..]
                    && user.is_some()
                {
                    access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
                }
            }
            _ => {}
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let n = s.issued.fetch_add(1, Ordering::SeqCst);
    let (key, x5c) = s.key.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": user.clone().unwrap_or_default(), "aud": service,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("token-{n}"), "access": access,
    });
    let signed = format!("{}.{}", b64(&header), b64(&claims));
    let signature = openssl(&["dgst", "-sha256", "-sign", key.to_str().unwrap_or_default()], Some(signed.as_bytes()))?;
    let token = format!("{signed}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature));
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    Ok(respond(c, "200 OK", "", &body)?)
}
