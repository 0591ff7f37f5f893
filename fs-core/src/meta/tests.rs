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
