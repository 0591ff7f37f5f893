//! Mounting a volume: the checks a user needs before anything happens (`/dev/fuse`, the
//! mount point), wiring metadata, object store, VFS and FUSE together, signal handling,
//! clean shutdown, and running in the background (`-d`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fuse::MountSettings;
use crate::meta::{MetaSettings, ROOT_INO, redact_url};
use crate::metrics::{self, Metrics};
use crate::object::RetrySettings;
use crate::vfs::{Vfs, VfsSettings};
use crate::volume::{self, VolumeError};

/// Options of `strata mount` (besides META_URL and MOUNTPOINT).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MountOptions {
    /// Serve Prometheus metrics at this address (`127.0.0.1:9567`).
    pub metrics: Option<String>,
    /// Expose only this directory of the volume.
    pub subdir: Option<String>,
    /// Allow mounting over a non-empty directory.
    pub nonempty: bool,
    pub threads: usize,
    pub allow_other: bool,
    pub vfs: VfsSettings,
    pub meta: MetaSettings,
    /// Take an already mounted FUSE connection from the keeper listening on this unix socket
    /// (the CSI node plugin) instead of mounting (see [`crate::fusefd`]).
    pub fuse_fd_socket: Option<PathBuf>,
    /// Constant labels of every metric besides `volume` (a mount Pod's pod/namespace/pv).
    #[serde(default)]
    pub metrics_labels: Vec<(String, String)>,
    /// Object-store keys replacing those stored in the volume for this client (never
    /// serialized, never logged).
    #[serde(skip)]
    pub access_key: Option<String>,
    #[serde(skip)]
    pub secret_key: Option<String>,
    /// Which store reads try first when the volume is mirrored.
    pub prefer_store: crate::object::PreferStore,
    /// Bytes the kernel reads ahead of a sequential reader of the mount (its
    /// `read_ahead_kb`, set once the mount answers; needs root); 0: the kernel's 128 KiB.
    pub kernel_readahead: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            metrics: None,
            subdir: None,
            nonempty: false,
            threads: 8,
            allow_other: default_allow_other(),
            vfs: VfsSettings::default(),
            meta: MetaSettings::default(),
            fuse_fd_socket: None,
            metrics_labels: Vec::new(),
            access_key: None,
            secret_key: None,
            prefer_store: Default::default(),
            kernel_readahead: DEFAULT_KERNEL_READAHEAD,
        }
    }
}

impl MountOptions {
    /// The VFS settings of a FUSE mount: as given, reads answered to the kernel's page cache.
    fn fuse_vfs_settings(&self) -> VfsSettings {
        VfsSettings {
            page_cache_above: true,
            ..self.vfs.clone()
        }
    }
}

/// Default of [`MountOptions::kernel_readahead`]. Measured on this project's 2-core test
/// machine (one reader along a 4 GiB file, fresh mounts): the kernel's 128 KiB made every
/// 1 MiB read wait for its own FUSE round trip; 4 MiB lets the kernel ask for the next
/// pieces while the reader copies: local directory 549 -> 1,045 MiB/s at half the CPU per
/// GiB, SeaweedFS S3 387 -> 433 MiB/s; 16 MiB was no faster.
pub const DEFAULT_KERNEL_READAHEAD: u64 = 4 << 20;

/// Once the FUSE mount at `mp` answers, set its kernel readahead to `bytes` (in a thread of
/// its own: the mount only answers once its session serves). Without the right to (not
/// root, a read-only /sys in a container) the kernel's default stays; the CSI node plugin
/// sets it for the mounts it makes.
pub fn spawn_kernel_readahead(mp: PathBuf, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("readahead".into())
        .spawn(move || {
            let start = Instant::now();
            while !is_mounted(&mp) {
                if start.elapsed() > Duration::from_secs(60) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            match crate::fuse::set_kernel_readahead(&mp, bytes) {
                Ok(()) => {
                    tracing::debug!(mountpoint = %mp.display(), kib = bytes / 1024, "kernel readahead set")
                }
                Err(e) => tracing::info!(mountpoint = %mp.display(), error = %e,
                    "cannot set the kernel readahead of the mount (needs root); it stays at the kernel's default"),
            }
        });
}

/// Whether other users may use the mount (`allow_other`): always for root (pods run
/// workloads under other uids), for others only when /etc/fuse.conf permits it.
/// Make the C allocator give large buffers back to the system as soon as they are freed.
/// Blocks (4 MiB) are reused through the block buffer pool; without this, glibc raises its
/// mmap threshold after the first free and keeps freed blocks in per-thread arenas, so the
/// client's resident memory grows to the sum of every thread's peak instead of what is in
/// use. Call once at start, before threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        // A fixed mmap threshold also fixes the trim threshold at 128 KiB: the heaps would
        // shrink and grow again (a page fault per page) around every HTTP body buffer.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

pub fn default_allow_other() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || std::fs::read_to_string("/etc/fuse.conf")
        .map(|s| s.lines().any(|l| l.trim() == "user_allow_other"))
        .unwrap_or(false)
}

/// Errors of `strata mount`, each naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{0}")]
    Setup(String),
}

/// Is `path` a mount point of a FUSE file system (per /proc/self/mountinfo)?
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let fstype = l
            .split(" - ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or("");
        fields
            .get(4)
            .is_some_and(|mp| Path::new(&unescape(mp)) == want)
            && fstype.starts_with("fuse")
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Check that FUSE can be used here.
pub fn check_fuse() -> Result<(), MountError> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MountError::Setup(
            "/dev/fuse does not exist: load the FUSE kernel module (`modprobe fuse`), or in a container pass the device (/dev/fuse) to it".into(),
        )),
        Err(e) => Err(MountError::Setup(format!(
            "cannot open /dev/fuse: {e}: run as root, or install fuse3 (`apt-get install fuse3`) so that fusermount3 can mount for this user"
        ))),
    }
}

/// Check (and create if missing) the mount point.
pub fn check_mountpoint(mp: &Path, nonempty: bool) -> Result<PathBuf, MountError> {
    if !mp.exists() {
        std::fs::create_dir_all(mp).map_err(|e| {
            MountError::Setup(format!("cannot create mount point {}: {e}", mp.display()))
        })?;
    }
    if !mp.is_dir() {
        return Err(MountError::Setup(format!(
            "mount point {} is not a directory",
            mp.display()
        )));
    }
    let mp = std::fs::canonicalize(mp)
        .map_err(|e| MountError::Setup(format!("mount point {}: {e}", mp.display())))?;
    if is_mounted(&mp) {
        return Err(MountError::Setup(format!(
            "{} is already a mount point: unmount it first (`strata umount {}`)",
            mp.display(),
            mp.display()
        )));
    }
    if !nonempty {
        let mut entries = std::fs::read_dir(&mp).map_err(|e| {
            MountError::Setup(format!("cannot read mount point {}: {e}", mp.display()))
        })?;
        if entries.next().is_some() {
            return Err(MountError::Setup(format!(
                "mount point {} is not empty: use an empty directory, or pass --nonempty to hide its contents",
                mp.display()
            )));
        }
    }
    Ok(mp)
}

/// Block the termination signals in this thread (and threads it starts later), so that one
/// thread can wait for them with [`spawn_signal_handler`].
pub fn block_signals() {
    // SAFETY: plain libc signal-mask calls on a zero-initialized sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait until one of the termination signals [`block_signals`] blocked arrives; returns it.
pub fn wait_for_stop_signal() -> i32 {
    // SAFETY: sigwait on a set built from constants.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

fn spawn_signal_handler(mountpoint: PathBuf) {
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let sig = wait_for_stop_signal();
        tracing::info!(signal = sig, mountpoint = %mountpoint.display(), "signal received, unmounting");
        if let Err(e) = unmount(&mountpoint, true) {
            tracing::error!(error = %e, "unmount on signal failed");
        }
    });
}

/// Unmount a FUSE mount point (lazily with `force`: it goes away when the last user leaves).
pub fn unmount(mp: &Path, force: bool) -> Result<(), MountError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())
        .map_err(|_| MountError::Setup("mount point contains a NUL byte".into()))?;
    let flags = if force { libc::MNT_DETACH } else { 0 };
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            // Not root: let fusermount do it.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if force {
                cmd.arg("-z");
            }
            let out = cmd.arg(mp).output().map_err(|e| {
                MountError::Setup(format!(
                    "unmount needs root or fusermount3 (`apt-get install fuse3`): {e}"
                ))
            })?;
            if out.status.success() {
                Ok(())
            } else {
                Err(MountError::Setup(format!(
                    "fusermount3 -u {} failed: {}",
                    mp.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
        Some(libc::EBUSY) => Err(MountError::Setup(format!(
            "{} is busy (files open or a shell inside it): close them, or use `strata umount --force`",
            mp.display()
        ))),
        Some(libc::EINVAL) => Err(MountError::Setup(format!(
            "{} is not mounted",
            mp.display()
        ))),
        _ => Err(MountError::Setup(format!(
            "unmount {} failed: {err}",
            mp.display()
        ))),
    }
}

/// Mount and serve in this process until unmounted. `on_ready` runs once the mount is live.
pub fn run(meta_url: &str, mountpoint: &Path, opts: &MountOptions) -> Result<(), MountError> {
    // `-`: the URL (which may hold a password) comes from the environment, not the command line.
    let from_env;
    let meta_url = if meta_url == "-" {
        from_env = std::env::var("STRATA_META_URL").map_err(|_| {
            MountError::Setup("META_URL is `-` but STRATA_META_URL is not set".into())
        })?;
        from_env.as_str()
    } else {
        meta_url
    };
    if opts.fuse_fd_socket.is_some() {
        return run_handover(meta_url, mountpoint, opts);
    }
    check_fuse()?;
    let mp = check_mountpoint(mountpoint, opts.nonempty)?;
    let metrics = Arc::new(Metrics::new());
    let vol = open_volume(meta_url, metrics.clone(), opts)?;
    label_metrics(&metrics, &vol.format.name, opts)?;
    let root = match &opts.subdir {
        Some(s) => volume::resolve_dir(&vol.meta, s)?,
        None => ROOT_INO,
    };
    if let Some(addr) = &opts.metrics {
        let bound = metrics::serve(metrics.clone(), addr).map_err(|e| {
            MountError::Setup(format!(
                "--metrics {addr}: cannot listen: {e} (choose a free address like 127.0.0.1:9567)"
            ))
        })?;
        tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    }
    let vfs = Vfs::try_new(
        vol.meta.clone(),
        vol.store.clone(),
        vol.format.clone(),
        metrics,
        opts.fuse_vfs_settings(),
    )
    .map_err(|e| MountError::Setup(e.to_string()))?;
    vol.meta
        .new_session(&vfs.session_info())
        .map_err(|e| MountError::Volume(e.into()))?;
    vfs.start_background();
    start_mirror_copier(&vol, opts);
    spawn_signal_handler(mp.clone());
    let settings = MountSettings {
        fsname: format!("strata:{}", vol.format.name),
        threads: opts.threads,
        read_only: opts.vfs.read_only,
        allow_other: opts.allow_other,
    };
    tracing::info!(volume = %vol.format.name, meta = %redact_url(meta_url), store = %vol.store.describe(),
        mountpoint = %mp.display(), subdir = ?opts.subdir, "mounting");
    spawn_kernel_readahead(mp.clone(), opts.kernel_readahead);
    let res = crate::fuse::mount(vfs.clone(), root, &mp, &settings);
    tracing::info!(volume = %vol.format.name, mountpoint = %mp.display(), "unmounted, flushing");
    vfs.shutdown();
    res.map_err(|e| MountError::Setup(format!("FUSE mount at {} failed: {e}", mp.display())))
}

/// Wait until `mp` is mounted, or `child` exits; used by `mount -d`.
pub fn wait_mounted(
    mp: &Path,
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if is_mounted(mp) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the mount process exited with {status}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} was not mounted after {:?}",
        mp.display(),
        timeout
    ))
}

/// Label every metric of this client with its volume, its cache group (`cache_group`, when
/// it joins one) and `opts.metrics_labels` (also used by `strata gateway`).
pub fn label_metrics(
    metrics: &Metrics,
    volume: &str,
    opts: &MountOptions,
) -> Result<(), MountError> {
    let mut labels = vec![("volume".to_string(), volume.to_string())];
    if let Some(g) = &opts.vfs.cache.group {
        labels.push(("cache_group".to_string(), g.clone()));
    }
    labels.extend(opts.metrics_labels.iter().cloned());
    metrics
        .set_labels(&labels)
        .map_err(|e| MountError::Setup(format!("--metrics-labels: {e}")))
}

/// The mirror copier of a client that writes (it runs only while it holds the lease, so one
/// client of a volume copies at a time).
pub fn start_mirror_copier(vol: &volume::Volume, opts: &MountOptions) {
    if opts.vfs.read_only || !opts.vfs.background_gc {
        return;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    crate::object::mirror::Copier {
        meta: vol.meta.clone(),
        store: vol.mirror.clone(),
        owner: format!("{}:{}", host.trim(), std::process::id()),
        threads: 8,
        stop: crate::object::mirror::stop_flag(),
    }
    .spawn(std::time::Duration::from_secs(5));
}

/// Open the volume, with the object-store keys of `opts` when given (also used by
/// `strata gateway`).
pub fn open_volume(
    meta_url: &str,
    metrics: Arc<Metrics>,
    opts: &MountOptions,
) -> Result<volume::Volume, MountError> {
    Ok(volume::open_with(
        meta_url,
        metrics,
        opts.meta.clone(),
        RetrySettings::default(),
        opts.vfs.read_only,
        &volume::StoreOptions {
            access_key: opts.access_key.clone(),
            secret_key: opts.secret_key.clone(),
            prefer: opts.prefer_store,
        },
    )?)
}

/// `strata mount --fuse-fd-socket PATH`: serve a connection mounted by a keeper (the CSI
/// node plugin). The mount outlives this process: a termination signal flushes and exits
/// without unmounting, and the next client resumes the same connection.
fn run_handover(meta_url: &str, mountpoint: &Path, opts: &MountOptions) -> Result<(), MountError> {
    let socket = opts.fuse_fd_socket.clone().unwrap_or_default();
    let metrics = Arc::new(Metrics::new());
    let vol = open_volume(meta_url, metrics.clone(), opts)?;
    label_metrics(&metrics, &vol.format.name, opts)?;
    let root = match &opts.subdir {
        Some(s) => volume::resolve_dir(&vol.meta, s)?,
        None => ROOT_INO,
    };
    if let Some(addr) = &opts.metrics {
        let bound = metrics::serve(metrics.clone(), addr)
            .map_err(|e| MountError::Setup(format!("--metrics {addr}: cannot listen: {e}")))?;
        tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    }
    let vfs = Vfs::new(
        vol.meta.clone(),
        vol.store.clone(),
        vol.format.clone(),
        metrics,
        opts.fuse_vfs_settings(),
    );
    // Never reuse a handle number an earlier client of this connection gave the kernel.
    vfs.set_handle_base_from_clock();
    vol.meta
        .new_session(&vfs.session_info())
        .map_err(|e| MountError::Volume(e.into()))?;
    vfs.start_background();
    start_mirror_copier(&vol, opts);
    let handover = crate::fusefd::take(&socket, Duration::from_secs(30)).map_err(|e| {
        MountError::Setup(format!(
            "cannot take the FUSE descriptor from {}: {e}",
            socket.display()
        ))
    })?;
    let resume = handover.resume;
    {
        let vfs = vfs.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_for_stop_signal();
                tracing::info!(
                    signal = sig,
                    "signal received: flushing and leaving the mount to the next client"
                );
                vfs.shutdown();
                std::process::exit(0);
            });
    }
    let settings = MountSettings {
        fsname: format!("strata:{}", vol.format.name),
        threads: opts.threads,
        read_only: opts.vfs.read_only,
        allow_other: opts.allow_other,
    };
    tracing::info!(volume = %vol.format.name, meta = %redact_url(meta_url), store = %vol.store.describe(),
        mountpoint = %mountpoint.display(), resume, "serving a handed-over FUSE connection");
    spawn_kernel_readahead(mountpoint.to_path_buf(), opts.kernel_readahead);
    let res = crate::fuse::serve_fd(vfs.clone(), root, handover, &settings, |dev, conn| {
        crate::fusefd::serve_keeper(conn, socket.clone(), dev);
    });
    tracing::info!(volume = %vol.format.name, mountpoint = %mountpoint.display(), "connection ended, flushing");
    vfs.shutdown();
    res.map_err(|e| MountError::Setup(format!("serving the FUSE connection failed: {e}")))
}
