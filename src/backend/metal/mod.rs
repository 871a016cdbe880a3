//! The Metal backend: the shaders of `shaders/metal/`, their parameter structs, and the encode
//! arms written once over `ComputeEncoder`, run by two targets: real Metal through metal-rs
//! (macOS, or any OS with `--features metal` for type-checking) and the MSL emulator
//! (`--features metal-emu`, `Backend("metal-emu")`), which runs the same arms on Linux.

pub mod encode;
pub mod kernels;
pub mod params;

#[cfg(feature = "metal-emu")]
mod emu;
#[cfg(feature = "metal-emu")]
pub use emu::{EmuEncodeCtx, MetalEmuBackend, MetalEmuConfig};

#[cfg(any(target_os = "macos", feature = "metal"))]
mod device;
#[cfg(any(target_os = "macos", feature = "metal"))]
pub use device::{
    MetalBackend, MetalBufferPool, MetalConfig, MetalEncodeCtx, MetalEncoder, MetalKernels,
};

pub use encode::Switches;

#[cfg(all(
    test,
    any(feature = "metal-emu", feature = "metal", target_os = "macos")
))]
mod tests;
