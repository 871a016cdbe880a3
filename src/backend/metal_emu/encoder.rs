//! `EmuEncoder`: the emulator's `ComputeEncoder`. Bindings persist across dispatches as on Metal;
//! each dispatch runs to completion before it returns and is recorded for tests.

use super::ffi;
use super::library::{EmuError, EmuKernel, EmuLibrary};
use crate::backend::encoder::{ComputeEncoder, MAX_BINDINGS, MAX_THREADGROUP_MEMORY};
use crate::error::{Error, Result};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Element types that accept every bit pattern, so a kernel may write them freely.
pub trait Plain: Copy + private::Sealed {}
mod private {
    pub trait Sealed {}
}
macro_rules! plain {
    ($($t:ty),*) => { $(impl private::Sealed for $t {} impl Plain for $t {})* };
}
plain!(
    u8,
    i8,
    u16,
    i16,
    u32,
    i32,
    u64,
    i64,
    f32,
    f64,
    half::f16,
    half::bf16
);

/// Device memory bound to a kernel: a byte range the kernel may read and write for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct EmuBuffer<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> EmuBuffer<'a> {
    /// A buffer over `data` (numbers of any plain type).
    pub fn new<T: Plain>(data: &'a mut [T]) -> Self {
        let len = std::mem::size_of_val(data);
        EmuBuffer {
            ptr: NonNull::new(data.as_mut_ptr().cast::<u8>()).unwrap_or(NonNull::dangling()),
            len,
            _life: PhantomData,
        }
    }

    /// A buffer over raw memory (a pool's allocation).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for `'a`, and nothing else may
    /// access that memory while a dispatch that binds it runs.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        EmuBuffer {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len,
            _life: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Order in which a group's threads are started and resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sched {
    /// Thread 0 first.
    Forward,
    /// Last thread first: a kernel missing a barrier tends to read unwritten (NaN) memory.
    Reverse,
}

impl Sched {
    /// `MOEFLUX_EMU_SCHED` (`forward` when unset; `reverse` or `rev`).
    pub fn from_env() -> Result<Sched> {
        match std::env::var("MOEFLUX_EMU_SCHED")
            .ok()
            .as_deref()
            .map(str::trim)
        {
            None | Some("") | Some("forward") | Some("fwd") => Ok(Sched::Forward),
            Some("reverse") | Some("rev") => Ok(Sched::Reverse),
            Some(other) => Err(Error::Backend {
                backend: "metal-emu".into(),
                msg: format!("MOEFLUX_EMU_SCHED={other}: expected `forward` or `reverse`"),
            }),
        }
    }
}

/// What a dispatch had bound at one index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundRecord {
    Buffer { index: u32, offset: u64, len: u64 },
    Bytes { index: u32, bytes: Vec<u8> },
}

/// One recorded dispatch: kernel, geometry and bindings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchRecord {
    pub kernel: String,
    pub groups: [u32; 3],
    pub threads_per_group: [u32; 3],
    /// Threads per grid (`groups * threads_per_group` for `dispatch_threadgroups`).
    pub threads: [u32; 3],
    pub bindings: Vec<BoundRecord>,
    /// `(index, length)` of each dynamic threadgroup allocation.
    pub threadgroup_memory: Vec<(u32, u64)>,
}

#[derive(Clone)]
enum Slot {
    Unbound,
    Buffer {
        ptr: NonNull<u8>,
        len: usize,
        offset: u64,
    },
    // u128 storage keeps set_bytes data 16-byte aligned, as a `constant T&` may need.
    Bytes {
        data: Vec<u128>,
        len: usize,
    },
    Invalid(String),
}

/// The emulator's compute encoder.
pub struct EmuEncoder<'a> {
    kernel: Option<EmuKernel>,
    slots: Vec<Slot>,
    tg_mem: [u64; MAX_BINDINGS as usize],
    sched: Sched,
    workers: u32,
    records: Vec<DispatchRecord>,
    stats: ffi::Stats,
    /// A misuse seen while binding (bad index, bad env); reported by the next dispatch.
    misuse: Option<String>,
    _life: PhantomData<EmuBuffer<'a>>,
}

impl Default for EmuEncoder<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> EmuEncoder<'a> {
    /// An encoder with nothing bound; the schedule comes from `MOEFLUX_EMU_SCHED` (an invalid
    /// value makes every dispatch fail).
    pub fn new() -> Self {
        let (sched, bad) = match Sched::from_env() {
            Ok(s) => (s, None),
            Err(e) => (Sched::Forward, Some(e.to_string())),
        };
        EmuEncoder {
            kernel: None,
            slots: vec![Slot::Unbound; MAX_BINDINGS as usize],
            tg_mem: [0; MAX_BINDINGS as usize],
            sched,
            workers: 0,
            records: Vec::new(),
            stats: ffi::Stats::default(),
            misuse: bad,
            _life: PhantomData,
        }
    }

    /// Override the schedule (tests run both orders without touching the environment).
    pub fn set_sched(&mut self, sched: Sched) {
        self.sched = sched;
    }

    /// Cap the OS threads of later dispatches (1: run every group on the calling thread).
    pub fn set_workers(&mut self, workers: u32) {
        self.workers = workers;
    }

    /// Every dispatch run so far, in order.
    pub fn dispatches(&self) -> &[DispatchRecord] {
        &self.records
    }

    /// Counters of the last dispatch (threads, groups, barriers, collectives, fiber switches).
    pub fn last_stats(&self) -> ffi::Stats {
        self.stats
    }

    /// Unbind `[[buffer(index)]]` (Metal never needs this; tests of the unbound check do).
    pub fn unbind(&mut self, index: u32) {
        if let Some(s) = self.slots.get_mut(index as usize) {
            *s = Slot::Unbound;
        }
    }

    fn slot_mut(&mut self, index: u32, what: &str) -> Option<&mut Slot> {
        if index >= MAX_BINDINGS {
            self.misuse = Some(format!(
                "{what}: index {index} is outside 0..{MAX_BINDINGS}"
            ));
            return None;
        }
        Some(&mut self.slots[index as usize])
    }

    fn err(&self, msg: impl Into<String>) -> EmuError {
        EmuError {
            kernel: self
                .kernel
                .map(|k| k.name().to_string())
                .unwrap_or_default(),
            message: msg.into(),
            file: String::new(),
            line: 0,
        }
    }

    /// `dispatch_threadgroups` with the structured error.
    pub fn try_dispatch_threadgroups(
        &mut self,
        groups: [u32; 3],
        tg: [u32; 3],
    ) -> Result<(), EmuError> {
        let threads = [0, 1, 2].map(|i| groups[i].saturating_mul(tg[i]));
        if (0..3).any(|i| groups[i] as u64 * tg[i] as u64 > u32::MAX as u64) {
            return Err(self.err("grid larger than 2^32 threads in a dimension"));
        }
        self.run(groups, tg, threads)
    }

    /// `dispatch_threads` with the structured error.
    pub fn try_dispatch_threads(
        &mut self,
        threads: [u32; 3],
        tg: [u32; 3],
    ) -> Result<(), EmuError> {
        if tg.contains(&0) {
            return Err(self.err("threads per threadgroup has a zero dimension"));
        }
        let groups = [0, 1, 2].map(|i| threads[i].div_ceil(tg[i]));
        self.run(groups, tg, threads)
    }

    fn run(&mut self, groups: [u32; 3], tg: [u32; 3], threads: [u32; 3]) -> Result<(), EmuError> {
        let kernel = self
            .kernel
            .ok_or_else(|| self.err("dispatch without set_pipeline"))?;
        if let Some(msg) = &self.misuse {
            return Err(self.err(msg.clone()));
        }
        let mut desc = ffi::DispatchDesc {
            kernel: kernel.index,
            groups,
            tg,
            threads,
            sched: match self.sched {
                Sched::Forward => 0,
                Sched::Reverse => 1,
            },
            workers: self.workers,
            tg_mem: self.tg_mem,
            buffers: [ffi::Binding::NONE; MAX_BINDINGS as usize],
        };
        let mut bindings = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let index = i as u32;
            match slot {
                Slot::Unbound => {}
                Slot::Invalid(msg) => return Err(self.err(msg.clone())),
                Slot::Buffer { ptr, len, offset } => {
                    // SAFETY: set_buffer checked offset <= len.
                    let p = unsafe { ptr.as_ptr().add(*offset as usize) };
                    desc.buffers[i] = ffi::Binding {
                        ptr: p.cast(),
                        len: *len as u64 - offset,
                        kind: ffi::BUFFER,
                        _pad: 0,
                    };
                    bindings.push(BoundRecord::Buffer {
                        index,
                        offset: *offset,
                        len: *len as u64,
                    });
                }
                Slot::Bytes { data, len } => {
                    desc.buffers[i] = ffi::Binding {
                        ptr: data.as_ptr() as *mut std::ffi::c_void,
                        len: *len as u64,
                        kind: ffi::BYTES,
                        _pad: 0,
                    };
                    // SAFETY: `data` holds at least `len` initialised bytes.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), *len) };
                    bindings.push(BoundRecord::Bytes {
                        index,
                        bytes: bytes.to_vec(),
                    });
                }
            }
        }
        self.records.push(DispatchRecord {
            kernel: kernel.name().to_string(),
            groups,
            threads_per_group: tg,
            threads,
            bindings,
            threadgroup_memory: (0..MAX_BINDINGS)
                .filter(|&i| self.tg_mem[i as usize] > 0)
                .map(|i| (i, self.tg_mem[i as usize]))
                .collect(),
        });
        let mut info = ffi::ErrorInfo {
            kernel: [0; 128],
            file: [0; 256],
            line: 0,
            message: [0; 1024],
        };
        let mut stats = ffi::Stats::default();
        // SAFETY: every bound pointer is valid for its length for 'a (EmuBuffer's contract) or
        // points into this encoder's set_bytes storage, which outlives the call.
        let rc = unsafe { ffi::msl_emu_dispatch(&desc, &mut info, &mut stats) };
        self.stats = stats;
        if rc == 0 {
            return Ok(());
        }
        let kernel_name = ffi::c_array_str(&info.kernel);
        Err(EmuError {
            kernel: if kernel_name.is_empty() {
                kernel.name().to_string()
            } else {
                kernel_name
            },
            message: ffi::c_array_str(&info.message),
            file: ffi::c_array_str(&info.file),
            line: info.line.max(0) as u32,
        })
    }
}

impl<'a> ComputeEncoder for EmuEncoder<'a> {
    type Buffer = EmuBuffer<'a>;

    fn set_pipeline(&mut self, name: &str) -> Result<()> {
        self.kernel = Some(EmuLibrary::get().kernel(name)?);
        Ok(())
    }

    fn set_buffer(&mut self, index: u32, buffer: &EmuBuffer<'a>, offset: u64) {
        let Some(slot) = self.slot_mut(index, "set_buffer") else {
            return;
        };
        *slot = if offset > buffer.len as u64 {
            Slot::Invalid(format!(
                "set_buffer({index}): offset {offset} is past the end of a {}-byte buffer",
                buffer.len
            ))
        } else {
            Slot::Buffer {
                ptr: buffer.ptr,
                len: buffer.len,
                offset,
            }
        };
    }

    fn set_bytes(&mut self, index: u32, bytes: &[u8]) {
        let Some(slot) = self.slot_mut(index, "set_bytes") else {
            return;
        };
        let mut data = vec![0u128; bytes.len().div_ceil(16).max(1)];
        // SAFETY: `data` has room for `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                data.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        *slot = if bytes.len() > 4096 {
            Slot::Invalid(format!(
                "set_bytes({index}): {} bytes; Metal allows at most 4096",
                bytes.len()
            ))
        } else {
            Slot::Bytes {
                data,
                len: bytes.len(),
            }
        };
    }

    fn set_threadgroup_memory_length(&mut self, index: u32, length: u64) {
        if index >= MAX_BINDINGS || length > MAX_THREADGROUP_MEMORY {
            self.misuse = Some(format!(
                "set_threadgroup_memory_length({index}, {length}): index must be < {MAX_BINDINGS} and \
                 length <= {MAX_THREADGROUP_MEMORY}"
            ));
            return;
        }
        self.tg_mem[index as usize] = length;
    }

    fn dispatch_threadgroups(
        &mut self,
        groups: [u32; 3],
        threads_per_group: [u32; 3],
    ) -> Result<()> {
        Ok(self.try_dispatch_threadgroups(groups, threads_per_group)?)
    }

    fn dispatch_threads(&mut self, threads: [u32; 3], threads_per_group: [u32; 3]) -> Result<()> {
        Ok(self.try_dispatch_threads(threads, threads_per_group)?)
    }
}
