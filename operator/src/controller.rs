//! Wiring: one kube-rs `Controller` per CRD, owned objects and referenced Volumes watched,
//! all stopping together on shutdown.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::context::Context;
use crate::crd::{CacheGroup, MANAGED_BY, Quota, Volume};
use crate::errors::error_policy;
use crate::{cachegroup, quota, volume};

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(
    kind: &'static str,
) -> impl FnMut(Result<T, E>) -> futures::future::Ready<()> {
    move |r| {
        match r {
            Ok(o) => tracing::debug!(kind, "reconciled {o:?}"),
            Err(e) => warn!(kind, "controller: {e}"),
        }
        futures::future::ready(())
    }
}

/// Run the three controllers until `shutdown` resolves (each finishes its running
/// reconciles first).
pub async fn run<F>(ctx: Arc<Context>, shutdown: F)
where
    F: Future<Output = ()> + Send + Sync + Clone + 'static,
{
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));

    let volumes = Controller::new(
        Api::<Volume>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<StorageClass>::all(client.clone()), managed.clone())
    .graceful_shutdown_on(shutdown.clone())
    .run(volume::reconcile, error_policy, ctx.clone())
    .for_each(log_result("Volume"));

    let quota_ctrl = Controller::new(
        Api::<Quota>::all(client.clone()),
        watcher::Config::default(),
    );
    let quota_store = quota_ctrl.store();
    let quotas = quota_ctrl
        .watches(
            Api::<Volume>::all(client.clone()),
            watcher::Config::default(),
            move |vol: Volume| {
                let name = vol.name_any();
                quota_store
                    .state()
                    .into_iter()
                    .filter(|q| q.spec.volume == name)
                    .map(|q| ObjectRef::from_obj(&*q))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(quota::reconcile, error_policy, ctx.clone())
        .for_each(log_result("Quota"));

    let cg_ctrl = Controller::new(
        Api::<CacheGroup>::all(client.clone()),
        watcher::Config::default(),
    );
    let cg_store = cg_ctrl.store();
    let cachegroups = cg_ctrl
        .owns(Api::<DaemonSet>::all(client.clone()), managed)
        .watches(
            Api::<Volume>::all(client.clone()),
            watcher::Config::default(),
            move |vol: Volume| {
                let name = vol.name_any();
                cg_store
                    .state()
                    .into_iter()
                    .filter(|c| c.spec.volume == name)
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(cachegroup::reconcile, error_policy, ctx.clone())
        .for_each(log_result("CacheGroup"));

    ctx.metrics.set_ready(true);
    info!("controllers running: Volume, Quota, CacheGroup");
    tokio::join!(volumes, quotas, cachegroups);
    ctx.metrics.set_ready(false);
    info!("controllers stopped");
}
