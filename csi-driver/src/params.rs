//! StorageClass parameters, secrets and volume ids (documented in docs/CSI.md).

use std::collections::HashMap;
use std::fmt;

use crate::errors::{CsiError, Result};
use crate::mounter::PodParams;

pub const DRIVER_NAME: &str = "csi.strata.io";
/// Volume-context keys set by CreateVolume.
pub const CTX_VOLUME: &str = "strata.io/volume";
pub const CTX_PATH: &str = "strata.io/path";
/// Volume attribute of a static PV: a directory inside the volume.
pub const CTX_SUBDIR: &str = "subdir";
/// Extended attribute recording the onDelete policy of a provisioned directory.
pub const XATTR_ON_DELETE: &[u8] = b"user.strata.csi.on-delete";

/// `strata mount` flags a StorageClass may set in `mountOptions` (`key` or `key=value`).
pub const MOUNT_OPTIONS: &[&str] = &[
    "threads",
    "buffer-size",
    "mem-cache-size",
    "attr-cache",
    "entry-cache",
    "dir-entry-cache",
    "open-cache",
    "max-uploads",
    "gc-grace",
    "no-bgjob",
    "session-timeout",
    "read-only",
    "metrics",
    "cache-dir",
    "cache-size",
    "free-space-ratio",
    "no-cache-written",
    "writeback",
    "upload-delay",
    "random-read-ranges",
    "cache-group",
    "cache-group-addr",
    "no-serve",
    "peer-timeout",
    "hot-replicas",
    "kernel-readahead",
];

/// Secrets of a request (`metaurl` required; object-store keys optional). Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    pub metaurl: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub session_token: Option<String>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets(***)")
    }
}

impl Secrets {
    pub fn parse(m: &HashMap<String, String>) -> Result<Secrets> {
        let metaurl = m
            .get("metaurl")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                CsiError::InvalidArgument(
                    "secret key `metaurl` (the volume's META_URL) is required".into(),
                )
            })?
            .clone();
        Ok(Secrets {
            metaurl,
            access_key: m.get("access-key").cloned(),
            secret_key: m.get("secret-key").cloned(),
            session_token: m.get("session-token").cloned(),
        })
    }

    /// Every variable of the mount client's environment, `None` for a key not given.
    pub fn env_all(&self) -> [(&'static str, Option<&String>); 4] {
        [
            ("STRATA_META_URL", Some(&self.metaurl)),
            ("STRATA_ACCESS_KEY", self.access_key.as_ref()),
            ("STRATA_SECRET_KEY", self.secret_key.as_ref()),
            ("STRATA_SESSION_TOKEN", self.session_token.as_ref()),
        ]
    }

    /// Environment for the mount client (the keys never go on a command line).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_all()
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?.clone())))
            .collect()
    }

    /// A stable key for the Strata volume behind `metaurl`.
    pub fn volume_key(&self) -> String {
        format!("v{:016x}", fnv64(self.metaurl.as_bytes()))
    }

    /// The key of the shared mount (one per node) that serves PVs of this volume with these
    /// client flags and mount Pod settings: PVs that ask for the same get one mount; a PV
    /// whose StorageClass asks for other flags (another `cache-size`, `writeback`, …) gets
    /// a mount of its own instead of silently sharing the first one's. Without flags and
    /// Pod settings it is [`Secrets::volume_key`]; otherwise that key, `-`, and a hash of
    /// both (the order of the flags does not matter: each key appears once).
    pub fn mount_key(&self, options: &[(String, Option<String>)], pod: &PodParams) -> String {
        let base = self.volume_key();
        if options.is_empty() && *pod == PodParams::default() {
            return base;
        }
        let mut sorted: Vec<_> = options.iter().collect();
        sorted.sort();
        let mut text = String::new();
        for (k, v) in sorted {
            text.push_str(&format!("{k}={v:?}\n"));
        }
        text.push_str(&format!(
            "image={:?}\ncpu={:?}\nmemory={:?}\ncache_dir={:?}\n",
            pod.image, pod.cpu, pod.memory, pod.cache_dir
        ));
        let h = fnv64(text.as_bytes());
        format!("{base}-{:08x}", (h >> 32) as u32 ^ h as u32)
    }
}

/// 64-bit FNV-1a (stable across releases: it names mounts that outlive the plugin).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    Delete,
    Retain,
    Archive,
}

impl OnDelete {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        }
    }
    pub fn parse(s: &str) -> Option<OnDelete> {
        match s {
            "delete" => Some(OnDelete::Delete),
            "retain" => Some(OnDelete::Retain),
            "archive" => Some(OnDelete::Archive),
            _ => None,
        }
    }
}

/// StorageClass parameters that NodeStageVolume needs: CreateVolume copies them into the
/// volume context, which is all the node sees of a dynamically provisioned volume.
pub const NODE_PARAMS: &[&str] = &[
    "mountOptions",
    "mountImage",
    "mountCPU",
    "mountMemory",
    "cacheDir",
];

/// The volume context of a new volume: its name and path, and the node-side parameters.
pub fn volume_context(
    volume: &str,
    path: &str,
    parameters: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut ctx = HashMap::from([
        (CTX_VOLUME.to_string(), volume.to_string()),
        (CTX_PATH.to_string(), path.to_string()),
    ]);
    for k in NODE_PARAMS {
        if let Some(v) = parameters.get(*k) {
            ctx.insert(k.to_string(), v.clone());
        }
    }
    ctx
}

/// Parsed StorageClass parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub path_pattern: Option<String>,
    pub on_delete: OnDelete,
    pub mount_options: Vec<(String, Option<String>)>,
    /// `mountImage`, `mountCPU`, `mountMemory`, `cacheDir`: the mount Pod of this volume.
    pub pod: PodParams,
}

impl Params {
    pub fn parse(m: &HashMap<String, String>) -> Result<Params> {
        Self::parse_with_flags(m, &[])
    }

    /// The parameters with the Kubernetes mount options (`mount_flags` of the volume
    /// capability) after the `mountOptions` parameter (see [`mount_options_of`]).
    pub fn parse_with_flags(m: &HashMap<String, String>, flags: &[String]) -> Result<Params> {
        let mut p = Params {
            path_pattern: None,
            on_delete: OnDelete::Delete,
            mount_options: mount_options_of(m.get("mountOptions").map_or("", |s| s), flags)?,
            pod: PodParams {
                image: m.get("mountImage").cloned(),
                cpu: m.get("mountCPU").cloned(),
                memory: m.get("mountMemory").cloned(),
                cache_dir: m.get("cacheDir").cloned(),
            },
        };
        if let Some(s) = m.get("pathPattern") {
            p.path_pattern = Some(s.clone());
        }
        if let Some(s) = m.get("onDelete") {
            p.on_delete = OnDelete::parse(s).ok_or_else(|| {
                CsiError::InvalidArgument(format!(
                    "parameter onDelete={s:?}: use delete, retain or archive"
                ))
            })?;
        }
        Ok(p)
    }
}

/// `cache-size=1024,cache-group=g1,no-bgjob` → flags, each checked against [`MOUNT_OPTIONS`].
pub fn parse_mount_options(s: &str) -> Result<Vec<(String, Option<String>)>> {
    mount_options_of(s, &[])
}

/// The client flags of a volume: the `mountOptions` parameter (a comma list), then the
/// Kubernetes mount options of the StorageClass or PV (`mountOptions:` list, which reaches
/// the driver as the volume capability's `mount_flags`; `key`, `key=value`, a leading `--`
/// is accepted). A key given twice takes its last value, so the list wins over the
/// parameter. Each key is checked against [`MOUNT_OPTIONS`].
pub fn mount_options_of(param: &str, flags: &[String]) -> Result<Vec<(String, Option<String>)>> {
    let items = param
        .split(',')
        .chain(flags.iter().map(String::as_str))
        .map(|i| {
            let i = i.trim();
            i.strip_prefix("--").unwrap_or(i)
        })
        .filter(|i| !i.is_empty());
    let mut out = Vec::new();
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
            None => (item, None),
        };
        if !MOUNT_OPTIONS.contains(&k) {
            return Err(CsiError::InvalidArgument(format!(
                "mountOptions: unknown option {k:?}; known: {}",
                MOUNT_OPTIONS.join(", ")
            )));
        }
        // A later occurrence replaces an earlier one (a StorageClass's options come after
        // its Volume's), so the client never gets a flag twice.
        out.retain(|(key, _)| key != k);
        out.push((k.to_string(), v));
    }
    let has = |key: &str| out.iter().any(|(k, _)| k == key);
    let no_disk_cache = out.iter().any(|(k, v)| {
        k == "cache-size" && v.as_deref().and_then(|v| v.parse::<u64>().ok()) == Some(0)
    });
    if has("writeback") && no_disk_cache {
        return Err(CsiError::InvalidArgument(
            "mountOptions: writeback stages written blocks in the disk cache, which cache-size=0 disables: give cache-size a size in MiB, or drop writeback".into(),
        ));
    }
    if let Some((_, v)) = out.iter().find(|(k, _)| k == "kernel-readahead")
        && v.as_deref().and_then(|v| v.parse::<u64>().ok()).is_none()
    {
        return Err(CsiError::InvalidArgument(format!(
            "mountOptions: kernel-readahead={}: give the kernel readahead in whole MiB, e.g. kernel-readahead=4 (0 keeps the kernel's 128 KiB)",
            v.as_deref().unwrap_or("")
        )));
    }
    if has("upload-delay") && !has("writeback") {
        return Err(CsiError::InvalidArgument(
            "mountOptions: upload-delay delays the uploads of write-back, which is off: add writeback, or drop upload-delay".into(),
        ));
    }
    Ok(out)
}

/// The directory of a new PV: `pathPattern` with `${pvc.namespace}`, `${pvc.name}` and
/// `${pv.name}` substituted.
pub fn pv_path(
    pattern: Option<&str>,
    pv_name: &str,
    params: &HashMap<String, String>,
) -> Result<String> {
    let ns = params.get("csi.storage.k8s.io/pvc/namespace");
    let pvc = params.get("csi.storage.k8s.io/pvc/name");
    let pattern = match (pattern, ns) {
        (Some(p), _) => p.to_string(),
        (None, Some(_)) => "tenants/${pvc.namespace}/${pv.name}".into(),
        (None, None) => "volumes/${pv.name}".into(),
    };
    let mut path = pattern.replace("${pv.name}", pv_name);
    for (var, val) in [("${pvc.namespace}", ns), ("${pvc.name}", pvc)] {
        if path.contains(var) {
            let v = val.ok_or_else(|| {
                CsiError::InvalidArgument(format!(
                    "pathPattern uses {var} but the provisioner did not pass it (run external-provisioner with --extra-create-metadata)"
                ))
            })?;
            path = path.replace(var, v);
        }
    }
    check_path(&path)?;
    Ok(path)
}

/// A relative path inside a volume: no empty, `.` or `..` components.
pub fn check_path(path: &str) -> Result<()> {
    if path.is_empty()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255)
    {
        return Err(CsiError::InvalidArgument(format!(
            "invalid path {path:?} inside the volume"
        )));
    }
    Ok(())
}

/// `volume_id` of a provisioned directory: `<strata volume name>/<path>`.
pub fn volume_id(volume: &str, path: &str) -> String {
    format!("{volume}/{path}")
}

/// Split a provisioned volume id; `None` for an id that is not ours (static PVs).
pub fn split_volume_id(id: &str) -> Option<(&str, &str)> {
    let (v, p) = id.split_once('/')?;
    (!v.is_empty() && check_path(p).is_ok()).then_some((v, p))
}

/// Requested capacity: required, else limit, else 1 GiB; OUT_OF_RANGE when limit < required.
pub fn capacity(required: i64, limit: i64) -> Result<u64> {
    if required < 0 || limit < 0 {
        return Err(CsiError::InvalidArgument("negative capacity".into()));
    }
    if limit > 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {required} > limit_bytes {limit}"
        )));
    }
    Ok(if required > 0 {
        required as u64
    } else if limit > 0 {
        limit as u64
    } else {
        1 << 30
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_options() {
        let mut m = HashMap::new();
        assert_eq!(pv_path(None, "pv1", &m).unwrap(), "volumes/pv1");
        m.insert("csi.storage.k8s.io/pvc/namespace".into(), "ns".into());
        assert_eq!(pv_path(None, "pv1", &m).unwrap(), "tenants/ns/pv1");
        assert!(pv_path(Some("a/${pvc.name}"), "pv1", &m).is_err());
        assert!(pv_path(Some("../x"), "pv1", &m).is_err());
        let o = parse_mount_options("cache-size=1024, cache-group=g1,no-bgjob").unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!(o[2], ("no-bgjob".into(), None));
        let e = parse_mount_options("cache-size=1,bogus=2").unwrap_err();
        assert!(e.to_string().contains("\"bogus\""));
        assert_eq!(
            split_volume_id("vol/tenants/a/pv"),
            Some(("vol", "tenants/a/pv"))
        );
        assert_eq!(split_volume_id("plainhandle"), None);
        assert_eq!(capacity(0, 0).unwrap(), 1 << 30);
        assert!(matches!(capacity(10, 5), Err(CsiError::OutOfRange(_))));
        let s = Secrets::parse(&HashMap::from([("metaurl".into(), "sqlite:///x".into())])).unwrap();
        assert_eq!(format!("{s:?}"), "Secrets(***)");
        assert!(Secrets::parse(&HashMap::new()).is_err());
    }
    #[test]
    fn a_later_mount_option_replaces_an_earlier_one() {
        let o = parse_mount_options("metrics=127.0.0.1:1,writeback,cache-size=5,metrics=0.0.0.0:2")
            .unwrap();
        assert_eq!(
            o,
            vec![
                ("writeback".to_string(), None),
                ("cache-size".to_string(), Some("5".to_string())),
                ("metrics".to_string(), Some("0.0.0.0:2".to_string())),
            ]
        );
    }

    #[test]
    fn writeback_needs_the_disk_cache() {
        assert!(parse_mount_options("writeback,cache-size=2048").is_ok());
        assert!(parse_mount_options("writeback,upload-delay=5m").is_ok());
        assert!(parse_mount_options("upload-delay=5m").is_err());
        let e = parse_mount_options("cache-size=0,writeback").unwrap_err();
        assert!(e.to_string().contains("cache-size=0"), "{e}");
    }

    #[test]
    fn one_shared_mount_per_volume_and_client_settings() {
        let s = Secrets::parse(&HashMap::from([("metaurl".into(), "sqlite:///x".into())])).unwrap();
        let none = PodParams::default();
        // No flags, no Pod settings: the volume's key, as mounts made before flags counted.
        assert_eq!(s.mount_key(&[], &none), s.volume_key());
        assert_eq!(s.volume_key(), "vf399f6cfb416199c");
        let a = parse_mount_options("cache-size=1024,writeback").unwrap();
        let b = parse_mount_options("writeback,cache-size=1024").unwrap();
        let c = parse_mount_options("cache-size=2048,writeback").unwrap();
        let ka = s.mount_key(&a, &none);
        assert!(ka.starts_with(&format!("{}-", s.volume_key())), "{ka}");
        assert_eq!(ka.len(), s.volume_key().len() + 9);
        assert_eq!(ka, s.mount_key(&b, &none));
        assert_ne!(ka, s.mount_key(&c, &none));
        let pod = PodParams {
            cache_dir: Some("/mnt/nvme".into()),
            ..Default::default()
        };
        assert_ne!(s.mount_key(&[], &pod), s.volume_key());
        assert_ne!(s.mount_key(&a, &pod), ka);
        let other =
            Secrets::parse(&HashMap::from([("metaurl".into(), "sqlite:///y".into())])).unwrap();
        assert_ne!(other.mount_key(&a, &none), ka);
    }

    #[test]
    fn the_kubernetes_mount_options_come_after_the_parameter() {
        let flags = [
            "--cache-size=2048".to_string(),
            " writeback ".into(),
            "".into(),
        ];
        let o = mount_options_of("cache-size=1024,no-bgjob", &flags).unwrap();
        assert_eq!(
            o,
            vec![
                ("no-bgjob".to_string(), None),
                ("cache-size".to_string(), Some("2048".to_string())),
                ("writeback".to_string(), None),
            ]
        );
        // Checked together: upload-delay in the list needs writeback from the parameter.
        assert!(mount_options_of("writeback", &["upload-delay=1m".into()]).is_ok());
        assert!(mount_options_of("", &["upload-delay=1m".into()]).is_err());
        let e = mount_options_of("", &["ro".into()]).unwrap_err();
        assert!(e.to_string().contains("\"ro\""), "{e}");
    }
}
