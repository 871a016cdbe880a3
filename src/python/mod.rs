//! The PyO3 boundary: the `moeflux._core` extension module. The only place that touches pyo3.
//!
//! `errors` maps `moeflux::Error` onto the exception hierarchy and guards against panics,
//! `arrays` moves bytes between NumPy and the engine, `graph` turns Python op objects into Rust
//! `Op`s, `backend` wraps the backends behind a lock, `weights` binds weight files and the
//! quantizer, `experts` binds the expert streaming cache.

mod arrays;
mod backend;
mod errors;
mod experts;
mod graph;
mod weights;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<backend::PyBackend>()?;
    m.add_class::<backend::PyPlanReport>()?;
    m.add_class::<graph::PyBufId>()?;
    m.add_class::<graph::PyCompiledGraph>()?;
    m.add_class::<weights::PyWeightFile>()?;
    m.add_class::<weights::PyWeightWriter>()?;
    m.add_class::<experts::PyExpertStore>()?;
    m.add_function(wrap_pyfunction!(graph::op_schema, m)?)?;
    m.add_function(wrap_pyfunction!(graph::roles, m)?)?;
    m.add_function(wrap_pyfunction!(graph::expert_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(weights::quantize, m)?)?;
    m.add_function(wrap_pyfunction!(weights::dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_panic_for_tests, m)?)?;
    Ok(())
}
