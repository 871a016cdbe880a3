//! The logical-id → physical-buffer table every buffer pool shares, generic over the memory type.
//!
//! Ids index `slots`; each slot points at a physical buffer. Before `commit_plan` the mapping is
//! one to one; afterwards ids of one colour share a physical buffer and are pinned. Backends
//! differ only in what a physical buffer is and how one is allocated.

use super::{check_id, PoolInfo};
use crate::error::{Error, Result};
use crate::graph::{Buf, BufId, Graph, Role};
use crate::plan::lifetime::{
    analyze_lifetimes, check_layout, check_layout_with, greedy_color, peak_live_bytes, PlanReport,
};

/// One physical buffer of host-visible memory.
///
/// # Safety
/// `ptr()` must be valid for reads of `len()` bytes (and writes if `writable()`) for as long as
/// the value lives, and must not move while it lives.
pub(crate) unsafe trait PhysicalMem {
    /// Usable bytes at `ptr()`.
    fn len(&self) -> usize;
    /// Start of the usable bytes.
    fn ptr(&self) -> *mut u8;
    /// Whether ops and uploads may write the memory.
    fn writable(&self) -> bool;
    /// Caller-owned memory: never coloured by a plan nor counted as pool memory.
    fn is_borrowed(&self) -> bool;
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

/// Logical ids over physical buffers `P`, with the pool semantics of `BufferPool`.
pub(crate) struct SlotTable<P> {
    slots: Vec<Slot>,
    physicals: Vec<P>,
}

impl<P> Default for SlotTable<P> {
    fn default() -> Self {
        SlotTable {
            slots: Vec::new(),
            physicals: Vec::new(),
        }
    }
}

impl<P: PhysicalMem> SlotTable<P> {
    /// Add `phys` as a new physical buffer behind a new id of `phys.len()` bytes.
    pub(crate) fn push(&mut self, phys: P, role: Role, label: &str, persistent: bool) -> u32 {
        let bytes = phys.len();
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

    /// The physical buffer behind `raw` (`what` names the caller in the unknown-id error).
    pub(crate) fn physical(&self, raw: u32, what: &'static str) -> Result<&P> {
        let slot = self.slot(raw, what)?;
        Ok(&self.physicals[slot.physical])
    }

    /// Base address of the memory behind an id.
    pub(crate) fn address(&self, raw: u32) -> Result<usize> {
        Ok(self.physical(raw, "address")?.ptr() as usize)
    }

    /// Number of physical buffers currently backing the ids.
    pub(crate) fn physical_count(&self) -> usize {
        self.physicals.len()
    }

    /// Bytes of the logical buffer `raw`.
    ///
    /// # Safety
    /// No mutable slice of the same physical buffer may be alive (nor, on a GPU, work using it).
    pub(crate) unsafe fn bytes(&self, raw: u32, what: &'static str) -> Result<&[u8]> {
        let slot = self.slot(raw, what)?;
        let phys = &self.physicals[slot.physical];
        Ok(std::slice::from_raw_parts(
            phys.ptr(),
            slot.bytes.min(phys.len()),
        ))
    }

    /// Mutable bytes of the logical buffer `raw`; read-only memory is an error naming `what`.
    ///
    /// # Safety
    /// No other slice of the same physical buffer may be alive while this one is (nor, on a GPU,
    /// work using it).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, raw: u32, what: &'static str) -> Result<&mut [u8]> {
        let slot = self.slot(raw, what)?;
        let phys = &self.physicals[slot.physical];
        if !phys.writable() {
            return Err(Error::ReadOnly {
                label: slot.label.clone(),
                what: what.into(),
            });
        }
        Ok(std::slice::from_raw_parts_mut(
            phys.ptr(),
            slot.bytes.min(phys.len()),
        ))
    }

    /// `BufferPool::upload_at`; writing read-only memory is an error naming `read_only_what`.
    pub(crate) fn upload_at<B: Buf>(
        &mut self,
        id: BufId<B>,
        offset: usize,
        host: &[u8],
        read_only_what: &'static str,
    ) -> Result<()> {
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
        // SAFETY: `&mut self` excludes every other view (and, on a GPU, work in flight).
        let dst = unsafe { self.bytes_mut(id.raw(), read_only_what)? };
        dst[offset..end].copy_from_slice(host);
        Ok(())
    }

    /// `BufferPool::download`.
    pub(crate) fn download<B: Buf>(&self, id: BufId<B>, host: &mut [u8]) -> Result<()> {
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
        // SAFETY: a shared view for the duration of the copy; submissions complete before
        // returning, so no GPU work writes the buffer.
        let src = unsafe { self.bytes(id.raw(), "read")? };
        host.copy_from_slice(&src[..host.len()]);
        Ok(())
    }

    /// `BufferPool::reset_transient`.
    pub(crate) fn reset_transient(&mut self) {
        let keep = self
            .slots
            .iter()
            .rposition(|s| s.persistent || s.pinned)
            .map_or(0, |i| i + 1);
        self.slots.truncate(keep);
        self.collect_garbage();
    }

    /// Bytes of the distinct owned (not borrowed) physical buffers behind `ids`.
    fn owned_physical_bytes(&self, ids: impl Iterator<Item = usize>) -> u64 {
        let mut seen = std::collections::BTreeSet::new();
        ids.map(|i| self.slots[i].physical)
            .filter(|&p| !self.physicals[p].is_borrowed() && seen.insert(p))
            .map(|p| self.physicals[p].len() as u64)
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

    /// `BufferPool::commit_plan`, allocating each colour's buffer with `alloc(bytes, label)`.
    pub(crate) fn commit_plan(
        &mut self,
        graph: &Graph,
        alias: bool,
        mut alloc: impl FnMut(usize, &str) -> Result<P>,
    ) -> Result<PlanReport> {
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
        let logical: u64 = self
            .slots
            .iter()
            .filter(|s| !self.physicals[s.physical].is_borrowed())
            .map(|s| s.bytes as u64)
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
            self.physicals
                .push(alloc(bytes, &format!("plan.color{c}"))?);
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

impl<P: PhysicalMem> PoolInfo for SlotTable<P> {
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
            .map(|s| self.physicals[s.physical].writable())
    }
    fn persistent(&self, raw: u32) -> Option<bool> {
        self.slots.get(raw as usize).map(|s| s.persistent)
    }
    fn physical_of(&self, raw: u32) -> Option<u32> {
        self.slots.get(raw as usize).map(|s| s.physical as u32)
    }
}

/// `impl PoolInfo for $pool` by delegating every query to its `SlotTable` field `$table`.
macro_rules! delegate_pool_info {
    ($pool:ty, $table:ident) => {
        impl $crate::backend::PoolInfo for $pool {
            fn count(&self) -> usize {
                $crate::backend::PoolInfo::count(&self.$table)
            }
            fn byte_size(&self, raw: u32) -> Option<usize> {
                $crate::backend::PoolInfo::byte_size(&self.$table, raw)
            }
            fn role(&self, raw: u32) -> Option<$crate::graph::Role> {
                $crate::backend::PoolInfo::role(&self.$table, raw)
            }
            fn label_of(&self, raw: u32) -> Option<&str> {
                $crate::backend::PoolInfo::label_of(&self.$table, raw)
            }
            fn writable(&self, raw: u32) -> Option<bool> {
                $crate::backend::PoolInfo::writable(&self.$table, raw)
            }
            fn persistent(&self, raw: u32) -> Option<bool> {
                $crate::backend::PoolInfo::persistent(&self.$table, raw)
            }
            fn physical_of(&self, raw: u32) -> Option<u32> {
                $crate::backend::PoolInfo::physical_of(&self.$table, raw)
            }
        }
    };
}
pub(crate) use delegate_pool_info;
