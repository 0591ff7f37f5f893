//! What the server sends: the response body type (whole, or streamed from a blocking
//! producer) and the access log, written once per request when its answer has been sent
//! completely (or the client went away), with the per-operation metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// One request's entry of the access log. Holds no secret: no header, no query.
pub struct AccessLog {
    pub id: String,
    pub remote: String,
    pub op: &'static str,
    pub bucket: String,
    pub key: String,
    pub status: u16,
    /// The S3 error code, when the answer is an error.
    pub error: Option<&'static str>,
    pub bytes_in: u64,
    pub start: Instant,
    pub metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Write the line and count the request. `complete`: the whole answer was sent.
    pub fn finish(self, bytes_out: u64, complete: bool) {
        let elapsed = self.start.elapsed();
        self.metrics
            .gateway_request(self.op, self.status, elapsed, self.bytes_in, bytes_out);
        let ms = elapsed.as_secs_f64() * 1000.0;
        let error = self.error.unwrap_or("");
        if self.status >= 500 {
            tracing::warn!(target: "strata::gateway::access", request = %self.id, remote = %self.remote,
                op = self.op, bucket = %self.bucket, key = %self.key, status = self.status, error,
                bytes_in = self.bytes_in, bytes_out, ms = format!("{ms:.1}"), complete, "s3 request");
        } else {
            tracing::info!(target: "strata::gateway::access", request = %self.id, remote = %self.remote,
                op = self.op, bucket = %self.bucket, key = %self.key, status = self.status, error,
                bytes_in = self.bytes_in, bytes_out, ms = format!("{ms:.1}"), complete, "s3 request");
        }
    }
}

enum Kind {
    Full(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<std::io::Result<Bytes>>,
        /// Exact length when known (Content-Length framing).
        len: Option<u64>,
    },
}

/// A response body: a whole buffer, or pieces sent by a producer through a channel. The
/// access log entry goes with it and is finished when the body ends or is dropped.
pub struct Body {
    kind: Kind,
    log: Option<AccessLog>,
    sent: u64,
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body {
            kind: Kind::Full(Some(b.into())),
            log: None,
            sent: 0,
        }
    }

    pub fn empty() -> Body {
        Body::full(Bytes::new())
    }

    /// A body fed through a channel; `len`: its exact length, if known.
    pub fn channel(len: Option<u64>) -> (mpsc::Sender<std::io::Result<Bytes>>, Body) {
        let (tx, rx) = mpsc::channel(1);
        (
            tx,
            Body {
                kind: Kind::Stream { rx, len },
                log: None,
                sent: 0,
            },
        )
    }

    pub fn with_log(mut self, log: AccessLog) -> Body {
        self.log = Some(log);
        self
    }

    fn end(&mut self, complete: bool) {
        if let Some(log) = self.log.take() {
            log.finish(self.sent, complete);
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let complete = match &self.kind {
            Kind::Full(b) => b.is_none() || b.as_ref().is_some_and(|b| b.is_empty()),
            Kind::Stream { len, .. } => len.is_some_and(|l| l == self.sent),
        };
        self.end(complete);
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(Ok)),
            Kind::Stream { rx, .. } => rx.poll_recv(cx),
        };
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                this.sent += b.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                let complete = match &this.kind {
                    Kind::Stream { len: Some(l), .. } => *l == this.sent,
                    _ => true,
                };
                this.end(complete);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Stream { len, .. } => *len == Some(self.sent),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { len: Some(l), .. } => SizeHint::with_exact(l - self.sent),
            Kind::Stream { len: None, .. } => SizeHint::default(),
        }
    }
}
