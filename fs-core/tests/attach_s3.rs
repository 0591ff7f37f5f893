//! A bucket written outside Strata (with the S3 client, as boto3 or the aws CLI would),
//! attached to a volume with `strata attach` and read through two mounts of a cache group,
//! against a real SeaweedFS started by the test: names, sizes and mtimes listed; byte-exact
//! reads; the second client and the second `ls -R` cost the source nothing; an object
//! overwritten and one deleted outside show after `strata attach --sync`; with the source
//! stopped, warmed files still read and the others fail with EIO, quickly.
//!
//! Sizes: 1,000 small objects in 10 prefixes and three 24 MiB objects by default;
//! `STRATA_ATTACH_TEST_FULL=1` uses the acceptance sizes (10,000 objects in 100 prefixes and
//! three 1 GiB objects).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use strata::object::{ObjectStore, S3Store};
use strata::testing::mount::{self, TestMount};
use strata::testing::seaweedfs::{SeaweedFs, skip_s3};
use strata::testing::{free_port, metric};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const MIB: usize = 1 << 20;

fn full() -> bool {
    std::env::var("STRATA_ATTACH_TEST_FULL").is_ok_and(|v| v == "1")
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn source_ops(ports: &[u16], op: &str) -> u64 {
    let p = format!("strata_source_requests_total{{op=\"{op}\"}}");
    ports.iter().map(|port| metric(*port, &p)).sum()
}

/// Every file below `dir`: relative path → (size, mtime).
fn walk(dir: &Path) -> BTreeMap<String, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, (md.len(), md.modified().unwrap()));
            }
        }
    }
    out
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    fs::File::open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

fn strata(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strata {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_bucket_written_outside_is_read_through_the_caches() {
    if skip_s3() {
        return;
    }
    // A server of its own: the test stops it.
    let weed = SeaweedFs::start().unwrap_or_else(|e| panic!("{e}"));
    let writer = std::sync::Arc::new(S3Store::new(weed.settings("datasets")).unwrap());
    writer.init().unwrap();
    let (prefixes, per_prefix, big) = if full() {
        (100, 100, 1024 * MIB)
    } else {
        (10, 100, 24 * MIB)
    };
    let uploaded = SystemTime::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let w = writer.clone();
            std::thread::spawn(move || {
                for p in (t..prefixes).step_by(8) {
                    for i in 0..per_prefix {
                        let key = format!("web/p{p:03}/doc-{i:05}.json");
                        w.put(&key, Bytes::from(format!("{{\"p\":{p},\"i\":{i}}}")))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (i, name) in ["a.bin", "b.bin", "c.bin"].iter().enumerate() {
        writer
            .put(
                &format!("web/models/{name}"),
                Bytes::from(pattern(i as u32, big)),
            )
            .unwrap();
    }

    // A volume (SQLite + local directory), the bucket attached at /datasets/web.
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    mount::format(
        BIN,
        &[
            "--bucket",
            dir.path().join("data").to_str().unwrap(),
            &meta,
            "dsvol",
        ],
    );
    let ports = [free_port(), free_port()];
    let member = |name: &str, port: u16| {
        let cache = dir.path().join(format!("{name}-cache"));
        TestMount::new(
            BIN,
            &meta,
            &dir.path().join(name),
            &[
                "--cache-group",
                "ds",
                "--cache-group-addr",
                "127.0.0.1:0",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--cache-size",
                "8192",
                "--free-space-ratio",
                "0",
                "--metrics",
                &format!("127.0.0.1:{port}"),
            ],
        )
    };
    let a = member("a", ports[0]);
    fs::create_dir(a.path.join("datasets")).unwrap();
    // Wrong keys are refused at attach time, naming the source.
    let out = Command::new(BIN)
        .args([
            "attach",
            &meta,
            "--path",
            "/datasets/bad",
            "--source",
            "s3://datasets/web",
        ])
        .args([
            "--endpoint",
            weed.endpoint(),
            "--access-key",
            "nobody",
            "--secret-key",
            "wrongwrongwrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://datasets/web"), "{err}");
    let said = strata(&[
        "attach",
        &meta,
        "--path",
        "/datasets/web",
        "--source",
        "s3://datasets/web",
        "--endpoint",
        weed.endpoint(),
        "--access-key",
        weed.access_key(),
        "--secret-key",
        weed.secret_key(),
        "--refresh",
        "0",
    ]);
    assert!(
        said.contains("attached s3://datasets/web at /datasets/web"),
        "{said}"
    );
    assert!(strata(&["attach", &meta, "--list"]).contains("/datasets/web -> s3://datasets/web"));
    let b = member("b", ports[1]);
    std::thread::sleep(Duration::from_secs(3)); // group membership

    // ls -R through A: every object, with its size and a plausible mtime.
    let root = a.path.join("datasets/web");
    let t0 = Instant::now();
    let listed = walk(&root);
    let first_ls = t0.elapsed();
    assert_eq!(listed.len(), prefixes * per_prefix + 3);
    let doc = &listed["p007/doc-00042.json"];
    assert_eq!(doc.0, "{\"p\":7,\"i\":42}".len() as u64);
    let skew = doc
        .1
        .duration_since(uploaded)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(120), "mtime {:?}", doc.1);
    assert_eq!(listed["models/b.bin"].0, big as u64);
    let lists = source_ops(&ports, "list");
    // Its prefixes and models/: one LIST each (`strata attach` imported the attached
    // directory's own listing when it checked the source).
    assert_eq!(lists, prefixes as u64 + 1, "one LIST per directory");

    // Byte-exact reads through A; the same through B costs the source nothing.
    assert_eq!(read(&root.join("models/a.bin")).unwrap(), pattern(0, big));
    assert_eq!(
        read(&root.join("p003/doc-00007.json")).unwrap(),
        b"{\"p\":3,\"i\":7}"
    );
    let gets = source_ops(&ports, "get");
    assert!(gets >= (big / (4 * MIB)) as u64);
    let b_root = b.path.join("datasets/web");
    let t1 = Instant::now();
    assert_eq!(read(&b_root.join("models/a.bin")).unwrap(), pattern(0, big));
    eprintln!(
        "first ls -R {:?}; B read {} MiB from the group in {:?}",
        first_ls,
        big / MIB,
        t1.elapsed()
    );
    assert_eq!(source_ops(&ports, "get"), gets, "second client: 0 GETs");
    // ls -R again, on both: 0 LISTs.
    assert_eq!(walk(&b_root).len(), listed.len());
    assert_eq!(walk(&root).len(), listed.len());
    assert_eq!(source_ops(&ports, "list"), lists, "second ls -R: 0 LISTs");
    // strata info names the object.
    let info = strata(&["info", root.join("models/a.bin").to_str().unwrap()]);
    assert!(
        info.contains("\"object\": \"s3://datasets/web/models/a.bin\""),
        "{info}"
    );
    // Read-only.
    let e = fs::write(root.join("models/new.bin"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // Overwritten and deleted outside: seen after --sync, new bytes only.
    let (objs, _) = writer.list_dir("web/models/").unwrap();
    let old_etag = objs
        .iter()
        .find(|o| o.key == "web/models/a.bin")
        .unwrap()
        .etag
        .clone();
    let new = pattern(99, big / 2 + 12345);
    writer
        .put("web/models/a.bin", Bytes::from(new.clone()))
        .unwrap();
    // The store refuses a read conditional on the old ETag: never old and new bytes mixed.
    let err = writer
        .get_range_if("web/models/a.bin", &old_etag, 0, 10, &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(err, strata::object::ObjectError::Changed(_)),
        "{err}"
    );
    writer.delete("web/p001/doc-00001.json").unwrap();
    let said = strata(&["attach", &meta, "--path", "/datasets/web", "--sync"]);
    assert!(said.contains("changed"), "{said}");
    std::thread::sleep(Duration::from_millis(1500)); // attribute and entry timeouts
    assert_eq!(read(&root.join("models/a.bin")).unwrap(), new);
    assert_eq!(read(&b_root.join("models/a.bin")).unwrap(), new);
    assert!(!root.join("p001/doc-00001.json").exists());

    // Warm b.bin, then stop the source: b.bin reads at cache speed, c.bin fails with EIO
    // within 30 s, listings keep serving.
    let out = Command::new(BIN)
        .arg("warmup")
        .arg(root.join("models/b.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(weed);
    let t2 = Instant::now();
    assert_eq!(read(&b_root.join("models/b.bin")).unwrap(), pattern(1, big));
    eprintln!(
        "warmed {} MiB read with the source down in {:?}",
        big / MIB,
        t2.elapsed()
    );
    let t3 = Instant::now();
    let e = read(&root.join("models/c.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t3.elapsed() < Duration::from_secs(30), "{:?}", t3.elapsed());
    assert!(
        a.log().contains("datasets") || a.log().contains("s3://datasets"),
        "the log names the path or the source"
    );
    assert_eq!(walk(&root).len(), listed.len() - 1);
    drop(b);
    drop(a);
}
