//! CacheGroup controller: a DaemonSet of cache members (`strata mount --cache-group NAME`)
//! on the selected nodes, in the namespace of the Volume's Secret; optionally a StorageClass
//! whose mounts join the group; status with members ready, the hit ratio and the bytes cached,
//! scraped from the members' metrics.

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
    CACHE_GROUP_LABEL, CacheGroup, CacheGroupStatus, MANAGED_BY, StorageClassSpec, StorageType,
    VOLUME_LABEL, Volume, human_bytes, parse_quantity,
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

/// Security context of the containers that use FUSE: privileged and root (the image's user is
/// 65532; `privileged` alone does not make a container root).
fn root_privileged() -> serde_json::Value {
    json!({"privileged": true, "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false})
}

/// File the warm-up container writes once the warm-up succeeded (its readiness probe).
pub const WARMUP_DONE: &str = "/tmp/strata-warmup-done";

/// Command that succeeds only when a Strata FUSE file system serves `mnt`.
pub fn mounted_check(mnt: &str) -> Vec<String> {
    vec!["strata".into(), "info".into(), mnt.into()]
}

/// Script of the warm-up container: wait until Strata serves `mnt`, run `strata warmup` and
/// retry both with exponential backoff (2 s doubling to 60 s) until the warm-up succeeds, touch
/// `done_file` (the container's readiness), then idle. Every wait runs in the background with
/// `wait`, so SIGTERM (trapped) ends the container at once instead of after the grace period.
pub fn warmup_script(mnt: &str, quoted_paths: &[String], done_file: &str) -> String {
    let check = mounted_check(mnt).join(" ");
    format!(
        "trap 'exit 0' TERM INT\n\
         delay=2\n\
         until {check} >/dev/null 2>&1 && {{ strata warmup {paths} & wait $!; }}; do\n\
         \x20 echo \"warm-up not done yet; retrying in ${{delay}}s\" >&2\n\
         \x20 sleep \"$delay\" & wait $!\n\
         \x20 delay=$((delay * 2)); [ \"$delay\" -gt 60 ] && delay=60\n\
         done\n\
         echo warm-up done\n\
         touch {done_file}\n\
         while :; do sleep 3600 & wait $!; done\n",
        paths = quoted_paths.join(" "),
    )
}

/// `strata mount` options a cache member sets itself; the same keys among the Volume's
/// `mountOptions` (meant for its clients) are not passed to members.
pub const MEMBER_OWN_OPTIONS: &[&str] = &[
    "cache-group",
    "cache-group-addr",
    "no-serve",
    "cache-dir",
    "cache-size",
    "hot-replicas",
    "metrics",
    "metrics-labels",
];

/// Host directories a member needs for a volume kept on the node: the directory of a SQLite
/// metadata file (`sqlite:///dir/meta.db`) and a `file` bucket; nested ones collapse into
/// their ancestor.
pub fn local_dirs(meta_url: &str, vol: &Volume) -> Vec<String> {
    let mut dirs = vec![];
    if let Some(path) = meta_url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or_default();
        if let Some(parent) = std::path::Path::new(path).parent()
            && parent.is_absolute()
            && parent != std::path::Path::new("/")
        {
            dirs.push(parent.to_string_lossy().into_owned());
        }
    }
    if vol.spec.storage.type_ == StorageType::File && vol.spec.storage.bucket.starts_with('/') {
        dirs.push(vol.spec.storage.bucket.trim_end_matches('/').to_string());
    }
    dirs.sort();
    let mut out: Vec<String> = vec![];
    for d in dirs {
        if !out
            .iter()
            .any(|a| d == *a || d.starts_with(&format!("{a}/")))
        {
            out.push(d);
        }
    }
    out
}

/// The DaemonSet of cache members for `cg` of `vol`; `host_dirs` ([`local_dirs`]) are
/// mounted at the same path into the member.
pub fn daemonset(
    cg: &CacheGroup,
    vol: &Volume,
    ctx: &Context,
    host_dirs: &[String],
) -> Result<DaemonSet> {
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
        // What the chart's PodMonitor selects.
        (
            "app.kubernetes.io/component".to_string(),
            "cache".to_string(),
        ),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (CACHE_GROUP_LABEL.to_string(), name.clone()),
        (VOLUME_LABEL.to_string(), vol.name_any()),
    ]);
    let selector = BTreeMap::from([(CACHE_GROUP_LABEL.to_string(), name.clone())]);
    // `-`: the metadata URL (a PostgreSQL password) comes from STRATA_META_URL, never the
    // command line, which anyone on the node can read in `ps`.
    let mut args = vec![
        "mount".to_string(),
        "-".into(),
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
        // Every sample names the member (the downward API variables below; `strata mount`
        // adds cache_group itself).
        "--metrics-labels".into(),
        "pod=$(POD_NAME),namespace=$(POD_NAMESPACE),node=$(NODE_NAME)".into(),
    ];
    // The Volume's client options apply to members too, but not those a member sets itself
    // (given twice, `strata mount` refuses to start: a Volume with `metrics=…` for its
    // clients crash-looped every member).
    for o in &vol.spec.mount_options {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
        if !MEMBER_OWN_OPTIONS.contains(&key) {
            args.push(format!("--{o}"));
        }
    }
    let env = json!([
        {"name": "STRATA_META_URL", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": "metaurl"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "STRATA_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]);
    let host_mnt = format!("{}/{}", s.cache_group_host_dir.trim_end_matches('/'), name);
    let resources = match &cg.spec.resources {
        Some(r) => serde_json::to_value(r).map_err(|e| Error::Invalid(e.to_string()))?,
        None => json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}),
    };
    let mut member_mounts = vec![
        json!({"name": "cache", "mountPath": "/cache"}),
        json!({"name": "mnt", "mountPath": mnt, "mountPropagation": "Bidirectional"}),
    ];
    let mut local_volumes = vec![];
    for (i, d) in host_dirs.iter().enumerate() {
        let name = format!("local-{i}");
        member_mounts.push(json!({"name": name, "mountPath": d}));
        local_volumes
            .push(json!({"name": name, "hostPath": {"path": d, "type": "DirectoryOrCreate"}}));
    }
    let mut containers = vec![json!({
        "name": "member",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["strata"],
        "args": args,
        "env": env,
        // Root: the image runs as 65532, and /dev/fuse and mount(2) need uid 0 even when
        // privileged.
        "securityContext": root_privileged(),
        "ports": [
            {"name": "cache", "containerPort": cg.spec.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": s.member_metrics_port, "protocol": "TCP"},
        ],
        // Ready once Strata serves the mount point: `strata info` reads a virtual xattr only a
        // Strata FUSE mount answers (the bare hostPath, itself a mount, does not; a dead FUSE
        // connection gives ENOTCONN).
        "readinessProbe": {"exec": {"command": mounted_check(mnt)}, "periodSeconds": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["strata", "umount", "--force", mnt]}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources,
        "volumeMounts": member_mounts,
    })];
    if !cg.spec.warmup_paths.is_empty() {
        let paths: Vec<String> = cg
            .spec
            .warmup_paths
            .iter()
            .map(|p| format!("'{mnt}/{}'", p.replace('\'', "")))
            .collect();
        let script = warmup_script(mnt, &paths, WARMUP_DONE);
        containers.push(json!({
            "name": "warmup",
            "image": s.image,
            "imagePullPolicy": s.image_pull_policy,
            "command": ["sh", "-c", script],
            "securityContext": root_privileged(),
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            // The member is Ready only once the warm-up has succeeded.
            "readinessProbe": {"exec": {"command": ["cat", WARMUP_DONE]}, "periodSeconds": 5},
            "terminationMessagePolicy": "FallbackToLogsOnError",
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
    if let Some(v) = pod_spec["volumes"].as_array_mut() {
        v.extend(local_volumes);
    }
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

/// Waiting reasons of a container that will not start by itself.
const FAILING_WAITING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The first failing member (a Failed pod, or a container waiting for one of
/// [`FAILING_WAITING_REASONS`]): the condition reason (the waiting reason, e.g.
/// `CrashLoopBackOff`, or `MemberFailed`) and a message naming the pod, the container and how
/// it last terminated (with the tail of its log: the containers use
/// `terminationMessagePolicy: FallbackToLogsOnError`).
pub fn member_failure(pods: &[Pod]) -> Option<(String, String)> {
    for pod in pods {
        let name = pod.name_any();
        let Some(st) = &pod.status else { continue };
        if st.phase.as_deref() == Some("Failed") {
            let why = [st.reason.as_deref(), st.message.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            return Some((
                "MemberFailed".into(),
                format!("cache member pod {name} failed: {why}"),
            ));
        }
        let statuses = st
            .init_container_statuses
            .iter()
            .flatten()
            .chain(st.container_statuses.iter().flatten());
        for cs in statuses {
            let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if !FAILING_WAITING_REASONS.contains(&reason) {
                continue;
            }
            let mut msg = format!(
                "cache member pod {name} container {}: {reason} (restarted {} times)",
                cs.name, cs.restart_count
            );
            if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                msg.push_str(&format!(
                    "; last terminated: {} (exit code {})",
                    t.reason.as_deref().unwrap_or("unknown"),
                    t.exit_code
                ));
                if let Some(m) = t
                    .message
                    .as_deref()
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                {
                    let lines: Vec<&str> = m.lines().collect();
                    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
                    msg.push_str(&format!(": {}", truncate(&tail, 300)));
                }
            } else if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
                msg.push_str(&format!(": {}", truncate(m, 300)));
            }
            return Some((reason.to_string(), msg));
        }
    }
    None
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
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
    // The metadata URL decides which host directories a member needs (SQLite on the node).
    let target = match ctx.read_target(&vol.spec.credentials_secret_ref).await? {
        Ok(t) => t,
        Err(outcome) => {
            set_status(api, cg, ctx, pending, &outcome).await?;
            return Ok(Action::requeue(ctx.retry()));
        }
    };
    let ds = daemonset(cg, &vol, ctx, &local_dirs(&target.meta_url, &vol))?;
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
    let (hits, misses, cached) = counts.iter().fold((0u64, 0u64, 0u64), |(h, m, b), c| {
        (h + c.hits, m + c.misses, b + c.cached_bytes)
    });
    let hit_ratio =
        (hits + misses > 0).then(|| format!("{:.2}", hits as f64 / (hits + misses) as f64));

    let status = CacheGroupStatus {
        members_ready: Some(ready),
        members_desired: Some(desired),
        members: Some(format!("{ready}/{desired}")),
        hit_ratio,
        cached_bytes: (!counts.is_empty()).then_some(cached as i64),
        cached: (!counts.is_empty()).then(|| human_bytes(cached)),
        client_mount_options: Some(opts),
        ..Default::default()
    };
    let outcome = if let Some((reason, message)) = member_failure(&members.items) {
        Outcome::degraded(&reason, message)
    } else if desired == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// The warm-up script, run by a real `sh` with a fake `strata` on PATH: it waits for the
    /// mount, retries a failing warm-up until it succeeds, marks it done, and exits at once
    /// on SIGTERM.
    #[test]
    fn warmup_script_retries_until_success_and_exits_on_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let log = dir.path().join("calls");
        let done = dir.path().join("done");
        // `strata info` fails once (not mounted yet), `strata warmup` fails once.
        let fake = format!(
            "#!/bin/sh\necho \"$*\" >> {log}\nn=$(grep -c \"^$1\" {log})\n[ \"$n\" -ge 2 ]\n",
            log = log.display()
        );
        let strata = bin.join("strata");
        std::fs::write(&strata, fake).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&strata, std::fs::Permissions::from_mode(0o755)).unwrap();

        let script = warmup_script(
            "/mnt/strata",
            &["'/mnt/strata/models'".to_string()],
            done.to_str().unwrap(),
        );
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !done.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "warm-up never marked done; calls: {:?}",
                std::fs::read_to_string(&log)
            );
            assert!(child.try_wait().unwrap().is_none(), "script exited early");
            std::thread::sleep(Duration::from_millis(100));
        }
        let calls = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = calls.lines().collect();
        // info fails → retry; info ok, warmup fails → retry; info ok, warmup ok.
        assert_eq!(
            lines,
            [
                "info /mnt/strata",
                "info /mnt/strata",
                "warmup /mnt/strata/models",
                "info /mnt/strata",
                "warmup /mnt/strata/models",
            ],
            "{calls}"
        );
        assert!(
            start.elapsed() >= Duration::from_secs(6),
            "backoff 2 s then 4 s"
        );
        // Idle now; SIGTERM ends it at once (not after a grace period).
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "idles after the warm-up"
        );
        let t = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "SIGTERM ignored");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status:?}");
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "strata-cache-gpu-x1"}, "status": status}),
        )
        .unwrap()
    }

    #[test]
    fn crash_looping_or_failed_members_are_reported() {
        let looping = pod(json!({"phase": "Running", "containerStatuses": [
            {"name": "member", "ready": false, "restartCount": 4, "image": "i", "imageID": "",
             "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                 "message": "starting\nmount: cannot open /dev/fuse: Permission denied\n"}}},
            {"name": "warmup", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
             "state": {"running": {}}}]}));
        let (reason, msg) = member_failure(&[looping]).unwrap();
        assert_eq!(reason, "CrashLoopBackOff");
        assert!(msg.contains("pod strata-cache-gpu-x1"), "{msg}");
        assert!(msg.contains("container member"), "{msg}");
        assert!(msg.contains("restarted 4 times"), "{msg}");
        assert!(
            msg.contains("last terminated: Error (exit code 1)"),
            "{msg}"
        );
        assert!(msg.contains("cannot open /dev/fuse"), "{msg}");

        let failed =
            pod(json!({"phase": "Failed", "reason": "Evicted", "message": "disk pressure"}));
        let (reason, msg) = member_failure(&[failed]).unwrap();
        assert_eq!(reason, "MemberFailed");
        assert!(msg.contains("Evicted: disk pressure"), "{msg}");

        // Starting (ContainerCreating) or running members are not failures.
        let starting = pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "member", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
             "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        let running = pod(json!({"phase": "Running", "containerStatuses": [
            {"name": "member", "ready": true, "restartCount": 1, "image": "i", "imageID": "",
             "state": {"running": {}}}]}));
        assert_eq!(member_failure(&[starting, running]), None);
    }

    #[test]
    fn members_mount_the_host_directories_of_a_local_volume() {
        let vol = |ty: &str, bucket: &str| -> Volume {
            serde_json::from_value(json!({
                "apiVersion": "strata.io/v1alpha1", "kind": "Volume",
                "metadata": {"name": "v"},
                "spec": {"credentialsSecretRef": {"name": "s", "namespace": "n"},
                    "storage": {"type": ty, "bucket": bucket}}}))
            .unwrap()
        };
        assert_eq!(
            local_dirs(
                "sqlite:///var/lib/strata/models/meta.db",
                &vol("file", "/var/lib/strata/models/data")
            ),
            ["/var/lib/strata/models"]
        );
        assert_eq!(
            local_dirs("sqlite:///db/meta.db?cache=shared", &vol("file", "/data/")),
            ["/data", "/db"]
        );
        assert!(local_dirs("postgres://u:p@h/db", &vol("s3", "https://b.example.com")).is_empty());
    }
}
