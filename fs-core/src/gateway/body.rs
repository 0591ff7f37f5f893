//! Request bodies: `aws-chunked` decoding (signed chunks, trailing checksums), and the checks
//! of a whole body against what its headers promise (`Content-MD5`, `x-amz-content-sha256`,
//! `x-amz-checksum-*` as a header or a trailer, `x-amz-decoded-content-length`). The MD5 is
//! always computed: it is the object's ETag.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::HeaderMap;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::error::{Result, S3Error};
use super::sigv4::{ChunkChain, Payload, Verified};

/// A checksum algorithm of the `x-amz-checksum-*` family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Algo {
    /// The algorithm of a header name such as `x-amz-checksum-crc32`.
    pub fn of_header(name: &str) -> Option<Algo> {
        Some(match name.to_ascii_lowercase().as_str() {
            "x-amz-checksum-crc32" => Algo::Crc32,
            "x-amz-checksum-crc32c" => Algo::Crc32c,
            "x-amz-checksum-crc64nvme" => Algo::Crc64Nvme,
            "x-amz-checksum-sha1" => Algo::Sha1,
            "x-amz-checksum-sha256" => Algo::Sha256,
            _ => return None,
        })
    }
}

/// An incremental checksum.
pub enum Checksum {
    Crc32(crc32fast::Hasher),
    Crc32c(u32),
    Crc64Nvme(u64),
    Sha1(Box<sha1::Sha1>),
    Sha256(Box<Sha256>),
}

/// CRC-64/NVME (reflected polynomial 0x9a6c9329ac4bc9b5), table-driven.
fn crc64nvme_table() -> &'static [u64; 256] {
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u64;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x9a6c_9329_ac4b_c9b5
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    })
}

impl Checksum {
    pub fn new(a: Algo) -> Checksum {
        match a {
            Algo::Crc32 => Checksum::Crc32(crc32fast::Hasher::new()),
            Algo::Crc32c => Checksum::Crc32c(0),
            Algo::Crc64Nvme => Checksum::Crc64Nvme(!0),
            Algo::Sha1 => Checksum::Sha1(Box::default()),
            Algo::Sha256 => Checksum::Sha256(Box::default()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Checksum::Crc32(h) => h.update(data),
            Checksum::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
            Checksum::Crc64Nvme(c) => {
                let t = crc64nvme_table();
                for &b in data {
                    *c = t[((*c ^ b as u64) & 0xff) as usize] ^ (*c >> 8);
                }
            }
            Checksum::Sha1(h) => h.update(data),
            Checksum::Sha256(h) => h.update(data),
        }
    }

    /// The value as S3 sends it: base64 of the big-endian bytes.
    pub fn finish(self) -> String {
        let raw: Vec<u8> = match self {
            Checksum::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            Checksum::Crc32c(c) => c.to_be_bytes().to_vec(),
            Checksum::Crc64Nvme(c) => (!c).to_be_bytes().to_vec(),
            Checksum::Sha1(h) => h.finalize().to_vec(),
            Checksum::Sha256(h) => h.finalize().to_vec(),
        };
        B64.encode(raw)
    }
}

/// Longest chunk header or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most bytes of trailing headers accepted.
const MAX_TRAILERS: usize = 16 << 10;

enum State {
    /// Reading a chunk header line (`hex[;chunk-signature=…]`).
    Header,
    /// Reading `left` more bytes of chunk data.
    Data {
        left: u64,
    },
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last (empty) chunk: trailing header lines until an empty line.
    Trailers,
    Done,
}

/// Decoder of an `aws-chunked` body: feed it the raw body in pieces of any size, it gives
/// back the data as slices of those pieces (no copy), checks each chunk's signature when the
/// body is signed, and collects the trailing headers.
pub struct ChunkedDecoder {
    state: State,
    line: Vec<u8>,
    chain: Option<ChunkChain>,
    /// SHA-256 of the current chunk's data (signed bodies only).
    chunk_hash: Option<Sha256>,
    chunk_signature: String,
    trailers: Vec<(String, String)>,
    trailer_signature: Option<String>,
    trailer_bytes: usize,
    decoded: u64,
}

impl ChunkedDecoder {
    /// `chain`: check chunk signatures with it (signed streaming bodies).
    pub fn new(chain: Option<ChunkChain>) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Header,
            line: Vec::new(),
            chain,
            chunk_hash: None,
            chunk_signature: String::new(),
            trailers: Vec::new(),
            trailer_signature: None,
            trailer_bytes: 0,
            decoded: 0,
        }
    }

    /// Bytes of data decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    fn bad(msg: &str) -> S3Error {
        S3Error::IncompleteBody(format!("aws-chunked: {msg}"))
    }

    /// Take one line (up to CRLF) from `input` at `*pos` into `self.line`; true when complete.
    fn take_line(&mut self, input: &[u8], pos: &mut usize) -> Result<bool> {
        let rest = &input[*pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(k) => {
                self.line.extend_from_slice(&rest[..k]);
                *pos += k + 1;
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                if self.line.len() > MAX_LINE {
                    return Err(Self::bad("line too long"));
                }
                Ok(true)
            }
            None => {
                self.line.extend_from_slice(rest);
                *pos = input.len();
                if self.line.len() > MAX_LINE {
                    return Err(Self::bad("line too long"));
                }
                Ok(false)
            }
        }
    }

    fn start_chunk(&mut self) -> Result<()> {
        let line = std::str::from_utf8(&self.line).map_err(|_| Self::bad("bad chunk header"))?;
        let mut parts = line.split(';');
        let size = parts.next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| Self::bad(&format!("bad chunk size {size:?}")))?;
        self.chunk_signature.clear();
        for ext in parts {
            if let Some(sig) = ext.trim().strip_prefix("chunk-signature=") {
                self.chunk_signature = sig.to_string();
            }
        }
        if self.chain.is_some() {
            if self.chunk_signature.is_empty() {
                return Err(S3Error::AccessDenied(
                    "a chunk of a signed aws-chunked body has no signature".into(),
                ));
            }
            self.chunk_hash = Some(Sha256::new());
        }
        self.line.clear();
        if size == 0 {
            self.end_chunk()?;
            self.state = State::Trailers;
        } else {
            self.state = State::Data { left: size };
        }
        Ok(())
    }

    fn end_chunk(&mut self) -> Result<()> {
        if let (Some(chain), Some(h)) = (self.chain.as_mut(), self.chunk_hash.take()) {
            chain.check_chunk(&h.finalize(), &self.chunk_signature)?;
        }
        Ok(())
    }

    fn trailer_line(&mut self) -> Result<()> {
        if self.line.is_empty() {
            self.state = State::Done;
            return Ok(());
        }
        self.trailer_bytes += self.line.len();
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(Self::bad("trailers too large"));
        }
        let line = std::str::from_utf8(&self.line).map_err(|_| Self::bad("bad trailer"))?;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| Self::bad("trailer line without ':'"))?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        if name == "x-amz-trailer-signature" {
            self.trailer_signature = Some(value);
        } else {
            self.trailers.push((name, value));
        }
        self.line.clear();
        Ok(())
    }

    /// Decode `input`, pushing data slices to `out`.
    pub fn feed(&mut self, input: &Bytes, out: &mut Vec<Bytes>) -> Result<()> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Header => {
                    if self.take_line(input, &mut pos)? {
                        self.start_chunk()?;
                    }
                }
                State::Data { left } => {
                    let n = (left.min((input.len() - pos) as u64)) as usize;
                    let piece = input.slice(pos..pos + n);
                    if let Some(h) = self.chunk_hash.as_mut() {
                        h.update(&piece);
                    }
                    self.decoded += n as u64;
                    out.push(piece);
                    pos += n;
                    self.state = if left == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data {
                            left: left - n as u64,
                        }
                    };
                }
                State::DataEnd => {
                    if self.take_line(input, &mut pos)? {
                        if !self.line.is_empty() {
                            return Err(Self::bad("chunk data longer than its size"));
                        }
                        self.end_chunk()?;
                        self.state = State::Header;
                    }
                }
                State::Trailers => {
                    if self.take_line(input, &mut pos)? {
                        self.trailer_line()?;
                    }
                }
                State::Done => {
                    if input[pos..].iter().all(|b| b.is_ascii_whitespace()) {
                        pos = input.len();
                    } else {
                        return Err(Self::bad("data after the end of the body"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The body ended: check that it was complete (and the trailer signature, when signed
    /// with trailers). Returns the trailing headers.
    pub fn finish(mut self, signed_trailer: bool) -> Result<Vec<(String, String)>> {
        match self.state {
            State::Done => {}
            // The final empty line may be missing after the trailers.
            State::Trailers => {
                if !self.line.is_empty() {
                    self.trailer_line()?;
                }
            }
            _ => return Err(Self::bad("the body ended inside a chunk")),
        }
        if signed_trailer && !self.trailers.is_empty() {
            let chain = self.chain.as_ref().ok_or_else(|| Self::bad("no signer"))?;
            let sig = self.trailer_signature.as_deref().ok_or_else(|| {
                S3Error::AccessDenied("the trailer of a signed body has no signature".into())
            })?;
            let mut sorted = self.trailers.clone();
            sorted.sort();
            let canonical: String = sorted.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
            chain.check_trailer(&canonical, sig)?;
        }
        Ok(self.trailers)
    }
}

/// What a request promises about its body, from its headers and authentication.
pub struct BodyPlan {
    payload: Payload,
    chain: Option<ChunkChain>,
    content_md5: Option<Vec<u8>>,
    decoded_length: Option<u64>,
    header_checksum: Option<(Algo, String)>,
    trailer_checksum: Option<Algo>,
}

impl BodyPlan {
    /// The plan of a request. `verified` is consumed (its chunk signature chain moves here).
    pub fn new(headers: &HeaderMap, verified: &mut Verified) -> Result<BodyPlan> {
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let content_md5 = match h("content-md5") {
            Some(v) => Some(
                B64.decode(v.trim())
                    .ok()
                    .filter(|d| d.len() == 16)
                    .ok_or_else(|| S3Error::InvalidArgument("Content-MD5 is not valid".into()))?,
            ),
            None => None,
        };
        let decoded_length = match h("x-amz-decoded-content-length") {
            Some(v) => Some(v.trim().parse().map_err(|_| {
                S3Error::InvalidArgument("x-amz-decoded-content-length is not a number".into())
            })?),
            None => None,
        };
        if verified.payload.is_chunked() && decoded_length.is_none() {
            return Err(S3Error::InvalidRequest(
                "an aws-chunked body needs x-amz-decoded-content-length".into(),
            ));
        }
        let mut header_checksum = None;
        for (name, value) in headers {
            if let Some(a) = Algo::of_header(name.as_str())
                && let Ok(v) = value.to_str()
            {
                header_checksum = Some((a, v.trim().to_string()));
            }
        }
        let trailer_checksum = match h("x-amz-trailer") {
            Some(t) if verified.payload.is_chunked() => Some(
                Algo::of_header(t.trim())
                    .ok_or_else(|| S3Error::InvalidArgument(format!("x-amz-trailer {t:?}")))?,
            ),
            Some(_) => {
                return Err(S3Error::InvalidRequest(
                    "x-amz-trailer needs an aws-chunked body".into(),
                ));
            }
            None => None,
        };
        Ok(BodyPlan {
            payload: verified.payload.clone(),
            chain: verified.chain.take(),
            content_md5,
            decoded_length,
            header_checksum,
            trailer_checksum,
        })
    }

    /// A plan for a body with no promises but its length (tests, internal copies).
    pub fn plain() -> BodyPlan {
        BodyPlan {
            payload: Payload::Unsigned,
            chain: None,
            content_md5: None,
            decoded_length: None,
            header_checksum: None,
            trailer_checksum: None,
        }
    }
}

/// What a whole, checked body was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDigest {
    pub md5: [u8; 16],
    pub len: u64,
}

/// Reads a body through its plan: decodes, hashes, and checks at the end.
pub struct BodyReader {
    plan: BodyPlan,
    decoder: Option<ChunkedDecoder>,
    md5: Md5,
    sha256: Option<Sha256>,
    checksum: Option<Checksum>,
    len: u64,
}

impl BodyReader {
    pub fn new(mut plan: BodyPlan) -> BodyReader {
        let decoder = plan
            .payload
            .is_chunked()
            .then(|| ChunkedDecoder::new(plan.chain.take()));
        let sha256 = matches!(plan.payload, Payload::Sha256(_)).then(Sha256::new);
        let algo = plan
            .trailer_checksum
            .or(plan.header_checksum.as_ref().map(|(a, _)| *a));
        BodyReader {
            decoder,
            md5: Md5::new(),
            sha256,
            checksum: algo.map(Checksum::new),
            len: 0,
            plan,
        }
    }

    /// Feed raw body bytes; decoded data goes to `out`.
    pub fn feed(&mut self, raw: Bytes, out: &mut Vec<Bytes>) -> Result<()> {
        let start = out.len();
        match self.decoder.as_mut() {
            Some(d) => d.feed(&raw, out)?,
            None => out.push(raw),
        }
        for piece in &out[start..] {
            self.md5.update(piece);
            if let Some(h) = self.sha256.as_mut() {
                h.update(piece);
            }
            if let Some(c) = self.checksum.as_mut() {
                c.update(piece);
            }
            self.len += piece.len() as u64;
        }
        if let Some(n) = self.plan.decoded_length
            && self.len > n
        {
            return Err(S3Error::IncompleteBody(format!(
                "more than x-amz-decoded-content-length ({n}) bytes"
            )));
        }
        Ok(())
    }

    /// The body ended: check everything it promised.
    pub fn finish(self) -> Result<BodyDigest> {
        let trailers = match self.decoder {
            Some(d) => {
                let signed_trailer = matches!(
                    self.plan.payload,
                    Payload::StreamingSigned { trailer: true }
                );
                d.finish(signed_trailer)?
            }
            None => Vec::new(),
        };
        if let Some(n) = self.plan.decoded_length
            && n != self.len
        {
            return Err(S3Error::IncompleteBody(format!(
                "{} bytes received, x-amz-decoded-content-length says {n}",
                self.len
            )));
        }
        let md5: [u8; 16] = self.md5.finalize().into();
        if let Some(want) = &self.plan.content_md5
            && want.as_slice() != md5
        {
            return Err(S3Error::BadDigest("Content-MD5".into()));
        }
        if let (Some(h), Payload::Sha256(want)) = (self.sha256, &self.plan.payload)
            && hex::encode(h.finalize()) != *want
        {
            return Err(S3Error::ContentSha256Mismatch);
        }
        if let Some(c) = self.checksum {
            let got = c.finish();
            let want = match (self.plan.trailer_checksum, &self.plan.header_checksum) {
                (Some(a), _) => {
                    let name = trailer_name(a);
                    trailers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .ok_or_else(|| {
                            S3Error::IncompleteBody(format!("the trailer {name} is missing"))
                        })?
                }
                (None, Some((_, v))) => v.clone(),
                (None, None) => got.clone(),
            };
            if got != want {
                return Err(S3Error::BadDigest(format!(
                    "x-amz-checksum: {want} sent, {got} computed"
                )));
            }
        }
        Ok(BodyDigest { md5, len: self.len })
    }
}

fn trailer_name(a: Algo) -> &'static str {
    match a {
        Algo::Crc32 => "x-amz-checksum-crc32",
        Algo::Crc32c => "x-amz-checksum-crc32c",
        Algo::Crc64Nvme => "x-amz-checksum-crc64nvme",
        Algo::Sha1 => "x-amz-checksum-sha1",
        Algo::Sha256 => "x-amz-checksum-sha256",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(a: Algo, data: &[u8]) -> String {
        let mut c = Checksum::new(a);
        // In two pieces: incremental state must carry over.
        c.update(&data[..data.len() / 2]);
        c.update(&data[data.len() / 2..]);
        c.finish()
    }

    #[test]
    fn checksums_match_their_check_values() {
        // The standard check input of the CRC catalogue.
        let d = b"123456789";
        let be = |v: &[u8]| B64.encode(v);
        assert_eq!(checksum(Algo::Crc32, d), be(&0xcbf4_3926u32.to_be_bytes()));
        assert_eq!(checksum(Algo::Crc32c, d), be(&0xe306_9283u32.to_be_bytes()));
        assert_eq!(
            checksum(Algo::Crc64Nvme, d),
            be(&0xae8b_1486_0a79_9888u64.to_be_bytes())
        );
        assert_eq!(
            checksum(Algo::Sha256, b"abc"),
            be(
                &hex::decode("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                    .unwrap()
            )
        );
        assert_eq!(
            checksum(Algo::Sha1, b"abc"),
            be(&hex::decode("a9993e364706816aba3e25717850c26c9cd0d89d").unwrap())
        );
    }

    /// Data and trailers of a decoded body.
    type Decoded = (Vec<u8>, Vec<(String, String)>);

    /// Split `body` into pieces of `n` bytes and decode.
    fn decode(body: &[u8], n: usize, chain: Option<ChunkChain>) -> Result<Decoded> {
        let mut d = ChunkedDecoder::new(chain);
        let mut out = Vec::new();
        for piece in body.chunks(n.max(1)) {
            d.feed(&Bytes::copy_from_slice(piece), &mut out)?;
        }
        let trailers = d.finish(false)?;
        Ok((out.concat(), trailers))
    }

    fn unsigned_body(data: &[u8], chunk: usize, trailer: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for c in data.chunks(chunk) {
            b.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            b.extend_from_slice(c);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n");
        b.extend_from_slice(trailer.as_bytes());
        b.extend_from_slice(b"\r\n");
        b
    }

    #[test]
    fn unsigned_trailer_bodies_decode_whatever_the_piece_size() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let crc = checksum(Algo::Crc32, &data);
        let body = unsigned_body(&data, 65536, &format!("x-amz-checksum-crc32:{crc}\r\n"));
        for n in [1, 2, 3, 7, 100, 8192, 65538, body.len()] {
            let (got, trailers) = decode(&body, n, None).unwrap();
            assert_eq!(got, data, "pieces of {n}");
            assert_eq!(
                trailers,
                vec![("x-amz-checksum-crc32".to_string(), crc.clone())]
            );
        }
        // No trailers and no final empty line.
        let (got, t) = decode(b"3\r\nabc\r\n0\r\n", 2, None).unwrap();
        assert_eq!((got.as_slice(), t.len()), (&b"abc"[..], 0));
    }

    /// The signed streaming PUT of the SigV4 documentation: 64 KiB + 1 KiB of 'a'.
    fn documented_chain() -> ChunkChain {
        use super::super::sigv4::{Credentials, SignedRequest, verify};
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "s3.amazonaws.com"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "66560"),
            ("content-length", "66824"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
            ),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let req = SignedRequest {
            method: "PUT",
            raw_path: "/examplebucket/chunkObject.txt",
            raw_query: "",
            headers: &h,
            virtual_bucket: None,
        };
        let creds = Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        };
        verify(&req, &creds, 1_369_353_600).unwrap().chain.unwrap()
    }

    fn documented_body(tamper: bool) -> Vec<u8> {
        let mut b = Vec::new();
        for (size, sig) in [
            (
                65536,
                "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            ),
            (
                1024,
                "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            ),
            (
                0,
                "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
            ),
        ] {
            b.extend_from_slice(format!("{size:x};chunk-signature={sig}\r\n").as_bytes());
            let mut data = vec![b'a'; size];
            if tamper && size == 1024 {
                data[10] = b'b';
            }
            b.extend_from_slice(&data);
            b.extend_from_slice(b"\r\n");
        }
        b
    }

    #[test]
    fn signed_chunks_of_the_documented_example_decode_and_changes_are_refused() {
        let body = documented_body(false);
        for n in [1, 100, 65536, body.len()] {
            let (got, _) = decode(&body, n, Some(documented_chain())).unwrap();
            assert_eq!(got, vec![b'a'; 66560], "pieces of {n}");
        }
        let e = decode(&documented_body(true), 4096, Some(documented_chain())).unwrap_err();
        assert_eq!(e.code(), "AccessDenied");
        // A signed body whose chunks carry no signature.
        let unsigned = unsigned_body(&[b'a'; 10], 10, "");
        let e = decode(&unsigned, 4, Some(documented_chain())).unwrap_err();
        assert_eq!(e.code(), "AccessDenied");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"5\r\nabc",
            b"3\r\nabc\r\n",
            b"3\r\nabc\r\n0\r\n\r\nmore",
            b"3\r\nabc\r\n0\r\nno-colon\r\n\r\n",
        ] {
            assert!(
                decode(bad, 3, None).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn body_reader_checks_md5_sha256_length_and_trailer_checksum() {
        let data = b"hello, world".repeat(1000);
        let md5: [u8; 16] = Md5::digest(&data).into();
        let sha = hex::encode(Sha256::digest(&data));
        let read = |plan: BodyPlan, body: &[u8]| {
            let mut r = BodyReader::new(plan);
            let mut out = Vec::new();
            for p in body.chunks(1000) {
                r.feed(Bytes::copy_from_slice(p), &mut out)?;
            }
            let d = r.finish()?;
            Ok::<_, S3Error>((out.concat(), d))
        };
        let plan = |payload: Payload| BodyPlan {
            payload,
            ..BodyPlan::plain()
        };
        let (got, d) = read(plan(Payload::Sha256(sha.clone())), &data).unwrap();
        assert_eq!(
            (got.as_slice(), d.md5, d.len),
            (&data[..], md5, data.len() as u64)
        );
        let e = read(plan(Payload::Sha256(sha.clone())), &data[1..]).unwrap_err();
        assert_eq!(e.code(), "XAmzContentSHA256Mismatch");
        let mut p = BodyPlan::plain();
        p.content_md5 = Some(vec![0; 16]);
        assert_eq!(read(p, &data).unwrap_err().code(), "BadDigest");
        let mut p = BodyPlan::plain();
        p.header_checksum = Some((Algo::Crc32, checksum(Algo::Crc32, b"other")));
        assert_eq!(read(p, &data).unwrap_err().code(), "BadDigest");

        // aws-chunked with a CRC32C trailer, right and wrong.
        let crc = checksum(Algo::Crc32c, &data);
        let chunked = |crc: &str| {
            let mut p = plan(Payload::StreamingUnsignedTrailer);
            p.decoded_length = Some(data.len() as u64);
            p.trailer_checksum = Some(Algo::Crc32c);
            (
                p,
                unsigned_body(&data, 4000, &format!("x-amz-checksum-crc32c:{crc}\r\n")),
            )
        };
        let (p, body) = chunked(&crc);
        assert_eq!(read(p, &body).unwrap().0, data);
        let (p, body) = chunked("AAAAAA==");
        assert_eq!(read(p, &body).unwrap_err().code(), "BadDigest");
        let (mut p, body) = chunked(&crc);
        p.decoded_length = Some(5);
        assert_eq!(read(p, &body).unwrap_err().code(), "IncompleteBody");
    }
}
