//! Request handling: routing a request to its S3 operation, authentication, running the
//! operation on the blocking pool ([`Objects`]), and the answer (XML, headers, streamed object
//! bodies). Errors become S3 error documents only in [`Gateway::handle`], through
//! [`S3Error`]'s mapping.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::metrics::Metrics;

use super::GatewaySettings;
use super::body::{BodyPlan, BodyReader};
use super::dates::{http_date, iso8601, parse_http_date};
use super::error::{Result, S3Error};
use super::list::{Item, Query};
use super::objects::{Completion, ObjectInfo, Objects, StoredMeta};
use super::sigv4::{self, Credentials, SignedRequest, parse_query, percent_decode, uri_encode};
use super::wire::{AccessLog, Body};
use super::xml::{self, Writer};

/// The S3 operations the gateway answers (and `Unsupported` for the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ListBuckets,
    HeadBucket,
    GetBucketLocation,
    GetBucketVersioning,
    ListObjectsV2,
    ListObjects,
    CreateBucket,
    DeleteBucket,
    DeleteObjects,
    GetObject,
    HeadObject,
    PutObject,
    CopyObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    DeleteObject,
    /// A sub-resource or method the gateway does not implement (named in the error).
    Unsupported(&'static str),
}

impl Op {
    /// The S3 name (the `op` label of the metrics and the access log).
    pub fn name(self) -> &'static str {
        match self {
            Op::ListBuckets => "ListBuckets",
            Op::HeadBucket => "HeadBucket",
            Op::GetBucketLocation => "GetBucketLocation",
            Op::GetBucketVersioning => "GetBucketVersioning",
            Op::ListObjectsV2 => "ListObjectsV2",
            Op::ListObjects => "ListObjects",
            Op::CreateBucket => "CreateBucket",
            Op::DeleteBucket => "DeleteBucket",
            Op::DeleteObjects => "DeleteObjects",
            Op::GetObject => "GetObject",
            Op::HeadObject => "HeadObject",
            Op::PutObject => "PutObject",
            Op::CopyObject => "CopyObject",
            Op::CreateMultipartUpload => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::UploadPartCopy => "UploadPartCopy",
            Op::CompleteMultipartUpload => "CompleteMultipartUpload",
            Op::AbortMultipartUpload => "AbortMultipartUpload",
            Op::ListParts => "ListParts",
            Op::DeleteObject => "DeleteObject",
            Op::Unsupported(_) => "Unsupported",
        }
    }
}

/// Query parameters of a request, decoded.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The first parameter that is one of `names`.
    fn any_of(&self, names: &[&'static str]) -> Option<&'static str> {
        names.iter().copied().find(|n| self.has(n))
    }
}

const BUCKET_SUBRESOURCES: &[&str] = &[
    "acl",
    "policy",
    "policyStatus",
    "cors",
    "lifecycle",
    "tagging",
    "encryption",
    "website",
    "logging",
    "notification",
    "replication",
    "requestPayment",
    "object-lock",
    "ownershipControls",
    "publicAccessBlock",
    "accelerate",
    "analytics",
    "inventory",
    "metrics",
    "intelligent-tiering",
    "uploads",
    "versions",
];
const OBJECT_SUBRESOURCES: &[&str] = &[
    "acl",
    "tagging",
    "retention",
    "legal-hold",
    "torrent",
    "attributes",
    "restore",
    "select",
];

/// The S3 operation of a request.
pub fn route(method: &Method, bucket: bool, key: bool, q: &Params, copy_source: bool) -> Op {
    match (bucket, key) {
        (false, _) if *method == Method::GET => Op::ListBuckets,
        (false, _) => Op::Unsupported("this method on the service"),
        (true, false) => match *method {
            Method::GET => {
                if q.has("location") {
                    Op::GetBucketLocation
                } else if q.has("versioning") {
                    Op::GetBucketVersioning
                } else if let Some(s) = q.any_of(BUCKET_SUBRESOURCES) {
                    Op::Unsupported(s)
                } else if q.get("list-type") == Some("2") {
                    Op::ListObjectsV2
                } else {
                    Op::ListObjects
                }
            }
            Method::HEAD => Op::HeadBucket,
            Method::PUT => match q.any_of(BUCKET_SUBRESOURCES) {
                Some(s) => Op::Unsupported(s),
                None if q.has("versioning") => Op::Unsupported("versioning"),
                None => Op::CreateBucket,
            },
            Method::DELETE => match q.any_of(BUCKET_SUBRESOURCES) {
                Some(s) => Op::Unsupported(s),
                None => Op::DeleteBucket,
            },
            Method::POST if q.has("delete") => Op::DeleteObjects,
            _ => Op::Unsupported("this method on a bucket"),
        },
        (true, true) => match *method {
            Method::GET if q.has("uploadId") => Op::ListParts,
            Method::GET | Method::HEAD => match q.any_of(OBJECT_SUBRESOURCES) {
                Some(s) => Op::Unsupported(s),
                None if *method == Method::GET => Op::GetObject,
                None => Op::HeadObject,
            },
            Method::PUT if q.has("partNumber") && q.has("uploadId") => {
                if copy_source {
                    Op::UploadPartCopy
                } else {
                    Op::UploadPart
                }
            }
            Method::PUT => match q.any_of(OBJECT_SUBRESOURCES) {
                Some(s) => Op::Unsupported(s),
                None if copy_source => Op::CopyObject,
                None => Op::PutObject,
            },
            Method::POST if q.has("uploads") => Op::CreateMultipartUpload,
            Method::POST if q.has("uploadId") => Op::CompleteMultipartUpload,
            Method::POST => Op::Unsupported(
                q.any_of(OBJECT_SUBRESOURCES)
                    .unwrap_or("POST object (browser form uploads)"),
            ),
            Method::DELETE if q.has("uploadId") => Op::AbortMultipartUpload,
            Method::DELETE => match q.any_of(OBJECT_SUBRESOURCES) {
                Some(s) => Op::Unsupported(s),
                None => Op::DeleteObject,
            },
            _ => Op::Unsupported("this method on an object"),
        },
    }
}

/// An answer before it becomes an HTTP response.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
    bytes_in: u64,
    /// An error sent inside a 200 answer (long operations).
    error: Option<&'static str>,
}

impl Reply {
    fn new(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: Body::empty(),
            bytes_in: 0,
            error: None,
        }
    }

    fn xml(doc: String) -> Reply {
        let mut r = Reply::new(StatusCode::OK);
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        r.body = Body::full(doc);
        r
    }

    fn header(mut self, name: HeaderName, value: &str) -> Reply {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Run blocking file-system work on tokio's blocking pool, inside the request's span.
async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _e = span.enter();
        f()
    })
    .await
    .map_err(|e| S3Error::Internal(format!("request task failed: {e}")))?
}

/// A request body as an iterator for the blocking side: pieces arrive from a task reading
/// the connection, so the transfer and the file-system writes overlap.
struct BodyPieces {
    rx: mpsc::Receiver<Result<Bytes>>,
}

impl Iterator for BodyPieces {
    type Item = Result<Bytes>;
    fn next(&mut self) -> Option<Result<Bytes>> {
        self.rx.blocking_recv()
    }
}

fn pump(mut body: Incoming) -> BodyPieces {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(
        async move {
            loop {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data()
                            && tx.send(Ok(d)).await.is_err()
                        {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(S3Error::IncompleteBody(format!(
                                "reading the body: {e}"
                            ))))
                            .await;
                        break;
                    }
                    None => break,
                }
            }
        }
        .in_current_span(),
    );
    BodyPieces { rx }
}

/// A small body (an XML document) read whole, through its checks.
async fn read_small(mut body: Incoming, plan: BodyPlan, limit: usize) -> Result<Vec<u8>> {
    let mut reader = BodyReader::new(plan);
    let mut out = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| S3Error::IncompleteBody(format!("reading the body: {e}")))?;
        if let Ok(d) = frame.into_data() {
            total += d.len();
            if total > limit {
                return Err(S3Error::InvalidRequest(format!(
                    "the request body is larger than {limit} bytes"
                )));
            }
            reader.feed(d, &mut out)?;
        }
    }
    reader.finish()?;
    Ok(out.concat())
}

/// The first byte and the end (exclusive) of a `Range` header on an object of `size` bytes;
/// `None`: the whole object (no header, not `bytes=`, several ranges, or invalid syntax).
pub fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let Some(n) = num(b) else { return Ok(None) };
            if n == 0 || size == 0 {
                return Err(S3Error::InvalidRange(size));
            }
            Ok(Some((size.saturating_sub(n), size)))
        }
        (false, _) => {
            let Some(start) = num(a) else { return Ok(None) };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return Ok(None),
                }
            };
            if start >= size {
                return Err(S3Error::InvalidRange(size));
            }
            Ok(Some((start, end.saturating_add(1).min(size))))
        }
        (true, true) => Ok(None),
    }
}

/// The conditional headers of a GET or HEAD against an object (RFC 9110 order).
fn check_conditions(headers: &HeaderMap, info: &ObjectInfo) -> Result<()> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let matches = |list: &str| {
        list.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t.trim_matches('"') == info.etag.trim_matches('"'))
    };
    let mtime = info.mtime.div_euclid(1_000_000_000);
    if let Some(m) = h("if-match") {
        if !matches(m) {
            return Err(S3Error::PreconditionFailed);
        }
    } else if let Some(t) = h("if-unmodified-since").and_then(parse_http_date)
        && mtime > t
    {
        return Err(S3Error::PreconditionFailed);
    }
    if let Some(m) = h("if-none-match") {
        if matches(m) {
            return Err(S3Error::NotModified);
        }
    } else if let Some(t) = h("if-modified-since").and_then(parse_http_date)
        && mtime <= t
    {
        return Err(S3Error::NotModified);
    }
    Ok(())
}

/// GET/HEAD headers of an object: stored content headers and user metadata, ETag, dates;
/// `response-*` query parameters (presigned URLs) override the content headers.
fn object_headers(info: &ObjectInfo, q: &Params) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.insert(n, v);
        }
    };
    put("content-type", "binary/octet-stream");
    for (k, v) in &info.meta.0 {
        put(k, v);
    }
    for (param, name) in [
        ("response-content-type", "content-type"),
        ("response-content-language", "content-language"),
        ("response-expires", "expires"),
        ("response-cache-control", "cache-control"),
        ("response-content-disposition", "content-disposition"),
        ("response-content-encoding", "content-encoding"),
    ] {
        if let Some(v) = q.get(param) {
            put(name, v);
        }
    }
    put("etag", &info.etag);
    put("last-modified", &http_date(info.mtime));
    put("accept-ranges", "bytes");
    h
}

fn owner(w: &mut Writer) {
    w.open("Owner");
    w.elem("ID", "strata");
    w.elem("DisplayName", "strata");
    w.close("Owner");
}

/// The gateway: one bucket (the volume, or a directory of it) behind one key pair.
pub struct Gateway {
    pub objects: Arc<Objects>,
    pub bucket: String,
    pub creds: Credentials,
    pub metrics: Arc<Metrics>,
    pub settings: GatewaySettings,
    next_id: AtomicU64,
    id_base: u64,
}

impl Gateway {
    pub fn new(
        objects: Arc<Objects>,
        bucket: String,
        creds: Credentials,
        metrics: Arc<Metrics>,
        settings: GatewaySettings,
    ) -> Gateway {
        Gateway {
            objects,
            bucket,
            creds,
            metrics,
            settings,
            next_id: AtomicU64::new(1),
            id_base: rand::random::<u32>() as u64,
        }
    }

    fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:08X}{:08X}", self.id_base, n)
    }

    /// Whether the Host header names the bucket (`bucket.anything`: virtual-host style).
    fn virtual_host(&self, headers: &HeaderMap) -> bool {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        host.starts_with(&format!("{}.", self.bucket))
    }

    /// Bucket and key of a request: path style (`/bucket/key`), or virtual-host style when
    /// the Host header starts with `bucket.`.
    fn target(
        &self,
        headers: &HeaderMap,
        raw_path: &str,
    ) -> Result<(Option<String>, Option<String>)> {
        let path = String::from_utf8(percent_decode(raw_path))
            .map_err(|_| S3Error::InvalidArgument("the key is not UTF-8".into()))?;
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if self.virtual_host(headers) {
            return Ok((
                Some(self.bucket.clone()),
                nonempty(path.strip_prefix('/').unwrap_or(&path)),
            ));
        }
        let rest = path.strip_prefix('/').unwrap_or(&path);
        match rest.split_once('/') {
            Some((b, k)) => Ok((nonempty(b), nonempty(k))),
            None => Ok((nonempty(rest), None)),
        }
    }

    /// Answer one request; errors become S3 error documents here and only here.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> std::result::Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let id = self.request_id();
        let (parts, body) = req.into_parts();
        let raw_path = parts.uri.path().to_string();
        let raw_query = parts.uri.query().unwrap_or("").to_string();
        let q = Params(parse_query(&raw_query));
        let target = self.target(&parts.headers, &raw_path);
        let (bucket, key) = target.as_ref().cloned().unwrap_or((None, None));
        let copy_source = parts.headers.contains_key("x-amz-copy-source");
        let op = route(
            &parts.method,
            bucket.is_some(),
            key.is_some(),
            &q,
            copy_source,
        );
        let span = tracing::info_span!("s3", request = %id, op = op.name());
        let head = parts.method == Method::HEAD;
        let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
            || parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim() != "0");
        let expect_continue = parts
            .headers
            .get(header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        let res = match target {
            Err(e) => Err(e),
            Ok(_) => {
                self.clone()
                    .dispatch(
                        op,
                        &parts,
                        &raw_path,
                        &raw_query,
                        &q,
                        bucket.clone(),
                        key.clone(),
                        body,
                    )
                    .instrument(span.clone())
                    .await
            }
        };
        let mut log = AccessLog {
            id: id.clone(),
            remote: remote.to_string(),
            op: op.name(),
            bucket: bucket.unwrap_or_default(),
            key: key.unwrap_or_default(),
            status: 200,
            error: None,
            bytes_in: 0,
            start,
            metrics: self.metrics.clone(),
        };
        let mut reply = match res {
            Ok(r) => r,
            Err(e) => {
                let _g = span.enter();
                if e.is_server_error() {
                    tracing::error!(error = %e, "request failed");
                } else {
                    tracing::debug!(error = %e, "request refused");
                }
                let mut r = Reply::new(e.status());
                r.error = Some(e.code());
                if let S3Error::InvalidRange(size) = e {
                    r = r.header(header::CONTENT_RANGE, &format!("bytes */{size}"));
                }
                if !head && e.status() != StatusCode::NOT_MODIFIED {
                    r.headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/xml"),
                    );
                    r.body = Body::full(e.to_xml(&raw_path, &id));
                }
                r
            }
        };
        log.status = reply.status.as_u16();
        log.error = reply.error;
        log.bytes_in = reply.bytes_in;
        let mut resp =
            Response::new(std::mem::replace(&mut reply.body, Body::empty()).with_log(log));
        *resp.status_mut() = reply.status;
        *resp.headers_mut() = std::mem::take(&mut reply.headers);
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-amz-request-id", v);
        }
        // An error may come before (or instead of) reading the request body: whatever is
        // left of it must not be taken for the next request of the connection.
        // A final answer to `Expect: 100-continue` that comes without a 100 Continue (hyper
        // sends none for an empty body; an error comes before the body is read) leaves
        // botocore's connection expecting that status line again for its next request (it
        // then takes the next answer's status line for a header and waits for the
        // connection to close: "'ETag'" errors after a minute). Closing the connection
        // resets it.
        let early_answer = expect_continue && (!has_body || !reply.status.is_success());
        if early_answer || (has_body && !reply.status.is_success()) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp.headers_mut()
            .insert(header::SERVER, HeaderValue::from_static("Strata"));
        Ok(resp)
    }

    #[allow(clippy::too_many_arguments)]
    async fn dispatch(
        self: Arc<Self>,
        op: Op,
        parts: &http::request::Parts,
        raw_path: &str,
        raw_query: &str,
        q: &Params,
        bucket: Option<String>,
        key: Option<String>,
        body: Incoming,
    ) -> Result<Reply> {
        let mut verified = sigv4::verify(
            &SignedRequest {
                method: parts.method.as_str(),
                raw_path,
                raw_query,
                headers: &parts.headers,
                virtual_bucket: self
                    .virtual_host(&parts.headers)
                    .then_some(self.bucket.as_str()),
            },
            &self.creds,
            now_secs(),
        )?;
        if let Op::Unsupported(what) = op {
            return Err(S3Error::NotImplemented(what.to_string()));
        }
        if let Some(b) = &bucket
            && *b != self.bucket
        {
            return Err(S3Error::NoSuchBucket);
        }
        let key = key.unwrap_or_default();
        let h = &parts.headers;
        match op {
            Op::ListBuckets => self.list_buckets().await,
            Op::HeadBucket => Ok(Reply::new(StatusCode::OK)
                .header(HeaderName::from_static("x-amz-bucket-region"), "us-east-1")),
            Op::GetBucketLocation => {
                let mut w = Writer::new();
                w.open("LocationConstraint");
                w.close("LocationConstraint");
                Ok(Reply::xml(w.finish()))
            }
            Op::GetBucketVersioning => {
                let mut w = Writer::new();
                w.open("VersioningConfiguration");
                w.close("VersioningConfiguration");
                Ok(Reply::xml(w.finish()))
            }
            Op::CreateBucket => Err(S3Error::BucketAlreadyOwnedByYou),
            Op::DeleteBucket => Err(S3Error::AccessDenied(
                "the gateway's bucket is a Strata volume: it cannot be deleted through S3".into(),
            )),
            Op::ListObjectsV2 => self.list_objects(q, true).await,
            Op::ListObjects => self.list_objects(q, false).await,
            Op::GetObject | Op::HeadObject => {
                self.get_object(key, h, q, op == Op::HeadObject).await
            }
            Op::PutObject => {
                let create_only = create_only(h)?;
                let plan = BodyPlan::new(h, &mut verified)?;
                let meta = StoredMeta::from_headers(h);
                let objects = self.objects.clone();
                let k = key.clone();
                blocking(move || objects.check_put(&k, create_only)).await?;
                let pieces = pump(body);
                let objects = self.objects.clone();
                let info =
                    blocking(move || objects.put(&key, pieces, plan, &meta, create_only)).await?;
                let mut r = Reply::new(StatusCode::OK).header(header::ETAG, &info.etag);
                r.bytes_in = info.size;
                Ok(r)
            }
            Op::CopyObject => self.copy_object(key, h).await,
            Op::DeleteObject => {
                let objects = self.objects.clone();
                blocking(move || objects.delete(&key)).await?;
                Ok(Reply::new(StatusCode::NO_CONTENT))
            }
            Op::DeleteObjects => {
                let plan = BodyPlan::new(h, &mut verified)?;
                let doc = read_small(body, plan, 4 << 20).await?;
                self.delete_objects(&doc).await
            }
            Op::CreateMultipartUpload => {
                let meta = StoredMeta::from_headers(h);
                let objects = self.objects.clone();
                let k = key.clone();
                let id = blocking(move || objects.create_upload(&k, meta)).await?;
                let mut w = Writer::new();
                w.open("InitiateMultipartUploadResult");
                w.elem("Bucket", &self.bucket);
                w.elem("Key", &key);
                w.elem("UploadId", &id);
                w.close("InitiateMultipartUploadResult");
                Ok(Reply::xml(w.finish()))
            }
            Op::UploadPart => {
                let (id, n) = upload_params(q)?;
                let plan = BodyPlan::new(h, &mut verified)?;
                let objects = self.objects.clone();
                let (i, k) = (id.clone(), key.clone());
                blocking(move || objects.check_upload(&i, &k)).await?;
                let pieces = pump(body);
                let objects = self.objects.clone();
                let (etag, size) =
                    blocking(move || objects.upload_part(&id, &key, n, pieces, plan)).await?;
                let mut r = Reply::new(StatusCode::OK).header(header::ETAG, &etag);
                r.bytes_in = size;
                Ok(r)
            }
            Op::UploadPartCopy => self.upload_part_copy(key, h, q).await,
            Op::CompleteMultipartUpload => {
                let id = q.get("uploadId").unwrap_or("").to_string();
                let plan = BodyPlan::new(h, &mut verified)?;
                let doc = read_small(body, plan, 16 << 20).await?;
                self.complete(id, key, &doc, h).await
            }
            Op::AbortMultipartUpload => {
                let id = q.get("uploadId").unwrap_or("").to_string();
                let objects = self.objects.clone();
                blocking(move || objects.abort_upload(&id, &key)).await?;
                Ok(Reply::new(StatusCode::NO_CONTENT))
            }
            Op::ListParts => self.list_parts(key, q).await,
            Op::Unsupported(_) => unreachable!("answered above"),
        }
    }

    async fn list_buckets(&self) -> Result<Reply> {
        let objects = self.objects.clone();
        let created = blocking(move || objects.root_created()).await?;
        let mut w = Writer::new();
        w.open("ListAllMyBucketsResult");
        owner(&mut w);
        w.open("Buckets");
        w.open("Bucket");
        w.elem("Name", &self.bucket);
        w.elem("CreationDate", &iso8601(created));
        w.close("Bucket");
        w.close("Buckets");
        w.close("ListAllMyBucketsResult");
        Ok(Reply::xml(w.finish()))
    }

    async fn list_objects(&self, q: &Params, v2: bool) -> Result<Reply> {
        let url = match q.get("encoding-type") {
            None => false,
            Some("url") => true,
            Some(other) => {
                return Err(S3Error::InvalidArgument(format!(
                    "encoding-type {other:?}: only url is supported"
                )));
            }
        };
        let max = match q.get("max-keys") {
            None => self.settings.max_keys,
            Some(m) => m
                .parse::<usize>()
                .map_err(|_| S3Error::InvalidArgument(format!("max-keys {m:?}")))?
                .min(self.settings.max_keys),
        };
        let prefix = q.get("prefix").unwrap_or("").to_string();
        let delimiter = q
            .get("delimiter")
            .filter(|d| !d.is_empty())
            .map(String::from);
        let token = match q.get("continuation-token").filter(|_| v2) {
            Some(t) => Some(
                B64.decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        S3Error::InvalidArgument("the continuation token is not valid".into())
                    })?,
            ),
            None => None,
        };
        let start_after = if v2 {
            q.get("start-after")
        } else {
            q.get("marker")
        }
        .filter(|s| !s.is_empty())
        .map(String::from);
        // A continuation token wins over start-after (it is always past it).
        let after = token.clone().or(start_after.clone());
        let objects = self.objects.clone();
        let (p, d, a) = (prefix.clone(), delimiter.clone(), after.clone());
        let (page, infos) = blocking(move || {
            let page = objects.list(Query {
                prefix: &p,
                delimiter: d.as_deref(),
                after: a.as_deref(),
                max,
            })?;
            let mut infos = Vec::new();
            for item in &page.items {
                if let Item::Object { id, .. } = item {
                    match objects.info(*id) {
                        Ok(i) => infos.push(Some(i)),
                        // Deleted since it was listed.
                        Err(S3Error::Vfs(crate::vfs::VfsError::Meta(
                            crate::meta::MetaError::NotFound,
                        ))) => infos.push(None),
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok((page, infos))
        })
        .await?;
        let enc = |s: &str| {
            if url {
                uri_encode(s.as_bytes(), true)
            } else {
                s.to_string()
            }
        };
        let mut w = Writer::new();
        w.open("ListBucketResult");
        w.elem("Name", &self.bucket);
        w.elem("Prefix", &enc(&prefix));
        if v2 {
            if let Some(t) = q.get("continuation-token") {
                w.elem("ContinuationToken", t);
            }
            if let Some(s) = &start_after {
                w.elem("StartAfter", &enc(s));
            }
        } else {
            w.elem("Marker", &enc(start_after.as_deref().unwrap_or("")));
        }
        let count = page.items.len();
        if v2 {
            w.elem("KeyCount", &count.to_string());
        }
        w.elem("MaxKeys", &max.to_string());
        if let Some(d) = &delimiter {
            w.elem("Delimiter", &enc(d));
        }
        w.elem("IsTruncated", if page.truncated { "true" } else { "false" });
        if page.truncated
            && let Some(last) = page.items.last()
        {
            if v2 {
                w.elem("NextContinuationToken", &B64.encode(last.name()));
            } else {
                w.elem("NextMarker", &enc(last.name()));
            }
        }
        if url {
            w.elem("EncodingType", "url");
        }
        let fetch_owner = !v2 || q.get("fetch-owner") == Some("true");
        let mut infos = infos.into_iter();
        for item in &page.items {
            if let Item::Object { key, .. } = item {
                let Some(info) = infos.next().flatten() else {
                    continue;
                };
                w.open("Contents");
                w.elem("Key", &enc(key));
                w.elem("LastModified", &iso8601(info.mtime));
                w.elem("ETag", &info.etag);
                w.elem("Size", &info.size.to_string());
                if fetch_owner {
                    owner(&mut w);
                }
                w.elem("StorageClass", "STANDARD");
                w.close("Contents");
            }
        }
        for item in &page.items {
            if let Item::Prefix(p) = item {
                w.open("CommonPrefixes");
                w.elem("Prefix", &enc(p));
                w.close("CommonPrefixes");
            }
        }
        w.close("ListBucketResult");
        Ok(Reply::xml(w.finish()))
    }

    async fn get_object(
        &self,
        key: String,
        h: &HeaderMap,
        q: &Params,
        head: bool,
    ) -> Result<Reply> {
        let objects = self.objects.clone();
        let headers = h.clone();
        // Open, check conditions and the range in one go; a handle is only kept for a GET
        // with bytes to send.
        let (info, fh, range) = blocking(move || {
            let (info, fh) = if head {
                (objects.head(&key)?, None)
            } else {
                objects.open(&key)?
            };
            let decided = check_conditions(&headers, &info).and_then(|_| {
                parse_range(
                    headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
                    info.size,
                )
            });
            let keep = match &decided {
                Ok(r) => !head && r.map_or(info.size, |(a, b)| b - a) > 0,
                Err(_) => false,
            };
            let fh = match (fh, keep) {
                (Some(fh), true) => Some(fh),
                (Some(fh), false) => {
                    objects.close(info.ino, fh);
                    None
                }
                (None, _) => None,
            };
            Ok((info, fh, decided?))
        })
        .await?;
        let mut r = Reply::new(StatusCode::OK);
        r.headers = object_headers(&info, q);
        let (start, end) = range.unwrap_or((0, info.size));
        if let Some((a, b)) = range {
            r.status = StatusCode::PARTIAL_CONTENT;
            r = r.header(
                header::CONTENT_RANGE,
                &format!("bytes {a}-{}/{}", b - 1, info.size),
            );
        }
        let len = end - start;
        r = r.header(header::CONTENT_LENGTH, &len.to_string());
        let Some(fh) = fh else {
            return Ok(r);
        };
        let (tx, body) = Body::channel(Some(len));
        r.body = body;
        let objects = self.objects.clone();
        let span = tracing::Span::current();
        let ino = info.ino;
        tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let mut off = start;
            while off < end {
                let n = (super::objects::IO_SIZE - off % super::objects::IO_SIZE).min(end - off);
                match objects.read(ino, fh, off, n) {
                    Ok(b) if !b.is_empty() => {
                        off += b.len() as u64;
                        if tx.blocking_send(Ok(b)).is_err() {
                            // The client went away.
                            break;
                        }
                    }
                    Ok(_) => {
                        tracing::warn!(
                            offset = off,
                            "the object ended before its length (changed while read)"
                        );
                        let _ = tx.blocking_send(Err(std::io::Error::other(
                            "object shorter than its length",
                        )));
                        break;
                    }
                    Err(e) => {
                        tracing::error!(offset = off, error = %e, "reading the object failed");
                        let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                        break;
                    }
                }
            }
            objects.close(ino, fh);
        });
        Ok(r)
    }

    /// `x-amz-copy-source`: the key in this bucket (a version other than `null` is refused).
    fn copy_source(&self, h: &HeaderMap) -> Result<String> {
        let raw = h
            .get("x-amz-copy-source")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| S3Error::InvalidArgument("x-amz-copy-source is not valid".into()))?;
        let (path, version) = match raw.split_once("?versionId=") {
            Some((p, v)) => (p, Some(v)),
            None => (raw, None),
        };
        if version.is_some_and(|v| v != "null") {
            return Err(S3Error::NotImplemented("object versions".into()));
        }
        let path = String::from_utf8(percent_decode(path))
            .map_err(|_| S3Error::InvalidArgument("x-amz-copy-source is not UTF-8".into()))?;
        let path = path.strip_prefix('/').unwrap_or(&path);
        let (b, k) = path.split_once('/').ok_or_else(|| {
            S3Error::InvalidArgument("x-amz-copy-source must be BUCKET/KEY".into())
        })?;
        if b != self.bucket {
            return Err(S3Error::NoSuchBucket);
        }
        Ok(k.to_string())
    }

    async fn copy_object(&self, key: String, h: &HeaderMap) -> Result<Reply> {
        let src = self.copy_source(h)?;
        let replace = match h
            .get("x-amz-metadata-directive")
            .and_then(|v| v.to_str().ok())
        {
            None | Some("COPY") => None,
            Some("REPLACE") => Some(StoredMeta::from_headers(h)),
            Some(other) => {
                return Err(S3Error::InvalidArgument(format!(
                    "x-amz-metadata-directive {other:?}"
                )));
            }
        };
        let objects = self.objects.clone();
        let (s, k) = (src.clone(), key.clone());
        blocking(move || {
            objects.head(&s)?;
            objects.check_put(&k, false)
        })
        .await?;
        let objects = self.objects.clone();
        Ok(self.long_operation(move |_progress| {
            let info = objects.copy(&src, &key, replace)?;
            let mut w = Writer::new();
            w.open("CopyObjectResult");
            w.elem("LastModified", &iso8601(info.mtime));
            w.elem("ETag", &info.etag);
            w.close("CopyObjectResult");
            Ok(w.finish())
        }))
    }

    async fn upload_part_copy(&self, key: String, h: &HeaderMap, q: &Params) -> Result<Reply> {
        let (id, n) = upload_params(q)?;
        let src = self.copy_source(h)?;
        let range = h
            .get("x-amz-copy-source-range")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let objects = self.objects.clone();
        let (i, k, s) = (id.clone(), key.clone(), src.clone());
        let size = blocking(move || {
            objects.check_upload(&i, &k)?;
            Ok(objects.head(&s)?.size)
        })
        .await?;
        let range = match &range {
            Some(r) => Some(parse_range(Some(r), size)?.ok_or_else(|| {
                S3Error::InvalidArgument(format!("x-amz-copy-source-range {r:?}"))
            })?),
            None => None,
        };
        let objects = self.objects.clone();
        Ok(self.long_operation(move |_progress| {
            let info = objects.upload_part_copy(&id, &key, n, &src, range)?;
            let mut w = Writer::new();
            w.open("CopyPartResult");
            w.elem("LastModified", &iso8601(info.mtime));
            w.elem("ETag", &info.etag);
            w.close("CopyPartResult");
            Ok(w.finish())
        }))
    }

    async fn delete_objects(&self, doc: &[u8]) -> Result<Reply> {
        let root = xml::parse(doc).map_err(S3Error::MalformedXml)?;
        if root.name != "Delete" {
            return Err(S3Error::MalformedXml(format!("root element {}", root.name)));
        }
        let quiet = root.text_of("Quiet").is_some_and(|q| q.trim() == "true");
        let keys: Vec<String> = root
            .all("Object")
            .map(|o| o.text_of("Key").unwrap_or("").to_string())
            .collect();
        if keys.len() > 1000 {
            return Err(S3Error::MalformedXml("more than 1000 keys".into()));
        }
        let objects = self.objects.clone();
        let results = blocking(move || {
            Ok(keys
                .into_iter()
                .map(|k| {
                    let r = objects.delete(&k);
                    (k, r)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        let mut w = Writer::new();
        w.open("DeleteResult");
        for (k, r) in &results {
            match r {
                Ok(()) if quiet => {}
                Ok(()) => {
                    w.open("Deleted");
                    w.elem("Key", k);
                    w.close("Deleted");
                }
                Err(e) => {
                    w.open("Error");
                    w.elem("Key", k);
                    w.elem("Code", e.code());
                    w.elem("Message", &e.to_string());
                    w.close("Error");
                }
            }
        }
        w.close("DeleteResult");
        Ok(Reply::xml(w.finish()))
    }

    async fn complete(&self, id: String, key: String, doc: &[u8], h: &HeaderMap) -> Result<Reply> {
        let root = xml::parse(doc).map_err(S3Error::MalformedXml)?;
        if root.name != "CompleteMultipartUpload" {
            return Err(S3Error::MalformedXml(format!("root element {}", root.name)));
        }
        let mut parts = Vec::new();
        for p in root.all("Part") {
            let n = p
                .text_of("PartNumber")
                .and_then(|n| n.trim().parse::<u32>().ok())
                .ok_or_else(|| S3Error::MalformedXml("a Part without a PartNumber".into()))?;
            let etag = p
                .text_of("ETag")
                .ok_or_else(|| S3Error::MalformedXml("a Part without an ETag".into()))?;
            parts.push((n, etag.to_string()));
        }
        let objects = self.objects.clone();
        let (i, k) = (id.clone(), key.clone());
        let create_only = create_only(h)?;
        let completion: Completion =
            blocking(move || objects.check_complete(&i, &k, &parts, create_only)).await?;
        let objects = self.objects.clone();
        let host = h
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        let bucket = self.bucket.clone();
        Ok(self.long_operation(move |progress| {
            let info = objects.assemble(&completion, progress)?;
            let mut w = Writer::new();
            w.open("CompleteMultipartUploadResult");
            w.elem(
                "Location",
                &format!(
                    "http://{host}/{bucket}/{}",
                    uri_encode(key.as_bytes(), true)
                ),
            );
            w.elem("Bucket", &bucket);
            w.elem("Key", &key);
            w.elem("ETag", &info.etag);
            w.close("CompleteMultipartUploadResult");
            Ok(w.finish())
        }))
    }

    async fn list_parts(&self, key: String, q: &Params) -> Result<Reply> {
        let id = q.get("uploadId").unwrap_or("").to_string();
        let marker: u32 = match q.get("part-number-marker") {
            Some(m) => m
                .parse()
                .map_err(|_| S3Error::InvalidArgument(format!("part-number-marker {m:?}")))?,
            None => 0,
        };
        let max: usize = match q.get("max-parts") {
            Some(m) => m
                .parse::<usize>()
                .map_err(|_| S3Error::InvalidArgument(format!("max-parts {m:?}")))?
                .min(1000),
            None => 1000,
        };
        let objects = self.objects.clone();
        let (i, k) = (id.clone(), key.clone());
        let (parts, truncated) = blocking(move || objects.list_parts(&i, &k, marker, max)).await?;
        let mut w = Writer::new();
        w.open("ListPartsResult");
        w.elem("Bucket", &self.bucket);
        w.elem("Key", &key);
        w.elem("UploadId", &id);
        w.elem("PartNumberMarker", &marker.to_string());
        if let Some(last) = parts.last() {
            w.elem("NextPartNumberMarker", &last.number.to_string());
        }
        w.elem("MaxParts", &max.to_string());
        w.elem("IsTruncated", if truncated { "true" } else { "false" });
        for p in &parts {
            w.open("Part");
            w.elem("PartNumber", &p.number.to_string());
            w.elem("LastModified", &iso8601(p.mtime));
            w.elem("ETag", &p.etag);
            w.elem("Size", &p.size.to_string());
            w.close("Part");
        }
        owner(&mut w);
        w.elem("StorageClass", "STANDARD");
        w.close("ListPartsResult");
        Ok(Reply::xml(w.finish()))
    }

    /// A 200 answer whose document comes when `work` ends (copies and multipart completion
    /// can take minutes): the XML declaration is sent at once, then a space every
    /// `keepalive_secs` while it runs (so clients do not time out, as S3 does), then the
    /// result, or an error document inside the 200 (which SDKs check for).
    fn long_operation<F>(&self, work: F) -> Reply
    where
        F: FnOnce(&dyn Fn()) -> Result<String> + Send + 'static,
    {
        let (tx, body) = Body::channel(None);
        let mut r = Reply::new(StatusCode::OK);
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        r.body = body;
        let every = std::time::Duration::from_secs(self.settings.keepalive_secs.max(1));
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let decl = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
            let _ = tx.blocking_send(Ok(Bytes::from_static(decl.as_bytes())));
            let last = parking_lot::Mutex::new(Instant::now());
            let progress = || {
                let mut l = last.lock();
                if l.elapsed() >= every {
                    *l = Instant::now();
                    let _ = tx.blocking_send(Ok(Bytes::from_static(b" ")));
                }
            };
            let doc = match work(&progress) {
                Ok(doc) => doc,
                Err(e) => {
                    tracing::error!(error = %e, "operation failed after its answer started");
                    e.to_xml("", "")
                }
            };
            let doc = doc.strip_prefix(decl).unwrap_or(&doc).to_string();
            let _ = tx.blocking_send(Ok(Bytes::from(doc)));
        });
        r
    }
}

/// The conditional headers of a write: `If-None-Match: *` (create only) is supported;
/// anything else is refused rather than ignored.
fn create_only(h: &HeaderMap) -> Result<bool> {
    if h.contains_key(header::IF_MATCH) {
        return Err(S3Error::NotImplemented(
            "conditional writes with If-Match".into(),
        ));
    }
    match h
        .get(header::IF_NONE_MATCH)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(false),
        Some(v) if v.trim() == "*" => Ok(true),
        Some(_) => Err(S3Error::NotImplemented(
            "If-None-Match on writes other than *".into(),
        )),
    }
}

fn upload_params(q: &Params) -> Result<(String, u32)> {
    let id = q.get("uploadId").unwrap_or("").to_string();
    let n = q
        .get("partNumber")
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| S3Error::InvalidArgument("partNumber must be a number".into()))?;
    Ok((id, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Params {
        Params(parse_query(s))
    }

    #[test]
    fn requests_route_to_their_operations() {
        let cases: Vec<(Method, bool, bool, &str, bool, Op)> = vec![
            (Method::GET, false, false, "", false, Op::ListBuckets),
            (
                Method::GET,
                true,
                false,
                "list-type=2&prefix=a",
                false,
                Op::ListObjectsV2,
            ),
            (Method::GET, true, false, "prefix=a", false, Op::ListObjects),
            (
                Method::GET,
                true,
                false,
                "location",
                false,
                Op::GetBucketLocation,
            ),
            (
                Method::GET,
                true,
                false,
                "acl",
                false,
                Op::Unsupported("acl"),
            ),
            (Method::HEAD, true, false, "", false, Op::HeadBucket),
            (Method::PUT, true, false, "", false, Op::CreateBucket),
            (
                Method::POST,
                true,
                false,
                "delete",
                false,
                Op::DeleteObjects,
            ),
            (Method::GET, true, true, "", false, Op::GetObject),
            (Method::GET, true, true, "uploadId=x", false, Op::ListParts),
            (Method::HEAD, true, true, "", false, Op::HeadObject),
            (Method::PUT, true, true, "", false, Op::PutObject),
            (Method::PUT, true, true, "", true, Op::CopyObject),
            (
                Method::PUT,
                true,
                true,
                "partNumber=1&uploadId=x",
                false,
                Op::UploadPart,
            ),
            (
                Method::PUT,
                true,
                true,
                "partNumber=1&uploadId=x",
                true,
                Op::UploadPartCopy,
            ),
            (
                Method::PUT,
                true,
                true,
                "tagging",
                false,
                Op::Unsupported("tagging"),
            ),
            (
                Method::POST,
                true,
                true,
                "uploads",
                false,
                Op::CreateMultipartUpload,
            ),
            (
                Method::POST,
                true,
                true,
                "uploadId=x",
                false,
                Op::CompleteMultipartUpload,
            ),
            (
                Method::DELETE,
                true,
                true,
                "uploadId=x",
                false,
                Op::AbortMultipartUpload,
            ),
            (Method::DELETE, true, true, "", false, Op::DeleteObject),
        ];
        for (m, b, k, query, copy, want) in cases {
            assert_eq!(
                route(&m, b, k, &q(query), copy),
                want,
                "{m} {b} {k} {query}"
            );
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |h: &str, size| parse_range(Some(h), size);
        assert_eq!(r("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(r("bytes=90-200", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=10-", 100).unwrap(), Some((10, 100)));
        assert_eq!(r("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=-1000", 100).unwrap(), Some((0, 100)));
        assert_eq!(r("bytes=99-99", 100).unwrap(), Some((99, 100)));
        assert_eq!(r("bytes=100-", 100).unwrap_err().code(), "InvalidRange");
        assert_eq!(r("bytes=-0", 100).unwrap_err().code(), "InvalidRange");
        assert_eq!(r("bytes=0-", 0).unwrap_err().code(), "InvalidRange");
        // Ignored: whole object.
        assert_eq!(r("bytes=9-0", 100).unwrap(), None);
        assert_eq!(r("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(r("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range(None, 100).unwrap(), None);
    }

    #[test]
    fn conditional_headers_compare_etags_and_dates() {
        let info = ObjectInfo {
            ino: 2,
            size: 3,
            mtime: 1_369_353_600_000_000_000,
            etag: "\"abc\"".into(),
            meta: StoredMeta::default(),
        };
        let hdrs = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let code = |pairs: &[(&'static str, &str)]| {
            check_conditions(&hdrs(pairs), &info)
                .err()
                .map(|e| e.code())
        };
        assert_eq!(code(&[]), None);
        assert_eq!(code(&[("if-match", "\"abc\"")]), None);
        assert_eq!(code(&[("if-match", "abc")]), None);
        assert_eq!(code(&[("if-match", "\"x\", *")]), None);
        assert_eq!(code(&[("if-match", "\"x\"")]), Some("PreconditionFailed"));
        assert_eq!(code(&[("if-none-match", "\"abc\"")]), Some("NotModified"));
        assert_eq!(
            code(&[("if-modified-since", "Fri, 24 May 2013 00:00:00 GMT")]),
            Some("NotModified")
        );
        assert_eq!(
            code(&[("if-modified-since", "Thu, 23 May 2013 00:00:00 GMT")]),
            None
        );
        assert_eq!(
            code(&[("if-unmodified-since", "Thu, 23 May 2013 00:00:00 GMT")]),
            Some("PreconditionFailed")
        );
    }
}
