use super::conformance::run_all;
use super::{MemEngine, MetaEngine, SqliteEngine};

#[test]
fn mem_engine_conformance() {
    run_all(&|| Box::new(MemEngine::new()) as Box<dyn MetaEngine>);
}

#[test]
fn sqlite_engine_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    run_all(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = dir.path().join(format!("m{i}.db"));
        Box::new(SqliteEngine::open(p.to_str().unwrap()).unwrap()) as Box<dyn MetaEngine>
    });
}

mod probe {
    //! An engine wrapper for tests that count engine calls or stop a transaction midway.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use parking_lot::{Condvar, Mutex};

    use super::super::*;

    /// Counts every engine call; `hold` stops the next write transaction at its commit.
    pub(super) struct Counting {
        pub inner: Box<dyn MetaEngine>,
        pub calls: Arc<AtomicUsize>,
        pub hold: Arc<Hold>,
    }

    impl Counting {
        pub fn new(inner: Box<dyn MetaEngine>) -> Counting {
            Counting {
                inner,
                calls: Arc::new(AtomicUsize::new(0)),
                hold: Arc::new(Hold::default()),
            }
        }
    }

    /// Armed, the next write transaction to commit waits there until released (or panics
    /// there: `arm_panic`).
    #[derive(Default)]
    pub(super) struct Hold {
        state: Mutex<HoldState>,
        cond: Condvar,
    }

    #[derive(Default)]
    struct HoldState {
        armed: bool,
        panic: bool,
        held: bool,
        released: bool,
    }

    impl Hold {
        pub fn arm(&self) {
            *self.state.lock() = HoldState {
                armed: true,
                ..HoldState::default()
            };
        }
        pub fn arm_panic(&self) {
            *self.state.lock() = HoldState {
                armed: true,
                panic: true,
                ..HoldState::default()
            };
        }
        /// Wait until a write transaction is held at its commit.
        pub fn wait_held(&self) {
            let mut s = self.state.lock();
            while !s.held {
                self.cond.wait(&mut s);
            }
        }
        pub fn release(&self) {
            self.state.lock().released = true;
            self.cond.notify_all();
        }
        fn at_commit(&self) {
            let mut s = self.state.lock();
            if !s.armed {
                return;
            }
            s.armed = false;
            if s.panic {
                drop(s);
                panic!("commit panics (test)");
            }
            s.held = true;
            self.cond.notify_all();
            while !s.released {
                self.cond.wait(&mut s);
            }
        }
    }

    struct CountingTxn<'a> {
        inner: Box<dyn Txn + 'a>,
        calls: Arc<AtomicUsize>,
        hold: Option<Arc<Hold>>,
    }

    impl MetaEngine for Counting {
        fn kind(&self) -> &'static str {
            "counting"
        }
        fn describe(&self) -> String {
            "counting://".into()
        }
        fn init_schema(&self) -> Result<()> {
            self.inner.init_schema()
        }
        fn drop_schema(&self) -> Result<()> {
            self.inner.drop_schema()
        }
        fn begin(&self, write: bool) -> Result<Box<dyn Txn + '_>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(CountingTxn {
                inner: self.inner.begin(write)?,
                calls: self.calls.clone(),
                hold: write.then(|| self.hold.clone()),
            }))
        }
    }

    macro_rules! forward {
        ($( fn $name:ident(&mut self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
            $(
                fn $name(&mut self $(, $arg: $ty)*) -> $ret {
                    self.calls.fetch_add(1, Ordering::SeqCst);
                    self.inner.$name($($arg),*)
                }
            )*
        };
    }

    impl Txn for CountingTxn<'_> {
        fn commit(self: Box<Self>) -> Result<()> {
            if let Some(h) = &self.hold {
                h.at_commit();
            }
            self.inner.commit()
        }
        forward! {
            fn get_setting(&mut self, name: &str) -> Result<Option<String>>;
            fn set_setting(&mut self, name: &str, value: &str) -> Result<()>;
            fn incr_counter(&mut self, name: &str, delta: i64) -> Result<i64>;
            fn get_counter(&mut self, name: &str) -> Result<i64>;
            fn get_node(&mut self, ino: Ino) -> Result<Option<Node>>;
            fn put_node(&mut self, node: &Node) -> Result<()>;
            fn delete_node(&mut self, ino: Ino) -> Result<()>;
            fn get_edge(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Entry>>;
            fn put_edge(&mut self, parent: Ino, entry: &Entry) -> Result<()>;
            fn delete_edge(&mut self, parent: Ino, name: &[u8]) -> Result<()>;
            fn list_edges(&mut self, parent: Ino, after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>>;
            fn get_symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>>;
            fn put_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()>;
            fn delete_symlink(&mut self, ino: Ino) -> Result<()>;
            fn get_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>>;
            fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()>;
            fn delete_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool>;
            fn list_xattrs(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>>;
            fn delete_xattrs(&mut self, ino: Ino) -> Result<()>;
            fn chunk_slices(&mut self, ino: Ino, indx: u32) -> Result<Vec<Slice>>;
            fn add_slice(&mut self, ino: Ino, indx: u32, slice: &Slice) -> Result<()>;
            fn delete_slice(&mut self, ino: Ino, indx: u32, seq: u64) -> Result<()>;
            fn chunk_indexes(&mut self, ino: Ino, from: u32, limit: usize) -> Result<Vec<u32>>;
            fn add_reclaim(&mut self, ino: Ino, length: u64) -> Result<()>;
            fn list_reclaim(&mut self, limit: usize) -> Result<Vec<(Ino, u64)>>;
            fn delete_reclaim(&mut self, ino: Ino) -> Result<()>;
            fn add_trim(&mut self, ino: Ino) -> Result<()>;
            fn list_trim(&mut self, limit: usize) -> Result<Vec<Ino>>;
            fn delete_trim(&mut self, ino: Ino) -> Result<()>;
            fn add_garbage(&mut self, id: u64, size: u32, due: i64) -> Result<()>;
            fn list_due_garbage(&mut self, now: i64, limit: usize) -> Result<Vec<(u64, u32)>>;
            fn delete_garbage(&mut self, id: u64) -> Result<()>;
            fn has_garbage(&mut self, id: u64) -> Result<bool>;
            fn put_session(&mut self, sid: u64, heartbeat: i64, info: &str) -> Result<()>;
            fn delete_session(&mut self, sid: u64) -> Result<()>;
            fn list_sessions(&mut self) -> Result<Vec<(u64, i64, String)>>;
            fn add_sustained(&mut self, sid: u64, ino: Ino) -> Result<()>;
            fn delete_sustained(&mut self, sid: u64, ino: Ino) -> Result<()>;
            fn list_sustained(&mut self, sid: u64) -> Result<Vec<Ino>>;
            fn get_locks(&mut self, ino: Ino) -> Result<Vec<LockSet>>;
            fn put_locks(&mut self, ino: Ino, sid: u64, owner: u64, ranges: &[LockRange]) -> Result<()>;
            fn delete_session_locks(&mut self, sid: u64) -> Result<()>;
            fn scan_nodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Node>>;
            fn scan_edges(&mut self, after: Option<(Ino, &[u8])>, limit: usize) -> Result<Vec<(Ino, Entry)>>;
            fn scan_slice_inodes(&mut self, after: Ino, limit: usize) -> Result<Vec<Ino>>;
            fn set_counter(&mut self, name: &str, value: i64) -> Result<()>;
            fn get_quota(&mut self, ino: Ino) -> Result<Option<Quota>>;
            fn put_quota(&mut self, q: &Quota) -> Result<()>;
            fn delete_quota(&mut self, ino: Ino) -> Result<()>;
            fn list_quotas(&mut self) -> Result<Vec<Quota>>;
            fn journal_append(&mut self, rows: &[(Ino, u8)], at: i64) -> Result<()>;
            fn journal_position(&mut self) -> Result<u64>;
            fn journal_since(&mut self, pos: u64, limit: usize) -> Result<Vec<(Ino, u8)>>;
            fn journal_trim(&mut self, before: i64) -> Result<u64>;
            fn backlog_add(&mut self, key: &str, at: i64) -> Result<()>;
            fn backlog_list(&mut self, after: &str, limit: usize) -> Result<Vec<String>>;
            fn backlog_delete(&mut self, key: &str) -> Result<()>;
            fn backlog_count(&mut self) -> Result<u64>;
        }
    }
}

mod cost {
    //! Truncation must cost the same whatever the file's size and slice count: count every
    //! engine call made by `truncate`, `fallocate` and O_TRUNC-style `truncate(0)`.
    use std::sync::atomic::Ordering;

    use super::super::conformance::formatted;
    use super::super::*;
    use super::probe::Counting;

    /// Engine calls made by each size-changing operation on a file of `slices` slices
    /// spread over `chunks` chunks.
    fn costs(slices: u32, chunks: u32) -> Vec<usize> {
        let engine = Counting::new(Box::new(MemEngine::new()));
        let calls = engine.calls.clone();
        let meta = formatted(Box::new(engine), 0);
        let f = meta
            .mknod(Ctx::ROOT, ROOT_INO, b"f", FileKind::File, 0o644, 0, None)
            .unwrap();
        for i in 0..slices {
            let indx = i % chunks;
            let s = Slice {
                seq: 0,
                id: 1000 + i as u64,
                size: 4096,
                off: 0,
                len: 4096,
                pos: (i / chunks) * 4096,
            };
            meta.write_slices(
                f.ino,
                &[(indx, s)],
                indx as u64 * CHUNK_SIZE + 4096 * (i / chunks + 1) as u64,
            )
            .unwrap();
        }
        let mut out = Vec::new();
        let mut measure = |op: &dyn Fn()| {
            let before = calls.load(Ordering::SeqCst);
            op();
            out.push(calls.load(Ordering::SeqCst) - before);
        };
        let len = meta.getattr(f.ino).unwrap().length;
        measure(&|| drop(meta.truncate(f.ino, len / 2).unwrap()));
        measure(&|| drop(meta.truncate(f.ino, len * 10).unwrap()));
        measure(&|| {
            drop(
                meta.fallocate(
                    f.ino,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    len,
                )
                .unwrap(),
            )
        });
        measure(&|| drop(meta.fallocate(f.ino, 0, 0, len * 20).unwrap()));
        measure(&|| drop(meta.truncate(f.ino, 0).unwrap()));
        out
    }

    #[test]
    fn truncate_cost_does_not_grow_with_slices_or_size() {
        let small = costs(20, 1);
        let big = costs(2_000, 640); // 640 chunks = a 40 GiB sparse file
        assert_eq!(
            small, big,
            "engine calls per operation must not depend on the file"
        );
        assert!(small.iter().all(|&c| c <= 12), "{small:?}");
    }
}

mod open_race {
    //! An open racing a replacing rename in the same process: the node the open read must
    //! not be deleted after it was read.
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::conformance::formatted;
    use super::super::*;
    use super::probe::{Counting, Hold};

    #[test]
    fn an_open_waits_for_a_rename_deleting_its_node_and_then_finds_it_gone() {
        let (_dir, meta, hold) = held_sqlite();
        let mk = |name: &[u8]| mkfile(&meta, name);
        let old = mk(b"obj");
        mk(b"tmp");

        hold.arm();
        let renamer = {
            let meta = meta.clone();
            std::thread::spawn(move || meta.rename(ROOT_INO, b"tmp", ROOT_INO, b"obj", 0))
        };
        // The rename deleted `old` and waits at its commit; another connection still sees
        // the node.
        hold.wait_held();
        assert!(meta.getattr(old).is_ok());
        waits_then_finds_it_gone(&meta, &hold, old, renamer);
        meta.close(old).unwrap();

        // Opened first, the replaced node is kept until closed.
        let kept = mk(b"tmp");
        meta.open(kept);
        mk(b"tmp2");
        meta.rename(ROOT_INO, b"tmp", ROOT_INO, b"obj", 0).unwrap();
        meta.rename(ROOT_INO, b"tmp2", ROOT_INO, b"obj", 0).unwrap();
        assert_eq!(meta.getattr(kept).unwrap().nlink, 0);
        meta.close(kept).unwrap();
        assert!(matches!(meta.getattr(kept), Err(MetaError::NotFound)));
    }

    /// A formatted SQLite volume whose engine can hold or fail a commit (the directory
    /// holds its database).
    fn held_sqlite() -> (tempfile::TempDir, Arc<Meta>, Arc<Hold>) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let engine = Counting::new(Box::new(SqliteEngine::open(db.to_str().unwrap()).unwrap()));
        let hold = engine.hold.clone();
        (dir, Arc::new(formatted(Box::new(engine), 0)), hold)
    }

    fn mkfile(meta: &Meta, name: &[u8]) -> Ino {
        meta.mknod(Ctx::ROOT, ROOT_INO, name, FileKind::File, 0o644, 0, None)
            .unwrap()
            .ino
    }

    /// With the transaction of `deleter` deleting `ino` held at its commit: an open of `ino`
    /// waits for it, and once it committed finds the node gone.
    fn waits_then_finds_it_gone(
        meta: &Arc<Meta>,
        hold: &Hold,
        ino: Ino,
        deleter: std::thread::JoinHandle<Result<()>>,
    ) {
        let (opened, opener) = open_in_thread(meta, ino);
        assert!(
            opened.recv_timeout(Duration::from_millis(300)).is_err(),
            "the open must wait for the transaction deleting the node"
        );
        hold.release();
        deleter.join().unwrap().unwrap();
        assert!(matches!(opener.join().unwrap(), Err(MetaError::NotFound)));
    }

    /// Opens `ino` on another thread; the receiver hears once the open returned.
    fn open_in_thread(
        meta: &Arc<Meta>,
        ino: Ino,
    ) -> (
        std::sync::mpsc::Receiver<()>,
        std::thread::JoinHandle<Result<Node>>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let meta = meta.clone();
        let t = std::thread::spawn(move || {
            meta.open(ino);
            tx.send(()).unwrap();
            meta.getattr(ino)
        });
        (rx, t)
    }

    #[test]
    fn the_last_close_of_an_unlinked_file_deletes_it_before_an_open_by_inode_reads_it() {
        let (_dir, meta, hold) = held_sqlite();
        let ino = mkfile(&meta, b"f");
        meta.open(ino);
        meta.unlink(ROOT_INO, b"f").unwrap();
        hold.arm();
        let closer = {
            let meta = meta.clone();
            std::thread::spawn(move || meta.close(ino))
        };
        hold.wait_held();
        waits_then_finds_it_gone(&meta, &hold, ino, closer);
    }

    #[test]
    fn a_transaction_panicking_after_a_delete_does_not_leave_opens_waiting() {
        let (_dir, meta, hold) = held_sqlite();
        let ino = mkfile(&meta, b"f");
        hold.arm_panic();
        let unlinker = {
            let meta = meta.clone();
            std::thread::spawn(move || meta.unlink(ROOT_INO, b"f"))
        };
        assert!(unlinker.join().is_err(), "the commit panics");
        let (opened, opener) = open_in_thread(&meta, ino);
        assert!(
            opened.recv_timeout(Duration::from_secs(10)).is_ok(),
            "an open after the panic must not wait"
        );
        // Rolled back: the file is still there.
        assert_eq!(opener.join().unwrap().unwrap().nlink, 1);
        meta.close(ino).unwrap();
    }
}
