//! The data path's bounds: a writer faster than the object store waits for it instead of
//! buffering without limit; fsync makes the file's objects durable (the store's `sync`);
//! sequential readers sharing a small memory cache fetch (nearly) every block once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use strata::meta::{Ctx, MetaSettings, ROOT_INO};
use strata::object::{MemStore, ObjectInfo, ObjectStore, Result};
use strata::vfs::{Vfs, VfsSettings};

const BS: u32 = 64 << 10;

/// A memory store that counts requests, can be slow to accept puts, and records syncs.
#[derive(Default)]
struct Counting {
    inner: MemStore,
    put_delay: Duration,
    puts_done: AtomicUsize,
    gets: Mutex<std::collections::HashMap<String, usize>>,
    synced: Mutex<Vec<String>>,
}

impl ObjectStore for Counting {
    fn describe(&self) -> String {
        "counting".into()
    }
    fn init(&self) -> Result<()> {
        Ok(())
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        *self.gets.lock().entry(key.to_string()).or_default() += 1;
        self.inner.get(key, off, len)
    }
    fn sync(&self, keys: &[String]) -> Result<()> {
        self.synced.lock().extend(keys.iter().cloned());
        Ok(())
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        std::thread::sleep(self.put_delay);
        let r = self.inner.put(key, data);
        self.puts_done.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.inner.head(key)
    }
    fn list(&self, p: &str, s: Option<&str>, l: usize) -> Result<Vec<ObjectInfo>> {
        self.inner.list(p, s, l)
    }
}

fn vfs_over(store: Arc<Counting>, settings: VfsSettings) -> Arc<Vfs> {
    strata::testing::mem_vfs(store, BS, MetaSettings::default(), settings)
}

#[test]
fn a_writer_faster_than_the_store_waits_for_it() {
    let store = Arc::new(Counting {
        put_delay: Duration::from_millis(15),
        ..Counting::default()
    });
    let upload_threads = 2;
    let vfs = vfs_over(
        store.clone(),
        VfsSettings {
            upload_threads,
            buffer_size: 256 << 20, // far more than the test writes: only the backlog binds
            ..VfsSettings::default()
        },
    );
    let (n, fh) = vfs.create(Ctx::ROOT, ROOT_INO, b"big", 0o644).unwrap();
    let block = vec![7u8; BS as usize];
    let mut most_ahead = 0;
    for i in 0..40u64 {
        vfs.write(n.ino, i * BS as u64, &block).unwrap();
        let ahead = (i as usize + 1).saturating_sub(store.puts_done.load(Ordering::SeqCst));
        most_ahead = most_ahead.max(ahead);
    }
    // Blocks written but not yet stored: the uploads running and queued, never more than
    // the backlog (upload threads + 2) plus the one being handed over.
    assert!(
        most_ahead <= upload_threads + 3,
        "{most_ahead} blocks were held in memory ahead of the store"
    );
    vfs.release(n.ino, fh, None).unwrap();
    let (fh, _) = vfs.open(n.ino, false).unwrap();
    let got = vfs.read(n.ino, fh, 39 * BS as u64, BS).unwrap();
    assert!(got == block);
    vfs.shutdown();
}

#[test]
fn fsync_makes_the_files_objects_durable_close_does_not_wait_for_it() {
    let store = Arc::new(Counting::default());
    let vfs = vfs_over(store.clone(), VfsSettings::default());
    let (a, fa) = vfs.create(Ctx::ROOT, ROOT_INO, b"a", 0o644).unwrap();
    let (b, fb) = vfs.create(Ctx::ROOT, ROOT_INO, b"b", 0o644).unwrap();
    vfs.write(a.ino, 0, &vec![1u8; 3 * BS as usize]).unwrap();
    vfs.write(b.ino, 0, &vec![2u8; BS as usize]).unwrap();
    vfs.flush(b.ino).unwrap(); // close: stored and committed, not synced
    assert!(store.synced.lock().is_empty());
    vfs.fsync(a.ino).unwrap();
    let synced = store.synced.lock().clone();
    assert_eq!(synced.len(), 3, "{synced:?}");
    // Object keys name the slice: all three belong to a's one slice, none to b.
    let slice = |k: &String| {
        k.rsplit('/')
            .next()
            .unwrap()
            .split('_')
            .next()
            .unwrap()
            .to_string()
    };
    assert!(synced.iter().all(|k| slice(k) == slice(&synced[0])));
    // Unmounting syncs what is left (b's block).
    vfs.release(a.ino, fa, None).unwrap();
    vfs.release(b.ino, fb, None).unwrap();
    vfs.shutdown();
    assert_eq!(store.synced.lock().len(), 4);
}

#[test]
fn sequential_readers_sharing_a_small_memory_cache_fetch_blocks_once() {
    let store = Arc::new(Counting::default());
    let vfs = vfs_over(
        store.clone(),
        VfsSettings {
            mem_cache_size: 12 * BS as u64,
            max_readahead: 64 << 20, // far more than the cache: the share must bind
            ..VfsSettings::default()
        },
    );
    let blocks = 64u64;
    let mut files = Vec::new();
    for name in [&b"r1"[..], b"r2", b"r3"] {
        let (n, fh) = vfs.create(Ctx::ROOT, ROOT_INO, name, 0o644).unwrap();
        for i in 0..blocks {
            vfs.write(n.ino, i * BS as u64, &vec![i as u8; BS as usize])
                .unwrap();
        }
        vfs.release(n.ino, fh, None).unwrap();
        files.push(n.ino);
    }
    store.gets.lock().clear();
    let readers: Vec<_> = files
        .iter()
        .map(|&ino| {
            let vfs = vfs.clone();
            std::thread::spawn(move || {
                let (fh, _) = vfs.open(ino, false).unwrap();
                for i in 0..blocks * 4 {
                    let piece = BS as u64 / 4;
                    let got = vfs.read(ino, fh, i * piece, piece as u32).unwrap();
                    assert!(got.iter().all(|&b| b == (i / 4) as u8), "block {}", i / 4);
                }
                vfs.release(ino, fh, None).unwrap();
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let gets = store.gets.lock();
    let total: usize = gets.values().sum();
    assert_eq!(gets.len(), 3 * blocks as usize, "every block was read");
    // A block read ahead may now and then be pushed out before its reader gets there (the
    // readers' shares change as they start and stop), but never most of them.
    assert!(
        total * 10 <= gets.len() * 11,
        "{total} GETs for {} blocks: blocks read ahead were pushed out before use",
        gets.len()
    );
    drop(gets);
    vfs.shutdown();
}
