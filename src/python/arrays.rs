//! NumPy in and out: raw byte views of arrays, dtype resolution (bfloat16 through `ml_dtypes`),
//! fresh arrays to download into, and read-only zero-copy views of Rust-owned memory.

use super::errors::Kind;
use numpy::ndarray::ArrayView1;
use numpy::npyffi::flags::{NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE};
use numpy::prelude::*;
use numpy::{PyArray1, PyArrayDescr, PyUntypedArray};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyTuple};

/// The `numpy` module, imported once.
pub(crate) fn np(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static NP: GILOnceCell<Py<PyModule>> = GILOnceCell::new();
    NP.get_or_try_init(py, || Ok(py.import("numpy")?.unbind()))
        .map(|m| m.bind(py))
}

/// `ml_dtypes.bfloat16` as a NumPy dtype.
fn bfloat16(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static BF16: GILOnceCell<Py<PyAny>> = GILOnceCell::new();
    BF16.get_or_try_init(py, || {
        let t = py.import("ml_dtypes")?.getattr("bfloat16")?;
        Ok(np(py)?.call_method1("dtype", (t,))?.unbind())
    })
    .map(|d| d.bind(py).clone())
}

/// A NumPy dtype from anything `np.dtype` accepts, plus the engine's short names (`"f32"`,
/// `"bf16"`, `"f16"`, `"u32"`, `"u8"`); `None` means float32.
pub(crate) fn resolve_dtype<'py>(
    py: Python<'py>,
    spec: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDescr>> {
    let np = np(py)?;
    let d = match spec {
        None => np.call_method1("dtype", ("float32",))?,
        Some(s) => match s.extract::<String>().ok().as_deref() {
            Some("bf16" | "bfloat16") => bfloat16(py)?,
            Some("f32") => np.call_method1("dtype", ("float32",))?,
            Some("f16") => np.call_method1("dtype", ("float16",))?,
            Some("u32") => np.call_method1("dtype", ("uint32",))?,
            Some("u8") => np.call_method1("dtype", ("uint8",))?,
            _ => np.call_method1("dtype", (s,))?,
        },
    };
    Ok(d.downcast_into::<PyArrayDescr>()?)
}

/// NumPy's name of a dtype (`"float32"`, `"bfloat16"`).
pub(crate) fn dtype_name(d: &Bound<'_, PyArrayDescr>) -> PyResult<String> {
    d.getattr("name")?.extract()
}

/// Refuse dtypes whose bytes are not plain data (object pointers) or that have no size.
pub(crate) fn check_plain(d: &Bound<'_, PyArrayDescr>, what: &str) -> PyResult<()> {
    if d.has_object() {
        return Err(PyTypeError::new_err(format!(
            "{what}: arrays of dtype {} hold Python objects, not raw data",
            dtype_name(d)?
        )));
    }
    Ok(())
}

/// Raw facts about an ndarray's memory.
pub(crate) struct RawArray {
    pub ptr: *mut u8,
    pub nbytes: usize,
    pub writable: bool,
    pub c_contiguous: bool,
}

/// Pointer, byte size and flags of an array. The pointer is valid while the array lives.
pub(crate) fn raw(arr: &Bound<'_, PyUntypedArray>) -> RawArray {
    let p = arr.as_array_ptr();
    // SAFETY: `p` is a live PyArrayObject (we hold a reference); reading its fields is what
    // NumPy's own accessor macros do.
    let (data, flags) = unsafe { ((*p).data, (*p).flags) };
    let itemsize = arr.dtype().itemsize();
    RawArray {
        ptr: data as *mut u8,
        nbytes: arr.len().saturating_mul(itemsize),
        writable: flags & NPY_ARRAY_WRITEABLE != 0,
        c_contiguous: flags & NPY_ARRAY_C_CONTIGUOUS != 0,
    }
}

/// Bring host data to a C-contiguous, aligned ndarray: NumPy arrays and scalars (copied only if
/// needed) or bytes-like objects (viewed as uint8). Anything else is a `TypeError`, so a Python
/// list is never silently turned into float64.
pub(crate) fn host_array<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = obj.py();
    let np = np(py)?;
    let generic = np.getattr("generic")?;
    let arr = if obj.downcast::<PyUntypedArray>().is_ok() || obj.is_instance(&generic)? {
        obj.clone()
    } else if obj.downcast::<PyBytes>().is_ok()
        || obj.downcast::<PyByteArray>().is_ok()
        || obj.downcast::<PyMemoryView>().is_ok()
    {
        np.call_method1("frombuffer", (obj, "uint8"))?
    } else {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a numpy array or a bytes-like object, got {}",
            obj.get_type().name()?
        )));
    };
    let arr = np
        .call_method1("require", (arr, py.None(), "CA"))?
        .downcast_into::<PyUntypedArray>()?;
    check_plain(&arr.dtype(), what)?;
    Ok(arr)
}

/// A shape from an int or a sequence of ints (each >= 0).
pub(crate) fn shape_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let bad = || {
        Kind::Size.err(format!(
            "shape must be an int or a sequence of non-negative ints, got {obj}"
        ))
    };
    if let Ok(n) = obj.extract::<i64>() {
        return usize::try_from(n).map(|n| vec![n]).map_err(|_| bad());
    }
    let mut dims = Vec::new();
    for d in obj.try_iter().map_err(|_| bad())? {
        let d = d?.extract::<i64>().map_err(|_| bad())?;
        dims.push(usize::try_from(d).map_err(|_| bad())?);
    }
    Ok(dims)
}

/// A fresh uninitialised C-contiguous array.
pub(crate) fn empty<'py>(
    py: Python<'py>,
    shape: &[usize],
    dtype: &Bound<'py, PyArrayDescr>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let shape = PyTuple::new(py, shape)?;
    Ok(np(py)?
        .call_method1("empty", (shape, dtype))?
        .downcast_into::<PyUntypedArray>()?)
}

/// A read-only array of `dtype` and `shape` over `bytes`, zero-copy, whose base is `owner`.
///
/// # Safety
/// `bytes` must stay valid and unmodified for as long as `owner` lives.
pub(crate) unsafe fn readonly_view<'py>(
    bytes: &[u8],
    owner: Bound<'py, PyAny>,
    dtype: &Bound<'py, PyArrayDescr>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    let base = PyArray1::<u8>::borrow_from_array(&ArrayView1::from(bytes), owner);
    base.call_method1("setflags", (false,))?;
    let shape = PyTuple::new(py, shape)?;
    base.call_method1("view", (dtype,))?
        .call_method1("reshape", (shape,))
}

/// An owned array from a `Vec` (moved, not copied) with `shape`, viewed as `dtype` if given.
pub(crate) fn from_vec<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    shape: &[usize],
    dtype: Option<&Bound<'py, PyArrayDescr>>,
) -> PyResult<Bound<'py, PyAny>> {
    let a = PyArray1::from_vec(py, v).into_any();
    let a = match dtype {
        Some(d) => a.call_method1("view", (d,))?,
        None => a,
    };
    a.call_method1("reshape", (PyTuple::new(py, shape)?,))
}
