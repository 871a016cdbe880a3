//! The registry of emulated kernels: built once from the compiled library, looked up by name.

use super::ffi;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Where a kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Registered name (`[[host_name]]` or the function name).
    pub name: String,
    /// `.metal` file (relative to the crate root) and line of its definition or instantiation.
    pub file: String,
    pub line: u32,
}

/// A kernel of the library (the emulator's pipeline state): cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct EmuKernel {
    pub(crate) index: u32,
    info: &'static KernelInfo,
}

impl EmuKernel {
    pub fn name(&self) -> &'static str {
        &self.info.name
    }
    pub fn info(&self) -> &'static KernelInfo {
        self.info
    }
}

/// Every kernel compiled into this binary (from `shaders/metal/` and the emulator's tests).
pub struct EmuLibrary {
    kernels: Vec<KernelInfo>,
    by_name: HashMap<String, u32>,
}

static LIBRARY: OnceLock<EmuLibrary> = OnceLock::new();

impl EmuLibrary {
    /// The library, registered on first use (thread-safe; later calls are a load).
    pub fn get() -> &'static EmuLibrary {
        LIBRARY.get_or_init(|| {
            // SAFETY: plain C calls; the returned strings live as long as the process.
            unsafe {
                ffi::msl_emu_init();
                let n = ffi::msl_emu_kernel_count();
                let kernels: Vec<KernelInfo> = (0..n)
                    .map(|i| KernelInfo {
                        name: ffi::c_ptr_str(ffi::msl_emu_kernel_name(i)),
                        file: ffi::c_ptr_str(ffi::msl_emu_kernel_file(i)),
                        line: ffi::msl_emu_kernel_line(i).max(0) as u32,
                    })
                    .collect();
                let by_name = kernels
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (k.name.clone(), i as u32))
                    .collect();
                EmuLibrary { kernels, by_name }
            }
        })
    }

    /// The kernel registered as `name`.
    pub fn kernel(&'static self, name: &str) -> Result<EmuKernel> {
        match self.by_name.get(name) {
            Some(&index) => Ok(EmuKernel {
                index,
                info: &self.kernels[index as usize],
            }),
            None => Err(Error::Backend {
                backend: "metal-emu".into(),
                msg: format!(
                    "no kernel named `{name}` in the emulated library ({} kernels; a .metal file in \
                     shaders/metal/ must define it as `kernel` or instantiate it with [[host_name]])",
                    self.kernels.len()
                ),
            }),
        }
    }

    /// All registered kernels, in registration order.
    pub fn kernels(&self) -> &[KernelInfo] {
        &self.kernels
    }
}

/// A failed dispatch: the kernel, what went wrong, and the `.metal` location when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuError {
    pub kernel: String,
    pub message: String,
    pub file: String,
    pub line: u32,
}

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel `{}`: {}", self.kernel, self.message)?;
        if !self.file.is_empty() {
            write!(f, " (at {}:{})", self.file, self.line)?;
        }
        Ok(())
    }
}

impl std::error::Error for EmuError {}

impl From<EmuError> for Error {
    fn from(e: EmuError) -> Self {
        Error::Backend {
            backend: "metal-emu".into(),
            msg: e.to_string(),
        }
    }
}
