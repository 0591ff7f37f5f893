//! The data layout: files are cut into chunks of [`CHUNK_SIZE`]; each flush of a writer
//! commits a slice into a chunk; a slice is stored as block objects of at most the volume's
//! block size, named by [`block_key`]. This module holds the pure rules: object names, block
//! arithmetic and which bytes of which slice are visible (later slices and masks win).

use crate::meta::{CHUNK_SIZE, Mask, Slice};

/// A visible piece of a chunk: `len` bytes at `pos` in the chunk come from slice `id`
/// starting `off` bytes into the slice's data. Ranges of a chunk not covered by any segment
/// read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub pos: u32,
    pub len: u32,
    pub id: u64,
    pub size: u32,
    pub off: u32,
    /// `seq` of the slice the bytes come from.
    pub seq: u64,
}

impl Segment {
    fn end(&self) -> u32 {
        self.pos + self.len
    }
}

/// Object key of block `indx` of slice `id` (`len` bytes), under the volume's prefix.
pub fn block_key(volume: &str, id: u64, indx: u32, len: u32) -> String {
    format!(
        "{volume}/chunks/{}/{}/{id}_{indx}_{len}",
        id / 1_000_000,
        id / 1_000
    )
}

/// The blocks of a slice of `size` bytes: (block index, length).
pub fn slice_blocks(size: u32, block_size: u32) -> impl Iterator<Item = (u32, u32)> {
    let n = size.div_ceil(block_size);
    (0..n).map(move |i| (i, (size - i * block_size).min(block_size)))
}

/// The visible segments of chunk `indx`, given its slices (any order) and the inode's masks.
pub fn visible_segments(slices: &[Slice], masks: &[Mask], indx: u32) -> Vec<Segment> {
    let chunk_start = indx as u64 * CHUNK_SIZE;
    let chunk_end = chunk_start + CHUNK_SIZE;
    // Items in commit order: slices overwrite, masks cut.
    enum Item {
        Put(Segment),
        Cut(u32, u32),
    }
    let mut items: Vec<(u64, Item)> = Vec::with_capacity(slices.len() + masks.len());
    for s in slices {
        if s.len == 0 {
            continue;
        }
        let seg = Segment {
            pos: s.pos,
            len: s.len,
            id: s.id,
            size: s.size,
            off: s.off,
            seq: s.seq,
        };
        items.push((
            s.seq,
            if s.id == 0 {
                Item::Cut(s.pos, s.pos + s.len)
            } else {
                Item::Put(seg)
            },
        ));
    }
    for m in masks {
        let start = m.start.max(chunk_start);
        let end = m.end.min(chunk_end);
        if start < end {
            items.push((
                m.seq,
                Item::Cut((start - chunk_start) as u32, (end - chunk_start) as u32),
            ));
        }
    }
    items.sort_by_key(|(seq, _)| *seq);
    let mut segs: Vec<Segment> = Vec::new();
    for (_, item) in items {
        let (start, end, put) = match item {
            Item::Put(s) => (s.pos, s.end(), Some(s)),
            Item::Cut(a, b) => (a, b, None),
        };
        cut(&mut segs, start, end);
        if let Some(s) = put {
            let at = segs.partition_point(|x| x.pos < s.pos);
            segs.insert(at, s);
        }
    }
    segs
}

/// Remove `[start, end)` from a sorted list of non-overlapping segments.
fn cut(segs: &mut Vec<Segment>, start: u32, end: u32) {
    let mut out = Vec::with_capacity(segs.len() + 1);
    for s in segs.drain(..) {
        if s.end() <= start || s.pos >= end {
            out.push(s);
            continue;
        }
        if s.pos < start {
            out.push(Segment {
                len: start - s.pos,
                ..s
            });
        }
        if s.end() > end {
            out.push(Segment {
                pos: end,
                len: s.end() - end,
                off: s.off + (end - s.pos),
                ..s
            });
        }
    }
    *segs = out;
}

/// Slices of the chunk that contribute no visible byte (safe to drop from metadata).
pub fn hidden_slices(slices: &[Slice], segs: &[Segment]) -> Vec<Slice> {
    slices
        .iter()
        // Hole slices (id 0) never show bytes but may still cut older data: keep them.
        .filter(|s| s.id != 0 && !segs.iter().any(|g| g.seq == s.seq))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sl(seq: u64, id: u64, pos: u32, len: u32) -> Slice {
        Slice {
            seq,
            id,
            size: len,
            off: 0,
            len,
            pos,
        }
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(
            block_key("vol", 1_234_567, 2, 4096),
            "vol/chunks/1/1234/1234567_2_4096"
        );
        let b: Vec<_> = slice_blocks(10, 4).collect();
        assert_eq!(b, vec![(0, 4), (1, 4), (2, 2)]);
        assert_eq!(slice_blocks(0, 4).count(), 0);
    }

    #[test]
    fn later_slices_win_and_masks_cut() {
        let slices = [sl(1, 10, 0, 100), sl(3, 11, 50, 10)];
        let masks = [Mask {
            seq: 2,
            start: 80,
            end: u64::MAX,
        }];
        let segs = visible_segments(&slices, &masks, 0);
        assert_eq!(segs.len(), 3);
        assert_eq!((segs[0].pos, segs[0].len, segs[0].id), (0, 50, 10));
        assert_eq!((segs[1].pos, segs[1].len, segs[1].id), (50, 10, 11));
        assert_eq!(
            (segs[2].pos, segs[2].len, segs[2].id, segs[2].off),
            (60, 20, 10, 60)
        );
        // A mask committed after everything hides the whole chunk.
        let all = [Mask {
            seq: 9,
            start: 0,
            end: u64::MAX,
        }];
        assert!(visible_segments(&slices, &all, 0).is_empty());
        assert_eq!(hidden_slices(&slices, &[]).len(), 2);
    }

    #[test]
    fn masks_apply_per_chunk() {
        let slices = [sl(1, 10, 0, 1000)];
        let masks = [Mask {
            seq: 2,
            start: CHUNK_SIZE + 500,
            end: u64::MAX,
        }];
        assert_eq!(visible_segments(&slices, &masks, 0).len(), 1);
        let segs = visible_segments(&slices, &masks, 1);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].len, 500);
    }
}
