//! Volumes: formatting a new one and opening an existing one (metadata + object store),
//! with the checks and error messages a user sees from `strata format` and `strata mount`.

use std::sync::Arc;

use bytes::Bytes;

use crate::meta::{
    FORMAT_VERSION, FileKind, Format, Ino, Meta, MetaError, MetaSettings, ROOT_INO, open_engine,
};
use crate::metrics::Metrics;
use crate::object::{
    MirrorStore, ObjectError, ObjectStore, PreferStore, RetrySettings, StorageConfig, layered,
    open_store,
};

/// Errors of opening or formatting a volume; each names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("object storage {store}: {source}")]
    Object {
        store: String,
        #[source]
        source: ObjectError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Options of `strata format`.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub name: String,
    pub storage: StorageConfig,
    /// Block size in KiB.
    pub block_size_kib: u32,
    /// Capacity in GiB (0 = unlimited).
    pub capacity_gib: u64,
    pub inodes: u64,
}

/// A volume opened for use: metadata, format and the (instrumented, retrying) object store.
pub struct Volume {
    pub meta: Arc<Meta>,
    pub format: Format,
    /// `mirror` as a plain store: what the file system reads and writes through.
    pub store: Arc<dyn ObjectStore>,
    /// The primary store and, when the volume has one, its mirror; follows the settings.
    pub mirror: Arc<MirrorStore>,
}

/// Per-client choices about the object store (`strata mount` flags).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Keys replacing those stored in the volume for the primary store.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Which store reads try first when the volume is mirrored.
    pub prefer: PreferStore,
}

fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "invalid volume name {name:?}: use 3-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )))
    }
}

fn random_uuid() -> String {
    let a: u128 = rand::random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Check that the object store is reachable with these credentials: put, read back and
/// delete a probe object under the volume's prefix (only a listing when `read_only`).
pub fn probe_store(
    store: &dyn ObjectStore,
    volume: &str,
    read_only: bool,
) -> Result<(), VolumeError> {
    let err = |source| VolumeError::Object {
        store: store.describe(),
        source,
    };
    if read_only {
        return store
            .list(&format!("{volume}/"), None, 1)
            .map(|_| ())
            .map_err(err);
    }
    store.init().map_err(err)?;
    let key = format!("{volume}/.probe-{:016x}", rand::random::<u64>());
    store
        .put(&key, Bytes::from_static(b"strata"))
        .map_err(err)?;
    let got = store.get(&key, 0, None).map_err(err)?;
    store.delete(&key).map_err(err)?;
    if got.as_ref() != b"strata" {
        return Err(VolumeError::Invalid(format!(
            "object storage {} returned different bytes than were written to {key}",
            store.describe()
        )));
    }
    Ok(())
}

/// `strata format`: create the volume (or accept the same name again). Returns the stored
/// format and whether this call created it (`false`: the volume existed and nothing changed).
pub fn format(
    meta_url: &str,
    opts: &FormatOptions,
    metrics: Arc<Metrics>,
) -> Result<(Format, bool), VolumeError> {
    check_name(&opts.name)?;
    let bs = opts.block_size_kib;
    if !(64..=16384).contains(&bs) || !bs.is_power_of_two() {
        return Err(VolumeError::Invalid(format!(
            "--block-size {bs} KiB is not supported: use a power of two from 64 to 16384 (default 4096)"
        )));
    }
    let raw = open_store(&opts.storage).map_err(|source| VolumeError::Object {
        store: format!("{} {}", opts.storage.storage, opts.storage.bucket),
        source,
    })?;
    let store = layered(raw, metrics.clone(), RetrySettings::default());
    probe_store(&*store, &opts.name, false)?;
    let meta = Meta::new(open_engine(meta_url)?, metrics, MetaSettings::default());
    let fmt = Format {
        name: opts.name.clone(),
        uuid: random_uuid(),
        version: FORMAT_VERSION,
        block_size: bs << 10,
        capacity: opts.capacity_gib << 30,
        inodes: opts.inodes,
        storage: opts.storage.clone(),
        mirror: None,
        trash_days: 0,
    };
    let stored = meta.format(&fmt)?;
    let created = stored.uuid == fmt.uuid;
    Ok((stored, created))
}

/// Open a formatted volume: metadata engine, stored format, object store (probed; without
/// writing anything when `read_only`).
pub fn open(
    meta_url: &str,
    metrics: Arc<Metrics>,
    settings: MetaSettings,
    retry: RetrySettings,
    read_only: bool,
) -> Result<Volume, VolumeError> {
    open_with(
        meta_url,
        metrics,
        settings,
        retry,
        read_only,
        &StoreOptions::default(),
    )
}

/// [`open`] with this client's store options.
pub fn open_with(
    meta_url: &str,
    metrics: Arc<Metrics>,
    settings: MetaSettings,
    retry: RetrySettings,
    read_only: bool,
    opts: &StoreOptions,
) -> Result<Volume, VolumeError> {
    let meta = Arc::new(Meta::new(open_engine(meta_url)?, metrics.clone(), settings));
    let format = meta.load()?;
    if !read_only {
        // Tables added since the volume was formatted (same format version) are created here.
        meta.engine().init_schema()?;
    }
    let mut cfg = format.storage.clone();
    if let Some(k) = &opts.access_key {
        cfg.access_key = Some(k.clone());
    }
    if let Some(k) = &opts.secret_key {
        cfg.secret_key = Some(k.clone());
    }
    let raw = open_store(&cfg).map_err(|source| VolumeError::Object {
        store: format!("{} {}", cfg.storage, cfg.bucket),
        source,
    })?;
    let primary = layered(raw, metrics.clone(), retry);
    probe_store(&*primary, &format.name, read_only)?;
    let mirror = MirrorStore::new(&meta, &format, primary, &cfg, metrics, retry, opts.prefer);
    Ok(Volume {
        meta,
        format,
        store: mirror.clone(),
        mirror,
    })
}

/// Resolve a path inside the volume (for `--subdir`) to a directory inode.
pub fn resolve_dir(meta: &Meta, path: &str) -> Result<Ino, VolumeError> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(VolumeError::Invalid(format!("{path}: '..' is not allowed")));
        }
        let n = meta.lookup(ino, part.as_bytes()).map_err(|e| match e {
            MetaError::NotFound => VolumeError::Invalid(format!(
                "{path}: {part} does not exist in the volume; create it first (mount the volume root and mkdir -p it)"
            )),
            e => e.into(),
        })?;
        if n.kind != FileKind::Dir {
            return Err(VolumeError::Invalid(format!(
                "{path}: {part} is not a directory"
            )));
        }
        ino = n.ino;
    }
    Ok(ino)
}

/// What `strata destroy` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestroyReport {
    pub objects: u64,
    pub bytes: u64,
}

/// `strata destroy`: delete every object of the volume (from its mirror too) and drop its
/// metadata tables. Refused while clients are connected unless `force`.
pub fn destroy(
    meta_url: &str,
    metrics: Arc<Metrics>,
    force: bool,
    progress: &mut dyn FnMut(&DestroyReport),
) -> Result<DestroyReport, VolumeError> {
    let meta = Meta::new(
        open_engine(meta_url)?,
        metrics.clone(),
        MetaSettings::default(),
    );
    let format = meta.load()?;
    let now = crate::meta::now_ns() / 1_000_000_000;
    let live: Vec<String> = meta
        .sessions()?
        .into_iter()
        .filter(|(_, hb, _)| *hb >= now)
        .map(|(sid, _, info)| format!("session {sid} ({info})"))
        .collect();
    if !live.is_empty() && !force {
        return Err(VolumeError::Invalid(format!(
            "volume {} has {} connected clients: unmount them first, or pass --force: {}",
            format.name,
            live.len(),
            live.join(", ")
        )));
    }
    let mut report = DestroyReport::default();
    let prefix = format!("{}/", format.name);
    for cfg in std::iter::once(&format.storage).chain(format.mirror.as_ref()) {
        let raw = open_store(cfg).map_err(|source| VolumeError::Object {
            store: format!("{} {}", cfg.storage, cfg.bucket),
            source,
        })?;
        let store = layered(raw, metrics.clone(), RetrySettings::default());
        let err = |source| VolumeError::Object {
            store: store.describe(),
            source,
        };
        loop {
            // Deleting from the start: each page lists what is left.
            let page = store.list(&prefix, None, 1000).map_err(err)?;
            if page.is_empty() {
                break;
            }
            let failed = parking_lot::Mutex::new(None);
            crate::object::for_each_parallel(&page, 16, |o| {
                if let Err(e) = store.delete(&o.key) {
                    *failed.lock() = Some(e);
                }
            });
            if let Some(e) = failed.into_inner() {
                return Err(err(e));
            }
            report.objects += page.len() as u64;
            report.bytes += page.iter().map(|o| o.size).sum::<u64>();
            progress(&report);
        }
    }
    meta.engine().drop_schema()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(name: &str, dir: &std::path::Path) -> FormatOptions {
        FormatOptions {
            name: name.to_string(),
            storage: StorageConfig {
                storage: "file".into(),
                bucket: dir.join("data").display().to_string(),
                access_key: None,
                secret_key: None,
                region: None,
            },
            block_size_kib: 4096,
            capacity_gib: 0,
            inodes: 0,
        }
    }

    #[test]
    fn format_tells_a_new_volume_from_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/meta.db", dir.path().display());
        let m = Arc::new(Metrics::new());
        let (first, created) = format(&url, &opts("vol1", dir.path()), m.clone()).unwrap();
        assert!(created);
        let mut again = opts("vol1", dir.path());
        again.block_size_kib = 1024;
        let (second, created) = format(&url, &again, m.clone()).unwrap();
        assert!(!created, "the same name again changes nothing");
        assert_eq!(second.uuid, first.uuid);
        assert_eq!(second.block_size, 4096 << 10, "stored settings are kept");
        let err = format(&url, &opts("other", dir.path()), m).unwrap_err();
        assert!(
            err.to_string()
                .contains("already formatted as volume 'vol1'"),
            "{err}"
        );
    }
}
