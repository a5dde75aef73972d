//! Layered images on a node: one cache per layer, the base's shared by every
//! role over it, each role read by QEMU's own NBD client as its disk; a
//! parent that is missing or is another image refused by name.

mod common;

use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bootcache_convert::{ConvertOptions, RawSource, convert_layer, layer_changes};
use bootcache_delivery::cache::Background;
use bootcache_delivery::node::Node;
use bootcache_format::{Chain, Image};
use bootcache_trace::{ImageIdentity, Record, Trace};
use common::*;

/// A role over the fixture's image: its disk with `edits` (offset, bytes)
/// applied, converted as a layer over `disk.bcimg` with the fixture's boot
/// reads and one into each edit; its disk, and its container `name.bcimg`
/// in `dir`.
fn role(fx: &Fixture, name: &str, edits: &[(u64, Vec<u8>)], dir: &Path) -> (Vec<u8>, PathBuf) {
    let mut model = fx.model.clone();
    let source = fx.dir.path().join(format!("{name}.raw"));
    std::fs::copy(&fx.source, &source).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&source).unwrap();
    let mut reads = fx.reads.clone();
    for (at, bytes) in edits {
        model[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        f.write_all_at(bytes, *at).unwrap();
        reads.push((*at, bytes.len() as u64));
    }
    let trace = Trace {
        image: ImageIdentity { size: model.len() as u64, digest: None },
        records: reads.iter().enumerate().map(|(t, &(o, l))| Record::read(t as u64 * 1000, o, l)).collect(),
        ..Trace::default()
    };
    let base = Chain::open(Image::open_layer(std::fs::File::open(&fx.container).unwrap()).unwrap(), |_| unreachable!()).unwrap();
    let src = RawSource::open(&source).unwrap();
    let changed = layer_changes(&src, &base, &|_| {}).unwrap();
    let opts = ConvertOptions { zstd_level: Some(3), ..ConvertOptions::default() };
    let (out, _) = convert_layer(&src, &base, "disk.bcimg", &changed, &[trace], Cursor::new(Vec::new()), &opts, &|_| {}).unwrap();
    let container = dir.join(format!("{name}.bcimg"));
    std::fs::write(&container, out.into_inner()).unwrap();
    (model, container)
}

/// Bytes a node reads of `path` before its first extent: header, index,
/// boot order table and metadata; and its boot segment.
fn head_and_boot(path: &Path) -> (u64, u64) {
    let image = Image::open_layer(std::fs::File::open(path).unwrap()).unwrap();
    let h = image.header();
    (h.head_range().end + (h.meta.end - h.meta.start), h.boot.end - h.boot.start)
}

/// A role's boot stream as its boot order table gives it: each extent
/// that stores bytes as (the file holding it, its stored range), in order.
fn boot_stream(fx: &Fixture, role: &Path) -> Vec<(PathBuf, std::ops::Range<u64>)> {
    let top = Image::open_layer(std::fs::File::open(role).unwrap()).unwrap();
    let chain = Chain::open(top, |_| std::fs::File::open(&fx.container)).unwrap();
    let files = [role.to_owned(), fx.container.clone()];
    chain.boot_stream().filter(|(_, e)| e.stored_len() > 0).map(|(layer, e)| (files[layer].clone(), e.stored.clone())).collect()
}

fn store_dir(fx: &Fixture) -> PathBuf {
    fx.container.parent().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_over_one_base_share_its_cache_and_read_as_their_disks() {
    let fx = fixture().await;
    let store = store_dir(&fx);
    let (a_disk, a) = role(&fx, "a", &[(MIB, vec![0x11; 65536]), (41 * MIB, vec![0x22; 4096])], &store);
    // Role b also masks base data with zeros (a zero extent in the layer).
    let (b_disk, b) = role(&fx, "b", &[(10 * MIB, vec![0x33; 128 << 10]), (42 * MIB, vec![0; 65536])], &store);
    let base_root = image(&fx.container).root_digest();

    let sock = fx.dir.path().join("node.sock");
    let node = Node::new(sock.clone(), options(fx.dir.path(), Background::Off));
    tokio::spawn(node.nbd().serve_unix(tokio::net::UnixListener::bind(&sock).unwrap()));
    let url = |p: &Path| fx.url.replace("disk.bcimg", p.file_name().unwrap().to_str().unwrap());
    let (url_a, url_b) = (url(&a), url(&b));
    let (open_a, open_b) = tokio::join!(node.open("a", &url_a, &[], None), node.open("b", &url_b, &[], None));
    let (open_a, open_b) = (open_a.unwrap(), open_b.unwrap());
    let roots = |p: &Path| Image::open_layer(std::fs::File::open(p).unwrap()).unwrap().root_digest();
    assert_eq!(open_a.layers, vec![roots(&a), base_root]);
    assert_eq!(open_b.layers, vec![roots(&b), base_root]);
    assert_eq!(node.cache_metrics().len(), 3, "one cache per layer, the base's shared");

    // Each role's boot stream (its own boot extents and the base's its boot
    // reads), an extent both read once; and the heads (each role's open
    // reads its parent's head to check the chain).
    for root in [roots(&a), roots(&b), base_root] {
        assert!(node.cache(&root).unwrap().wait_prefetched(Duration::from_secs(20)).await);
    }
    let sent = fx.stats.body_bytes.load(Ordering::Relaxed);
    let streamed: std::collections::HashSet<_> = boot_stream(&fx, &a).into_iter().chain(boot_stream(&fx, &b)).collect();
    let heads = [&fx.container, &a, &b].iter().map(|p| head_and_boot(p).0).sum::<u64>() + head_and_boot(&fx.container).0;
    let expected = heads + streamed.iter().map(|(_, r)| r.end - r.start).sum::<u64>();
    assert_eq!(sent, expected, "the store sent the roles' boot streams, each extent once, and the heads");

    // QEMU reads each role as its disk, byte for byte.
    for (name, disk, open) in [("a", &a_disk, &open_a), ("b", &b_disk, &open_b)] {
        let want = fx.dir.path().join(format!("{name}.want"));
        std::fs::write(&want, disk).unwrap();
        let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", want.to_str().unwrap(), &open.nbd_url]).await;
        assert!(out.status.success(), "role {name}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // The store sent each file once (and the base's head once more): the
    // roles read the base's extents from one cache.
    let files: u64 = [&fx.container, &a, &b].iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let sent = fx.stats.body_bytes.load(Ordering::Relaxed);
    assert_eq!(sent, files + head_and_boot(&fx.container).0, "the store sent {sent} bytes of files of {files}");
    let base = node.cache(&base_root).unwrap().metrics();
    assert_eq!(base.discarded_bytes, 0);
    let status = node.status();
    let listed = status.iter().find(|n| n.name == "a").unwrap().metrics.clone().unwrap();
    assert_eq!(listed.extents, node.cache(&roots(&a)).unwrap().metrics().extents + base.extents, "a role's counters cover its layers");

    // Closing a role keeps the base while another role uses it.
    assert!(node.close("a"));
    assert!(node.cache(&roots(&a)).is_none() && node.cache(&base_root).is_some());
    assert!(node.close("b"));
    assert!(node.cache_metrics().is_empty());
}

/// A role's boot reads the base and its own extents interleaved: the node
/// fetches them as one stream in the order its boot order table gives,
/// across the two files, and nothing else before the guest asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_boots_from_one_stream_across_its_layers_in_its_boot_order() {
    let fx = fixture().await;
    let store = store_dir(&fx);
    // An edit inside a range the base's boot reads: the role's extent comes
    // between base extents in its boot order.
    let (_, a) = role(&fx, "a", &[(41 * MIB + 65536, vec![0x22; 4096]), (MIB, vec![0x11; 65536])], &store);
    let want = boot_stream(&fx, &a);
    let layers_in_order: Vec<bool> = want.iter().map(|(f, _)| *f == a).collect();
    assert!(layers_in_order.windows(2).filter(|w| w[0] != w[1]).count() >= 2, "the fixture interleaves the layers: {want:?}");

    let node = Node::new(fx.dir.path().join("node.sock"), options(fx.dir.path(), Background::Off));
    let url = fx.url.replace("disk.bcimg", "a.bcimg");
    let open = node.open("a", &url, &[], None).await.unwrap();
    for root in &open.layers {
        assert!(node.cache(root).unwrap().wait_prefetched(Duration::from_secs(20)).await);
    }
    // The requests for extents (past each file's head), cut into the
    // extents they carried, in the order they were asked for.
    let starts: std::collections::HashMap<(PathBuf, u64), std::ops::Range<u64>> =
        want.iter().map(|(f, r)| ((f.clone(), r.start), r.clone())).collect();
    let mut got = Vec::new();
    for (name, range) in fx.stats.recent.lock().unwrap().iter() {
        let file = store.join(name);
        let h = Image::open_layer(std::fs::File::open(&file).unwrap()).unwrap().header().clone();
        if range.start < h.boot.start || range.start >= h.meta.start {
            continue;
        }
        let mut at = range.start;
        while at < range.end {
            let Some(r) = starts.get(&(file.clone(), at)) else { panic!("{name} {range:?}: no boot extent starts at {at}") };
            got.push((file.clone(), r.clone()));
            at = r.end;
        }
    }
    assert_eq!(got, want, "the extents were fetched once each, in the role's boot order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_missing_or_another_image_is_refused_by_name() {
    let fx = fixture().await;
    // A second store holding a role but not its base.
    let other = fx.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    role(&fx, "a", &[(MIB, vec![0x11; 65536])], &other);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(bootcache_delivery::store::serve(listener, other.clone(), Arc::default()));
    let node = Node::new(fx.dir.path().join("node.sock"), options(fx.dir.path(), Background::Off));
    let chained = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut c = e.source();
        while let Some(x) = c {
            s = format!("{s}: {x}");
            c = x.source();
        }
        s
    };

    let e = chained(&node.open("a", &format!("{base_url}/a.bcimg"), &[], None).await.unwrap_err());
    assert!(e.contains(&format!("its parent {base_url}/disk.bcimg")) && e.contains("404"), "{e}");

    // Another image where the parent should be: named, nothing opened.
    let flat = fx.dir.path().join("flat.raw");
    std::fs::copy(&fx.source, &flat).unwrap();
    let mut model = fx.model.clone();
    model[..4096].fill(0x55);
    std::fs::OpenOptions::new().write(true).open(&flat).unwrap().write_all_at(&model[..4096], 0).unwrap();
    let opts = ConvertOptions { zstd_level: Some(3), ..ConvertOptions::default() };
    let (out, _) = bootcache_convert::convert(&RawSource::open(&flat).unwrap(), &[], Cursor::new(Vec::new()), &opts, &|_| {}).unwrap();
    std::fs::write(other.join("disk.bcimg"), out.into_inner()).unwrap();
    let e = chained(&node.open("a", &format!("{base_url}/a.bcimg"), &[], None).await.unwrap_err());
    let base_root = image(&fx.container).root_digest();
    assert!(e.contains(&format!("not the parent {base_root}")), "{e}");
    assert!(node.cache_metrics().is_empty(), "no cache kept for a chain that does not fit");
}
