//! Backends behind one `Backend`/`BufferPool` trait pair.
pub mod cpu;
