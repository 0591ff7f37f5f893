//! Cache operations reached through the mount: warm-up and cache state of a file, as virtual
//! extended attributes (so `strata warmup` needs no other channel to the mount and works on
//! read-only mounts): `user.strata.warmup:OFF:LEN` fetches that range of the file into the
//! cache (of the group, if any) and answers `fetched=N cached=M dropped=D` (bytes fetched now,
//! bytes that were already cached, bytes fetched but not kept: the disk tier refused them,
//! e.g. its file system is below `--free-space-ratio` free); `user.strata.cached` answers
//! `cached=M length=L`.

use std::collections::HashSet;

use super::{Piece, Result, Vfs, VfsError};
use crate::cache::group::Warm;
use crate::meta::{FileKind, Ino, MetaError};

/// Prefix of the warm-up attribute.
pub const WARMUP_XATTR: &str = "user.strata.warmup:";
/// The cache-state attribute.
pub const CACHED_XATTR: &[u8] = b"user.strata.cached";

/// What a warm-up request did, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    /// Fetched now.
    pub fetched: u64,
    /// Cached before.
    pub cached: u64,
    /// Fetched but not kept in the cache.
    pub dropped: u64,
}

impl Vfs {
    /// Answer a virtual cache attribute, or `None` if `name` is not one.
    pub(super) fn cache_xattr(&self, ino: Ino, name: &[u8]) -> Option<Result<Vec<u8>>> {
        if name == CACHED_XATTR {
            return Some(
                self.cache_state(ino)
                    .map(|(cached, len)| format!("cached={cached} length={len}").into_bytes()),
            );
        }
        let rest = std::str::from_utf8(name).ok()?.strip_prefix(WARMUP_XATTR)?;
        let parsed = rest
            .split_once(':')
            .and_then(|(o, l)| Some((o.parse::<u64>().ok()?, l.parse::<u64>().ok()?)));
        Some(match parsed {
            Some((off, len)) => self.warmup(ino, off, len).map(|w| {
                format!(
                    "fetched={} cached={} dropped={}",
                    w.fetched, w.cached, w.dropped
                )
                .into_bytes()
            }),
            None => {
                Err(MetaError::Invalid("user.strata.warmup:OFF:LEN expects two numbers").into())
            }
        })
    }

    fn blocks(&self, ino: Ino, off: u64, end: u64) -> Result<Vec<(String, usize)>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for p in self.plan(ino, off, end)? {
            if let Piece::Block { key, len, .. } = p
                && seen.insert(key.clone())
            {
                out.push((key, len));
            }
        }
        Ok(out)
    }

    /// Fetch bytes `[off, off+len)` of a file into the cache, counted in whole blocks.
    pub fn warmup(&self, ino: Ino, off: u64, len: u64) -> Result<Warmed> {
        let mut w = Warmed::default();
        let n = self.meta.getattr(ino)?;
        if n.kind != FileKind::File {
            return Ok(w);
        }
        let end = off.saturating_add(len).min(n.length);
        if off >= end {
            return Ok(w);
        }
        for (key, blen) in self.blocks(ino, off, end)? {
            // In a cache group each block goes to its owner only (the group's cache is the
            // sum of its members' shares); a copy here would only take this member's room.
            if let Some(g) = self.reader.group()
                && let Some(owner) = g.target(&key)
            {
                let origin = self
                    .reader
                    .origin(&key)
                    .map(|o| o.query())
                    .unwrap_or_default();
                match g.warm(&owner, &key, blen, &origin) {
                    Ok(state) => {
                        match state {
                            Warm::Cached => w.cached += blen as u64,
                            Warm::Fetched => w.fetched += blen as u64,
                            Warm::Dropped => {
                                w.fetched += blen as u64;
                                w.dropped += blen as u64;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        g.mark_down(&owner);
                        tracing::info!(peer = %owner, key, error = %e, "warm-up through the cache group owner failed, warming here");
                    }
                }
            }
            if self.reader.cached(&key) {
                w.cached += blen as u64;
                continue;
            }
            self.reader.get(&key, blen).map_err(VfsError::Fetch)?;
            w.fetched += blen as u64;
            if !self.reader.kept(&key) {
                w.dropped += blen as u64;
            }
        }
        Ok(w)
    }

    /// (bytes of the file's blocks in this client's cache, file length).
    pub fn cache_state(&self, ino: Ino) -> Result<(u64, u64)> {
        let n = self.meta.getattr(ino)?;
        if n.kind != FileKind::File || n.length == 0 {
            return Ok((0, n.length));
        }
        let cached = self
            .blocks(ino, 0, n.length)?
            .into_iter()
            .filter(|(k, _)| self.reader.cached(k))
            .map(|(_, l)| l as u64)
            .sum();
        Ok((cached, n.length))
    }
}
