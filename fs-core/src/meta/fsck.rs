//! `strata fsck`: check the metadata invariants of a volume and, with `repair`, fix what is
//! safe to fix. Scans in pages (not one snapshot), so run `--repair` on a volume that no
//! client is changing; deletions of dangling entries and orphans re-check their finding in
//! their own transaction, link-count and counter repairs write the scanned values.

use std::collections::{HashMap, HashSet};

use super::fs::space_of;
use super::{Entry, FileKind, Ino, Meta, Node, ROOT_INO, Result};

const PAGE: usize = 10_000;

/// What fsck found and did.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub inodes: u64,
    pub entries: u64,
    pub problems: Vec<String>,
    pub repaired: usize,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Meta {
    /// Check every invariant of docs/FORMAT.md that can be checked from metadata alone.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        // Inodes.
        let mut nodes: HashMap<Ino, Node> = HashMap::new();
        let mut after = 0;
        loop {
            let page = self.txn(false, |tx| tx.scan_nodes(after, PAGE))?;
            let Some(last) = page.last() else { break };
            after = last.ino;
            for mut n in page {
                n.masks.clear();
                nodes.insert(n.ino, n);
            }
        }
        report.inodes = nodes.len() as u64;
        // Entries.
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        let mut dir_parent: HashMap<Ino, Ino> = HashMap::new();
        let mut dangling: Vec<(Ino, Entry)> = Vec::new();
        let mut cursor: Option<(Ino, Vec<u8>)> = None;
        loop {
            let page = self.txn(false, |tx| {
                tx.scan_edges(cursor.as_ref().map(|(p, n)| (*p, n.as_slice())), PAGE)
            })?;
            let Some((p, e)) = page.last() else { break };
            cursor = Some((*p, e.name.clone()));
            for (parent, e) in page {
                report.entries += 1;
                match nodes.get(&e.ino) {
                    None => dangling.push((parent, e)),
                    Some(n) => {
                        *links.entry(e.ino).or_insert(0) += 1;
                        if n.kind == FileKind::Dir {
                            *subdirs.entry(parent).or_insert(0) += 1;
                            dir_parent.insert(e.ino, parent);
                        }
                        if n.kind != e.kind {
                            report.problems.push(format!(
                                "entry {}/{} says {:?} but inode {} is {:?}",
                                parent,
                                String::from_utf8_lossy(&e.name),
                                e.kind,
                                e.ino,
                                n.kind
                            ));
                        }
                    }
                }
            }
        }
        for (parent, e) in &dangling {
            report.problems.push(format!(
                "entry {} in directory {} points to missing inode {}",
                String::from_utf8_lossy(&e.name),
                parent,
                e.ino
            ));
            if repair {
                let name = e.name.clone();
                let (parent, ino) = (*parent, e.ino);
                let fixed = self.txn(true, |tx| match tx.get_edge(parent, &name)? {
                    Some(cur) if cur.ino == ino && tx.get_node(ino)?.is_none() => {
                        tx.delete_edge(parent, &name)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                report.repaired += fixed as usize;
            }
        }
        // Sessions keep unlinked-but-open inodes alive.
        let mut sustained: HashSet<Ino> = HashSet::new();
        for (sid, _, _) in self.sessions()? {
            sustained.extend(self.txn(false, |tx| tx.list_sustained(sid))?);
        }
        // Link counts, orphans, parents, usage.
        let (mut space, mut count) = (0i64, 0i64);
        for n in nodes.values() {
            // The trash directory (§17) is outside the tree and outside the usage counters.
            if n.ino == super::TRASH_INO {
                continue;
            }
            if n.ino != ROOT_INO {
                // Files of attached sources are counted as inodes but hold no space.
                if super::check_not_source(n).is_ok() {
                    space += space_of(n.kind, n.length);
                }
                count += 1;
            }
            let have = links.get(&n.ino).copied().unwrap_or(0);
            if n.ino != ROOT_INO && have == 0 {
                if sustained.contains(&n.ino) && n.nlink == 0 {
                    continue;
                }
                report.problems.push(format!(
                    "inode {} ({:?}, nlink {}) is in no directory",
                    n.ino, n.kind, n.nlink
                ));
                if repair {
                    let ino = n.ino;
                    let fixed = self.txn(true, |tx| match tx.get_node(ino)? {
                        Some(cur)
                            if cur.kind != FileKind::Dir
                                || tx.list_edges(ino, None, 1)?.is_empty() =>
                        {
                            Self::destroy_node_pub(tx, &cur)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    })?;
                    report.repaired += fixed as usize;
                }
                continue;
            }
            let want = match n.kind {
                FileKind::Dir => 2 + subdirs.get(&n.ino).copied().unwrap_or(0),
                _ => have,
            };
            let want_parent = if n.ino == ROOT_INO {
                ROOT_INO
            } else {
                dir_parent.get(&n.ino).copied().unwrap_or(n.parent)
            };
            if n.nlink != want || (n.kind == FileKind::Dir && n.parent != want_parent) {
                report.problems.push(format!(
                    "inode {} ({:?}): nlink {} (expected {}), parent {} (expected {})",
                    n.ino, n.kind, n.nlink, want, n.parent, want_parent
                ));
                if repair {
                    let (ino, kind) = (n.ino, n.kind);
                    self.txn(true, |tx| {
                        if let Some(mut cur) = tx.get_node(ino)? {
                            cur.nlink = want;
                            if kind == FileKind::Dir {
                                cur.parent = want_parent;
                            }
                            tx.put_node(&cur)?;
                        }
                        Ok(())
                    })?;
                    report.repaired += 1;
                }
            }
        }
        // Data of inodes that no longer exist must be queued for reclaiming.
        let queued: HashSet<Ino> = self
            .txn(false, |tx| tx.list_reclaim(usize::MAX >> 1))?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let mut after = 0;
        loop {
            let page = self.txn(false, |tx| tx.scan_slice_inodes(after, PAGE))?;
            let Some(&last) = page.last() else { break };
            after = last;
            for ino in page {
                if !nodes.contains_key(&ino) && !queued.contains(&ino) {
                    report.problems.push(format!(
                        "slices of deleted inode {ino} are not queued for reclaiming"
                    ));
                    if repair {
                        self.txn(true, |tx| {
                            if tx.get_node(ino)?.is_none() {
                                tx.add_reclaim(ino, 0)?;
                            }
                            Ok(())
                        })?;
                        report.repaired += 1;
                    }
                }
            }
        }
        let (used_space, used_inodes) = self.txn(false, |tx| {
            Ok((
                tx.get_counter("used_space")?,
                tx.get_counter("used_inodes")?,
            ))
        })?;
        if used_space != space || used_inodes != count {
            report.problems.push(format!(
                "usage counters say {used_space} bytes / {used_inodes} inodes, the tree has {space} / {count}"
            ));
            if repair {
                self.txn(true, |tx| {
                    tx.set_counter("used_space", space)?;
                    tx.set_counter("used_inodes", count)
                })?;
                report.repaired += 1;
            }
        }
        Ok(report)
    }
}
