//! `strata dump` / `strata load`: the whole metadata of a volume as a stream of JSON lines
//! (docs/FORMAT.md §14), to move a volume between metadata engines (SQLite → PostgreSQL,
//! one PostgreSQL server to another) or keep a copy. A dump is read in one read transaction:
//! a consistent snapshot while mounts keep writing (what they commit afterwards is not in it).
//! A load goes into an empty metadata URL and writes the volume record last, so a load cut
//! short never looks like a volume. Sessions, their locks and files they hold open belong to
//! running clients and are not part of a dump: clients of the loaded copy start new ones.

use std::io::{BufRead, Write};

use base64::Engine as _;
use serde_json::{Value, json};

use super::{
    FileKind, Ino, Mask, Meta, MetaEngine, MetaError, Node, Quota, Slice, TRASH_INO, Txn, now_ns,
};

/// Version of the dump format (the first line's `strata_dump`).
pub const DUMP_VERSION: u64 = 1;
/// Counters a volume keeps (all of them are dumped).
const COUNTERS: [&str; 6] = [
    "next_inode",
    "next_slice",
    "next_session",
    "used_space",
    "used_inodes",
    "attach_ids",
];
/// Records written per transaction by a load.
const BATCH: usize = 2000;
const PAGE: usize = 1000;

/// Errors of a dump or load, naming what to do.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("line {line} of the dump: {msg}")]
    Bad { line: u64, msg: String },
    #[error(
        "the dump ends without its end record after {0} records: it was cut short (dump again; nothing usable was loaded)"
    )]
    Truncated(u64),
    #[error(
        "the target metadata already holds a volume: load into an empty database or SQLite file (a new URL)"
    )]
    TargetFormatted,
    #[error("the dump has format version {0}; this strata reads version 1: upgrade strata")]
    Version(u64),
}

/// What a dump or load moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    pub records: u64,
    pub nodes: u64,
    pub edges: u64,
    pub slices: u64,
}

impl std::fmt::Display for DumpStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records: {} inodes, {} entries, {} slices",
            self.records, self.nodes, self.edges, self.slices
        )
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(v: &Value, field: &str) -> Result<Vec<u8>, String> {
    let s = v[field]
        .as_str()
        .ok_or_else(|| format!("missing {field}"))?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("{field}: {e}"))
}

fn node_json(n: &Node) -> Value {
    json!({
        "t": "node", "ino": n.ino, "kind": n.kind.code(), "mode": n.mode, "uid": n.uid,
        "gid": n.gid, "atime": n.atime, "mtime": n.mtime, "ctime": n.ctime, "nlink": n.nlink,
        "length": n.length, "rdev": n.rdev, "parent": n.parent, "seq": n.seq,
        "masks": n.masks.iter().map(|m| [m.seq, m.start, m.end]).collect::<Vec<_>>(),
    })
}

fn u(v: &Value, f: &str) -> Result<u64, String> {
    v[f].as_u64().ok_or_else(|| format!("missing or bad {f}"))
}

fn i(v: &Value, f: &str) -> Result<i64, String> {
    v[f].as_i64().ok_or_else(|| format!("missing or bad {f}"))
}

fn node_of(v: &Value) -> Result<Node, String> {
    let kind = FileKind::from_code(u(v, "kind")? as u8).ok_or("bad kind")?;
    let masks = v["masks"]
        .as_array()
        .ok_or("missing masks")?
        .iter()
        .map(|m| {
            Some(Mask {
                seq: m.get(0)?.as_u64()?,
                start: m.get(1)?.as_u64()?,
                end: m.get(2)?.as_u64()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("bad masks")?;
    Ok(Node {
        ino: u(v, "ino")?,
        kind,
        mode: u(v, "mode")? as u32,
        uid: u(v, "uid")? as u32,
        gid: u(v, "gid")? as u32,
        atime: i(v, "atime")?,
        mtime: i(v, "mtime")?,
        ctime: i(v, "ctime")?,
        nlink: u(v, "nlink")? as u32,
        length: u(v, "length")?,
        rdev: u(v, "rdev")? as u32,
        parent: u(v, "parent")?,
        seq: u(v, "seq")?,
        masks,
    })
}

struct Out<'a> {
    w: &'a mut dyn Write,
    stats: DumpStats,
    progress: &'a mut dyn FnMut(&DumpStats),
}

impl Out<'_> {
    fn put(&mut self, v: Value) -> Result<(), DumpError> {
        serde_json::to_writer(&mut *self.w, &v).map_err(std::io::Error::other)?;
        self.w.write_all(b"\n")?;
        self.stats.records += 1;
        if self.stats.records.is_multiple_of(100_000) {
            (self.progress)(&self.stats);
        }
        Ok(())
    }
}

/// Write the metadata of the volume in `engine` to `w` (one read transaction).
pub fn dump(
    engine: &dyn MetaEngine,
    w: &mut dyn Write,
    progress: &mut dyn FnMut(&DumpStats),
) -> Result<DumpStats, DumpError> {
    let mut tx = engine.begin(false)?;
    let format = tx
        .get_setting("format")?
        .ok_or_else(|| MetaError::NotFormatted(engine.describe()))?;
    let mut out = Out {
        w,
        stats: DumpStats::default(),
        progress,
    };
    out.put(json!({"strata_dump": DUMP_VERSION, "dumped_at": now_ns(),
        "source": engine.describe()}))?;
    out.put(json!({"t": "setting", "name": "format", "value": format}))?;
    for c in COUNTERS {
        let v = tx.get_counter(c)?;
        out.put(json!({"t": "counter", "name": c, "value": v}))?;
    }
    for id in 1..=tx.get_counter("attach_ids")?.max(0) {
        let name = format!("attach/{id}");
        if let Some(v) = tx.get_setting(&name)? {
            out.put(json!({"t": "setting", "name": name, "value": v}))?;
        }
    }
    dump_nodes(tx.as_mut(), &mut out)?;
    let mut after: Option<(Ino, Vec<u8>)> = None;
    loop {
        let page = tx.scan_edges(after.as_ref().map(|(p, n)| (*p, n.as_slice())), PAGE)?;
        for (parent, e) in &page {
            out.put(
                json!({"t": "edge", "parent": parent, "name": b64(&e.name), "ino": e.ino,
                "kind": e.kind.code()}),
            )?;
            out.stats.edges += 1;
        }
        match page.last() {
            Some((p, e)) if page.len() == PAGE => after = Some((*p, e.name.clone())),
            _ => break,
        }
    }
    let mut after = 0;
    loop {
        let inos = tx.scan_slice_inodes(after, PAGE)?;
        for ino in &inos {
            let mut from = 0;
            loop {
                let idx = tx.chunk_indexes(*ino, from, PAGE)?;
                for indx in &idx {
                    for s in tx.chunk_slices(*ino, *indx)? {
                        out.put(json!({"t": "slice", "ino": ino, "indx": indx, "seq": s.seq,
                            "id": s.id, "size": s.size, "off": s.off, "len": s.len, "pos": s.pos}))?;
                        out.stats.slices += 1;
                    }
                }
                match idx.last() {
                    Some(l) if idx.len() == PAGE => from = l + 1,
                    _ => break,
                }
            }
        }
        match inos.last() {
            Some(l) if inos.len() == PAGE => after = *l,
            _ => break,
        }
    }
    for q in tx.list_quotas()? {
        out.put(json!({"t": "quota", "ino": q.ino, "max_space": q.max_space,
            "max_inodes": q.max_inodes, "used_space": q.used_space, "used_inodes": q.used_inodes}))?;
    }
    for (ino, len) in tx.list_reclaim(usize::MAX >> 1)? {
        out.put(json!({"t": "reclaim", "ino": ino, "length": len}))?;
    }
    for ino in tx.list_trim(usize::MAX >> 1)? {
        out.put(json!({"t": "trim", "ino": ino}))?;
    }
    for (id, size) in tx.list_due_garbage(i64::MAX, usize::MAX >> 1)? {
        out.put(json!({"t": "garbage", "id": id, "size": size}))?;
    }
    let records = out.stats.records;
    out.put(json!({"t": "end", "records": records}))?;
    out.w.flush()?;
    drop(tx);
    Ok(out.stats)
}

fn dump_nodes(tx: &mut dyn Txn, out: &mut Out<'_>) -> Result<(), DumpError> {
    let mut after = 0;
    loop {
        let page = tx.scan_nodes(after, PAGE)?;
        for n in &page {
            out.put(node_json(n))?;
            out.stats.nodes += 1;
            if n.kind == FileKind::Symlink
                && let Some(t) = tx.get_symlink(n.ino)?
            {
                out.put(json!({"t": "symlink", "ino": n.ino, "target": b64(&t)}))?;
            }
            for name in tx.list_xattrs(n.ino)? {
                if let Some(v) = tx.get_xattr(n.ino, &name)? {
                    out.put(json!({"t": "xattr", "ino": n.ino, "name": b64(&name),
                        "value": b64(&v)}))?;
                }
            }
        }
        match page.last() {
            Some(n) if page.len() == PAGE => after = n.ino,
            _ => return Ok(()),
        }
    }
}

/// Load a dump from `r` into the empty metadata of `engine` (tables created as needed).
pub fn load(
    engine: &dyn MetaEngine,
    r: &mut dyn BufRead,
    progress: &mut dyn FnMut(&DumpStats),
) -> Result<DumpStats, DumpError> {
    engine.init_schema()?;
    {
        let mut tx = engine.begin(false)?;
        if tx.get_setting("format")?.is_some_and(|f| !f.is_empty()) {
            return Err(DumpError::TargetFormatted);
        }
    }
    let mut stats = DumpStats::default();
    let mut format: Option<String> = None;
    let mut ended = false;
    let mut lineno = 0u64;
    let mut line = String::new();
    let mut batch: Vec<Value> = Vec::with_capacity(BATCH);
    let bad = |line: u64, msg: String| DumpError::Bad { line, msg };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        lineno += 1;
        let v: Value = serde_json::from_str(line.trim_end())
            .map_err(|e| bad(lineno, format!("not JSON: {e}")))?;
        if lineno == 1 {
            match v["strata_dump"].as_u64() {
                Some(DUMP_VERSION) => continue,
                Some(n) => return Err(DumpError::Version(n)),
                None => return Err(bad(1, "not a strata dump (no strata_dump header)".into())),
            }
        }
        if ended {
            return Err(bad(lineno, "records after the end record".into()));
        }
        match v["t"].as_str() {
            Some("end") => {
                if v["records"].as_u64() != Some(stats.records + 1) {
                    return Err(bad(lineno, "the record count does not match".into()));
                }
                ended = true;
                continue;
            }
            Some("setting") if v["name"] == "format" => {
                format = v["value"].as_str().map(str::to_string);
            }
            _ => batch.push(v),
        }
        stats.records += 1;
        if batch.len() >= BATCH {
            apply(engine, &batch, &mut stats, lineno).map_err(|e| bad(lineno, e))?;
            batch.clear();
            progress(&stats);
        }
    }
    if !ended {
        return Err(DumpError::Truncated(stats.records));
    }
    apply(engine, &batch, &mut stats, lineno).map_err(|e| bad(lineno, e))?;
    let format = format.ok_or_else(|| bad(lineno, "the dump holds no volume record".into()))?;
    let mut tx = engine.begin(true)?;
    tx.set_setting("format", &format)?;
    tx.commit()?;
    progress(&stats);
    Ok(stats)
}

fn apply(
    engine: &dyn MetaEngine,
    batch: &[Value],
    stats: &mut DumpStats,
    lineno: u64,
) -> Result<(), String> {
    let mut tx = engine.begin(true).map_err(|e| e.to_string())?;
    for v in batch {
        apply_one(tx.as_mut(), v, stats)
            .map_err(|e| format!("{e} (batch ending at line {lineno}): {v}"))?;
    }
    tx.commit().map_err(|e| e.to_string())
}

fn apply_one(tx: &mut dyn Txn, v: &Value, stats: &mut DumpStats) -> Result<(), String> {
    let m = |e: MetaError| e.to_string();
    match v["t"].as_str().unwrap_or_default() {
        "setting" => tx
            .set_setting(
                v["name"].as_str().ok_or("missing name")?,
                v["value"].as_str().ok_or("missing value")?,
            )
            .map_err(m),
        "counter" => tx
            .set_counter(v["name"].as_str().ok_or("missing name")?, i(v, "value")?)
            .map_err(m),
        "node" => {
            stats.nodes += 1;
            tx.put_node(&node_of(v)?).map_err(m)
        }
        "symlink" => tx
            .put_symlink(u(v, "ino")?, &unb64(v, "target")?)
            .map_err(m),
        "xattr" => tx
            .put_xattr(u(v, "ino")?, &unb64(v, "name")?, &unb64(v, "value")?)
            .map_err(m),
        "edge" => {
            stats.edges += 1;
            let kind = FileKind::from_code(u(v, "kind")? as u8).ok_or("bad kind")?;
            tx.put_edge(
                u(v, "parent")?,
                &super::Entry {
                    name: unb64(v, "name")?,
                    ino: u(v, "ino")?,
                    kind,
                },
            )
            .map_err(m)
        }
        "slice" => {
            stats.slices += 1;
            tx.add_slice(
                u(v, "ino")?,
                u(v, "indx")? as u32,
                &Slice {
                    seq: u(v, "seq")?,
                    id: u(v, "id")?,
                    size: u(v, "size")? as u32,
                    off: u(v, "off")? as u32,
                    len: u(v, "len")? as u32,
                    pos: u(v, "pos")? as u32,
                },
            )
            .map_err(m)
        }
        "quota" => tx
            .put_quota(&Quota {
                ino: u(v, "ino")?,
                max_space: u(v, "max_space")?,
                max_inodes: u(v, "max_inodes")?,
                used_space: i(v, "used_space")?,
                used_inodes: i(v, "used_inodes")?,
            })
            .map_err(m),
        "reclaim" => tx.add_reclaim(u(v, "ino")?, u(v, "length")?).map_err(m),
        "trim" => tx.add_trim(u(v, "ino")?).map_err(m),
        // Garbage keeps a grace period from the load on (readers of the old metadata may
        // still be reading those objects).
        "garbage" => tx
            .add_garbage(
                u(v, "id")?,
                u(v, "size")? as u32,
                now_ns() / 1_000_000_000 + 3600,
            )
            .map_err(m),
        other => Err(format!("unknown record type {other:?}")),
    }
}

// ------------------------------------------------------------------------------ catch-up

/// What [`catch_up`] applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Directories whose entries were compared and copied.
    pub dirs: u64,
    /// Inodes written (new or changed) and removed.
    pub written: u64,
    pub removed: u64,
    /// Token to pass to the next catch-up.
    pub next: String,
}

/// One inode with everything stored about it.
struct Full {
    node: super::Node,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    symlink: Option<Vec<u8>>,
    chunks: Vec<(u32, Vec<super::Slice>)>,
}

fn read_full(tx: &mut dyn super::Txn, ino: Ino) -> Result<Option<Full>, MetaError> {
    let Some(node) = tx.get_node(ino)? else {
        return Ok(None);
    };
    let mut xattrs = Vec::new();
    for name in tx.list_xattrs(ino)? {
        if let Some(v) = tx.get_xattr(ino, &name)? {
            xattrs.push((name, v));
        }
    }
    let symlink = tx.get_symlink(ino)?;
    let mut chunks = Vec::new();
    let mut from = 0;
    loop {
        let idx = tx.chunk_indexes(ino, from, PAGE)?;
        let Some(&last) = idx.last() else { break };
        for i in idx {
            chunks.push((i, tx.chunk_slices(ino, i)?));
        }
        if last == u32::MAX {
            break;
        }
        from = last + 1;
    }
    Ok(Some(Full {
        node,
        xattrs,
        symlink,
        chunks,
    }))
}

/// Replace what `dst` stores about `f.node.ino` with `f`.
fn write_full(tx: &mut dyn super::Txn, f: &Full) -> Result<(), MetaError> {
    let ino = f.node.ino;
    tx.put_node(&f.node)?;
    tx.delete_xattrs(ino)?;
    for (n, v) in &f.xattrs {
        tx.put_xattr(ino, n, v)?;
    }
    match &f.symlink {
        Some(t) => tx.put_symlink(ino, t)?,
        None => tx.delete_symlink(ino)?,
    }
    let mut from = 0;
    loop {
        let idx = tx.chunk_indexes(ino, from, PAGE)?;
        let Some(&last) = idx.last() else { break };
        for i in idx {
            for s in tx.chunk_slices(ino, i)? {
                tx.delete_slice(ino, i, s.seq)?;
            }
        }
        if last == u32::MAX {
            break;
        }
        from = last + 1;
    }
    for (i, slices) in &f.chunks {
        for s in slices {
            tx.add_slice(ino, *i, s)?;
        }
    }
    Ok(())
}

/// Apply to `dst` — a copy of `src` made by `strata load` from a dump taken after `since`
/// was current — what changed in `src` since then, as its change journal says
/// (docs/MIGRATION.md): each changed directory's entries and the inodes they lead to are
/// made equal, inodes gone from `src` are removed (their data queued for reclaiming, which
/// tolerates objects `src` deleted already), the usage and id counters and the garbage
/// queue are copied. Objects are shared: nothing is copied in the object store. Run it
/// repeatedly while clients write to `src`; the last run, with writers stopped, makes `dst`
/// equal to `src`.
pub fn catch_up(src: &Meta, dst: &Meta, since: &str) -> Result<CatchUp, DumpError> {
    let batch = src.changes_since(since, 10_000_000)?;
    let mut out = CatchUp {
        next: batch.next.clone(),
        ..Default::default()
    };
    let mut dirs: Vec<Ino> = batch.dirs.clone();
    // The trash is outside the journal; its entries are compared every time.
    if src.txn(false, |tx| tx.get_node(TRASH_INO))?.is_some() {
        dirs.push(TRASH_INO);
    }
    dirs.sort_unstable();
    for d in dirs {
        // The directory, its entries and every inode they lead to, from one snapshot.
        let (dir, entries, children) = src.txn(false, |tx| {
            let dir = read_full(tx, d)?;
            let mut entries = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = tx.list_edges(d, after.as_deref(), PAGE)?;
                let Some(last) = page.last() else { break };
                after = Some(last.name.clone());
                entries.extend(page);
            }
            let mut children = Vec::new();
            for e in &entries {
                if e.kind != FileKind::Dir
                    && let Some(f) = read_full(tx, e.ino)?
                {
                    children.push(f);
                } else if e.kind == FileKind::Dir
                    && let Some(n) = tx.get_node(e.ino)?
                {
                    // A directory's own row (its entries come with its own journal row).
                    children.push(Full {
                        node: n,
                        xattrs: tx
                            .list_xattrs(e.ino)?
                            .into_iter()
                            .filter_map(|k| match tx.get_xattr(e.ino, &k) {
                                Ok(Some(v)) => Some(Ok((k, v))),
                                Ok(None) => None,
                                Err(e) => Some(Err(e)),
                            })
                            .collect::<Result<_, _>>()?,
                        symlink: None,
                        chunks: Vec::new(),
                    });
                }
            }
            Ok((dir, entries, children))
        })?;
        out.dirs += 1;
        let src_gone: Vec<Ino> = {
            // Inodes the destination's entries of `d` lead to that `src` no longer has.
            let dst_entries = dst.txn(false, |tx| {
                let mut v = Vec::new();
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = tx.list_edges(d, after.as_deref(), PAGE)?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.name.clone());
                    v.extend(page);
                }
                Ok(v)
            })?;
            let mut gone = Vec::new();
            for e in &dst_entries {
                if !entries.iter().any(|s| s.ino == e.ino)
                    && src.txn(false, |tx| tx.get_node(e.ino))?.is_none()
                {
                    gone.push(e.ino);
                }
            }
            gone
        };
        let (w, r) = dst.txn(true, |tx| {
            let (mut w, mut r) = (0u64, 0u64);
            match &dir {
                Some(dir) => {
                    write_full(tx, dir)?;
                    w += 1;
                }
                // Removed in `src` (its parent's pass drops its entry): its entries go below.
                None => {
                    if tx.get_node(d)?.is_some() {
                        tx.delete_node(d)?;
                        tx.delete_xattrs(d)?;
                        r += 1;
                    }
                }
            }
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = tx.list_edges(d, after.as_deref(), PAGE)?;
                let Some(last) = page.last() else { break };
                after = Some(last.name.clone());
                for e in page {
                    if !entries.iter().any(|s| s.name == e.name && s.ino == e.ino) {
                        tx.delete_edge(d, &e.name)?;
                    }
                }
            }
            for e in &entries {
                tx.put_edge(d, e)?;
            }
            for c in &children {
                if c.node.kind == FileKind::Dir {
                    // Keep the destination's slices-free directory row in step.
                    tx.put_node(&c.node)?;
                    tx.delete_xattrs(c.node.ino)?;
                    for (n, v) in &c.xattrs {
                        tx.put_xattr(c.node.ino, n, v)?;
                    }
                } else {
                    write_full(tx, c)?;
                }
                w += 1;
            }
            for &ino in &src_gone {
                if let Some(n) = tx.get_node(ino)? {
                    tx.delete_node(ino)?;
                    tx.delete_xattrs(ino)?;
                    if n.kind == FileKind::Symlink {
                        tx.delete_symlink(ino)?;
                    }
                    if n.kind == FileKind::File {
                        tx.add_reclaim(ino, n.length)?;
                    }
                    r += 1;
                }
            }
            Ok((w, r))
        })?;
        out.written += w;
        out.removed += r;
    }
    // Files with several links: their rows (their entries came with their directories).
    for ino in batch.linked_files {
        let f = src.txn(false, |tx| read_full(tx, ino))?;
        if let Some(f) = f {
            dst.txn(true, |tx| write_full(tx, &f))?;
            out.written += 1;
        }
    }
    // Counters and the garbage queue (objects `src` will no longer delete once its
    // clients are gone).
    let (counters, garbage, quotas) = src.txn(false, |tx| {
        let mut c = Vec::new();
        for name in COUNTERS {
            c.push((name, tx.get_counter(name)?));
        }
        Ok((
            c,
            tx.list_due_garbage(i64::MAX, usize::MAX >> 1)?,
            tx.list_quotas()?,
        ))
    })?;
    let due = now_ns() / 1_000_000_000 + 3600;
    dst.txn(true, |tx| {
        for (name, v) in &counters {
            let cur = tx.get_counter(name)?;
            // Id counters only grow; usage counters follow the source.
            let v = if name.starts_with("next_") || *name == "attach_ids" {
                cur.max(*v)
            } else {
                *v
            };
            tx.set_counter(name, v)?;
        }
        for (id, size) in &garbage {
            tx.add_garbage(*id, *size, due)?;
        }
        for q in tx.list_quotas()? {
            if !quotas.iter().any(|s| s.ino == q.ino) {
                tx.delete_quota(q.ino)?;
            }
        }
        for q in &quotas {
            tx.put_quota(q)?;
        }
        Ok(())
    })?;
    Ok(out)
}
