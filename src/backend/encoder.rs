//! The compute-encoder interface every Metal `encode_op` arm talks to, so one arm runs on real
//! Metal (metal-rs) and on the Linux MSL emulator (`metal_emu::EmuEncoder`) unchanged.
//!
//! Semantics follow `MTLComputeCommandEncoder`: bindings persist across dispatches until
//! rebound; `set_bytes` copies at call time; a dispatch uses the pipeline and bindings current at
//! that moment. Indices are Metal argument-table slots (`0..MAX_BINDINGS`).

use crate::error::Result;

/// Argument-table slots per kind (buffers and threadgroup-memory entries) Metal guarantees.
pub const MAX_BINDINGS: u32 = 31;

/// Threadgroup memory per group Apple GPUs guarantee (static declarations plus dynamic lengths).
pub const MAX_THREADGROUP_MEMORY: u64 = 32 * 1024;

/// A compute encoder: pipeline selection, argument binding and dispatch.
pub trait ComputeEncoder {
    /// The device buffer bound with `set_buffer`: `metal::BufferRef` on Metal,
    /// `metal_emu::EmuBuffer` on the emulator.
    type Buffer: ?Sized;

    /// Select the kernel (pipeline) that later dispatches run, by its `[[host_name]]`/function name.
    fn set_pipeline(&mut self, name: &str) -> Result<()>;

    /// Bind `buffer` at `offset` bytes to `[[buffer(index)]]`.
    fn set_buffer(&mut self, index: u32, buffer: &Self::Buffer, offset: u64);

    /// Copy `bytes` into the argument table at `[[buffer(index)]]` (Metal's `setBytes`, < 4 KB).
    fn set_bytes(&mut self, index: u32, bytes: &[u8]);

    /// Length in bytes of the dynamic threadgroup allocation bound to `[[threadgroup(index)]]`.
    fn set_threadgroup_memory_length(&mut self, index: u32, length: u64);

    /// Dispatch `groups` threadgroups of `threads_per_group` threads each.
    fn dispatch_threadgroups(
        &mut self,
        groups: [u32; 3],
        threads_per_group: [u32; 3],
    ) -> Result<()>;

    /// Dispatch exactly `threads` threads in groups of `threads_per_group` (edge groups are
    /// partial, as with Metal's non-uniform threadgroups).
    fn dispatch_threads(&mut self, threads: [u32; 3], threads_per_group: [u32; 3]) -> Result<()>;

    /// `set_bytes` of a plain value (a `#[repr(C)]` parameter struct or a scalar).
    ///
    /// `T` must have no padding bytes and no pointers, as for any struct shared with a shader.
    fn set_value<T: Copy>(&mut self, index: u32, value: &T) {
        // SAFETY: `value` is a live `T`; the caller guarantees `T` has no padding (see above).
        let bytes = unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        self.set_bytes(index, bytes);
    }
}
