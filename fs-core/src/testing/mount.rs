//! Real mounts for integration tests: `strata mount` run in the foreground as a child
//! process (the way a user or a mount pod runs it), unmounted and reaped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Is `p` a FUSE mount point right now?
pub fn is_mounted(p: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = p.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(&p) && l.contains("fuse"))
}

/// `--cache-dir DIR` for a test mount, unless its arguments already choose the disk cache
/// (tests never use the machine's default cache directory).
pub fn cache_args(mount_args: &[String], dir: &Path) -> Vec<String> {
    if mount_args
        .iter()
        .any(|a| a.starts_with("--cache-dir") || a.starts_with("--cache-size"))
    {
        return Vec::new();
    }
    vec!["--cache-dir".into(), dir.display().to_string()]
}

/// Run `strata format ARGS` and panic with its output if it fails.
pub fn format(bin: &str, args: &[&str]) {
    let out = Command::new(bin)
        .arg("format")
        .args(args)
        .output()
        .expect("run strata format");
    assert!(
        out.status.success(),
        "strata format {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mounted volume served by a child `strata mount` process; its log is `PATH.log`.
pub struct TestMount {
    bin: String,
    meta: String,
    extra: Vec<String>,
    child: Option<Child>,
    pub path: PathBuf,
}

impl TestMount {
    /// Mount `meta` at `path` (created if missing) and wait until it is live.
    pub fn new(bin: &str, meta: &str, path: &Path, extra: &[&str]) -> TestMount {
        let mut m = TestMount {
            bin: bin.to_string(),
            meta: meta.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            path: path.to_path_buf(),
        };
        m.start();
        m
    }

    /// The disk cache goes beside the mount point unless the caller chose one.
    fn cache_args(&self) -> Vec<String> {
        cache_args(&self.extra, &self.path.with_extension("cache"))
    }

    fn start(&mut self) {
        fs::create_dir_all(&self.path).expect("create mount point");
        let log = fs::File::create(self.path.with_extension("log")).expect("mount log");
        let child = Command::new(&self.bin)
            .arg("--log-level")
            .arg(std::env::var("STRATA_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .arg("mount")
            .args(&self.extra)
            .args(self.cache_args())
            .arg(&self.meta)
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start strata mount");
        self.child = Some(child);
        let start = Instant::now();
        while !is_mounted(&self.path) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("strata mount exited with {status}: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mount at {} did not come up: {}",
                self.path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path.with_extension("log")).unwrap_or_default()
    }

    /// Kill the client with SIGKILL (no flush, no clean unmount) and detach the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }

    /// Mount again with the same settings (after [`TestMount::kill9`] or [`TestMount::unmount`]).
    pub fn remount(&mut self) {
        if self.child.is_some() {
            self.unmount();
        }
        self.start();
    }

    /// Unmount cleanly and wait for the client to exit.
    pub fn unmount(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new(&self.bin)
                .args(["umount", "--force"])
                .arg(&self.path)
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.unmount();
    }
}
