//! Quota controller: the tenant namespace's directory `tenants/<namespace>` of a Volume gets
//! a directory quota (created if missing); status shows used/limit. Deleting the Quota
//! removes the limit, never the tenant's files.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Api, ResourceExt};
use tracing::info;

use crate::conditions::{self, Outcome};
use crate::context::{Context, apply_status, blocking, outcome_conditions, reconcile_finalized};
use crate::crd::{Quota, QuotaStatus, Volume, human_bytes, parse_quantity};
use crate::errors::{Error, Result};
use crate::fsops::FsError;
use crate::volume::is_ready;

/// Directory of a tenant namespace inside a volume (the CSI `pathPattern` default puts the
/// namespace's PVCs below it).
pub fn tenant_dir(namespace: &str) -> String {
    format!("tenants/{namespace}")
}

pub async fn reconcile(q: Arc<Quota>, ctx: Arc<Context>) -> Result<Action> {
    let ns = q.namespace().unwrap_or_default();
    let api: Api<Quota> = Api::namespaced(ctx.client.clone(), &ns);
    reconcile_finalized("Quota", &api, q, &ctx, |ev| async {
        match ev {
            Finalizer::Apply(q) => apply(&api, &q, &ctx).await,
            Finalizer::Cleanup(q) => cleanup(&q, &ctx).await,
        }
    })
    .await
}

async fn set_status(
    api: &Api<Quota>,
    q: &Quota,
    ctx: &Context,
    mut status: QuotaStatus,
    outcome: &Outcome,
) -> Result<()> {
    let old = q.status.clone().unwrap_or_default();
    status.observed_generation = q.metadata.generation;
    status.conditions = outcome_conditions(ctx, q, &old.conditions, outcome, false).await;
    apply_status(api, q, &status).await
}

async fn apply(api: &Api<Quota>, q: &Quota, ctx: &Context) -> Result<Action> {
    let ns = q.namespace().unwrap_or_default();
    let path = tenant_dir(&ns);
    let pending = QuotaStatus {
        path: Some(path.clone()),
        ..Default::default()
    };
    // One Quota per namespace and Volume: the oldest wins, others are Degraded.
    let others = api.list(&Default::default()).await?;
    if let Some(first) = others
        .iter()
        .filter(|o| o.spec.volume == q.spec.volume && o.metadata.deletion_timestamp.is_none())
        .min_by_key(|o| (o.metadata.creation_timestamp.clone(), o.name_any()))
        && first.name_any() != q.name_any()
    {
        let outcome = Outcome::degraded(
            "DuplicateQuota",
            format!(
                "Quota {} already sets the quota of {path} in Volume {}; delete one of them",
                first.name_any(),
                q.spec.volume
            ),
        );
        set_status(api, q, ctx, pending, &outcome).await?;
        return Ok(Action::requeue(ctx.retry()));
    }
    let vols: Api<Volume> = Api::all(ctx.client.clone());
    let Some(vol) = vols.get_opt(&q.spec.volume).await? else {
        let outcome = Outcome::progressing(
            "VolumeNotFound",
            format!("waiting for Volume {}", q.spec.volume),
        );
        set_status(api, q, ctx, pending, &outcome).await?;
        return Ok(Action::requeue(ctx.retry()));
    };
    if !is_ready(&vol) {
        let outcome = Outcome::progressing(
            "VolumeNotReady",
            format!("waiting for Volume {} to become Ready", q.spec.volume),
        );
        set_status(api, q, ctx, pending, &outcome).await?;
        return Ok(Action::requeue(ctx.retry()));
    }
    let target = match ctx.read_target(&vol.spec.credentials_secret_ref).await? {
        Ok(t) => t,
        Err(outcome) => {
            set_status(api, q, ctx, pending, &outcome).await?;
            return Ok(Action::requeue(ctx.retry()));
        }
    };
    let limit_bytes = match &q.spec.capacity {
        Some(c) => parse_quantity(c)
            .ok_or_else(|| Error::Invalid(format!("spec.capacity {c:?} is not a quantity")))?,
        None => 0,
    };
    let limit_inodes = q.spec.inodes.unwrap_or(0);
    let fs = ctx.fs.clone();
    let p = path.clone();
    let dq = match blocking(move || Ok(fs.set_dir_quota(&target, &p, limit_bytes, limit_inodes)?))
        .await
    {
        Ok(dq) => dq,
        Err(Error::Fs(e)) => {
            let reason = match e {
                FsError::Backend(_) => "BackendUnavailable",
                _ => "QuotaRefused",
            };
            set_status(
                api,
                q,
                ctx,
                pending,
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
    ctx.metrics
        .set_quota_usage(&ns, &q.name_any(), &q.spec.volume, &dq);
    let old = q.status.clone().unwrap_or_default();
    let limit = |v: u64| (v > 0).then_some(v);
    let status = QuotaStatus {
        path: Some(path.clone()),
        used_bytes: Some(dq.used_bytes),
        limit_bytes: limit(dq.limit_bytes),
        used_inodes: Some(dq.used_inodes),
        limit_inodes: limit(dq.limit_inodes),
        usage: Some(format!(
            "{} / {}",
            human_bytes(dq.used_bytes),
            limit(dq.limit_bytes)
                .map(human_bytes)
                .unwrap_or_else(|| "unlimited".into())
        )),
        inode_usage: Some(format!(
            "{} / {}",
            dq.used_inodes,
            limit(dq.limit_inodes)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unlimited".into())
        )),
        ..Default::default()
    };
    if !conditions::is_ready(&old.conditions)
        || old.limit_bytes != status.limit_bytes
        || old.limit_inodes != status.limit_inodes
    {
        ctx.event(
            q,
            false,
            "QuotaApplied",
            "SetQuota",
            format!(
                "{path} in Volume {}: capacity {}, inodes {}",
                q.spec.volume,
                q.spec.capacity.as_deref().unwrap_or("unlimited"),
                q.spec
                    .inodes
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "unlimited".into())
            ),
        )
        .await;
    }
    let outcome = Outcome::ready(
        "QuotaApplied",
        format!("directory quota set on {path} of Volume {}", q.spec.volume),
    );
    set_status(api, q, ctx, status, &outcome).await?;
    Ok(Action::requeue(ctx.resync()))
}

async fn cleanup(q: &Quota, ctx: &Context) -> Result<Action> {
    let ns = q.namespace().unwrap_or_default();
    ctx.metrics.forget_quota(&ns, &q.name_any(), &q.spec.volume);
    let vols: Api<Volume> = Api::all(ctx.client.clone());
    let Some(vol) = vols.get_opt(&q.spec.volume).await? else {
        info!("Volume {} is gone: nothing to remove", q.spec.volume);
        return Ok(Action::await_change());
    };
    // A duplicate never applied anything; removing the winner's quota would be wrong.
    if conditions::ready_reason(&q.status.clone().unwrap_or_default().conditions)
        == Some("DuplicateQuota")
    {
        return Ok(Action::await_change());
    }
    match ctx.read_target(&vol.spec.credentials_secret_ref).await? {
        Ok(target) => {
            let fs = ctx.fs.clone();
            let path = tenant_dir(&ns);
            let p = path.clone();
            blocking(move || Ok(fs.remove_dir_quota(&target, &p)?)).await?;
            ctx.event(
                q,
                false,
                "QuotaRemoved",
                "DeleteQuota",
                format!("removed the quota of {path} (its files are kept)"),
            )
            .await;
        }
        Err(outcome) => {
            info!(
                "Secret of Volume {} unavailable, quota left in place: {}",
                q.spec.volume,
                outcome.message()
            );
        }
    }
    Ok(Action::await_change())
}
