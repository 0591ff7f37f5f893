//! The metadata engine conformance suite against a real PostgreSQL server (Debian
//! `postgresql`, started on a random loopback port by the test).

use strata::meta::{MetaEngine, PostgresEngine, conformance};
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
