//! One layer's expert file: opened for direct I/O where the filesystem allows, size-checked, read
//! with positioned reads that never return a partial expert silently.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Alignment direct I/O needs for the file offset, the length and the destination address.
pub const DIRECT_ALIGN: usize = 4096;

/// An open expert file of a known, checked size.
#[derive(Debug)]
pub struct ExpertFile {
    file: File,
    path: PathBuf,
    len: u64,
    direct: bool,
    drop_cache: bool,
}

/// Open `path` read-only, bypassing the page cache where possible (`O_DIRECT` on Linux,
/// `F_NOCACHE` on macOS) when `want_direct`. Returns the file and, when direct I/O was wanted but
/// is not used, why. The file must be exactly `expected_len` bytes (`what` explains the number).
pub fn open_expert_file(
    path: &Path,
    expected_len: u64,
    what: &str,
    want_direct: bool,
    drop_cache: bool,
) -> Result<(ExpertFile, Option<String>)> {
    let buffered = || File::open(path).map_err(|e| Error::io(path.display(), e));
    let (file, mut note) = if want_direct {
        match open_direct(path) {
            Ok(f) => (f, None),
            Err(e) if is_unsupported(&e) => (
                buffered()?,
                Some(format!(
                    "{}: direct I/O refused at open ({e}); using buffered reads",
                    path.display()
                )),
            ),
            Err(e) => return Err(Error::io(path.display(), e)),
        }
    } else {
        (buffered()?, None)
    };
    let len = file
        .metadata()
        .map_err(|e| Error::io(path.display(), e))?
        .len();
    if len != expected_len {
        return Err(Error::weight_file(
            path.display(),
            format!("expert file is {len} bytes, expected {expected_len} ({what})"),
        ));
    }
    let mut f = ExpertFile {
        file,
        path: path.to_path_buf(),
        len,
        direct: want_direct && note.is_none(),
        drop_cache,
    };
    if f.direct && len >= DIRECT_ALIGN as u64 {
        // Some filesystems accept the flag at open and reject the first aligned read.
        let probe = AlignedBuf::new(DIRECT_ALIGN);
        // SAFETY: `probe` owns DIRECT_ALIGN writable bytes.
        if let Err(e) = unsafe { f.read_exact_at(probe.ptr, DIRECT_ALIGN, 0) } {
            let inner = e.raw_os_error();
            if inner == Some(libc::EINVAL) || inner == Some(libc::EOPNOTSUPP) {
                note = Some(format!(
                    "{}: direct I/O read refused ({e}); using buffered reads",
                    path.display()
                ));
                f.file = buffered()?;
                f.direct = false;
            } else {
                return Err(Error::io(path.display(), e));
            }
        }
    }
    Ok((f, note))
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(target_os = "macos")]
fn open_direct(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new().read(true).open(path)?;
    // SAFETY: plain fcntl on an fd we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

impl ExpertFile {
    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size checked at open.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether reads bypass the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Current size on disk (differs from [`Self::len`] when the file changed after open).
    pub fn current_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Read exactly `len` bytes at `offset` into `dst`. A read that ends early (the file was
    /// truncated) is an `UnexpectedEof` error naming the current size; `EINTR` is retried. For
    /// direct I/O, `dst`, `len` and `offset` must be multiples of [`DIRECT_ALIGN`].
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes, and nothing may read them meanwhile.
    pub unsafe fn read_exact_at(&self, dst: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let n = libc::pread(
                fd,
                dst.add(done) as *mut libc::c_void,
                len - done,
                at as libc::off_t,
            );
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 || (self.direct && (n as usize) < len - done) {
                // A direct read stops short only at end of file; the next aligned read would fail
                // with EINVAL, so name the cause now.
                let now = self
                    .current_len()
                    .map_or_else(|e| format!("unknown ({e})"), |l| l.to_string());
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read: {} of {len} bytes at offset {offset}; the file is now {now} bytes \
                         (opened with {}): truncated while running?",
                        done + n as usize,
                        self.len
                    ),
                ));
            }
            done += n as usize;
        }
        if self.drop_cache && !self.direct {
            self.drop_cached(offset, len);
        }
        Ok(())
    }

    /// Ask the kernel to drop the page-cache pages of a range (buffered reads only).
    #[cfg(target_os = "linux")]
    fn drop_cached(&self, offset: u64, len: usize) {
        // SAFETY: advisory call on an fd we own; failure only means pages stay cached.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn drop_cached(&self, _offset: u64, _len: usize) {}
}

/// A small page-aligned heap buffer (the direct-I/O probe and tests).
pub(crate) struct AlignedBuf {
    pub(crate) ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> AlignedBuf {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    #[cfg(test)]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}
