//! Pod mount mode end to end: the real `strata-csi --node --mount-mode pod` against a fake
//! Kubernetes API server (HTTP/1.1 on 127.0.0.1, reached through a kubeconfig) that keeps
//! Secrets and Pods in memory and plays kubelet: a created mount Pod becomes the real
//! `strata` client process, with the Pod's args (container paths translated to the Pod's
//! hostPath volumes) and the Secret's data as environment, restarted when it exits
//! (restartPolicy Always) and stopped when the Pod is deleted. The test drives the CSI
//! socket as kubelet does: stage, publish, I/O, the consumers annotation, a crashed client
//! container, an evicted mount Pod, unpublish, unstage, and the Pod and Secret deleted.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use strata_csi::csi;
use strata_csi::csi::node_client::NodeClient;
use strata_csi::csi::volume_capability::access_mode::Mode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const NS: &str = "strata-test";
const NODE: &str = "node-1";

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 (standard alphabet, padded), as the API server stores Secret data.
fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = vec![];
    let (mut acc, mut bits) = (0u32, 0);
    for ch in s.bytes().filter(|&b| b != b'=') {
        let v = B64.iter().position(|&x| x == ch).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A container the fake kubelet runs for a Pod.
struct Container {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Container {
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct Store {
    /// (resource, name) → object, in namespace NS.
    objects: BTreeMap<(String, String), Value>,
    /// (method, path) of every request.
    log: Vec<(String, String)>,
    containers: HashMap<String, Container>,
    /// Problems the fake kubelet met (a missing hostPath directory, a bad request).
    errors: Vec<String>,
    rv: u64,
}

/// The fake API server and kubelet.
struct FakeKube {
    store: Arc<Mutex<Store>>,
    addr: std::net::SocketAddr,
    strata: PathBuf,
    /// Directory for emptyDir volumes and container logs.
    work: PathBuf,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
               "status": if code < 300 { "Success" } else { "Failure" },
               "reason": reason, "message": message, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// As the API server stores a Secret: stringData folded into base64 data.
fn fold_string_data(secret: &mut Value) {
    if let Some(Value::Object(sd)) = secret.as_object_mut().and_then(|o| o.remove("stringData")) {
        if !secret["data"].is_object() {
            secret["data"] = json!({});
        }
        for (k, v) in sd {
            secret["data"][&k] = json!(b64_encode(v.as_str().unwrap_or_default().as_bytes()));
        }
    }
}

/// `arg` with a container path under one of `mounts` (container path → host path)
/// replaced, also as the value of `--flag=PATH`.
fn translate(arg: &str, mounts: &[(String, String)]) -> String {
    // Each Pod has its own network: here they share the host's, so the metrics port the Pod
    // listens on becomes a free one on loopback.
    if arg.starts_with("--metrics=") {
        return "--metrics=127.0.0.1:0".into();
    }
    let (flag, path) = match arg.split_once('=') {
        Some((f, p)) if f.starts_with("--") => (Some(f), p),
        _ => (None, arg),
    };
    let mut out = path.to_string();
    for (c, h) in mounts {
        if path == c {
            out = h.clone();
            break;
        }
        if let Some(rest) = path.strip_prefix(&format!("{c}/")) {
            out = format!("{h}/{rest}");
            break;
        }
    }
    match flag {
        Some(f) => format!("{f}={out}"),
        None => out,
    }
}

fn set_container_status(store: &Arc<Mutex<Store>>, pod: &str, restarts: u32, running: bool) {
    let mut st = store.lock().unwrap();
    if let Some(p) = st.objects.get_mut(&("pods".into(), pod.into())) {
        let image = p["spec"]["containers"][0]["image"].clone();
        let state = if running {
            json!({"running": {"startedAt": "2025-01-01T00:00:00Z"}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        p["status"] = json!({
            "phase": if running { "Running" } else { "Pending" },
            "containerStatuses": [{"name": "client", "image": image, "imageID": "",
                                   "ready": running, "restartCount": restarts, "state": state}]
        });
    }
}

impl FakeKube {
    async fn start(work: &Path) -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fk = FakeKube {
            store: Arc::new(Mutex::new(Store::default())),
            addr,
            strata: strata_bin(),
            work: work.to_path_buf(),
        };
        let ctx = Arc::new(fk.handle());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _ = ctx.serve(tcp).await;
                });
            }
        });
        fk
    }

    fn handle(&self) -> Ctx {
        Ctx {
            store: self.store.clone(),
            strata: self.strata.clone(),
            work: self.work.clone(),
        }
    }

    fn kubeconfig(&self, path: &Path) {
        fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: {NS}}}\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
    }

    fn get(&self, resource: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(resource.into(), name.into()))
            .cloned()
    }

    fn names(&self, resource: &str) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter(|(r, _)| r == resource)
            .map(|(_, n)| n.clone())
            .collect()
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.store
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    fn restarts(&self, pod: &str) -> u32 {
        self.store
            .lock()
            .unwrap()
            .containers
            .get(pod)
            .map_or(0, |c| c.restarts.load(Ordering::SeqCst))
    }

    fn errors(&self) -> Vec<String> {
        self.store.lock().unwrap().errors.clone()
    }

    /// Delete a Pod as `kubectl delete pod` does (see [`begin_pod_deletion`]).
    fn delete_pod(&self, pod: &str) {
        begin_pod_deletion(&self.store, pod);
    }

    /// Evict a Pod: gone from the API, its container stopped (the Secret stays).
    fn evict(&self, pod: &str) {
        let c = {
            let mut st = self.store.lock().unwrap();
            st.objects.remove(&("pods".into(), pod.into()));
            st.containers.remove(pod)
        };
        if let Some(c) = c {
            c.stop();
        }
    }

    fn consumers(&self, pod: &str) -> Vec<Value> {
        let p = self.get("pods", pod).expect("mount Pod");
        let a = p["metadata"]["annotations"]["strata.io/consumers"]
            .as_str()
            .expect("consumers annotation")
            .to_string();
        serde_json::from_str(&a).unwrap()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let cs: Vec<Container> = self
            .store
            .lock()
            .unwrap()
            .containers
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in cs {
            c.stop();
        }
    }
}

/// Graceful deletion of a Pod, as the API server and kubelet do it: the Pod gets a
/// `deletionTimestamp` and stays (terminating; creating one of the same name answers 409)
/// until its container has stopped (SIGTERM, SIGKILL after 5 s), then it is gone. Returns
/// the Pod as it is now.
fn begin_pod_deletion(store: &Arc<Mutex<Store>>, name: &str) -> Option<Value> {
    let (obj, container) = {
        let mut st = store.lock().unwrap();
        let key = ("pods".to_string(), name.to_string());
        let obj = st.objects.get_mut(&key).map(|o| {
            o["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:01Z");
            o.clone()
        });
        (obj, st.containers.remove(name))
    };
    obj.as_ref()?;
    let (store, name) = (store.clone(), name.to_string());
    std::thread::spawn(move || {
        if let Some(c) = container {
            c.stop();
        }
        store
            .lock()
            .unwrap()
            .objects
            .remove(&("pods".to_string(), name));
    });
    obj
}

/// What a connection handler needs.
struct Ctx {
    store: Arc<Mutex<Store>>,
    strata: PathBuf,
    work: PathBuf,
}

impl Ctx {
    /// HTTP/1.1 with keep-alive: one request after the other on the connection, bodies by
    /// Content-Length or chunked.
    async fn serve(&self, tcp: tokio::net::TcpStream) -> std::io::Result<()> {
        let (r, mut w) = tcp.into_split();
        let mut r = BufReader::new(r);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let target = parts.next().unwrap_or_default().to_string();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).await?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let mut body = vec![];
            if let Some(n) = headers.get("content-length") {
                body.resize(n.parse().unwrap_or(0), 0);
                r.read_exact(&mut body).await?;
            } else if headers
                .get("transfer-encoding")
                .is_some_and(|t| t.contains("chunked"))
            {
                loop {
                    let mut size = String::new();
                    r.read_line(&mut size).await?;
                    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                        .unwrap_or(0);
                    if n == 0 {
                        r.read_line(&mut String::new()).await?;
                        break;
                    }
                    let mut chunk = vec![0; n + 2];
                    r.read_exact(&mut chunk).await?;
                    body.extend_from_slice(&chunk[..n]);
                }
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let path = target.split('?').next().unwrap_or_default();
            let ctype = headers.get("content-type").cloned().unwrap_or_default();
            let (code, reply) = self.answer(&method, path, &ctype, body).await;
            let reply = serde_json::to_vec(&reply).unwrap();
            let reason = match code {
                200 => "OK",
                201 => "Created",
                404 => "Not Found",
                409 => "Conflict",
                _ => "Other",
            };
            w.write_all(
                format!(
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    reply.len()
                )
                .as_bytes(),
            )
            .await?;
            w.write_all(&reply).await?;
        }
    }

    async fn answer(&self, method: &str, path: &str, ctype: &str, body: Value) -> (u16, Value) {
        self.store
            .lock()
            .unwrap()
            .log
            .push((method.to_string(), path.to_string()));
        let prefix = format!("/api/v1/namespaces/{NS}/");
        let Some(rest) = path.strip_prefix(&prefix) else {
            return status(404, "NotFound", format!("no route for {path}"));
        };
        let (resource, name) = match rest.split_once('/') {
            Some((r, n)) => (r.to_string(), Some(n.to_string())),
            None => (rest.to_string(), None),
        };
        if resource != "pods" && resource != "secrets" {
            return status(404, "NotFound", format!("no resource {resource}"));
        }
        let not_found = |n: &str| status(404, "NotFound", format!("{resource} \"{n}\" not found"));
        match (method, name) {
            ("POST", None) => {
                let mut obj = body;
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(422, "Invalid", "metadata.name is required".into());
                };
                let pod_start = {
                    let mut st = self.store.lock().unwrap();
                    let key = (resource.clone(), name.clone());
                    if st.objects.contains_key(&key) {
                        return status(
                            409,
                            "AlreadyExists",
                            format!("{resource} \"{name}\" already exists"),
                        );
                    }
                    st.rv += 1;
                    obj["metadata"]["namespace"] = json!(NS);
                    obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv));
                    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    obj["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
                    if resource == "secrets" {
                        fold_string_data(&mut obj);
                    }
                    st.objects.insert(key, obj.clone());
                    resource == "pods"
                };
                if pod_start {
                    set_container_status(&self.store, &name, 0, false);
                    self.run_pod(&name, &obj);
                }
                let stored = self.store.lock().unwrap().objects[&(resource.clone(), name)].clone();
                (201, stored)
            }
            ("GET", Some(name)) => match self
                .store
                .lock()
                .unwrap()
                .objects
                .get(&(resource.clone(), name.clone()))
            {
                Some(o) => (200, o.clone()),
                None => not_found(&name),
            },
            ("PATCH", Some(name)) => {
                if ctype != "application/merge-patch+json" {
                    return status(415, "UnsupportedMediaType", format!("content type {ctype}"));
                }
                let mut st = self.store.lock().unwrap();
                let rv = st.rv + 1;
                match st.objects.get_mut(&(resource.clone(), name.clone())) {
                    Some(o) => {
                        merge(o, &body);
                        if resource == "secrets" {
                            fold_string_data(o);
                        }
                        o["metadata"]["resourceVersion"] = json!(rv.to_string());
                        let o = o.clone();
                        st.rv = rv;
                        (200, o)
                    }
                    None => not_found(&name),
                }
            }
            ("DELETE", Some(name)) if resource == "pods" => {
                match begin_pod_deletion(&self.store, &name) {
                    Some(o) => (200, o),
                    None => not_found(&name),
                }
            }
            ("DELETE", Some(name)) => {
                let (obj, container) = {
                    let mut st = self.store.lock().unwrap();
                    let obj = st.objects.remove(&(resource.clone(), name.clone()));
                    let c = if resource == "pods" {
                        st.containers.remove(&name)
                    } else {
                        None
                    };
                    (obj, c)
                };
                if let Some(c) = container {
                    tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
                }
                match obj {
                    None => not_found(&name),
                    Some(o) if resource == "pods" => (200, o),
                    Some(_) => status(200, "", String::new()),
                }
            }
            _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
        }
    }

    /// Kubelet's part: run the Pod's only container until the Pod is deleted.
    fn run_pod(&self, name: &str, pod: &Value) {
        let spec = &pod["spec"];
        let c = &spec["containers"][0];
        let mut mounts: Vec<(String, String)> = vec![];
        for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
            let vname = m["name"].as_str().unwrap_or_default();
            let Some(vol) = spec["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["name"] == vname))
            else {
                self.store
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("{name}: volume {vname} not declared"));
                return;
            };
            let host = if let Some(hp) = vol["hostPath"].as_object() {
                let p = hp["path"].as_str().unwrap_or_default().to_string();
                match hp.get("type").and_then(Value::as_str) {
                    Some("Directory") if !Path::new(&p).is_dir() => {
                        self.store
                            .lock()
                            .unwrap()
                            .errors
                            .push(format!("{name}: hostPath {p} is not a directory"));
                        return;
                    }
                    Some("DirectoryOrCreate") => fs::create_dir_all(&p).unwrap(),
                    _ => {}
                }
                p
            } else {
                let d = self.work.join(format!("{name}-{vname}"));
                fs::create_dir_all(&d).unwrap();
                d.to_string_lossy().into_owned()
            };
            let mp = m["mountPath"].as_str().unwrap_or_default().to_string();
            mounts.push((mp, host));
        }
        mounts.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        assert_eq!(c["command"], json!(["strata"]), "the container runs strata");
        let args: Vec<String> = c["args"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| translate(a.as_str().unwrap_or_default(), &mounts))
            .collect();
        // As the user the Pod asks for (the image's, root, when it says nothing).
        let sc = &c["securityContext"];
        let uid = sc["runAsUser"].as_u64().unwrap_or(0) as u32;
        let gid = sc["runAsGroup"].as_u64().unwrap_or(0) as u32;
        let secret_name = c["envFrom"][0]["secretRef"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU32::new(0));
        let (store, strata, log) = (
            self.store.clone(),
            self.strata.clone(),
            self.work.join(format!("{name}.log")),
        );
        let (stop2, restarts2, pod_name) = (stop.clone(), restarts.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                // The Secret as it is when the container starts.
                let env: Vec<(String, String)> = store
                    .lock()
                    .unwrap()
                    .objects
                    .get(&("secrets".into(), secret_name.clone()))
                    .and_then(|s| s["data"].as_object().cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| {
                        let raw = b64_decode(v.as_str().unwrap_or_default());
                        (k, String::from_utf8(raw).unwrap())
                    })
                    .collect();
                if env.is_empty() {
                    store
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("{pod_name}: Secret {secret_name} missing or empty"));
                }
                let mut child: Child = Command::new(&strata)
                    .uid(uid)
                    .gid(gid)
                    .args(&args)
                    .env_clear()
                    .env("PATH", "/usr/bin:/bin")
                    .envs(env)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(
                        fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&log)
                            .unwrap(),
                    )
                    .spawn()
                    .unwrap();
                set_container_status(&store, &pod_name, restarts2.load(Ordering::SeqCst), true);
                loop {
                    if stop2.load(Ordering::SeqCst) {
                        // Deletion: SIGTERM, then SIGKILL after the grace period.
                        // SAFETY: signal to our child.
                        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(5) {
                            if matches!(child.try_wait(), Ok(Some(_))) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // restartPolicy Always.
                restarts2.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        self.store.lock().unwrap().containers.insert(
            name.to_string(),
            Container {
                stop,
                restarts,
                thread: Some(thread),
            },
        );
    }
}

/// The user of the mount Pods (and of the operator).
const MOUNT_UID: u32 = 65532;

/// Give `dir` and everything below it to `uid` (group too), as a volume the operator made.
fn chown_tree(dir: &Path, uid: u32) {
    std::os::unix::fs::lchown(dir, Some(uid), Some(uid)).unwrap();
    if fs::symlink_metadata(dir).unwrap().is_dir() {
        for e in fs::read_dir(dir).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

/// The logs of every container the fake kubelet ran (for a failure message).
fn container_logs(work: &Path) -> String {
    let mut out = String::new();
    for e in fs::read_dir(work).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            out.push_str(&format!(
                "--- {}\n{}",
                e.path().display(),
                fs::read_to_string(e.path()).unwrap_or_default()
            ));
        }
    }
    out
}

/// Real uid of process `pid`.
fn uid_of(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

fn plugin(root: &Path, kubeconfig: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(CSI);
    c.args(["--node", "--node-id", NODE, "--mount-mode", "pod"])
        .args(extra)
        .arg("--endpoint")
        .arg(format!("unix://{}", root.join("csi.sock").display()))
        .arg("--state-dir")
        .arg(root.join("state"))
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", root)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .stdout(Stdio::null());
    c
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn targets(consumers: &[Value]) -> Vec<String> {
    consumers
        .iter()
        .map(|c| c["targetPath"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_mode_against_a_fake_api_server_and_kubelet() {
    let Some((_dir, root, meta)) = mount_test("podvol") else {
        return;
    };
    // The volume as the operator (uid 65532) leaves it: its database and bucket are the
    // mount user's, not root's.
    chown_tree(&root, MOUNT_UID);
    let work = root.join("kubelet-fake");
    fs::create_dir_all(&work).unwrap();
    let kube = FakeKube::start(&work).await;
    let kubeconfig = root.join("kubeconfig");
    kube.kubeconfig(&kubeconfig);
    let cache = root.join("cache");
    let state = root.join("state");
    let mut g = Guard {
        plugin: None,
        dir: root.clone(),
    };
    let log = root.join("plugin.log");
    g.plugin = Some(
        plugin(
            &root,
            &kubeconfig,
            &[
                "--mount-image",
                "strata:test",
                "--mount-namespace",
                NS,
                "--mount-cpu",
                "250m",
                "--mount-memory",
                "512Mi",
                "--mount-cache-dir",
                cache.to_str().unwrap(),
                "--mount-pod-grace",
                "1",
            ],
        )
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let ch = channel(&root.join("csi.sock"), &log).await;
    let mut node = NodeClient::new(ch);
    let secrets = HashMap::from([("metaurl".to_string(), meta.clone())]);
    let cap = mount_cap(Mode::MultiNodeMultiWriter);
    let staging = root.join("kubelet/plugins/kubernetes.io/csi/csi.strata.io/abc/globalmount");
    let t1 = root.join("kubelet/pods/p1/volumes/kubernetes.io~csi/pv-static/mount");
    let t2 = root.join("kubelet/pods/p2/volumes/kubernetes.io~csi/pv-static/mount");
    fs::create_dir_all(&staging).unwrap();
    let vid = "pv-static";

    // ---- Stage: the Secret and the mount Pod are created; the Pod's client serves.
    let started = Instant::now();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vid.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "stage: {e}\nplugin:\n{}\nmount Pods:\n{}",
            fs::read_to_string(&log).unwrap_or_default(),
            container_logs(&work)
        )
    });
    eprintln!("staged in {:.2} s", started.elapsed().as_secs_f64());
    let pods = kube.names("pods");
    assert_eq!(pods.len(), 1, "one mount Pod: {pods:?}");
    let pod_name = pods[0].clone();
    assert!(pod_name.starts_with("strata-mount-v") && pod_name.ends_with("-node-1"));
    let pod = kube.get("pods", &pod_name).unwrap();
    let secret = kube.get("secrets", &pod_name).expect("the mount Secret");
    assert_eq!(
        b64_decode(secret["data"]["STRATA_META_URL"].as_str().unwrap()),
        meta.as_bytes()
    );
    let pod_text = pod.to_string();
    assert!(
        !pod_text.contains("meta.db"),
        "META_URL in the Pod: {pod_text}"
    );
    assert_eq!(pod["spec"]["nodeName"], NODE);
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "strata:test");
    assert_eq!(c["resources"]["limits"]["cpu"], "250m");
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/strata/fd");
    let key = pod["metadata"]["labels"]["strata.io/volume-key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        pod["spec"]["volumes"][0]["hostPath"]["path"],
        state.join("volumes").join(&key).to_string_lossy().as_ref(),
        "the fd socket's directory is the hostPath"
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["hostPath"]["path"],
        cache.to_string_lossy().as_ref()
    );
    // The SQLite database's directory (the local bucket is inside it), at the same path.
    assert_eq!(
        pod["spec"]["volumes"][2]["hostPath"]["path"],
        root.to_string_lossy().as_ref()
    );
    assert_eq!(
        c["volumeMounts"][2]["mountPath"],
        root.to_string_lossy().as_ref()
    );
    assert!(cache.is_dir());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&cache).unwrap().uid(), MOUNT_UID);
    let pids = client_pids(&state);
    assert_eq!(pids.len(), 1, "one client: {pids:?}");
    assert_eq!(
        uid_of(pids[0]),
        MOUNT_UID,
        "the client runs as the mount user"
    );
    assert!(kube.consumers(&pod_name).is_empty());
    assert_eq!(kube.errors(), Vec::<String>::new());

    // ---- Publish twice (rw, ro): I/O, and both consumers on the Pod.
    let publish = |target: &Path, readonly: bool| csi::NodePublishVolumeRequest {
        volume_id: vid.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        readonly,
        ..Default::default()
    };
    node.node_publish_volume(publish(&t1, false)).await.unwrap();
    node.node_publish_volume(publish(&t2, true)).await.unwrap();
    fs::write(t1.join("hello.txt"), b"from a mount pod").unwrap();
    assert_eq!(fs::read(t2.join("hello.txt")).unwrap(), b"from a mount pod");
    assert!(fs::write(t2.join("no.txt"), b"x").is_err());
    let both = vec![
        t1.to_string_lossy().to_string(),
        t2.to_string_lossy().to_string(),
    ];
    let cons = kube.consumers(&pod_name);
    assert_eq!(targets(&cons), both);
    assert!(cons.iter().all(|c| c["volumeId"] == vid));

    // ---- The client container crashes: kubelet restarts it, the target reads again
    // without a new publish and without a new Pod.
    let pids = client_pids(&state);
    assert_eq!(pids.len(), 1, "one client: {pids:?}");
    // SAFETY: kill of a pid we found.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let killed = Instant::now();
    let got = read_within(t1.join("hello.txt"), Duration::from_secs(5));
    assert_eq!(
        got.as_deref(),
        Some(&b"from a mount pod"[..]),
        "target not readable within 5 s of the crash: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        write_read_within(
            t1.join("after-kill.txt"),
            b"new file after the kill",
            Duration::from_secs(5).saturating_sub(killed.elapsed())
        ),
        "no new file through the target within 5 s of the crash"
    );
    eprintln!(
        "read through the target {:.3} s after the client container was killed",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(
        kube.restarts(&pod_name),
        0,
        "the supervisor in the container restarted the client, not kubelet"
    );
    let pods_path = format!("/api/v1/namespaces/{NS}/pods");
    assert_eq!(kube.count("POST", &pods_path), 1, "no new Pod for a crash");
    let after_crash = client_pids(&state);
    assert_eq!(after_crash.len(), 1);
    assert_ne!(after_crash, pids);
    fs::write(t1.join("after-crash.txt"), b"still writable").unwrap();

    // ---- The mount Pod is evicted (gone from the API, container stopped): after the grace
    // period the plugin creates it again, with the consumers, and the target serves again.
    kube.evict(&pod_name);
    let evicted = Instant::now();
    wait_for("mount Pod created again", Duration::from_secs(15), || {
        kube.get("pods", &pod_name).is_some()
    })
    .await;
    assert_eq!(kube.count("POST", &pods_path), 2);
    assert_eq!(targets(&kube.consumers(&pod_name)), both);
    let got = read_within(t1.join("after-crash.txt"), Duration::from_secs(10));
    assert_eq!(got.as_deref(), Some(&b"still writable"[..]));
    eprintln!(
        "served again {:.3} s after the eviction",
        evicted.elapsed().as_secs_f64()
    );
    assert_eq!(kube.errors(), Vec::<String>::new());

    // ---- The mount Pod is deleted (kubectl delete pod): terminating, then gone. The plugin
    // sees the mount without a client, creates the Pod again once the old one is gone (the
    // create meanwhile answers 409: it is not taken as "exists"), and a reader of the
    // target gets its data within 5 s.
    let served_by = client_pids(&state);
    kube.delete_pod(&pod_name);
    let deleted = Instant::now();
    // The deleted Pod's client stops (SIGTERM passed on by its supervisor)…
    wait_for(
        "the deleted Pod's client gone",
        Duration::from_secs(5),
        || !client_pids(&state).iter().any(|p| served_by.contains(p)),
    )
    .await;
    // …and creating a file through the target (no cache answers that) works again within
    // 5 s of the deletion.
    let ok = write_read_within(
        t1.join("after-delete.txt"),
        b"after the deletion",
        Duration::from_secs(5).saturating_sub(deleted.elapsed()),
    );
    assert!(
        ok,
        "target not writable within 5 s of the Pod's deletion: {}\n{}",
        fs::read_to_string(&log).unwrap_or_default(),
        container_logs(&work)
    );
    eprintln!(
        "wrote and read through the target {:.3} s after the mount Pod was deleted",
        deleted.elapsed().as_secs_f64()
    );
    assert_eq!(kube.count("POST", &pods_path), 3, "one new Pod");
    let pod = kube.get("pods", &pod_name).expect("the new mount Pod");
    assert!(pod["metadata"]["deletionTimestamp"].is_null());
    assert_eq!(targets(&kube.consumers(&pod_name)), both);
    let now = client_pids(&state);
    assert_eq!(now.len(), 1, "one client: {now:?}");
    assert_ne!(now, served_by);
    assert_eq!(kube.errors(), Vec::<String>::new());

    // ---- Unpublish: the consumers shrink.
    let unpublish = |target: &Path| csi::NodeUnpublishVolumeRequest {
        volume_id: vid.into(),
        target_path: target.to_string_lossy().into(),
    };
    node.node_unpublish_volume(unpublish(&t2)).await.unwrap();
    assert_eq!(targets(&kube.consumers(&pod_name)), both[..1].to_vec());
    node.node_unpublish_volume(unpublish(&t1)).await.unwrap();
    node.node_unpublish_volume(unpublish(&t1)).await.unwrap();
    assert!(kube.consumers(&pod_name).is_empty());
    assert!(!t1.exists() && !t2.exists());

    // ---- The last unstage deletes the Pod and its Secret; the client ends.
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: vid.into(),
        staging_target_path: staging.to_string_lossy().into(),
    };
    node.node_unstage_volume(unstage.clone()).await.unwrap();
    wait_for("mount Pod gone", Duration::from_secs(10), || {
        kube.names("pods").is_empty()
    })
    .await;
    assert!(kube.names("secrets").is_empty(), "mount Secret left");
    // No credentials stay on the node.
    let vol_dir = state.join("volumes").join(&key);
    assert!(!vol_dir.exists(), "{} left behind", vol_dir.display());
    assert_eq!(kube.count("DELETE", &format!("{pods_path}/{pod_name}")), 1);
    node.node_unstage_volume(unstage).await.unwrap();
    wait_for("client gone", Duration::from_secs(10), || {
        client_pids(&state).is_empty()
    })
    .await;
    let plugin_log = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !plugin_log.contains("meta.db"),
        "META_URL in the log: {plugin_log}"
    );
    assert!(plugin_log.contains("mount Pod created"), "{plugin_log}");
    drop(g);
    drop(kube);
}

#[test]
fn pod_mode_needs_an_image_and_api_access() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = plugin(root, &root.join("none"), &[])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--mount-image"), "{err}");
    let out = plugin(
        root,
        &root.join("missing-kubeconfig"),
        &["--mount-image", "x:1"],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KUBECONFIG") && err.contains("in-cluster"),
        "{err}"
    );
}
