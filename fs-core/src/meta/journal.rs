//! The change journal (docs/FORMAT.md §15): which directories changed since a token, so
//! `strata sync --since` visits only those. [`JournalTxn`] wraps every write transaction of
//! [`Meta`], notes the directories its writes touch and appends them when it commits.

use std::collections::BTreeSet;

use super::{
    DirEntry, Entry, Ino, LockRange, LockSet, Meta, MetaError, Node, Quota, Result, Slice, Txn,
    now_ns,
};

/// Journal row kinds.
pub const KIND_DIR: u8 = 0;
/// A file with several links (`parent` = 0): its directories are not known.
pub const KIND_LINKED_FILE: u8 = 1;

const EPOCH: &str = "journal_epoch";
const HORIZON: &str = "journal_horizon";

/// What changed after a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Directories whose entries, or whose children, changed (ascending, deduplicated).
    pub dirs: Vec<Ino>,
    /// Files with several links that changed (their directories are not recorded).
    pub linked_files: Vec<Ino>,
    /// Token to pass next time.
    pub next: String,
}

/// A write transaction that records the directories it touches.
pub(crate) struct JournalTxn<'a> {
    inner: Box<dyn Txn + 'a>,
    dirs: BTreeSet<Ino>,
    linked: BTreeSet<Ino>,
    /// Inodes whose parent is looked up at commit (xattr, slice, symlink changes).
    inodes: BTreeSet<Ino>,
    /// Inodes this transaction deletes, for [`Meta`] once it ends.
    deleted: Vec<Ino>,
}

impl<'a> JournalTxn<'a> {
    pub(crate) fn new(inner: Box<dyn Txn + 'a>) -> Self {
        JournalTxn {
            inner,
            dirs: BTreeSet::new(),
            linked: BTreeSet::new(),
            inodes: BTreeSet::new(),
            deleted: Vec::new(),
        }
    }

    /// The inodes noted by [`Txn::note_deleted`] so far.
    pub(crate) fn take_deleted(&mut self) -> Vec<Ino> {
        std::mem::take(&mut self.deleted)
    }

    fn node_changed(&mut self, node: &Node) {
        if node.parent != 0 {
            self.dirs.insert(node.parent);
        } else {
            self.linked.insert(node.ino);
        }
        self.inodes.remove(&node.ino);
    }
}

impl Txn for JournalTxn<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let inodes = std::mem::take(&mut self.inodes);
        for ino in inodes {
            if let Some(n) = self.inner.get_node(ino)? {
                self.node_changed(&n);
            }
        }
        if !self.dirs.is_empty() || !self.linked.is_empty() {
            let rows: Vec<(Ino, u8)> = self
                .dirs
                .iter()
                .map(|d| (*d, KIND_DIR))
                .chain(self.linked.iter().map(|i| (*i, KIND_LINKED_FILE)))
                .collect();
            self.inner.journal_append(&rows, now_ns())?;
        }
        self.inner.commit()
    }

    fn get_setting(&mut self, name: &str) -> Result<Option<String>> {
        self.inner.get_setting(name)
    }
    fn set_setting(&mut self, name: &str, value: &str) -> Result<()> {
        self.inner.set_setting(name, value)
    }
    fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64> {
        self.inner.incr_counter(name, delta)
    }
    fn add_counter(&mut self, name: &str, delta: i64) -> Result<()> {
        self.inner.add_counter(name, delta)
    }
    fn get_counter(&mut self, name: &str) -> Result<i64> {
        self.inner.get_counter(name)
    }
    fn get_node(&mut self, ino: Ino) -> Result<Option<Node>> {
        self.inner.get_node(ino)
    }
    fn put_node(&mut self, node: &Node) -> Result<()> {
        self.node_changed(node);
        self.inner.put_node(node)
    }
    fn delete_node(&mut self, ino: Ino) -> Result<()> {
        self.inodes.remove(&ino);
        self.inner.delete_node(ino)
    }
    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        self.inner.get_edge(parent, name)
    }
    fn get_dir_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<DirEntry>> {
        self.inner.get_dir_entry(parent, name)
    }
    fn put_edge(&mut self, parent: Ino, entry: &Entry) -> Result<()> {
        self.dirs.insert(parent);
        self.inner.put_edge(parent, entry)
    }
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()> {
        self.dirs.insert(parent);
        self.inner.delete_edge(parent, name)
    }
    fn list_edges(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.inner.list_edges(parent, after, limit)
    }
    fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        self.inner.get_symlink(ino)
    }
    fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.inodes.insert(ino);
        self.inner.put_symlink(ino, target)
    }
    fn delete_symlink(&mut self, ino: Ino) -> Result<()> {
        self.inner.delete_symlink(ino)
    }
    fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get_xattr(ino, name)
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.inodes.insert(ino);
        self.inner.put_xattr(ino, name, value)
    }
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool> {
        self.inodes.insert(ino);
        self.inner.delete_xattr(ino, name)
    }
    fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.inner.list_xattrs(ino)
    }
    fn delete_xattrs(&mut self, ino: Ino) -> Result<()> {
        self.inner.delete_xattrs(ino)
    }
    fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>> {
        self.inner.chunk_slices(ino, indx)
    }
    fn add_slice(&mut self, ino: Ino, indx: u32, slice: &Slice) -> Result<()> {
        self.inodes.insert(ino);
        self.inner.add_slice(ino, indx, slice)
    }
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()> {
        self.inner.delete_slice(ino, indx, seq)
    }
    fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>> {
        self.inner.chunk_indexes(ino, from, limit)
    }
    fn note_deleted(&mut self, ino: Ino) -> bool {
        self.deleted.push(ino);
        true
    }
    fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()> {
        self.inner.add_reclaim(ino, length)
    }
    fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>> {
        self.inner.list_reclaim(limit)
    }
    fn delete_reclaim(&mut self, ino: Ino) -> Result<()> {
        self.inner.delete_reclaim(ino)
    }
    fn add_trim(&mut self, ino: Ino) -> Result<()> {
        self.inner.add_trim(ino)
    }
    fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>> {
        self.inner.list_trim(limit)
    }
    fn delete_trim(&mut self, ino: Ino) -> Result<()> {
        self.inner.delete_trim(ino)
    }
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()> {
        self.inner.add_garbage(id, size, due)
    }
    fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>> {
        self.inner.list_due_garbage(now, limit)
    }
    fn delete_garbage(&mut self, id: u64) -> Result<()> {
        self.inner.delete_garbage(id)
    }
    fn has_garbage(&mut self, id: u64) -> Result<bool> {
        self.inner.has_garbage(id)
    }
    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()> {
        self.inner.put_session(sid, heartbeat, info)
    }
    fn delete_session(&mut self, sid: u64) -> Result<()> {
        self.inner.delete_session(sid)
    }
    fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>> {
        self.inner.list_sessions()
    }
    fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.inner.add_sustained(sid, ino)
    }
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.inner.delete_sustained(sid, ino)
    }
    fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>> {
        self.inner.list_sustained(sid)
    }
    fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>> {
        self.inner.get_locks(ino)
    }
    fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()> {
        self.inner.put_locks(ino, sid, owner, ranges)
    }
    fn delete_session_locks(&mut self, sid: u64) -> Result<()> {
        self.inner.delete_session_locks(sid)
    }
    fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>> {
        self.inner.scan_nodes(after, limit)
    }
    fn scan_edges(
        &mut self,
        after: Option<(Ino, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(Ino, Entry)>> {
        self.inner.scan_edges(after, limit)
    }
    fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>> {
        self.inner.scan_slice_inodes(after, limit)
    }
    fn set_counter(&mut self, name: &str, value: i64) -> Result<()> {
        self.inner.set_counter(name, value)
    }
    fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>> {
        self.inner.get_quota(ino)
    }
    fn put_quota(&mut self, q: &Quota) -> Result<()> {
        self.inner.put_quota(q)
    }
    fn delete_quota(&mut self, ino: Ino) -> Result<()> {
        self.inner.delete_quota(ino)
    }
    fn list_quotas(&mut self) -> Result<Vec<Quota>> {
        self.inner.list_quotas()
    }
    fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()> {
        self.inner.journal_append(rows, at)
    }
    fn journal_position(&mut self) -> Result<u64> {
        self.inner.journal_position()
    }
    fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>> {
        self.inner.journal_since(pos, limit)
    }
    fn journal_trim(&mut self, before: i64) -> Result<u64> {
        self.inner.journal_trim(before)
    }
    fn backlog_add(&mut self, key: &str, at: i64) -> Result<()> {
        self.inner.backlog_add(key, at)
    }
    fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>> {
        self.inner.backlog_list(after, limit)
    }
    fn backlog_delete(&mut self, key: &str) -> Result<()> {
        self.inner.backlog_delete(key)
    }
    fn backlog_count(&mut self) -> Result<u64> {
        self.inner.backlog_count()
    }
}

fn parse_token(token: &str) -> Option<(&str, u64)> {
    let (epoch, pos) = token.split_once('.')?;
    Some((epoch, pos.parse().ok()?))
}

impl Meta {
    /// This database's journal epoch, created on first use.
    fn journal_epoch(&self) -> Result<String> {
        if let Some(e) = self.txn(false, |tx| tx.get_setting(EPOCH))? {
            return Ok(e);
        }
        self.txn(true, |tx| {
            if let Some(e) = tx.get_setting(EPOCH)? {
                return Ok(e);
            }
            let e = format!("{:016x}", rand::random::<u64>());
            tx.set_setting(EPOCH, &e)?;
            Ok(e)
        })
    }

    /// Current end of the change journal: pass it to a later [`Meta::changes_since`].
    pub fn change_token(&self) -> Result<String> {
        let epoch = self.journal_epoch()?;
        let pos = self.txn(false, |tx| tx.journal_position())?;
        Ok(format!("{epoch}.{pos}"))
    }

    /// Directories whose entries, or whose children's attributes, data, xattrs or links
    /// changed after `token`, and the token to continue from. At most `limit` directories
    /// (more is an error: the caller should do a full pass instead). Fails with
    /// [`MetaError::JournalTrimmed`] when the journal no longer reaches back to `token`.
    pub fn changes_since(&self, token: &str, limit: usize) -> Result<ChangeBatch> {
        let epoch = self.journal_epoch()?;
        let Some((e, pos)) = parse_token(token) else {
            return Err(MetaError::JournalTrimmed(format!(
                "{token:?} is not a change token (they look like 0123456789abcdef.42, printed by `strata sync`)"
            )));
        };
        if e != epoch {
            return Err(MetaError::JournalTrimmed(format!(
                "token {token} belongs to another metadata database (this one's journal epoch is {epoch}); do a full pass"
            )));
        }
        let (rows, next, horizon) = self.txn(false, |tx| {
            let horizon: u64 = tx
                .get_setting(HORIZON)?
                .and_then(|h| h.parse().ok())
                .unwrap_or(0);
            let next = tx.journal_position()?;
            let rows = tx.journal_since(pos, limit + 1)?;
            Ok((rows, next, horizon))
        })?;
        if pos < horizon {
            return Err(MetaError::JournalTrimmed(format!(
                "token {token} is older than the change journal keeps (it starts at {epoch}.{horizon}); do a full pass"
            )));
        }
        if rows.len() > limit {
            return Err(MetaError::JournalTrimmed(format!(
                "more than {limit} directories changed since {token}; do a full pass"
            )));
        }
        let mut batch = ChangeBatch {
            next: format!("{epoch}.{}", next.max(pos)),
            ..Default::default()
        };
        for (ino, kind) in rows {
            if ino == super::TRASH_INO {
                continue; // outside the tree
            }
            if kind == KIND_LINKED_FILE {
                batch.linked_files.push(ino);
            } else {
                batch.dirs.push(ino);
            }
        }
        batch.dirs.sort_unstable();
        batch.dirs.dedup();
        batch.linked_files.sort_unstable();
        batch.linked_files.dedup();
        Ok(batch)
    }

    /// Drop journal rows older than the configured retention; returns whether any went.
    pub fn trim_journal(&self) -> Result<bool> {
        let keep = self.settings.journal_days;
        if keep <= 0.0 {
            return Ok(false);
        }
        self.trim_journal_before(now_ns() - (keep * 86_400e9) as i64)
    }

    /// Drop journal rows committed before `before` (ns since the epoch).
    pub fn trim_journal_before(&self, before: i64) -> Result<bool> {
        self.txn(true, |tx| {
            let end = tx.journal_trim(before)?;
            if end == 0 {
                return Ok(false);
            }
            let old: u64 = tx
                .get_setting(HORIZON)?
                .and_then(|h| h.parse().ok())
                .unwrap_or(0);
            if end > old {
                tx.set_setting(HORIZON, &end.to_string())?;
            }
            Ok(true)
        })
    }
}
