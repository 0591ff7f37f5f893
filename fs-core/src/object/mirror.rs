//! A volume's object store with an optional mirror (docs/FORMAT.md §16, docs/MIGRATION.md):
//! every new object goes to both stores, reads fall back from one to the other, and the
//! pair follows the volume's settings while mounted, so `strata config --mirror` and
//! `--switch-primary` bind running mounts within seconds. The copier brings a new mirror up
//! to date with the objects that existed before it, and drains the backlog of objects one
//! of the stores missed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::{
    ObjectError, ObjectInfo, ObjectStore, Result, RetrySettings, StorageConfig, layered, open_store,
};
use crate::meta::{Format, Meta, MetaError};
use crate::metrics::Metrics;

/// The setting holding the copier's progress ([`CopyState`]).
const COPY_STATE: &str = "mirror_copy";
/// Objects listed per page by the copier.
const PAGE: usize = 1000;

/// Which store a mount reads from first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferStore {
    #[default]
    Primary,
    Mirror,
}

impl std::str::FromStr for PreferStore {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "primary" => Ok(PreferStore::Primary),
            "mirror" => Ok(PreferStore::Mirror),
            _ => Err(format!(
                "--prefer-store {s:?}: use primary (default) or mirror"
            )),
        }
    }
}

/// Errors of mirror administration (config, switch, copier).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("object storage {store}: {source}")]
    Object {
        store: String,
        #[source]
        source: ObjectError,
    },
    #[error("{0}")]
    Refused(String),
}

/// A short stable name of a store's location (kind and bucket, no credentials).
pub fn store_id(cfg: &StorageConfig) -> String {
    // FNV-1a, 64 bits: stable across builds and platforms.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in cfg.storage.bytes().chain([b':']).chain(cfg.bucket.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Where a location is, for people (no credentials).
pub fn store_url(cfg: &StorageConfig) -> String {
    format!("{} {}", cfg.storage, cfg.bucket)
}

#[derive(Clone)]
struct Side {
    id: String,
    store: Arc<dyn ObjectStore>,
}

#[derive(Clone)]
struct Stores {
    primary: Side,
    mirror: Option<Side>,
}

impl Stores {
    fn ids(&self) -> (String, Option<String>) {
        (
            self.primary.id.clone(),
            self.mirror.as_ref().map(|m| m.id.clone()),
        )
    }
}

/// The object store of a mounted volume: the primary, and the mirror when one is set.
pub struct MirrorStore {
    volume: String,
    meta: Weak<Meta>,
    metrics: Arc<Metrics>,
    retry: RetrySettings,
    prefer: PreferStore,
    /// This client's credentials for one location (`strata mount --access-key`).
    key_override: Option<(String, StorageConfig)>,
    stores: RwLock<Stores>,
}

impl MirrorStore {
    /// Wrap the (layered) `primary` opened from `fmt.storage`; opens the mirror if `fmt` has
    /// one, and registers with `meta` to follow later changes of the settings.
    pub fn new(
        meta: &Arc<Meta>,
        fmt: &Format,
        primary: Arc<dyn ObjectStore>,
        primary_cfg: &StorageConfig,
        metrics: Arc<Metrics>,
        retry: RetrySettings,
        prefer: PreferStore,
    ) -> Arc<MirrorStore> {
        let me = Arc::new(MirrorStore {
            volume: fmt.name.clone(),
            meta: Arc::downgrade(meta),
            metrics,
            retry,
            prefer,
            key_override: Some((store_id(primary_cfg), primary_cfg.clone())),
            stores: RwLock::new(Stores {
                primary: Side {
                    id: store_id(primary_cfg),
                    store: primary,
                },
                mirror: None,
            }),
        });
        me.apply(fmt);
        let weak = Arc::downgrade(&me);
        meta.on_format(move |f| {
            if let Some(m) = weak.upgrade() {
                m.apply(f);
            }
        });
        me
    }

    fn open_side(&self, cfg: &StorageConfig, current: &Stores) -> Result<Side> {
        let id = store_id(cfg);
        if current.primary.id == id {
            return Ok(current.primary.clone());
        }
        if let Some(m) = current.mirror.as_ref().filter(|m| m.id == id) {
            return Ok(m.clone());
        }
        let cfg = match &self.key_override {
            Some((oid, o)) if *oid == id => o.clone(),
            _ => cfg.clone(),
        };
        let raw = open_store(&cfg)?;
        Ok(Side {
            id,
            store: layered(raw, self.metrics.clone(), self.retry),
        })
    }

    /// Follow the volume's settings: open, swap or drop stores as `fmt` says.
    pub fn apply(&self, fmt: &Format) {
        let want = (store_id(&fmt.storage), fmt.mirror.as_ref().map(store_id));
        let current = self.stores.read().clone();
        if current.ids() != want {
            let opened = self.open_side(&fmt.storage, &current).and_then(|p| {
                let m = match &fmt.mirror {
                    Some(c) => Some(self.open_side(c, &current)?),
                    None => None,
                };
                Ok(Stores {
                    primary: p,
                    mirror: m,
                })
            });
            match opened {
                Ok(s) => {
                    tracing::info!(volume = %self.volume, primary = %s.primary.store.describe(),
                        mirror = %s.mirror.as_ref().map(|m| m.store.describe()).unwrap_or_else(|| "none".into()),
                        "object stores changed");
                    *self.stores.write() = s;
                }
                Err(e) => {
                    tracing::error!(volume = %self.volume, error = %e,
                        "cannot open the object store named by the volume settings; keeping the current ones");
                    return;
                }
            }
        }
        if let Some(meta) = self.meta.upgrade() {
            meta.set_stores_applied(self.applied());
        }
    }

    /// `stores=PRIMARY[+MIRROR]`, sent with the session.
    pub fn applied(&self) -> String {
        let s = self.stores.read();
        match &s.mirror {
            Some(m) => format!("stores={}+{}", s.primary.id, m.id),
            None => format!("stores={}", s.primary.id),
        }
    }

    /// The primary and mirror stores as they are now.
    pub fn sides(&self) -> (Arc<dyn ObjectStore>, Option<Arc<dyn ObjectStore>>) {
        let s = self.stores.read();
        (
            s.primary.store.clone(),
            s.mirror.as_ref().map(|m| m.store.clone()),
        )
    }

    /// Stores in the order reads try them.
    fn read_order(&self) -> (Arc<dyn ObjectStore>, Option<Arc<dyn ObjectStore>>) {
        let (p, m) = self.sides();
        match (self.prefer, m) {
            (PreferStore::Mirror, Some(m)) => (m, Some(p)),
            (_, m) => (p, m),
        }
    }

    fn record_backlog(&self, key: &str) -> Result<()> {
        let Some(meta) = self.meta.upgrade() else {
            return Err(ObjectError::Other(
                "the volume is closing; cannot record the mirror backlog".into(),
            ));
        };
        meta.txn(true, |tx| tx.backlog_add(key, crate::meta::now_ns()))
            .map_err(|e| ObjectError::Other(format!("recording {key} in the mirror backlog: {e}")))
    }
}

impl ObjectStore for MirrorStore {
    fn describe(&self) -> String {
        let s = self.stores.read();
        match &s.mirror {
            Some(m) => format!(
                "{} (mirrored to {})",
                s.primary.store.describe(),
                m.store.describe()
            ),
            None => s.primary.store.describe(),
        }
    }
    fn init(&self) -> Result<()> {
        self.sides().0.init()
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let (first, second) = self.read_order();
        match first.get(key, off, len) {
            Err(e) if second.is_some() => second.unwrap().get(key, off, len).map_err(|_| e),
            r => r,
        }
    }
    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let (first, second) = self.read_order();
        let mut delivered = 0u64;
        let r = first.get_stream(key, off, &mut |b| {
            delivered += b.len() as u64;
            sink(b)
        });
        match (r, second) {
            (Err(e), Some(second)) => {
                // Resume where the first store stopped.
                second
                    .get_stream(key, off + delivered, sink)
                    .map(|n| n + delivered)
                    .map_err(|_| e)
            }
            (r, _) => r,
        }
    }
    fn map(&self, key: &str, off: u64, len: u64) -> Option<Result<Bytes>> {
        let (first, second) = self.read_order();
        match (first.map(key, off, len), second) {
            (Some(Err(e)), Some(second)) => Some(second.get(key, off, Some(len)).map_err(|_| e)),
            (r, _) => r,
        }
    }
    fn prefers_map(&self) -> bool {
        self.read_order().0.prefers_map()
    }
    fn will_need(&self, key: &str) {
        self.read_order().0.will_need(key)
    }
    fn done_with(&self, key: &str) {
        self.read_order().0.done_with(key)
    }
    fn sync(&self, keys: &[String]) -> Result<()> {
        let (p, m) = self.sides();
        p.sync(keys)?;
        if let Some(m) = m {
            m.sync(keys)?;
        }
        Ok(())
    }
    /// Returns when the primary has the object and the mirror has it too, or its absence
    /// is recorded in the backlog (durably, in the metadata) for the copier.
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let before = self.stores.read().clone();
        match &before.mirror {
            None => before.primary.store.put(key, data)?,
            Some(m) => {
                let (p, m) = std::thread::scope(|s| {
                    let d = data.clone();
                    let mh = s.spawn(move || m.store.put(key, d));
                    let p = before.primary.store.put(key, data);
                    let m = mh.join().unwrap_or_else(|_| {
                        Err(ObjectError::Other("mirror upload thread panicked".into()))
                    });
                    (p, m)
                });
                p?;
                if let Err(e) = m {
                    self.metrics.mirror_deferred();
                    tracing::warn!(volume = %self.volume, key, error = %e,
                        "the mirror did not take the object; recorded in the backlog for the copier");
                    self.record_backlog(key)?;
                }
            }
        }
        // The settings changed while the object was uploaded: a store may lack it.
        if self.stores.read().ids() != before.ids() {
            self.record_backlog(key)?;
        }
        Ok(())
    }
    fn delete(&self, key: &str) -> Result<()> {
        let (p, m) = self.sides();
        p.delete(key)?;
        if let Some(m) = m
            && let Err(e) = m.delete(key)
        {
            tracing::warn!(volume = %self.volume, key, error = %e,
                "deleting from the mirror failed; `strata gc` on it finds the leftover");
        }
        Ok(())
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let (first, second) = self.read_order();
        match first.head(key) {
            Err(e) if second.is_some() => second.unwrap().head(key).map_err(|_| e),
            r => r,
        }
    }
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        self.sides().0.list(prefix, start_after, limit)
    }
}

// ------------------------------------------------------------------------------ copier

/// Progress of bringing a mirror up to date, stored in the setting `mirror_copy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CopyState {
    /// [`store_id`] of the mirror this state is about.
    pub mirror: String,
    /// Objects up to this key (under the volume's prefix) have been compared.
    pub cursor: String,
    pub listed: u64,
    pub copied: u64,
    pub bytes: u64,
    /// The listing pass has finished and the backlog was empty once after it: every object
    /// the primary has is in the mirror, and new ones go to both.
    pub done: bool,
    /// Unix seconds.
    pub started: i64,
    pub finished: i64,
    /// Who runs the copier now, and until when (unix seconds) unless renewed.
    pub owner: String,
    pub lease_until: i64,
}

fn now_secs() -> i64 {
    crate::meta::now_ns() / 1_000_000_000
}

/// The copier's stored progress (default when none).
pub fn copy_state(meta: &Meta) -> std::result::Result<CopyState, MetaError> {
    let raw = meta.txn(false, |tx| tx.get_setting(COPY_STATE))?;
    Ok(raw
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_default())
}

fn save_state(meta: &Meta, st: &CopyState) -> std::result::Result<(), MetaError> {
    let json = serde_json::to_string(st).map_err(|e| MetaError::Engine(e.to_string()))?;
    meta.txn(true, |tx| tx.set_setting(COPY_STATE, &json))
}

/// Objects that may be missing from one of the stores.
pub fn backlog(meta: &Meta) -> std::result::Result<u64, MetaError> {
    meta.txn(false, |tx| tx.backlog_count())
}

/// Take (or renew) the copier lease for `owner`; `false` if another holds it.
fn take_lease(meta: &Meta, owner: &str, mirror: &str) -> std::result::Result<bool, MetaError> {
    meta.txn(true, |tx| {
        let mut st: CopyState = tx
            .get_setting(COPY_STATE)?
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default();
        if st.mirror != mirror {
            st = CopyState {
                mirror: mirror.to_string(),
                started: now_secs(),
                ..Default::default()
            };
        }
        if st.owner != owner && st.lease_until > now_secs() {
            return Ok(false);
        }
        st.owner = owner.to_string();
        st.lease_until = now_secs() + 60;
        let json = serde_json::to_string(&st).map_err(|e| MetaError::Engine(e.to_string()))?;
        tx.set_setting(COPY_STATE, &json)?;
        Ok(true)
    })
}

/// Every live client writes to both stores (its session says `stores=P+M`).
fn all_clients_mirror(meta: &Meta, applied: &str) -> std::result::Result<Vec<String>, MetaError> {
    let now = now_secs();
    let own = meta.session_id();
    Ok(meta
        .sessions()?
        .into_iter()
        .filter(|(sid, hb, info)| {
            *sid != own && *hb >= now && !info.split_whitespace().any(|w| w == applied)
        })
        .map(|(sid, _, info)| format!("session {sid} ({info})"))
        .collect())
}

/// What one call of [`Copier::run_once`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyReport {
    pub state: CopyState,
    /// Objects still in the backlog.
    pub backlog: u64,
    /// Why the pass did not run (another copier holds the lease, clients not yet writing
    /// to the mirror), if it did not.
    pub waiting: Option<String>,
}

/// Brings the mirror up to date: a listing pass over the primary, then the backlog.
pub struct Copier {
    pub meta: Arc<Meta>,
    pub store: Arc<MirrorStore>,
    /// Lease owner name (`session N` for a mount, `strata mirror HOST:PID` for the CLI).
    pub owner: String,
    pub threads: usize,
    pub stop: Arc<AtomicBool>,
}

/// `store.list`, the error naming the store.
fn list_named(
    store: &dyn ObjectStore,
    prefix: &str,
    after: Option<&str>,
) -> std::result::Result<Vec<ObjectInfo>, MirrorError> {
    store
        .list(prefix, after, PAGE)
        .map_err(|source| MirrorError::Object {
            store: store.describe(),
            source,
        })
}

fn copy_object(from: &dyn ObjectStore, to: &dyn ObjectStore, key: &str) -> Result<Option<u64>> {
    match from.get(key, 0, None) {
        Ok(b) => {
            let n = b.len() as u64;
            to.put(key, b)?;
            Ok(Some(n))
        }
        Err(ObjectError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Copier {
    /// One step: if there is a mirror and this copier holds the lease, compare and copy
    /// until the pass is done (or `stop`), then drain the backlog. Progress is saved after
    /// every page, so a copier that dies is resumed by the next one where it stopped.
    pub fn run_once(
        &self,
        progress: &mut dyn FnMut(&CopyState, u64),
    ) -> std::result::Result<CopyReport, MirrorError> {
        let (primary, mirror) = self.store.sides();
        let Some(mirror) = mirror else {
            return Ok(CopyReport {
                waiting: Some("the volume has no mirror".into()),
                ..Default::default()
            });
        };
        let applied = self.store.applied();
        let mirror_id = applied
            .rsplit_once('+')
            .map(|(_, m)| m.to_string())
            .unwrap_or_default();
        if !take_lease(&self.meta, &self.owner, &mirror_id)? {
            let st = copy_state(&self.meta)?;
            return Ok(CopyReport {
                waiting: Some(format!("{} is copying", st.owner)),
                backlog: backlog(&self.meta)?,
                state: st,
            });
        }
        let mut st = copy_state(&self.meta)?;
        if !st.done {
            let lagging = all_clients_mirror(&self.meta, &applied)?;
            if !lagging.is_empty() {
                return Ok(CopyReport {
                    waiting: Some(format!(
                        "waiting for clients to write to the mirror too: {}",
                        lagging.join(", ")
                    )),
                    backlog: backlog(&self.meta)?,
                    state: st,
                });
            }
            let prefix = format!("{}/", self.store.volume);
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return Ok(CopyReport {
                        backlog: backlog(&self.meta)?,
                        state: st,
                        waiting: Some("stopped".into()),
                    });
                }
                let after = (!st.cursor.is_empty()).then_some(st.cursor.as_str());
                let page = list_named(&*primary, &prefix, after)?;
                let Some(last) = page.last().map(|o| o.key.clone()) else {
                    break;
                };
                // What the mirror has in the same key range.
                let mut have = std::collections::HashMap::new();
                let mut m_after = st.cursor.clone();
                loop {
                    let a = (!m_after.is_empty()).then_some(m_after.as_str());
                    let mp = list_named(&*mirror, &prefix, a)?;
                    let n = mp.len();
                    let mut beyond = false;
                    for o in mp {
                        if o.key > last {
                            beyond = true;
                            break;
                        }
                        m_after = o.key.clone();
                        have.insert(o.key, o.size);
                    }
                    if beyond || n < PAGE {
                        break;
                    }
                }
                let todo: Vec<&ObjectInfo> = page
                    .iter()
                    .filter(|o| have.get(&o.key) != Some(&o.size))
                    .collect();
                let copied = std::sync::atomic::AtomicU64::new(0);
                let bytes = std::sync::atomic::AtomicU64::new(0);
                let failed = parking_lot::Mutex::new(None);
                super::for_each_parallel(&todo, self.threads, |o| {
                    match copy_object(&*primary, &*mirror, &o.key) {
                        Ok(Some(n)) => {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => *failed.lock() = Some((o.key.clone(), e)),
                    }
                });
                if let Some((key, source)) = failed.into_inner() {
                    return Err(MirrorError::Object {
                        store: format!("copying {key} to {}", mirror.describe()),
                        source,
                    });
                }
                let (copied, bytes) = (copied.into_inner(), bytes.into_inner());
                self.store.metrics.mirror_copied(copied, bytes);
                st.listed += page.len() as u64;
                st.copied += copied;
                st.bytes += bytes;
                st.cursor = last;
                st.owner = self.owner.clone();
                st.lease_until = now_secs() + 60;
                save_state(&self.meta, &st)?;
                progress(&st, 0);
            }
        }
        let left = self.drain_backlog(&*primary, &*mirror)?;
        if !st.done && left == 0 {
            st.done = true;
            st.finished = now_secs();
            tracing::info!(volume = %self.store.volume, objects = st.listed, copied = st.copied,
                bytes = st.bytes, "the mirror is up to date");
        }
        st.lease_until = now_secs() + 60;
        save_state(&self.meta, &st)?;
        progress(&st, left);
        Ok(CopyReport {
            state: st,
            backlog: left,
            waiting: None,
        })
    }

    /// Make every backlog object present in both stores; returns how many remain.
    fn drain_backlog(
        &self,
        primary: &dyn ObjectStore,
        mirror: &dyn ObjectStore,
    ) -> std::result::Result<u64, MirrorError> {
        let mut after = String::new();
        loop {
            let keys = self.meta.txn(false, |tx| tx.backlog_list(&after, 256))?;
            let Some(last) = keys.last().cloned() else {
                break;
            };
            for key in keys {
                let in_p = primary.head(&key).is_ok();
                let in_m = mirror.head(&key).is_ok();
                let r = match (in_p, in_m) {
                    (true, false) => copy_object(primary, mirror, &key).map(|_| ()),
                    (false, true) => copy_object(mirror, primary, &key).map(|_| ()),
                    _ => Ok(()),
                };
                match r {
                    Ok(()) => self.meta.txn(true, |tx| tx.backlog_delete(&key))?,
                    Err(e) => {
                        tracing::warn!(volume = %self.store.volume, key = %key, error = %e,
                            "copying a backlog object failed, will retry");
                    }
                }
            }
            after = last;
        }
        Ok(backlog(&self.meta)?)
    }

    /// Run in the background of a mount: a step every `every` while the store lives.
    pub fn spawn(self, every: Duration) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("mirror-copier".into())
            .spawn(move || {
                while !self.stop.load(Ordering::Relaxed) {
                    if self.store.sides().1.is_some() {
                        match self.run_once(&mut |_, _| {}) {
                            Ok(r) => self.store.metrics.mirror_backlog(r.backlog),
                            Err(e) => tracing::warn!(volume = %self.store.volume, error = %e,
                                "mirror copier failed, will retry"),
                        }
                    } else {
                        self.store.metrics.mirror_backlog(0);
                    }
                    let mut slept = Duration::ZERO;
                    while slept < every && !self.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(200));
                        slept += Duration::from_millis(200);
                    }
                }
            })
            .expect("spawn the mirror copier")
    }
}

// ------------------------------------------------------------------------ administration

/// `strata config --mirror`: set (or with `None`, remove) the mirror of a volume.
/// Removing refuses while the backlog is not empty unless `force`.
pub fn set_mirror(
    meta: &Meta,
    mirror: Option<StorageConfig>,
    force: bool,
) -> std::result::Result<Format, MirrorError> {
    let current = meta.load()?;
    if let Some(m) = &mirror {
        if store_id(m) == store_id(&current.storage) {
            return Err(MirrorError::Refused(format!(
                "the mirror {} is the volume's primary store; give another bucket or directory",
                store_url(m)
            )));
        }
        let raw = open_store(m).map_err(|source| MirrorError::Object {
            store: store_url(m),
            source,
        })?;
        crate::volume::probe_store(&*raw, &current.name, false).map_err(|e| {
            MirrorError::Refused(format!("the mirror {} is not usable: {e}", store_url(m)))
        })?;
    } else if current.mirror.is_some() && !force {
        let n = backlog(meta)?;
        if n > 0 {
            return Err(MirrorError::Refused(format!(
                "{n} objects are in the mirror backlog (one store may lack them): wait until `strata status` shows a backlog of 0, or pass --force"
            )));
        }
    }
    let fmt = meta.update_format(|f| f.mirror = mirror.clone())?;
    if mirror.is_none() {
        meta.txn(true, |tx| {
            tx.set_setting(COPY_STATE, "")?;
            loop {
                let keys = tx.backlog_list("", 1000)?;
                if keys.is_empty() {
                    break;
                }
                for k in keys {
                    tx.backlog_delete(&k)?;
                }
            }
            Ok(())
        })?;
    }
    Ok(fmt)
}

/// `strata config --switch-primary`: the mirror becomes the primary and the primary the
/// mirror (still written, so nothing is lost if clients switch at different moments).
/// Refused unless the copier has finished and the backlog is empty.
pub fn switch_primary(meta: &Meta) -> std::result::Result<Format, MirrorError> {
    let fmt = meta.txn(true, |tx| {
        let raw = tx
            .get_setting("format")?
            .ok_or_else(|| MetaError::NotFormatted(meta.engine().describe()))?;
        let mut fmt: Format =
            serde_json::from_str(&raw).map_err(|e| MetaError::Format(e.to_string()))?;
        let Some(mirror) = fmt.mirror.clone() else {
            return Ok(Err(MirrorError::Refused(
                "the volume has no mirror: add one with `strata config META_URL --mirror URL` first".into(),
            )));
        };
        let st: CopyState = tx
            .get_setting(COPY_STATE)?
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default();
        if st.mirror != store_id(&mirror) || !st.done {
            return Ok(Err(MirrorError::Refused(format!(
                "the mirror {} is not up to date yet ({} objects compared so far): wait until `strata status` says the copy is done",
                store_url(&mirror),
                st.listed
            ))));
        }
        let n = tx.backlog_count()?;
        if n > 0 {
            return Ok(Err(MirrorError::Refused(format!(
                "{n} objects are in the mirror backlog: wait until `strata status` shows a backlog of 0"
            ))));
        }
        fmt.mirror = Some(std::mem::replace(&mut fmt.storage, mirror));
        // The old primary holds every object: the new mirror is up to date.
        let new = CopyState {
            mirror: store_id(fmt.mirror.as_ref().expect("set above")),
            done: true,
            started: now_secs(),
            finished: now_secs(),
            ..Default::default()
        };
        let json = serde_json::to_string(&fmt).map_err(|e| MetaError::Engine(e.to_string()))?;
        tx.set_setting("format", &json)?;
        let sj = serde_json::to_string(&new).map_err(|e| MetaError::Engine(e.to_string()))?;
        tx.set_setting(COPY_STATE, &sj)?;
        Ok(Ok(fmt))
    })??;
    meta.load()?;
    Ok(fmt)
}

/// Stop flag shared with a [`Copier`].
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::MemEngine;
    use crate::meta::conformance::formatted;

    fn mem_cfg(bucket: &str) -> StorageConfig {
        StorageConfig {
            storage: "mem".into(),
            bucket: bucket.into(),
            access_key: None,
            secret_key: None,
            region: None,
        }
    }

    fn setup() -> (Arc<Meta>, Arc<MirrorStore>) {
        let meta = Arc::new(formatted(Box::new(MemEngine::new()), 0));
        let fmt = meta.load().unwrap();
        let primary: Arc<dyn ObjectStore> = Arc::new(super::super::MemStore::new());
        let store = MirrorStore::new(
            &meta,
            &fmt,
            primary,
            &fmt.storage,
            Arc::new(Metrics::new()),
            RetrySettings::default(),
            PreferStore::Primary,
        );
        (meta, store)
    }

    fn copier(meta: &Arc<Meta>, store: &Arc<MirrorStore>) -> Copier {
        Copier {
            meta: meta.clone(),
            store: store.clone(),
            owner: "test".into(),
            threads: 4,
            stop: stop_flag(),
        }
    }

    #[test]
    fn a_mirror_gets_old_and_new_objects_and_can_become_the_primary() {
        let (meta, store) = setup();
        for i in 0..2500 {
            store
                .put(
                    &format!("conformance/old/{i:05}"),
                    Bytes::from(vec![i as u8; 10]),
                )
                .unwrap();
        }
        assert!(matches!(
            switch_primary(&meta),
            Err(MirrorError::Refused(m)) if m.contains("no mirror")
        ));
        set_mirror(&meta, Some(mem_cfg("far")), false).unwrap();
        // The settings bind the store at once (mounts: on their next reload).
        let (primary, mirror) = store.sides();
        let mirror = mirror.expect("mirror opened");
        store
            .put("conformance/new", Bytes::from_static(b"both"))
            .unwrap();
        assert_eq!(
            &mirror.get("conformance/new", 0, None).unwrap()[..],
            b"both"
        );
        assert!(mirror.head("conformance/old/00000").is_err());
        assert!(matches!(
            switch_primary(&meta),
            Err(MirrorError::Refused(m)) if m.contains("not up to date")
        ));
        let r = copier(&meta, &store).run_once(&mut |_, _| {}).unwrap();
        assert_eq!(r.waiting, None);
        assert!(r.state.done, "{r:?}");
        // 2,500 old objects and the new one were compared; only the old ones copied.
        assert_eq!((r.state.listed, r.state.copied), (2501, 2500));
        assert_eq!(
            &mirror.get("conformance/old/02499", 0, None).unwrap()[..],
            &[0xc3; 10]
        );
        // A second pass copies nothing.
        let r = copier(&meta, &store).run_once(&mut |_, _| {}).unwrap();
        assert_eq!(r.state.copied, 2500);

        // Objects one store lacks are read from the other.
        primary.delete("conformance/old/00007").unwrap();
        assert_eq!(
            &store.get("conformance/old/00007", 0, None).unwrap()[..],
            &[7; 10]
        );

        // The backlog blocks the switch and the detach; the copier repairs it.
        meta.txn(true, |tx| tx.backlog_add("conformance/old/00007", 1))
            .unwrap();
        assert!(matches!(
            switch_primary(&meta),
            Err(MirrorError::Refused(m)) if m.contains("backlog")
        ));
        assert!(matches!(
            set_mirror(&meta, None, false),
            Err(MirrorError::Refused(m)) if m.contains("backlog")
        ));
        let r = copier(&meta, &store).run_once(&mut |_, _| {}).unwrap();
        assert_eq!(r.backlog, 0);
        assert!(primary.head("conformance/old/00007").is_ok());

        let fmt = switch_primary(&meta).unwrap();
        assert_eq!(fmt.storage.bucket, "far");
        let (p2, m2) = store.sides();
        assert!(Arc::ptr_eq(&p2, &mirror) && Arc::ptr_eq(&m2.unwrap(), &primary));
        store
            .put("conformance/after", Bytes::from_static(b"x"))
            .unwrap();
        assert!(primary.head("conformance/after").is_ok());
        set_mirror(&meta, None, false).unwrap();
        assert!(store.sides().1.is_none());
        assert_eq!(
            store.applied(),
            format!("stores={}", store_id(&mem_cfg("far")))
        );
    }

    #[test]
    fn the_copier_waits_for_every_client_to_write_to_the_mirror() {
        let (meta, store) = setup();
        // Another client, alive, that has not applied the mirror yet.
        meta.txn(true, |tx| {
            tx.put_session(999, i64::MAX / 2, "host=other pid=1 stores=0123")
        })
        .unwrap();
        set_mirror(&meta, Some(mem_cfg("far")), false).unwrap();
        let r = copier(&meta, &store).run_once(&mut |_, _| {}).unwrap();
        assert!(r.waiting.unwrap().contains("session 999"));
        assert!(!r.state.done);
        let applied = store.applied();
        meta.txn(true, |tx| {
            tx.put_session(999, i64::MAX / 2, &format!("host=other pid=1 {applied}"))
        })
        .unwrap();
        let r = copier(&meta, &store).run_once(&mut |_, _| {}).unwrap();
        assert!(r.state.done && r.waiting.is_none(), "{r:?}");
        // A second copier does not run while the first holds the lease.
        let mut other = copier(&meta, &store);
        other.owner = "other".into();
        let r = other.run_once(&mut |_, _| {}).unwrap();
        assert!(r.waiting.unwrap().contains("test is copying"));
    }

    #[test]
    fn a_mirror_equal_to_the_primary_or_unreachable_is_refused() {
        let (meta, _store) = setup();
        let fmt = meta.load().unwrap();
        assert!(matches!(
            set_mirror(&meta, Some(fmt.storage.clone()), false),
            Err(MirrorError::Refused(m)) if m.contains("primary")
        ));
        let bad = StorageConfig {
            storage: "file".into(),
            bucket: "/proc/strata-no-such-dir/x".into(),
            ..mem_cfg("")
        };
        let e = set_mirror(&meta, Some(bad), false).unwrap_err().to_string();
        assert!(e.contains("/proc/strata-no-such-dir/x"), "{e}");
        assert!(meta.load().unwrap().mirror.is_none());
    }
}
