//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, `postgres` on
//! a random port of 127.0.0.1 (no other interface), stopped and removed on drop. Uses the
//! Debian package `postgresql` (binaries in /usr/lib/postgresql/<v>/bin). As root, the server
//! runs as the `postgres` system user (initdb refuses root).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub const INSTALL_HINT: &str =
    "PostgreSQL is not installed: `apt-get install postgresql` (Debian), or run .ci/install-deps";

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{INSTALL_HINT}")]
    NotInstalled,
    #[error("starting PostgreSQL failed: {0}")]
    Start(String),
}

pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    dbs: AtomicU64,
}

/// Directory of the newest installed PostgreSQL binaries.
pub fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists() && p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions; getpwnam receives a valid C string and its result
    // is read before any other call that could overwrite it.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return None;
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

impl PgServer {
    /// Start a fresh server and wait until it accepts connections.
    pub fn start() -> Result<PgServer, PgError> {
        let bin = find_bin().ok_or(PgError::NotInstalled)?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strata-pg-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| PgError::Start(e.to_string()))?;
        let user = postgres_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| PgError::Start(format!("chown {}: {e}", dir.display())))?;
        } else if unsafe { libc::geteuid() } == 0 {
            return Err(PgError::Start(
                "running as root but there is no `postgres` user: apt-get install postgresql"
                    .into(),
            ));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| PgError::Start(e.to_string()))?;
        let server = PgServer {
            bin,
            dir,
            port,
            user,
            child: Mutex::new(None),
            dbs: AtomicU64::new(0),
        };
        let out = server
            .command("initdb")
            .args(["-D"])
            .arg(server.data())
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-locale",
            ])
            .output()
            .map_err(|e| PgError::Start(format!("initdb: {e}")))?;
        if !out.status.success() {
            return Err(PgError::Start(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        server.run()?;
        Ok(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c.current_dir(&self.dir);
        c
    }

    fn run(&self) -> Result<(), PgError> {
        let log = std::fs::File::create(self.dir.join("server.log"))
            .map_err(|e| PgError::Start(e.to_string()))?;
        if let Some((uid, gid)) = self.user {
            let _ = std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid));
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| PgError::Start(e.to_string()))?)
            .stderr(log)
            .spawn()
            .map_err(|e| PgError::Start(format!("postgres: {e}")))?;
        *self.child.lock() = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if postgres::Client::connect(&self.url_for("postgres"), postgres::NoTls).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(PgError::Start(format!(
            "server did not come up: {}",
            self.log_tail()
        )))
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Turn TLS on (reloaded, no restart) with a certificate for IP 127.0.0.1 signed by a new
    /// test CA (made with the `openssl` command); returns the path of the CA's PEM file.
    pub fn enable_tls(&self) -> Result<PathBuf, PgError> {
        let dir = self.dir.join("tls");
        std::fs::create_dir_all(&dir).map_err(|e| PgError::Start(e.to_string()))?;
        let ca = make_ca(&dir, "ca")?;
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(|e| PgError::Start(e.to_string()))?;
        let (key, csr, crt) = (
            dir.join("server.key"),
            dir.join("server.csr"),
            dir.join("server.crt"),
        );
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            p(&key),
            "-out",
            p(&csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            p(&csr),
            "-CA",
            p(&ca),
            "-CAkey",
            p(&dir.join("ca.key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            p(&ext),
            "-out",
            p(&crt),
        ])?;
        if let Some((uid, gid)) = self.user {
            for f in [&key, &crt] {
                std::os::unix::fs::chown(f, Some(uid), Some(gid))
                    .map_err(|e| PgError::Start(e.to_string()))?;
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| PgError::Start(e.to_string()))?;
        let mut c = postgres::Client::connect(&self.url_for("postgres"), postgres::NoTls)
            .map_err(|e| PgError::Start(e.to_string()))?;
        // One statement at a time: ALTER SYSTEM refuses to run inside a transaction block.
        for sql in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
            "ALTER SYSTEM SET ssl = on".to_string(),
            "SELECT pg_reload_conf()".to_string(),
        ] {
            c.batch_execute(&sql).map_err(|e| {
                PgError::Start(format!(
                    "turning TLS on ({sql}): {}",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string())
                ))
            })?;
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(ca)
    }

    /// A CA certificate that signed nothing of this server (for tests of a wrong root).
    pub fn other_ca(&self) -> Result<PathBuf, PgError> {
        let dir = self.dir.join("tls");
        std::fs::create_dir_all(&dir).map_err(|e| PgError::Start(e.to_string()))?;
        make_ca(&dir, "other-ca")
    }

    /// How many connections with `application_name` use TLS right now.
    pub fn tls_connections(&self, application_name: &str) -> i64 {
        let mut c = postgres::Client::connect(&self.url_for("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL: {e}"));
        c.query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.application_name = $1 AND s.ssl",
            &[&application_name],
        )
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or_else(|e| panic!("pg_stat_ssl: {e}"))
    }

    /// Create a new empty database and return its URL.
    pub fn new_database(&self) -> String {
        let name = format!("strata{}", self.dbs.fetch_add(1, Ordering::SeqCst));
        let mut c = postgres::Client::connect(&self.url_for("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url_for(&name)
    }

    /// Stop the server (fast shutdown), as a crash of the database would look to clients.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().take() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let _ = c.wait();
        }
    }

    /// Start the stopped server again on the same port and data.
    pub fn restart(&self) -> Result<(), PgError> {
        self.stop();
        self.run()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

fn openssl(args: &[&str]) -> Result<(), PgError> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| PgError::Start(format!("openssl (apt-get install openssl): {e}")))?;
    if !out.status.success() {
        return Err(PgError::Start(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A self-signed CA `NAME.pem` (key `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> Result<PathBuf, PgError> {
    let (key, pem) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pem")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=strata test {name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        p(&key),
        "-out",
        p(&pem),
    ])?;
    Ok(pem)
}
