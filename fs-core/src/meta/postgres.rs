//! The distributed metadata engine: PostgreSQL (`postgres://user:pass@host:port/db`).
//! Write transactions run SERIALIZABLE, read transactions REPEATABLE READ READ ONLY;
//! serialization failures and deadlocks surface as [`MetaError::Conflict`] so [`Meta`]
//! retries them. A pool of connections (URL parameter `pool`, default 8) with prepared
//! statements cached per connection; a lost connection is re-established in `begin`, waiting
//! up to `reconnect` seconds (URL parameter, default 60) while the server is away.
//!
//! [`Meta`]: super::Meta

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

use parking_lot::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::postgres_tls::TlsParams;
use super::{
    DirEntry, Entry, FileKind, Ino, LockRange, LockSet, MetaEngine, MetaError, Node, Quota, Result,
    Slice, Txn, redact_url,
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
CREATE TABLE IF NOT EXISTS journal (
  xid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
  ino BIGINT NOT NULL, kind SMALLINT NOT NULL, at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS journal_xid ON journal (xid);
CREATE INDEX IF NOT EXISTS journal_at ON journal (at);
CREATE TABLE IF NOT EXISTS backlog (key TEXT COLLATE \"C\" PRIMARY KEY, at BIGINT NOT NULL);
";

/// One connection of the pool: a `tokio-postgres` client driven by a runtime of its own
/// (current-thread, no threads: the connection task runs while a caller waits on it).
struct Conn {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    stmts: HashMap<&'static str, Statement>,
    /// The row suffix (`#<n>`) this connection's [`Txn::add_counter`] writes to (FORMAT.md
    /// §2, "Counter shards").
    shard: String,
}

/// Shard rows per usage counter (FORMAT.md §2, "Counter shards").
const COUNTER_SHARDS: u32 = 32;

pub struct PostgresEngine {
    url: String,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    reconnect: Duration,
    pool: Vec<Mutex<Conn>>,
    next: AtomicUsize,
    /// Round trips to the server made by transactions (see [`PostgresEngine::round_trips`]).
    round_trips: Arc<AtomicU64>,
}

fn pg_err(e: tokio_postgres::Error) -> MetaError {
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
        let mut tls = TlsParams::default();
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
                Some((k, v)) if tls.take(k, v)? => {}
                _ => rest.push(kv),
            }
        }
        let conn_str = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = conn_str.parse::<tokio_postgres::Config>().map_err(|e| {
            MetaError::Format(format!(
                "bad PostgreSQL URL {}: {e} (use postgres://user:password@host:5432/database)",
                redact_url(url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.ssl_mode(tls.ssl_mode());
        let mut pool = Vec::with_capacity(pool_size);
        // Connections of one client take consecutive shards from a random start, so the
        // clients of a volume spread over the shards too.
        let first_shard = rand::random::<u32>();
        for n in 0..pool_size {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| MetaError::Engine(format!("postgres client runtime: {e}")))?;
            pool.push(Mutex::new(Conn {
                rt,
                client: None,
                stmts: HashMap::new(),
                shard: format!("#{}", first_shard.wrapping_add(n as u32) % COUNTER_SHARDS),
            }));
        }
        let engine = PostgresEngine {
            url: url.to_string(),
            config,
            tls: tls.connector()?,
            reconnect: Duration::from_secs(reconnect),
            pool,
            next: AtomicUsize::new(0),
            round_trips: Arc::new(AtomicU64::new(0)),
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
            match c.rt.block_on(self.config.connect(self.tls.clone())) {
                Ok((client, connection)) => {
                    // Runs whenever this connection's runtime is waited on (every request).
                    c.rt.spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "postgres connection closed");
                        }
                    });
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
                        "cannot connect to PostgreSQL at {}: {} (check host, port, user, password, sslmode/sslrootcert and that the database exists)",
                        redact_url(&self.url),
                        crate::error_chain(&e)
                    )));
                }
            }
        }
    }

    /// A counter of the round trips this engine's transactions make to the server (each
    /// pipelined batch of requests counts once; statement preparation, once per connection
    /// and statement, is not counted). For tests and benchmarks of the request pattern.
    pub fn round_trips(&self) -> Arc<AtomicU64> {
        self.round_trips.clone()
    }

    /// A transaction started by `begin` (`None`: autocommit, for a single read).
    fn txn(&self, begin: Option<&'static str>) -> Result<Box<dyn Txn + '_>> {
        let mut c = self.conn();
        self.connect(&mut c, self.reconnect)?;
        Ok(Box::new(PgTxn {
            conn: c,
            round_trips: &self.round_trips,
            begin,
            begun: false,
            deferred: Vec::new(),
            done: false,
        }))
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
        let c = &mut *c;
        let client = c.client.as_ref().ok_or(MetaError::Conflict)?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can race on the catalog; serialize with an
        // advisory lock.
        c.rt.block_on(client.batch_execute(&format!(
            "SELECT pg_advisory_lock(4242); {SCHEMA} SELECT pg_advisory_unlock(4242);"
        )))
        .map_err(pg_err)
    }
    fn drop_schema(&self) -> Result<()> {
        let mut c = self.conn();
        self.connect(&mut c, self.reconnect)?;
        let c = &mut *c;
        let client = c.client.as_ref().ok_or(MetaError::Conflict)?;
        c.rt.block_on(client.batch_execute(&format!(
            "DROP TABLE IF EXISTS {}",
            super::TABLES.join(", ")
        )))
        .map_err(pg_err)
    }
    /// No round trip: `BEGIN` goes out with the transaction's first request.
    fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>> {
        self.txn(Some(if write {
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        } else {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        }))
    }
    /// No transaction at all: the one statement is its own snapshot (autocommit).
    fn begin_single_read(&self) -> Result<Box<dyn Txn + '_>> {
        self.txn(None)
    }
}

/// A parameter of a deferred statement, owned until the statement is sent.
type Param = Box<dyn ToSql + Sync + Send>;

/// A transaction. Round trips are what a remote metadata server costs, so requests are
/// pipelined: `BEGIN` is sent with the first request, and writes whose result nobody reads
/// (inserts, updates, deletes) are held back and sent, in order, ahead of the next read or
/// with `COMMIT`. A read therefore sees every earlier write of its transaction, and an error
/// of a held-back write (a conflict, a lost connection) surfaces at the next read or at
/// commit, where [`Meta`](super::Meta) retries the whole transaction as before. A create
/// is two round trips (the directory and the entry in one join, then `COMMIT` with all its
/// writes) instead of ten.
struct PgTxn<'a> {
    conn: MutexGuard<'a, Conn>,
    round_trips: &'a AtomicU64,
    /// `None`: no transaction, each statement commits itself (single reads).
    begin: Option<&'static str>,
    /// `BEGIN` has been sent.
    begun: bool,
    deferred: Vec<(Statement, Vec<Param>)>,
    done: bool,
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if self.done || !self.begun || self.begin.is_none() {
            return; // nothing reached the server, or nothing is open there
        }
        let c = &mut *self.conn;
        let ok = c
            .client
            .as_ref()
            .is_some_and(|cl| c.rt.block_on(cl.batch_execute("ROLLBACK")).is_ok());
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        if !ok {
            c.client = None;
        }
    }
}

/// The last request of a round trip.
enum Last<'p> {
    Query(Statement, &'p [&'p (dyn ToSql + Sync)]),
    Execute(Statement, &'p [&'p (dyn ToSql + Sync)]),
    Commit,
}

enum Answer {
    Done,
    Rows(Vec<Row>),
    Count(u64),
}

type Request<'f> =
    Pin<Box<dyn Future<Output = std::result::Result<Answer, tokio_postgres::Error>> + 'f>>;

impl PgTxn<'_> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.conn.stmts.get(sql) {
            return Ok(s.clone());
        }
        let c = &mut *self.conn;
        let client = c.client.as_ref().ok_or(MetaError::Conflict)?;
        let s = c.rt.block_on(client.prepare(sql)).map_err(pg_err)?;
        c.stmts.insert(sql, s.clone());
        Ok(s)
    }

    /// One round trip: `BEGIN` if not sent yet, the held-back writes, then `last`. Every
    /// request is queued before any answer is awaited; answers are taken in order and the
    /// first failure is the transaction's error.
    fn round_trip(&mut self, last: Last<'_>) -> Result<Answer> {
        let begin = if self.begun { None } else { self.begin };
        let deferred = std::mem::take(&mut self.deferred);
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let c = &mut *self.conn;
        let client = c.client.as_ref().ok_or(MetaError::Conflict)?;
        let answers = c.rt.block_on(async {
            let mut reqs: Vec<Request<'_>> = Vec::with_capacity(deferred.len() + 2);
            if let Some(b) = begin {
                reqs.push(Box::pin(async move {
                    client.batch_execute(b).await.map(|_| Answer::Done)
                }));
            }
            for (stmt, params) in &deferred {
                reqs.push(Box::pin(async move {
                    let p: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    client.execute(stmt, &p).await.map(Answer::Count)
                }));
            }
            match last {
                Last::Query(stmt, p) => reqs.push(Box::pin(async move {
                    client.query(&stmt, p).await.map(Answer::Rows)
                })),
                Last::Execute(stmt, p) => reqs.push(Box::pin(async move {
                    client.execute(&stmt, p).await.map(Answer::Count)
                })),
                Last::Commit => reqs.push(Box::pin(async move {
                    client.batch_execute("COMMIT").await.map(|_| Answer::Done)
                })),
            }
            // A request is sent when its future is first polled: poll each once, in order,
            // then wait for the answers in the same order.
            let mut first = Vec::with_capacity(reqs.len());
            for r in reqs.iter_mut() {
                first.push(poll_fn(|cx| Poll::Ready(r.as_mut().poll(cx))).await);
            }
            let mut out = Vec::with_capacity(reqs.len());
            for (r, f) in reqs.into_iter().zip(first) {
                out.push(match f {
                    Poll::Ready(a) => a,
                    Poll::Pending => r.await,
                });
            }
            out
        });
        self.begun = true;
        let mut last_answer = Answer::Done;
        for a in answers {
            last_answer = a.map_err(pg_err)?;
        }
        Ok(last_answer)
    }

    fn query(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let s = self.stmt(sql)?;
        match self.round_trip(Last::Query(s, p))? {
            Answer::Rows(r) => Ok(r),
            _ => Err(MetaError::Engine(
                "postgres: a query answered no rows".into(),
            )),
        }
    }
    fn opt(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        Ok(self.query(sql, p)?.into_iter().next())
    }
    /// A write whose row count the caller needs: sent now.
    fn exec_now(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let s = self.stmt(sql)?;
        match self.round_trip(Last::Execute(s, p))? {
            Answer::Count(n) => Ok(n),
            _ => Err(MetaError::Engine(
                "postgres: a statement answered no count".into(),
            )),
        }
    }
    /// A write nobody reads the result of: held back until the next round trip.
    fn exec(&mut self, sql: &'static str, p: Vec<Param>) -> Result<()> {
        let s = self.stmt(sql)?;
        self.deferred.push((s, p));
        Ok(())
    }
}

fn i(v: u64) -> i64 {
    v as i64
}

fn row_node(r: &Row) -> Node {
    row_node_at(r, 0)
}

/// The node in columns `b..b + 14` of `r` (the column list of `get_node`).
fn row_node_at(r: &Row, b: usize) -> Node {
    let kind: i16 = r.get(b + 1);
    let masks: Vec<u8> = r.get(b + 13);
    Node {
        ino: r.get::<_, i64>(b) as u64,
        kind: FileKind::from_code(kind as u8).unwrap_or(FileKind::File),
        mode: r.get::<_, i64>(b + 2) as u32,
        uid: r.get::<_, i64>(b + 3) as u32,
        gid: r.get::<_, i64>(b + 4) as u32,
        atime: r.get(b + 5),
        mtime: r.get(b + 6),
        ctime: r.get(b + 7),
        nlink: r.get::<_, i64>(b + 8) as u32,
        length: r.get::<_, i64>(b + 9) as u64,
        rdev: r.get::<_, i64>(b + 10) as u32,
        parent: r.get::<_, i64>(b + 11) as u64,
        seq: r.get::<_, i64>(b + 12) as u64,
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
        if self.begin.is_none() {
            // Autocommit: the read has committed itself. A write has no place here.
            self.done = true;
            return if self.deferred.is_empty() {
                Ok(())
            } else {
                Err(MetaError::Engine(
                    "a write in a single-read request (a bug: use a transaction)".into(),
                ))
            };
        }
        let r = if self.begun || !self.deferred.is_empty() {
            self.round_trip(Last::Commit).map(|_| ())
        } else {
            Ok(()) // nothing was asked: no round trip
        };
        // A failed COMMIT ends the transaction too (the server rolls it back).
        self.done = r.is_ok();
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
            vec![Box::new(name.to_owned()), Box::new(value.to_owned())],
        )
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

    /// Adds to this connection's shard row of the counter: concurrent transactions on other
    /// connections (this client's or another's) then update other rows, and neither waits
    /// for the other nor fails to serialize over the counter.
    fn add_counter(&mut self, name: &str, delta: i64) -> Result<()> {
        let row = format!("{name}{}", self.conn.shard);
        self.exec(
            "INSERT INTO counter (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = counter.value + EXCLUDED.value",
            vec![Box::new(row), Box::new(delta)],
        )
    }

    /// The counter's row plus its shard rows (`name#0` … `name#31` sort between `name` and
    /// `name$`).
    fn get_counter(&mut self, name: &str) -> Result<i64> {
        let end = format!("{name}$");
        Ok(self
            .opt(
                "SELECT COALESCE(SUM(value), 0)::BIGINT FROM counter WHERE name >= $1 AND name < $2",
                &[&name, &end],
            )?
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
            vec![
                Box::new(i(n.ino)),
                Box::new(n.kind.code() as i16),
                Box::new(n.mode as i64),
                Box::new(n.uid as i64),
                Box::new(n.gid as i64),
                Box::new(n.atime),
                Box::new(n.mtime),
                Box::new(n.ctime),
                Box::new(n.nlink as i64),
                Box::new(i(n.length)),
                Box::new(n.rdev as i64),
                Box::new(i(n.parent)),
                Box::new(i(n.seq)),
                Box::new(n.encode_masks()),
            ],
        )
    }
    fn delete_node(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM node WHERE ino = $1", vec![Box::new(i(ino))])
    }

    fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        Ok(self
            .opt(
                "SELECT name, ino, kind FROM edge WHERE parent = $1 AND name = $2",
                &[&i(parent), &name],
            )?
            .map(|r| row_entry(&r)))
    }
    fn get_dir_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<DirEntry>> {
        Ok(self
            .opt(
                "SELECT p.ino, p.kind, p.mode, p.uid, p.gid, p.atime, p.mtime, p.ctime, p.nlink,
                 p.length, p.rdev, p.parent, p.seq, p.masks,
                 e.name, e.ino, e.kind,
                 n.ino, n.kind, n.mode, n.uid, n.gid, n.atime, n.mtime, n.ctime, n.nlink,
                 n.length, n.rdev, n.parent, n.seq, n.masks
                 FROM node p
                 LEFT JOIN edge e ON e.parent = p.ino AND e.name = $2
                 LEFT JOIN node n ON n.ino = e.ino
                 WHERE p.ino = $1",
                &[&i(parent), &name],
            )?
            .map(|r| DirEntry {
                dir: row_node_at(&r, 0),
                entry: r.get::<_, Option<Vec<u8>>>(14).map(|name| {
                    let e = Entry {
                        name,
                        ino: r.get::<_, i64>(15) as u64,
                        kind: FileKind::from_code(r.get::<_, i16>(16) as u8)
                            .unwrap_or(FileKind::File),
                    };
                    let n = r.get::<_, Option<i64>>(17).map(|_| row_node_at(&r, 17));
                    (e, n)
                }),
            }))
    }
    fn put_edge(&mut self, parent: Ino, e: &Entry) -> Result<()> {
        self.exec(
            "INSERT INTO edge (parent, name, ino, kind) VALUES ($1, $2, $3, $4)
             ON CONFLICT (parent, name) DO UPDATE SET ino = EXCLUDED.ino, kind = EXCLUDED.kind",
            vec![
                Box::new(i(parent)),
                Box::new(e.name.to_owned()),
                Box::new(i(e.ino)),
                Box::new(e.kind.code() as i16),
            ],
        )
    }
    fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()> {
        self.exec(
            "DELETE FROM edge WHERE parent = $1 AND name = $2",
            vec![Box::new(i(parent)), Box::new(name.to_owned())],
        )
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
            vec![Box::new(i(ino)), Box::new(target.to_owned())],
        )
    }
    fn delete_symlink(&mut self, ino: Ino) -> Result<()> {
        self.exec("DELETE FROM symlink WHERE ino = $1", vec![Box::new(i(ino))])
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
            vec![
                Box::new(i(ino)),
                Box::new(name.to_owned()),
                Box::new(value.to_owned()),
            ],
        )
    }
    fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool> {
        Ok(self.exec_now(
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
        self.exec("DELETE FROM xattr WHERE ino = $1", vec![Box::new(i(ino))])
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
            vec![
                Box::new(i(ino)),
                Box::new(indx as i64),
                Box::new(i(s.seq)),
                Box::new(i(s.id)),
                Box::new(s.size as i64),
                Box::new(s.off as i64),
                Box::new(s.len as i64),
                Box::new(s.pos as i64),
            ],
        )
    }
    fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()> {
        self.exec(
            "DELETE FROM slice WHERE ino = $1 AND indx = $2 AND seq = $3",
            vec![Box::new(i(ino)), Box::new(indx as i64), Box::new(i(seq))],
        )
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
            vec![Box::new(i(ino)), Box::new(i(length))],
        )
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
        self.exec("DELETE FROM reclaim WHERE ino = $1", vec![Box::new(i(ino))])
    }
    fn add_trim(&mut self, ino: Ino) -> Result<()> {
        self.exec(
            "INSERT INTO trim (ino) VALUES ($1) ON CONFLICT DO NOTHING",
            vec![Box::new(i(ino))],
        )
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
        self.exec("DELETE FROM trim WHERE ino = $1", vec![Box::new(i(ino))])
    }
    fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()> {
        self.exec(
            "INSERT INTO garbage (id, size, due) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET size = EXCLUDED.size, due = EXCLUDED.due",
            vec![Box::new(i(id)), Box::new(size as i64), Box::new(due)],
        )
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
        self.exec("DELETE FROM garbage WHERE id = $1", vec![Box::new(i(id))])
    }
    fn has_garbage(&mut self, id: u64) -> Result<bool> {
        Ok(self
            .opt("SELECT 1 FROM garbage WHERE id = $1", &[&i(id)])?
            .is_some())
    }

    fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()> {
        self.exec(
            "INSERT INTO session (sid, heartbeat, info) VALUES ($1, $2, $3)
             ON CONFLICT (sid) DO UPDATE SET heartbeat = EXCLUDED.heartbeat, info = EXCLUDED.info",
            vec![
                Box::new(i(sid)),
                Box::new(heartbeat),
                Box::new(info.to_owned()),
            ],
        )
    }
    fn delete_session(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM session WHERE sid = $1", vec![Box::new(i(sid))])
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
            vec![Box::new(i(sid)), Box::new(i(ino))],
        )
    }
    fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()> {
        self.exec(
            "DELETE FROM sustained WHERE sid = $1 AND ino = $2",
            vec![Box::new(i(sid)), Box::new(i(ino))],
        )
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
            return self.exec(
                "DELETE FROM plock WHERE ino = $1 AND sid = $2 AND owner = $3",
                vec![Box::new(i(ino)), Box::new(i(sid)), Box::new(i(owner))],
            );
        }
        self.exec(
            "INSERT INTO plock (ino, sid, owner, ranges) VALUES ($1, $2, $3, $4)
             ON CONFLICT (ino, sid, owner) DO UPDATE SET ranges = EXCLUDED.ranges",
            vec![
                Box::new(i(ino)),
                Box::new(i(sid)),
                Box::new(i(owner)),
                Box::new(LockSet::encode(ranges)),
            ],
        )
    }
    fn delete_session_locks(&mut self, sid: u64) -> Result<()> {
        self.exec("DELETE FROM plock WHERE sid = $1", vec![Box::new(i(sid))])
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
        let (first, end) = (format!("{name}#"), format!("{name}$"));
        self.exec(
            "DELETE FROM counter WHERE name >= $1 AND name < $2",
            vec![Box::new(first), Box::new(end)],
        )?;
        self.exec(
            "INSERT INTO counter (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            vec![Box::new(name.to_owned()), Box::new(value.to_owned())],
        )
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
            vec![
                Box::new(i(q.ino)),
                Box::new(i(q.max_space)),
                Box::new(i(q.max_inodes)),
                Box::new(q.used_space),
                Box::new(q.used_inodes),
            ],
        )
    }
    fn delete_quota(&mut self, ino: Ino) -> Result<()> {
        self.exec(
            "DELETE FROM dirquota WHERE ino = $1",
            vec![Box::new(i(ino))],
        )
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
    fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()> {
        for (ino, kind) in rows {
            self.exec(
                "INSERT INTO journal (ino, kind, at) VALUES ($1, $2, $3)",
                vec![Box::new(i(*ino)), Box::new(*kind as i16), Box::new(at)],
            )?;
        }
        Ok(())
    }
    fn journal_position(&mut self) -> Result<u64> {
        // Every transaction with a smaller id has ended (committed or aborted) in this
        // snapshot: rows of the ones still running will have positions >= this.
        let r = self.query(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )?;
        Ok(r.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }
    fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>> {
        let (p, l) = (i(pos), limit as i64);
        Ok(self
            .query(
                "SELECT DISTINCT ino, kind FROM journal WHERE xid >= $1 ORDER BY ino, kind LIMIT $2",
                &[&p, &l],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as Ino, r.get::<_, i16>(1) as u8))
            .collect())
    }
    fn journal_trim(&mut self, before: i64) -> Result<u64> {
        let r = self.query(
            "WITH d AS (DELETE FROM journal WHERE at < $1 RETURNING xid)
             SELECT COALESCE(MAX(xid) + 1, 0) FROM d",
            &[&before],
        )?;
        Ok(r.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }
    fn backlog_add(&mut self, key: &str, at: i64) -> Result<()> {
        self.exec(
            "INSERT INTO backlog (key, at) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET at = EXCLUDED.at",
            vec![Box::new(key.to_owned()), Box::new(at)],
        )
    }
    fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>> {
        let l = limit as i64;
        Ok(self
            .query(
                "SELECT key FROM backlog WHERE key > $1 ORDER BY key LIMIT $2",
                &[&after, &l],
            )?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    }
    fn backlog_delete(&mut self, key: &str) -> Result<()> {
        self.exec(
            "DELETE FROM backlog WHERE key = $1",
            vec![Box::new(key.to_owned())],
        )
    }
    fn backlog_count(&mut self) -> Result<u64> {
        let r = self.query("SELECT COUNT(*) FROM backlog", &[])?;
        Ok(r.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
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
