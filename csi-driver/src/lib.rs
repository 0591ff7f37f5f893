//! Strata CSI driver (Identity, Controller and Node services over a unix socket). See
//! docs/CSI.md.

/// Generated from `proto/csi.proto` (CSI spec v1.12.0).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

pub mod controller;
pub mod errors;
pub mod identity;
pub mod locks;
pub mod mounter;
pub mod node;
pub mod params;
pub mod pod;
pub mod server;
