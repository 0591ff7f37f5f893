//! Controller service: a PV is a directory of a Strata volume with a directory quota.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use strata::meta::{Ctx, FileKind, Ino, Meta, MetaError, MetaSettings, ROOT_INO, open_engine};
use strata::metrics::Metrics;
use tonic::{Request, Response, Status};

use crate::csi::{self, controller_server::Controller};
use crate::errors::{CsiError, Result, blocking};
use crate::locks::OpLocks;
use crate::params::{self, CTX_PATH, CTX_VOLUME, OnDelete, Params, Secrets, XATTR_ON_DELETE};

const ROOT: Ctx = Ctx { uid: 0, gid: 0 };

/// Metadata connections, one per META_URL.
#[derive(Default, Clone)]
pub struct Metas(Arc<Mutex<HashMap<String, Arc<Meta>>>>);

impl Metas {
    pub fn get(&self, url: &str) -> Result<Arc<Meta>> {
        if let Some(m) = self.0.lock().get(url) {
            return Ok(m.clone());
        }
        let engine = open_engine(url).map_err(|e| {
            CsiError::InvalidArgument(format!("metaurl: cannot open the metadata engine: {e}"))
        })?;
        let meta = Arc::new(Meta::new(
            engine,
            Arc::new(Metrics::new()),
            MetaSettings::default(),
        ));
        meta.load().map_err(|e| {
            CsiError::FailedPrecondition(format!(
                "metaurl: not a formatted Strata volume ({e}); run `strata format` first"
            ))
        })?;
        self.0.lock().insert(url.to_string(), meta.clone());
        Ok(meta)
    }

    /// [`Metas::get`] from an RPC handler: opening an engine blocks (a PostgreSQL engine
    /// connects and waits on its own runtime, which must not happen on an async worker).
    pub async fn open(&self, url: &str, span: &tracing::Span) -> Result<Arc<Meta>> {
        let metas = self.clone();
        let url = url.to_string();
        blocking(span.clone(), move || metas.get(&url)).await
    }
}

pub struct ControllerService {
    metas: Metas,
    locks: OpLocks,
    /// Used when a request carries no secrets (DeleteVolume, ValidateVolumeCapabilities,
    /// GetCapacity without a secret configured in the StorageClass).
    default_secrets: Option<Secrets>,
}

impl ControllerService {
    pub fn new(metas: Metas, default_secrets: Option<Secrets>) -> Self {
        ControllerService {
            metas,
            locks: OpLocks::default(),
            default_secrets,
        }
    }

    fn secrets(&self, m: &HashMap<String, String>) -> Result<Secrets> {
        match (Secrets::parse(m), &self.default_secrets) {
            (Ok(s), _) => Ok(s),
            (Err(_), Some(d)) if m.is_empty() => Ok(d.clone()),
            (Err(e), _) => Err(e),
        }
    }
}

/// The Kubernetes mount options of a capability (a StorageClass's or PV's `mountOptions:`).
pub fn mount_flags(cap: &csi::VolumeCapability) -> &[String] {
    match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => &m.mount_flags,
        _ => &[],
    }
}

/// Check access modes and access types: mount only, every access mode of a shared file system.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<()> {
    use csi::volume_capability::AccessType;
    if caps.is_empty() {
        return Err(CsiError::InvalidArgument(
            "volume_capabilities are required".into(),
        ));
    }
    for c in caps {
        match &c.access_type {
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && m.fs_type != "strata" && m.fs_type != "fuse.strata" {
                    return Err(CsiError::InvalidArgument(format!(
                        "fs_type {:?} is not supported (Strata is its own file system)",
                        m.fs_type
                    )));
                }
            }
            Some(AccessType::Block(_)) => {
                return Err(CsiError::InvalidArgument(
                    "block access is not supported: Strata is a file system".into(),
                ));
            }
            None => {
                return Err(CsiError::InvalidArgument(
                    "volume capability without an access type".into(),
                ));
            }
        }
        let mode = c.access_mode.as_ref().map_or(0, |m| m.mode);
        if mode == 0 {
            return Err(CsiError::InvalidArgument(
                "volume capability without an access mode".into(),
            ));
        }
    }
    Ok(())
}

/// Resolve `path` (relative to the root) to an inode; `Ok(None)` when a component is missing.
fn resolve(meta: &Meta, path: &str) -> Result<Option<Ino>> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        match meta.lookup(ino, part.as_bytes()) {
            Ok(n) if n.kind == FileKind::Dir => ino = n.ino,
            Ok(_) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "{path}: {part} is not a directory"
                )));
            }
            Err(MetaError::NotFound) => return Ok(None),
            Err(e) => return Err(CsiError::meta(path, e)),
        }
    }
    Ok(Some(ino))
}

fn mkdir_p(meta: &Meta, path: &str) -> Result<Ino> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = match meta.lookup(ino, part.as_bytes()) {
            Ok(n) => n.ino,
            Err(MetaError::NotFound) => {
                match meta.mknod(ROOT, ino, part.as_bytes(), FileKind::Dir, 0o777, 0, None) {
                    Ok(n) => n.ino,
                    Err(MetaError::Exists) => {
                        meta.lookup(ino, part.as_bytes())
                            .map_err(|e| CsiError::meta(path, e))?
                            .ino
                    }
                    Err(e) => return Err(CsiError::meta(path, e)),
                }
            }
            Err(e) => return Err(CsiError::meta(path, e)),
        };
    }
    Ok(ino)
}

/// Delete a tree (depth first), then its directory.
fn remove_tree(meta: &Meta, parent: Ino, name: &[u8]) -> Result<()> {
    let n = match meta.lookup(parent, name) {
        Ok(n) => n,
        Err(MetaError::NotFound) => return Ok(()),
        Err(e) => return Err(CsiError::meta("delete", e)),
    };
    if n.kind == FileKind::Dir && n.rdev != 0 {
        // The directory of an attached source (read-only): detached, which removes its
        // tree; the source's bucket is not the volume's and is left alone.
        let attachments = meta
            .attachments()
            .map_err(|e| CsiError::meta("delete", e))?;
        if let Some(a) = attachments.into_iter().find(|a| a.ino == n.ino) {
            meta.detach(a.id).map_err(|e| CsiError::meta("delete", e))?;
            return Ok(());
        }
    }
    if n.kind == FileKind::Dir {
        loop {
            let entries = meta
                .readdir(n.ino, None, 1000)
                .map_err(|e| CsiError::meta("delete", e))?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                remove_tree(meta, n.ino, &e.name)?;
            }
        }
        let _ = meta.delete_quota(n.ino);
        match meta.rmdir(parent, name) {
            Ok(()) | Err(MetaError::NotFound) => Ok(()),
            Err(e) => Err(CsiError::meta("delete", e)),
        }
    } else {
        match meta.unlink(parent, name) {
            Ok(()) | Err(MetaError::NotFound) => Ok(()),
            Err(e) => Err(CsiError::meta("delete", e)),
        }
    }
}

/// Directory levels below the root that ListVolumes searches for provisioned volumes (the
/// default path patterns put them at levels 2 and 3).
pub const LIST_DEPTH: usize = 4;

/// Provisioned volumes of `meta`: directories carrying [`XATTR_ON_DELETE`] at most
/// [`LIST_DEPTH`] levels deep, not inside another one and not in a `.trash-archive`, as
/// (path, capacity in bytes) sorted by path.
fn provisioned(meta: &Meta) -> Result<Vec<(String, u64)>> {
    let mut out = vec![];
    let mut stack = vec![(ROOT_INO, String::new(), 0usize)];
    while let Some((ino, path, depth)) = stack.pop() {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let entries = meta
                .readdir(ino, after.as_deref(), 1000)
                .map_err(|e| CsiError::meta("listing volumes", e))?;
            let Some(last) = entries.last() else { break };
            after = Some(last.name.clone());
            for e in entries {
                if e.kind != FileKind::Dir || e.name == b".trash-archive" {
                    continue;
                }
                let name = String::from_utf8_lossy(&e.name);
                let p = if path.is_empty() {
                    name.into_owned()
                } else {
                    format!("{path}/{name}")
                };
                if meta.getxattr(e.ino, XATTR_ON_DELETE).is_ok() {
                    let cap = meta
                        .get_quota(e.ino)
                        .map_err(|err| CsiError::meta(&p, err))?
                        .map_or(0, |q| q.max_space);
                    out.push((p, cap));
                } else if depth + 1 < LIST_DEPTH {
                    stack.push((e.ino, p, depth + 1));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One page of `all` from `start` (a decimal index; ABORTED when it is not one of
/// `all`'s) with at most `max` entries (0: all); the next token when more follow.
fn page<T: Clone>(all: &[T], start: &str, max: i32) -> Result<(Vec<T>, String)> {
    let from = if start.is_empty() {
        0
    } else {
        match start.parse::<usize>() {
            Ok(i) if i <= all.len() => i,
            _ => {
                return Err(CsiError::Aborted(format!(
                    "starting_token {start:?} is not a token ListVolumes gave"
                )));
            }
        }
    };
    if max < 0 {
        return Err(CsiError::InvalidArgument("max_entries is negative".into()));
    }
    let to = if max == 0 {
        all.len()
    } else {
        (from + max as usize).min(all.len())
    };
    let next = if to < all.len() {
        to.to_string()
    } else {
        String::new()
    };
    Ok((all[from..to].to_vec(), next))
}

fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("CreateVolume", name = %r.name);
        if r.name.is_empty() {
            return Err(CsiError::InvalidArgument("name is required".into()).into());
        }
        check_capabilities(&r.volume_capabilities)?;
        if r.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(
                "volume content sources (snapshots, clones) are not supported".into(),
            )
            .into());
        }
        let secrets = Secrets::parse(&r.secrets)?;
        let params = Params::parse(&r.parameters)?;
        // The StorageClass's `mountOptions:` are refused here, at provisioning, rather than
        // at the first mount.
        for c in &r.volume_capabilities {
            Params::parse_with_flags(&r.parameters, mount_flags(c))?;
        }
        let cap = r.capacity_range.as_ref().map_or(Ok(1 << 30), |c| {
            params::capacity(c.required_bytes, c.limit_bytes)
        })?;
        let path = params::pv_path(params.path_pattern.as_deref(), &r.name, &r.parameters)?;
        let _g = self.locks.try_lock(&r.name)?;
        let meta = self.metas.open(&secrets.metaurl, &span).await?;
        let p2 = path.clone();
        let on_delete = params.on_delete;
        let volname = blocking(span.clone(), move || {
            let fmt = meta.load().map_err(|e| CsiError::meta("volume", e))?;
            let existing = resolve(&meta, &p2)?;
            let ino = match existing {
                Some(ino) => ino,
                None => mkdir_p(&meta, &p2)?,
            };
            match meta.get_quota(ino).map_err(|e| CsiError::meta(&p2, e))? {
                Some(q) if q.max_space != cap => {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {p2} exists with capacity {} bytes, not {cap}",
                        q.max_space
                    )));
                }
                Some(_) => {}
                None => {
                    meta.set_quota(ino, cap, 0)
                        .map_err(|e| CsiError::meta(&p2, e))?;
                }
            }
            meta.setxattr(ino, XATTR_ON_DELETE, on_delete.as_str().as_bytes(), 0)
                .map_err(|e| CsiError::meta(&p2, e))?;
            Ok(fmt.name)
        })
        .await?;
        tracing::info!(volume_id = %params::volume_id(&volname, &path), capacity = cap, "volume ready");
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                capacity_bytes: cap as i64,
                volume_id: params::volume_id(&volname, &path),
                volume_context: params::volume_context(&volname, &path, &r.parameters),
                content_source: None,
                accessible_topology: vec![],
            }),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("DeleteVolume", volume_id = %r.volume_id);
        if r.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()).into());
        }
        let Some((vol, path)) = params::split_volume_id(&r.volume_id) else {
            // Not provisioned by this driver (static PV handle): nothing to delete.
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        };
        let (vol, path) = (vol.to_string(), path.to_string());
        let secrets = self.secrets(&r.secrets)?;
        let _g = self.locks.try_lock(&r.volume_id)?;
        let meta = self.metas.open(&secrets.metaurl, &span).await?;
        blocking(span.clone(), move || {
            let fmt = meta.load().map_err(|e| CsiError::meta("volume", e))?;
            if fmt.name != vol {
                return Ok(());
            }
            let (parent_path, name) = split_parent(&path);
            let Some(parent) = resolve(&meta, parent_path)? else {
                return Ok(());
            };
            let Ok(node) = meta.lookup(parent, name.as_bytes()) else {
                return Ok(());
            };
            let policy = meta
                .getxattr(node.ino, XATTR_ON_DELETE)
                .ok()
                .and_then(|v| OnDelete::parse(&String::from_utf8_lossy(&v)))
                .unwrap_or(OnDelete::Delete);
            match policy {
                // The data stays, but it is no longer a volume (ListVolumes leaves it out;
                // a CreateVolume of the same name takes it again).
                OnDelete::Retain => match meta.removexattr(node.ino, XATTR_ON_DELETE) {
                    Ok(()) | Err(MetaError::NotFound) => Ok(()),
                    Err(e) => Err(CsiError::meta(&path, e)),
                },
                OnDelete::Delete => remove_tree(&meta, parent, name.as_bytes()),
                OnDelete::Archive => {
                    let trash = mkdir_p(
                        &meta,
                        format!("{parent_path}/.trash-archive").trim_start_matches('/'),
                    )?;
                    let stamp = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let new = format!("{name}-{stamp}");
                    meta.rename(parent, name.as_bytes(), trash, new.as_bytes(), 0)
                        .map_err(|e| CsiError::meta(&path, e))
                }
            }
        })
        .await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented(
            "ControllerPublishVolume is not needed (attachRequired: false)".into(),
        )
        .into())
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented(
            "ControllerUnpublishVolume is not needed (attachRequired: false)".into(),
        )
        .into())
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("ValidateVolumeCapabilities", volume_id = %r.volume_id);
        if r.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()).into());
        }
        check_capabilities(&r.volume_capabilities)?;
        if let Some((vol, path)) = params::split_volume_id(&r.volume_id)
            && let Ok(secrets) = self.secrets(&r.secrets)
        {
            let meta = self.metas.open(&secrets.metaurl, &span).await?;
            let (vol, path) = (vol.to_string(), path.to_string());
            blocking(span.clone(), move || {
                let fmt = meta.load().map_err(|e| CsiError::meta("volume", e))?;
                if fmt.name != vol || resolve(&meta, &path)?.is_none() {
                    return Err(CsiError::NotFound(format!(
                        "volume {vol}/{path} does not exist"
                    )));
                }
                Ok(())
            })
            .await?;
        } else if params::split_volume_id(&r.volume_id).is_none() && r.volume_context.is_empty() {
            return Err(CsiError::NotFound(format!("unknown volume {}", r.volume_id)).into());
        }
        Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: r.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("ListVolumes");
        // ListVolumes carries no secrets: only the volume of --default-metaurl-file.
        let Some(s) = self.default_secrets.clone() else {
            return Err(CsiError::Unimplemented(
                "ListVolumes needs --default-metaurl-file (the request carries no secrets)".into(),
            )
            .into());
        };
        let meta = self.metas.open(&s.metaurl, &span).await?;
        let (name, all) = blocking(span.clone(), move || {
            let fmt = meta.load().map_err(|e| CsiError::meta("volume", e))?;
            Ok((fmt.name, provisioned(&meta)?))
        })
        .await?;
        let (items, next_token) = page(&all, &r.starting_token, r.max_entries)?;
        let entries = items
            .into_iter()
            .map(|(path, cap)| csi::list_volumes_response::Entry {
                volume: Some(csi::Volume {
                    capacity_bytes: cap.min(i64::MAX as u64) as i64,
                    volume_id: params::volume_id(&name, &path),
                    volume_context: HashMap::from([
                        (CTX_VOLUME.to_string(), name.clone()),
                        (CTX_PATH.to_string(), path),
                    ]),
                    content_source: None,
                    accessible_topology: vec![],
                }),
                status: None,
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("GetCapacity");
        for c in &r.volume_capabilities {
            check_capabilities(std::slice::from_ref(c))?;
        }
        Params::parse(&r.parameters)?;
        let Some(s) = self.default_secrets.clone() else {
            // No volume known to this controller: report "unknown" as the spec allows.
            return Ok(Response::new(csi::GetCapacityResponse::default()));
        };
        let meta = self.metas.open(&s.metaurl, &span).await?;
        let st = blocking(span.clone(), move || {
            meta.statfs().map_err(|e| CsiError::meta("statfs", e))
        })
        .await?;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: st.avail_space.min(i64::MAX as u64) as i64,
            maximum_volume_size: None,
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type, rpc::Type as T};
        let mut caps = vec![
            T::CreateDeleteVolume,
            T::ExpandVolume,
            T::GetCapacity,
            T::SingleNodeMultiWriter,
        ];
        // ListVolumes has no secrets: claimed only with a volume of its own.
        if self.default_secrets.is_some() {
            caps.push(T::ListVolumes);
        }
        let caps = caps
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn create_snapshot(
        &self,
        _req: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(CsiError::Unimplemented("snapshots are not supported".into()).into())
    }

    async fn delete_snapshot(
        &self,
        _req: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(CsiError::Unimplemented("snapshots are not supported".into()).into())
    }

    async fn list_snapshots(
        &self,
        _req: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(CsiError::Unimplemented("snapshots are not supported".into()).into())
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("ControllerExpandVolume", volume_id = %r.volume_id);
        if r.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()).into());
        }
        let c = r
            .capacity_range
            .ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        let cap = params::capacity(c.required_bytes, c.limit_bytes)?;
        let Some((vol, path)) = params::split_volume_id(&r.volume_id) else {
            return Err(CsiError::NotFound(format!(
                "volume {} was not provisioned by {}",
                r.volume_id,
                params::DRIVER_NAME
            ))
            .into());
        };
        let (vol, path) = (vol.to_string(), path.to_string());
        let secrets = self.secrets(&r.secrets)?;
        let _g = self.locks.try_lock(&r.volume_id)?;
        let meta = self.metas.open(&secrets.metaurl, &span).await?;
        let now = blocking(span.clone(), move || {
            let fmt = meta.load().map_err(|e| CsiError::meta("volume", e))?;
            let ino = match (fmt.name == vol)
                .then(|| resolve(&meta, &path))
                .transpose()?
                .flatten()
            {
                Some(i) => i,
                None => {
                    return Err(CsiError::NotFound(format!(
                        "volume {vol}/{path} does not exist"
                    )));
                }
            };
            let q = meta.get_quota(ino).map_err(|e| CsiError::meta(&path, e))?;
            let (cur, inodes) = q.map_or((0, 0), |q| (q.max_space, q.max_inodes));
            if cur >= cap {
                return Ok(cur);
            }
            meta.set_quota(ino, cap, inodes)
                .map_err(|e| CsiError::meta(&path, e))?;
            Ok(cap)
        })
        .await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: now as i64,
            node_expansion_required: false,
        }))
    }

    async fn controller_get_volume(
        &self,
        _req: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerGetVolume is not supported".into()).into())
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerModifyVolume is not supported".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_pages_carry_a_token_until_the_end_and_refuse_foreign_tokens() {
        let all: Vec<u32> = (0..5).collect();
        assert_eq!(page(&all, "", 0).unwrap(), (all.clone(), String::new()));
        assert_eq!(page(&all, "", 2).unwrap(), (vec![0, 1], "2".to_string()));
        assert_eq!(page(&all, "2", 2).unwrap(), (vec![2, 3], "4".to_string()));
        assert_eq!(page(&all, "4", 2).unwrap(), (vec![4], String::new()));
        assert_eq!(page(&all, "5", 2).unwrap(), (vec![], String::new()));
        for bad in ["invalid-token", "6", "-1"] {
            assert!(
                matches!(page(&all, bad, 0), Err(CsiError::Aborted(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            page(&all, "", -1),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
