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
/// Label of a mount Pod and its Secret: the key of its shared mount (one per META_URL and
/// client settings, `Secrets::mount_key`; the label's name predates the settings).
pub const KEY_LABEL: &str = "strata.io/volume-key";
/// Inside the mount Pod: the directory of the fd socket (the hostPath of the socket's
/// directory) and the cache directory.
pub const FD_DIR: &str = "/strata/fd";
pub const CACHE_DIR: &str = "/var/cache/strata";
/// Annotation of a mount Pod: hash of the Pod spec this plugin built. A Pod found with
/// another hash (other image, options, volumes) is replaced, not adopted.
pub const SPEC_HASH_ANNOTATION: &str = "strata.io/spec-hash";
/// User and group of the mount client (the image's user, the same as the operator's): the
/// files the operator creates (a SQLite database, a local bucket) are theirs.
pub const MOUNT_UID: u32 = 65532;
/// How long [`PodMounter::start`] waits for a terminating Pod of the same name to go.
pub const REPLACE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Port of a mount Pod's Prometheus metrics (container port `metrics`), unless the mount
/// options give `metrics=ADDR`.
pub const METRICS_PORT: u16 = 9567;

/// The metrics port of the mount Pod of volume `key`: 9568–9967, from a hash of the key.
/// Mount Pods may run on the host network (and cache members use 9567 there): one port per
/// volume keeps two mount Pods of one node from asking for the same host port.
pub fn metrics_port(key: &str) -> u16 {
    let mut h: u32 = 0x811c9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    METRICS_PORT + 1 + (h % 400) as u16
}
/// `app.kubernetes.io/component` of mount Pods (what the chart's PodMonitor selects).
pub const COMPONENT: &str = "mount";

/// Host directories a mount client of `metaurl` must reach at the same path: the directory
/// of a `sqlite://` database and, when the volume keeps its objects in a local directory,
/// that directory (read from the volume's format, when the database is readable here).
/// A directory below another one of the list is left out.
pub fn host_dirs(metaurl: &str) -> Vec<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut dirs: Vec<PathBuf> = vec![];
    let Some(db) = metaurl.strip_prefix("sqlite://") else {
        return dirs;
    };
    let db = Path::new(db.split('?').next().unwrap_or(db));
    if let Some(d) = db.parent().filter(|d| d.is_absolute()) {
        dirs.push(d.to_path_buf());
    }
    // Only an existing database: opening a missing one would create it.
    if db.is_file()
        && let Ok(engine) = strata::meta::open_engine(metaurl)
    {
        let meta = strata::meta::Meta::new(
            engine,
            std::sync::Arc::new(strata::metrics::Metrics::new()),
            strata::meta::MetaSettings::default(),
        );
        match meta.load() {
            Ok(f) => {
                // The primary store and a mirror (docs/MIGRATION.md) when they are directories.
                for s in std::iter::once(&f.storage).chain(f.mirror.as_ref()) {
                    if s.storage == "file" && Path::new(&s.bucket).is_absolute() {
                        dirs.push(PathBuf::from(&s.bucket));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the volume's format for its bucket"),
        }
    }
    dirs.sort();
    dirs.dedup_by(|b, a| b.starts_with(&*a));
    dirs
}

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
    let labels = json!({"app.kubernetes.io/name": "strata-mount",
        "app.kubernetes.io/component": COMPONENT, KEY_LABEL: spec.key});
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels},
        "type": "Opaque",
        "stringData": secret_env(spec),
    }))
    .map_err(|e| CsiError::Internal(e.to_string()))?;
    let mut args = vec![
        "mount".to_string(),
        // The client restarts in the container at once (kubelet's crash back-off is for
        // the supervisor only).
        "--supervise".into(),
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
    // Metrics on the Pod's network for a PodMonitor, every sample labelled with this Pod.
    // One mount Pod serves every PV of its volume on this node (listed in the consumers
    // annotation, which changes), so the PVs are not a constant label: the volume key is.
    let metrics_port = match spec.options.iter().find(|(k, _)| k == "metrics") {
        Some((_, v)) => v
            .as_deref()
            .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok()),
        None => {
            let port = metrics_port(&spec.key);
            args.push(format!("--metrics=0.0.0.0:{port}"));
            Some(port)
        }
    };
    if !spec.options.iter().any(|(k, _)| k == "metrics-labels") {
        args.push(format!(
            "--metrics-labels=pod={name},namespace={},node={},volume_key={}",
            s.namespace, s.node_name, spec.key
        ));
    }
    let ports: Vec<Value> = metrics_port
        .map(|p| json!({"name": "metrics", "containerPort": p, "protocol": "TCP"}))
        .into_iter()
        .collect();
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
    let mut volume_mounts = vec![
        json!({"name": "fd", "mountPath": FD_DIR}),
        json!({"name": "cache", "mountPath": CACHE_DIR}),
    ];
    let mut volumes = vec![
        json!({"name": "fd", "hostPath": {"path": fd_dir, "type": "Directory"}}),
        cache,
    ];
    // A SQLite database or a local bucket on the node: the same path inside the Pod.
    for (i, d) in spec.host_dirs.iter().enumerate() {
        let d = d.to_string_lossy();
        volume_mounts.push(json!({"name": format!("host-{i}"), "mountPath": d}));
        volumes.push(
            json!({"name": format!("host-{i}"), "hostPath": {"path": d, "type": "Directory"}}),
        );
    }
    let pod_spec = json!({
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
                "ports": ports,
                "resources": {"requests": limits.clone(), "limits": limits},
                // The client's error (its log tail) shows in the Pod's status when it fails.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                // Not root, no capability, no privilege: the FUSE descriptor comes over the
                // socket, which the node plugin gives to this user, as it does the hostPath
                // cache directory; a SQLite database and a local bucket made by the
                // operator belong to this user too.
                "securityContext": {
                    "privileged": false,
                    "runAsUser": MOUNT_UID,
                    "runAsGroup": MOUNT_UID,
                    "runAsNonRoot": true,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                },
                "volumeMounts": volume_mounts
            }],
            "volumes": volumes
    });
    let hash = format!("{:016x}", fnv64(&pod_spec.to_string()));
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels,
                     "annotations": {CONSUMERS_ANNOTATION: consumers, SPEC_HASH_ANNOTATION: hash}},
        "spec": pod_spec
    }))
    .map_err(|e| CsiError::Internal(e.to_string()))?;
    Ok((secret, pod))
}

fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Give the mount Pods' user what it needs of the node: the fd socket of `spec` (mode 0600,
/// owned by [`MOUNT_UID`]) and the host cache directory `cache_dir`, created if missing
/// (when this plugin sees it, i.e. it is mounted here at the same path; else a warning).
pub fn prepare_host(spec: &ClientSpec, cache_dir: Option<&str>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(&spec.socket, Some(MOUNT_UID), Some(MOUNT_UID))
        .and_then(|()| {
            std::fs::set_permissions(&spec.socket, std::fs::Permissions::from_mode(0o600))
        })
        .map_err(|e| {
            CsiError::io(
                &format!("giving {} to uid {MOUNT_UID}", spec.socket.display()),
                e,
            )
        })?;
    if let Some(d) = cache_dir {
        let d = std::path::Path::new(d);
        let owned = std::fs::create_dir_all(d).and_then(|()| {
            let m = std::fs::metadata(d)?;
            use std::os::unix::fs::MetadataExt;
            if m.uid() != MOUNT_UID {
                std::os::unix::fs::chown(d, Some(MOUNT_UID), Some(MOUNT_UID))?;
            }
            Ok(())
        });
        if let Err(e) = owned {
            tracing::warn!(path = %d.display(), error = %e,
                "cannot give the mount Pods' cache directory to uid 65532 (mount it into the node plugin at the same path); the client may fail to write its cache");
        }
    }
    Ok(())
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
        let want = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_HASH_ANNOTATION))
            .cloned();
        let deadline = tokio::time::Instant::now() + REPLACE_TIMEOUT;
        loop {
            let created = tolerating(
                pods.create(&PostParams::default(), &pod).await,
                409,
                "creating the mount Pod",
            )?;
            if created.is_some() {
                return Ok(true);
            }
            // A Pod of that name exists: keep it only if it is live and built as this one.
            let Some(old) = tolerating(pods.get(&name).await, 404, "reading the mount Pod")? else {
                continue;
            };
            let terminating = old.metadata.deletion_timestamp.is_some();
            let hash = old
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SPEC_HASH_ANNOTATION));
            if !terminating && hash == want.as_ref() {
                return Ok(false);
            }
            if !terminating {
                tracing::info!(pod = %name, "mount Pod built differently; replacing it");
                tolerating(
                    pods.delete(&name, &DeleteParams::default()).await,
                    404,
                    "deleting the outdated mount Pod",
                )?;
            } else {
                tracing::info!(pod = %name, "mount Pod terminating; waiting for it to go before creating it again");
            }
            self.wait_gone(&pods, &name, deadline).await?;
        }
    }

    /// Wait until the Pod `name` is gone from the API (it may be terminating), polling.
    async fn wait_gone(
        &self,
        pods: &Api<Pod>,
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        loop {
            if tolerating(pods.get(name).await, 404, "reading the mount Pod")?.is_none() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CsiError::Internal(format!(
                    "mount Pod {}/{name} is still terminating after {} s; it must be gone before it can be created again",
                    self.settings.namespace,
                    REPLACE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
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
                // The client's own words (terminationMessagePolicy FallbackToLogsOnError).
                if let Some(m) = t.message.filter(|m| !m.trim().is_empty()) {
                    let tail: Vec<&str> = m.trim().lines().rev().take(3).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    out.push_str(&format!(": {}", tail.join(" | ")));
                }
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
            host_dirs: vec![],
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
            &args[..4],
            [
                "mount",
                "--supervise",
                "--fuse-fd-socket",
                "/strata/fd/fd.sock"
            ]
        );
        assert_eq!(c["securityContext"]["runAsUser"], MOUNT_UID);
        assert_eq!(c["securityContext"]["runAsGroup"], MOUNT_UID);
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
        assert_eq!(
            p["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
                .as_str()
                .unwrap()
                .len(),
            16
        );
        // No host directory but the fd socket's and the cache.
        assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 2);
        assert!(args.contains(&"--cache-size=1024".to_string()));
        assert!(args.contains(&"--cache-dir=/var/cache/strata".to_string()));
        assert_eq!(args[args.len() - 2], "-");
        let port = metrics_port("v0123");
        assert!((9568..9968).contains(&port));
        assert_ne!(metrics_port("v0124"), port);
        assert!(args.contains(&format!("--metrics=0.0.0.0:{port}")));
        assert!(args.contains(
            &"--metrics-labels=pod=strata-mount-v0123-node-1,namespace=strata,node=node-1,volume_key=v0123"
                .to_string()
        ));
        assert_eq!(c["ports"][0]["name"], "metrics");
        assert_eq!(c["ports"][0]["containerPort"], port);
        assert_eq!(
            p["metadata"]["labels"]["app.kubernetes.io/component"],
            "mount"
        );
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
        // The Volume's own metrics address names the container port.
        let mut sp = spec();
        sp.options
            .push(("metrics".into(), Some("0.0.0.0:9100".into())));
        let (_, pod) = objects(&settings(), &sp, &[]).unwrap();
        let p = serde_json::to_value(&pod).unwrap();
        let c = &p["spec"]["containers"][0];
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--metrics=")).count(),
            1
        );
        assert_eq!(c["ports"][0]["containerPort"], 9100);
        assert_eq!(p["metadata"]["annotations"][CONSUMERS_ANNOTATION], "[]");
    }

    #[test]
    fn host_directories_are_mounted_at_the_same_path_and_change_the_hash() {
        let mut sp = spec();
        sp.host_dirs = vec!["/var/lib/strata/vol".into(), "/srv/bucket".into()];
        let (_, pod) = objects(&settings(), &sp, &[]).unwrap();
        let p = serde_json::to_value(&pod).unwrap();
        let vols = p["spec"]["volumes"].as_array().unwrap();
        let mounts = p["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        for (i, d) in ["/var/lib/strata/vol", "/srv/bucket"].iter().enumerate() {
            let name = format!("host-{i}");
            let v = vols.iter().find(|v| v["name"] == name.as_str()).unwrap();
            assert_eq!(v["hostPath"]["path"], *d);
            assert_eq!(v["hostPath"]["type"], "Directory");
            let m = mounts.iter().find(|m| m["name"] == name.as_str()).unwrap();
            assert_eq!(m["mountPath"], *d);
        }
        let (_, plain) = objects(&settings(), &spec(), &[]).unwrap();
        let hash = |p: &Pod| p.metadata.annotations.as_ref().unwrap()[SPEC_HASH_ANNOTATION].clone();
        assert_ne!(hash(&pod), hash(&plain));
        // The consumers are not part of the spec: same hash.
        let c = [Consumer {
            volume_id: "v".into(),
            target_path: "/t".into(),
        }];
        let (_, with_consumers) = objects(&settings(), &spec(), &c).unwrap();
        assert_eq!(hash(&with_consumers), hash(&plain));
    }

    #[test]
    fn host_dirs_of_a_sqlite_volume_are_its_database_and_bucket_directories() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("vol");
        let bucket = dir.path().join("objects");
        std::fs::create_dir_all(&db_dir).unwrap();
        let url = format!("sqlite://{}/meta.db", db_dir.display());
        // Not formatted yet: the database's directory only, and no file created.
        assert_eq!(host_dirs(&url), vec![db_dir.clone()]);
        assert!(!db_dir.join("meta.db").exists());
        let opts = strata::volume::FormatOptions {
            name: "hostdirs".into(),
            storage: strata::object::StorageConfig {
                storage: "file".into(),
                bucket: bucket.to_string_lossy().into(),
                access_key: None,
                secret_key: None,
                region: None,
            },
            block_size_kib: 4096,
            capacity_gib: 0,
            inodes: 0,
        };
        strata::volume::format(
            &url,
            &opts,
            std::sync::Arc::new(strata::metrics::Metrics::new()),
        )
        .unwrap();
        let mut want = vec![bucket.clone(), db_dir.clone()];
        want.sort();
        assert_eq!(host_dirs(&url), want);
        // A bucket inside the database's directory needs no volume of its own.
        let url2 = format!("sqlite://{}/meta2.db", dir.path().display());
        let opts2 = strata::volume::FormatOptions {
            name: "hostdirs2".into(),
            ..opts
        };
        strata::volume::format(
            &url2,
            &opts2,
            std::sync::Arc::new(strata::metrics::Metrics::new()),
        )
        .unwrap();
        assert_eq!(host_dirs(&url2), vec![dir.path().to_path_buf()]);
        assert!(host_dirs("postgres://u:pw@db/strata").is_empty());
    }

    #[test]
    fn the_fd_socket_and_the_cache_directory_go_to_the_mount_user() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let mut sp = spec();
        sp.socket = dir.path().join("fd.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sp.socket).unwrap();
        let cache = dir.path().join("cache/strata");
        prepare_host(&sp, Some(cache.to_str().unwrap())).unwrap();
        let m = std::fs::metadata(&sp.socket).unwrap();
        assert_eq!((m.uid(), m.gid()), (MOUNT_UID, MOUNT_UID));
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let c = std::fs::metadata(&cache).unwrap();
        assert!(c.is_dir());
        assert_eq!((c.uid(), c.gid()), (MOUNT_UID, MOUNT_UID));
        // A missing socket is an error naming it.
        sp.socket = dir.path().join("missing.sock");
        let e = prepare_host(&sp, None).unwrap_err().to_string();
        assert!(e.contains("missing.sock"), "{e}");
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
        let mut sp = spec();
        sp.secrets.access_key = Some("AK".into());
        // The live Pod, built as this plugin builds it.
        let (_, live) = objects(&settings(), &sp, &[]).unwrap();
        let live = serde_json::to_value(&live).unwrap();
        let (client, server) = mock(4, move |s| match s.method {
            Method::POST => (409, None),
            Method::GET => (200, Some(live.clone())),
            _ => (200, Some(s.body.clone())),
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        assert!(!m.start(&sp, &[]).await.unwrap(), "the Pod existed");
        let seen = server.await.unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::PATCH, format!("{SECRETS}/{NAME}")),
                (Method::POST, PODS.to_string()),
                (Method::GET, format!("{PODS}/{NAME}")),
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

    /// A Pod as the API returns it: `spec()`'s, with `deletionTimestamp` when
    /// `terminating`, with the spec hash replaced when `hash` is given.
    fn stored_pod(terminating: bool, hash: Option<&str>) -> Value {
        let (_, pod) = objects(&settings(), &spec(), &[]).unwrap();
        let mut v = serde_json::to_value(&pod).unwrap();
        if terminating {
            v["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        }
        if let Some(h) = hash {
            v["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = json!(h);
        }
        v
    }

    #[tokio::test]
    async fn a_terminating_pod_is_waited_for_and_created_again_not_adopted() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gets = AtomicUsize::new(0);
        let (client, server) = mock(6, move |s| match (&s.method, s.path.as_str()) {
            (&Method::POST, SECRETS) => (201, Some(s.body.clone())),
            // The first create meets the terminating Pod; the last one succeeds.
            (&Method::POST, PODS) if gets.load(Ordering::SeqCst) < 3 => (409, None),
            (&Method::POST, _) => (201, Some(s.body.clone())),
            // Still there twice (terminating), then gone.
            (&Method::GET, _) if gets.fetch_add(1, Ordering::SeqCst) < 2 => {
                (200, Some(stored_pod(true, None)))
            }
            _ => (404, None),
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        assert!(
            m.start(&spec(), &[]).await.unwrap(),
            "a new Pod was created"
        );
        let seen = server.await.unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::POST, PODS.to_string()),
                (Method::GET, format!("{PODS}/{NAME}")),
                (Method::GET, format!("{PODS}/{NAME}")),
                (Method::GET, format!("{PODS}/{NAME}")),
                (Method::POST, PODS.to_string()),
            ]
        );
        assert!(seen.iter().all(|s| s.method != Method::DELETE));
    }

    #[tokio::test]
    async fn a_pod_built_differently_is_replaced() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let deleted = AtomicUsize::new(0);
        let (client, server) = mock(6, move |s| match (&s.method, s.path.as_str()) {
            (&Method::POST, SECRETS) => (201, Some(s.body.clone())),
            (&Method::POST, PODS) if deleted.load(Ordering::SeqCst) == 0 => (409, None),
            (&Method::POST, _) => (201, Some(s.body.clone())),
            (&Method::DELETE, _) => {
                deleted.fetch_add(1, Ordering::SeqCst);
                (200, Some(stored_pod(true, Some("0000000000000000"))))
            }
            (&Method::GET, _) if deleted.load(Ordering::SeqCst) == 0 => {
                (200, Some(stored_pod(false, Some("0000000000000000"))))
            }
            _ => (404, None),
        });
        let m = PodMounter {
            client,
            settings: settings(),
        };
        assert!(m.start(&spec(), &[]).await.unwrap());
        let seen = server.await.unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::POST, PODS.to_string()),
                (Method::GET, format!("{PODS}/{NAME}")),
                (Method::DELETE, format!("{PODS}/{NAME}")),
                (Method::GET, format!("{PODS}/{NAME}")),
                (Method::POST, PODS.to_string()),
            ]
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
