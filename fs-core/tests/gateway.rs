//! `strata gateway` with real S3 clients: the aws CLI copies, syncs and lists a model
//! directory (with a multipart upload) that then reads back byte for byte through a FUSE
//! mount; `rclone check` finds no difference; boto3 reads ranges, heads, presigns and gets
//! the error codes clients rely on; the Rust SDK (aws-chunked bodies with trailing
//! checksums, multipart, copies, listings); read-only and `--subdir` gateways; and two
//! gateways of one cache group fetch each block of a cold file from the store once for 64
//! concurrent readers.
//!
//! Needs the aws CLI, boto3 and rclone (`.ci/deps.d/gateway.sh`), and root with /dev/fuse
//! for the mount: a missing client fails the test that needs it, naming the install script.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use strata::testing::gateway::{
    ACCESS_KEY, SECRET_KEY, TestGateway, aws_env, rclone_env, require_python_module, require_tool,
};
use strata::testing::mount::TestMount;

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const MIB: usize = 1 << 20;

/// A formatted volume (SQLite + local directory) in a temporary directory.
struct Vol {
    dir: tempfile::TempDir,
    meta: String,
}

impl Vol {
    fn new(name: &str, format_args: &[&str]) -> Vol {
        let dir = tempfile::Builder::new()
            .prefix("strata-gw-")
            .tempdir()
            .unwrap();
        let meta = format!("sqlite://{}", dir.path().join("meta.db").display());
        let data = dir.path().join("data").display().to_string();
        let mut args: Vec<&str> = format_args.to_vec();
        args.extend(["--bucket", &data, &meta, name]);
        strata::testing::mount::format(BIN, &args);
        Vol { dir, meta }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn gateway(&self, name: &str, extra: &[&str]) -> TestGateway {
        TestGateway::start(BIN, &self.meta, self.path(), name, extra)
    }

    /// Block objects stored in the volume's data directory.
    fn objects(&self) -> usize {
        fn count(d: &Path) -> usize {
            fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            let p = e.path();
                            if p.is_dir() { count(&p) } else { 1 }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.path().join("data"))
    }
}

/// Deterministic, incompressible bytes.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn aws(home: &Path, g: &TestGateway, args: &[&str]) -> Output {
    let mut c = Command::new(require_tool("aws"));
    aws_env(&mut c, home);
    c.arg("--endpoint-url").arg(g.endpoint()).args(args);
    run(&mut c)
}

/// Every file below `root`, by path relative to it.
fn tree(root: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn same_trees(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    for (rel, pa) in &ta {
        let (x, y) = (fs::read(pa).unwrap(), fs::read(&tb[rel]).unwrap());
        assert!(x == y, "{rel} differs ({} vs {} bytes)", x.len(), y.len());
    }
}

/// Key and size of an `aws s3 ls --recursive` line (`DATE TIME SIZE KEY`; keys may hold
/// spaces).
fn ls_line(l: &str) -> (String, u64) {
    let mut rest = l;
    let mut fields = Vec::new();
    for _ in 0..3 {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        fields.push(&rest[..end]);
        rest = &rest[end..];
    }
    let key = rest.strip_prefix(' ').unwrap_or(rest).to_string();
    (
        key,
        fields[2]
            .parse()
            .unwrap_or_else(|_| panic!("ls line {l:?}")),
    )
}

/// How many requests of `op` the gateway's access log shows.
fn logged(g: &TestGateway, op: &str) -> usize {
    let needle = format!("op=\"{op}\"");
    g.log_text()
        .lines()
        .filter(|l| l.contains("s3 request") && l.contains(&needle))
        .count()
}

/// A model directory: ~200 MiB in nested directories, one file over 100 MiB (multipart for
/// every client), names that sort around '/' and an empty file.
fn model_dir(root: &Path) {
    let files: &[(&str, usize)] = &[
        ("config.json", 700),
        ("generation_config.json", 120),
        ("tokenizer/tokenizer.json", 3 * MIB + 17),
        ("tokenizer/special tokens+map.json", 412),
        ("weights/model-00001-of-00002.safetensors", 120 * MIB + 4321),
        ("weights/model-00002-of-00002.safetensors", 70 * MIB + 5),
        ("weights/model.safetensors.index.json", 20_000),
        ("weights-extra/notes.txt", 33),
        ("weights.txt", 12),
        ("empty", 0),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        let p = root.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data(i as u64 + 1, *len)).unwrap();
    }
}

#[test]
fn aws_cli_copies_syncs_and_lists_a_model_directory_and_rclone_agrees() {
    require_tool("aws");
    require_tool("rclone");
    let v = Vol::new("models", &[]);
    let home = v.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let src = v.path().join("src");
    model_dir(&src);
    let g = v.gateway("a", &[]);

    // Upload with cp --recursive, then the same tree with sync: nothing to do.
    let dest = format!("s3://{}/llama/", g.bucket);
    let s = src.display().to_string();
    aws(
        &home,
        &g,
        &["s3", "cp", "--recursive", "--no-progress", &s, &dest],
    );
    assert!(
        logged(&g, "CompleteMultipartUpload") >= 2,
        "the big files went up in parts: {}",
        g.log_text()
    );
    let puts = logged(&g, "PutObject") + logged(&g, "UploadPart");
    let out = aws(&home, &g, &["s3", "sync", "--no-progress", &s, &dest]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !printed.contains("upload:"),
        "a second sync copies nothing: {printed}"
    );
    assert_eq!(
        logged(&g, "PutObject") + logged(&g, "UploadPart"),
        puts,
        "no upload requests in the second sync"
    );

    // ls: every key with its size, in S3 order; and the top level with prefixes.
    let out = aws(&home, &g, &["s3", "ls", "--recursive", &dest]);
    let listed: Vec<(String, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(ls_line)
        .collect();
    let want: Vec<(String, u64)> = tree(&src)
        .iter()
        .map(|(rel, p)| (format!("llama/{rel}"), fs::metadata(p).unwrap().len()))
        .collect();
    let mut want_sorted = want.clone();
    want_sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    assert_eq!(listed, want_sorted, "aws s3 ls --recursive");
    let out = aws(&home, &g, &["s3", "ls", &dest]);
    let top = String::from_utf8_lossy(&out.stdout);
    for pre in ["PRE tokenizer/", "PRE weights/", "PRE weights-extra/"] {
        assert!(top.contains(pre), "{pre} in:\n{top}");
    }

    // Download the whole tree again: the same bytes.
    let back = v.path().join("back");
    aws(
        &home,
        &g,
        &[
            "s3",
            "sync",
            "--no-progress",
            &dest,
            &back.display().to_string(),
        ],
    );
    same_trees(&src, &back);

    // rclone sees the same files (sizes, and MD5 where the ETag is one).
    let mut c = Command::new(require_tool("rclone"));
    rclone_env(&mut c, &g, &home);
    c.args(["check", &s, &format!("gw:{}/llama", g.bucket)]);
    let out = run(&mut c);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("0 differences found"), "{said}");

    // The files in the volume, read through a FUSE mount, are the source byte for byte.
    let mnt = v.path().join("mnt");
    let mut m = TestMount::new(BIN, &v.meta, &mnt, &[]);
    same_trees(&src, &mnt.join("llama"));

    // A file written through the mount: no stored MD5, so its ETag does not claim one.
    fs::write(mnt.join("llama/from-mount.txt"), b"written through FUSE").unwrap();
    m.unmount();
    let out = aws(
        &home,
        &g,
        &[
            "s3api",
            "head-object",
            "--bucket",
            &g.bucket,
            "--key",
            "llama/from-mount.txt",
        ],
    );
    let head: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(head["ContentLength"], 20);
    let etag = head["ETag"].as_str().unwrap();
    assert!(etag.ends_with("-0\""), "weak ETag {etag}");

    // sync --delete removes what the source no longer has.
    fs::remove_file(src.join("weights-extra/notes.txt")).unwrap();
    fs::write(src.join("from-mount.txt"), b"written through FUSE").unwrap();
    aws(
        &home,
        &g,
        &["s3", "sync", "--delete", "--no-progress", &s, &dest],
    );
    let out = aws(&home, &g, &["s3", "ls", "--recursive", &dest]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(!listing.contains("weights-extra"), "{listing}");
    // The emptied directory is gone from the volume too (no empty prefix left behind).
    let mut m = TestMount::new(BIN, &v.meta, &mnt, &[]);
    assert!(!mnt.join("llama/weights-extra").exists());
    m.unmount();

    // rm --recursive empties the prefix.
    aws(
        &home,
        &g,
        &["s3", "rm", "--recursive", "--only-show-errors", &dest],
    );
    let out = aws(
        &home,
        &g,
        &["s3", "ls", "--recursive", &format!("s3://{}/", g.bucket)],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

const BOTO3_SCRIPT: &str = r#"
import os, sys, time, json, hashlib, urllib.request, urllib.error
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ep, bucket, path = os.environ["GW_ENDPOINT"], os.environ["GW_BUCKET"], os.environ["GW_FILE"]
ak, sk = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1")
data = open(path, "rb").read()
n = len(data)

t0 = time.time()
s3.upload_file(path, bucket, "dir/blob.bin")   # over 8 MiB: multipart
s3.put_object(Bucket=bucket, Key="dir/small.txt", Body=b"small object", ContentType="text/plain",
              Metadata={"origin": "boto3"})
t1 = time.time()

head = s3.head_object(Bucket=bucket, Key="dir/blob.bin")
assert head["ContentLength"] == n, head
mtime = head["LastModified"].timestamp()
assert t0 - 2 <= mtime <= t1 + 2, (t0, mtime, t1)
assert head["ETag"].endswith('-%d"' % ((n + 8 * 2**20 - 1) // (8 * 2**20))), head["ETag"]
small = s3.head_object(Bucket=bucket, Key="dir/small.txt")
assert small["ETag"] == '"%s"' % hashlib.md5(b"small object").hexdigest(), small
assert small["ContentType"] == "text/plain" and small["Metadata"] == {"origin": "boto3"}, small

# Ranges: closed, open-ended, suffix, a single byte, one past a block boundary, whole.
for rng, a, b in [("bytes=0-9", 0, 10), ("bytes=%d-" % (n - 1000), n - 1000, n),
                  ("bytes=-12345", n - 12345, n), ("bytes=4194304-4194304", 4194304, 4194305),
                  ("bytes=4194000-8389000", 4194000, 8389001), ("bytes=100-", 100, n),
                  ("bytes=0-%d" % (n * 2), 0, n)]:
    r = s3.get_object(Bucket=bucket, Key="dir/blob.bin", Range=rng)
    got = r["Body"].read()
    assert got == data[a:b], (rng, len(got), b - a)
    assert r["ContentRange"] == "bytes %d-%d/%d" % (a, b - 1, n), r["ContentRange"]
assert s3.get_object(Bucket=bucket, Key="dir/blob.bin")["Body"].read() == data

def code(f):
    try:
        f()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    return None

bad = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                   aws_access_key_id=ak, aws_secret_access_key="wrong-secret")
assert code(lambda: bad.get_object(Bucket=bucket, Key="dir/small.txt")) == ("AccessDenied", 403)
assert code(lambda: bad.put_object(Bucket=bucket, Key="x", Body=b"1")) == ("AccessDenied", 403)
nokey = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                     aws_access_key_id="unknown", aws_secret_access_key=sk)
assert code(lambda: nokey.list_objects_v2(Bucket=bucket)) == ("AccessDenied", 403)
assert code(lambda: s3.get_object(Bucket=bucket, Key="../x")) == ("NoSuchKey", 404)
assert code(lambda: s3.get_object(Bucket=bucket, Key="dir/../../x")) == ("NoSuchKey", 404)
assert code(lambda: s3.get_object(Bucket=bucket, Key="missing")) == ("NoSuchKey", 404)
assert code(lambda: s3.put_object(Bucket=bucket, Key="../x", Body=b"1"))[0] == "InvalidArgument"
assert code(lambda: s3.get_object(Bucket="no-such-bucket", Key="x")) == ("NoSuchBucket", 404)
assert code(lambda: s3.get_object(Bucket=bucket, Key="dir/blob.bin", Range="bytes=%d-" % n)) == ("InvalidRange", 416)
assert code(lambda: s3.get_object(Bucket=bucket, Key="dir/small.txt", IfMatch='"nope"')) == ("PreconditionFailed", 412)
assert code(lambda: s3.put_object(Bucket=bucket, Key="dir/small.txt/below", Body=b"1"))[1] == 409
# Conditional create: only if the key names no object yet.
assert code(lambda: s3.put_object(Bucket=bucket, Key="dir/small.txt", Body=b"2", IfNoneMatch="*")) == ("PreconditionFailed", 412)
s3.put_object(Bucket=bucket, Key="dir/created-once.txt", Body=b"1", IfNoneMatch="*")
assert s3.get_object(Bucket=bucket, Key="dir/small.txt")["Body"].read() == b"small object"

# Service and bucket calls clients make.
assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [bucket]
s3.head_bucket(Bucket=bucket)
assert s3.get_bucket_location(Bucket=bucket).get("LocationConstraint") in (None, "")

# Presigned URLs, SigV2 (boto3's default) and SigV4.
for client in (s3, boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                                config=Config(signature_version="s3v4"))):
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "dir/small.txt"},
                                        ExpiresIn=300)
    assert urllib.request.urlopen(url).read() == b"small object", url
    try:
        urllib.request.urlopen(url.replace("small", "smalx"))
        raise AssertionError("a tampered presigned URL worked")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code

# Listing: pages of 2 with a delimiter.
for i in range(5):
    s3.put_object(Bucket=bucket, Key="list/k%d" % i, Body=b"x")
s3.put_object(Bucket=bucket, Key="list/sub/deep", Body=b"x")
keys, prefixes, token = [], [], None
while True:
    kw = dict(Bucket=bucket, Prefix="list/", Delimiter="/", MaxKeys=2)
    if token:
        kw["ContinuationToken"] = token
    r = s3.list_objects_v2(**kw)
    keys += [o["Key"] for o in r.get("Contents", [])]
    prefixes += [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    if not r["IsTruncated"]:
        break
    token = r["NextContinuationToken"]
assert keys == ["list/k%d" % i for i in range(5)], keys
assert prefixes == ["list/sub/"], prefixes
r = s3.list_objects_v2(Bucket=bucket, Prefix="list/", StartAfter="list/k2")
assert [o["Key"] for o in r["Contents"]] == ["list/k3", "list/k4", "list/sub/deep"], r

# Batch delete and copy.
r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "list/k%d" % i} for i in range(5)] + [{"Key": "nope"}]})
assert sorted(d["Key"] for d in r["Deleted"]) == sorted(["list/k%d" % i for i in range(5)] + ["nope"]), r
s3.copy_object(Bucket=bucket, Key="copy/blob.bin", CopySource={"Bucket": bucket, "Key": "dir/blob.bin"})
assert s3.get_object(Bucket=bucket, Key="copy/blob.bin")["Body"].read() == data
print("boto3 ok")
"#;

#[test]
fn boto3_reads_ranges_heads_presigns_and_gets_s3_error_codes() {
    require_python_module("boto3");
    let v = Vol::new("ranges", &[]);
    let home = v.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let file = v.path().join("blob.bin");
    fs::write(&file, data(7, 21 * MIB + 12_345)).unwrap();
    let g = v.gateway("a", &[]);
    let mut c = Command::new("python3");
    aws_env(&mut c, &home);
    c.args(["-c", BOTO3_SCRIPT])
        .env("GW_ENDPOINT", g.endpoint())
        .env("GW_BUCKET", &g.bucket)
        .env("GW_FILE", &file);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed:\n{}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        g.log_text()
    );
    // The access log names operation, key and status, never the keys of the client.
    let log = g.log_text();
    assert!(log.contains("op=\"GetObject\""), "{log}");
    assert!(log.contains("status=206"), "{log}");
    assert!(!log.contains(SECRET_KEY) && !log.contains("wrong-secret"));
    assert!(!log.contains("Signature="), "no signatures in the log");
}

/// botocore sends `Expect: 100-continue` with every PUT body, an empty one too. It then
/// keeps the status of an answer that came without a 100 Continue for the connection's
/// next such request, reads that request's status line as a header, and waits for the
/// connection to close (then fails with `'ETag'`, or times out).
const BOTO3_EXPECT_SCRIPT: &str = r#"
import io, os, hashlib
import boto3
from botocore.config import Config

ep, bucket = os.environ["GW_ENDPOINT"], os.environ["GW_BUCKET"]
# One connection, no retries, and a read timeout well below the gateway's idle timeout.
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  config=Config(max_pool_connections=1, read_timeout=5, connect_timeout=5,
                                retries={"total_max_attempts": 1}))
body = b"after an empty object" * 5000
for i in range(3):
    s3.put_object(Bucket=bucket, Key="e/empty-%d" % i, Body=io.BytesIO(b""))
    r = s3.put_object(Bucket=bucket, Key="e/next-%d" % i, Body=io.BytesIO(body))
    assert r["ETag"] == '"%s"' % hashlib.md5(body).hexdigest(), r
up = s3.create_multipart_upload(Bucket=bucket, Key="e/parts")
s3.put_object(Bucket=bucket, Key="e/empty-last", Body=io.BytesIO(b""))
part = s3.upload_part(Bucket=bucket, Key="e/parts", UploadId=up["UploadId"], PartNumber=1,
                      Body=io.BytesIO(body))
s3.complete_multipart_upload(Bucket=bucket, Key="e/parts", UploadId=up["UploadId"],
                             MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
assert s3.get_object(Bucket=bucket, Key="e/parts")["Body"].read() == body
print("expect ok")
"#;

#[test]
fn boto3_writes_after_an_empty_put_on_the_same_connection() {
    require_python_module("boto3");
    let v = Vol::new("expect", &[]);
    let home = v.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let g = v.gateway("a", &[]);
    let mut c = Command::new("python3");
    aws_env(&mut c, &home);
    c.args(["-c", BOTO3_EXPECT_SCRIPT])
        .env("GW_ENDPOINT", g.endpoint())
        .env("GW_BUCKET", &g.bucket);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed:\n{}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        g.log_text()
    );
}

fn client(g: &TestGateway, secret: &str) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(g.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(ACCESS_KEY, secret, None, None, "test"))
        .build();
    Client::from_conf(conf)
}

async fn get(c: &Client, bucket: &str, key: &str) -> Result<Vec<u8>, String> {
    match c.get_object().bucket(bucket).key(key).send().await {
        Ok(r) => match r.body.collect().await {
            Ok(b) => Ok(b.into_bytes().to_vec()),
            Err(e) => Err(format!("body of {key} failed after the headers: {e:?}")),
        },
        Err(e) => Err(e.code().unwrap_or("?").to_string()),
    }
}

async fn put(c: &Client, bucket: &str, key: &str, body: Vec<u8>) -> Result<String, String> {
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map(|r| r.e_tag().unwrap_or_default().to_string())
        .map_err(|e| e.code().unwrap_or("?").to_string())
}

#[test]
fn rust_sdk_puts_lists_copies_and_uploads_in_parts() {
    let v = Vol::new("sdk-vol", &[]);
    let g = v.gateway("a", &[]);
    let b = g.bucket.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client(&g, SECRET_KEY);
        // A PUT (the SDK sends aws-chunked with a CRC32 trailer): the ETag is the MD5.
        let body = data(1, 5 * MIB + 3);
        let etag = put(&c, &b, "a/one.bin", body.clone()).await.unwrap();
        let md5 = {
            use md5::Digest;
            hex::encode(md5::Md5::digest(&body))
        };
        assert_eq!(etag, format!("\"{md5}\""));
        assert_eq!(get(&c, &b, "a/one.bin").await.unwrap(), body);
        let r = c
            .get_object()
            .bucket(&b)
            .key("a/one.bin")
            .range("bytes=100-199")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.body.collect().await.unwrap().into_bytes().to_vec(),
            body[100..200].to_vec()
        );

        // Multipart: three parts, the last one short; ListParts; the ETag has "-3".
        let up = c
            .create_multipart_upload()
            .bucket(&b)
            .key("big/model.bin")
            .send()
            .await
            .unwrap();
        let id = up.upload_id().unwrap().to_string();
        let parts: Vec<Vec<u8>> = vec![data(2, 5 * MIB), data(3, 5 * MIB), data(4, 1234)];
        let mut done = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let r = c
                .upload_part()
                .bucket(&b)
                .key("big/model.bin")
                .upload_id(&id)
                .part_number(i as i32 + 1)
                .body(ByteStream::from(p.clone()))
                .send()
                .await
                .unwrap();
            done.push(
                CompletedPart::builder()
                    .part_number(i as i32 + 1)
                    .e_tag(r.e_tag().unwrap())
                    .build(),
            );
        }
        let listed = c
            .list_parts()
            .bucket(&b)
            .key("big/model.bin")
            .upload_id(&id)
            .send()
            .await
            .unwrap();
        assert_eq!(listed.parts().len(), 3);
        assert_eq!(listed.parts()[2].size(), Some(1234));
        // A wrong order is refused and changes nothing.
        let wrong = CompletedMultipartUpload::builder()
            .set_parts(Some(vec![done[1].clone(), done[0].clone()]))
            .build();
        let e = c
            .complete_multipart_upload()
            .bucket(&b)
            .key("big/model.bin")
            .upload_id(&id)
            .multipart_upload(wrong)
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("InvalidPartOrder"));
        let r = c
            .complete_multipart_upload()
            .bucket(&b)
            .key("big/model.bin")
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert!(r.e_tag().unwrap().ends_with("-3\""), "{:?}", r.e_tag());
        assert_eq!(get(&c, &b, "big/model.bin").await.unwrap(), parts.concat());
        // The upload is gone; aborting another removes its parts.
        let e = c
            .list_parts()
            .bucket(&b)
            .key("big/model.bin")
            .upload_id(&id)
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("NoSuchUpload"));
        let up2 = c
            .create_multipart_upload()
            .bucket(&b)
            .key("big/aborted.bin")
            .send()
            .await
            .unwrap();
        let id2 = up2.upload_id().unwrap();
        // UploadPartCopy of a range of an existing object.
        let pc = c
            .upload_part_copy()
            .bucket(&b)
            .key("big/aborted.bin")
            .upload_id(id2)
            .part_number(1)
            .copy_source(format!("{b}/a/one.bin"))
            .copy_source_range("bytes=10-1009")
            .send()
            .await
            .unwrap();
        assert!(pc.copy_part_result().and_then(|r| r.e_tag()).is_some());
        c.abort_multipart_upload()
            .bucket(&b)
            .key("big/aborted.bin")
            .upload_id(id2)
            .send()
            .await
            .unwrap();
        assert_eq!(
            get(&c, &b, "big/aborted.bin").await.unwrap_err(),
            "NoSuchKey"
        );

        // Copy, then list: the reserved directory never shows.
        c.copy_object()
            .bucket(&b)
            .key("copies/one.bin")
            .copy_source(format!("{b}/a/one.bin"))
            .send()
            .await
            .unwrap();
        assert_eq!(get(&c, &b, "copies/one.bin").await.unwrap(), body);
        let r = c.list_objects_v2().bucket(&b).send().await.unwrap();
        let keys: Vec<&str> = r.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, vec!["a/one.bin", "big/model.bin", "copies/one.bin"]);
        let r = c
            .list_objects_v2()
            .bucket(&b)
            .delimiter("/")
            .send()
            .await
            .unwrap();
        let prefixes: Vec<&str> = r
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix())
            .collect();
        assert_eq!(prefixes, vec!["a/", "big/", "copies/"]);

        // Readers never see a partial object while it is replaced.
        let key = "race/obj";
        put(&c, &b, key, vec![b'a'; 3 * MIB]).await.unwrap();
        let writer = {
            let c = c.clone();
            let b = b.clone();
            tokio::spawn(async move {
                for i in 0..6 {
                    let fill = if i % 2 == 0 { b'b' } else { b'a' };
                    put(&c, &b, key, vec![fill; 3 * MIB]).await.unwrap();
                }
            })
        };
        while !writer.is_finished() {
            let got = get(&c, &b, key).await.unwrap();
            assert_eq!(got.len(), 3 * MIB);
            assert!(
                got.iter().all(|x| *x == got[0]),
                "a GET saw a mix of two versions"
            );
        }
        writer.await.unwrap();

        // DeleteObjects, and errors.
        let del = Delete::builder()
            .set_objects(Some(vec![
                ObjectIdentifier::builder()
                    .key("a/one.bin")
                    .build()
                    .unwrap(),
                ObjectIdentifier::builder().key(key).build().unwrap(),
            ]))
            .build()
            .unwrap();
        let r = c
            .delete_objects()
            .bucket(&b)
            .delete(del)
            .send()
            .await
            .unwrap();
        assert_eq!(r.deleted().len(), 2);
        assert_eq!(get(&c, &b, "a/one.bin").await.unwrap_err(), "NoSuchKey");
        let bad = client(&g, "not-the-secret");
        assert_eq!(
            get(&bad, &b, "copies/one.bin").await.unwrap_err(),
            "AccessDenied"
        );
    });
    // The temporary files of the PUTs are gone.
    let mnt = v.path().join("mnt");
    let m = TestMount::new(BIN, &v.meta, &mnt, &[]);
    let tmp: Vec<_> = fs::read_dir(mnt.join(".strata-gateway/tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "left behind: {tmp:?}");
    let uploads: Vec<_> = fs::read_dir(mnt.join(".strata-gateway/uploads"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(uploads.is_empty(), "uploads left behind: {uploads:?}");
    drop(m);
}

#[test]
fn read_only_gateways_refuse_writes_and_subdir_gateways_stay_inside() {
    let v = Vol::new("scoped", &[]);
    let rw = v.gateway("rw", &[]);
    let b = rw.bucket.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client(&rw, SECRET_KEY);
    rt.block_on(async {
        put(&c, &b, "team-a/x.txt", b"inside".to_vec())
            .await
            .unwrap();
        put(&c, &b, "team-b/y.txt", b"outside".to_vec())
            .await
            .unwrap();
    });
    let ro = v.gateway("ro", &["--read-only"]);
    let sub = v.gateway("sub", &["--subdir", "team-a"]);
    rt.block_on(async {
        let r = client(&ro, SECRET_KEY);
        assert_eq!(get(&r, &b, "team-a/x.txt").await.unwrap(), b"inside");
        assert_eq!(
            put(&r, &b, "team-a/new.txt", b"no".to_vec())
                .await
                .unwrap_err(),
            "AccessDenied"
        );
        let e = r
            .delete_object()
            .bucket(&b)
            .key("team-a/x.txt")
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("AccessDenied"));
        let e = r
            .create_multipart_upload()
            .bucket(&b)
            .key("team-a/mp")
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("AccessDenied"));
        assert_eq!(get(&c, &b, "team-a/x.txt").await.unwrap(), b"inside");

        // --subdir: keys are below team-a, nothing above it can be named.
        let s = client(&sub, SECRET_KEY);
        assert_eq!(get(&s, &b, "x.txt").await.unwrap(), b"inside");
        assert_eq!(
            get(&s, &b, "../team-b/y.txt").await.unwrap_err(),
            "NoSuchKey"
        );
        assert_eq!(get(&s, &b, "team-b/y.txt").await.unwrap_err(), "NoSuchKey");
        let r = s.list_objects_v2().bucket(&b).send().await.unwrap();
        let keys: Vec<&str> = r.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, vec!["x.txt"]);
        put(&s, &b, "made/here.txt", b"via subdir".to_vec())
            .await
            .unwrap();
        assert_eq!(
            get(&c, &b, "team-a/made/here.txt").await.unwrap(),
            b"via subdir"
        );
        assert!(
            put(&s, &b, "../escape.txt", b"no".to_vec()).await.is_err(),
            "a key with .. is refused"
        );
        assert_eq!(get(&c, &b, "escape.txt").await.unwrap_err(), "NoSuchKey");
    });
    drop((rw, ro, sub));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A counter of a /metrics endpoint (sum over the samples of the series `prefix`, whatever
/// their other labels).
fn metric(port: u16, prefix: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .filter(|l| strata::testing::sample_matches(l, prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn store_gets(port: u16) -> u64 {
    metric(port, "strata_object_requests_total{op=\"get\"}")
}

#[test]
fn two_gateways_in_a_cache_group_fetch_each_block_once_for_64_readers() {
    // 1 MiB blocks: a 16 MiB file is 16 block objects.
    let v = Vol::new("shared", &["--block-size", "1024"]);
    let body = data(9, 16 * MIB);
    {
        // Written by a gateway of its own that keeps nothing cached, then stopped: the file
        // is cold for the group.
        let w = v.gateway("writer", &["--cache-size", "0"]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(put(
            &client(&w, SECRET_KEY),
            &w.bucket,
            "models/cold.bin",
            body.clone(),
        ))
        .unwrap();
    }
    let blocks = v.objects() as u64;
    assert!(blocks >= 16, "{blocks} objects");
    let ports = [free_port(), free_port()];
    let member = |name: &str, port: u16| {
        let metrics = format!("127.0.0.1:{port}");
        v.gateway(
            name,
            &[
                "--cache-group",
                "g",
                "--cache-group-addr",
                "127.0.0.1:0",
                "--metrics",
                &metrics,
            ],
        )
    };
    let a = member("a", ports[0]);
    let b = member("b", ports[1]);
    // Membership is re-read every 2 s.
    std::thread::sleep(Duration::from_secs(4));
    let base: u64 = ports.iter().map(|p| store_gets(*p)).sum();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clients = [client(&a, SECRET_KEY), client(&b, SECRET_KEY)];
        let mut tasks = Vec::new();
        for i in 0..64 {
            let c = clients[i % 2].clone();
            let bucket = a.bucket.clone();
            tasks.push(tokio::spawn(async move {
                get(&c, &bucket, "models/cold.bin").await
            }));
        }
        for t in tasks {
            let got = t.await.unwrap().unwrap();
            assert!(got == body, "a reader got other bytes");
        }
    });
    let total: u64 = ports.iter().map(|p| store_gets(*p)).sum::<u64>() - base;
    let peer_errors: Vec<u64> = ports
        .iter()
        .map(|p| metric(*p, "strata_cache_peer_errors_total"))
        .collect();
    assert_eq!(
        total,
        blocks,
        "one store GET per block for both gateways together (peer errors {peer_errors:?}); logs:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    let served: u64 = ports
        .iter()
        .map(|p| {
            metric(
                *p,
                "strata_gateway_requests_total{op=\"GetObject\",status=\"200\"}",
            )
        })
        .sum();
    assert_eq!(served, 64, "per-operation metrics count the GETs");
}

#[test]
fn an_error_answered_before_the_body_closes_the_connection() {
    let v = Vol::new("raw-http", &[]);
    let g = v.gateway("a", &[]);
    let mut s = std::net::TcpStream::connect(g.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // An unsigned PUT whose body comes after the answer: refused, and the connection is
    // closed so that the late body is not read as the next request.
    s.write_all(
        format!(
            "PUT /{}/k HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\n\r\n",
            g.bucket, g.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("<code>accessdenied</code>"), "{head}");
    let _ = s.write_all(b"hello");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "no second answer on the connection"
    );
}
