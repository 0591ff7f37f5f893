//! The metadata engine conformance suite against a real PostgreSQL server (Debian
//! `postgresql`, started on a random loopback port by the test).

use std::sync::atomic::Ordering;

use std::time::Duration;

use strata::meta::{Ctx, FileKind, MetaEngine, PostgresEngine, ROOT_INO, conformance};
use strata::testing::postgres::PgServer;

#[test]
fn postgres_engine_conformance() {
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    conformance::run_all(&|| {
        Box::new(PostgresEngine::open(&pg.new_database()).expect("open engine"))
            as Box<dyn MetaEngine>
    });
}

#[test]
fn bad_urls_and_unreachable_servers_are_explained() {
    let e = PostgresEngine::open("postgres://u:secret@127.0.0.1:1/db")
        .err()
        .expect("must fail");
    let msg = e.to_string();
    assert!(msg.contains("cannot connect to PostgreSQL"), "{msg}");
    assert!(!msg.contains("secret"), "password leaked: {msg}");
    let e = PostgresEngine::open("postgres://u@127.0.0.1:5432/db?pool=0")
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("pool=0"), "{e}");
}

/// Requests are pipelined: `BEGIN` rides with the first read and every write goes out with
/// `COMMIT`, so an operation costs the round trips of its reads plus one, not one per
/// statement: a create two (it was ten: the directory, the entry and its node are one
/// join); a stat and a lookup are single statements without a transaction, one each (they
/// were three and five); closing a file costs none.
#[test]
fn round_trips_of_create_stat_lookup_and_close() {
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let engine = PostgresEngine::open(&pg.new_database()).expect("open engine");
    let trips = engine.round_trips();
    let meta = conformance::formatted(Box::new(engine), 0);
    let create = |name: &[u8]| {
        meta.mknod(Ctx::ROOT, ROOT_INO, name, FileKind::File, 0o644, 0, None)
            .expect("create")
    };
    // The first create also reserves a batch of inode numbers and reads the quota list.
    create(b"first");
    let before = trips.load(Ordering::SeqCst);
    let n = create(b"second");
    let create_trips = trips.load(Ordering::SeqCst) - before;
    // The directory and the entry in one join (with BEGIN), COMMIT with the writes.
    assert_eq!(create_trips, 2, "round trips of one create");
    let before = trips.load(Ordering::SeqCst);
    assert_eq!(meta.getattr(n.ino).expect("stat").ino, n.ino);
    assert_eq!(
        trips.load(Ordering::SeqCst) - before,
        1,
        "round trips of one stat"
    );
    // Everything the held-back writes did is there, and a duplicate is refused.
    let before = trips.load(Ordering::SeqCst);
    assert_eq!(meta.lookup(ROOT_INO, b"second").expect("lookup"), n);
    assert_eq!(
        trips.load(Ordering::SeqCst) - before,
        1,
        "round trips of one lookup"
    );
    let before = trips.load(Ordering::SeqCst);
    meta.open(n.ino);
    meta.close(n.ino).expect("close");
    assert_eq!(
        trips.load(Ordering::SeqCst),
        before,
        "round trips of open + close"
    );
    assert!(matches!(
        meta.lookup(ROOT_INO, b"missing"),
        Err(strata::meta::MetaError::NotFound)
    ));
    assert!(matches!(
        meta.mknod(
            Ctx::ROOT,
            ROOT_INO,
            b"second",
            FileKind::File,
            0o644,
            0,
            None
        ),
        Err(strata::meta::MetaError::Exists)
    ));
    assert_eq!(
        meta.statfs().expect("statfs").used_inodes,
        2,
        "the two files"
    );
}

/// Usage counters are sharded per pool connection (FORMAT.md §2, "Counter shards"): two
/// write transactions that both change `used_inodes` at once, as two creates in different
/// directories do, neither wait for each other nor fail to serialize; reads see the sum and
/// `set_counter` replaces it.
#[test]
fn concurrent_usage_updates_neither_wait_nor_conflict() {
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let engine = PostgresEngine::open(&pg.new_database()).expect("open engine");
    engine.init_schema().expect("schema");
    let mut first = engine.begin(true).expect("begin");
    first.add_counter("used_inodes", 1).expect("add");
    // A read sends the held-back update: `first` now holds the row it updated.
    first.get_counter("next_inode").expect("read");
    let (done, answer) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = (|| {
                let mut second = engine.begin(true)?;
                second.add_counter("used_inodes", 2)?;
                second.commit()
            })();
            done.send(r).expect("send");
        });
        // With one row per counter the second transaction waits for the first's row lock
        // and then fails to serialize.
        let early = answer.recv_timeout(Duration::from_secs(10));
        let waited = early.is_err();
        first.commit().expect("first commit");
        let second = early.unwrap_or_else(|_| answer.recv().expect("answer"));
        assert!(!waited, "the second transaction waited for the first");
        second.expect("second commit");
    });
    let read = |name: &str| {
        let mut tx = engine.begin(false).expect("begin");
        tx.get_counter(name).expect("read")
    };
    assert_eq!(read("used_inodes"), 3, "the sum of the shards");
    let mut tx = engine.begin(true).expect("begin");
    tx.set_counter("used_inodes", 10).expect("set");
    tx.commit().expect("commit");
    assert_eq!(read("used_inodes"), 10, "set_counter replaces the shards");
    assert_eq!(read("used_space"), 0, "another counter is apart");
}

/// libpq's sslmode meanings against a real server: `prefer` (the default) falls back to
/// plain text, `require` insists on TLS, `verify-full` checks the chain and the host name,
/// `verify-ca` only the chain; errors name what to fix.
#[test]
fn tls_follows_libpq_sslmodes() {
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.new_database();
    let open = |params: &str| PostgresEngine::open(&format!("{url}?{params}"));
    let fails = |params: &str| -> String {
        open(params)
            .err()
            .unwrap_or_else(|| panic!("{params} must fail"))
            .to_string()
    };
    // No TLS on the server: `require` is refused, the default falls back.
    let e = fails("sslmode=require");
    assert!(e.contains("TLS") && e.contains("sslmode"), "{e}");
    open("application_name=plain").expect("prefer falls back to plain text");
    let e = fails("sslmode=on");
    assert!(e.contains("sslmode=on") && e.contains("verify-full"), "{e}");

    let ca = pg.enable_tls().unwrap_or_else(|e| panic!("{e}"));
    let ca = ca.display();
    // Encrypted, and the file system works over it.
    let engine = open("sslmode=require&application_name=strata-require").expect("require");
    let meta = conformance::formatted(Box::new(engine), 0);
    meta.mknod(Ctx::ROOT, ROOT_INO, b"f", FileKind::File, 0o644, 0, None)
        .expect("create over TLS");
    assert!(pg.tls_connections("strata-require") >= 1, "TLS in use");
    let full = open(&format!(
        "sslmode=verify-full&sslrootcert={ca}&application_name=strata-full"
    ))
    .expect("verify-full with the server's CA");
    assert!(pg.tls_connections("strata-full") >= 1);
    drop(full);
    // Another CA: the certificate is refused.
    let other = pg.other_ca().unwrap_or_else(|e| panic!("{e}"));
    let e = fails(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other.display()
    ));
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // The certificate names 127.0.0.1, not localhost: verify-full refuses, verify-ca accepts.
    let local = url.replace("127.0.0.1", "localhost");
    let e = PostgresEngine::open(&format!("{local}?sslmode=verify-full&sslrootcert={ca}"))
        .err()
        .expect("wrong name")
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    PostgresEngine::open(&format!("{local}?sslmode=verify-ca&sslrootcert={ca}"))
        .expect("verify-ca ignores the name");
    let e = fails("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}
