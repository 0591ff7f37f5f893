//! Helpers for tests (unit, integration and benchmarks): throwaway servers and conformance
//! checks. Not used by the file system itself. These helpers panic on failure, like asserts.

pub mod gateway;
pub mod mount;
pub mod postgres;
pub mod seaweedfs;

use bytes::Bytes;

use crate::object::{ObjectError, ObjectStore};

fn keys(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Vec<String> {
    let list = store.list(prefix, start_after, limit);
    let list = list.unwrap_or_else(|e| panic!("list {prefix:?} after {start_after:?}: {e}"));
    list.into_iter().map(|o| o.key).collect()
}

/// An order in which a store lists keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Byte order of the whole keys, as [`ObjectStore::list`] promises (and S3 does).
    Bytes,
    /// Component by component (`a/x` before `a-b`): how SeaweedFS 4.48 lists, walking its
    /// directory tree. Equal to byte order unless a key component is a proper prefix of a
    /// sibling followed by a character below `/` (such as `-` or `.`); Strata's object keys
    /// never are.
    PathComponents,
}

impl KeyOrder {
    /// Compare two keys in this order.
    pub fn cmp(self, a: &str, b: &str) -> std::cmp::Ordering {
        match self {
            KeyOrder::Bytes => a.cmp(b),
            KeyOrder::PathComponents => a.split('/').cmp(b.split('/')),
        }
    }
}

/// Check that `store` behaves as [`ObjectStore`] promises, using only keys under `prefix`
/// (which it empties first and last). Panics with a description of the first difference.
pub fn object_conformance(store: &dyn ObjectStore, prefix: &str) {
    object_conformance_ordered(store, prefix, KeyOrder::Bytes)
}

/// [`object_conformance`] for a store that lists in `order`.
pub fn object_conformance_ordered(store: &dyn ObjectStore, prefix: &str, order: KeyOrder) {
    let k = |s: &str| format!("{prefix}{s}");
    let ks = |v: &[&str]| v.iter().map(|s| k(s)).collect::<Vec<_>>();
    store.init().unwrap_or_else(|e| panic!("init: {e}"));
    store.init().unwrap_or_else(|e| panic!("second init: {e}"));
    for o in keys(store, prefix, None, usize::MAX) {
        store
            .delete(&o)
            .unwrap_or_else(|e| panic!("cleanup {o}: {e}"));
    }

    // Missing objects.
    assert!(
        matches!(store.head(&k("missing")), Err(ObjectError::NotFound(_))),
        "head of a missing key"
    );
    assert!(
        matches!(
            store.get(&k("missing"), 0, None),
            Err(ObjectError::NotFound(_))
        ),
        "get of a missing key"
    );
    assert!(
        matches!(
            store.get(&k("missing"), 5, Some(3)),
            Err(ObjectError::NotFound(_))
        ),
        "ranged get, missing key"
    );
    store
        .delete(&k("missing"))
        .unwrap_or_else(|e| panic!("delete of a missing key must succeed: {e}"));

    // Whole and ranged reads.
    let data: Bytes = (0..1000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    store
        .put(&k("a/1"), data.clone())
        .unwrap_or_else(|e| panic!("put: {e}"));
    let get = |key: &str, off: u64, len: Option<u64>| {
        store
            .get(key, off, len)
            .unwrap_or_else(|e| panic!("get {key} {off} {len:?}: {e}"))
    };
    assert_eq!(get(&k("a/1"), 0, None), data, "whole get");
    assert_eq!(get(&k("a/1"), 10, Some(20)), data.slice(10..30), "range");
    assert_eq!(get(&k("a/1"), 0, Some(1)), data.slice(0..1), "first byte");
    assert_eq!(
        get(&k("a/1"), 999, None),
        data.slice(999..),
        "last byte to the end"
    );
    assert_eq!(
        get(&k("a/1"), 990, Some(100)),
        data.slice(990..),
        "range past the end"
    );
    assert_eq!(
        get(&k("a/1"), 100, Some(u64::MAX)),
        data.slice(100..),
        "huge length"
    );
    assert!(get(&k("a/1"), 1000, None).is_empty(), "get at the end");
    assert!(
        get(&k("a/1"), 5000, Some(10)).is_empty(),
        "get past the end"
    );
    assert!(get(&k("a/1"), 10, Some(0)).is_empty(), "zero-length get");
    let info = store
        .head(&k("a/1"))
        .unwrap_or_else(|e| panic!("head: {e}"));
    assert_eq!(
        (info.key.as_str(), info.size),
        (k("a/1").as_str(), 1000),
        "head"
    );

    // Replacing, empty objects, unusual characters.
    store
        .put(&k("a/1"), Bytes::from_static(b"replaced"))
        .unwrap_or_else(|e| panic!("re-put: {e}"));
    assert_eq!(&get(&k("a/1"), 0, None)[..], b"replaced", "replaced object");
    store
        .put(&k("empty"), Bytes::new())
        .unwrap_or_else(|e| panic!("put empty: {e}"));
    assert!(get(&k("empty"), 0, None).is_empty(), "empty object");
    assert!(
        get(&k("empty"), 3, Some(4)).is_empty(),
        "range of an empty object"
    );
    assert_eq!(
        store.head(&k("empty")).map(|i| i.size).ok(),
        Some(0),
        "head of an empty object"
    );
    let odd = k("odd/a b+c=d%20&é~");
    store
        .put(&odd, Bytes::from_static(b"odd"))
        .unwrap_or_else(|e| panic!("put {odd}: {e}"));
    assert_eq!(
        &get(&odd, 0, None)[..],
        b"odd",
        "key with unusual characters"
    );

    // Listing: order, prefix, start_after, limit, checked against a model of the contents.
    for key in ["a/2", "a/3", "a/sub/deep", "a-x", "a0", "b/1"] {
        let body = Bytes::from(key.as_bytes().to_vec());
        store
            .put(&k(key), body)
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
    let mut present = ks(&[
        "a-x",
        "a/1",
        "a/2",
        "a/3",
        "a/sub/deep",
        "a0",
        "b/1",
        "empty",
        "odd/a b+c=d%20&é~",
    ]);
    let expect = |present: &[String], p: &str, after: Option<&str>, limit: usize| {
        let mut v: Vec<String> = present
            .iter()
            .filter(|x| x.starts_with(p) && after.is_none_or(|a| order.cmp(x, a).is_gt()))
            .cloned()
            .collect();
        v.sort_by(|a, b| order.cmp(a, b));
        v.truncate(limit);
        v
    };
    let cases: Vec<(String, Option<String>, usize, &str)> = vec![
        (k(""), None, 1000, "list all"),
        (k("a/"), None, 1000, "list a/"),
        (k("a/"), Some(k("a/1")), 2, "start_after + limit"),
        (k("a/"), Some(k("a/2x")), 10, "start_after between keys"),
        (
            k("a"),
            Some(k("a/sub/deep")),
            10,
            "start_after the last key of a directory",
        ),
        (
            k("a"),
            Some(k("a-x")),
            10,
            "start_after a key next to a directory",
        ),
        (k("b/"), Some(k("a")), 10, "start_after before the prefix"),
        (k("a/"), Some(k("z")), 10, "start_after beyond the prefix"),
        (k("nothing/"), None, 10, "no key matches"),
        (k(""), None, 0, "limit 0"),
    ];
    let check_lists = |present: &[String]| {
        for (p, after, limit, what) in &cases {
            let want = expect(present, p, after.as_deref(), *limit);
            assert_eq!(
                keys(store, p, after.as_deref(), *limit),
                want,
                "{what} ({order:?} order)"
            );
        }
    };
    check_lists(&present);
    let sizes: Vec<u64> = store
        .list(&k("a/"), None, 2)
        .map(|v| v.iter().map(|o| o.size).collect())
        .unwrap_or_default();
    assert_eq!(sizes, vec![8, 3], "list sizes");
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = keys(store, prefix, after.as_deref(), 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(
        paged,
        expect(&present, prefix, None, usize::MAX),
        "paging by start_after"
    );

    // Delete.
    store
        .delete(&k("a/2"))
        .unwrap_or_else(|e| panic!("delete: {e}"));
    present.retain(|x| *x != k("a/2"));
    assert!(
        matches!(store.head(&k("a/2")), Err(ObjectError::NotFound(_))),
        "head after delete"
    );
    assert!(
        matches!(store.get(&k("a/2"), 0, None), Err(ObjectError::NotFound(_))),
        "get after delete"
    );
    store
        .delete(&k("a/2"))
        .unwrap_or_else(|e| panic!("second delete: {e}"));
    check_lists(&present);

    // Concurrent puts and gets from several threads.
    std::thread::scope(|s| {
        for t in 0..4 {
            let k = &k;
            s.spawn(move || {
                for i in 0..5 {
                    let key = k(&format!("par/{t}/{i}"));
                    let body = Bytes::from(format!("{t}-{i}").into_bytes());
                    store
                        .put(&key, body.clone())
                        .unwrap_or_else(|e| panic!("parallel put {key}: {e}"));
                    assert_eq!(
                        store.get(&key, 0, None).ok(),
                        Some(body),
                        "parallel get {key}"
                    );
                }
            });
        }
    });
    assert_eq!(
        keys(store, &k("par/"), None, 100).len(),
        20,
        "parallel puts listed"
    );

    for o in keys(store, prefix, None, usize::MAX) {
        store
            .delete(&o)
            .unwrap_or_else(|e| panic!("cleanup {o}: {e}"));
    }
    assert!(
        keys(store, prefix, None, 10).is_empty(),
        "empty after cleanup"
    );
}

/// A VFS over an in-memory metadata engine and `store`, formatted with `block_size`, with a
/// session: what unit, property and fault-injection tests drive without FUSE.
pub fn mem_vfs(
    store: std::sync::Arc<dyn ObjectStore>,
    block_size: u32,
    meta: crate::meta::MetaSettings,
    vfs: crate::vfs::VfsSettings,
) -> std::sync::Arc<crate::vfs::Vfs> {
    use std::sync::Arc;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let m = Arc::new(crate::meta::Meta::new(
        Box::new(crate::meta::MemEngine::new()),
        metrics.clone(),
        meta,
    ));
    let fmt = m
        .format(&crate::meta::conformance::mem_format("test", block_size, 0))
        .expect("format");
    m.load().expect("load");
    m.new_session("test").expect("session");
    crate::vfs::Vfs::new(m, store, fmt, metrics, vfs)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// The sum of the samples of a Prometheus endpoint on 127.0.0.1:`port` of the series
/// `prefix` names (e.g. `strata_object_requests_total{op="get"}`): the metric name, and
/// labels that the sample has among others (the process's constant labels such as
/// `volume`).
pub fn metric(port: u16, prefix: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("metrics on 127.0.0.1:{port}: {e}"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("metrics on 127.0.0.1:{port}: {e}"));
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| sample_matches(l, prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Whether the Prometheus text sample `line` is of the series `want` (`name` or
/// `name{k="v",...}`): same metric name, and every label of `want` among its labels.
pub fn sample_matches(line: &str, want: &str) -> bool {
    fn split(s: &str) -> (&str, Vec<&str>) {
        match s.split_once('{') {
            Some((name, rest)) => {
                let labels = rest.rsplit_once('}').map_or(rest, |(l, _)| l);
                let pairs = labels
                    .split("\",")
                    .map(|p| p.trim_end_matches('"'))
                    .filter(|p| !p.is_empty())
                    .collect();
                (name, pairs)
            }
            None => (s.split(' ').next().unwrap_or(s), Vec::new()),
        }
    }
    if line.starts_with('#') {
        return false;
    }
    let (name, have) = split(line);
    let (want_name, want_labels) = split(want);
    name == want_name && want_labels.iter().all(|w| have.contains(w))
}
