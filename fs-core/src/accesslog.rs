//! The access log: the virtual read-only file `.accesslog` in the mount root. While it is
//! open, every FUSE operation of the mount (except those on the log itself) becomes one line
//! in each reader's stream: time, caller, operation, path(s), arguments, result, bytes and
//! latency (line format in docs/SEMANTICS.md §17). `strata profile` reads it
//! ([`crate::profile`]).
//!
//! Cost when nobody reads it: one atomic load per operation ([`AccessLog::active`]). Each
//! reader has a bounded buffer; a line that does not fit is dropped and counted (a `#dropped N`
//! line marks the gap), so a slow reader never holds up an operation. A read that finds
//! nothing waits for lines on the reader's own thread (never a FUSE worker) and, after
//! [`HEARTBEAT`] without any, answers `#` (an empty answer would be end of file).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock};

/// Name of the virtual file in the mount root.
pub const NAME: &[u8] = b".accesslog";

/// Its inode number: above the signed 64-bit range the metadata engines hand out inode
/// numbers from (docs/FORMAT.md §2, reserved inode numbers), so it never names a real file.
pub const INO: u64 = (1 << 63) | 1;

/// Bytes of lines kept for one reader that has not read them yet.
pub const READER_BUFFER: usize = 4 << 20;

/// Longest wait of a read for a line before it answers `#\n`.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// One operation, as the FUSE adapter saw it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub at: SystemTime,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub op: &'a str,
    pub path: &'a str,
    /// Further fields, already formatted as ` key=value` pairs (values escaped with
    /// [`escape`] where they may hold spaces).
    pub args: &'a str,
    pub errno: Option<i32>,
    pub bytes: u64,
    pub secs: f64,
}

impl Record<'_> {
    /// The record as one line of the log (with its newline).
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(128 + self.path.len() + self.args.len());
        s.push_str(&timestamp(self.at));
        let _ = write!(
            s,
            " uid={} gid={} pid={} op={} path=",
            self.uid, self.gid, self.pid, self.op
        );
        escape_into(&mut s, self.path);
        s.push_str(self.args);
        let _ = writeln!(
            s,
            " result={} bytes={} secs={:.6}",
            self.errno.map_or("OK".into(), errno_name),
            self.bytes,
            self.secs
        );
        s
    }
}

/// `2026-12-06T15:51:20.123456Z` (UTC, microseconds).
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil(secs / 86_400);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        d.subsec_micros()
    )
}

/// Calendar date of a day number counted from 1970-01-01 (proleptic Gregorian).
fn civil(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so that leap days end each 4/100/400-year cycle.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Append `v` with backslash, whitespace, control characters and `=` escaped as `\xHH`, so
/// that a value is one space-free token ([`unescape`] reverses it).
pub fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        if c == '\\' || c == '=' || c.is_whitespace() || c.is_control() {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                let _ = write!(out, "\\x{byte:02x}");
            }
        } else {
            out.push(c);
        }
    }
}

pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    escape_into(&mut s, v);
    s
}

/// Reverse [`escape`] (a malformed escape is kept as it is).
pub fn unescape(v: &str) -> String {
    if !v.contains('\\') {
        return v.to_string();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1] == b'x'
            && let Some(h) = std::str::from_utf8(&b[i + 2..i + 4])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The symbolic name of an errno value (`E<n>` for ones the file system never returns).
pub fn errno_name(no: i32) -> String {
    let name = match no {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EDQUOT => "EDQUOT",
        libc::EINTR => "EINTR",
        _ => return format!("E{no}"),
    };
    name.to_string()
}

type Respond = Box<dyn FnOnce(Vec<u8>) + Send>;

struct Pending {
    size: usize,
    respond: Respond,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// Lines dropped since the last `#dropped` line.
    dropped: u64,
    pending: VecDeque<Pending>,
    closed: bool,
}

impl State {
    /// Up to `size` bytes of the stream (the `#dropped` line first when the gap is next).
    fn take(&mut self, size: usize) -> Vec<u8> {
        if self.buf.is_empty() && self.dropped > 0 {
            self.buf
                .extend(format!("#dropped {}\n", self.dropped).as_bytes());
            self.dropped = 0;
        }
        let n = size.min(self.buf.len());
        self.buf.drain(..n).collect()
    }

    fn ready(&self) -> bool {
        !self.buf.is_empty() || self.dropped > 0
    }
}

struct Reader {
    state: Mutex<State>,
    cond: Condvar,
}

impl Reader {
    /// Answer queued reads as lines arrive (or with `#` after [`HEARTBEAT`]); ends when the
    /// log is closed.
    fn serve(&self) {
        let mut st = self.state.lock();
        loop {
            if st.closed {
                let pending: Vec<Pending> = st.pending.drain(..).collect();
                drop(st);
                for p in pending {
                    (p.respond)(Vec::new());
                }
                return;
            }
            let Some(deadline) = st.pending.front().map(|p| p.deadline) else {
                self.cond.wait(&mut st);
                continue;
            };
            if st.ready() || Instant::now() >= deadline {
                let p = st.pending.pop_front().expect("a pending read");
                let data = if st.ready() {
                    st.take(p.size)
                } else {
                    b"#\n"[..p.size.min(2)].to_vec()
                };
                parking_lot::MutexGuard::unlocked(&mut st, || (p.respond)(data));
            } else {
                self.cond.wait_until(&mut st, deadline);
            }
        }
    }
}

/// The access log of one mount: its open readers.
pub struct AccessLog {
    active: AtomicUsize,
    readers: RwLock<HashMap<u64, Arc<Reader>>>,
    next: AtomicU64,
    capacity: usize,
    dropped: AtomicU64,
}

/// Errors of reading the log.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("no open access log with handle {0}")]
    BadHandle(u64),
    #[error("starting the access log reader thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog::new(READER_BUFFER)
    }
}

impl AccessLog {
    /// A log keeping at most `capacity` unread bytes per reader.
    pub fn new(capacity: usize) -> AccessLog {
        AccessLog {
            active: AtomicUsize::new(0),
            readers: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
            capacity: capacity.max(256),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether anybody reads the log (operations skip all logging work when not).
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// Lines dropped so far because a reader's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A new reader; returns its handle. Lines of operations from now on reach it.
    pub fn open(&self) -> Result<u64, AccessLogError> {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        let reader = Arc::new(Reader {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let r = reader.clone();
        std::thread::Builder::new()
            .name("strata-accesslog".into())
            .spawn(move || r.serve())?;
        self.readers.write().insert(fh, reader);
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(fh)
    }

    /// The reader closed the file.
    pub fn close(&self, fh: u64) {
        if let Some(r) = self.readers.write().remove(&fh) {
            self.active.fetch_sub(1, Ordering::Relaxed);
            r.state.lock().closed = true;
            r.cond.notify_all();
        }
    }

    /// Read up to `size` bytes of the stream `fh`: `respond` gets them now when there are
    /// some, else on the reader's thread as soon as a line arrives (or `#\n` after
    /// [`HEARTBEAT`]).
    pub fn read(
        &self,
        fh: u64,
        size: usize,
        respond: impl FnOnce(Vec<u8>) + Send + 'static,
    ) -> Result<(), AccessLogError> {
        let r = self
            .readers
            .read()
            .get(&fh)
            .cloned()
            .ok_or(AccessLogError::BadHandle(fh))?;
        let mut st = r.state.lock();
        if st.pending.is_empty() && st.ready() {
            let data = st.take(size.max(1));
            drop(st);
            respond(data);
        } else {
            st.pending.push_back(Pending {
                size: size.max(1),
                respond: Box::new(respond),
                deadline: Instant::now() + HEARTBEAT,
            });
            drop(st);
            r.cond.notify_all();
        }
        Ok(())
    }

    /// Add one operation to every reader's stream (a no-op when nobody reads).
    pub fn record(&self, rec: &Record) {
        if !self.active() {
            return;
        }
        let line = rec.line();
        for r in self.readers.read().values() {
            let mut st = r.state.lock();
            let note = if st.dropped > 0 {
                format!("#dropped {}\n", st.dropped)
            } else {
                String::new()
            };
            if st.buf.len() + note.len() + line.len() > self.capacity {
                st.dropped += 1;
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            st.buf.extend(note.as_bytes());
            st.buf.extend(line.as_bytes());
            st.dropped = 0;
            let waiting = !st.pending.is_empty();
            drop(st);
            if waiting {
                r.cond.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn rec(op: &str, path: &str) -> Record<'static> {
        Record {
            at: UNIX_EPOCH + Duration::from_micros(1_733_500_280_123_456),
            uid: 1000,
            gid: 100,
            pid: 42,
            op: Box::leak(op.to_string().into_boxed_str()),
            path: Box::leak(path.to_string().into_boxed_str()),
            args: " off=0 size=4096",
            errno: None,
            bytes: 4096,
            secs: 0.000_25,
        }
    }

    fn read_now(log: &AccessLog, fh: u64, size: usize) -> Vec<u8> {
        let (tx, rx) = mpsc::channel();
        log.read(fh, size, move |d| tx.send(d).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn line_format() {
        let mut r = rec("write", "/a b/c=d");
        assert_eq!(
            r.line(),
            "2024-12-06T15:51:20.123456Z uid=1000 gid=100 pid=42 op=write path=/a\\x20b/c\\x3dd \
             off=0 size=4096 result=OK bytes=4096 secs=0.000250\n"
        );
        r.errno = Some(libc::ENOENT);
        assert!(r.line().contains(" result=ENOENT "));
        assert_eq!(errno_name(9999), "E9999");
        assert_eq!(unescape(&escape("/x y\\z\té=")), "/x y\\z\té=");
        assert_eq!(unescape("a\\x"), "a\\x");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day of a 400-year year) and 2100-03-01.
        assert_eq!(
            &timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400))[..10],
            "2000-02-29"
        );
        assert_eq!(
            &timestamp(UNIX_EPOCH + Duration::from_secs(4_107_542_400))[..10],
            "2100-03-01"
        );
    }

    #[test]
    fn nothing_recorded_without_readers() {
        let log = AccessLog::new(1 << 20);
        assert!(!log.active());
        log.record(&rec("read", "/x"));
        let fh = log.open().unwrap();
        assert!(log.active());
        log.record(&rec("read", "/y"));
        let got = String::from_utf8(read_now(&log, fh, 1 << 20)).unwrap();
        assert!(
            got.contains("path=/y ") && !got.contains("path=/x "),
            "{got}"
        );
        log.close(fh);
        assert!(!log.active());
        assert!(log.read(fh, 10, |_| {}).is_err());
    }

    #[test]
    fn every_reader_gets_every_line_and_a_slow_one_drops() {
        let log = AccessLog::new(1000);
        let a = log.open().unwrap();
        let b = log.open().unwrap();
        let line = rec("write", "/f").line();
        let fit = 1000 / line.len();
        for _ in 0..fit {
            log.record(&rec("write", "/f"));
        }
        // `a` keeps up, `b` does not read.
        let got = read_now(&log, a, 1 << 20);
        assert_eq!(got.len(), fit * line.len());
        for _ in 0..5 {
            log.record(&rec("write", "/f"));
        }
        assert_eq!(log.dropped(), 5);
        assert_eq!(read_now(&log, a, 1 << 20).len(), 5 * line.len());
        let got = String::from_utf8(read_now(&log, b, 1 << 20)).unwrap();
        assert_eq!(got.lines().count(), fit);
        // The gap is marked where it is, before the lines that came after it.
        log.record(&rec("write", "/g"));
        let got = String::from_utf8(read_now(&log, b, 1 << 20)).unwrap();
        assert!(
            got.starts_with("#dropped 5\n") && got.contains("path=/g "),
            "{got}"
        );
        // Reads may take part of a line; the stream stays whole.
        log.record(&rec("write", "/h"));
        let mut whole = read_now(&log, a, 10);
        whole.extend(read_now(&log, a, 1 << 20));
        assert!(String::from_utf8(whole).unwrap().contains("path=/g "));
    }

    #[test]
    fn a_waiting_read_gets_the_next_line_or_a_heartbeat() {
        let log = Arc::new(AccessLog::new(1 << 20));
        let fh = log.open().unwrap();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        log.read(fh, 4096, move |d| t.send(d).unwrap()).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        log.record(&rec("mkdir", "/d"));
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            String::from_utf8(got)
                .unwrap()
                .contains("op=mkdir path=/d ")
        );
        log.read(fh, 4096, move |d| tx.send(d).unwrap()).unwrap();
        let got = rx.recv_timeout(HEARTBEAT * 5).unwrap();
        assert_eq!(got, b"#\n");
        log.close(fh);
    }
}
