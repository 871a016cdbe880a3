//! Metal kernels on a Linux CPU: the MSL files compiled by `build.rs` through the emulator
//! (`emu/`), their registry (`EmuLibrary`) and `EmuEncoder`, the `ComputeEncoder` that runs them.
//!
//! Each dispatch runs synchronously: threadgroups over a few OS threads, a group's GPU threads as
//! fibers, so barriers and simdgroup collectives mean what they mean on the GPU. Kernel faults
//! and MSL rule violations come back as `Err` naming the kernel and the `.metal` line.
//! Environment: `MOEFLUX_EMU_SCHED=reverse` runs each group's threads in reverse order (exposes
//! missing barriers), `MOEFLUX_EMU_WORKERS=n` caps the OS threads, `MOEFLUX_EMU_STACK_KB` sizes
//! the per-thread stacks (64 KB).

mod encoder;
mod ffi;
mod library;

pub use encoder::{BoundRecord, DispatchRecord, EmuBuffer, EmuEncoder, Plain, Sched};
pub use ffi::Stats as EmuStats;
pub use library::{EmuError, EmuKernel, EmuLibrary, KernelInfo};

#[cfg(test)]
#[path = "../../../emu/rewrite.rs"]
mod rewrite;
