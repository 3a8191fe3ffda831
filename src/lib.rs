//! rbdfence: fail-closed fencing of VMs on Ceph RBD for HA managers.
//!
//! `rbd` is the native librados layer (the only module with `unsafe`); `cli` is the
//! command line.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod fence;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod rbd;
pub mod serve;
pub mod service;
