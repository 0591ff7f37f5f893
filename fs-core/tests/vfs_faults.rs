//! Fault injection below the VFS: a flaky object store (latency, errors, resets from a seed)
//! behind the retrying layer must not change what reads return; an outage must end in an
//! error (EIO at the FUSE layer), never in silent zeros or lost acknowledged data.

use std::sync::Arc;
use std::time::Duration;

use strata::meta::{Ctx, MetaSettings, ROOT_INO};
use strata::metrics::Metrics;
use strata::object::{FaultSettings, FaultStore, MemStore, ObjectStore, RetrySettings, layered};
use strata::vfs::{Vfs, VfsError, VfsSettings};

fn vfs_over(store: Arc<dyn ObjectStore>) -> Arc<Vfs> {
    let settings = VfsSettings {
        mem_cache_size: 0,
        ..VfsSettings::default()
    };
    strata::testing::mem_vfs(store, 64 << 10, MetaSettings::default(), settings)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn fast_retry() -> RetrySettings {
    RetrySettings {
        max_attempts: 12,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

#[test]
fn flaky_store_is_invisible_to_readers_and_writers() {
    for seed in 0..4 {
        let fault = Arc::new(FaultStore::new(
            MemStore::new(),
            FaultSettings {
                seed,
                max_latency: Duration::from_millis(2),
                error_rate: 0.2,
                reset_rate: 0.1,
            },
        ));
        let store = layered(fault.clone(), Arc::new(Metrics::new()), fast_retry());
        let vfs = vfs_over(store);
        let (n, fh) = vfs.create(Ctx::ROOT, ROOT_INO, b"f", 0o644).unwrap();
        let data = pattern(1 << 20, seed as u8);
        for (i, part) in data.chunks(100_000).enumerate() {
            vfs.write(n.ino, (i * 100_000) as u64, part).unwrap();
        }
        vfs.fsync(n.ino).unwrap();
        let got = vfs.read(n.ino, fh, 0, 2 << 20).unwrap();
        assert!(got == data, "seed {seed}: content differs");
        assert!(fault.injected() > 0, "seed {seed}: no fault was injected");
        vfs.release(n.ino, fh, None).unwrap();
        vfs.shutdown();
    }
}

#[test]
fn outage_gives_errors_not_zeros() {
    let fault = Arc::new(FaultStore::new(MemStore::new(), FaultSettings::default()));
    let store = layered(
        fault.clone(),
        Arc::new(Metrics::new()),
        RetrySettings {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        },
    );
    let vfs = vfs_over(store);
    let (n, fh) = vfs.create(Ctx::ROOT, ROOT_INO, b"f", 0o644).unwrap();
    let data = pattern(300_000, 7);
    vfs.write(n.ino, 0, &data).unwrap();
    vfs.fsync(n.ino).unwrap();

    fault.set_outage(true);
    // Reading data that is not cached fails after the retries.
    match vfs.read(n.ino, fh, 0, 300_000) {
        Err(VfsError::Fetch(_)) => {}
        other => panic!(
            "expected a fetch error during the outage, got {:?}",
            other.map(|v| v.len())
        ),
    }
    // Writing during the outage: write() buffers, fsync reports the failure.
    vfs.write(n.ino, 0, &pattern(200_000, 9)).unwrap();
    assert!(matches!(vfs.fsync(n.ino), Err(VfsError::Flush(_))));

    fault.set_outage(false);
    // The fsync'ed data is intact; the failed write never became visible.
    let got = vfs.read(n.ino, fh, 0, 300_000).unwrap();
    assert!(got == data);
    vfs.release(n.ino, fh, None).unwrap();
    vfs.shutdown();
}
