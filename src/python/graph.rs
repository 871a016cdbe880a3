//! Python op objects to Rust `Op`s: buffer ids, a `FieldSource` that reads an op's attributes
//! (checking each buffer field's role), the compiled graph, and the exported op schema.

use super::errors::{catch, guard, Kind};
use crate::error::{Error, Result};
use crate::graph::{
    describe_accepts, ExpertLayout, FieldKind, FieldSource, Graph, Op, Role, WDtype, WeightRef,
};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyList, PyType};
use std::sync::RwLock;

/// A role from its Python name; an unknown name is a `RoleError` listing the known ones.
pub(crate) fn role_arg(name: &str) -> PyResult<Role> {
    Role::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
        Kind::Role.err(format!(
            "unknown buffer role `{name}` (known roles: {})",
            known.join(", ")
        ))
    })
}

/// A buffer handed out by a backend: its raw id, role, label and size. Immutable and hashable.
#[pyclass(frozen, eq, hash, name = "BufId", module = "moeflux")]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyBufId {
    /// The raw id (index in the backend's pool).
    #[pyo3(get)]
    pub raw: u32,
    pub role: Role,
    /// The label given at allocation.
    #[pyo3(get)]
    pub label: String,
    /// Size in bytes.
    #[pyo3(get)]
    pub nbytes: u64,
}

#[pymethods]
impl PyBufId {
    /// Make an id by hand (backends hand them out; this exists for tests and tools).
    #[new]
    #[pyo3(signature = (raw, role, label = String::new(), nbytes = 0))]
    fn new(raw: u32, role: &str, label: String, nbytes: u64) -> PyResult<Self> {
        Ok(PyBufId {
            raw,
            role: role_arg(role)?,
            label,
            nbytes,
        })
    }

    /// The role name (`"act"`, `"residual"`, ...).
    #[getter]
    fn role(&self) -> &'static str {
        self.role.name()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let label = pyo3::types::PyString::new(py, &self.label).repr()?;
        Ok(format!(
            "BufId({}, role='{}', label={label}, nbytes={})",
            self.raw,
            self.role.name(),
            self.nbytes
        ))
    }
}

/// Cached lookup of a class of the pure-Python package (`moeflux.ops.WeightRef`).
fn ops_class<'py>(
    py: Python<'py>,
    cell: &'static GILOnceCell<Py<PyType>>,
    name: &str,
) -> PyResult<&'py Bound<'py, PyType>> {
    cell.import(py, "moeflux.ops", name)
}

/// `moeflux.ops.WeightRef` from a Rust `WeightRef`.
pub(crate) fn weight_ref_to_py<'py>(py: Python<'py>, w: &WeightRef) -> PyResult<Bound<'py, PyAny>> {
    static CLS: GILOnceCell<Py<PyType>> = GILOnceCell::new();
    ops_class(py, &CLS, "WeightRef")?.call1((
        w.w_off,
        w.s_off,
        w.b_off,
        w.bits,
        w.group_size,
        w.scale_dtype.name(),
    ))
}

/// Short description of a value for error messages.
fn describe(v: &Bound<'_, PyAny>) -> String {
    let ty = v
        .get_type()
        .name()
        .and_then(|n| n.extract::<String>())
        .unwrap_or_else(|_| "?".into());
    let mut r = v
        .repr()
        .and_then(|r| r.extract::<String>())
        .unwrap_or_else(|_| "<unrepresentable>".into());
    if r.len() > 60 {
        let cut = (0..=60).rev().find(|&i| r.is_char_boundary(i)).unwrap_or(0);
        r.truncate(cut);
        r.push_str("...");
    }
    format!("{r} ({ty})")
}

/// Reads op fields from a Python object's attributes (the `moeflux.ops` dataclasses or anything
/// shaped like them).
struct PyFields<'a, 'py> {
    obj: &'a Bound<'py, PyAny>,
    ident: String,
}

impl<'py> PyFields<'_, 'py> {
    fn get(&self, field: &'static str) -> Result<Bound<'py, PyAny>> {
        self.obj
            .getattr(field)
            .map_err(|e| Error::dims(&self.ident, field, format!("cannot read the field: {e}")))
    }

    fn bad(&self, field: &'static str, sub: &str, v: &Bound<'_, PyAny>, want: &str) -> Error {
        let at = if sub.is_empty() {
            String::new()
        } else {
            format!("`{sub}`: ")
        };
        Error::dims(
            &self.ident,
            field,
            format!("{at}expected {want}, got {}", describe(v)),
        )
    }

    fn int<T: for<'a> FromPyObject<'a>>(
        &self,
        field: &'static str,
        sub: &str,
        v: &Bound<'_, PyAny>,
        want: &str,
    ) -> Result<T> {
        v.extract::<T>().map_err(|_| self.bad(field, sub, v, want))
    }

    fn dtype_of(&self, field: &'static str, sub: &str, v: &Bound<'_, PyAny>) -> Result<WDtype> {
        v.extract::<String>()
            .ok()
            .and_then(|s| WDtype::from_name(&s))
            .ok_or_else(|| self.bad(field, sub, v, "one of \"f32\", \"bf16\", \"f16\""))
    }

    fn attr(
        &self,
        field: &'static str,
        v: &Bound<'py, PyAny>,
        sub: &'static str,
    ) -> Result<Bound<'py, PyAny>> {
        v.getattr(sub).map_err(|_| {
            Error::dims(
                &self.ident,
                field,
                format!(
                    "expected an object with a `{sub}` attribute, got {}",
                    describe(v)
                ),
            )
        })
    }
}

const U32: &str = "an int in 0..=4294967295";
const U64: &str = "an int in 0..=18446744073709551615";

impl FieldSource for PyFields<'_, '_> {
    fn buf(
        &mut self,
        field: &'static str,
        accepts: &'static [Role],
        _role_name: &'static str,
    ) -> Result<u32> {
        let v = self.get(field)?;
        let b = v
            .downcast::<PyBufId>()
            .map_err(|_| self.bad(field, "", &v, "a moeflux.BufId"))?
            .get();
        if !accepts.contains(&b.role) {
            return Err(Error::Role {
                op: self.ident.clone(),
                field,
                expected: describe_accepts(accepts),
                actual: b.role.name().to_string(),
                id: b.raw,
            });
        }
        Ok(b.raw)
    }
    fn u32(&mut self, field: &'static str) -> Result<u32> {
        let v = self.get(field)?;
        self.int(field, "", &v, U32)
    }
    fn u64(&mut self, field: &'static str) -> Result<u64> {
        let v = self.get(field)?;
        self.int(field, "", &v, U64)
    }
    fn f32(&mut self, field: &'static str) -> Result<f32> {
        let v = self.get(field)?;
        let x: f64 = v
            .extract()
            .map_err(|_| self.bad(field, "", &v, "a float"))?;
        Ok(x as f32)
    }
    fn weight(&mut self, field: &'static str) -> Result<WeightRef> {
        let v = self.get(field)?;
        Ok(WeightRef {
            w_off: self.int(field, "w_off", &self.attr(field, &v, "w_off")?, U64)?,
            s_off: self.int(field, "s_off", &self.attr(field, &v, "s_off")?, U64)?,
            b_off: self.int(field, "b_off", &self.attr(field, &v, "b_off")?, U64)?,
            bits: self.int(field, "bits", &self.attr(field, &v, "bits")?, U32)?,
            group_size: self.int(
                field,
                "group_size",
                &self.attr(field, &v, "group_size")?,
                U32,
            )?,
            scale_dtype: self.dtype_of(
                field,
                "scale_dtype",
                &self.attr(field, &v, "scale_dtype")?,
            )?,
        })
    }
    fn layout(&mut self, field: &'static str) -> Result<ExpertLayout> {
        let v = self.get(field)?;
        layout_from(self, field, &v)
    }
    fn u32_list(&mut self, field: &'static str) -> Result<Vec<u32>> {
        let v = self.get(field)?;
        if v.extract::<String>().is_ok() {
            return Err(self.bad(field, "", &v, "a sequence of ints"));
        }
        let it = v
            .try_iter()
            .map_err(|_| self.bad(field, "", &v, "a sequence of ints"))?;
        let mut out = Vec::new();
        for (i, x) in it.enumerate() {
            let x =
                x.map_err(|e| Error::dims(&self.ident, field, format!("iterating failed: {e}")))?;
            out.push(self.int(field, &format!("[{i}]"), &x, U32)?);
        }
        Ok(out)
    }
    fn dtype(&mut self, field: &'static str) -> Result<WDtype> {
        let v = self.get(field)?;
        self.dtype_of(field, "", &v)
    }
}

fn layout_from(
    src: &PyFields<'_, '_>,
    field: &'static str,
    v: &Bound<'_, PyAny>,
) -> Result<ExpertLayout> {
    Ok(ExpertLayout {
        hidden_dim: src.int(field, "hidden_dim", &src.attr(field, v, "hidden_dim")?, U32)?,
        inter_dim: src.int(field, "inter_dim", &src.attr(field, v, "inter_dim")?, U32)?,
        bits: src.int(field, "bits", &src.attr(field, v, "bits")?, U32)?,
        group_size: src.int(field, "group_size", &src.attr(field, v, "group_size")?, U32)?,
        scale_dtype: src.dtype_of(field, "scale_dtype", &src.attr(field, v, "scale_dtype")?)?,
    })
}

/// Build one Rust op from a Python op object (kind = the class name).
pub(crate) fn op_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Op> {
    let name: String = obj.get_type().name()?.extract()?;
    let label = match obj.getattr("label") {
        Ok(l) => l.extract::<String>().map_err(|_| {
            Error::dims(
                &format!("? ({name})"),
                "label",
                format!("expected a str, got {}", describe(&l)),
            )
        })?,
        Err(_) => String::new(),
    };
    let mut src = PyFields {
        obj,
        ident: format!("{label} ({name})"),
    };
    Ok(Op::build(&name, label, &mut src)?)
}

/// A graph compiled to Rust ops, replayable without touching the Python op objects again.
/// `moeflux.Graph` builds and caches one; `Backend.execute` accepts either.
#[pyclass(frozen, name = "CompiledGraph", module = "moeflux._core")]
pub struct PyCompiledGraph {
    pub(crate) graph: RwLock<Graph>,
}

impl PyCompiledGraph {
    /// Compile a Python iterable of ops.
    pub(crate) fn compile(ops: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut g = Graph::new();
        for op in ops.try_iter()? {
            g.push(op_from_py(&op?)?);
        }
        Ok(PyCompiledGraph {
            graph: RwLock::new(g),
        })
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Graph> {
        self.graph.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyCompiledGraph {
    #[new]
    fn new(ops: &Bound<'_, PyAny>) -> PyResult<Self> {
        guard(|| Self::compile(ops))
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }

    /// One numbered line per op: label, kind, fields.
    fn dump(&self) -> String {
        self.read().dump()
    }

    /// Patch u32 field `field` of op `op_index` in place (decode positions, lengths).
    fn set_u32(
        &self,
        py: Python<'_>,
        op_index: i64,
        field: &str,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let value: u32 = value.extract().map_err(|_| {
            Kind::Graph.err(format!(
                "set_u32: value must be {U32}, got {}",
                describe(value)
            ))
        })?;
        let field = field.to_string();
        py.allow_threads(|| {
            catch(|| {
                let mut g = self.graph.write().unwrap_or_else(|e| e.into_inner());
                let n = g.len();
                let op = usize::try_from(op_index)
                    .ok()
                    .and_then(|i| g.ops.get_mut(i))
                    .ok_or_else(|| {
                        Error::dims(
                            "graph",
                            "op_index",
                            format!("op index {op_index} out of range 0..{n}"),
                        )
                    })?;
                op.set_u32(&field, value)
            })
        })?;
        Ok(())
    }

    /// `(name, label)` of every op, in order.
    fn ops(&self) -> Vec<(&'static str, String)> {
        self.read()
            .ops
            .iter()
            .map(|o| (o.name(), o.label().to_string()))
            .collect()
    }

    fn __repr__(&self) -> String {
        format!("<moeflux._core.CompiledGraph of {} ops>", self.read().len())
    }
}

/// The op table exported from Rust: one dict per op with `name`, `doc` and `fields`, each field
/// a dict with `name`, `type` (`buf u32 u64 f32 weight_ref expert_layout u32_list dtype`), and
/// for buffers `accepts` (role names), `role_name` and `access` (`r`, `w`, `rw`).
#[pyfunction]
pub(crate) fn op_schema(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for s in Op::schema() {
        let fields = PyList::empty(py);
        for (name, kind) in &s.fields {
            let f = PyDict::new(py);
            f.set_item("name", name)?;
            f.set_item("type", kind.type_name())?;
            match kind {
                FieldKind::Buf {
                    accepts,
                    role_name,
                    access,
                } => {
                    let roles: Vec<&str> = accepts.iter().map(|r| r.name()).collect();
                    f.set_item("accepts", roles)?;
                    f.set_item("role_name", role_name)?;
                    f.set_item("access", access.name())?;
                }
                _ => {
                    f.set_item("accepts", py.None())?;
                    f.set_item("role_name", py.None())?;
                    f.set_item("access", py.None())?;
                }
            }
            fields.append(f)?;
        }
        let d = PyDict::new(py);
        d.set_item("name", s.name)?;
        d.set_item("doc", s.doc.trim())?;
        d.set_item("fields", fields)?;
        out.append(d)?;
    }
    Ok(out)
}

/// Every buffer role name, in declaration order.
#[pyfunction]
pub(crate) fn roles() -> Vec<&'static str> {
    Role::ALL.iter().map(|r| r.name()).collect()
}

/// Offsets of gate/up/down inside one expert block of `layout` (an `ops.ExpertLayout`):
/// `{"gate": WeightRef, "up": WeightRef, "down": WeightRef, "block_bytes": int}`.
#[pyfunction]
pub(crate) fn expert_offsets<'py>(layout: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    guard(|| {
        let py = layout.py();
        let src = PyFields {
            obj: layout,
            ident: "ExpertLayout".into(),
        };
        let l = layout_from(&src, "layout", layout)?;
        let o = l.offsets();
        let d = PyDict::new(py);
        d.set_item("gate", weight_ref_to_py(py, &o.gate)?)?;
        d.set_item("up", weight_ref_to_py(py, &o.up)?)?;
        d.set_item("down", weight_ref_to_py(py, &o.down)?)?;
        d.set_item("block_bytes", o.block_bytes)?;
        Ok(d)
    })
}
