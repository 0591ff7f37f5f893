//! Cache operations reached through the mount: warm-up and cache state of a file, as virtual
//! extended attributes (so `strata warmup` needs no other channel to the mount and works on
//! read-only mounts): `user.strata.warmup:OFF:LEN` fetches that range of the file into the
//! cache (of the group, if any) and answers `fetched=N cached=M` (bytes fetched now, bytes
//! that were already cached); `user.strata.cached` answers `cached=M length=L`.

use std::collections::HashSet;

use super::{Piece, Result, Vfs, VfsError};
use crate::meta::{FileKind, Ino, MetaError};

/// Prefix of the warm-up attribute.
pub const WARMUP_XATTR: &str = "user.strata.warmup:";
/// The cache-state attribute.
pub const CACHED_XATTR: &[u8] = b"user.strata.cached";

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
            Some((off, len)) => self
                .warmup(ino, off, len)
                .map(|(fetched, cached)| format!("fetched={fetched} cached={cached}").into_bytes()),
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

    /// Fetch bytes `[off, off+len)` of a file into the cache. Returns (bytes fetched now,
    /// bytes already cached), counted in whole blocks.
    pub fn warmup(&self, ino: Ino, off: u64, len: u64) -> Result<(u64, u64)> {
        let n = self.meta.getattr(ino)?;
        if n.kind != FileKind::File {
            return Ok((0, 0));
        }
        let end = off.saturating_add(len).min(n.length);
        if off >= end {
            return Ok((0, 0));
        }
        let mut fetched = 0;
        let mut cached = 0;
        for (key, blen) in self.blocks(ino, off, end)? {
            if self.reader.cached(&key) {
                cached += blen as u64;
                continue;
            }
            match self.reader.get(&key, blen) {
                Ok(_) => fetched += blen as u64,
                Err(e) => return Err(VfsError::Fetch(e)),
            }
        }
        Ok((fetched, cached))
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
