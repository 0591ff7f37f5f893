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
