//! Typed views over raw bytes for the CPU kernels: f32/u32 slices and MLX-quantized matrices.
//!
//! All casts check alignment and length and return `None` on a mismatch, so kernels never see a
//! misaligned or short slice (validation turns a `None` into a named error before any kernel runs).

use crate::graph::{WDtype, WeightRef};
use half::{bf16, f16};

/// Reinterpret bytes as `&[T]` for a plain-old-data `T` (f32, u32, bf16, f16).
fn cast<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return None;
    }
    // SAFETY: alignment and length checked above; T is plain old data (any bit pattern valid).
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

fn cast_mut<T: Pod>(bytes: &mut [u8]) -> Option<&mut [T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return None;
    }
    // SAFETY: as in `cast`, and the borrow is unique.
    Some(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size)
    })
}

/// Types any bit pattern of which is a valid value.
pub trait Pod: Copy + 'static {}
impl Pod for f32 {}
impl Pod for u32 {}
impl Pod for bf16 {}
impl Pod for f16 {}

pub fn f32s(bytes: &[u8]) -> Option<&[f32]> {
    cast(bytes)
}
pub fn f32s_mut(bytes: &mut [u8]) -> Option<&mut [f32]> {
    cast_mut(bytes)
}
pub fn u32s(bytes: &[u8]) -> Option<&[u32]> {
    cast(bytes)
}
pub fn u32s_mut(bytes: &mut [u8]) -> Option<&mut [u32]> {
    cast_mut(bytes)
}

/// A float vector or scale array stored as f32, bf16 or f16.
#[derive(Clone, Copy, Debug)]
pub enum FloatSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> FloatSlice<'a> {
    pub fn from_bytes(bytes: &'a [u8], dtype: WDtype) -> Option<Self> {
        Some(match dtype {
            WDtype::F32 => FloatSlice::F32(cast(bytes)?),
            WDtype::Bf16 => FloatSlice::Bf16(cast(bytes)?),
            WDtype::F16 => FloatSlice::F16(cast(bytes)?),
        })
    }
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            FloatSlice::F32(s) => s[i],
            FloatSlice::Bf16(s) => s[i].to_f32(),
            FloatSlice::F16(s) => s[i].to_f32(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(s) => s.len(),
            FloatSlice::Bf16(s) => s.len(),
            FloatSlice::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Widen to an owned f32 vector (for small per-op vectors such as norm weights).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// An MLX-affine quantized `[rows, cols]` matrix: `w[r, c] = scales[r, g] * q[r, c] + biases[r, g]`
/// with `g = c / group_size` and `q` the `bits`-wide field `c % (32/bits)` (least significant
/// first) of word `packed[r * cols * bits / 32 + c * bits / 32]`.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub packed: &'a [u32],
    pub scales: FloatSlice<'a>,
    pub biases: FloatSlice<'a>,
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
}

impl<'a> QuantMatrix<'a> {
    /// View the matrix `wref` of shape `[rows, cols]` inside `base` (weight file or expert block).
    /// `None` if any part falls outside `base` or is misaligned.
    pub fn from_ref(base: &'a [u8], wref: &WeightRef, rows: usize, cols: usize) -> Option<Self> {
        let (r, c) = (rows as u64, cols as u64);
        let packed_len = wref.packed_bytes(r, c);
        let scale_len = wref.scale_bytes(r, c);
        let part = |off: u64, len: u64| -> Option<&'a [u8]> {
            let end = off.checked_add(len)?;
            base.get(usize::try_from(off).ok()?..usize::try_from(end).ok()?)
        };
        Some(QuantMatrix {
            packed: cast(part(wref.w_off, packed_len)?)?,
            scales: FloatSlice::from_bytes(part(wref.s_off, scale_len)?, wref.scale_dtype)?,
            biases: FloatSlice::from_bytes(part(wref.b_off, scale_len)?, wref.scale_dtype)?,
            rows,
            cols,
            bits: wref.bits,
            group_size: wref.group_size as usize,
        })
    }

    /// Words per row of `packed`.
    #[inline(always)]
    pub fn words_per_row(&self) -> usize {
        self.cols * self.bits as usize / 32
    }
    /// Groups per row of `scales`/`biases`.
    #[inline(always)]
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }
}
