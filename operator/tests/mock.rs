//! A scenario verifier over kube-rs's tower-test mock: each expected request (method, path,
//! a check of its body) gets a canned reply; an unexpected or missing request fails.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use strata_operator::context::{Context, MemberCounters, MemberScraper};
use strata_operator::fsops::MemFs;
use strata_operator::metrics::Metrics;
use strata_operator::settings::Settings;

pub type Check = Box<dyn Fn(&Value) + Send>;

pub struct Step {
    pub method: &'static str,
    /// Path, and the query must contain `query` when given.
    pub path: String,
    pub query: Option<&'static str>,
    pub check: Option<Check>,
    pub status: u16,
    /// Reply body; `Value::Null` echoes the request body.
    pub reply: Value,
}

impl Step {
    pub fn new(method: &'static str, path: impl Into<String>, status: u16, reply: Value) -> Step {
        Step {
            method,
            path: path.into(),
            query: None,
            check: None,
            status,
            reply,
        }
    }
    pub fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Step {
        self.check = Some(Box::new(f));
        self
    }
    pub fn query(mut self, q: &'static str) -> Step {
        self.query = Some(q);
        self
    }
    /// A POST of an Event (echoed back), whose reason must be `reason`.
    pub fn event(ns: &str, reason: &'static str) -> Step {
        Step::new(
            "POST",
            format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
            201,
            Value::Null,
        )
        .check(move |b| assert_eq!(b["reason"], reason, "event {b}"))
    }
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

pub struct Fixed(pub Option<(u64, u64)>);

impl MemberScraper for Fixed {
    fn scrape(&self, _addr: &str) -> Option<MemberCounters> {
        self.0.map(|(hits, misses)| MemberCounters {
            hits,
            misses,
            cached_bytes: (hits + misses) << 20,
        })
    }
}

/// A Context on a mock client, and the task that verifies `steps` in order.
pub fn scenario(
    fs: Arc<MemFs>,
    scraper: Fixed,
    steps: Vec<Step>,
) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let ctx = Context::new(
        client,
        fs,
        Settings::default(),
        Arc::new(Metrics::new()),
        Arc::new(scraper),
        Some("test".into()),
    );
    let task = tokio::spawn(async move {
        for (i, step) in steps.into_iter().enumerate() {
            let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("step {i}: no request ({} {})", step.method, step.path))
                .expect("client dropped");
            let (method, uri) = (req.method().to_string(), req.uri().clone());
            assert_eq!(
                (method.as_str(), uri.path()),
                (step.method, step.path.as_str()),
                "step {i}: unexpected request {method} {uri}"
            );
            if let Some(q) = step.query {
                let got = uri.query().unwrap_or("");
                assert!(got.contains(q), "step {i}: query {got:?} lacks {q:?}");
            }
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if let Some(c) = &step.check {
                c(&body);
            }
            let reply = if step.reply.is_null() {
                body
            } else {
                step.reply
            };
            send.send_response(
                Response::builder()
                    .status(step.status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    (ctx, task)
}

/// Finish a scenario: every step was served.
pub async fn done(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("scenario did not finish")
        .expect("scenario failed");
}
