//! One module per command group.

pub mod daemon;
pub mod disk;
pub mod guest;
pub mod image;
pub mod operation;
pub mod ports;
pub mod snapshot;
pub mod vm;
pub mod workspace;
