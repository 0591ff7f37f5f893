//! Write-back (`--writeback`): a written block is staged on the local disk
//! ([`DiskCache::stage`]) instead of being uploaded before the write's flush returns, and its
//! slice is committed at once. Close and fsync then cost a local disk write, not a PUT;
//! this module's threads upload the staged blocks afterwards, oldest first, retrying a
//! failed PUT until it succeeds. An uploaded block stays in the disk cache.
//!
//! What this trades (docs/SEMANTICS.md, "Write-back"): until a block is uploaded, only this
//! node has it. Other clients see the file's new length at once but get EIO reading the
//! block; a node lost with its disk loses the staged blocks. A client killed with blocks
//! staged loses nothing: the next mount with the same cache directory uploads them
//! ([`Writeback::start`] queues everything found staged, with or without the option).
//!
//! `--upload-delay` holds each newly staged block back for that long before its upload (as
//! JuiceFS's option of that name does): a checkpoint save is then not slowed by its own
//! uploads, and a block deleted or overwritten within the delay (a temporary file, a
//! checkpoint replaced at once) is never uploaded. Unmount does not wait out the delay: it
//! uploads everything at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::buffers::Buffers;
use crate::cache::disk::DiskCache;
use crate::metrics::Metrics;
use crate::object::ObjectStore;

/// A failed upload is retried after this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// At unmount, the wait for staged uploads gives up after this long without one succeeding
/// (the store is down): what is left is uploaded by the next mount.
const DRAIN_PATIENCE: Duration = Duration::from_secs(30);

struct Entry {
    key: String,
    not_before: Instant,
    failures: u32,
}

#[derive(Default)]
struct Queue {
    keys: VecDeque<Entry>,
    /// Uploads being sent.
    busy: usize,
    /// Unmounting: the upload delay no longer applies.
    draining: bool,
    stop: bool,
}

/// The write-back stager and uploader of one mount.
pub struct Writeback {
    disk: Arc<DiskCache>,
    store: Arc<dyn ObjectStore>,
    buffers: Arc<Buffers>,
    metrics: Arc<Metrics>,
    volume: String,
    /// Stage new writes (`--writeback`); otherwise this only uploads what earlier clients
    /// left staged.
    enabled: bool,
    /// Keep an uploaded block in the disk cache (not `--no-cache-written`).
    keep: bool,
    /// How long a newly staged block waits before its upload (`--upload-delay`).
    delay: Duration,
    /// Blocks of dead slices are dropped, not uploaded.
    dead: DeadSlice,
    queue: Mutex<Queue>,
    cv: Condvar,
    last_upload: Mutex<Instant>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    last_stage_error: Mutex<Option<Instant>>,
}

/// The length of a block from its key (`…/{id}_{indx}_{len}`, docs/FORMAT.md §4).
fn key_len(key: &str) -> Option<usize> {
    key.rsplit('_').next()?.parse().ok()
}

/// The slice id of a block from its key.
fn key_slice(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.split('_').next()?.parse().ok()
}

/// Whether a slice is no longer referenced (its file was deleted, truncated or overwritten):
/// the metadata's garbage queue ([`crate::meta::Meta::is_garbage`]).
pub type DeadSlice = Arc<dyn Fn(u64) -> bool + Send + Sync>;

impl Writeback {
    /// Set up write-back for a mount with disk cache `disk`, and start uploading what is
    /// staged there already (at once: the delay is for blocks staged from now on). Threads
    /// are started only when there is something to do: `enabled`, or blocks left staged.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        disk: Arc<DiskCache>,
        store: Arc<dyn ObjectStore>,
        buffers: Arc<Buffers>,
        metrics: Arc<Metrics>,
        volume: &str,
        enabled: bool,
        keep: bool,
        delay: Duration,
        dead: DeadSlice,
        threads: usize,
    ) -> Arc<Self> {
        let left = disk.staged_keys();
        let wb = Arc::new(Writeback {
            disk,
            store,
            buffers,
            metrics,
            volume: volume.to_string(),
            enabled,
            keep,
            delay,
            dead,
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            last_upload: Mutex::new(Instant::now()),
            threads: Mutex::new(Vec::new()),
            last_stage_error: Mutex::new(None),
        });
        if !left.is_empty() {
            tracing::info!(volume = %wb.volume, blocks = left.len(), "uploading blocks an earlier client left staged (write-back)");
        }
        for k in left {
            wb.enqueue(k, Duration::ZERO);
        }
        if enabled || !wb.queue.lock().keys.is_empty() {
            let mut ts = wb.threads.lock();
            for i in 0..threads.max(1) {
                let me = wb.clone();
                if let Ok(t) = std::thread::Builder::new()
                    .name(format!("writeback-{i}"))
                    .spawn(move || me.run())
                {
                    ts.push(t);
                }
            }
        }
        wb
    }

    /// Whether new writes are staged.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn enqueue(&self, key: String, delay: Duration) {
        let mut q = self.queue.lock();
        let delay = if q.draining { Duration::ZERO } else { delay };
        q.keys.push_back(Entry {
            key,
            not_before: Instant::now() + delay,
            failures: 0,
        });
        drop(q);
        self.cv.notify_one();
    }

    /// Stage block `key` for a later upload. False when write-back is off, or the staging
    /// area is full or failed: the caller uploads the block itself.
    pub fn stage(&self, key: &str, data: &[u8]) -> bool {
        if !self.enabled {
            return false;
        }
        match self.disk.stage(key, data) {
            Ok(true) => {
                self.enqueue(key.to_string(), self.delay);
                true
            }
            Ok(false) => false,
            Err(e) => {
                let mut last = self.last_stage_error.lock();
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    *last = Some(Instant::now());
                    tracing::warn!(volume = %self.volume, key, error = %e, "staging a written block failed: uploading it directly (check the cache directory)");
                }
                false
            }
        }
    }

    /// Make the staged blocks among `keys` durable on the local disk; returns the others.
    pub fn sync(&self, keys: &[String]) -> std::io::Result<Vec<String>> {
        self.disk.sync_staged(keys)
    }

    /// Blocks staged and not yet uploaded.
    pub fn pending(&self) -> usize {
        let q = self.queue.lock();
        q.keys.len() + q.busy
    }

    fn run(self: Arc<Self>) {
        super::pool::lower_priority(super::UPLOAD_NICE);
        loop {
            let entry = {
                let mut q = self.queue.lock();
                loop {
                    if q.stop {
                        return;
                    }
                    let now = Instant::now();
                    if let Some(i) = q.keys.iter().position(|e| e.not_before <= now) {
                        let e = q.keys.remove(i).expect("position is in range");
                        q.busy += 1;
                        break e;
                    }
                    let wait = q
                        .keys
                        .iter()
                        .map(|e| e.not_before.saturating_duration_since(now))
                        .min()
                        .unwrap_or(Duration::from_secs(1))
                        .clamp(Duration::from_millis(10), Duration::from_secs(1));
                    self.cv.wait_for(&mut q, wait);
                }
            };
            let retry = !self.upload(&entry);
            let mut q = self.queue.lock();
            q.busy -= 1;
            if retry {
                let failures = entry.failures + 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << failures.min(10))
                    .min(MAX_BACKOFF);
                q.keys.push_back(Entry {
                    key: entry.key,
                    not_before: Instant::now() + backoff,
                    failures,
                });
            }
            self.cv.notify_all();
        }
    }

    /// Upload one staged block. False: try again later.
    fn upload(&self, e: &Entry) -> bool {
        let key = &e.key;
        let (Some(len), Some(slice)) = (key_len(key), key_slice(key)) else {
            tracing::error!(volume = %self.volume, key, "a staged file's name is not a block key: left in place, not uploaded");
            return true;
        };
        // Deleted, truncated or overwritten before its turn (an upload delay, a backlog):
        // nobody will read it, so it is dropped instead of uploaded. A reader of this client
        // with an old chunk map then finds it missing and plans again.
        if (self.dead)(slice) {
            tracing::debug!(volume = %self.volume, key, "staged block of a deleted slice dropped, not uploaded");
            self.disk.unstage(key, false);
            self.metrics.writeback_dropped();
            return true;
        }
        let data = match self.disk.read_staged(key, len, &self.buffers) {
            Ok(Some(d)) => d,
            // Deleted meanwhile (its file was removed or truncated): nothing to upload (and
            // nothing to undo: this clears the note of the removal).
            Ok(None) => {
                self.disk.unstage(key, false);
                return true;
            }
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                self.metrics.writeback_failure();
                tracing::error!(volume = %self.volume, key, error = %err, "a staged block is corrupt and cannot be uploaded: reads of it fail (EIO); the file is left in place");
                return true;
            }
            Err(err) => {
                self.metrics.writeback_failure();
                tracing::warn!(volume = %self.volume, key, error = %err, "reading a staged block failed, will retry");
                return false;
            }
        };
        if let Err(err) = self.store.put(key, data) {
            self.metrics.writeback_failure();
            if e.failures == 0 || e.failures.is_power_of_two() {
                tracing::warn!(volume = %self.volume, key, failures = e.failures + 1, error = %err, "uploading a staged block failed, will retry");
            }
            return false;
        }
        *self.last_upload.lock() = Instant::now();
        self.metrics.writeback_uploaded();
        if !self.disk.unstage(key, self.keep) {
            // Its slice was deleted while the upload ran (the file was removed or
            // truncated): the object just stored is garbage.
            if let Err(err) = self.store.delete(key) {
                tracing::warn!(volume = %self.volume, key, error = %err, "deleting the object of a block deleted during its upload failed (`strata gc` finds it)");
            }
        }
        true
    }

    /// At unmount: upload every staged block now (the upload delay ends), wait while uploads
    /// make progress, then stop the threads. What is left stays staged for the next mount.
    pub fn shutdown(&self) {
        {
            let mut q = self.queue.lock();
            q.draining = true;
            let now = Instant::now();
            for e in q.keys.iter_mut().filter(|e| e.failures == 0) {
                e.not_before = e.not_before.min(now);
            }
        }
        self.cv.notify_all();
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            let left = self.pending();
            if left == 0 {
                break;
            }
            if self.last_upload.lock().elapsed() >= DRAIN_PATIENCE
                && started.elapsed() >= DRAIN_PATIENCE
            {
                tracing::warn!(volume = %self.volume, blocks = left, "unmounting with staged blocks not uploaded (the object store does not take them): the next mount with this cache directory uploads them");
                break;
            }
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                tracing::info!(volume = %self.volume, blocks = left, "waiting for staged blocks to be uploaded before unmounting");
            }
            let mut q = self.queue.lock();
            self.cv.wait_for(&mut q, Duration::from_millis(100));
        }
        self.queue.lock().stop = true;
        self.cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{FaultSettings, FaultStore, MemStore};

    const KEY: &str = "vol/chunks/0/0/7_0_5";

    fn disk(dir: &std::path::Path) -> Arc<DiskCache> {
        DiskCache::open(
            &[dir.to_path_buf()],
            "uuid",
            1 << 20,
            0.0,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn start(d: &Arc<DiskCache>, store: Arc<dyn ObjectStore>, enabled: bool) -> Arc<Writeback> {
        start_delayed(d, store, enabled, Duration::ZERO)
    }

    fn start_delayed(
        d: &Arc<DiskCache>,
        store: Arc<dyn ObjectStore>,
        enabled: bool,
        delay: Duration,
    ) -> Arc<Writeback> {
        start_with(d, store, enabled, delay, Arc::new(|_| false))
    }

    fn start_with(
        d: &Arc<DiskCache>,
        store: Arc<dyn ObjectStore>,
        enabled: bool,
        delay: Duration,
        dead: DeadSlice,
    ) -> Arc<Writeback> {
        Writeback::start(
            d.clone(),
            store,
            Buffers::new(0),
            Arc::new(Metrics::new()),
            "vol",
            enabled,
            true,
            delay,
            dead,
            2,
        )
    }

    fn wait(cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached in 5 s");
    }

    #[test]
    fn staged_blocks_are_readable_then_uploaded_and_kept_cached() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        let store = Arc::new(MemStore::default());
        let wb = start(&d, store.clone(), true);
        assert!(wb.stage(KEY, b"hello"));
        // Readable locally whether or not the upload happened yet.
        assert_eq!(&d.get(KEY, 5, &Buffers::new(0)).unwrap()[..], b"hello");
        wait(|| wb.pending() == 0);
        assert_eq!(&store.get(KEY, 0, None).unwrap()[..], b"hello");
        assert_eq!(d.staged(), (0, 0));
        assert!(d.contains(KEY), "an uploaded block stays in the disk cache");
        wb.shutdown();
    }

    #[test]
    fn blocks_left_staged_are_uploaded_by_the_next_mount_even_without_writeback() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        // Staged, then the client "dies" before any upload (no uploader ran).
        d.stage(KEY, b"hello").unwrap();
        drop(d);
        let d = disk(t.path());
        let store = Arc::new(MemStore::default());
        let wb = start(&d, store.clone(), false);
        assert!(
            !wb.stage("vol/chunks/0/0/8_0_5", b"other"),
            "staging is off"
        );
        wait(|| store.get(KEY, 0, None).is_ok());
        assert_eq!(&store.get(KEY, 0, None).unwrap()[..], b"hello");
        wb.shutdown();
        assert_eq!(d.staged(), (0, 0));
    }

    fn faulty() -> Arc<FaultStore<MemStore>> {
        Arc::new(FaultStore::new(
            MemStore::default(),
            FaultSettings::default(),
        ))
    }

    #[test]
    fn the_upload_delay_holds_new_blocks_back_but_not_unmount_nor_leftovers() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        // Left staged by an earlier client: uploaded at once despite the delay.
        d.stage("vol/chunks/0/0/6_0_4", b"left").unwrap();
        let store = Arc::new(MemStore::default());
        let wb = start_delayed(&d, store.clone(), true, Duration::from_secs(3600));
        // (The object is in the store a moment before its uploader is done with it.)
        wait(|| store.get("vol/chunks/0/0/6_0_4", 0, None).is_ok() && wb.pending() == 0);
        assert!(wb.stage(KEY, b"hello"));
        // Deleted within the delay: never uploaded.
        let gone = "vol/chunks/0/0/8_0_4";
        assert!(wb.stage(gone, b"temp"));
        d.remove(gone);
        // Both wait in the queue for an hour: no upload has started.
        assert_eq!(wb.pending(), 2, "held back by the delay");
        assert!(store.get(KEY, 0, None).is_err());
        // Unmount uploads what waits, and skips the deleted block.
        wb.shutdown();
        assert_eq!(&store.get(KEY, 0, None).unwrap()[..], b"hello");
        assert!(store.get(gone, 0, None).is_err());
        assert_eq!(d.staged(), (0, 0));
    }

    #[test]
    fn blocks_of_dead_slices_are_dropped_not_uploaded() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        let store = Arc::new(MemStore::default());
        // Slice 7 (KEY) was overwritten before its upload; slice 9 is live.
        let live = "vol/chunks/0/0/9_0_4";
        let wb = start_with(
            &d,
            store.clone(),
            true,
            Duration::from_secs(3600),
            Arc::new(|id| id == 7),
        );
        assert!(wb.stage(KEY, b"hello"));
        assert!(wb.stage(live, b"live"));
        wb.shutdown();
        assert!(
            store.get(KEY, 0, None).is_err(),
            "a dead slice's block was uploaded"
        );
        assert_eq!(&store.get(live, 0, None).unwrap()[..], b"live");
        assert!(!d.contains(KEY), "the dead block is gone from the disk too");
        assert_eq!(d.staged(), (0, 0));
        assert_eq!(key_slice(KEY), Some(7));
    }

    #[test]
    fn a_failing_store_is_retried_until_the_block_is_stored() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        let store = faulty();
        store.set_outage(true);
        let wb = start(&d, store.clone(), true);
        assert!(wb.stage(KEY, b"hello"));
        wait(|| store.injected() >= 2);
        assert_eq!(wb.pending(), 1);
        store.set_outage(false);
        wait(|| wb.pending() == 0);
        assert_eq!(&store.get(KEY, 0, None).unwrap()[..], b"hello");
        wb.shutdown();
    }

    #[test]
    fn a_block_deleted_before_its_upload_is_not_uploaded() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        let store = faulty();
        store.set_outage(true);
        let wb = start(&d, store.clone(), true);
        assert!(wb.stage(KEY, b"hello"));
        // The first attempt fails; the block is deleted before the retry.
        wait(|| store.injected() >= 1);
        d.remove(KEY);
        store.set_outage(false);
        wait(|| wb.pending() == 0);
        assert!(store.get(KEY, 0, None).is_err());
        assert_eq!(d.staged(), (0, 0));
        wb.shutdown();
    }

    #[test]
    fn staging_is_bounded_by_the_cache_size_and_fsync_syncs_staged_files() {
        let t = tempfile::tempdir().unwrap();
        let d = DiskCache::open(
            &[t.path().to_path_buf()],
            "uuid",
            40,
            0.0,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert!(d.stage("vol/chunks/0/0/1_0_20", &[1; 20]).unwrap());
        // 28 + 28 bytes would pass the 40-byte capacity.
        assert!(!d.stage("vol/chunks/0/0/2_0_20", &[2; 20]).unwrap());
        let rest = d
            .sync_staged(&[
                "vol/chunks/0/0/1_0_20".into(),
                "vol/chunks/0/0/3_0_1".into(),
            ])
            .unwrap();
        assert_eq!(rest, vec!["vol/chunks/0/0/3_0_1".to_string()]);
    }

    #[test]
    fn an_upload_is_undone_only_for_a_block_this_process_deleted() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        // Deleted while its upload ran: the uploader must delete the object again.
        d.stage(KEY, b"hello").unwrap();
        d.remove(KEY);
        assert!(!d.unstage(KEY, true));
        // Once only: the note is consumed.
        assert!(d.unstage(KEY, true));
        // Uploaded and moved by another client sharing the directory: not a deletion.
        let other = "vol/chunks/0/0/9_0_5";
        d.stage(other, b"hello").unwrap();
        let root = t.path().join("uuid");
        std::fs::create_dir_all(root.join("raw/vol/chunks/0/0")).unwrap();
        std::fs::rename(
            root.join("staging").join(other),
            root.join("raw").join(other),
        )
        .unwrap();
        assert!(d.unstage(other, true));
    }

    #[test]
    fn corrupt_staged_blocks_are_errors_not_data() {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path());
        d.stage(KEY, b"hello").unwrap();
        let p = t.path().join("uuid/staging").join(KEY);
        let mut body = std::fs::read(&p).unwrap();
        body[0] ^= 1;
        std::fs::write(&p, body).unwrap();
        assert!(d.get(KEY, 5, &Buffers::new(0)).is_none());
        assert!(d.read_staged(KEY, 5, &Buffers::new(0)).is_err());
        assert!(p.exists(), "the only copy is kept");
    }
}
