//! What a registry or a user hands the registry client: references,
//! digests, manifests, container image manifests and indexes, Docker
//! config files, authentication challenges and token services' answers.
//! Refused with a message naming the reference, or read whole: a reference
//! prints back as itself, a manifest read as a bootcache image names one
//! blob with a well-formed root digest, a container image manifest at most
//! as many layers as allowed, pinned to its own digest. Never a panic,
//! never an allocation beyond the input's bound.

#![no_main]

use bootcache_registry::{Credentials, Digest, Reference, artifact, auth, image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&what, rest)) = data.split_first() else { return };
    match what % 7 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            match text.parse::<Reference>() {
                Ok(r) => {
                    let again: Reference = r.to_string().parse().expect("a reference prints back as one");
                    assert_eq!(again, r);
                }
                Err(e) => assert!(!e.0.is_empty()),
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(d) = text.parse::<Digest>() {
                assert_eq!(d.to_string(), text);
            }
        }
        2 => {
            let reference: Reference = "127.0.0.1:5000/guests/reference:v1".parse().unwrap();
            match artifact::read_manifest(&reference, rest, Digest::of(rest)) {
                Ok(r) => {
                    assert_eq!(r.root.len(), 64);
                    assert_eq!(r.pinned, reference.pinned(Digest::of(rest)));
                }
                Err(e) => assert!(e.to_string().contains("127.0.0.1:5000/guests/reference:v1")),
            }
        }
        3 => match Credentials::from_docker_config_json(rest, "127.0.0.1:5000") {
            Ok(c) => drop(format!("{c:?}")),
            Err(why) => assert!(!why.is_empty()),
        },
        4 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            match auth::challenge(text) {
                Ok(auth::Challenge::Bearer { realm, .. }) => assert!(realm.len() <= text.len()),
                Ok(auth::Challenge::Basic) => {}
                Err(why) => assert!(!why.is_empty()),
            }
        }
        6 => {
            let reference: Reference = "127.0.0.1:5000/lab/web:v1".parse().unwrap();
            // What the registry said it is: nothing, an index, a manifest.
            let (said, rest) = rest.split_first().map_or((0, rest), |(s, r)| (*s, r));
            let media_type = ["", "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.v2+json"]
                [usize::from(said % 3)];
            match image::read_manifest(&reference, rest, Digest::of(rest), media_type) {
                Ok(image::Read::Image(i)) => {
                    assert!(!i.layers.is_empty() && i.layers.len() <= image::MAX_LAYERS);
                    assert!(i.config.size <= image::MAX_CONFIG_BYTES);
                    assert_eq!(i.pinned, reference.pinned(Digest::of(rest)));
                }
                Ok(image::Read::Index(_)) => {}
                Err(e) => assert!(e.to_string().contains("127.0.0.1:5000/lab/web:v1")),
            }
        }
        _ => match auth::token_of(rest) {
            // What goes into a header: visible ASCII, bounded.
            Ok(t) => assert!(!t.is_empty() && t.len() <= 16 << 10 && t.bytes().all(|b| b.is_ascii_graphic())),
            Err(why) => assert!(!why.is_empty()),
        },
    }
});
