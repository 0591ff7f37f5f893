//! `strata warmup`: fill the cache of a mount (and of its cache group) with files or trees.
//! It talks to the mount through the virtual attribute `user.strata.warmup:OFF:LEN` (see
//! `vfs::cache_ops`), so the data is fetched by the mount process into its cache without
//! passing through the page cache, and works on read-only mounts too. Files are split into
//! ranges fetched by `threads` workers; a progress line is drawn on a terminal.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Bytes of a file warmed per request.
const RANGE: u64 = 64 << 20;

/// Errors of `strata warmup`, each naming the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("{0}: no such file or directory")]
    Missing(PathBuf),
    #[error(
        "{0} is not inside a Strata mount (mount the volume with `strata mount` and give a path inside it)"
    )]
    NotStrata(PathBuf),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{failed} of {files} files could not be warmed (first: {first})")]
    Failed {
        failed: u64,
        files: u64,
        first: String,
    },
}

/// What a warm-up did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    pub fetched: u64,
    pub already_cached: u64,
    /// Fetched but not kept by the mount's cache (see the mount's log for why).
    pub dropped: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn summary(&self) -> String {
        let total = (self.fetched + self.already_cached).max(1);
        format!(
            "warmup: {} files, {} in {:.1} s ({}/s), {:.0}% already cached",
            self.files,
            crate::sync::human(self.bytes),
            self.seconds,
            crate::sync::human((self.fetched as f64 / self.seconds.max(0.001)) as u64),
            self.already_cached as f64 * 100.0 / total as f64
        )
    }

    /// What to tell the user when the mount did not keep everything it fetched.
    pub fn warning(&self) -> Option<String> {
        (self.dropped > 0).then(|| {
            format!(
                "warning: {} fetched but not kept in the disk cache: its file system is below \
                 --free-space-ratio free or the cache is smaller than the data (see the mount's log; \
                 free space there, or mount with a larger --cache-size or another --cache-dir)",
                crate::sync::human(self.dropped)
            )
        })
    }
}

fn getxattr(path: &Path, name: &str) -> std::io::Result<String> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn field(answer: &str, name: &str) -> u64 {
    answer
        .split_whitespace()
        .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The regular files under `paths` (directories walked, symlinks not followed).
fn collect(paths: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>, WarmupError> {
    let mut files = Vec::new();
    for p in paths {
        let md = std::fs::symlink_metadata(p).map_err(|_| WarmupError::Missing(p.clone()))?;
        // The mount must answer our attribute: anything else is not Strata.
        let probe = if md.is_dir() {
            p.clone()
        } else {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        if getxattr(&probe, "user.strata.cached").is_err() {
            return Err(WarmupError::NotStrata(p.clone()));
        }
        let mut stack = vec![(p.clone(), md)];
        while let Some((path, md)) = stack.pop() {
            if md.is_file() {
                files.push((path, md.len()));
            } else if md.is_dir() {
                let rd = std::fs::read_dir(&path).map_err(|err| WarmupError::Io {
                    path: path.clone(),
                    err,
                })?;
                for e in rd.flatten() {
                    if let Ok(m) = e.metadata() {
                        stack.push((e.path(), m));
                    }
                }
            }
        }
    }
    Ok(files)
}

/// Warm `paths` with `threads` workers; `progress` draws a progress line on a terminal.
pub fn run(paths: &[PathBuf], threads: usize, progress: bool) -> Result<Summary, WarmupError> {
    let start = Instant::now();
    let files = collect(paths)?;
    let total_bytes: u64 = files.iter().map(|f| f.1).sum();
    let mut jobs = VecDeque::new();
    for (i, (_, len)) in files.iter().enumerate() {
        let mut off = 0;
        loop {
            jobs.push_back((i, off));
            off += RANGE;
            if off >= *len {
                break;
            }
        }
    }
    let files = Arc::new(files);
    let jobs = Arc::new(Mutex::new(jobs));
    let done_bytes = Arc::new(AtomicU64::new(0));
    let fetched = Arc::new(AtomicU64::new(0));
    let cached = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<(usize, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (files, jobs, done_bytes, fetched, cached, dropped, failures) = (
                files.clone(),
                jobs.clone(),
                done_bytes.clone(),
                fetched.clone(),
                cached.clone(),
                dropped.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let Some((i, off)) = jobs.lock().pop_front() else {
                        return;
                    };
                    let (path, len) = &files[i];
                    let n = RANGE.min(len.saturating_sub(off));
                    match getxattr(path, &format!("user.strata.warmup:{off}:{n}")) {
                        Ok(a) => {
                            fetched.fetch_add(field(&a, "fetched"), Ordering::Relaxed);
                            cached.fetch_add(field(&a, "cached"), Ordering::Relaxed);
                            dropped.fetch_add(field(&a, "dropped"), Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .push((i, format!("{}: {e}", path.display()))),
                    }
                    done_bytes.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let draw = progress && std::io::stderr().is_terminal();
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if draw {
            let d = done_bytes.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r\x1b[Kwarmup: {} / {} ({:.0}%), {}/s",
                crate::sync::human(d),
                crate::sync::human(total_bytes),
                d as f64 * 100.0 / total_bytes.max(1) as f64,
                crate::sync::human((fetched.load(Ordering::Relaxed) as f64 / secs) as u64)
            );
        }
    }
    for w in workers {
        let _ = w.join();
    }
    if draw {
        eprintln!();
    }
    let failures = failures.lock();
    if let Some((_, first)) = failures.first() {
        let mut bad: Vec<usize> = failures.iter().map(|f| f.0).collect();
        bad.dedup();
        return Err(WarmupError::Failed {
            failed: bad.len() as u64,
            files: files.len() as u64,
            first: first.clone(),
        });
    }
    Ok(Summary {
        files: files.len() as u64,
        bytes: total_bytes,
        fetched: fetched.load(Ordering::Relaxed),
        already_cached: cached.load(Ordering::Relaxed),
        dropped: dropped.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_summaries_read_well() {
        assert_eq!(field("fetched=10 cached=5", "cached"), 5);
        assert_eq!(field("fetched=10 cached=5", "fetched"), 10);
        assert_eq!(field("", "fetched"), 0);
        let s = Summary {
            files: 2,
            bytes: 3 << 30,
            fetched: 1 << 30,
            already_cached: 1 << 30,
            dropped: 0,
            seconds: 2.0,
        };
        let text = s.summary();
        assert!(text.contains("2 files"), "{text}");
        assert!(text.contains("3.00 GiB"), "{text}");
        assert!(text.contains("50% already cached"), "{text}");
        assert!(s.warning().is_none());
        let text = Summary {
            dropped: 1 << 20,
            ..s
        }
        .warning()
        .unwrap();
        assert!(
            text.contains("warning: 1.00 MiB fetched but not kept"),
            "{text}"
        );
    }

    #[test]
    fn paths_outside_a_mount_are_refused_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let e = run(&[t.path().join("f")], 1, false).unwrap_err();
        assert!(e.to_string().contains("not inside a Strata mount"), "{e}");
        let e = run(&[t.path().join("nope")], 1, false).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
