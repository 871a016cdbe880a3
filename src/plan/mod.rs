//! Device-free memory planning.
pub mod lifetime;
