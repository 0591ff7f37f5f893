//! Helpers shared by the integration tests that drive the real `strata-csi` binary: the
//! binaries, a formatted volume (SQLite metadata, objects in a local directory), the gRPC
//! channel over the unix socket, cleanup of mounts, and finding mount clients.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use strata_csi::csi::{self, volume_capability};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub const CSI: &str = env!("CARGO_BIN_EXE_strata-csi");

pub fn strata_bin() -> PathBuf {
    Path::new(CSI).parent().unwrap().join("strata")
}

pub struct Guard {
    pub plugin: Option<Child>,
    pub dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.plugin.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unmount everything below the test directory, deepest first; abort FUSE
        // connections so that nothing waits for a client.
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let d = self.dir.to_string_lossy().to_string();
        let mut mps: Vec<(String, String)> = info
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                Some((f.get(4)?.to_string(), f.get(2)?.to_string()))
            })
            .filter(|(m, _)| m.starts_with(&d))
            .collect();
        mps.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        for (m, dev) in mps {
            if let Some(minor) = dev.split(':').nth(1) {
                let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), b"1");
            }
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        // Mount clients started by the plugin exit once their connection ends.
    }
}

pub fn mount_cap(mode: volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    mount_cap_with_flags(mode, &[])
}

/// A mount capability with Kubernetes mount options (a StorageClass's `mountOptions:`).
pub fn mount_cap_with_flags(
    mode: volume_capability::access_mode::Mode,
    flags: &[&str],
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                ..Default::default()
            },
        )),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// The node plugin's command in process mode: socket `<root>/csi.sock`, state in
/// `<root>/state`, log in `<root>/plugin.log`, the mount clients' disk caches in
/// `<root>/cache` (they inherit `STRATA_CACHE_DIR`); the caller adds the services.
pub fn plugin_command(root: &Path) -> Command {
    let mut cmd = Command::new(CSI);
    cmd.arg("--endpoint")
        .arg(format!("unix://{}", root.join("csi.sock").display()))
        .arg("--state-dir")
        .arg(root.join("state"))
        .arg("--strata-bin")
        .arg(strata_bin())
        .env("STRATA_CACHE_DIR", root.join("cache"))
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(root.join("plugin.log")).unwrap());
    cmd
}

/// Start a node plugin (process mode, node-1) on `<root>/csi.sock`, state in
/// `<root>/state`, log in `<root>/plugin.log`; the guard stops it and unmounts what is
/// left below `root`.
pub fn node_plugin(root: &Path) -> Guard {
    let plugin = plugin_command(root)
        .args(["--node", "--node-id", "node-1"])
        .spawn()
        .unwrap();
    Guard {
        plugin: Some(plugin),
        dir: root.to_path_buf(),
    }
}

/// The kernel readahead (KiB) of the mount under `path`, once it is `want` (the plugin
/// sets it when the client serves) or after 10 s.
pub fn read_ahead_kib(path: &Path, want: &str) -> String {
    let file = strata::fuse::read_ahead_kb_file(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kib = fs::read_to_string(&file).unwrap().trim().to_string();
        if kib == want || Instant::now() > deadline {
            return kib;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connect to the plugin's socket (waiting up to 20 s for it); on failure the panic shows
/// the plugin's log `log`.
pub async fn channel(sock: &Path, log: &Path) -> Channel {
    let sock = sock.to_path_buf();
    let start = Instant::now();
    loop {
        let s = sock.clone();
        let r = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
                }
            }))
            .await;
        match r {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(20) => panic!(
                "connect to {}: {e}; plugin log:\n{}",
                sock.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

/// Read `path` on another thread, so that a hung mount cannot hang the test.
pub fn read_within(path: PathBuf, limit: Duration) -> Option<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(b) = fs::read(&path) {
                let _ = tx.send(b);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    rx.recv_timeout(limit + Duration::from_secs(1)).ok()
}

/// Create `path` with `data` and read it back, on another thread, retrying until `limit`:
/// an operation no cache can answer, so it needs a live mount client. True on success.
pub fn write_read_within(path: PathBuf, data: &'static [u8], limit: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if fs::write(&path, data).is_ok() && fs::read(&path).is_ok_and(|b| b == data) {
                let _ = tx.send(());
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    rx.recv_timeout(limit).is_ok()
}

/// Pids of the mount clients serving shared mounts below the state directory `state`.
pub fn client_pids(state: &Path) -> Vec<i32> {
    let mut out = vec![];
    let want = state.to_string_lossy().to_string();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // The mount client itself, not a `--supervise` parent that restarts it.
        if cmd.contains("--fuse-fd-socket") && cmd.contains(&want) && !cmd.contains("--supervise") {
            out.push(pid);
        }
    }
    out
}

/// Format a volume `name` with SQLite metadata and objects in `root/objects`; returns its
/// META_URL.
pub fn format_volume(root: &Path, name: &str) -> String {
    let meta = format!("sqlite://{}/meta.db", root.display());
    let objects = root.join("objects");
    strata::testing::mount::format(
        &strata_bin().to_string_lossy(),
        &[
            "--storage",
            "file",
            "--bucket",
            &objects.to_string_lossy(),
            &meta,
            name,
        ],
    );
    meta
}

/// Is the test running as root (FUSE and bind mounts)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn assert_strata_bin() {
    assert!(
        strata_bin().exists(),
        "{} is missing: build it first (cargo build -p fs-core)",
        strata_bin().display()
    );
}

/// Set up a test that needs real mounts: `None` (after saying why) when not root; else a
/// temporary directory with a formatted volume `name` in it: (dir guard, its path, META_URL).
pub fn mount_test(name: &str) -> Option<(tempfile::TempDir, PathBuf, String)> {
    if !is_root() {
        eprintln!("skipped: needs root for FUSE and bind mounts");
        return None;
    }
    assert_strata_bin();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let meta = format_volume(&root, name);
    Some((dir, root, meta))
}
