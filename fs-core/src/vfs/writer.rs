//! Write buffering. Each inode being written has a [`FileWriter`] holding open slices per
//! chunk. A write extends the chunk's last slice when it lands inside or right after its
//! not-yet-uploaded part, else opens a new slice. Full blocks are uploaded as soon as they
//! fill; a flush (close, fsync, timer, memory pressure) uploads the rest, waits for every
//! upload of the inode and commits all its slices in one metadata transaction. Buffered
//! bytes are bounded by a shared [`Budget`], given back block by block as uploads finish,
//! and blocks handed to the uploader but not yet stored are bounded by [`Backlog`]: a writer
//! faster than the object store waits for it instead of piling blocks up in memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::pool::Pool;
use super::reader::BlockReader;
use super::writeback::Writeback;
use crate::chunk::block_key;
use crate::meta::{CHUNK_SIZE, Ino, Meta, MetaError, Slice};
use crate::metrics::Metrics;
use crate::object::ObjectStore;

/// Shared bound on buffered bytes.
pub struct Budget {
    used: Mutex<u64>,
    cv: Condvar,
    cap: u64,
}

impl Budget {
    pub fn new(cap: u64) -> Self {
        Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
            cap,
        }
    }
    /// Take `n` bytes, waiting (and calling `pressure` to start flushes) while over budget.
    pub fn acquire(&self, n: u64, pressure: &dyn Fn()) {
        let mut used = self.used.lock();
        while *used > 0 && *used + n > self.cap {
            drop(used);
            pressure();
            used = self.used.lock();
            if *used > 0 && *used + n > self.cap {
                self.cv.wait_for(&mut used, Duration::from_millis(50));
            }
        }
        *used += n;
    }
    pub fn release(&self, n: u64) {
        let mut used = self.used.lock();
        *used = used.saturating_sub(n);
        self.cv.notify_all();
    }
    pub fn used(&self) -> u64 {
        *self.used.lock()
    }
    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// Bound on blocks handed to the uploader and not yet stored (queued or being sent). More
/// than the uploader's parallelism buys no throughput, only memory.
pub struct Backlog {
    n: Mutex<usize>,
    cv: Condvar,
    cap: usize,
}

impl Backlog {
    pub fn new(cap: usize) -> Self {
        Backlog {
            n: Mutex::new(0),
            cv: Condvar::new(),
            cap: cap.max(1),
        }
    }
    /// Wait until there is room for one more block.
    pub fn wait_room(&self) {
        let mut n = self.n.lock();
        while *n >= self.cap {
            self.cv.wait(&mut n);
        }
    }
    fn add(&self) {
        *self.n.lock() += 1;
    }
    fn done(&self) {
        let mut n = self.n.lock();
        *n = n.saturating_sub(1);
        self.cv.notify_all();
    }
}

/// Objects stored but not yet made durable against a machine crash
/// ([`ObjectStore::sync`]), by inode: fsync(2) of a file syncs its objects; objects older
/// than a minute are synced in the background (cheap by then: the kernel has usually
/// written them back already), so the list stays short.
#[derive(Default)]
pub struct Unsynced {
    inner: Mutex<UnsyncedInner>,
}

#[derive(Default)]
struct UnsyncedInner {
    by_ino: std::collections::HashMap<Ino, Vec<String>>,
    order: std::collections::VecDeque<(Instant, Ino)>,
}

impl Unsynced {
    fn add(&self, ino: Ino, key: String) {
        let mut u = self.inner.lock();
        let keys = u.by_ino.entry(ino).or_default();
        let first = keys.is_empty();
        keys.push(key);
        if first {
            u.order.push_back((Instant::now(), ino));
        }
    }
    /// The objects of `ino` not yet synced.
    pub fn take(&self, ino: Ino) -> Vec<String> {
        self.inner.lock().by_ino.remove(&ino).unwrap_or_default()
    }
    /// The objects of files whose oldest unsynced object is older than `age`.
    pub fn take_older(&self, age: Duration) -> Vec<String> {
        let mut u = self.inner.lock();
        let mut out = Vec::new();
        while let Some(&(at, ino)) = u.order.front() {
            if at.elapsed() < age {
                break;
            }
            u.order.pop_front();
            if let Some(keys) = u.by_ino.remove(&ino) {
                out.extend(keys);
            }
        }
        out
    }
}

/// What a writer needs from the file system.
pub struct WriteCtx {
    pub meta: Arc<Meta>,
    pub store: Arc<dyn ObjectStore>,
    /// Stages written blocks for a later upload instead (`--writeback`), when enabled.
    pub writeback: Option<Arc<Writeback>>,
    pub reader: Arc<BlockReader>,
    pub uploads: Pool,
    pub budget: Arc<Budget>,
    pub backlog: Arc<Backlog>,
    pub unsynced: Arc<Unsynced>,
    pub metrics: Arc<Metrics>,
    pub volume: String,
    pub block_size: u32,
}

#[derive(Default)]
struct UploadState {
    /// Blocks of this file being uploaded.
    pending: usize,
    /// The first upload failure since the last flush.
    error: Option<String>,
    /// Budget bytes this file holds: taken by writes, given back as its blocks are stored.
    held: u64,
}

#[derive(Default)]
struct Uploads {
    state: Mutex<UploadState>,
    cv: Condvar,
}

struct OpenSlice {
    id: u64,
    pos: u32,
    len: u32,
    blocks: Vec<Vec<u8>>,
    /// Leading blocks already handed to the uploader.
    sent: u32,
}

#[derive(Default)]
struct WState {
    chunks: BTreeMap<u32, Vec<OpenSlice>>,
    /// End of the furthest write not yet committed (0 when nothing is pending).
    length: u64,
    dirty_since: Option<Instant>,
    acquired: u64,
    committing: bool,
}

/// Error of a flush: the data written since the last flush could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("upload failed: {0}")]
    Upload(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Why writes to a file are refused (see `FileWriter::refused`).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Quota,
    NoSpace,
}

pub struct FileWriter {
    pub ino: Ino,
    state: Mutex<WState>,
    /// A flush that failed in the background, reported by the next fsync/close.
    failed: Mutex<Option<FlushError>>,
    /// A commit of the file was refused for lack of room (a directory quota or the volume's
    /// capacity) and a write reported it: later writes fail the same way until the file is
    /// opened again or its size set, so a writer whose write was split into several requests
    /// (a short write, retried by the application) gets the error instead of writing past
    /// the dropped bytes.
    refused: Mutex<Option<Refusal>>,
    flush_lock: Mutex<()>,
    uploads: Arc<Uploads>,
}

impl FileWriter {
    pub fn new(ino: Ino) -> Self {
        FileWriter {
            ino,
            state: Mutex::new(WState::default()),
            failed: Mutex::new(None),
            refused: Mutex::new(None),
            flush_lock: Mutex::new(()),
            uploads: Arc::new(Uploads::default()),
        }
    }

    /// Length the file will have once pending writes are committed, if any are pending.
    pub fn pending_length(&self) -> Option<u64> {
        let st = self.state.lock();
        (st.dirty_since.is_some() || st.committing).then_some(st.length)
    }

    /// Bytes written since the last flush.
    pub fn buffered(&self) -> u64 {
        self.state.lock().acquired
    }

    pub fn dirty_since(&self) -> Option<Instant> {
        self.state.lock().dirty_since
    }

    /// Buffer `data` at file offset `off`.
    pub fn write(
        &self,
        ctx: &WriteCtx,
        off: u64,
        data: &[u8],
        pressure: &dyn Fn(),
    ) -> Result<(), MetaError> {
        if data.is_empty() {
            return Ok(());
        }
        let bs = ctx.block_size;
        // A write that fills a block hands it to the uploader: wait for room there first
        // (never while holding this file's state, which a flush needs).
        if data.len() as u64 + off % bs as u64 >= bs as u64 {
            ctx.backlog.wait_room();
        }
        ctx.budget.acquire(data.len() as u64, pressure);
        self.uploads.state.lock().held += data.len() as u64;
        ctx.metrics.buffer_bytes(data.len() as i64);
        let mut st = self.state.lock();
        st.acquired += data.len() as u64;
        let mut done = 0usize;
        while done < data.len() {
            let foff = off + done as u64;
            let indx = (foff / CHUNK_SIZE) as u32;
            let pos = (foff % CHUNK_SIZE) as u32;
            let n = (data.len() - done).min((CHUNK_SIZE - pos as u64) as usize);
            let reuse = matches!(st.chunks.get(&indx).and_then(|v| v.last()), Some(s)
                if pos >= s.pos && pos <= s.pos + s.len && pos - s.pos >= s.sent * bs);
            if !reuse {
                let id = match ctx.meta.new_slice_id() {
                    Ok(id) => id,
                    Err(e) => {
                        // Give back what this call took and did not buffer.
                        let unused = (data.len() - done) as u64;
                        st.acquired -= unused;
                        self.give_back(ctx, unused);
                        return Err(e);
                    }
                };
                st.chunks.entry(indx).or_default().push(OpenSlice {
                    id,
                    pos,
                    len: 0,
                    blocks: Vec::new(),
                    sent: 0,
                });
            }
            let Some(s) = st.chunks.get_mut(&indx).and_then(|v| v.last_mut()) else {
                return Err(MetaError::Invalid("no open slice"));
            };
            let mut rel = (pos - s.pos) as usize;
            let mut piece = &data[done..done + n];
            while !piece.is_empty() {
                let k = rel / bs as usize;
                let within = rel % bs as usize;
                let take = piece.len().min(bs as usize - within);
                if s.blocks.len() <= k {
                    s.blocks.resize_with(k + 1, Vec::new);
                }
                let b = &mut s.blocks[k];
                if b.capacity() == 0 {
                    *b = ctx.reader.buffers().take(bs as usize);
                }
                // Zeros only for a hole before `within`; bytes past the end are appended,
                // not zeroed first and then overwritten.
                if b.len() < within {
                    b.resize(within, 0);
                }
                let overlap = (b.len() - within).min(take);
                b[within..within + overlap].copy_from_slice(&piece[..overlap]);
                b.extend_from_slice(&piece[overlap..take]);
                piece = &piece[take..];
                rel += take;
            }
            s.len = s.len.max(rel as u32);
            let full = s.len / bs;
            while s.sent < full {
                let k = s.sent;
                let block = std::mem::take(&mut s.blocks[k as usize]);
                self.upload(ctx, s.id, k, block);
                s.sent += 1;
            }
            done += n;
        }
        st.length = st.length.max(off + data.len() as u64);
        st.dirty_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Give back up to `n` budget bytes this file holds.
    fn give_back(&self, ctx: &WriteCtx, n: u64) {
        give_back(&self.uploads, &ctx.budget, &ctx.metrics, n);
    }

    fn upload(&self, ctx: &WriteCtx, id: u64, k: u32, block: Vec<u8>) {
        let data = ctx.reader.buffers().freeze(block);
        let key = block_key(&ctx.volume, id, k, data.len() as u32);
        let writeback = ctx.writeback.clone().filter(|w| w.enabled());
        if writeback.is_none() {
            ctx.reader.insert(&key, data.clone());
        }
        self.uploads.state.lock().pending += 1;
        ctx.backlog.add();
        let store = ctx.store.clone();
        let reader = ctx.reader.clone();
        let uploads = self.uploads.clone();
        let (budget, backlog, metrics, unsynced) = (
            ctx.budget.clone(),
            ctx.backlog.clone(),
            ctx.metrics.clone(),
            ctx.unsynced.clone(),
        );
        let ino = self.ino;
        ctx.uploads.spawn(move || {
            let len = data.len() as u64;
            // Write-back: a staged block counts as stored (its upload comes later); one that
            // cannot be staged is uploaded now, as without write-back.
            let res = match &writeback {
                Some(wb) if wb.stage(&key, &data) => Ok(()),
                Some(_) => {
                    reader.insert(&key, data.clone());
                    store.put(&key, data)
                }
                None => store.put(&key, data),
            };
            backlog.done();
            give_back(&uploads, &budget, &metrics, len);
            let mut st = uploads.state.lock();
            st.pending -= 1;
            match res {
                Ok(()) => unsynced.add(ino, key),
                Err(e) => {
                    st.error.get_or_insert_with(|| format!("{key}: {e}"));
                }
            }
            uploads.cv.notify_all();
        });
    }

    /// Upload and commit everything buffered so far. Returns the chunks that received
    /// slices and how many. A failure is also remembered and reported once more by
    /// [`FileWriter::take_failure`] (the next fsync or close of the file).
    pub fn flush(&self, ctx: &WriteCtx) -> Result<Vec<(u32, usize)>, FlushError> {
        let res = self.flush_inner(ctx);
        if let Err(e) = &res {
            self.failed.lock().get_or_insert_with(|| match e {
                FlushError::Meta(MetaError::Quota) => FlushError::Meta(MetaError::Quota),
                FlushError::Meta(MetaError::NoSpace) => FlushError::Meta(MetaError::NoSpace),
                e => FlushError::Upload(e.to_string()),
            });
        }
        res
    }

    /// Remember a refused commit (`err` of the flush a write triggered) if it was for lack
    /// of room.
    pub fn note_refusal(&self, err: &FlushError) {
        let r = match err {
            FlushError::Meta(MetaError::Quota) => Refusal::Quota,
            FlushError::Meta(MetaError::NoSpace) => Refusal::NoSpace,
            _ => return,
        };
        *self.refused.lock() = Some(r);
    }

    /// The error of a remembered refusal, if any.
    pub fn refusal(&self) -> Option<MetaError> {
        self.refused.lock().map(|r| match r {
            Refusal::Quota => MetaError::Quota,
            Refusal::NoSpace => MetaError::NoSpace,
        })
    }

    /// Forget a refusal (the file was opened again or its size set).
    pub fn clear_refusal(&self) {
        self.refused.lock().take();
    }

    /// The failure of an earlier flush not yet reported to the application.
    pub fn take_failure(&self) -> Option<FlushError> {
        self.failed.lock().take()
    }

    /// Whether the writer holds nothing: no pending data and no unreported failure.
    pub fn idle(&self) -> bool {
        self.pending_length().is_none()
            && self.failed.lock().is_none()
            && self.refused.lock().is_none()
    }

    fn flush_inner(&self, ctx: &WriteCtx) -> Result<Vec<(u32, usize)>, FlushError> {
        let _guard = self.flush_lock.lock();
        let (chunks, length) = {
            let mut st = self.state.lock();
            if st.chunks.is_empty() {
                return Ok(Vec::new());
            }
            st.committing = true;
            st.dirty_since = None;
            st.acquired = 0;
            (std::mem::take(&mut st.chunks), st.length)
        };
        let bs = ctx.block_size;
        let mut list = Vec::new();
        let mut ids = Vec::new();
        let touched: Vec<(u32, usize)> = chunks.iter().map(|(i, s)| (*i, s.len())).collect();
        for (indx, slices) in chunks {
            for mut s in slices {
                let nblocks = s.len.div_ceil(bs);
                while s.sent < nblocks {
                    let k = s.sent;
                    let block = std::mem::take(&mut s.blocks[k as usize]);
                    self.upload(ctx, s.id, k, block);
                    s.sent += 1;
                }
                ids.push((s.id, s.len));
                list.push((
                    indx,
                    Slice {
                        seq: 0,
                        id: s.id,
                        size: s.len,
                        off: 0,
                        len: s.len,
                        pos: s.pos,
                    },
                ));
            }
        }
        let err = {
            let mut st = self.uploads.state.lock();
            while st.pending > 0 {
                self.uploads.cv.wait(&mut st);
            }
            st.error.take()
        };
        let res = match err {
            Some(e) => {
                let _ = ctx.meta.discard_slices(&ids);
                Err(FlushError::Upload(e))
            }
            None => match ctx.meta.write_slices(self.ino, &list, length) {
                Ok(Some(_)) => Ok(touched),
                Ok(None) => Ok(Vec::new()), // file deleted meanwhile: the slices are garbage
                Err(e) => {
                    let _ = ctx.meta.discard_slices(&ids);
                    Err(e.into())
                }
            },
        };
        let mut st = self.state.lock();
        st.committing = false;
        if st.chunks.is_empty() {
            st.length = 0;
            // Nothing of this file is buffered any more: what it still holds (bytes
            // written twice into one block count twice) goes back now.
            self.give_back(ctx, u64::MAX);
        }
        res
    }

    /// Forget pending length after a truncate (callers flush first).
    pub fn reset_length(&self) {
        let mut st = self.state.lock();
        if st.chunks.is_empty() {
            st.length = 0;
        }
    }
}

/// Give back up to `n` of the budget bytes `uploads`' file holds.
fn give_back(uploads: &Uploads, budget: &Budget, metrics: &Metrics, n: u64) {
    let give = {
        let mut st = uploads.state.lock();
        let g = n.min(st.held);
        st.held -= g;
        g
    };
    if give > 0 {
        budget.release(give);
        metrics.buffer_bytes(-(give as i64));
    }
}
