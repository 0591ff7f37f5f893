//! `strata profile`: what the clients of a mount do, from its access log
//! ([`crate::accesslog`]). Lines are parsed into [`Entry`]s, kept if they pass the
//! [`Filter`], and summed per operation, path, uid and pid over a window ([`Profile`]), with
//! the slowest single operations; [`render`] prints the tables sorted by [`SortBy`]. Live
//! mode ([`live`]) reads `.accesslog` of a mount and prints one window per interval; replay
//! ([`replay`]) sums a saved log once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::accesslog;

/// One operation of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// As written (`2026-12-06T15:51:20.123456Z`).
    pub at: String,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub op: String,
    pub path: String,
    /// The second path of `rename` and `link`.
    pub to: Option<String>,
    /// `OK` or an errno name.
    pub result: String,
    pub bytes: u64,
    pub secs: f64,
    /// The other fields, in order (`off`, `size`, `flags`, …).
    pub args: Vec<(String, String)>,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Op(Entry),
    /// `#dropped N`: the reader was too slow and N lines were lost here.
    Dropped(u64),
    /// Another `#` line (the heartbeat) or an empty one.
    Comment,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("access log line {0:?}: {1}")]
    Parse(String, &'static str),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(
        "{0} is not inside a strata mount (no .accesslog in it or a parent directory): give a mount point, a path inside one, or a saved access log to replay"
    )]
    NotMount(String),
    #[error("--sort {0:?}: use ops, bytes, time or latency")]
    Sort(String),
    #[error("--interval {0:?}: give a positive duration such as 2s, 500ms or 1.5")]
    Interval(String),
    #[error("the access log {0} ended (was the file system unmounted?)")]
    Ended(String),
}

/// Parse one line (without its newline).
pub fn parse_line(line: &str) -> Result<Line, ProfileError> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        return Ok(Line::Comment);
    }
    if let Some(rest) = line.strip_prefix('#') {
        if let Some(n) = rest.strip_prefix("dropped ") {
            let n = n
                .trim()
                .parse()
                .map_err(|_| ProfileError::Parse(line.into(), "bad #dropped count"))?;
            return Ok(Line::Dropped(n));
        }
        return Ok(Line::Comment);
    }
    let bad = |what| ProfileError::Parse(line.into(), what);
    let mut tokens = line.split(' ');
    let at = tokens.next().ok_or_else(|| bad("empty"))?.to_string();
    if parse_timestamp(&at).is_none() {
        return Err(bad("the first field is not a time"));
    }
    let mut e = Entry {
        at,
        uid: 0,
        gid: 0,
        pid: 0,
        op: String::new(),
        path: String::new(),
        to: None,
        result: String::new(),
        bytes: 0,
        secs: 0.0,
        args: Vec::new(),
    };
    let num = |v: &str, what| v.parse().map_err(|_| bad(what));
    for t in tokens {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| bad("a field without '='"))?;
        match k {
            "uid" => e.uid = num(v, "bad uid")? as u32,
            "gid" => e.gid = num(v, "bad gid")? as u32,
            "pid" => e.pid = num(v, "bad pid")? as u32,
            "op" => e.op = v.to_string(),
            "path" => e.path = accesslog::unescape(v),
            "to" => e.to = Some(accesslog::unescape(v)),
            "result" => e.result = v.to_string(),
            "bytes" => e.bytes = num(v, "bad bytes")?,
            "secs" => e.secs = v.parse().map_err(|_| bad("bad secs"))?,
            _ => e.args.push((k.to_string(), accesslog::unescape(v))),
        }
    }
    if e.op.is_empty() || e.result.is_empty() {
        return Err(bad("no op= or result= field"));
    }
    Ok(Line::Op(e))
}

/// Seconds since 1970 of a log time (`2026-12-06T15:51:20.123456Z`).
pub fn parse_timestamp(t: &str) -> Option<f64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut h = time.splitn(3, ':');
    let hh: i64 = h.next()?.parse().ok()?;
    let mm: i64 = h.next()?.parse().ok()?;
    let ss: f64 = h.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from 1970-01-01 (proleptic Gregorian, years counted from March).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Which lines count.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    /// A path in the mount (`/dir`): operations on it or under it (either path of a rename).
    pub path: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &Entry) -> bool {
        let under = |p: &str, prefix: &str| {
            let prefix = prefix.trim_end_matches('/');
            prefix.is_empty()
                || p == prefix
                || (p.starts_with(prefix) && p.as_bytes().get(prefix.len()) == Some(&b'/'))
        };
        self.uid.is_none_or(|u| u == e.uid)
            && self.pid.is_none_or(|p| p == e.pid)
            && self
                .path
                .as_deref()
                .is_none_or(|f| under(&e.path, f) || e.to.as_deref().is_some_and(|t| under(t, f)))
    }
}

/// Sums of one row (an operation, a path, a uid or a pid).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stat {
    pub ops: u64,
    pub bytes: u64,
    /// Total latency, seconds.
    pub secs: f64,
    pub max: f64,
    pub errors: u64,
}

impl Stat {
    fn add(&mut self, e: &Entry) {
        self.ops += 1;
        self.bytes += e.bytes;
        self.secs += e.secs;
        self.max = self.max.max(e.secs);
        if e.result != "OK" {
            self.errors += 1;
        }
    }

    /// Mean latency, seconds.
    pub fn avg(&self) -> f64 {
        if self.ops == 0 {
            0.0
        } else {
            self.secs / self.ops as f64
        }
    }
}

/// What the rows are ordered by (largest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    #[default]
    Ops,
    Bytes,
    /// Total latency.
    Time,
    /// Mean latency.
    Latency,
}

impl FromStr for SortBy {
    type Err = ProfileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ops" => SortBy::Ops,
            "bytes" => SortBy::Bytes,
            "time" => SortBy::Time,
            "latency" => SortBy::Latency,
            _ => return Err(ProfileError::Sort(s.into())),
        })
    }
}

impl SortBy {
    fn key(self, s: &Stat) -> f64 {
        match self {
            SortBy::Ops => s.ops as f64,
            SortBy::Bytes => s.bytes as f64,
            SortBy::Time => s.secs,
            SortBy::Latency => s.avg(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortBy::Ops => "ops",
            SortBy::Bytes => "bytes",
            SortBy::Time => "total time",
            SortBy::Latency => "mean latency",
        }
    }
}

/// Sums over a window of the log.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub total: Stat,
    pub ops: HashMap<String, Stat>,
    pub paths: HashMap<String, Stat>,
    pub uids: HashMap<u32, Stat>,
    pub pids: HashMap<u32, Stat>,
    /// The slowest single operations, slowest first (at most `keep`).
    pub slowest: Vec<Entry>,
    /// Lines lost because the reader was too slow.
    pub dropped: u64,
    /// Lines that could not be parsed.
    pub unparsed: u64,
    /// Times of the first and last operation (seconds since 1970).
    pub span: Option<(f64, f64)>,
    keep: usize,
}

impl Profile {
    /// Keep the `keep` slowest operations.
    pub fn new(keep: usize) -> Profile {
        Profile {
            keep,
            ..Profile::default()
        }
    }

    /// Count one line (if the filter keeps it).
    pub fn add_line(&mut self, line: &str, filter: &Filter) {
        match parse_line(line) {
            Ok(Line::Op(e)) if filter.matches(&e) => self.add(e),
            Ok(Line::Op(_)) | Ok(Line::Comment) => {}
            Ok(Line::Dropped(n)) => self.dropped += n,
            Err(_) => self.unparsed += 1,
        }
    }

    pub fn add(&mut self, e: Entry) {
        self.total.add(&e);
        self.ops.entry(e.op.clone()).or_default().add(&e);
        self.paths.entry(e.path.clone()).or_default().add(&e);
        if let Some(t) = &e.to {
            // The target of a rename or link counts as an operation on it too (no bytes).
            let mut s = e.clone();
            s.bytes = 0;
            self.paths.entry(t.clone()).or_default().add(&s);
        }
        self.uids.entry(e.uid).or_default().add(&e);
        self.pids.entry(e.pid).or_default().add(&e);
        if let Some(t) = parse_timestamp(&e.at) {
            self.span = Some(match self.span {
                None => (t, t),
                Some((a, b)) => (a.min(t), b.max(t)),
            });
        }
        if self.keep > 0
            && (self.slowest.len() < self.keep
                || self.slowest.last().is_some_and(|l| l.secs < e.secs))
        {
            let at = self.slowest.partition_point(|x| x.secs >= e.secs);
            self.slowest.insert(at, e);
            self.slowest.truncate(self.keep);
        }
    }
}

fn size(v: f64) -> String {
    const K: f64 = 1024.0;
    if v >= K * K * K {
        format!("{:.1}G", v / (K * K * K))
    } else if v >= K * K {
        format!("{:.1}M", v / (K * K))
    } else if v >= K {
        format!("{:.1}K", v / K)
    } else {
        format!("{v:.0}")
    }
}

fn ms(secs: f64) -> String {
    format!("{:.3}", secs * 1000.0)
}

fn table<K: ToString>(
    out: &mut String,
    title: &str,
    rows: impl Iterator<Item = (K, Stat)>,
    sort: SortBy,
    top: usize,
    secs: Option<f64>,
) {
    let mut rows: Vec<(String, Stat)> = rows.map(|(k, s)| (k.to_string(), s)).collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| {
        sort.key(&b.1)
            .total_cmp(&sort.key(&a.1))
            .then_with(|| a.0.cmp(&b.0))
    });
    let width = rows
        .iter()
        .take(top)
        .map(|r| r.0.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(title.len(), 60);
    let _ = writeln!(
        out,
        "{title:<width$} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "ops", "ops/s", "bytes", "bytes/s", "total s", "avg ms", "max ms", "errors"
    );
    let per = |v: f64| secs.map_or("-".to_string(), |s| format!("{:.1}", v / s.max(1e-9)));
    for (k, s) in rows.iter().take(top) {
        let _ = writeln!(
            out,
            "{k:<width$} {:>8} {:>8} {:>8} {:>9} {:>9.3} {:>9} {:>9} {:>6}",
            s.ops,
            per(s.ops as f64),
            size(s.bytes as f64),
            secs.map_or("-".to_string(), |t| size(s.bytes as f64 / t.max(1e-9))),
            s.secs,
            ms(s.avg()),
            ms(s.max),
            s.errors
        );
    }
    if rows.len() > top {
        let _ = writeln!(out, "({} more)", rows.len() - top);
    }
    out.push('\n');
}

/// The profile as text: a summary line, then tables per operation, path (by the sort key
/// and, unless that is bytes, by bytes), uid and pid, and the slowest operations. `secs` is
/// the window's length (rates are left out without it).
pub fn render(p: &Profile, sort: SortBy, top: usize, secs: Option<f64>) -> String {
    let top = top.max(1);
    let mut out = String::new();
    let t = &p.total;
    let _ = write!(out, "{} operations", t.ops);
    if let Some(s) = secs {
        let _ = write!(out, " in {s:.1} s ({:.1}/s)", t.ops as f64 / s.max(1e-9));
    }
    let _ = writeln!(
        out,
        ", {} bytes, {} errors, {} lines dropped (reader too slow), {} unreadable; sorted by {}",
        size(t.bytes as f64),
        t.errors,
        p.dropped,
        p.unparsed,
        sort.name()
    );
    out.push('\n');
    let by = |m: &HashMap<String, Stat>| m.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>();
    table(
        &mut out,
        "OPERATION",
        by(&p.ops).into_iter(),
        sort,
        usize::MAX,
        secs,
    );
    table(&mut out, "PATH", by(&p.paths).into_iter(), sort, top, secs);
    if sort != SortBy::Bytes {
        let with_bytes = p.paths.iter().filter(|(_, s)| s.bytes > 0);
        table(
            &mut out,
            "PATH (by bytes)",
            with_bytes.map(|(k, v)| (k.clone(), *v)),
            SortBy::Bytes,
            top,
            secs,
        );
    }
    table(
        &mut out,
        "UID",
        p.uids.iter().map(|(k, v)| (*k, *v)),
        sort,
        top,
        secs,
    );
    table(
        &mut out,
        "PID",
        p.pids.iter().map(|(k, v)| (*k, *v)),
        sort,
        top,
        secs,
    );
    if !p.slowest.is_empty() {
        let _ = writeln!(out, "SLOWEST OPERATIONS");
        for e in p.slowest.iter().take(top) {
            let args: String = e.args.iter().map(|(k, v)| format!(" {k}={v}")).collect();
            let to =
                e.to.as_deref()
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:>10} ms  {}  {} {}{to}{args}  uid={} pid={} {} bytes={}",
                ms(e.secs),
                e.at,
                e.op,
                e.path,
                e.uid,
                e.pid,
                e.result,
                e.bytes
            );
        }
    }
    out
}

/// Options of `strata profile`.
#[derive(Debug, Clone)]
pub struct Options {
    pub interval: Duration,
    /// Windows to print before returning (0: until the log ends).
    pub count: u64,
    pub sort: SortBy,
    pub top: usize,
    pub filter: Filter,
}

/// `2s`, `500ms`, `1.5` (seconds), `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, ProfileError> {
    crate::duration::parse(s)
        .filter(|d| !d.is_zero() && d.as_secs_f64() <= 86_400.0)
        .ok_or_else(|| ProfileError::Interval(s.into()))
}

/// What `strata profile PATH` reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The `.accesslog` of a mount.
    Live(PathBuf),
    /// A saved log.
    Saved(PathBuf),
}

/// The access log of the mount `path` is in (its `.accesslog`, found in `path` or the nearest
/// parent that has it), or `path` itself when it is a saved log (a plain file).
pub fn source(path: &Path) -> Result<Source, ProfileError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e| ProfileError::Io(path.display().to_string(), e);
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_file() {
        return Ok(if meta.ino() == accesslog::INO {
            Source::Live(path.to_path_buf())
        } else {
            Source::Saved(path.to_path_buf())
        });
    }
    let abs = std::fs::canonicalize(path).map_err(io)?;
    let name = std::str::from_utf8(accesslog::NAME).expect("ASCII name");
    for dir in abs.ancestors() {
        let log = dir.join(name);
        if std::fs::metadata(&log).is_ok_and(|m| m.ino() == accesslog::INO) {
            return Ok(Source::Live(log));
        }
    }
    Err(ProfileError::NotMount(path.display().to_string()))
}

/// Sum a saved log once.
pub fn replay(r: impl Read, opts: &Options) -> Result<String, ProfileError> {
    let mut p = Profile::new(opts.top);
    for line in BufReader::new(r).lines() {
        let line = line.map_err(|e| ProfileError::Io("reading the log".into(), e))?;
        p.add_line(&line, &opts.filter);
    }
    let secs = p.span.map(|(a, b)| b - a).filter(|s| *s > 0.0);
    Ok(render(&p, opts.sort, opts.top, secs))
}

/// Read the live log `log` (an open `.accesslog`, named `name`) and write one window of
/// sums per interval to `out` (on a terminal: redrawn in place).
pub fn live(
    log: impl Read + Send + 'static,
    name: &str,
    opts: &Options,
    out: &mut dyn Write,
    tty: bool,
) -> Result<(), ProfileError> {
    let shared = Arc::new(Mutex::new((Profile::new(opts.top), false)));
    let s = shared.clone();
    let filter = opts.filter.clone();
    std::thread::Builder::new()
        .name("profile-reader".into())
        .spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, log);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => s.lock().0.add_line(&line, &filter),
                }
            }
            s.lock().1 = true;
        })
        .map_err(|e| ProfileError::Io("starting the reader thread".into(), e))?;
    let mut n = 0;
    let mut start = Instant::now();
    while opts.count == 0 || n < opts.count {
        std::thread::sleep(opts.interval);
        let (p, ended) = {
            let mut g = shared.lock();
            (std::mem::replace(&mut g.0, Profile::new(opts.top)), g.1)
        };
        let secs = start.elapsed().as_secs_f64();
        start = Instant::now();
        let text = render(&p, opts.sort, opts.top, Some(secs));
        let clock = accesslog::timestamp(std::time::SystemTime::now());
        let block = if tty {
            format!("\x1b[H\x1b[2J{name} at {}\n\n{text}", &clock[..19])
        } else {
            format!("--- {name} at {}\n{text}\n", &clock[..19])
        };
        out.write_all(block.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| ProfileError::Io("writing the profile".into(), e))?;
        if ended {
            return Err(ProfileError::Ended(name.into()));
        }
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accesslog::Record;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn line(op: &str, path: &str, uid: u32, pid: u32, bytes: u64, secs: f64, args: &str) -> String {
        Record {
            at: UNIX_EPOCH
                + Duration::from_secs(1_733_500_280)
                + Duration::from_secs_f64(secs * 1000.0),
            uid,
            gid: 0,
            pid,
            op,
            path,
            args,
            errno: if op == "lookup" {
                Some(libc::ENOENT)
            } else {
                None
            },
            bytes,
            secs,
        }
        .line()
    }

    #[test]
    fn lines_round_trip() {
        let l = line("rename", "/a b", 7, 9, 0, 0.5, " to=/c\\x20d flags=0");
        let Line::Op(e) = parse_line(&l).unwrap() else {
            panic!("{l}")
        };
        assert_eq!(
            (
                e.op.as_str(),
                e.path.as_str(),
                e.to.as_deref(),
                e.uid,
                e.pid
            ),
            ("rename", "/a b", Some("/c d"), 7, 9)
        );
        assert_eq!(e.args, vec![("flags".to_string(), "0".to_string())]);
        assert_eq!(e.secs, 0.5);
        assert_eq!(parse_line("#").unwrap(), Line::Comment);
        assert_eq!(parse_line("#dropped 12").unwrap(), Line::Dropped(12));
        assert!(parse_line("garbage here").is_err());
        assert!(parse_line("2024-12-06T15:51:20.000000Z uid=1 op=read").is_err());
        let now = SystemTime::now();
        let t = parse_timestamp(&accesslog::timestamp(now)).unwrap();
        let want = now.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((t - want).abs() < 1e-5, "{t} {want}");
        assert_eq!(
            parse_timestamp("2000-02-29T00:00:00.000000Z"),
            Some(951_782_400.0)
        );
    }

    #[test]
    fn sums_filters_and_sorting() {
        let mut log = String::new();
        for _ in 0..10 {
            log += &line(
                "write",
                "/big",
                1000,
                11,
                1 << 20,
                0.002,
                " off=0 size=1048576",
            );
        }
        for _ in 0..30 {
            log += &line("getattr", "/d/small", 1001, 12, 0, 0.0001, "");
        }
        log += &line("fsync", "/big", 1000, 11, 0, 0.9, "");
        log += &line("lookup", "/d/missing", 1001, 12, 0, 0.0002, "");
        log += "#\n#dropped 3\nnot a line\n";
        let opts = |sort, filter| Options {
            interval: Duration::from_secs(1),
            count: 1,
            sort,
            top: 5,
            filter,
        };
        let mut p = Profile::new(2);
        for l in log.lines() {
            p.add_line(l, &Filter::default());
        }
        assert_eq!(p.total.ops, 42);
        assert_eq!(p.total.errors, 1);
        assert_eq!((p.dropped, p.unparsed), (3, 1));
        assert_eq!(p.ops["write"].bytes, 10 << 20);
        assert_eq!(p.paths["/big"].ops, 11);
        assert_eq!(p.uids[&1001].ops, 31);
        assert_eq!(p.pids[&11].bytes, 10 << 20);
        assert_eq!(p.slowest.len(), 2);
        assert_eq!(p.slowest[0].op, "fsync");
        assert_eq!(p.slowest[1].op, "write");

        // By ops the getattr path leads; by bytes the written one.
        let text = replay(log.as_bytes(), &opts(SortBy::Ops, Filter::default())).unwrap();
        let paths = text.split("\nPATH ").nth(1).unwrap();
        let first = |t: &str| {
            t.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(first(paths), "/d/small", "{text}");
        let text = replay(log.as_bytes(), &opts(SortBy::Bytes, Filter::default())).unwrap();
        assert_eq!(
            first(text.split("\nPATH ").nth(1).unwrap()),
            "/big",
            "{text}"
        );
        assert!(!text.contains("PATH (by bytes)"));
        let text = replay(log.as_bytes(), &opts(SortBy::Latency, Filter::default())).unwrap();
        assert_eq!(
            first(&text[text.find("OPERATION").unwrap()..]),
            "fsync",
            "{text}"
        );
        assert!(text.starts_with("42 operations in "), "{text}");

        // Filters.
        let f = Filter {
            path: Some("/d/".into()),
            ..Filter::default()
        };
        let text = replay(log.as_bytes(), &opts(SortBy::Ops, f)).unwrap();
        assert!(text.starts_with("31 operations"), "{text}");
        assert!(!text.contains("/big"), "{text}");
        let f = Filter {
            uid: Some(1000),
            pid: Some(11),
            ..Filter::default()
        };
        let text = replay(log.as_bytes(), &opts(SortBy::Time, f)).unwrap();
        assert!(text.starts_with("11 operations"), "{text}");
        let f = Filter {
            path: Some("/d/sm".into()),
            ..Filter::default()
        };
        assert!(!f.matches(
            &match parse_line(&line("read", "/d/small", 0, 0, 0, 0.0, "")).unwrap() {
                Line::Op(e) => e,
                _ => unreachable!(),
            }
        ));
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!("latency".parse::<SortBy>().unwrap(), SortBy::Latency);
        assert!(
            "speed"
                .parse::<SortBy>()
                .unwrap_err()
                .to_string()
                .contains("ops, bytes")
        );
    }

    #[test]
    fn live_prints_windows_of_what_it_reads() {
        let data = line("write", "/w", 5, 6, 100, 0.001, "").repeat(3);
        let opts = Options {
            interval: Duration::from_millis(200),
            count: 1,
            sort: SortBy::Ops,
            top: 3,
            filter: Filter::default(),
        };
        // A reader that never ends (like the mount's log).
        struct Then(std::io::Cursor<Vec<u8>>);
        impl Read for Then {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                match self.0.read(b)? {
                    0 => {
                        std::thread::sleep(Duration::from_secs(60));
                        Ok(0)
                    }
                    n => Ok(n),
                }
            }
        }
        let mut out = Vec::new();
        live(
            Then(std::io::Cursor::new(data.into_bytes())),
            "log",
            &opts,
            &mut out,
            false,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("--- log at "), "{text}");
        assert!(text.contains("3 operations in 0."), "{text}");
        assert!(text.contains("\n/w "), "{text}");
        // A log that ends is an error after its last window.
        let mut out = Vec::new();
        let err = live(std::io::empty(), "log", &opts, &mut out, true).unwrap_err();
        assert!(err.to_string().contains("ended"));
        assert!(String::from_utf8(out).unwrap().starts_with("\x1b[H\x1b[2J"));
    }
}
