//! Pod mount mode, Kubernetes side: the unprivileged mount Pod (and the Secret holding its
//! META_URL and keys) that serves one shared mount on one node, created and deleted through
//! the Kubernetes API. The Pod reaches the node plugin's FUSE descriptor socket through a
//! hostPath volume; kubelet restarts its container when the client dies (restartPolicy
//! Always) and the new container resumes the same connection.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::errors::{CsiError, Result};
use crate::mounter::{ClientSpec, Consumer};

/// Annotation of a mount Pod: JSON list of the publications its mount serves,
/// `[{"volumeId": "...", "targetPath": "..."}]`, sorted.
pub const CONSUMERS_ANNOTATION: &str = "strata.io/consumers";
/// Label of a mount Pod and its Secret: the volume key (one shared mount per META_URL).
pub const KEY_LABEL: &str = "strata.io/volume-key";
/// Inside the mount Pod: the directory of the fd socket (the hostPath of the socket's
/// directory) and the cache directory.
pub const FD_DIR: &str = "/strata/fd";
pub const CACHE_DIR: &str = "/var/cache/strata";

/// Settings of the mount Pods of one node plugin.
#[derive(Debug, Clone)]
pub struct PodSettings {
    pub namespace: String,
    pub node_name: String,
    pub image: String,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    /// Host directory for the client's disk cache (else an emptyDir).
    pub cache_dir: Option<String>,
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Name of the mount Pod (and its Secret) of `key` on `node`: `strata-mount-<key>-<node>`;
/// a node name too long for 63 characters is cut and followed by a hash of the whole name,
/// so that nodes sharing a long prefix keep distinct names.
pub fn name_for(node: &str, key: &str) -> String {
    let n = format!("strata-mount-{key}-{node}");
    if n.len() <= 63 {
        return n;
    }
    let hash = format!("{:08x}", fnv(node));
    let mut head = format!("strata-mount-{key}-{node}");
    head.truncate(63 - hash.len() - 1);
    let head = head.trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// JSON merge patch recording `consumers` on a mount Pod.
pub fn consumers_patch(consumers: &[Consumer]) -> Value {
    let list = serde_json::to_string(consumers).unwrap_or_else(|_| "[]".into());
    json!({"metadata": {"annotations": {CONSUMERS_ANNOTATION: list}}})
}

/// The Secret's content: the client's environment (META_URL and keys).
fn secret_env(spec: &ClientSpec) -> serde_json::Map<String, Value> {
    spec.secrets
        .env()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect()
}

/// The Secret and the Pod of the client of `spec`; `consumers` go in the Pod's
/// [`CONSUMERS_ANNOTATION`].
pub fn objects(
    s: &PodSettings,
    spec: &ClientSpec,
    consumers: &[Consumer],
) -> Result<(Secret, Pod)> {
    let name = name_for(&s.node_name, &spec.key);
    let labels = json!({"app.kubernetes.io/name": "strata-mount", KEY_LABEL: spec.key});
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels},
        "type": "Opaque",
        "stringData": secret_env(spec),
    }))
    .map_err(|e| CsiError::Internal(e.to_string()))?;
    let mut args = vec![
        "mount".to_string(),
        "--fuse-fd-socket".into(),
        format!("{FD_DIR}/fd.sock"),
    ];
    for (k, v) in &spec.options {
        args.push(match v {
            Some(v) => format!("--{k}={v}"),
            None => format!("--{k}"),
        });
    }
    // The cache volume is always mounted there (a hostPath or an emptyDir).
    if !spec.options.iter().any(|(k, _)| k == "cache-dir") {
        args.push(format!("--cache-dir={CACHE_DIR}"));
    }
    args.push("-".into());
    args.push("/strata/mnt".into());
    let mut limits = serde_json::Map::new();
    if let Some(c) = spec.pod.cpu.as_ref().or(s.cpu.as_ref()) {
        limits.insert("cpu".into(), json!(c));
    }
    if let Some(m) = spec.pod.memory.as_ref().or(s.memory.as_ref()) {
        limits.insert("memory".into(), json!(m));
    }
    let image = spec.pod.image.as_ref().unwrap_or(&s.image);
    let fd_dir = spec
        .socket
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cache = match spec.pod.cache_dir.as_ref().or(s.cache_dir.as_ref()) {
        Some(d) => json!({"name": "cache", "hostPath": {"path": d, "type": "DirectoryOrCreate"}}),
        None => json!({"name": "cache", "emptyDir": {}}),
    };
    let consumers = serde_json::to_string(consumers).unwrap_or_else(|_| "[]".into());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels,
                     "annotations": {CONSUMERS_ANNOTATION: consumers}},
        "spec": {
            "nodeName": s.node_name,
            "restartPolicy": "Always",
            "priorityClassName": "system-node-critical",
            // Pinned to its node like a DaemonSet Pod: no taint evicts it.
            "tolerations": [{"operator": "Exists"}],
            // The client needs no Kubernetes API access.
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "client",
                "image": image,
                "command": ["strata"],
                "args": args,
                "envFrom": [{"secretRef": {"name": name}}],
                "resources": {"requests": limits.clone(), "limits": limits},
                // Root (the image's default user is not) to reach the fd socket and the
                // hostPath cache directory, both owned by root; no capability, no
                // privilege: the FUSE descriptor comes over the socket.
                "securityContext": {
                    "privileged": false,
                    "runAsUser": 0,
                    "runAsGroup": 0,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                },
                "volumeMounts": [
                    {"name": "fd", "mountPath": FD_DIR},
                    {"name": "cache", "mountPath": CACHE_DIR}
                ]
            }],
            "volumes": [
                {"name": "fd", "hostPath": {"path": fd_dir, "type": "Directory"}},
                cache
            ]
        }
    }))
    .map_err(|e| CsiError::Internal(e.to_string()))?;
    Ok((secret, pod))
}

/// Creates, annotates and deletes mount Pods through the Kubernetes API.
pub struct PodMounter {
    pub client: kube::Client,
    pub settings: PodSettings,
}

fn kube_err(what: &str, e: kube::Error) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// `r`, with the API answer `code` (404 for a delete, 409 for a create) counted as done:
/// `Some` when the call succeeded, `None` when it was answered `code`.
fn tolerating<T>(
    r: std::result::Result<T, kube::Error>,
    code: u16,
    what: &str,
) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if api_code(&e) == Some(code) => Ok(None),
        Err(e) => Err(kube_err(what, e)),
    }
}

impl PodMounter {
    /// Name of the mount Pod (and Secret) of `key` on this node.
    pub fn name(&self, key: &str) -> String {
        name_for(&self.settings.node_name, key)
    }

    fn apis(&self) -> (Api<Pod>, Api<Secret>) {
        let ns = &self.settings.namespace;
        (
            Api::namespaced(self.client.clone(), ns),
            Api::namespaced(self.client.clone(), ns),
        )
    }

    /// Create the Secret and the Pod of `spec`'s client; both may exist already (409): an
    /// existing Secret gets the current META_URL and keys, an existing Pod is kept. True
    /// when the Pod was created.
    pub async fn start(&self, spec: &ClientSpec, consumers: &[Consumer]) -> Result<bool> {
        let (secret, pod) = objects(&self.settings, spec, consumers)?;
        let (pods, secrets) = self.apis();
        let name = self.name(&spec.key);
        let created = tolerating(
            secrets.create(&PostParams::default(), &secret).await,
            409,
            "creating the mount Secret",
        )?;
        if created.is_none() {
            // Keys may have been rotated: write them again, drop the ones now absent.
            let data: serde_json::Map<String, Value> = spec
                .secrets
                .env_all()
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| (k.to_string(), Value::Null))
                .collect();
            let body = json!({"data": data, "stringData": secret_env(spec)});
            secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .map_err(|e| kube_err("updating the mount Secret", e))?;
        }
        let created = tolerating(
            pods.create(&PostParams::default(), &pod).await,
            409,
            "creating the mount Pod",
        )?;
        Ok(created.is_some())
    }

    /// Record `consumers` on the mount Pod of `key` (JSON merge patch). A missing Pod is not
    /// an error: the watchdog creates it again with the list.
    pub async fn set_consumers(&self, key: &str, consumers: &[Consumer]) -> Result<()> {
        let (pods, _) = self.apis();
        let body = consumers_patch(consumers);
        let patched = pods
            .patch(
                &self.name(key),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await;
        tolerating(patched, 404, "annotating the mount Pod").map(|_| ())
    }

    /// Delete the Pod and its Secret (missing is fine).
    pub async fn stop(&self, key: &str) -> Result<()> {
        let name = self.name(key);
        let (pods, secrets) = self.apis();
        let dp = DeleteParams::default();
        tolerating(pods.delete(&name, &dp).await, 404, "deleting the mount Pod")?;
        tolerating(
            secrets.delete(&name, &dp).await,
            404,
            "deleting the mount Secret",
        )?;
        Ok(())
    }

    /// One line on the state of the mount Pod of `key` (phase, container state, restarts).
    pub async fn describe(&self, key: &str) -> Result<String> {
        let (pods, _) = self.apis();
        let name = self.name(key);
        let ns = &self.settings.namespace;
        let Some(pod) = tolerating(pods.get(&name).await, 404, "reading the mount Pod")? else {
            return Ok(format!("mount Pod {ns}/{name} does not exist"));
        };
        let status = pod.status.unwrap_or_default();
        let mut out = format!(
            "mount Pod {ns}/{name}: phase {}",
            status.phase.as_deref().unwrap_or("Unknown")
        );
        for c in status.container_statuses.unwrap_or_default() {
            out.push_str(&format!(
                ", container {} restarts {}",
                c.name, c.restart_count
            ));
            let state = c.state.unwrap_or_default();
            if let Some(w) = state.waiting {
                out.push_str(&format!(
                    ", waiting: {} {}",
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                ));
            }
            if let Some(t) = c.last_state.and_then(|s| s.terminated) {
                out.push_str(&format!(
                    ", last exit {} {}",
                    t.exit_code,
                    t.reason.unwrap_or_default()
                ));
            }
        }
        out.push_str(&format!(" (kubectl -n {ns} logs {name})"));
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mounter::PodParams;
    use crate::params::Secrets;
    use http::{Method, Request, Response};
    use kube::client::Body;

    pub(crate) fn spec() -> ClientSpec {
        ClientSpec {
            key: "v0123".into(),
            socket: "/var/lib/strata-csi/volumes/v0123/fd.sock".into(),
            mountpoint: "/var/lib/strata-csi/volumes/v0123/mnt".into(),
            options: vec![("cache-size".into(), Some("1024".into()))],
            secrets: Secrets {
                metaurl: "postgres://u:pw@db/strata".into(),
                ..Default::default()
            },
            log: "/dev/null".into(),
            pod: PodParams::default(),
        }
    }

    pub(crate) fn settings() -> PodSettings {
        PodSettings {
            namespace: "strata".into(),
            node_name: "node-1".into(),
            image: "strata:1".into(),
            cpu: Some("500m".into()),
            memory: Some("1Gi".into()),
            cache_dir: Some("/mnt/nvme/strata".into()),
        }
    }

    /// One request as the mock API server saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Seen {
        pub method: Method,
        pub path: String,
        pub content_type: String,
        pub body: Value,
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
               "status": if code < 300 { "Success" } else { "Failure" },
               "reason": reason, "code": code, "message": reason})
    }

    /// A mocked API server answering `n` requests with `answer(seen)` = (code, body); a
    /// code without a body answers a Status.
    pub(crate) fn mock(
        n: usize,
        answer: impl Fn(&Seen) -> (u16, Option<Value>) + Send + 'static,
    ) -> (kube::Client, tokio::task::JoinHandle<Vec<Seen>>) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for _ in 0..n {
                // A request that never comes fails the test instead of hanging it.
                let (req, send) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request())
                        .await
                        .unwrap_or_else(|_| {
                            panic!("the API server got {} of {n} requests", seen.len())
                        })
                        .expect("request");
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let content_type = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = req.into_body().collect_bytes().await.unwrap();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let s = Seen {
                    method,
                    path,
                    content_type,
                    body,
                };
                let (code, reply) = answer(&s);
                let reply = reply.unwrap_or_else(|| status(code, "mock"));
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
                seen.push(s);
            }
            seen
        });
        (client, server)
    }

    /// (method, path) of each request the mock saw, in order.
    pub(crate) fn calls(seen: &[Seen]) -> Vec<(Method, String)> {
        seen.iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect()
    }

    const PODS: &str = "/api/v1/namespaces/strata/pods";
    const SECRETS: &str = "/api/v1/namespaces/strata/secrets";
    const NAME: &str = "strata-mount-v0123-node-1";

    #[test]
    fn pod_is_unprivileged_on_its_node_and_keeps_secrets_out_of_the_spec() {
        let consumers = [Consumer {
            volume_id: "vol/a".into(),
            target_path: "/var/lib/kubelet/pods/p1/volumes/x/mount".into(),
        }];
        let (secret, pod) = objects(&settings(), &spec(), &consumers).unwrap();
        let p = serde_json::to_value(&pod).unwrap();
        let text = p.to_string();
        assert!(!text.contains("pw@db"), "secret in the Pod spec");
        assert_eq!(p["metadata"]["name"], NAME);
        assert_eq!(p["metadata"]["labels"][KEY_LABEL], "v0123");
        let ann: Vec<Consumer> = serde_json::from_str(
            p["metadata"]["annotations"][CONSUMERS_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ann, consumers);
        assert_eq!(p["spec"]["nodeName"], "node-1");
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["automountServiceAccountToken"], false);
        assert_eq!(p["spec"]["tolerations"][0]["operator"], "Exists");
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["image"], "strata:1");
        assert_eq!(c["securityContext"]["privileged"], false);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
        assert_eq!(c["resources"]["requests"]["cpu"], "500m");
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], NAME);
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/strata/fd");
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        assert_eq!(
            &args[..3],
            ["mount", "--fuse-fd-socket", "/strata/fd/fd.sock"]
        );
        assert!(args.contains(&"--cache-size=1024".to_string()));
        assert!(args.contains(&"--cache-dir=/var/cache/strata".to_string()));
        assert_eq!(args[args.len() - 2], "-");
        assert_eq!(
            p["spec"]["volumes"][0]["hostPath"]["path"],
            "/var/lib/strata-csi/volumes/v0123"
        );
        assert_eq!(
            p["spec"]["volumes"][1]["hostPath"]["path"],
            "/mnt/nvme/strata"
        );
        let s = serde_json::to_value(&secret).unwrap();
        assert_eq!(s["metadata"]["name"], NAME);
        assert_eq!(
            s["stringData"]["STRATA_META_URL"],
            "postgres://u:pw@db/strata"
        );
    }

    #[test]
    fn storage_class_parameters_replace_the_flags() {
        let mut sp = spec();
        sp.pod = PodParams {
            image: Some("strata:2".into()),
            cpu: Some("2".into()),
            memory: None,
            cache_dir: None,
        };
        sp.options
            .push(("cache-dir".into(), Some("/elsewhere".into())));
        let mut st = settings();
        st.cache_dir = None;
        let (_, pod) = objects(&st, &sp, &[]).unwrap();
        let p = serde_json::to_value(&pod).unwrap();
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["image"], "strata:2");
        assert_eq!(c["resources"]["limits"]["cpu"], "2");
        assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        assert!(!args.contains(&"--cache-dir=/var/cache/strata".to_string()));
        assert!(p["spec"]["volumes"][1]["emptyDir"].is_object());
        assert_eq!(p["metadata"]["annotations"][CONSUMERS_ANNOTATION], "[]");
    }

    #[test]
    fn long_node_names_give_distinct_valid_names() {
        let a = "gke-prod-cluster-default-pool-0123abcd-aaaa.europe-west1.internal";
        let b = "gke-prod-cluster-default-pool-0123abcd-bbbb.europe-west1.internal";
        let (na, nb) = (
            name_for(a, "v0123456789abcdef"),
            name_for(b, "v0123456789abcdef"),
        );
        assert_ne!(na, nb);
        for n in [&na, &nb] {
            assert!(n.len() <= 63, "{n}");
            assert!(n.starts_with("strata-mount-v0123456789abcdef-gke-"), "{n}");
            assert!(n.chars().last().unwrap().is_ascii_alphanumeric(), "{n}");
        }
        assert_eq!(name_for("node-1", "v0123"), NAME);
    }

    #[test]
    fn consumers_patch_is_a_merge_patch_of_one_annotation() {
        let c = vec![
            Consumer {
                volume_id: "vol/a".into(),
                target_path: "/t/1".into(),
            },
            Consumer {
                volume_id: "static".into(),
                target_path: "/t/2".into(),
            },
        ];
        let body = consumers_patch(&c);
        assert_eq!(
            body,
            json!({"metadata": {"annotations": {"strata.io/consumers":
                r#"[{"volumeId":"vol/a","targetPath":"/t/1"},{"volumeId":"static","targetPath":"/t/2"}]"#}}})
        );
        assert_eq!(
            consumers_patch(&[]),
            json!({"metadata": {"annotations": {"strata.io/consumers": "[]"}}})
        );
    }

    #[tokio::test]
    async fn create_and_delete_through_the_api() {
        let (client, server) = mock(4, |s| {
            if s.method == Method::POST {
                (201, Some(s.body.clone()))
            } else {
                (200, None)
            }
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        assert!(m.start(&spec(), &[]).await.unwrap(), "created");
        m.stop("v0123").await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[1].body["spec"]["nodeName"], "node-1");
        assert_eq!(seen[1].body["metadata"]["name"], NAME);
        assert_eq!(
            calls(&seen),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::POST, PODS.to_string()),
                (Method::DELETE, format!("{PODS}/{NAME}")),
                (Method::DELETE, format!("{SECRETS}/{NAME}")),
            ]
        );
    }

    #[tokio::test]
    async fn existing_objects_are_kept_and_the_secret_rewritten() {
        let (client, server) = mock(3, |s| match s.method {
            Method::POST => (409, None),
            _ => (200, Some(s.body.clone())),
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        let mut sp = spec();
        sp.secrets.access_key = Some("AK".into());
        assert!(!m.start(&sp, &[]).await.unwrap(), "the Pod existed");
        let seen = server.await.unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::PATCH, format!("{SECRETS}/{NAME}")),
                (Method::POST, PODS.to_string()),
            ]
        );
        assert_eq!(seen[1].content_type, "application/merge-patch+json");
        assert_eq!(
            seen[1].body,
            json!({"data": {"STRATA_SECRET_KEY": null, "STRATA_SESSION_TOKEN": null},
                   "stringData": {"STRATA_META_URL": "postgres://u:pw@db/strata",
                                  "STRATA_ACCESS_KEY": "AK"}})
        );
    }

    #[tokio::test]
    async fn stop_deletes_both_and_missing_objects_are_fine() {
        let (client, server) = mock(4, |s| {
            if s.path.contains("/pods/") && s.method == Method::DELETE {
                (404, None)
            } else if s.path.ends_with("-fail") {
                (500, None)
            } else {
                (200, None)
            }
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        m.stop("v0123").await.unwrap();
        // A server error is an error.
        let mut bad = PodMounter {
            client: m.client.clone(),
            settings: settings(),
        };
        bad.settings.node_name = "fail".into();
        // Pod 404 (fine), then the Secret answers 500.
        let e = bad.stop("v9").await.unwrap_err();
        assert!(e.to_string().contains("deleting the mount Secret"), "{e}");
        let seen = server.await.unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (Method::DELETE, format!("{PODS}/{NAME}")),
                (Method::DELETE, format!("{SECRETS}/{NAME}")),
                (Method::DELETE, format!("{PODS}/strata-mount-v9-fail")),
                (Method::DELETE, format!("{SECRETS}/strata-mount-v9-fail")),
            ]
        );
    }

    #[tokio::test]
    async fn consumers_go_on_the_pod_by_merge_patch() {
        let (client, server) = mock(2, |s| {
            if s.path.ends_with("gone-node") {
                (404, None)
            } else {
                (
                    200,
                    Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME}})),
                )
            }
        });
        let m = PodMounter {
            client: client.clone(),
            settings: settings(),
        };
        let c = [Consumer {
            volume_id: "vol/a".into(),
            target_path: "/t/1".into(),
        }];
        m.set_consumers("v0123", &c).await.unwrap();
        let mut gone = PodMounter {
            client,
            settings: settings(),
        };
        gone.settings.node_name = "gone-node".into();
        gone.set_consumers("v0123", &c).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[0].method, Method::PATCH);
        assert_eq!(seen[0].path, format!("{PODS}/{NAME}"));
        assert_eq!(seen[0].content_type, "application/merge-patch+json");
        assert_eq!(seen[0].body, consumers_patch(&c));
    }
}
