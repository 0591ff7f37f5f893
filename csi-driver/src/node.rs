//! Node service: one shared FUSE mount per Strata volume and client settings per node
//! (mounted by this plugin, served by a mount client that receives the descriptor), bind
//! mounts for staging and publishing, reference counts and recovery persisted under the
//! state directory.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use strata::fusefd::{FdKeeper, mount_fuse};
use tonic::{Request, Response, Status};

use crate::csi::{self, node_server::Node};
use crate::errors::{CsiError, Result, blocking};
use crate::locks::OpLocks;
use crate::mounter::{Client, ClientSpec, Consumer, Mounter, PodParams, ProcessMounter};
use crate::params::{self, CTX_PATH, CTX_SUBDIR, Params, Secrets};

/// Node plugin settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeSettings {
    pub node_id: String,
    pub state_dir: PathBuf,
    /// Topology segments reported by NodeGetInfo (e.g. `topology.strata.io/region`).
    pub topology: BTreeMap<String, String>,
    pub strata_bin: PathBuf,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_id: String::new(),
            state_dir: PathBuf::from("/var/lib/strata-csi"),
            topology: BTreeMap::new(),
            strata_bin: crate::mounter::default_strata_bin(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StageRec {
    volume_id: String,
    key: String,
    subpath: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PubRec {
    volume_id: String,
    staging: String,
    readonly: bool,
    /// Published with SINGLE_NODE_SINGLE_WRITER: no other target of the volume may exist.
    #[serde(default)]
    single_writer: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    stages: BTreeMap<String, StageRec>,
    publishes: BTreeMap<String, PubRec>,
}

#[derive(Serialize, Deserialize)]
struct SavedSpec {
    metaurl: String,
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    options: Vec<(String, Option<String>)>,
    #[serde(default)]
    pod: PodParams,
}

struct Base {
    keeper: FdKeeper,
    client: Client,
    spec: ClientSpec,
}

/// How often the watchdog retries stopping a client whose stop failed (a mount Pod the
/// API server did not let us delete).
const ORPHAN_RETRY: Duration = Duration::from_secs(5);

struct Inner {
    settings: NodeSettings,
    mounter: Mounter,
    bases: Mutex<HashMap<String, Base>>,
    state: Mutex<State>,
    /// Held while a consumer list is computed and written, so that lists land in order.
    consumers_lock: Mutex<()>,
    /// Clients of released mounts whose stop failed, with the time of the next try.
    orphans: Mutex<HashMap<String, (ClientSpec, Instant)>>,
    /// One lock per shared mount (mount key), held while that mount is set up, used by a
    /// new staging path or released: PVs of one Strata volume staged at once (different
    /// volume ids, the same key) must not mount it twice, and an unstage must not unmount
    /// it between a stage's mount and the record that it uses it.
    key_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Bytes of kernel readahead the mount options ask for (`kernel-readahead`, MiB; the
/// client's default otherwise; 0: the kernel's own).
fn kernel_readahead(options: &[(String, Option<String>)]) -> u64 {
    match options.iter().rev().find(|(k, _)| k == "kernel-readahead") {
        Some((_, Some(v))) => v.trim().parse::<u64>().map(|m| m << 20).unwrap_or(0),
        _ => strata::mount::DEFAULT_KERNEL_READAHEAD,
    }
}

/// The publications served by the shared mount `key`: every target published from a
/// staging path of that mount, sorted.
fn consumers_of(st: &State, key: &str) -> Vec<Consumer> {
    let mut out: Vec<Consumer> = st
        .publishes
        .iter()
        .filter(|(_, p)| st.stages.get(&p.staging).is_some_and(|s| s.key == key))
        .map(|(target, p)| Consumer {
            volume_id: p.volume_id.clone(),
            target_path: target.clone(),
        })
        .collect();
    out.sort();
    out
}

/// Another target of `volume_id` that forbids publishing it again (SINGLE_NODE_SINGLE_WRITER
/// on either side: the CSI spec allows such a volume at one target path only).
fn single_writer_conflict(st: &State, volume_id: &str, single_writer: bool) -> Option<String> {
    st.publishes
        .iter()
        .find(|(_, p)| p.volume_id == volume_id && (single_writer || p.single_writer))
        .map(|(t, _)| t.clone())
}

#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
    locks: OpLocks,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| CsiError::InvalidArgument("path contains NUL".into()))
}

fn sys_mount(src: &Path, dst: &Path, flags: libc::c_ulong) -> Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(CsiError::io(
            &format!("mount {} on {}", src.display(), dst.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Bind `src` on `dst` (read-only when asked). On failure nothing stays mounted on `dst`.
fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    sys_mount(src, dst, libc::MS_BIND)?;
    if readonly
        && let Err(e) = sys_mount(
            Path::new("none"),
            dst,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        )
    {
        umount(dst);
        return Err(e);
    }
    Ok(())
}

/// Lazy unmount; not mounted is fine.
fn umount(p: &Path) {
    if let Ok(c) = cstr(p) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = p.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

/// Health of a mount: `None` when healthy, else what is wrong. A stat that does not answer
/// within 3 s counts as broken (a connection without a client queues requests).
fn check_health(p: &Path) -> Option<String> {
    let p = p.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&p).map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok(Ok(())) => None,
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            Some("transport endpoint is not connected".into())
        }
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the mount does not answer".into()),
    }
}

/// Files the node plugin keeps in `<state-dir>/volumes/<key>/`.
const VOLUME_FILES: &[&str] = &["spec.json", "spec.json.tmp", "fd.sock", "client.log"];

/// Remove the directory of a released shared mount: first `spec.json` (META_URL and keys),
/// then the other files the plugin made and the empty mount point. Never recursive: a mount
/// point that is still mounted (or not empty) stops the removal there, so nothing inside a
/// volume is ever touched; such a leftover is logged.
fn remove_volume_dir(dir: &Path) {
    for f in VOLUME_FILES {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.join(f).display(), error = %e, "removing a file of a released mount")
            }
        }
    }
    let mnt = dir.join("mnt");
    if !mounted(&mnt) {
        let _ = std::fs::remove_dir(&mnt);
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "directory of a released mount left behind")
        }
    }
}

fn statvfs(p: &Path) -> Result<libc::statvfs> {
    let c = cstr(p)?;
    // SAFETY: statvfs fills a zeroed struct.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return Err(CsiError::io("statvfs", std::io::Error::last_os_error()));
        }
        Ok(s)
    }
}

impl Inner {
    /// The record of staging path `staging`, if it is staged.
    fn stage_rec(&self, staging: &str) -> Option<StageRec> {
        self.state.lock().stages.get(staging).cloned()
    }

    fn vol_dir(&self, key: &str) -> PathBuf {
        self.settings.state_dir.join("volumes").join(key)
    }

    fn save(&self, st: &State) -> Result<()> {
        let p = self.settings.state_dir.join("state.json");
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| CsiError::io("saving node state", e))
    }

    fn spec(
        &self,
        key: &str,
        secrets: Secrets,
        options: Vec<(String, Option<String>)>,
        pod: PodParams,
    ) -> ClientSpec {
        let dir = self.vol_dir(key);
        let host_dirs = if self.mounter.is_pod() {
            crate::pod::host_dirs(&secrets.metaurl)
        } else {
            vec![]
        };
        ClientSpec {
            key: key.to_string(),
            socket: dir.join("fd.sock"),
            mountpoint: dir.join("mnt"),
            options,
            secrets,
            log: dir.join("client.log"),
            pod,
            host_dirs,
        }
    }

    /// Write the consumer list of `key` where its client is (the mount Pod's annotation).
    /// A failure is logged, not returned: the list is informational and written again on
    /// the next change and with a re-created Pod.
    fn sync_consumers(&self, key: &str) {
        let _g = self.consumers_lock.lock();
        let list = consumers_of(&self.state.lock(), key);
        if let Err(e) = self.mounter.set_consumers(key, &list) {
            tracing::warn!(key, error = %e, "recording the consumers of the shared mount failed");
        }
    }

    /// Mount the whole volume once per node (fresh FUSE connection, keeper, client). On
    /// failure nothing stays: no mount, no client, no `spec.json` with credentials.
    fn mount_base(&self, spec: ClientSpec) -> Result<Base> {
        let dir = self.vol_dir(&spec.key);
        self.mount_base_in(&dir, spec)
            .inspect_err(|_| remove_volume_dir(&dir))
    }

    fn mount_base_in(&self, dir: &Path, spec: ClientSpec) -> Result<Base> {
        std::fs::create_dir_all(&spec.mountpoint).map_err(|e| CsiError::io("state dir", e))?;
        let saved = SavedSpec {
            metaurl: spec.secrets.metaurl.clone(),
            access_key: spec.secrets.access_key.clone(),
            secret_key: spec.secrets.secret_key.clone(),
            session_token: spec.secrets.session_token.clone(),
            options: spec.options.clone(),
            pod: spec.pod.clone(),
        };
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join("spec.json"))
                .map_err(|e| CsiError::io("saving mount spec", e))?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec(&saved).unwrap_or_default())
                .map_err(|e| CsiError::io("saving mount spec", e))?;
        }
        let ro = spec.options.iter().any(|(k, _)| k == "read-only");
        let dev = mount_fuse(&spec.mountpoint, &format!("strata:{}", spec.key), ro)
            .map_err(|e| CsiError::io("mounting /dev/fuse", e))?;
        let keeper = match FdKeeper::start(&spec.socket, Some(dev), false)
            .map_err(|e| CsiError::io("fd socket", e))
            .and_then(|k| self.mounter.prepare(&spec).map(|()| k))
        {
            Ok(k) => k,
            Err(e) => {
                umount(&spec.mountpoint);
                return Err(e);
            }
        };
        // A new client for this key: a pending stop of an earlier one must not remove it.
        self.orphans.lock().remove(&spec.key);
        let client = match self.start_client(&spec) {
            Ok(c) => c,
            Err(e) => {
                umount(&spec.mountpoint);
                keeper.stop();
                self.stop_client(&spec, self.mounter.adopted());
                return Err(e);
            }
        };
        let base = Base {
            keeper,
            client,
            spec,
        };
        let timeout = self.mounter.start_timeout();
        if !base.keeper.wait_serving(timeout) {
            let why = self.mounter.diagnose(&base.spec);
            self.unmount_base(base);
            return Err(CsiError::Internal(format!(
                "the mount client did not start serving within {} s: {why}",
                timeout.as_secs()
            )));
        }
        // The client answers now: give the mount the kernel readahead its options ask for
        // (a mount Pod cannot write sysfs, this plugin can), in a thread of its own: a statfs
        // of a mount whose client stopped answering would block.
        strata::mount::spawn_kernel_readahead(
            base.spec.mountpoint.clone(),
            kernel_readahead(&base.spec.options),
        );
        Ok(base)
    }

    fn unmount_base(&self, base: Base) {
        umount(&base.spec.mountpoint);
        base.keeper.stop();
        self.stop_client(&base.spec, base.client);
        remove_volume_dir(&self.vol_dir(&base.spec.key));
    }

    /// Start the client of `spec`, with the current consumers of its shared mount (a new
    /// mount Pod carries them; under the consumers lock, so no older list lands after it).
    fn start_client(&self, spec: &ClientSpec) -> Result<Client> {
        let _g = self.consumers_lock.lock();
        let consumers = consumers_of(&self.state.lock(), &spec.key);
        self.mounter.start(spec, &consumers)
    }

    /// Stop a client; when that fails (API server unreachable), the watchdog tries again.
    fn stop_client(&self, spec: &ClientSpec, client: Client) {
        if let Err(e) = self.mounter.stop(spec, client) {
            tracing::warn!(key = %spec.key, error = %e, "stopping the mount client failed; retrying in the background");
            self.orphans.lock().insert(
                spec.key.clone(),
                (spec.clone(), Instant::now() + ORPHAN_RETRY),
            );
        }
    }

    /// Watchdog tick: start a client again for each shared mount whose client is gone, and
    /// retry the stops that failed. The decisions are taken under the lock, the starts
    /// (API calls in pod mode) outside it.
    fn tick(&self) {
        let now = Instant::now();
        let due: Vec<ClientSpec> = {
            let mut bases = self.bases.lock();
            bases
                .values_mut()
                .filter_map(|b| {
                    self.mounter
                        .due(&mut b.client, &b.keeper, now)
                        .then(|| b.spec.clone())
                })
                .collect()
        };
        for spec in due {
            tracing::warn!(key = %spec.key, "mount client gone; starting a new one on the same connection");
            match self.start_client(&spec) {
                Ok(c) => {
                    let mut bases = self.bases.lock();
                    match bases.get_mut(&spec.key) {
                        Some(b) => b.client = c,
                        None => {
                            // Released meanwhile: the new client has nothing to serve.
                            drop(bases);
                            self.stop_client(&spec, c);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(key = %spec.key, error = %e, "restarting the mount client failed")
                }
            }
        }
        // Under the lock, so that a mount of the same key (which drops the pending stop)
        // waits for a stop in flight instead of having its new client removed.
        let mut orphans = self.orphans.lock();
        orphans.retain(|key, (spec, at)| {
            if *at > now {
                return true;
            }
            match self.mounter.stop(spec, self.mounter.adopted()) {
                Ok(()) => false,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "stopping the mount client failed again");
                    *at = Instant::now() + ORPHAN_RETRY;
                    true
                }
            }
        });
    }

    /// After a restart of the node plugin: adopt healthy mounts (their client hands the
    /// descriptor back), remount broken ones and re-bind their staging and target paths.
    fn recover(&self) {
        let st = std::fs::read(self.settings.state_dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .unwrap_or_default();
        let keys: std::collections::BTreeSet<String> =
            st.stages.values().map(|s| s.key.clone()).collect();
        for key in keys {
            let Some(saved) = std::fs::read(self.vol_dir(&key).join("spec.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<SavedSpec>(&b).ok())
            else {
                continue;
            };
            let secrets = Secrets {
                metaurl: saved.metaurl,
                access_key: saved.access_key,
                secret_key: saved.secret_key,
                session_token: saved.session_token,
            };
            let spec = self.spec(&key, secrets, saved.options, saved.pod);
            if mounted(&spec.mountpoint) && check_health(&spec.mountpoint).is_none() {
                match FdKeeper::start(&spec.socket, None, true) {
                    Ok(keeper) => {
                        if let Err(e) = self.mounter.prepare(&spec) {
                            tracing::error!(key = %key, error = %e, "preparing the fd socket for the mount Pod");
                        }
                        tracing::info!(key = %key, "adopted a live mount; waiting for its client to hand the descriptor back");
                        self.bases.lock().insert(
                            key,
                            Base {
                                keeper,
                                client: self.mounter.adopted(),
                                spec,
                            },
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "fd socket"),
                }
                continue;
            }
            tracing::warn!(key = %key, "mount broken after restart; mounting again");
            umount(&spec.mountpoint);
            match self.mount_base(spec) {
                Ok(base) => {
                    for (staging, s) in st.stages.iter().filter(|(_, s)| s.key == key) {
                        umount(Path::new(staging));
                        let src = base.spec.mountpoint.join(&s.subpath);
                        if let Err(e) = bind(&src, Path::new(staging), false) {
                            tracing::error!(error = %e, "re-binding staging path");
                        }
                        for (target, p) in
                            st.publishes.iter().filter(|(_, p)| &p.staging == staging)
                        {
                            umount(Path::new(target));
                            if let Err(e) = bind(Path::new(staging), Path::new(target), p.readonly)
                            {
                                tracing::error!(error = %e, "re-binding target path");
                            }
                        }
                    }
                    self.bases.lock().insert(key, base);
                }
                Err(e) => tracing::error!(error = %e, "recovering a mount failed"),
            }
        }
        *self.state.lock() = st;
        let keys: Vec<String> = self.bases.lock().keys().cloned().collect();
        for key in keys {
            self.sync_consumers(&key);
        }
    }
}

impl NodeService {
    /// Node service with process mount mode (clients are child processes).
    pub fn new(settings: NodeSettings) -> Result<NodeService> {
        let mounter = Mounter::Process(ProcessMounter {
            strata_bin: settings.strata_bin.clone(),
        });
        NodeService::with_mounter(settings, mounter)
    }

    /// Node service whose clients `mounter` runs. Recovers the mounts of an earlier run
    /// first, which may block (mounts, API calls): call it from a blocking thread, not from
    /// an async task.
    pub fn with_mounter(settings: NodeSettings, mounter: Mounter) -> Result<NodeService> {
        std::fs::create_dir_all(settings.state_dir.join("volumes"))
            .map_err(|e| CsiError::io("state dir", e))?;
        let inner = Arc::new(Inner {
            mounter,
            settings,
            bases: Mutex::new(HashMap::new()),
            state: Mutex::new(State::default()),
            consumers_lock: Mutex::new(()),
            orphans: Mutex::new(HashMap::new()),
            key_locks: Mutex::new(HashMap::new()),
        });
        inner.recover();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("mount-watchdog".into())
            .spawn(move || {
                while let Some(i) = weak.upgrade() {
                    i.tick();
                    drop(i);
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
            .map_err(|e| CsiError::io("watchdog", e))?;
        Ok(NodeService {
            inner,
            locks: OpLocks::default(),
        })
    }
}

fn need(v: &str, what: &str) -> Result<()> {
    if v.is_empty() {
        return Err(CsiError::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeStageVolume", volume_id = %r.volume_id);
        need(&r.volume_id, "volume_id")?;
        need(&r.staging_target_path, "staging_target_path")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        crate::controller::check_capabilities(std::slice::from_ref(&cap))?;
        let secrets = Secrets::parse(&r.secrets)?;
        let params =
            Params::parse_with_flags(&r.volume_context, crate::controller::mount_flags(&cap))?;
        let subpath = if let Some(s) = r.volume_context.get(CTX_SUBDIR) {
            s.trim_matches('/').to_string()
        } else if let Some(p) = r.volume_context.get(CTX_PATH) {
            p.clone()
        } else {
            params::split_volume_id(&r.volume_id)
                .map(|(_, p)| p.to_string())
                .unwrap_or_default()
        };
        if !subpath.is_empty() {
            params::check_path(&subpath)?;
        }
        let _g = self.locks.try_lock(&r.volume_id)?;
        let inner = self.inner.clone();
        let volume_id = r.volume_id.clone();
        let staging = PathBuf::from(&r.staging_target_path);
        blocking(span.clone(), move || {
            let key = secrets.mount_key(&params.mount_options, &params.pod);
            let rec = StageRec {
                volume_id: volume_id.clone(),
                key: key.clone(),
                subpath: subpath.clone(),
            };
            let previous = inner.stage_rec(&r.staging_target_path);
            if let Some(old) = &previous {
                if old.volume_id != volume_id {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is staged for volume {}",
                        staging.display(),
                        old.volume_id
                    )));
                }
                // Staged already: done, also when the mount it uses has another key (staged
                // by a plugin that keyed mounts by volume only).
                if old.subpath == subpath && mounted(&staging) {
                    return Ok(());
                }
            }
            let key_lock = inner.key_lock(&key);
            let key_guard = key_lock.lock();
            let src = {
                let mut bases = inner.bases.lock();
                if !bases.contains_key(&key) {
                    let spec = inner.spec(
                        &key,
                        secrets,
                        params.mount_options.clone(),
                        params.pod.clone(),
                    );
                    drop(bases);
                    let base = inner.mount_base(spec)?;
                    bases = inner.bases.lock();
                    bases.insert(key.clone(), base);
                }
                bases[&key].spec.mountpoint.join(&subpath)
            };
            // Every failure from here on leaves neither the staging bind mount nor an
            // unused shared mount behind.
            let mut bound = false;
            let staged = inner.stage_on(&src, &subpath, &staging, rec, &mut bound);
            if staged.is_err() {
                if bound {
                    umount(&staging);
                }
                inner.release_base_if_unused_locked(&key);
            } else if let Some(old) = previous.filter(|o| o.key != key) {
                // Staged again through another shared mount: the one it used may be unused.
                drop(key_guard);
                inner.release_base_if_unused(&old.key);
            }
            staged
        })
        .await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeUnstageVolume", volume_id = %r.volume_id);
        need(&r.volume_id, "volume_id")?;
        need(&r.staging_target_path, "staging_target_path")?;
        let _g = self.locks.try_lock(&r.volume_id)?;
        let inner = self.inner.clone();
        blocking(span.clone(), move || {
            let staging = PathBuf::from(&r.staging_target_path);
            umount(&staging);
            let rec = {
                let mut st = inner.state.lock();
                let rec = st.stages.remove(&r.staging_target_path);
                inner.save(&st)?;
                rec
            };
            if let Some(rec) = rec {
                inner.release_base_if_unused(&rec.key);
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodePublishVolume", volume_id = %r.volume_id);
        need(&r.volume_id, "volume_id")?;
        need(&r.staging_target_path, "staging_target_path")?;
        need(&r.target_path, "target_path")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        crate::controller::check_capabilities(std::slice::from_ref(&cap))?;
        let group = match &cap.access_type {
            Some(csi::volume_capability::AccessType::Mount(m))
                if !m.volume_mount_group.is_empty() =>
            {
                Some(m.volume_mount_group.parse::<u32>().map_err(|_| {
                    CsiError::InvalidArgument(format!(
                        "volume_mount_group {:?} is not a gid",
                        m.volume_mount_group
                    ))
                })?)
            }
            _ => None,
        };
        use csi::volume_capability::access_mode::Mode;
        let mode = cap.access_mode.as_ref().map_or(0, |m| m.mode);
        let readonly = r.readonly
            || mode == Mode::SingleNodeReaderOnly as i32
            || mode == Mode::MultiNodeReaderOnly as i32;
        let single_writer = mode == Mode::SingleNodeSingleWriter as i32;
        let _g = self.locks.try_lock(&r.volume_id)?;
        let inner = self.inner.clone();
        blocking(span.clone(), move || {
            let staged = inner.stage_rec(&r.staging_target_path);
            match &staged {
                Some(s) if s.volume_id == r.volume_id => {}
                _ => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {} is not staged at {}",
                        r.volume_id, r.staging_target_path
                    )));
                }
            }
            let rec = PubRec {
                volume_id: r.volume_id.clone(),
                staging: r.staging_target_path.clone(),
                readonly,
                single_writer,
            };
            let target = PathBuf::from(&r.target_path);
            {
                let st = inner.state.lock();
                if let Some(old) = st.publishes.get(&r.target_path) {
                    if *old == rec && mounted(&target) {
                        return Ok(());
                    }
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is already published with other settings",
                        r.target_path
                    )));
                }
                if let Some(other) = single_writer_conflict(&st, &r.volume_id, single_writer) {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {} is already published at {other} and one of the two \
                         publications asks for SINGLE_NODE_SINGLE_WRITER",
                        r.volume_id
                    )));
                }
            }
            if let Some(gid) = group {
                let staging = Path::new(&r.staging_target_path);
                std::os::unix::fs::chown(staging, None, Some(gid))
                    .map_err(|e| CsiError::io("volume_mount_group", e))?;
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(staging)
                    .map_err(|e| CsiError::io("stat", e))?
                    .permissions()
                    .mode();
                std::fs::set_permissions(
                    staging,
                    std::fs::Permissions::from_mode((mode & 0o7777) | 0o2070),
                )
                .map_err(|e| CsiError::io("volume_mount_group", e))?;
            }
            let created = !target.exists();
            std::fs::create_dir_all(&target).map_err(|e| CsiError::io("target path", e))?;
            let published =
                bind(Path::new(&r.staging_target_path), &target, readonly).and_then(|()| {
                    let mut st = inner.state.lock();
                    st.publishes.insert(r.target_path.clone(), rec);
                    inner.save(&st).inspect_err(|_| {
                        st.publishes.remove(&r.target_path);
                        umount(&target);
                    })
                });
            if let Err(e) = published {
                // No mount and no directory of ours stays behind.
                if created {
                    let _ = std::fs::remove_dir(&target);
                }
                return Err(e);
            }
            if let Some(s) = staged {
                inner.sync_consumers(&s.key);
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeUnpublishVolume", volume_id = %r.volume_id);
        need(&r.volume_id, "volume_id")?;
        need(&r.target_path, "target_path")?;
        let _g = self.locks.try_lock(&r.volume_id)?;
        let inner = self.inner.clone();
        blocking(span.clone(), move || {
            let target = PathBuf::from(&r.target_path);
            while mounted(&target) {
                umount(&target);
            }
            let _ = std::fs::remove_dir(&target);
            let key = {
                let mut st = inner.state.lock();
                let Some(p) = st.publishes.remove(&r.target_path) else {
                    return Ok(());
                };
                inner.save(&st)?;
                st.stages.get(&p.staging).map(|s| s.key.clone())
            };
            if let Some(key) = key {
                inner.sync_consumers(&key);
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeGetVolumeStats", volume_id = %r.volume_id);
        need(&r.volume_id, "volume_id")?;
        need(&r.volume_path, "volume_path")?;
        let inner = self.inner.clone();
        let resp = blocking(span.clone(), move || {
            let known = {
                let st = inner.state.lock();
                st.publishes
                    .get(&r.volume_path)
                    .is_some_and(|p| p.volume_id == r.volume_id)
                    || st
                        .stages
                        .get(&r.volume_path)
                        .is_some_and(|s| s.volume_id == r.volume_id)
            };
            let path = PathBuf::from(&r.volume_path);
            if !known {
                return Err(CsiError::NotFound(format!(
                    "volume {} is not published at {}",
                    r.volume_id, r.volume_path
                )));
            }
            if let Some(why) = check_health(&path) {
                return Ok(csi::NodeGetVolumeStatsResponse {
                    usage: vec![],
                    volume_condition: Some(csi::VolumeCondition {
                        abnormal: true,
                        message: why,
                    }),
                });
            }
            let s = statvfs(&path)?;
            let bs = s.f_frsize as i64;
            let (total, free) = (s.f_blocks as i64 * bs, s.f_bavail as i64 * bs);
            let (itotal, ifree) = (s.f_files as i64, s.f_ffree as i64);
            use csi::volume_usage::Unit;
            Ok(csi::NodeGetVolumeStatsResponse {
                usage: vec![
                    csi::VolumeUsage {
                        available: free,
                        total,
                        used: total - free,
                        unit: Unit::Bytes as i32,
                    },
                    csi::VolumeUsage {
                        available: ifree,
                        total: itotal,
                        used: itotal - ifree,
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: Some(csi::VolumeCondition {
                    abnormal: false,
                    message: "healthy".into(),
                }),
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(CsiError::Unimplemented(
            "no node expansion is needed: the quota is raised by the controller".into(),
        )
        .into())
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc::Type as T};
        let caps = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::VolumeCondition,
            T::VolumeMountGroup,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> std::result::Result<Response<csi::NodeGetInfoResponse>, Status> {
        let s = &self.inner.settings;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: s.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: (!s.topology.is_empty()).then(|| csi::Topology {
                segments: s.topology.clone().into_iter().collect(),
            }),
        }))
    }
}

impl Inner {
    /// Bind the volume directory `src` (`subpath` in the volume) on `staging` and record the
    /// stage `rec`; `bound` tells whether this call mounted `staging`.
    fn stage_on(
        &self,
        src: &Path,
        subpath: &str,
        staging: &Path,
        rec: StageRec,
        bound: &mut bool,
    ) -> Result<()> {
        if !src.is_dir() {
            return Err(CsiError::NotFound(format!(
                "directory {subpath:?} does not exist in the volume"
            )));
        }
        std::fs::create_dir_all(staging).map_err(|e| CsiError::io("staging path", e))?;
        if !mounted(staging) {
            bind(src, staging, false)?;
            *bound = true;
        }
        let key = staging.to_string_lossy().into_owned();
        let mut st = self.state.lock();
        st.stages.insert(key.clone(), rec);
        if let Err(e) = self.save(&st) {
            st.stages.remove(&key);
            return Err(e);
        }
        Ok(())
    }

    /// The lock of the shared mount `key` (see `Inner::key_locks`).
    fn key_lock(&self, key: &str) -> Arc<Mutex<()>> {
        let mut locks = self.key_locks.lock();
        // Drop the locks nobody holds or waits for, so the map does not grow with every
        // volume ever staged.
        locks.retain(|k, l| k == key || Arc::strong_count(l) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Unmount the shared mount of `key` when no staging path uses it any more.
    fn release_base_if_unused(&self, key: &str) {
        let key_lock = self.key_lock(key);
        let _key_guard = key_lock.lock();
        self.release_base_if_unused_locked(key);
    }

    /// [`Inner::release_base_if_unused`] for a caller that holds the key's lock.
    fn release_base_if_unused_locked(&self, key: &str) {
        let used = self.state.lock().stages.values().any(|s| s.key == key);
        if used {
            return;
        }
        if let Some(base) = self.bases.lock().remove(key) {
            tracing::info!(key, "last user gone; unmounting the shared mount");
            self.unmount_base(base);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_readahead_comes_from_the_mount_options() {
        let opt = |v: &str| vec![("kernel-readahead".to_string(), Some(v.to_string()))];
        assert_eq!(super::kernel_readahead(&[]), 4 << 20);
        assert_eq!(super::kernel_readahead(&opt("16")), 16 << 20);
        assert_eq!(super::kernel_readahead(&opt("0")), 0);
        let e = crate::params::parse_mount_options("kernel-readahead=lots").unwrap_err();
        assert!(e.to_string().contains("kernel-readahead=lots: give"), "{e}");
        assert!(crate::params::parse_mount_options("kernel-readahead=8").is_ok());
    }

    use super::*;

    fn stage(volume_id: &str, key: &str) -> StageRec {
        StageRec {
            volume_id: volume_id.into(),
            key: key.into(),
            subpath: String::new(),
        }
    }

    fn publish(volume_id: &str, staging: &str) -> PubRec {
        PubRec {
            volume_id: volume_id.into(),
            staging: staging.into(),
            readonly: false,
            single_writer: false,
        }
    }

    #[test]
    fn consumers_are_the_targets_published_from_the_shared_mount() {
        let mut st = State::default();
        st.stages.insert("/s/a".into(), stage("vol/a", "k1"));
        st.stages.insert("/s/b".into(), stage("vol/b", "k1"));
        st.stages.insert("/s/c".into(), stage("other", "k2"));
        st.publishes.insert("/t/2".into(), publish("vol/b", "/s/b"));
        st.publishes.insert("/t/1".into(), publish("vol/a", "/s/a"));
        st.publishes.insert("/t/3".into(), publish("other", "/s/c"));
        // A publication whose staging path is gone counts for nobody.
        st.publishes
            .insert("/t/4".into(), publish("vol/a", "/s/gone"));
        let c = consumers_of(&st, "k1");
        assert_eq!(
            c,
            vec![
                Consumer {
                    volume_id: "vol/a".into(),
                    target_path: "/t/1".into()
                },
                Consumer {
                    volume_id: "vol/b".into(),
                    target_path: "/t/2".into()
                },
            ]
        );
        assert_eq!(consumers_of(&st, "k2").len(), 1);
        assert!(consumers_of(&st, "k3").is_empty());
    }

    #[test]
    fn a_single_node_single_writer_volume_has_one_target() {
        let mut st = State::default();
        assert_eq!(single_writer_conflict(&st, "vol/a", true), None);
        st.publishes.insert("/t/1".into(), publish("vol/a", "/s/a"));
        // Another target of a multi-writer publication: fine, unless the new one is
        // single-writer.
        assert_eq!(single_writer_conflict(&st, "vol/a", false), None);
        assert_eq!(
            single_writer_conflict(&st, "vol/a", true),
            Some("/t/1".to_string())
        );
        let mut sw = publish("vol/b", "/s/b");
        sw.single_writer = true;
        st.publishes.insert("/t/2".into(), sw);
        assert_eq!(
            single_writer_conflict(&st, "vol/b", false),
            Some("/t/2".to_string())
        );
        assert_eq!(single_writer_conflict(&st, "vol/c", true), None);
    }

    #[test]
    fn a_released_volume_directory_loses_its_credentials_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("v1");
        std::fs::create_dir_all(v.join("mnt")).unwrap();
        for f in ["spec.json", "client.log"] {
            std::fs::write(v.join(f), b"{}").unwrap();
        }
        remove_volume_dir(&v);
        assert!(!v.exists(), "volume directory left");
        // Something unknown in it (or in its mount point): only the plugin's own files go.
        std::fs::create_dir_all(v.join("mnt")).unwrap();
        std::fs::write(v.join("spec.json"), b"{}").unwrap();
        std::fs::write(v.join("mnt/data"), b"user data").unwrap();
        remove_volume_dir(&v);
        assert!(!v.join("spec.json").exists(), "credentials left");
        assert_eq!(std::fs::read(v.join("mnt/data")).unwrap(), b"user data");
    }

    #[test]
    fn saved_specs_of_earlier_versions_still_load() {
        let old = r#"{"metaurl":"sqlite:///x","access_key":null,"secret_key":null,"session_token":null,"options":[]}"#;
        let s: SavedSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s.pod, PodParams::default());
    }
}
