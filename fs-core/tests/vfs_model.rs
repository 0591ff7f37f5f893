//! Property test of the VFS (no FUSE) against a reference model of POSIX file contents:
//! random sequences of write / truncate / punch-hole / rename / link / unlink / read / fsync /
//! background cleaning (compaction, trimming, object deletion with no grace period).

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use strata::meta::{Ctx, FileKind, MetaError, MetaSettings, ROOT_INO};
use strata::object::MemStore;
use strata::vfs::{Vfs, VfsError, VfsSettings};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const SPAN: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write(usize, u64, usize, u8),
    Truncate(usize, u64),
    Punch(usize, u64, u64),
    Rename(usize, usize, u32),
    Link(usize, usize),
    Unlink(usize),
    Read(usize, u64, u32),
    Fsync(usize),
    Clean,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        2 => n.clone().prop_map(Op::Create),
        6 => (n.clone(), 0..SPAN, 1usize..70_000, any::<u8>()).prop_map(|(a, o, l, b)| Op::Write(a, o, l, b)),
        2 => (n.clone(), 0..SPAN + 4096).prop_map(|(a, s)| Op::Truncate(a, s)),
        1 => (n.clone(), 0..SPAN, 1..SPAN / 2).prop_map(|(a, o, l)| Op::Punch(a, o, l)),
        1 => (n.clone(), n.clone(), prop_oneof![Just(0u32), Just(1), Just(2)]).prop_map(|(a, b, f)| Op::Rename(a, b, f)),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => n.clone().prop_map(Op::Unlink),
        4 => (n.clone(), 0..SPAN + 8192, 1u32..200_000).prop_map(|(a, o, l)| Op::Read(a, o, l)),
        2 => n.clone().prop_map(Op::Fsync),
        1 => Just(Op::Clean),
    ]
}

struct Model {
    names: BTreeMap<usize, usize>,
    files: Vec<Vec<u8>>,
}

fn setup() -> Arc<Vfs> {
    strata::testing::mem_vfs(
        Arc::new(MemStore::new()),
        16 << 10,
        MetaSettings {
            gc_grace_secs: 0,
            ..MetaSettings::default()
        },
        VfsSettings {
            compact_threshold: 4,
            ..VfsSettings::default()
        },
    )
}

fn ino_of(vfs: &Vfs, name: &str) -> Option<u64> {
    match vfs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(n) => Some(n.ino),
        Err(VfsError::Meta(MetaError::NotFound)) => None,
        Err(e) => panic!("lookup {name}: {e}"),
    }
}

fn check_all(vfs: &Vfs, m: &Model) {
    for (i, name) in NAMES.iter().enumerate() {
        let ino = ino_of(vfs, name);
        match m.names.get(&i) {
            None => assert!(ino.is_none(), "{name} should not exist"),
            Some(&f) => {
                let ino = ino.unwrap_or_else(|| panic!("{name} should exist"));
                let want = &m.files[f];
                let attr = vfs.getattr(ino).unwrap();
                assert_eq!(attr.length, want.len() as u64, "length of {name}");
                let got = vfs.read(ino, 0, 0, want.len() as u32 + 10).unwrap();
                assert!(
                    got == *want,
                    "content of {name} differs (len {} vs {})",
                    got.len(),
                    want.len()
                );
            }
        }
    }
}

fn run(ops: Vec<Op>) {
    let vfs = setup();
    let mut m = Model {
        names: BTreeMap::new(),
        files: Vec::new(),
    };
    for op in ops {
        match op {
            Op::Create(a) => {
                let r = vfs.create(Ctx::ROOT, ROOT_INO, NAMES[a].as_bytes(), 0o644);
                match m.names.get(&a) {
                    Some(_) => assert!(matches!(r, Err(VfsError::Meta(MetaError::Exists)))),
                    None => {
                        let (_, fh) = r.unwrap();
                        vfs.release(ino_of(&vfs, NAMES[a]).unwrap(), fh, None)
                            .unwrap();
                        m.files.push(Vec::new());
                        m.names.insert(a, m.files.len() - 1);
                    }
                }
            }
            Op::Write(a, off, len, byte) => {
                if let Some(&f) = m.names.get(&a) {
                    let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                    let ino = ino_of(&vfs, NAMES[a]).unwrap();
                    vfs.write(ino, off, &data).unwrap();
                    let file = &mut m.files[f];
                    let end = off as usize + len;
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    file[off as usize..end].copy_from_slice(&data);
                }
            }
            Op::Truncate(a, size) => {
                if let Some(&f) = m.names.get(&a) {
                    let ino = ino_of(&vfs, NAMES[a]).unwrap();
                    vfs.setattr(ino, &Default::default(), Some(size)).unwrap();
                    m.files[f].resize(size as usize, 0);
                }
            }
            Op::Punch(a, off, len) => {
                if let Some(&f) = m.names.get(&a) {
                    let ino = ino_of(&vfs, NAMES[a]).unwrap();
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    vfs.fallocate(ino, mode, off, len).unwrap();
                    let file = &mut m.files[f];
                    let end = ((off + len) as usize).min(file.len());
                    if (off as usize) < end {
                        file[off as usize..end].fill(0);
                    }
                }
            }
            Op::Rename(a, b, flags) => {
                let r = vfs.rename(
                    ROOT_INO,
                    NAMES[a].as_bytes(),
                    ROOT_INO,
                    NAMES[b].as_bytes(),
                    flags,
                );
                let (sa, sb) = (m.names.get(&a).copied(), m.names.get(&b).copied());
                match (sa, sb, flags) {
                    (None, _, _) => assert!(r.is_err()),
                    (Some(_), _, _) if a == b => r.unwrap(),
                    (Some(_), Some(_), 1) => {
                        assert!(matches!(r, Err(VfsError::Meta(MetaError::Exists))))
                    }
                    (Some(_), None, 2) => assert!(r.is_err()),
                    (Some(x), Some(y), 0) if x == y => r.unwrap(), // same file: no-op
                    (Some(x), Some(y), 2) => {
                        r.unwrap();
                        m.names.insert(a, y);
                        m.names.insert(b, x);
                    }
                    (Some(x), _, _) => {
                        r.unwrap();
                        m.names.remove(&a);
                        m.names.insert(b, x);
                    }
                }
            }
            Op::Link(a, b) => {
                let r = vfs
                    .lookup(ROOT_INO, NAMES[a].as_bytes())
                    .map(|n| n.ino)
                    .and_then(|ino| vfs.link(ino, ROOT_INO, NAMES[b].as_bytes()));
                match (m.names.get(&a).copied(), m.names.get(&b)) {
                    (Some(x), None) => {
                        r.unwrap();
                        m.names.insert(b, x);
                    }
                    _ => assert!(r.is_err()),
                }
            }
            Op::Unlink(a) => {
                let r = vfs.unlink(ROOT_INO, NAMES[a].as_bytes());
                match m.names.remove(&a) {
                    Some(_) => r.unwrap(),
                    None => assert!(r.is_err()),
                }
            }
            Op::Read(a, off, len) => {
                if let Some(&f) = m.names.get(&a) {
                    let ino = ino_of(&vfs, NAMES[a]).unwrap();
                    let got = vfs.read(ino, 0, off, len).unwrap();
                    let file = &m.files[f];
                    let s = (off as usize).min(file.len());
                    let e = (off as usize + len as usize).min(file.len());
                    assert!(got == file[s..e], "read {}@{off}+{len}", NAMES[a]);
                }
            }
            Op::Fsync(a) => {
                if let Some(ino) = ino_of(&vfs, NAMES[a]) {
                    vfs.fsync(ino).unwrap();
                }
            }
            Op::Clean => {
                for name in NAMES {
                    if let Some(ino) = ino_of(&vfs, name) {
                        vfs.fsync(ino).unwrap();
                    }
                }
                vfs.clean_once().unwrap();
            }
        }
    }
    check_all(&vfs, &m);
    // Everything flushed and cleaned must still read back the same.
    for name in NAMES {
        if let Some(ino) = ino_of(&vfs, name) {
            vfs.fsync(ino).unwrap();
        }
    }
    vfs.clean_once().unwrap();
    check_all(&vfs, &m);
    vfs.shutdown();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn vfs_matches_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

#[test]
fn many_writes_then_compaction_keep_content() {
    let ops: Vec<Op> = (0..40)
        .flat_map(|i| vec![Op::Write(0, (i * 7919) % SPAN, 3000, i as u8), Op::Fsync(0)])
        .chain([Op::Clean, Op::Truncate(0, 1000), Op::Clean])
        .collect();
    let mut all = vec![Op::Create(0)];
    all.extend(ops);
    run(all);
    let _ = FileKind::File;
}
