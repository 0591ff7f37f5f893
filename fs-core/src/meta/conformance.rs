//! The engine conformance suite: every [`MetaEngine`] must pass [`run_all`]. It drives the
//! file-system logic ([`Meta`]) over a fresh engine per case, so it checks both the engine's
//! primitives (ordering, ranges, transactions) and the POSIX rules built on them.

use std::sync::Arc;

use super::{
    CHUNK_SIZE, Ctx, FileKind, Format, Meta, MetaEngine, MetaError, MetaSettings, ROOT_INO,
    SetAttr, Slice,
};
use crate::metrics::Metrics;
use crate::object::StorageConfig;

/// A formatted [`Meta`] over the engine `make` returns.
pub fn formatted(engine: Box<dyn MetaEngine>, capacity: u64) -> Meta {
    let meta = Meta::new(
        engine,
        Arc::new(Metrics::new()),
        MetaSettings {
            gc_grace_secs: 0,
            ..MetaSettings::default()
        },
    );
    meta.format(&mem_format("conformance", 4 << 20, capacity))
        .expect("format");
    meta.load().expect("load");
    meta.new_session("conformance").expect("session");
    meta
}

/// The format of a throwaway volume on the in-memory object store.
pub fn mem_format(name: &str, block_size: u32, capacity: u64) -> Format {
    Format {
        name: name.into(),
        uuid: "00000000-0000-0000-0000-000000000000".into(),
        version: super::FORMAT_VERSION,
        block_size,
        capacity,
        inodes: 0,
        storage: StorageConfig {
            storage: "mem".into(),
            bucket: String::new(),
            access_key: None,
            secret_key: None,
            region: None,
        },
        mirror: None,
        trash_days: 0,
    }
}

type Case = fn(&Meta);

const CASES: &[(&str, Case)] = &[
    ("namespace", namespace),
    ("rename", rename),
    ("readdir_order_and_paging", readdir_paging),
    ("truncate_masks", truncate_masks),
    ("unlink_open_file", unlink_open),
    ("xattrs", xattrs),
    ("capacity", capacity),
    ("transaction_rollback", rollback),
    ("locks", locks),
    ("fsck_repairs", fsck_repairs),
    ("quotas", quotas),
    ("journal", journal),
    ("trash", trash),
    ("reclaim_batches", reclaim_batches),
];

/// Run every case against fresh engines from `make`; panics with the case name on failure.
pub fn run_all(make: &dyn Fn() -> Box<dyn MetaEngine>) {
    for (name, case) in CASES {
        let cap = if *name == "capacity" { 1 << 20 } else { 0 };
        let meta = formatted(make(), cap);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            case(&meta);
            let report = meta.fsck(false).expect("fsck");
            assert!(report.clean(), "fsck after the case: {:?}", report.problems);
        }));
        if let Err(e) = r {
            panic!(
                "conformance case '{name}' failed on {}: {e:?}",
                meta.engine().describe()
            );
        }
    }
}

fn file(meta: &Meta, parent: u64, name: &str) -> u64 {
    meta.mknod(
        Ctx::ROOT,
        parent,
        name.as_bytes(),
        FileKind::File,
        0o644,
        0,
        None,
    )
    .expect("create")
    .ino
}

fn dir(meta: &Meta, parent: u64, name: &str) -> u64 {
    meta.mknod(
        Ctx::ROOT,
        parent,
        name.as_bytes(),
        FileKind::Dir,
        0o755,
        0,
        None,
    )
    .expect("mkdir")
    .ino
}

fn namespace(m: &Meta) {
    let d = dir(m, ROOT_INO, "d");
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 3);
    let f = file(m, d, "f");
    assert!(matches!(
        m.mknod(Ctx::ROOT, d, b"f", FileKind::File, 0o644, 0, None),
        Err(MetaError::Exists)
    ));
    assert_eq!(m.lookup(d, b"f").unwrap().ino, f);
    assert_eq!(m.lookup(d, b"..").unwrap().ino, ROOT_INO);
    assert_eq!(m.lookup(ROOT_INO, b"..").unwrap().ino, ROOT_INO);
    m.link(f, ROOT_INO, b"hard").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 2);
    assert!(matches!(m.link(d, ROOT_INO, b"x"), Err(MetaError::Perm)));
    assert!(matches!(m.rmdir(ROOT_INO, b"d"), Err(MetaError::NotEmpty)));
    m.unlink(d, b"f").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 1);
    m.rmdir(ROOT_INO, b"d").unwrap();
    assert!(matches!(m.getattr(d), Err(MetaError::NotFound)));
    let s = m
        .mknod(
            Ctx::ROOT,
            ROOT_INO,
            b"s",
            FileKind::Symlink,
            0o777,
            0,
            Some(b"/target"),
        )
        .unwrap();
    assert_eq!(m.readlink(s.ino).unwrap(), b"/target");
    assert!(matches!(
        m.unlink(ROOT_INO, b"nope"),
        Err(MetaError::NotFound)
    ));
    assert!(matches!(
        m.mknod(
            Ctx::ROOT,
            ROOT_INO,
            &[b'a'; 256],
            FileKind::File,
            0o644,
            0,
            None
        ),
        Err(MetaError::NameTooLong)
    ));
    // setgid directories pass their group on.
    let g = dir(m, ROOT_INO, "g");
    m.setattr(
        g,
        &super::SetAttr {
            mode: Some(0o2775),
            gid: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    let inner = m
        .mknod(
            Ctx { uid: 7, gid: 7 },
            g,
            b"sub",
            FileKind::Dir,
            0o755,
            0,
            None,
        )
        .unwrap();
    assert_eq!(inner.gid, 50);
    assert_ne!(inner.mode & libc::S_ISGID, 0);
}

fn rename(m: &Meta) {
    let a = dir(m, ROOT_INO, "a");
    let b = dir(m, ROOT_INO, "b");
    let f = file(m, a, "f");
    let g = file(m, b, "g");
    assert!(matches!(
        m.rename(a, b"f", b, b"g", 1),
        Err(MetaError::Exists)
    ));
    m.rename(a, b"f", b, b"g", 2).unwrap();
    assert_eq!(m.lookup(b, b"g").unwrap().ino, f);
    assert_eq!(m.lookup(a, b"f").unwrap().ino, g);
    m.rename(a, b"f", b, b"g", 0).unwrap();
    assert_eq!(m.lookup(b, b"g").unwrap().ino, g);
    assert!(matches!(m.getattr(f), Err(MetaError::NotFound)));
    // Directory moves keep link counts right and refuse cycles.
    let c = dir(m, a, "c");
    m.rename(a, b"c", b, b"c", 0).unwrap();
    assert_eq!(m.getattr(a).unwrap().nlink, 2);
    assert_eq!(m.getattr(b).unwrap().nlink, 3);
    assert_eq!(m.lookup(c, b"..").unwrap().ino, b);
    assert!(matches!(
        m.rename(ROOT_INO, b"b", c, b"x", 0),
        Err(MetaError::Invalid(_))
    ));
    let e = dir(m, ROOT_INO, "e");
    file(m, e, "x");
    assert!(matches!(
        m.rename(b, b"c", ROOT_INO, b"e", 0),
        Err(MetaError::NotEmpty)
    ));
    assert!(matches!(
        m.rename(b, b"g", ROOT_INO, b"e", 0),
        Err(MetaError::IsDir)
    ));
    assert!(matches!(
        m.rename(ROOT_INO, b"e", b, b"g", 0),
        Err(MetaError::NotDir)
    ));
}

fn readdir_paging(m: &Meta) {
    let d = dir(m, ROOT_INO, "many");
    for i in 0..250 {
        file(m, d, &format!("f{i:04}"));
    }
    let mut names = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = m.readdir(d, after.as_deref(), 100).unwrap();
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().name.clone());
        names.extend(page.into_iter().map(|e| e.name));
    }
    assert_eq!(names.len(), 250);
    assert!(names.windows(2).all(|w| w[0] < w[1]));
}

fn truncate_masks(m: &Meta) {
    let f = file(m, ROOT_INO, "t");
    let id = m.new_slice_id().unwrap();
    let s = Slice {
        seq: 0,
        id,
        size: 1000,
        off: 0,
        len: 1000,
        pos: 0,
    };
    let far = Slice {
        seq: 0,
        id: id + 1,
        size: 10,
        off: 0,
        len: 10,
        pos: 0,
    };
    m.write_slices(f, &[(0, s), (3, far)], 3 * CHUNK_SIZE + 10)
        .unwrap();
    assert_eq!(m.getattr(f).unwrap().length, 3 * CHUNK_SIZE + 10);
    let n = m.truncate(f, 500).unwrap();
    assert_eq!(n.length, 500);
    let (segs, len) = m.read_chunk(f, 0).unwrap();
    assert_eq!(len, 500);
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].len, 500);
    assert!(m.read_chunk(f, 3).unwrap().0.is_empty());
    // Growing again shows zeros, not the old bytes.
    m.truncate(f, 2000).unwrap();
    assert_eq!(m.read_chunk(f, 0).unwrap().0[0].len, 500);
    // Trimming drops the hidden slice of chunk 3 and queues it as garbage.
    m.trim_once().unwrap();
    assert_eq!(m.chunk_indexes(f).unwrap(), vec![0]);
    assert!(m.due_garbage(10).unwrap().iter().any(|g| g.0 == id + 1));
    // The mask on chunk 0 is still needed (slice `s` crosses it).
    assert_eq!(m.getattr(f).unwrap().masks.len(), 1);
    // Punching a hole hides a range, keeps the size.
    let n = m
        .fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            100,
        )
        .unwrap();
    assert_eq!(n.length, 2000);
    let segs = m.read_chunk(f, 0).unwrap().0;
    assert_eq!((segs[0].pos, segs[0].len), (100, 400));
    // Truncate to 0 makes every mask redundant but one, and trimming drops everything.
    m.truncate(f, 0).unwrap();
    m.trim_once().unwrap();
    assert!(m.chunk_indexes(f).unwrap().is_empty());
    assert!(m.getattr(f).unwrap().masks.is_empty());
}

/// Deleted files' slices become garbage, in transactions of up to 64 chunks that may span
/// several files: a file of 150 chunks and 30 one-slice files, all deleted, end with every
/// slice queued as garbage once, no slice rows and an empty reclaim queue.
fn reclaim_batches(m: &Meta) {
    let slice = |id: u64| Slice {
        seq: 0,
        id,
        size: 10,
        off: 0,
        len: 10,
        pos: 0,
    };
    let mut ids = Vec::new();
    let big = file(m, ROOT_INO, "big");
    let mut chunks = Vec::new();
    for i in 0..150u32 {
        let id = m.new_slice_id().unwrap();
        ids.push(id);
        chunks.push((i, slice(id)));
    }
    m.write_slices(big, &chunks, 149 * CHUNK_SIZE + 10).unwrap();
    let mut small = Vec::new();
    for k in 0..30 {
        let f = file(m, ROOT_INO, &format!("s{k}"));
        let id = m.new_slice_id().unwrap();
        ids.push(id);
        m.write_slices(f, &[(0, slice(id))], 10).unwrap();
        small.push(f);
    }
    m.unlink(ROOT_INO, b"big").unwrap();
    for k in 0..30 {
        m.unlink(ROOT_INO, format!("s{k}").as_bytes()).unwrap();
    }
    while m.reclaim_once().unwrap() > 0 {}
    let (mut garbage, queued) = m
        .txn(false, |tx| {
            Ok((tx.list_due_garbage(i64::MAX, 1000)?, tx.list_reclaim(100)?))
        })
        .unwrap();
    assert!(queued.is_empty(), "reclaim queue left: {queued:?}");
    garbage.sort_unstable();
    ids.sort_unstable();
    assert_eq!(
        garbage.iter().map(|g| g.0).collect::<Vec<_>>(),
        ids,
        "every slice queued as garbage once"
    );
    for f in small.into_iter().chain([big]) {
        assert!(m.chunk_indexes(f).unwrap().is_empty(), "slices of {f} left");
    }
    assert!(m.is_garbage(ids[0]).unwrap() && m.is_garbage(ids[179]).unwrap());
    let live = m.new_slice_id().unwrap();
    assert!(!m.is_garbage(live).unwrap(), "a slice never deleted");
    m.forget_garbage(&ids[..1]).unwrap();
    assert!(!m.is_garbage(ids[0]).unwrap(), "forgotten");
}

fn unlink_open(m: &Meta) {
    let f = file(m, ROOT_INO, "open");
    m.open(f);
    m.unlink(ROOT_INO, b"open").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 0);
    m.close(f).unwrap();
    assert!(matches!(m.getattr(f), Err(MetaError::NotFound)));
    // Closing a session deletes what it kept alive.
    let g = file(m, ROOT_INO, "open2");
    m.open(g);
    m.unlink(ROOT_INO, b"open2").unwrap();
    m.close_session().unwrap();
    assert!(matches!(m.getattr(g), Err(MetaError::NotFound)));
}

fn xattrs(m: &Meta) {
    let f = file(m, ROOT_INO, "x");
    m.setxattr(f, b"user.a", b"1", 0).unwrap();
    assert!(matches!(
        m.setxattr(f, b"user.a", b"2", libc::XATTR_CREATE),
        Err(MetaError::Exists)
    ));
    assert!(matches!(
        m.setxattr(f, b"user.b", b"2", libc::XATTR_REPLACE),
        Err(MetaError::NoAttr)
    ));
    assert_eq!(m.getxattr(f, b"user.a").unwrap(), b"1");
    assert_eq!(m.listxattr(f).unwrap(), vec![b"user.a".to_vec()]);
    m.removexattr(f, b"user.a").unwrap();
    assert!(matches!(m.getxattr(f, b"user.a"), Err(MetaError::NoAttr)));
}

fn capacity(m: &Meta) {
    let f = file(m, ROOT_INO, "big");
    assert!(matches!(m.truncate(f, 2 << 20), Err(MetaError::NoSpace)));
    m.truncate(f, 512 << 10).unwrap();
    let st = m.statfs().unwrap();
    assert_eq!(st.total_space, 1 << 20);
    assert!(st.avail_space <= (1 << 20) - (512 << 10));
    m.unlink(ROOT_INO, b"big").unwrap();
    assert!(m.statfs().unwrap().avail_space >= (1 << 20) - 4096);
}

fn rollback(m: &Meta) {
    let r: Result<(), MetaError> = m.txn(true, |tx| {
        tx.set_setting("probe", "1")?;
        Err(MetaError::Invalid("abort"))
    });
    assert!(r.is_err());
    assert_eq!(m.txn(false, |tx| tx.get_setting("probe")).unwrap(), None);
}

fn locks(m: &Meta) {
    let f = file(m, ROOT_INO, "locked");
    let (rd, wr, un) = (
        libc::F_RDLCK as u32,
        libc::F_WRLCK as u32,
        libc::F_UNLCK as u32,
    );
    assert!(m.setlk(f, 1, wr, 0, 99, 10).unwrap());
    assert!(!m.setlk(f, 2, rd, 50, 60, 20).unwrap());
    assert!(m.setlk(f, 2, rd, 100, u64::MAX, 20).unwrap());
    assert!(
        m.setlk(f, 3, rd, 100, 200, 30).unwrap(),
        "shared locks coexist"
    );
    let c = m.getlk(f, 3, wr, 0, 10).unwrap().expect("conflict");
    assert_eq!((c.typ, c.start, c.end, c.pid), (wr, 0, 99, 10));
    // Unlocking the middle of a range splits it.
    assert!(m.setlk(f, 1, un, 40, 59, 10).unwrap());
    assert!(m.setlk(f, 2, wr, 40, 59, 20).unwrap());
    assert!(!m.setlk(f, 2, wr, 60, 60, 20).unwrap());
    assert!(m.getlk(f, 9, rd, 150, 150).unwrap().is_none());
    // A session that ends releases its locks.
    m.cleanup_session(m.txn(false, |tx| tx.list_sessions()).unwrap()[0].0)
        .unwrap();
    assert!(m.getlk(f, 9, wr, 0, u64::MAX).unwrap().is_none());
}

fn fsck_repairs(m: &Meta) {
    let d = dir(m, ROOT_INO, "d");
    let f = file(m, d, "f");
    // Break things behind the file system's back.
    m.txn(true, |tx| {
        let mut n = tx.get_node(f)?.unwrap();
        n.nlink = 5;
        tx.put_node(&n)?;
        tx.put_edge(
            ROOT_INO,
            &super::Entry {
                name: b"ghost".to_vec(),
                ino: 999_999,
                kind: FileKind::File,
            },
        )?;
        tx.incr_counter("used_inodes", 7)?;
        Ok(())
    })
    .unwrap();
    let r = m.fsck(false).unwrap();
    assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
    let r = m.fsck(true).unwrap();
    assert_eq!(r.repaired, 3, "{:?}", r.problems);
    assert!(m.fsck(false).unwrap().clean());
}

fn quotas(m: &Meta) {
    let t = dir(m, ROOT_INO, "tenant");
    let u = dir(m, t, "user");
    file(m, t, "pre");
    m.set_quota(t, 10 << 20, 100).unwrap();
    m.set_quota(u, 1 << 20, 0).unwrap();
    let q = m.get_quota(t).unwrap().unwrap();
    assert_eq!(
        (q.used_inodes, q.used_space),
        (2, 4096),
        "existing tree counted"
    );
    // The tightest (inner) limit refuses growth.
    let f = file(m, u, "f");
    m.truncate(f, 512 << 10).unwrap();
    assert!(matches!(m.truncate(f, 2 << 20), Err(MetaError::Quota)));
    let id = m.new_slice_id().unwrap();
    let s = Slice {
        seq: 0,
        id,
        size: 1 << 20,
        off: 0,
        len: 1 << 20,
        pos: 0,
    };
    m.write_slices(f, &[(0, s)], 1 << 20).unwrap(); // exactly the limit
    m.truncate(f, 512 << 10).unwrap();
    let s = Slice {
        id: id + 1,
        size: 4096,
        len: 4096,
        pos: 1 << 20,
        ..s
    };
    assert!(matches!(
        m.write_slices(f, &[(0, s)], (1 << 20) + 4096),
        Err(MetaError::Quota)
    ));
    assert_eq!(m.get_quota(u).unwrap().unwrap().used_space, 512 << 10);
    assert_eq!(
        m.get_quota(t).unwrap().unwrap().used_space,
        4096 + (512 << 10)
    );
    assert_eq!(m.statfs_at(f).unwrap().total_space, 1 << 20);
    assert_eq!(m.statfs_at(u).unwrap().avail_space, (1 << 20) - (512 << 10));
    // An inode limit on the outer quota binds inside the inner one.
    m.set_quota(t, 10 << 20, 3).unwrap();
    assert!(matches!(
        m.mknod(Ctx::ROOT, u, b"g", FileKind::File, 0o644, 0, None),
        Err(MetaError::Quota)
    ));
    // Deleting frees at once; moving a file out releases its usage.
    m.unlink(t, b"pre").unwrap();
    file(m, u, "g");
    m.rename(u, b"f", ROOT_INO, b"f", 0).unwrap();
    let (qu, qt) = (
        m.get_quota(u).unwrap().unwrap(),
        m.get_quota(t).unwrap().unwrap(),
    );
    assert_eq!((qu.used_space, qu.used_inodes), (0, 1));
    assert_eq!((qt.used_space, qt.used_inodes), (4096, 2));
    // Directories do not move between quotas; hard links do not cross them.
    dir(m, ROOT_INO, "elsewhere");
    assert!(matches!(
        m.rename(t, b"user", ROOT_INO, b"moved", 0),
        Err(MetaError::CrossQuota)
    ));
    assert!(matches!(m.link(f, u, b"l"), Err(MetaError::CrossQuota)));
    // The stored usage matches a recount.
    for d in [t, u] {
        let (stored, actual) = m.check_quota(d, false).unwrap();
        assert_eq!(stored, actual);
    }
    m.delete_quota(u).unwrap();
    assert!(m.get_quota(u).unwrap().is_none());
}

fn journal(m: &Meta) {
    let a = dir(m, ROOT_INO, "a");
    let b = dir(m, ROOT_INO, "b");
    let c = dir(m, ROOT_INO, "c");
    let fb = file(m, b, "f");
    let fc = file(m, c, "g");
    let t0 = m.change_token().unwrap();
    assert_eq!(m.changes_since(&t0, 100).unwrap().dirs, Vec::<u64>::new());
    file(m, a, "new");
    m.setxattr(fb, b"user.k", b"v", 0).unwrap();
    let batch = m.changes_since(&t0, 100).unwrap();
    // a (new entry), b (a child's xattr), the root (a's mtime); not c.
    assert!(
        batch.dirs.contains(&a) && batch.dirs.contains(&b),
        "{batch:?}"
    );
    assert!(!batch.dirs.contains(&c), "{batch:?}");
    assert!(
        batch.dirs.iter().all(|d| [ROOT_INO, a, b].contains(d)),
        "{batch:?}"
    );
    // Nothing after the returned token; a hard link makes the file multiply linked.
    let t1 = batch.next.clone();
    assert_eq!(m.changes_since(&t1, 100).unwrap().dirs, Vec::<u64>::new());
    m.link(fc, a, b"g2").unwrap();
    m.setattr(
        fc,
        &SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .unwrap();
    let batch = m.changes_since(&t1, 100).unwrap();
    assert!(batch.dirs.contains(&a), "{batch:?}");
    assert_eq!(batch.linked_files, vec![fc]);
    // Limits, foreign and malformed tokens, trimming.
    assert!(matches!(
        m.changes_since(&t0, 1),
        Err(MetaError::JournalTrimmed(_))
    ));
    assert!(matches!(
        m.changes_since("0000000000000000.1", 100),
        Err(MetaError::JournalTrimmed(_))
    ));
    assert!(matches!(
        m.changes_since("nonsense", 100),
        Err(MetaError::JournalTrimmed(_))
    ));
    assert!(m.trim_journal_before(i64::MAX).unwrap());
    assert!(matches!(
        m.changes_since(&t1, 100),
        Err(MetaError::JournalTrimmed(_))
    ));
    let t2 = m.change_token().unwrap();
    file(m, c, "after-trim");
    assert!(m.changes_since(&t2, 100).unwrap().dirs.contains(&c));
}

fn trash(m: &Meta) {
    use super::TRASH_INO;
    let d = dir(m, ROOT_INO, "d");
    let f = file(m, d, "keep-me");
    let g = file(m, d, "other");
    // Without a trash, unlink deletes.
    let gone = file(m, d, "gone");
    m.unlink(d, b"gone").unwrap();
    assert!(matches!(m.getattr(gone), Err(MetaError::NotFound)));
    m.update_format(|f| f.trash_days = 1).unwrap();
    let used = m.counter("used_inodes").unwrap();
    m.unlink(d, b"keep-me").unwrap();
    assert!(matches!(m.lookup(d, b"keep-me"), Err(MetaError::NotFound)));
    assert_eq!(m.getattr(f).unwrap().parent, TRASH_INO);
    assert_eq!(m.counter("used_inodes").unwrap(), used);
    // A rename over a file puts the replaced file in the trash too.
    let h = file(m, d, "new");
    m.rename(d, b"new", d, b"other", 0).unwrap();
    let list = m.trash_list().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!((list[0].ino, list[0].name.as_slice()), (f, &b"keep-me"[..]));
    assert_eq!((list[1].ino, list[1].name.as_slice()), (g, &b"other"[..]));
    // Restore: back under its name, or beside a file that took it meanwhile.
    let r = m.trash_restore(&list).unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(m.lookup(d, b"keep-me").unwrap().ino, f);
    let back = format!("other.restored-{g}");
    assert_eq!(m.lookup(d, back.as_bytes()).unwrap().ino, g);
    assert_eq!(m.lookup(d, b"other").unwrap().ino, h);
    assert!(m.trash_list().unwrap().is_empty());
    // Emptying: only what is older than the cut-off goes, for good.
    m.unlink(d, b"keep-me").unwrap();
    assert_eq!(m.trash_empty_before(0).unwrap(), 0);
    assert_eq!(m.trash_empty_before(i64::MAX).unwrap(), 1);
    assert!(matches!(m.getattr(f), Err(MetaError::NotFound)));
    assert!(m.trash_list().unwrap().is_empty());
    // A file whose directory is gone is reported, not restored.
    let e = dir(m, ROOT_INO, "e");
    file(m, e, "x");
    m.unlink(e, b"x").unwrap();
    m.rmdir(ROOT_INO, b"e").unwrap();
    let r = m.trash_restore(&m.trash_list().unwrap()).unwrap();
    assert_eq!(r.failed.len(), 1);
    assert!(r.failed[0].1.contains("deleted"), "{r:?}");
    m.update_format(|f| f.trash_days = 0).unwrap();
    assert_eq!(m.trash_expire().unwrap(), 1);
}
