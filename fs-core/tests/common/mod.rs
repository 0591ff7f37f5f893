//! Harness for the real-FUSE tests: a freshly formatted volume in a temporary directory,
//! mounted by the `strata` binary (built by cargo for the integration tests) running in the
//! foreground as a child process. Dropping a [`Mount`] unmounts it, waits for the process and
//! removes the directory.
//!
//! Needs /dev/fuse and root (or fusermount3). Nothing here builds anything.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `strata` binary of this workspace.
pub fn strata_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// How long to wait for a mount to appear or a mount process to exit.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A formatted volume, mounted (or not, between [`Mount::umount`] and [`Mount::mount`]).
pub struct Mount {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    meta_url: String,
    mount_args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    /// Number of times the volume has been mounted (each mount logs to its own file).
    generation: u32,
}

/// Options for [`Mount::with`].
#[derive(Default, Clone)]
pub struct MountConfig {
    /// Extra arguments to `strata format` (before META_URL), e.g. `["--capacity", "1"]`.
    pub format_args: Vec<String>,
    /// Extra arguments to `strata mount` (before META_URL), e.g. `["--no-bgjob"]`.
    pub mount_args: Vec<String>,
}

impl MountConfig {
    pub fn format_arg(mut self, a: &str) -> Self {
        self.format_args.push(a.to_string());
        self
    }
    pub fn mount_arg(mut self, a: &str) -> Self {
        self.mount_args.push(a.to_string());
        self
    }
}

impl Mount {
    /// Format a fresh volume with default settings and mount it.
    pub fn new() -> Mount {
        Mount::with(MountConfig::default())
    }

    /// Format a fresh volume (with `cfg.format_args`) and mount it (with `cfg.mount_args`).
    pub fn with(cfg: MountConfig) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("strata-fuse-")
            .tempdir()
            .expect("creating a temporary directory");
        // Tests run commands as other users: they must be able to reach the mount point.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mnt = std::fs::canonicalize(dir.path()).unwrap().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let meta_url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let bucket = dir.path().join("data");
        let name = format!("t{}", std::process::id());
        let out = Command::new(strata_bin())
            .arg("format")
            .args(&cfg.format_args)
            .arg("--bucket")
            .arg(&bucket)
            .arg(&meta_url)
            .arg(&name)
            .env("STRATA_LOG", "warn")
            .output()
            .expect("running strata format");
        assert!(
            out.status.success(),
            "strata format failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = dir.path().join("mount-0.log");
        let mut m = Mount {
            dir,
            mnt,
            meta_url,
            mount_args: cfg.mount_args,
            child: None,
            log,
            generation: 0,
        };
        m.mount();
        m
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `mount point/rel`.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn meta_url(&self) -> &str {
        &self.meta_url
    }

    /// The temporary directory holding meta.db, data/, mnt/ and the mount logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Pid of the running mount process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mnt)
    }

    /// The disk cache lives in the test's directory unless the test chose its own.
    fn cache_args(&self) -> Vec<String> {
        strata::testing::mount::cache_args(&self.mount_args, &self.dir.path().join("cache"))
    }

    /// Start `strata mount META MNT` in the foreground as a child process and wait until the
    /// kernel lists the mount.
    pub fn mount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        self.generation += 1;
        self.log = self
            .dir
            .path()
            .join(format!("mount-{}.log", self.generation));
        let logf = File::create(&self.log).unwrap();
        let mut child = Command::new(strata_bin())
            .arg("mount")
            .args(&self.mount_args)
            .args(self.cache_args())
            .arg(&self.meta_url)
            .arg(&self.mnt)
            .env(
                "STRATA_LOG",
                std::env::var("STRATA_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("starting strata mount");
        let start = Instant::now();
        loop {
            if is_fuse_mounted(&self.mnt) {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "strata mount exited with {st} before mounting; log:\n{}",
                    self.log_tail(40)
                );
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} not mounted after {MOUNT_TIMEOUT:?}; log:\n{}",
                    self.mnt.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Unmount cleanly (fails the test if the mount is busy) and wait for the mount process to
    /// flush and exit successfully.
    pub fn umount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Err(e) = umount2(&self.mnt, 0) {
            // Put the child back so Drop can clean up.
            self.child = Some(child);
            panic!("umount {} failed: {e}", self.mnt.display());
        }
        match wait_timeout(&mut child, EXIT_TIMEOUT) {
            Some(st) => assert!(
                st.success(),
                "the mount process exited with {st} after unmount; log:\n{}",
                self.log_tail(40)
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the mount process did not exit {EXIT_TIMEOUT:?} after unmount; log:\n{}",
                    self.log_tail(40)
                );
            }
        }
    }

    /// Arguments for the next [`Mount::mount`] (e.g. `["--subdir", "a/b"]`).
    pub fn set_mount_args(&mut self, args: &[&str]) {
        self.mount_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Unmount and mount again (a new client process on the same volume).
    pub fn remount(&mut self) {
        self.umount();
        self.mount();
    }

    /// SIGKILL the mount process, wait for it, and detach the dead mount (`umount -l`), leaving
    /// the volume unmounted. Call [`Mount::mount`] to mount it again.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = child.wait();
        if is_fuse_mounted(&self.mnt) && umount2(&self.mnt, libc::MNT_DETACH).is_err() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
        let start = Instant::now();
        while is_fuse_mounted(&self.mnt) && start.elapsed() < MOUNT_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !is_fuse_mounted(&self.mnt),
            "dead mount {} could not be detached",
            self.mnt.display()
        );
    }

    /// The last `n` lines of the current mount's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run `strata info PATH` and parse its JSON.
    pub fn info(&self, path: &Path) -> serde_json::Value {
        let out = Command::new(strata_bin())
            .arg("info")
            .arg(path)
            .env("STRATA_LOG", "warn")
            .output()
            .expect("running strata info");
        assert!(
            out.status.success(),
            "strata info {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "strata info output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let Some(mut child) = self.child.take() else {
            return;
        };
        if umount2(&self.mnt, 0).is_err() {
            // Busy (a leaked fd) or already gone: detach; the process exits once it is unused.
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
        if wait_timeout(&mut child, EXIT_TIMEOUT).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- strata mount log ({}) ---\n{}",
                self.log.display(),
                self.log_tail(30)
            );
        }
    }
}

/// umount2(2).
pub fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = cstr(path);
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Wait up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is `path` the mount point of a FUSE file system, per /proc/self/mountinfo?
pub fn is_fuse_mounted(path: &Path) -> bool {
    strata::mount::is_mounted(path)
}

/// A path as a C string.
pub fn cstr(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("path with a NUL byte")
}

/// errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Name of an errno value, for readable assertion messages.
pub fn errname(e: i32) -> String {
    let name = match e {
        0 => "0 (success)",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN/EWOULDBLOCK",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSYS => "ENOSYS",
        libc::EBUSY => "EBUSY",
        libc::ENOTCONN => "ENOTCONN",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}
