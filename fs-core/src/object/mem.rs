//! An in-memory store for unit tests.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use parking_lot::RwLock;

use super::{ObjectError, ObjectInfo, ObjectStore, Result};

/// Objects kept in a map in memory; lost when dropped.
#[derive(Debug, Default)]
pub struct MemStore {
    objects: RwLock<BTreeMap<String, Bytes>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of objects stored (tests).
    pub fn len(&self) -> usize {
        self.objects.read().len()
    }

    /// Whether the store holds no object.
    pub fn is_empty(&self) -> bool {
        self.objects.read().is_empty()
    }
}

/// The part of `data` at `off`, `len` bytes long at most (clamped to what exists).
pub(crate) fn slice_range(data: &Bytes, off: u64, len: Option<u64>) -> Bytes {
    let size = data.len() as u64;
    let start = off.min(size);
    let end = len.map_or(size, |l| start.saturating_add(l).min(size));
    data.slice(start as usize..end as usize)
}

impl ObjectStore for MemStore {
    fn describe(&self) -> String {
        "mem://".to_string()
    }

    fn init(&self) -> Result<()> {
        Ok(())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let objects = self.objects.read();
        let data = objects
            .get(key)
            .ok_or_else(|| ObjectError::NotFound(key.to_string()))?;
        Ok(slice_range(data, off, len))
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.objects.write().insert(key.to_string(), data);
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects.write().remove(key);
        Ok(())
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let objects = self.objects.read();
        let data = objects
            .get(key)
            .ok_or_else(|| ObjectError::NotFound(key.to_string()))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: data.len() as u64,
            modified: None,
        })
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        let objects = self.objects.read();
        let lower = match start_after {
            Some(s) if s >= prefix => Bound::Excluded(s.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        Ok(objects
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
                modified: None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        crate::testing::object_conformance(&MemStore::new(), "t/");
    }

    #[test]
    fn ranges_clamp() {
        let d = Bytes::from_static(b"0123456789");
        assert_eq!(&slice_range(&d, 2, Some(3))[..], b"234");
        assert_eq!(&slice_range(&d, 8, Some(5))[..], b"89");
        assert_eq!(&slice_range(&d, 12, None)[..], b"");
        assert_eq!(&slice_range(&d, 3, Some(u64::MAX))[..], b"3456789");
    }
}
