//! Volume controller: format or adopt the file system, maintain its StorageClasses, report
//! usage and health; on deletion remove the StorageClasses and, only with
//! `deletionPolicy: Delete`, the data.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Api, Resource, ResourceExt};
use tracing::info;

use crate::conditions::{self, Outcome};
use crate::context::{
    Context, FIELD_MANAGER, apply_status, blocking, outcome_conditions, reconcile_finalized,
};
use crate::crd::{
    DatasetStatus, DeletionPolicy, MANAGED_BY, MirrorStatus, PrimaryStore, StorageClassSpec,
    VOLUME_LABEL, Volume, VolumeStatus, human_bytes, parse_quantity,
};
use crate::errors::{Error, Result};
use crate::fsops::{DatasetRequest, FsError, MirrorRequest, VolumeRequest};
use strata::object::StorageConfig;

/// Default CSI `pathPattern`: a tenant namespace's PVCs land under `tenants/<namespace>`.
pub const DEFAULT_PATH_PATTERN: &str = "tenants/${pvc.namespace}/${pv.name}";

/// File-system name of a Volume.
pub fn fs_name(vol: &Volume) -> String {
    vol.spec.name.clone().unwrap_or_else(|| vol.name_any())
}

/// What `ensure_volume` is asked for.
pub fn volume_request(vol: &Volume) -> Result<VolumeRequest> {
    let capacity = match &vol.spec.capacity {
        Some(c) => parse_quantity(c)
            .ok_or_else(|| Error::Invalid(format!("spec.capacity {c:?} is not a quantity")))?,
        None => 0,
    };
    let storage = match vol.spec.storage.type_ {
        crate::crd::StorageType::File => "file",
        crate::crd::StorageType::S3 => "s3",
    };
    Ok(VolumeRequest {
        name: fs_name(vol),
        storage: storage.into(),
        bucket: vol.spec.storage.bucket_url(),
        region: vol.spec.storage.region.clone(),
        block_size_kib: vol.spec.format.block_size_ki_b,
        // Rounded up to whole GiB (the volume limit's unit).
        capacity_gib: capacity.div_ceil(1 << 30),
        inodes: vol.spec.inodes.unwrap_or(0),
    })
}

/// The sources `spec.datasets` asks for, with their keys from the Volume's Secret; an error
/// names the missing key.
pub fn dataset_requests(
    vol: &Volume,
    t: &crate::fsops::FsTarget,
) -> std::result::Result<Vec<DatasetRequest>, String> {
    let secret = &vol.spec.credentials_secret_ref;
    let key = |name: &Option<String>, default: &str, path: &str| {
        let k = name.clone().unwrap_or_else(|| default.to_string());
        match t.data.get(&k) {
            Some(v) => Ok(Some(v.clone())),
            None if name.is_none() => Ok(None),
            None => Err(format!(
                "Secret {}/{} has no key {k} (named by the dataset at {path}): add it, or change the dataset's key names",
                secret.namespace, secret.name
            )),
        }
    };
    vol.spec
        .datasets
        .iter()
        .map(|d| {
            Ok(DatasetRequest {
                path: d.path.clone(),
                source: d.source.clone(),
                endpoint: d.endpoint.clone(),
                region: d.region.clone(),
                access_key: key(&d.access_key_key, "access-key", &d.path)?,
                secret_key: key(&d.secret_key_key, "secret-key", &d.path)?,
                refresh_secs: d.refresh_seconds.unwrap_or(600),
            })
        })
        .collect()
}

/// The stores `spec.storage`, `spec.mirror` and `spec.primary` ask for, with keys from the
/// Volume's Secret; `None` when the Volume has no mirror and never had one.
pub fn mirror_request(
    vol: &Volume,
    t: &crate::fsops::FsTarget,
) -> std::result::Result<Option<MirrorRequest>, String> {
    // Once a mirror was set, status.mirror stays (phase Detached after a detach).
    let had = vol.status.as_ref().is_some_and(|s| s.mirror.is_some());
    let cfg = |s: &crate::crd::StorageSpec, ak: Option<String>, sk: Option<String>| StorageConfig {
        storage: match s.type_ {
            crate::crd::StorageType::File => "file",
            crate::crd::StorageType::S3 => "s3",
        }
        .into(),
        bucket: s.bucket_url(),
        access_key: ak,
        secret_key: sk,
        region: s.region.clone(),
    };
    let storage = cfg(
        &vol.spec.storage,
        t.access_key.clone(),
        t.secret_key.clone(),
    );
    let Some(m) = &vol.spec.mirror else {
        if vol.spec.primary == PrimaryStore::Mirror {
            return Err("spec.primary is Mirror but spec.mirror is not set".into());
        }
        return Ok(had.then_some(MirrorRequest {
            primary: storage,
            mirror: None,
        }));
    };
    let secret = &vol.spec.credentials_secret_ref;
    let key = |name: &Option<String>, default: &str| {
        let k = name.clone().unwrap_or_else(|| default.to_string());
        match t.data.get(&k) {
            Some(v) => Ok(Some(v.clone())),
            None if name.is_none() => Ok(None),
            None => Err(format!(
                "Secret {}/{} has no key {k} (named by spec.mirror): add it",
                secret.namespace, secret.name
            )),
        }
    };
    let mirror = cfg(
        &m.storage,
        key(&m.access_key_key, "mirror-access-key")?,
        key(&m.secret_key_key, "mirror-secret-key")?,
    );
    Ok(Some(match vol.spec.primary {
        PrimaryStore::Storage => MirrorRequest {
            primary: storage,
            mirror: Some(mirror),
        },
        PrimaryStore::Mirror => MirrorRequest {
            primary: mirror,
            mirror: Some(storage),
        },
    }))
}

/// The StorageClasses a Volume asks for (one named after it by default).
pub fn storage_class_specs(vol: &Volume) -> Vec<StorageClassSpec> {
    if vol.spec.storage_classes.is_empty() {
        vec![StorageClassSpec {
            name: vol.name_any(),
            is_default: false,
            path_pattern: None,
            on_delete: Default::default(),
            reclaim_policy: Default::default(),
            mount_options: vec![],
        }]
    } else {
        vol.spec.storage_classes.clone()
    }
}

/// A StorageClass of the CSI driver for `vol`, with `extra` mount options appended.
pub fn storage_class(
    vol: &Volume,
    spec: &StorageClassSpec,
    extra: &[String],
    ctx: &Context,
) -> StorageClass {
    let secret = &vol.spec.credentials_secret_ref;
    let mut params = BTreeMap::new();
    params.insert(
        "pathPattern".to_string(),
        spec.path_pattern
            .clone()
            .unwrap_or_else(|| DEFAULT_PATH_PATTERN.to_string()),
    );
    params.insert("onDelete".into(), spec.on_delete.as_str().into());
    let mut opts: Vec<String> = vol.spec.mount_options.clone();
    if let Some(c) = &vol.spec.cache {
        if let Some(size) = c.size_mi_b {
            opts.push(format!("cache-size={size}"));
        }
        if let Some(dir) = &c.dir {
            params.insert("cacheDir".into(), dir.clone());
        }
    }
    opts.extend(spec.mount_options.iter().cloned());
    opts.extend(extra.iter().cloned());
    if !opts.is_empty() {
        params.insert("mountOptions".into(), opts.join(","));
    }
    params.insert("mountImage".into(), ctx.settings.image.clone());
    for p in ["provisioner", "node-stage", "controller-expand"] {
        params.insert(
            format!("csi.storage.k8s.io/{p}-secret-name"),
            secret.name.clone(),
        );
        params.insert(
            format!("csi.storage.k8s.io/{p}-secret-namespace"),
            secret.namespace.clone(),
        );
    }
    let mut labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (VOLUME_LABEL.to_string(), vol.name_any()),
    ]);
    labels.insert("app.kubernetes.io/part-of".into(), "strata".into());
    let mut annotations = BTreeMap::new();
    if spec.is_default {
        annotations.insert(
            "storageclass.kubernetes.io/is-default-class".to_string(),
            "true".to_string(),
        );
    }
    StorageClass {
        metadata: kube::api::ObjectMeta {
            name: Some(spec.name.clone()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: vol.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        provisioner: ctx.settings.csi_driver.clone(),
        parameters: Some(params),
        reclaim_policy: Some(spec.reclaim_policy.as_str().into()),
        allow_volume_expansion: Some(true),
        volume_binding_mode: Some("Immediate".into()),
        mount_options: None,
        allowed_topologies: None,
    }
}

/// Server-side apply a StorageClass; its parameters are immutable, so a class whose
/// parameters changed is deleted and created again (existing PVs keep working: they carry
/// their own copy).
pub async fn apply_storage_class(ctx: &Context, sc: &StorageClass) -> Result<()> {
    let api: Api<StorageClass> = Api::all(ctx.client.clone());
    let name = sc.name_any();
    if let Some(cur) = api.get_opt(&name).await?
        && (cur.parameters != sc.parameters
            || cur.reclaim_policy != sc.reclaim_policy
            || cur.provisioner != sc.provisioner
            || cur.volume_binding_mode != sc.volume_binding_mode)
    {
        info!(storageclass = %name, "parameters changed: recreating the StorageClass");
        api.delete(&name, &DeleteParams::default()).await?;
    }
    let mut obj = serde_json::to_value(sc).map_err(|e| Error::Invalid(e.to_string()))?;
    obj["apiVersion"] = "storage.k8s.io/v1".into();
    obj["kind"] = "StorageClass".into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

pub async fn reconcile(vol: Arc<Volume>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Volume> = Api::all(ctx.client.clone());
    reconcile_finalized("Volume", &api, vol, &ctx, |ev| async {
        match ev {
            Finalizer::Apply(v) => apply(&api, &v, &ctx).await,
            Finalizer::Cleanup(v) => cleanup(&v, &ctx).await,
        }
    })
    .await
}

async fn set_status(
    api: &Api<Volume>,
    vol: &Volume,
    ctx: &Context,
    mut status: VolumeStatus,
    outcome: &Outcome,
) -> Result<()> {
    let old = vol.status.clone().unwrap_or_default();
    status.observed_generation = vol.metadata.generation;
    status.conditions = outcome_conditions(ctx, vol, &old.conditions, outcome, false).await;
    apply_status(api, vol, &status).await
}

async fn apply(api: &Api<Volume>, vol: &Volume, ctx: &Context) -> Result<Action> {
    let old = vol.status.clone().unwrap_or_default();
    let keep = VolumeStatus {
        uuid: old.uuid.clone(),
        origin: old.origin.clone(),
        ..Default::default()
    };
    let target = match ctx.read_target(&vol.spec.credentials_secret_ref).await? {
        Ok(t) => t,
        Err(outcome) => {
            set_status(api, vol, ctx, keep, &outcome).await?;
            return Ok(Action::requeue(ctx.retry()));
        }
    };
    let req = volume_request(vol)?;
    let wanted_datasets = dataset_requests(vol, &target);
    let wanted_mirror = mirror_request(vol, &target);
    let dataset_target = target.clone();
    let mirror_target = target.clone();
    let fs = ctx.fs.clone();
    let res = blocking(move || {
        let info = fs.ensure_volume(&target, &req)?;
        let usage = fs.usage(&target)?;
        Ok((info, usage))
    })
    .await;
    let (info, usage) = match res {
        Ok(v) => v,
        Err(Error::Fs(e)) => {
            let reason = match &e {
                FsError::NameMismatch { .. } => "NameMismatch",
                FsError::Invalid(_) => "FormatRefused",
                FsError::Backend(_) => "BackendUnavailable",
            };
            set_status(
                api,
                vol,
                ctx,
                keep,
                &Outcome::degraded(reason, e.to_string()),
            )
            .await?;
            if e.is_transient() {
                return Err(e.into());
            }
            return Ok(Action::requeue(ctx.retry()));
        }
        Err(e) => return Err(e),
    };
    if old.uuid.as_deref() != Some(info.uuid.as_str()) {
        let (reason, note) = if info.formatted {
            (
                "Formatted",
                format!("formatted file system {} ({})", info.name, info.uuid),
            )
        } else {
            (
                "Adopted",
                format!("adopted existing file system {} ({})", info.name, info.uuid),
            )
        };
        ctx.event(vol, false, reason, "Format", note).await;
    }
    if info.block_size_kib != vol.spec.format.block_size_ki_b && old.uuid.is_none() {
        ctx.event(
            vol,
            true,
            "BlockSizeDiffers",
            "Format",
            format!(
                "the adopted volume has block size {} KiB, not the {} KiB of spec.format",
                info.block_size_kib, vol.spec.format.block_size_ki_b
            ),
        )
        .await;
    }
    if info.limits_changed {
        ctx.event(
            vol,
            false,
            "LimitsChanged",
            "Configure",
            format!(
                "capacity {} inodes {} (0 = unlimited)",
                vol.spec.capacity.as_deref().unwrap_or("0"),
                vol.spec.inodes.unwrap_or(0)
            ),
        )
        .await;
    }

    // StorageClasses: apply the wanted ones, delete ours that are no longer wanted.
    let wanted = storage_class_specs(vol);
    for spec in &wanted {
        apply_storage_class(ctx, &storage_class(vol, spec, &[], ctx)).await?;
    }
    let sc_api: Api<StorageClass> = Api::all(ctx.client.clone());
    let ours = sc_api
        .list(&ListParams::default().labels(&format!("{VOLUME_LABEL}={}", vol.name_any())))
        .await?;
    for sc in ours {
        let n = sc.name_any();
        let is_cache_group_class = sc.labels().contains_key(crate::crd::CACHE_GROUP_LABEL);
        if !is_cache_group_class && !wanted.iter().any(|w| w.name == n) {
            sc_api.delete(&n, &DeleteParams::default()).await?;
        }
    }

    // Attached sources: attach the wanted, detach the ones this operator attached before
    // that are no longer wanted. A failure leaves the volume usable but Degraded.
    let managed: Vec<String> = old.datasets.iter().map(|d| d.path.clone()).collect();
    let datasets = match wanted_datasets {
        Err(msg) => Err(msg),
        Ok(w) if w.is_empty() && managed.is_empty() => Ok(Vec::new()),
        Ok(w) => {
            let fs = ctx.fs.clone();
            match blocking(move || Ok(fs.ensure_datasets(&dataset_target, &w, &managed)?)).await {
                Ok(d) => Ok(d),
                Err(Error::Fs(e)) => Err(e.to_string()),
                Err(e) => return Err(e),
            }
        }
    };
    let (datasets, dataset_error) = match datasets {
        Ok(d) => (d, None),
        Err(msg) => (Vec::new(), Some(msg)),
    };

    // The mirror: one safe step per reconcile (add, switch, detach), progress in status.
    let mirror = match wanted_mirror {
        Err(msg) => Err(msg),
        Ok(None) => Ok(None),
        Ok(Some(req)) => {
            let fs = ctx.fs.clone();
            match blocking(move || Ok(fs.ensure_mirror(&mirror_target, &req)?)).await {
                Ok(m) => Ok(Some(m)),
                Err(Error::Fs(e)) => Err(e.to_string()),
                Err(e) => return Err(e),
            }
        }
    };
    let (mirror, mirror_error) = match mirror {
        Ok(m) => (m, None),
        Err(msg) => (None, Some(msg)),
    };
    if let Some(m) = &mirror
        && let Some(change) = &m.changed
    {
        let note = match change.as_str() {
            "MirrorAdded" => format!(
                "new objects go to {} and to the mirror {}; clients copy the existing ones",
                m.primary,
                m.mirror.as_deref().unwrap_or("-")
            ),
            "PrimarySwitched" => format!("the primary store is now {}", m.primary),
            _ => format!("the mirror is detached; objects go to {} only", m.primary),
        };
        ctx.event(vol, false, change, "Mirror", note).await;
    }
    let mirror_busy = mirror
        .as_ref()
        .is_some_and(|m| m.phase != "InSync" && m.phase != "Detached");

    let capacity = (usage.capacity_bytes > 0).then_some(usage.capacity_bytes);
    ctx.metrics.set_volume_usage(&vol.name_any(), &usage);
    let status = VolumeStatus {
        uuid: Some(info.uuid.clone()),
        origin: Some(if old.origin.is_some() {
            old.origin.clone().unwrap_or_default()
        } else if info.formatted {
            "Formatted".into()
        } else {
            "Adopted".into()
        }),
        used_bytes: Some(usage.used_bytes),
        used_inodes: Some(usage.used_inodes),
        capacity_bytes: capacity,
        clients: Some(usage.clients),
        usage: Some(format!(
            "{} / {}",
            human_bytes(usage.used_bytes),
            capacity
                .map(human_bytes)
                .unwrap_or_else(|| "unlimited".into())
        )),
        storage_classes: wanted.iter().map(|w| w.name.clone()).collect(),
        datasets: if dataset_error.is_some() {
            old.datasets.clone()
        } else {
            datasets
                .into_iter()
                .map(|d| DatasetStatus {
                    path: d.path,
                    source: d.source,
                    attachment: d.attachment,
                })
                .collect()
        },
        mirror: match (&mirror_error, mirror) {
            (Some(_), _) => old.mirror.clone(),
            (None, m) => m.map(|m| MirrorStatus {
                phase: m.phase,
                primary: m.primary,
                mirror: m.mirror,
                copy_done: m.copy_done,
                objects_compared: m.objects_compared,
                objects_copied: m.objects_copied,
                bytes_copied: m.bytes_copied,
                backlog: m.backlog,
                copier: m.copier,
                message: m.message,
            }),
        },
        ..Default::default()
    };
    if let Some(msg) = mirror_error {
        let outcome = Outcome::degraded("MirrorUnavailable", msg);
        set_status(api, vol, ctx, status, &outcome).await?;
        return Ok(Action::requeue(ctx.retry()));
    }
    if let Some(msg) = dataset_error {
        let outcome = Outcome::degraded("DatasetUnavailable", msg);
        set_status(api, vol, ctx, status, &outcome).await?;
        return Ok(Action::requeue(ctx.retry()));
    }
    let outcome = Outcome::ready(
        "VolumeReady",
        format!(
            "file system {} is formatted and reachable; StorageClass {}",
            info.name,
            status.storage_classes.join(", ")
        ),
    );
    if !conditions::is_ready(&old.conditions) {
        ctx.event(vol, false, "Ready", "Reconcile", outcome.message().into())
            .await;
    }
    set_status(api, vol, ctx, status, &outcome).await?;
    if mirror_busy {
        // Follow the copy and retry a waiting switch or detach soon.
        return Ok(Action::requeue(std::time::Duration::from_secs(10)));
    }
    Ok(Action::requeue(ctx.resync()))
}

async fn cleanup(vol: &Volume, ctx: &Context) -> Result<Action> {
    ctx.metrics.forget_volume(&vol.name_any());
    let sc_api: Api<StorageClass> = Api::all(ctx.client.clone());
    let ours = sc_api
        .list(&ListParams::default().labels(&format!("{VOLUME_LABEL}={}", vol.name_any())))
        .await?;
    for sc in ours {
        sc_api
            .delete(&sc.name_any(), &DeleteParams::default())
            .await?;
    }
    if vol.spec.deletion_policy == DeletionPolicy::Delete {
        match ctx.read_target(&vol.spec.credentials_secret_ref).await? {
            Ok(target) => {
                let fs = ctx.fs.clone();
                blocking(move || Ok(fs.empty_volume(&target)?)).await?;
                ctx.event(
                    vol,
                    false,
                    "DataDeleted",
                    "Delete",
                    format!(
                        "deletionPolicy Delete: removed every file of {}",
                        fs_name(vol)
                    ),
                )
                .await;
            }
            Err(outcome) => {
                // Without the Secret the data cannot be reached: keep the finalizer so the
                // data is not silently left behind, and say why.
                return Err(Error::Invalid(format!(
                    "deletionPolicy Delete needs the Secret to delete the data: {}",
                    outcome.message()
                )));
            }
        }
    } else {
        info!("deletionPolicy Retain: the file system's data is kept");
    }
    Ok(Action::await_change())
}

/// Whether `vol` reached Ready (for dependants).
pub fn is_ready(vol: &Volume) -> bool {
    vol.status
        .as_ref()
        .is_some_and(|s| conditions::is_ready(&s.conditions))
}
