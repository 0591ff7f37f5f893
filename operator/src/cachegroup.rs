//! CacheGroup controller: a DaemonSet of cache members (`strata mount --cache-group NAME`)
//! on the selected nodes, in the namespace of the Volume's Secret; optionally a StorageClass
//! whose mounts join the group; status with members ready and the hit ratio scraped from the
//! members' metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::conditions::Outcome;
use crate::context::{
    Context, FIELD_MANAGER, apply_status, blocking, outcome_conditions, reconcile_finalized,
};
use crate::crd::{
    CACHE_GROUP_LABEL, CacheGroup, CacheGroupStatus, MANAGED_BY, StorageClassSpec, VOLUME_LABEL,
    Volume, parse_quantity,
};
use crate::errors::{Error, Result};
use crate::volume::{apply_storage_class, is_ready, storage_class, storage_class_specs};

/// Name of the DaemonSet of a CacheGroup.
pub fn daemonset_name(cg: &CacheGroup) -> String {
    format!("strata-cache-{}", cg.name_any())
}

/// Mount options a client adds to join the group without serving.
pub fn client_mount_options(cg: &CacheGroup) -> Vec<String> {
    vec![format!("cache-group={}", cg.name_any()), "no-serve".into()]
}

/// The DaemonSet of cache members for `cg` of `vol`.
pub fn daemonset(cg: &CacheGroup, vol: &Volume, ctx: &Context) -> Result<DaemonSet> {
    let s = &ctx.settings;
    let name = cg.name_any();
    let secret = &vol.spec.credentials_secret_ref;
    let size_mib = parse_quantity(&cg.spec.size_per_node).ok_or_else(|| {
        Error::Invalid(format!(
            "sizePerNode {:?} is not a quantity",
            cg.spec.size_per_node
        ))
    })? >> 20;
    let mnt = "/mnt/strata";
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "strata-cache".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), name.clone()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (CACHE_GROUP_LABEL.to_string(), name.clone()),
        (VOLUME_LABEL.to_string(), vol.name_any()),
    ]);
    let selector = BTreeMap::from([(CACHE_GROUP_LABEL.to_string(), name.clone())]);
    let mut args = vec![
        "mount".to_string(),
        "$(META_URL)".into(),
        mnt.into(),
        "--cache-group".into(),
        name.clone(),
        "--cache-group-addr".into(),
        format!("$(NODE_IP):{}", cg.spec.port),
        "--cache-dir".into(),
        "/cache".into(),
        "--cache-size".into(),
        size_mib.to_string(),
        "--hot-replicas".into(),
        cg.spec.replicas.to_string(),
        "--metrics".into(),
        format!("0.0.0.0:{}", s.member_metrics_port),
    ];
    for o in &vol.spec.mount_options {
        args.push(format!("--{o}"));
    }
    let env = json!([
        {"name": "META_URL", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": "metaurl"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "STRATA_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]);
    let host_mnt = format!("{}/{}", s.cache_group_host_dir.trim_end_matches('/'), name);
    let resources = match &cg.spec.resources {
        Some(r) => serde_json::to_value(r).map_err(|e| Error::Invalid(e.to_string()))?,
        None => json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}),
    };
    let mut containers = vec![json!({
        "name": "member",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["strata"],
        "args": args,
        "env": env,
        "securityContext": {"privileged": true},
        "ports": [
            {"name": "cache", "containerPort": cg.spec.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": s.member_metrics_port, "protocol": "TCP"},
        ],
        "readinessProbe": {"exec": {"command": ["mountpoint", "-q", mnt]}, "periodSeconds": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["strata", "umount", "--force", mnt]}}},
        "resources": resources,
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "mnt", "mountPath": mnt, "mountPropagation": "Bidirectional"},
        ],
    })];
    if !cg.spec.warmup_paths.is_empty() {
        let paths: Vec<String> = cg
            .spec
            .warmup_paths
            .iter()
            .map(|p| format!("'{mnt}/{}'", p.replace('\'', "")))
            .collect();
        let script = format!(
            "until mountpoint -q {mnt}; do sleep 2; done; strata warmup {} && echo warm-up done; exec sleep infinity",
            paths.join(" ")
        );
        containers.push(json!({
            "name": "warmup",
            "image": s.image,
            "imagePullPolicy": s.image_pull_policy,
            "command": ["sh", "-c", script],
            "securityContext": {"privileged": true},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            "volumeMounts": [
                {"name": "mnt", "mountPath": mnt, "mountPropagation": "HostToContainer"},
            ],
        }));
    }
    let cache_volume = match (&cg.spec.medium.host_path, &cg.spec.medium.ephemeral) {
        (Some(h), _) => {
            json!({"name": "cache", "hostPath": {"path": h.path, "type": "DirectoryOrCreate"}})
        }
        (None, Some(e)) => {
            let mut spec = json!({
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": cg.spec.size_per_node}},
            });
            if let Some(sc) = &e.storage_class_name {
                spec["storageClassName"] = sc.clone().into();
            }
            json!({"name": "cache", "ephemeral": {"volumeClaimTemplate": {"spec": spec}}})
        }
        (None, None) => {
            return Err(Error::Invalid(
                "medium needs exactly one of hostPath or ephemeral".into(),
            ));
        }
    };
    let mut pod_spec = json!({
        "hostNetwork": true,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": 30,
        "containers": containers,
        "volumes": [
            cache_volume,
            {"name": "mnt", "hostPath": {"path": host_mnt, "type": "DirectoryOrCreate"}},
        ],
    });
    if !cg.spec.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(cg.spec.node_selector);
    }
    if !cg.spec.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(cg.spec.tolerations);
    }
    if !s.member_priority_class.is_empty() {
        pod_spec["priorityClassName"] = s.member_priority_class.clone().into();
    }
    let ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": daemonset_name(cg),
            "namespace": secret.namespace,
            "labels": labels,
            "ownerReferences": cg.controller_owner_ref(&()).map(|o| vec![o]),
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec,
            },
        },
    });
    serde_json::from_value(ds).map_err(|e| Error::Invalid(format!("building DaemonSet: {e}")))
}

pub async fn reconcile(cg: Arc<CacheGroup>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<CacheGroup> = Api::all(ctx.client.clone());
    reconcile_finalized("CacheGroup", &api, cg, &ctx, |ev| async {
        match ev {
            Finalizer::Apply(c) => apply(&api, &c, &ctx).await,
            Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
}

async fn set_status(
    api: &Api<CacheGroup>,
    cg: &CacheGroup,
    ctx: &Context,
    mut status: CacheGroupStatus,
    outcome: &Outcome,
) -> Result<()> {
    let old = cg.status.clone().unwrap_or_default();
    status.observed_generation = cg.metadata.generation;
    status.conditions = outcome_conditions(ctx, cg, &old.conditions, outcome, true).await;
    apply_status(api, cg, &status).await
}

async fn apply(api: &Api<CacheGroup>, cg: &CacheGroup, ctx: &Context) -> Result<Action> {
    let opts = client_mount_options(cg).join(",");
    let pending = CacheGroupStatus {
        client_mount_options: Some(opts.clone()),
        ..Default::default()
    };
    let vols: Api<Volume> = Api::all(ctx.client.clone());
    let vol = match vols.get_opt(&cg.spec.volume).await? {
        Some(v) if is_ready(&v) => v,
        found => {
            let (reason, msg) = if found.is_some() {
                (
                    "VolumeNotReady",
                    format!("waiting for Volume {} to become Ready", cg.spec.volume),
                )
            } else {
                (
                    "VolumeNotFound",
                    format!("waiting for Volume {}", cg.spec.volume),
                )
            };
            set_status(api, cg, ctx, pending, &Outcome::progressing(reason, msg)).await?;
            return Ok(Action::requeue(ctx.retry()));
        }
    };
    let ns = vol.spec.credentials_secret_ref.namespace.clone();
    let ds = daemonset(cg, &vol, ctx)?;
    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    let applied = ds_api
        .patch(
            &daemonset_name(cg),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&ds),
        )
        .await?;
    if let Some(sc_name) = &cg.spec.storage_class_name {
        let base = storage_class_specs(&vol).remove(0);
        let spec = StorageClassSpec {
            name: sc_name.clone(),
            is_default: false,
            ..base
        };
        let mut sc: StorageClass = storage_class(&vol, &spec, &client_mount_options(cg), ctx);
        sc.metadata.owner_references = cg.controller_owner_ref(&()).map(|o| vec![o]);
        sc.labels_mut()
            .insert(CACHE_GROUP_LABEL.into(), cg.name_any());
        apply_storage_class(ctx, &sc).await?;
    }
    let st = applied.status.unwrap_or_default();
    let (ready, desired) = (st.number_ready, st.desired_number_scheduled);

    // Hit ratio over the ready members' metrics.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let members = pods
        .list(&ListParams::default().labels(&format!("{CACHE_GROUP_LABEL}={}", cg.name_any())))
        .await?;
    let port = ctx.settings.member_metrics_port;
    let addrs: Vec<String> = members
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| format!("{ip}:{port}"))
        .collect();
    let scraper = ctx.scraper.clone();
    let counts = blocking(move || {
        Ok(addrs
            .iter()
            .filter_map(|a| scraper.scrape(a))
            .collect::<Vec<_>>())
    })
    .await?;
    let (hits, misses) = counts
        .iter()
        .fold((0u64, 0u64), |(h, m), (a, b)| (h + a, m + b));
    let hit_ratio =
        (hits + misses > 0).then(|| format!("{:.2}", hits as f64 / (hits + misses) as f64));

    let status = CacheGroupStatus {
        members_ready: Some(ready),
        members_desired: Some(desired),
        members: Some(format!("{ready}/{desired}")),
        hit_ratio,
        client_mount_options: Some(opts),
        ..Default::default()
    };
    let outcome = if desired == 0 {
        Outcome::progressing(
            "NoMembers",
            "no node matches the node selector and tolerations (yet)",
        )
    } else if ready < desired {
        Outcome::progressing(
            "MembersStarting",
            format!("{ready} of {desired} cache members ready"),
        )
    } else {
        Outcome::ready("MembersReady", format!("all {desired} cache members ready"))
    };
    let requeue = if outcome.is_ready() {
        ctx.resync()
    } else {
        ctx.retry()
    };
    set_status(api, cg, ctx, status, &outcome).await?;
    Ok(Action::requeue(requeue))
}

async fn cleanup(cg: &CacheGroup, ctx: &Context) -> Result<Action> {
    let vols: Api<Volume> = Api::all(ctx.client.clone());
    if let Some(vol) = vols.get_opt(&cg.spec.volume).await? {
        let ds_api: Api<DaemonSet> = Api::namespaced(
            ctx.client.clone(),
            &vol.spec.credentials_secret_ref.namespace,
        );
        if ds_api.get_opt(&daemonset_name(cg)).await?.is_some() {
            ds_api
                .delete(&daemonset_name(cg), &DeleteParams::foreground())
                .await?;
        }
    }
    if let Some(sc) = &cg.spec.storage_class_name {
        let sc_api: Api<StorageClass> = Api::all(ctx.client.clone());
        if sc_api.get_opt(sc).await?.is_some() {
            sc_api.delete(sc, &DeleteParams::default()).await?;
        }
    }
    ctx.event(
        cg,
        false,
        "Deleted",
        "Delete",
        format!(
            "removed DaemonSet {} (cache contents on the nodes are left)",
            daemonset_name(cg)
        ),
    )
    .await;
    Ok(Action::await_change())
}
