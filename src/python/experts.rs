//! `moeflux.ExpertStore`: the expert streaming cache (`crate::io::ExpertStore`) bound to a backend,
//! whose pool adopts the slot buffer as a persistent read-only `expert_base` buffer.

use super::backend::PyBackend;
use super::errors::{catch, Kind};
use super::graph::PyBufId;
use crate::graph::Role;
use crate::io::{ExpertStore, Policy, StoreConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A model's expert files behind a budgeted cache of `slots` experts in one 2 MiB-aligned buffer
/// (`buffer`, registered in `backend`): `acquire` returns the slot of each expert after reading
/// the missing ones in parallel (direct I/O where the filesystem allows), a background thread pool
/// serves `prefetch`. Thread-safe; calls that wait release the GIL.
#[pyclass(frozen, name = "ExpertStore", module = "moeflux")]
pub struct PyExpertStore {
    store: Arc<ExpertStore>,
    buffer: Py<PyBufId>,
}

#[pymethods]
impl PyExpertStore {
    /// Open `files` (`{layer: path}`), each `num_experts * expert_stride` bytes, with a cache of
    /// `slots` experts. `policy` is `"lru"` or `"lfu"`; `read_chunk` splits one expert's read
    /// into parallel pieces (0: whole experts).
    #[new]
    #[pyo3(signature = (backend, files, expert_stride, num_experts, slots, *, io_threads = 8, policy = "lru",
                        direct_io = true, drop_page_cache = true, read_chunk = 0, label = "expert_slots".to_string()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: &Bound<'_, PyBackend>,
        files: BTreeMap<u32, PathBuf>,
        expert_stride: u64,
        num_experts: u32,
        slots: usize,
        io_threads: usize,
        policy: &str,
        direct_io: bool,
        drop_page_cache: bool,
        read_chunk: usize,
        label: String,
    ) -> PyResult<Self> {
        let policy = Policy::from_name(policy).ok_or_else(|| {
            Kind::Backend.err(format!("unknown cache policy `{policy}` (lru or lfu)"))
        })?;
        let cfg = StoreConfig {
            io_threads,
            policy,
            direct_io,
            drop_page_cache,
            read_chunk,
            label: label.clone(),
            ..StoreConfig::new(expert_stride, num_experts, slots)
        };
        let files: Vec<(u32, PathBuf)> = files.into_iter().collect();
        let store = py.allow_threads(|| catch(|| ExpertStore::open(&files, cfg)))?;
        let mem = store.memory();
        let (ptr, len) = (mem.ptr() as usize, mem.len());
        let owner: Box<dyn Any + Send + Sync> = Box::new(mem);
        let buf = backend
            .get()
            .adopt_host_memory(py, ptr, len, owner, Role::ExpertBase, label)?;
        Ok(PyExpertStore {
            store: Arc::new(store),
            buffer: Py::new(py, buf)?,
        })
    }

    /// The slot buffer (role `expert_base`): expert slot `s` is at byte `s * stride`.
    #[getter]
    fn buffer(&self, py: Python<'_>) -> Py<PyBufId> {
        self.buffer.clone_ref(py)
    }

    /// Capacity in experts.
    #[getter]
    fn slots(&self) -> usize {
        self.store.slots()
    }

    /// Bytes per expert slot.
    #[getter]
    fn stride(&self) -> u64 {
        self.store.stride()
    }

    /// Whether every file is read with direct I/O (page cache bypassed).
    #[getter]
    fn direct_io(&self) -> bool {
        self.store.direct_io()
    }

    /// Why direct I/O is not used, per file where it was refused.
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.store.notes().to_vec()
    }

    /// The layers with expert files.
    #[getter]
    fn layers(&self) -> Vec<u32> {
        self.store.layers()
    }

    /// The last read error (also of a prefetch nobody waited for), or None.
    #[getter]
    fn last_error(&self) -> Option<String> {
        self.store.last_error()
    }

    /// Pin `experts` of `layer`, reading the missing ones; returns each one's slot once all are
    /// fully read. Pair with `release(slots)`. Raises `BackendError` on a read error or a file
    /// truncated since open, `SizeError` when more distinct experts than slots are asked for.
    fn acquire(&self, py: Python<'_>, layer: u32, experts: Vec<u32>) -> PyResult<Vec<u32>> {
        let s = &self.store;
        Ok(py.allow_threads(|| catch(|| s.acquire(layer, &experts)))?)
    }

    /// Unpin the slots an `acquire` returned.
    fn release(&self, py: Python<'_>, slots: Vec<u32>) -> PyResult<()> {
        let s = &self.store;
        Ok(py.allow_threads(|| catch(|| s.release(&slots)))?)
    }

    /// Queue background reads of the experts of `layer` that are not cached; returns how many.
    fn prefetch(&self, py: Python<'_>, layer: u32, experts: Vec<u32>) -> PyResult<usize> {
        let s = &self.store;
        Ok(py.allow_threads(|| catch(|| s.prefetch(layer, &experts)))?)
    }

    /// Per expert of `layer`: cached or being read.
    fn resident(&self, py: Python<'_>, layer: u32, experts: Vec<u32>) -> PyResult<Vec<bool>> {
        let s = &self.store;
        Ok(py.allow_threads(|| catch(|| s.resident(layer, &experts)))?)
    }

    /// Number of experts cached now.
    fn cached(&self, py: Python<'_>) -> usize {
        let s = &self.store;
        py.allow_threads(|| s.cached())
    }

    /// Wait until no read is queued or running.
    fn wait_idle(&self, py: Python<'_>) {
        let s = &self.store;
        py.allow_threads(|| s.wait_idle())
    }

    /// Drop every unpinned cached expert (a cold cache); returns how many.
    fn evict_all(&self, py: Python<'_>) -> usize {
        let s = &self.store;
        py.allow_threads(|| s.evict_all())
    }

    /// Counters: `acquires, lookups, hits, misses, prefetch_hits, demand_reads, prefetch_issued,
    /// prefetch_reads, prefetch_cancelled, prefetch_wasted, evictions, read_errors, bytes_read`
    /// (ints) and `io_busy_s, read_s, stall_s, hit_rate, gb_per_s` (floats).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.store;
        let st = py.allow_threads(|| s.stats());
        let d = PyDict::new(py);
        for (k, v) in [
            ("acquires", st.acquires),
            ("lookups", st.lookups),
            ("hits", st.hits),
            ("misses", st.misses),
            ("prefetch_hits", st.prefetch_hits),
            ("demand_reads", st.demand_reads),
            ("prefetch_issued", st.prefetch_issued),
            ("prefetch_reads", st.prefetch_reads),
            ("prefetch_cancelled", st.prefetch_cancelled),
            ("prefetch_wasted", st.prefetch_wasted),
            ("evictions", st.evictions),
            ("read_errors", st.read_errors),
            ("bytes_read", st.bytes_read),
        ] {
            d.set_item(k, v)?;
        }
        for (k, v) in [
            ("io_busy_s", st.io_busy_s),
            ("read_s", st.read_s),
            ("stall_s", st.stall_s),
            ("hit_rate", st.hit_rate()),
            ("gb_per_s", st.gb_per_s()),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Zero the counters (the cache keeps its contents).
    fn reset_stats(&self, py: Python<'_>) {
        let s = &self.store;
        py.allow_threads(|| s.reset_stats())
    }

    fn __repr__(&self) -> String {
        format!(
            "ExpertStore(layers={}, slots={}, stride={}, direct_io={})",
            self.store.layers().len(),
            self.store.slots(),
            self.store.stride(),
            self.store.direct_io()
        )
    }
}
