//! Taking over a live FUSE connection from a client that died (`strata mount
//! --fuse-fd-socket`): the kernel keeps using the file handles and directory handles the old
//! process issued, so this process must accept handles it never issued, and must not issue
//! numbers the kernel still holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{FileHandle, Readahead, Result, Vfs};
use crate::meta::{Entry, Ino};

impl Vfs {
    /// Start issuing handles from a number no earlier client of the same connection used:
    /// the milliseconds since the epoch (31 bits) in the high half.
    pub fn set_handle_base_from_clock(&self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.next_fh
            .store(((ms & 0x7fff_ffff) << 32) | 1, Ordering::SeqCst);
    }

    /// Make sure open file `fh` of `ino` is known here: a handle issued by an earlier client
    /// of the connection is adopted as if it had been opened by this one (so that its
    /// release, locks and readahead work as usual).
    pub fn adopt_file_handle(&self, ino: Ino, fh: u64) {
        if fh == 0 {
            return;
        }
        if self.files.lock().contains_key(&fh) {
            return;
        }
        // A file of an attached source is known by its node: without it the handle's reads
        // would plan the file as one of the volume's own (no slices: zeros).
        if let Ok(n) = self.meta.getattr(ino) {
            self.note_node(&n);
        }
        let ext = self.ext_file_of(ino).ok().flatten();
        {
            let mut files = self.files.lock();
            if files.contains_key(&fh) {
                return;
            }
            files.insert(
                fh,
                Arc::new(FileHandle {
                    ino,
                    ra: Mutex::new(Readahead {
                        next: 0,
                        window: 0,
                        prefetched: 0,
                    }),
                    lock_owners: Mutex::new(Default::default()),
                    ext,
                }),
            );
        }
        tracing::debug!(ino, fh, "adopted a file handle of an earlier client");
        *self.open_counts.lock().entry(ino).or_insert(0) += 1;
        self.meta.open(ino);
    }

    /// Entries of open directory `fh`; a handle issued by an earlier client is listed again.
    pub(super) fn dir_entries(&self, ino: Ino, fh: u64) -> Result<Arc<Vec<Entry>>> {
        if let Some(e) = self.dirs.lock().get(&fh).cloned() {
            return Ok(e);
        }
        let tmp = self.opendir(ino)?;
        let mut dirs = self.dirs.lock();
        let entries = dirs.remove(&tmp).unwrap_or_default();
        dirs.insert(fh, entries.clone());
        tracing::debug!(ino, fh, "re-listed a directory handle of an earlier client");
        Ok(entries)
    }
}
