//! Against the reference registry (Debian's `docker-registry`, distribution
//! 2.8) on loopback: a bootcache image pushed as an artifact and pulled
//! back byte for byte; pinned by digest while its tag moves; every way a
//! pull can go wrong refused naming the reference, with nothing left
//! behind; Basic auth with Docker's config.json, its password never shown;
//! the Bearer token flow against a token service, one token per scope,
//! renewed when the registry refuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use bootcache_registry::{Credentials, Reference, Registry, RegistryError, artifact};
use bootcache_testbed::programs::{DockerRegistry, RegistryAuth};
use bootcache_testbed::tokens::TokenIssuer;

fn registry(dir: &Path, htpasswd: Option<&Path>) -> DockerRegistry {
    DockerRegistry::start(dir, htpasswd).unwrap()
}

/// A small bootcache image of `fill`.
fn image(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let src = dir.join(format!("{name}.raw"));
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
        *b = fill ^ (i >> 12) as u8;
    }
    std::fs::write(&src, &bytes).unwrap();
    let source = bootcache_convert::open(&src, None).unwrap().source;
    let (out, _) =
        bootcache_convert::convert(source.as_ref(), &[], std::io::Cursor::new(Vec::new()), &Default::default(), &|_| {}).unwrap();
    let path = dir.join(format!("{name}.bcimg"));
    std::fs::write(&path, out.into_inner()).unwrap();
    path
}

fn r(s: &str) -> Reference {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn an_image_goes_up_and_comes_back_byte_for_byte_pinned_while_its_tag_moves() {
    let dir = tempfile::tempdir().unwrap();
    let served = registry(dir.path(), None);
    let client = Registry::new(Credentials::Anonymous, vec![]).unwrap();
    let (v1, v2) = (image(dir.path(), "v1", 1), image(dir.path(), "v2", 2));
    let tag = r(&format!("{}/guests/reference:stable", served.addr));
    rt().block_on(async {
        let pinned = artifact::push(&client, &v1, &tag).await.unwrap();
        let back = dir.path().join("back.bcimg");
        let got = artifact::pull(&client, &tag, &back).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&v1).unwrap(), "bytes identical");
        assert_eq!(got.pinned, pinned);
        assert_eq!(got.size, std::fs::metadata(&v1).unwrap().len());
        let manifest = client.manifest(&pinned).await.unwrap();
        let m: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
        assert_eq!(m["artifactType"], artifact::ARTIFACT_TYPE);
        assert_eq!(m["layers"][0]["annotations"][artifact::ROOT_ANNOTATION], got.root);
        // A second push of the same bytes sends no blob again (it is there) and names the same manifest.
        assert_eq!(artifact::push(&client, &v1, &tag).await.unwrap(), pinned);
        // The tag moves to v2: the pinned reference still gives v1.
        artifact::push(&client, &v2, &tag).await.unwrap();
        let again = dir.path().join("again.bcimg");
        artifact::pull(&client, &pinned, &again).await.unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&v1).unwrap());
        artifact::pull(&client, &tag, &again).await.unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&v2).unwrap(), "the tag now names v2");
        // The blob is read with ranges, as a store is.
        let url = client.blob_url(&pinned, &got.blob);
        let part = reqwest::Client::new().get(url).header("range", "bytes=0-3").send().await.unwrap();
        assert_eq!(part.status(), 206);
        assert_eq!(part.bytes().await.unwrap().as_ref(), &std::fs::read(&v1).unwrap()[..4]);
    });
}

#[test]
fn what_cannot_be_pulled_exactly_is_refused_naming_the_reference_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let served = registry(dir.path(), None);
    let client = Registry::new(Credentials::Anonymous, vec![]).unwrap();
    let v1 = image(dir.path(), "v1", 1);
    let out = dir.path().join("out.bcimg");
    rt().block_on(async {
        // An unknown tag.
        let missing = r(&format!("{}/guests/none:v9", served.addr));
        let e = artifact::pull(&client, &missing, &out).await.unwrap_err();
        assert!(matches!(&e, RegistryError::Refused { status: 404, code, .. } if code == "MANIFEST_UNKNOWN"), "{e}");
        assert!(e.to_string().contains(&missing.to_string()), "{e}");
        // Not a bootcache artifact: another artifact type.
        let other = r(&format!("{}/guests/other:v1", served.addr));
        let config = client.put_blob(&other, b"{}".to_vec()).await.unwrap();
        let foreign = serde_json::json!({
            "schemaVersion": 2, "mediaType": artifact::MANIFEST_TYPE, "artifactType": "application/vnd.example.thing",
            "config": {"mediaType": artifact::EMPTY_TYPE, "digest": config.to_string(), "size": 2}, "layers": []
        });
        client.put_manifest(&other, artifact::MANIFEST_TYPE, serde_json::to_vec(&foreign).unwrap()).await.unwrap();
        let e = artifact::pull(&client, &other, &out).await.unwrap_err();
        assert!(matches!(e, RegistryError::NotBootcache { .. }) && e.to_string().contains("application/vnd.example.thing"), "{e}");
        // A blob whose bytes the registry's storage changed: refused, nothing kept.
        let tag = r(&format!("{}/guests/reference:v1", served.addr));
        let pinned = artifact::push(&client, &v1, &tag).await.unwrap();
        let resolved = artifact::resolve(&client, &pinned).await.unwrap();
        let hex = resolved.blob.to_string().trim_start_matches("sha256:").to_owned();
        let data = served.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[1000] ^= 0xff;
        std::fs::write(&data, &bytes).unwrap();
        let e = artifact::pull(&client, &pinned, &out).await.unwrap_err();
        assert!(matches!(e, RegistryError::DigestMismatch { .. }) && e.to_string().contains(&pinned.to_string()), "{e}");
        assert!(
            !out.exists() && std::fs::read_dir(dir.path()).unwrap().all(|f| !f.unwrap().file_name().to_string_lossy().starts_with("out."))
        );
        // A manifest asked for by a digest it does not have.
        let wrong = pinned.pinned(bootcache_registry::Digest([7; 32]));
        let e = artifact::pull(&client, &wrong, &out).await.unwrap_err();
        assert!(matches!(e, RegistryError::Refused { status: 404, .. }), "{e}");
        // Not a loopback registry nor one named insecure: HTTPS.
        let far = r("registry.invalid:5000/guests/reference:v1");
        let e = artifact::pull(&client, &far, &out).await.unwrap_err();
        assert!(matches!(e, RegistryError::Unreachable { .. }) && e.to_string().contains("https://registry.invalid:5000/"), "{e}");
    });
}

#[test]
fn basic_auth_comes_from_dockers_config_and_its_password_shows_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let made = Command::new("htpasswd").args(["-Bbc"]).arg(&htpasswd).args(["alice", "s3cret-pass"]).output().unwrap();
    assert!(made.status.success(), "htpasswd: {}", String::from_utf8_lossy(&made.stderr));
    let served = registry(dir.path(), Some(&htpasswd));
    let v1 = image(dir.path(), "v1", 1);
    let tag = r(&format!("{}/guests/reference:v1", served.addr));
    let config = dir.path().join("config.json");
    let auth = |user: &str, pass: &str| {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(&config, serde_json::json!({"auths": {served.addr.clone(): {"auth": token}}}).to_string()).unwrap();
        Credentials::from_docker_config(&config, &served.addr).unwrap()
    };
    rt().block_on(async {
        let anonymous = Registry::new(Credentials::Anonymous, vec![]).unwrap();
        let e = artifact::push(&anonymous, &v1, &tag).await.unwrap_err();
        assert!(matches!(e, RegistryError::Refused { status: 401, .. }), "{e}");
        let wrong = Registry::new(auth("alice", "not-the-pass"), vec![]).unwrap();
        let e = artifact::push(&wrong, &v1, &tag).await.unwrap_err();
        assert!(matches!(e, RegistryError::Refused { status: 401, .. }) && !e.to_string().contains("not-the-pass"), "{e}");
        let alice = auth("alice", "s3cret-pass");
        assert!(!format!("{alice:?}").contains("s3cret"), "{alice:?}");
        let client = Registry::new(alice, vec![]).unwrap();
        let pinned = artifact::push(&client, &v1, &tag).await.unwrap();
        let back = dir.path().join("back.bcimg");
        artifact::pull(&client, &pinned, &back).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&v1).unwrap());
    });
    // A registry the file does not name: anonymous; a broken file: refused naming it.
    assert!(matches!(Credentials::from_docker_config(&config, "other:5000").unwrap(), Credentials::Anonymous));
    std::fs::write(&config, r#"{"auths": {"r:1": {"auth": "not base64!"}}}"#).unwrap();
    let e = Credentials::from_docker_config(&config, "r:1").unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("not base64"), "{e}");
}

/// The reference registry behind a token service: refused without a
/// credential or with a wrong one (the password shown nowhere); with the
/// right one, a push and a pull of many requests take one token per scope
/// (cached); once the service's key changes and the registry trusts only
/// the new one, the token held is refused and one new token is taken.
#[test]
fn bearer_tokens_are_asked_once_per_scope_and_renewed_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::start(dir.path(), "alice", "s3cret-pass").unwrap();
    let mut served = DockerRegistry::start_with(dir.path(), RegistryAuth::Token { realm: &issuer.realm, cert: &issuer.cert }).unwrap();
    let v1 = image(dir.path(), "v1", 1);
    let tag = r(&format!("{}/guests/reference:v1", served.addr));
    let basic = |user: &str, password: &str| Credentials::Basic { user: user.into(), password: password.into() };
    let rt = rt();
    rt.block_on(async {
        let anonymous = Registry::new(Credentials::Anonymous, vec![]).unwrap();
        let e = artifact::push(&anonymous, &v1, &tag).await.unwrap_err();
        assert!(matches!(e, RegistryError::Refused { status: 401, .. }), "{e}");
        let wrong = Registry::new(basic("alice", "not-the-pass"), vec![]).unwrap();
        let e = artifact::push(&wrong, &v1, &tag).await.unwrap_err().to_string();
        assert!(e.contains("token service") && e.contains("401") && !e.contains("not-the-pass"), "{e}");
        assert_eq!(issuer.refused(), 1, "the wrong password was tried once");
    });
    let before = issuer.issued();
    let client = Registry::new(basic("alice", "s3cret-pass"), vec![]).unwrap();
    let back = dir.path().join("back.bcimg");
    let pinned = rt.block_on(async {
        let pinned = artifact::push(&client, &v1, &tag).await.unwrap();
        artifact::pull(&client, &pinned, &back).await.unwrap();
        artifact::pull(&client, &tag, &back).await.unwrap();
        pinned
    });
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&v1).unwrap(), "bytes identical");
    assert_eq!(issuer.issued() - before, 2, "one token for pull,push and one for pull, however many requests");
    // The service's key changes; the registry, started again, trusts only the new one.
    issuer.rotate().unwrap();
    served.restart().unwrap();
    std::fs::remove_file(&back).unwrap();
    rt.block_on(artifact::pull(&client, &pinned, &back)).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&v1).unwrap());
    assert_eq!(issuer.issued() - before, 3, "the refused token was replaced once");
}

/// A registry that accepts and then says nothing, or answers a manifest
/// without end, fails the call in bounded time and memory; a credentials
/// file without end is refused.
#[test]
fn a_silent_or_endless_registry_fails_the_call() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // First: silent after the request. Second: an endless manifest.
        let (mut silent, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = silent.read(&mut buf);
        let (mut endless, _) = listener.accept().unwrap();
        let _ = endless.read(&mut buf);
        let _ = endless.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
        while endless.write_all(chunk.as_bytes()).is_ok() {}
        drop(silent);
    });
    let client = Registry::new(Credentials::Anonymous, vec![]).unwrap();
    let reference = r(&format!("{addr}/guests/reference:v1"));
    rt().block_on(async {
        let started = std::time::Instant::now();
        let e = client.manifest(&reference).await.unwrap_err();
        assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
        assert!(started.elapsed() < bootcache_registry::READ_TIMEOUT * 2, "{:?}", started.elapsed());
        let e = client.manifest(&reference).await.unwrap_err();
        assert!(e.to_string().contains("an answer over 4194304 bytes"), "{e}");
    });
    server.join().unwrap();
    let e = Credentials::from_docker_config(Path::new("/dev/zero"), "r:1").unwrap_err().to_string();
    assert!(e.contains("more than 1 MiB"), "{e}");
}
