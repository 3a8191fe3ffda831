//! The fence engine.

pub mod ssh;
pub mod vm;
