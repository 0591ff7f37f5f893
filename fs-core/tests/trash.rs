//! Admin tools of issue #18 through their real entry points: the trash (`--trash-days`,
//! `strata restore`, expiry), `strata rmr` and `strata destroy`.

use std::fs;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata::meta::{Ctx, MetaSettings, ROOT_INO};
use strata::object::{MemStore, ObjectStore};
use strata::testing::mount::{self, TestMount};
use strata::vfs::VfsSettings;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

fn strata(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().expect("run strata");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(args: &[&str]) -> String {
    let (good, text) = strata(args);
    assert!(good, "strata {args:?}: {text}");
    text
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn objects(dir: &std::path::Path) -> usize {
    walk(dir)
}

fn walk(d: &std::path::Path) -> usize {
    let Ok(rd) = fs::read_dir(d) else { return 0 };
    rd.flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn a_deleted_file_is_restored_byte_exact_from_the_trash() {
    let mib: usize = std::env::var("STRATA_TRASH_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let objs = dir.path().join("objects");
    mount::format(
        BIN,
        &[
            "--storage",
            "file",
            "--bucket",
            objs.to_str().unwrap(),
            "--trash-days",
            "3",
            &meta,
            "trashvol",
        ],
    );
    let m = TestMount::new(BIN, &meta, &dir.path().join("mnt"), &["--cache-size", "0"]);
    fs::create_dir(m.path.join("ckpt")).unwrap();
    let data = pattern(mib << 20, 7);
    {
        let mut f = fs::File::create(m.path.join("ckpt/model.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let before = objects(&objs);
    fs::remove_file(m.path.join("ckpt/model.bin")).unwrap();
    assert!(!m.path.join("ckpt/model.bin").exists());
    // The listing shows it; its objects are still there.
    let list = ok(&["restore", &meta]);
    assert!(
        list.contains("model.bin") && list.contains(&format!("{}", mib << 20)),
        "{list}"
    );
    assert!(list.contains("1 files in the trash; kept 3 days"), "{list}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(objects(&objs), before, "trashed data must not be reclaimed");
    let (good, text) = strata(&["restore", &meta, "nothing-like-it*"]);
    assert!(
        !good && text.contains("nothing in the trash matches"),
        "{text}"
    );
    let out = ok(&["restore", &meta, "model.*"]);
    assert!(out.contains("restored 1 files, 0 not restored"), "{out}");
    std::thread::sleep(Duration::from_millis(1500)); // the kernel's entry cache
    let mut got = Vec::with_capacity(data.len());
    fs::File::open(m.path.join("ckpt/model.bin"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data, "restored bytes differ");
    let fsck = ok(&["fsck", &meta]);
    assert!(fsck.contains(" 0 problems"), "{fsck}");

    // rmr: the tree goes on the metadata side; its files land in the trash.
    for d in 0..3 {
        let p = m.path.join(format!("tree/d{d}"));
        fs::create_dir_all(&p).unwrap();
        for f in 0..50 {
            fs::write(p.join(format!("f{f}")), b"x").unwrap();
        }
    }
    let (good, text) = strata(&["rmr", &meta, "/no/such"]);
    assert!(!good && text.contains("does not exist"), "{text}");
    let out = ok(&["rmr", &meta, "/tree"]);
    assert!(out.contains("150 files, 4 directories"), "{out}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!m.path.join("tree").exists());
    assert!(ok(&["restore", &meta]).contains("150 files in the trash"));
    let fsck = ok(&["fsck", &meta]);
    assert!(fsck.contains(" 0 problems"), "{fsck}");

    // destroy: refused with the wrong UUID or while mounted; then everything goes.
    let status: serde_json::Value = serde_json::from_str(&ok(&["status", &meta])).unwrap();
    let uuid = status["setting"]["uuid"].as_str().unwrap().to_string();
    let (good, text) = strata(&["destroy", &meta, "0000", "--yes"]);
    assert!(!good && text.contains("is not the UUID"), "{text}");
    let (good, text) = strata(&["destroy", &meta, &uuid, "--yes"]);
    assert!(!good && text.contains("connected clients"), "{text}");
    drop(m);
    let out = ok(&["destroy", &meta, &uuid, "--yes"]);
    assert!(out.contains("destroyed"), "{out}");
    assert_eq!(objects(&objs), 0);
    let (good, text) = strata(&["status", &meta]);
    assert!(!good && text.contains("not formatted"), "{text}");
}

#[test]
fn after_the_trash_days_the_file_and_its_objects_are_gone() {
    let store = Arc::new(MemStore::new());
    let vfs = strata::testing::mem_vfs(
        store.clone(),
        1 << 20,
        MetaSettings {
            gc_grace_secs: 0,
            ..MetaSettings::default()
        },
        VfsSettings::default(),
    );
    let meta = vfs.meta.clone();
    meta.update_format(|f| f.trash_days = 2).unwrap();
    let (node, fh) = vfs.create(Ctx::ROOT, ROOT_INO, b"big", 0o644).unwrap();
    vfs.write(node.ino, 0, &pattern(5 << 20, 1)).unwrap();
    vfs.fsync(node.ino).unwrap();
    vfs.release(node.ino, fh, None).unwrap();
    let count = |s: &MemStore| s.list("test/", None, 10_000).unwrap().len();
    let stored = count(&store);
    assert!(stored >= 5, "{stored}");
    vfs.unlink(ROOT_INO, b"big").unwrap();
    vfs.clean_once().unwrap();
    assert_eq!(count(&store), stored, "in the trash: nothing collected");
    // The clock says one day later: still kept; three days later: gone and collected.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(
        meta.trash_empty_before(now + 86_400 - 2 * 86_400).unwrap(),
        0
    );
    assert_eq!(
        meta.trash_empty_before(now + 3 * 86_400 - 2 * 86_400 + 1)
            .unwrap(),
        1
    );
    assert!(meta.trash_list().unwrap().is_empty());
    vfs.clean_once().unwrap();
    assert_eq!(
        count(&store),
        0,
        "objects of the expired file are collected"
    );
    store
        .put("test/unrelated", Bytes::from_static(b"x"))
        .unwrap();
    assert!(meta.fsck(false).unwrap().clean());
}

#[test]
fn format_refuses_a_bucket_url_without_storage_s3() {
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let (good, text) = strata(&[
        "format",
        "--bucket",
        "http://127.0.0.1:1/b",
        &meta,
        "urlvol",
    ]);
    assert!(!good && text.contains("add --storage s3"), "{text}");
    // Nothing was created: neither a volume nor a directory named `http:`.
    assert!(!std::path::Path::new("http:").exists());
    let (good, text) = strata(&["status", &meta]);
    assert!(!good && text.contains("not formatted"), "{text}");
}
