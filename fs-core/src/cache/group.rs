//! Cache groups: the mounts started with the same `--cache-group` (on any nodes) share one
//! distributed block cache.
//!
//! - Membership: each member puts `cache_group=NAME cache_addr=HOST:PORT` into its session
//!   record in the metadata engine (see docs/FORMAT.md, "Sessions"); live sessions of the
//!   same group are the members. Works with or without Kubernetes. `--no-serve` members
//!   register no address: they read from the group but own nothing.
//! - Ownership: rendezvous hashing of the block key over the serving members. A miss asks the
//!   owner, which reads the block from its own cache or fetches it from the object store once
//!   (single flight) for everybody.
//! - Hot blocks: an owner that sees one block asked for often answers `X-Strata-Hot: 1`; the
//!   askers then spread their requests over the top `hot_replicas` members of the block's
//!   ranking (by their own id), and those replicas fetch it from the owner, not the store.
//! - Handoff: the member that is to fetch a block it does not hold (the owner, or a replica
//!   the owner was asked through) first asks the next `handoff_probes` members of the block's
//!   ranking for a cached copy (`X-Strata-Hop: 2`, answered from their memory and disk tiers
//!   only, 404 when absent), then the object store. When a member joins, the blocks it now
//!   owns are taken from their previous owners (the next of the ranking), so the group never
//!   reads the store again for what it holds; ownership moves block by block as they are
//!   read. A member's disk tier survives its restart (see `disk`).
//! - Failure: connecting, or any pause in the answer, is bounded by `peer_timeout_ms`; a peer
//!   that failed is skipped for 10 s, and the read continues from the object store. A read
//!   never fails because a peer is down.
//!
//! The wire protocol is a small HTTP/1.1 subset over TCP with keep-alive:
//! `GET /v1/block?key=K&len=N` with headers `X-Strata-Token` (derived from the volume UUID,
//! which only clients that can read the metadata know) and `X-Strata-Hop` (1 = the asker is a
//! replica: answer from the local cache or the object store, never forward; 2 = a handoff
//! probe: answer from the local cache only; 3 = a warm-up: get the block into the local
//! cache, answer without a body).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::CacheSettings;
use crate::metrics::Metrics;
use crate::vfs::reader::{BlockReader, Source};

/// How long a failed peer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// Window in which requests for one block are counted to find hot blocks.
const HOT_WINDOW: Duration = Duration::from_secs(10);
/// How long a block stays hot for an asker after the owner said so.
const HOT_FOR: Duration = Duration::from_secs(60);
/// Piece size of reading a peer's answer.
const PIECE: usize = 256 << 10;
/// `X-Strata-Hop` of a handoff probe: answer from the local tiers only, 404 if not there.
const HOP_CACHED: u8 = 2;
/// `X-Strata-Hop` of a warm-up: get the block into your cache as for a reader and answer
/// with no body, only `X-Strata-Warm: cached|fetched|dropped`.
const HOP_WARM: u8 = 3;

/// One request to a peer: block `key` of `len` bytes, the hop (`None`: a reader's request,
/// hop 0 or 1 by hotness) and the block's origin query (attached sources; else empty).
#[derive(Clone, Copy)]
struct Ask<'a> {
    key: &'a str,
    len: usize,
    hop: Option<u8>,
    origin: &'a str,
}

/// What a member did for a warm-up request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warm {
    /// It had the block already.
    Cached,
    /// It fetched the block and keeps it.
    Fetched,
    /// It fetched the block but its cache did not keep it (disk full).
    Dropped,
}

/// Errors of joining a group (each names the fix).
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("--cache-group {0:?}: use 1-63 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
    BadName(String),
    #[error(
        "--cache-group-addr {addr}: {err} (give HOST:PORT of this node, port 0 for any free port)"
    )]
    Listen { addr: String, err: std::io::Error },
}

/// One serving member as read from the metadata engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub sid: u64,
    pub addr: String,
}

/// Parse `cache_group=` and `cache_addr=` from a session's info string.
pub fn parse_session_info(info: &str) -> (Option<&str>, Option<&str>) {
    let mut group = None;
    let mut addr = None;
    for tok in info.split_whitespace() {
        if let Some(v) = tok.strip_prefix("cache_group=") {
            group = Some(v);
        } else if let Some(v) = tok.strip_prefix("cache_addr=") {
            addr = Some(v);
        }
    }
    (group, addr)
}

/// Rendezvous score of member `addr` for block `key`: the two CRCs mixed by the 64-bit
/// finalizer of MurmurHash3 (a CRC alone ranks members whose addresses differ in a few
/// characters, such as ports of one host, very unevenly).
fn score(addr: &str, key: &str) -> u64 {
    let mut h = (u64::from(crc32c::crc32c(key.as_bytes())) << 32)
        | u64::from(crc32c::crc32c(addr.as_bytes()));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A member's view of its group.
pub struct Group {
    name: String,
    /// The address peers reach this member at (`None` with `--no-serve`).
    advertised: Option<String>,
    /// Who this member is when spreading hot blocks.
    self_id: String,
    token: String,
    /// Only keys under these prefixes are served (this volume's blocks, and blocks of its
    /// attached sources).
    key_prefix: String,
    ext_prefix: String,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
    members: RwLock<Vec<Member>>,
    down: Mutex<HashMap<String, Instant>>,
    hot_seen: Mutex<HashMap<String, (Instant, u32)>>,
    hot: Mutex<HashMap<String, Instant>>,
    conns: Mutex<HashMap<String, Vec<TcpStream>>>,
    stop: AtomicBool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({}, {:?})", self.name, self.advertised)
    }
}

impl Group {
    /// Join group `settings.group` for volume `volume` (uuid `uuid`); unless `--no-serve`,
    /// start serving `reader`'s blocks to peers.
    pub fn start(
        settings: &CacheSettings,
        volume: &str,
        uuid: &str,
        reader: &Arc<BlockReader>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Group>, GroupError> {
        let name = settings.group.clone().unwrap_or_default();
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(GroupError::BadName(name));
        }
        let mut listener = None;
        let advertised = if settings.no_serve {
            None
        } else {
            let want = settings
                .group_addr
                .clone()
                .unwrap_or_else(|| format!("{}:0", node_ip()));
            let l = TcpListener::bind(&want).map_err(|err| GroupError::Listen {
                addr: want.clone(),
                err,
            })?;
            let local = l.local_addr().map_err(|err| GroupError::Listen {
                addr: want.clone(),
                err,
            })?;
            // Advertise the host as given (it may be a name), with the real port.
            let host = want
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| local.ip().to_string());
            let host = if host == "0.0.0.0" || host.is_empty() {
                node_ip()
            } else {
                host
            };
            listener = Some(l);
            Some(format!("{host}:{}", local.port()))
        };
        let self_id = advertised.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), std::process::id())
        });
        let group = Arc::new(Group::with_identity(
            name,
            advertised,
            self_id,
            format!(
                "{:08x}",
                crc32c::crc32c(format!("strata-group:{uuid}").as_bytes())
            ) + uuid,
            format!("{volume}/chunks/"),
            settings.clone(),
            metrics,
        ));
        if let Some(l) = listener {
            let g = Arc::downgrade(&group);
            let r = Arc::downgrade(reader);
            std::thread::Builder::new()
                .name("group-server".into())
                .spawn(move || serve(l, g, r))
                .map_err(|err| GroupError::Listen {
                    addr: group.advertised.clone().unwrap_or_default(),
                    err,
                })?;
        }
        tracing::info!(group = %group.name, addr = ?group.advertised, "joined cache group");
        Ok(group)
    }

    /// A member with no peers known yet and nothing served.
    fn with_identity(
        name: String,
        advertised: Option<String>,
        self_id: String,
        token: String,
        key_prefix: String,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Group {
        Group {
            name,
            advertised,
            self_id,
            token,
            ext_prefix: key_prefix.replace("/chunks/", "/ext/"),
            key_prefix,
            settings,
            metrics,
            members: RwLock::new(Vec::new()),
            down: Mutex::new(HashMap::new()),
            hot_seen: Mutex::new(HashMap::new()),
            hot: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address peers use for this member, if it serves.
    pub fn advertised(&self) -> Option<&str> {
        self.advertised.as_deref()
    }

    /// What this member adds to its session record.
    pub fn session_info(&self) -> String {
        match &self.advertised {
            Some(a) => format!(" cache_group={} cache_addr={a}", self.name),
            None => format!(" cache_group={}", self.name),
        }
    }

    /// Replace the member list from the live sessions `(sid, expiry, info)`.
    pub fn refresh(&self, sessions: &[(u64, i64, String)], now_secs: i64) {
        let mut members: Vec<Member> = sessions
            .iter()
            .filter(|(_, expiry, _)| *expiry >= now_secs)
            .filter_map(|(sid, _, info)| match parse_session_info(info) {
                (Some(g), Some(a)) if g == self.name => Some(Member {
                    sid: *sid,
                    addr: a.to_string(),
                }),
                _ => None,
            })
            .collect();
        members.sort_by(|a, b| a.addr.cmp(&b.addr));
        members.dedup_by(|a, b| a.addr == b.addr);
        let mut cur = self.members.write();
        if *cur != members {
            tracing::info!(group = %self.name, members = ?members.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>(), "cache group membership changed");
            *cur = members;
        }
    }

    /// Serving members, ranked for `key` (rendezvous hashing), live ones only.
    fn ranked(&self, key: &str) -> Vec<String> {
        let now = Instant::now();
        let down = self.down.lock();
        let mut m: Vec<(u64, String)> = self
            .members
            .read()
            .iter()
            .filter(|m| down.get(&m.addr).is_none_or(|t| now >= *t))
            .map(|m| (score(&m.addr, key), m.addr.clone()))
            .collect();
        m.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        m.into_iter().map(|(_, a)| a).collect()
    }

    /// The peer to ask for `key`, or `None` to read the object store directly (this member
    /// owns the block, or no peer is alive).
    pub fn target(&self, key: &str) -> Option<String> {
        let ranked = self.ranked(key);
        let owner = ranked.first()?.clone();
        let me = self.advertised.as_deref();
        let hot = {
            let mut h = self.hot.lock();
            match h.get(key) {
                Some(t) if t.elapsed() < HOT_FOR => true,
                Some(_) => {
                    h.remove(key);
                    false
                }
                None => false,
            }
        };
        let pick = if hot && ranked.len() > 1 {
            let n = self.settings.hot_replicas.clamp(1, ranked.len());
            let i = score(&self.self_id, key) as usize % n;
            ranked[i].clone()
        } else {
            owner.clone()
        };
        if Some(pick.as_str()) != me {
            Some(pick)
        } else if Some(owner.as_str()) != me {
            // This member is a replica of a hot block: get it from the owner.
            Some(owner)
        } else {
            None
        }
    }

    pub fn mark_down(&self, addr: &str) {
        self.down
            .lock()
            .insert(addr.to_string(), Instant::now() + DOWN_FOR);
        self.conns.lock().remove(addr);
    }

    /// A connection to `addr`: a pooled one (`reused` true) or a new one.
    fn connect(&self, addr: &str, reuse: bool) -> std::io::Result<(TcpStream, bool)> {
        if reuse && let Some(c) = self.conns.lock().get_mut(addr).and_then(|v| v.pop()) {
            return Ok((c, true));
        }
        let timeout = Duration::from_millis(self.settings.peer_timeout_ms.max(1));
        let sa: SocketAddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "address does not resolve")
        })?;
        let s = TcpStream::connect_timeout(&sa, timeout)?;
        s.set_nodelay(true)?;
        Ok((s, false))
    }

    /// Members to ask for a cached copy of `key` before the object store, best first: the
    /// next members of the block's ranking other than this one and `skip` (the peer
    /// already asked), at most `handoff_probes` of them. After a member joins, the block's
    /// previous owner is the next of its ranking; after one leaves or restarts empty, the
    /// next members are the replicas and earlier askers most likely to hold it.
    pub fn holders(&self, key: &str, skip: Option<&str>) -> Vec<String> {
        let me = self.advertised.as_deref();
        self.ranked(key)
            .into_iter()
            .filter(|a| Some(a.as_str()) != me && Some(a.as_str()) != skip)
            .take(self.settings.handoff_probes)
            .collect()
    }

    /// Ask `peer` for block `key` (`len` bytes), streaming it into `sink`. `Ok(false)`: the
    /// peer answered that it has no such block. `origin`: for a block of an attached source,
    /// where it comes from (`Origin::query`), else empty.
    pub fn fetch(
        &self,
        peer: &str,
        key: &str,
        len: usize,
        origin: &str,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, String> {
        self.fetch_hop(peer, key, len, None, origin, sink)
            .map(|a| a.is_some())
    }

    /// Ask `peer` for block `key` only if it has it cached (no fetch on its side).
    /// `Ok(false)`: it has not.
    pub fn fetch_cached(
        &self,
        peer: &str,
        key: &str,
        len: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, String> {
        self.fetch_hop(peer, key, len, Some(HOP_CACHED), "", sink)
            .map(|a| a.is_some())
    }

    /// Have `peer` (the block's owner) get block `key` into its cache, without sending it
    /// here: a warm-up of the group leaves each block with its owner only.
    pub fn warm(&self, peer: &str, key: &str, len: usize, origin: &str) -> Result<Warm, String> {
        match self.fetch_hop(peer, key, len, Some(HOP_WARM), origin, &mut |_| {})? {
            None => Err(format!("block {key} is missing from the object store")),
            Some(state) => match state.as_str() {
                "cached" => Ok(Warm::Cached),
                "fetched" => Ok(Warm::Fetched),
                "dropped" => Ok(Warm::Dropped),
                other => Err(format!("unexpected warm-up answer {other:?}")),
            },
        }
    }

    fn fetch_hop(
        &self,
        peer: &str,
        key: &str,
        len: usize,
        hop: Option<u8>,
        origin: &str,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<String>, String> {
        let delivered = std::cell::Cell::new(0usize);
        let mut counting = |c: &[u8]| {
            delivered.set(delivered.get() + c.len());
            sink(c)
        };
        let ask = Ask {
            key,
            len,
            hop,
            origin,
        };
        match self.fetch_on(peer, &ask, true, &mut counting) {
            // A pooled connection the peer closed meanwhile (idle timeout, restart): one
            // more try on a new connection before the peer counts as failed.
            Err((true, _)) if delivered.get() == 0 => self
                .fetch_on(peer, &ask, false, &mut counting)
                .map_err(|e| e.1),
            other => other.map_err(|e| e.1),
        }
    }

    /// One request; the error says whether the connection was a pooled one.
    fn fetch_on(
        &self,
        peer: &str,
        ask: &Ask<'_>,
        reuse: bool,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<String>, (bool, String)> {
        let (stream, reused) = self
            .connect(peer, reuse)
            .map_err(|e| (false, format!("connect: {e}")))?;
        let found = self
            .request(&stream, peer, ask, sink)
            .map_err(|e| (reused, e))?;
        self.conns
            .lock()
            .entry(peer.to_string())
            .or_default()
            .push(stream);
        Ok(found)
    }

    fn request(
        &self,
        stream: &TcpStream,
        peer: &str,
        ask: &Ask<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<String>, String> {
        let Ask {
            key,
            len,
            hop,
            origin,
        } = *ask;
        // A replica asking the owner says so: the owner must not forward again.
        let hop = hop.unwrap_or_else(|| {
            let owner = self.ranked(key).into_iter().next();
            u8::from(owner.as_deref() == Some(peer) && self.is_hot(key))
        });
        let timeout = Duration::from_millis(self.settings.peer_timeout_ms.max(1));
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let mut w = stream;
        write!(
            w,
            "GET /v1/block?key={key}&len={len}{origin} HTTP/1.1\r\nHost: {peer}\r\nX-Strata-Token: {}\r\nX-Strata-Hop: {hop}\r\n\r\n",
            self.token
        )
        .map_err(|e| format!("send: {e}"))?;
        let mut r = BufReader::with_capacity(PIECE, stream);
        let (status, headers) = read_head(&mut r).map_err(|e| format!("answer: {e}"))?;
        let clen: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or("answer without Content-Length")?;
        if status != 200 {
            let mut body = vec![0u8; clen.min(4096)];
            let _ = r.read_exact(&mut body);
            if status == 404 && clen <= body.len() {
                // "No such block here": the connection stays usable.
                return Ok(None);
            }
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        if hop == HOP_WARM {
            if clen != 0 {
                return Err(format!("warm-up answer has {clen} bytes, expected none"));
            }
            return Ok(Some(
                headers.get("x-strata-warm").cloned().unwrap_or_default(),
            ));
        }
        if clen != len {
            return Err(format!("answer has {clen} bytes, expected {len}"));
        }
        if headers.get("x-strata-hot").map(String::as_str) == Some("1") {
            self.hot.lock().insert(key.to_string(), Instant::now());
        }
        let mut left = clen;
        let mut buf = vec![0u8; PIECE.min(clen.max(1))];
        while left > 0 {
            let want = left.min(buf.len());
            let n = r.read(&mut buf[..want]).map_err(|e| format!("body: {e}"))?;
            if n == 0 {
                return Err("peer closed the connection mid-block".into());
            }
            sink(&buf[..n]);
            left -= n;
        }
        Ok(Some(String::new()))
    }

    fn is_hot(&self, key: &str) -> bool {
        self.hot
            .lock()
            .get(key)
            .is_some_and(|t| t.elapsed() < HOT_FOR)
    }

    /// Count a peer request for `key`; whether the block is now hot.
    fn note_request(&self, key: &str) -> bool {
        let mut seen = self.hot_seen.lock();
        let now = Instant::now();
        if seen.len() > 100_000 {
            seen.retain(|_, (t, _)| now.duration_since(*t) < HOT_WINDOW);
        }
        let e = seen.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(e.0) >= HOT_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 >= self.settings.hot_threshold.max(1)
    }

    /// Stop serving (at unmount).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = &self.advertised
            && let Ok(mut addrs) = a.to_socket_addrs()
            && let Some(sa) = addrs.next()
        {
            // Wake the accept loop so it sees `stop`.
            let _ = TcpStream::connect_timeout(&sa, Duration::from_millis(200));
        }
    }
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, HashMap<String, String>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let first = line.trim_end().to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // Status line of an answer ("HTTP/1.1 200 OK"); for a request the caller parses `first`.
    let status = first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    headers.insert(":first".into(), first);
    Ok((status, headers))
}

fn serve(listener: TcpListener, group: Weak<Group>, reader: Weak<BlockReader>) {
    for conn in listener.incoming() {
        let Some(g) = group.upgrade() else { return };
        if g.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let (g2, r2) = (Arc::downgrade(&g), reader.clone());
        let _ = std::thread::Builder::new()
            .name("group-conn".into())
            .spawn(move || serve_conn(conn, g2, r2));
    }
}

fn respond(w: &mut impl Write, status: &str, body: &[u8], hot: bool) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Strata-Hot: {}\r\n\r\n",
        body.len(),
        u8::from(hot)
    )?;
    w.write_all(body)?;
    w.flush()
}

/// The answer to a failed fetch: 404 when the store has no such block, else 503 (the asker
/// reads the store itself).
fn respond_error(w: &mut impl Write, e: &crate::vfs::reader::FetchError) -> std::io::Result<()> {
    match e {
        crate::vfs::reader::FetchError::Missing(_) => {
            respond(w, "404 Not Found", b"block missing\n", false)
        }
        e => respond(
            w,
            "503 Service Unavailable",
            e.to_string().as_bytes(),
            false,
        ),
    }
}

fn serve_conn(conn: TcpStream, group: Weak<Group>, reader: Weak<BlockReader>) {
    let _ = conn.set_nodelay(true);
    // Idle keep-alive connections are closed after a while.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut r = BufReader::new(&conn);
    let mut w = &conn;
    loop {
        let Ok((_, headers)) = read_head(&mut r) else {
            return;
        };
        let (Some(g), Some(reader)) = (group.upgrade(), reader.upgrade()) else {
            return;
        };
        if g.stop.load(Ordering::SeqCst) {
            return;
        }
        let first = headers.get(":first").cloned().unwrap_or_default();
        let target = first.split_whitespace().nth(1).unwrap_or("");
        let Some(query) = target.strip_prefix("/v1/block?") else {
            let _ = respond(&mut w, "404 Not Found", b"unknown path\n", false);
            continue;
        };
        if headers.get("x-strata-token") != Some(&g.token) {
            let _ = respond(
                &mut w,
                "403 Forbidden",
                b"wrong token: the asker is not a client of this volume\n",
                false,
            );
            continue;
        }
        let mut key = "";
        let mut len: Option<usize> = None;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("key", v)) => key = v,
                Some(("len", v)) => len = v.parse().ok(),
                _ => {}
            }
        }
        let ours = key.starts_with(&g.key_prefix)
            || (crate::vfs::reader::is_ext_key(key) && key.starts_with(&g.ext_prefix));
        let (Some(len), true) = (len, ours && !key.contains("..")) else {
            let _ = respond(&mut w, "400 Bad Request", b"bad key or len\n", false);
            continue;
        };
        if let Some(o) = crate::vfs::reader::Origin::from_query(query) {
            reader.register_origin(key, o);
        }
        let hop = headers.get("x-strata-hop").map(String::as_str);
        if hop == Some("2") {
            // A handoff probe: only what this member already holds.
            let sent = match reader.cached_block(key, len) {
                Some(b) => {
                    g.metrics.cache_peer_served();
                    respond(&mut w, "200 OK", &b, false)
                }
                None => respond(&mut w, "404 Not Found", b"not cached here\n", false),
            };
            if sent.is_err() {
                return;
            }
            continue;
        }
        if hop == Some("3") {
            let state = if reader.cached(key) {
                Ok("cached")
            } else {
                reader.get(key, len).map(|_| {
                    if reader.kept(key) {
                        "fetched"
                    } else {
                        "dropped"
                    }
                })
            };
            let sent = match state {
                Ok(state) => write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Strata-Warm: {state}\r\n\r\n"
                )
                .and_then(|_| w.flush()),
                Err(e) => respond_error(&mut w, &e),
            };
            if sent.is_err() {
                return;
            }
            continue;
        }
        let hop = hop == Some("1");
        let hot = g.note_request(key);
        let source = if hop { Source::Store } else { Source::Any };
        let res = reader.get_from(key, len, source);
        let sent = match res {
            Ok(b) => {
                g.metrics.cache_peer_served();
                respond(&mut w, "200 OK", &b, hot)
            }
            Err(e) => respond_error(&mut w, &e),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// This node's address for peers: `STRATA_NODE_IP` / `POD_IP` if set, else the first
/// non-loopback IPv4 address of an interface that is up, else 127.0.0.1.
pub fn node_ip() -> String {
    for var in ["STRATA_NODE_IP", "POD_IP"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            return v;
        }
    }
    let mut found = None;
    // SAFETY: getifaddrs allocates a list that we walk read-only and free.
    unsafe {
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifap) == 0 {
            let mut p = ifap;
            while !p.is_null() {
                let ifa = &*p;
                if !ifa.ifa_addr.is_null()
                    && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET
                    && ifa.ifa_flags & libc::IFF_UP as u32 != 0
                    && ifa.ifa_flags & libc::IFF_LOOPBACK as u32 == 0
                {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    found = Some(ip.to_string());
                    break;
                }
                p = ifa.ifa_next;
            }
            libc::freeifaddrs(ifap);
        }
    }
    found.unwrap_or_else(|| "127.0.0.1".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(addr: &str) -> Group {
        Group::with_identity(
            "g".into(),
            Some(addr.into()),
            addr.into(),
            "t".into(),
            "v/chunks/".into(),
            CacheSettings::default(),
            Arc::new(Metrics::new()),
        )
    }

    fn sessions() -> Vec<(u64, i64, String)> {
        vec![
            (
                1,
                100,
                "host=a pid=1 cache_group=g cache_addr=10.0.0.1:1".into(),
            ),
            (
                2,
                100,
                "host=b pid=2 cache_group=g cache_addr=10.0.0.2:1".into(),
            ),
            (
                3,
                100,
                "host=c pid=3 cache_group=g cache_addr=10.0.0.3:1".into(),
            ),
            (
                4,
                100,
                "host=d pid=4 cache_group=other cache_addr=10.0.0.4:1".into(),
            ),
            (5, 100, "host=e pid=5 cache_group=g".into()),
            (
                6,
                10,
                "host=f pid=6 cache_group=g cache_addr=10.0.0.6:1".into(),
            ),
        ]
    }

    #[test]
    fn membership_comes_from_live_sessions_of_the_group() {
        let g = group("10.0.0.1:1");
        g.refresh(&sessions(), 50);
        let m: Vec<String> = g.members.read().iter().map(|m| m.addr.clone()).collect();
        assert_eq!(m, vec!["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
    }

    #[test]
    fn every_member_agrees_on_owners_and_owners_spread() {
        let a = group("10.0.0.1:1");
        let b = group("10.0.0.2:1");
        a.refresh(&sessions(), 50);
        b.refresh(&sessions(), 50);
        let mut per_owner: HashMap<String, usize> = HashMap::new();
        for i in 0..3000 {
            let key = format!("v/chunks/0/0/{i}_0_4194304");
            let ra = a.ranked(&key);
            assert_eq!(ra, b.ranked(&key));
            *per_owner.entry(ra[0].clone()).or_default() += 1;
            // The owner reads the store itself; others ask the owner.
            match a.target(&key) {
                None => assert_eq!(ra[0], "10.0.0.1:1"),
                Some(t) => assert_eq!(t, ra[0]),
            }
        }
        assert_eq!(per_owner.len(), 3);
        assert!(per_owner.values().all(|n| *n > 700), "{per_owner:?}");
    }

    #[test]
    fn members_on_ports_of_one_host_share_blocks_evenly() {
        // Ten groups of four members on ports of one host (a fixed pseudo-random choice);
        // in each, the 1024 blocks of one file spread within ±25% of an even share. (A
        // plain CRC of key and address ranks by XOR distance: one member got half.)
        let mut seed: u64 = 42;
        let mut next_port = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            10_000 + (seed >> 33) % 50_000
        };
        for _ in 0..10 {
            let sessions: Vec<(u64, i64, String)> = (0..4)
                .map(|i| {
                    (
                        i,
                        100,
                        format!("cache_group=g cache_addr=127.0.0.1:{}", next_port()),
                    )
                })
                .collect();
            let g = group("127.0.0.1:1");
            g.refresh(&sessions, 50);
            let mut per_owner: HashMap<String, usize> = HashMap::new();
            for id in 1000..1064 {
                for k in 0..16 {
                    let key = format!("v/chunks/0/1/{id}_{k}_4194304");
                    *per_owner.entry(g.ranked(&key)[0].clone()).or_default() += 1;
                }
            }
            assert!(
                per_owner.len() == 4 && per_owner.values().all(|n| (192..=320).contains(n)),
                "1024 blocks over 4 members: {per_owner:?}"
            );
        }
    }

    #[test]
    fn a_down_peer_is_skipped_and_ownership_moves_to_the_next() {
        let a = group("10.0.0.1:1");
        a.refresh(&sessions(), 50);
        let key = (0..)
            .map(|i| format!("v/chunks/0/0/{i}_0_1"))
            .find(|k| a.ranked(k)[0] == "10.0.0.2:1")
            .unwrap();
        let second = a.ranked(&key)[1].clone();
        a.mark_down("10.0.0.2:1");
        assert_eq!(a.ranked(&key)[0], second);
        assert!(a.target(&key) != Some("10.0.0.2:1".to_string()));
    }

    #[test]
    fn hot_blocks_spread_over_replicas() {
        let sessions = sessions();
        let key = "v/chunks/0/0/42_0_1";
        let mut targets = std::collections::HashSet::new();
        for i in 0..40 {
            let mut c = group(&format!("10.9.0.{i}:1"));
            c.advertised = None;
            c.refresh(&sessions, 50);
            c.hot.lock().insert(key.to_string(), Instant::now());
            targets.insert(c.target(key).unwrap());
        }
        assert!(targets.len() >= 2, "{targets:?}");
    }

    #[test]
    fn hotness_is_counted_per_window() {
        let g = group("10.0.0.1:1");
        let hot: Vec<bool> = (0..10).map(|_| g.note_request("k")).collect();
        assert!(!hot[0]);
        assert!(hot[9]);
    }
}
