//! Mount clients: the process that serves a FUSE connection the node plugin mounted
//! (`strata mount --fuse-fd-socket`). `process` mode runs it as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::errors::{CsiError, Result};
use crate::params::Secrets;

/// What a client needs to serve one shared mount.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub key: String,
    pub socket: PathBuf,
    pub mountpoint: PathBuf,
    pub options: Vec<(String, Option<String>)>,
    pub secrets: Secrets,
    pub log: PathBuf,
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

/// Path of `strata` next to this executable when present, else from PATH.
pub fn default_strata_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("strata")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("strata").to_path_buf())
}
