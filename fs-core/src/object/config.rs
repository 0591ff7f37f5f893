//! Choosing and configuring a backend from the `--storage`/`--bucket` style settings.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{LocalStore, MemStore, ObjectError, ObjectStore, Result, S3Settings, S3Store};

const S3_URL_HINT: &str = "--bucket for s3 must be a URL like http://127.0.0.1:8333/mybucket \
     (path style) or https://mybucket.s3.example.com (virtual-host style)";

/// Where the objects of a volume live, as given to `strata format` and stored in the volume
/// settings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageConfig {
    /// Backend: `file`, `s3` or `mem`.
    pub storage: String,
    /// `file`: a directory. `s3`: `http(s)://host[:port]/bucket[/prefix]` (path style) or
    /// `http(s)://bucket.host[:port][/]` (virtual-host style), optionally followed by
    /// `?region=R&path-style=true|false&sign-payload=true|false`. `mem`: ignored.
    pub bucket: String,
    /// Access key id (s3).
    pub access_key: Option<String>,
    /// Secret access key (s3); never printed.
    pub secret_key: Option<String>,
    /// Signing region (s3); `?region=` in the bucket URL wins; default `us-east-1`.
    pub region: Option<String>,
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("storage", &self.storage)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("region", &self.region)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> ObjectError {
    ObjectError::Other(msg.into())
}

impl StorageConfig {
    /// The S3 settings this configuration describes (for `storage = "s3"`), with the default
    /// operation timeout.
    pub fn s3_settings(&self) -> Result<S3Settings> {
        let url = self.bucket.trim();
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| bad(format!("{S3_URL_HINT}; got {url:?}")))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() || authority.contains('@') {
            return Err(bad(format!(
                "{S3_URL_HINT}; got {url:?} (give the keys with --access-key/--secret-key, not in the URL)"
            )));
        }
        let mut region = self.region.clone();
        let mut path_style = None;
        let mut sign_payload = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("region", r)) if !r.is_empty() => region = Some(r.to_string()),
                Some(("path-style", "true" | "1")) => path_style = Some(true),
                Some(("path-style", "false" | "0")) => path_style = Some(false),
                Some(("sign-payload", "true" | "1")) => sign_payload = true,
                Some(("sign-payload", "false" | "0")) => sign_payload = false,
                _ => {
                    return Err(bad(format!(
                        "--bucket: unknown or malformed query parameter {pair:?}; supported: \
                         region=NAME, path-style=true|false, sign-payload=true|false"
                    )));
                }
            }
        }
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let (bucket, host, style) = match segments.next() {
            // http://host/bucket/prefix
            Some(bucket) => (bucket.to_string(), authority.to_string(), true),
            // http://bucket.host
            None => {
                let (host, port) = split_port(authority);
                let virtual_host = host.parse::<IpAddr>().is_err() && !host.starts_with('[');
                match host
                    .split_once('.')
                    .filter(|(b, h)| virtual_host && !b.is_empty() && !h.is_empty())
                {
                    Some((bucket, host)) => (bucket.to_string(), format!("{host}{port}"), false),
                    None => return Err(bad(format!("{S3_URL_HINT}; {url:?} names no bucket"))),
                }
            }
        };
        let prefix: Vec<&str> = segments.collect();
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.join("/"))
        };
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(bad(format!(
                "--bucket: bucket name {bucket:?} is invalid: use 3 to 63 letters, digits, '-' or '.'"
            )));
        }
        let (access_key, secret_key) = match (&self.access_key, &self.secret_key) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => (a, s),
            _ => {
                return Err(bad(
                    "--access-key and --secret-key are required for s3 storage".to_string(),
                ));
            }
        };
        let region = region
            .or_else(|| aws_region(&host))
            .unwrap_or_else(|| "us-east-1".to_string());
        let mut s = S3Settings::new(
            &format!("{scheme}://{host}"),
            &bucket,
            access_key,
            secret_key,
        );
        s.region = region;
        s.prefix = prefix;
        s.path_style = path_style.unwrap_or(style);
        s.sign_payload = sign_payload;
        Ok(s)
    }
}

/// `("host", ":port")` or `("host", "")`, IPv6 brackets kept.
fn split_port(authority: &str) -> (&str, &str) {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], &authority[i..]),
        _ => (authority, ""),
    }
}

/// The region named by an AWS endpoint host such as `s3.eu-west-1.amazonaws.com`.
fn aws_region(host: &str) -> Option<String> {
    let (host, _) = split_port(host);
    let rest = host.strip_suffix(".amazonaws.com")?;
    let region = rest
        .strip_prefix("s3.")
        .or_else(|| rest.strip_prefix("s3-"))?;
    (!region.is_empty() && !region.contains('.')).then(|| region.to_string())
}

/// Build the raw backend `cfg` describes (no retries or metrics: see [`super::layered`]).
/// Contacts nothing; call [`ObjectStore::init`] to check the store is usable.
pub fn open_store(cfg: &StorageConfig) -> Result<Arc<dyn ObjectStore>> {
    match cfg.storage.as_str() {
        "file" => {
            let dir = cfg.bucket.strip_prefix("file://").unwrap_or(&cfg.bucket);
            if dir.trim().is_empty() {
                return Err(bad(
                    "--bucket for file storage must be a directory, e.g. /var/lib/strata/objects",
                ));
            }
            Ok(Arc::new(LocalStore::new(dir)))
        }
        "s3" => Ok(Arc::new(S3Store::new(cfg.s3_settings()?)?)),
        "mem" => Ok(Arc::new(MemStore::new())),
        other => Err(bad(format!(
            "--storage {other:?} is not supported: use file, s3 or mem"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str) -> StorageConfig {
        StorageConfig {
            storage: "s3".into(),
            bucket: bucket.into(),
            access_key: Some("AK".into()),
            secret_key: Some("SECRET-VALUE".into()),
            region: None,
        }
    }

    fn parse(bucket: &str) -> S3Settings {
        s3(bucket)
            .s3_settings()
            .unwrap_or_else(|e| panic!("{bucket}: {e}"))
    }

    fn parse_err(bucket: &str) -> String {
        s3(bucket).s3_settings().expect_err(bucket).to_string()
    }

    #[test]
    fn path_style_urls() {
        let s = parse("http://127.0.0.1:8333/vol1");
        assert_eq!(
            (s.endpoint.as_str(), s.bucket.as_str(), s.prefix.as_str()),
            ("http://127.0.0.1:8333", "vol1", "")
        );
        assert!(s.path_style);
        assert_eq!(s.region, "us-east-1");
        let s = parse("https://minio.local/vol1/a/b/?region=eu-1");
        assert_eq!(
            (s.endpoint.as_str(), s.bucket.as_str(), s.prefix.as_str()),
            ("https://minio.local", "vol1", "a/b/")
        );
        assert_eq!(s.region, "eu-1");
    }

    #[test]
    fn virtual_host_urls() {
        let s = parse("https://vol1.cos.ap-beijing.myqcloud.com");
        assert_eq!(
            (s.endpoint.as_str(), s.bucket.as_str()),
            ("https://cos.ap-beijing.myqcloud.com", "vol1")
        );
        assert!(!s.path_style);
        let s = parse("http://vol1.localhost:9000/");
        assert_eq!(s.endpoint, "http://localhost:9000");
        let s = parse("https://vol1.s3.eu-west-1.amazonaws.com");
        assert_eq!(s.region, "eu-west-1");
        let s = parse("https://vol1.oss.example.com?path-style=true&region=cn-1");
        assert_eq!(
            (s.endpoint.as_str(), s.bucket.as_str(), s.region.as_str()),
            ("https://oss.example.com", "vol1", "cn-1")
        );
        assert!(s.path_style);
        assert!(!parse("http://host:1/vol1?path-style=false").path_style);
        assert!(!parse("http://host:1/vol1").sign_payload);
        assert!(parse("http://host:1/vol1?sign-payload=true").sign_payload);
    }

    #[test]
    fn region_precedence() {
        let mut c = s3("http://h/vol1");
        c.region = Some("r1".into());
        assert_eq!(c.s3_settings().unwrap().region, "r1");
        c.bucket = "http://h/vol1?region=r2".into();
        assert_eq!(c.s3_settings().unwrap().region, "r2");
    }

    #[test]
    fn bad_input_names_the_fix() {
        for url in [
            "vol1",
            "ftp://h/vol1",
            "http://127.0.0.1:8333",
            "http://127.0.0.1:8333/",
            "http://localhost",
        ] {
            assert!(
                parse_err(url).contains("--bucket for s3 must be a URL like"),
                "{url}"
            );
        }
        assert!(parse_err("http://h/ab").contains("is invalid"));
        assert!(parse_err("http://h/vol1?style=x").contains("unknown or malformed"));
        assert!(parse_err("http://u:p@h/vol1").contains("--access-key"));
        let mut c = s3("http://h/vol1");
        c.secret_key = None;
        assert!(
            c.s3_settings()
                .unwrap_err()
                .to_string()
                .contains("--secret-key")
        );
        let c = StorageConfig {
            storage: "gcs".into(),
            ..s3("x")
        };
        assert!(
            open_store(&c)
                .err()
                .expect("gcs")
                .to_string()
                .contains("use file, s3 or mem")
        );
    }

    #[test]
    fn debug_masks_the_secret() {
        let c = s3("http://h/vol1");
        let text = format!("{c:?} {:?}", c.s3_settings().unwrap());
        assert!(!text.contains("SECRET-VALUE"), "{text}");
        assert!(text.contains("AK"));
    }

    #[test]
    fn serde_round_trip() {
        let c = s3("http://h/vol1");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<StorageConfig>(&json).unwrap(), c);
    }

    #[test]
    fn opens_each_backend() {
        let dir = tempfile::tempdir().unwrap();
        let file = StorageConfig {
            storage: "file".into(),
            bucket: dir.path().display().to_string(),
            ..s3("")
        };
        assert!(open_store(&file).unwrap().describe().starts_with("file://"));
        let mem = StorageConfig {
            storage: "mem".into(),
            ..s3("")
        };
        assert_eq!(open_store(&mem).unwrap().describe(), "mem://");
        let s = open_store(&s3("http://127.0.0.1:1/vol1/p")).unwrap();
        assert_eq!(s.describe(), "s3://vol1/p/ (endpoint http://127.0.0.1:1)");
    }
}
