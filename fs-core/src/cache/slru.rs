//! A segmented LRU index (keys and sizes only): new entries enter a probationary segment and
//! move to the protected segment when hit again. Eviction takes the oldest probationary entry
//! first, so one large scan (a dataset read once, a warm-up of a big tree) cannot push out the
//! blocks that are read over and over (a model file, a hot shard).

use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seg {
    Probation,
    Protected,
}

struct Slot {
    size: u64,
    tick: u64,
    seg: Seg,
}

/// The index. `cap` is in bytes; the protected segment holds at most `protected_share` of it.
pub struct Slru {
    slots: HashMap<String, Slot>,
    probation: BTreeMap<u64, String>,
    protected: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
    protected_bytes: u64,
    cap: u64,
    protected_cap: u64,
}

impl Slru {
    pub fn new(cap: u64) -> Self {
        Slru {
            slots: HashMap::new(),
            probation: BTreeMap::new(),
            protected: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            protected_bytes: 0,
            cap,
            protected_cap: cap / 5 * 4,
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn unlink(&mut self, key: &str) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        match slot.seg {
            Seg::Probation => {
                self.probation.remove(&slot.tick);
            }
            Seg::Protected => {
                self.protected.remove(&slot.tick);
                self.protected_bytes -= slot.size;
            }
        }
        self.bytes -= slot.size;
        Some(slot)
    }

    fn link(&mut self, key: String, size: u64, seg: Seg) {
        let tick = self.next_tick();
        match seg {
            Seg::Probation => {
                self.probation.insert(tick, key.clone());
            }
            Seg::Protected => {
                self.protected.insert(tick, key.clone());
                self.protected_bytes += size;
            }
        }
        self.bytes += size;
        self.slots.insert(key, Slot { size, tick, seg });
    }

    /// Make an entry the newest of its segment without promoting it (a use that is not a
    /// repeat hit); returns whether the key is present.
    pub fn refresh(&mut self, key: &str) -> bool {
        let Some(slot) = self.unlink(key) else {
            return false;
        };
        self.link(key.to_string(), slot.size, slot.seg);
        true
    }

    /// Record a hit: a probationary entry is promoted; returns whether the key is present.
    pub fn touch(&mut self, key: &str) -> bool {
        let Some(slot) = self.unlink(key) else {
            return false;
        };
        self.link(key.to_string(), slot.size, Seg::Protected);
        // Keep the protected segment within its share: its oldest go back on probation
        // (as the newest there, so they get another chance).
        while self.protected_bytes > self.protected_cap {
            let Some((_, k)) = self.protected.pop_first() else {
                break;
            };
            if let Some(s) = self.slots.remove(&k) {
                self.protected_bytes -= s.size;
                self.bytes -= s.size;
                self.link(k, s.size, Seg::Probation);
            }
        }
        true
    }

    /// Add (or replace) an entry on probation. Returns the keys evicted to make room, in
    /// eviction order. An entry larger than the whole capacity is not admitted (and is
    /// returned as evicted itself).
    pub fn insert(&mut self, key: &str, size: u64) -> Vec<String> {
        self.unlink(key);
        if size > self.cap {
            return vec![key.to_string()];
        }
        self.link(key.to_string(), size, Seg::Probation);
        self.evict_to(self.cap)
    }

    /// Add an entry found on disk at startup (oldest first), without promotion.
    pub fn restore(&mut self, key: &str, size: u64) {
        self.unlink(key);
        self.link(key.to_string(), size, Seg::Probation);
    }

    pub fn remove(&mut self, key: &str) -> bool {
        self.unlink(key).is_some()
    }

    /// Evict until at most `target` bytes are held; returns the evicted keys.
    pub fn evict_to(&mut self, target: u64) -> Vec<String> {
        let mut out = Vec::new();
        while self.bytes > target {
            let k = match self.probation.first_key_value() {
                Some((_, k)) => k.clone(),
                None => match self.protected.first_key_value() {
                    Some((_, k)) => k.clone(),
                    None => break,
                },
            };
            self.unlink(&k);
            out.push(k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_probationary_first() {
        let mut s = Slru::new(4);
        assert!(s.insert("a", 1).is_empty());
        assert!(s.insert("b", 1).is_empty());
        assert!(s.insert("c", 1).is_empty());
        assert!(s.insert("d", 1).is_empty());
        assert_eq!(s.insert("e", 1), vec!["a".to_string()]);
        assert_eq!(s.bytes(), 4);
        assert!(!s.contains("a"));
    }

    #[test]
    fn a_scan_does_not_evict_hot_entries() {
        let mut s = Slru::new(10);
        for k in ["hot1", "hot2", "hot3"] {
            s.insert(k, 1);
            assert!(s.touch(k));
        }
        // A scan of 100 cold entries read once.
        for i in 0..100 {
            s.insert(&format!("scan{i}"), 1);
        }
        for k in ["hot1", "hot2", "hot3"] {
            assert!(s.contains(k), "{k} was evicted by a scan");
        }
        assert_eq!(s.bytes(), 10);
    }

    #[test]
    fn protected_segment_is_bounded() {
        let mut s = Slru::new(10);
        for i in 0..10 {
            let k = format!("k{i}");
            s.insert(&k, 1);
            s.touch(&k);
        }
        assert!(s.protected_bytes <= 8);
        assert_eq!(s.bytes(), 10);
        // Demoted entries are still present and evictable first.
        let ev = s.insert("new", 1);
        assert_eq!(ev.len(), 1);
        assert!(s.contains("new"));
    }

    #[test]
    fn oversized_entries_are_not_admitted_and_sizes_add_up() {
        let mut s = Slru::new(5);
        assert_eq!(s.insert("big", 6), vec!["big".to_string()]);
        assert!(!s.contains("big"));
        s.insert("x", 3);
        s.insert("x", 2);
        assert_eq!(s.bytes(), 2);
        assert!(s.remove("x"));
        assert_eq!(s.bytes(), 0);
        assert!(s.is_empty());
    }
}
