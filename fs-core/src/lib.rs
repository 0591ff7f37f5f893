//! Strata file-system core: metadata engines, object storage, chunked data layout, VFS and
//! the FUSE adapter. See docs/ARCHITECTURE.md for the map.

pub mod accesslog;
pub mod cache;
pub mod chunk;
pub mod directio;
pub mod duration;
pub mod fuse;
pub mod fusefd;
pub mod gateway;
pub mod gc;
pub mod meta;
pub mod metrics;
pub mod mount;
pub mod object;
pub mod profile;
pub mod source;
pub mod stats;
pub mod sync;
pub mod testing;
pub mod tls;
pub mod vfs;
pub mod volume;

/// An error and its sources, `: `-separated, each said once ("error performing TLS handshake:
/// invalid peer certificate: …"; for the S3 SDK, without its debug dump).
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}
