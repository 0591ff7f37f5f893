//! `strata gc` through the CLI on a real mount: 20 writers killed mid-write (SIGKILL of their
//! client) leave block objects no metadata refers to; gc counts exactly those (counted here
//! independently, from the SQLite tables and the store's directory), deletes them with
//! `--delete`, and fsck is clean after. With a writer committing while gc deletes, nothing it
//! wrote is lost.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata::testing::mount::{self, TestMount};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const MIB: usize = 1 << 20;

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

fn gc(meta: &str, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["gc", meta])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata gc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The number in `text` right before `word` (e.g. "12 orphans").
fn count_before(text: &str, word: &str) -> u64 {
    let i = text
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} not in {text}"));
    text[..i]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {text}"))
}

/// Block objects in the store's directory, by slice id.
fn stored_ids(data: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![data.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.components().any(|c| c.as_os_str() == "chunks") {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                if let Some(id) = name.split('_').next().and_then(|s| s.parse().ok()) {
                    out.push((id, p));
                }
            }
        }
    }
    out
}

/// Slice ids the metadata refers to or has queued as garbage, read straight from SQLite.
fn known_ids(db: &Path) -> HashSet<u64> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut ids = HashSet::new();
    for sql in [
        "SELECT id FROM slice WHERE id <> 0",
        "SELECT id FROM garbage",
    ] {
        let mut st = c.prepare(sql).unwrap();
        let rows = st.query_map([], |r| r.get::<_, i64>(0)).unwrap();
        ids.extend(rows.map(|r| r.unwrap() as u64));
    }
    ids
}

#[test]
fn gc_finds_exactly_the_objects_of_killed_writers_and_never_a_committed_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let meta = format!("sqlite://{}", db.display());
    let data = dir.path().join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &meta, "gcvol"]);
    let opts = ["--cache-size", "0"];
    let mut a = TestMount::new(BIN, &meta, &dir.path().join("a"), &opts);
    for i in 0..5u32 {
        let mut f = fs::File::create(a.path.join(format!("kept{i}"))).unwrap();
        f.write_all(&pattern(i, 9 * MIB)).unwrap();
        f.sync_all().unwrap();
    }

    // 20 writers on another client, killed while their files are open and half written:
    // their full blocks are uploaded, nothing is committed.
    let mut b = TestMount::new(BIN, &meta, &dir.path().join("b"), &opts);
    let started = Arc::new(std::sync::Barrier::new(21));
    let writers: Vec<_> = (0..20u32)
        .map(|i| {
            let p = b.path.join(format!("killed{i}"));
            let started = started.clone();
            std::thread::spawn(move || {
                let mut f = fs::File::create(&p).unwrap();
                let _ = f.write_all(&pattern(100 + i, 9 * MIB));
                started.wait();
                // Keep the file open (no close, no commit) until the client dies.
                std::thread::sleep(Duration::from_secs(3));
                let _ = f.write_all(b"after");
            })
        })
        .collect();
    started.wait();
    std::thread::sleep(Duration::from_millis(500)); // the last uploads land
    b.kill9();
    for w in writers {
        let _ = w.join();
    }

    // Counted independently: objects in the directory whose slice the tables do not know.
    let known = known_ids(&db);
    let orphans: Vec<PathBuf> = stored_ids(&data)
        .into_iter()
        .filter(|(id, _)| !known.contains(id))
        .map(|(_, p)| p)
        .collect();
    assert!(
        orphans.len() >= 20,
        "each killed writer left full blocks: {}",
        orphans.len()
    );

    // Default min age: all too young to touch.
    let out = gc(&meta, &[]);
    assert_eq!(count_before(&out, "orphans"), 0, "{out}");
    assert_eq!(count_before(&out, "younger"), orphans.len() as u64, "{out}");
    // Dry run: exactly those; nothing deleted.
    let out = gc(&meta, &["--min-age", "0"]);
    assert_eq!(count_before(&out, "orphans"), orphans.len() as u64, "{out}");
    assert!(out.contains("--delete"), "{out}");
    assert!(orphans.iter().all(|p| p.exists()));
    let out = gc(&meta, &["--min-age", "0", "--delete"]);
    assert_eq!(count_before(&out, "deleted"), orphans.len() as u64, "{out}");
    assert!(orphans.iter().all(|p| !p.exists()));
    let out = gc(&meta, &["--min-age", "0"]);
    assert_eq!(count_before(&out, "orphans"), 0, "{out}");
    // A min age that is not a duration is refused, naming the flag and an example.
    let bad = Command::new(BIN)
        .args(["gc", &meta, "--min-age", "soon"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(
        err.contains("--min-age \"soon\" is not a duration") && err.contains("10m"),
        "{err}"
    );
    let fsck = Command::new(BIN).args(["fsck", &meta]).output().unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    for i in 0..5u32 {
        assert_eq!(
            fs::read(a.path.join(format!("kept{i}"))).unwrap(),
            pattern(i, 9 * MIB)
        );
    }

    // A writer commits while gc deletes (with a min age longer than a commit takes): every
    // file it finished reads back whole.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, root) = (stop.clone(), a.path.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut f = fs::File::create(root.join(format!("live{n}"))).unwrap();
                f.write_all(&pattern(1000 + n, 5 * MIB)).unwrap();
                f.sync_all().unwrap();
                n += 1;
            }
            n
        })
    };
    for _ in 0..3 {
        gc(&meta, &["--min-age", "20s", "--delete"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 0);
    a.unmount();
    a.remount();
    for i in 0..n {
        assert_eq!(
            fs::read(a.path.join(format!("live{i}"))).unwrap(),
            pattern(1000 + i, 5 * MIB),
            "live{i}"
        );
    }
    let fsck = Command::new(BIN).args(["fsck", &meta]).output().unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
