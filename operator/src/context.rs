//! State shared by the controllers, and the helpers every reconcile uses: reading a
//! Volume's Secret, running file-system calls off the async runtime, patching status by
//! server-side apply, publishing Events.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::Serialize;

use crate::conditions::{self, Outcome};
use crate::crd::SecretRef;
use crate::errors::{Error, Result};
use crate::fsops::{FsOps, FsTarget};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Field manager of every server-side apply of the operator.
pub const FIELD_MANAGER: &str = "strata-operator";

/// A cache member's counters, from its metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberCounters {
    pub hits: u64,
    pub misses: u64,
    /// Bytes in its disk tier (`strata_cache_bytes{tier="disk"}`).
    pub cached_bytes: u64,
}

/// Reads the cache counters of a cache member's metrics endpoint.
pub trait MemberScraper: Send + Sync + 'static {
    /// The counters from `http://addr/metrics`, or None when unreachable.
    fn scrape(&self, addr: &str) -> Option<MemberCounters>;
}

/// Plain HTTP GET with short timeouts.
pub struct HttpScraper;

impl MemberScraper for HttpScraper {
    fn scrape(&self, addr: &str) -> Option<MemberCounters> {
        let sa = addr.to_socket_addrs().ok()?.next()?;
        let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .ok()?;
        let mut body = String::new();
        s.take(8 << 20).read_to_string(&mut body).ok()?;
        parse_cache_counters(&body)
    }
}

/// Sums of `strata_cache_hits_total` and `strata_cache_misses_total` samples (any labels),
/// and the disk tier's `strata_cache_bytes`.
pub fn parse_cache_counters(text: &str) -> Option<MemberCounters> {
    let (mut hits, mut misses, mut bytes, mut seen) = (0f64, 0f64, 0f64, false);
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = name.split('{').next().unwrap_or(name);
        let v: f64 = match value.parse() {
            Ok(v) => v,
            Err(_) => continue,
        };
        match metric {
            "strata_cache_hits_total" => {
                hits += v;
                seen = true;
            }
            "strata_cache_misses_total" => {
                misses += v;
                seen = true;
            }
            "strata_cache_bytes" if name.contains("tier=\"disk\"") => bytes += v,
            _ => {}
        }
    }
    seen.then_some(MemberCounters {
        hits: hits as u64,
        misses: misses as u64,
        cached_bytes: bytes as u64,
    })
}

pub struct Context {
    pub client: Client,
    pub fs: Arc<dyn FsOps>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub scraper: Arc<dyn MemberScraper>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        fs: Arc<dyn FsOps>,
        settings: Settings,
        metrics: Arc<Metrics>,
        scraper: Arc<dyn MemberScraper>,
        instance: Option<String>,
    ) -> Arc<Context> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            fs,
            settings,
            metrics,
            scraper,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Count a failed reconcile of `key`; returns the consecutive failures.
    pub fn record_failure(&self, key: &str) -> u32 {
        let mut f = self.failures.lock();
        let n = f.entry(key.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    pub fn record_success(&self, key: &str) {
        self.failures.lock().remove(key);
    }

    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.settings.resync_secs)
    }

    pub fn retry(&self) -> Duration {
        Duration::from_secs(self.settings.retry_secs)
    }

    /// Publish an Event about `obj`; failures to publish are logged, never fatal.
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!("publishing event {reason}: {e}");
        }
    }

    /// The Volume's Secret as an [`FsTarget`], or the Degraded outcome explaining what is
    /// wrong with it.
    pub async fn read_target(
        &self,
        r: &SecretRef,
    ) -> Result<std::result::Result<FsTarget, Outcome>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let Some(secret) = api.get_opt(&r.name).await? else {
            return Ok(Err(Outcome::degraded(
                "SecretNotFound",
                format!(
                    "Secret {}/{} not found: create it with key metaurl (and access-key, secret-key for S3)",
                    r.namespace, r.name
                ),
            )));
        };
        let get = |k: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
                .or_else(|| {
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .map(|s| s.trim().to_string())
                })
                .filter(|s| !s.is_empty())
        };
        let Some(meta_url) = get("metaurl") else {
            return Ok(Err(Outcome::degraded(
                "SecretInvalid",
                format!(
                    "Secret {}/{} has no key metaurl (the metadata URL, e.g. postgres://user:password@host:5432/db)",
                    r.namespace, r.name
                ),
            )));
        };
        let mut data = std::collections::BTreeMap::new();
        for k in secret
            .data
            .iter()
            .flat_map(|d| d.keys())
            .chain(secret.string_data.iter().flat_map(|d| d.keys()))
        {
            if let Some(v) = get(k) {
                data.insert(k.clone(), v);
            }
        }
        Ok(Ok(FsTarget {
            meta_url,
            access_key: get("access-key"),
            secret_key: get("secret-key"),
            data,
        }))
    }
}

/// Run a blocking file-system call on the blocking pool.
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Server-side apply of `status` to the status subresource of `obj`.
/// One reconcile of `obj` under the operator's finalizer: a span naming the object, the
/// reconcile timer of `kind`, the finalizer dance (`body` gets Apply or Cleanup), errors
/// unwrapped from the finalizer, and the success bookkeeping for the backoff.
pub async fn reconcile_finalized<K, F, Fut>(
    kind: &'static str,
    api: &Api<K>,
    obj: Arc<K>,
    ctx: &Context,
    body: F,
) -> Result<kube::runtime::controller::Action>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnOnce(kube::runtime::finalizer::Event<K>) -> Fut,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action>>,
{
    use tracing::Instrument;
    let key = crate::errors::object_key(&*obj);
    let span = tracing::info_span!("reconcile", object = %key);
    async move {
        let _t = ctx.metrics.reconcile(kind);
        let res = kube::runtime::finalizer::finalizer(api, crate::crd::FINALIZER, obj, body)
            .await
            .map_err(Error::from_finalizer);
        if res.is_ok() {
            ctx.record_success(&key);
        }
        res
    }
    .instrument(span)
    .await
}

/// The conditions a status gets for `outcome`, and an Event when the Ready reason changes
/// (`event_when_ready`: also when it becomes Ready).
pub async fn outcome_conditions<K>(
    ctx: &Context,
    obj: &K,
    old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    outcome: &Outcome,
    event_when_ready: bool,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>
where
    K: Resource<DynamicType = ()>,
{
    let generation = obj.meta().generation;
    if conditions::ready_reason(old) != Some(outcome.reason())
        && (event_when_ready || !outcome.is_ready())
    {
        let warn = matches!(outcome, Outcome::Degraded { .. });
        ctx.event(
            obj,
            warn,
            outcome.reason(),
            "Reconcile",
            outcome.message().into(),
        )
        .await;
    }
    conditions::conditions(old, outcome, generation)
}

pub async fn apply_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_counters_are_summed_over_labels() {
        let text = "# HELP strata_cache_hits Cache hits\n\
            strata_cache_hits_total{tier=\"mem\"} 30\n\
            strata_cache_hits_total{tier=\"disk\"} 60\n\
            strata_cache_misses_total 10\n\
            strata_cache_bytes{tier=\"memory\"} 4096\n\
            strata_cache_bytes{tier=\"disk\"} 8388608\n\
            strata_cache_hits_created 1.7e9\n";
        assert_eq!(
            parse_cache_counters(text),
            Some(MemberCounters {
                hits: 90,
                misses: 10,
                cached_bytes: 8 << 20
            })
        );
        assert_eq!(parse_cache_counters("other_metric 1\n"), None);
    }

    #[test]
    fn scraping_a_closed_port_gives_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert_eq!(HttpScraper.scrape(&addr), None);
    }
}
