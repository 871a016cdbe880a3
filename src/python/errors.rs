//! The Python exception hierarchy, the exhaustive `moeflux::Error` -> exception mapping, and the
//! panic guard every boundary entry point runs under (a Rust panic must never reach Python).

use crate::error::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

create_exception!(
    moeflux,
    MoefluxError,
    PyException,
    "Base class of every error moeflux raises."
);

/// The children of `MoefluxError`. `create_exception!` takes one base only, and most children
/// also derive from a builtin (`GraphError` is a `ValueError`), so they are made with `type()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Graph,
    Size,
    Role,
    WeightFile,
    Backend,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::Graph,
        Kind::Size,
        Kind::Role,
        Kind::WeightFile,
        Kind::Backend,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Graph => "GraphError",
            Kind::Size => "SizeError",
            Kind::Role => "RoleError",
            Kind::WeightFile => "WeightFileError",
            Kind::Backend => "BackendError",
        }
    }

    fn doc(self) -> &'static str {
        match self {
            Kind::Graph => {
                "Invalid graph: bad buffer ids in ops, inconsistent dims, out-of-bounds ranges, unknown ops, \
                 data-dependent failures while running, unsafe aliasing. Also a ValueError."
            }
            Kind::Size => {
                "Host/device size disagreement in upload or download, or an allocation that cannot be made. \
                 Also a ValueError."
            }
            Kind::Role => {
                "A buffer of the wrong role wired into an op field; the message names the op, the field, the \
                 accepted roles and the buffer's role. Also a TypeError."
            }
            Kind::WeightFile => "A weight file or manifest problem, or a weight needed with no weight file open.",
            Kind::Backend => {
                "Unknown or unavailable backend, or an internal failure (a Rust panic surfaces as this). \
                 Also a RuntimeError."
            }
        }
    }

    fn builtin<'py>(self, py: Python<'py>) -> Option<Bound<'py, PyType>> {
        match self {
            Kind::Graph | Kind::Size => Some(py.get_type::<PyValueError>()),
            Kind::Role => Some(py.get_type::<PyTypeError>()),
            Kind::WeightFile => None,
            Kind::Backend => Some(py.get_type::<PyRuntimeError>()),
        }
    }

    /// The exception class, created once per interpreter.
    pub(crate) fn type_object(self, py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
        static TYPES: GILOnceCell<Vec<Py<PyType>>> = GILOnceCell::new();
        let types = TYPES.get_or_try_init(py, || {
            Kind::ALL
                .iter()
                .map(|k| k.create(py))
                .collect::<PyResult<Vec<_>>>()
        })?;
        Ok(types[self as usize].bind(py))
    }

    fn create(self, py: Python<'_>) -> PyResult<Py<PyType>> {
        let mut bases = vec![py.get_type::<MoefluxError>()];
        bases.extend(self.builtin(py));
        let bases = PyTuple::new(py, bases)?;
        let dict = PyDict::new(py);
        dict.set_item("__module__", "moeflux")?;
        dict.set_item("__doc__", self.doc())?;
        let ty = py.get_type::<PyType>().call1((self.name(), bases, dict))?;
        Ok(ty.downcast_into::<PyType>()?.unbind())
    }

    /// A lazily raised exception of this kind.
    pub(crate) fn err(self, msg: impl Into<String>) -> PyErr {
        let msg = msg.into();
        Python::with_gil(|py| match self.type_object(py) {
            Ok(ty) => PyErr::from_type(ty.clone(), msg),
            Err(e) => e,
        })
    }
}

/// The exception class of each error variant. No wildcard: a new variant must be mapped here.
pub(crate) fn kind_of(e: &Error) -> Kind {
    match e {
        Error::BadBufId { .. }
        | Error::InvalidDims { .. }
        | Error::OutOfBounds { .. }
        | Error::BadData { .. }
        | Error::UnsafeAlias(_)
        | Error::UnknownOp(_) => Kind::Graph,
        Error::Role { .. } => Kind::Role,
        Error::SizeMismatch { .. }
        | Error::ReadOnly { .. }
        | Error::PoolBadId { .. }
        | Error::Alloc { .. } => Kind::Size,
        Error::WeightFile { .. } | Error::NoWeights { .. } => Kind::WeightFile,
        Error::Backend { .. } | Error::Io { .. } => Kind::Backend,
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        kind_of(&e).err(e.to_string())
    }
}

/// A failure inside a GIL-free section: an engine error or a caught panic (both `Send`).
pub(crate) enum Failure {
    Core(Error),
    Panic(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Core(e)
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        match f {
            Failure::Core(e) => e.into(),
            Failure::Panic(msg) => Kind::Backend.err(format!("internal error: {msg}")),
        }
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "Rust panic with a non-string payload".to_string()
    }
}

/// Run engine code (typically without the GIL), turning a panic into `Failure::Panic`.
pub(crate) fn catch<R>(f: impl FnOnce() -> Result<R, Error>) -> Result<R, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(Failure::Core),
        Err(p) => Err(Failure::Panic(panic_message(p))),
    }
}

/// Run boundary code that holds the GIL, turning a panic into `BackendError("internal error: ...")`.
pub(crate) fn guard<R>(f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Kind::Backend.err(format!("internal error: {}", panic_message(p)))),
    }
}

/// Register `MoefluxError` and its children on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MoefluxError", py.get_type::<MoefluxError>())?;
    for k in Kind::ALL {
        m.add(k.name(), k.type_object(py)?)?;
    }
    Ok(())
}

/// Panic on purpose (with or without the GIL held) to prove the guard: raises
/// `BackendError("internal error: <msg>")`. For tests only.
#[pyfunction]
#[pyo3(signature = (msg, release_gil = false))]
pub(crate) fn _panic_for_tests(py: Python<'_>, msg: String, release_gil: bool) -> PyResult<()> {
    if release_gil {
        py.allow_threads(|| catch(|| -> Result<(), Error> { panic!("{msg}") }))?;
        Ok(())
    } else {
        guard(|| panic!("{msg}"))
    }
}
