//! Strata CSI driver (Identity, Controller and Node services over a unix socket).

/// Generated from `proto/csi.proto` (CSI spec v1.12.0).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}
