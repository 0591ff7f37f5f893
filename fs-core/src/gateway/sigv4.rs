//! AWS Signature Version 4 for S3, server side: the `Authorization` header and presigned
//! query parameters, plus the chained signatures of `aws-chunked` bodies
//! (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`). Written from the published algorithm
//! (canonical request → string to sign → HMAC chain over date, region, service).

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::dates::parse_amz_date;
use super::error::{Result, S3Error};

type HmacSha256 = Hmac<Sha256>;

/// SHA-256 of the empty string, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Largest difference between the request's time and ours (as S3: 15 minutes).
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// Longest validity of a presigned URL (as S3: 7 days).
pub const MAX_PRESIGN_SECS: i64 = 7 * 24 * 3600;

/// The one key pair the gateway accepts.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, secret removed)", self.access_key)
    }
}

/// How the request body is protected, from `x-amz-content-sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `UNSIGNED-PAYLOAD` (also every presigned request).
    Unsigned,
    /// The lowercase hex SHA-256 the body must have.
    Sha256(String),
    /// `aws-chunked` with a signature per chunk (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`, with
    /// `-TRAILER`: then trailing headers and their signature follow the last chunk).
    StreamingSigned { trailer: bool },
    /// `aws-chunked` without chunk signatures, with trailing headers
    /// (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`).
    StreamingUnsignedTrailer,
}

impl Payload {
    fn parse(v: &str) -> Result<Payload> {
        Ok(match v {
            "UNSIGNED-PAYLOAD" => Payload::Unsigned,
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" => Payload::StreamingSigned { trailer: false },
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER" => {
                Payload::StreamingSigned { trailer: true }
            }
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER" => Payload::StreamingUnsignedTrailer,
            h if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Payload::Sha256(h.to_ascii_lowercase())
            }
            other => {
                return Err(S3Error::InvalidArgument(format!(
                    "x-amz-content-sha256 {other:?} is not supported (ECDSA streaming is not)"
                )));
            }
        })
    }

    /// Whether the body is `aws-chunked` framed.
    pub fn is_chunked(&self) -> bool {
        matches!(
            self,
            Payload::StreamingSigned { .. } | Payload::StreamingUnsignedTrailer
        )
    }
}

/// A request that passed authentication.
#[derive(Debug)]
pub struct Verified {
    pub access_key: String,
    pub payload: Payload,
    /// For signed streaming bodies: what checks each chunk's signature.
    pub chain: Option<ChunkChain>,
}

/// The signature chain of an `aws-chunked` body: each chunk is signed over the previous
/// signature (the first over the request's own), the trailing headers over the last one.
#[derive(Clone)]
pub struct ChunkChain {
    key: [u8; 32],
    amz_date: String,
    scope: String,
    prev: String,
}

impl std::fmt::Debug for ChunkChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkChain({})", self.scope)
    }
}

impl ChunkChain {
    /// Check the signature of the next chunk (`data_sha256`: the SHA-256 of its data).
    pub fn check_chunk(&mut self, data_sha256: &[u8], signature: &str) -> Result<()> {
        let sts = format!(
            "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{}\n{EMPTY_SHA256}\n{}",
            self.amz_date,
            self.scope,
            self.prev,
            hex::encode(data_sha256)
        );
        let want = hex::encode(hmac(&self.key, sts.as_bytes()));
        if !same(&want, signature) {
            return Err(S3Error::AccessDenied(
                "a chunk signature of the aws-chunked body does not match".into(),
            ));
        }
        self.prev = want;
        Ok(())
    }

    /// Check the signature of the trailing headers (`canonical`: each `name:value\n`,
    /// sorted by name).
    pub fn check_trailer(&self, canonical: &str, signature: &str) -> Result<()> {
        let sts = format!(
            "AWS4-HMAC-SHA256-TRAILER\n{}\n{}\n{}\n{}",
            self.amz_date,
            self.scope,
            self.prev,
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let want = hex::encode(hmac(&self.key, sts.as_bytes()));
        if !same(&want, signature) {
            return Err(S3Error::AccessDenied(
                "the trailer signature of the aws-chunked body does not match".into(),
            ));
        }
        Ok(())
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Compare two signatures without an early exit.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The signing key of a day, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

/// Percent-encode as SigV4 wants: everything but `A-Za-z0-9-._~` (and `/` when `keep_slash`).
pub fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else if b == b'/' && keep_slash {
            out.push('/');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decode `%XX` escapes (a `+` stays a `+`); malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Split a raw query string into decoded (name, value) pairs, in order.
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                String::from_utf8_lossy(&percent_decode(k)).into_owned(),
                String::from_utf8_lossy(&percent_decode(v)).into_owned(),
            )
        })
        .collect()
}

/// The parts of a request that are signed.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path as received (percent-encoded).
    pub raw_path: &'a str,
    /// The query as received (without `?`).
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    /// The bucket, when named by the Host header (virtual-host style; SigV2 signs it).
    pub virtual_bucket: Option<&'a str>,
}

fn canonical_query(raw: &str, skip_signature: bool) -> String {
    let mut pairs: Vec<(String, String)> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .filter(|(k, _)| !(skip_signature && k == "X-Amz-Signature"))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn canonical_headers(headers: &HeaderMap, signed: &[&str]) -> Result<String> {
    let mut out = String::new();
    for name in signed {
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| {
                let s = String::from_utf8_lossy(v.as_bytes());
                s.split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(S3Error::AccessDenied(format!(
                "signed header {name} is missing from the request"
            )));
        }
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    Ok(out)
}

/// The canonical request; `uri` is the canonical path.
fn canonical_request(
    req: &SignedRequest,
    uri: &str,
    query: &str,
    signed: &[&str],
    payload: &str,
) -> Result<String> {
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        uri,
        query,
        canonical_headers(req.headers, signed)?,
        signed.join(";"),
        payload
    ))
}

/// Candidate canonical paths: the path decoded and encoded again as SigV4 says (what
/// SDKs sign), then the path exactly as received (clients that encode differently).
fn canonical_uris(raw_path: &str) -> Vec<String> {
    let path = if raw_path.is_empty() { "/" } else { raw_path };
    let normalized = uri_encode(&percent_decode(path), true);
    if normalized == path {
        vec![normalized]
    } else {
        vec![normalized, path.to_string()]
    }
}

struct Scope<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

fn parse_credential(c: &str) -> Result<Scope<'_>> {
    let parts: Vec<&str> = c.split('/').collect();
    match parts.as_slice() {
        [ak, date, region, service, "aws4_request"] if date.len() == 8 => Ok(Scope {
            access_key: ak,
            date,
            region,
            service,
        }),
        _ => Err(S3Error::AuthorizationMalformed(format!(
            "credential {c:?} is not ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request"
        ))),
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Authenticate a request: SigV4 header or presigned query, or SigV2 (`AWS KEY:SIG`, or
/// `AWSAccessKeyId`/`Signature` in the query). `now` in seconds since the epoch.
pub fn verify(req: &SignedRequest, creds: &Credentials, now: i64) -> Result<Verified> {
    let auth = header(req.headers, "authorization");
    match auth {
        Some(a) if a.starts_with("AWS4-HMAC-SHA256 ") => verify_header(req, a, creds, now),
        Some(a) if a.starts_with("AWS ") => super::sigv2::verify_header(req, a, creds, now),
        Some(_) => Err(S3Error::AuthorizationMalformed(
            "unsupported authorization type".into(),
        )),
        None if req.raw_query.contains("X-Amz-Signature=") => verify_presigned(req, creds, now),
        None if req.raw_query.contains("AWSAccessKeyId=") => {
            super::sigv2::verify_query(req, creds, now)
        }
        None => Err(S3Error::AccessDenied(
            "anonymous requests are not allowed: sign requests with the gateway's keys".into(),
        )),
    }
}

fn parse_time(amz_date: &str) -> Result<i64> {
    parse_amz_date(amz_date)
        .ok_or_else(|| S3Error::AuthorizationMalformed(format!("bad X-Amz-Date {amz_date:?}")))
}

fn check_key<'a>(scope: &Scope<'a>, creds: &Credentials) -> Result<()> {
    if !same(scope.access_key, &creds.access_key) {
        return Err(S3Error::AccessDenied(
            "the access key id does not exist on this gateway".into(),
        ));
    }
    if scope.service != "s3" {
        return Err(S3Error::AuthorizationMalformed(format!(
            "the credential scope is for service {:?}, not s3",
            scope.service
        )));
    }
    Ok(())
}

fn mismatch() -> S3Error {
    S3Error::AccessDenied(
        "the request signature does not match: check the secret key and signing method".into(),
    )
}

fn verify_header(
    req: &SignedRequest,
    auth: &str,
    creds: &Credentials,
    now: i64,
) -> Result<Verified> {
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in auth["AWS4-HMAC-SHA256 ".len()..].split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (credential, signed_headers, signature)
    else {
        return Err(S3Error::AuthorizationMalformed(
            "Credential, SignedHeaders and Signature are required".into(),
        ));
    };
    let scope = parse_credential(credential)?;
    check_key(&scope, creds)?;
    let amz_date = header(req.headers, "x-amz-date")
        .ok_or_else(|| S3Error::AccessDenied("X-Amz-Date header is missing".into()))?;
    let t = parse_time(amz_date)?;
    if (t - now).abs() > MAX_SKEW_SECS {
        return Err(S3Error::RequestTimeTooSkewed(format!(
            "request at {amz_date}, {} s from the server's clock",
            t - now
        )));
    }
    if !amz_date.starts_with(scope.date) {
        return Err(S3Error::AuthorizationMalformed(
            "the credential date differs from X-Amz-Date".into(),
        ));
    }
    let signed: Vec<&str> = signed_headers.split(';').collect();
    if !signed.contains(&"host") {
        return Err(S3Error::AccessDenied(
            "the host header must be signed".into(),
        ));
    }
    let payload_claim = header(req.headers, "x-amz-content-sha256").ok_or_else(|| {
        S3Error::InvalidRequest("missing required header x-amz-content-sha256".into())
    })?;
    let payload = Payload::parse(payload_claim)?;
    let key = signing_key(&creds.secret_key, scope.date, scope.region, scope.service);
    let scope_str = format!(
        "{}/{}/{}/aws4_request",
        scope.date, scope.region, scope.service
    );
    let query = canonical_query(req.raw_query, false);
    for uri in canonical_uris(req.raw_path) {
        let creq = canonical_request(req, &uri, &query, &signed, payload_claim)?;
        let sts = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope_str}\n{}",
            hex::encode(Sha256::digest(creq.as_bytes()))
        );
        let want = hex::encode(hmac(&key, sts.as_bytes()));
        if same(&want, signature) {
            let chain = matches!(payload, Payload::StreamingSigned { .. }).then(|| ChunkChain {
                key,
                amz_date: amz_date.to_string(),
                scope: scope_str.clone(),
                prev: want,
            });
            return Ok(Verified {
                access_key: creds.access_key.clone(),
                payload,
                chain,
            });
        }
    }
    Err(mismatch())
}

fn verify_presigned(req: &SignedRequest, creds: &Credentials, now: i64) -> Result<Verified> {
    let q = parse_query(req.raw_query);
    let get = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") {
        return Err(S3Error::AuthorizationMalformed(
            "X-Amz-Algorithm must be AWS4-HMAC-SHA256".into(),
        ));
    }
    let (Some(credential), Some(amz_date), Some(expires), Some(signed_headers), Some(signature)) = (
        get("X-Amz-Credential"),
        get("X-Amz-Date"),
        get("X-Amz-Expires"),
        get("X-Amz-SignedHeaders"),
        get("X-Amz-Signature"),
    ) else {
        return Err(S3Error::AuthorizationMalformed(
            "a presigned URL needs X-Amz-Credential, -Date, -Expires, -SignedHeaders and -Signature"
                .into(),
        ));
    };
    let scope = parse_credential(credential)?;
    check_key(&scope, creds)?;
    let t = parse_time(amz_date)?;
    let expires: i64 = expires
        .parse()
        .ok()
        .filter(|e| (1..=MAX_PRESIGN_SECS).contains(e))
        .ok_or_else(|| {
            S3Error::AuthorizationMalformed(format!(
                "X-Amz-Expires must be 1 to {MAX_PRESIGN_SECS} seconds"
            ))
        })?;
    if t - now > MAX_SKEW_SECS {
        return Err(S3Error::RequestTimeTooSkewed(format!(
            "presigned at {amz_date}, in the future"
        )));
    }
    if now > t + expires {
        return Err(S3Error::ExpiredPresign);
    }
    if !amz_date.starts_with(scope.date) {
        return Err(S3Error::AuthorizationMalformed(
            "the credential date differs from X-Amz-Date".into(),
        ));
    }
    let signed: Vec<&str> = signed_headers.split(';').collect();
    let payload_claim = get("X-Amz-Content-Sha256").unwrap_or("UNSIGNED-PAYLOAD");
    let payload = Payload::parse(payload_claim)?;
    let key = signing_key(&creds.secret_key, scope.date, scope.region, scope.service);
    let scope_str = format!(
        "{}/{}/{}/aws4_request",
        scope.date, scope.region, scope.service
    );
    let query = canonical_query(req.raw_query, true);
    for uri in canonical_uris(req.raw_path) {
        let creq = canonical_request(req, &uri, &query, &signed, payload_claim)?;
        let sts = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope_str}\n{}",
            hex::encode(Sha256::digest(creq.as_bytes()))
        );
        if same(&hex::encode(hmac(&key, sts.as_bytes())), signature) {
            return Ok(Verified {
                access_key: creds.access_key.clone(),
                payload,
                chain: None,
            });
        }
    }
    Err(mismatch())
}

/// Sign a request as a client would (header auth); for tests and tools. Returns the
/// `Authorization` header value.
pub fn sign_header(
    req: &SignedRequest,
    creds: &Credentials,
    amz_date: &str,
    region: &str,
    signed: &[&str],
    payload: &str,
) -> String {
    let date = &amz_date[..8];
    let key = signing_key(&creds.secret_key, date, region, "s3");
    let scope = format!("{date}/{region}/s3/aws4_request");
    let uri = uri_encode(&percent_decode(req.raw_path), true);
    let creq = canonical_request(
        req,
        &uri,
        &canonical_query(req.raw_query, false),
        signed,
        payload,
    )
    .unwrap_or_default();
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={},Signature={}",
        creds.access_key,
        signed.join(";"),
        hex::encode(hmac(&key, sts.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    // The example credentials and instant of the AWS SigV4 documentation for S3.
    const AK: &str = "AKIAIOSFODNN7EXAMPLE";
    const SK: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20130524T000000Z";
    const NOW: i64 = 1_369_353_600;

    fn creds() -> Credentials {
        Credentials {
            access_key: AK.into(),
            secret_key: SK.into(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn auth(signed: &str, sig: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request,SignedHeaders={signed},Signature={sig}"
        )
    }

    /// GET /test.txt with a range: the documented signature.
    fn get_object(sig: &str) -> HeaderMap {
        headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", DATE),
            (
                "authorization",
                &auth("host;range;x-amz-content-sha256;x-amz-date", sig),
            ),
        ])
    }

    const GET_SIG: &str = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41";

    #[test]
    fn documented_get_object_example_verifies() {
        let h = get_object(GET_SIG);
        let req = SignedRequest {
            method: "GET",
            raw_path: "/test.txt",
            raw_query: "",
            headers: &h,
            virtual_bucket: None,
        };
        let v = verify(&req, &creds(), NOW).unwrap();
        assert_eq!(v.payload, Payload::Sha256(EMPTY_SHA256.into()));
        assert!(v.chain.is_none());
        // The canonical request hash of the example.
        let creq = canonical_request(
            &req,
            "/test.txt",
            "",
            &["host", "range", "x-amz-content-sha256", "x-amz-date"],
            EMPTY_SHA256,
        )
        .unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(creq.as_bytes())),
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        // And the client-side signer produces the same header.
        let signed = sign_header(
            &req,
            &creds(),
            DATE,
            "us-east-1",
            &["host", "range", "x-amz-content-sha256", "x-amz-date"],
            EMPTY_SHA256,
        );
        assert!(signed.ends_with(GET_SIG), "{signed}");
    }

    #[test]
    fn wrong_secret_key_time_or_header_is_refused() {
        let h = get_object(GET_SIG);
        let req = |h| SignedRequest {
            method: "GET",
            raw_path: "/test.txt",
            raw_query: "",
            headers: h,
            virtual_bucket: None,
        };
        let wrong = Credentials {
            access_key: AK.into(),
            secret_key: "not-the-secret".into(),
        };
        let e = verify(&req(&h), &wrong, NOW).unwrap_err();
        assert_eq!(e.code(), "AccessDenied");
        let other_key = Credentials {
            access_key: "OTHER".into(),
            secret_key: SK.into(),
        };
        assert_eq!(
            verify(&req(&h), &other_key, NOW).unwrap_err().code(),
            "AccessDenied"
        );
        assert_eq!(
            verify(&req(&h), &creds(), NOW + 3600).unwrap_err().code(),
            "RequestTimeTooSkewed"
        );
        // A signed header changed in transit.
        let mut h2 = h.clone();
        h2.insert("range", HeaderValue::from_static("bytes=0-99"));
        assert_eq!(
            verify(&req(&h2), &creds(), NOW).unwrap_err().code(),
            "AccessDenied"
        );
        // Another path or method.
        let r = SignedRequest {
            method: "HEAD",
            ..req(&h)
        };
        assert!(verify(&r, &creds(), NOW).is_err());
        let r = SignedRequest {
            raw_path: "/test2.txt",
            ..req(&h)
        };
        assert!(verify(&r, &creds(), NOW).is_err());
        // No authentication at all.
        let none = headers(&[("host", "x")]);
        assert_eq!(
            verify(&req(&none), &creds(), NOW).unwrap_err().code(),
            "AccessDenied"
        );
    }

    #[test]
    fn documented_put_object_example_verifies() {
        // PUT /test$file.text: a path character that must be encoded ($ → %24).
        let h = headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-date", DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            (
                "x-amz-content-sha256",
                "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
            ),
            (
                "authorization",
                &auth(
                    "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
                    "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
                ),
            ),
        ]);
        for path in ["/test$file.text", "/test%24file.text"] {
            let req = SignedRequest {
                method: "PUT",
                raw_path: path,
                raw_query: "",
                headers: &h,
                virtual_bucket: None,
            };
            let v = verify(&req, &creds(), NOW).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(
                v.payload,
                Payload::Sha256(hex::encode(Sha256::digest(b"Welcome to Amazon S3.")).to_string())
            );
        }
    }

    #[test]
    fn documented_list_and_subresource_examples_verify() {
        for (query, sig) in [
            (
                "lifecycle",
                "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            ),
            (
                "max-keys=2&prefix=J",
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            ),
            // Same parameters in another order: the canonical query sorts them.
            (
                "prefix=J&max-keys=2",
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            ),
        ] {
            let h = headers(&[
                ("host", "examplebucket.s3.amazonaws.com"),
                ("x-amz-date", DATE),
                ("x-amz-content-sha256", EMPTY_SHA256),
                (
                    "authorization",
                    &auth("host;x-amz-content-sha256;x-amz-date", sig),
                ),
            ]);
            let req = SignedRequest {
                method: "GET",
                raw_path: "/",
                raw_query: query,
                headers: &h,
                virtual_bucket: None,
            };
            verify(&req, &creds(), NOW).unwrap_or_else(|e| panic!("{query}: {e}"));
        }
    }

    #[test]
    fn documented_presigned_url_verifies_and_expires() {
        let query = format!(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AK}%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={DATE}&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
        let h = headers(&[("host", "examplebucket.s3.amazonaws.com")]);
        let req = SignedRequest {
            method: "GET",
            raw_path: "/test.txt",
            raw_query: &query,
            headers: &h,
            virtual_bucket: None,
        };
        let v = verify(&req, &creds(), NOW + 3600).unwrap();
        assert_eq!(v.payload, Payload::Unsigned);
        assert_eq!(
            verify(&req, &creds(), NOW + 86_401).unwrap_err().code(),
            "AccessDenied",
            "expired"
        );
        let tampered = query.replace("86400", "86401");
        let req = SignedRequest {
            raw_query: &tampered,
            ..req
        };
        assert!(verify(&req, &creds(), NOW).is_err());
    }

    #[test]
    fn documented_chunk_signatures_chain() {
        // The streaming PUT example: seed signature, a 64 KiB chunk of 'a', a 1 KiB chunk,
        // and the final empty chunk.
        let h = headers(&[
            ("host", "s3.amazonaws.com"),
            ("x-amz-date", DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "66560"),
            ("content-length", "66824"),
            (
                "authorization",
                &auth(
                    "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class",
                    "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
                ),
            ),
        ]);
        let req = SignedRequest {
            method: "PUT",
            raw_path: "/examplebucket/chunkObject.txt",
            raw_query: "",
            headers: &h,
            virtual_bucket: None,
        };
        let v = verify(&req, &creds(), NOW).unwrap();
        assert_eq!(v.payload, Payload::StreamingSigned { trailer: false });
        let mut chain = v.chain.unwrap();
        let c1 = Sha256::digest(vec![b'a'; 65536]);
        let c2 = Sha256::digest(vec![b'a'; 1024]);
        let mut bad = chain.clone();
        assert!(bad.check_chunk(&c2, "00").is_err());
        chain
            .check_chunk(
                &c1,
                "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            )
            .unwrap();
        assert!(
            chain
                .clone()
                .check_chunk(
                    &c1,
                    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
                )
                .is_err(),
            "a chunk with other data"
        );
        chain
            .check_chunk(
                &c2,
                "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            )
            .unwrap();
        chain
            .check_chunk(
                &Sha256::digest(b""),
                "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
            )
            .unwrap();
    }

    #[test]
    fn encoding_and_query_parsing() {
        assert_eq!(uri_encode(b"a b/c+d~e", true), "a%20b/c%2Bd~e");
        assert_eq!(uri_encode(b"a/b", false), "a%2Fb");
        assert_eq!(uri_encode("é".as_bytes(), true), "%C3%A9");
        assert_eq!(percent_decode("a%20b%2fc+%zz%4"), b"a b/c+%zz%4");
        assert_eq!(
            parse_query("list-type=2&prefix=a%2Fb&delimiter=%2F&fetch-owner"),
            vec![
                ("list-type".to_string(), "2".to_string()),
                ("prefix".to_string(), "a/b".to_string()),
                ("delimiter".to_string(), "/".to_string()),
                ("fetch-owner".to_string(), String::new()),
            ]
        );
        assert_eq!(
            canonical_query("b=2&a=1&a=0&X-Amz-Signature=x", true),
            "a=0&a=1&b=2"
        );
    }
}
