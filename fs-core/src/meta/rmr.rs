//! `strata rmr`: remove a directory tree on the metadata side, without a round trip through
//! the kernel per entry (files go to the trash when the volume keeps one).

use super::{FileKind, Ino, Meta, MetaError, Result};

/// What a removal did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RmrStats {
    pub files: u64,
    pub dirs: u64,
}

impl Meta {
    /// Remove `name` in `parent` and, if it is a directory, everything below it.
    pub fn rmr(
        &self,
        parent: Ino,
        name: &[u8],
        progress: &mut dyn FnMut(&RmrStats),
    ) -> Result<RmrStats> {
        let mut stats = RmrStats::default();
        let node = self.lookup(parent, name)?;
        if node.kind == FileKind::Dir {
            self.rmr_children(node.ino, &mut stats, progress)?;
            match self.rmdir(parent, name) {
                Ok(()) | Err(MetaError::NotFound) => stats.dirs += 1,
                Err(e) => return Err(e),
            }
        } else {
            self.unlink(parent, name)?;
            stats.files += 1;
        }
        progress(&stats);
        Ok(stats)
    }

    fn rmr_children(
        &self,
        dir: Ino,
        stats: &mut RmrStats,
        progress: &mut dyn FnMut(&RmrStats),
    ) -> Result<()> {
        loop {
            let page = self.readdir(dir, None, 1000)?;
            if page.is_empty() {
                return Ok(());
            }
            for e in page {
                let r = if e.kind == FileKind::Dir {
                    self.rmr_children(e.ino, stats, progress)?;
                    self.rmdir(dir, &e.name).map(|_| stats.dirs += 1)
                } else {
                    self.unlink(dir, &e.name).map(|_| stats.files += 1)
                };
                match r {
                    // Another client removed it meanwhile.
                    Ok(()) | Err(MetaError::NotFound) => {}
                    Err(e) => return Err(e),
                }
                if (stats.files + stats.dirs).is_multiple_of(1000) {
                    progress(stats);
                }
            }
        }
    }
}
