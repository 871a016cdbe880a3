//! The CPU buffer pool: logical ids over owned (aligned, zero-filled) or borrowed host memory.
//!
//! Ids index `slots`; each slot points at a physical buffer. Before `commit_plan` the mapping is
//! one to one; afterwards ids of one colour share a physical buffer and are pinned. Kernels get
//! byte slices through `&self` (device memory is interior-mutable on every backend); the backend
//! guarantees that no two mutable slices of one op share a physical buffer (validation rejects
//! two written fields on one physical buffer, and reads of a buffer the op writes are copied).

use super::super::{check_id, BufferPool, PoolInfo};
use crate::error::{Error, Result};
use crate::graph::{Buf, BufId, Graph, Role};
use crate::plan::lifetime::{
    analyze_lifetimes, check_layout, check_layout_with, greedy_color, peak_live_bytes, PlanReport,
};
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
    fn is_borrowed(&self) -> bool {
        matches!(self.owner, Owner::Borrowed(_))
    }
}

struct Slot {
    label: String,
    role: Role,
    bytes: usize,
    persistent: bool,
    /// Coloured by a committed plan: keeps its physical buffer across `reset_transient`.
    pinned: bool,
    physical: usize,
}

/// Host-memory buffer pool of the CPU backend.
#[derive(Default)]
pub struct CpuBufferPool {
    slots: Vec<Slot>,
    physicals: Vec<Physical>,
}

// SAFETY: the raw pointers are owned allocations or memory whose owner is `Send + Sync`; the
// pool hands out slices only under the backend's aliasing discipline (module docs).
unsafe impl Send for CpuBufferPool {}
unsafe impl Sync for CpuBufferPool {}

impl CpuBufferPool {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(
        &mut self,
        phys: Physical,
        bytes: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> u32 {
        self.physicals.push(phys);
        self.slots.push(Slot {
            label: label.to_string(),
            role,
            bytes,
            persistent,
            pinned: false,
            physical: self.physicals.len() - 1,
        });
        (self.slots.len() - 1) as u32
    }

    fn slot(&self, raw: u32, what: &'static str) -> Result<&Slot> {
        self.slots.get(raw as usize).ok_or(Error::PoolBadId {
            what,
            id: raw,
            count: self.slots.len(),
        })
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
        Ok(self.push(phys, len, role, label, persistent))
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
        let slot = self.slot(raw, "address")?;
        Ok(self.physicals[slot.physical].ptr.as_ptr() as usize)
    }

    /// Bytes of the logical buffer `raw`.
    ///
    /// # Safety
    /// No mutable slice of the same physical buffer may be alive.
    pub(crate) unsafe fn bytes(&self, raw: u32) -> Result<&[u8]> {
        let slot = self.slot(raw, "read")?;
        let phys = &self.physicals[slot.physical];
        Ok(std::slice::from_raw_parts(
            phys.ptr.as_ptr(),
            slot.bytes.min(phys.len),
        ))
    }

    /// Mutable bytes of the logical buffer `raw`.
    ///
    /// # Safety
    /// No other slice of the same physical buffer may be alive while this one is.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, raw: u32) -> Result<&mut [u8]> {
        let slot = self.slot(raw, "write")?;
        let phys = &self.physicals[slot.physical];
        if !phys.writable {
            return Err(Error::ReadOnly {
                label: slot.label.clone(),
                what: "write".into(),
            });
        }
        Ok(std::slice::from_raw_parts_mut(
            phys.ptr.as_ptr(),
            slot.bytes.min(phys.len),
        ))
    }

    /// Bytes of the distinct owned (not borrowed) physical buffers behind `ids`.
    fn owned_physical_bytes(&self, ids: impl Iterator<Item = usize>) -> u64 {
        let mut seen = std::collections::BTreeSet::new();
        ids.map(|i| self.slots[i].physical)
            .filter(|&p| !self.physicals[p].is_borrowed() && seen.insert(p))
            .map(|p| self.physicals[p].len as u64)
            .sum()
    }

    /// Drop physical buffers no slot references and renumber the rest, keeping order.
    fn collect_garbage(&mut self) {
        let mut used = vec![false; self.physicals.len()];
        for s in &self.slots {
            used[s.physical] = true;
        }
        let mut remap = vec![usize::MAX; self.physicals.len()];
        let old = std::mem::take(&mut self.physicals);
        for (i, p) in old.into_iter().enumerate() {
            if used[i] {
                remap[i] = self.physicals.len();
                self.physicals.push(p);
            }
        }
        for s in &mut self.slots {
            s.physical = remap[s.physical];
        }
    }
}

impl PoolInfo for CpuBufferPool {
    fn count(&self) -> usize {
        self.slots.len()
    }
    fn byte_size(&self, raw: u32) -> Option<usize> {
        self.slots.get(raw as usize).map(|s| s.bytes)
    }
    fn role(&self, raw: u32) -> Option<Role> {
        self.slots.get(raw as usize).map(|s| s.role)
    }
    fn label_of(&self, raw: u32) -> Option<&str> {
        self.slots.get(raw as usize).map(|s| s.label.as_str())
    }
    fn writable(&self, raw: u32) -> Option<bool> {
        self.slots
            .get(raw as usize)
            .map(|s| self.physicals[s.physical].writable)
    }
    fn persistent(&self, raw: u32) -> Option<bool> {
        self.slots.get(raw as usize).map(|s| s.persistent)
    }
    fn physical_of(&self, raw: u32) -> Option<u32> {
        self.slots.get(raw as usize).map(|s| s.physical as u32)
    }
}

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
        Ok(self.push(phys, bytes, role, label, persistent))
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
        Ok(self.push(phys, bytes, role, label, persistent))
    }

    fn handle<B: Buf>(&self, id: BufId<B>) -> Result<&[u8]> {
        check_id(self, id, "handle")?;
        // SAFETY: a shared view; the caller must not hold it across an `execute`.
        unsafe { self.bytes(id.raw()) }
    }

    fn upload_at<B: Buf>(&mut self, id: BufId<B>, offset: usize, host: &[u8]) -> Result<()> {
        check_id(self, id, "upload")?;
        let slot = &self.slots[id.raw() as usize];
        let end = offset.saturating_add(host.len());
        if end > slot.bytes {
            return Err(Error::SizeMismatch {
                label: slot.label.clone(),
                what: if offset == 0 {
                    "upload"
                } else {
                    "upload_at (offset + length)"
                },
                expected: slot.bytes,
                actual: end,
            });
        }
        // SAFETY: `&mut self` excludes every other view.
        let dst = unsafe { self.bytes_mut(id.raw())? };
        dst[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn download<B: Buf>(&self, id: BufId<B>, host: &mut [u8]) -> Result<()> {
        check_id(self, id, "download")?;
        let slot = &self.slots[id.raw() as usize];
        if host.len() > slot.bytes {
            return Err(Error::SizeMismatch {
                label: slot.label.clone(),
                what: "download",
                expected: slot.bytes,
                actual: host.len(),
            });
        }
        // SAFETY: shared view for the duration of the copy.
        let src = unsafe { self.bytes(id.raw())? };
        host.copy_from_slice(&src[..host.len()]);
        Ok(())
    }

    fn reset_transient(&mut self) {
        let keep = self
            .slots
            .iter()
            .rposition(|s| s.persistent || s.pinned)
            .map_or(0, |i| i + 1);
        self.slots.truncate(keep);
        self.collect_garbage();
    }

    fn physical_buffer_count(&self) -> usize {
        self.physicals.len()
    }

    fn commit_plan(&mut self, graph: &Graph, alias: bool) -> Result<PlanReport> {
        let lt = analyze_lifetimes(graph);
        let n = self.slots.len();
        for &raw in lt.intervals.keys() {
            self.slot(raw, "commit_plan")?;
        }
        let colorable = |raw: u32| {
            let s = &self.slots[raw as usize];
            !s.persistent && !s.pinned && !self.physicals[s.physical].is_borrowed()
        };
        let sizes = |raw: u32| self.slots[raw as usize].bytes;
        let coloring = greedy_color(&lt, sizes, colorable);
        let owned: Vec<bool> = self
            .slots
            .iter()
            .map(|s| !self.physicals[s.physical].is_borrowed())
            .collect();
        let logical: u64 = (0..n)
            .filter(|&i| owned[i])
            .map(|i| self.slots[i].bytes as u64)
            .sum();
        // Memory this plan cannot fold: the distinct physical buffers of owned ids it does not
        // colour (ids pinned by an earlier plan already share theirs).
        let fixed = self.owned_physical_bytes(
            (0..n).filter(|i| !coloring.bufid_to_color.contains_key(&(*i as u32))),
        );
        let peak = peak_live_bytes(&lt, &coloring, sizes);
        let mut report = PlanReport {
            logical_bytes: logical,
            physical_bytes: self.owned_physical_bytes(0..n),
            lower_bound_bytes: fixed + peak,
            aliased_buffers: 0,
            colors: 0,
        };
        if !alias {
            return Ok(report);
        }
        // Prove the new layout safe before touching anything: ids pinned by an earlier plan keep
        // their memory and must not conflict in this graph.
        let colour_key = |c: u32| (1u64 << 32) + c as u64;
        check_layout_with(
            graph,
            |raw| match coloring.bufid_to_color.get(&raw) {
                Some(&c) => Some(colour_key(c)),
                None => self.physical_of(raw).map(u64::from),
            },
            |raw| self.label_of(raw).unwrap_or("?").to_string(),
        )
        .map_err(Error::UnsafeAlias)?;
        let mut color_phys = Vec::with_capacity(coloring.color_bytes.len());
        for (c, &bytes) in coloring.color_bytes.iter().enumerate() {
            let phys = Physical::owned(bytes, DEFAULT_ALIGN, &format!("plan.color{c}"))?;
            self.physicals.push(phys);
            color_phys.push(self.physicals.len() - 1);
        }
        for (&raw, &c) in &coloring.bufid_to_color {
            let s = &mut self.slots[raw as usize];
            s.physical = color_phys[c as usize];
            s.pinned = true;
        }
        self.collect_garbage();
        debug_assert!(check_layout(graph, self).is_ok());
        report.physical_bytes = self.owned_physical_bytes(0..n);
        report.aliased_buffers = coloring.bufid_to_color.len() as u64;
        report.colors = coloring.color_bytes.len() as u64;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
