//! The operator's error type and the one place errors turn into a requeue with backoff.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::finalizer;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::fsops::FsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("file system: {0}")]
    Fs(#[from] FsError),
    #[error("{0}")]
    Invalid(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("blocking task failed: {0}")]
    Task(String),
}

impl Error {
    /// Unwrap the error of a finalizer run into ours.
    pub fn from_finalizer(e: finalizer::Error<Error>) -> Error {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => {
                Error::Kube(e)
            }
            e => Error::Finalizer(e.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Backoff after `failures` consecutive failed reconciles of one object: 5 s doubling up to
/// 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

/// `error_policy` of every controller: count the failure, log it, requeue with backoff.
pub fn error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).to_string();
    let key = object_key(&*obj);
    let n = ctx.record_failure(&key);
    let delay = backoff(n);
    ctx.metrics.reconcile_failed(&kind);
    tracing::warn!(kind = %kind, object = %key, failures = n, retry_in = ?delay, "reconcile failed: {err}");
    Action::requeue(delay)
}

/// `Kind/namespace/name` of an object, for logs and the failure counter.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{}/{}/{}", K::kind(&()), ns, obj.name_any()),
        None => format!("{}/{}", K::kind(&()), obj.name_any()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(100), Duration::from_secs(300));
    }
}
