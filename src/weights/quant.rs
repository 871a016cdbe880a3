//! MLX affine quantization, bit-exact with `mx.quantize` / `mx.dequantize` on MLX's CPU backend.
//!
//! Precision, as measured against mlx 0.32.4 (CPU) and read in `mlx/backend/cpu/quantized.cpp`:
//!
//! * **quantize** works in f32 for every input dtype: bf16/f16 elements are widened to f32, and
//!   per group `w_max`/`w_min`, the scale `max((w_max - w_min) / (2^b - 1), 1e-7)` (negated unless
//!   `|w_min| > |w_max|`), `q0 = rint(edge / scale)`, the corrected scale `edge / q0` and every
//!   code `clip(rint((w - bias) / scale), 0, 2^b - 1)` are f32 operations (a true division per
//!   element, round-half-to-even). The codes use the **f32** scale and bias; only the stored
//!   scale and bias are then rounded (to nearest even) to the input dtype.
//! * **dequantize** returns the scales' dtype. For f32 it is `fl(fl(q * s) + b)` (two roundings,
//!   no fused multiply-add). For bf16/f16 both steps round to the dtype:
//!   `T(f32(T(f32(q) * f32(s))) + f32(b))`.
//! * Codes are a little-endian bit stream per row: element `c` occupies bits `[c*b, (c+1)*b)` of
//!   the row's u32 words, least significant first (for 2/4/8 bits: field `c % (32/b)` of word
//!   `c*b/32`; 3 and 6 bits straddle words).
//!
//! Non-finite inputs are not covered by the bit-exactness claim (MLX's cast of a NaN code is
//! undefined behaviour in C++); here a NaN code becomes 0 and nothing panics.

use crate::ensure_dims;
use crate::error::Result;
use crate::graph::WDtype;
use half::{bf16, f16};
use rayon::prelude::*;

/// Bit widths accepted by [`quantize`] and [`dequantize`].
pub const SUPPORTED_BITS: [u32; 5] = [2, 3, 4, 6, 8];
/// Group sizes accepted by [`quantize`] and [`dequantize`].
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Input matrix `[rows, cols]` row-major, in one of three dtypes.
#[derive(Clone, Copy, Debug)]
pub enum QuantInput<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl QuantInput<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            QuantInput::F32(s) => s.len(),
            QuantInput::Bf16(s) => s.len(),
            QuantInput::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The element dtype (also the dtype of the scales and biases [`quantize`] returns).
    pub fn dtype(&self) -> WDtype {
        match self {
            QuantInput::F32(_) => WDtype::F32,
            QuantInput::Bf16(_) => WDtype::Bf16,
            QuantInput::F16(_) => WDtype::F16,
        }
    }
}

/// Scales or biases, in the input's dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum ScaleVec {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl ScaleVec {
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> WDtype {
        self.as_ref().dtype()
    }
    /// Borrow as a [`ScaleVecRef`].
    pub fn as_ref(&self) -> ScaleVecRef<'_> {
        match self {
            ScaleVec::F32(v) => ScaleVecRef::F32(v),
            ScaleVec::Bf16(v) => ScaleVecRef::Bf16(v),
            ScaleVec::F16(v) => ScaleVecRef::F16(v),
        }
    }
    /// Element `i` widened to f32 (exact).
    pub fn get(&self, i: usize) -> f32 {
        self.as_ref().get(i)
    }
}

/// Borrowed scales or biases.
#[derive(Clone, Copy, Debug)]
pub enum ScaleVecRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> ScaleVecRef<'a> {
    pub fn len(&self) -> usize {
        match self {
            ScaleVecRef::F32(s) => s.len(),
            ScaleVecRef::Bf16(s) => s.len(),
            ScaleVecRef::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> WDtype {
        match self {
            ScaleVecRef::F32(_) => WDtype::F32,
            ScaleVecRef::Bf16(_) => WDtype::Bf16,
            ScaleVecRef::F16(_) => WDtype::F16,
        }
    }
    /// Element `i` widened to f32 (exact).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            ScaleVecRef::F32(s) => s[i],
            ScaleVecRef::Bf16(s) => s[i].to_f32(),
            ScaleVecRef::F16(s) => s[i].to_f32(),
        }
    }
    /// The raw little-endian bytes, as stored in a weight file.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            ScaleVecRef::F32(s) => s.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ScaleVecRef::Bf16(s) => s.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ScaleVecRef::F16(s) => s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A quantized `[rows, cols]` matrix in MLX layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// `[rows, cols*bits/32]` packed codes.
    pub packed: Vec<u32>,
    /// `[rows, cols/group_size]`, in the input dtype.
    pub scales: ScaleVec,
    /// `[rows, cols/group_size]`, in the input dtype.
    pub biases: ScaleVec,
}

/// An element type MLX quantizes from: widened to f32 for all arithmetic, rounded to nearest
/// even when stored.
trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}
impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Groups handled by one rayon task.
const GROUPS_PER_TASK: usize = 512;
/// 1.5 * 2^23: for `|v| < 2^22`, `v + RINT_MAGIC` lands in `[2^23, 2^24)`, where the ulp is 1, so
/// the addition rounds `v` to an integer (ties to even, C being even) held in the low mantissa bits.
const RINT_MAGIC: f32 = 12_582_912.0;

fn check_params(op: &str, rows: usize, cols: usize, group_size: usize, bits: u32) -> Result<()> {
    ensure_dims!(
        SUPPORTED_BITS.contains(&bits),
        op,
        "bits",
        "bits = {bits} is not supported (supported: {SUPPORTED_BITS:?})"
    );
    ensure_dims!(
        SUPPORTED_GROUP_SIZES.contains(&group_size),
        op,
        "group_size",
        "group_size = {group_size} is not supported (supported: {SUPPORTED_GROUP_SIZES:?})"
    );
    ensure_dims!(
        cols % group_size == 0,
        op,
        "cols",
        "cols = {cols} is not a multiple of group_size = {group_size}"
    );
    ensure_dims!(
        rows.checked_mul(cols).is_some(),
        op,
        "rows",
        "rows = {rows} times cols = {cols} overflows"
    );
    Ok(())
}

/// Quantize `data` (`[rows, cols]` row-major) to MLX affine format, bit-exact with
/// `mx.quantize(w, group_size, bits)` on MLX's CPU backend for f32, bf16 and f16 inputs (see
/// the module docs for the precision of each step). Scales and biases keep the input dtype.
///
/// Errors (`InvalidDims`, op `quantize`) when `bits` is not one of [`SUPPORTED_BITS`] (field
/// `bits`), `group_size` not one of [`SUPPORTED_GROUP_SIZES`] (`group_size`), `cols %
/// group_size != 0` (`cols`) or `data.len() != rows * cols` (`data`). Runs in parallel on the
/// rayon pool.
pub fn quantize(
    data: QuantInput<'_>,
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: u32,
) -> Result<Quantized> {
    check_params("quantize", rows, cols, group_size, bits)?;
    let n = rows * cols;
    ensure_dims!(
        data.len() == n,
        "quantize",
        "data",
        "data has {} elements, expected rows * cols = {rows} * {cols} = {n}",
        data.len()
    );
    Ok(match data {
        QuantInput::F32(d) => {
            let (packed, s, b) = quantize_typed(d, group_size, bits);
            Quantized {
                packed,
                scales: ScaleVec::F32(s),
                biases: ScaleVec::F32(b),
            }
        }
        QuantInput::Bf16(d) => {
            let (packed, s, b) = quantize_typed(d, group_size, bits);
            Quantized {
                packed,
                scales: ScaleVec::Bf16(s),
                biases: ScaleVec::Bf16(b),
            }
        }
        QuantInput::F16(d) => {
            let (packed, s, b) = quantize_typed(d, group_size, bits);
            Quantized {
                packed,
                scales: ScaleVec::F16(s),
                biases: ScaleVec::F16(b),
            }
        }
    })
}

fn quantize_typed<T: Elem>(data: &[T], group_size: usize, bits: u32) -> (Vec<u32>, Vec<T>, Vec<T>) {
    let n_groups = data.len() / group_size;
    // group_size is a multiple of 32, so every group fills whole words.
    let words_per_group = group_size * bits as usize / 32;
    let mut packed = vec![0u32; n_groups * words_per_group];
    let mut scales = vec![T::from_f32(0.0); n_groups];
    let mut biases = vec![T::from_f32(0.0); n_groups];
    packed
        .par_chunks_mut(GROUPS_PER_TASK * words_per_group)
        .zip(scales.par_chunks_mut(GROUPS_PER_TASK))
        .zip(biases.par_chunks_mut(GROUPS_PER_TASK))
        .zip(data.par_chunks(GROUPS_PER_TASK * group_size))
        .for_each(|(((pk, sc), bi), w)| {
            let groups = w
                .chunks_exact(group_size)
                .zip(pk.chunks_exact_mut(words_per_group));
            for (g, (wg, out)) in groups.enumerate() {
                let (s, b) = quantize_group(wg, bits, out);
                sc[g] = T::from_f32(s);
                bi[g] = T::from_f32(b);
            }
        });
    (packed, scales, biases)
}

/// Quantize one group into `out` (`group.len() * bits / 32` words); returns the f32 scale and
/// bias before rounding to the storage dtype.
#[inline]
fn quantize_group<T: Elem>(group: &[T], bits: u32, out: &mut [u32]) -> (f32, f32) {
    let mut w = [0f32; 128];
    let w = &mut w[..group.len()];
    for (d, s) in w.iter_mut().zip(group) {
        *d = s.to_f32();
    }
    // std::max / std::min semantics (keep the running value unless the new one compares
    // strictly greater/less, so NaNs are skipped), over 8 lanes so it vectorizes. Lanes can only
    // change which zero (+0/-0) wins a tie, and the sign of a zero extreme never reaches the
    // outputs (it only feeds |.|, a difference with a zero, or an edge that makes q0 = 0).
    let (mut hi, mut lo) = ([f32::NEG_INFINITY; 8], [f32::INFINITY; 8]);
    for c in w.chunks_exact(8) {
        for k in 0..8 {
            if hi[k] < c[k] {
                hi[k] = c[k];
            }
            if c[k] < lo[k] {
                lo[k] = c[k];
            }
        }
    }
    let (mut w_max, mut w_min) = (f32::NEG_INFINITY, f32::INFINITY);
    for k in 0..8 {
        if w_max < hi[k] {
            w_max = hi[k];
        }
        if lo[k] < w_min {
            w_min = lo[k];
        }
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0f32;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    // Clamping to [-1, n_bins + 1] before rounding gives the same clipped code as MLX's
    // clip(rint(x)) and keeps `x + RINT_MAGIC` in [2^23, 2^24), where its bit pattern minus
    // RINT_MAGIC's is the rounded integer (NaN becomes -1, then code 0).
    let mut codes = [0u32; 128];
    let codes = &mut codes[..group.len()];
    let top = (1i32 << bits) - 1;
    for (c, &x) in codes.iter_mut().zip(w.iter()) {
        let v = ((x - bias) / scale).max(-1.0).min(n_bins + 1.0);
        *c = rint_small(v).clamp(0, top) as u32;
    }
    match bits {
        2 => pack_pow2::<2>(codes, out),
        4 => pack_pow2::<4>(codes, out),
        8 => pack_pow2::<8>(codes, out),
        _ => pack_stream(codes, bits, out),
    }
    (scale, bias)
}

/// `round_ties_even(v)` for `|v| < 2^22`, from the bits of `v + RINT_MAGIC` (vectorizes, unlike
/// `round_ties_even` on baseline x86-64).
#[inline(always)]
fn rint_small(v: f32) -> i32 {
    (v + RINT_MAGIC).to_bits() as i32 - RINT_MAGIC.to_bits() as i32
}

#[inline(always)]
fn pack_pow2<const B: u32>(codes: &[u32], out: &mut [u32]) {
    let per_word = (32 / B) as usize;
    for (word, c) in out.iter_mut().zip(codes.chunks_exact(per_word)) {
        let mut acc = 0u32;
        for (k, &q) in c.iter().enumerate() {
            acc |= q << (k as u32 * B);
        }
        *word = acc;
    }
}

fn pack_stream(codes: &[u32], bits: u32, out: &mut [u32]) {
    let (mut acc, mut filled, mut wi) = (0u64, 0u32, 0usize);
    for &q in codes {
        acc |= (q as u64) << filled;
        filled += bits;
        if filled >= 32 {
            out[wi] = acc as u32;
            wi += 1;
            acc >>= 32;
            filled -= 32;
        }
    }
}

/// Code `c` of a row of packed words (`bits`-wide field starting at bit `c * bits`).
#[inline(always)]
fn code_at(row: &[u32], c: usize, bits: u32) -> u32 {
    let bit = c * bits as usize;
    let (wi, off) = (bit / 32, (bit % 32) as u32);
    let lo = row[wi] as u64;
    let hi = if off + bits > 32 {
        row[wi + 1] as u64
    } else {
        0
    };
    (((hi << 32) | lo) >> off) as u32 & ((1u32 << bits) - 1)
}

/// Inverse of [`quantize`]: `w = scale * q + bias` per element of a `[rows, cols]` matrix,
/// computed exactly as `mx.dequantize` does for the scales' dtype and returned widened to f32.
///
/// `mx.dequantize` returns the scales' dtype: for f32 the result is `fl(fl(q * s) + b)`; for
/// bf16/f16 each of the product and the sum is rounded to that dtype. Every returned value is
/// therefore exactly representable in the scales' dtype, so rounding it back
/// (`bf16::from_f32`, `f16::from_f32`) reproduces MLX's bits; [`dequantize_native`] does that.
///
/// Errors (`InvalidDims`, op `dequantize`) on unsupported bits/group size, `cols %
/// group_size != 0`, `packed.len() != rows * cols * bits / 32`, scales or biases of length other
/// than `rows * cols / group_size`, or scales and biases of different dtypes.
pub fn dequantize(
    packed: &[u32],
    scales: &ScaleVecRef<'_>,
    biases: &ScaleVecRef<'_>,
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: u32,
) -> Result<Vec<f32>> {
    check_params("dequantize", rows, cols, group_size, bits)?;
    let words_per_row = cols * bits as usize / 32;
    let groups_per_row = cols / group_size;
    let n_words = rows * words_per_row;
    let n_groups = rows * groups_per_row;
    ensure_dims!(
        packed.len() == n_words,
        "dequantize",
        "packed",
        "packed has {} words, expected rows * cols * bits / 32 = {n_words}",
        packed.len()
    );
    for (field, v) in [("scales", scales), ("biases", biases)] {
        ensure_dims!(
            v.len() == n_groups,
            "dequantize",
            field,
            "{field} has {} elements, expected rows * cols / group_size = {n_groups}",
            v.len()
        );
    }
    ensure_dims!(
        scales.dtype() == biases.dtype(),
        "dequantize",
        "biases",
        "biases are {} but scales are {}",
        biases.dtype().name(),
        scales.dtype().name()
    );
    let mut out = vec![0f32; rows * cols];
    if cols == 0 {
        return Ok(out);
    }
    let dtype = scales.dtype();
    out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
        let row = &packed[r * words_per_row..(r + 1) * words_per_row];
        for (c, y) in o.iter_mut().enumerate() {
            let g = r * groups_per_row + c / group_size;
            let q = code_at(row, c, bits) as f32;
            let (s, b) = (scales.get(g), biases.get(g));
            *y = match dtype {
                WDtype::F32 => q * s + b,
                WDtype::Bf16 => {
                    let p = bf16::from_f32(q * s).to_f32();
                    bf16::from_f32(p + b).to_f32()
                }
                WDtype::F16 => {
                    let p = f16::from_f32(q * s).to_f32();
                    f16::from_f32(p + b).to_f32()
                }
            };
        }
    });
    Ok(out)
}

/// [`dequantize`] in the dtype `mx.dequantize` returns (that of the scales): bit-identical to
/// MLX's output.
pub fn dequantize_native(
    packed: &[u32],
    scales: &ScaleVecRef<'_>,
    biases: &ScaleVecRef<'_>,
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: u32,
) -> Result<ScaleVec> {
    let v = dequantize(packed, scales, biases, rows, cols, group_size, bits)?;
    Ok(match scales.dtype() {
        WDtype::F32 => ScaleVec::F32(v),
        WDtype::Bf16 => ScaleVec::Bf16(v.into_iter().map(bf16::from_f32).collect()),
        WDtype::F16 => ScaleVec::F16(v.into_iter().map(f16::from_f32).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [-1, 1), exact in f32.
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 * (2f32).powi(-23) - 1.0
        }
    }

    /// The input fed to MLX to make `GOLDEN` (mirrored by `golden_input` in
    /// tests/python/test_quant.py): xorshift values with per-row magnitudes, a zero group,
    /// constant groups, single outliers of both signs.
    fn golden_input() -> Vec<f32> {
        let (rows, cols) = (8, 384);
        let exps = [0, -3, 4, -12, 2, 8, -1, -30];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut w = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                w[r * cols + c] = rng.unit() * (2f32).powi(exps[r]);
            }
        }
        let row = |w: &mut Vec<f32>, r: usize, a: usize, b: usize, f: &dyn Fn(f32) -> f32| {
            for x in &mut w[r * cols + a..r * cols + b] {
                *x = f(*x);
            }
        };
        row(&mut w, 0, 0, 128, &|_| 0.0);
        row(&mut w, 1, 128, 256, &|_| 0.75);
        row(&mut w, 2, 0, 128, &|x| x * (2f32).powi(-10));
        w[2 * cols + 5] = 40.0;
        row(&mut w, 3, 256, 384, &|x| x - (2f32).powi(-10));
        row(&mut w, 4, 128, 256, &|_| -3.5);
        row(&mut w, 6, 0, 128, &|x| x + 0.25);
        w[6 * cols + 100] = -9.0;
        w
    }

    fn fnv(h: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            *h ^= b as u64;
            *h = h.wrapping_mul(0x100_0000_01b3);
        }
    }

    fn hash_outputs(q: &Quantized, deq: &ScaleVec) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let words: Vec<u8> = q.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
        fnv(&mut h, &words);
        for v in [&q.scales, &q.biases, deq] {
            fnv(&mut h, &v.as_ref().to_le_bytes());
        }
        h
    }

    #[derive(Clone, Copy, Debug)]
    enum Dt {
        F32,
        Bf16,
        F16,
    }
    use Dt::*;

    /// FNV-1a of `wq | scales | biases | mx.dequantize(...)` raw little-endian bytes, from mlx
    /// 0.32.4 (CPU) run on `golden_input()` cast (round to nearest even) to each dtype;
    /// `test_mlx_reproduces_rust_golden_hashes` in tests/python/test_quant.py regenerates them.
    const GOLDEN: [(Dt, u32, usize, u64); 45] = [
        (F32, 2, 32, 0x1a6b635ddbf6bd0c),
        (F32, 2, 64, 0x6ac167bc9757df44),
        (F32, 2, 128, 0x209a05b73991549c),
        (F32, 3, 32, 0x533aa18bdf3ff840),
        (F32, 3, 64, 0xe6d4f373eb9a8853),
        (F32, 3, 128, 0x6dd7b46f2fba363c),
        (F32, 4, 32, 0x20dce61616338a55),
        (F32, 4, 64, 0x5037887b00eb05e3),
        (F32, 4, 128, 0x5845cc3a323a02ea),
        (F32, 6, 32, 0xd69d925d4674a8c1),
        (F32, 6, 64, 0x9f12e09dfa9fe518),
        (F32, 6, 128, 0x5b89fe0de1e74868),
        (F32, 8, 32, 0xf87a64e4126cc0db),
        (F32, 8, 64, 0xcf961b8fc8f70577),
        (F32, 8, 128, 0x883ea51fbcd3dc23),
        (Bf16, 2, 32, 0x6f5a8f9479cf727d),
        (Bf16, 2, 64, 0x8bcc0bd8f5530794),
        (Bf16, 2, 128, 0xacf034f7cc645524),
        (Bf16, 3, 32, 0x35b6af46eae15fdc),
        (Bf16, 3, 64, 0xe6c5265396dbbbec),
        (Bf16, 3, 128, 0xe13a188a3d82e446),
        (Bf16, 4, 32, 0x0e6e3f06606b60da),
        (Bf16, 4, 64, 0x8e51e9acc4733101),
        (Bf16, 4, 128, 0x2871eda2414af4d1),
        (Bf16, 6, 32, 0x43d929fe303bce40),
        (Bf16, 6, 64, 0x18436bd5d6dcf6b0),
        (Bf16, 6, 128, 0x103d2926433ddc5b),
        (Bf16, 8, 32, 0xcf817e6a93a4b97f),
        (Bf16, 8, 64, 0xc517cedb7e5afe00),
        (Bf16, 8, 128, 0xe97e4f78eb8727df),
        (F16, 2, 32, 0x61e6f5f72cc1103c),
        (F16, 2, 64, 0xc2097788436e526d),
        (F16, 2, 128, 0x1bce4c76b25c578d),
        (F16, 3, 32, 0x8999a1cf42623788),
        (F16, 3, 64, 0x6067bc44251a2e7e),
        (F16, 3, 128, 0xff482ccabe5df5aa),
        (F16, 4, 32, 0x5570f62ea6093a0b),
        (F16, 4, 64, 0x8cb3d2a70a7abaf2),
        (F16, 4, 128, 0x49909dbdd4f240f0),
        (F16, 6, 32, 0x6a3b7980f7ebcf49),
        (F16, 6, 64, 0x5b855771d9de698c),
        (F16, 6, 128, 0x28c30d290d06adf6),
        (F16, 8, 32, 0xe5fa19700d9adc92),
        (F16, 8, 64, 0xb74e80c1984336c9),
        (F16, 8, 128, 0xfc0e5310165a256d),
    ];

    fn run(w: &[f32], dt: Dt, rows: usize, cols: usize, g: usize, bits: u32) -> Quantized {
        let bf: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let hf: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
        let input = match dt {
            F32 => QuantInput::F32(w),
            Bf16 => QuantInput::Bf16(&bf),
            F16 => QuantInput::F16(&hf),
        };
        quantize(input, rows, cols, g, bits).unwrap()
    }

    #[test]
    fn golden_hashes_match_mlx() {
        let w = golden_input();
        let mut bad = vec![];
        for &(dt, bits, g, want) in GOLDEN.iter() {
            let q = run(&w, dt, 8, 384, g, bits);
            let (s, b) = (q.scales.as_ref(), q.biases.as_ref());
            let deq = dequantize_native(&q.packed, &s, &b, 8, 384, g, bits).unwrap();
            let got = hash_outputs(&q, &deq);
            if got != want {
                bad.push(format!(
                    "{dt:?} bits={bits} g={g}: {got:#018x} != {want:#018x}"
                ));
            }
        }
        assert!(bad.is_empty(), "mismatches with MLX:\n{}", bad.join("\n"));
    }

    /// Straightforward f64 transcription of the algorithm (min/max, scale, edge, codes).
    fn reference_group(w: &[f64], bits: u32) -> (f64, f64, Vec<f64>) {
        let n_bins = ((1u32 << bits) - 1) as f64;
        let mx = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mn = w.iter().cloned().fold(f64::INFINITY, f64::min);
        let mask = mn.abs() > mx.abs();
        let mut s = ((mx - mn) / n_bins).max(1e-7);
        if !mask {
            s = -s;
        }
        let edge = if mask { mn } else { mx };
        let q0 = (edge / s).round_ties_even();
        let mut b = 0.0;
        if q0 != 0.0 {
            s = edge / q0;
            b = edge;
        }
        let q = w.iter().map(|&x| ((x - b) / s).clamp(-1e9, 1e9)).collect();
        (s, b, q)
    }

    #[test]
    fn codes_and_dequant_agree_with_f64_reference() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for &bits in &SUPPORTED_BITS {
            for &g in &SUPPORTED_GROUP_SIZES {
                let (rows, cols) = (5, 3 * g);
                let w: Vec<f32> = (0..rows * cols)
                    .map(|i| {
                        rng.unit() * (1.0 + (i / g) as f32) + if i % 7 == 0 { 0.3 } else { 0.0 }
                    })
                    .collect();
                let q = quantize(QuantInput::F32(&w), rows, cols, g, bits).unwrap();
                let (s, b) = (q.scales.as_ref(), q.biases.as_ref());
                let deq = dequantize(&q.packed, &s, &b, rows, cols, g, bits).unwrap();
                let wpr = cols * bits as usize / 32;
                for r in 0..rows {
                    for gi in 0..cols / g {
                        let idx = r * cols + gi * g;
                        let wg: Vec<f64> = w[idx..idx + g].iter().map(|&x| x as f64).collect();
                        let (rs, rb, rq) = reference_group(&wg, bits);
                        let k = r * (cols / g) + gi;
                        let (gs, gb) = (s.get(k) as f64, b.get(k) as f64);
                        assert!((gs - rs).abs() <= 1e-6 * rs.abs(), "scale {gs} vs {rs}");
                        assert!((gb - rb).abs() <= 1e-6 * rb.abs(), "bias {gb} vs {rb}");
                        let n_bins = ((1u32 << bits) - 1) as f64;
                        for j in 0..g {
                            let code = code_at(&q.packed[r * wpr..(r + 1) * wpr], gi * g + j, bits);
                            let x = rq[j];
                            let want = x.round_ties_even().clamp(0.0, n_bins);
                            // f32 vs f64 may only disagree next to a rounding tie.
                            let near_tie = (x - x.floor() - 0.5).abs() < 1e-3;
                            assert!(
                                code as f64 == want || near_tie,
                                "bits={bits} g={g} r={r} c={}: code {code} vs {want} ({x})",
                                gi * g + j
                            );
                            let d = deq[idx + j] as f64;
                            let dref = gs * code as f64 + gb;
                            assert!((d - dref).abs() <= 1e-6 * (dref.abs() + gb.abs() + 1e-30));
                            // Error is half a step, or the clipped overshoot: rescaling to
                            // `edge / q0` can push the far extreme past the last code.
                            let steps = (x - n_bins).max(-x).max(0.5);
                            assert!(
                                (d - wg[j]).abs()
                                    <= steps * gs.abs() * (1.0 + 1e-4) + 1e-6 * gb.abs(),
                                "bits={bits} g={g}: {d} vs {} (x = {x})",
                                wg[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn special_groups() {
        let g = 32;
        let mut w = vec![0f32; 4 * g];
        w[g..2 * g].fill(2.5); // constant positive
        w[2 * g..3 * g]
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * 0.01);
        w[2 * g + 7] = -5.0; // negative outlier dominates: positive scale, bias = min
        w[3 * g..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * -0.01 + 0.1);
        w[3 * g + 9] = 6.0; // positive outlier dominates: negative scale, bias = max
        let q = quantize(QuantInput::F32(&w), 1, 4 * g, g, 4).unwrap();
        let ScaleVec::F32(s) = &q.scales else {
            panic!()
        };
        let ScaleVec::F32(b) = &q.biases else {
            panic!()
        };
        // Zero group: scale -1e-7, bias 0, codes 0.
        assert_eq!((s[0], b[0]), (-1e-7, 0.0));
        assert!(q.packed[..4].iter().all(|&x| x == 0));
        // Constant group: bias is the value, codes 0, exact reconstruction.
        assert_eq!(b[1], 2.5);
        assert!(s[1] < 0.0);
        assert!(q.packed[4..8].iter().all(|&x| x == 0));
        assert!(s[2] > 0.0 && b[2] == -5.0);
        assert!(s[3] < 0.0 && b[3] == 6.0);
        let deq = dequantize(
            &q.packed,
            &q.scales.as_ref(),
            &q.biases.as_ref(),
            1,
            4 * g,
            g,
            4,
        )
        .unwrap();
        assert!(deq[..g].iter().all(|&x| x == 0.0));
        assert!(deq[g..2 * g].iter().all(|&x| x == 2.5));
        assert_eq!(deq[2 * g + 7], -5.0);
        assert_eq!(deq[3 * g + 9], 6.0);
    }

    #[test]
    fn magic_rounding_is_round_ties_even() {
        let mut rng = Rng(77);
        let mut xs: Vec<f32> = (-4..600).map(|i| i as f32 * 0.5).collect();
        xs.extend((0..100_000).map(|_| (rng.unit() + 1.0) * 140.0 - 8.0));
        xs.extend([
            -1.0,
            -0.5,
            -0.0,
            0.0,
            0.49999997,
            0.5,
            1.5,
            2.5,
            255.5,
            256.0,
            4_194_303.5,
        ]);
        for x in xs {
            assert_eq!(rint_small(x) as f32, x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn packing_layout() {
        let mut rng = Rng(99);
        for &bits in &SUPPORTED_BITS {
            let codes: Vec<u32> = (0..128)
                .map(|_| (rng.next() % (1 << bits)) as u32)
                .collect();
            let mut a = vec![0u32; 4 * bits as usize];
            pack_stream(&codes, bits, &mut a);
            // Independent check: the bit stream read one bit at a time, LSB first.
            for (c, &q) in codes.iter().enumerate() {
                let mut v = 0u32;
                for k in 0..bits as usize {
                    let bit = c * bits as usize + k;
                    v |= ((a[bit / 32] >> (bit % 32)) & 1) << k;
                }
                assert_eq!(v, q);
                assert_eq!(code_at(&a, c, bits), q);
            }
            if 32 % bits == 0 {
                let mut b = vec![0u32; 4 * bits as usize];
                match bits {
                    2 => pack_pow2::<2>(&codes, &mut b),
                    4 => pack_pow2::<4>(&codes, &mut b),
                    _ => pack_pow2::<8>(&codes, &mut b),
                }
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn half_dtypes_round_only_at_storage() {
        // Codes come from the f32 scale; the stored scale is that value rounded.
        let mut rng = Rng(5);
        let w: Vec<f32> = (0..4 * 128).map(|_| rng.unit() * 3.0 + 1.0).collect();
        let w16: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let wf: Vec<f32> = w16.iter().map(|x| x.to_f32()).collect();
        let a = quantize(QuantInput::Bf16(&w16), 4, 128, 64, 4).unwrap();
        let b = quantize(QuantInput::F32(&wf), 4, 128, 64, 4).unwrap();
        assert_eq!(a.packed, b.packed);
        for i in 0..a.scales.len() {
            assert_eq!(a.scales.get(i), bf16::from_f32(b.scales.get(i)).to_f32());
            assert_eq!(a.biases.get(i), bf16::from_f32(b.biases.get(i)).to_f32());
        }
    }

    #[test]
    fn errors_name_the_field() {
        let w = vec![0f32; 2 * 64];
        let field = |r: Result<Quantized>| match r {
            Err(crate::Error::InvalidDims { op, field, .. }) => (op, field),
            other => panic!("expected InvalidDims, got {other:?}"),
        };
        let inp = QuantInput::F32(&w);
        assert_eq!(
            field(quantize(inp, 2, 64, 64, 5)),
            ("quantize".into(), "bits")
        );
        assert_eq!(
            field(quantize(inp, 2, 64, 48, 4)),
            ("quantize".into(), "group_size")
        );
        assert_eq!(
            field(quantize(inp, 4, 32, 64, 4)),
            ("quantize".into(), "cols")
        );
        assert_eq!(
            field(quantize(inp, 3, 64, 64, 4)),
            ("quantize".into(), "data")
        );
        assert!(quantize(QuantInput::F32(&[]), 0, 64, 64, 4)
            .unwrap()
            .packed
            .is_empty());

        let q = quantize(inp, 2, 64, 32, 4).unwrap();
        let (s, b) = (q.scales.as_ref(), q.biases.as_ref());
        let dq = |r: Result<Vec<f32>>| match r {
            Err(crate::Error::InvalidDims { op, field, .. }) => {
                assert_eq!(op, "dequantize");
                field
            }
            other => panic!("expected InvalidDims, got {other:?}"),
        };
        assert_eq!(
            dq(dequantize(&q.packed[1..], &s, &b, 2, 64, 32, 4)),
            "packed"
        );
        assert_eq!(
            dq(dequantize(
                &q.packed,
                &ScaleVecRef::F32(&[0.0]),
                &b,
                2,
                64,
                32,
                4
            )),
            "scales"
        );
        assert_eq!(
            dq(dequantize(
                &q.packed,
                &s,
                &ScaleVecRef::F32(&[0.0]),
                2,
                64,
                32,
                4
            )),
            "biases"
        );
        let b16 = vec![bf16::ZERO; 4];
        assert_eq!(
            dq(dequantize(
                &q.packed,
                &s,
                &ScaleVecRef::Bf16(&b16),
                2,
                64,
                32,
                4
            )),
            "biases"
        );
        assert_eq!(dq(dequantize(&q.packed, &s, &b, 2, 64, 32, 7)), "bits");
        assert_eq!(
            dq(dequantize(&q.packed, &s, &b, 2, 64, 16, 4)),
            "group_size"
        );
    }
}
