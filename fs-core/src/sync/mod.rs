//! `strata sync SRC DST`: copy a tree between local directories, S3 buckets/prefixes and
//! directories of Strata volumes (docs/SYNC.md).
//!
//! The tree is walked one directory at a time by `threads` workers: each directory is
//! listed once at each side, the two listings are merged by name, and what differs is
//! copied (size + modification time, or the bytes with `check`), linked, re-attributed or,
//! with `delete`, removed. Files are written under a temporary name and renamed into place
//! with their times set, so an interrupted run never leaves a partial file that a later run
//! would take as done. A state file per (SRC, DST) records the change token of the last
//! finished pass and, during a pass, the directories whose whole subtree is done
//! ([`state`]): a rerun after a kill skips them without listing them. From a Strata volume,
//! `since` visits only the directories the change journal names.

pub mod endpoint;
pub mod filter;
pub mod local;
pub mod s3;
pub mod state;
pub mod volume;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::meta::{MetaError, redact_url};
use crate::metrics::Metrics;
use endpoint::{Caps, Endpoint, Item, Kind, TEMP_PREFIX, join};
pub use filter::Filter;
use s3::S3Access;

/// Errors of `strata sync` that stop it (a file that fails is counted instead, see
/// [`Summary::failed`]).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error("state file {path}: {msg}")]
    State { path: String, msg: String },
}

impl SyncError {
    fn from_meta(url: &str) -> impl Fn(MetaError) -> SyncError + '_ {
        move |e| SyncError::Io(format!("{}: {e}", redact_url(url)))
    }
}

pub type Result<T> = std::result::Result<T, SyncError>;

/// `--since`: a change token, or the one the state file recorded at the start of the last
/// finished pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Since {
    Token(String),
    Auto,
}

impl std::str::FromStr for Since {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Since, String> {
        if s == "auto" {
            return Ok(Since::Auto);
        }
        if s.is_empty() {
            return Err(
                "--since: give the change token a previous sync printed, or 'auto' (the last one recorded in the state file)"
                    .into(),
            );
        }
        Ok(Since::Token(s.to_string()))
    }
}

/// Settings of one sync (the command-line flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncOptions {
    /// Files copied at once.
    pub threads: usize,
    /// Remove at DST what SRC does not have (entries excluded by the filter are kept).
    pub delete: bool,
    /// Compare the bytes of files of equal size instead of trusting size + mtime.
    pub check: bool,
    /// Bytes per second read from SRC, all threads together (0: no limit).
    pub bwlimit: u64,
    /// Visit only the directories the change journal names.
    pub since: Option<Since>,
    /// Where the state files live (default `$HOME/.strata/sync`).
    pub state_dir: Option<PathBuf>,
    /// No progress lines.
    pub quiet: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    pub progress_interval: u64,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            threads: 10,
            delete: false,
            check: false,
            bwlimit: 0,
            since: None,
            state_dir: None,
            quiet: false,
            progress_interval: 5,
        }
    }
}

/// Where SRC or DST is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Local(PathBuf),
    S3(String),
    /// A Strata volume's META_URL and a directory in it.
    Volume {
        url: String,
        path: String,
    },
}

impl Spec {
    /// Parse SRC/DST with its `--src-path`/`--dst-path`.
    pub fn parse(arg: &str, path: Option<&str>, flag: &str) -> Result<Spec> {
        let is_meta = ["sqlite://", "postgres://", "postgresql://", "mem://"]
            .iter()
            .any(|p| arg.starts_with(p));
        if is_meta {
            return Ok(Spec::Volume {
                url: arg.to_string(),
                path: path.unwrap_or("/").to_string(),
            });
        }
        if let Some(p) = path {
            return Err(SyncError::Invalid(format!(
                "--{flag}-path {p:?} is for a Strata volume, but {} is not a META_URL (sqlite://… or postgres://…)",
                redact_url(arg)
            )));
        }
        if arg.starts_with("s3://") {
            return Ok(Spec::S3(arg.to_string()));
        }
        if let Some(p) = arg.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(SyncError::Invalid(format!(
                    "{arg}: a file URL needs an absolute path (file:///dir)"
                )));
            }
            return Ok(Spec::Local(PathBuf::from(p)));
        }
        if let Some((scheme, _)) = arg.split_once("://") {
            return Err(SyncError::Invalid(format!(
                "{}: unsupported scheme {scheme}://; use a directory (/path or file:///path), s3://bucket/prefix, or a volume's sqlite:// or postgres:// META_URL",
                redact_url(arg)
            )));
        }
        if arg.is_empty() {
            return Err(SyncError::Invalid(format!("{flag}: empty path")));
        }
        Ok(Spec::Local(PathBuf::from(arg)))
    }

    /// Open the endpoint (`dst`: create what is missing; a source volume is opened
    /// read-only).
    pub fn open(
        &self,
        access: &S3Access,
        dst: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Box<dyn Endpoint>> {
        Ok(match self {
            Spec::Local(p) => Box::new(local::LocalDir::new(p.clone())),
            Spec::S3(url) => {
                let d = s3::S3Dir::open(url, access.clone().with_env(), metrics)?;
                if dst {
                    d.init()?;
                }
                Box::new(d)
            }
            Spec::Volume { url, path } => {
                Box::new(volume::VolumeDir::open(url, path, !dst, metrics)?)
            }
        })
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Files and symlinks written at DST.
    pub copied: u64,
    pub copied_bytes: u64,
    /// Hard links made at DST.
    pub linked: u64,
    /// Entries found up to date.
    pub skipped: u64,
    /// Entries whose data was equal but whose mode, owner, times or xattrs were set.
    pub attrs_updated: u64,
    pub deleted: u64,
    /// Entries DST cannot hold (symlinks on S3, devices, FIFOs, sockets).
    pub unsupported: u64,
    pub failed: u64,
    /// Directories compared (listed at both sides).
    pub dirs: u64,
    /// Directories skipped as done by an interrupted earlier run of this pass.
    pub resumed_dirs: u64,
    pub seconds: f64,
    pub src: Calls,
    pub dst: Calls,
    /// Change token of SRC when this pass started (Strata volumes).
    pub token: Option<String>,
    /// The token this pass started from (`--since`), and the directories the journal named.
    pub since: Option<String>,
    pub changed_dirs: Option<u64>,
    /// Why a `--since` pass became a full one.
    pub full_because: Option<String>,
    /// The first failures.
    pub errors: Vec<String>,
}

/// Calls one side answered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Calls {
    pub endpoint: String,
    /// Directory listings (S3: LIST requests).
    pub lists: u64,
    /// Other metadata calls (Strata: metadata-engine operations).
    pub meta_calls: u64,
    /// Listings made only to find the paths of changed directories.
    pub path_lists: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.copied_bytes as f64 / self.seconds.max(0.001);
        writeln!(
            f,
            "sync: copied {} ({}), linked {}, skipped {}, attributes updated {}, deleted {}, unsupported {}, failed {} in {:.1} s ({}/s); {} directories compared{}",
            self.copied,
            human(self.copied_bytes),
            self.linked,
            self.skipped,
            self.attrs_updated,
            self.deleted,
            self.unsupported,
            self.failed,
            self.seconds,
            human(rate as u64),
            self.dirs,
            if self.resumed_dirs > 0 {
                format!(", {} done before the interruption", self.resumed_dirs)
            } else {
                String::new()
            }
        )?;
        for (side, c) in [("source", &self.src), ("destination", &self.dst)] {
            writeln!(
                f,
                "  {side} {}: {} listings, {} metadata calls{}",
                c.endpoint,
                c.lists,
                c.meta_calls,
                if c.path_lists > 0 {
                    format!(" ({} listings to find changed directories)", c.path_lists)
                } else {
                    String::new()
                }
            )?;
        }
        if let (Some(s), Some(n)) = (&self.since, self.changed_dirs) {
            writeln!(f, "  since token {s}: {n} changed directories")?;
        }
        if let Some(why) = &self.full_because {
            writeln!(f, "  full pass: {why}")?;
        }
        if let Some(t) = &self.token {
            writeln!(
                f,
                "  change token {t} (next time: --since {t}, or --since auto)"
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  failed: {e}")?;
        }
        Ok(())
    }
}

/// Bytes for people (`1.50 GiB`), in progress lines and summaries (also `strata warmup`).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `100M`, `1.5G`, `512k`, `1000`: bytes (per second for `--bwlimit`), powers of 1024.
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok((v * mult as f64) as u64),
        _ => Err(SyncError::Invalid(format!(
            "--bwlimit {s:?}: give bytes per second like 100M, 1.5G or 500k"
        ))),
    }
}

/// The bytes-per-second limit shared by all workers: each read takes its bytes ahead of
/// time and sleeps off the debt.
struct Throttle {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    fn take(&self, n: usize) {
        if self.rate <= 0.0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock();
            let now = Instant::now();
            // At most a quarter second of burst.
            st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.rate / 4.0);
            st.1 = now;
            st.0 -= n as f64;
            if st.0 < 0.0 { -st.0 / self.rate } else { 0.0 }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[derive(Default)]
struct Stats {
    copied: AtomicU64,
    copied_bytes: AtomicU64,
    linked: AtomicU64,
    skipped: AtomicU64,
    attrs_updated: AtomicU64,
    deleted: AtomicU64,
    unsupported: AtomicU64,
    failed: AtomicU64,
    dirs: AtomicU64,
    resumed_dirs: AtomicU64,
    /// Bytes of files queued for copying and not copied yet (for the ETA).
    pending_bytes: AtomicU64,
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// A directory being synced: done when its listing is processed, every file job it queued
/// has finished and every subdirectory is done.
struct DirNode {
    path: String,
    parent: Option<Arc<DirNode>>,
    pending: AtomicUsize,
    /// Attributes to give the directory at DST when done: SRC's, and DST's as listed.
    src: Option<Item>,
    dst: Option<Item>,
    /// Something inside was created, replaced or removed (its mtime moved).
    changed: AtomicBool,
}

enum Job {
    Dir {
        node: Arc<DirNode>,
        /// Recurse into every subdirectory (else: only into new ones).
        full: bool,
    },
    File {
        node: Arc<DirNode>,
        src: Item,
        dst: Option<Item>,
        /// Hard link group this job copies the first of (others wait for it).
        first_link: bool,
    },
    /// A further name of a hard-linked file whose first name is being copied.
    Link {
        node: Arc<DirNode>,
        src: Item,
        dst: Option<Item>,
    },
}

struct Run<'a> {
    src: &'a dyn Endpoint,
    dst: &'a dyn Endpoint,
    scaps: Caps,
    dcaps: Caps,
    opts: &'a SyncOptions,
    filter: &'a Filter,
    stats: Stats,
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    outstanding: AtomicUsize,
    /// Hard links: SRC inode → DST path of its first name (None while being copied).
    links: Mutex<HashMap<u64, Option<String>>>,
    throttle: Throttle,
    /// Directories a killed run of this pass finished.
    done: HashSet<String>,
    checkpoint: Option<&'a state::Checkpoint>,
    errors: Mutex<Vec<String>>,
    owner: (u32, u32),
    warned_unsupported: AtomicBool,
}

impl Run<'_> {
    fn fail(&self, path: &str, e: &SyncError) {
        add(&self.stats.failed, 1);
        tracing::warn!(path = %path, error = %e, "sync failed for an entry");
        let mut errs = self.errors.lock();
        if errs.len() < 10 {
            errs.push(format!("/{path}: {e}"));
        }
    }

    fn push(&self, job: Job, front: bool) {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let mut q = self.queue.lock();
        if front {
            q.push_front(job);
        } else {
            q.push_back(job);
        }
        drop(q);
        self.ready.notify_one();
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(j) = q.pop_front() {
                        break j;
                    }
                    if self.outstanding.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    self.ready.wait_for(&mut q, Duration::from_millis(200));
                }
            };
            self.run_job(job);
            if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.ready.notify_all();
            }
        }
    }

    fn run_job(&self, job: Job) {
        match job {
            Job::Dir { node, full } => {
                if let Err(e) = self.sync_dir(&node, full) {
                    self.fail(&node.path, &e);
                }
                self.release(node);
            }
            Job::File {
                node,
                src,
                dst,
                first_link,
            } => {
                let path = join(&node.path, &src.name);
                match self.sync_file(&path, &src, dst.as_ref()) {
                    Ok(changed) => {
                        if changed {
                            node.changed.store(true, Ordering::Relaxed);
                        }
                        if first_link {
                            self.links.lock().insert(src.id, Some(path));
                        }
                    }
                    Err(e) => {
                        if first_link {
                            // Let a further name try to copy it.
                            self.links.lock().remove(&src.id);
                        }
                        self.fail(&path, &e);
                    }
                }
                self.release(node);
            }
            Job::Link { node, src, dst } => {
                let path = join(&node.path, &src.name);
                let state = self.links.lock().get(&src.id).cloned();
                match state {
                    Some(Some(first)) => {
                        match self.make_link(&first, &path, &src, dst.as_ref()) {
                            Ok(changed) => {
                                if changed {
                                    node.changed.store(true, Ordering::Relaxed);
                                }
                            }
                            Err(e) => self.fail(&path, &e),
                        }
                        self.release(node);
                    }
                    Some(None) => {
                        // The first name is still being copied: come back to it.
                        std::thread::sleep(Duration::from_millis(2));
                        self.push(Job::Link { node, src, dst }, false);
                    }
                    None => {
                        self.links.lock().insert(src.id, None);
                        self.push(
                            Job::File {
                                node,
                                src,
                                dst,
                                first_link: true,
                            },
                            true,
                        );
                    }
                }
            }
        }
    }

    /// One job of `node` finished: finish the directories it completes.
    fn release(&self, node: Arc<DirNode>) {
        let mut cur = node;
        loop {
            if cur.pending.fetch_sub(1, Ordering::SeqCst) != 1 {
                return;
            }
            self.dir_done(&cur);
            match cur.parent.clone() {
                Some(p) => cur = p,
                None => return,
            }
        }
    }

    fn dir_done(&self, node: &DirNode) {
        if node.src.is_some() && self.scaps.xattrs && self.dcaps.xattrs {
            let res = (|| {
                let want = self.src.xattrs(&node.path, node.src.as_ref())?;
                if self.dst.xattrs(&node.path, node.dst.as_ref())? != want {
                    self.dst.set_xattrs(&node.path, &want)?;
                }
                Ok::<_, SyncError>(())
            })();
            if let Err(e) = res {
                self.fail(&node.path, &e);
                return;
            }
        }
        if let Some(src) = &node.src
            && self.scaps.attrs
            && self.dcaps.attrs
        {
            let differs = node.dst.as_ref().is_none_or(|d| {
                d.mode != src.mode || d.uid != src.uid || d.gid != src.gid || d.mtime != src.mtime
            });
            if differs || node.changed.load(Ordering::Relaxed) {
                if let Err(e) = self.dst.set_attrs(&node.path, src) {
                    self.fail(&node.path, &e);
                    return;
                }
                if node.dst.is_some() && !node.changed.load(Ordering::Relaxed) {
                    add(&self.stats.attrs_updated, 1);
                }
            }
        }
        if let Some(c) = self.checkpoint {
            c.record(&node.path);
        }
    }

    /// The attributes a file gets at DST.
    fn dst_item(&self, src: &Item) -> Item {
        if self.scaps.attrs {
            return src.clone();
        }
        Item {
            atime: src.mtime,
            uid: self.owner.0,
            gid: self.owner.1,
            mode: if src.kind == Kind::Dir { 0o755 } else { 0o644 },
            ..src.clone()
        }
    }

    /// Whether DST's file holds SRC's data as far as size and time tell.
    fn same_data(&self, s: &Item, d: &Item) -> bool {
        if s.size != d.size {
            return false;
        }
        if self.dcaps.attrs {
            s.mtime == d.mtime
        } else {
            // S3: the object's time is when it was written, after SRC's last change.
            d.mtime.div_euclid(1_000_000_000) >= s.mtime.div_euclid(1_000_000_000)
        }
    }

    /// Owner, mode and extended attributes of an entry whose data is up to date; returns
    /// whether anything was set.
    fn fix_attrs(&self, path: &str, s: &Item, d: &Item) -> Result<bool> {
        let mut fixed = false;
        if self.scaps.attrs && self.dcaps.attrs {
            let mode_differs = s.kind != Kind::Symlink && s.mode != d.mode;
            if mode_differs || s.uid != d.uid || s.gid != d.gid {
                self.dst.set_attrs(path, s)?;
                fixed = true;
            }
        }
        if self.scaps.xattrs && self.dcaps.xattrs && s.kind != Kind::Symlink {
            let want = self.src.xattrs(path, Some(s))?;
            if self.dst.xattrs(path, Some(d))? != want {
                self.dst.set_xattrs(path, &want)?;
                fixed = true;
            }
        }
        Ok(fixed)
    }

    fn sync_dir(&self, node: &Arc<DirNode>, full: bool) -> Result<()> {
        if self.done.contains(&node.path) {
            add(&self.stats.resumed_dirs, 1);
            return Ok(());
        }
        let Some(src_list) = self.src.list(&node.path)? else {
            // Removed since its parent was listed (a journal pass: gone since the change).
            return Ok(());
        };
        let dst_list = self.dst.list(&node.path)?.unwrap_or_default();
        add(&self.stats.dirs, 1);
        let mut dst_by: HashMap<&str, &Item> = HashMap::with_capacity(dst_list.len());
        for d in &dst_list {
            if d.name.starts_with(TEMP_PREFIX) {
                // A file a killed run was writing: removed before this run writes its own
                // temporary files here.
                let path = join(&node.path, &d.name);
                if let Err(e) = self.dst.remove(&path, d.kind) {
                    self.fail(&path, &e);
                }
            } else {
                dst_by.insert(d.name.as_str(), d);
            }
        }
        for s in &src_list {
            if s.name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let path = join(&node.path, &s.name);
            let included = self.filter.included(&path, s.kind == Kind::Dir);
            let d = dst_by.remove(s.name.as_str());
            if !included {
                continue;
            }
            if let Err(e) = self.sync_entry(node, full, &path, s, d) {
                self.fail(&path, &e);
            }
        }
        // What is left at DST is not at SRC.
        let mut rest: Vec<&Item> = dst_by.into_values().collect();
        rest.sort_by(|a, b| a.name.cmp(&b.name));
        for d in rest {
            let path = join(&node.path, &d.name);
            if self.opts.delete && self.filter.included(&path, d.kind == Kind::Dir) {
                match self.dst.remove(&path, d.kind) {
                    Ok(()) => {
                        add(&self.stats.deleted, 1);
                        node.changed.store(true, Ordering::Relaxed);
                    }
                    Err(e) => self.fail(&path, &e),
                }
            }
        }
        Ok(())
    }

    fn child(&self, node: &Arc<DirNode>) {
        node.pending.fetch_add(1, Ordering::SeqCst);
    }

    fn sync_entry(
        &self,
        node: &Arc<DirNode>,
        full: bool,
        path: &str,
        s: &Item,
        d: Option<&Item>,
    ) -> Result<()> {
        // A different kind at DST goes first (a file where a directory was, …).
        let d = match d {
            // On S3 an object `a` and a prefix `a/` can both exist: nothing to remove.
            Some(d) if d.kind != s.kind && !self.dcaps.dirs => None,
            Some(d) if d.kind != s.kind => {
                self.dst.remove(path, d.kind)?;
                node.changed.store(true, Ordering::Relaxed);
                None
            }
            d => d,
        };
        match s.kind {
            Kind::Dir => {
                let new = d.is_none();
                if new && self.dcaps.dirs {
                    self.dst.mkdir(path, &self.dst_item(s))?;
                    node.changed.store(true, Ordering::Relaxed);
                }
                let recurse = full || new;
                if recurse {
                    self.child(node);
                    let child = Arc::new(DirNode {
                        path: path.to_string(),
                        parent: Some(node.clone()),
                        pending: AtomicUsize::new(1),
                        src: Some(s.clone()),
                        dst: d.cloned(),
                        changed: AtomicBool::new(new),
                    });
                    self.push(
                        Job::Dir {
                            node: child,
                            full: full || new,
                        },
                        false,
                    );
                } else if let Some(d) = d
                    && self.scaps.attrs
                    && self.dcaps.attrs
                    && (d.mode != s.mode || d.uid != s.uid || d.gid != s.gid || d.mtime != s.mtime)
                {
                    // Not visited now (a journal pass): its attributes still follow SRC.
                    self.dst.set_attrs(path, s)?;
                    add(&self.stats.attrs_updated, 1);
                }
                Ok(())
            }
            Kind::File => {
                let links = s.nlink > 1 && self.scaps.hardlinks && self.dcaps.hardlinks;
                if links {
                    let state = self.links.lock().get(&s.id).cloned();
                    match state {
                        Some(Some(first)) => {
                            if self.make_link(&first, path, s, d)? {
                                node.changed.store(true, Ordering::Relaxed);
                            }
                            return Ok(());
                        }
                        Some(None) => {
                            self.child(node);
                            self.push(
                                Job::Link {
                                    node: node.clone(),
                                    src: s.clone(),
                                    dst: d.cloned(),
                                },
                                false,
                            );
                            return Ok(());
                        }
                        None => {}
                    }
                }
                if let Some(d) = d
                    && !self.opts.check
                    && self.same_data(s, d)
                {
                    if self.fix_attrs(path, s, d)? {
                        add(&self.stats.attrs_updated, 1);
                    } else {
                        add(&self.stats.skipped, 1);
                    }
                    if links {
                        self.links
                            .lock()
                            .entry(s.id)
                            .or_insert_with(|| Some(path.to_string()));
                    }
                    return Ok(());
                }
                if links {
                    self.links.lock().insert(s.id, None);
                }
                self.child(node);
                add(&self.stats.pending_bytes, s.size);
                self.push(
                    Job::File {
                        node: node.clone(),
                        src: s.clone(),
                        dst: d.cloned(),
                        first_link: links,
                    },
                    true,
                );
                Ok(())
            }
            Kind::Symlink => {
                if !self.dcaps.symlinks {
                    self.unsupported(path, "symbolic link");
                    return Ok(());
                }
                let target = self.src.readlink(path)?;
                if let Some(d) = d
                    && self.dst.readlink(path)? == target
                {
                    let times = self.scaps.attrs && self.dcaps.attrs && d.mtime != s.mtime;
                    if times || (self.scaps.attrs && (d.uid != s.uid || d.gid != s.gid)) {
                        self.dst.set_attrs(path, s)?;
                        add(&self.stats.attrs_updated, 1);
                    } else {
                        add(&self.stats.skipped, 1);
                    }
                    return Ok(());
                }
                self.dst.symlink(path, &target, &self.dst_item(s))?;
                node.changed.store(true, Ordering::Relaxed);
                add(&self.stats.copied, 1);
                Ok(())
            }
            Kind::Other => {
                self.unsupported(path, "device, FIFO or socket");
                Ok(())
            }
        }
    }

    fn unsupported(&self, path: &str, what: &str) {
        add(&self.stats.unsupported, 1);
        if !self.warned_unsupported.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %path, destination = %self.dst.describe(),
                "not copied: a {what} cannot be kept there (counted as unsupported; further ones are not logged)");
        }
    }

    /// Another name of a hard-linked file whose first name is at `first` at DST.
    fn make_link(&self, first: &str, path: &str, s: &Item, d: Option<&Item>) -> Result<bool> {
        if let Some(d) = d
            && d.kind == Kind::File
            && d.nlink > 1
            && self.same_data(s, d)
            && self.dst.stat(first)?.is_some_and(|f| f.id == d.id)
        {
            add(&self.stats.skipped, 1);
            return Ok(false);
        }
        self.dst.link(first, path)?;
        add(&self.stats.linked, 1);
        Ok(true)
    }

    /// Copy one file (or, with `check`, compare it first). Returns whether DST changed.
    fn sync_file(&self, path: &str, s: &Item, d: Option<&Item>) -> Result<bool> {
        let result = (|| {
            if self.opts.check
                && let Some(d) = d
                && d.size == s.size
                && self.same_bytes(path, s, d)?
            {
                if self.fix_attrs(path, s, d)? || (self.dcaps.attrs && d.mtime != s.mtime) {
                    if self.dcaps.attrs && d.mtime != s.mtime {
                        self.dst.set_attrs(path, &self.dst_item(s))?;
                    }
                    add(&self.stats.attrs_updated, 1);
                } else {
                    add(&self.stats.skipped, 1);
                }
                return Ok(false);
            }
            self.copy(path, s)?;
            Ok(true)
        })();
        let _ = self
            .stats
            .pending_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(s.size))
            });
        result
    }

    fn same_bytes(&self, path: &str, s: &Item, d: &Item) -> Result<bool> {
        let mut a = self.src.open(path, s)?;
        let mut b = self.dst.open(path, d)?;
        let mut left = bytes::Bytes::new();
        loop {
            let Some(x) = a.next()? else {
                return Ok(left.is_empty() && b.next()?.is_none());
            };
            self.throttle.take(x.len());
            let mut x = &x[..];
            while !x.is_empty() {
                if left.is_empty() {
                    match b.next()? {
                        Some(y) => left = y,
                        None => return Ok(false),
                    }
                }
                let n = x.len().min(left.len());
                if x[..n] != left[..n] {
                    return Ok(false);
                }
                x = &x[n..];
                left = left.slice(n..);
            }
        }
    }

    fn copy(&self, path: &str, s: &Item) -> Result<()> {
        let item = self.dst_item(s);
        let mut r = self.src.open(path, s)?;
        let mut w = self.dst.create(path, &item)?;
        let res = (|| {
            while let Some(piece) = r.next()? {
                self.throttle.take(piece.len());
                w.write(&piece)?;
                add(&self.stats.copied_bytes, piece.len() as u64);
            }
            Ok(())
        })();
        drop(r);
        if let Err(e) = res {
            w.abort();
            return Err(e);
        }
        let xattrs = if self.scaps.xattrs && self.dcaps.xattrs {
            self.src.xattrs(path, Some(s))?
        } else {
            Vec::new()
        };
        w.commit(&item, &xattrs)?;
        add(&self.stats.copied, 1);
        Ok(())
    }
}

/// Where the state of a (SRC, DST) pair is kept.
fn state_dir(opts: &SyncOptions) -> PathBuf {
    if let Some(d) = &opts.state_dir {
        return d.clone();
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".strata").join("sync"),
        _ => PathBuf::from("/var/lib/strata/sync"),
    }
}

/// Copy SRC to DST. Per-entry failures are counted in the summary (and the first ones
/// kept); setup failures are errors.
pub fn run(
    src: &dyn Endpoint,
    dst: &dyn Endpoint,
    filter: &Filter,
    opts: &SyncOptions,
) -> Result<Summary> {
    let started = Instant::now();
    if opts.threads == 0 || opts.threads > 1024 {
        return Err(SyncError::Invalid(format!(
            "--threads {}: give 1 to 1024",
            opts.threads
        )));
    }
    let src_root = src.stat("")?;
    let scaps = src.caps();
    if scaps.dirs && src_root.is_none() {
        return Err(SyncError::Invalid(format!(
            "SRC {} does not exist (check the path)",
            src.describe()
        )));
    }
    if let Some(r) = &src_root
        && r.kind != Kind::Dir
    {
        return Err(SyncError::Invalid(format!(
            "SRC {} is not a directory: sync copies directory trees (give the directory that holds it)",
            src.describe()
        )));
    }
    let st = state::State::open(&state_dir(opts), src, dst, filter)?;
    // An unfinished pass of the same kind (same filters, same --since) is resumed; any
    // other request starts a new pass.
    let resume = st
        .pass_in_progress()
        .filter(|p| match (&opts.since, &p.since) {
            (None, None) | (Some(Since::Auto), Some(_)) => true,
            (Some(Since::Token(t)), Some(s)) => t == s,
            _ => false,
        });
    let token = match resume.as_ref() {
        Some(p) => p.token.clone(),
        None => src.change_token()?,
    };
    if opts.since.is_some() && token.is_none() {
        return Err(SyncError::Invalid(format!(
            "--since needs a Strata volume as SRC (its META_URL, with --src-path); {} has no change journal",
            src.describe()
        )));
    }
    let since = match (resume.as_ref().and_then(|p| p.since.clone()), &opts.since) {
        (Some(t), _) => Some(t),
        (None, None) => None,
        (None, Some(Since::Token(t))) => Some(t.clone()),
        (None, Some(Since::Auto)) => Some(st.last_token().ok_or_else(|| {
            SyncError::Invalid(format!(
                "--since auto: no finished pass from {} to {} is recorded in {}; run one without --since first",
                src.describe(),
                dst.describe(),
                st.path()
            ))
        })?),
    };
    let mut summary = Summary {
        token: token.clone(),
        since: since.clone(),
        ..Summary::default()
    };
    // The directories to visit: the root (a full pass) or the changed ones.
    let mut changed: Option<Vec<String>> = None;
    if let Some(t) = &since {
        match src.changed_dirs(t)? {
            Ok(dirs) => {
                summary.changed_dirs = Some(dirs.len() as u64);
                changed = Some(dirs);
            }
            Err(why) => {
                tracing::info!(since = %t, reason = %why, "the change journal cannot tell what changed: a full pass");
                summary.full_because = Some(why);
            }
        }
    }
    let done = match &resume {
        Some(_) => st.done_dirs()?,
        None => HashSet::new(),
    };
    let checkpoint = st.begin(token.clone(), since.clone(), resume.is_some())?;
    let dst_root = dst.stat("")?;
    if dst_root.is_none() && dst.caps().dirs {
        dst.mkdir(
            "",
            src_root
                .as_ref()
                .unwrap_or(&Item::plain(String::new(), Kind::Dir, 0, 0)),
        )?;
    }
    // SAFETY: geteuid/getegid have no preconditions.
    let owner = unsafe { (libc::geteuid(), libc::getegid()) };
    let run = Run {
        src,
        dst,
        scaps,
        dcaps: dst.caps(),
        opts,
        filter,
        stats: Stats::default(),
        queue: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
        outstanding: AtomicUsize::new(0),
        links: Mutex::new(HashMap::new()),
        throttle: Throttle::new(opts.bwlimit),
        done,
        checkpoint: Some(&checkpoint),
        errors: Mutex::new(Vec::new()),
        owner,
        warned_unsupported: AtomicBool::new(false),
    };
    match &changed {
        None => {
            let root = Arc::new(DirNode {
                path: String::new(),
                parent: None,
                pending: AtomicUsize::new(1),
                src: src_root.clone(),
                dst: dst_root.clone(),
                changed: AtomicBool::new(false),
            });
            run.push(
                Job::Dir {
                    node: root,
                    full: true,
                },
                false,
            );
        }
        Some(dirs) => {
            for path in dirs {
                if !run.filter_allows_dir(path) {
                    continue;
                }
                let s = src.stat(path)?;
                let Some(s) = s.filter(|s| s.kind == Kind::Dir) else {
                    continue;
                };
                let d = dst.stat(path)?;
                if d.is_none() && !path.is_empty() {
                    // Its parent is new at DST too; the parent's visit creates it.
                    let (parent, _) = endpoint::split(path);
                    if dst.stat(parent)?.is_none() {
                        continue;
                    }
                    dst.mkdir(path, &run.dst_item(&s))?;
                }
                let node = Arc::new(DirNode {
                    path: path.clone(),
                    parent: None,
                    pending: AtomicUsize::new(1),
                    src: Some(s),
                    dst: d,
                    changed: AtomicBool::new(false),
                });
                run.push(Job::Dir { node, full: false }, false);
            }
        }
    }
    let stop = AtomicBool::new(false);
    let cp = &checkpoint;
    std::thread::scope(|scope| {
        let run = &run;
        let stop = &stop;
        let progress = scope.spawn(move || progress_loop(run, stop, started, cp));
        let workers: Vec<_> = (0..opts.threads)
            .map(|_| scope.spawn(move || run.worker()))
            .collect();
        for w in workers {
            let _ = w.join();
        }
        stop.store(true, Ordering::SeqCst);
        let _ = progress.join();
    });
    let finish_err = dst.finish().err();
    let s = &run.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    summary.copied = get(&s.copied);
    summary.copied_bytes = get(&s.copied_bytes);
    summary.linked = get(&s.linked);
    summary.skipped = get(&s.skipped);
    summary.attrs_updated = get(&s.attrs_updated);
    summary.deleted = get(&s.deleted);
    summary.unsupported = get(&s.unsupported);
    summary.failed = get(&s.failed);
    summary.dirs = get(&s.dirs);
    summary.resumed_dirs = get(&s.resumed_dirs);
    summary.errors = run.errors.lock().clone();
    if let Some(e) = finish_err {
        summary.failed += 1;
        summary.errors.push(format!("storing the last files: {e}"));
    }
    for (calls, ep) in [(&mut summary.src, src), (&mut summary.dst, dst)] {
        let (lists, meta_calls, path_lists) = ep.counters().get();
        *calls = Calls {
            endpoint: ep.describe(),
            lists,
            meta_calls,
            path_lists,
        };
    }
    checkpoint.flush();
    if summary.failed == 0 {
        st.finish(token)?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

impl Run<'_> {
    /// Whether a changed directory lies in a part of the tree the filter lets through.
    fn filter_allows_dir(&self, path: &str) -> bool {
        if path.is_empty() {
            return true;
        }
        let mut prefix = String::new();
        for part in path.split('/') {
            prefix = join(&prefix, part);
            if !self.filter.included(&prefix, true) {
                return false;
            }
        }
        true
    }
}

fn progress_loop(run: &Run<'_>, stop: &AtomicBool, started: Instant, cp: &state::Checkpoint) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(run.opts.progress_interval.max(1))
    };
    let mut last_print = Instant::now();
    let mut last_bytes = 0u64;
    let mut drawn = false;
    let mut last_flush = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if last_flush.elapsed() >= Duration::from_secs(1) {
            cp.flush();
            last_flush = Instant::now();
        }
        if last_print.elapsed() < every {
            continue;
        }
        let s = &run.stats;
        let bytes = s.copied_bytes.load(Ordering::Relaxed);
        let rate = (bytes - last_bytes.min(bytes)) as f64 / last_print.elapsed().as_secs_f64();
        last_bytes = bytes;
        last_print = Instant::now();
        if run.opts.quiet {
            continue;
        }
        let pending = s.pending_bytes.load(Ordering::Relaxed);
        let eta = if rate > 0.0 {
            let secs = pending as f64 / rate;
            format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
        } else {
            "-".into()
        };
        let line = format!(
            "sync: {} copied ({}), {} skipped, {} deleted, {} failed | {}/s | {} dirs, {} queued ({}) | ETA {eta} | {:.0} s",
            s.copied.load(Ordering::Relaxed),
            human(bytes),
            s.skipped.load(Ordering::Relaxed),
            s.deleted.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            human(rate as u64),
            s.dirs.load(Ordering::Relaxed),
            run.outstanding.load(Ordering::Relaxed),
            human(pending),
            started.elapsed().as_secs_f64(),
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
            drawn = true;
        } else {
            eprintln!("{line}");
        }
    }
    if drawn {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_specs() {
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_rate("512k").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10 << 20);
        assert!(parse_rate("fast").is_err());
        assert_eq!(
            Spec::parse("/a/b", None, "src").unwrap(),
            Spec::Local("/a/b".into())
        );
        assert_eq!(
            Spec::parse("file:///a", None, "src").unwrap(),
            Spec::Local("/a".into())
        );
        assert_eq!(
            Spec::parse("sqlite:///m.db", Some("/x"), "src").unwrap(),
            Spec::Volume {
                url: "sqlite:///m.db".into(),
                path: "/x".into()
            }
        );
        assert_eq!(
            Spec::parse("s3://b/p", None, "dst").unwrap(),
            Spec::S3("s3://b/p".into())
        );
        assert!(Spec::parse("s3://b", Some("/x"), "dst").is_err());
        assert!(Spec::parse("file://rel", None, "dst").is_err());
        assert!(Spec::parse("gs://b", None, "dst").is_err());
        assert_eq!("auto".parse::<Since>().unwrap(), Since::Auto);
        assert_eq!(
            "abc.1".parse::<Since>().unwrap(),
            Since::Token("abc.1".into())
        );
    }

    #[test]
    fn throttle_spreads_bytes_over_time() {
        let t = Throttle::new(4 << 20);
        let start = Instant::now();
        for _ in 0..8 {
            t.take(1 << 20);
        }
        // 8 MiB at 4 MiB/s, a quarter second of burst at most.
        assert!(
            start.elapsed() >= Duration::from_millis(1700),
            "{:?}",
            start.elapsed()
        );
    }
}
