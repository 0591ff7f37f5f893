//! The distributed metadata engine: PostgreSQL (`postgres://user:pass@host:port/db`).
//! Write transactions run SERIALIZABLE, read transactions REPEATABLE READ READ ONLY;
//! serialization failures and deadlocks surface as [`MetaError::Conflict`] so [`Meta`]
//! retries them. A pool of connections (URL parameter `pool`, default 8) with prepared
//! statements cached per connection; a lost connection is re-established in `begin`, waiting
//! up to `reconnect` seconds (URL parameter, default 60) while the server is away.
//!
//! [`Meta`]: super::Meta

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};

use super::{
    Entry, FileKind, Ino, LockRange, LockSet, MetaEngine, MetaError, Node, Quota, Result, Slice,
    Txn, redact_url,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS setting (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS node (
  ino BIGINT PRIMARY KEY, kind SMALLINT NOT NULL, mode BIGINT NOT NULL,
  uid BIGINT NOT NULL, gid BIGINT NOT NULL,
  atime BIGINT NOT NULL, mtime BIGINT NOT NULL, ctime BIGINT NOT NULL,
  nlink BIGINT NOT NULL, length BIGINT NOT NULL, rdev BIGINT NOT NULL,
  parent BIGINT NOT NULL, seq BIGINT NOT NULL, masks BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS edge (parent BIGINT NOT NULL, name BYTEA NOT NULL,
  ino BIGINT NOT NULL, kind SMALLINT NOT NULL, PRIMARY KEY (parent, name));
CREATE TABLE IF NOT EXISTS symlink (ino BIGINT PRIMARY KEY, target BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS xattr (ino BIGINT NOT NULL, name BYTEA NOT NULL,
  value BYTEA NOT NULL, PRIMARY KEY (ino, name));
CREATE TABLE IF NOT EXISTS slice (ino BIGINT NOT NULL, indx BIGINT NOT NULL,
  seq BIGINT NOT NULL, id BIGINT NOT NULL, size BIGINT NOT NULL, off BIGINT NOT NULL,
  len BIGINT NOT NULL, pos BIGINT NOT NULL, PRIMARY KEY (ino, indx, seq));
CREATE TABLE IF NOT EXISTS reclaim (ino BIGINT PRIMARY KEY, length BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS trim (ino BIGINT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS garbage (id BIGINT PRIMARY KEY, size BIGINT NOT NULL,
  due BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS garbage_due ON garbage (due);
CREATE TABLE IF NOT EXISTS session (sid BIGINT PRIMARY KEY, heartbeat BIGINT NOT NULL,
  info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sustained (sid BIGINT NOT NULL, ino BIGINT NOT NULL,
  PRIMARY KEY (sid, ino));
CREATE TABLE IF NOT EXISTS plock (ino BIGINT NOT NULL, sid BIGINT NOT NULL,
  owner BIGINT NOT NULL, ranges BYTEA NOT NULL, PRIMARY KEY (ino, sid, owner));
CREATE INDEX IF NOT EXISTS plock_sid ON plock (sid);
CREATE TABLE IF NOT EXISTS dirquota (ino BIGINT PRIMARY KEY, max_space BIGINT NOT NULL,
  max_inodes BIGINT NOT NULL, used_space BIGINT NOT NULL, used_inodes BIGINT NOT NULL);
";

struct Conn {
    client: Option<Client>,
    stmts: HashMap<&'static str, Statement>,
}

pub struct PostgresEngine {
    url: String,
    config: postgres::Config,
    reconnect: Duration,
    pool: Vec<Mutex<Conn>>,
    next: AtomicUsize,
}

fn pg_err(e: postgres::Error) -> MetaError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return MetaError::Conflict;
        }
        let c = code.code();
        // Connection exceptions (08), server shutting down or starting (57), too many
        // connections: the transaction is lost, retry it on a new connection.
        if c.starts_with("08") || c.starts_with("57") || c == "53300" {
            tracing::warn!(code = c, error = %db.message(), "PostgreSQL unavailable, will reconnect and retry");
            return MetaError::Conflict;
        }
        if *code == SqlState::UNDEFINED_TABLE {
            return MetaError::Engine(format!("postgres: {}: table does not exist", db.message()));
        }
        return MetaError::Engine(format!("postgres {c}: {}", db.message()));
    }
    // Connection-level failure (closed socket, I/O): retry on a new connection.
    tracing::warn!(error = %e, "postgres connection error, will reconnect and retry");
    MetaError::Conflict
}

impl PostgresEngine {
    /// Connect to `url` (`postgres://user:pass@host:port/db[?pool=N&reconnect=SECS&...]`).
    pub fn open(url: &str) -> Result<Self> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut pool_size = 8usize;
        let mut reconnect = 60u64;
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("pool", v)) => {
                    pool_size = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| {
                            MetaError::Format(format!(
                                "metadata URL parameter pool={v}: use a number from 1 to 256"
                            ))
                        })?
                }
                Some(("reconnect", v)) => {
                    reconnect = v.parse().map_err(|_| {
                        MetaError::Format(format!(
                            "metadata URL parameter reconnect={v}: use seconds"
                        ))
                    })?
                }
                _ => rest.push(kv),
            }
        }
        let conn_str = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = conn_str.parse::<postgres::Config>().map_err(|e| {
            MetaError::Format(format!(
                "bad PostgreSQL URL {}: {e} (use postgres://user:password@host:5432/database)",
                redact_url(url)
            ))
        })?;
        let engine = PostgresEngine {
            url: url.to_string(),
            config: {
                if config.get_connect_timeout().is_none() {
                    config.connect_timeout(Duration::from_secs(5));
                }
                config
            },
            reconnect: Duration::from_secs(reconnect),
            pool: (0..pool_size)
                .map(|_| {
                    Mutex::new(Conn {
                        client: None,
                        stmts: HashMap::new(),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
        };
        // Fail fast with a clear message when the server cannot be reached at all.
        let mut c = engine.pool[0].lock();
        engine.connect(&mut c, Duration::ZERO)?;
        drop(c);
        Ok(engine)
    }

    fn connect(&self, c: &mut Conn, patience: Duration) -> Result<()> {
        if c.client.as_ref().is_some_and(|cl| !cl.is_closed()) {
            return Ok(());
        }
        c.client = None;
        c.stmts.clear();
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.config.connect(NoTls) {
                Ok(client) => {
                    c.client = Some(client);
                    return Ok(());
                }
                Err(e) if start.elapsed() < patience => {
                    tracing::warn!(url = %redact_url(&self.url), error = %e, "cannot reach PostgreSQL, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(MetaError::Engine(format!(
                        "cannot connect to PostgreSQL at {}: {e} (check host, port, user, password and that the database exists)",
                        redact_url(&self.url)
                    )));
                }
            }
        }
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        for c in &self.pool {
            if let Some(g) = c.try_lock() {
                return g;
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[i].lock()
    }
}

impl MetaEngine for PostgresEngine {
    fn kind(&self) -> &'static str {
        "postgres"
    }
    fn describe(&self) -> String {
        redact_url(&self.url)
    }
    fn init_schema(&self) -> Result<()> {
        let mut c = self.conn();
        self.connect(&mut c, self.reconnect)?;
        let client = c.client.as_mut().ok_or(MetaError::Conflict)?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can race on the catalog; serialize with an
        // advisory lock.
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(4242); {SCHEMA} SELECT pg_advisory_unlock(4242);"
            ))
            .map_err(pg_err)
    }
    fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>> {
        let mut c = self.conn();
        self.connect(&mut c, self.reconnect)?;
        let client = c.client.as_mut().ok_or(MetaError::Conflict)?;
        client
            .batch_execute(if write {
                "BEGIN ISOLATION LEVEL SERIALIZABLE"
            } else {
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
            })
            .map_err(pg_err)?;
        Ok(Box::new(PgTxn {
            conn: c,
            done: false,
        }))
    }
}

struct PgTxn<'a> {
    conn: MutexGuard<'a, Conn>,
    done: bool,
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Some(c) = self.conn.client.as_mut()
            && c.batch_execute("ROLLBACK").is_err()
        {
            self.conn.client = None;
        }
    }
}

impl PgTxn<'_> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.conn.stmts.get(sql) {
            return Ok(s.clone());
        }
        let client = self.conn.client.as_mut().ok_or(MetaError::Conflict)?;
        let s = client.prepare(sql).map_err(pg_err)?;
        self.conn.stmts.insert(sql, s.clone());
        Ok(s)
    }
    fn query(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let s = self.stmt(sql)?;
        let client = self.conn.client.as_mut().ok_or(MetaError::Conflict)?;
        client.query(&s, p).map_err(pg_err)
    }
    fn opt(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        Ok(self.query(sql, p)?.into_iter().next())
    }
    fn exec(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let s = self.stmt(sql)?;
        let client = self.conn.client.as_mut().ok_or(MetaError::Conflict)?;
        client.execute(&s, p).map_err(pg_err)
    }
}

fn i(v: u64) -> i64 {
    v as i64
}

fn row_node(r: &Row) -> Node {
    let kind: i16 = r.get(1);
    let masks: Vec<u8> = r.get(13);
    Node {
        ino: r.get::<_, i64>(0) as u64,
        kind: FileKind::from_code(kind as u8).unwrap_or(FileKind::File),
        mode: r.get::<_, i64>(2) as u32,
        uid: r.get::<_, i64>(3) as u32,
        gid: r.get::<_, i64>(4) as u32,
        atime: r.get(5),
        mtime: r.get(6),
        ctime: r.get(7),
        nlink: r.get::<_, i64>(8) as u32,
        length: r.get::<_, i64>(9) as u64,
        rdev: r.get::<_, i64>(10) as u32,
        parent: r.get::<_, i64>(11) as u64,
        seq: r.get::<_, i64>(12) as u64,
        masks: Node::decode_masks(&masks),
    }
}

fn row_entry(r: &Row) -> Entry {
    Entry {
        name: r.get(0),
        ino: r.get::<_, i64>(1) as u64,
        kind: FileKind::from_code(r.get::<_, i16>(2) as u8).unwrap_or(FileKind::File),
    }
}

impl Txn for PgTxn<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let client = self.conn.client.as_mut().ok_or(MetaError::Conflict)?;
        let r = client.batch_execute("COMMIT").map_err(pg_err);
        self.done = true;
        r
    }

    fn get_setting(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self
            .opt("SELECT value FROM setting WHERE name = $1", &[&name])?
            .map(|r| r.get(0)))
    }
    fn set_setting(&mut self, name: &str, value: &str) -> Result<()> {
        self.exec(
            "INSERT INTO setting (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )
        .map(|_| ())
    }
    fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64> {
        let r = self.query(
            "INSERT INTO counter (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = counter.value + EXCLUDED.value RETURNING value",
            &[&name, &delta],
        )?;
        r.first()
            .map(|r| r.get(0))
            .ok_or(MetaError::Engine("counter update returned nothing".into()))
    }

    fn get_counter(&mut self, name: &str) -> Result<i64> {
        Ok(self
            .opt("SELECT value FROM counter WHERE name = $1", &[&name])?
            .map(|r| r.get(0))
            .unwrap_or(0))
    }

    fn get_node(&mut self, ino: Ino) -> Result<Option<Node>> {
        Ok(self
            .opt(
                "SELECT ino, kind, mode, uid, gid, atime, mtime, ctime, nlink, length, rdev,
                 parent, seq, masks FROM node WHERE ino = $1",
                &[&i(ino)],
            )?
            .map(|r| row_node(&r)))
    }
    fn put_node(&mut self, n: &Node) -> Result<()> {
        self.exec(
            "INSERT INTO node (ino, kind, mode, uid, gid, atime, mtime, ctime, nlink, length,
             rdev, parent, seq, masks) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)
             ON CONFLICT (ino) DO UPDATE SET kind = EXCLUDED.kind, mode = EXCLUDED.mode,
             uid = EXCLUDED.uid, gid = EXCLUDED.gid, atime = EXCLUDED.atime,
             mtime = EXCLUDED.mtime, ctime = EXCLUDED.ctime, nlink = EXCLUDED.nlink,
             length = EXCLUDED.length, rdev = EXCLUDED.rdev, parent = EXCLUDED.parent,
             seq = EXCLUDED.seq, masks = EXCLUDED.masks",
            &[
                &i(n.ino),
                &(n.kind.code() as i16),
                &(n.mode as i64),
                &(n.uid as i64),
                &(n.gid as i64),
                &n.atime,
                &n.mtime,
                &n.ctime,
                &(n.nlink as i64),
                &i(n.length),
                &(n.rdev as i64),
                &i(n.parent),
                &i(n.seq),
                &n.encode_masks(),
            ],
        )
        .map(|_| ())
    }
    fn delete_node(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM node WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }

    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        Ok(self
            .opt(
                "SELECT name, ino, kind FROM edge WHERE parent = $1 AND name = $2",
                &[&i(parent), &name],
            )?
            .map(|r| row_entry(&r)))
    }
    fn put_edge(&mut self, parent: Ino, e: &Entry) -> Result<()> {
        self.exec(
            "INSERT INTO edge (parent, name, ino, kind) VALUES ($1, $2, $3, $4)
             ON CONFLICT (parent, name) DO UPDATE SET ino = EXCLUDED.ino, kind = EXCLUDED.kind",
            &[&i(parent), &e.name, &i(e.ino), &(e.kind.code() as i16)],
        )
        .map(|_| ())
    }
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()> {
        self.exec(
            "DELETE FROM edge WHERE parent = $1 AND name = $2",
            &[&i(parent), &name],
        )
        .map(|_| ())
    }
    fn list_edges(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let after: &[u8] = after.unwrap_or(b"");
        let limit = limit.min(i64::MAX as usize) as i64;
        Ok(self
            .query(
                "SELECT name, ino, kind FROM edge WHERE parent = $1 AND name > $2
                 ORDER BY name LIMIT $3",
                &[&i(parent), &after, &limit],
            )?
            .iter()
            .map(row_entry)
            .collect())
    }

    fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        Ok(self
            .opt("SELECT target FROM symlink WHERE ino = $1", &[&i(ino)])?
            .map(|r| r.get(0)))
    }
    fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO symlink (ino, target) VALUES ($1, $2)
             ON CONFLICT (ino) DO UPDATE SET target = EXCLUDED.target",
            &[&i(ino), &target],
        )
        .map(|_| ())
    }
    fn delete_symlink(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM symlink WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }

    fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .opt(
                "SELECT value FROM xattr WHERE ino = $1 AND name = $2",
                &[&i(ino), &name],
            )?
            .map(|r| r.get(0)))
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO xattr (ino, name, value) VALUES ($1, $2, $3)
             ON CONFLICT (ino, name) DO UPDATE SET value = EXCLUDED.value",
            &[&i(ino), &name, &value],
        )
        .map(|_| ())
    }
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM xattr WHERE ino = $1 AND name = $2",
            &[&i(ino), &name],
        )? > 0)
    }
    fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .query(
                "SELECT name FROM xattr WHERE ino = $1 ORDER BY name",
                &[&i(ino)],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
    fn delete_xattrs(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM xattr WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }

    fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>> {
        Ok(self
            .query(
                "SELECT seq, id, size, off, len, pos FROM slice WHERE ino = $1 AND indx = $2
                 ORDER BY seq",
                &[&i(ino), &(indx as i64)],
            )?
            .iter()
            .map(|r| Slice {
                seq: r.get::<_, i64>(0) as u64,
                id: r.get::<_, i64>(1) as u64,
                size: r.get::<_, i64>(2) as u32,
                off: r.get::<_, i64>(3) as u32,
                len: r.get::<_, i64>(4) as u32,
                pos: r.get::<_, i64>(5) as u32,
            })
            .collect())
    }
    fn add_slice(&mut self, ino: Ino, indx: u32, s: &Slice) -> Result<()> {
        self.exec(
            "INSERT INTO slice (ino, indx, seq, id, size, off, len, pos)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &i(ino),
                &(indx as i64),
                &i(s.seq),
                &i(s.id),
                &(s.size as i64),
                &(s.off as i64),
                &(s.len as i64),
                &(s.pos as i64),
            ],
        )
        .map(|_| ())
    }
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()> {
        self.exec(
            "DELETE FROM slice WHERE ino = $1 AND indx = $2 AND seq = $3",
            &[&i(ino), &(indx as i64), &i(seq)],
        )
        .map(|_| ())
    }
    fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        Ok(self
            .query(
                "SELECT DISTINCT indx FROM slice WHERE ino = $1 AND indx >= $2 ORDER BY indx LIMIT $3",
                &[&i(ino), &(from as i64), &limit],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u32)
            .collect())
    }

    fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()> {
        self.exec(
            "INSERT INTO reclaim (ino, length) VALUES ($1, $2)
             ON CONFLICT (ino) DO UPDATE SET length = EXCLUDED.length",
            &[&i(ino), &i(length)],
        )
        .map(|_| ())
    }
    fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>> {
        Ok(self
            .query(
                "SELECT ino, length FROM reclaim ORDER BY ino LIMIT $1",
                &[&(limit as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect())
    }
    fn delete_reclaim(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM reclaim WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }
    fn add_trim(&mut self, ino: Ino) -> Result<()> {
        self.exec(
            "INSERT INTO trim (ino) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&i(ino)],
        )
        .map(|_| ())
    }
    fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>> {
        Ok(self
            .query(
                "SELECT ino FROM trim ORDER BY ino LIMIT $1",
                &[&(limit as i64)],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }
    fn delete_trim(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM trim WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()> {
        self.exec(
            "INSERT INTO garbage (id, size, due) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET size = EXCLUDED.size, due = EXCLUDED.due",
            &[&i(id), &(size as i64), &due],
        )
        .map(|_| ())
    }
    fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>> {
        Ok(self
            .query(
                "SELECT id, size FROM garbage WHERE due <= $1 ORDER BY due LIMIT $2",
                &[&now, &(limit as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u32))
            .collect())
    }
    fn delete_garbage(&mut self, id: u64) -> Result<()> {
        self.exec("DELETE FROM garbage WHERE id = $1", &[&i(id)])
            .map(|_| ())
    }

    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()> {
        self.exec(
            "INSERT INTO session (sid, heartbeat, info) VALUES ($1, $2, $3)
             ON CONFLICT (sid) DO UPDATE SET heartbeat = EXCLUDED.heartbeat, info = EXCLUDED.info",
            &[&i(sid), &heartbeat, &info],
        )
        .map(|_| ())
    }
    fn delete_session(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM session WHERE sid = $1", &[&i(sid)])
            .map(|_| ())
    }
    fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>> {
        Ok(self
            .query("SELECT sid, heartbeat, info FROM session ORDER BY sid", &[])?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get(2)))
            .collect())
    }
    fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.exec(
            "INSERT INTO sustained (sid, ino) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&i(sid), &i(ino)],
        )
        .map(|_| ())
    }
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.exec(
            "DELETE FROM sustained WHERE sid = $1 AND ino = $2",
            &[&i(sid), &i(ino)],
        )
        .map(|_| ())
    }
    fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>> {
        Ok(self
            .query(
                "SELECT ino FROM sustained WHERE sid = $1 ORDER BY ino",
                &[&i(sid)],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }
    fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>> {
        Ok(self
            .query(
                "SELECT sid, owner, ranges FROM plock WHERE ino = $1",
                &[&i(ino)],
            )?
            .iter()
            .map(|r| LockSet {
                sid: r.get::<_, i64>(0) as u64,
                owner: r.get::<_, i64>(1) as u64,
                ranges: LockSet::decode(&r.get::<_, Vec<u8>>(2)),
            })
            .collect())
    }
    fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()> {
        if ranges.is_empty() {
            return self
                .exec(
                    "DELETE FROM plock WHERE ino = $1 AND sid = $2 AND owner = $3",
                    &[&i(ino), &i(sid), &i(owner)],
                )
                .map(|_| ());
        }
        self.exec(
            "INSERT INTO plock (ino, sid, owner, ranges) VALUES ($1, $2, $3, $4)
             ON CONFLICT (ino, sid, owner) DO UPDATE SET ranges = EXCLUDED.ranges",
            &[&i(ino), &i(sid), &i(owner), &LockSet::encode(ranges)],
        )
        .map(|_| ())
    }
    fn delete_session_locks(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM plock WHERE sid = $1", &[&i(sid)])
            .map(|_| ())
    }
    fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>> {
        Ok(self
            .query(
                "SELECT ino, kind, mode, uid, gid, atime, mtime, ctime, nlink, length, rdev,
                 parent, seq, masks FROM node WHERE ino > $1 ORDER BY ino LIMIT $2",
                &[&i(after), &(limit.min(i64::MAX as usize) as i64)],
            )?
            .iter()
            .map(row_node)
            .collect())
    }
    fn scan_edges(
        &mut self,
        after: Option<(Ino, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(Ino, Entry)>> {
        let (p, n) = after.unwrap_or((0, b""));
        Ok(self
            .query(
                "SELECT name, ino, kind, parent FROM edge WHERE (parent, name) > ($1, $2)
                 ORDER BY parent, name LIMIT $3",
                &[&i(p), &n, &(limit.min(i64::MAX as usize) as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(3) as u64, row_entry(r)))
            .collect())
    }
    fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>> {
        Ok(self
            .query(
                "SELECT DISTINCT ino FROM slice WHERE ino > $1 ORDER BY ino LIMIT $2",
                &[&i(after), &(limit.min(i64::MAX as usize) as i64)],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }
    fn set_counter(&mut self, name: &str, value: i64) -> Result<()> {
        self.exec(
            "INSERT INTO counter (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )
        .map(|_| ())
    }
    fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>> {
        Ok(self
            .opt(
                "SELECT ino, max_space, max_inodes, used_space, used_inodes FROM dirquota WHERE ino = $1",
                &[&i(ino)],
            )?
            .map(|r| row_quota(&r)))
    }
    fn put_quota(&mut self, q: &Quota) -> Result<()> {
        self.exec(
            "INSERT INTO dirquota (ino, max_space, max_inodes, used_space, used_inodes)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ino) DO UPDATE SET
             max_space = EXCLUDED.max_space, max_inodes = EXCLUDED.max_inodes,
             used_space = EXCLUDED.used_space, used_inodes = EXCLUDED.used_inodes",
            &[
                &i(q.ino),
                &i(q.max_space),
                &i(q.max_inodes),
                &q.used_space,
                &q.used_inodes,
            ],
        )
        .map(|_| ())
    }
    fn delete_quota(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM dirquota WHERE ino = $1", &[&i(ino)])
            .map(|_| ())
    }
    fn list_quotas(&mut self) -> Result<Vec<Quota>> {
        Ok(self
            .query(
                "SELECT ino, max_space, max_inodes, used_space, used_inodes FROM dirquota ORDER BY ino",
                &[],
            )?
            .iter()
            .map(row_quota)
            .collect())
    }
}

fn row_quota(r: &Row) -> Quota {
    Quota {
        ino: r.get::<_, i64>(0) as u64,
        max_space: r.get::<_, i64>(1) as u64,
        max_inodes: r.get::<_, i64>(2) as u64,
        used_space: r.get(3),
        used_inodes: r.get(4),
    }
}
