//! The CPU buffer pool: logical ids over owned (aligned, zero-filled) or borrowed host memory.
//!
//! The id bookkeeping and plan aliasing are the shared `SlotTable`'s. Kernels get byte slices
//! through `&self` (device memory is interior-mutable on every backend); the backend guarantees
//! that no two mutable slices of one op share a physical buffer (validation rejects two written
//! fields on one physical buffer, and reads of a buffer the op writes are copied).

use super::super::slots::{delegate_pool_info, PhysicalMem, SlotTable};
use super::super::{check_id, BufferPool};
use crate::error::{Error, Result};
use crate::graph::{Buf, BufId, Graph, Role};
use crate::plan::lifetime::PlanReport;
use std::alloc::Layout;
use std::any::Any;
use std::ptr::NonNull;

/// Default alignment of `alloc`: a cache line, enough for any SIMD load.
pub const DEFAULT_ALIGN: usize = 64;
/// Largest alignment `alloc_aligned` accepts.
pub const MAX_ALIGN: usize = 1 << 30;

enum Owner {
    Owned(Layout),
    /// Caller-owned memory kept alive by this object (an mmap, a NumPy array reference).
    Borrowed(#[allow(dead_code)] Box<dyn Any + Send + Sync>),
}

struct Physical {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    owner: Owner,
}

impl Drop for Physical {
    fn drop(&mut self) {
        if let Owner::Owned(layout) = self.owner {
            if layout.size() > 0 {
                // SAFETY: allocated with this layout in `Physical::owned`.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
            }
        }
    }
}

impl Physical {
    fn owned(bytes: usize, align: usize, label: &str) -> Result<Physical> {
        let layout = Layout::from_size_align(bytes, align).map_err(|e| Error::Alloc {
            label: label.to_string(),
            msg: format!("{bytes} bytes aligned to {align}: {e}"),
        })?;
        let ptr = if bytes == 0 {
            // A dangling but aligned pointer: never dereferenced for a zero-length slice.
            NonNull::new(align as *mut u8).expect("align is non-zero")
        } else {
            // SAFETY: non-zero size checked above.
            NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
                Error::Alloc {
                    label: label.to_string(),
                    msg: format!("out of memory allocating {bytes} bytes"),
                }
            })?
        };
        Ok(Physical {
            ptr,
            len: bytes,
            writable: true,
            owner: Owner::Owned(layout),
        })
    }
}

// SAFETY: an owned allocation of `len` bytes freed only on drop, or borrowed memory the caller of
// `register_borrowed_role` vouched for (valid while `owner` lives, writable only if `writable`).
unsafe impl PhysicalMem for Physical {
    fn len(&self) -> usize {
        self.len
    }
    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn is_borrowed(&self) -> bool {
        matches!(self.owner, Owner::Borrowed(_))
    }
}

/// Host-memory buffer pool of the CPU backend.
#[derive(Default)]
pub struct CpuBufferPool {
    table: SlotTable<Physical>,
}

// SAFETY: the raw pointers are owned allocations or memory whose owner is `Send + Sync`; the
// pool hands out slices only under the backend's aliasing discipline (module docs).
unsafe impl Send for CpuBufferPool {}
unsafe impl Sync for CpuBufferPool {}

impl CpuBufferPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adopt `len` bytes at `ptr` without copying; `owner` is kept alive as long as any id uses
    /// the memory. `writable = false` makes uploads and op writes into it errors.
    ///
    /// # Safety
    /// `ptr` must be valid for reads (and writes if `writable`) of `len` bytes for as long as
    /// `owner` lives, and nothing else may write it while the pool uses it.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn register_borrowed_role(
        &mut self,
        ptr: *mut u8,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Alloc {
            label: label.to_string(),
            msg: "register_borrowed: null pointer".to_string(),
        })?;
        let phys = Physical {
            ptr,
            len,
            writable,
            owner: Owner::Borrowed(owner),
        };
        Ok(self.table.push(phys, role, label, persistent))
    }

    /// Typed form of [`Self::register_borrowed_role`] for Rust callers (e.g. an mmap'd expert file).
    ///
    /// # Safety
    /// As for [`Self::register_borrowed_role`].
    pub unsafe fn register_borrowed<B: crate::graph::ConcreteBuf>(
        &mut self,
        ptr: *mut u8,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
        label: &str,
        persistent: bool,
    ) -> Result<BufId<B>> {
        self.register_borrowed_role(ptr, len, writable, owner, B::ROLE, label, persistent)
            .map(BufId::from_raw)
    }

    /// Base address of the memory behind an id (tests check alignment and zero-copy with it).
    pub fn address(&self, raw: u32) -> Result<usize> {
        self.table.address(raw)
    }

    /// Bytes of the logical buffer `raw`.
    ///
    /// # Safety
    /// No mutable slice of the same physical buffer may be alive.
    pub(crate) unsafe fn bytes(&self, raw: u32) -> Result<&[u8]> {
        self.table.bytes(raw, "read")
    }

    /// Mutable bytes of the logical buffer `raw`.
    ///
    /// # Safety
    /// No other slice of the same physical buffer may be alive while this one is.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, raw: u32) -> Result<&mut [u8]> {
        self.table.bytes_mut(raw, "write")
    }
}

delegate_pool_info!(CpuBufferPool, table);

impl BufferPool for CpuBufferPool {
    type Handle = [u8];

    fn alloc_role(
        &mut self,
        bytes: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        let phys = Physical::owned(bytes, DEFAULT_ALIGN, label)?;
        Ok(self.table.push(phys, role, label, persistent))
    }

    fn alloc_aligned_role(
        &mut self,
        bytes: usize,
        alignment: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        if !alignment.is_power_of_two() || alignment > MAX_ALIGN {
            return Err(Error::Alloc {
                label: label.to_string(),
                msg: format!("alignment {alignment} is not a power of two in 1..={MAX_ALIGN}"),
            });
        }
        let phys = Physical::owned(bytes, alignment.max(DEFAULT_ALIGN), label)?;
        Ok(self.table.push(phys, role, label, persistent))
    }

    fn handle<B: Buf>(&self, id: BufId<B>) -> Result<&[u8]> {
        check_id(self, id, "handle")?;
        // SAFETY: a shared view; the caller must not hold it across an `execute`.
        unsafe { self.bytes(id.raw()) }
    }

    fn upload_at<B: Buf>(&mut self, id: BufId<B>, offset: usize, host: &[u8]) -> Result<()> {
        self.table.upload_at(id, offset, host, "write")
    }

    fn download<B: Buf>(&self, id: BufId<B>, host: &mut [u8]) -> Result<()> {
        self.table.download(id, host)
    }

    fn reset_transient(&mut self) {
        self.table.reset_transient()
    }

    fn physical_buffer_count(&self) -> usize {
        self.table.physical_count()
    }

    fn commit_plan(&mut self, graph: &Graph, alias: bool) -> Result<PlanReport> {
        self.table.commit_plan(graph, alias, |bytes, label| {
            Physical::owned(bytes, DEFAULT_ALIGN, label)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::PoolInfo;
    use crate::graph::{ActBuf, ExpertBaseBuf, ResidualBuf};

    #[test]
    fn alloc_is_zeroed_and_prefix_semantics_hold() {
        let mut p = CpuBufferPool::new();
        let id: BufId<ActBuf> = p.alloc(16, "x", false).unwrap();
        let mut out = [1u8; 16];
        p.download(id, &mut out).unwrap();
        assert_eq!(out, [0u8; 16]);
        p.upload(id, &[7u8; 8]).unwrap();
        let mut head = [0u8; 10];
        p.download(id, &mut head).unwrap();
        assert_eq!(&head[..8], &[7u8; 8]);
        assert_eq!(head[8], 0);
        assert!(matches!(
            p.upload(id, &[0u8; 17]),
            Err(Error::SizeMismatch { .. })
        ));
        assert!(matches!(
            p.upload_at(id, 10, &[0u8; 7]),
            Err(Error::SizeMismatch { .. })
        ));
        assert!(matches!(
            p.download(id, &mut [0u8; 17]),
            Err(Error::SizeMismatch { .. })
        ));
        p.upload_at(id, 12, &[9u8; 4]).unwrap();
    }

    #[test]
    fn bad_ids_and_roles_are_errors() {
        let mut p = CpuBufferPool::new();
        let bogus: BufId<ActBuf> = BufId::from_raw(3);
        assert!(matches!(
            p.upload(bogus, &[0]),
            Err(Error::PoolBadId { id: 3, .. })
        ));
        let r: BufId<ResidualBuf> = p.alloc(4, "r", false).unwrap();
        let wrong: BufId<ActBuf> = BufId::from_raw(r.raw());
        assert!(matches!(
            p.download(wrong, &mut [0u8; 4]),
            Err(Error::Role { .. })
        ));
    }

    #[test]
    fn alloc_aligned_checks_and_aligns() {
        let mut p = CpuBufferPool::new();
        let id: BufId<ExpertBaseBuf> = p.alloc_aligned(4096, 2 << 20, "slot", true).unwrap();
        assert_eq!(p.address(id.raw()).unwrap() % (2 << 20), 0);
        assert!(p
            .alloc_aligned::<ExpertBaseBuf>(64, 3, "bad", true)
            .is_err());
        assert!(p
            .alloc_aligned::<ExpertBaseBuf>(usize::MAX - 8, 64, "huge", true)
            .is_err());
    }

    #[test]
    fn reset_transient_keeps_persistent_prefix() {
        let mut p = CpuBufferPool::new();
        let _a: BufId<ActBuf> = p.alloc(4, "a", true).unwrap();
        let _b: BufId<ActBuf> = p.alloc(4, "b", false).unwrap();
        let _c: BufId<ActBuf> = p.alloc(4, "c", true).unwrap();
        let _d: BufId<ActBuf> = p.alloc(4, "d", false).unwrap();
        p.reset_transient();
        assert_eq!(p.count(), 3);
        assert_eq!(p.physical_buffer_count(), 3);
    }

    #[test]
    fn borrowed_memory_is_zero_copy_and_read_only_when_asked() {
        let mut p = CpuBufferPool::new();
        let mut data = vec![5u8; 32].into_boxed_slice();
        let ptr = data.as_mut_ptr();
        let id: BufId<ExpertBaseBuf> = unsafe {
            p.register_borrowed(ptr, 32, false, Box::new(data), "experts", true)
                .unwrap()
        };
        assert_eq!(p.address(id.raw()).unwrap(), ptr as usize);
        assert!(p.upload(id, &[1]).is_err());
        let mut out = [0u8; 32];
        p.download(id, &mut out).unwrap();
        assert_eq!(out, [5u8; 32]);
    }
}
