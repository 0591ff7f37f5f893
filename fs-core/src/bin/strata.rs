//! `strata`: the command-line client. Parses arguments and calls the library; the logic lives
//! in `strata::volume`, `strata::mount`, `strata::gateway` and friends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use strata::gateway::{Credentials, GatewayOptions, GatewaySettings};
use strata::meta::{Meta, MetaSettings, open_engine, redact_url};
use strata::metrics::Metrics;
use strata::mount::{self, MountOptions};
use strata::object::StorageConfig;
use strata::volume::{self, FormatOptions};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a POSIX file system on object storage"
)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace or a tracing filter).
    #[arg(long, global = true, default_value = "info", env = "STRATA_LOG")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a volume: metadata at META_URL, data in an object store.
    Format(FormatArgs),
    /// Mount a volume with FUSE.
    Mount(Box<MountArgs>),
    /// Serve a volume (or one of its directories) as an S3 bucket named after the volume.
    Gateway(Box<GatewayArgs>),
    /// Unmount a mounted volume.
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if busy (lazy unmount).
        #[arg(short, long)]
        force: bool,
    },
    /// Show a volume's settings, usage and client sessions.
    Status { meta_url: String },
    /// Change settings of a formatted volume. Capacity and inode limits, the mirror and the
    /// switch of primary store bind running mounts within seconds; new object-store keys are
    /// used from the next mount.
    Config {
        meta_url: String,
        /// New capacity limit in GiB (0 = unlimited).
        #[arg(long)]
        capacity: Option<u64>,
        /// New inode limit (0 = unlimited).
        #[arg(long)]
        inodes: Option<u64>,
        #[arg(long)]
        access_key: Option<String>,
        #[arg(long)]
        secret_key: Option<String>,
        /// Days deleted files stay in the trash (0 = no trash; what is in it is emptied).
        #[arg(long)]
        trash_days: Option<u32>,
        #[command(flatten)]
        mirror: MirrorArgs,
    },
    /// List the trash of a volume, or put files from it back where they were deleted.
    Restore {
        meta_url: String,
        /// Names to restore (`*` and `?` match any characters / one character); with none,
        /// list the trash.
        patterns: Vec<String>,
        /// Restore everything in the trash.
        #[arg(long, conflicts_with = "patterns")]
        all: bool,
    },
    /// Remove a directory tree of a volume on the metadata side (fast: no kernel round trip
    /// per entry; files go to the trash when the volume keeps one).
    Rmr {
        meta_url: String,
        /// Path inside the volume, e.g. /scratch/run-17.
        path: String,
    },
    /// Delete a volume for good: every object in its bucket (and mirror) and its metadata.
    Destroy {
        meta_url: String,
        /// The volume's UUID (from `strata status`), as a confirmation.
        uuid: String,
        /// Even though clients are connected.
        #[arg(long)]
        force: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Bring the mirror of a volume up to date now (mounts do it in the background), with
    /// progress; ends when the copy is done and the backlog empty.
    Mirror {
        meta_url: String,
        /// Parallel copies.
        #[arg(long, default_value_t = 16)]
        threads: usize,
    },
    /// Fill the cache of a mount (and of its cache group) with files or whole trees.
    Warmup {
        /// Files or directories inside a Strata mount.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Parallel fetches.
        #[arg(short, long, default_value_t = 8)]
        threads: usize,
        /// No progress line, only the summary.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show how a file inside a mount is stored (inode, chunks, slices, objects).
    Info { path: PathBuf },
    /// Directory quotas: limit the bytes and inodes of a directory tree (EDQUOT beyond).
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// Check the metadata of a volume (entries, link counts, orphans, usage counters).
    Fsck {
        meta_url: String,
        /// Fix what is safe to fix. Run it on a volume no client is changing: the scan is
        /// not one snapshot.
        #[arg(long)]
        repair: bool,
    },
    /// Attach a bucket or prefix that other systems write (or a directory) to a new
    /// directory of the volume: its objects become read-only files there, read through
    /// the caches without copying. Also: --sync (list it again now), --list.
    Attach(Box<AttachArgs>),
    /// Write the whole metadata of a volume as JSON lines (a consistent snapshot, taken while
    /// mounts keep working), to move it to another metadata engine with `strata load`.
    Dump {
        meta_url: String,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Load a `strata dump` into an empty metadata URL (SQLite file or PostgreSQL database);
    /// then mount the volume from there (the objects stay where they are).
    ///
    /// With --from and --since: apply to META_URL (a copy loaded from a dump of --from) what
    /// changed in --from since the token `strata dump` printed, without a full copy (run it
    /// while clients write, then once more with writers stopped: docs/MIGRATION.md).
    Load {
        meta_url: String,
        /// Read from this file instead of standard input.
        #[arg(conflicts_with = "from")]
        input: Option<PathBuf>,
        /// The metadata URL the copy was dumped from (catch-up mode).
        #[arg(long, requires = "since")]
        from: Option<String>,
        /// Change token from `strata dump` or from the previous catch-up.
        #[arg(long, requires = "from")]
        since: Option<String>,
    },
    /// Find block objects no metadata refers to (left by clients killed before they
    /// committed) and, with --delete, delete them. A dry run first is the default.
    Gc {
        meta_url: String,
        /// Delete the orphans found (default: only count and list them).
        #[arg(long)]
        delete: bool,
        /// Leave objects younger than this alone (writers commit theirs within seconds):
        /// e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        min_age: String,
        /// Parallel deletes.
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
    /// Copy a tree between local directories, S3 buckets/prefixes and directories of
    /// Strata volumes: full or incremental, resumable after a kill (docs/SYNC.md).
    Sync(Box<SyncArgs>),
    /// What a mount is doing, one line per interval: FUSE operations and latency, bytes read
    /// and written, object GETs/PUTs, their latency and bytes, the share of block reads served
    /// by the memory and disk caches and peer hits, buffer and cache use, metadata
    /// transactions, latency and retries.
    Stats {
        /// The mount point, or any path inside the mount.
        path: PathBuf,
        /// Seconds between lines.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many lines (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Under each line, the rate and mean latency of the busiest FUSE operations by kind.
        #[arg(long)]
        by_op: bool,
    },
    /// Who does what on a mount, from its access log (`.accesslog`): operations, busiest
    /// paths, uids and pids, and the slowest operations of each interval. Given a saved log
    /// (`cat MOUNT/.accesslog > FILE`), the totals of that log, once.
    Profile(ProfileArgs),
    /// Remove the directory of an attached source (the source's objects are not touched).
    Detach {
        meta_url: String,
        /// The directory the source is attached to.
        #[arg(long)]
        path: String,
    },
}

#[derive(Args)]
struct AttachArgs {
    meta_url: String,
    /// New directory of the volume for the source, e.g. /datasets/web (its parent must
    /// exist); with --sync, the attached directory.
    #[arg(long, required_unless_present = "list")]
    path: Option<String>,
    /// s3://BUCKET[/PREFIX] (with --endpoint for an S3-compatible service) or
    /// file:///DIRECTORY.
    #[arg(long, required_unless_present_any = ["sync", "list"])]
    source: Option<String>,
    /// S3 endpoint URL, e.g. http://127.0.0.1:8333 (default: AWS in --region).
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// Access key of the source (stored in the volume's metadata).
    #[arg(long, env = "STRATA_SOURCE_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    /// Secret key of the source (stored in the volume's metadata, never printed).
    #[arg(long, env = "STRATA_SOURCE_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Virtual-host style addressing (http://BUCKET.host) instead of path style.
    #[arg(long)]
    virtual_host: bool,
    /// How old a directory's listing may get before an access lists it again (e.g. 30s,
    /// 10m, 1h; 0 = only on first access and with --sync).
    #[arg(long, default_value = "10m")]
    refresh: String,
    /// Read-only (the only mode: files of a source cannot be written, EROFS).
    #[arg(long)]
    read_only: bool,
    /// List the directories imported so far again now and import what changed.
    #[arg(long, conflicts_with_all = ["source", "list"])]
    sync: bool,
    /// Show the attachments of the volume.
    #[arg(long, conflicts_with_all = ["source", "sync"])]
    list: bool,
}

/// Whole seconds of the duration `s` given with `flag`.
fn parse_secs(flag: &str, s: &str) -> Result<u64> {
    strata::duration::parse(s)
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{flag} {s:?} is not a duration: give seconds or a number with ms, s, m, h or d, e.g. 10m"
            )
        })
}

fn attach_cmd(a: AttachArgs) -> Result<()> {
    use strata::source::{self, Attachment};
    let meta = Meta::new(
        open_engine(&a.meta_url)?,
        Arc::new(Metrics::new()),
        MetaSettings::default(),
    );
    meta.load()?;
    if a.list {
        for x in meta.attachments()? {
            println!(
                "{}: {} -> {}{} (refresh {} s)",
                x.id,
                x.path,
                x.source,
                x.endpoint
                    .as_deref()
                    .map(|e| format!(" at {e}"))
                    .unwrap_or_default(),
                x.refresh_secs
            );
        }
        return Ok(());
    }
    let path = a.path.clone().unwrap_or_default();
    if a.sync {
        let att = source::find_attachment(&meta, &path)?;
        let src = att.open()?;
        let t0 = std::time::Instant::now();
        let r = source::sync(&meta, &att, src.as_ref())?;
        println!(
            "{path}: {} directories listed, {} changed: {} added, {} updated, {} removed in {:.1} s",
            r.listed,
            r.changed,
            r.added,
            r.updated,
            r.removed,
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let att = Attachment {
        id: 0,
        ino: 0,
        path: path.clone(),
        source: a.source.clone().unwrap_or_default(),
        endpoint: a.endpoint.clone(),
        region: a.region.clone(),
        access_key: a.access_key.clone(),
        secret_key: a.secret_key.clone(),
        path_style: !a.virtual_host,
        refresh_secs: parse_secs("--refresh", &a.refresh)?,
        read_only: true,
    };
    let att = source::attach_at(&meta, &path, att)?;
    println!(
        "attached {} at {} (attachment {}, read-only, listings imported on first access, refresh {} s)",
        att.source, att.path, att.id, att.refresh_secs
    );
    Ok(())
}

#[derive(Subcommand)]
enum QuotaCmd {
    /// Set or change the quota of a directory (its current usage is counted).
    Set {
        meta_url: String,
        /// Directory inside the volume, e.g. /tenants/a.
        #[arg(long)]
        path: String,
        /// Capacity: a number of GiB, or with a unit: 100M, 1.5G, 2T (0 = no limit; left
        /// out: unchanged, or unlimited for a new quota).
        #[arg(long)]
        capacity: Option<String>,
        /// Inode limit (0 = no limit; left out: unchanged, or unlimited for a new quota).
        #[arg(long)]
        inodes: Option<u64>,
    },
    /// Show the quota of a directory.
    Get {
        meta_url: String,
        #[arg(long)]
        path: String,
    },
    /// List every quota of the volume.
    List { meta_url: String },
    /// Remove the quota of a directory.
    Delete {
        meta_url: String,
        #[arg(long)]
        path: String,
    },
    /// Recount the usage of a quota from its tree; --repair stores the recount.
    Check {
        meta_url: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        repair: bool,
    },
}

/// "100M", "1.5G", "2T", "512K" or a bare number of GiB, in bytes. Units are binary; the
/// Kubernetes spellings "64Mi", "2Gi" and "100MiB" / "100MB" mean the same.
fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || {
        anyhow::anyhow!("--capacity {s}: use a number of GiB or a size like 100M, 64Mi, 1.5G, 2T")
    };
    let unit = s.strip_suffix(['B', 'b']).unwrap_or(s);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let (num, mul) = match unit.chars().last() {
        Some('K' | 'k') => (&unit[..unit.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&unit[..unit.len() - 1], 1 << 20),
        Some('G' | 'g') => (&unit[..unit.len() - 1], 1 << 30),
        Some('T' | 't') => (&unit[..unit.len() - 1], 1 << 40),
        _ if unit.len() == s.len() => (s, 1 << 30),
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * mul as f64 >= (1u64 << 62) as f64 {
        bail!("--capacity {s}: use a size from 0 to 4 EiB");
    }
    Ok((v * mul as f64) as u64)
}

fn quota_cmd(cmd: QuotaCmd) -> Result<()> {
    let open = |url: &str| -> Result<Meta> {
        let meta = Meta::new(
            open_engine(url)?,
            Arc::new(Metrics::new()),
            MetaSettings::default(),
        );
        meta.load()?;
        Ok(meta)
    };
    let show = |path: &str, q: &strata::meta::Quota| {
        let lim = |v: u64| {
            if v == 0 {
                "unlimited".to_string()
            } else {
                v.to_string()
            }
        };
        println!(
            "{path}: space {} / {} bytes, inodes {} / {}",
            q.used_space,
            lim(q.max_space),
            q.used_inodes,
            lim(q.max_inodes)
        );
    };
    match cmd {
        QuotaCmd::Set {
            meta_url,
            path,
            capacity,
            inodes,
        } => {
            let meta = open(&meta_url)?;
            let dir = volume::resolve_dir(&meta, &path)?;
            let cur = meta.get_quota(dir)?;
            let space = match capacity {
                Some(c) => parse_size(&c)?,
                None => cur.map(|q| q.max_space).unwrap_or(0),
            };
            let inodes = inodes.or(cur.map(|q| q.max_inodes)).unwrap_or(0);
            let q = meta.set_quota(dir, space, inodes)?;
            show(&path, &q);
        }
        QuotaCmd::Get { meta_url, path } => {
            let meta = open(&meta_url)?;
            let dir = volume::resolve_dir(&meta, &path)?;
            match meta.get_quota(dir)? {
                Some(q) => show(&path, &q),
                None => bail!("{path} has no quota (set one with `strata quota set`)"),
            }
        }
        QuotaCmd::List { meta_url } => {
            let meta = open(&meta_url)?;
            for q in meta.list_quotas()? {
                show(&format!("inode {}", q.ino), &q);
            }
        }
        QuotaCmd::Delete { meta_url, path } => {
            let meta = open(&meta_url)?;
            let dir = volume::resolve_dir(&meta, &path)?;
            if meta.get_quota(dir)?.is_none() {
                bail!("{path} has no quota");
            }
            meta.delete_quota(dir)?;
            println!("{path}: quota removed");
        }
        QuotaCmd::Check {
            meta_url,
            path,
            repair,
        } => {
            let meta = open(&meta_url)?;
            let dir = volume::resolve_dir(&meta, &path)?;
            let (stored, actual) = meta.check_quota(dir, repair)?;
            show(&format!("{path} (stored)"), &stored);
            show(&format!("{path} (recounted)"), &actual);
            if stored != actual && !repair {
                bail!(
                    "usage of {path} is off: run `strata quota check --repair` to store the recount"
                );
            }
        }
    }
    Ok(())
}

#[derive(Args)]
struct FormatArgs {
    /// Object storage kind: file (a local directory) or s3 (S3 and S3-compatible stores).
    #[arg(long, default_value = "file")]
    storage: String,
    /// file: a directory (default ~/.strata/local); s3: a URL like http://127.0.0.1:8333/bucket
    /// (path style) or https://bucket.s3.example.com (virtual-host style).
    #[arg(long)]
    bucket: Option<String>,
    #[arg(long, env = "STRATA_ACCESS_KEY")]
    access_key: Option<String>,
    #[arg(long, env = "STRATA_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Signing region for s3 (default us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Block size in KiB (power of two, 64..16384).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Capacity limit in GiB (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    capacity: u64,
    /// Inode limit (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    inodes: u64,
    /// Keep deleted files this many days in the trash, restorable with `strata restore`
    /// (0 = no trash).
    #[arg(long, default_value_t = 0)]
    trash_days: u32,
    /// Metadata URL: sqlite:///path/meta.db or postgres://user:password@host:5432/db
    meta_url: String,
    /// Volume name: 3-63 characters of a-z, 0-9 and '-'.
    name: String,
}

#[derive(Args)]
struct MountArgs {
    /// Run in the background; returns once the mount is ready.
    #[arg(short = 'd', long = "background")]
    background: bool,
    /// Log file in background mode (default /var/log/strata.log as root, else ~/.strata/strata.log).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9567).
    #[arg(long)]
    metrics: Option<String>,
    /// Mount only this directory of the volume.
    #[arg(long)]
    subdir: Option<String>,
    #[arg(long)]
    read_only: bool,
    /// Mount even if the mount point is not empty.
    #[arg(long)]
    nonempty: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// MiB the kernel reads ahead of a sequential reader of the mount (its read_ahead_kb,
    /// set when running as root; 0 keeps the kernel's 128 KiB).
    #[arg(long, default_value_t = 4)]
    kernel_readahead: u64,
    #[command(flatten)]
    client: ClientArgs,
    /// Serve a FUSE connection mounted by a keeper (the CSI node plugin) and handed over on
    /// this unix socket, instead of mounting; the mount then survives this process.
    #[arg(long, value_name = "PATH")]
    fuse_fd_socket: Option<PathBuf>,
    /// With --fuse-fd-socket: run the client as a child of this process and start it again
    /// at once whenever it exits (after 0.2 s, doubling up to 2 s; back to 0.2 s after a run
    /// of 10 s), so that a crash costs well under a second instead of kubelet's crash
    /// back-off; SIGTERM, SIGINT and SIGHUP are passed on and end it. After 10 exits in a
    /// row within 10 s of their start it exits with the client's status.
    #[arg(long, requires = "fuse_fd_socket")]
    supervise: bool,
    /// Object-store access key replacing the one stored in the volume.
    #[arg(long, env = "STRATA_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    /// Object-store secret key replacing the one stored in the volume.
    #[arg(long, env = "STRATA_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Metadata URL of a formatted volume.
    meta_url: String,
    mountpoint: PathBuf,
}

/// `strata config` options of the mirror (docs/MIGRATION.md).
#[derive(Args)]
struct MirrorArgs {
    /// Mirror every new object to this store too, and copy the existing ones in the
    /// background: `file:///dir`, an S3 URL like `http://host:8333/bucket` (as for `format
    /// --bucket`), or `none` to detach the mirror.
    #[arg(long)]
    mirror: Option<String>,
    #[arg(long, env = "STRATA_MIRROR_ACCESS_KEY", hide_env_values = true)]
    mirror_access_key: Option<String>,
    #[arg(long, env = "STRATA_MIRROR_SECRET_KEY", hide_env_values = true)]
    mirror_secret_key: Option<String>,
    #[arg(long)]
    mirror_region: Option<String>,
    /// Make the mirror the primary store (the primary becomes the mirror). Refused until the
    /// mirror is up to date and its backlog is empty.
    #[arg(long, conflicts_with = "mirror")]
    switch_primary: bool,
    /// With `--mirror none`: detach even though the backlog is not empty.
    #[arg(long)]
    force: bool,
}

impl MirrorArgs {
    fn storage(&self) -> Result<Option<Option<strata::object::StorageConfig>>> {
        let Some(url) = &self.mirror else {
            return Ok(None);
        };
        if url == "none" {
            return Ok(Some(None));
        }
        let (storage, bucket) = if let Some(p) = url.strip_prefix("file://") {
            ("file", p.to_string())
        } else if url.starts_with("http://") || url.starts_with("https://") {
            ("s3", url.clone())
        } else {
            bail!(
                "--mirror {url}: use file:///absolute/dir, an S3 URL like http://127.0.0.1:8333/bucket, or none"
            );
        };
        Ok(Some(Some(strata::object::StorageConfig {
            storage: storage.into(),
            bucket,
            access_key: self.mirror_access_key.clone(),
            secret_key: self.mirror_secret_key.clone(),
            region: self.mirror_region.clone(),
        })))
    }
}

#[derive(Args)]
struct GatewayArgs {
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9567).
    #[arg(long)]
    metrics: Option<String>,
    /// Serve only this directory of the volume: keys are paths below it.
    #[arg(long)]
    subdir: Option<String>,
    /// Refuse every write (403 AccessDenied).
    #[arg(long)]
    read_only: bool,
    /// Access key id that clients sign requests with (prefer the environment variable: the
    /// command line is visible to other users).
    #[arg(long, env = "STRATA_GATEWAY_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    /// Secret key that clients sign requests with.
    #[arg(long, env = "STRATA_GATEWAY_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
    /// Metadata URL of a formatted volume (`-`: from STRATA_META_URL).
    meta_url: String,
    /// Where to listen, HOST:PORT (port 0: a free port; the address is printed at start).
    address: String,
}

/// Options of a client of a volume, the same for `strata mount` and `strata gateway`:
/// buffers, caches (and the cache group), metadata cache times, background work, session.
#[derive(Args)]
struct ClientArgs {
    /// On a mirrored volume, read from this store first: primary or mirror (the closer one).
    #[arg(long, default_value = "primary")]
    prefer_store: strata::object::PreferStore,
    /// Write buffer in MiB.
    #[arg(long, default_value_t = 300)]
    buffer_size: u64,
    /// In-memory block cache in MiB: blocks read ahead wait here until read (sequential
    /// readers share half of it), and blocks read again are served from it.
    #[arg(long, default_value_t = 64)]
    mem_cache_size: u64,
    /// Most MiB read ahead of one sequential reader (readers of blocks cached in memory
    /// also share the memory cache: see --mem-cache-size).
    #[arg(long, default_value_t = 64)]
    max_readahead: u64,
    /// Kernel attribute cache timeout in seconds.
    #[arg(long, default_value_t = 1.0)]
    attr_cache: f64,
    /// Kernel entry cache timeout in seconds (names of files).
    #[arg(long, default_value_t = 1.0)]
    entry_cache: f64,
    /// Kernel entry cache timeout in seconds for names of directories.
    #[arg(long, default_value_t = 1.0)]
    dir_entry_cache: f64,
    /// Seconds the chunk maps of a file (where its data is) are trusted without asking the
    /// metadata engine (default: --attr-cache). Longer suits read-mostly data sets and models.
    #[arg(long)]
    open_cache: Option<f64>,
    /// Parallel uploads.
    #[arg(long, default_value_t = 16)]
    max_uploads: usize,
    /// Seconds an unreferenced object is kept before deletion.
    #[arg(long, default_value_t = 60)]
    gc_grace: i64,
    /// Do not run background cleaning (compaction, deletion) in this client.
    #[arg(long)]
    no_bgjob: bool,
    /// Seconds after which other clients consider this one dead if it stops heartbeating
    /// (its locks are then released and its open-but-deleted files reclaimed).
    #[arg(long, default_value_t = 60)]
    session_timeout: i64,
    /// Constant labels on every metric besides `volume`, NAME=VALUE separated by commas
    /// (e.g. pod=…,namespace=…,node=…: the CSI driver and the operator set these).
    #[arg(long, env = "STRATA_METRICS_LABELS", default_value = "")]
    metrics_labels: String,
    #[command(flatten)]
    cache: CacheArgs,
}

impl ClientArgs {
    /// Apply to the options of a mount (or of a gateway, which opens the volume the same way).
    fn apply(&self, opts: &mut MountOptions) -> Result<()> {
        opts.prefer_store = self.prefer_store;
        opts.vfs.buffer_size = self.buffer_size << 20;
        opts.vfs.mem_cache_size = self.mem_cache_size << 20;
        opts.vfs.max_readahead = self.max_readahead << 20;
        opts.vfs.attr_timeout = self.attr_cache;
        opts.vfs.entry_timeout = self.entry_cache;
        opts.vfs.dir_entry_timeout = self.dir_entry_cache;
        opts.vfs.open_cache_timeout = self.open_cache;
        opts.vfs.upload_threads = self.max_uploads;
        opts.vfs.background_gc = !self.no_bgjob;
        opts.meta.gc_grace_secs = self.gc_grace;
        opts.meta.session_timeout_secs = self.session_timeout;
        opts.vfs.cache = self.cache.settings()?;
        opts.metrics_labels = strata::metrics::parse_labels(&self.metrics_labels)
            .map_err(|e| anyhow::anyhow!("--metrics-labels: {e}"))?;
        Ok(())
    }
}

/// Block cache and cache group options of `strata mount` and `strata gateway`.
#[derive(Args)]
struct CacheArgs {
    /// Disk cache directories, separated by ':' (default /var/cache/strata as root, else
    /// ~/.cache/strata).
    #[arg(long, env = "STRATA_CACHE_DIR")]
    cache_dir: Option<String>,
    /// Disk cache size in MiB (0 disables the disk cache).
    #[arg(long, default_value_t = 102_400)]
    cache_size: u64,
    /// Keep at least this share of the cache directory's file system free (0-0.99).
    #[arg(long, default_value_t = 0.1)]
    free_space_ratio: f64,
    /// Do not put blocks written by this mount into the disk cache.
    #[arg(long)]
    no_cache_written: bool,
    /// Write-back: close and fsync return once written blocks are on the local disk cache;
    /// they are uploaded in the background (other clients cannot read them until then; see
    /// docs/SEMANTICS.md). Needs the disk cache.
    #[arg(long)]
    writeback: bool,
    /// With --writeback: how long a written block waits on the local disk before its upload
    /// (e.g. 30s, 5m, 1h; default 0). Blocks deleted or overwritten meanwhile are never
    /// uploaded; other clients wait that much longer to read new data. Unmount uploads at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_upload_delay)]
    upload_delay: Option<std::time::Duration>,
    /// On random reads, fetch only the bytes asked for (uncached) instead of whole blocks.
    #[arg(long)]
    random_read_ranges: bool,
    /// Join the distributed cache group NAME (mounts with the same NAME share their caches).
    #[arg(long)]
    cache_group: Option<String>,
    /// Where this member serves its peers, HOST:PORT (default: an ephemeral port on the
    /// node's address; STRATA_NODE_IP or POD_IP set the address).
    #[arg(long)]
    cache_group_addr: Option<String>,
    /// Join the cache group as a pure client: read from peers, serve nothing.
    #[arg(long)]
    no_serve: bool,
    /// Milliseconds before a silent cache group peer is skipped (the read then goes to the
    /// object store).
    #[arg(long, default_value_t = 2000)]
    peer_timeout: u64,
    /// Members that serve a hot block (spreads thousands of readers of one file).
    #[arg(long, default_value_t = 3)]
    hot_replicas: usize,
    /// Members asked for a cached copy of a block before the object store when this member
    /// is to fetch it (after members join, leave or restart, blocks move between members
    /// instead of being fetched again); 0 disables.
    #[arg(long, default_value_t = 3)]
    cache_group_handoff: usize,
}

impl CacheArgs {
    fn settings(&self) -> Result<strata::cache::CacheSettings> {
        let dirs: Vec<PathBuf> = match &self.cache_dir {
            Some(d) => d
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => vec![default_cache_dir()],
        };
        if !(0.0..1.0).contains(&self.free_space_ratio) {
            bail!(
                "--free-space-ratio {} is out of range: give a share between 0 and 0.99",
                self.free_space_ratio
            );
        }
        if self.writeback && self.cache_size == 0 {
            bail!(
                "--writeback stages written blocks in the disk cache, which --cache-size 0 disables: give --cache-size (MiB) and --cache-dir, or drop --writeback"
            );
        }
        if self.upload_delay.is_some() && !self.writeback {
            bail!(
                "--upload-delay delays the uploads of write-back, which is off: add --writeback (and a disk cache), or drop --upload-delay"
            );
        }
        if self.cache_group.is_none() && (self.no_serve || self.cache_group_addr.is_some()) {
            bail!("--no-serve and --cache-group-addr need --cache-group NAME");
        }
        Ok(strata::cache::CacheSettings {
            dirs,
            disk_size: self.cache_size << 20,
            free_space_ratio: self.free_space_ratio,
            cache_written: !self.no_cache_written,
            writeback: self.writeback,
            upload_delay_ms: self.upload_delay.map_or(0, |d| d.as_millis() as u64),
            random_whole_blocks: !self.random_read_ranges,
            group: self.cache_group.clone(),
            group_addr: self.cache_group_addr.clone(),
            no_serve: self.no_serve,
            peer_timeout_ms: self.peer_timeout,
            hot_replicas: self.hot_replicas,
            handoff_probes: self.cache_group_handoff,
            ..Default::default()
        })
    }
}

/// `--upload-delay`: `0`, seconds (`90`), or a number with `ms`, `s`, `m` or `h`; at most a day.
fn parse_upload_delay(s: &str) -> std::result::Result<std::time::Duration, String> {
    strata::duration::parse(s)
        .filter(|d| d.as_secs_f64() <= 86_400.0)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a duration: give e.g. 0, 90 (seconds), 30s, 5m or 1h, at most 24h"
            )
        })
}

fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/cache/strata")
    } else {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".cache/strata")
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    strata::mount::tune_allocator();
    let cli = Cli::parse();
    strata::tls::install_crypto_provider();
    init_logging(&cli.log_level);
    if let Err(e) = run(cli) {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Format(a) => format(a),
        Cmd::Mount(a) => mount_cmd(*a, &cli.log_level),
        Cmd::Gateway(a) => gateway_cmd(*a),
        Cmd::Warmup {
            paths,
            threads,
            quiet,
        } => {
            let s = strata::cache::warmup::run(&paths, threads, !quiet)?;
            println!("{}", s.summary());
            if let Some(w) = s.warning() {
                eprintln!("{w}");
            }
            Ok(())
        }
        Cmd::Umount { mountpoint, force } => {
            mount::unmount(&mountpoint, force)?;
            Ok(())
        }
        Cmd::Status { meta_url } => status(&meta_url),
        Cmd::Mirror { meta_url, threads } => mirror_cmd(&meta_url, threads),
        Cmd::Restore {
            meta_url,
            patterns,
            all,
        } => restore_cmd(&meta_url, &patterns, all),
        Cmd::Rmr { meta_url, path } => rmr_cmd(&meta_url, &path),
        Cmd::Destroy {
            meta_url,
            uuid,
            force,
            yes,
        } => destroy_cmd(&meta_url, &uuid, force, yes),
        Cmd::Config {
            meta_url,
            capacity,
            inodes,
            access_key,
            secret_key,
            trash_days,
            mirror,
        } => {
            let meta = Meta::new(
                open_engine(&meta_url)?,
                Arc::new(Metrics::new()),
                MetaSettings::default(),
            );
            meta.load()?;
            use strata::object::mirror::{set_mirror, store_url, switch_primary};
            if let Some(m) = mirror.storage()? {
                let fmt = set_mirror(&meta, m, mirror.force)?;
                match &fmt.mirror {
                    Some(m) => println!(
                        "volume {}: new objects go to {} and to the mirror {}; mounts copy the existing ones in the background (`strata status` shows progress, `strata mirror` copies now)",
                        fmt.name,
                        store_url(&fmt.storage),
                        store_url(m)
                    ),
                    None => println!(
                        "volume {}: no mirror; objects go to {} only",
                        fmt.name,
                        store_url(&fmt.storage)
                    ),
                }
            }
            if mirror.switch_primary {
                let fmt = switch_primary(&meta)?;
                println!(
                    "volume {}: primary store is now {}; {} stays a mirror (new objects still go to both) until `strata config {} --mirror none`",
                    fmt.name,
                    store_url(&fmt.storage),
                    fmt.mirror.as_ref().map(store_url).unwrap_or_default(),
                    strata::meta::redact_url(&meta_url)
                );
            }
            let fmt = meta.update_format(|f| {
                if let Some(c) = capacity {
                    f.capacity = c << 30;
                }
                if let Some(i) = inodes {
                    f.inodes = i;
                }
                if access_key.is_some() {
                    f.storage.access_key = access_key.clone();
                }
                if secret_key.is_some() {
                    f.storage.secret_key = secret_key.clone();
                }
                if let Some(d) = trash_days {
                    f.trash_days = d;
                }
            })?;
            println!(
                "volume {}: capacity {} GiB, inodes {} (0 = unlimited)",
                fmt.name,
                fmt.capacity >> 30,
                fmt.inodes
            );
            Ok(())
        }
        Cmd::Info { path } => info(&path),
        Cmd::Quota { cmd } => quota_cmd(cmd),
        Cmd::Attach(a) => attach_cmd(*a),
        Cmd::Stats {
            path,
            interval,
            count,
            by_op,
        } => stats_cmd(&path, interval, count, by_op),
        Cmd::Profile(a) => profile_cmd(a),
        Cmd::Sync(a) => sync_cmd(*a),
        Cmd::Gc {
            meta_url,
            delete,
            min_age,
            threads,
        } => {
            let min_age = std::time::Duration::from_secs(parse_secs("--min-age", &min_age)?);
            let vol = strata::volume::open(
                &meta_url,
                Arc::new(Metrics::new()),
                MetaSettings::default(),
                strata::object::RetrySettings::default(),
                true,
            )?;
            let settings = strata::gc::GcSettings {
                delete,
                min_age,
                threads,
            };
            let t0 = std::time::Instant::now();
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut progress = |what: &str, n: u64| {
                if tty {
                    eprint!("\rgc: {what} {n} objects   ");
                }
            };
            let r = strata::gc::gc(
                &vol.meta,
                vol.store.as_ref(),
                &vol.format.name,
                &settings,
                &mut progress,
            )?;
            if tty {
                eprintln!();
            }
            for k in &r.sample {
                println!("orphan: {k}");
            }
            println!(
                "gc of volume {}: {} block objects listed, {} referenced, {} queued for deletion, {} younger than --min-age, {} orphans ({} bytes){}; {} other objects left alone; {:.1} s",
                vol.format.name,
                r.listed,
                r.referenced,
                r.queued,
                r.young,
                r.orphans,
                r.orphan_bytes,
                if delete {
                    format!(", {} deleted", r.deleted)
                } else if r.orphans > 0 {
                    " — run again with --delete to delete them".to_string()
                } else {
                    String::new()
                },
                r.foreign,
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Dump { meta_url, output } => {
            // The change token before the snapshot: a catch-up from it re-applies what the
            // snapshot has already (harmless) and never misses what came after.
            let token = open_meta(&meta_url)?.change_token()?;
            let engine = open_engine(&meta_url)?;
            let t0 = std::time::Instant::now();
            let mut progress = |s: &strata::meta::dump::DumpStats| {
                eprintln!("dump: {} records ({} inodes) so far", s.records, s.nodes)
            };
            let stats = match &output {
                Some(p) => {
                    let f = std::fs::File::create(p)
                        .with_context(|| format!("--output {}", p.display()))?;
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                    let s = strata::meta::dump::dump(engine.as_ref(), &mut w, &mut progress)?;
                    w.into_inner()
                        .map_err(|e| anyhow::anyhow!("--output {}: {e}", p.display()))?
                        .sync_all()?;
                    s
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
                    strata::meta::dump::dump(engine.as_ref(), &mut w, &mut progress)?
                }
            };
            eprintln!("dumped {stats} in {:.1} s", t0.elapsed().as_secs_f64());
            eprintln!(
                "change token: {token} (after `strata load NEW`, bring NEW up to date with `strata load NEW --from {} --since {token}`)",
                redact_url(&meta_url)
            );
            Ok(())
        }
        Cmd::Load {
            meta_url,
            from: Some(from),
            since: Some(since),
            ..
        } => {
            let (src, dst) = (open_meta(&from)?, open_meta(&meta_url)?);
            if src.load()?.uuid != dst.load()?.uuid {
                bail!(
                    "{} is not a copy of {} (their volume UUIDs differ): load a dump of it first",
                    redact_url(&meta_url),
                    redact_url(&from)
                );
            }
            let t0 = std::time::Instant::now();
            let r = strata::meta::dump::catch_up(&src, &dst, &since)?;
            println!(
                "caught up in {:.2} s: {} changed directories, {} inodes written, {} removed; next token: {}",
                t0.elapsed().as_secs_f64(),
                r.dirs,
                r.written,
                r.removed,
                r.next
            );
            Ok(())
        }
        Cmd::Load {
            meta_url, input, ..
        } => {
            let engine = open_engine(&meta_url)?;
            let t0 = std::time::Instant::now();
            let mut progress =
                |s: &strata::meta::dump::DumpStats| eprintln!("load: {} records so far", s.records);
            let stats = match &input {
                Some(p) => {
                    let f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
                    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
                    strata::meta::dump::load(engine.as_ref(), &mut r, &mut progress)?
                }
                None => {
                    let stdin = std::io::stdin();
                    let mut r = std::io::BufReader::with_capacity(1 << 20, stdin.lock());
                    strata::meta::dump::load(engine.as_ref(), &mut r, &mut progress)?
                }
            };
            eprintln!(
                "loaded {stats} in {:.1} s into {}",
                t0.elapsed().as_secs_f64(),
                redact_url(&meta_url)
            );
            Ok(())
        }
        Cmd::Detach { meta_url, path } => {
            let meta = Meta::new(
                open_engine(&meta_url)?,
                Arc::new(Metrics::new()),
                MetaSettings::default(),
            );
            meta.load()?;
            let att = strata::source::find_attachment(&meta, &path)?;
            let n = meta.detach(att.id)?;
            println!("detached {} from {path} ({n} entries removed)", att.source);
            Ok(())
        }
        Cmd::Fsck { meta_url, repair } => {
            let meta = Meta::new(
                open_engine(&meta_url)?,
                Arc::new(Metrics::new()),
                MetaSettings::default(),
            );
            let fmt = meta.load()?;
            let report = meta.fsck(repair)?;
            for p in &report.problems {
                println!("problem: {p}");
            }
            println!(
                "volume {}: {} inodes, {} entries, {} problems, {} repaired",
                fmt.name,
                report.inodes,
                report.entries,
                report.problems.len(),
                report.repaired
            );
            if !report.clean() && !repair {
                bail!(
                    "fsck found problems: run `strata fsck --repair {}` to fix them",
                    redact_url(&meta_url)
                );
            }
            Ok(())
        }
    }
}

fn format(a: FormatArgs) -> Result<()> {
    if a.storage == "file"
        && let Some(b) = a
            .bucket
            .as_deref()
            .filter(|b| b.starts_with("http://") || b.starts_with("https://"))
    {
        bail!(
            "--bucket {b} is a URL but --storage is file (the default): add --storage s3 for an S3 bucket, or give a directory"
        );
    }
    let bucket = match (&a.bucket, a.storage.as_str()) {
        (Some(b), _) => b.clone(),
        (None, "file") => {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            format!("{home}/.strata/local")
        }
        (None, kind) => bail!("--bucket is required for --storage {kind}"),
    };
    let storage = StorageConfig {
        storage: a.storage.clone(),
        bucket,
        access_key: a.access_key,
        secret_key: a.secret_key,
        region: a.region,
    };
    let opts = FormatOptions {
        name: a.name,
        storage,
        block_size_kib: a.block_size,
        capacity_gib: a.capacity,
        inodes: a.inodes,
    };
    let (mut fmt, created) = volume::format(&a.meta_url, &opts, Arc::new(Metrics::new()))?;
    if created && a.trash_days > 0 {
        let meta = Meta::new(
            open_engine(&a.meta_url)?,
            Arc::new(Metrics::new()),
            MetaSettings::default(),
        );
        fmt = meta.update_format(|f| f.trash_days = a.trash_days)?;
    }
    println!(
        "volume {} ({}) {}: metadata {}, data {} {}, block size {} KiB",
        fmt.name,
        fmt.uuid,
        if created {
            "formatted"
        } else {
            "already exists, nothing changed (its stored settings are kept; change limits with `strata config`)"
        },
        redact_url(&a.meta_url),
        fmt.storage.storage,
        fmt.storage.bucket,
        fmt.block_size >> 10
    );
    Ok(())
}

/// `strata mount --supervise …`: run this same command line without `--supervise` as a
/// child, again whenever it exits (see `strata::fusefd::supervise`).
fn supervise_mount() -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a.as_os_str() != std::ffi::OsStr::new("--supervise"))
        .collect();
    let backoff = strata::fusefd::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(2),
        Duration::from_secs(10),
    );
    let code = strata::fusefd::supervise(
        || {
            let mut c = std::process::Command::new(&exe);
            c.args(&args);
            c
        },
        backoff,
        10,
    );
    std::process::exit(code);
}

fn mount_cmd(a: MountArgs, log_level: &str) -> Result<()> {
    if a.supervise {
        return supervise_mount();
    }
    if a.background {
        return mount_background(&a, log_level);
    }
    mount::block_signals();
    let mut opts = MountOptions {
        metrics: a.metrics.clone(),
        subdir: a.subdir.clone(),
        nonempty: a.nonempty,
        threads: a.threads,
        kernel_readahead: a.kernel_readahead << 20,
        ..MountOptions::default()
    };
    a.client.apply(&mut opts)?;
    opts.vfs.read_only = a.read_only;
    opts.fuse_fd_socket = a.fuse_fd_socket.clone();
    if opts.fuse_fd_socket.is_some() {
        // The keeper mounted the connection (with allow_other: the kernel lets every user
        // in); a handed-over client running as a user other than root (a mount Pod, uid
        // 65532) must not refuse requests of other uids, root's included.
        opts.allow_other = true;
    }
    opts.access_key = a.access_key.clone();
    opts.secret_key = a.secret_key.clone();
    mount::run(&a.meta_url, &a.mountpoint, &opts)?;
    Ok(())
}

/// `strata gateway`: serve the volume over S3 until a termination signal.
fn gateway_cmd(a: GatewayArgs) -> Result<()> {
    mount::block_signals();
    let mut opts = MountOptions {
        metrics: a.metrics.clone(),
        subdir: a.subdir.clone(),
        ..MountOptions::default()
    };
    a.client.apply(&mut opts)?;
    opts.vfs.read_only = a.read_only;
    let (Some(access_key), Some(secret_key)) = (a.access_key.clone(), a.secret_key.clone()) else {
        bail!(
            "the gateway needs the key pair clients sign with: set STRATA_GATEWAY_ACCESS_KEY and STRATA_GATEWAY_SECRET_KEY (or --access-key and --secret-key)"
        );
    };
    let g = GatewayOptions {
        address: a.address.clone(),
        settings: GatewaySettings::default(),
        mount: opts,
        credentials: Credentials {
            access_key,
            secret_key,
        },
    };
    strata::gateway::run(&a.meta_url, &g)?;
    Ok(())
}

/// `mount -d`: start this program again in the foreground as a detached child, logging to a
/// file, and return once the mount is live (or report why it failed).
fn mount_background(a: &MountArgs, log_level: &str) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log = a.log.clone().unwrap_or_else(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            PathBuf::from("/var/log/strata.log")
        } else {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
            PathBuf::from(home).join(".strata/strata.log")
        }
    });
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating log directory {}", dir.display()))?;
    }
    // Fail fast on the checks a user can fix, before going to the background.
    mount::check_fuse()?;
    let mp = mount::check_mountpoint(&a.mountpoint, a.nonempty)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|s| s != "-d" && s != "--background")
        .collect();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args)
        .env("STRATA_LOG", log_level)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: setsid is async-signal-safe and has no preconditions.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("starting the background mount process")?;
    match mount::wait_mounted(&mp, &mut child, Duration::from_secs(30)) {
        Ok(()) => {
            println!(
                "{} mounted at {} (pid {}, log {})",
                a.meta_url_redacted(),
                mp.display(),
                child.id(),
                log.display()
            );
            Ok(())
        }
        Err(e) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e}; last lines of {}:\n{}", log.display(), tail.join("\n"))
        }
    }
}

impl MountArgs {
    fn meta_url_redacted(&self) -> String {
        redact_url(&self.meta_url)
    }
}

fn status(meta_url: &str) -> Result<()> {
    let meta = Meta::new(
        open_engine(meta_url)?,
        Arc::new(Metrics::new()),
        MetaSettings::default(),
    );
    let mut fmt = meta.load()?;
    if fmt.storage.secret_key.is_some() {
        fmt.storage.secret_key = Some("removed".into());
    }
    let mirror = match &mut fmt.mirror {
        Some(m) => {
            if m.secret_key.is_some() {
                m.secret_key = Some("removed".into());
            }
            let st = strata::object::mirror::copy_state(&meta)?;
            serde_json::json!({
                "store": strata::object::mirror::store_url(m),
                "copy_done": st.done && st.mirror == strata::object::mirror::store_id(m),
                "objects_compared": st.listed,
                "objects_copied": st.copied,
                "bytes_copied": st.bytes,
                "copier": st.owner,
                "backlog": strata::object::mirror::backlog(&meta)?,
            })
        }
        None => serde_json::Value::Null,
    };
    let sessions: Vec<_> = meta
        .sessions()?
        .into_iter()
        .map(|(sid, hb, info)| serde_json::json!({"sid": sid, "expires": hb, "info": info}))
        .collect();
    let out = serde_json::json!({
        "setting": fmt,
        "used_space": meta.counter("used_space")?,
        "used_inodes": meta.counter("used_inodes")?,
        "sessions": sessions,
        "mirror": mirror,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The value of extended attribute `name` of `path` (up to 1 MiB).
fn get_xattr(path: &std::path::Path, name: &[u8]) -> Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        bail!("{} is not inside a strata mount ({e})", path.display());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn stats_cmd(path: &std::path::Path, interval: f64, count: u64, by_op: bool) -> Result<()> {
    use strata::stats::{METRICS_XATTR, Sample, header, line};
    if !interval.is_finite() || interval <= 0.0 {
        bail!("--interval {interval}: give a positive number of seconds");
    }
    let read = || -> Result<Sample> {
        let text = String::from_utf8_lossy(&get_xattr(path, METRICS_XATTR)?).to_string();
        Ok(Sample::parse(&text, std::time::Instant::now()))
    };
    let mut prev = read()?;
    println!("{}", header());
    let mut n = 0;
    while count == 0 || n < count {
        std::thread::sleep(std::time::Duration::from_secs_f64(interval));
        let cur = read()?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let clock = format!(
            "{:02}:{:02}:{:02}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        );
        println!("{}", line(&prev, &cur, &clock));
        if by_op {
            println!("{}", strata::stats::by_op(&prev, &cur, 8));
        }
        prev = cur;
        n += 1;
    }
    Ok(())
}

#[derive(Args)]
struct ProfileArgs {
    /// The mount point or any path inside the mount; or a saved access log to replay.
    path: PathBuf,
    /// Length of each window (2s, 500ms, 1.5).
    #[arg(long, default_value = "2s")]
    interval: String,
    /// Stop after this many windows (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Order of the rows: ops, bytes, time (total latency) or latency (mean).
    #[arg(long, default_value = "ops")]
    sort: String,
    /// Rows per table.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Only operations of this uid.
    #[arg(long)]
    filter_uid: Option<u32>,
    /// Only operations of this process id.
    #[arg(long)]
    filter_pid: Option<u32>,
    /// Only operations on this path or under it: a path in the mount (/dir) or through the
    /// mount point (MOUNT/dir).
    #[arg(long)]
    filter_path: Option<String>,
}

fn profile_cmd(a: ProfileArgs) -> Result<()> {
    use std::io::IsTerminal;
    use strata::profile::{self, Filter, Options, Source};
    let source = profile::source(&a.path)?;
    let mut filter_path = a.filter_path;
    if let (Source::Live(log), Some(f)) = (&source, &filter_path) {
        // A path through the mount point becomes a path in the mount.
        let root = log.parent().unwrap_or(std::path::Path::new("/"));
        let full = std::fs::canonicalize(f).unwrap_or_else(|_| PathBuf::from(f));
        if let Ok(rel) = full.strip_prefix(root) {
            filter_path = Some(format!("/{}", rel.display()));
        }
    }
    let opts = Options {
        interval: profile::parse_duration(&a.interval)?,
        count: a.count,
        sort: a.sort.parse()?,
        top: a.top.max(1),
        filter: Filter {
            uid: a.filter_uid,
            pid: a.filter_pid,
            path: filter_path,
        },
    };
    match source {
        Source::Saved(file) => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            print!("{}", profile::replay(f, &opts)?);
        }
        Source::Live(log) => {
            let f = std::fs::File::open(&log).with_context(|| {
                format!(
                    "opening {} (it is readable by the user the mount runs as)",
                    log.display()
                )
            })?;
            let stdout = std::io::stdout();
            let tty = stdout.is_terminal();
            profile::live(
                f,
                &log.display().to_string(),
                &opts,
                &mut stdout.lock(),
                tty,
            )?;
        }
    }
    Ok(())
}

fn info(path: &std::path::Path) -> Result<()> {
    let buf = get_xattr(path, strata::vfs::Vfs::INFO_XATTR)?;
    println!("{}", String::from_utf8_lossy(&buf));
    Ok(())
}

#[derive(Args)]
struct SyncArgs {
    /// Source: a directory (/path or file:///path, also inside a mount), s3://bucket[/prefix],
    /// or a volume's META_URL (sqlite://… or postgres://…) with --src-path.
    src: String,
    /// Destination, the same kinds as SRC.
    dst: String,
    /// Directory inside the source volume (default: its root).
    #[arg(long)]
    src_path: Option<String>,
    /// Directory inside the destination volume (created if missing; default: its root).
    #[arg(long)]
    dst_path: Option<String>,
    /// S3 endpoint of SRC, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    src_endpoint: Option<String>,
    /// S3 endpoint of DST.
    #[arg(long)]
    dst_endpoint: Option<String>,
    /// S3 keys of SRC (default: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "STRATA_SYNC_SRC_ACCESS_KEY", hide_env_values = true)]
    src_access_key: Option<String>,
    /// Secret key of SRC (never printed).
    #[arg(long, env = "STRATA_SYNC_SRC_SECRET_KEY", hide_env_values = true)]
    src_secret_key: Option<String>,
    /// S3 keys of DST (default: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "STRATA_SYNC_DST_ACCESS_KEY", hide_env_values = true)]
    dst_access_key: Option<String>,
    /// Secret key of DST (never printed).
    #[arg(long, env = "STRATA_SYNC_DST_SECRET_KEY", hide_env_values = true)]
    dst_secret_key: Option<String>,
    /// S3 signing region of SRC (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    src_region: Option<String>,
    /// S3 signing region of DST.
    #[arg(long)]
    dst_region: Option<String>,
    /// Remove at DST what SRC does not have (entries the filters exclude are kept).
    #[arg(long)]
    delete: bool,
    /// Compare the bytes of files of equal size instead of trusting size and mtime.
    #[arg(long)]
    check: bool,
    /// Copy what matches (rsync-like: rules apply in the order given, the first match wins;
    /// `*`, `**`, `?`, `[..]`; a pattern with `/` matches the path, a trailing `/` only
    /// directories).
    #[arg(long, value_name = "PATTERN")]
    include: Vec<String>,
    /// Skip what matches (see --include).
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Files copied at once.
    #[arg(short, long, default_value_t = 10)]
    threads: usize,
    /// Bytes per second read from SRC, all threads together, e.g. 100M.
    #[arg(long)]
    bwlimit: Option<String>,
    /// Visit only the directories changed since this change token (printed by an earlier
    /// sync from a Strata volume), or `auto`: the token of the last finished pass.
    #[arg(long)]
    since: Option<String>,
    /// Where the resume state and last change token of each SRC/DST pair are kept
    /// (default: ~/.strata/sync).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
    /// Print the summary as JSON on standard output.
    #[arg(long)]
    json: bool,
}

fn sync_cmd(a: SyncArgs) -> Result<()> {
    use strata::sync::{self, Filter, Spec, SyncOptions, s3::S3Access};
    let src = Spec::parse(&a.src, a.src_path.as_deref(), "src")?;
    let dst = Spec::parse(&a.dst, a.dst_path.as_deref(), "dst")?;
    // clap keeps --include and --exclude apart; their order on the command line decides.
    let filter = Filter::from_args(std::env::args())?;
    let opts = SyncOptions {
        threads: a.threads,
        delete: a.delete,
        check: a.check,
        bwlimit: a
            .bwlimit
            .as_deref()
            .map(sync::parse_rate)
            .transpose()?
            .unwrap_or(0),
        since: a
            .since
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        state_dir: a.state_dir,
        quiet: a.quiet,
        ..SyncOptions::default()
    };
    let access = |endpoint: Option<String>, ak, sk, region| S3Access {
        endpoint: endpoint.unwrap_or_default(),
        access_key: ak,
        secret_key: sk,
        region,
    };
    let metrics = Arc::new(Metrics::new());
    let s = src
        .open(
            &access(
                a.src_endpoint,
                a.src_access_key,
                a.src_secret_key,
                a.src_region,
            ),
            false,
            metrics.clone(),
        )
        .context("opening SRC")?;
    let d = dst
        .open(
            &access(
                a.dst_endpoint,
                a.dst_access_key,
                a.dst_secret_key,
                a.dst_region,
            ),
            true,
            metrics,
        )
        .context("opening DST")?;
    let summary = sync::run(s.as_ref(), d.as_ref(), &filter, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    if summary.failed > 0 {
        bail!(
            "{} entries could not be synced (see above and the log); run the same command again to retry them",
            summary.failed
        );
    }
    Ok(())
}

/// `strata mirror`: run the mirror copier in the foreground until the copy is done and the
/// backlog empty.
fn mirror_cmd(meta_url: &str, threads: usize) -> Result<()> {
    use strata::object::mirror::Copier;
    let metrics = Arc::new(Metrics::new());
    let vol = strata::volume::open(
        meta_url,
        metrics,
        MetaSettings::default(),
        strata::object::RetrySettings::default(),
        false,
    )?;
    if vol.format.mirror.is_none() {
        bail!(
            "volume {} has no mirror: add one with `strata config {} --mirror URL`",
            vol.format.name,
            strata::meta::redact_url(meta_url)
        );
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let copier = Copier {
        meta: vol.meta.clone(),
        store: vol.mirror.clone(),
        owner: format!("strata mirror {}:{}", host.trim(), std::process::id()),
        threads,
        stop: strata::object::mirror::stop_flag(),
    };
    let start = std::time::Instant::now();
    loop {
        let r = copier.run_once(&mut |st, _| {
            eprint!(
                "\rcompared {} objects, copied {} ({} MiB), {:.0} s",
                st.listed,
                st.copied,
                st.bytes >> 20,
                start.elapsed().as_secs_f64()
            );
        })?;
        match r.waiting {
            None if r.state.done && r.backlog == 0 => {
                eprintln!();
                println!(
                    "mirror up to date: {} objects compared, {} copied ({} bytes), backlog 0, {:.1} s",
                    r.state.listed,
                    r.state.copied,
                    r.state.bytes,
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Some(w) => eprint!("\r{w}                    "),
            None => eprint!("\rbacklog {}                    ", r.backlog),
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Whether `name` matches `pat` (`*`: any characters, `?`: one).
fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    match (pat.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pat[1..], name) || (!name.is_empty() && glob_match(pat, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pat[1..], &name[1..]),
        (Some(a), Some(b)) if a == b => glob_match(&pat[1..], &name[1..]),
        _ => false,
    }
}

fn open_meta(meta_url: &str) -> Result<Meta> {
    let meta = Meta::new(
        open_engine(meta_url)?,
        Arc::new(Metrics::new()),
        MetaSettings::default(),
    );
    meta.load()?;
    Ok(meta)
}

/// `strata restore`.
fn restore_cmd(meta_url: &str, patterns: &[String], all: bool) -> Result<()> {
    let meta = open_meta(meta_url)?;
    let fmt = meta.load()?;
    let list = meta.trash_list()?;
    if patterns.is_empty() && !all {
        if fmt.trash_days == 0 {
            println!(
                "volume {} keeps no trash (enable it with `strata config {} --trash-days N`)",
                fmt.name,
                redact_url(meta_url)
            );
        }
        println!(
            "{:<20} {:>14} {:>10}  name",
            "deleted (UTC)", "bytes", "dir inode"
        );
        for t in &list {
            let when = chrono_like(t.deleted);
            println!(
                "{when:<20} {:>14} {:>10}  {}",
                t.length,
                t.parent,
                String::from_utf8_lossy(&t.name)
            );
        }
        println!(
            "{} files in the trash; kept {} days",
            list.len(),
            fmt.trash_days
        );
        return Ok(());
    }
    let chosen: Vec<_> = list
        .into_iter()
        .filter(|t| all || patterns.iter().any(|p| glob_match(p.as_bytes(), &t.name)))
        .collect();
    if chosen.is_empty() {
        bail!(
            "nothing in the trash matches {patterns:?} (run `strata restore {}` to list it)",
            redact_url(meta_url)
        );
    }
    let r = meta.trash_restore(&chosen)?;
    for (t, why) in &r.failed {
        eprintln!("not restored: {}: {why}", String::from_utf8_lossy(&t.name));
    }
    println!(
        "restored {} files, {} not restored",
        r.restored.len(),
        r.failed.len()
    );
    if !r.failed.is_empty() {
        bail!("{} files could not be restored", r.failed.len());
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` of unix seconds (UTC).
fn chrono_like(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    strata::accesslog::timestamp(t)[..19].replace('T', " ")
}

/// `strata rmr`.
fn rmr_cmd(meta_url: &str, path: &str) -> Result<()> {
    let meta = open_meta(meta_url)?;
    let path = path.trim_end_matches('/');
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) if !n.is_empty() => (d, n),
        _ => bail!("{path:?}: give a path inside the volume like /scratch/old-run (not the root)"),
    };
    let parent = strata::volume::resolve_dir(&meta, dir)?;
    let start = std::time::Instant::now();
    let stats = meta
        .rmr(parent, name.as_bytes(), &mut |s| {
            eprint!("\rremoved {} files, {} directories", s.files, s.dirs);
        })
        .map_err(|e| match e {
            strata::meta::MetaError::NotFound => {
                anyhow::anyhow!("{path}: no such file or directory in the volume")
            }
            e => e.into(),
        })?;
    eprintln!();
    println!(
        "removed {path}: {} files, {} directories in {:.1} s{}",
        stats.files,
        stats.dirs,
        start.elapsed().as_secs_f64(),
        if meta.load()?.trash_days > 0 {
            " (files are in the trash)"
        } else {
            ""
        }
    );
    Ok(())
}

/// `strata destroy`.
fn destroy_cmd(meta_url: &str, uuid: &str, force: bool, yes: bool) -> Result<()> {
    let meta = open_meta(meta_url)?;
    let fmt = meta.load()?;
    if fmt.uuid != uuid {
        bail!(
            "{uuid} is not the UUID of volume {} at {} (`strata status` shows it): nothing was deleted",
            fmt.name,
            redact_url(meta_url)
        );
    }
    let used = meta.counter("used_space")?;
    let inodes = meta.counter("used_inodes")?;
    if !yes {
        use std::io::{BufRead, IsTerminal};
        if !std::io::stdin().is_terminal() {
            bail!("strata destroy asks for confirmation on a terminal; pass --yes to skip it");
        }
        eprint!(
            "Delete volume {} ({} inodes, {} bytes) and every object in {} {}? Type the volume name: ",
            fmt.name, inodes, used, fmt.storage.storage, fmt.storage.bucket
        );
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != fmt.name {
            bail!("not confirmed: nothing was deleted");
        }
    }
    drop(meta);
    let start = std::time::Instant::now();
    let r = strata::volume::destroy(meta_url, Arc::new(Metrics::new()), force, &mut |r| {
        eprint!("\rdeleted {} objects ({} MiB)", r.objects, r.bytes >> 20);
    })?;
    eprintln!();
    println!(
        "volume {} destroyed: {} objects ({} bytes) deleted, metadata tables dropped, in {:.1} s",
        fmt.name,
        r.objects,
        r.bytes,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_the_cli_and_kubernetes_spellings() {
        for (s, v) in [
            ("100M", 100 << 20),
            ("64Mi", 64 << 20),
            ("64MiB", 64 << 20),
            ("64MB", 64 << 20),
            ("1.5G", 3 << 29),
            ("2Gi", 2 << 30),
            ("512k", 512 << 10),
            ("2T", 2 << 40),
            ("3", 3 << 30),
            ("0", 0),
        ] {
            assert_eq!(parse_size(s).unwrap(), v, "{s}");
        }
        for s in [
            "", "Mi", "64i", "64B", "64MBB", "64X", "ten", "-1M", "64 Mi",
        ] {
            let e = parse_size(s).expect_err(s).to_string();
            assert!(e.contains("--capacity"), "{s}: {e}");
        }
    }
}
