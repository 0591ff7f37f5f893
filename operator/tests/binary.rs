//! The real `strata-operator` binary, built with the whole workspace's features (the S3
//! client's TLS and kube's), starts and talks to the API server named by its kubeconfig
//! instead of panicking while it builds its client.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_strata-operator");

#[test]
fn operator_binary_reaches_the_api_server_of_its_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = api.local_addr().unwrap().port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\n\
             users:\n- name: t\n  user: {{token: test}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: t}}\n\
             current-context: t\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("operator.log");
    let mut child = Command::new(BIN)
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-namespace",
            "strata-system",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    api.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let request_line = loop {
        match api.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut line = String::new();
                BufReader::new(conn.try_clone().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                let _ = conn.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                break line;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "strata-operator exited with {status} before calling the API server:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no request within 30 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        request_line.starts_with("GET ") || request_line.starts_with("POST "),
        "{request_line:?}"
    );
    assert!(request_line.contains(" /api"), "{request_line:?}");
}

/// A one-thread HTTP/1.1 server for the binary: answers each request with `reply(method,
/// path)` and records the request lines.
fn serve(
    api: TcpListener,
    reply: impl Fn(&str, &str) -> (u16, String) + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in api.incoming() {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = std::io::Read::read_exact(&mut reader, &mut body);
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("");
            let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
            let (code, body) = reply(method, path);
            let _ = tx.send(format!("{method} {path}"));
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    rx
}

fn kubeconfig(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\n\
             users:\n- name: t\n  user: {{token: test}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: t}}\n\
             current-context: t\n"
        ),
    )
    .unwrap();
    p
}

/// `strata-operator cleanup-leases` (the chart's post-delete hook) deletes each named Lease,
/// takes a missing one as done, and logs plain text (no ANSI colour codes) to a
/// non-terminal stderr.
#[test]
fn cleanup_leases_deletes_the_named_leases_with_plain_logs() {
    let dir = tempfile::tempdir().unwrap();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = api.local_addr().unwrap().port();
    let requests = serve(api, |method, path| {
        let ok = r#"{"kind":"Status","apiVersion":"v1","status":"Success"}"#.to_string();
        let missing = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"}"#.to_string();
        match (method, path.ends_with("/external-resizer-csi-strata-io")) {
            ("GET", _) if path.ends_with("/pods") => (
                200,
                r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}"#.into(),
            ),
            ("DELETE", false) => (200, ok),
            ("DELETE", true) => (404, missing),
            _ => (500, "{}".into()),
        }
    });
    let out = Command::new(BIN)
        .args([
            "cleanup-leases",
            "--namespace",
            "strata-system",
            "--names",
            "csi-strata-io,external-resizer-csi-strata-io,strata-operator-leader",
            "--wait-for-pods",
            "app.kubernetes.io/name=strata-csi-controller",
        ])
        .env("KUBECONFIG", kubeconfig(dir.path(), port))
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let seen: Vec<String> = requests.try_iter().collect();
    let base = "/apis/coordination.k8s.io/v1/namespaces/strata-system/leases";
    assert_eq!(
        seen,
        [
            "GET /api/v1/namespaces/strata-system/pods".to_string(),
            format!("DELETE {base}/csi-strata-io"),
            format!("DELETE {base}/external-resizer-csi-strata-io"),
            format!("DELETE {base}/strata-operator-leader"),
        ]
    );
    assert!(
        stderr.contains("deleted Lease strata-system/csi-strata-io"),
        "{stderr}"
    );
    assert!(
        stderr.contains("external-resizer-csi-strata-io does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "ANSI codes in logs: {stderr:?}");
    assert!(out.stdout.is_empty(), "logs go to stderr");

    // A failing delete fails the command (the hook Job reports it).
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = api.local_addr().unwrap().port();
    let _requests = serve(api, |_, _| {
        (
            403,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,"message":"forbidden"}"#.into(),
        )
    });
    let out = Command::new(BIN)
        .args(["cleanup-leases", "--namespace", "ns", "--names", "a"])
        .env("KUBECONFIG", kubeconfig(dir.path(), port))
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
}
