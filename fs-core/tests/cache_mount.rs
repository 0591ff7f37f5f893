//! The block cache through real mounts: one fetch per block however many readers (one mount
//! and a cache group of three), a second mount of the group reads with no object-store GET,
//! a member killed mid-read does not fail its peers' reads, the disk cache survives a remount,
//! and `strata warmup` fills the cache.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strata::testing::mount::{self, TestMount};
use strata::testing::{free_port, metric};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const MIB: usize = 1 << 20;

/// Size of the test files: 64 MiB (16 blocks of 4 MiB), or `STRATA_CACHE_TEST_MIB` (a multiple
/// of 4; e.g. 1024 to check the 1 GiB acceptance figures by hand).
fn file_size() -> usize {
    std::env::var("STRATA_CACHE_TEST_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|m| *m >= 4 && m % 4 == 0)
        .unwrap_or(64)
        * MIB
}

/// The number of block objects `path` is stored in, from `strata info` (the writer may have
/// committed a file in more than one slice, e.g. a timed flush under load, so this can be
/// more than `file_size() / block size`).
fn objects(path: &Path) -> u64 {
    let out = Command::new(BIN).arg("info").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "strata info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v["objects"].as_u64().expect("objects in strata info");
    assert!(n >= (file_size() / (4 * MIB)) as u64, "{v}");
    n
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

fn gets(port: u16) -> u64 {
    metric(port, "strata_object_requests_total{op=\"get\"}")
}

struct Vol {
    dir: tempfile::TempDir,
    meta: String,
}

/// A formatted volume with files written through a mount that caches nothing, so every
/// reader below starts cold.
fn volume(files: &[(&str, u8)]) -> Vol {
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let data = dir.path().join("data");
    mount::format(
        BIN,
        &["--bucket", data.to_str().unwrap(), &meta, "cachevol"],
    );
    let w = TestMount::new(
        BIN,
        &meta,
        &dir.path().join("writer"),
        &["--cache-size", "0", "--mem-cache-size", "0"],
    );
    for (name, seed) in files {
        fs::write(w.path.join(name), pattern(*seed, file_size())).unwrap();
    }
    drop(w);
    Vol { dir, meta }
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    let mut out = Vec::with_capacity(file_size());
    let mut buf = vec![0u8; MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// `readers` threads reading whole files at once; each checks the content.
fn read_concurrently(paths: Vec<PathBuf>, seed: u8) {
    let want = std::sync::Arc::new(pattern(seed, file_size()));
    let threads: Vec<_> = paths
        .into_iter()
        .map(|p| {
            let want = want.clone();
            std::thread::spawn(move || {
                let got = read_all(&p);
                assert!(got == *want, "{} read back different bytes", p.display());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn member(v: &Vol, name: &str, port: u16, extra: &[&str]) -> TestMount {
    let cache = v.dir.path().join(format!("{name}-cache"));
    // The cache directories share the host's file system, which may be more than 90% full
    // (the default --free-space-ratio 0.1 would then rightly refuse to cache anything): the
    // counts below are about the cache, not the host's disk. A full cache disk has its own
    // test, on a file system of its own.
    let mut args = vec![
        "--cache-dir".to_string(),
        cache.display().to_string(),
        "--free-space-ratio".to_string(),
        "0".to_string(),
        "--metrics".to_string(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestMount::new(BIN, &v.meta, &v.dir.path().join(name), &args)
}

#[test]
fn eight_readers_of_a_cold_file_fetch_each_block_once() {
    let v = volume(&[("model.bin", 1)]);
    let port = free_port();
    let m = member(&v, "m", port, &[]);
    // The mount itself checks the store once (the volume's marker object).
    let blocks = objects(&m.path.join("model.bin"));
    let base = gets(port);
    read_concurrently(vec![m.path.join("model.bin"); 8], 1);
    assert_eq!(gets(port) - base, blocks, "one GET per block");
    assert!(metric(port, "strata_cache_misses_total") >= blocks);
}

#[test]
fn remount_keeps_the_disk_cache_and_warmup_fills_it() {
    let v = volume(&[("a.bin", 2), ("b.bin", 3)]);
    let port = free_port();
    let mut m = member(&v, "m", port, &[]);
    let (a_blocks, b_blocks) = (
        objects(&m.path.join("a.bin")),
        objects(&m.path.join("b.bin")),
    );
    let base = gets(port);
    // Warm one file with the CLI, read the other cold.
    let out = Command::new(BIN)
        .args(["warmup", "--threads", "4"])
        .arg(m.path.join("a.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("1 files"), "{summary}");
    assert!(summary.contains("0% already cached"), "{summary}");
    assert_eq!(
        gets(port) - base,
        a_blocks,
        "warmup fetched each block once"
    );
    assert_eq!(read_all(&m.path.join("a.bin")), pattern(2, file_size()));
    assert_eq!(
        gets(port) - base,
        a_blocks,
        "reading a warmed file needs no GET"
    );
    // Warming again: all cached already.
    let out = Command::new(BIN)
        .args(["warmup", "-q"])
        .arg(&m.path)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("2 files"), "{summary}");
    assert!(summary.contains("50% already cached"), "{summary}");
    // Remount: memory is gone, the disk cache is not.
    m.unmount();
    m.remount();
    let base = gets(port);
    assert_eq!(read_all(&m.path.join("b.bin")), pattern(3, file_size()));
    assert_eq!(read_all(&m.path.join("a.bin")), pattern(2, file_size()));
    assert_eq!(
        gets(port) - base,
        0,
        "warm read right after remount: no GET"
    );
    assert!(metric(port, "strata_cache_hits_total{tier=\"disk\"}") >= a_blocks + b_blocks);
    // Outside a mount, warmup says what to do.
    let out = Command::new(BIN).args(["warmup", "/tmp"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a Strata mount"));
}

/// A tmpfs of `mib` MiB mounted on `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: PathBuf, mib: u64) -> Tmpfs {
        fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root, as FUSE tests do"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_cache_disk_below_its_free_ratio_is_not_filled_and_warmup_says_so() {
    let v = volume(&[("c.bin", 7)]);
    // A file system of twice the file's size, 94% full of something else: below the default
    // --free-space-ratio of 10%.
    let size = 2 * file_size() / MIB;
    let disk = Tmpfs::new(v.dir.path().join("small-disk"), size as u64);
    let other = disk.0.join("someone-elses.dat");
    fs::write(&other, vec![1u8; size * 94 / 100 * MIB]).unwrap();
    let port = free_port();
    let cache = disk.0.join("cache");
    let args = [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--mem-cache-size",
        "0",
        "--metrics",
        &format!("127.0.0.1:{port}"),
    ];
    let m = TestMount::new(BIN, &v.meta, &v.dir.path().join("m"), &args);
    let blocks = objects(&m.path.join("c.bin"));
    let out = Command::new(BIN)
        .args(["warmup", "-q"])
        .arg(m.path.join("c.bin"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 files"), "{stdout}");
    assert!(
        stderr.contains("not kept in the disk cache") && stderr.contains("--free-space-ratio"),
        "warmup tells the user: {stderr}"
    );
    assert_eq!(
        metric(
            port,
            "strata_cache_skipped_blocks_total{reason=\"low_space\"}"
        ),
        blocks
    );
    assert!(other.exists(), "the cache never touches other files");
    let log = m.log();
    assert!(
        log.contains("below its free-space ratio") && log.contains(cache.to_str().unwrap()),
        "the mount's log names the directory: {log}"
    );
    // Reads are served all the same.
    assert_eq!(read_all(&m.path.join("c.bin")), pattern(7, file_size()));
    // Space freed: the next warm-up keeps what it fetches (the free space is re-checked
    // at most once a second).
    fs::remove_file(&other).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let out = Command::new(BIN)
        .args(["warmup", "-q"])
        .arg(m.path.join("c.bin"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    drop(m);
}

#[test]
fn a_cache_group_shares_blocks_and_survives_a_dead_member() {
    let v = volume(&[("f1.bin", 4), ("f2.bin", 5), ("f3.bin", 6)]);
    let group = ["--cache-group", "g1", "--cache-group-addr", "127.0.0.1:0"];
    let ports = [free_port(), free_port(), free_port()];
    let mut a = member(&v, "a", ports[0], &group);
    let b = member(&v, "b", ports[1], &group);
    let c = member(&v, "c", ports[2], &group);
    // A pure client: reads through the group, owns and serves nothing.
    let d_port = free_port();
    let d = member(&v, "d", d_port, &["--cache-group", "g1", "--no-serve"]);
    // Membership is re-read every 2 s.
    std::thread::sleep(Duration::from_secs(4));
    let f1_blocks = objects(&a.path.join("f1.bin"));
    let f2_blocks = objects(&a.path.join("f2.bin"));
    let base: u64 = ports.iter().map(|p| gets(*p)).sum();
    let total = || ports.iter().map(|p| gets(*p)).sum::<u64>() - base;

    // 8 readers spread over the 3 mounts: each block fetched from the store once in all.
    let mut paths = Vec::new();
    for i in 0..8 {
        paths.push([&a, &b, &c][i % 3].path.join("f1.bin"));
    }
    read_concurrently(paths, 4);
    let errors: Vec<u64> = ports
        .iter()
        .map(|p| metric(*p, "strata_cache_peer_errors_total"))
        .collect();
    assert_eq!(
        total(),
        f1_blocks,
        "one GET per block across the group (peer errors {errors:?}; logs:\n{}\n{}\n{}",
        a.log(),
        b.log(),
        c.log()
    );

    // Read through A, then through B and C: no new GET, B and C were served by peers.
    assert_eq!(read_all(&a.path.join("f2.bin")), pattern(5, file_size()));
    let after_a = total();
    assert_eq!(after_a, f1_blocks + f2_blocks);
    assert_eq!(read_all(&b.path.join("f2.bin")), pattern(5, file_size()));
    assert_eq!(read_all(&c.path.join("f2.bin")), pattern(5, file_size()));
    assert_eq!(total(), after_a, "second read through the group: 0 GETs");
    let d_base = gets(d_port);
    assert_eq!(read_all(&d.path.join("f2.bin")), pattern(5, file_size()));
    assert_eq!(
        gets(d_port),
        d_base,
        "a --no-serve member reads from its peers"
    );
    assert_eq!(total(), after_a);
    assert!(metric(ports[1], "strata_cache_peer_hits_total") > 0);

    // Kill A while B reads a cold file: B's read still succeeds (from the store).
    let reader = {
        let p = b.path.join("f3.bin");
        std::thread::spawn(move || read_all(&p))
    };
    std::thread::sleep(Duration::from_millis(100));
    a.kill9();
    let got = reader.join().unwrap();
    assert!(
        got == pattern(6, file_size()),
        "read through B after A died"
    );
    assert_eq!(read_all(&c.path.join("f3.bin")), pattern(6, file_size()));
}

/// Extended attribute `name` of `path` as text.
fn xattr(path: &Path, name: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length given.
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        got >= 0,
        "getxattr {name} of {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    String::from_utf8_lossy(&buf[..got as usize]).to_string()
}

/// Sum of `gets` over members' metrics ports.
fn gets_of(ports: &[u16]) -> u64 {
    ports.iter().map(|p| gets(*p)).sum()
}

#[test]
fn members_joining_or_restarting_take_blocks_from_peers_not_the_store() {
    let v = volume(&[("model.bin", 7)]);
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let member_of = |name: &str, metrics: u16, peer: u16| {
        let a = addr(peer);
        member(
            &v,
            name,
            metrics,
            &["--cache-group", "g2", "--cache-group-addr", a.as_str()],
        )
    };
    // Three members read the file.
    let old_ports = [free_port(), free_port(), free_port()];
    let olds: Vec<TestMount> = ["a", "b", "c"]
        .iter()
        .zip(old_ports)
        .map(|(n, p)| member_of(n, p, free_port()))
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let blocks = objects(&olds[0].path.join("model.bin"));
    let base = gets_of(&old_ports);
    // A warm-up through one member fills the group: each block with its owner only.
    let file = olds[0].path.join("model.bin");
    let out = Command::new(BIN).arg("warmup").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gets_of(&old_ports) - base,
        blocks,
        "warm-up: one GET per block"
    );
    let cached = |p: &Path| {
        let s = xattr(p, "user.strata.cached");
        s.split_whitespace()
            .find_map(|t| t.strip_prefix("cached=")?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("user.strata.cached of {}: {s:?}", p.display()))
    };
    let shares: Vec<u64> = olds
        .iter()
        .map(|m| cached(&m.path.join("model.bin")))
        .collect();
    assert_eq!(
        shares.iter().sum::<u64>(),
        file_size() as u64,
        "the members' shares add up to the file: {shares:?}"
    );
    assert!(shares.iter().all(|s| *s < file_size() as u64), "{shares:?}");
    read_concurrently(olds.iter().map(|m| m.path.join("model.bin")).collect(), 7);
    assert_eq!(
        gets_of(&old_ports) - base,
        blocks,
        "reads after the warm-up: no GET"
    );
    let after_first = gets_of(&old_ports);

    // Two members join; the blocks they now own come from the old members.
    let (d_port, e_port) = (free_port(), free_port());
    let d_peer = free_port();
    let mut d = member_of("d", d_port, d_peer);
    let e = member_of("e", e_port, free_port());
    std::thread::sleep(Duration::from_secs(4));
    let all = [old_ports[0], old_ports[1], old_ports[2], d_port, e_port];
    let base_new = gets(d_port) + gets(e_port);
    let paths: Vec<PathBuf> = (0..8)
        .map(|i| [&d, &e][i % 2].path.join("model.bin"))
        .collect();
    read_concurrently(paths, 7);
    let errors: Vec<u64> = all
        .iter()
        .map(|p| metric(*p, "strata_cache_peer_errors_total"))
        .collect();
    assert_eq!(
        gets_of(&old_ports) - after_first + gets(d_port) + gets(e_port) - base_new,
        0,
        "8 readers on two new members: 0 GETs (peer errors {errors:?}; logs:\n{}\n{}",
        d.log(),
        e.log()
    );
    assert!(metric(d_port, "strata_cache_peer_hits_total") > 0);

    // A member killed and started again (same address, same cache disk) serves its share
    // from its disk tier: still no GET anywhere.
    d.kill9();
    d.remount();
    std::thread::sleep(Duration::from_secs(4));
    let before: u64 = gets_of(&all);
    read_concurrently(
        vec![
            d.path.join("model.bin"),
            e.path.join("model.bin"),
            olds[0].path.join("model.bin"),
        ],
        7,
    );
    assert_eq!(
        gets_of(&all) - before,
        0,
        "after a member's restart: 0 GETs (logs:\n{})",
        d.log()
    );
    drop(olds);
}
