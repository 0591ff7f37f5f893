//! The trash (docs/FORMAT.md §17): with `trash_days` > 0 in the volume settings, a file or
//! symlink whose last link is removed (unlink, or replaced by a rename) is moved into the
//! trash directory instead of being deleted; `strata restore` puts it back; the background
//! cleaner deletes what is older than `trash_days`.

use super::fs::{check_not_source, now_secs_of, space_of};
use super::{Entry, FileKind, Ino, Meta, MetaError, Node, Result, Txn, now_ns};

/// The trash directory: a stored directory outside the tree (no entry leads to it).
pub const TRASH_INO: Ino = 0x7FFF_FFFF_0000_0000;

/// One file in the trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    /// Unix seconds of the deletion.
    pub deleted: i64,
    /// The directory it was deleted from, and its name there.
    pub parent: Ino,
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
    pub length: u64,
    /// Its name in the trash directory.
    pub key: Vec<u8>,
}

/// `SECONDS-PARENT-INO-NAME`.
fn trash_name(deleted: i64, parent: Ino, ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut v = format!("{deleted:011}-{parent}-{ino}-").into_bytes();
    v.extend_from_slice(name);
    v
}

fn parse_name(key: &[u8]) -> Option<(i64, Ino, Ino, Vec<u8>)> {
    let mut parts = key.splitn(4, |b| *b == b'-');
    let num = |p: Option<&[u8]>| -> Option<u64> { std::str::from_utf8(p?).ok()?.parse().ok() };
    let deleted = num(parts.next())? as i64;
    let parent = num(parts.next())?;
    let ino = num(parts.next())?;
    Some((deleted, parent, ino, parts.next()?.to_vec()))
}

/// What `strata restore` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<(Ino, Vec<u8>)>,
    /// Entries that could not go back, with the reason.
    pub failed: Vec<(TrashEntry, String)>,
}

impl Meta {
    pub(crate) fn trash_days(&self) -> u32 {
        self.format_cached().map(|f| f.trash_days).unwrap_or(0)
    }

    /// Remove the last link of `n` (already unlinked from `parent`/`name`): into the trash
    /// when the volume keeps one and `n` is a file or symlink, else as usual.
    pub(crate) fn trash_or_drop(
        &self,
        tx: &mut dyn Txn,
        mut n: Node,
        parent: Ino,
        name: &[u8],
        now: i64,
    ) -> Result<()> {
        let keep = n.nlink <= 1
            && matches!(n.kind, FileKind::File | FileKind::Symlink)
            && check_not_source(&n).is_ok()
            && parent != TRASH_INO
            && self.trash_days() > 0;
        if !keep {
            return self.drop_link(tx, n, now);
        }
        if tx.get_node(TRASH_INO)?.is_none() {
            tx.put_node(&Node::empty_dir(TRASH_INO, TRASH_INO, 0o700, now))?;
        }
        let key = trash_name(now_secs_of(now), parent, n.ino, name);
        tx.put_edge(
            TRASH_INO,
            &Entry {
                name: key,
                ino: n.ino,
                kind: n.kind,
            },
        )?;
        n.parent = TRASH_INO;
        n.nlink = 1;
        n.ctime = now;
        tx.put_node(&n)
    }

    /// Every file in the trash, oldest first.
    pub fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.txn(false, |tx| {
                let edges = tx.list_edges(TRASH_INO, after.as_deref(), 1000)?;
                let mut v = Vec::with_capacity(edges.len());
                for e in edges {
                    let len = tx.get_node(e.ino)?.map(|n| n.length).unwrap_or(0);
                    v.push((e, len));
                }
                Ok(v)
            })?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.name.clone());
            for (e, length) in page {
                if let Some((deleted, parent, ino, name)) = parse_name(&e.name) {
                    out.push(TrashEntry {
                        deleted,
                        parent,
                        name,
                        ino,
                        kind: e.kind,
                        length,
                        key: e.name,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Put `entries` back where they were deleted from. A name taken meanwhile gets the
    /// suffix `.restored-INO`; a directory that is gone is reported, not recreated.
    pub fn trash_restore(&self, entries: &[TrashEntry]) -> Result<RestoreReport> {
        let qset = self.quota_dirs()?;
        let mut report = RestoreReport::default();
        for t in entries {
            let r = self.txn(true, |tx| {
                let Some(e) = tx.get_edge(TRASH_INO, &t.key)? else {
                    return Ok(Err("no longer in the trash".to_string()));
                };
                let Some(mut p) = tx.get_node(t.parent)? else {
                    return Ok(Err(format!(
                        "its directory (inode {}) was deleted too; restore is per file",
                        t.parent
                    )));
                };
                if p.kind != FileKind::Dir || p.parent == TRASH_INO {
                    return Ok(Err(format!("inode {} is not a directory", t.parent)));
                }
                check_not_source(&p)?;
                let mut name = t.name.clone();
                if tx.get_edge(t.parent, &name)?.is_some() {
                    name.extend_from_slice(format!(".restored-{}", t.ino).as_bytes());
                    if tx.get_edge(t.parent, &name)?.is_some() {
                        return Ok(Err(format!(
                            "{} exists already",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                }
                let mut n = tx.get_node(e.ino)?.ok_or(MetaError::NotFound)?;
                let chain = self.quota_chain(tx, t.parent, &qset)?;
                Self::quota_charge(tx, &chain, space_of(n.kind, n.length), 1)?;
                tx.delete_edge(TRASH_INO, &t.key)?;
                tx.put_edge(
                    t.parent,
                    &Entry {
                        name: name.clone(),
                        ino: n.ino,
                        kind: n.kind,
                    },
                )?;
                let now = now_ns();
                n.parent = t.parent;
                n.ctime = now;
                tx.put_node(&n)?;
                p.mtime = now;
                p.ctime = now;
                tx.put_node(&p)?;
                Ok(Ok(name))
            });
            match r {
                Ok(Ok(name)) => report.restored.push((t.parent, name)),
                Ok(Err(why)) => report.failed.push((t.clone(), why)),
                Err(MetaError::Quota) => report
                    .failed
                    .push((t.clone(), "the directory's quota is full".into())),
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Delete for good what went into the trash before `before` (unix seconds); their data
    /// is reclaimed in the background. Returns how many.
    pub fn trash_empty_before(&self, before: i64) -> Result<usize> {
        let mut n = 0;
        loop {
            let page = self.txn(false, |tx| tx.list_edges(TRASH_INO, None, 256))?;
            let due: Vec<Entry> = page
                .into_iter()
                .take_while(|e| parse_name(&e.name).is_some_and(|(d, ..)| d < before))
                .collect();
            if due.is_empty() {
                return Ok(n);
            }
            for e in due {
                let now = now_ns();
                self.txn(true, |tx| {
                    if tx.get_edge(TRASH_INO, &e.name)?.is_none() {
                        return Ok(());
                    }
                    tx.delete_edge(TRASH_INO, &e.name)?;
                    if let Some(node) = tx.get_node(e.ino)? {
                        self.drop_link(tx, node, now)?;
                    }
                    Ok(())
                })?;
                n += 1;
            }
        }
    }

    /// Empty what is older than the volume's `trash_days` (background cleaner).
    pub fn trash_expire(&self) -> Result<usize> {
        let days = self.trash_days();
        let has_trash = self.txn(false, |tx| Ok(tx.get_node(TRASH_INO)?.is_some()))?;
        if !has_trash {
            return Ok(0);
        }
        if days == 0 {
            // Switched off: everything that is left goes.
            return self.trash_empty_before(i64::MAX);
        }
        self.trash_empty_before(now_secs_of(now_ns()) - days as i64 * 86_400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trash_names_round_trip_with_dashes_in_the_name() {
        let k = trash_name(1_700_000_000, 42, 77, b"my-file-1.bin");
        assert_eq!(
            parse_name(&k),
            Some((1_700_000_000, 42, 77, b"my-file-1.bin".to_vec()))
        );
        assert!(parse_name(b"garbage").is_none());
        // Names sort by deletion time.
        assert!(trash_name(999, 9, 9, b"z") < trash_name(1000, 1, 1, b"a"));
    }
}
