//! `strata gc`: block objects of a volume that no metadata refers to — leftovers of clients
//! killed between uploading blocks and committing them (docs/FORMAT.md §4: such objects are
//! recorded nowhere). The store is listed first and the metadata scanned after, in one read
//! transaction, so an object committed while gc runs is seen as referenced; an object
//! uploaded but not yet committed looks unreferenced, which is why objects younger than
//! `min_age` are never touched (a writer commits within seconds: the flush interval plus the
//! upload). Objects already queued for deletion (the garbage queue) are left to the
//! background cleaner.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::meta::{Meta, MetaError};
use crate::object::{ObjectError, ObjectStore};

/// Settings of one gc run.
#[derive(Debug, Clone)]
pub struct GcSettings {
    /// Delete the orphans (otherwise only count them).
    pub delete: bool,
    /// Objects modified more recently than this are never orphans.
    pub min_age: Duration,
    /// Parallel deletes.
    pub threads: usize,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            delete: false,
            min_age: Duration::from_secs(3600),
            threads: 8,
        }
    }
}

/// What a gc run found (and deleted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Block objects listed.
    pub listed: u64,
    pub referenced: u64,
    /// In the garbage queue: deleted by the background cleaner after the grace period.
    pub queued: u64,
    /// Unreferenced but younger than `min_age`: left alone.
    pub young: u64,
    /// Unreferenced and old enough.
    pub orphans: u64,
    pub orphan_bytes: u64,
    pub deleted: u64,
    /// Objects under the volume's prefix whose name is not a block key: left alone.
    pub foreign: u64,
    /// A few orphan keys (for the dry run's listing).
    pub sample: Vec<String>,
}

/// Errors of gc, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("listing the object store failed: {0}")]
    List(ObjectError),
    #[error("scanning the metadata failed: {0}")]
    Meta(#[from] MetaError),
    #[error("{failed} deletes failed (first: {first}); run gc again")]
    Delete { failed: u64, first: String },
}

/// The slice id of a block key `{volume}/chunks/{a}/{b}/{id}_{k}_{len}`.
fn slice_id(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    let mut parts = name.split('_');
    let id = parts.next()?.parse().ok()?;
    let _k: u32 = parts.next()?.parse().ok()?;
    let _len: u32 = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(id)
}

/// Every slice id the metadata refers to, and the ids queued as garbage.
fn referenced(meta: &Meta) -> Result<(HashSet<u64>, HashSet<u64>), MetaError> {
    let engine = meta.engine();
    let mut tx = engine.begin(false)?;
    let mut ids = HashSet::new();
    let mut after = 0;
    loop {
        let inos = tx.scan_slice_inodes(after, 1000)?;
        for ino in &inos {
            let mut from = 0;
            loop {
                let idx = tx.chunk_indexes(*ino, from, 1000)?;
                for indx in &idx {
                    ids.extend(tx.chunk_slices(*ino, *indx)?.iter().map(|s| s.id));
                }
                match idx.last() {
                    Some(l) if idx.len() == 1000 => from = l + 1,
                    _ => break,
                }
            }
        }
        match inos.last() {
            Some(l) if inos.len() == 1000 => after = *l,
            _ => break,
        }
    }
    let queued = tx
        .list_due_garbage(i64::MAX, usize::MAX >> 1)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    Ok((ids, queued))
}

/// Find (and with `settings.delete`, delete) the orphaned block objects of `volume`.
pub fn gc(
    meta: &Meta,
    store: &dyn ObjectStore,
    volume: &str,
    settings: &GcSettings,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<GcReport, GcError> {
    let now = crate::meta::now_ns() / 1_000_000_000;
    let prefix = format!("{volume}/chunks/");
    // 1. The store, first.
    let mut objects = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list(&prefix, after.as_deref(), 1000)
            .map_err(GcError::List)?;
        let n = page.len();
        after = page.last().map(|o| o.key.clone());
        objects.extend(page);
        progress("listed", objects.len() as u64);
        if n < 1000 {
            break;
        }
    }
    // 2. Then the metadata.
    let (ids, queued) = referenced(meta)?;
    let mut report = GcReport {
        listed: objects.len() as u64,
        ..Default::default()
    };
    let min_age = settings.min_age.as_secs() as i64;
    let mut orphans = Vec::new();
    for o in objects {
        let Some(id) = slice_id(&o.key) else {
            report.foreign += 1;
            continue;
        };
        if ids.contains(&id) {
            report.referenced += 1;
        } else if queued.contains(&id) {
            report.queued += 1;
        } else if o.modified.is_some_and(|m| now - m < min_age) {
            report.young += 1;
        } else {
            report.orphans += 1;
            report.orphan_bytes += o.size;
            if report.sample.len() < 20 {
                report.sample.push(o.key.clone());
            }
            orphans.push(o.key);
        }
    }
    if !settings.delete || orphans.is_empty() {
        return Ok(report);
    }
    // 3. Delete, in parallel.
    let deleted = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first = Mutex::new(String::new());
    crate::object::for_each_parallel(&orphans, settings.threads, |key| match store.delete(key) {
        Ok(()) => {
            deleted.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            failed.fetch_add(1, Ordering::Relaxed);
            let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_empty() {
                *f = format!("{key}: {e}");
            }
        }
    });
    report.deleted = deleted.into_inner();
    progress("deleted", report.deleted);
    let failed = failed.into_inner();
    if failed > 0 {
        return Err(GcError::Delete {
            failed,
            first: first.into_inner().unwrap_or_else(|p| p.into_inner()),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_are_recognised_and_others_are_not() {
        assert_eq!(slice_id("v/chunks/0/1/1234_2_4096"), Some(1234));
        assert_eq!(slice_id("v/chunks/0/1/1234_2"), None);
        assert_eq!(slice_id("v/chunks/0/1/x_2_4096"), None);
        assert_eq!(slice_id("v/chunks/0/1/1_2_3_4"), None);
    }
}
