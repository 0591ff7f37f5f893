//! AWS Signature Version 2 for S3 (HMAC-SHA1), server side: `Authorization: AWS KEY:SIG`
//! and presigned query URLs (`AWSAccessKeyId`, `Expires`, `Signature`). Deprecated by AWS but
//! still what boto3 produces for presigned URLs unless told otherwise, and what some older
//! tools send. Bodies are not signed in V2.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha1::Sha1;

use super::dates::parse_http_date;
use super::error::{Result, S3Error};
use super::sigv4::{
    Credentials, MAX_PRESIGN_SECS, MAX_SKEW_SECS, Payload, SignedRequest, Verified, parse_query,
};

/// Query parameters that are part of the signed resource.
const SUBRESOURCES: &[&str] = &[
    "acl",
    "cors",
    "delete",
    "lifecycle",
    "location",
    "logging",
    "notification",
    "partNumber",
    "policy",
    "requestPayment",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "restore",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];

fn header<'h>(h: &'h HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The string to sign; `date` is the Date header (or `Expires` for a presigned URL).
fn string_to_sign(req: &SignedRequest, date: &str) -> String {
    let mut amz: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers {
        let n = name.as_str();
        if n.starts_with("x-amz-") {
            let v = String::from_utf8_lossy(value.as_bytes()).trim().to_string();
            match amz.iter_mut().find(|(k, _)| k == n) {
                Some((_, existing)) => {
                    existing.push(',');
                    existing.push_str(&v);
                }
                None => amz.push((n.to_string(), v)),
            }
        }
    }
    amz.sort();
    let mut resource = String::new();
    if let Some(b) = req.virtual_bucket {
        resource.push('/');
        resource.push_str(b);
    }
    resource.push_str(if req.raw_path.is_empty() {
        "/"
    } else {
        req.raw_path
    });
    let mut subs: Vec<(String, String)> = parse_query(req.raw_query)
        .into_iter()
        .filter(|(k, _)| SUBRESOURCES.contains(&k.as_str()))
        .collect();
    subs.sort();
    for (i, (k, v)) in subs.iter().enumerate() {
        resource.push(if i == 0 { '?' } else { '&' });
        resource.push_str(k);
        if !v.is_empty() {
            resource.push('=');
            resource.push_str(v);
        }
    }
    let mut s = format!(
        "{}\n{}\n{}\n{}\n",
        req.method,
        header(req.headers, "content-md5"),
        header(req.headers, "content-type"),
        date
    );
    for (k, v) in amz {
        s.push_str(&format!("{k}:{v}\n"));
    }
    s.push_str(&resource);
    s
}

fn signature(secret: &str, sts: &str) -> String {
    let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    m.update(sts.as_bytes());
    B64.encode(m.finalize().into_bytes())
}

fn check(creds: &Credentials, access_key: &str, expected: &str, given: &str) -> Result<Verified> {
    let same = |a: &str, b: &str| {
        a.len() == b.len()
            && a.bytes()
                .zip(b.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    };
    if !same(access_key, &creds.access_key) {
        return Err(S3Error::AccessDenied(
            "the access key id does not exist on this gateway".into(),
        ));
    }
    if !same(expected, given) {
        return Err(S3Error::AccessDenied(
            "the request signature does not match: check the secret key and signing method".into(),
        ));
    }
    Ok(Verified {
        access_key: creds.access_key.clone(),
        payload: Payload::Unsigned,
        chain: None,
    })
}

/// `Authorization: AWS ACCESS_KEY:SIGNATURE`.
pub fn verify_header(
    req: &SignedRequest,
    auth: &str,
    creds: &Credentials,
    now: i64,
) -> Result<Verified> {
    let (ak, sig) = auth["AWS ".len()..].trim().split_once(':').ok_or_else(|| {
        S3Error::AuthorizationMalformed("expected AWS ACCESS_KEY:SIGNATURE".into())
    })?;
    // With x-amz-date the Date line of the string to sign is empty.
    let amz_date = header(req.headers, "x-amz-date");
    let (when, date_line) = if amz_date.is_empty() {
        let d = header(req.headers, "date");
        (d, d)
    } else {
        (amz_date, "")
    };
    let t = parse_http_date(when)
        .ok_or_else(|| S3Error::AccessDenied("a Date or X-Amz-Date header is required".into()))?;
    if (t - now).abs() > MAX_SKEW_SECS {
        return Err(S3Error::RequestTimeTooSkewed(format!(
            "request at {when}, {} s from the server's clock",
            t - now
        )));
    }
    let sts = string_to_sign(req, date_line);
    check(creds, ak, &signature(&creds.secret_key, &sts), sig)
}

/// `?AWSAccessKeyId=…&Expires=…&Signature=…`.
pub fn verify_query(req: &SignedRequest, creds: &Credentials, now: i64) -> Result<Verified> {
    let q = parse_query(req.raw_query);
    let get = |n: &str| q.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let (Some(ak), Some(expires), Some(sig)) =
        (get("AWSAccessKeyId"), get("Expires"), get("Signature"))
    else {
        return Err(S3Error::AuthorizationMalformed(
            "a presigned URL needs AWSAccessKeyId, Expires and Signature".into(),
        ));
    };
    let exp: i64 = expires
        .parse()
        .map_err(|_| S3Error::AuthorizationMalformed("Expires is not a number".into()))?;
    if now > exp {
        return Err(S3Error::ExpiredPresign);
    }
    if exp - now > MAX_PRESIGN_SECS + MAX_SKEW_SECS {
        return Err(S3Error::AuthorizationMalformed(
            "Expires is more than 7 days ahead".into(),
        ));
    }
    let sts = string_to_sign(req, expires);
    check(creds, ak, &signature(&creds.secret_key, &sts), sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    // The examples of the S3 REST authentication (V2) documentation.
    fn creds() -> Credentials {
        Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    #[test]
    fn documented_get_object_example_verifies() {
        let mut h = HeaderMap::new();
        h.insert(
            "host",
            HeaderValue::from_static("awsexamplebucket1.us-west-1.s3.amazonaws.com"),
        );
        h.insert(
            "date",
            HeaderValue::from_static("Tue, 27 Mar 2007 19:36:42 +0000"),
        );
        let req = SignedRequest {
            method: "GET",
            raw_path: "/photos/puppy.jpg",
            raw_query: "",
            headers: &h,
            virtual_bucket: Some("awsexamplebucket1"),
        };
        let sts = string_to_sign(&req, "Tue, 27 Mar 2007 19:36:42 +0000");
        assert_eq!(
            sts,
            "GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/awsexamplebucket1/photos/puppy.jpg"
        );
        assert_eq!(
            signature(&creds().secret_key, &sts),
            "qgk2+6Sv9/oM7G3qLEjTH1a1l1g="
        );
    }

    #[test]
    fn presigned_query_verifies_until_it_expires() {
        let h = HeaderMap::new();
        let sign = |query_wo_sig: &str, expires: &str| {
            let req = SignedRequest {
                method: "GET",
                raw_path: "/bucket/a%20b.txt",
                raw_query: query_wo_sig,
                headers: &h,
                virtual_bucket: None,
            };
            signature(&creds().secret_key, &string_to_sign(&req, expires))
        };
        let base =
            "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=2000&response-content-type=text%2Fplain";
        let sig = sign(base, "2000");
        let q = format!(
            "{base}&Signature={}",
            super::super::sigv4::uri_encode(sig.as_bytes(), false)
        );
        let req = SignedRequest {
            method: "GET",
            raw_path: "/bucket/a%20b.txt",
            raw_query: &q,
            headers: &h,
            virtual_bucket: None,
        };
        verify_query(&req, &creds(), 1000).unwrap();
        assert_eq!(
            verify_query(&req, &creds(), 2001).unwrap_err().code(),
            "AccessDenied"
        );
        let other = SignedRequest {
            raw_path: "/bucket/other.txt",
            ..req
        };
        assert!(verify_query(&other, &creds(), 1000).is_err());
    }
}
