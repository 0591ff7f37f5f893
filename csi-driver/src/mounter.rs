//! Mount clients: the process that serves a FUSE connection the node plugin mounted
//! (`strata mount --fuse-fd-socket`). `process` mode runs it as a child process of the node
//! plugin; `pod` mode runs it in a mount Pod on the same node (see `pod.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata::fusefd::FdKeeper;

use crate::errors::{CsiError, Result};
use crate::params::Secrets;
use crate::pod::PodMounter;

/// Per-volume settings of the mount Pod (StorageClass parameters `mountImage`, `mountCPU`,
/// `mountMemory`, `cacheDir`); each one replaces the node plugin's flag when set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodParams {
    pub image: Option<String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub cache_dir: Option<String>,
}

/// What a client needs to serve one shared mount.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub key: String,
    pub socket: PathBuf,
    pub mountpoint: PathBuf,
    pub options: Vec<(String, Option<String>)>,
    pub secrets: Secrets,
    pub log: PathBuf,
    pub pod: PodParams,
    /// Pod mode: host directories the client must reach at the same path (a SQLite
    /// database's directory, a local bucket; see `pod::host_dirs`).
    pub host_dirs: Vec<PathBuf>,
}

/// One publication served by a shared mount, as recorded on its mount Pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    pub volume_id: String,
    pub target_path: String,
}

/// Runs mount clients as child processes.
pub struct ProcessMounter {
    pub strata_bin: PathBuf,
}

impl ProcessMounter {
    pub fn start(&self, spec: &ClientSpec) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| CsiError::io("client log", e))?;
        let mut cmd = Command::new(&self.strata_bin);
        cmd.args(["mount", "--fuse-fd-socket"]).arg(&spec.socket);
        for (k, v) in &spec.options {
            match v {
                Some(v) => cmd.arg(format!("--{k}={v}")),
                None => cmd.arg(format!("--{k}")),
            };
        }
        // META_URL and keys through the environment only.
        cmd.arg("-").arg(&spec.mountpoint);
        for (k, v) in spec.secrets.env() {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .current_dir("/");
        cmd.spawn()
            .map_err(|e| CsiError::Internal(format!("starting {}: {e}", self.strata_bin.display())))
    }
}

/// Starts, watches and stops the clients of shared mounts.
pub enum Mounter {
    /// A child process per shared mount.
    Process(ProcessMounter),
    /// A mount Pod per shared mount. The node service calls the mounter from blocking
    /// threads; `rt` runs the Kubernetes calls (`Handle::block_on`, never from a task).
    Pod {
        pods: Box<PodMounter>,
        rt: tokio::runtime::Handle,
        /// How long the descriptor may wait for a client before the Pod is created again.
        grace: Duration,
    },
}

/// The client of one shared mount, as its mounter tracks it.
#[derive(Debug)]
pub enum Client {
    /// A child process; `None` for a client adopted after a restart of the node plugin.
    Process(Option<Child>),
    /// A mount Pod; since when the keeper has had its descriptor but no client.
    Pod { unserved_since: Option<Instant> },
}

/// Default for [`Mounter::Pod`]'s grace: the Pod's supervisor restarts a crashed client
/// within 0.2 s (2 s at most when it keeps crashing); a mount without any client for longer
/// than this is checked through the API: a Pod that is gone or terminating is created
/// again (a live Pod built as wanted is left alone).
pub const POD_GRACE: Duration = Duration::from_secs(1);

impl Mounter {
    /// Is this pod mount mode?
    pub fn is_pod(&self) -> bool {
        matches!(self, Mounter::Pod { .. })
    }

    /// Make the node ready for the client of `spec` once its fd socket exists: in pod mode
    /// the socket and the host cache directory go to the mount Pods' user.
    pub fn prepare(&self, spec: &ClientSpec) -> Result<()> {
        match self {
            Mounter::Process(_) => Ok(()),
            Mounter::Pod { pods, .. } => {
                // A `cache-dir` mount option is a path inside the Pod, not on the host.
                let custom = spec.options.iter().any(|(k, _)| k == "cache-dir");
                let host_cache = spec
                    .pod
                    .cache_dir
                    .as_deref()
                    .or(pods.settings.cache_dir.as_deref())
                    .filter(|_| !custom);
                if host_cache.is_none() && spec.options.iter().any(|(k, _)| k == "writeback") {
                    return Err(CsiError::InvalidArgument(
                        "mountOptions `writeback` keeps written blocks in the mount Pod's cache directory until they are uploaded, \
                         and without a host cache directory that is an emptyDir, lost with the Pod: set the node plugin's \
                         --mount-cache-dir (chart: node.mountPod.cacheDir) or the StorageClass parameter cacheDir \
                         (`cache-dir` in mountOptions is a path inside the Pod), or drop writeback"
                            .into(),
                    ));
                }
                crate::pod::prepare_host(spec, host_cache)
            }
        }
    }

    /// Start the client of `spec`. `consumers` go on a new mount Pod.
    pub fn start(&self, spec: &ClientSpec, consumers: &[Consumer]) -> Result<Client> {
        match self {
            Mounter::Process(p) => Ok(Client::Process(Some(p.start(spec)?))),
            Mounter::Pod { pods, rt, .. } => {
                if rt.block_on(pods.start(spec, consumers))? {
                    tracing::info!(key = %spec.key, pod = %pods.name(&spec.key), "mount Pod created");
                }
                Ok(Client::Pod {
                    unserved_since: None,
                })
            }
        }
    }

    /// The client of a mount found live after a restart of the node plugin.
    pub fn adopted(&self) -> Client {
        match self {
            Mounter::Process(_) => Client::Process(None),
            Mounter::Pod { .. } => Client::Pod {
                unserved_since: None,
            },
        }
    }

    /// How long a new client may take to serve (a mount Pod may have an image to pull;
    /// kubelet gives NodeStageVolume about two minutes).
    pub fn start_timeout(&self) -> Duration {
        match self {
            Mounter::Process(_) => Duration::from_secs(60),
            Mounter::Pod { .. } => Duration::from_secs(100),
        }
    }

    /// Watchdog: is the client gone, so that [`Mounter::start`] must run again? A child
    /// process is gone once it exited. A mount Pod is gone when the keeper has held the
    /// descriptor without any client for longer than the grace period (a crashed container
    /// is restarted by kubelet itself; a deleted or evicted Pod is not); the period then
    /// starts again, so a Pod that stays away is asked for once per period.
    pub fn due(&self, client: &mut Client, keeper: &FdKeeper, now: Instant) -> bool {
        let unserved = keeper.has_fd() && keeper.clients() == 0;
        match (self, client) {
            (_, Client::Process(Some(c))) => matches!(c.try_wait(), Ok(Some(_))),
            (_, Client::Process(None)) => unserved,
            (Mounter::Process(_), Client::Pod { .. }) => unserved,
            (Mounter::Pod { grace, .. }, Client::Pod { unserved_since }) => {
                if !unserved {
                    *unserved_since = None;
                    return false;
                }
                let since = *unserved_since.get_or_insert(now);
                if now.duration_since(since) >= *grace {
                    *unserved_since = Some(now);
                    return true;
                }
                false
            }
        }
    }

    /// Stop the client of `spec` (its connection is already unmounted). A child process
    /// gets 10 s to exit, then is killed; a mount Pod and its Secret are deleted.
    pub fn stop(&self, spec: &ClientSpec, client: Client) -> Result<()> {
        match (self, client) {
            (_, Client::Process(Some(mut c))) => {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if let Ok(Some(_)) = c.try_wait() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
                Ok(())
            }
            (Mounter::Pod { pods, rt, .. }, _) => {
                rt.block_on(pods.stop(&spec.key))?;
                tracing::info!(key = %spec.key, pod = %pods.name(&spec.key), "mount Pod and Secret deleted");
                Ok(())
            }
            (Mounter::Process(_), _) => Ok(()),
        }
    }

    /// Record the publications a shared mount serves (on its mount Pod; nothing to do for
    /// a child process).
    pub fn set_consumers(&self, key: &str, consumers: &[Consumer]) -> Result<()> {
        match self {
            Mounter::Process(_) => Ok(()),
            Mounter::Pod { pods, rt, .. } => rt.block_on(pods.set_consumers(key, consumers)),
        }
    }

    /// Why a client may not be serving, for an error message.
    pub fn diagnose(&self, spec: &ClientSpec) -> String {
        match self {
            Mounter::Process(_) => {
                let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
                let mut tail: Vec<&str> = log.lines().rev().take(3).collect();
                tail.reverse();
                tail.join(" | ")
            }
            Mounter::Pod { pods, rt, .. } => match rt.block_on(pods.describe(&spec.key)) {
                Ok(s) => s,
                Err(e) => e.to_string(),
            },
        }
    }
}

/// Path of `strata` next to this executable when present, else from PATH.
pub fn default_strata_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("strata")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("strata").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::{calls, mock, settings, spec};
    use http::Method;
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn keeper(dir: &Path) -> FdKeeper {
        let dev = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        FdKeeper::start(&dir.join("fd.sock"), Some(dev), false).unwrap()
    }

    fn wait_clients(k: &FdKeeper, n: usize) {
        let start = Instant::now();
        while k.clients() != n {
            assert!(start.elapsed() < Duration::from_secs(5), "clients != {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pod_mounter(client: kube::Client, rt: &tokio::runtime::Runtime, grace: Duration) -> Mounter {
        Mounter::Pod {
            pods: Box::new(PodMounter {
                client,
                settings: settings(),
            }),
            rt: rt.handle().clone(),
            grace,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_mount_pod_without_client_is_created_again_after_the_grace_period() {
        let rt = runtime();
        let (client, server) = rt.block_on(async {
            mock(3, |s| match (&s.method, s.path.ends_with("/secrets")) {
                (&Method::POST, true) => (409, None),
                _ => (201, Some(s.body.clone())),
            })
        });
        let m = pod_mounter(client, &rt, Duration::from_secs(10));
        let dir = tempfile::tempdir().unwrap();
        let k = keeper(dir.path());
        let mut c = m.adopted();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(!m.due(&mut c, &k, t0));
        assert!(
            !m.due(&mut c, &k, t0 + s(9)),
            "kubelet restarts a crashed container"
        );
        assert!(m.due(&mut c, &k, t0 + s(10)), "gone for the grace period");
        assert!(!m.due(&mut c, &k, t0 + s(11)), "the period starts again");
        assert!(m.due(&mut c, &k, t0 + s(20)));
        // A client connects: served, the clock stops.
        let mut conn = UnixStream::connect(k.path()).unwrap();
        conn.write_all(b"N").unwrap();
        wait_clients(&k, 1);
        assert!(!m.due(&mut c, &k, t0 + s(60)));
        assert!(matches!(
            c,
            Client::Pod {
                unserved_since: None
            }
        ));
        drop(conn);
        wait_clients(&k, 0);
        assert!(!m.due(&mut c, &k, t0 + s(61)));
        assert!(!m.due(&mut c, &k, t0 + s(70)));
        assert!(m.due(&mut c, &k, t0 + s(71)));
        // The watchdog then issues the idempotent create, with the consumers.
        let consumers = [Consumer {
            volume_id: "vol/a".into(),
            target_path: "/t/1".into(),
        }];
        let c = m.start(&spec(), &consumers).unwrap();
        assert!(matches!(
            c,
            Client::Pod {
                unserved_since: None
            }
        ));
        let seen = rt.block_on(server).unwrap();
        assert_eq!(
            calls(&seen),
            vec![
                (
                    Method::POST,
                    "/api/v1/namespaces/strata/secrets".to_string()
                ),
                (
                    Method::PATCH,
                    "/api/v1/namespaces/strata/secrets/strata-mount-v0123-node-1".to_string()
                ),
                (Method::POST, "/api/v1/namespaces/strata/pods".to_string()),
            ]
        );
        assert_eq!(
            seen[2].body["metadata"]["annotations"]["strata.io/consumers"],
            r#"[{"volumeId":"vol/a","targetPath":"/t/1"}]"#
        );
    }

    #[test]
    fn stopping_a_mount_pod_deletes_the_pod_and_its_secret() {
        let rt = runtime();
        let (client, server) = rt.block_on(async { mock(2, |_| (200, None)) });
        let m = pod_mounter(client, &rt, POD_GRACE);
        m.stop(&spec(), m.adopted()).unwrap();
        let seen = rt.block_on(server).unwrap();
        assert_eq!(
            calls(&seen),
            vec![
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

    #[test]
    fn a_child_process_is_due_once_it_exited() {
        let m = Mounter::Process(ProcessMounter {
            strata_bin: "/bin/true".into(),
        });
        let dir = tempfile::tempdir().unwrap();
        let k = keeper(dir.path());
        let mut sp = spec();
        sp.log = dir.path().join("client.log");
        let mut c = m.start(&sp, &[]).unwrap();
        let start = Instant::now();
        while !m.due(&mut c, &k, Instant::now()) {
            assert!(start.elapsed() < Duration::from_secs(5), "exit not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Adopted after a restart: due when the keeper has no client.
        let mut adopted = m.adopted();
        assert!(m.due(&mut adopted, &k, Instant::now()));
        m.stop(&sp, c).unwrap();
    }
}
