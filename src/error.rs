//! One error type for the whole engine, grouped by kind; every variant that can name an op does.
//!
//! The Python boundary maps each group to one exception class (`src/python/errors.rs`), so the
//! grouping here is the public exception hierarchy.

use thiserror::Error;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    // ---- graph / validation --------------------------------------------------------------
    /// A buffer id that the pool never handed out.
    #[error("[{op}] field `{field}`: buffer id {id} does not exist (pool has {count} buffers)")]
    BadBufId {
        op: String,
        field: &'static str,
        id: u32,
        count: usize,
    },
    /// Dims that contradict each other or the op's contract.
    #[error("[{op}] field `{field}`: {msg}")]
    InvalidDims {
        op: String,
        field: &'static str,
        msg: String,
    },
    /// A byte range the op would touch does not fit its buffer.
    #[error(
        "[{op}] field `{field}` (buffer `{buf_label}`): needs {needed} bytes, buffer has {have}"
    )]
    OutOfBounds {
        op: String,
        field: &'static str,
        buf_label: String,
        needed: u64,
        have: u64,
    },
    /// Data-dependent failure found while running (e.g. an expert index out of range).
    #[error("[{op}] field `{field}`: {msg}")]
    BadData {
        op: String,
        field: &'static str,
        msg: String,
    },
    /// Two buffers sharing memory after `commit_plan` are live at the same op of this graph.
    #[error("unsafe aliasing: {0}")]
    UnsafeAlias(String),
    /// An op name that is not one of the 23.
    #[error("unknown op `{0}`")]
    UnknownOp(String),

    // ---- roles ---------------------------------------------------------------------------
    /// A buffer of the wrong role wired into an op field.
    #[error("[{op}] field `{field}`: expected a buffer of role {expected}, got `{actual}` (buffer {id})")]
    Role {
        op: String,
        field: &'static str,
        expected: String,
        actual: String,
        id: u32,
    },

    // ---- pool sizes ----------------------------------------------------------------------
    /// Host/device size disagreement in upload, download or allocation.
    #[error("buffer `{label}`: {what}: expected at most {expected} bytes, got {actual}")]
    SizeMismatch {
        label: String,
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A write into read-only borrowed memory.
    #[error("buffer `{label}`: {what}: the buffer is read-only borrowed memory")]
    ReadOnly { label: String, what: String },
    /// A pool call on an id that does not exist.
    #[error("{what}: buffer id {id} does not exist (pool has {count} buffers)")]
    PoolBadId {
        what: &'static str,
        id: u32,
        count: usize,
    },
    /// Allocation request that cannot be honoured (bad alignment, out of memory).
    #[error("alloc `{label}`: {msg}")]
    Alloc { label: String, msg: String },

    // ---- weight files --------------------------------------------------------------------
    #[error("weight file {path}: {msg}")]
    WeightFile { path: String, msg: String },
    /// A weight-file reference used with no weight file open.
    #[error("[{op}] field `{field}`: the backend has no weight file open")]
    NoWeights { op: String, field: &'static str },

    // ---- backend -------------------------------------------------------------------------
    #[error("backend `{backend}`: {msg}")]
    Backend { backend: String, msg: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn dims(op: &str, field: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidDims {
            op: op.to_string(),
            field,
            msg: msg.into(),
        }
    }

    pub fn bad_data(op: &str, field: &'static str, msg: impl Into<String>) -> Self {
        Error::BadData {
            op: op.to_string(),
            field,
            msg: msg.into(),
        }
    }

    pub fn weight_file(path: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::WeightFile {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// `ensure!(cond, err)`: return `Err(err)` unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $err:expr $(,)?) => {
        if !$cond {
            return Err($err);
        }
    };
}

/// `ensure_dims!(cond, op, field, "fmt", args..)`: an `InvalidDims` error naming op and field.
#[macro_export]
macro_rules! ensure_dims {
    ($cond:expr, $op:expr, $field:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::dims($op, $field, format!($($fmt)+)));
        }
    };
}
