//! `moeflux.Backend`: one engine backend behind a mutex. Every call releases the GIL while it
//! waits for and holds the lock, so Python threads can share a backend, and the lock holder never
//! touches Python (no lock-order inversion with the GIL).

use super::arrays;
use super::errors::{catch, guard, Kind};
use super::graph::{role_arg, weight_ref_to_py, PyBufId, PyCompiledGraph};
use super::weights::PyWeightFile;
use crate::backend::cpu::{CpuBackend, CpuConfig};
#[cfg(any(target_os = "macos", feature = "metal"))]
use crate::backend::metal::{MetalBackend, MetalConfig};
#[cfg(feature = "metal-emu")]
use crate::backend::metal::{MetalEmuBackend, MetalEmuConfig};
use crate::backend::{Backend, BufferPool, PoolInfo};
use crate::error::{Error, Result};
use crate::graph::{AnyBuf, BufId};
use crate::plan::lifetime::PlanReport;
use memmap2::MmapOptions;
use numpy::prelude::*;
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::any::Any;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Names of the backends compiled into this build.
fn available_backends() -> Vec<&'static str> {
    let mut names = vec!["cpu"];
    if cfg!(any(target_os = "macos", feature = "metal")) {
        names.push("metal");
    }
    if cfg!(feature = "metal-emu") {
        names.push("metal-emu");
    }
    names
}

/// The backends compiled into this build.
enum Imp {
    Cpu(CpuBackend),
    #[cfg(any(target_os = "macos", feature = "metal"))]
    Metal(MetalBackend),
    #[cfg(feature = "metal-emu")]
    MetalEmu(MetalEmuBackend),
}

/// `on!(imp, be => expr)`: evaluate `expr` with `be` bound to the concrete backend.
macro_rules! on {
    ($imp:expr, $be:ident => $body:expr) => {
        match $imp {
            Imp::Cpu($be) => $body,
            #[cfg(any(target_os = "macos", feature = "metal"))]
            Imp::Metal($be) => $body,
            #[cfg(feature = "metal-emu")]
            Imp::MetalEmu($be) => $body,
        }
    };
}

/// Summary of `Backend.commit_plan`: bytes before and after aliasing, the lower bound, and how
/// many ids now share memory through how many colours.
#[pyclass(frozen, eq, get_all, name = "PlanReport", module = "moeflux")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyPlanReport {
    /// Sum of all pool-owned logical buffers, as if none shared memory.
    logical_bytes: u64,
    /// Sum of distinct physical buffers after colouring.
    physical_bytes: u64,
    /// No interval-respecting layout of these buffers can use less.
    lower_bound_bytes: u64,
    /// Number of ids that share memory through a colour.
    aliased_buffers: u64,
    /// Number of colours (shared physical buffers) created.
    colors: u64,
}

#[pymethods]
impl PyPlanReport {
    #[new]
    fn new(
        logical_bytes: u64,
        physical_bytes: u64,
        lower_bound_bytes: u64,
        aliased_buffers: u64,
        colors: u64,
    ) -> Self {
        PyPlanReport {
            logical_bytes,
            physical_bytes,
            lower_bound_bytes,
            aliased_buffers,
            colors,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "PlanReport(logical_bytes={}, physical_bytes={}, lower_bound_bytes={}, aliased_buffers={}, colors={})",
            self.logical_bytes, self.physical_bytes, self.lower_bound_bytes, self.aliased_buffers, self.colors
        )
    }
}

impl From<PlanReport> for PyPlanReport {
    fn from(r: PlanReport) -> Self {
        PyPlanReport {
            logical_bytes: r.logical_bytes,
            physical_bytes: r.physical_bytes,
            lower_bound_bytes: r.lower_bound_bytes,
            aliased_buffers: r.aliased_buffers,
            colors: r.colors,
        }
    }
}

/// The id exists and still has the role the Python `BufId` says (a stale id after
/// `reset_transient` usually does not); returns the buffer's size.
fn check_buf(pool: &(impl PoolInfo + ?Sized), b: &PyBufId, what: &'static str) -> Result<usize> {
    let role = pool.role(b.raw).ok_or(Error::PoolBadId {
        what,
        id: b.raw,
        count: pool.count(),
    })?;
    if role != b.role {
        return Err(Error::Role {
            op: what.to_string(),
            field: "buf",
            expected: format!("`{}`", b.role.name()),
            actual: role.name().to_string(),
            id: b.raw,
        });
    }
    Ok(pool.byte_size(b.raw).unwrap_or(0))
}

fn size_arg(v: i64, label: &str, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Alloc {
        label: label.to_string(),
        msg: format!("{what} must be non-negative, got {v}"),
    })
}

/// A compiled graph from a `moeflux.Graph` (its cached `compile()`), a `CompiledGraph`, or a
/// list/tuple of ops (compiled for this call).
fn compiled<'py>(graph: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyCompiledGraph>> {
    let py = graph.py();
    if let Ok(c) = graph.downcast::<PyCompiledGraph>() {
        return Ok(c.clone());
    }
    if let Ok(f) = graph.getattr(intern!(py, "compile")) {
        return f.call0()?.downcast_into::<PyCompiledGraph>().map_err(|e| {
            PyTypeError::new_err(format!(
                "graph.compile() must return a moeflux._core.CompiledGraph: {e}"
            ))
        });
    }
    if graph.downcast::<PyList>().is_ok() || graph.downcast::<PyTuple>().is_ok() {
        return Bound::new(py, PyCompiledGraph::compile(graph)?);
    }
    Err(PyTypeError::new_err(format!(
        "expected a moeflux.Graph, a CompiledGraph or a list of ops, got {}",
        graph.get_type().name()?
    )))
}

/// One compute backend (`"cpu"`), owning its buffers and, optionally, a weight file.
#[pyclass(frozen, name = "Backend", module = "moeflux")]
pub struct PyBackend {
    name: &'static str,
    inner: Mutex<Imp>,
}

impl PyBackend {
    /// Run `f` on the backend without the GIL, under the lock, with panics caught.
    fn run<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Imp) -> Result<R> + Send,
    ) -> PyResult<R> {
        Ok(py.allow_threads(|| {
            catch(|| {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                f(&mut g)
            })
        })?)
    }
}

#[pymethods]
impl PyBackend {
    /// Open backend `name` (`"cpu"`); `weights` is the path of a weight blob (manifest at
    /// `path + ".json"`), a `WeightFile`, or `None`.
    #[new]
    #[pyo3(signature = (name = "cpu", weights = None))]
    fn new(py: Python<'_>, name: &str, weights: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let path: Option<PathBuf> = match weights {
            None => None,
            Some(w) if w.is_none() => None,
            Some(w) => match w.downcast::<PyWeightFile>() {
                Ok(wf) => Some(wf.get().inner.path().to_path_buf()),
                Err(_) => Some(w.extract()?),
            },
        };
        match name {
            "cpu" => {
                let be = py.allow_threads(|| catch(|| CpuBackend::open(CpuConfig { weights: path })))?;
                Ok(PyBackend {
                    name: "cpu",
                    inner: Mutex::new(Imp::Cpu(be)),
                })
            }
            #[cfg(any(target_os = "macos", feature = "metal"))]
            "metal" => {
                let cfg = MetalConfig { weights: path, switches: None };
                let be = py.allow_threads(|| catch(|| MetalBackend::open(cfg)))?;
                Ok(PyBackend {
                    name: "metal",
                    inner: Mutex::new(Imp::Metal(be)),
                })
            }
            #[cfg(not(any(target_os = "macos", feature = "metal")))]
            "metal" => Err(Kind::Backend.err(
                "backend `metal` is not available in this build: it needs macOS on Apple Silicon and moeflux \
                 built with the `metal` cargo feature",
            )),
            #[cfg(feature = "metal-emu")]
            "metal-emu" => {
                let cfg = MetalEmuConfig { weights: path, switches: None };
                let be = py.allow_threads(|| catch(|| MetalEmuBackend::open(cfg)))?;
                Ok(PyBackend {
                    name: "metal-emu",
                    inner: Mutex::new(Imp::MetalEmu(be)),
                })
            }
            #[cfg(not(feature = "metal-emu"))]
            "metal-emu" => Err(Kind::Backend.err(
                "backend `metal-emu` is not available in this build: it needs moeflux built with the `metal-emu` \
                 cargo feature",
            )),
            other => Err(Kind::Backend.err(format!(
                "unknown backend `{other}` (available in this build: {})",
                available_backends().join(", ")
            ))),
        }
    }

    /// The backend's short name (`"cpu"`).
    #[getter]
    fn name(&self) -> &'static str {
        self.name
    }

    /// A zero-filled buffer of `nbytes` with `role`.
    #[pyo3(signature = (nbytes, role = "act", label = String::new(), persistent = false))]
    fn alloc(
        &self,
        py: Python<'_>,
        nbytes: i64,
        role: &str,
        label: String,
        persistent: bool,
    ) -> PyResult<PyBufId> {
        let role = role_arg(role)?;
        let n = size_arg(nbytes, &label, "nbytes")?;
        let raw = self.run(
            py,
            |imp| on!(imp, be => be.pool_mut().alloc_role(n, role, &label, persistent)),
        )?;
        Ok(PyBufId {
            raw,
            role,
            label,
            nbytes: n as u64,
        })
    }

    /// A zero-filled buffer whose address is a multiple of `alignment` (a power of two).
    #[pyo3(signature = (nbytes, alignment, role = "act", label = String::new(), persistent = false))]
    fn alloc_aligned(
        &self,
        py: Python<'_>,
        nbytes: i64,
        alignment: i64,
        role: &str,
        label: String,
        persistent: bool,
    ) -> PyResult<PyBufId> {
        let role = role_arg(role)?;
        let n = size_arg(nbytes, &label, "nbytes")?;
        let a = size_arg(alignment, &label, "alignment")?;
        let raw = self.run(
            py,
            |imp| on!(imp, be => be.pool_mut().alloc_aligned_role(n, a, role, &label, persistent)),
        )?;
        Ok(PyBufId {
            raw,
            role,
            label,
            nbytes: n as u64,
        })
    }

    /// Use a C-contiguous NumPy array's memory as a buffer, without copying. The backend keeps
    /// the array alive; a read-only array gives a read-only buffer.
    #[pyo3(signature = (array, role = "act", label = String::new(), persistent = true))]
    fn register_borrowed(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        role: &str,
        label: String,
        persistent: bool,
    ) -> PyResult<PyBufId> {
        guard(|| {
            let role = role_arg(role)?;
            let arr = array
                .downcast::<numpy::PyUntypedArray>()
                .map_err(|_| PyTypeError::new_err("register_borrowed: expected a numpy array"))?;
            arrays::check_plain(&arr.dtype(), "register_borrowed")?;
            let r = arrays::raw(arr);
            if !r.c_contiguous {
                return Err(Error::Alloc {
                    label,
                    msg: "register_borrowed needs a C-contiguous array (np.ascontiguousarray makes one, as a copy)"
                        .into(),
                }
                .into());
            }
            let owner: Box<dyn Any + Send + Sync> = Box::new(array.clone().unbind());
            let (ptr, len, writable) = (r.ptr as usize, r.nbytes, r.writable);
            let raw = self.run(py, |imp| {
                on!(imp, be =>
                    // SAFETY: the array's data stays valid while `owner` (a reference to it) lives,
                    // and the pool keeps `owner` as long as any id uses the memory.
                    unsafe {
                        be.pool_mut().register_borrowed_role(
                            ptr as *mut u8,
                            len,
                            writable,
                            owner,
                            role,
                            &label,
                            persistent,
                        )
                    }
                )
            })?;
            Ok(PyBufId {
                raw,
                role,
                label,
                nbytes: len as u64,
            })
        })
    }

    /// Map `length` bytes of the file at `path` from `offset` (default: to the end) read-only
    /// and use them as a persistent buffer, without copying. The file must not change meanwhile.
    #[pyo3(signature = (path, role = "expert_base", label = String::new(), offset = 0, length = None))]
    fn register_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        role: &str,
        label: String,
        offset: i64,
        length: Option<i64>,
    ) -> PyResult<PyBufId> {
        let role = role_arg(role)?;
        let non_negative = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| {
                Kind::Size.err(format!(
                    "register_file: {what} must be non-negative, got {v}"
                ))
            })
        };
        let offset = non_negative(offset, "offset")?;
        let length = length.map(|l| non_negative(l, "length")).transpose()?;
        let (raw, len) = self.run(py, |imp| {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(path.display(), e))?;
            let flen = file
                .metadata()
                .map_err(|e| Error::io(path.display(), e))?
                .len();
            let len = length.unwrap_or(flen.saturating_sub(offset));
            let fits = matches!(offset.checked_add(len), Some(end) if end <= flen);
            if !fits {
                return Err(Error::SizeMismatch {
                    label: label.clone(),
                    what: "register_file (offset + length)",
                    expected: flen as usize,
                    actual: offset.saturating_add(len) as usize,
                });
            }
            let len = len as usize;
            let (ptr, owner): (*mut u8, Box<dyn Any + Send + Sync>) = if len == 0 {
                (NonNull::<u8>::dangling().as_ptr(), Box::new(()))
            } else {
                // SAFETY: read-only mapping; the caller keeps the file unchanged (documented).
                let map = unsafe { MmapOptions::new().offset(offset).len(len).map(&file) }
                    .map_err(|e| Error::io(path.display(), e))?;
                (map.as_ptr() as *mut u8, Box::new(map))
            };
            // SAFETY: the mapping lives in `owner`, kept by the pool; never written (read-only).
            let raw = on!(imp, be => unsafe {
                be.pool_mut()
                    .register_borrowed_role(ptr, len, false, owner, role, &label, true)?
            });
            Ok((raw, len))
        })?;
        Ok(PyBufId {
            raw,
            role,
            label,
            nbytes: len as u64,
        })
    }

    /// Copy `array`'s bytes to the start of `buf` (it may be shorter than the buffer).
    fn upload(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyBufId>,
        array: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.upload_at(py, buf, 0, array)
    }

    /// Copy `array`'s bytes into `buf` at byte `offset`; the range must fit.
    fn upload_at(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyBufId>,
        offset: i64,
        array: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard(|| {
            let b = buf.get();
            let arr = arrays::host_array(array, "upload")?;
            let r = arrays::raw(&arr);
            let off = usize::try_from(offset).map_err(|_| {
                Kind::Size.err(format!(
                    "buffer `{}`: upload_at: offset must be non-negative, got {offset}",
                    b.label
                ))
            })?;
            let (ptr, len) = (r.ptr as usize, r.nbytes);
            self.run(py, |imp| {
                on!(imp, be => check_buf(be.pool(), b, "upload"))?;
                let id = BufId::<AnyBuf>::from_raw(b.raw);
                // SAFETY: `arr` outlives this call and nothing frees it meanwhile.
                let src: &[u8] = if len == 0 {
                    &[]
                } else {
                    unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
                };
                on!(imp, be => {
                    // A borrowed array uploaded into its own buffer: copy first, so the
                    // source and destination slices never alias.
                    let dst = be.pool().address(b.raw)? + off;
                    if len > 0 && ptr < dst.saturating_add(len) && dst < ptr + len {
                        let copy: Vec<u8> = src.to_owned();
                        be.pool_mut().upload_at(id, off, &copy)
                    } else {
                        be.pool_mut().upload_at(id, off, src)
                    }
                })
            })
        })
    }

    /// A new array of `dtype` (default float32) holding the first bytes of `buf`: the whole
    /// buffer by default, or `shape` (an int or tuple) when given (prefix semantics).
    #[pyo3(signature = (buf, dtype = None, shape = None))]
    fn download<'py>(
        &self,
        py: Python<'py>,
        buf: &Bound<'py, PyBufId>,
        dtype: Option<&Bound<'py, PyAny>>,
        shape: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let b = buf.get();
            let dt = arrays::resolve_dtype(py, dtype.filter(|d| !d.is_none()))?;
            arrays::check_plain(&dt, "download")?;
            let item = dt.itemsize();
            let size = self.run(
                py,
                |imp| on!(imp, be => check_buf(be.pool(), b, "download")),
            )?;
            let shape = match shape.filter(|s| !s.is_none()) {
                Some(s) => arrays::shape_arg(s)?,
                None => {
                    if item == 0 || size % item != 0 {
                        return Err(Kind::Size.err(format!(
                            "buffer `{}`: download: {size} bytes are not a whole number of {} elements; pass a shape",
                            b.label,
                            arrays::dtype_name(&dt)?
                        )));
                    }
                    vec![size / item]
                }
            };
            let want = shape
                .iter()
                .try_fold(item, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX);
            if want > size {
                return Err(Error::SizeMismatch {
                    label: b.label.clone(),
                    what: "download",
                    expected: size,
                    actual: want,
                }
                .into());
            }
            let out = arrays::empty(py, &shape, &dt)?;
            let r = arrays::raw(&out);
            let (ptr, len) = (r.ptr as usize, want);
            self.run(py, |imp| {
                // SAFETY: `out` is a fresh array of exactly `len` bytes that we hold.
                let dst: &mut [u8] = if len == 0 {
                    &mut []
                } else {
                    unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
                };
                on!(imp, be => check_buf(be.pool(), b, "download"))?;
                on!(imp, be => be.pool().download(BufId::<AnyBuf>::from_raw(b.raw), dst))
            })?;
            Ok(out.into_any())
        })
    }

    /// Validate and run `graph` (a `moeflux.Graph`, `CompiledGraph` or list of ops), timed under
    /// `label`. Releases the GIL; safe to call from several threads.
    #[pyo3(signature = (graph, label = "graph"))]
    fn execute(&self, py: Python<'_>, graph: &Bound<'_, PyAny>, label: &str) -> PyResult<()> {
        guard(|| {
            let cg = compiled(graph)?;
            let cg = cg.get();
            self.run(py, |imp| {
                let g = cg.read();
                on!(imp, be => be.execute(&g, label))
            })
        })
    }

    /// Colour the graph's transient buffers by lifetime and share memory between ids of one
    /// colour (`alias=False` only reports).
    #[pyo3(signature = (graph, alias = true))]
    fn commit_plan(
        &self,
        py: Python<'_>,
        graph: &Bound<'_, PyAny>,
        alias: bool,
    ) -> PyResult<PyPlanReport> {
        guard(|| {
            let cg = compiled(graph)?;
            let cg = cg.get();
            let r = self.run(py, |imp| {
                let g = cg.read();
                on!(imp, be => be.pool_mut().commit_plan(&g, alias))
            })?;
            Ok(r.into())
        })
    }

    /// Drop every buffer id after the last persistent (or plan-pinned) one.
    fn reset_transient(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |imp| {
            on!(imp, be => be.pool_mut().reset_transient());
            Ok(())
        })
    }

    /// Number of physical buffers behind the ids.
    fn physical_buffer_count(&self, py: Python<'_>) -> PyResult<usize> {
        self.run(py, |imp| {
            Ok(on!(imp, be => be.pool().physical_buffer_count()))
        })
    }

    /// Number of buffer ids handed out.
    fn buffer_count(&self, py: Python<'_>) -> PyResult<usize> {
        self.run(py, |imp| Ok(on!(imp, be => be.pool().count())))
    }

    /// Per-label timings: `{label: {"count", "total_s", "min_s", "max_s"}}`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.run(py, |imp| Ok(on!(imp, be => be.stats().snapshot())))?;
        let out = PyDict::new(py);
        for (label, s) in snap {
            let d = PyDict::new(py);
            d.set_item("count", s.count)?;
            d.set_item("total_s", s.total.as_secs_f64())?;
            d.set_item("min_s", s.min.as_secs_f64())?;
            d.set_item("max_s", s.max.as_secs_f64())?;
            out.set_item(label, d)?;
        }
        Ok(out)
    }

    /// Forget all recorded timings.
    fn clear_stats(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |imp| {
            on!(imp, be => be.stats().clear());
            Ok(())
        })
    }

    /// One submission per op, each timed under the op's own label.
    #[getter]
    fn get_profile_per_op(&self, py: Python<'_>) -> PyResult<bool> {
        self.run(py, |imp| Ok(on!(imp, be => be.profile_per_op())))
    }

    #[setter]
    fn set_profile_per_op(&self, py: Python<'_>, on: bool) -> PyResult<()> {
        self.run(py, |imp| {
            on!(imp, be => be.set_profile_per_op(on));
            Ok(())
        })
    }

    /// The quantized matrix `name` of the weight file as an `ops.WeightRef`.
    fn weight_ref<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let w = self.run(py, |imp| {
            on!(imp, be => match be.weight_file() {
                Some(wf) => Ok(Some(wf.weight_ref(name)?.0)),
                None => Ok(None),
            })
        })?;
        match w {
            Some(w) => weight_ref_to_py(py, &w),
            None => Err(self.no_weights()),
        }
    }

    /// Byte offset of tensor `name` in the weight file.
    fn weight_offset(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        let off = self.run(py, |imp| {
            on!(imp, be => match be.weight_file() {
                Some(wf) => Ok(Some(wf.tensor(name)?.offset)),
                None => Ok(None),
            })
        })?;
        off.ok_or_else(|| self.no_weights())
    }

    /// Base address of `buf`'s memory (for tests of alignment and zero-copy).
    fn _address(&self, py: Python<'_>, buf: &Bound<'_, PyBufId>) -> PyResult<usize> {
        let b = buf.get();
        self.run(py, |imp| {
            on!(imp, be => check_buf(be.pool(), b, "address"))?;
            on!(imp, be => be.pool().address(b.raw))
        })
    }

    fn __repr__(&self) -> String {
        format!("Backend({:?})", self.name)
    }
}

impl PyBackend {
    /// Adopt `len` bytes of host memory at `ptr`, kept alive by `owner`, as a persistent buffer
    /// that ops and uploads may not write (the expert slot cache, filled by its own readers).
    pub(crate) fn adopt_host_memory(
        &self,
        py: Python<'_>,
        ptr: usize,
        len: usize,
        owner: Box<dyn Any + Send + Sync>,
        role: crate::graph::Role,
        label: String,
    ) -> PyResult<PyBufId> {
        let raw = self.run(py, |imp| {
            on!(imp, be =>
                // SAFETY: the caller's `owner` keeps `len` bytes at `ptr` alive; the pool keeps
                // `owner` as long as any id uses the memory and never writes it (read-only).
                unsafe {
                    be.pool_mut().register_borrowed_role(
                        ptr as *mut u8,
                        len,
                        false,
                        owner,
                        role,
                        &label,
                        true,
                    )
                }
            )
        })?;
        Ok(PyBufId {
            raw,
            role,
            label,
            nbytes: len as u64,
        })
    }

    fn no_weights(&self) -> PyErr {
        Kind::WeightFile.err(format!(
            "backend `{}` has no weight file open (pass weights=...)",
            self.name
        ))
    }
}
