//! The CPU backend: the default, runs everywhere, and is the executable specification every other
//! backend is checked against. Kernels are multi-threaded with rayon and written to vectorise.

pub mod attn;
pub mod linear_attn;
pub mod matvec;
pub mod moe;
pub mod norm;
pub mod view;
