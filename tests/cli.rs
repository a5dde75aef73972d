//! The `bootcache` command line, end to end on real files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;
use bootcache_format::Image;

fn bootcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bootcache")).args(args).output().expect("run bootcache")
}

fn ok(args: &[&str]) -> String {
    let out = bootcache(args);
    assert!(out.status.success(), "bootcache {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = bootcache(args);
    assert!(!out.status.success(), "bootcache {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A tiny deterministic generator, independent of the crate's own.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A boot-like CSV of 1,794 reads over 512 MiB, and its exact unique bytes and
/// interval count computed with a bitmap.
fn boot_csv(dir: &Path) -> (PathBuf, u64, u64) {
    const SPACE: u64 = 512 << 20;
    let mut rng = Lcg(42);
    let mut rows = String::from("t_ns,offset,length\n");
    let mut bits = vec![0u64; (SPACE / 64) as usize];
    for i in 0..1794u64 {
        let (off, len) = if i < 15 {
            (i * (2 << 20), 512 << 10 << rng.next(2))
        } else {
            let off = rng.next(SPACE / 512 - 2048) * 512;
            (off, [512, 4096, 4096, 4096, 16384, 65536, 131072][rng.next(7) as usize])
        };
        rows.push_str(&format!("{},{off},{len}\n", i * 8_000_000 + rng.next(1000)));
        for b in off..off + len {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }
    let unique = bits.iter().map(|w| u64::from(w.count_ones())).sum();
    // An interval starts at every set bit whose lower neighbour is clear.
    let mut intervals = 0;
    let mut carry = 0u64;
    for &w in &bits {
        intervals += u64::from((w & !((w << 1) | carry)).count_ones());
        carry = w >> 63;
    }
    let path = dir.join("boot.csv");
    std::fs::write(&path, rows).unwrap();
    (path, unique, intervals)
}

#[test]
fn csv_import_gives_exact_unique_bytes_and_intervals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (csv, unique, intervals) = boot_csv(dir.path());
    let trace = dir.path().join("boot.bctrace");
    ok(&["trace", "import", "--csv", p(&csv), "--out", p(&trace)]);
    let json: serde_json::Value = serde_json::from_str(&ok(&["analyze", p(&trace), "--json"]))?;
    assert_eq!(json["requests"], 1794);
    assert_eq!(json["unique_bytes"], unique);
    assert_eq!(json["intervals"], intervals);
    assert!(json["total_bytes"].as_u64().unwrap() >= unique);

    // Export gives the same records back.
    let exported = dir.path().join("again.csv");
    ok(&["trace", "export", "--csv", p(&trace), "--out", p(&exported)]);
    let again = dir.path().join("again.bctrace");
    ok(&["trace", "import", "--csv", p(&exported), "--out", p(&again)]);
    assert_eq!(ok(&["analyze", p(&again), "--json"]), ok(&["analyze", p(&trace), "--json"]));

    // Plots: three, as PNG and SVG.
    let plots = dir.path().join("plots");
    ok(&["analyze", p(&trace), "--plot", p(&plots)]);
    for name in ["sizes", "offsets", "cumulative"] {
        assert!(std::fs::read(plots.join(format!("{name}.png")))?.starts_with(b"\x89PNG"));
        assert!(std::fs::read_to_string(plots.join(format!("{name}.svg")))?.contains("<svg"));
    }

    // Compared with itself under two names: one row and one figure row each,
    // the same figures as analysing each alone.
    let text = ok(&["analyze", &format!("first={}", p(&trace)), &format!("second={}", p(&again)), "--plot", p(&plots)]);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| first |") || l.starts_with("| second |")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0].trim_start_matches("| first"), rows[1].trim_start_matches("| second"), "{text}");
    assert!(rows[0].contains(&format!("| 1794 | {:.1} |", unique as f64 / 1048576.0)), "{text}");
    assert!(std::fs::read(plots.join("compare.png"))?.starts_with(b"\x89PNG"));
    let cmp: serde_json::Value = serde_json::from_str(&ok(&["analyze", "--compare", "--json", p(&trace)]))?;
    assert_eq!(cmp[0]["name"], "boot");
    assert_eq!(cmp[0]["analysis"]["unique_bytes"], unique);
    Ok(())
}

#[test]
fn truncated_trace_is_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (csv, _, _) = boot_csv(dir.path());
    let trace = dir.path().join("boot.bctrace");
    ok(&["trace", "import", "--csv", p(&csv), "--out", p(&trace)]);
    let len = std::fs::metadata(&trace)?.len();
    OpenOptions::new().write(true).open(&trace)?.set_len(len - 30)?;
    let err = fails(&["analyze", p(&trace)]);
    assert!(err.contains("truncated") && err.contains("1794"), "{err}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "t_ns,offset,length\n1,2,3\n4,5,-6\n")?;
    let err = fails(&["trace", "import", "--csv", p(&bad), "--out", p(&trace)]);
    assert!(err.contains("line 3") && err.contains("length"), "{err}");
    Ok(())
}

#[test]
fn trace_cover_counts_what_a_union_and_k_of_n_miss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let trace = |name: &str, rows: &str| -> Result<PathBuf> {
        let (csv, out) = (dir.path().join(format!("{name}.csv")), dir.path().join(format!("{name}.bctrace")));
        std::fs::write(&csv, format!("t_ns,offset,length\n{rows}"))?;
        ok(&["trace", "import", "--csv", p(&csv), "--out", p(&out)]);
        Ok(out)
    };
    // Two recorded boots share [0, 8192); each also read a range of its own.
    let a = trace("a", "1,0,8192\n2,100000,4096\n")?;
    let b = trace("b", "1,0,8192\n2,200000,4096\n")?;
    // The deployed boot reads the shared part, b's own range and something new.
    let target = trace("t", "1,0,4096\n2,4096,4096\n3,200000,4096\n4,300000,512\n")?;
    let cover = |args: &[&str]| -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--json", p(&target)]);
        Ok(serde_json::from_str(&ok(&[&["trace", "cover"], &all[..]].concat()))?)
    };
    let only_a = cover(&["--trace", p(&a)])?;
    assert_eq!((only_a["missed_bytes"].as_u64(), only_a["missed_requests"].as_u64()), (Some(4096 + 512), Some(2)));
    assert_eq!(only_a["unused_bytes"], 4096);
    let union = cover(&["--trace", p(&a), "--trace", p(&b)])?;
    assert_eq!((union["missed_bytes"].as_u64(), union["missed_intervals"].as_u64()), (Some(512), Some(1)));
    assert_eq!((union["set_bytes"].as_u64(), union["unused_bytes"].as_u64()), (Some(16384), Some(4096)));
    let both = cover(&["--trace", p(&a), "--trace", p(&b), "--min-boots", "2"])?;
    assert_eq!(
        (both["set_bytes"].as_u64(), both["missed_bytes"].as_u64(), both["unused_bytes"].as_u64()),
        (Some(8192), Some(4608), Some(0))
    );
    let err = fails(&["trace", "cover", "--trace", p(&a), "--min-boots", "2", p(&target)]);
    assert!(err.contains("--min-boots 2") && err.contains("number of traces (1)"), "{err}");
    Ok(())
}

/// A sparse 64 MiB image with scattered data, and a trace over part of it.
fn sample(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let img = dir.join("disk.raw");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&img)?;
    f.set_len(64 << 20)?;
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let off = rng.next(64 << 11) * 512;
        let data: Vec<u8> = (0..rng.next(64 << 10) + 1).map(|i| (i as u8) ^ (rng.next(4) as u8)).collect();
        f.write_all_at(&data, off.min((64 << 20) - data.len() as u64))?;
    }
    let trace = dir.join("disk.bctrace");
    ok(&["trace", "synth", "--image", p(&img), "--out", p(&trace), "--reads", "300"]);
    Ok((img, trace))
}

#[test]
fn convert_export_round_trip_and_info() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (img, trace) = sample(dir.path())?;
    for zstd in [false, true] {
        let bc = dir.path().join("disk.bcimg");
        let mut args = vec!["convert", p(&img), p(&bc), "--trace", p(&trace), "--output", "json"];
        if zstd {
            args.push("--zstd");
        }
        let report: serde_json::Value = serde_json::from_str(&ok(&args))?;
        let info: serde_json::Value = serde_json::from_str(&ok(&["info", p(&bc), "--output", "json"]))?;
        assert_eq!(info["virtual_size"], 64 << 20);
        assert_eq!(info["root_digest"], report["root_digest"]);
        assert_eq!(info["boot_segment_bytes"], report["boot_segment_bytes"]);
        assert!(info["boot_segment_bytes"].as_u64().unwrap() > 0);
        assert!(ok(&["check", p(&bc)]).contains(info["root_digest"].as_str().unwrap()));
        let back = dir.path().join("back.raw");
        ok(&["export", p(&bc), p(&back)]);
        assert!(std::fs::read(&back)? == std::fs::read(&img)?, "export differs (zstd {zstd})");
        // Reproducible: the same inputs give the same bytes.
        let bc2 = dir.path().join("disk2.bcimg");
        args[2] = p(&bc2);
        ok(&args);
        assert!(std::fs::read(&bc)? == std::fs::read(&bc2)?);
    }
    Ok(())
}

#[test]
fn flipped_byte_fails_check_naming_the_extent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (img, trace) = sample(dir.path())?;
    let bc = dir.path().join("disk.bcimg");
    ok(&["convert", p(&img), p(&bc), "--trace", p(&trace), "--zstd"]);
    let image = Image::open(std::fs::File::open(&bc)?)?;
    let entries = image.index().entries().to_vec();
    let header = image.header().clone();
    drop(image);
    let mut rng = Lcg(3);
    for _ in 0..8 {
        let pos = header.boot.start + rng.next(header.rest.end - header.boot.start);
        let owner = entries.iter().find(|e| e.stored.contains(&pos)).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&bc)?;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, pos)?;
        f.write_all_at(&[byte[0] ^ 0x5a], pos)?;
        let err = fails(&["check", p(&bc)]);
        assert!(err.contains(&format!("guest offset {:#x}", owner.guest.start)), "{err}");
        assert!(fails(&["export", p(&bc), p(&dir.path().join("x.raw"))]).contains("guest offset"));
        f.write_all_at(&byte, pos)?;
    }
    ok(&["check", p(&bc)]);
    Ok(())
}

#[test]
fn bad_inputs_get_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.bcimg");
    std::fs::write(&junk, vec![7u8; 4096])?;
    assert!(fails(&["info", p(&junk)]).contains("not a bootcache image"));
    assert!(fails(&["analyze", p(&junk)]).contains("not a bootcache trace"));
    assert!(fails(&["info", p(&dir.path().join("missing"))]).contains("missing"));
    // A trace recorded on another image is refused, naming both sizes.
    let (img, trace) = sample(dir.path())?;
    let other = dir.path().join("other.raw");
    OpenOptions::new().create(true).write(true).truncate(true).open(&other)?.set_len(1 << 20)?;
    // The failed conversion leaves an earlier output as it was, and no
    // half-written file beside it.
    let earlier = dir.path().join("o.bcimg");
    std::fs::write(&earlier, b"an earlier output")?;
    let err = fails(&["convert", p(&other), p(&earlier), "--trace", p(&trace)]);
    assert!(err.contains("67108864") && err.contains("1048576"), "{err}");
    assert_eq!(std::fs::read(&earlier)?, b"an earlier output");
    let names: Vec<_> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().ends_with(".part")), "{names:?}");
    // No trace: a warning and an empty boot segment.
    let out = bootcache(&["convert", p(&img), p(&dir.path().join("n.bcimg")), "--output", "json"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no trace"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["boot_segment_bytes"], 0);
    assert!(ok(&["--help"]).contains("convert"));
    Ok(())
}

/// Files the deployment commands read are read with a bound, and a token
/// file others may read is refused: `deploy -f /dev/zero` stops at once
/// (it read until 19.5 GB before), and nothing is started or sent.
#[test]
fn deployment_commands_read_bounded_files_and_private_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let started = std::time::Instant::now();
    let err = fails(&["deploy", "-f", "/dev/zero", "--control", "http://127.0.0.1:9"]);
    assert!(err.contains("at most 1048576 bytes"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "refused at once");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token-of-the-administrator-0123456789abcdef\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let lab = dir.path().join("lab.yaml");
    std::fs::write(&lab, "name: l\ninstances:\n  c:\n    kind: container\n    image: http://127.0.0.1:9/x.tar\n")?;
    for args in [
        vec!["deploy", "-f", p(&lab), "--control", "http://127.0.0.1:9", "--token-file", p(&token)],
        vec!["inspect", "--control", "http://127.0.0.1:9", "--token-file", p(&token)],
        vec!["control", "node", "remove", "n1", "--control", "http://127.0.0.1:9", "--token-file", p(&token)],
    ] {
        let err = fails(&args);
        assert!(err.contains("read by others"), "{args:?}: {err}");
    }
    let err = fails(&["agent", "--control", "http://127.0.0.1:9", "--name", "n1", "--token-file", p(&token)]);
    assert!(err.contains("read by others"), "{err}");
    // An agent's registry credentials that cannot be used: refused at
    // start, naming the file, never read past their bound.
    let private = dir.path().join("private.token");
    std::fs::write(&private, "a-join-token-0123456789abcdef0123456789\n")?;
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let not_json = dir.path().join("config.json");
    std::fs::write(&not_json, "auths: nope")?;
    for (config, why) in [("/dev/zero", "more than 1 MiB"), (p(&not_json), "not JSON")] {
        let agent = ["agent", "--control", "http://127.0.0.1:9", "--name", "n1", "--token-file", p(&private)];
        let err = fails(&[&agent[..], &["--registry-config", config, "--agent-state", p(&dir.path().join("state"))]].concat());
        assert!(err.contains(config) && err.contains(why), "{config}: {err}");
    }
    // A file an instance takes from beside the lab file: missing, too
    // big, or outside its folder, refused naming the line, before
    // anything is asked of a control node.
    let with =
        "name: l\ninstances:\n  c:\n    kind: container\n    image: http://127.0.0.1:9/x.tar\n    files:\n      /etc/a: {from: FROM}\n";
    let text = |from: &str| with.replace("FROM", from);
    std::fs::write(&lab, text("conf/a.conf"))?;
    let deploy = ["deploy", "-f", p(&lab), "--control", "http://127.0.0.1:9"];
    let err = fails(&deploy);
    assert!(err.contains("line 7: from: conf/a.conf") && err.contains("No such file"), "{err}");
    std::fs::create_dir(dir.path().join("conf"))?;
    std::fs::write(dir.path().join("conf/a.conf"), "x".repeat(bootcache_api::lab::MAX_FILE_CONTENT + 1))?;
    let err = fails(&deploy);
    assert!(err.contains("line 7: from: conf/a.conf") && err.contains("at most 262144 bytes"), "{err}");
    std::fs::write(&lab, text("../a.conf"))?;
    let err = fails(&deploy);
    assert!(err.contains("line 7: from: \"../a.conf\"") && err.contains("without empty, . or .. components"), "{err}");
    // Present: read and sent (the control node here answers nothing).
    std::fs::write(&lab, text("conf/a.conf"))?;
    std::fs::write(dir.path().join("conf/a.conf"), "a=1\n")?;
    let err = fails(&deploy);
    assert!(!err.contains("from:"), "{err}");
    Ok(())
}

/// `push` and `pull` refuse what is not a reference before anything is
/// sent or written, and speak HTTPS to a registry neither on loopback nor
/// named insecure.
#[test]
fn push_and_pull_refuse_bad_references_before_anything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.bcimg");
    for (reference, why) in [
        ("http://127.0.0.1:5000/a:1", "no scheme"),
        ("web:1", "no registry"),
        ("127.0.0.1:5000/Web:1", "lowercase path components"),
        ("registry.invalid:5000/web:1", "https://registry.invalid:5000/v2/web/manifests/1"),
    ] {
        let err = fails(&["pull", reference, p(&out)]);
        assert!(err.contains(why), "{reference}: {err}");
    }
    assert!(!out.exists());
    // A seed's user-data is read within its bound (not /dev/zero to the end).
    let err = fails(&["seed", p(&out), "--user-data", "/dev/zero"]);
    assert!(err.contains("at most 65536 bytes"), "{err}");
    let err = fails(&["push", p(&out), "registry.invalid:5000/web:1"]);
    assert!(err.contains("out.bcimg"), "{err}");
    Ok(())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A role over a base: a raw copy changed in places, and a qcow2 overlay
/// on the base's source changed the same way. The layer stores only the
/// changed blocks, reads back as the role's disk through its parent, and
/// `info`, `check`, `export` and `diff` follow the chain; a missing or
/// different parent is named.
#[test]
fn a_layer_over_a_base_holds_what_differs_and_reads_as_the_role() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (base_raw, trace) = sample(dir.path())?;
    let base = dir.path().join("base.bcimg");
    ok(&["convert", p(&base_raw), p(&base), "--trace", p(&trace), "--zstd", "-q"]);
    // The role: 64 KiB written at 10 MiB, one 4 KiB block of the base's data zeroed.
    let bytes = std::fs::read(&base_raw)?;
    let data_block = (0..bytes.len() / 4096).find(|&b| bytes[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0)).unwrap() as u64 * 4096;
    let role_raw = dir.path().join("role.raw");
    std::fs::copy(&base_raw, &role_raw)?;
    let f = OpenOptions::new().write(true).open(&role_raw)?;
    f.write_all_at(&[0x5a; 65536], 10 << 20)?;
    f.write_all_at(&[0; 4096], data_block)?;
    let overlay = dir.path().join("role.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&base_raw), "-F", "raw", p(&overlay)]);
    run("qemu-io", &["-c", "write -P 0x5a 10M 64k", "-c", &format!("write -z {data_block} 4k"), p(&overlay)]);

    for src in [&role_raw, &overlay] {
        let role = dir.path().join("role.bcimg");
        let report: serde_json::Value = serde_json::from_str(&ok(&[
            "convert",
            p(src),
            p(&role),
            "--parent",
            p(&base),
            "--trace",
            p(&trace),
            "--zstd",
            "-q",
            "--output",
            "json",
        ]))?;
        assert_eq!(report["parent"]["changed_bytes"], 65536 + 4096, "{report}");
        assert_eq!(report["parent"]["locator"], "base.bcimg");
        let role_len = std::fs::metadata(&role)?.len();
        assert!(role_len < 80 << 10 && role_len * 4 < std::fs::metadata(&base)?.len(), "the layer is {role_len} bytes");

        let info: serde_json::Value = serde_json::from_str(&ok(&["info", p(&role), "--output", "json"]))?;
        let base_info: serde_json::Value = serde_json::from_str(&ok(&["info", p(&base), "--output", "json"]))?;
        assert_eq!(info["layer"]["parent_root_digest"], base_info["root_digest"]);
        assert_eq!(info["layer"]["layer_depth"], 1);
        assert_eq!(info["format_version"], "1.1");
        assert!(info["layer"]["chain"][0]["path"].as_str().unwrap().ends_with("base.bcimg"), "{info}");
        assert!(ok(&["check", p(&role)]).contains("in 2 layers"));
        let back = dir.path().join("back.raw");
        ok(&["export", p(&role), p(&back), "-q"]);
        assert!(std::fs::read(&back)? == std::fs::read(&role_raw)?, "the flattened layer is not the role ({})", src.display());

        // A node holding the base fetches the role's own 64 KiB only.
        let diff: serde_json::Value = serde_json::from_str(&ok(&["diff", p(&base), p(&role), "--output", "json"]))?;
        let (data, shared) = (diff["new_data_bytes"].as_u64().unwrap(), diff["shared_bytes"].as_u64().unwrap());
        assert_eq!(data - shared, 65536, "{diff}");
        assert!(diff["stored_bytes_to_fetch"].as_u64().unwrap() <= role_len, "{diff}");
        // The base against itself: everything shared, nothing to fetch.
        let same: serde_json::Value = serde_json::from_str(&ok(&["diff", p(&base), p(&base), "--output", "json"]))?;
        assert_eq!(same["shared_bytes"], same["new_data_bytes"]);
        assert_eq!(same["stored_bytes_to_fetch"], 0);
    }

    // The parent gone, or another image in its place: named, nothing written.
    let role = dir.path().join("role.bcimg");
    let moved = dir.path().join("moved.bcimg");
    std::fs::rename(&base, &moved)?;
    for cmd in ["check", "info"] {
        let err = fails(&[cmd, p(&role)]);
        assert!(err.contains("base.bcimg") && err.contains("cannot be opened"), "{cmd}: {err}");
    }
    assert!(fails(&["export", p(&role), p(&dir.path().join("x.raw"))]).contains("base.bcimg"));
    assert!(!dir.path().join("x.raw").exists());
    ok(&["convert", p(&base_raw), p(&base), "--trace", p(&trace), "-q"]); // not compressed: another root digest
    let err = fails(&["check", p(&role)]);
    assert!(err.contains("base.bcimg") && err.contains("does not match"), "{err}");
    // A layer is never read on its own as if its parent were zeros.
    let err = fails(&["push", p(&role), "127.0.0.1:1/x/y:z"]);
    assert!(err.contains("layer"), "{err}");
    Ok(())
}

/// Two versions of an image converted whole: the extents of regions the
/// update left alone are equal (cut on a fixed guest grain), so `diff`
/// finds all but the changed grains shared.
#[test]
fn two_versions_share_every_extent_the_update_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (v1_raw, trace) = sample(dir.path())?;
    // Copied densely (its holes written as zeros): extents are cut on whole
    // grains wherever any byte is allocated, so how a copy allocates the
    // same data does not move them.
    let v2_raw = dir.path().join("v2.raw");
    run("cp", &["--sparse=never", p(&v1_raw), p(&v2_raw)]);
    let f = OpenOptions::new().write(true).open(&v2_raw)?;
    for at in [3 << 20, 17 << 20, 40 << 20] {
        f.write_all_at(&[0xa5; 4096], at)?;
    }
    let (v1, v2) = (dir.path().join("v1.bcimg"), dir.path().join("v2.bcimg"));
    ok(&["convert", p(&v1_raw), p(&v1), "--trace", p(&trace), "--zstd", "-q"]);
    ok(&["convert", p(&v2_raw), p(&v2), "--trace", p(&trace), "--zstd", "-q"]);
    let diff: serde_json::Value = serde_json::from_str(&ok(&["diff", p(&v1), p(&v2), "--output", "json"]))?;
    let (data, shared) = (diff["new_data_bytes"].as_u64().unwrap(), diff["shared_bytes"].as_u64().unwrap());
    assert!(data > 4 << 20, "{diff}");
    assert!(data - shared <= 3 * (256 << 10), "more than the three changed grains differ: {diff}");
    assert!(data - shared >= 3 * 4096, "{diff}");
    let text = ok(&["diff", p(&v1), p(&v2)]);
    assert!(text.contains("stored bytes to fetch"), "{text}");
    Ok(())
}
