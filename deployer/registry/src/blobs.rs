//! A registry's blobs read from elsewhere, with ranges, as from a store
//! (a node's cache, a control node reading a container's header): the
//! fetcher asks a [`BlobAuthorizer`] for each request's `Authorization`
//! and hands it the registry's challenge when refused, so that the token
//! flow and Basic work there as in this crate's own client. Which URLs are
//! a registry's blobs is the distribution API's to say:
//! `http[s]://HOST[:PORT]/v2/REPO/blobs/sha256:HEX`.

use std::path::PathBuf;
use std::sync::Arc;

use bootcache_api::reference::{Reference, Target};
use bootcache_http::{Authorizer, Authorizers};

use crate::auth::Access;
use crate::{Clients, Credentials, Registry};

/// Speaks for one blob's repository: the credential its registry asked
/// for, for pulling from it.
#[derive(Clone, Debug)]
pub struct BlobAuthorizer {
    registry: Registry,
    reference: Reference,
}

impl BlobAuthorizer {
    /// For blobs of `reference`'s repository, through `registry`'s
    /// credentials and the tokens it holds.
    pub fn new(registry: Registry, reference: Reference) -> BlobAuthorizer {
        BlobAuthorizer { registry, reference }
    }
}

impl Authorizer for BlobAuthorizer {
    fn authorization<'a>(
        &'a self,
        refused: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send + 'a>> {
        Box::pin(async move {
            let scope = Access::Pull.scope(&self.reference.repository);
            if let Some(said) = refused {
                let answered = self.registry.answer(&self.reference, &scope, said).await.map_err(|e| e.to_string())?;
                if !answered {
                    return Err(format!(
                        "{}: the registry refuses to let this client read the blob (401), and no credential it holds for {} answers",
                        self.reference, self.reference.registry
                    ));
                }
            }
            Ok(self.registry.authorization(&self.reference.registry, &scope))
        })
    }
}

/// The blob a distribution API URL names (`http[s]://HOST[:PORT]/v2/REPO/blobs/DIGEST`),
/// as a reference by digest; `None` for any other URL.
pub fn blob_of(url: &str) -> Option<Reference> {
    let u = reqwest::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") || u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return None;
    }
    let host = u.host_str()?;
    let registry = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let (repository, digest) = u.path().strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    let reference: Reference = format!("{registry}/{repository}@{digest}").parse().ok()?;
    (reference.registry == registry && matches!(reference.target, Target::Digest(_))).then_some(reference)
}

/// For a node: the authorizer of each registry blob URL it opens, with
/// the credentials Docker's config file `config` holds for that registry
/// (anonymous without: a registry's token flow may still want a token),
/// one client per registry so its tokens serve every image from it.
/// `insecure`: registries spoken to over plain HTTP besides loopback.
pub fn authorizers(config: Option<PathBuf>, insecure: Vec<String>) -> Authorizers {
    let clients = Clients::new(config, insecure.clone());
    Arc::new(move |url: &str| {
        let reference = blob_of(url)?;
        let registry = match clients.get(&reference.registry) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, registry = %reference.registry, "registry credentials unusable; reading anonymously");
                Registry::new(Credentials::Anonymous, insecure.clone()).ok()?
            }
        };
        Some(Arc::new(BlobAuthorizer::new(registry, reference)) as Arc<dyn Authorizer>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_urls_are_told_from_other_urls() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = blob_of(&format!("http://127.0.0.1:5000/v2/guests/web/blobs/{d}")).unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("127.0.0.1:5000", "guests/web"));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/guests/web@{d}"));
        assert!(blob_of(&format!("http://registry.example/v2/a/blobs/{d}")).is_some());
        assert!(blob_of(&format!("https://registry.example:5000/v2/a/blobs/{d}")).is_some());
        for other in [
            "http://127.0.0.1:8080/guest.bcimg".to_owned(),
            format!("http://127.0.0.1:5000/v2/a/manifests/{d}"),
            format!("http://127.0.0.1:5000/v2/a/blobs/{d}?x=1"),
            format!("http://u:p@127.0.0.1:5000/v2/a/blobs/{d}"),
            "http://127.0.0.1:5000/v2/a/blobs/sha256:short".to_owned(),
            format!("http://127.0.0.1:5000/v2/A/blobs/{d}"),
        ] {
            assert!(blob_of(&other).is_none(), "{other}");
        }
    }
}
