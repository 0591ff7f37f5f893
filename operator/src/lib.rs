//! Strata operator: Volume, Quota and CacheGroup custom resources (kube-rs controllers).
//!
//! Binaries are thin (`strata-operator`: CLI, metrics, leader election, controllers;
//! `crdgen`: CRD YAML); the logic lives in these modules.

pub mod cachegroup;
pub mod conditions;
pub mod context;
pub mod controller;
pub mod crd;
pub mod errors;
pub mod fsops;
pub mod leader;
pub mod metrics;
pub mod quota;
pub mod settings;
pub mod volume;
