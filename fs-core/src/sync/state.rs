//! The state of syncs from one SRC to one DST, in `STATE_DIR/<key>.json` (key: a hash of
//! both descriptions): the change token recorded at the start of the last finished pass
//! (for `--since auto`), and, while a pass runs, its start token, its `--since` and the
//! filter it uses. Next to it, `<key>.done` lists (one JSON string per line, appended as
//! they finish) the directories whose whole subtree the running pass has synced: a run
//! that finds an unfinished pass resumes it and does not list those again. A finished pass
//! removes the `.done` file. Both are rewritten atomically (temporary file + rename) or
//! appended; a torn last line is ignored.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::endpoint::Endpoint;
use super::filter::Filter;
use super::{Result, SyncError};

/// Version of the state file format.
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    src: String,
    dst: String,
    /// Token at the start of the last finished pass.
    token: Option<String>,
    pass: Option<Pass>,
}

/// A pass that started and has not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pass {
    /// SRC's change token when it started.
    pub token: Option<String>,
    pub since: Option<String>,
    pub filter: String,
}

pub struct State {
    json: PathBuf,
    done: PathBuf,
    stored: Stored,
    filter: String,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> SyncError {
    SyncError::State {
        path: path.display().to_string(),
        msg: format!("{msg} (remove the file to start over, or give another --state-dir)"),
    }
}

/// FNV-1a, 64 bits: a stable file name for a (SRC, DST) pair.
fn key(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

impl State {
    pub fn open(
        dir: &Path,
        src: &dyn Endpoint,
        dst: &dyn Endpoint,
        filter: &Filter,
    ) -> Result<State> {
        fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
        let (s, d) = (src.describe(), dst.describe());
        let k = key(&format!("{s}\n{d}"));
        let json = dir.join(format!("{k}.json"));
        let done = dir.join(format!("{k}.done"));
        let stored = match fs::read(&json) {
            Ok(b) => {
                let st: Stored = serde_json::from_slice(&b)
                    .map_err(|e| err(&json, format!("unreadable: {e}")))?;
                if st.version != VERSION {
                    return Err(err(
                        &json,
                        format!("written by another version ({})", st.version),
                    ));
                }
                st
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored {
                version: VERSION,
                src: s,
                dst: d,
                ..Stored::default()
            },
            Err(e) => return Err(err(&json, e)),
        };
        Ok(State {
            json,
            done,
            stored,
            filter: filter.describe(),
        })
    }

    pub fn path(&self) -> String {
        self.json.display().to_string()
    }

    /// The unfinished pass to resume (one with the same filter).
    pub fn pass_in_progress(&self) -> Option<Pass> {
        self.stored.pass.clone().filter(|p| p.filter == self.filter)
    }

    pub fn last_token(&self) -> Option<String> {
        self.stored.token.clone()
    }

    /// Directories the unfinished pass completed.
    pub fn done_dirs(&self) -> Result<HashSet<String>> {
        let f = match fs::File::open(&self.done) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(err(&self.done, e)),
        };
        let mut out = HashSet::new();
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| err(&self.done, e))?;
            // A line torn by a kill is not a finished directory.
            if let Ok(p) = serde_json::from_str::<String>(&line) {
                out.insert(p);
            }
        }
        Ok(out)
    }

    /// Write the stored state changed by `f` (atomically: temporary file, rename).
    fn save_with(&self, f: impl FnOnce(&mut Stored)) -> Result<()> {
        let mut stored = self.stored.clone();
        f(&mut stored);
        let tmp = self.json.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&stored).map_err(|e| err(&self.json, e))?;
        fs::write(&tmp, body).map_err(|e| err(&tmp, e))?;
        fs::rename(&tmp, &self.json).map_err(|e| err(&self.json, e))
    }

    /// Record a pass as started (or, `resuming`, continued) and open its checkpoint for
    /// appending (emptied for a new pass).
    pub fn begin(
        &self,
        token: Option<String>,
        since: Option<String>,
        resuming: bool,
    ) -> Result<Checkpoint> {
        self.save_with(|s| {
            s.pass = Some(Pass {
                token,
                since,
                filter: self.filter.clone(),
            })
        })?;
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&self.done)
            .map_err(|e| err(&self.done, e))?;
        if !resuming {
            file.set_len(0).map_err(|e| err(&self.done, e))?;
        }
        Ok(Checkpoint {
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    /// The pass finished without failures: its start token becomes the one `--since auto`
    /// uses, and the checkpoint is dropped.
    pub fn finish(&self, token: Option<String>) -> Result<()> {
        self.save_with(|s| {
            s.pass = None;
            if token.is_some() {
                s.token = token;
            }
        })?;
        match fs::remove_file(&self.done) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&self.done, e)),
        }
    }
}

/// The appended list of finished directories of the running pass.
pub struct Checkpoint {
    out: Mutex<BufWriter<fs::File>>,
}

impl Checkpoint {
    pub fn record(&self, dir: &str) {
        let line = serde_json::to_string(dir).unwrap_or_default();
        let mut o = self.out.lock();
        let _ = writeln!(o, "{line}");
    }

    /// Hand what was recorded to the kernel (it survives a kill of this process).
    pub fn flush(&self) {
        let _ = self.out.lock().flush();
    }
}
