//! An S3 (or S3-compatible) store over `aws-sdk-s3`, behind the blocking [`ObjectStore`]
//! interface.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::error_chain;

use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use bytes::Bytes;
use tokio::runtime::Runtime;

use super::mem::slice_range;
use super::{ObjectError, ObjectInfo, ObjectStore, Result};

/// Objects larger than this are uploaded in parts of this size.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Parts of a multipart upload sent at once.
const MULTIPART_PARALLEL: usize = 4;

/// Where and how to reach a bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// Base URL of the service, without the bucket, e.g. `http://127.0.0.1:8333`.
    pub endpoint: String,
    /// Signing region (`us-east-1` unless the service needs another).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// Prepended to every key: empty, or ending with `/`.
    pub prefix: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key (never printed).
    pub secret_key: String,
    /// `http://host/bucket/key` (true) rather than `http://bucket.host/key` (false).
    pub path_style: bool,
    /// Limit of one request, retries excluded (each part of a multipart upload is one request).
    pub op_timeout: Duration,
    /// Sign the bytes of uploads (SigV4 with the payload's SHA-256) rather than sending
    /// `UNSIGNED-PAYLOAD`. Hashing costs about as much CPU as the rest of an upload; the
    /// request is signed either way, and TLS (https) protects the bytes in transit. For
    /// services that refuse unsigned payloads.
    pub sign_payload: bool,
}

impl S3Settings {
    /// Settings with the defaults: region `us-east-1`, no prefix, path style, 60 s timeout.
    pub fn new(endpoint: &str, bucket: &str, access_key: &str, secret_key: &str) -> Self {
        S3Settings {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: "us-east-1".to_string(),
            bucket: bucket.to_string(),
            prefix: String::new(),
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            path_style: true,
            op_timeout: Duration::from_secs(60),
            sign_payload: false,
        }
    }
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key)
            .field("secret_key", &"***")
            .field("path_style", &self.path_style)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// A bucket (optionally a prefix in it) on an S3-compatible service. Owns a small tokio
/// runtime; the blocking methods run their request on it and must not be called from async
/// code (if they are, the request runs on a helper thread instead of panicking).
pub struct S3Store {
    client: Client,
    runtime: Option<Runtime>,
    settings: S3Settings,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // `Runtime::drop` panics inside async code; this does not, and does not block.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Store {
    /// A store for `settings`. Contacts nothing: see [`ObjectStore::init`].
    pub fn new(settings: S3Settings) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()
            .map_err(|e| ObjectError::Other(format!("cannot start the S3 client runtime: {e}")))?;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(settings.op_timeout)
            .build();
        let credentials = Credentials::new(
            &settings.access_key,
            &settings.secret_key,
            None,
            None,
            "strata",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .endpoint_url(&settings.endpoint)
            .force_path_style(settings.path_style)
            .credentials_provider(credentials)
            // RetryStore retries; a second layer here would multiply attempts.
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .timeout_config(timeouts)
            // The operation timeout bounds slow transfers; this guard misfires on slow links.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            // S3-compatible services reject the default aws-chunked CRC uploads.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let client = {
            let _guard = runtime.enter();
            Client::from_conf(config)
        };
        Ok(S3Store {
            client,
            runtime: Some(runtime),
            settings,
        })
    }

    /// The settings the store was made with.
    pub fn settings(&self) -> &S3Settings {
        &self.settings
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.settings.prefix)
    }

    /// Run `fut` on the store's runtime and wait for it.
    fn block_on<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| ObjectError::Other("the S3 store is shut down".to_string()))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(rt.block_on(fut));
        }
        // Called from async code: blocking this thread on our runtime would panic.
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join())
            .map_err(|_| ObjectError::Other("an S3 request panicked".to_string()))
    }

    /// Replace the secret key if it ever shows up in a message.
    fn scrub(&self, text: String) -> String {
        let secret = &self.settings.secret_key;
        // Too short a "secret" would mangle ordinary words; real ones are long.
        if secret.len() >= 8 && text.contains(secret.as_str()) {
            text.replace(secret.as_str(), "***")
        } else {
            text
        }
    }

    /// Classify an SDK error. The text names the operation, key and store, never secrets.
    fn map_err<E>(
        &self,
        op: &str,
        key: &str,
        err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().unwrap_or_default();
        let detail = match err {
            SdkError::ServiceError(_) => {
                let status = status.map_or(String::new(), |s| format!(" (HTTP {s})"));
                let code = if code.is_empty() { "error" } else { code };
                format!("{code}: {}{status}", err.message().unwrap_or("no message"))
            }
            _ => error_chain(err),
        };
        let text = self.scrub(format!("{op} {key:?} on {}: {detail}", self.describe()));
        match err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                return ObjectError::Transient(text);
            }
            SdkError::DispatchFailure(d) if !d.is_user() => return ObjectError::Transient(text),
            SdkError::ServiceError(_) => {}
            _ => return ObjectError::Other(text),
        }
        match (code, status.unwrap_or(0)) {
            ("NoSuchBucket", _) => ObjectError::NoBucket(self.describe()),
            ("NoSuchKey" | "NotFound", _) | (_, 404) => ObjectError::NotFound(key.to_string()),
            (
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AllAccessDisabled"
                | "InvalidToken"
                | "ExpiredToken",
                _,
            )
            | (_, 401 | 403) => ObjectError::Denied(text),
            (
                "SlowDown"
                | "Throttling"
                | "ThrottlingException"
                | "RequestTimeout"
                | "InternalError"
                | "ServiceUnavailable",
                _,
            )
            | (_, 408 | 429 | 500..=599) => ObjectError::Transient(text),
            _ => ObjectError::Other(text),
        }
    }

    /// One cheap list to check that the bucket exists and the keys may read it.
    fn probe(&self) -> Result<()> {
        let req = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .max_keys(1);
        let req = if self.settings.prefix.is_empty() {
            req
        } else {
            req.prefix(&self.settings.prefix)
        };
        self.block_on(req.send())?
            .map(|_| ())
            .map_err(|e| self.map_err("list", "", &e))
    }

    fn create_bucket(&self) -> Result<()> {
        let mut req = self.client.create_bucket().bucket(&self.settings.bucket);
        // us-east-1 is the default location and must not be named.
        if self.settings.region != "us-east-1" {
            let loc = BucketLocationConstraint::from(self.settings.region.as_str());
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(loc)
                    .build(),
            );
        }
        match self.block_on(req.send())? {
            Ok(_) => {
                tracing::info!(store = %self.describe(), "created bucket");
                Ok(())
            }
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.map_err("create bucket", "", &e)),
        }
    }

    async fn put_multipart(&self, key: &str, full: &str, data: Bytes) -> Result<()> {
        let bucket = &self.settings.bucket;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(full)
            .send()
            .await;
        let created = created.map_err(|e| self.map_err("put (create multipart)", key, &e))?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(ObjectError::Other(format!(
                "put {key:?}: the service returned no upload id"
            )));
        };
        let res = self.upload_parts(key, full, &upload_id, data).await;
        let res = match res {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err("put (complete multipart)", key, &e)),
            Err(e) => Err(e),
        };
        if res.is_err() {
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&upload_id);
            if let Err(e) = abort.send().await {
                tracing::debug!(
                    key,
                    "abort of a failed multipart upload failed: {}",
                    error_chain(&e)
                );
            }
        }
        res
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: Bytes,
    ) -> Result<Vec<CompletedPart>> {
        let mut parts = Vec::new();
        let count = data.len().div_ceil(MULTIPART_THRESHOLD);
        for first in (0..count).step_by(MULTIPART_PARALLEL) {
            let mut tasks = tokio::task::JoinSet::new();
            for idx in first..(first + MULTIPART_PARALLEL).min(count) {
                let end = ((idx + 1) * MULTIPART_THRESHOLD).min(data.len());
                let body = data.slice(idx * MULTIPART_THRESHOLD..end);
                let number = idx as i32 + 1;
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.settings.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(body))
                    .customize();
                let req = if self.settings.sign_payload {
                    req
                } else {
                    req.disable_payload_signing()
                };
                tasks.spawn(async move { (number, req.send().await) });
            }
            while let Some(joined) = tasks.join_next().await {
                let (number, res) = joined.map_err(|e| {
                    ObjectError::Other(format!("put {key:?}: part upload task failed: {e}"))
                })?;
                let out = res.map_err(|e| self.map_err("put (upload part)", key, &e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                );
            }
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        let s = &self.settings;
        let style = if s.path_style {
            ""
        } else {
            ", virtual-host style"
        };
        let sep = if s.prefix.is_empty() { "" } else { "/" };
        format!(
            "s3://{}{sep}{} (endpoint {}{style})",
            s.bucket, s.prefix, s.endpoint
        )
    }

    fn init(&self) -> Result<()> {
        match self.probe() {
            Err(ObjectError::NoBucket(_)) => {
                self.create_bucket()?;
                self.probe()
            }
            other => other,
        }
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        if len == Some(0) {
            return self.head(key).map(|_| Bytes::new());
        }
        let ranged = off > 0 || len.is_some();
        let mut req = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(self.full_key(key));
        if ranged {
            // Some servers reject ends beyond i64; a clamped end still means "to the end".
            let range = match len {
                Some(l) => format!(
                    "bytes={off}-{}",
                    off.saturating_add(l - 1).min(i64::MAX as u64)
                ),
                None => format!("bytes={off}-"),
            };
            req = req.range(range);
        }
        self.block_on(async {
            let out = match req.send().await {
                Ok(out) => out,
                // The range starts at or after the end: nothing there.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                    return Ok(Bytes::new());
                }
                Err(e) => return Err(self.map_err("get", key, &e)),
            };
            let whole = ranged && out.content_range().is_none();
            let body = out.body.collect().await.map_err(|e| {
                ObjectError::Transient(self.scrub(format!(
                    "get {key:?} on {}: reading the body: {e}",
                    self.describe()
                )))
            })?;
            let data = body.into_bytes();
            // A server that ignored the Range header sent the whole object.
            Ok(if whole {
                slice_range(&data, off, len)
            } else {
                data
            })
        })?
    }

    /// Streams the body: pieces are handed over as the connection delivers them.
    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let mut req = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(self.full_key(key));
        if off > 0 {
            req = req.range(format!("bytes={off}-"));
        }
        let out = self.block_on(async {
            match req.send().await {
                Ok(out) => Ok(Some(out)),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => Ok(None),
                Err(e) => Err(self.map_err("get", key, &e)),
            }
        })??;
        let Some(out) = out else { return Ok(0) };
        // A server that ignored the Range header sends the whole object: skip the head.
        let skip = if off > 0 && out.content_range().is_none() {
            off
        } else {
            0
        };
        self.stream_body(key, out.body, skip, u64::MAX, sink)
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key);
        if data.len() > MULTIPART_THRESHOLD {
            return self.block_on(self.put_multipart(key, &full, data))?;
        }
        let req = self
            .client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(full)
            .body(ByteStream::from(data))
            .customize();
        let req = if self.settings.sign_payload {
            req
        } else {
            req.disable_payload_signing()
        };
        self.block_on(req.send())?
            .map(|_| ())
            .map_err(|e| self.map_err("put", key, &e))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let req = self
            .client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(self.full_key(key));
        match self
            .block_on(req.send())?
            .map_err(|e| self.map_err("delete", key, &e))
        {
            Ok(_) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let req = self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(self.full_key(key));
        let out = self
            .block_on(req.send())?
            .map_err(|e| self.map_err("head", key, &e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            modified: out.last_modified().map(|t| t.secs()),
        })
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        let pre = &self.settings.prefix;
        let full_prefix = format!("{pre}{prefix}");
        // Only pass a start_after that falls among the prefixed keys: some servers (SeaweedFS)
        // answer nothing for one that sorts before the prefix.
        let start = match start_after.map(|s| format!("{pre}{s}")) {
            Some(s) if s.starts_with(&full_prefix) => Some(s),
            Some(s) if s > full_prefix => return Ok(Vec::new()), // after every prefixed key
            _ => None,                                           // before every prefixed key
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        while out.len() < limit {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .max_keys((limit - out.len()).min(1000) as i32)
                .set_start_after(start.clone())
                .set_continuation_token(token.take());
            if !full_prefix.is_empty() {
                req = req.prefix(&full_prefix);
            }
            let resp = self
                .block_on(req.send())?
                .map_err(|e| self.map_err("list", prefix, &e))?;
            for obj in resp.contents() {
                let Some(key) = obj.key().and_then(|k| k.strip_prefix(pre.as_str())) else {
                    continue;
                };
                if out.len() < limit {
                    out.push(ObjectInfo {
                        key: key.to_string(),
                        size: obj.size().unwrap_or(0).max(0) as u64,
                        modified: obj.last_modified().map(|t| t.secs()),
                    });
                }
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// An object of a bucket as a listing shows it (for sources attached to a volume, see
/// `crate::source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// The key relative to the store's prefix.
    pub key: String,
    pub size: u64,
    /// The ETag without quotes.
    pub etag: String,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl S3Store {
    /// Hand `body` to `sink` piece by piece as it arrives, after skipping `skip` bytes and
    /// up to `limit` bytes in all. The body is read on the store's runtime; `sink` runs in
    /// the calling thread.
    fn stream_body(
        &self,
        key: &str,
        body: ByteStream,
        mut skip: u64,
        limit: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| ObjectError::Other("the S3 store is shut down".to_string()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::result::Result<Bytes, String>>(16);
        let mut body = body;
        rt.spawn(async move {
            loop {
                let item = match body.try_next().await {
                    Ok(Some(c)) => Ok(c),
                    Ok(None) => return,
                    Err(e) => Err(e.to_string()),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        let mut n = 0u64;
        for item in rx {
            let mut c = item.map_err(|e| {
                ObjectError::Transient(self.scrub(format!(
                    "get {key:?} on {}: reading the body: {e}",
                    self.describe()
                )))
            })?;
            if skip > 0 {
                let k = skip.min(c.len() as u64);
                skip -= k;
                c = c.slice(k as usize..);
            }
            let take = (c.len() as u64).min(limit - n) as usize;
            if take > 0 {
                sink(&c[..take]);
                n += take as u64;
            }
            if n >= limit {
                break;
            }
        }
        Ok(n)
    }

    /// The objects and common prefixes right below `prefix` (relative to the store's
    /// prefix, empty or ending with `/`), all pages, delimiter `/`. Prefixes are returned
    /// relative to the store's prefix too, ending with `/`.
    pub fn list_dir(&self, prefix: &str) -> Result<(Vec<ListedObject>, Vec<String>)> {
        let full = self.full_key(prefix);
        let strip = self.settings.prefix.len();
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .delimiter("/")
                .prefix(&full);
            if let Some(t) = &token {
                req = req.continuation_token(t);
            }
            let out = self
                .block_on(req.send())?
                .map_err(|e| self.map_err("list", prefix, &e))?;
            for o in out.contents() {
                let Some(key) = o.key() else { continue };
                objects.push(ListedObject {
                    key: key.get(strip..).unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                    mtime_ns: o
                        .last_modified()
                        .map(|t| t.secs() * 1_000_000_000 + i64::from(t.subsec_nanos()))
                        .unwrap_or(0),
                });
            }
            for p in out.common_prefixes() {
                if let Some(p) = p.prefix() {
                    prefixes.push(p.get(strip..).unwrap_or_default().to_string());
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok((objects, prefixes))
    }

    /// Bytes `[off, off + len)` of object `key`, streamed into `sink`, only if its ETag is
    /// still `etag` (`If-Match`): a replaced object is [`ObjectError::Changed`], never a mix
    /// of old and new bytes.
    pub fn get_range_if(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        if len == 0 {
            return Ok(0);
        }
        let req = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(self.full_key(key))
            .if_match(format!("\"{etag}\""))
            .range(format!("bytes={off}-{}", off + len - 1));
        let out = self.block_on(async {
            match req.send().await {
                Ok(out) => Ok(out),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                    Err(ObjectError::Changed(format!(
                        "{key:?} on {}: its ETag is no longer {etag}",
                        self.describe()
                    )))
                }
                Err(e) => Err(self.map_err("get", key, &e)),
            }
        })??;
        let skip = if out.content_range().is_none() {
            off
        } else {
            0
        };
        self.stream_body(key, out.body, skip, len, sink)
    }
}
