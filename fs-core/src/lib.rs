//! Strata file-system core: metadata engines, object storage, chunked data layout, VFS and
//! the FUSE adapter. See docs/ARCHITECTURE.md for the map.

pub mod cache;
pub mod chunk;
pub mod fuse;
pub mod fusefd;
pub mod meta;
pub mod metrics;
pub mod mount;
pub mod object;
pub mod testing;
pub mod tls;
pub mod vfs;
pub mod volume;
