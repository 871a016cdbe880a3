//! The slot buffer: one anonymous mapping, 2 MiB aligned, that every cached expert lives in.
//!
//! Populated at creation: a direct read into a never-touched page first faults it in (zeroing, and
//! with transparent huge pages possibly compaction), which halved the measured read bandwidth
//! into fresh slots (0.87 vs 1.7-1.9 GB/s, `BENCHMARKS.md`). The budget is committed up front.

use crate::error::{Error, Result};

/// Alignment of the slot buffer (a huge page; measured 3.6x faster DMA than 16 KiB on Apple
/// Silicon, see `original-design.md`).
pub const SLOT_ALIGN: usize = 2 << 20;

/// Owned, 2 MiB-aligned, zero-initialised host memory of `len` bytes.
#[derive(Debug)]
pub struct SlotMemory {
    ptr: *mut u8,
    len: usize,
    /// Bytes actually mapped from `ptr` (len rounded up to the page size).
    mapped: usize,
}

// SAFETY: plain memory; who writes which bytes when is governed by the store's slot states.
unsafe impl Send for SlotMemory {}
unsafe impl Sync for SlotMemory {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Fault in every page of a fresh mapping (`MADV_POPULATE_WRITE` where the kernel has it, else one
/// write per page).
fn populate(ptr: *mut u8, len: usize, page: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: the range is a mapping we own; populating it changes no contents.
    if unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } == 0 {
        return;
    }
    for off in (0..len).step_by(page) {
        // SAFETY: inside the fresh, writable mapping; writing the zero it already holds.
        unsafe { std::ptr::write_volatile(ptr.add(off), 0) };
    }
}

impl SlotMemory {
    /// Map `len` bytes (`len > 0`) aligned to [`SLOT_ALIGN`], zeroed and populated.
    pub fn new(len: usize, label: &str) -> Result<SlotMemory> {
        let fail = |msg: String| Error::Alloc {
            label: label.to_string(),
            msg,
        };
        if len == 0 {
            return Err(fail(
                "the expert slot buffer needs at least one slot".into(),
            ));
        }
        let page = page_size();
        let mapped = len
            .checked_add(page - 1)
            .map(|v| v / page * page)
            .ok_or_else(|| fail(format!("{len} bytes overflow")))?;
        let total = mapped
            .checked_add(SLOT_ALIGN)
            .ok_or_else(|| fail(format!("{len} bytes overflow")))?;
        // SAFETY: anonymous private mapping; no file, no fixed address.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANON,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(fail(format!(
                "mmap of {total} bytes failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = raw as usize;
        let start = base.div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
        // Return the unaligned head and the unused tail to the system.
        // SAFETY: both ranges lie inside the mapping just made and are page-aligned.
        unsafe {
            if start > base {
                libc::munmap(raw, start - base);
            }
            let end = start + mapped;
            if base + total > end {
                libc::munmap(end as *mut libc::c_void, base + total - end);
            }
        }
        populate(start as *mut u8, mapped, page);
        Ok(SlotMemory {
            ptr: start as *mut u8,
            len,
            mapped,
        })
    }

    /// First byte (aligned to [`SLOT_ALIGN`]).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the constructor refuses zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the range kept in `new`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.mapped);
        }
    }
}
