//! `strata stats` on a real mount: while a writer and a reader work, its lines show FUSE
//! operations, bytes written and read, object PUTs and their latency, and (`--by-op`) the
//! operations by kind; outside a mount it says so.

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
        .args(["stats", "--interval", "0.5", "--count", "6", "--by-op"])
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
    // The header, then a line of rates and a line of operations per interval.
    assert_eq!(lines.len(), 13, "{text}");
    assert!(
        lines[0].contains("fuse/s") && lines[0].contains("write/s"),
        "{text}"
    );
    // Columns by name (the two-word ones joined: "lat ms" → "lat-ms").
    let names: Vec<String> = lines[0]
        .replace(" ms", "-ms")
        .split_whitespace()
        .filter(|c| *c != "|")
        .map(String::from)
        .collect();
    let col = |l: &str, name: &str| -> f64 {
        let vals: Vec<&str> = l.split_whitespace().filter(|c| *c != "|").collect();
        let i = names.iter().position(|n| n == name).unwrap();
        vals[i].trim_end_matches(['M', 'G']).parse().unwrap_or(0.0)
    };
    let rates: Vec<&str> = lines[1..].iter().step_by(2).copied().collect();
    let ops: Vec<&str> = lines[2..].iter().step_by(2).copied().collect();
    let busy = rates.iter().any(|l| {
        col(l, "fuse/s") > 0.0
            && col(l, "write/s") > 0.0
            && col(l, "PUT/s") > 0.0
            && col(l, "PUT-ms") > 0.0
            && col(l, "up/s") > 0.0
    });
    assert!(busy, "no line shows operations, writes and PUTs:\n{text}");
    assert!(ops.iter().all(|l| l.starts_with("  ops: ")), "{text}");
    assert!(
        ops.iter()
            .any(|l| l.contains(" write ") && l.contains("/s ") && l.contains("ms")),
        "no line shows writes by kind:\n{text}"
    );
    let out = Command::new(BIN)
        .args(["stats", "--count", "1"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a strata mount"));
}
