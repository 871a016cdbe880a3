//! The C ABI of the emulator runtime (`emu/include/msl_emu_api.h`), mirrored field for field.

use std::os::raw::{c_char, c_void};

pub const MAX_BINDINGS: usize = 31;

pub const UNBOUND: u32 = 0;
pub const BUFFER: u32 = 1;
pub const BYTES: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Binding {
    pub ptr: *mut c_void,
    pub len: u64,
    pub kind: u32,
    pub _pad: u32,
}

impl Binding {
    pub const NONE: Binding = Binding {
        ptr: std::ptr::null_mut(),
        len: 0,
        kind: UNBOUND,
        _pad: 0,
    };
}

#[repr(C)]
pub struct DispatchDesc {
    pub kernel: u32,
    pub groups: [u32; 3],
    pub tg: [u32; 3],
    pub threads: [u32; 3],
    pub sched: u32,
    pub workers: u32,
    pub tg_mem: [u64; MAX_BINDINGS],
    pub buffers: [Binding; MAX_BINDINGS],
}

#[repr(C)]
pub struct ErrorInfo {
    pub kernel: [c_char; 128],
    pub file: [c_char; 256],
    pub line: i32,
    pub message: [c_char; 1024],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    pub threads: u64,
    pub groups: u64,
    pub barriers: u64,
    pub collectives: u64,
    pub switches: u64,
}

extern "C" {
    pub fn msl_emu_init();
    pub fn msl_emu_kernel_count() -> u32;
    pub fn msl_emu_kernel_name(index: u32) -> *const c_char;
    pub fn msl_emu_kernel_file(index: u32) -> *const c_char;
    pub fn msl_emu_kernel_line(index: u32) -> i32;
    pub fn msl_emu_dispatch(
        desc: *const DispatchDesc,
        err: *mut ErrorInfo,
        stats: *mut Stats,
    ) -> i32;
}

/// A NUL-terminated C string from a fixed array (lossy UTF-8).
pub fn c_array_str(a: &[c_char]) -> String {
    let bytes: Vec<u8> = a
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A NUL-terminated C string owned by the runtime (lossy UTF-8; empty for null).
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string.
pub unsafe fn c_ptr_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
}
