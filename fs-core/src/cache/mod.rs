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
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            dirs: Vec::new(),
            disk_size: 0,
            free_space_ratio: 0.1,
            cache_written: true,
            random_whole_blocks: true,
            fetch_threads: 16,
            group: None,
            group_addr: None,
            no_serve: false,
            peer_timeout_ms: 2000,
            hot_replicas: 3,
            hot_threshold: 8,
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
}

impl MemCache {
    pub fn new(cap: u64) -> Self {
        MemCache {
            index: Slru::new(cap),
            data: HashMap::new(),
        }
    }

    pub fn get(&mut self, key: &str) -> Option<Bytes> {
        let b = self.data.get(key)?.clone();
        self.index.touch(key);
        Some(b)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.data.contains_key(key)
    }

    /// Insert; returns how many blocks were evicted.
    pub fn put(&mut self, key: &str, data: Bytes) -> usize {
        let evicted = self.index.insert(key, data.len() as u64);
        let mut n = 0;
        for k in &evicted {
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
        assert!(m.get("hot").is_some());
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
}
