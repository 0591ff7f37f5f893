//! The embedded metadata engine: one SQLite database file in WAL mode. One writer
//! connection (SQLite allows one writer at a time) and a few reader connections so lookups
//! and reads proceed while a write transaction runs. Several processes may open the same file
//! (`busy_timeout` serializes their writers).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use super::{
    Entry, FileKind, Ino, LockRange, LockSet, MetaEngine, MetaError, Node, Quota, Result, Slice,
    Txn,
};

const READERS: usize = 4;

pub struct SqliteEngine {
    path: String,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

fn sql_err(e: rusqlite::Error) -> MetaError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    {
        return MetaError::Conflict;
    }
    MetaError::Engine(format!("sqlite: {e}"))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS setting (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node (
  ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
  uid INTEGER NOT NULL, gid INTEGER NOT NULL,
  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
  nlink INTEGER NOT NULL, length INTEGER NOT NULL, rdev INTEGER NOT NULL,
  parent INTEGER NOT NULL, seq INTEGER NOT NULL, masks BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS edge (parent INTEGER NOT NULL, name BLOB NOT NULL,
  ino INTEGER NOT NULL, kind INTEGER NOT NULL, PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS symlink (ino INTEGER PRIMARY KEY, target BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS xattr (ino INTEGER NOT NULL, name BLOB NOT NULL,
  value BLOB NOT NULL, PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slice (ino INTEGER NOT NULL, indx INTEGER NOT NULL,
  seq INTEGER NOT NULL, id INTEGER NOT NULL, size INTEGER NOT NULL, off INTEGER NOT NULL,
  len INTEGER NOT NULL, pos INTEGER NOT NULL, PRIMARY KEY (ino, indx, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reclaim (ino INTEGER PRIMARY KEY, length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trim (ino INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS garbage (id INTEGER PRIMARY KEY, size INTEGER NOT NULL,
  due INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS garbage_due ON garbage (due);
CREATE TABLE IF NOT EXISTS session (sid INTEGER PRIMARY KEY, heartbeat INTEGER NOT NULL,
  info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sustained (sid INTEGER NOT NULL, ino INTEGER NOT NULL,
  PRIMARY KEY (sid, ino)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plock (ino INTEGER NOT NULL, sid INTEGER NOT NULL,
  owner INTEGER NOT NULL, ranges BLOB NOT NULL, PRIMARY KEY (ino, sid, owner)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS plock_sid ON plock (sid);
CREATE TABLE IF NOT EXISTS dirquota (ino INTEGER PRIMARY KEY, max_space INTEGER NOT NULL,
  max_inodes INTEGER NOT NULL, used_space INTEGER NOT NULL, used_inodes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (pos INTEGER PRIMARY KEY AUTOINCREMENT, ino INTEGER NOT NULL,
  kind INTEGER NOT NULL, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS journal_at ON journal (at);
CREATE TABLE IF NOT EXISTS backlog (key TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
";

fn open_conn(path: &str) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| {
        MetaError::Format(format!(
            "cannot open SQLite database {path}: {e} (check that the directory exists and is writable)"
        ))
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql_err)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;",
    )
    .map_err(sql_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteEngine {
    /// Open (creating the file if needed) the database at `path`.
    pub fn open(path: &str) -> Result<Self> {
        if let Some(dir) = Path::new(path).parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            return Err(MetaError::Format(format!(
                "directory {} for the SQLite database does not exist: create it first",
                dir.display()
            )));
        }
        let writer = open_conn(path)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(Mutex::new(open_conn(path)?));
        }
        Ok(SqliteEngine {
            path: path.to_string(),
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        for r in &self.readers {
            if let Some(g) = r.try_lock() {
                return g;
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[i].lock()
    }
}

impl MetaEngine for SqliteEngine {
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    fn describe(&self) -> String {
        format!("sqlite://{}", self.path)
    }
    fn init_schema(&self) -> Result<()> {
        self.writer.lock().execute_batch(SCHEMA).map_err(sql_err)
    }
    fn drop_schema(&self) -> Result<()> {
        let sql: String = super::TABLES
            .iter()
            .map(|t| format!("DROP TABLE IF EXISTS {t};"))
            .collect();
        self.writer.lock().execute_batch(&sql).map_err(sql_err)
    }
    fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>> {
        let conn = if write {
            self.writer.lock()
        } else {
            self.reader()
        };
        conn.execute_batch(if write { "BEGIN IMMEDIATE" } else { "BEGIN" })
            .map_err(sql_err)?;
        Ok(Box::new(SqliteTxn { conn, done: false }))
    }
}

struct SqliteTxn<'a> {
    conn: MutexGuard<'a, Connection>,
    done: bool,
}

impl Drop for SqliteTxn<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

fn row_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    let kind: u8 = r.get(1)?;
    let masks: Vec<u8> = r.get(13)?;
    Ok(Node {
        ino: r.get::<_, i64>(0)? as u64,
        kind: FileKind::from_code(kind).unwrap_or(FileKind::File),
        mode: r.get(2)?,
        uid: r.get(3)?,
        gid: r.get(4)?,
        atime: r.get(5)?,
        mtime: r.get(6)?,
        ctime: r.get(7)?,
        nlink: r.get(8)?,
        length: r.get::<_, i64>(9)? as u64,
        rdev: r.get(10)?,
        parent: r.get::<_, i64>(11)? as u64,
        seq: r.get::<_, i64>(12)? as u64,
        masks: Node::decode_masks(&masks),
    })
}

fn row_quota(r: &rusqlite::Row<'_>) -> rusqlite::Result<Quota> {
    Ok(Quota {
        ino: r.get::<_, i64>(0)? as u64,
        max_space: r.get::<_, i64>(1)? as u64,
        max_inodes: r.get::<_, i64>(2)? as u64,
        used_space: r.get(3)?,
        used_inodes: r.get(4)?,
    })
}

fn row_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let kind: u8 = r.get(2)?;
    Ok(Entry {
        name: r.get(0)?,
        ino: r.get::<_, i64>(1)? as u64,
        kind: FileKind::from_code(kind).unwrap_or(FileKind::File),
    })
}

impl Txn for SqliteTxn<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(sql_err)?;
        self.done = true;
        Ok(())
    }

    fn get_setting(&mut self, name: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT value FROM setting WHERE name = ?1")
            .and_then(|mut s| s.query_row(params![name], |r| r.get(0)).optional())
            .map_err(sql_err)
    }
    fn set_setting(&mut self, name: &str, value: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO setting (name, value) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![name, value]))
            .map(|_| ())
            .map_err(sql_err)
    }
    fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO counter (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = value + ?2 RETURNING value",
            )
            .and_then(|mut s| s.query_row(params![name, delta], |r| r.get(0)))
            .map_err(sql_err)
    }

    fn get_counter(&mut self, name: &str) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT value FROM counter WHERE name = ?1")
            .and_then(|mut s| s.query_row(params![name], |r| r.get(0)).optional())
            .map(|v| v.unwrap_or(0))
            .map_err(sql_err)
    }

    fn get_node(&mut self, ino: Ino) -> Result<Option<Node>> {
        self.conn
            .prepare_cached(
                "SELECT ino, kind, mode, uid, gid, atime, mtime, ctime, nlink, length, rdev,
                 parent, seq, masks FROM node WHERE ino = ?1",
            )
            .and_then(|mut s| s.query_row(params![ino as i64], row_node).optional())
            .map_err(sql_err)
    }
    fn put_node(&mut self, n: &Node) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO node (ino, kind, mode, uid, gid, atime, mtime, ctime,
                 nlink, length, rdev, parent, seq, masks)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    n.ino as i64,
                    n.kind.code(),
                    n.mode,
                    n.uid,
                    n.gid,
                    n.atime,
                    n.mtime,
                    n.ctime,
                    n.nlink,
                    n.length as i64,
                    n.rdev,
                    n.parent as i64,
                    n.seq as i64,
                    n.encode_masks()
                ])
            })
            .map(|_| ())
            .map_err(sql_err)
    }
    fn delete_node(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM node WHERE ino = ?1", params![ino as i64])
    }

    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        self.conn
            .prepare_cached("SELECT name, ino, kind FROM edge WHERE parent = ?1 AND name = ?2")
            .and_then(|mut s| {
                s.query_row(params![parent as i64, name], row_entry)
                    .optional()
            })
            .map_err(sql_err)
    }
    fn put_edge(&mut self, parent: Ino, e: &Entry) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO edge (parent, name, ino, kind) VALUES (?1, ?2, ?3, ?4)",
            params![parent as i64, e.name, e.ino as i64, e.kind.code()],
        )
    }
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()> {
        self.exec(
            "DELETE FROM edge WHERE parent = ?1 AND name = ?2",
            params![parent as i64, name],
        )
    }
    fn list_edges(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let after = after.unwrap_or(b"");
        self.conn
            .prepare_cached(
                "SELECT name, ino, kind FROM edge WHERE parent = ?1 AND name > ?2
                 ORDER BY name LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![parent as i64, after, limit as i64], row_entry)?
                    .collect()
            })
            .map_err(sql_err)
    }

    fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT target FROM symlink WHERE ino = ?1")
            .and_then(|mut s| s.query_row(params![ino as i64], |r| r.get(0)).optional())
            .map_err(sql_err)
    }
    fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO symlink (ino, target) VALUES (?1, ?2)",
            params![ino as i64, target],
        )
    }
    fn delete_symlink(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM symlink WHERE ino = ?1", params![ino as i64])
    }

    fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT value FROM xattr WHERE ino = ?1 AND name = ?2")
            .and_then(|mut s| {
                s.query_row(params![ino as i64, name], |r| r.get(0))
                    .optional()
            })
            .map_err(sql_err)
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO xattr (ino, name, value) VALUES (?1, ?2, ?3)",
            params![ino as i64, name, value],
        )
    }
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool> {
        self.conn
            .prepare_cached("DELETE FROM xattr WHERE ino = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![ino as i64, name]))
            .map(|n| n > 0)
            .map_err(sql_err)
    }
    fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT name FROM xattr WHERE ino = ?1 ORDER BY name")
            .and_then(|mut s| s.query_map(params![ino as i64], |r| r.get(0))?.collect())
            .map_err(sql_err)
    }
    fn delete_xattrs(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM xattr WHERE ino = ?1", params![ino as i64])
    }

    fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>> {
        self.conn
            .prepare_cached(
                "SELECT seq, id, size, off, len, pos FROM slice WHERE ino = ?1 AND indx = ?2
                 ORDER BY seq",
            )
            .and_then(|mut s| {
                s.query_map(params![ino as i64, indx], |r| {
                    Ok(Slice {
                        seq: r.get::<_, i64>(0)? as u64,
                        id: r.get::<_, i64>(1)? as u64,
                        size: r.get(2)?,
                        off: r.get(3)?,
                        len: r.get(4)?,
                        pos: r.get(5)?,
                    })
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn add_slice(&mut self, ino: Ino, indx: u32, s: &Slice) -> Result<()> {
        self.exec(
            "INSERT INTO slice (ino, indx, seq, id, size, off, len, pos)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                ino as i64,
                indx,
                s.seq as i64,
                s.id as i64,
                s.size,
                s.off,
                s.len,
                s.pos
            ],
        )
    }
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()> {
        self.exec(
            "DELETE FROM slice WHERE ino = ?1 AND indx = ?2 AND seq = ?3",
            params![ino as i64, indx, seq as i64],
        )
    }
    fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>> {
        self.conn
            .prepare_cached(
                "SELECT DISTINCT indx FROM slice WHERE ino = ?1 AND indx >= ?2
                 ORDER BY indx LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![ino as i64, from, limit as i64], |r| r.get(0))?
                    .collect()
            })
            .map_err(sql_err)
    }

    fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO reclaim (ino, length) VALUES (?1, ?2)",
            params![ino as i64, length as i64],
        )
    }
    fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>> {
        self.conn
            .prepare_cached("SELECT ino, length FROM reclaim ORDER BY ino LIMIT ?1")
            .and_then(|mut s| {
                s.query_map(params![limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn delete_reclaim(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM reclaim WHERE ino = ?1", params![ino as i64])
    }
    fn add_trim(&mut self, ino: Ino) -> Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO trim (ino) VALUES (?1)",
            params![ino as i64],
        )
    }
    fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>> {
        self.conn
            .prepare_cached("SELECT ino FROM trim ORDER BY ino LIMIT ?1")
            .and_then(|mut s| {
                s.query_map(params![limit as i64], |r| Ok(r.get::<_, i64>(0)? as u64))?
                    .collect()
            })
            .map_err(sql_err)
    }
    fn delete_trim(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM trim WHERE ino = ?1", params![ino as i64])
    }
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO garbage (id, size, due) VALUES (?1, ?2, ?3)",
            params![id as i64, size, due],
        )
    }
    fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>> {
        self.conn
            .prepare_cached("SELECT id, size FROM garbage WHERE due <= ?1 ORDER BY due LIMIT ?2")
            .and_then(|mut s| {
                s.query_map(params![now, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn delete_garbage(&mut self, id: u64) -> Result<()> {
        self.exec("DELETE FROM garbage WHERE id = ?1", params![id as i64])
    }
    fn has_garbage(&mut self, id: u64) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM garbage WHERE id = ?1")
            .and_then(|mut s| s.exists(params![id as i64]))
            .map_err(sql_err)
    }

    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO session (sid, heartbeat, info) VALUES (?1, ?2, ?3)",
            params![sid as i64, heartbeat, info],
        )
    }
    fn delete_session(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM session WHERE sid = ?1", params![sid as i64])
    }
    fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>> {
        self.conn
            .prepare_cached("SELECT sid, heartbeat, info FROM session ORDER BY sid")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO sustained (sid, ino) VALUES (?1, ?2)",
            params![sid as i64, ino as i64],
        )
    }
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.exec(
            "DELETE FROM sustained WHERE sid = ?1 AND ino = ?2",
            params![sid as i64, ino as i64],
        )
    }
    fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>> {
        self.conn
            .prepare_cached("SELECT ino FROM sustained WHERE sid = ?1 ORDER BY ino")
            .and_then(|mut s| {
                s.query_map(params![sid as i64], |r| Ok(r.get::<_, i64>(0)? as u64))?
                    .collect()
            })
            .map_err(sql_err)
    }

    fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>> {
        self.conn
            .prepare_cached("SELECT sid, owner, ranges FROM plock WHERE ino = ?1")
            .and_then(|mut s| {
                s.query_map(params![ino as i64], |r| {
                    let b: Vec<u8> = r.get(2)?;
                    Ok(LockSet {
                        sid: r.get::<_, i64>(0)? as u64,
                        owner: r.get::<_, i64>(1)? as u64,
                        ranges: LockSet::decode(&b),
                    })
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()> {
        if ranges.is_empty() {
            return self.exec(
                "DELETE FROM plock WHERE ino = ?1 AND sid = ?2 AND owner = ?3",
                params![ino as i64, sid as i64, owner as i64],
            );
        }
        self.exec(
            "INSERT OR REPLACE INTO plock (ino, sid, owner, ranges) VALUES (?1, ?2, ?3, ?4)",
            params![
                ino as i64,
                sid as i64,
                owner as i64,
                LockSet::encode(ranges)
            ],
        )
    }
    fn delete_session_locks(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM plock WHERE sid = ?1", params![sid as i64])
    }

    fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>> {
        self.conn
            .prepare_cached(
                "SELECT ino, kind, mode, uid, gid, atime, mtime, ctime, nlink, length, rdev,
                 parent, seq, masks FROM node WHERE ino > ?1 ORDER BY ino LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![after as i64, limit as i64], row_node)?
                    .collect()
            })
            .map_err(sql_err)
    }
    fn scan_edges(
        &mut self,
        after: Option<(Ino, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(Ino, Entry)>> {
        let (p, n) = after.unwrap_or((0, b""));
        self.conn
            .prepare_cached(
                "SELECT parent, name, ino, kind FROM edge WHERE (parent, name) > (?1, ?2)
                 ORDER BY parent, name LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![p as i64, n, limit as i64], |r| {
                    let kind: u8 = r.get(3)?;
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        Entry {
                            name: r.get(1)?,
                            ino: r.get::<_, i64>(2)? as u64,
                            kind: FileKind::from_code(kind).unwrap_or(FileKind::File),
                        },
                    ))
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>> {
        self.conn
            .prepare_cached("SELECT DISTINCT ino FROM slice WHERE ino > ?1 ORDER BY ino LIMIT ?2")
            .and_then(|mut s| {
                s.query_map(params![after as i64, limit as i64], |r| {
                    Ok(r.get::<_, i64>(0)? as u64)
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn set_counter(&mut self, name: &str, value: i64) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO counter (name, value) VALUES (?1, ?2)",
            params![name, value],
        )
    }

    fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>> {
        self.conn
            .prepare_cached(
                "SELECT ino, max_space, max_inodes, used_space, used_inodes FROM dirquota WHERE ino = ?1",
            )
            .and_then(|mut s| s.query_row(params![ino as i64], row_quota).optional())
            .map_err(sql_err)
    }
    fn put_quota(&mut self, q: &Quota) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO dirquota (ino, max_space, max_inodes, used_space, used_inodes)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                q.ino as i64,
                q.max_space as i64,
                q.max_inodes as i64,
                q.used_space,
                q.used_inodes
            ],
        )
    }
    fn delete_quota(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM dirquota WHERE ino = ?1", params![ino as i64])
    }
    fn list_quotas(&mut self) -> Result<Vec<Quota>> {
        self.conn
            .prepare_cached(
                "SELECT ino, max_space, max_inodes, used_space, used_inodes FROM dirquota ORDER BY ino",
            )
            .and_then(|mut s| s.query_map([], row_quota)?.collect())
            .map_err(sql_err)
    }
    fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()> {
        for (ino, kind) in rows {
            self.exec(
                "INSERT INTO journal (ino, kind, at) VALUES (?1, ?2, ?3)",
                params![*ino as i64, *kind as i64, at],
            )?;
        }
        Ok(())
    }
    fn journal_position(&mut self) -> Result<u64> {
        // AUTOINCREMENT keeps the highest position ever given in sqlite_sequence (the row
        // appears with the first insert).
        self.conn
            .prepare_cached(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0) + 1",
            )
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(|v| v as u64)
            .map_err(sql_err)
    }
    fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>> {
        self.conn
            .prepare_cached(
                "SELECT DISTINCT ino, kind FROM journal WHERE pos >= ?1 ORDER BY ino, kind LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![pos as i64, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as Ino, r.get::<_, i64>(1)? as u8))
                })?
                .collect()
            })
            .map_err(sql_err)
    }
    fn journal_trim(&mut self, before: i64) -> Result<u64> {
        let max: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(pos) FROM journal WHERE at < ?1")
            .and_then(|mut s| s.query_row(params![before], |r| r.get(0)))
            .map_err(sql_err)?;
        let Some(max) = max else { return Ok(0) };
        self.exec("DELETE FROM journal WHERE pos <= ?1", params![max])?;
        Ok(max as u64 + 1)
    }
    fn backlog_add(&mut self, key: &str, at: i64) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO backlog (key, at) VALUES (?1, ?2)",
            params![key, at],
        )
    }
    fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>> {
        self.conn
            .prepare_cached("SELECT key FROM backlog WHERE key > ?1 ORDER BY key LIMIT ?2")
            .and_then(|mut s| {
                s.query_map(params![after, limit as i64], |r| r.get::<_, String>(0))?
                    .collect()
            })
            .map_err(sql_err)
    }
    fn backlog_delete(&mut self, key: &str) -> Result<()> {
        self.exec("DELETE FROM backlog WHERE key = ?1", params![key])
    }
    fn backlog_count(&mut self) -> Result<u64> {
        self.conn
            .prepare_cached("SELECT COUNT(*) FROM backlog")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(|v| v as u64)
            .map_err(sql_err)
    }
}

impl SqliteTxn<'_> {
    fn exec(&mut self, sql: &str, p: impl rusqlite::Params) -> Result<()> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(p))
            .map(|_| ())
            .map_err(sql_err)
    }
}
