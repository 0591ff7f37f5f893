//! The file system on the S3 backend, against a real SeaweedFS server started by the test:
//! data written through a real mount, fsync'ed, survives a SIGKILL of the client; truncate
//! and O_TRUNC behave as on the local backend; objects really live in the bucket.

use std::fs;
use std::io::{Read, Write};

use strata::object::{ObjectStore, S3Store};
use strata::testing::mount::{self, TestMount};
use strata::testing::seaweedfs::SeaweedFs;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

#[test]
fn s3_volume_survives_kill9_and_truncates() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let bucket = format!("{}/strata-s3-mount", weed.endpoint());
    mount::format(
        BIN,
        &[
            "--storage",
            "s3",
            "--bucket",
            &bucket,
            "--access-key",
            weed.access_key(),
            "--secret-key",
            weed.secret_key(),
            "--block-size",
            "1024",
            &meta,
            "s3vol",
        ],
    );
    let mut m = TestMount::new(BIN, &meta, &dir.path().join("mnt"), &[]);

    // fsync'ed data survives SIGKILL of the client.
    let data = pattern(24 << 20, 1);
    {
        let mut f = fs::File::create(m.path.join("ckpt.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    m.kill9();
    m.remount();
    let mut got = Vec::new();
    fs::File::open(m.path.join("ckpt.bin"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(
        got == data,
        "fsync'ed data differs after SIGKILL ({} bytes read)",
        got.len()
    );

    // The objects are in the bucket, under the volume's prefix.
    let store = S3Store::new(weed.settings("strata-s3-mount")).unwrap();
    let objects = store.list("s3vol/chunks/", None, 1000).unwrap();
    assert!(
        objects.len() >= 24,
        "expected the data blocks in the bucket, found {}",
        objects.len()
    );

    // Shrink, grow, O_TRUNC rewrite.
    let p = m.path.join("ckpt.bin");
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1000).unwrap();
    f.set_len(3 << 20).unwrap();
    drop(f);
    let mut back = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 3 << 20);
    assert!(back[..1000] == data[..1000], "kept prefix differs");
    assert!(
        back[1000..].iter().all(|&b| b == 0),
        "bytes after a shrink+grow must read as zero"
    );
    let second = pattern(5 << 20, 2);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(&second).unwrap();
    drop(f);
    m.unmount();
    m.remount();
    let mut back = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == second, "O_TRUNC rewrite differs after remount");
}

#[test]
fn wrong_s3_credentials_are_reported_at_format() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let bucket = format!("{}/strata-badkeys", weed.endpoint());
    let out = std::process::Command::new(BIN)
        .args([
            "format",
            "--storage",
            "s3",
            "--bucket",
            &bucket,
            "--access-key",
            weed.access_key(),
        ])
        .args(["--secret-key", "not-the-secret", &meta, "badkeys"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("access denied") || err.contains("Denied") || err.contains("denied"),
        "{err}"
    );
    assert!(!err.contains("not-the-secret"), "secret leaked: {err}");
}
