//! Errors of the S3 gateway and the one place they become S3 error responses
//! ([`S3Error::status`], [`S3Error::code`], [`S3Error::to_xml`]).

use http::StatusCode;

use crate::meta::MetaError;
use crate::vfs::VfsError;
use crate::vfs::writer::FlushError;

use super::xml;

/// Why a request failed. Each variant is one S3 error code (or a file-system error mapped to
/// one in [`S3Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// Missing or wrong credentials, wrong signature, or a write to a read-only gateway.
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error("the request time is too far from the server's time ({0})")]
    RequestTimeTooSkewed(String),
    #[error("the authorization header or query is malformed: {0}")]
    AuthorizationMalformed(String),
    #[error("the presigned URL has expired")]
    ExpiredPresign,
    #[error("the specified bucket does not exist")]
    NoSuchBucket,
    #[error("the specified key does not exist")]
    NoSuchKey,
    #[error("the specified multipart upload does not exist")]
    NoSuchUpload,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the key is longer than 1024 bytes or has a component longer than 255 bytes")]
    KeyTooLong,
    #[error("the requested range cannot be satisfied (object size {0})")]
    InvalidRange(u64),
    #[error("a part of the list was not uploaded or its ETag does not match: {0}")]
    InvalidPart(String),
    #[error("the parts are not in ascending order of part number")]
    InvalidPartOrder,
    #[error("the XML body is not well-formed: {0}")]
    MalformedXml(String),
    #[error("the body does not match its checksum ({0})")]
    BadDigest(String),
    #[error("the body does not match x-amz-content-sha256")]
    ContentSha256Mismatch,
    #[error("the body ended before its declared length or is not valid aws-chunked: {0}")]
    IncompleteBody(String),
    #[error("{0} is not supported by this gateway")]
    NotImplemented(String),
    #[error("the bucket already exists and is this gateway's")]
    BucketAlreadyOwnedByYou,
    #[error("a precondition (If-Match / If-Unmodified-Since) failed")]
    PreconditionFailed,
    #[error("not modified")]
    NotModified,
    /// A key whose parent is an object (a file), or an object where a key needs a directory.
    #[error("the key conflicts with an existing object or prefix: {0}")]
    KeyConflict(String),
    #[error(transparent)]
    Vfs(#[from] VfsError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<MetaError> for S3Error {
    fn from(e: MetaError) -> Self {
        S3Error::Vfs(VfsError::Meta(e))
    }
}

pub type Result<T> = std::result::Result<T, S3Error>;

impl S3Error {
    /// HTTP status of the error response.
    pub fn status(&self) -> StatusCode {
        use S3Error::*;
        match self {
            AccessDenied(_) | RequestTimeTooSkewed(_) | ExpiredPresign => StatusCode::FORBIDDEN,
            AuthorizationMalformed(_)
            | InvalidArgument(_)
            | InvalidRequest(_)
            | KeyTooLong
            | InvalidPart(_)
            | InvalidPartOrder
            | MalformedXml(_)
            | BadDigest(_)
            | ContentSha256Mismatch
            | IncompleteBody(_) => StatusCode::BAD_REQUEST,
            NoSuchBucket | NoSuchKey | NoSuchUpload => StatusCode::NOT_FOUND,
            InvalidRange(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            BucketAlreadyOwnedByYou | KeyConflict(_) => StatusCode::CONFLICT,
            PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            NotModified => StatusCode::NOT_MODIFIED,
            Vfs(e) => vfs_status(e),
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The S3 error code clients see.
    pub fn code(&self) -> &'static str {
        use S3Error::*;
        match self {
            // A wrong secret, an unknown key id and a write to a read-only gateway all read as
            // "access denied" to clients (boto3's ClientError code, the aws CLI's message).
            AccessDenied(_) | ExpiredPresign => "AccessDenied",
            RequestTimeTooSkewed(_) => "RequestTimeTooSkewed",
            AuthorizationMalformed(_) => "AuthorizationHeaderMalformed",
            NoSuchBucket => "NoSuchBucket",
            NoSuchKey => "NoSuchKey",
            NoSuchUpload => "NoSuchUpload",
            InvalidArgument(_) => "InvalidArgument",
            InvalidRequest(_) => "InvalidRequest",
            KeyTooLong => "KeyTooLongError",
            InvalidRange(_) => "InvalidRange",
            InvalidPart(_) => "InvalidPart",
            InvalidPartOrder => "InvalidPartOrder",
            MalformedXml(_) => "MalformedXML",
            BadDigest(_) => "BadDigest",
            ContentSha256Mismatch => "XAmzContentSHA256Mismatch",
            IncompleteBody(_) => "IncompleteBody",
            NotImplemented(_) => "NotImplemented",
            BucketAlreadyOwnedByYou => "BucketAlreadyOwnedByYou",
            PreconditionFailed => "PreconditionFailed",
            NotModified => "NotModified",
            KeyConflict(_) => "KeyConflict",
            Vfs(e) => vfs_code(e),
            Internal(_) => "InternalError",
        }
    }

    /// The error document (`resource`: the request path; `request_id`: the per-request id).
    pub fn to_xml(&self, resource: &str, request_id: &str) -> String {
        let mut w = xml::Writer::without_namespace();
        w.open("Error");
        w.elem("Code", self.code());
        w.elem("Message", &self.to_string());
        w.elem("Resource", resource);
        w.elem("RequestId", request_id);
        w.close("Error");
        w.finish()
    }

    /// Whether this is the client's fault (logged at debug) or the server's (logged as error).
    pub fn is_server_error(&self) -> bool {
        self.status().is_server_error()
    }
}

fn meta_of(e: &VfsError) -> Option<&MetaError> {
    match e {
        VfsError::Meta(m) | VfsError::Flush(FlushError::Meta(m)) => Some(m),
        _ => None,
    }
}

fn vfs_status(e: &VfsError) -> StatusCode {
    match (e, meta_of(e)) {
        (VfsError::ReadOnly, _) => StatusCode::FORBIDDEN,
        (VfsError::Stale, _) | (_, Some(MetaError::NotFound)) => StatusCode::NOT_FOUND,
        (_, Some(MetaError::NoSpace | MetaError::Quota)) => StatusCode::INSUFFICIENT_STORAGE,
        (
            _,
            Some(
                MetaError::Exists
                | MetaError::NotDir
                | MetaError::IsDir
                | MetaError::NotEmpty
                | MetaError::CrossQuota,
            ),
        ) => StatusCode::CONFLICT,
        (_, Some(MetaError::NameTooLong)) => StatusCode::BAD_REQUEST,
        (_, Some(MetaError::TooBig)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn vfs_code(e: &VfsError) -> &'static str {
    match (e, meta_of(e)) {
        (VfsError::ReadOnly, _) => "AccessDenied",
        (VfsError::Stale, _) | (_, Some(MetaError::NotFound)) => "NoSuchKey",
        (_, Some(MetaError::NoSpace | MetaError::Quota)) => "QuotaExceeded",
        (
            _,
            Some(
                MetaError::Exists
                | MetaError::NotDir
                | MetaError::IsDir
                | MetaError::NotEmpty
                | MetaError::CrossQuota,
            ),
        ) => "KeyConflict",
        (_, Some(MetaError::NameTooLong)) => "KeyTooLongError",
        (_, Some(MetaError::TooBig)) => "EntityTooLarge",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_s3_codes_and_statuses() {
        let cases: Vec<(S3Error, u16, &str)> = vec![
            (S3Error::AccessDenied("x".into()), 403, "AccessDenied"),
            (S3Error::NoSuchKey, 404, "NoSuchKey"),
            (S3Error::NoSuchBucket, 404, "NoSuchBucket"),
            (S3Error::InvalidRange(3), 416, "InvalidRange"),
            (VfsError::ReadOnly.into(), 403, "AccessDenied"),
            (MetaError::NotFound.into(), 404, "NoSuchKey"),
            (MetaError::Quota.into(), 507, "QuotaExceeded"),
            (
                VfsError::Flush(FlushError::Meta(MetaError::NoSpace)).into(),
                507,
                "QuotaExceeded",
            ),
            (MetaError::IsDir.into(), 409, "KeyConflict"),
            (MetaError::Engine("db".into()).into(), 500, "InternalError"),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{e}");
        }
    }

    #[test]
    fn error_document_escapes_its_text() {
        let e = S3Error::InvalidArgument("a <b> & 'c'".into());
        let x = e.to_xml("/bucket/k&y", "id1");
        assert!(
            x.contains("<Message>invalid argument: a &lt;b&gt; &amp; &apos;c&apos;</Message>"),
            "{x}"
        );
        assert!(x.contains("<Resource>/bucket/k&amp;y</Resource>"), "{x}");
        assert!(x.contains("<Code>InvalidArgument</Code>"), "{x}");
        assert!(x.contains("\n<Error><Code>"), "no namespace on errors: {x}");
    }
}
