//! Leader election with a coordination.k8s.io Lease, so two replicas never reconcile at
//! once: the holder renews the Lease every `renew`; another replica takes it over only
//! after `lease_duration` without renewal. Updates use the Lease's resourceVersion, so two
//! candidates racing for an expired Lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client};
use tracing::info;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    s: LeaseSettings,
}

/// Whether a Lease held by someone else has expired at `now`.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let dur = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
    renewed.0 + dur < now
}

impl LeaderElector {
    pub fn new(client: Client, s: LeaseSettings) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &s.namespace),
            s,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.lease_duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Try once to take or renew the Lease; Ok(true) when this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.s.name.clone()),
                    namespace: Some(self.s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let cur = lease.spec.clone().unwrap_or_default();
        let mine = cur.holder_identity.as_deref() == Some(self.s.identity.as_str());
        if !mine && cur.holder_identity.is_some() && !expired(&cur, now) {
            return Ok(false);
        }
        let transitions = cur.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { cur.acquire_time.clone() } else { None };
        lease.spec = Some(self.spec(now, acquired, transitions));
        // replace carries metadata.resourceVersion: a concurrent change gives 409.
        match self
            .api
            .replace(&self.s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.s.identity, "took the leader Lease {}", self.s.name);
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Wait until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            match self.try_acquire().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::time::sleep(self.s.renew).await;
        }
    }

    /// Renew until a renewal fails for longer than the lease duration (then another replica
    /// may lead: return so the process stops reconciling).
    pub async fn keep(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.s.renew).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leader Lease {} taken by another replica", self.s.name);
                    return;
                }
                Err(e) => tracing::warn!("renewing the leader Lease: {e}"),
            }
            if last_ok.elapsed() > self.s.lease_duration {
                tracing::error!(
                    "could not renew the leader Lease for {:?}",
                    self.s.lease_duration
                );
                return;
            }
        }
    }

    /// Give the Lease up on shutdown: delete it if this replica still holds it (the delete
    /// carries the Lease's uid and resourceVersion, so a Lease another replica has taken in
    /// the meantime is left alone). Another replica creates a fresh one at once, and after
    /// the last replica stops nothing is left behind.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.s.name).await? else {
            return Ok(());
        };
        let mine = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.s.identity.as_str());
        if !mine {
            return Ok(());
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lease.metadata.uid.clone(),
                resource_version: lease.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        match self.api.delete(&self.s.name, &dp).await {
            Ok(_) => {
                info!("released the leader Lease {} (deleted)", self.s.name);
                Ok(())
            }
            // Gone already, or changed hands since the read.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Wait until no pod of `namespace` matches `selector` (the controller pods, whose sidecars
/// would re-create a deleted Lease while they still run), at most `timeout`. Returns whether
/// they are gone.
pub async fn wait_for_no_pods(
    client: Client,
    namespace: &str,
    selector: &str,
    timeout: Duration,
) -> Result<bool, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = api
            .list(&ListParams::default().labels(selector))
            .await?
            .items
            .len();
        if left == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("{left} pods ({selector}) still in {namespace} after {timeout:?}");
            return Ok(false);
        }
        info!("waiting for {left} pods ({selector}) in {namespace} to stop");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Delete the named Leases of `namespace` (the chart's post-delete hook runs this through
/// `strata-operator cleanup-leases`: the leader-election Leases of csi-provisioner,
/// csi-resizer and the operator outlive `helm uninstall` otherwise). Missing Leases are fine;
/// every name is tried, and the first error (if any) is returned at the end. Returns the
/// names that were deleted.
pub async fn delete_leases(
    client: Client,
    namespace: &str,
    names: &[String],
) -> Result<Vec<String>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let mut deleted = vec![];
    let mut first_err = None;
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                info!("deleted Lease {namespace}/{name}");
                deleted.push(name.clone());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                info!("Lease {namespace}/{name} does not exist");
            }
            Err(e) => {
                tracing::error!("deleting Lease {namespace}/{name}: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(deleted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_follows_renew_time_and_duration() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(1000))),
            ..Default::default()
        };
        assert!(!expired(&spec, t(1010)));
        assert!(expired(&spec, t(1016)));
        assert!(expired(&LeaseSpec::default(), t(0)));
    }
}
