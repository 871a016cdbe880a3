//! Weight files, the atomic weight writer, and MLX-compatible `quantize` / `dequantize` for Python.

use super::arrays::{self, RawArray};
use super::errors::{catch, guard, Kind};
use super::graph::weight_ref_to_py;
use crate::error::Error;
use crate::weights::file::{WeightFile, WeightWriter};
use crate::weights::quant::{self, QuantInput, ScaleVec, ScaleVecRef};
use half::{bf16, f16};
use numpy::prelude::*;
use numpy::{PyArrayDescr, PyUntypedArray};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::path::PathBuf;
use std::sync::Mutex;

/// Manifest dtype of a NumPy dtype name.
fn manifest_dtype(np_name: &str) -> Option<&'static str> {
    Some(match np_name {
        "float32" => "f32",
        "float16" => "f16",
        "bfloat16" => "bf16",
        "uint32" => "u32",
        "uint8" => "u8",
        _ => return None,
    })
}

/// A slice of `T` over a contiguous aligned array's memory (the array must outlive the slice).
///
/// # Safety
/// `r` must describe live, aligned, C-contiguous memory holding `nbytes / size_of::<T>()`
/// elements of a type with `T`'s representation.
unsafe fn slice_of<'a, T>(r: &RawArray) -> &'a [T] {
    let n = r.nbytes / std::mem::size_of::<T>();
    if n == 0 {
        return &[];
    }
    std::slice::from_raw_parts(r.ptr as *const T, n)
}

/// An input matrix for the quantizer: float32, float16 or bfloat16 with at least 2 dims, viewed
/// as `[rows, cols]` (leading dims flattened).
struct Matrix<'py> {
    arr: Bound<'py, PyUntypedArray>,
    dtype: &'static str,
    shape: Vec<usize>,
}

impl<'py> Matrix<'py> {
    fn new(obj: &Bound<'py, PyAny>, op: &'static str) -> PyResult<Self> {
        let arr = arrays::host_array(obj, op)?;
        let name = arrays::dtype_name(&arr.dtype())?;
        let dtype = match manifest_dtype(&name) {
            Some(d @ ("f32" | "f16" | "bf16")) => d,
            _ => {
                return Err(Error::dims(
                    op,
                    "w",
                    format!("dtype {name} is not supported (float32, float16 or bfloat16)"),
                )
                .into())
            }
        };
        let shape = arr.shape().to_vec();
        if shape.len() < 2 {
            return Err(Error::dims(
                op,
                "w",
                format!("needs at least 2 dims, got shape {shape:?}"),
            )
            .into());
        }
        Ok(Matrix { arr, dtype, shape })
    }
    fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&0)
    }
    fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
    /// Quantize without the GIL.
    fn quantize(&self, py: Python<'_>, group_size: usize, bits: u32) -> PyResult<quant::Quantized> {
        let r = arrays::raw(&self.arr);
        // SAFETY: `host_array` made the array C-contiguous and aligned, the dtype was checked in
        // `new`, and `self.arr` outlives the call.
        let input = unsafe {
            match self.dtype {
                "f32" => QuantInput::F32(slice_of(&r)),
                "f16" => QuantInput::F16(slice_of(&r)),
                _ => QuantInput::Bf16(slice_of(&r)),
            }
        };
        let (rows, cols) = (self.rows(), self.cols());
        Ok(py.allow_threads(move || {
            catch(|| quant::quantize(input, rows, cols, group_size, bits))
        })?)
    }
}

/// Scales or biases as a NumPy array of their dtype.
fn scales_to_py<'py>(py: Python<'py>, v: ScaleVec, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    match v {
        ScaleVec::F32(v) => arrays::from_vec(py, v, shape, None),
        ScaleVec::F16(v) => {
            let d = arrays::resolve_dtype(py, Some(&"f16".into_pyobject(py)?.into_any()))?;
            arrays::from_vec(
                py,
                v.into_iter().map(f16::to_bits).collect::<Vec<u16>>(),
                shape,
                Some(&d),
            )
        }
        ScaleVec::Bf16(v) => {
            let d = arrays::resolve_dtype(py, Some(&"bf16".into_pyobject(py)?.into_any()))?;
            arrays::from_vec(
                py,
                v.into_iter().map(bf16::to_bits).collect::<Vec<u16>>(),
                shape,
                Some(&d),
            )
        }
    }
}

/// `(wq, scales, biases)` like `mx.quantize(w, group_size, bits)`: `w` float32/float16/bfloat16
/// with at least 2 dims, quantized along the last one; `wq` is uint32 `[..., cols*bits/32]`,
/// scales and biases `[..., cols/group_size]` in `w`'s dtype.
#[pyfunction]
#[pyo3(signature = (w, group_size = 64, bits = 4))]
pub(crate) fn quantize<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    group_size: usize,
    bits: u32,
) -> PyResult<Bound<'py, PyTuple>> {
    guard(|| {
        let m = Matrix::new(w, "quantize")?;
        let q = m.quantize(py, group_size, bits)?;
        let lead = &m.shape[..m.shape.len() - 1];
        let with_last = |last: usize| {
            let mut s = lead.to_vec();
            s.push(last);
            s
        };
        let wq = arrays::from_vec(
            py,
            q.packed,
            &with_last(m.cols() * bits as usize / 32),
            None,
        )?;
        let groups = with_last(m.cols() / group_size);
        let s = scales_to_py(py, q.scales, &groups)?;
        let b = scales_to_py(py, q.biases, &groups)?;
        PyTuple::new(py, [wq, s, b])
    })
}

/// Scales/biases as a borrowed quantizer view; the array must be contiguous and aligned.
fn scale_ref<'a>(
    arr: &'a Bound<'_, PyUntypedArray>,
    field: &'static str,
) -> PyResult<ScaleVecRef<'a>> {
    let name = arrays::dtype_name(&arr.dtype())?;
    let r = arrays::raw(arr);
    // SAFETY: `host_array` made it C-contiguous and aligned; the dtype is checked per arm.
    unsafe {
        Ok(match name.as_str() {
            "float32" => ScaleVecRef::F32(slice_of(&r)),
            "float16" => ScaleVecRef::F16(slice_of(&r)),
            "bfloat16" => ScaleVecRef::Bf16(slice_of(&r)),
            _ => {
                return Err(Error::dims(
                    "dequantize",
                    field,
                    format!("dtype {name} is not supported (float32, float16 or bfloat16)"),
                )
                .into())
            }
        })
    }
}

/// Inverse of `quantize`, like `mx.dequantize`: returns `[..., cols]` in the scales' dtype.
#[pyfunction]
#[pyo3(signature = (wq, scales, biases, group_size = 64, bits = 4))]
pub(crate) fn dequantize<'py>(
    py: Python<'py>,
    wq: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    biases: &Bound<'py, PyAny>,
    group_size: usize,
    bits: u32,
) -> PyResult<Bound<'py, PyAny>> {
    guard(|| {
        let wq = arrays::host_array(wq, "dequantize")?;
        let name = arrays::dtype_name(&wq.dtype())?;
        if name != "uint32" || wq.ndim() < 2 {
            return Err(Error::dims(
                "dequantize",
                "wq",
                format!(
                    "expected uint32 with at least 2 dims, got {name} of shape {:?}",
                    wq.shape()
                ),
            )
            .into());
        }
        if !quant::SUPPORTED_BITS.contains(&bits) {
            return Err(Error::dims(
                "dequantize",
                "bits",
                format!("bits = {bits} is not supported"),
            )
            .into());
        }
        let shape = wq.shape().to_vec();
        let words = shape[shape.len() - 1];
        if (words * 32) % bits as usize != 0 {
            return Err(Error::dims(
                "dequantize",
                "wq",
                format!("{words} words do not hold whole {bits}-bit codes"),
            )
            .into());
        }
        let cols = words * 32 / bits as usize;
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let (s, b) = (
            arrays::host_array(scales, "dequantize")?,
            arrays::host_array(biases, "dequantize")?,
        );
        let (sr, br) = (scale_ref(&s, "scales")?, scale_ref(&b, "biases")?);
        let r = arrays::raw(&wq);
        // SAFETY: uint32, C-contiguous and aligned (`host_array`); `wq` outlives the call.
        let packed: &[u32] = unsafe { slice_of(&r) };
        let out = py.allow_threads(|| {
            catch(|| quant::dequantize_native(packed, &sr, &br, rows, cols, group_size, bits))
        })?;
        let mut oshape = shape[..shape.len() - 1].to_vec();
        oshape.push(cols);
        scales_to_py(py, out, &oshape)
    })
}

/// An open weight file (blob mmap'd read-only plus its JSON manifest at `path + ".json"`).
#[pyclass(frozen, name = "WeightFile", module = "moeflux")]
pub struct PyWeightFile {
    pub(crate) inner: WeightFile,
}

#[pymethods]
impl PyWeightFile {
    /// Open and validate the weight file at `path`.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.allow_threads(|| catch(|| WeightFile::open(&path)))?;
        Ok(PyWeightFile { inner })
    }

    /// The blob's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String> {
        self.inner.tensor_names().map(str::to_string).collect()
    }

    /// Byte offset of tensor `name` in the blob.
    fn offset(&self, name: &str) -> PyResult<u64> {
        Ok(self.inner.tensor(name)?.offset)
    }

    /// Shape of tensor `name`.
    fn shape<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.tensor(name)?.shape)
    }

    /// Manifest dtype of tensor `name`: `"f32"`, `"bf16"`, `"f16"`, `"u32"` or `"u8"`.
    fn dtype(&self, name: &str) -> PyResult<String> {
        Ok(self.inner.tensor(name)?.dtype.clone())
    }

    /// Size in bytes of tensor `name`.
    fn nbytes(&self, name: &str) -> PyResult<u64> {
        Ok(self.inner.tensor(name)?.size)
    }

    /// Tensor `name` as a read-only NumPy array viewing the mapped file (zero-copy; bf16 as
    /// `ml_dtypes.bfloat16`). The array keeps the file open.
    fn array<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let py = slf.py();
            let me = slf.get();
            let t = me.inner.tensor(name)?;
            let bytes = me.inner.tensor_bytes(name)?;
            let dtype: Bound<'_, PyArrayDescr> =
                arrays::resolve_dtype(py, Some(&t.dtype.as_str().into_pyobject(py)?.into_any()))?;
            let shape: Vec<usize> = t
                .shape
                .iter()
                .map(|&d| {
                    usize::try_from(d)
                        .map_err(|_| Kind::WeightFile.err("shape does not fit in memory"))
                })
                .collect::<PyResult<_>>()?;
            // SAFETY: the mapping lives as long as `slf`, which becomes the array's base; it is
            // read-only and the file must not change while open (documented on WeightFile).
            unsafe { arrays::readonly_view(bytes, slf.clone().into_any(), &dtype, &shape) }
        })
    }

    /// The quantized matrix `name` (`name.weight/.scales/.biases`) as an `ops.WeightRef`.
    fn weight_ref<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let (w, _, _) = self.inner.weight_ref(name)?;
        weight_ref_to_py(py, &w)
    }

    fn __len__(&self) -> usize {
        self.inner.tensor_names().count()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.tensor(name).is_ok()
    }

    fn __repr__(&self) -> String {
        format!(
            "WeightFile({:?}, {} tensors, {} bytes)",
            self.inner.path().display().to_string(),
            self.inner.tensor_names().count(),
            self.inner.len()
        )
    }
}

/// Writes a weight file atomically: data goes to partial files renamed into place by `finish()`
/// (called by `__exit__` when the `with` block succeeds); an abandoned writer leaves nothing.
#[pyclass(frozen, name = "WeightWriter", module = "moeflux")]
pub struct PyWeightWriter {
    path: PathBuf,
    inner: Mutex<Option<WeightWriter>>,
}

impl PyWeightWriter {
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut WeightWriter) -> crate::Result<R> + Send,
    ) -> PyResult<R> {
        let path = &self.path;
        Ok(py.allow_threads(|| {
            catch(|| {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let w = g.as_mut().ok_or_else(|| {
                    Error::weight_file(path.display(), "the writer is closed (finished or aborted)")
                })?;
                f(w)
            })
        })?)
    }
}

#[pymethods]
impl PyWeightWriter {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let w = py.allow_threads(|| catch(|| WeightWriter::create(&path)))?;
        Ok(PyWeightWriter {
            path,
            inner: Mutex::new(Some(w)),
        })
    }

    /// The blob's final path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Store `array` (float32, float16, bfloat16, uint32 or uint8; any shape) as tensor `name`.
    fn add(&self, py: Python<'_>, name: &str, array: &Bound<'_, PyAny>) -> PyResult<()> {
        guard(|| {
            let arr = arrays::host_array(array, "WeightWriter.add")?;
            let np_name = arrays::dtype_name(&arr.dtype())?;
            let dtype = manifest_dtype(&np_name).ok_or_else(|| {
                Error::weight_file(
                    self.path.display(),
                    format!("tensor `{name}`: dtype {np_name} is not storable (float32, float16, bfloat16, uint32, uint8)"),
                )
            })?;
            let shape: Vec<u64> = arr.shape().iter().map(|&d| d as u64).collect();
            // SAFETY: `arr` is C-contiguous and outlives this call.
            let bytes: &[u8] = unsafe { slice_of(&arrays::raw(&arr)) };
            self.with(py, move |w| w.add_raw(name, dtype, &shape, bytes))
        })
    }

    /// Quantize `matrix` (float32/float16/bfloat16, `[..., cols]`) bit-exactly like
    /// `mx.quantize` and store `name.weight`, `name.scales`, `name.biases` (scales in the
    /// matrix dtype).
    #[pyo3(signature = (name, matrix, group_size = 64, bits = 4))]
    fn add_quantized(
        &self,
        py: Python<'_>,
        name: &str,
        matrix: &Bound<'_, PyAny>,
        group_size: usize,
        bits: u32,
    ) -> PyResult<()> {
        guard(|| {
            let m = Matrix::new(matrix, "quantize")?;
            let q = m.quantize(py, group_size, bits)?;
            let (rows, cols) = (m.rows() as u64, m.cols() as u64);
            self.with(py, move |w| {
                w.add_quantized(name, &q, rows, cols, group_size as u32, bits)
            })
        })
    }

    /// Flush and rename the files into place. The writer is closed afterwards.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        let path = &self.path;
        py.allow_threads(|| {
            catch(|| {
                let w = self
                    .inner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| {
                        Error::weight_file(
                            path.display(),
                            "the writer is closed (finished or aborted)",
                        )
                    })?;
                w.finish()
            })
        })?;
        Ok(())
    }

    /// Discard everything written so far (no file appears). A closed writer ignores this.
    fn abort(&self) {
        drop(self.inner.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Finish on success, abort if the block raised (the exception propagates).
    #[pyo3(signature = (exc_type, _exc = None, _tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if exc_type.is_some_and(|t| !t.is_none()) {
            self.abort();
            return Ok(false);
        }
        let open = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if open {
            self.finish(py)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let open = self.inner.lock().map(|g| g.is_some()).unwrap_or(false);
        format!(
            "WeightWriter({:?}, {})",
            self.path.display().to_string(),
            if open { "open" } else { "closed" }
        )
    }
}
