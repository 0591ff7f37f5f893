//! The block cache: a bounded memory tier and a disk tier on this node ([`disk`]), and the
//! cache group shared by the mounts of several nodes ([`group`]). Blocks are immutable (a key
//! never changes content, see docs/FORMAT.md), so cached copies never need invalidation;
//! eviction is a segmented LRU ([`slru`]) that keeps re-read blocks over one-off scans.

pub mod disk;
pub mod group;
pub mod slru;
pub mod warmup;

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use slru::Slru;

/// Cache settings (mount options).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheSettings {
    /// Directories of the disk cache (`--cache-dir A:B`); none = no disk cache.
    pub dirs: Vec<PathBuf>,
    /// Bytes of disk cache in total (`--cache-size`, given in MiB); 0 = no disk cache.
    pub disk_size: u64,
    /// Share of the cache file system kept free (`--free-space-ratio`).
    pub free_space_ratio: f64,
    /// Also cache blocks this client writes (read-after-write and peers without a GET).
    pub cache_written: bool,
    /// Write-back (`--writeback`): written blocks are staged in the disk cache and uploaded
    /// after close/fsync return (see `vfs::writeback`).
    pub writeback: bool,
    /// Write-back: milliseconds a newly staged block waits before its upload
    /// (`--upload-delay`; 0 = upload at once).
    pub upload_delay_ms: u64,
    /// On a random (non-sequential) read of a block not cached, fetch and cache the whole
    /// block (default), or only the bytes asked for, uncached (`--random-read-ranges`: for
    /// large files read at random, e.g. embedding tables, where whole blocks waste transfer).
    pub random_whole_blocks: bool,
    /// Threads fetching blocks for readers (prefetches have their own).
    pub fetch_threads: usize,
    /// Cache group this mount belongs to (`--cache-group`).
    pub group: Option<String>,
    /// Where this member serves its peers (`--cache-group-addr HOST:PORT`); default: an
    /// ephemeral port on the node's address.
    pub group_addr: Option<String>,
    /// Join the group as a pure client (`--no-serve`).
    pub no_serve: bool,
    /// Milliseconds before a silent peer is given up on (the read then goes to the store).
    pub peer_timeout_ms: u64,
    /// Members that serve a hot block (the owner plus `hot_replicas - 1` others).
    pub hot_replicas: usize,
    /// Requests for one block within 10 s that make it hot.
    pub hot_threshold: u32,
    /// Members asked for a cached copy of a block before the object store, when this
    /// member is the one to fetch it (`--cache-group-handoff`; 0 = never).
    pub handoff_probes: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            dirs: Vec::new(),
            disk_size: 0,
            free_space_ratio: 0.1,
            cache_written: true,
            writeback: false,
            upload_delay_ms: 0,
            random_whole_blocks: true,
            fetch_threads: 16,
            group: None,
            group_addr: None,
            no_serve: false,
            peer_timeout_ms: 2000,
            hot_replicas: 3,
            hot_threshold: 8,
            handoff_probes: 3,
        }
    }
}

impl CacheSettings {
    /// Whether a disk tier is configured.
    pub fn disk_enabled(&self) -> bool {
        !self.dirs.is_empty() && self.disk_size > 0
    }
}

/// The memory tier: whole blocks, bounded in bytes, segmented LRU.
pub struct MemCache {
    index: Slru,
    data: HashMap<String, Bytes>,
    /// Blocks read ahead and not yet used: their first use is not a repeat hit.
    fresh: std::collections::HashSet<String>,
}

impl MemCache {
    pub fn new(cap: u64) -> Self {
        MemCache {
            index: Slru::new(cap),
            data: HashMap::new(),
            fresh: std::collections::HashSet::new(),
        }
    }

    /// The block; `hit`: this access counts as a use that may promote it (a reader starting
    /// on the block, not one continuing inside it, and not the first use of a block read
    /// ahead). Otherwise sequential readers, which touch each block several times, would
    /// fill the protected segment with blocks they are done with and push out the ones
    /// read ahead for them.
    pub fn get(&mut self, key: &str, hit: bool) -> Option<Bytes> {
        let b = self.data.get(key)?.clone();
        if hit && !self.fresh.remove(key) {
            self.index.touch(key);
        } else {
            // In use: the newest of its segment, so a reader's current block is not the
            // next one evicted.
            self.index.refresh(key);
        }
        Some(b)
    }

    /// Insert a block read ahead (see [`MemCache::get`]).
    pub fn put_fresh(&mut self, key: &str, data: Bytes) -> usize {
        let n = self.put(key, data);
        if self.data.contains_key(key) {
            self.fresh.insert(key.to_string());
        }
        n
    }

    pub fn contains(&self, key: &str) -> bool {
        self.data.contains_key(key)
    }

    /// Insert; returns how many blocks were evicted.
    pub fn put(&mut self, key: &str, data: Bytes) -> usize {
        let evicted = self.index.insert(key, data.len() as u64);
        let mut n = 0;
        for k in &evicted {
            self.fresh.remove(k);
            if self.data.remove(k).is_some() && k != key {
                n += 1;
            }
        }
        if self.index.contains(key) {
            self.data.insert(key.to_string(), data);
        }
        n
    }

    pub fn remove(&mut self, key: &str) {
        self.index.remove(key);
        self.data.remove(key);
        self.fresh.remove(key);
    }

    pub fn bytes(&self) -> u64 {
        self.index.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_tier_is_bounded_and_keeps_hot_blocks() {
        let mut m = MemCache::new(4096);
        m.put("hot", Bytes::from(vec![1u8; 1024]));
        assert!(m.get("hot", true).is_some());
        for i in 0..20 {
            m.put(&format!("scan{i}"), Bytes::from(vec![0u8; 1024]));
        }
        assert!(m.bytes() <= 4096);
        assert!(m.contains("hot"));
        assert_eq!(m.data.len(), m.index.len());
        // Larger than the whole tier: not admitted.
        assert_eq!(m.put("huge", Bytes::from(vec![0u8; 5000])), 0);
        assert!(!m.contains("huge"));
    }

    #[test]
    fn a_scan_does_not_promote_what_it_reads_ahead_or_continues() {
        let mut m = MemCache::new(10 * 1024);
        m.put("hot", Bytes::from(vec![1u8; 1024]));
        m.get("hot", true);
        // A sequential reader: each block read ahead, then used from its start and within.
        for i in 0..40 {
            let k = format!("seq{i}");
            m.put_fresh(&k, Bytes::from(vec![0u8; 1024]));
            assert!(m.get(&k, true).is_some(), "first use of a block read ahead");
            assert!(m.get(&k, false).is_some(), "continuing inside the block");
        }
        assert!(m.contains("hot"));
        assert!(m.fresh.len() <= m.data.len());
        // The scan stayed on probation: the protected segment holds only `hot`.
        m.put("x", Bytes::from(vec![0u8; 1024]));
        m.get("x", true);
        assert!(m.contains("hot") && m.contains("x"));
    }
}
