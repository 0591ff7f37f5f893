//! The operator's file-system actions (format or adopt a volume, read its usage, directory
//! quotas, emptying a volume) behind one small trait: [`StrataFs`] calls the fs-core library
//! in-process, [`MemFs`] is an in-memory stand-in for reconcile tests. Calls are blocking;
//! controllers run them on the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use strata::meta::{Ctx, FileKind, Ino, Meta, MetaError, MetaSettings, ROOT_INO, open_engine};
use strata::metrics::Metrics;
use strata::object::mirror::{self as smirror, MirrorError};
use strata::object::{RetrySettings, StorageConfig};
use strata::volume::{self, FormatOptions, VolumeError};

/// How to reach a volume: the contents of its Secret. Never printed with the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct FsTarget {
    pub meta_url: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Every key of the Secret (datasets name theirs), values never printed.
    pub data: BTreeMap<String, String>,
}

impl fmt::Debug for FsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsTarget")
            .field("meta_url", &strata::meta::redact_url(&self.meta_url))
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("data", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A source to attach (`spec.datasets[]`, keys resolved from the Secret).
#[derive(Clone, PartialEq, Eq)]
pub struct DatasetRequest {
    pub path: String,
    pub source: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub refresh_secs: u64,
}

impl fmt::Debug for DatasetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatasetRequest")
            .field("path", &self.path)
            .field("source", &self.source)
            .field("endpoint", &self.endpoint)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// An attached source as found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetState {
    pub path: String,
    pub source: String,
    pub attachment: u32,
}

/// The stores `spec.storage`, `spec.mirror` and `spec.primary` ask for.
#[derive(Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    pub primary: StorageConfig,
    pub mirror: Option<StorageConfig>,
}

impl fmt::Debug for MirrorRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MirrorRequest")
            .field("primary", &strata::object::mirror::store_url(&self.primary))
            .field(
                "mirror",
                &self.mirror.as_ref().map(strata::object::mirror::store_url),
            )
            .finish()
    }
}

/// The volume's stores and the mirror copy, as found after acting on a [`MirrorRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorState {
    /// `Copying`, `InSync`, `Switching`, `Detaching` or `Detached`.
    pub phase: String,
    pub primary: String,
    pub mirror: Option<String>,
    pub copy_done: bool,
    pub objects_compared: u64,
    pub objects_copied: u64,
    pub bytes_copied: u64,
    pub backlog: u64,
    pub copier: Option<String>,
    /// Why a step waits (or what the user should do).
    pub message: Option<String>,
    /// What this call changed, for an event: `MirrorAdded`, `PrimarySwitched`,
    /// `MirrorDetached`.
    pub changed: Option<String>,
}

/// The step that brings the stores `(primary, mirror)` (store ids) to what is wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorStep {
    Nothing,
    SetMirror,
    Switch,
    Detach,
}

/// Decide the next step (pure: the same for the library and the in-memory stand-in).
pub fn mirror_step(
    cur: (&str, Option<&str>),
    want: (&str, Option<&str>),
) -> Result<MirrorStep, String> {
    if want.0 == cur.0 {
        return Ok(match (want.1, cur.1) {
            (w, c) if w == c => MirrorStep::Nothing,
            (Some(_), _) => MirrorStep::SetMirror,
            (None, Some(_)) => MirrorStep::Detach,
            (None, None) => MirrorStep::Nothing,
        });
    }
    if Some(want.0) == cur.1 {
        return Ok(MirrorStep::Switch);
    }
    Err("the wanted primary store is neither the volume's primary nor its mirror: add it as spec.mirror first, let it catch up, then set spec.primary: Mirror".into())
}

/// What the Volume spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub name: String,
    /// `file` or `s3`.
    pub storage: String,
    pub bucket: String,
    pub region: Option<String>,
    pub block_size_kib: u32,
    /// 0 = unlimited.
    pub capacity_gib: u64,
    /// 0 = unlimited.
    pub inodes: u64,
}

/// A formatted volume as found or created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: String,
    pub block_size_kib: u32,
    /// Whether this call formatted it (false: it existed and was adopted).
    pub formatted: bool,
    /// Whether this call changed the capacity or inode limit.
    pub limits_changed: bool,
}

/// Usage of a whole volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub used_bytes: u64,
    pub used_inodes: u64,
    /// 0 = unlimited.
    pub capacity_bytes: u64,
    /// 0 = unlimited.
    pub inodes: u64,
    /// Clients (mounts, gateways) with a live session.
    pub clients: u64,
}

/// A directory quota and its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirQuota {
    pub path: String,
    pub used_bytes: u64,
    pub used_inodes: u64,
    /// 0 = no limit.
    pub limit_bytes: u64,
    /// 0 = no limit.
    pub limit_inodes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// The metadata holds another volume: never reformatted.
    #[error(
        "the metadata URL already holds volume {existing:?}, not {wanted:?}: set spec.name to {existing:?} to adopt it, or use another metadata URL"
    )]
    NameMismatch { existing: String, wanted: String },
    /// A request the file system refuses (bad name, block size, path).
    #[error("{0}")]
    Invalid(String),
    /// The metadata engine or object store failed (retried with backoff).
    #[error("{0}")]
    Backend(String),
}

impl FsError {
    /// Whether retrying without a spec change can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, FsError::Backend(_))
    }
}

impl From<VolumeError> for FsError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Invalid(m) => FsError::Invalid(m),
            VolumeError::Meta(m) => m.into(),
            e => FsError::Backend(e.to_string()),
        }
    }
}

impl From<MetaError> for FsError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Format(m) => FsError::Invalid(m),
            MetaError::Invalid(m) => FsError::Invalid(m.to_string()),
            MetaError::NotDir => FsError::Invalid("a path component is not a directory".into()),
            e => FsError::Backend(e.to_string()),
        }
    }
}

/// File-system actions of the operator.
pub trait FsOps: Send + Sync + 'static {
    /// Format the volume if the metadata is empty; adopt it if it holds a volume of the same
    /// name (applying the capacity and inode limits); refuse another name.
    fn ensure_volume(&self, t: &FsTarget, req: &VolumeRequest) -> Result<VolumeInfo, FsError>;
    /// Usage of the volume (also checks the object store is reachable).
    fn usage(&self, t: &FsTarget) -> Result<Usage, FsError>;
    /// Create `path` (and its parents) if missing and set its directory quota.
    fn set_dir_quota(
        &self,
        t: &FsTarget,
        path: &str,
        limit_bytes: u64,
        limit_inodes: u64,
    ) -> Result<DirQuota, FsError>;
    /// Remove the quota of `path` (the directory and its files stay). Missing is fine.
    fn remove_dir_quota(&self, t: &FsTarget, path: &str) -> Result<(), FsError>;
    /// Remove every file of the volume and delete its objects from the store.
    fn empty_volume(&self, t: &FsTarget) -> Result<(), FsError>;
    /// Attach the wanted sources (creating their parent directories), re-attach one whose
    /// source, endpoint, keys or refresh changed, and detach those of `managed` (paths this
    /// operator attached before) no longer wanted.
    fn ensure_datasets(
        &self,
        t: &FsTarget,
        wanted: &[DatasetRequest],
        managed: &[String],
    ) -> Result<Vec<DatasetState>, FsError>;
    /// Add, switch to or detach the mirror as `req` says, one safe step at a time: a switch
    /// waits until the mirror is up to date, a detach until the backlog is empty (the state
    /// says so in `message`).
    fn ensure_mirror(&self, t: &FsTarget, req: &MirrorRequest) -> Result<MirrorState, FsError>;
}

// -------------------------------------------------------------------------- real library

/// The fs-core library, in-process.
#[derive(Default)]
pub struct StrataFs {
    metrics: Arc<Metrics>,
}

impl StrataFs {
    pub fn new() -> Self {
        StrataFs {
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn meta(&self, t: &FsTarget) -> Result<Meta, FsError> {
        let meta = Meta::new(
            open_engine(&t.meta_url)?,
            self.metrics.clone(),
            MetaSettings::default(),
        );
        meta.load()?;
        Ok(meta)
    }
}

/// A Volume with SQLite metadata names where the database lives; create its directory (the
/// operator runs as 65532, the owner of a volume's local files, so mount Pods running as
/// 65532 can write there too). Other URLs are left alone.
/// Sessions whose heartbeat deadline (seconds since the epoch) has not passed.
fn live_sessions(sessions: &[(u64, i64, String)]) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    sessions.iter().filter(|(_, hb, _)| *hb >= now).count() as u64
}

fn create_sqlite_dir(meta_url: &str) -> Result<(), FsError> {
    let Some(path) = meta_url.strip_prefix("sqlite://") else {
        return Ok(());
    };
    let path = std::path::Path::new(path.split('?').next().unwrap_or_default());
    match path.parent() {
        Some(dir) if dir.is_absolute() && !dir.exists() => std::fs::create_dir_all(dir)
            .map_err(|e| FsError::Backend(format!("creating {}: {e}", dir.display()))),
        _ => Ok(()),
    }
}

fn split_path(path: &str) -> Result<Vec<&str>, FsError> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(FsError::Invalid(format!("{path}: '..' is not allowed")));
    }
    Ok(parts)
}

fn mkdir_p(meta: &Meta, path: &str) -> Result<Ino, FsError> {
    let mut ino = ROOT_INO;
    for part in split_path(path)? {
        let node = match meta.lookup(ino, part.as_bytes()) {
            Ok(n) => n,
            Err(MetaError::NotFound) => {
                match meta.mknod(
                    Ctx::ROOT,
                    ino,
                    part.as_bytes(),
                    FileKind::Dir,
                    0o755,
                    0,
                    None,
                ) {
                    Ok(n) => n,
                    // Created by someone else meanwhile.
                    Err(MetaError::Exists) => meta.lookup(ino, part.as_bytes())?,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        if node.kind != FileKind::Dir {
            return Err(FsError::Invalid(format!(
                "{path}: {part} exists in the volume and is not a directory"
            )));
        }
        ino = node.ino;
    }
    Ok(ino)
}

fn remove_tree(meta: &Meta, dir: Ino) -> Result<(), FsError> {
    loop {
        let page = meta.readdir(dir, None, 1000)?;
        if page.is_empty() {
            return Ok(());
        }
        for e in page {
            if e.kind == FileKind::Dir {
                remove_tree(meta, e.ino)?;
                meta.rmdir(dir, &e.name)?;
            } else {
                meta.unlink(dir, &e.name)?;
            }
        }
    }
}

impl FsOps for StrataFs {
    fn ensure_volume(&self, t: &FsTarget, req: &VolumeRequest) -> Result<VolumeInfo, FsError> {
        create_sqlite_dir(&t.meta_url)?;
        let meta = Meta::new(
            open_engine(&t.meta_url)?,
            self.metrics.clone(),
            MetaSettings::default(),
        );
        match meta.load() {
            Ok(fmt) => {
                if fmt.name != req.name {
                    return Err(FsError::NameMismatch {
                        existing: fmt.name,
                        wanted: req.name.clone(),
                    });
                }
                let capacity = req.capacity_gib << 30;
                let limits_changed = fmt.capacity != capacity || fmt.inodes != req.inodes;
                let fmt = if limits_changed {
                    meta.update_format(|f| {
                        f.capacity = capacity;
                        f.inodes = req.inodes;
                    })?
                } else {
                    fmt
                };
                Ok(VolumeInfo {
                    name: fmt.name,
                    uuid: fmt.uuid,
                    block_size_kib: fmt.block_size >> 10,
                    formatted: false,
                    limits_changed,
                })
            }
            Err(MetaError::NotFormatted(_)) => {
                let opts = FormatOptions {
                    name: req.name.clone(),
                    storage: StorageConfig {
                        storage: req.storage.clone(),
                        bucket: req.bucket.clone(),
                        access_key: t.access_key.clone(),
                        secret_key: t.secret_key.clone(),
                        region: req.region.clone(),
                    },
                    block_size_kib: req.block_size_kib,
                    capacity_gib: req.capacity_gib,
                    inodes: req.inodes,
                };
                let (fmt, _) = volume::format(&t.meta_url, &opts, self.metrics.clone())?;
                Ok(VolumeInfo {
                    name: fmt.name,
                    uuid: fmt.uuid,
                    block_size_kib: fmt.block_size >> 10,
                    formatted: true,
                    limits_changed: false,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn usage(&self, t: &FsTarget) -> Result<Usage, FsError> {
        // Opening read-only probes the object store (a listing) without writing.
        let vol = volume::open(
            &t.meta_url,
            self.metrics.clone(),
            MetaSettings::default(),
            RetrySettings::default(),
            true,
        )?;
        Ok(Usage {
            used_bytes: vol.meta.counter("used_space")?.max(0) as u64,
            used_inodes: vol.meta.counter("used_inodes")?.max(0) as u64,
            capacity_bytes: vol.format.capacity,
            inodes: vol.format.inodes,
            clients: live_sessions(&vol.meta.sessions()?),
        })
    }

    fn set_dir_quota(
        &self,
        t: &FsTarget,
        path: &str,
        limit_bytes: u64,
        limit_inodes: u64,
    ) -> Result<DirQuota, FsError> {
        let meta = self.meta(t)?;
        let dir = mkdir_p(&meta, path)?;
        let q = match meta.get_quota(dir)? {
            Some(q) if q.max_space == limit_bytes && q.max_inodes == limit_inodes => q,
            _ => meta.set_quota(dir, limit_bytes, limit_inodes)?,
        };
        Ok(DirQuota {
            path: path.to_string(),
            used_bytes: q.used_space.max(0) as u64,
            used_inodes: q.used_inodes.max(0) as u64,
            limit_bytes: q.max_space,
            limit_inodes: q.max_inodes,
        })
    }

    fn remove_dir_quota(&self, t: &FsTarget, path: &str) -> Result<(), FsError> {
        let meta = self.meta(t)?;
        let dir = match volume::resolve_dir(&meta, path) {
            Ok(d) => d,
            // The directory is gone: so is its quota.
            Err(VolumeError::Invalid(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if meta.get_quota(dir)?.is_some() {
            meta.delete_quota(dir)?;
        }
        Ok(())
    }

    fn ensure_datasets(
        &self,
        t: &FsTarget,
        wanted: &[DatasetRequest],
        managed: &[String],
    ) -> Result<Vec<DatasetState>, FsError> {
        let meta = self.meta(t)?;
        let current = meta.attachments()?;
        let clean = |p: &str| format!("/{}", p.trim_matches('/'));
        for path in managed {
            if !wanted.iter().any(|w| clean(&w.path) == clean(path))
                && let Some(a) = current.iter().find(|a| clean(&a.path) == clean(path))
            {
                meta.detach(a.id)?;
            }
        }
        let mut out = Vec::new();
        for w in wanted {
            let path = clean(&w.path);
            let want = strata::source::Attachment {
                id: 0,
                ino: 0,
                path: path.clone(),
                source: w.source.clone(),
                endpoint: w.endpoint.clone(),
                region: w.region.clone(),
                access_key: w.access_key.clone(),
                secret_key: w.secret_key.clone(),
                path_style: true,
                refresh_secs: w.refresh_secs,
                read_only: true,
            };
            if let Some(a) = current.iter().find(|a| clean(&a.path) == path) {
                let same = strata::source::Attachment {
                    id: a.id,
                    ino: a.ino,
                    ..want.clone()
                };
                if *a == same {
                    out.push(DatasetState {
                        path,
                        source: a.source.clone(),
                        attachment: a.id,
                    });
                    continue;
                }
                meta.detach(a.id)?;
            }
            let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if !parent.is_empty() {
                mkdir_p(&meta, parent)?;
            }
            let a = strata::source::attach_at(&meta, &path, want)
                .map_err(|e| FsError::Invalid(format!("dataset {path}: {e}")))?;
            out.push(DatasetState {
                path,
                source: a.source,
                attachment: a.id,
            });
        }
        Ok(out)
    }

    fn ensure_mirror(&self, t: &FsTarget, req: &MirrorRequest) -> Result<MirrorState, FsError> {
        let meta = self.meta(t)?;
        let fmt = meta.load()?;
        let id = smirror::store_id;
        let cur_p = id(&fmt.storage);
        let cur_m = fmt.mirror.as_ref().map(id);
        let want_p = id(&req.primary);
        let want_m = req.mirror.as_ref().map(id);
        let step = mirror_step((&cur_p, cur_m.as_deref()), (&want_p, want_m.as_deref()))
            .map_err(FsError::Invalid)?;
        let mut out = MirrorState::default();
        let refused = |e: MirrorError| -> Result<String, FsError> {
            match e {
                MirrorError::Refused(m) => Ok(m),
                MirrorError::Meta(e) => Err(e.into()),
                e @ MirrorError::Object { .. } => Err(FsError::Backend(e.to_string())),
            }
        };
        let mut waiting = None;
        match step {
            MirrorStep::Nothing => {}
            MirrorStep::SetMirror => {
                smirror::set_mirror(&meta, req.mirror.clone(), false).map_err(
                    |e| match refused(e) {
                        Ok(m) => FsError::Invalid(m),
                        Err(e) => e,
                    },
                )?;
                out.changed = Some("MirrorAdded".into());
            }
            MirrorStep::Switch => match smirror::switch_primary(&meta) {
                Ok(_) => out.changed = Some("PrimarySwitched".into()),
                Err(e) => waiting = Some(("Switching", refused(e)?)),
            },
            MirrorStep::Detach => match smirror::set_mirror(&meta, None, false) {
                Ok(_) => out.changed = Some("MirrorDetached".into()),
                Err(e) => waiting = Some(("Detaching", refused(e)?)),
            },
        }
        let fmt = meta.load()?;
        let st = smirror::copy_state(&meta)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        out.primary = smirror::store_url(&fmt.storage);
        out.mirror = fmt.mirror.as_ref().map(smirror::store_url);
        out.backlog = smirror::backlog(&meta)?;
        if let Some(m) = &fmt.mirror {
            out.copy_done = st.done && st.mirror == id(m);
            out.objects_compared = st.listed;
            out.objects_copied = st.copied;
            out.bytes_copied = st.bytes;
            out.copier = (st.lease_until > now && !st.owner.is_empty()).then(|| st.owner.clone());
        }
        out.phase = match (&waiting, &fmt.mirror) {
            (Some((phase, msg)), _) => {
                out.message = Some(msg.clone());
                phase.to_string()
            }
            (None, None) => "Detached".into(),
            (None, Some(_)) if out.copy_done => "InSync".into(),
            (None, Some(_)) => {
                if out.copier.is_none() {
                    out.message = Some(format!(
                        "no client of the volume is copying: mount it (any PVC of it), or run `strata mirror {}` as a Job",
                        strata::meta::redact_url(&t.meta_url)
                    ));
                }
                "Copying".into()
            }
        };
        Ok(out)
    }

    fn empty_volume(&self, t: &FsTarget) -> Result<(), FsError> {
        let vol = volume::open(
            &t.meta_url,
            self.metrics.clone(),
            MetaSettings::default(),
            RetrySettings::default(),
            false,
        )?;
        // Attached sources' trees are read-only: detached first (their buckets are not
        // the volume's and are left alone).
        for a in vol.meta.attachments()? {
            vol.meta.detach(a.id)?;
        }
        remove_tree(&vol.meta, ROOT_INO)?;
        let prefix = format!("{}/", vol.format.name);
        loop {
            let objs = vol
                .store
                .list(&prefix, None, 1000)
                .map_err(|e| FsError::Backend(e.to_string()))?;
            if objs.is_empty() {
                return Ok(());
            }
            for o in objs {
                vol.store
                    .delete(&o.key)
                    .map_err(|e| FsError::Backend(e.to_string()))?;
            }
        }
    }
}

// ------------------------------------------------------------------------- in-memory fake

/// One volume of [`MemFs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemVolume {
    pub name: String,
    pub uuid: String,
    pub block_size_kib: u32,
    pub capacity_gib: u64,
    pub inodes: u64,
    pub usage: Usage,
    /// Directory quotas by path.
    pub quotas: BTreeMap<String, DirQuota>,
    pub emptied: bool,
    /// Attached sources by path.
    pub datasets: BTreeMap<String, DatasetState>,
}

/// The stores of a volume in [`MemFs`]: `(store id, bucket)` each.
#[derive(Debug, Clone, Default)]
pub struct MemMirror {
    pub primary: (String, String),
    pub mirror: Option<(String, String)>,
    pub copy_done: bool,
    pub backlog: u64,
}

/// In-memory [`FsOps`] for tests: volumes keyed by metadata URL, a log of calls, and a
/// queue of errors to return.
#[derive(Default)]
pub struct MemFs {
    /// Stores of mirrored volumes by metadata URL (tests set `copy_done`/`backlog`).
    pub mirrors: Mutex<HashMap<String, MemMirror>>,
    pub volumes: Mutex<HashMap<String, MemVolume>>,
    pub calls: Mutex<Vec<String>>,
    pub fail: Mutex<Vec<FsError>>,
}

impl MemFs {
    fn begin(&self, call: String) -> Result<(), FsError> {
        self.calls.lock().push(call);
        let mut f = self.fail.lock();
        if f.is_empty() {
            Ok(())
        } else {
            Err(f.remove(0))
        }
    }

    fn with<R>(
        &self,
        t: &FsTarget,
        f: impl FnOnce(&mut MemVolume) -> Result<R, FsError>,
    ) -> Result<R, FsError> {
        let mut vols = self.volumes.lock();
        let v = vols.get_mut(&t.meta_url).ok_or_else(|| {
            FsError::Invalid(format!(
                "the metadata at {} is not formatted",
                strata::meta::redact_url(&t.meta_url)
            ))
        })?;
        f(v)
    }
}

impl FsOps for MemFs {
    fn ensure_volume(&self, t: &FsTarget, req: &VolumeRequest) -> Result<VolumeInfo, FsError> {
        self.begin(format!("ensure_volume {}", req.name))?;
        let mut vols = self.volumes.lock();
        if let Some(v) = vols.get_mut(&t.meta_url) {
            if v.name != req.name {
                return Err(FsError::NameMismatch {
                    existing: v.name.clone(),
                    wanted: req.name.clone(),
                });
            }
            let limits_changed = v.capacity_gib != req.capacity_gib || v.inodes != req.inodes;
            v.capacity_gib = req.capacity_gib;
            v.inodes = req.inodes;
            v.usage.capacity_bytes = req.capacity_gib << 30;
            v.usage.inodes = req.inodes;
            return Ok(VolumeInfo {
                name: v.name.clone(),
                uuid: v.uuid.clone(),
                block_size_kib: v.block_size_kib,
                formatted: false,
                limits_changed,
            });
        }
        let n = vols.len() + 1;
        let v = MemVolume {
            name: req.name.clone(),
            uuid: format!("00000000-0000-0000-0000-{n:012}"),
            block_size_kib: req.block_size_kib,
            capacity_gib: req.capacity_gib,
            inodes: req.inodes,
            usage: Usage {
                used_bytes: 0,
                used_inodes: 1,
                capacity_bytes: req.capacity_gib << 30,
                inodes: req.inodes,
                clients: 0,
            },
            quotas: BTreeMap::new(),
            emptied: false,
            datasets: BTreeMap::new(),
        };
        let info = VolumeInfo {
            name: v.name.clone(),
            uuid: v.uuid.clone(),
            block_size_kib: v.block_size_kib,
            formatted: true,
            limits_changed: false,
        };
        vols.insert(t.meta_url.clone(), v);
        Ok(info)
    }

    fn usage(&self, t: &FsTarget) -> Result<Usage, FsError> {
        self.begin("usage".into())?;
        self.with(t, |v| Ok(v.usage))
    }

    fn set_dir_quota(
        &self,
        t: &FsTarget,
        path: &str,
        limit_bytes: u64,
        limit_inodes: u64,
    ) -> Result<DirQuota, FsError> {
        self.begin(format!("set_dir_quota {path} {limit_bytes} {limit_inodes}"))?;
        split_path(path)?;
        self.with(t, |v| {
            let q = v.quotas.entry(path.to_string()).or_insert(DirQuota {
                path: path.to_string(),
                used_bytes: 0,
                used_inodes: 0,
                limit_bytes,
                limit_inodes,
            });
            q.limit_bytes = limit_bytes;
            q.limit_inodes = limit_inodes;
            Ok(q.clone())
        })
    }

    fn remove_dir_quota(&self, t: &FsTarget, path: &str) -> Result<(), FsError> {
        self.begin(format!("remove_dir_quota {path}"))?;
        self.with(t, |v| {
            v.quotas.remove(path);
            Ok(())
        })
    }

    fn ensure_datasets(
        &self,
        t: &FsTarget,
        wanted: &[DatasetRequest],
        managed: &[String],
    ) -> Result<Vec<DatasetState>, FsError> {
        self.begin(format!(
            "ensure_datasets {}",
            wanted
                .iter()
                .map(|w| format!("{}={}", w.path, w.source))
                .collect::<Vec<_>>()
                .join(",")
        ))?;
        self.with(t, |v| {
            for m in managed {
                if !wanted.iter().any(|w| &w.path == m) {
                    v.datasets.remove(m);
                }
            }
            let mut out = Vec::new();
            for w in wanted {
                let next = v.datasets.len() as u32 + 1;
                let d = v
                    .datasets
                    .entry(w.path.clone())
                    .or_insert_with(|| DatasetState {
                        path: w.path.clone(),
                        source: w.source.clone(),
                        attachment: next,
                    });
                d.source = w.source.clone();
                out.push(d.clone());
            }
            Ok(out)
        })
    }

    fn empty_volume(&self, t: &FsTarget) -> Result<(), FsError> {
        self.begin("empty_volume".into())?;
        self.with(t, |v| {
            v.emptied = true;
            v.datasets.clear();
            v.quotas.clear();
            v.usage.used_bytes = 0;
            v.usage.used_inodes = 1;
            Ok(())
        })
    }

    fn ensure_mirror(&self, t: &FsTarget, req: &MirrorRequest) -> Result<MirrorState, FsError> {
        let id = smirror::store_id;
        let want_p = id(&req.primary);
        let want_m = req.mirror.as_ref().map(id);
        self.begin(format!(
            "ensure_mirror primary={} mirror={}",
            req.primary.bucket,
            req.mirror
                .as_ref()
                .map(|m| m.bucket.as_str())
                .unwrap_or("none")
        ))?;
        self.with(t, |_| Ok(()))?;
        let mut mirrors = self.mirrors.lock();
        let m = mirrors
            .entry(t.meta_url.clone())
            .or_insert_with(|| MemMirror {
                primary: (want_p.clone(), req.primary.bucket.clone()),
                ..Default::default()
            });
        let step = mirror_step(
            (&m.primary.0, m.mirror.as_ref().map(|x| x.0.as_str())),
            (&want_p, want_m.as_deref()),
        )
        .map_err(FsError::Invalid)?;
        let mut out = MirrorState::default();
        match step {
            MirrorStep::Nothing => {}
            MirrorStep::SetMirror => {
                let r = req.mirror.as_ref().expect("SetMirror has a mirror");
                m.mirror = Some((id(r), r.bucket.clone()));
                m.copy_done = false;
                out.changed = Some("MirrorAdded".into());
            }
            MirrorStep::Switch if m.copy_done && m.backlog == 0 => {
                let old = m.primary.clone();
                m.primary = m.mirror.replace(old).expect("Switch has a mirror");
                out.changed = Some("PrimarySwitched".into());
            }
            MirrorStep::Switch => {
                out.phase = "Switching".into();
                out.message = Some("the mirror is not up to date yet".into());
            }
            MirrorStep::Detach if m.backlog == 0 => {
                m.mirror = None;
                out.changed = Some("MirrorDetached".into());
            }
            MirrorStep::Detach => {
                out.phase = "Detaching".into();
                out.message = Some(format!("{} objects are in the mirror backlog", m.backlog));
            }
        }
        out.primary = m.primary.1.clone();
        out.mirror = m.mirror.as_ref().map(|x| x.1.clone());
        out.copy_done = m.mirror.is_some() && m.copy_done;
        out.backlog = m.backlog;
        if out.phase.is_empty() {
            out.phase = match (&m.mirror, m.copy_done) {
                (None, _) => "Detached",
                (Some(_), true) => "InSync",
                (Some(_), false) => "Copying",
            }
            .into();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &std::path::Path) -> FsTarget {
        FsTarget {
            meta_url: format!("sqlite://{}/meta.db", dir.display()),
            access_key: None,
            secret_key: None,
            data: BTreeMap::new(),
        }
    }

    fn request(dir: &std::path::Path, name: &str) -> VolumeRequest {
        VolumeRequest {
            name: name.into(),
            storage: "file".into(),
            bucket: dir.join("data").display().to_string(),
            region: None,
            block_size_kib: 1024,
            capacity_gib: 10,
            inodes: 0,
        }
    }

    /// A SQLite database in a directory that does not exist yet: the directory is created.
    #[test]
    fn strata_fs_creates_the_directory_of_a_sqlite_database() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("volumes/models");
        let info = StrataFs::new()
            .ensure_volume(&target(&dir), &request(&dir, "models"))
            .unwrap();
        assert!(info.formatted);
        assert!(dir.join("meta.db").exists());
    }

    /// The real library on SQLite: format, adopt (never reformat), refuse another name,
    /// tenant quota with directory creation, usage, quota removal, emptying.
    #[test]
    fn strata_fs_adds_switches_and_detaches_a_mirror_one_safe_step_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, fs) = (target(tmp.path()), StrataFs::new());
        let req = request(tmp.path(), "vol-m");
        fs.ensure_volume(&t, &req).unwrap();
        let loc = |d: &str| StorageConfig {
            storage: "file".into(),
            bucket: tmp.path().join(d).display().to_string(),
            access_key: None,
            secret_key: None,
            region: None,
        };
        let (a, b) = (loc("data"), loc("far"));
        let add = MirrorRequest {
            primary: a.clone(),
            mirror: Some(b.clone()),
        };
        let st = fs.ensure_mirror(&t, &add).unwrap();
        assert_eq!(st.changed.as_deref(), Some("MirrorAdded"));
        assert_eq!(st.phase, "Copying");
        assert!(
            st.message
                .unwrap()
                .contains("no client of the volume is copying")
        );
        // Switching before the copy is done waits.
        let switch = MirrorRequest {
            primary: b.clone(),
            mirror: Some(a.clone()),
        };
        let st = fs.ensure_mirror(&t, &switch).unwrap();
        assert_eq!(st.phase, "Switching");
        assert_eq!(st.changed, None);
        // A client copies (here: the copier of a library volume).
        let vol = volume::open(
            &t.meta_url,
            Arc::new(Metrics::new()),
            MetaSettings::default(),
            RetrySettings::default(),
            false,
        )
        .unwrap();
        let r = smirror::Copier {
            meta: vol.meta.clone(),
            store: vol.mirror.clone(),
            owner: "test".into(),
            threads: 2,
            stop: smirror::stop_flag(),
        }
        .run_once(&mut |_, _| {})
        .unwrap();
        assert!(r.state.done, "{r:?}");
        let st = fs.ensure_mirror(&t, &add).unwrap();
        assert_eq!((st.phase.as_str(), st.copy_done), ("InSync", true));
        let st = fs.ensure_mirror(&t, &switch).unwrap();
        assert_eq!(st.changed.as_deref(), Some("PrimarySwitched"));
        assert_eq!(st.primary, smirror::store_url(&b));
        // Retire the old store: spec.storage now names the new one, no mirror.
        let done = MirrorRequest {
            primary: b.clone(),
            mirror: None,
        };
        let st = fs.ensure_mirror(&t, &done).unwrap();
        assert_eq!(st.changed.as_deref(), Some("MirrorDetached"));
        assert_eq!(st.phase, "Detached");
        // A primary that is neither store is refused with the way out.
        let err = fs
            .ensure_mirror(
                &t,
                &MirrorRequest {
                    primary: loc("elsewhere"),
                    mirror: None,
                },
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("add it as spec.mirror first"),
            "{err}"
        );
    }

    #[test]
    fn mirror_steps() {
        use MirrorStep::*;
        assert_eq!(mirror_step(("a", None), ("a", None)), Ok(Nothing));
        assert_eq!(mirror_step(("a", None), ("a", Some("b"))), Ok(SetMirror));
        assert_eq!(
            mirror_step(("a", Some("b")), ("a", Some("c"))),
            Ok(SetMirror)
        );
        assert_eq!(mirror_step(("a", Some("b")), ("b", Some("a"))), Ok(Switch));
        assert_eq!(mirror_step(("a", Some("b")), ("a", None)), Ok(Detach));
        assert!(mirror_step(("a", None), ("b", None)).is_err());
    }

    #[test]
    fn strata_fs_formats_adopts_and_sets_quotas_on_sqlite() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, fs) = (target(tmp.path()), StrataFs::new());
        let first = fs.ensure_volume(&t, &request(tmp.path(), "vol-a")).unwrap();
        assert!(first.formatted);
        assert_eq!(first.block_size_kib, 1024);

        let mut again = request(tmp.path(), "vol-a");
        again.capacity_gib = 20;
        let second = fs.ensure_volume(&t, &again).unwrap();
        assert!(
            !second.formatted,
            "an existing volume is adopted, not reformatted"
        );
        assert!(second.limits_changed);
        assert_eq!(second.uuid, first.uuid);

        let err = fs
            .ensure_volume(&t, &request(tmp.path(), "vol-b"))
            .unwrap_err();
        assert!(matches!(err, FsError::NameMismatch { ref existing, .. } if existing == "vol-a"));

        let q = fs
            .set_dir_quota(&t, "tenants/team-a", 100 << 20, 1000)
            .unwrap();
        assert_eq!((q.limit_bytes, q.limit_inodes), (100 << 20, 1000));
        assert_eq!(q.used_inodes, 0);
        // The volume counts the two directories created (tenants, team-a; not the root).
        let u = fs.usage(&t).unwrap();
        assert_eq!(u.capacity_bytes, 20 << 30);
        assert_eq!(u.used_inodes, 2, "{u:?}");

        // A file created below the quota directory is charged to it.
        let meta = fs.meta(&t).unwrap();
        let dir = volume::resolve_dir(&meta, "tenants/team-a").unwrap();
        meta.mknod(Ctx::ROOT, dir, b"f", FileKind::File, 0o644, 0, None)
            .unwrap();
        let q = fs
            .set_dir_quota(&t, "tenants/team-a", 200 << 20, 1000)
            .unwrap();
        assert_eq!(q.used_inodes, 1);
        assert_eq!(q.limit_bytes, 200 << 20);

        fs.remove_dir_quota(&t, "tenants/team-a").unwrap();
        assert!(meta.get_quota(dir).unwrap().is_none());
        fs.remove_dir_quota(&t, "tenants/none").unwrap();

        let err = fs.set_dir_quota(&t, "tenants/../x", 1, 1).unwrap_err();
        assert!(matches!(err, FsError::Invalid(_)));

        fs.empty_volume(&t).unwrap();
        let meta = fs.meta(&t).unwrap();
        assert!(meta.readdir(ROOT_INO, None, 10).unwrap().is_empty());
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("data/vol-a"))
            .map(|d| d.collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "objects left after emptying: {left:?}");
    }

    #[test]
    fn target_debug_hides_secrets() {
        let t = FsTarget {
            meta_url: "postgres://u:pw@db:5432/x".into(),
            access_key: Some("AK".into()),
            secret_key: Some("SECRET".into()),
            data: BTreeMap::from([("secret-key".to_string(), "SECRET".to_string())]),
        };
        let s = format!("{t:?}");
        assert!(!s.contains("pw@") && !s.contains("SECRET"), "{s}");
    }
}
