//! The access log (`.accesslog` in the mount root) and `strata profile` on a real mount:
//! operations of a known user name their paths, sizes and caller; two readers each get every
//! line; a reader that does not read loses lines (marked) and never holds up the writers;
//! `strata profile` shows a live workload's paths and sums a saved log.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use strata::accesslog;
use strata::profile::{Line, parse_line};
use strata::testing::mount::{self, TestMount};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const UID: u32 = 4242;
const GID: u32 = 4343;

fn mount_volume(dir: &Path, name: &str) -> TestMount {
    let meta = format!("sqlite://{}/meta.db", dir.display());
    let data = dir.join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &meta, name]);
    TestMount::new(BIN, &meta, &dir.join("mnt"), &["--cache-size", "0"])
}

/// Read lines of an open access log on a thread of its own, until a line names `until`.
fn collect(mut log: fs::File, until: &str) -> mpsc::Receiver<Vec<String>> {
    let (tx, rx) = mpsc::channel();
    let until = format!("path={until} ");
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut r = BufReader::with_capacity(1 << 20, &mut log);
        let mut l = String::new();
        while r.read_line(&mut l).unwrap_or(0) > 0 {
            let done = l.contains(&until);
            lines.push(std::mem::take(&mut l));
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    rx
}

/// Operations of the parsed lines as (op, path, to, bytes, uid, gid, args).
fn entries(lines: &[String]) -> Vec<strata::profile::Entry> {
    lines
        .iter()
        .filter_map(|l| match parse_line(l).unwrap() {
            Line::Op(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn run_as_user(script: &str, dir: &Path) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .uid(UID)
        .gid(GID)
        .status()
        .unwrap();
    assert!(st.success(), "{script}");
}

fn mark(root: &Path, name: &str) {
    // A lookup that fails: the last line a collector waits for.
    assert!(fs::metadata(root.join(name)).is_err());
}

/// The lines a collector got up to the lookup of `/name` (repeated until it arrives: a
/// reader behind by a full buffer may lose the first).
fn finish(rx: &mpsc::Receiver<Vec<String>>, root: &Path, name: &str) -> Vec<String> {
    for _ in 0..600 {
        mark(root, name);
        if let Ok(lines) = rx.recv_timeout(Duration::from_millis(200)) {
            return lines;
        }
    }
    panic!("the access log never showed the lookup of /{name}");
}

#[test]
fn the_log_names_paths_callers_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let m = mount_volume(dir.path(), "logvol");
    let root = m.path.clone();
    let log_path = root.join(".accesslog");

    // A virtual file: not listed, its own inode number, read-only, no removal.
    let st = fs::metadata(&log_path).unwrap();
    assert_eq!(st.ino(), accesslog::INO);
    assert_eq!(st.mode() & 0o777, 0o400);
    assert!(fs::read_dir(&root).unwrap().next().is_none());
    assert!(fs::remove_file(&log_path).is_err());
    assert!(fs::OpenOptions::new().write(true).open(&log_path).is_err());
    assert!(fs::File::create(root.join("x")).is_ok());
    assert!(fs::rename(root.join("x"), &log_path).is_err());
    fs::remove_file(root.join("x")).unwrap();

    let a = collect(fs::File::open(&log_path).unwrap(), "/END1");
    let b = collect(fs::File::open(&log_path).unwrap(), "/END1");
    fs::create_dir(root.join("u")).unwrap();
    fs::set_permissions(
        root.join("u"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    run_as_user(
        "head -c 300000 /dev/zero > u/data.bin && cat u/data.bin > /dev/null && \
         mv u/data.bin 'u/new name.bin' && rm 'u/new name.bin'",
        &root,
    );
    let la = finish(&a, &root, "END1");
    let lb = finish(&b, &root, "END1");
    let ea = entries(&la);
    let eb = entries(&lb);
    let text = la.concat();
    // Both readers saw the same operations.
    let key = |e: &strata::profile::Entry| (e.op.clone(), e.path.clone(), e.bytes, e.at.clone());
    assert_eq!(
        ea.iter().map(key).collect::<Vec<_>>(),
        eb.iter().map(key).collect::<Vec<_>>()
    );
    assert!(
        !text.contains(".accesslog"),
        "the log logged itself:\n{text}"
    );

    let of = |op: &str, path: &str| -> Vec<&strata::profile::Entry> {
        ea.iter().filter(|e| e.op == op && e.path == path).collect()
    };
    let create = of("create", "/u/data.bin");
    assert_eq!(create.len(), 1, "{text}");
    assert_eq!((create[0].uid, create[0].gid), (UID, GID), "{text}");
    assert!(create[0].pid > 0);
    assert_eq!(create[0].result, "OK");
    let writes = of("write", "/u/data.bin");
    assert!(!writes.is_empty(), "{text}");
    assert_eq!(
        writes.iter().map(|e| e.bytes).sum::<u64>(),
        300_000,
        "{text}"
    );
    for w in &writes {
        assert_eq!((w.uid, w.gid), (UID, GID));
        let arg = |k: &str| w.args.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(arg("size"), Some(w.bytes.to_string()), "{text}");
        assert!(arg("off").is_some());
        assert!(w.secs >= 0.0 && w.secs < 60.0);
    }
    let reads = of("read", "/u/data.bin");
    assert_eq!(
        reads.iter().map(|e| e.bytes).sum::<u64>(),
        300_000,
        "{text}"
    );
    let rename = of("rename", "/u/data.bin");
    assert_eq!(rename.len(), 1, "{text}");
    assert_eq!(rename[0].to.as_deref(), Some("/u/new name.bin"));
    assert!(text.contains("to=/u/new\\x20name.bin"), "{text}");
    let unlink = of("unlink", "/u/new name.bin");
    assert_eq!((unlink.len(), unlink[0].uid), (1, UID), "{text}");
    let end = of("lookup", "/END1");
    assert_eq!(end[0].result, "ENOENT");
    assert_eq!(end[0].uid, 0);

    // A reader that does not read: its lines beyond the buffer are dropped and marked, and
    // the writer is never held up.
    let slow = fs::File::open(&log_path).unwrap();
    let fast = collect(fs::File::open(&log_path).unwrap(), "/END2");
    let writes = 60_000u64;
    let (tx, rx) = mpsc::channel();
    let p = root.join("small-writes");
    std::thread::spawn(move || {
        let mut f = fs::File::create(&p).unwrap();
        for _ in 0..writes {
            f.write_all(b"x").unwrap();
        }
        drop(f);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(300))
        .expect("writes stalled while a reader of the access log did not read");
    let count = |got: &[String]| {
        let dropped: u64 = got
            .iter()
            .filter_map(|l| match parse_line(l).unwrap() {
                Line::Dropped(n) => Some(n),
                _ => None,
            })
            .sum();
        let kept = entries(got)
            .iter()
            .filter(|e| e.op == "write" && e.path == "/small-writes")
            .count() as u64;
        (kept, dropped)
    };
    // The reader that reads gets every line, or counts what it lost.
    let (kept, dropped) = count(&finish(&fast, &root, "END2"));
    assert!(
        kept <= writes && kept + dropped >= writes,
        "{kept} + {dropped}"
    );
    let got = finish(&collect(slow, "/END3"), &root, "END3");
    let (kept, dropped) = count(&got);
    assert!(dropped > 0, "nothing dropped");
    assert!(kept < writes, "{kept}");
    assert!(kept + dropped >= writes, "{kept} + {dropped}");
    assert!(
        got.iter().map(|l| l.len()).sum::<usize>() <= accesslog::READER_BUFFER + 4096,
        "more than the buffer was kept"
    );
}

fn profile(args: &[&str], path: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("profile")
        .args(args)
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn profile_shows_a_live_workload_and_replays_a_saved_log() {
    let dir = tempfile::tempdir().unwrap();
    let m = mount_volume(dir.path(), "profvol");
    let root = m.path.clone();
    fs::create_dir(root.join("work")).unwrap();
    fs::set_permissions(
        root.join("work"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let saved = collect(fs::File::open(root.join(".accesslog")).unwrap(), "/END");

    // Live, given a directory inside the mount.
    let live = Command::new(BIN)
        .args(["profile", "--interval", "3s", "--count", "1", "--top", "5"])
        .arg(root.join("work"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A second reader at the same time, keeping one file named through the mount point.
    let one = Command::new(BIN)
        .args([
            "profile",
            "--interval",
            "3s",
            "--count",
            "1",
            "--filter-path",
        ])
        .arg(root.join("work/hot.bin"))
        .arg(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    run_as_user(
        "i=0; while [ $i -lt 20 ]; do head -c 100000 /dev/zero > work/hot.bin; \
         cat work/hot.bin > /dev/null; head -c 4096 /dev/zero > work/f$i; i=$((i+1)); done",
        &root,
    );
    let lines = finish(&saved, &root, "END");
    let out = live.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("--- "), "{text}");
    assert!(text.contains("\n/work/hot.bin "), "{text}");
    assert!(text.contains("PATH (by bytes)"), "{text}");
    assert!(text.contains(&format!("\n{UID} ")), "{text}");
    assert!(text.contains("SLOWEST OPERATIONS"), "{text}");
    let op_rows = text.split("OPERATION").nth(1).unwrap();
    let writes: u64 = op_rows
        .lines()
        .find(|l| l.starts_with("write "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(writes >= 10, "{text}");
    let out = one.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\n/work/hot.bin "), "{text}");
    assert!(!text.contains("/work/f"), "{text}");

    // Replay of the saved log: every write of the workload, 20 × 100000 + 20 × 4096 bytes.
    let file = dir.path().join("saved.log");
    fs::write(&file, lines.concat()).unwrap();
    let out = profile(
        &["--sort", "bytes", "--filter-uid", &UID.to_string()],
        &file,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let write_bytes = entries(&lines)
        .iter()
        .filter(|e| e.op == "write" && e.uid == UID)
        .map(|e| e.bytes)
        .sum::<u64>();
    assert_eq!(write_bytes, 20 * 100_000 + 20 * 4096);
    let path_rows = text.split("\nPATH ").nth(1).unwrap();
    assert!(
        path_rows
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("/work/hot.bin "),
        "{text}"
    );
    assert!(text.contains("sorted by bytes"), "{text}");
    assert!(
        text.contains(" in "),
        "replay knows the span of the log: {text}"
    );
    // A filter by path: that file only (not another whose name it begins).
    let out = profile(&["--filter-path", "/work/f1"], &file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\n/work/f1 "), "{text}");
    assert!(!text.contains("/work/hot.bin"), "{text}");
    assert!(!text.contains("/work/f10"), "{text}");

    // Bad input says what to give instead.
    let out = profile(&["--count", "1"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a strata mount"));
    let out = profile(&["--sort", "speed"], &file);
    assert!(String::from_utf8_lossy(&out.stderr).contains("use ops, bytes, time or latency"));
    let out = profile(&["--interval", "0"], &root);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--interval"));
}
