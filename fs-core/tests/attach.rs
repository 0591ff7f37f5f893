//! Attached sources through the VFS (in-memory metadata, store and source): listings
//! imported lazily and shared through the metadata, byte-exact reads through the caches,
//! refresh of changed and deleted objects without mixing versions, read-only, and a source
//! that goes away.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use strata::meta::{Ctx, FileKind, Ino, MetaError, MetaSettings, ROOT_INO};
use strata::object::MemStore;
use strata::source::{self, Attachment, MemSource};
use strata::vfs::{Vfs, VfsError, VfsSettings};

const BS: u32 = 64 << 10;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
        .collect()
}

fn attachment(refresh_secs: u64) -> Attachment {
    Attachment {
        id: 0,
        ino: 0,
        path: String::new(),
        source: "mem://".into(),
        endpoint: None,
        region: None,
        access_key: None,
        secret_key: None,
        path_style: true,
        refresh_secs,
        read_only: true,
    }
}

/// A VFS with `src` attached at /data.
fn setup(src: &Arc<MemSource>, refresh: u64) -> (Arc<Vfs>, u32) {
    let store = Arc::new(MemStore::default());
    let vfs = strata::testing::mem_vfs(
        store,
        BS,
        MetaSettings::default(),
        VfsSettings {
            mem_cache_size: 8 << 20,
            ..VfsSettings::default()
        },
    );
    let a = vfs
        .meta
        .attach(ROOT_INO, b"data", attachment(refresh))
        .unwrap();
    vfs.set_source(a.id, src.clone(), refresh);
    (vfs, a.id)
}

fn path(vfs: &Vfs, p: &str) -> Result<strata::meta::Node, VfsError> {
    let mut ino = ROOT_INO;
    let mut node = vfs.getattr(ROOT_INO)?;
    for part in p.split('/').filter(|s| !s.is_empty()) {
        node = vfs.lookup(ino, part.as_bytes())?;
        ino = node.ino;
    }
    Ok(node)
}

fn read_all(vfs: &Vfs, ino: Ino) -> Vec<u8> {
    let (fh, _) = vfs.open(ino, false).unwrap();
    let mut out = Vec::new();
    loop {
        let b = vfs.read(ino, fh, out.len() as u64, 128 << 10).unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    vfs.release(ino, fh, None).unwrap();
    out
}

fn names(vfs: &Vfs, dir: Ino) -> Vec<String> {
    let fh = vfs.opendir(dir).unwrap();
    let out = vfs
        .readdir(dir, fh, 0)
        .unwrap()
        .into_iter()
        .map(|(_, e)| String::from_utf8_lossy(&e.name).to_string())
        .filter(|n| n != "." && n != "..")
        .collect();
    vfs.releasedir(fh);
    out
}

#[test]
fn objects_written_outside_are_listed_lazily_and_read_byte_exact() {
    let src = MemSource::new();
    let big = pattern(1, 5 * BS as usize + 123);
    src.put("train/part-0.bin", big.clone());
    src.put("train/part-1.bin", pattern(2, 10));
    src.put("train/sub/deep.txt", b"deep".to_vec());
    src.put("README", b"hello".to_vec());
    src.put("train/", Vec::new()); // a "folder marker": not a file
    let (vfs, _) = setup(&src, 600);
    assert_eq!(
        src.lists.load(Ordering::Relaxed),
        0,
        "nothing listed before access"
    );
    let data = path(&vfs, "/data").unwrap();
    assert_eq!(names(&vfs, data.ino), vec!["README", "train"]);
    assert_eq!(src.lists.load(Ordering::Relaxed), 1);
    let train = path(&vfs, "/data/train").unwrap();
    assert_eq!(train.kind, FileKind::Dir);
    assert_eq!(
        names(&vfs, train.ino),
        vec!["part-0.bin", "part-1.bin", "sub"]
    );
    let f = path(&vfs, "/data/train/part-0.bin").unwrap();
    assert_eq!(f.length, big.len() as u64);
    assert_eq!(f.mode & 0o777, 0o444);
    let gets0 = src.gets.load(Ordering::Relaxed);
    assert_eq!(read_all(&vfs, f.ino), big);
    let gets1 = src.gets.load(Ordering::Relaxed);
    assert_eq!(gets1 - gets0, 6, "one ranged GET per block");
    // Cached: a second read costs nothing at the source; listing again neither.
    assert_eq!(read_all(&vfs, f.ino), big);
    assert_eq!(src.gets.load(Ordering::Relaxed), gets1);
    let lists = src.lists.load(Ordering::Relaxed);
    names(&vfs, train.ino);
    assert_eq!(src.lists.load(Ordering::Relaxed), lists);
    // A random read in the middle, across a block edge.
    let (fh, _) = vfs.open(f.ino, false).unwrap();
    let mid = vfs.read(f.ino, fh, BS as u64 - 10, 20).unwrap();
    assert_eq!(&mid[..], &big[BS as usize - 10..BS as usize + 10]);
    vfs.release(f.ino, fh, None).unwrap();
    // A deeper level is listed on its first access.
    assert_eq!(
        read_all(&vfs, path(&vfs, "/data/train/sub/deep.txt").unwrap().ino),
        b"deep"
    );
    fsck_clean(&vfs);
}

fn fsck_clean(vfs: &Vfs) {
    let r = vfs.meta.fsck(false).unwrap();
    assert!(r.clean(), "fsck: {:?}", r.problems);
}

#[test]
fn sync_brings_changed_and_deleted_objects_and_never_mixes_versions() {
    let src = MemSource::new();
    src.put("m/a.bin", pattern(3, 3 * BS as usize));
    src.put("m/gone.bin", pattern(4, 100));
    let (vfs, id) = setup(&src, 0);
    let a = path(&vfs, "/data/m/a.bin").unwrap();
    let (fh, _) = vfs.open(a.ino, false).unwrap();
    let first = vfs.read(a.ino, fh, 0, BS).unwrap();
    assert_eq!(&first[..], &pattern(3, BS as usize)[..]);
    // Replaced and deleted behind Strata's back.
    let new = pattern(9, 2 * BS as usize + 7);
    src.put("m/a.bin", new.clone());
    src.delete("m/gone.bin");
    // The handle opened on the old version: the rest of the old object is gone at the
    // source, so its reads fail instead of returning new bytes after old ones.
    let err = vfs.read(a.ino, fh, 2 * BS as u64, BS).unwrap_err();
    assert!(matches!(err, VfsError::Fetch(_)), "{err}");
    vfs.release(a.ino, fh, None).unwrap();
    // Refresh 0: nothing changes until --sync.
    assert_eq!(path(&vfs, "/data/m/a.bin").unwrap().length, 3 * BS as u64);
    let att = vfs.meta.attachment(id).unwrap().unwrap();
    let r = source::sync(&vfs.meta, &att, src.as_ref()).unwrap();
    assert_eq!((r.updated, r.removed), (1, 1), "{r:?}");
    // The kernel would ask again after the attribute timeout; the test waits it out.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let a2 = path(&vfs, "/data/m/a.bin").unwrap();
    assert_eq!(a2.ino, a.ino, "same file, new content");
    assert_eq!(a2.length, new.len() as u64);
    assert_eq!(read_all(&vfs, a.ino), new);
    let m = path(&vfs, "/data/m").unwrap();
    assert_eq!(names(&vfs, m.ino), vec!["a.bin"]);
    assert!(matches!(
        path(&vfs, "/data/m/gone.bin"),
        Err(VfsError::Meta(MetaError::NotFound))
    ));
    // An unchanged listing writes nothing.
    let r = source::sync(&vfs.meta, &att, src.as_ref()).unwrap();
    assert_eq!((r.listed, r.changed), (2, 0), "{r:?}");
    fsck_clean(&vfs);
}

#[test]
fn files_of_a_source_are_read_only() {
    let src = MemSource::new();
    src.put("f", b"x".to_vec());
    let (vfs, _) = setup(&src, 600);
    let data = path(&vfs, "/data").unwrap();
    let f = path(&vfs, "/data/f").unwrap();
    let erofs = |r: Result<(), VfsError>| {
        let e = r.unwrap_err();
        assert_eq!(strata::fuse::errno_of(&e), libc::EROFS, "{e}");
    };
    erofs(vfs.create(Ctx::ROOT, data.ino, b"new", 0o644).map(|_| ()));
    erofs(vfs.open(f.ino, true).map(|_| ()));
    erofs(vfs.unlink(data.ino, b"f"));
    erofs(vfs.rename(data.ino, b"f", ROOT_INO, b"moved", 0));
    erofs(vfs.rmdir(ROOT_INO, b"data"));
    erofs(vfs.setattr(f.ino, &Default::default(), Some(0)).map(|_| ()));
    erofs(vfs.link(f.ino, ROOT_INO, b"hard").map(|_| ()));
    // Strata's own attributes are neither visible nor settable.
    assert!(vfs.listxattr(f.ino).unwrap().is_empty());
    assert!(vfs.getxattr(f.ino, b"strata.source").is_err());
    assert!(vfs.setxattr(ROOT_INO, b"strata.source", b"{}", 0).is_err());
}

#[test]
fn an_unreachable_source_keeps_cached_data_and_listings_serving() {
    let src = MemSource::new();
    src.put("d/warm.bin", pattern(5, 2 * BS as usize));
    src.put("d/cold.bin", pattern(6, 2 * BS as usize));
    src.put("other/x", b"x".to_vec());
    let (vfs, _) = setup(&src, 1);
    let warm = path(&vfs, "/data/d/warm.bin").unwrap();
    let cold = path(&vfs, "/data/d/cold.bin").unwrap();
    assert_eq!(read_all(&vfs, warm.ino), pattern(5, 2 * BS as usize));
    src.offline.store(true, Ordering::Relaxed);
    // Past the refresh interval: the listing cannot be refreshed, the old one serves.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let d = path(&vfs, "/data/d").unwrap();
    assert_eq!(names(&vfs, d.ino), vec!["cold.bin", "warm.bin"]);
    assert_eq!(read_all(&vfs, warm.ino), pattern(5, 2 * BS as usize));
    let t0 = std::time::Instant::now();
    let (fh, _) = vfs.open(cold.ino, false).unwrap();
    let err = vfs.read(cold.ino, fh, 0, 4096).unwrap_err();
    assert_eq!(strata::fuse::errno_of(&err), libc::EIO, "{err}");
    assert!(t0.elapsed().as_secs() < 30);
    // A directory never listed cannot be: EIO.
    let err = path(&vfs, "/data/other/x").unwrap_err();
    assert_eq!(strata::fuse::errno_of(&err), libc::EIO, "{err}");
    // Back online: everything reads.
    src.offline.store(false, Ordering::Relaxed);
    assert_eq!(read_all(&vfs, cold.ino), pattern(6, 2 * BS as usize));
    let x = path(&vfs, "/data/other/x").unwrap();
    assert_eq!(read_all(&vfs, x.ino), b"x");
    // Detach removes the whole tree.
    let id = vfs.meta.attachments().unwrap()[0].id;
    assert!(vfs.meta.detach(id).unwrap() >= 6);
    assert!(vfs.meta.attachments().unwrap().is_empty());
    assert!(vfs.meta.lookup(ROOT_INO, b"data").is_err());
    fsck_clean(&vfs);
}
