//! Object stores against real backends: a local directory and SeaweedFS (S3).
//!
//! The S3 tests start `weed mini` (see `strata::testing::seaweedfs`); they fail when it is not
//! installed, unless STRATA_SKIP_S3=1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use strata::metrics::Metrics;
use strata::object::{
    FaultSettings, FaultStore, LocalStore, ObjectError, ObjectStore, RetrySettings, RetryStore,
    S3Settings, S3Store, StorageConfig, layered, open_store,
};
use strata::testing::seaweedfs::SeaweedFs;
use strata::testing::{KeyOrder, object_conformance, object_conformance_ordered};

fn fast_retry(max_attempts: u32) -> RetrySettings {
    RetrySettings {
        max_attempts,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(10),
    }
}

#[test]
fn local_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig {
        storage: "file".into(),
        bucket: dir.path().join("objects").display().to_string(),
        access_key: None,
        secret_key: None,
        region: None,
    };
    let store = open_store(&cfg).unwrap();
    object_conformance(store.as_ref(), "vol/");
    object_conformance(&LocalStore::new(dir.path().join("other")), "");
}

#[test]
fn s3_conformance() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let store = S3Store::new(weed.settings("conformance")).unwrap();
    // SeaweedFS lists in directory-tree order (see KeyOrder::PathComponents).
    let conformance =
        |s: &dyn ObjectStore, p: &str| object_conformance_ordered(s, p, KeyOrder::PathComponents);
    conformance(&store, "");
    conformance(&store, "some/dir/");

    // Through a bucket URL with a key prefix: keys land under the prefix.
    let prefixed = open_store(&weed.storage_config("conformance/pre/fix")).unwrap();
    conformance(prefixed.as_ref(), "");
    prefixed.put("k", Bytes::from_static(b"v")).unwrap();
    assert_eq!(store.head("pre/fix/k").unwrap().size, 1);
    assert_eq!(prefixed.list("", None, 10).unwrap()[0].key, "k");
    prefixed.delete("k").unwrap();

    // Uploads with the payload hashed into the signature (`?sign-payload=true`) work too,
    // single-part and multipart.
    let mut signed = weed.settings("conformance");
    signed.sign_payload = true;
    let signed = S3Store::new(signed).unwrap();
    conformance(&signed, "signed/");
    let big = Bytes::from(vec![5u8; 17 << 20]);
    signed.put("signed-big", big.clone()).unwrap();
    assert_eq!(store.get("signed-big", 0, None).unwrap(), big);
    store.delete("signed-big").unwrap();
}

#[test]
fn s3_init_creates_the_bucket() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let store = S3Store::new(weed.settings("created-by-init")).unwrap();
    match store.list("", None, 1) {
        Err(ObjectError::NoBucket(msg)) => assert!(msg.contains("created-by-init"), "{msg}"),
        other => panic!("list before init: {other:?}"),
    }
    match store.put("k", Bytes::from_static(b"v")) {
        Err(ObjectError::NoBucket(_)) => {}
        other => panic!("put before init: {other:?}"),
    }
    store.init().unwrap();
    assert!(store.list("", None, 1).unwrap().is_empty());
    store.init().unwrap(); // already there: fine
}

#[test]
fn s3_wrong_credentials_are_denied() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    S3Store::new(weed.settings("denied"))
        .unwrap()
        .init()
        .unwrap();
    let mut bad = weed.settings("denied");
    bad.secret_key = "wrong-secret-0123456789".into();
    let store = S3Store::new(bad).unwrap();
    for err in [
        store.init().unwrap_err(),
        store.put("k", Bytes::from_static(b"v")).unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(matches!(err, ObjectError::Denied(_)), "{text}");
        assert!(text.contains("check the access key, secret key"), "{text}");
        assert!(
            !text.contains("wrong-secret-0123456789") && !text.contains(weed.secret_key()),
            "{text}"
        );
    }
    let mut bad = weed.settings("denied");
    bad.access_key = "nobody".into();
    let err = S3Store::new(bad).unwrap().head("k").unwrap_err();
    assert!(matches!(err, ObjectError::Denied(_)), "{err}");
}

#[test]
fn s3_multipart_put() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let store = S3Store::new(weed.settings("multipart")).unwrap();
    store.init().unwrap();
    let data: Bytes = (0..(33 << 20) + 123u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    store.put("big", data.clone()).unwrap();
    assert_eq!(store.head("big").unwrap().size, data.len() as u64);
    assert_eq!(store.get("big", 0, None).unwrap(), data);
    let boundary = 16u64 << 20;
    assert_eq!(
        store.get("big", boundary - 10, Some(20)).unwrap(),
        data.slice(boundary as usize - 10..boundary as usize + 10)
    );
    store.delete("big").unwrap();
}

#[test]
fn s3_layered_counts_requests() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let metrics = Arc::new(Metrics::new());
    let raw: Arc<dyn ObjectStore> = Arc::new(S3Store::new(weed.settings("layered")).unwrap());
    let store = layered(raw, metrics.clone(), RetrySettings::default());
    store.init().unwrap();
    store.put("k", Bytes::from_static(b"hello")).unwrap();
    assert_eq!(&store.get("k", 1, Some(3)).unwrap()[..], b"ell");
    assert!(matches!(store.head("nope"), Err(ObjectError::NotFound(_))));
    assert_eq!(metrics.object_request_count("put"), 1);
    assert_eq!(metrics.object_request_count("get"), 1);
    assert_eq!(metrics.object_request_count("head"), 1);
    let text = metrics.encode();
    assert!(
        text.contains("strata_object_bytes_total{direction=\"upload\"} 5"),
        "{text}"
    );
}

#[test]
fn s3_retry_over_faults() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let settings = FaultSettings {
        seed: 42,
        max_latency: Duration::from_millis(2),
        error_rate: 0.2,
        reset_rate: 0.1,
    };
    let fault = Arc::new(FaultStore::new(
        S3Store::new(weed.settings("faulty")).unwrap(),
        settings,
    ));
    let store = RetryStore::new(fault.clone(), fast_retry(20));
    object_conformance_ordered(&store, "f/", KeyOrder::PathComponents);
    assert!(
        fault.injected() > 10,
        "only {} faults injected",
        fault.injected()
    );

    // An outage: the error comes back after exactly the configured attempts, nothing lands.
    let store = RetryStore::new(fault.clone(), fast_retry(5));
    let before = fault.injected();
    fault.set_outage(true);
    let err = store.put("f/outage", Bytes::from_static(b"x")).unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("gave up after 5 attempts"),
        "{err}"
    );
    assert_eq!(fault.injected() - before, 5);
    fault.set_outage(false);
    assert!(matches!(
        fault.inner().head("f/outage"),
        Err(ObjectError::NotFound(_))
    ));
}

#[test]
fn retry_over_faults_local() {
    let dir = tempfile::tempdir().unwrap();
    let settings = FaultSettings {
        seed: 7,
        error_rate: 0.3,
        reset_rate: 0.2,
        ..Default::default()
    };
    let fault = Arc::new(FaultStore::new(LocalStore::new(dir.path()), settings));
    object_conformance(&RetryStore::new(fault.clone(), fast_retry(25)), "x/");
    fault.set_outage(true);
    let err = RetryStore::new(fault.clone(), fast_retry(3))
        .get("x/k", 0, None)
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[test]
fn s3_unreachable_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = S3Store::new(S3Settings::new(
        &format!("http://127.0.0.1:{port}"),
        "nothere",
        "a",
        "SECRETX",
    ))
    .unwrap();
    let start = Instant::now();
    let err = store.get("k", 0, None).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!err.to_string().contains("SECRETX"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn s3_silent_server_times_out() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let mut settings = S3Settings::new(&endpoint, "silent", "a", "b");
    settings.op_timeout = Duration::from_millis(500);
    let store = S3Store::new(settings).unwrap();
    let start = Instant::now();
    let err = store.head("k").unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn s3_usable_from_async_code() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let store = S3Store::new(weed.settings("from-async")).unwrap();
    store.init().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async move {
        store.put("k", Bytes::from_static(b"v")).unwrap();
        assert_eq!(&store.get("k", 0, None).unwrap()[..], b"v");
        store // dropped below, outside; dropping inside must not panic either
    });
    rt.block_on(async move { drop(store) });
}

#[test]
fn virtual_host_bucket_urls() {
    let cfg = |bucket: &str| StorageConfig {
        storage: "s3".into(),
        bucket: bucket.into(),
        access_key: Some("ak".into()),
        secret_key: Some("sk".into()),
        region: None,
    };
    let s = cfg("https://vol1.oss-cn-hangzhou.aliyuncs.com/")
        .s3_settings()
        .unwrap();
    assert_eq!(
        (s.endpoint.as_str(), s.bucket.as_str(), s.path_style),
        ("https://oss-cn-hangzhou.aliyuncs.com", "vol1", false)
    );
    let s = cfg("http://vol1.minio.local:9000?region=eu-2")
        .s3_settings()
        .unwrap();
    assert_eq!(
        (s.endpoint.as_str(), s.region.as_str()),
        ("http://minio.local:9000", "eu-2")
    );
    let s = cfg("http://127.0.0.1:8333/vol1/prefix?path-style=true")
        .s3_settings()
        .unwrap();
    assert_eq!(
        (s.bucket.as_str(), s.prefix.as_str(), s.path_style),
        ("vol1", "prefix/", true)
    );
    let err = cfg("http://127.0.0.1:8333")
        .s3_settings()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--bucket for s3 must be a URL like http://127.0.0.1:8333/mybucket"),
        "{err}"
    );
}
