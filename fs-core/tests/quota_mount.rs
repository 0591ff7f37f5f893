//! Directory quotas through real mounts: a quota directory fills up to its limit (plus at
//! most one block per writing file) and then refuses with EDQUOT, from one and from two
//! clients at once; `df` inside it shows the quota; deleting frees space at once; nested
//! quotas: the tightest wins; `quota check` agrees with the stored usage.

use std::fs;
use std::io::Write;
use std::process::Command;

use strata::testing::mount::{self, TestMount};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const MIB: u64 = 1 << 20;

fn strata(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Write 1 MiB chunks until the file system refuses; returns the bytes accepted and errno.
fn fill(path: &std::path::Path) -> (u64, i32) {
    let mut f = fs::File::create(path).unwrap();
    let buf = vec![7u8; MIB as usize];
    let mut n = 0;
    loop {
        match f.write_all(&buf) {
            Ok(()) => n += MIB,
            Err(e) => {
                // Refused for lack of room: the next write to the file is refused too (a
                // retried tail of a split write must not land past the dropped bytes).
                let again = f.write(&buf[..48]).map_err(|e| e.raw_os_error());
                assert_eq!(again, Err(e.raw_os_error()), "a write after the refusal");
                return (n, e.raw_os_error().unwrap_or(0));
            }
        }
        assert!(n < 1024 * MIB, "no quota error after 1 GiB");
    }
}

fn df_total(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: statvfs into a zeroed struct with a valid path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
        st.f_blocks * st.f_frsize
    }
}

#[test]
fn quota_directories_fill_up_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let data = dir.path().join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &meta, "quotas"]);
    let a = TestMount::new(BIN, &meta, &dir.path().join("a"), &[]);
    let b = TestMount::new(BIN, &meta, &dir.path().join("b"), &[]);
    fs::create_dir_all(a.path.join("tenants/t1/alice")).unwrap();
    strata(&[
        "quota",
        "set",
        &meta,
        "--path",
        "/tenants/t1",
        "--capacity",
        "100M",
    ]);
    strata(&[
        "quota",
        "set",
        &meta,
        "--path",
        "/tenants/t1/alice",
        "--capacity",
        "30M",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(2500)); // mounts see new quotas within 2 s

    // df inside the quota directory shows its size.
    assert_eq!(df_total(&a.path.join("tenants/t1")), 100 * MIB);
    assert_eq!(df_total(&b.path.join("tenants/t1/alice")), 30 * MIB);

    // Nested: the tighter inner quota stops the writer.
    let (n, errno) = fill(&a.path.join("tenants/t1/alice/big"));
    assert_eq!(errno, libc::EDQUOT);
    // Writes are acknowledged while buffered: at most one block (4 MiB) past the limit is
    // acknowledged before EDQUOT, and never stored.
    assert!(
        (26 * MIB..=34 * MIB).contains(&n),
        "accepted {} MiB under a 30 MiB quota",
        n / MIB
    );
    let kept = fs::metadata(a.path.join("tenants/t1/alice/big"))
        .unwrap()
        .len();
    assert!(kept <= 30 * MIB, "stored {} bytes past the quota", kept);

    // Two clients writing at once into the outer quota: together they stop at the limit.
    let t = std::thread::spawn({
        let p = b.path.join("tenants/t1/from-b");
        move || fill(&p)
    });
    let (na, ea) = fill(&a.path.join("tenants/t1/from-a"));
    let (nb, eb) = t.join().unwrap();
    assert_eq!((ea, eb), (libc::EDQUOT, libc::EDQUOT));
    let used: u64 = ["alice/big", "from-a", "from-b"]
        .iter()
        .map(|f| {
            fs::metadata(a.path.join("tenants/t1").join(f))
                .unwrap()
                .len()
        })
        .sum();
    assert!(
        used <= 100 * MIB,
        "stored {} MiB in a 100 MiB quota",
        used / MIB
    );
    assert!(
        na + nb + kept >= 80 * MIB,
        "quota refused too early: {} MiB",
        (na + nb + kept) / MIB
    );

    // Deleting frees the quota at once, for the other client too.
    fs::remove_file(a.path.join("tenants/t1/from-a")).unwrap();
    let mut f = fs::File::create(b.path.join("tenants/t1/after")).unwrap();
    f.write_all(&vec![1u8; 4 * MIB as usize]).unwrap();
    f.sync_all().unwrap();
    drop((a, b));
    let out = strata(&["quota", "check", &meta, "--path", "/tenants/t1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split(": ").nth(1),
        lines[1].split(": ").nth(1),
        "{out}"
    );
}
