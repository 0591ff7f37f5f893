//! `strata stats` on a real mount: while a writer and a reader work, its lines show FUSE
//! operations, bytes written and read, and object PUTs; outside a mount it says so.

use std::fs;
use std::io::Write;
use std::process::Command;

use strata::testing::mount::{self, TestMount};

const BIN: &str = env!("CARGO_BIN_EXE_strata");

#[test]
fn stats_shows_what_a_mount_is_doing() {
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let data = dir.path().join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &meta, "statvol"]);
    let m = TestMount::new(BIN, &meta, &dir.path().join("mnt"), &["--cache-size", "0"]);
    let stats = Command::new(BIN)
        .args(["stats", "--interval", "0.5", "--count", "6"])
        .arg(&m.path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let root = m.path.clone();
    let work = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let mut i = 0;
        while t0.elapsed().as_secs_f64() < 3.0 {
            let p = root.join(format!("f{i}"));
            let mut f = fs::File::create(&p).unwrap();
            f.write_all(&vec![i as u8; 8 << 20]).unwrap();
            f.sync_all().unwrap();
            drop(f);
            assert_eq!(fs::read(&p).unwrap().len(), 8 << 20);
            i += 1;
        }
    });
    let out = stats.wait_with_output().unwrap();
    work.join().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(
        lines[0].contains("fuse/s") && lines[0].contains("write/s"),
        "{text}"
    );
    // Columns: time | fuse/s lat | read/s write/s | GET/s PUT/s down/s up/s | …
    let busy = lines[1..].iter().any(|l| {
        let c: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| {
            c[i].trim_end_matches(['M', 'G'])
                .parse::<f64>()
                .unwrap_or(0.0)
        };
        n(2) > 0.0 && n(6) > 0.0 && n(10) > 0.0
    });
    assert!(busy, "no line shows operations, writes and PUTs:\n{text}");
    let out = Command::new(BIN)
        .args(["stats", "--count", "1"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a strata mount"));
}
