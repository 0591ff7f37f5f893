//! In-process metadata engine for unit and property tests (`mem://`). Transactions take one
//! lock; a write transaction keeps a copy of the state to roll back to.

use std::collections::{BTreeMap, BTreeSet};

use parking_lot::{Mutex, MutexGuard};

use super::{Entry, Ino, LockRange, LockSet, MetaEngine, Node, Quota, Result, Slice, Txn};

#[derive(Clone, Default)]
struct State {
    settings: BTreeMap<String, String>,
    counters: BTreeMap<String, i64>,
    nodes: BTreeMap<Ino, Node>,
    edges: BTreeMap<(Ino, Vec<u8>), Entry>,
    symlinks: BTreeMap<Ino, Vec<u8>>,
    xattrs: BTreeMap<(Ino, Vec<u8>), Vec<u8>>,
    slices: BTreeMap<(Ino, u32, u64), Slice>,
    reclaim: BTreeMap<Ino, u64>,
    trim: BTreeSet<Ino>,
    garbage: BTreeMap<u64, (u32, i64)>,
    sessions: BTreeMap<u64, (i64, String)>,
    sustained: BTreeSet<(u64, Ino)>,
    locks: BTreeMap<(Ino, u64, u64), Vec<LockRange>>,
    quotas: BTreeMap<Ino, Quota>,
    /// Change journal: (position, ino, kind, at).
    journal: Vec<(u64, Ino, u8, i64)>,
    journal_next: u64,
    backlog: BTreeMap<String, i64>,
}

#[derive(Default)]
pub struct MemEngine {
    state: Mutex<State>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }
}

impl MetaEngine for MemEngine {
    fn kind(&self) -> &'static str {
        "mem"
    }
    fn describe(&self) -> String {
        "mem://".into()
    }
    fn init_schema(&self) -> Result<()> {
        Ok(())
    }
    fn drop_schema(&self) -> Result<()> {
        *self.state.lock() = State::default();
        Ok(())
    }
    fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>> {
        let guard = self.state.lock();
        let undo = if write { Some(guard.clone()) } else { None };
        Ok(Box::new(MemTxn { s: guard, undo }))
    }
}

struct MemTxn<'a> {
    s: MutexGuard<'a, State>,
    undo: Option<State>,
}

impl Drop for MemTxn<'_> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            *self.s = undo;
        }
    }
}

impl Txn for MemTxn<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.undo = None;
        Ok(())
    }
    fn get_setting(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self.s.settings.get(name).cloned())
    }
    fn set_setting(&mut self, name: &str, value: &str) -> Result<()> {
        self.s.settings.insert(name.into(), value.into());
        Ok(())
    }
    fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64> {
        let v = self.s.counters.entry(name.into()).or_insert(0);
        *v += delta;
        Ok(*v)
    }
    fn get_counter(&mut self, name: &str) -> Result<i64> {
        Ok(self.s.counters.get(name).copied().unwrap_or(0))
    }
    fn get_node(&mut self, ino: Ino) -> Result<Option<Node>> {
        Ok(self.s.nodes.get(&ino).cloned())
    }
    fn put_node(&mut self, node: &Node) -> Result<()> {
        self.s.nodes.insert(node.ino, node.clone());
        Ok(())
    }
    fn delete_node(&mut self, ino: Ino) -> Result<()> {
        self.s.nodes.remove(&ino);
        Ok(())
    }
    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        Ok(self.s.edges.get(&(parent, name.to_vec())).cloned())
    }
    fn put_edge(&mut self, parent: Ino, e: &Entry) -> Result<()> {
        self.s.edges.insert((parent, e.name.clone()), e.clone());
        Ok(())
    }
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()> {
        self.s.edges.remove(&(parent, name.to_vec()));
        Ok(())
    }
    fn list_edges(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        use std::ops::Bound;
        let lo = match after {
            Some(a) => Bound::Excluded((parent, a.to_vec())),
            None => Bound::Included((parent, Vec::new())),
        };
        Ok(self
            .s
            .edges
            .range((lo, Bound::Unbounded))
            .take_while(|((p, _), _)| *p == parent)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
    fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        Ok(self.s.symlinks.get(&ino).cloned())
    }
    fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.s.symlinks.insert(ino, target.to_vec());
        Ok(())
    }
    fn delete_symlink(&mut self, ino: Ino) -> Result<()> {
        self.s.symlinks.remove(&ino);
        Ok(())
    }
    fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.s.xattrs.get(&(ino, name.to_vec())).cloned())
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.s.xattrs.insert((ino, name.to_vec()), value.to_vec());
        Ok(())
    }
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool> {
        Ok(self.s.xattrs.remove(&(ino, name.to_vec())).is_some())
    }
    fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .s
            .xattrs
            .keys()
            .filter(|(i, _)| *i == ino)
            .map(|(_, n)| n.clone())
            .collect())
    }
    fn delete_xattrs(&mut self, ino: Ino) -> Result<()> {
        self.s.xattrs.retain(|(i, _), _| *i != ino);
        Ok(())
    }
    fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>> {
        Ok(self
            .s
            .slices
            .range((ino, indx, 0)..=(ino, indx, u64::MAX))
            .map(|(_, s)| *s)
            .collect())
    }
    fn add_slice(&mut self, ino: Ino, indx: u32, slice: &Slice) -> Result<()> {
        self.s.slices.insert((ino, indx, slice.seq), *slice);
        Ok(())
    }
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()> {
        self.s.slices.remove(&(ino, indx, seq));
        Ok(())
    }
    fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>> {
        let mut out: Vec<u32> = Vec::new();
        for (k, _) in self
            .s
            .slices
            .range((ino, from, 0)..=(ino, u32::MAX, u64::MAX))
        {
            if out.last() != Some(&k.1) {
                if out.len() == limit {
                    break;
                }
                out.push(k.1);
            }
        }
        Ok(out)
    }
    fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()> {
        self.s.reclaim.insert(ino, length);
        Ok(())
    }
    fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>> {
        Ok(self
            .s
            .reclaim
            .iter()
            .take(limit)
            .map(|(a, b)| (*a, *b))
            .collect())
    }
    fn delete_reclaim(&mut self, ino: Ino) -> Result<()> {
        self.s.reclaim.remove(&ino);
        Ok(())
    }
    fn add_trim(&mut self, ino: Ino) -> Result<()> {
        self.s.trim.insert(ino);
        Ok(())
    }
    fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>> {
        Ok(self.s.trim.iter().take(limit).copied().collect())
    }
    fn delete_trim(&mut self, ino: Ino) -> Result<()> {
        self.s.trim.remove(&ino);
        Ok(())
    }
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()> {
        self.s.garbage.insert(id, (size, due));
        Ok(())
    }
    fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>> {
        Ok(self
            .s
            .garbage
            .iter()
            .filter(|(_, (_, due))| *due <= now)
            .take(limit)
            .map(|(id, (size, _))| (*id, *size))
            .collect())
    }
    fn delete_garbage(&mut self, id: u64) -> Result<()> {
        self.s.garbage.remove(&id);
        Ok(())
    }
    fn has_garbage(&mut self, id: u64) -> Result<bool> {
        Ok(self.s.garbage.contains_key(&id))
    }
    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()> {
        self.s.sessions.insert(sid, (heartbeat, info.into()));
        Ok(())
    }
    fn delete_session(&mut self, sid: u64) -> Result<()> {
        self.s.sessions.remove(&sid);
        Ok(())
    }
    fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>> {
        Ok(self
            .s
            .sessions
            .iter()
            .map(|(k, (h, i))| (*k, *h, i.clone()))
            .collect())
    }
    fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.s.sustained.insert((sid, ino));
        Ok(())
    }
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.s.sustained.remove(&(sid, ino));
        Ok(())
    }
    fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>> {
        Ok(self
            .s
            .sustained
            .iter()
            .filter(|(s, _)| *s == sid)
            .map(|(_, i)| *i)
            .collect())
    }
    fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>> {
        Ok(self
            .s
            .locks
            .range((ino, 0, 0)..=(ino, u64::MAX, u64::MAX))
            .map(|((_, sid, owner), r)| LockSet {
                sid: *sid,
                owner: *owner,
                ranges: r.clone(),
            })
            .collect())
    }
    fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()> {
        if ranges.is_empty() {
            self.s.locks.remove(&(ino, sid, owner));
        } else {
            self.s.locks.insert((ino, sid, owner), ranges.to_vec());
        }
        Ok(())
    }
    fn delete_session_locks(&mut self, sid: u64) -> Result<()> {
        self.s.locks.retain(|(_, s, _), _| *s != sid);
        Ok(())
    }
    fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>> {
        use std::ops::Bound;
        Ok(self
            .s
            .nodes
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(limit)
            .map(|(_, n)| n.clone())
            .collect())
    }
    fn scan_edges(
        &mut self,
        after: Option<(Ino, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(Ino, Entry)>> {
        use std::ops::Bound;
        let lo = match after {
            Some((p, n)) => Bound::Excluded((p, n.to_vec())),
            None => Bound::Unbounded,
        };
        Ok(self
            .s
            .edges
            .range((lo, Bound::Unbounded))
            .take(limit)
            .map(|((p, _), e)| (*p, e.clone()))
            .collect())
    }
    fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>> {
        let mut out: Vec<Ino> = Vec::new();
        for (k, _) in self.s.slices.range((after + 1, 0, 0)..) {
            if out.last() != Some(&k.0) {
                if out.len() == limit {
                    break;
                }
                out.push(k.0);
            }
        }
        Ok(out)
    }
    fn set_counter(&mut self, name: &str, value: i64) -> Result<()> {
        self.s.counters.insert(name.into(), value);
        Ok(())
    }
    fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>> {
        Ok(self.s.quotas.get(&ino).copied())
    }
    fn put_quota(&mut self, q: &Quota) -> Result<()> {
        self.s.quotas.insert(q.ino, *q);
        Ok(())
    }
    fn delete_quota(&mut self, ino: Ino) -> Result<()> {
        self.s.quotas.remove(&ino);
        Ok(())
    }
    fn list_quotas(&mut self) -> Result<Vec<Quota>> {
        Ok(self.s.quotas.values().copied().collect())
    }
    fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()> {
        for (ino, kind) in rows {
            self.s.journal_next += 1;
            let pos = self.s.journal_next;
            self.s.journal.push((pos, *ino, *kind, at));
        }
        Ok(())
    }
    fn journal_position(&mut self) -> Result<u64> {
        Ok(self.s.journal_next + 1)
    }
    fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>> {
        let set: BTreeSet<(Ino, u8)> = self
            .s
            .journal
            .iter()
            .filter(|r| r.0 >= pos)
            .map(|r| (r.1, r.2))
            .collect();
        Ok(set.into_iter().take(limit).collect())
    }
    fn journal_trim(&mut self, before: i64) -> Result<u64> {
        let end = self
            .s
            .journal
            .iter()
            .filter(|r| r.3 < before)
            .map(|r| r.0 + 1)
            .max()
            .unwrap_or(0);
        self.s.journal.retain(|r| r.0 >= end);
        Ok(end)
    }
    fn backlog_add(&mut self, key: &str, at: i64) -> Result<()> {
        self.s.backlog.insert(key.to_string(), at);
        Ok(())
    }
    fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>> {
        use std::ops::Bound;
        Ok(self
            .s
            .backlog
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect())
    }
    fn backlog_delete(&mut self, key: &str) -> Result<()> {
        self.s.backlog.remove(key);
        Ok(())
    }
    fn backlog_count(&mut self) -> Result<u64> {
        Ok(self.s.backlog.len() as u64)
    }
}
