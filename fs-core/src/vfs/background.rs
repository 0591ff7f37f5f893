//! Background work of a mounted client: timed and pressure flushes, compaction of
//! fragmented chunks, trimming of masked data, reclaiming deleted files, deleting
//! unreferenced objects after their grace period, and the session heartbeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Vfs, VfsError};
use crate::chunk::{block_key, slice_blocks, visible_segments};
use crate::meta::{CHUNK_SIZE, Slice};

impl Vfs {
    /// Start the background threads (a mounted client calls this once).
    pub fn start_background(self: &Arc<Self>) {
        let mut threads = self.threads.lock();
        let me = self.clone();
        threads.push(spawn("flusher", move || me.flusher_loop()));
        if self.settings.background_gc && !self.settings.read_only {
            let me = self.clone();
            threads.push(spawn("cleaner", move || me.cleaner_loop()));
        }
        let me = self.clone();
        threads.push(spawn("heartbeat", move || me.heartbeat_loop()));
        if self.reader.group().is_some() {
            self.refresh_group();
            let me = self.clone();
            threads.push(spawn("group-members", move || {
                while me.sleep(Duration::from_secs(2)) {
                    me.refresh_group();
                }
            }));
        }
    }

    /// Re-read the cache group's members from the live sessions.
    fn refresh_group(&self) {
        let Some(g) = self.reader.group() else { return };
        match self.meta.sessions() {
            Ok(sessions) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                g.refresh(&sessions, now);
            }
            Err(e) => {
                tracing::warn!(volume = %self.volume(), group = %g.name(), error = %e, "reading cache group members failed")
            }
        }
    }

    fn sleep(&self, d: Duration) -> bool {
        let (m, cv) = &self.wake;
        let mut woken = m.lock();
        if !*woken {
            cv.wait_for(&mut woken, d);
        }
        *woken = false;
        !self.stop.load(Ordering::SeqCst)
    }

    fn flusher_loop(self: Arc<Self>) {
        let interval = Duration::from_secs_f64(self.settings.flush_interval.max(0.05));
        let mut synced = Instant::now();
        while self.sleep(Duration::from_millis(100)) {
            if synced.elapsed() >= Duration::from_secs(5) {
                synced = Instant::now();
                self.sync_old_objects(Duration::from_secs(60));
            }
            let pressure = self.wctx.budget.used() * 2 > self.wctx.budget.cap();
            let writers: Vec<_> = self.writers.lock().values().cloned().collect();
            for w in writers {
                let due = w.dirty_since().is_some_and(|t| t.elapsed() >= interval);
                if (due || (pressure && w.dirty_since().is_some()))
                    && let Err(e) = self.flush_writer(&w)
                {
                    tracing::error!(volume = %self.volume(), path = %self.path(w.ino), error = %e,
                            "background flush failed; the data written since the last flush is lost and fsync/close will report EIO");
                }
            }
        }
    }

    fn heartbeat_loop(self: Arc<Self>) {
        let mut last = Instant::now();
        let mut reloaded = Instant::now();
        while self.sleep(Duration::from_secs(1)) {
            // Settings changed with `strata config` (capacity, inodes) bind within seconds.
            if reloaded.elapsed() >= Duration::from_secs(3) {
                reloaded = Instant::now();
                if let Err(e) = self.meta.load() {
                    tracing::warn!(volume = %self.volume(), error = %e, "reloading volume settings failed");
                }
            }
            if last.elapsed() >= self.meta.heartbeat_interval() {
                last = Instant::now();
                if let Err(e) = self.meta.heartbeat(&self.session_info()) {
                    tracing::warn!(volume = %self.volume(), error = %e, "session heartbeat failed");
                }
            }
        }
    }

    /// Description of this client stored with its session.
    pub fn session_info(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let group = self
            .reader
            .group()
            .map(|g| g.session_info())
            .unwrap_or_default();
        let stores = self.meta.stores_applied();
        let stores = if stores.is_empty() {
            String::new()
        } else {
            format!(" {stores}")
        };
        format!(
            "host={} pid={}{group}{stores}",
            host.trim(),
            std::process::id()
        )
    }

    fn cleaner_loop(self: Arc<Self>) {
        let mut sessions_checked = Instant::now();
        // The change journal and the trash are trimmed at start and then every 10 minutes.
        let mut journal_trimmed: Option<Instant> = None;
        while self.sleep(Duration::from_secs(1)) {
            if journal_trimmed.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
                journal_trimmed = Some(Instant::now());
                if let Err(e) = self.meta.trim_journal() {
                    tracing::warn!(volume = %self.volume(), error = %e, "trimming the change journal failed");
                }
                match self.meta.trash_expire() {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(volume = %self.volume(), files = n, "emptied expired files from the trash")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.volume(), error = %e, "emptying the trash failed")
                    }
                }
            }
            if sessions_checked.elapsed() >= self.meta.heartbeat_interval() {
                sessions_checked = Instant::now();
                if let Err(e) = self.meta.cleanup_stale_sessions() {
                    tracing::warn!(volume = %self.volume(), error = %e, "cleaning stale sessions failed");
                }
            }
            if let Err(e) = self.clean_once() {
                tracing::warn!(volume = %self.volume(), error = %e, "background cleaning failed, will retry");
            }
        }
    }

    /// One round of compaction, trimming, reclaiming and object deletion. Returns the number
    /// of objects deleted.
    pub fn clean_once(&self) -> Result<usize, VfsError> {
        let queued: Vec<_> = std::mem::take(&mut *self.compact_queue.lock())
            .into_iter()
            .collect();
        for (ino, indx) in queued {
            if let Err(e) = self.compact(ino, indx) {
                tracing::warn!(volume = %self.volume(), path = %self.path(ino), chunk = indx, error = %e, "compaction failed");
            }
        }
        // At unmount the round stops between batches: what is left stays queued in the
        // metadata for the next client's cleaner, and the unmount does not wait for it.
        let stopping = || self.stop.load(Ordering::SeqCst);
        while !stopping() && self.meta.trim_once()? > 0 {}
        while !stopping() && self.meta.reclaim_once()? > 0 {}
        let mut deleted = 0;
        while !stopping() {
            let due = self.meta.due_garbage(256)?;
            if due.is_empty() {
                break;
            }
            // Slices whose objects are all deleted; their rows go in one transaction. A
            // client killed before that deletes them again next time (a missing object is
            // no error).
            let mut gone = Vec::with_capacity(due.len());
            for (id, size) in due {
                if stopping() {
                    break;
                }
                let mut ok = true;
                for (k, len) in slice_blocks(size, self.block_size()) {
                    let key = block_key(self.volume(), id, k, len);
                    self.reader.forget(&key);
                    if let Err(e) = self.wctx.store.delete(&key) {
                        tracing::warn!(volume = %self.volume(), key = %key, error = %e, "deleting object failed, will retry");
                        ok = false;
                        break;
                    }
                    deleted += 1;
                }
                if !ok {
                    self.meta.forget_garbage(&gone)?;
                    self.metrics.objects_reclaimed(deleted as u64);
                    return Ok(deleted);
                }
                gone.push(id);
            }
            self.meta.forget_garbage(&gone)?;
        }
        self.metrics.objects_reclaimed(deleted as u64);
        Ok(deleted)
    }

    /// Rewrite a fragmented chunk as one slice (only if it has many slices).
    pub fn compact(&self, ino: u64, indx: u32) -> Result<bool, VfsError> {
        let (slices, masks) = self.meta.chunk_slices(ino, indx)?;
        if slices.len() < self.settings.compact_threshold.max(2) {
            return Ok(false);
        }
        let segs = visible_segments(&slices, &masks, indx);
        let Some(max_seq) = slices.iter().map(|s| s.seq).max() else {
            return Ok(false);
        };
        if segs.is_empty() {
            return Ok(self.meta.replace_slices(ino, indx, &slices, None)?);
        }
        let start = segs[0].pos;
        let end = segs.iter().map(|s| s.pos + s.len).max().unwrap_or(start);
        let base = indx as u64 * CHUNK_SIZE;
        let data = self.read_range_raw(ino, base + start as u64, base + end as u64)?;
        let len = data.len() as u32;
        let id = self.meta.new_slice_id()?;
        let bs = self.block_size();
        let data = Bytes::from(data);
        for (k, blen) in slice_blocks(len, bs) {
            let key = block_key(self.volume(), id, k, blen);
            let part = data.slice((k * bs) as usize..(k * bs + blen) as usize);
            if let Err(e) = self.wctx.store.put(&key, part) {
                let _ = self.meta.discard_slices(&[(id, len)]);
                return Err(VfsError::Flush(super::writer::FlushError::Upload(
                    e.to_string(),
                )));
            }
        }
        let new = Slice {
            seq: max_seq,
            id,
            size: len,
            off: 0,
            len,
            pos: start,
        };
        let done = self.meta.replace_slices(ino, indx, &slices, Some(new))?;
        if done {
            self.metrics.compaction();
            self.invalidate(ino);
        } else {
            self.meta.discard_slices(&[(id, len)])?;
        }
        Ok(done)
    }

    fn read_range_raw(&self, ino: u64, off: u64, end: u64) -> Result<Vec<u8>, VfsError> {
        self.invalidate(ino);
        // Bytes past the current length (masked anyway) are not needed.
        let mut out = self.read_range(ino, None, off, end, false)?.to_vec();
        out.resize((end - off) as usize, 0);
        Ok(out)
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("spawn background thread")
}
