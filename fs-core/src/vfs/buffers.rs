//! Block-sized buffers used again instead of freed: a block written or fetched lives in a
//! buffer that goes back to this pool when the last reference to its bytes is dropped (the
//! upload finished, the memory cache evicted it). Fresh memory costs a page fault per page
//! on first touch; a reused buffer does not.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

pub struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    /// Most free buffers kept (memory held while idle: `keep` blocks).
    keep: usize,
}

impl Buffers {
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(Buffers {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// An empty buffer with room for exactly `size` bytes.
    pub fn take(&self, size: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock();
            match free.last() {
                Some(b) if b.capacity() == size => free.pop(),
                Some(_) => {
                    // The block size changed (another volume's blocks): start over.
                    free.clear();
                    None
                }
                None => None,
            }
        };
        reused.unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// The bytes of `buf`, which comes back here once they are dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock();
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    /// Free buffers held.
    pub fn idle(&self) -> usize {
        self.free.lock().len()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Buffers>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_their_bytes_are_dropped() {
        let pool = Buffers::new(2);
        let mut b = pool.take(1 << 20);
        assert_eq!(b.capacity(), 1 << 20);
        b.extend_from_slice(&[7u8; 1000]);
        let ptr = b.as_ptr();
        let bytes = pool.freeze(b);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        // At most `keep` buffers are kept; other sizes are not handed out.
        for _ in 0..3 {
            drop(pool.freeze(pool.take(1 << 20)));
        }
        let bufs: Vec<_> = (0..3).map(|_| pool.freeze(pool.take(1 << 20))).collect();
        drop(bufs);
        assert_eq!(pool.idle(), 2);
        assert_eq!(pool.take(4096).capacity(), 4096);
        assert_eq!(pool.idle(), 0);
    }
}
