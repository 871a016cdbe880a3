//! moeflux: an op-graph engine for Qwen3-Next-family Mixture-of-Experts models.
//!
//! Layers: `graph` (the op IR, typed buffer ids, validation, dump), `plan` (device-free lifetime
//! planning), `backend` (the `Backend`/`BufferPool` traits and one folder per backend), `weights`
//! (weight files and MLX-compatible quantization), `io` (expert file streaming: direct reads into
//! a budgeted slot cache). PyO3 lives only in `python`.

pub mod backend;
pub mod error;
pub mod graph;
pub mod io;
pub mod plan;
pub mod weights;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
