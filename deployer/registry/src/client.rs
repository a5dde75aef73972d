//! The distribution API, as much of it as bootcache needs: manifests by
//! tag or digest (bounded, checked against their digest), blobs streamed
//! up from a file and down into one (checked against their digest before
//! they are kept), and a blob's URL for readers that fetch ranges of it.
//!
//! Written on the HTTP client the project already uses rather than on
//! `oci-client`: that crate holds a blob in memory to push or pull it,
//! and bootcache's images are gigabytes.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures_util::StreamExt as _;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use crate::RegistryError;
use crate::auth::{Access, Challenge, Sessions};
use bootcache_api::reference::{Digest, Reference, Target};
use bootcache_http::chain;

/// The largest manifest read (the spec suggests registries take at least 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How long a registry may stay silent within an answer.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The media types of manifests this client asks for.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// How to present oneself to a registry.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credential.
    #[default]
    Anonymous,
    /// HTTP Basic.
    Basic {
        /// The user.
        user: String,
        /// The password (never printed).
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, ...)"),
        }
    }
}

impl Credentials {
    /// The credentials Docker's `config.json` (`{"auths": {"HOST:PORT":
    /// {"auth": base64("user:password")}}}`) holds for `registry`;
    /// anonymous when it holds none.
    ///
    /// # Errors
    /// A file that cannot be read or is not such JSON, an `auth` that is
    /// not base64 of `user:password`.
    pub fn from_docker_config(path: &Path, registry: &str) -> Result<Credentials, RegistryError> {
        let bad = |why: String| RegistryError::Credentials { path: path.to_owned(), why };
        let mut text = Vec::new();
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        std::io::Read::read_to_end(&mut std::io::Read::take(file, (1 << 20) + 1), &mut text).map_err(|e| bad(e.to_string()))?;
        if text.len() > 1 << 20 {
            return Err(bad("more than 1 MiB".into()));
        }
        Credentials::from_docker_config_json(&text, registry).map_err(bad)
    }

    /// [`Credentials::from_docker_config`] of the file's bytes.
    ///
    /// # Errors
    /// Why the bytes are not such a file (never quoting a credential).
    pub fn from_docker_config_json(text: &[u8], registry: &str) -> Result<Credentials, String> {
        let bad = |why: String| why;
        let config: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let Some(entry) = config.get("auths").and_then(|a| a.get(registry)) else { return Ok(Credentials::Anonymous) };
        if let (Some(u), Some(p)) = (entry.get("username").and_then(|v| v.as_str()), entry.get("password").and_then(|v| v.as_str())) {
            return Ok(Credentials::Basic { user: u.to_owned(), password: p.to_owned() });
        }
        let Some(auth) = entry.get("auth").and_then(|v| v.as_str()) else { return Ok(Credentials::Anonymous) };
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(auth).map_err(|_| bad(format!("the auth of {registry} is not base64")))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad(format!("the auth of {registry} is not text")))?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| bad(format!("the auth of {registry} is not user:password")))?;
        Ok(Credentials::Basic { user: user.to_owned(), password: password.to_owned() })
    }

    fn header(&self) -> Option<String> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Basic { user, password } => {
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))))
            }
        }
    }
}

/// A registry's client: one set of credentials, the registries that may
/// be spoken to over plain HTTP, and what it learned of each registry
/// (Basic or tokens, the tokens it holds; shared by its clones).
#[derive(Clone, Debug)]
pub struct Registry {
    http: reqwest::Client,
    credentials: Credentials,
    insecure: Vec<String>,
    sessions: std::sync::Arc<std::sync::Mutex<Sessions>>,
}

/// A manifest as the registry sent it.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Its bytes (what its digest is of).
    pub bytes: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
    /// Its media type, as the registry said it.
    pub media_type: String,
}

impl Registry {
    /// A client presenting `credentials`; `insecure`: registries
    /// (`HOST:PORT`) spoken to over plain HTTP besides loopback ones.
    ///
    /// # Errors
    /// The HTTP client cannot be made (the system's resolver or TLS setup).
    pub fn new(credentials: Credentials, insecure: Vec<String>) -> Result<Registry, RegistryError> {
        // Redirects (blobs on a storage URL) are followed by hand, without the credential.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(10))
            // A registry that stops sending mid-answer fails the call
            // rather than holding it (a whole blob may take longer: only
            // silence counts).
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| RegistryError::Client(chain(&e)))?;
        Ok(Registry { http, credentials, insecure, sessions: std::sync::Arc::default() })
    }

    /// Whether `host_port` (`HOST:PORT`) may be spoken to over plain HTTP:
    /// loopback, or named insecure.
    fn plain_http(&self, host_port: &str) -> bool {
        let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        loopback || self.insecure.iter().any(|r| r == host_port)
    }

    /// `http://HOST:PORT` for loopback registries and those named
    /// insecure, `https://HOST:PORT` for any other (checked against the
    /// system's roots: OpenSSL's, which `SSL_CERT_FILE` and `SSL_CERT_DIR`
    /// replace as for any OpenSSL program).
    pub fn base(&self, registry: &str) -> String {
        if self.plain_http(registry) { format!("http://{registry}") } else { format!("https://{registry}") }
    }

    /// The URL of a blob of `reference`'s repository (for range readers;
    /// it carries no credential).
    pub fn blob_url(&self, reference: &Reference, digest: &Digest) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base(&reference.registry), reference.repository)
    }

    /// What `registry` asked for, for `scope`: the token held, or Basic
    /// once it asked for Basic, or nothing.
    pub(crate) fn authorization(&self, registry: &str, scope: &str) -> Option<String> {
        let sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(token) = sessions.tokens.get(&(registry.to_owned(), scope.to_owned())) {
            return Some(format!("Bearer {token}"));
        }
        if sessions.basic.contains(registry) { self.credentials.header() } else { None }
    }

    fn present(&self, registry: &str, scope: &str, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.authorization(registry, scope) {
            Some(h) => {
                let mut v = match reqwest::header::HeaderValue::from_str(&h) {
                    Ok(v) => v,
                    Err(_) => return req,
                };
                v.set_sensitive(true);
                req.header(reqwest::header::AUTHORIZATION, v)
            }
            None => req,
        }
    }

    /// Answers `said`, the challenge of a 401 to a request of `reference`
    /// needing `scope`: Basic from now on for its registry, or a token for
    /// the scope (replacing the one held). `false`: nothing can answer it
    /// (no challenge, anonymous asked for Basic, Basic refused).
    ///
    /// # Errors
    /// The token service unreachable, refusing, or answering no token.
    pub(crate) async fn answer(&self, reference: &Reference, scope: &str, said: &str) -> Result<bool, RegistryError> {
        let registry = reference.registry.as_str();
        let Ok(challenge) = crate::auth::challenge(said) else { return Ok(false) };
        match challenge {
            Challenge::Basic => {
                let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(!matches!(self.credentials, Credentials::Anonymous) && sessions.basic.insert(registry.to_owned()))
            }
            Challenge::Bearer { realm, service, scope: asked } => {
                // The whole operation's scope (a push's HEAD is
                // challenged for pull only), and the registry's if other.
                let scopes: Vec<&str> = std::iter::once(scope).chain(asked.as_deref().filter(|a| *a != scope)).collect();
                let token = self.token(reference, &realm, service.as_deref(), &scopes).await?;
                let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                sessions.tokens.insert((registry.to_owned(), scope.to_owned()), token);
                Ok(true)
            }
        }
    }

    /// Sends the request `make` makes, presenting what the registry asked
    /// for; on a 401, answers its challenge (Basic, or a token for the
    /// scope from its token service, replacing the one held) and sends it
    /// once more. A 401 after that is the caller's to report.
    async fn send(
        &self,
        reference: &Reference,
        access: Access,
        make: impl Fn() -> Result<reqwest::RequestBuilder, RegistryError>,
    ) -> Result<reqwest::Response, RegistryError> {
        let registry = reference.registry.as_str();
        let scope = access.scope(&reference.repository);
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable { reference: reference.to_string(), why: chain(&e) };
        let (mut answered, mut resent) = (false, false);
        loop {
            let resp = match self.present(registry, &scope, make()?).send().await {
                Ok(r) => r,
                // A kept-alive connection the registry closed meanwhile
                // (it restarted, or timed it out): once more, on a new one.
                // Silence is not retried: it already took its time.
                Err(e) if !resent && !e.is_timeout() => {
                    resent = true;
                    continue;
                }
                Err(e) => return Err(unreachable(e)),
            };
            if resp.status() != reqwest::StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            answered = true;
            let said = resp.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if !self.answer(reference, &scope, said).await? {
                return Ok(resp);
            }
        }
    }

    /// A token for `scopes` from the token service at `realm`, asked with
    /// the client's credentials (anonymously without).
    async fn token(&self, reference: &Reference, realm: &str, service: Option<&str>, scopes: &[&str]) -> Result<String, RegistryError> {
        let bad = |why: String| RegistryError::Bad { reference: reference.to_string(), why };
        let mut url = reqwest::Url::parse(realm).map_err(|_| bad("its token service's realm is not a URL".into()))?;
        let host_port = format!("{}:{}", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0));
        // Plain HTTP as to registries: loopback, named insecure, or the
        // host of the (plain-HTTP) registry that named it.
        let registry_host = reference.registry.rsplit_once(':').map_or(reference.registry.as_str(), |(h, _)| h);
        let same_host = url.host_str() == Some(registry_host) && self.plain_http(&reference.registry);
        match url.scheme() {
            "https" => {}
            "http" if same_host || self.plain_http(&host_port) => {}
            "http" => return Err(RegistryError::NeedsTls(host_port)),
            _ => return Err(bad("its token service's realm is neither http nor https".into())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("its token service's realm carries a credential".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for scope in scopes {
                q.append_pair("scope", scope);
            }
        }
        let mut req = self.http.get(url);
        if let Some(h) = self.credentials.header() {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        let resp = req.send().await.map_err(|e| RegistryError::Unreachable { reference: reference.to_string(), why: chain(&e) })?;
        let resp = refused(reference, "a token from its token service", resp).await?;
        let answer = bounded(reference, resp, 64 << 10).await?;
        crate::auth::token_of(&answer).map_err(bad)
    }

    /// The manifest `reference` names, checked: at most
    /// [`MAX_MANIFEST_BYTES`], its bytes matching the digest asked for (or
    /// the one the registry says).
    ///
    /// # Errors
    /// Unreachable, refused (unknown, unauthorized), too big, a digest that
    /// does not match.
    pub async fn manifest(&self, reference: &Reference) -> Result<Fetched, RegistryError> {
        let target = match &reference.target {
            Target::Tag(t) => t.clone(),
            Target::Digest(d) => d.to_string(),
        };
        let url = format!("{}/v2/{}/manifests/{target}", self.base(&reference.registry), reference.repository);
        let resp = self
            .send(reference, Access::Pull, || Ok(self.http.get(&url).header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "))))
            .await?;
        let resp = refused(reference, "its manifest", resp).await?;
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let said = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = bounded(reference, resp, MAX_MANIFEST_BYTES).await?;
        let digest = Digest::of(&bytes);
        let expected = match (&reference.target, said) {
            (Target::Digest(d), _) => Some(*d),
            (Target::Tag(_), Some(s)) => Some(
                s.parse::<Digest>()
                    .map_err(|e| RegistryError::Bad { reference: reference.to_string(), why: format!("its Docker-Content-Digest: {e}") })?,
            ),
            (Target::Tag(_), None) => None,
        };
        if let Some(e) = expected
            && e != digest
        {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                what: "its manifest".into(),
                expected: e,
                got: digest,
            });
        }
        Ok(Fetched { bytes, digest, media_type })
    }

    /// Stores `bytes` as the manifest of `reference` (a tag or its
    /// digest); its digest.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn put_manifest(&self, reference: &Reference, media_type: &str, bytes: Vec<u8>) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let target = match &reference.target {
            Target::Tag(t) => t.clone(),
            Target::Digest(_) => digest.to_string(),
        };
        let url = format!("{}/v2/{}/manifests/{target}", self.base(&reference.registry), reference.repository);
        let resp = self
            .send(reference, Access::Push, || Ok(self.http.put(&url).header(reqwest::header::CONTENT_TYPE, media_type).body(bytes.clone())))
            .await?;
        refused(reference, "storing its manifest", resp).await?;
        Ok(digest)
    }

    /// Whether the repository of `reference` holds blob `digest`.
    ///
    /// # Errors
    /// Unreachable, refused other than "not there".
    pub async fn has_blob(&self, reference: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        self.blob_exists(reference, digest, Access::Pull).await
    }

    async fn blob_exists(&self, reference: &Reference, digest: &Digest, access: Access) -> Result<bool, RegistryError> {
        let url = self.blob_url(reference, digest);
        let resp = self.send(reference, access, || Ok(self.http.head(&url))).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        refused(reference, &format!("blob {digest}"), resp).await.map(|_| true)
    }

    /// Uploads `bytes` (small: a config) as a blob of `reference`'s
    /// repository, unless it is there; its digest.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn put_blob(&self, reference: &Reference, bytes: Vec<u8>) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if !self.blob_exists(reference, &digest, Access::Push).await? {
            let len = bytes.len() as u64;
            self.upload(reference, &digest, len, || Ok(reqwest::Body::from(bytes.clone()))).await?;
        }
        Ok(digest)
    }

    /// Uploads the file at `path` (whose digest is `digest`, `len` bytes)
    /// as a blob of `reference`'s repository, streamed, unless it is
    /// there.
    ///
    /// # Errors
    /// The file, unreachable, refused (the registry checks the digest).
    pub async fn put_blob_file(&self, reference: &Reference, path: &Path, digest: &Digest, len: u64) -> Result<(), RegistryError> {
        if self.blob_exists(reference, digest, Access::Push).await? {
            return Ok(());
        }
        // Opened again if the upload is sent again (a token renewed).
        let body = || {
            let file = std::fs::File::open(path).map_err(|e| RegistryError::File { path: path.to_owned(), why: e.to_string() })?;
            let file = tokio::fs::File::from_std(file);
            Ok(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)))
        };
        self.upload(reference, digest, len, body).await
    }

    /// A monolithic upload: POST for a session, PUT the bytes with their digest.
    async fn upload(
        &self,
        reference: &Reference,
        digest: &Digest,
        len: u64,
        body: impl Fn() -> Result<reqwest::Body, RegistryError>,
    ) -> Result<(), RegistryError> {
        let base = self.base(&reference.registry);
        let start = format!("{base}/v2/{}/blobs/uploads/", reference.repository);
        let resp = self.send(reference, Access::Push, || Ok(self.http.post(&start).header(reqwest::header::CONTENT_LENGTH, 0))).await?;
        let resp = refused(reference, "starting an upload", resp).await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Bad { reference: reference.to_string(), why: "an upload without a Location".into() })?;
        // The upload's URL is the registry's own (relative, or absolute on the same origin).
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else if location.starts_with(&format!("{base}/")) {
            location.to_owned()
        } else {
            return Err(RegistryError::Bad { reference: reference.to_string(), why: "an upload Location on another origin".into() });
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}digest={digest}");
        let put = || {
            Ok(self
                .http
                .put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body()?))
        };
        let resp = self.send(reference, Access::Push, put).await?;
        refused(reference, &format!("uploading blob {digest}"), resp).await.map(drop)
    }

    /// Downloads blob `digest` (`len` bytes) of `reference`'s repository
    /// into `path` (written whole, checked, then renamed over it):
    /// nothing is left at `path` unless its bytes match the digest.
    ///
    /// # Errors
    /// Unreachable, refused, more or fewer bytes than `len`, a digest that
    /// does not match, the file.
    pub async fn get_blob_file(&self, reference: &Reference, digest: &Digest, len: u64, path: &Path) -> Result<(), RegistryError> {
        self.get_blob_file_with(reference, digest, len, path, &|_| {}).await
    }

    /// [`Registry::get_blob_file`], calling `progress` with the bytes
    /// written to the staging file (`path` with extension `part`) so far
    /// after each write: what a node relays to its peers as it arrives.
    ///
    /// # Errors
    /// As [`Registry::get_blob_file`].
    pub async fn get_blob_file_with(
        &self,
        reference: &Reference,
        digest: &Digest,
        len: u64,
        path: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let file_err = |e: std::io::Error| RegistryError::File { path: path.to_owned(), why: e.to_string() };
        let url = self.blob_url(reference, digest);
        let mut resp = self.send(reference, Access::Pull, || Ok(self.http.get(&url))).await?;
        // A registry may send its blobs from storage elsewhere: followed
        // (a few times), without the credential.
        for _ in 0..4 {
            if !resp.status().is_redirection() {
                break;
            }
            let to = resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let url = reqwest::Url::parse(&to)
                .or_else(|_| resp.url().join(&to))
                .map_err(|_| RegistryError::Bad { reference: reference.to_string(), why: "a redirect without a usable Location".into() })?;
            resp = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| RegistryError::Unreachable { reference: reference.to_string(), why: chain(&e) })?;
        }
        let resp = refused(reference, &format!("blob {digest}"), resp).await?;
        let tmp = path.with_extension("part");
        let mut out = tokio::fs::File::create(&tmp).await.map_err(file_err)?;
        let mut hasher = sha2::Sha256::new();
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        let result = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| RegistryError::Unreachable { reference: reference.to_string(), why: chain(&e) })?;
                got += chunk.len() as u64;
                if got > len {
                    return Err(RegistryError::Bad {
                        reference: reference.to_string(),
                        why: format!("blob {digest} is longer than its {len} bytes"),
                    });
                }
                hasher.update(&chunk);
                out.write_all(&chunk).await.map_err(file_err)?;
                // In the file (not only queued) before it is said to be.
                out.flush().await.map_err(file_err)?;
                progress(got);
            }
            if got != len {
                return Err(RegistryError::Bad {
                    reference: reference.to_string(),
                    why: format!("blob {digest}: {got} of its {len} bytes"),
                });
            }
            let actual = Digest(hasher.finalize().into());
            if actual != *digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "a blob".into(),
                    expected: *digest,
                    got: actual,
                });
            }
            out.sync_all().await.map_err(file_err)?;
            tokio::fs::rename(&tmp, path).await.map_err(file_err)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// The response, or the registry's refusal as an error naming the reference.
async fn refused(reference: &Reference, what: &str, resp: reqwest::Response) -> Result<reqwest::Response, RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // The registry's error code, if it says one (bounded).
    let body = bounded(reference, resp, 64 << 10).await.unwrap_or_default();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Err(RegistryError::Refused { reference: reference.to_string(), what: what.to_owned(), status: status.as_u16(), code })
}

/// At most `limit` bytes of a response body.
async fn bounded(reference: &Reference, resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, RegistryError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(RegistryError::Bad { reference: reference.to_string(), why: format!("an answer over {limit} bytes") });
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| RegistryError::Unreachable { reference: reference.to_string(), why: chain(&e) })?;
        if out.len() + chunk.len() > limit {
            return Err(RegistryError::Bad { reference: reference.to_string(), why: format!("an answer over {limit} bytes") });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// One client per registry, each presenting what Docker's config file
/// holds for that registry (anonymous without a file, or for a registry
/// it does not name), kept so that the tokens a client took serve every
/// later call to its registry. Clones share the clients.
#[derive(Clone, Debug, Default)]
pub struct Clients {
    config: Option<PathBuf>,
    insecure: Vec<String>,
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Registry>>>,
}

impl Clients {
    /// Clients with the credentials of Docker's config file `config` (read
    /// when a registry is first spoken to); `insecure`: registries
    /// (`HOST:PORT`) spoken to over plain HTTP besides loopback ones.
    pub fn new(config: Option<PathBuf>, insecure: Vec<String>) -> Clients {
        Clients { config, insecure, held: std::sync::Arc::default() }
    }

    /// The client of `registry` (`HOST[:PORT]`).
    ///
    /// # Errors
    /// The config file cannot be used ([`Credentials::from_docker_config`]),
    /// the HTTP client cannot be made.
    pub fn get(&self, registry: &str) -> Result<Registry, RegistryError> {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = held.get(registry) {
            return Ok(r.clone());
        }
        let credentials = match &self.config {
            Some(path) => Credentials::from_docker_config(path, registry)?,
            None => Credentials::Anonymous,
        };
        let client = Registry::new(credentials, self.insecure.clone())?;
        held.insert(registry.to_owned(), client.clone());
        Ok(client)
    }
}
