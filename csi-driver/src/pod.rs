//! Pod mount mode, Kubernetes side: the unprivileged mount Pod (and the Secret holding its
//! META_URL and keys) that serves one shared mount on one node, created and deleted through
//! the Kubernetes API. The Pod reaches the node plugin's FUSE descriptor socket through a
//! hostPath volume; kubelet restarts its container when the client dies (restartPolicy
//! Always) and the new container resumes the same connection.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

use crate::errors::{CsiError, Result};
use crate::mounter::ClientSpec;

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

fn name_for(node: &str, key: &str) -> String {
    let mut n = format!("strata-mount-{key}-{node}");
    n.truncate(63);
    n.trim_end_matches('-').to_string()
}

/// The Secret and the Pod of the client of `spec`.
pub fn objects(s: &PodSettings, spec: &ClientSpec) -> Result<(Secret, Pod)> {
    let name = name_for(&s.node_name, &spec.key);
    let mut data = serde_json::Map::new();
    for (k, v) in spec.secrets.env() {
        data.insert(k, json!(v));
    }
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": s.namespace,
                     "labels": {"app.kubernetes.io/name": "strata-mount"}},
        "stringData": data,
    }))
    .map_err(|e| CsiError::Internal(e.to_string()))?;
    let mut args = vec![
        "mount".to_string(),
        "--fuse-fd-socket".into(),
        "/strata/fd/fd.sock".into(),
    ];
    for (k, v) in &spec.options {
        args.push(match v {
            Some(v) => format!("--{k}={v}"),
            None => format!("--{k}"),
        });
    }
    if s.cache_dir.is_some() && !spec.options.iter().any(|(k, _)| k == "cache-dir") {
        args.push("--cache-dir=/var/cache/strata".into());
    }
    args.push("-".into());
    args.push("/strata/mnt".into());
    let mut limits = serde_json::Map::new();
    if let Some(c) = &s.cpu {
        limits.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &s.memory {
        limits.insert("memory".into(), json!(m));
    }
    let fd_dir = spec
        .socket
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cache = match &s.cache_dir {
        Some(d) => json!({"name": "cache", "hostPath": {"path": d, "type": "DirectoryOrCreate"}}),
        None => json!({"name": "cache", "emptyDir": {}}),
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": s.namespace,
                     "labels": {"app.kubernetes.io/name": "strata-mount", "strata.io/volume-key": spec.key}},
        "spec": {
            "nodeName": s.node_name,
            "restartPolicy": "Always",
            "priorityClassName": "system-node-critical",
            "containers": [{
                "name": "client",
                "image": s.image,
                "command": ["strata"],
                "args": args,
                "envFrom": [{"secretRef": {"name": name}}],
                "resources": {"requests": limits.clone(), "limits": limits},
                "securityContext": {
                    "privileged": false,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                },
                "volumeMounts": [
                    {"name": "fd", "mountPath": "/strata/fd"},
                    {"name": "cache", "mountPath": "/var/cache/strata"}
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

/// Creates and deletes mount Pods through the Kubernetes API.
pub struct PodMounter {
    pub client: kube::Client,
    pub settings: PodSettings,
}

fn kube_err(what: &str, e: kube::Error) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

impl PodMounter {
    /// Create (or keep) the Secret and the Pod of `spec`'s client.
    pub async fn start(&self, spec: &ClientSpec) -> Result<String> {
        let (secret, pod) = objects(&self.settings, spec)?;
        let ns = &self.settings.namespace;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let name = pod.metadata.name.clone().unwrap_or_default();
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err("creating the mount Secret", e)),
        }
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err("creating the mount Pod", e)),
        }
        Ok(name)
    }

    /// Delete the Pod and its Secret (missing is fine).
    pub async fn stop(&self, key: &str) -> Result<()> {
        let name = name_for(&self.settings.node_name, key);
        let ns = &self.settings.namespace;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        for r in [
            pods.delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
            secrets
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match r {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kube_err("deleting the mount Pod", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Secrets;
    use http::{Method, Request, Response};
    use kube::client::Body;

    fn spec() -> ClientSpec {
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
        }
    }

    fn settings() -> PodSettings {
        PodSettings {
            namespace: "strata".into(),
            node_name: "node-1".into(),
            image: "strata:1".into(),
            cpu: Some("500m".into()),
            memory: Some("1Gi".into()),
            cache_dir: Some("/mnt/nvme/strata".into()),
        }
    }

    #[test]
    fn pod_is_unprivileged_on_its_node_and_keeps_secrets_out_of_the_spec() {
        let (secret, pod) = objects(&settings(), &spec()).unwrap();
        let p = serde_json::to_value(&pod).unwrap();
        let text = p.to_string();
        assert!(!text.contains("pw@db"), "secret in the Pod spec");
        assert_eq!(p["spec"]["nodeName"], "node-1");
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["securityContext"]["privileged"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        assert!(args.contains(&"--cache-size=1024".to_string()));
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
        assert_eq!(
            s["stringData"]["STRATA_META_URL"],
            "postgres://u:pw@db/strata"
        );
    }

    #[tokio::test]
    async fn create_and_delete_through_the_api() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let m = PodMounter {
            client: kube::Client::new(svc, "default"),
            settings: settings(),
        };
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for _ in 0..4 {
                let (req, send) = handle.next_request().await.expect("request");
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let body = req.into_body().collect_bytes().await.unwrap();
                let reply = if method == Method::POST {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    if path.ends_with("/pods") {
                        assert_eq!(v["spec"]["nodeName"], "node-1");
                        assert_eq!(v["metadata"]["name"], "strata-mount-v0123-node-1");
                    }
                    v
                } else {
                    // A Status, as the API server answers a delete.
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
                };
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
                seen.push((method, path));
            }
            seen
        });
        let name = m.start(&spec()).await.unwrap();
        assert_eq!(name, "strata-mount-v0123-node-1");
        m.stop("v0123").await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    Method::POST,
                    "/api/v1/namespaces/strata/secrets".to_string()
                ),
                (Method::POST, "/api/v1/namespaces/strata/pods".to_string()),
                (
                    Method::DELETE,
                    "/api/v1/namespaces/strata/pods/strata-mount-v0123-node-1".to_string()
                ),
                (
                    Method::DELETE,
                    "/api/v1/namespaces/strata/secrets/strata-mount-v0123-node-1".to_string()
                ),
            ]
        );
    }
}
