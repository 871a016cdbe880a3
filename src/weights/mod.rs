//! Weight files (mmap blob + JSON manifest) and MLX-compatible affine quantization.
pub mod file;
pub mod quant;
