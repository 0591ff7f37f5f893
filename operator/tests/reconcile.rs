//! Reconcile scenarios against the tower-test mock API server: finalizer added, fs actions,
//! owned objects applied, Events, status patched by server-side apply, cleanup on delete,
//! errors requeued with backoff; and leader election against the same mock.

mod mock;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use mock::{Fixed, Step, done, not_found, scenario};
use serde_json::{Value, json};
use strata_operator::crd::{CacheGroup, Quota, Volume};
use strata_operator::errors::error_policy;
use strata_operator::fsops::{FsError, MemFs};
use strata_operator::{cachegroup, quota, volume};

const NS: &str = "strata-system";
const META: &str = "postgres://strata:pw@db:5432/vol1";

fn volume_obj(finalizer: bool, status: Value, extra: Value) -> Volume {
    let mut v = json!({
        "apiVersion": "strata.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": "vol1", "uid": "u-vol1", "generation": 3},
        "spec": {
            "credentialsSecretRef": {"name": "vol1-secret", "namespace": NS},
            "storage": {"type": "s3", "bucket": "https://vol1.s3.example.com"},
            "capacity": "10Ti",
            "cache": {"sizeMiB": 2048},
            "mountOptions": ["buffer-size=600"],
        },
    });
    if finalizer {
        v["metadata"]["finalizers"] = json!(["strata.io/cleanup"]);
    }
    if !status.is_null() {
        v["status"] = status;
    }
    if let Value::Object(m) = extra {
        for (k, val) in m {
            if k == "deletionTimestamp" {
                v["metadata"][k] = val;
            } else {
                v["spec"][k] = val;
            }
        }
    }
    serde_json::from_value(v).unwrap()
}

fn secret() -> Value {
    use base64_like::enc;
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vol1-secret", "namespace": NS},
        "data": {"metaurl": enc(META), "access-key": enc("AK"), "secret-key": enc("SK")}})
}

/// Tiny base64 encoder for fixtures (Secrets carry base64 data).
mod base64_like {
    pub fn enc(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = s.as_bytes();
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn ready_status() -> Value {
    json!({"uuid": "00000000-0000-0000-0000-000000000001", "origin": "Formatted",
        "conditions": [{"type": "Ready", "status": "True", "reason": "VolumeReady", "message": "",
            "lastTransitionTime": "2026-11-22T00:00:00Z", "observedGeneration": 3}]})
}

fn sc_list(names: &[&str]) -> Value {
    let items: Vec<Value> = names
        .iter()
        .map(|n| json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": n, "labels": {"strata.io/volume": "vol1"}}, "provisioner": "csi.strata.io"}))
        .collect();
    json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList", "metadata": {}, "items": items})
}

const VOL_PATH: &str = "/apis/strata.io/v1alpha1/volumes/vol1";
const SECRET_PATH: &str = "/api/v1/namespaces/strata-system/secrets/vol1-secret";
const SC_PATH: &str = "/apis/storage.k8s.io/v1/storageclasses";

#[tokio::test]
async fn volume_gets_finalizer_first() {
    let fs = Arc::new(MemFs::default());
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("PATCH", VOL_PATH, 200, volume_json(true)).check(|b| {
                // JSON patch: test + add of the finalizer list.
                assert_eq!(b[1]["path"], "/metadata/finalizers", "{b}");
                assert_eq!(b[1]["value"], json!(["strata.io/cleanup"]));
            }),
        ],
    );
    let vol = volume_obj(false, Value::Null, json!({}));
    let action = volume::reconcile(Arc::new(vol), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    done(task).await;
    assert!(
        fs.calls.lock().is_empty(),
        "no fs action before the finalizer"
    );
}

#[tokio::test]
async fn new_volume_is_formatted_gets_storage_class_and_ready_status() {
    let fs = Arc::new(MemFs::default());
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("default", "Formatted"),
            Step::new("GET", format!("{SC_PATH}/vol1"), 404, not_found()),
            Step::new("PATCH", format!("{SC_PATH}/vol1"), 200, Value::Null)
                .query("fieldManager=strata-operator")
                .check(|b| {
                    assert_eq!(b["provisioner"], "csi.strata.io");
                    assert_eq!(b["allowVolumeExpansion"], true);
                    let p = &b["parameters"];
                    assert_eq!(p["pathPattern"], "tenants/${pvc.namespace}/${pv.name}");
                    assert_eq!(p["mountOptions"], "buffer-size=600,cache-size=2048");
                    assert_eq!(
                        p["csi.storage.k8s.io/node-stage-secret-name"],
                        "vol1-secret"
                    );
                    assert_eq!(p["csi.storage.k8s.io/provisioner-secret-namespace"], NS);
                    assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "Volume");
                    assert_eq!(b["metadata"]["labels"]["strata.io/volume"], "vol1");
                    assert!(
                        !b.to_string().contains("pw@"),
                        "no secret in the StorageClass"
                    );
                }),
            Step::new("GET", SC_PATH, 200, sc_list(&["vol1", "old-class"]))
                .query("labelSelector=strata.io%2Fvolume%3Dvol1"),
            Step::new(
                "DELETE",
                format!("{SC_PATH}/old-class"),
                200,
                sc_list(&["old-class"])["items"][0].clone(),
            ),
            Step::event("default", "Ready"),
            Step::new(
                "PATCH",
                format!("{VOL_PATH}/status"),
                200,
                volume_json(true),
            )
            .query("force=true")
            .check(|b| {
                assert_eq!(b["kind"], "Volume");
                let s = &b["status"];
                assert_eq!(s["observedGeneration"], 3);
                assert_eq!(s["conditions"][0]["type"], "Ready");
                assert_eq!(s["conditions"][0]["status"], "True");
                assert_eq!(s["conditions"][2]["type"], "Degraded");
                assert_eq!(s["conditions"][2]["status"], "False");
                assert_eq!(s["origin"], "Formatted");
                assert_eq!(s["capacityBytes"], 10u64 << 40);
                assert_eq!(s["usage"], "0 / 10Ti");
                assert_eq!(s["storageClasses"], json!(["vol1"]));
                assert!(s["uuid"].is_string());
            }),
        ],
    );
    let vol = volume_obj(true, Value::Null, json!({}));
    let action = volume::reconcile(Arc::new(vol), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    done(task).await;
    assert_eq!(*fs.calls.lock(), vec!["ensure_volume vol1", "usage"]);
    let vols = fs.volumes.lock();
    let v = vols
        .get(META)
        .expect("formatted under the Secret's metaurl");
    assert_eq!((v.capacity_gib, v.block_size_kib), (10 << 10, 4096));
}

#[tokio::test]
async fn ready_volume_is_adopted_without_events_and_changed_class_is_recreated() {
    let fs = Arc::new(MemFs::default());
    // Formatted earlier (same name): adopted, never reformatted.
    fs.volumes.lock().insert(
        META.into(),
        strata_operator::fsops::MemVolume {
            name: "vol1".into(),
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            block_size_kib: 4096,
            capacity_gib: 10 << 10,
            inodes: 0,
            usage: strata_operator::fsops::Usage {
                used_bytes: 3 << 29,
                used_inodes: 7,
                capacity_bytes: 10 << 40,
                inodes: 0,
                clients: 2,
            },
            quotas: Default::default(),
            datasets: Default::default(),
            emptied: false,
        },
    );
    let stale = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "vol1"}, "provisioner": "csi.strata.io",
        "parameters": {"pathPattern": "x"}, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"});
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::new("GET", format!("{SC_PATH}/vol1"), 200, stale),
            Step::new(
                "DELETE",
                format!("{SC_PATH}/vol1"),
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            Step::new("PATCH", format!("{SC_PATH}/vol1"), 200, Value::Null),
            Step::new("GET", SC_PATH, 200, sc_list(&["vol1"])),
            Step::new(
                "PATCH",
                format!("{VOL_PATH}/status"),
                200,
                volume_json(true),
            )
            .check(|b| {
                let s = &b["status"];
                assert_eq!(s["usage"], "1.5Gi / 10Ti");
                assert_eq!(s["usedInodes"], 7);
                assert_eq!(s["clients"], 2);
                assert_eq!(s["uuid"], "00000000-0000-0000-0000-000000000001");
                assert_eq!(
                    s["conditions"][0]["lastTransitionTime"],
                    "2026-11-22T00:00:00Z"
                );
            }),
        ],
    );
    let vol = volume_obj(true, ready_status(), json!({}));
    volume::reconcile(Arc::new(vol), ctx.clone()).await.unwrap();
    done(task).await;
    assert_eq!(fs.volumes.lock().len(), 1);
    // The usage in status is also the Volume's gauges.
    let text = ctx.metrics.encode();
    for want in [
        "strata_operator_volume_used_bytes{volume=\"vol1\"} 1610612736",
        "strata_operator_volume_used_inodes{volume=\"vol1\"} 7",
        "strata_operator_volume_clients{volume=\"vol1\"} 2",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

#[tokio::test]
async fn missing_secret_and_name_mismatch_are_degraded_not_formatted() {
    let fs = Arc::new(MemFs::default());
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 404, not_found()),
            Step::event("default", "SecretNotFound"),
            Step::new(
                "PATCH",
                format!("{VOL_PATH}/status"),
                200,
                volume_json(true),
            )
            .check(|b| {
                let c = &b["status"]["conditions"];
                assert_eq!(c[0]["status"], "False");
                assert_eq!(c[0]["reason"], "SecretNotFound");
                assert_eq!(c[2]["status"], "True");
                assert!(
                    c[2]["message"]
                        .as_str()
                        .unwrap()
                        .contains("strata-system/vol1-secret")
                );
            }),
        ],
    );
    let action = volume::reconcile(Arc::new(volume_obj(true, Value::Null, json!({}))), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(20)));
    done(task).await;
    assert!(fs.calls.lock().is_empty());

    // The metadata holds another volume: Degraded NameMismatch, nothing formatted or applied.
    fs.fail.lock().push(FsError::NameMismatch {
        existing: "other".into(),
        wanted: "vol1".into(),
    });
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("default", "NameMismatch"),
            Step::new(
                "PATCH",
                format!("{VOL_PATH}/status"),
                200,
                volume_json(true),
            )
            .check(|b| {
                assert_eq!(b["status"]["conditions"][0]["reason"], "NameMismatch");
            }),
        ],
    );
    volume::reconcile(Arc::new(volume_obj(true, Value::Null, json!({}))), ctx)
        .await
        .unwrap();
    done(task).await;
    assert!(fs.volumes.lock().is_empty());
}

#[tokio::test]
async fn deleted_volume_removes_classes_and_with_delete_policy_its_data() {
    let fs = Arc::new(MemFs::default());
    fs.volumes.lock().insert(
        META.into(),
        strata_operator::fsops::MemVolume {
            name: "vol1".into(),
            uuid: "u".into(),
            block_size_kib: 4096,
            capacity_gib: 0,
            inodes: 0,
            usage: Default::default(),
            quotas: Default::default(),
            datasets: Default::default(),
            emptied: false,
        },
    );
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SC_PATH, 200, sc_list(&["vol1"])),
            Step::new(
                "DELETE",
                format!("{SC_PATH}/vol1"),
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("default", "DataDeleted"),
            Step::new("PATCH", VOL_PATH, 200, volume_json(true)).check(|b| {
                assert_eq!(b[1]["op"], "remove", "finalizer removed: {b}");
                assert_eq!(b[1]["path"], "/metadata/finalizers/0");
            }),
        ],
    );
    let vol = volume_obj(
        true,
        ready_status(),
        json!({"deletionTimestamp": "2026-11-22T01:00:00Z", "deletionPolicy": "Delete"}),
    );
    volume::reconcile(Arc::new(vol), ctx).await.unwrap();
    done(task).await;
    assert!(fs.volumes.lock()[META].emptied);

    // Retain (the default): classes go, the data stays, no Secret needed.
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SC_PATH, 200, sc_list(&[])),
            Step::new("PATCH", VOL_PATH, 200, volume_json(true)),
        ],
    );
    let vol = volume_obj(
        true,
        ready_status(),
        json!({"deletionTimestamp": "2026-11-22T01:00:00Z"}),
    );
    volume::reconcile(Arc::new(vol), ctx).await.unwrap();
    done(task).await;
    assert_eq!(
        fs.calls
            .lock()
            .iter()
            .filter(|c| *c == "empty_volume")
            .count(),
        1
    );
}

#[tokio::test]
async fn api_errors_requeue_with_growing_backoff() {
    let fs = Arc::new(MemFs::default());
    let err = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd down", "reason": "InternalError"});
    let (ctx, task) = scenario(
        fs,
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 500, err.clone()),
            Step::new("GET", SECRET_PATH, 500, err),
        ],
    );
    let vol = Arc::new(volume_obj(true, Value::Null, json!({})));
    let e1 = volume::reconcile(vol.clone(), ctx.clone())
        .await
        .unwrap_err();
    assert!(e1.to_string().contains("etcd down"), "{e1}");
    assert_eq!(
        error_policy(vol.clone(), &e1, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    let e2 = volume::reconcile(vol.clone(), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(
        error_policy(vol, &e2, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    done(task).await;
    assert!(
        ctx.metrics
            .encode()
            .contains("strata_operator_reconcile_failures_total{kind=\"Volume\"} 2")
    );
}

fn quota_obj(deleting: bool, status: Value) -> Quota {
    let mut q = json!({
        "apiVersion": "strata.io/v1alpha1", "kind": "Quota",
        "metadata": {"name": "team-quota", "namespace": "team-a", "uid": "u-q", "generation": 1,
            "finalizers": ["strata.io/cleanup"], "creationTimestamp": "2026-11-22T00:00:00Z"},
        "spec": {"volume": "vol1", "capacity": "500Gi", "inodes": 100000},
    });
    if deleting {
        q["metadata"]["deletionTimestamp"] = json!("2026-11-22T02:00:00Z");
    }
    if !status.is_null() {
        q["status"] = status;
    }
    serde_json::from_value(q).unwrap()
}

fn volume_json(ready: bool) -> Value {
    let status = if ready { ready_status() } else { json!({}) };
    serde_json::to_value(volume_obj(true, status, json!({}))).unwrap()
}

fn quota_json() -> Value {
    serde_json::to_value(quota_obj(false, Value::Null)).unwrap()
}

const QUOTA_PATH: &str = "/apis/strata.io/v1alpha1/namespaces/team-a/quotas";

#[tokio::test]
async fn quota_sets_tenant_directory_quota_and_reports_usage() {
    let fs = Arc::new(MemFs::default());
    fs.volumes.lock().insert(
        META.into(),
        strata_operator::fsops::MemVolume {
            name: "vol1".into(),
            uuid: "u".into(),
            block_size_kib: 4096,
            capacity_gib: 0,
            inodes: 0,
            usage: Default::default(),
            quotas: Default::default(),
            datasets: Default::default(),
            emptied: false,
        },
    );
    let q = quota_obj(false, Value::Null);
    let list = json!({"apiVersion": "strata.io/v1alpha1", "kind": "QuotaList", "metadata": {},
        "items": [serde_json::to_value(&q).unwrap()]});
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", QUOTA_PATH, 200, list),
            Step::new("GET", VOL_PATH, 200, volume_json(true)),
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("team-a", "QuotaApplied"),
            Step::new(
                "PATCH",
                format!("{QUOTA_PATH}/team-quota/status"),
                200,
                quota_json(),
            )
            .check(|b| {
                let s = &b["status"];
                assert_eq!(s["path"], "tenants/team-a");
                assert_eq!(s["limitBytes"], 500u64 << 30);
                assert_eq!(s["limitInodes"], 100000);
                assert_eq!(s["usedBytes"], 0);
                assert_eq!(s["usage"], "0 / 500Gi");
                assert_eq!(s["inodeUsage"], "0 / 100000");
                assert_eq!(s["conditions"][0]["status"], "True");
            }),
        ],
    );
    quota::reconcile(Arc::new(q), ctx.clone()).await.unwrap();
    done(task).await;
    // Used/limit per limited resource as a gauge (nothing used yet).
    let text = ctx.metrics.encode();
    for resource in ["bytes", "inodes"] {
        let want = format!(
            "strata_operator_quota_used_ratio{{namespace=\"team-a\",quota=\"team-quota\",volume=\"vol1\",resource=\"{resource}\"}} 0.0"
        );
        assert!(text.contains(&want), "{want}: {text}");
    }
    assert_eq!(
        *fs.calls.lock(),
        vec![format!(
            "set_dir_quota tenants/team-a {} 100000",
            500u64 << 30
        )]
    );

    // Deleting the Quota removes the limit (files stay) and the finalizer.
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", VOL_PATH, 200, volume_json(true)),
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("team-a", "QuotaRemoved"),
            Step::new(
                "PATCH",
                format!("{QUOTA_PATH}/team-quota"),
                200,
                quota_json(),
            ),
        ],
    );
    quota::reconcile(Arc::new(quota_obj(true, Value::Null)), ctx)
        .await
        .unwrap();
    done(task).await;
    assert!(fs.volumes.lock()[META].quotas.is_empty());
}

#[tokio::test]
async fn quota_waits_for_its_volume() {
    let fs = Arc::new(MemFs::default());
    let q = quota_obj(false, Value::Null);
    let list = json!({"apiVersion": "strata.io/v1alpha1", "kind": "QuotaList", "metadata": {}, "items": []});
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", QUOTA_PATH, 200, list),
            Step::new("GET", VOL_PATH, 200, volume_json(false)),
            Step::event("team-a", "VolumeNotReady"),
            Step::new(
                "PATCH",
                format!("{QUOTA_PATH}/team-quota/status"),
                200,
                quota_json(),
            )
            .check(|b| {
                let c = &b["status"]["conditions"];
                assert_eq!(c[0]["reason"], "VolumeNotReady");
                assert_eq!(c[1]["type"], "Progressing");
                assert_eq!(c[1]["status"], "True");
            }),
        ],
    );
    let a = quota::reconcile(Arc::new(q), ctx).await.unwrap();
    assert_eq!(a, Action::requeue(Duration::from_secs(20)));
    done(task).await;
    assert!(fs.calls.lock().is_empty());
}

fn cachegroup_obj(deleting: bool) -> CacheGroup {
    let mut c = json!({
        "apiVersion": "strata.io/v1alpha1", "kind": "CacheGroup",
        "metadata": {"name": "gpu", "uid": "u-cg", "generation": 2, "finalizers": ["strata.io/cleanup"]},
        "spec": {"volume": "vol1", "nodeSelector": {"gpu": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "medium": {"hostPath": {"path": "/mnt/nvme/strata"}}, "sizePerNode": "200Gi",
            "warmupPaths": ["models/llama"], "replicas": 3, "storageClassName": "vol1-gpu"},
    });
    if deleting {
        c["metadata"]["deletionTimestamp"] = json!("2026-11-22T02:00:00Z");
    }
    serde_json::from_value(c).unwrap()
}

const DS_PATH: &str = "/apis/apps/v1/namespaces/strata-system/daemonsets/strata-cache-gpu";

#[tokio::test]
async fn cachegroup_applies_daemonset_class_and_reports_members_and_hit_ratio() {
    let fs = Arc::new(MemFs::default());
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        {"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.1"}},
        {"metadata": {"name": "b"}, "status": {"podIP": "10.0.0.2"}}]});
    let (ctx, task) = scenario(
        fs,
        Fixed(Some((30, 10))),
        vec![
            // The Volume's client options reach members, except those a member sets
            // itself (a second --metrics made `strata mount` refuse to start).
            Step::new(
                "GET",
                VOL_PATH,
                200,
                serde_json::to_value(volume_obj(
                    true,
                    ready_status(),
                    json!({"mountOptions": ["buffer-size=600", "metrics=127.0.0.1:9999"]}),
                ))
                .unwrap(),
            ),
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::new("PATCH", DS_PATH, 200, Value::Null)
                .query("fieldManager=strata-operator")
                .check(|b| {
                    let pod = &b["spec"]["template"]["spec"];
                    let args: Vec<String> =
                        serde_json::from_value(pod["containers"][0]["args"].clone()).unwrap();
                    let joined = args.join(" ");
                    assert!(
                        joined.starts_with("mount - /mnt/strata --cache-group gpu"),
                        "{joined}"
                    );
                    assert!(joined.contains("--buffer-size=600"), "{joined}");
                    assert_eq!(
                        args.iter()
                            .filter(|a| *a == "--metrics" || a.starts_with("--metrics="))
                            .count(),
                        1,
                        "{joined}"
                    );
                    assert!(!joined.contains("127.0.0.1:9999"), "{joined}");
                    assert!(
                        !joined.contains("META_URL"),
                        "no metadata URL on the command line"
                    );
                    let member = &pod["containers"][0];
                    assert_eq!(member["env"][0]["name"], "STRATA_META_URL");
                    assert_eq!(member["securityContext"]["privileged"], true);
                    assert_eq!(member["securityContext"]["runAsUser"], 0);
                    assert_eq!(member["securityContext"]["runAsGroup"], 0);
                    assert_eq!(
                        member["readinessProbe"]["exec"]["command"],
                        json!(["strata", "info", "/mnt/strata"])
                    );
                    let warmup = &pod["containers"][1];
                    assert_eq!(warmup["securityContext"]["runAsUser"], 0);
                    assert_eq!(
                        warmup["readinessProbe"]["exec"]["command"],
                        json!(["cat", cachegroup::WARMUP_DONE])
                    );
                    let script = warmup["command"][2].as_str().unwrap();
                    assert!(script.starts_with("trap 'exit 0' TERM"), "{script}");
                    assert!(!script.contains("mountpoint"), "{script}");
                    assert!(!script.contains("sleep infinity"), "{script}");
                    assert!(joined.contains("--cache-size 204800"), "{joined}");
                    assert!(joined.contains("--hot-replicas 3"));
                    assert!(joined.contains(
                        "--metrics-labels pod=$(POD_NAME),namespace=$(POD_NAMESPACE),node=$(NODE_NAME) "
                    ));
                    assert_eq!(
                        b["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
                        "cache"
                    );
                    assert!(joined.contains("--cache-group-addr $(NODE_IP):9568"));
                    assert!(joined.contains("--buffer-size=600"));
                    assert_eq!(pod["nodeSelector"]["gpu"], "true");
                    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
                    assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/mnt/nvme/strata");
                    // PostgreSQL + S3: no host directory of the volume to mount.
                    assert_eq!(pod["volumes"].as_array().unwrap().len(), 2);
                    assert_eq!(
                        pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"],
                        "vol1-secret"
                    );
                    assert_eq!(pod["containers"][1]["name"], "warmup");
                    assert!(
                        pod["containers"][1]["command"][2]
                            .as_str()
                            .unwrap()
                            .contains("strata warmup '/mnt/strata/models/llama'")
                    );
                    assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "CacheGroup");
                })
                .reply_with_status(json!({"numberReady": 2, "desiredNumberScheduled": 2,
                    "currentNumberScheduled": 2, "numberMisscheduled": 0})),
            Step::new("GET", format!("{SC_PATH}/vol1-gpu"), 404, not_found()),
            Step::new("PATCH", format!("{SC_PATH}/vol1-gpu"), 200, Value::Null).check(|b| {
                // Clients of the group keep the Volume's client options, metrics included.
                assert_eq!(
                    b["parameters"]["mountOptions"],
                    "buffer-size=600,metrics=127.0.0.1:9999,cache-size=2048,cache-group=gpu,no-serve"
                );
                assert_eq!(b["metadata"]["labels"]["strata.io/cache-group"], "gpu");
            }),
            Step::new("GET", "/api/v1/namespaces/strata-system/pods", 200, pods)
                .query("labelSelector=strata.io%2Fcache-group%3Dgpu"),
            Step::event("default", "MembersReady"),
            Step::new(
                "PATCH",
                "/apis/strata.io/v1alpha1/cachegroups/gpu/status",
                200,
                serde_json::to_value(cachegroup_obj(false)).unwrap(),
            )
            .check(|b| {
                let s = &b["status"];
                assert_eq!(s["members"], "2/2");
                assert_eq!(s["hitRatio"], "0.75");
                // Two members scraped, 40 MiB each in the fake.
                assert_eq!(s["cachedBytes"], 80 << 20);
                assert_eq!(s["cached"], "80Mi");
                assert_eq!(s["clientMountOptions"], "cache-group=gpu,no-serve");
                assert_eq!(s["conditions"][0]["status"], "True");
            }),
        ],
    );
    cachegroup::reconcile(Arc::new(cachegroup_obj(false)), ctx)
        .await
        .unwrap();
    done(task).await;

    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("GET", VOL_PATH, 200, volume_json(true)),
            Step::new("GET", DS_PATH, 200, Value::Null).reply_with_status(json!({})),
            Step::new(
                "DELETE",
                DS_PATH,
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
            .check(|b| assert_eq!(b["propagationPolicy"], "Foreground")),
            Step::new(
                "GET",
                format!("{SC_PATH}/vol1-gpu"),
                200,
                sc_list(&["vol1-gpu"])["items"][0].clone(),
            ),
            Step::new(
                "DELETE",
                format!("{SC_PATH}/vol1-gpu"),
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            Step::event("default", "Deleted"),
            Step::new(
                "PATCH",
                "/apis/strata.io/v1alpha1/cachegroups/gpu",
                200,
                serde_json::to_value(cachegroup_obj(false)).unwrap(),
            ),
        ],
    );
    cachegroup::reconcile(Arc::new(cachegroup_obj(true)), ctx)
        .await
        .unwrap();
    done(task).await;
}

/// Replies to a DaemonSet request: a DaemonSet (from the request body when present) with `status`.
trait ReplyWithStatus {
    fn reply_with_status(self, status: Value) -> Step;
}

impl ReplyWithStatus for Step {
    fn reply_with_status(mut self, status: Value) -> Step {
        self.reply = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "strata-cache-gpu", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"strata.io/cache-group": "gpu"}},
                "template": {"spec": {"containers": []}}},
            "status": status});
        self
    }
}

const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/strata-system/leases/strata-operator-leader";

fn elector(
    ctx: &strata_operator::context::Context,
    id: &str,
) -> strata_operator::leader::LeaderElector {
    strata_operator::leader::LeaderElector::new(
        ctx.client.clone(),
        strata_operator::leader::LeaseSettings {
            name: "strata-operator-leader".into(),
            namespace: NS.into(),
            identity: id.into(),
            lease_duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        },
    )
}

#[tokio::test]
async fn leader_election_creates_a_missing_lease_and_respects_a_live_holder() {
    let now = k8s_openapi::jiff::Timestamp::now();
    let held = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "strata-operator-leader", "namespace": NS, "resourceVersion": "7"},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
            "renewTime": now.to_string(), "leaseTransitions": 2}});
    let expired = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "strata-operator-leader", "namespace": NS, "resourceVersion": "8"},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
            "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 2}});
    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("GET", LEASE_PATH, 404, not_found()),
            Step::new(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/strata-system/leases",
                201,
                Value::Null,
            )
            .check(|b| assert_eq!(b["spec"]["holderIdentity"], "me")),
            Step::new("GET", LEASE_PATH, 200, held),
            Step::new("GET", LEASE_PATH, 200, expired),
            Step::new("PUT", LEASE_PATH, 200, Value::Null).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseTransitions"], 3);
                assert_eq!(
                    b["metadata"]["resourceVersion"], "8",
                    "optimistic concurrency"
                );
            }),
        ],
    );
    let me = elector(&ctx, "me");
    assert!(
        me.try_acquire().await.unwrap(),
        "missing Lease: created and held"
    );
    assert!(!me.try_acquire().await.unwrap(), "live holder: not taken");
    assert!(
        me.try_acquire().await.unwrap(),
        "expired holder: taken over"
    );
    done(task).await;
}

/// A member crash-looping ("cannot open /dev/fuse") makes the CacheGroup Degraded with the
/// pod, the container and its last termination in the message, and a Warning event.
#[tokio::test]
async fn crash_looping_members_make_the_cachegroup_degraded() {
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        {"metadata": {"name": "strata-cache-gpu-7xk2p"}, "status": {"phase": "Running",
            "podIP": "10.0.0.1", "containerStatuses": [
            {"name": "member", "ready": false, "restartCount": 3, "image": "i", "imageID": "",
             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                 "message": "strata: cannot open /dev/fuse: Permission denied"}}}]}}]});
    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("GET", VOL_PATH, 200, volume_json(true)),
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::new("PATCH", DS_PATH, 200, Value::Null)
                .reply_with_status(json!({"numberReady": 0, "desiredNumberScheduled": 1,
                    "currentNumberScheduled": 1, "numberMisscheduled": 0})),
            Step::new("GET", format!("{SC_PATH}/vol1-gpu"), 404, not_found()),
            Step::new("PATCH", format!("{SC_PATH}/vol1-gpu"), 200, Value::Null),
            Step::new("GET", "/api/v1/namespaces/strata-system/pods", 200, pods),
            Step::event("default", "CrashLoopBackOff").check(|b| {
                assert_eq!(b["reason"], "CrashLoopBackOff");
                assert_eq!(b["type"], "Warning");
            }),
            Step::new(
                "PATCH",
                "/apis/strata.io/v1alpha1/cachegroups/gpu/status",
                200,
                serde_json::to_value(cachegroup_obj(false)).unwrap(),
            )
            .check(|b| {
                let conds = b["status"]["conditions"].as_array().unwrap();
                let degraded = conds.iter().find(|c| c["type"] == "Degraded").unwrap();
                assert_eq!(degraded["status"], "True", "{conds:?}");
                assert_eq!(degraded["reason"], "CrashLoopBackOff");
                let msg = degraded["message"].as_str().unwrap();
                assert!(msg.contains("strata-cache-gpu-7xk2p"), "{msg}");
                assert!(msg.contains("container member"), "{msg}");
                assert!(msg.contains("cannot open /dev/fuse"), "{msg}");
                let ready = conds.iter().find(|c| c["type"] == "Ready").unwrap();
                assert_eq!(ready["status"], "False");
                assert_eq!(b["status"]["members"], "0/1");
            }),
        ],
    );
    cachegroup::reconcile(Arc::new(cachegroup_obj(false)), ctx)
        .await
        .unwrap();
    done(task).await;
}

/// Shutdown deletes the operator's own Lease, guarded by uid and resourceVersion; a Lease
/// held by another replica is left alone.
#[tokio::test]
async fn release_deletes_only_a_lease_this_replica_holds() {
    let lease = |holder: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "strata-operator-leader", "namespace": NS,
                "uid": "u-lease", "resourceVersion": "42"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}})
    };
    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("GET", LEASE_PATH, 200, lease("me")),
            Step::new(
                "DELETE",
                LEASE_PATH,
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
            .check(|b| {
                assert_eq!(b["preconditions"]["uid"], "u-lease");
                assert_eq!(b["preconditions"]["resourceVersion"], "42");
            }),
            Step::new("GET", LEASE_PATH, 200, lease("other")),
        ],
    );
    let me = elector(&ctx, "me");
    me.release().await.unwrap();
    me.release().await.unwrap();
    done(task).await;
}

/// `strata-operator cleanup-leases`: every named Lease is deleted, a missing one is fine.
#[tokio::test]
async fn cleanup_deletes_every_named_lease_and_ignores_missing_ones() {
    let base = "/apis/coordination.k8s.io/v1/namespaces/strata-system/leases";
    let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("DELETE", format!("{base}/csi-strata-io"), 200, ok.clone()),
            Step::new(
                "DELETE",
                format!("{base}/external-resizer-csi-strata-io"),
                404,
                not_found(),
            ),
            Step::new("DELETE", format!("{base}/strata-operator-leader"), 200, ok),
        ],
    );
    let names: Vec<String> = [
        "csi-strata-io",
        "external-resizer-csi-strata-io",
        "strata-operator-leader",
    ]
    .map(String::from)
    .to_vec();
    let deleted = strata_operator::leader::delete_leases(ctx.client.clone(), NS, &names)
        .await
        .unwrap();
    assert_eq!(deleted, ["csi-strata-io", "strata-operator-leader"]);
    done(task).await;
}

/// `cleanup-leases --wait-for-pods`: waits while a controller pod (whose sidecars would
/// re-create their Lease) still exists; gives up after the timeout.
#[tokio::test]
async fn cleanup_waits_for_the_lease_holders_to_stop() {
    let pods = "/api/v1/namespaces/strata-system/pods";
    let one = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
        "items": [{"metadata": {"name": "strata-csi-controller-abc"}}]});
    let none = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []});
    let (ctx, task) = scenario(
        Arc::new(MemFs::default()),
        Fixed(None),
        vec![
            Step::new("GET", pods, 200, one.clone())
                .query("labelSelector=app.kubernetes.io%2Fname%3Dstrata-csi-controller"),
            Step::new("GET", pods, 200, none),
            Step::new("GET", pods, 200, one),
        ],
    );
    let sel = "app.kubernetes.io/name=strata-csi-controller";
    let gone = strata_operator::leader::wait_for_no_pods(
        ctx.client.clone(),
        NS,
        sel,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(gone);
    let gone =
        strata_operator::leader::wait_for_no_pods(ctx.client.clone(), NS, sel, Duration::ZERO)
            .await
            .unwrap();
    assert!(!gone, "timeout: still there");
    done(task).await;
}

#[tokio::test]
async fn datasets_are_attached_and_reported_in_status() {
    let fs = Arc::new(MemFs::default());
    let (ctx, task) = scenario(
        fs.clone(),
        Fixed(None),
        vec![
            Step::new("GET", SECRET_PATH, 200, secret()),
            Step::event("default", "Formatted"),
            Step::new("GET", format!("{SC_PATH}/vol1"), 404, not_found()),
            Step::new("PATCH", format!("{SC_PATH}/vol1"), 200, Value::Null)
                .query("fieldManager=strata-operator"),
            Step::new("GET", SC_PATH, 200, sc_list(&["vol1"]))
                .query("labelSelector=strata.io%2Fvolume%3Dvol1"),
            Step::event("default", "Ready"),
            Step::new(
                "PATCH",
                format!("{VOL_PATH}/status"),
                200,
                volume_json(true),
            )
            .query("force=true")
            .check(|b| {
                let s = &b["status"];
                assert_eq!(s["conditions"][0]["status"], "True", "{s}");
                assert_eq!(s["datasets"][0]["path"], "/datasets/web");
                assert_eq!(s["datasets"][0]["source"], "s3://crawl/web");
                assert_eq!(s["datasets"][0]["attachment"], 1);
                assert!(!b.to_string().contains("\"SK\""), "no key in the status");
            }),
        ],
    );
    let vol = volume_obj(
        true,
        Value::Null,
        json!({"datasets": [{"path": "/datasets/web", "source": "s3://crawl/web",
            "endpoint": "http://10.0.0.5:8333", "refreshSeconds": 60}]}),
    );
    volume::reconcile(Arc::new(vol), ctx).await.unwrap();
    done(task).await;
    assert_eq!(
        *fs.calls.lock(),
        vec![
            "ensure_volume vol1",
            "usage",
            "ensure_datasets /datasets/web=s3://crawl/web"
        ]
    );
}

#[test]
fn a_dataset_naming_a_missing_secret_key_says_which() {
    let vol = volume_obj(
        true,
        Value::Null,
        json!({"datasets": [{"path": "/d", "source": "s3://b", "accessKeyKey": "crawl-ak"}]}),
    );
    let t = strata_operator::fsops::FsTarget {
        meta_url: META.into(),
        access_key: Some("AK".into()),
        secret_key: Some("SK".into()),
        data: [("access-key".to_string(), "AK".to_string())].into(),
    };
    let err = volume::dataset_requests(&vol, &t).unwrap_err();
    assert!(
        err.contains("no key crawl-ak") && err.contains("vol1-secret"),
        "{err}"
    );
    let vol = volume_obj(
        true,
        Value::Null,
        json!({"datasets": [{"path": "/d", "source": "s3://b"}]}),
    );
    let r = volume::dataset_requests(&vol, &t).unwrap();
    assert_eq!(r[0].access_key.as_deref(), Some("AK"));
    assert_eq!(r[0].refresh_secs, 600);
}
