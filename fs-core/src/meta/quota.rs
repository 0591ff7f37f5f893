//! Directory quotas. A quota on directory D limits the bytes (`space_of`) and inodes of the
//! tree below D. Usage lives in the `dirquota` row and is changed in the same transaction as
//! the operation that changes the tree, so it stays exact with any number of clients; nested
//! quotas are all charged and the tightest one refuses (EDQUOT). The set of quota directories
//! is cached for two seconds: a quota set by another client binds this one within seconds.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fs::space_of;
use super::{FileKind, Ino, Meta, MetaError, Quota, ROOT_INO, Result, StatFs, Txn};

const REFRESH: Duration = Duration::from_secs(2);

impl Meta {
    /// Directories that carry a quota (cached).
    pub(crate) fn quota_dirs(&self) -> Result<Arc<HashSet<Ino>>> {
        {
            let c = self.quota_cache.lock();
            if let Some((at, set)) = c.as_ref()
                && at.elapsed() < REFRESH
            {
                return Ok(set.clone());
            }
        }
        let set: HashSet<Ino> = self
            .txn(false, |tx| tx.list_quotas())?
            .into_iter()
            .map(|q| q.ino)
            .collect();
        let set = Arc::new(set);
        *self.quota_cache.lock() = Some((Instant::now(), set.clone()));
        Ok(set)
    }

    fn invalidate_quota_cache(&self) {
        *self.quota_cache.lock() = None;
    }

    /// Quota directories at or above `dir`, nearest first.
    pub(crate) fn quota_chain(
        &self,
        tx: &mut dyn Txn,
        dir: Ino,
        set: &HashSet<Ino>,
    ) -> Result<Vec<Ino>> {
        let mut out = Vec::new();
        if set.is_empty() || dir == 0 {
            return Ok(out);
        }
        let mut cur = dir;
        for _ in 0..10_000 {
            if set.contains(&cur) {
                out.push(cur);
            }
            if cur == ROOT_INO {
                break;
            }
            cur = match tx.get_node(cur)? {
                Some(n) if n.parent != 0 => n.parent,
                _ => break,
            };
        }
        Ok(out)
    }

    /// Add `space`/`inodes` to every quota of `chain`, refusing (EDQUOT) growth past a limit.
    pub(crate) fn quota_charge(
        tx: &mut dyn Txn,
        chain: &[Ino],
        space: i64,
        inodes: i64,
    ) -> Result<()> {
        for &d in chain {
            let Some(mut q) = tx.get_quota(d)? else {
                continue;
            };
            if (space > 0 && q.max_space > 0 && q.used_space + space > q.max_space as i64)
                || (inodes > 0 && q.max_inodes > 0 && q.used_inodes + inodes > q.max_inodes as i64)
            {
                return Err(MetaError::Quota);
            }
            q.used_space += space;
            q.used_inodes += inodes;
            tx.put_quota(&q)?;
        }
        Ok(())
    }

    /// Usage of the tree below `dir` (not counting `dir` itself), by walking it.
    pub fn tree_usage(&self, dir: Ino) -> Result<(i64, i64)> {
        let (mut space, mut inodes) = (0i64, 0i64);
        let mut queue = VecDeque::from([dir]);
        let mut seen = HashSet::new();
        while let Some(d) = queue.pop_front() {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self.readdir(d, after.as_deref(), 1000)?;
                let Some(last) = page.last() else { break };
                after = Some(last.name.clone());
                for e in page {
                    if !seen.insert(e.ino) {
                        continue; // a hard link counted already
                    }
                    let n = self.getattr(e.ino)?;
                    if super::check_not_source(&n).is_err() {
                        // An attached source's tree: not stored in the volume, not charged.
                        continue;
                    }
                    space += space_of(n.kind, n.length);
                    inodes += 1;
                    if n.kind == FileKind::Dir {
                        queue.push_back(e.ino);
                    }
                }
            }
        }
        Ok((space, inodes))
    }

    /// Set (or change) the limits of directory `dir` (0 = no limit on that axis). Usage is
    /// computed from the tree when the quota is new.
    pub fn set_quota(&self, dir: Ino, max_space: u64, max_inodes: u64) -> Result<Quota> {
        let n = self.getattr(dir)?;
        if n.kind != FileKind::Dir {
            return Err(MetaError::NotDir);
        }
        let existing = self.txn(false, |tx| tx.get_quota(dir))?;
        let q = match existing {
            Some(_) => self.txn(true, |tx| {
                // Read and write in one transaction so concurrent usage changes are kept.
                let mut q = tx.get_quota(dir)?.ok_or(MetaError::NotFound)?;
                q.max_space = max_space;
                q.max_inodes = max_inodes;
                tx.put_quota(&q)?;
                Ok(q)
            })?,
            None => {
                // Register first (so concurrent changes are charged), then add what existed.
                let q = Quota {
                    ino: dir,
                    max_space,
                    max_inodes,
                    used_space: 0,
                    used_inodes: 0,
                };
                self.txn(true, |tx| tx.put_quota(&q))?;
                self.invalidate_quota_cache();
                let (space, inodes) = self.tree_usage(dir)?;
                self.txn(true, |tx| {
                    let mut cur = tx.get_quota(dir)?.ok_or(MetaError::NotFound)?;
                    cur.used_space += space;
                    cur.used_inodes += inodes;
                    tx.put_quota(&cur)?;
                    Ok(cur)
                })?
            }
        };
        self.invalidate_quota_cache();
        Ok(q)
    }

    pub fn get_quota(&self, dir: Ino) -> Result<Option<Quota>> {
        self.txn(false, |tx| tx.get_quota(dir))
    }

    pub fn list_quotas(&self) -> Result<Vec<Quota>> {
        self.txn(false, |tx| tx.list_quotas())
    }

    pub fn delete_quota(&self, dir: Ino) -> Result<()> {
        self.txn(true, |tx| tx.delete_quota(dir))?;
        self.invalidate_quota_cache();
        Ok(())
    }

    /// Recompute the usage of a quota from its tree; with `repair`, store it. Returns the
    /// stored and the recomputed quota.
    pub fn check_quota(&self, dir: Ino, repair: bool) -> Result<(Quota, Quota)> {
        let stored = self.get_quota(dir)?.ok_or(MetaError::NotFound)?;
        let (space, inodes) = self.tree_usage(dir)?;
        let actual = Quota {
            used_space: space,
            used_inodes: inodes,
            ..stored
        };
        if repair && actual != stored {
            self.txn(true, |tx| {
                let mut cur = tx.get_quota(dir)?.ok_or(MetaError::NotFound)?;
                cur.used_space = space;
                cur.used_inodes = inodes;
                tx.put_quota(&cur)
            })?;
        }
        Ok((stored, actual))
    }

    /// Whether file `ino` sits below a directory with a quota.
    pub fn under_quota(&self, ino: Ino) -> Result<bool> {
        let set = self.quota_dirs()?;
        if set.is_empty() {
            return Ok(false);
        }
        self.txn(false, |tx| {
            let parent = tx.get_node(ino)?.map(|n| n.parent).unwrap_or(0);
            Ok(!self.quota_chain(tx, parent, &set)?.is_empty())
        })
    }

    /// `statfs` seen from `ino`: the nearest quota at or above it when there is one (so `df`
    /// in a PVC or a tenant directory shows its limit), else the volume.
    pub fn statfs_at(&self, ino: Ino) -> Result<StatFs> {
        let vol = self.statfs()?;
        let set = self.quota_dirs()?;
        if set.is_empty() {
            return Ok(vol);
        }
        let q = self.txn(false, |tx| {
            let chain = self.quota_chain(tx, ino, &set)?;
            match chain.first() {
                Some(&d) => tx.get_quota(d),
                None => Ok(None),
            }
        })?;
        let Some(q) = q else { return Ok(vol) };
        let used = q.used_space.max(0) as u64;
        let iused = q.used_inodes.max(0) as u64;
        let total = if q.max_space > 0 {
            q.max_space
        } else {
            vol.total_space
        };
        let itotal = if q.max_inodes > 0 {
            q.max_inodes
        } else {
            iused + vol.avail_inodes
        };
        Ok(StatFs {
            total_space: total.max(used),
            avail_space: total.saturating_sub(used).min(vol.avail_space),
            used_inodes: iused,
            avail_inodes: itotal.saturating_sub(iused).min(vol.avail_inodes),
        })
    }
}
