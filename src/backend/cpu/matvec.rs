//! Quantized (MLX affine 4/8-bit) matrix-vector products, row dequantization and embedding gather.
//!
//! Per group the product is `s * dot(q, x_g) + b * sum(x_g)`, with `sum(x_g)` computed once per
//! token. Each token's `x` is first reordered chunk by chunk (8 packed words) so that lane `i` of
//! the `j`-th vector multiplies field `j` of word `i`, and scaled by `2^(-bits*j)`: field `j` is
//! then unpacked with a single mask of a whole 256-bit load (`w & (m << bits*j)` is `q * 2^(bits*j)`,
//! converted to f32 exactly), the last field with a shift. The power-of-two scalings are exact, so
//! the products equal `q * x`. Every output element is computed by one thread in a fixed order that
//! depends on neither the thread count nor the other tokens of the batch.

use super::view::{FloatSlice, QuantMatrix};
use rayon::prelude::*;

/// Packed words per SIMD chunk (one 256-bit load).
const CHUNK: usize = 8;
/// Tokens that share one unpacking of a weight chunk.
const TILE: usize = 4;
/// Independent accumulators per token (hide FMA latency). Fixed, so that a token's result does
/// not depend on the tile it lands in.
const NA: usize = 2;
/// Target packed-weight bytes per parallel row block.
const BLOCK_BYTES: usize = 64 << 10;
/// Target bytes of reordered `x` kept hot while a row block is swept (token block).
const XBLOCK_BYTES: usize = 256 << 10;

/// `y[t*rows + r] = sum_c dequant(w)[r, c] * x[t*cols + c]` for `t in 0..n_tokens`.
///
/// Preconditions (validated by the caller): `x.len() >= n_tokens*w.cols`,
/// `y.len() >= n_tokens*w.rows`, `bits` in {4, 8}, `group_size` in {32, 64, 128},
/// `cols % group_size == 0`.
pub fn matvec_n_tokens(w: &QuantMatrix<'_>, x: &[f32], y: &mut [f32], n_tokens: usize) {
    matvec_impl(w, x, y, n_tokens, Path::detect(), None);
}

/// Dequantize row `row` of `w` into `out[..w.cols]`.
pub fn dequant_row(w: &QuantMatrix<'_>, row: usize, out: &mut [f32]) {
    debug_assert!(row < w.rows && out.len() >= w.cols);
    debug_assert!(w.bits == 4 || w.bits == 8);
    let (wpr, gpr, gs) = (w.words_per_row(), w.groups_per_row(), w.group_size);
    let wpg = wpr / gpr.max(1);
    let words = &w.packed[row * wpr..(row + 1) * wpr];
    for g in 0..gpr {
        let s = w.scales.get(row * gpr + g);
        let b = w.biases.get(row * gpr + g);
        let ws = &words[g * wpg..(g + 1) * wpg];
        let o = &mut out[g * gs..(g + 1) * gs];
        if w.bits == 4 {
            unpack_group::<4>(ws, s, b, o);
        } else {
            unpack_group::<8>(ws, s, b, o);
        }
    }
}

/// `out[t*cols..] = dequant row ids[t]`. `Err((t, id))` for the first id `>= w.rows`; nothing is
/// written in that case.
pub fn embed_gather(w: &QuantMatrix<'_>, ids: &[u32], out: &mut [f32]) -> Result<(), (usize, u32)> {
    if let Some((t, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= w.rows)
    {
        return Err((t, id));
    }
    let cols = w.cols;
    debug_assert!(out.len() >= ids.len() * cols);
    if cols == 0 {
        return Ok(());
    }
    out[..ids.len() * cols]
        .par_chunks_mut(cols)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| dequant_row(w, id as usize, o));
    Ok(())
}

#[inline(always)]
fn unpack_group<const BITS: u32>(words: &[u32], s: f32, b: f32, out: &mut [f32]) {
    let epw = (32 / BITS) as usize;
    let mask = (1u32 << BITS) - 1;
    for (o, &wd) in out.chunks_exact_mut(epw).zip(words) {
        for (j, v) in o.iter_mut().enumerate() {
            *v = s * ((wd >> (BITS * j as u32)) & mask) as f32 + b;
        }
    }
}

/// Which inner kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Path {
    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Path::Avx2;
        }
        Path::Portable
    }
}

/// Reorder and scale one token's `x` chunk by chunk (see the module doc); a trailing partial chunk
/// is copied as is. Also writes the per-group sums.
fn prepare_token(x: &[f32], xp: &mut [f32], xs: &mut [f32], bits: u32, gs: usize) {
    let epw = (32 / bits) as usize;
    let span = CHUNK * epw;
    let full = x.len() / span * span;
    // Field j is read as q * 2^(bits*j) except the last, which is shifted down; 2^-(bits*j) is
    // built from its exponent bits so the scaling is exact.
    let scale: Vec<f32> = (0..epw as u32)
        .map(|j| {
            if j + 1 == epw as u32 {
                1.0
            } else {
                f32::from_bits((127 - bits * j) << 23)
            }
        })
        .collect();
    for (src, dst) in x[..full]
        .chunks_exact(span)
        .zip(xp[..full].chunks_exact_mut(span))
    {
        for i in 0..CHUNK {
            for j in 0..epw {
                dst[j * CHUNK + i] = src[i * epw + j] * scale[j];
            }
        }
    }
    xp[full..].copy_from_slice(&x[full..]);
    for (g, s) in x.chunks_exact(gs).zip(xs.iter_mut()) {
        *s = g.iter().map(|&v| v as f64).sum::<f64>() as f32;
    }
}

/// Everything a row kernel needs besides `x`.
struct RowArgs<'a> {
    words: &'a [u32],
    scales: &'a [f32],
    biases: &'a [f32],
    /// Packed words per group (4, 8, 16 or 32).
    wpg: usize,
}

/// Widen `src[start..start + dst.len()]` into `dst`.
fn widen(src: &FloatSlice<'_>, start: usize, dst: &mut [f32]) {
    let n = dst.len();
    match src {
        FloatSlice::F32(s) => dst.copy_from_slice(&s[start..start + n]),
        FloatSlice::Bf16(s) => {
            for (d, v) in dst.iter_mut().zip(&s[start..start + n]) {
                *d = v.to_f32();
            }
        }
        FloatSlice::F16(s) => {
            for (d, v) in dst.iter_mut().zip(&s[start..start + n]) {
                *d = v.to_f32();
            }
        }
    }
}

fn matvec_impl(
    w: &QuantMatrix<'_>,
    x: &[f32],
    y: &mut [f32],
    n_tokens: usize,
    path: Path,
    block_rows: Option<usize>,
) {
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    debug_assert!(w.bits == 4 || w.bits == 8, "bits {}", w.bits);
    debug_assert!(matches!(gs, 32 | 64 | 128), "group_size {gs}");
    debug_assert!(cols % gs == 0);
    debug_assert!(x.len() >= n_tokens * cols && y.len() >= n_tokens * rows);
    debug_assert!(w.packed.len() >= rows * w.words_per_row());
    debug_assert!(w.scales.len() >= rows * w.groups_per_row());
    debug_assert!(w.biases.len() >= rows * w.groups_per_row());
    if n_tokens == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        y[..n_tokens * rows].fill(0.0);
        return;
    }
    let gpr = w.groups_per_row();
    let wpr = w.words_per_row();

    let mut xp = vec![0f32; n_tokens * cols];
    let mut xs = vec![0f32; n_tokens * gpr];
    let prep = |((xt, xpt), xst): ((&[f32], &mut [f32]), &mut [f32])| {
        prepare_token(xt, xpt, xst, w.bits, gs)
    };
    let x = &x[..n_tokens * cols];
    if n_tokens * cols >= 1 << 16 {
        x.par_chunks(cols)
            .zip(xp.par_chunks_mut(cols))
            .zip(xs.par_chunks_mut(gpr))
            .for_each(prep);
    } else {
        x.chunks(cols)
            .zip(xp.chunks_mut(cols))
            .zip(xs.chunks_mut(gpr))
            .for_each(prep);
    }

    let row_bytes = wpr * 4;
    let block = block_rows.unwrap_or_else(|| {
        let threads = rayon::current_num_threads().max(1);
        let target = if n_tokens > TILE {
            4 * BLOCK_BYTES
        } else {
            BLOCK_BYTES
        };
        (target / row_bytes).clamp(1, rows.div_ceil(4 * threads).max(1))
    });
    // Tokens swept per pass over a row block: enough to keep their reordered x in L2.
    let tblock = ((XBLOCK_BYTES / (cols * 4)) / TILE * TILE).max(TILE);

    // Computes rows r0.. of the block into `out`, laid out [row][token].
    let run_block = |r0: usize, out: &mut [f32]| {
        let nr = out.len() / n_tokens;
        let mut srow = vec![0f32; gpr];
        let mut brow = vec![0f32; gpr];
        let mut tb0 = 0;
        while tb0 < n_tokens {
            let tb1 = (tb0 + tblock).min(n_tokens);
            for ri in 0..nr {
                let r = r0 + ri;
                widen(&w.scales, r * gpr, &mut srow);
                widen(&w.biases, r * gpr, &mut brow);
                let args = RowArgs {
                    words: &w.packed[r * wpr..(r + 1) * wpr],
                    scales: &srow,
                    biases: &brow,
                    wpg: wpr / gpr,
                };
                let o = &mut out[ri * n_tokens..(ri + 1) * n_tokens];
                let mut t0 = tb0;
                while t0 < tb1 {
                    let tt = (tb1 - t0).min(TILE);
                    let xt = |i: usize| &xp[(t0 + i) * cols..(t0 + i + 1) * cols];
                    let st = |i: usize| &xs[(t0 + i) * gpr..(t0 + i + 1) * gpr];
                    let o = &mut o[t0..t0 + tt];
                    match tt {
                        1 => o.copy_from_slice(&row_tile::<1>(path, w.bits, &args, xt, st)),
                        2 => o.copy_from_slice(&row_tile::<2>(path, w.bits, &args, xt, st)),
                        3 => o.copy_from_slice(&row_tile::<3>(path, w.bits, &args, xt, st)),
                        _ => o.copy_from_slice(&row_tile::<4>(path, w.bits, &args, xt, st)),
                    }
                    t0 += tt;
                }
            }
            tb0 = tb1;
        }
    };

    if n_tokens == 1 {
        let y = &mut y[..rows];
        if rows <= block {
            run_block(0, y);
        } else {
            y.par_chunks_mut(block)
                .enumerate()
                .for_each(|(bi, out)| run_block(bi * block, out));
        }
    } else {
        let mut yt = vec![0f32; rows * n_tokens];
        yt.par_chunks_mut(block * n_tokens)
            .enumerate()
            .for_each(|(bi, out)| run_block(bi * block, out));
        y[..n_tokens * rows]
            .par_chunks_mut(rows)
            .enumerate()
            .for_each(|(t, yr)| {
                for (r, v) in yr.iter_mut().enumerate() {
                    *v = yt[r * n_tokens + t];
                }
            });
    }
}

/// One weight row against `TT` tokens.
#[inline(always)]
fn row_tile<'x, const TT: usize>(
    path: Path,
    bits: u32,
    a: &RowArgs<'_>,
    xt: impl Fn(usize) -> &'x [f32],
    st: impl Fn(usize) -> &'x [f32],
) -> [f32; TT] {
    let xp: [&[f32]; TT] = std::array::from_fn(&xt);
    let xs: [&[f32]; TT] = std::array::from_fn(&st);
    let mut out = match (path, bits) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Path::Avx2 is only chosen when AVX2 and FMA were detected at run time.
        (Path::Avx2, 4) => unsafe { avx2::row::<4, 8, 28, TT>(a, &xp) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Path::Avx2, _) => unsafe { avx2::row::<8, 4, 24, TT>(a, &xp) },
        (Path::Portable, 4) => portable::row::<4, 8, TT>(a, &xp),
        (Path::Portable, _) => portable::row::<8, 4, TT>(a, &xp),
    };
    tail_and_bias(bits, a, &xp, &xs, &mut out);
    out
}

/// Adds the words past the last full chunk (only 4-bit, group 32, odd group count) and the
/// `b * sum(x_g)` terms.
#[inline(always)]
fn tail_and_bias<const TT: usize>(
    bits: u32,
    a: &RowArgs<'_>,
    xp: &[&[f32]; TT],
    xs: &[&[f32]; TT],
    out: &mut [f32; TT],
) {
    let epw = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let full = a.words.len() / CHUNK * CHUNK;
    for (wi, &wd) in a.words.iter().enumerate().skip(full) {
        let s = a.scales[wi / a.wpg];
        let mut dot = [0f32; TT];
        for j in 0..epw {
            let q = ((wd >> (bits * j as u32)) & mask) as f32;
            for t in 0..TT {
                dot[t] += q * xp[t][wi * epw + j];
            }
        }
        for t in 0..TT {
            out[t] += s * dot[t];
        }
    }
    for t in 0..TT {
        out[t] += dot_lanes(a.biases, xs[t]);
    }
}

/// `sum a[i] * b[i]` over 8 lane accumulators (vectorisable, fixed order).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; CHUNK];
    let n = a.len() / CHUNK * CHUNK;
    for (ca, cb) in a[..n].chunks_exact(CHUNK).zip(b[..n].chunks_exact(CHUNK)) {
        for i in 0..CHUNK {
            acc[i] += ca[i] * cb[i];
        }
    }
    for (i, (&va, &vb)) in a[n..].iter().zip(&b[n..a.len()]).enumerate() {
        acc[i] += va * vb;
    }
    let h: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

/// The kernel in plain Rust over 8-lane arrays (LLVM vectorises it); same reduction order as AVX2.
mod portable {
    use super::{RowArgs, CHUNK, NA};

    type Lanes = [f32; CHUNK];

    #[inline(always)]
    fn chunk<const BITS: u32, const EPW: usize, const TT: usize>(
        words: &[u32],
        xp: &[&[f32]; TT],
        xoff: usize,
        acc: &mut [[Lanes; NA]; TT],
    ) {
        for j in 0..EPW {
            let mask = ((1u32 << BITS) - 1) << (BITS * j as u32);
            let mut q = [0f32; CHUNK];
            for i in 0..CHUNK {
                // Below 2^31 (the top field is shifted), so the i32 conversion is exact.
                let v = if j + 1 == EPW {
                    words[i] >> (BITS * j as u32)
                } else {
                    words[i] & mask
                };
                q[i] = v as i32 as f32;
            }
            for t in 0..TT {
                let xv = &xp[t][xoff + j * CHUNK..xoff + (j + 1) * CHUNK];
                let a = &mut acc[t][j % NA];
                for i in 0..CHUNK {
                    a[i] += q[i] * xv[i];
                }
            }
        }
    }

    /// `sum_c s_g(c) * q_c * x_c` over the full chunks of the row, per token.
    pub(super) fn row<const BITS: u32, const EPW: usize, const TT: usize>(
        a: &RowArgs<'_>,
        xp: &[&[f32]; TT],
    ) -> [f32; TT] {
        let nchunks = a.words.len() / CHUNK;
        let mut racc = [[0f32; CHUNK]; TT];
        let fold = |acc: &[[Lanes; NA]; TT], sv: &Lanes, racc: &mut [Lanes; TT]| {
            for t in 0..TT {
                let mut sum = acc[t][0];
                for a in &acc[t][1..] {
                    for i in 0..CHUNK {
                        sum[i] += a[i];
                    }
                }
                for i in 0..CHUNK {
                    racc[t][i] += sum[i] * sv[i];
                }
            }
        };
        if a.wpg >= CHUNK {
            let cpg = a.wpg / CHUNK;
            for (g, &s) in a.scales.iter().enumerate() {
                let mut acc = [[[0f32; CHUNK]; NA]; TT];
                for c in g * cpg..(g + 1) * cpg {
                    let words = &a.words[c * CHUNK..(c + 1) * CHUNK];
                    chunk::<BITS, EPW, TT>(words, xp, c * CHUNK * EPW, &mut acc);
                }
                fold(&acc, &[s; CHUNK], &mut racc);
            }
        } else {
            // Four words per group: a chunk spans groups 2c and 2c+1.
            for c in 0..nchunks {
                let mut acc = [[[0f32; CHUNK]; NA]; TT];
                let words = &a.words[c * CHUNK..(c + 1) * CHUNK];
                chunk::<BITS, EPW, TT>(words, xp, c * CHUNK * EPW, &mut acc);
                let (s0, s1) = (a.scales[2 * c], a.scales[2 * c + 1]);
                fold(&acc, &[s0, s0, s0, s0, s1, s1, s1, s1], &mut racc);
            }
        }
        std::array::from_fn(|t| hsum(&racc[t]))
    }

    /// Lane sum in the order the AVX2 kernel uses: halves, then pairs, then the last two.
    #[inline(always)]
    fn hsum(v: &Lanes) -> f32 {
        let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        let p = [h[0] + h[2], h[1] + h[3]];
        p[0] + p[1]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{RowArgs, CHUNK, NA};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn chunk<const BITS: i32, const EPW: usize, const LAST: i32, const TT: usize>(
        words: *const u32,
        xp: &[*const f32; TT],
        xoff: usize,
        acc: &mut [[__m256; NA]; TT],
    ) {
        let w = _mm256_loadu_si256(words.cast());
        for j in 0..EPW {
            let qi = if j + 1 == EPW {
                _mm256_srli_epi32::<LAST>(w)
            } else {
                _mm256_and_si256(w, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * j as i32)))
            };
            let q = _mm256_cvtepi32_ps(qi);
            for t in 0..TT {
                let xv = _mm256_loadu_ps(xp[t].add(xoff + j * CHUNK));
                acc[t][j % NA] = _mm256_fmadd_ps(q, xv, acc[t][j % NA]);
            }
        }
    }

    #[inline(always)]
    unsafe fn fold<const TT: usize>(acc: &[[__m256; NA]; TT], sv: __m256, racc: &mut [__m256; TT]) {
        for t in 0..TT {
            let mut sum = acc[t][0];
            for &a in &acc[t][1..] {
                sum = _mm256_add_ps(sum, a);
            }
            racc[t] = _mm256_fmadd_ps(sum, sv, racc[t]);
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let p = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)))
    }

    /// As `portable::row`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row<
        const BITS: i32,
        const EPW: usize,
        const LAST: i32,
        const TT: usize,
    >(
        a: &RowArgs<'_>,
        xp: &[&[f32]; TT],
    ) -> [f32; TT] {
        let nchunks = a.words.len() / CHUNK;
        // Bounds for every unchecked access below.
        assert!(a.scales.len() * a.wpg == a.words.len());
        for x in xp {
            assert!(x.len() >= a.words.len() * EPW);
        }
        let wp = a.words.as_ptr();
        let sp = a.scales.as_ptr();
        let xptr: [*const f32; TT] = std::array::from_fn(|t| xp[t].as_ptr());
        let mut racc = [_mm256_setzero_ps(); TT];
        if a.wpg >= CHUNK {
            let cpg = a.wpg / CHUNK;
            for g in 0..a.scales.len() {
                let mut acc = [[_mm256_setzero_ps(); NA]; TT];
                for c in g * cpg..(g + 1) * cpg {
                    chunk::<BITS, EPW, LAST, TT>(
                        wp.add(c * CHUNK),
                        &xptr,
                        c * CHUNK * EPW,
                        &mut acc,
                    );
                }
                fold(&acc, _mm256_set1_ps(*sp.add(g)), &mut racc);
            }
        } else {
            // Four words per group: a chunk spans groups 2c and 2c+1.
            for c in 0..nchunks {
                let mut acc = [[_mm256_setzero_ps(); NA]; TT];
                chunk::<BITS, EPW, LAST, TT>(wp.add(c * CHUNK), &xptr, c * CHUNK * EPW, &mut acc);
                let sv =
                    _mm256_set_m128(_mm_set1_ps(*sp.add(2 * c + 1)), _mm_set1_ps(*sp.add(2 * c)));
                fold(&acc, sv, &mut racc);
            }
        }
        std::array::from_fn(|t| hsum(racc[t]))
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index-based f64 references read more plainly
pub(crate) mod tests {
    use super::*;
    use half::{bf16, f16};
    use std::time::Instant;

    /// xorshift64* with a fixed seed.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        pub(crate) fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Sd {
        F32,
        Bf16,
        F16,
    }

    pub(crate) enum Floats {
        F32(Vec<f32>),
        Bf16(Vec<bf16>),
        F16(Vec<f16>),
    }
    impl Floats {
        fn new(v: &[f32], sd: Sd) -> Floats {
            match sd {
                Sd::F32 => Floats::F32(v.to_vec()),
                Sd::Bf16 => Floats::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
                Sd::F16 => Floats::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            }
        }
        pub(crate) fn slice(&self) -> FloatSlice<'_> {
            match self {
                Floats::F32(v) => FloatSlice::F32(v),
                Floats::Bf16(v) => FloatSlice::Bf16(v),
                Floats::F16(v) => FloatSlice::F16(v),
            }
        }
        /// Little-endian bytes, as stored in a weight file.
        pub(crate) fn bytes(&self) -> Vec<u8> {
            match self {
                Floats::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Floats::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Floats::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        }
    }

    /// An owned MLX-affine quantized matrix.
    pub(crate) struct Quant {
        pub(crate) packed: Vec<u32>,
        pub(crate) scales: Floats,
        pub(crate) biases: Floats,
        pub(crate) rows: usize,
        pub(crate) cols: usize,
        pub(crate) bits: u32,
        pub(crate) gs: usize,
    }
    impl Quant {
        pub(crate) fn view(&self) -> QuantMatrix<'_> {
            QuantMatrix {
                packed: &self.packed,
                scales: self.scales.slice(),
                biases: self.biases.slice(),
                rows: self.rows,
                cols: self.cols,
                bits: self.bits,
                group_size: self.gs,
            }
        }
    }

    /// Quantize a row-major `[rows, cols]` matrix with the MLX affine scheme.
    pub(crate) fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        gs: usize,
        sd: Sd,
    ) -> Quant {
        let levels = ((1u32 << bits) - 1) as f32;
        let epw = 32 / bits as usize;
        let mut packed = vec![0u32; rows * cols / epw];
        let (mut scales, mut biases) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for g in 0..cols / gs {
                let vals = &w[r * cols + g * gs..r * cols + (g + 1) * gs];
                let mn = vals.iter().cloned().fold(f32::INFINITY, f32::min);
                let mx = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mask = mn.abs() > mx.abs();
                let mut s = ((mx - mn) / levels).max(1e-7);
                if !mask {
                    s = -s;
                }
                let edge = if mask { mn } else { mx };
                let q0 = (edge / s).round_ties_even();
                let b = if q0 != 0.0 {
                    s = edge / q0;
                    edge
                } else {
                    0.0
                };
                for (i, &v) in vals.iter().enumerate() {
                    let q = ((v - b) / s).round_ties_even().clamp(0.0, levels) as u32;
                    let c = g * gs + i;
                    packed[(r * cols + c) / epw] |= q << ((c % epw) as u32 * bits);
                }
                scales.push(s);
                biases.push(b);
            }
        }
        Quant {
            packed,
            scales: Floats::new(&scales, sd),
            biases: Floats::new(&biases, sd),
            rows,
            cols,
            bits,
            gs,
        }
    }

    pub(crate) fn random_quant(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        bits: u32,
        gs: usize,
        sd: Sd,
    ) -> Quant {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 0.5).collect();
        quantize(&w, rows, cols, bits, gs, sd)
    }

    /// Element `[r, c]` of the dequantized matrix, read straight from the packed words, in f64.
    pub(crate) fn deq64(w: &QuantMatrix<'_>, r: usize, c: usize) -> f64 {
        let bits = w.bits as usize;
        let bit = (r * w.cols + c) * bits;
        let q = (w.packed[bit / 32] >> (bit % 32)) & ((1u32 << bits) - 1);
        let g = r * (w.cols / w.group_size) + c / w.group_size;
        w.scales.get(g) as f64 * q as f64 + w.biases.get(g) as f64
    }

    /// `(y, err_scale)`: the f64 product and `sum_c (|s q| + |b|) |x_c|` per output.
    fn ref_matvec(w: &QuantMatrix<'_>, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut mag) = (vec![0.0; n * w.rows], vec![0.0; n * w.rows]);
        for t in 0..n {
            for r in 0..w.rows {
                for c in 0..w.cols {
                    let xv = x[t * w.cols + c] as f64;
                    let b = w.biases.get(r * (w.cols / w.group_size) + c / w.group_size) as f64;
                    let v = deq64(w, r, c);
                    y[t * w.rows + r] += v * xv;
                    mag[t * w.rows + r] += ((v - b).abs() + b.abs()) * xv.abs();
                }
            }
        }
        (y, mag)
    }

    fn paths() -> Vec<Path> {
        let mut p = vec![Path::Portable];
        if Path::detect() != Path::Portable {
            p.push(Path::detect());
        }
        p
    }

    #[test]
    fn matvec_matches_f64_reference() {
        let mut rng = Rng::new(1);
        let shapes: &[(u32, usize, usize, usize)] = &[
            (4, 32, 7, 96), // odd group count: a half chunk at the end of each row
            (4, 32, 5, 256),
            (4, 64, 33, 192),
            (4, 128, 9, 384),
            (8, 32, 11, 96),
            (8, 64, 3, 128),
            (8, 128, 13, 256),
        ];
        for &(bits, gs, rows, cols) in shapes {
            for sd in [Sd::F32, Sd::Bf16, Sd::F16] {
                let q = random_quant(&mut rng, rows, cols, bits, gs, sd);
                let w = q.view();
                for n in [1usize, 3, 17] {
                    let x = rng.vec(n * cols);
                    let (yr, mag) = ref_matvec(&w, &x, n);
                    for path in paths() {
                        for block in [None, Some(1), Some(4)] {
                            let mut y = vec![f32::NAN; n * rows + 3];
                            matvec_impl(&w, &x, &mut y, n, path, block);
                            for i in 0..n * rows {
                                let err = (y[i] as f64 - yr[i]).abs();
                                assert!(
                                    err <= 1e-5 * mag[i] + 1e-12,
                                    "bits {bits} gs {gs} {rows}x{cols} {sd:?} n {n} {path:?} \
                                     {block:?} out {i}: {} vs {} (mag {})",
                                    y[i],
                                    yr[i],
                                    mag[i]
                                );
                            }
                            assert!(
                                y[n * rows..].iter().all(|v| v.is_nan()),
                                "wrote past the end"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matvec_is_deterministic_across_blocks_and_threads() {
        let mut rng = Rng::new(2);
        let (rows, cols, n) = (301, 512, 6);
        let q = random_quant(&mut rng, rows, cols, 4, 64, Sd::Bf16);
        let x = rng.vec(n * cols);
        let mut base = vec![0f32; n * rows];
        matvec_n_tokens(&q.view(), &x, &mut base, n);
        for block in [Some(1), Some(7), Some(1000)] {
            let mut y = vec![0f32; n * rows];
            matvec_impl(&q.view(), &x, &mut y, n, Path::detect(), block);
            assert_eq!(y, base);
        }
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut y = vec![0f32; n * rows];
        one.install(|| matvec_n_tokens(&q.view(), &x, &mut y, n));
        assert_eq!(y, base);
        // A token's result does not depend on which tile or batch it is in.
        let mut y1 = vec![0f32; rows];
        matvec_n_tokens(&q.view(), &x[5 * cols..], &mut y1, 1);
        assert_eq!(y1, base[5 * rows..]);
    }

    #[test]
    fn dequant_row_and_embed_gather() {
        let mut rng = Rng::new(3);
        for (bits, gs, sd) in [(4, 32, Sd::Bf16), (4, 64, Sd::F32), (8, 128, Sd::F16)] {
            let (rows, cols) = (13, 384);
            let q = random_quant(&mut rng, rows, cols, bits, gs, sd);
            let w = q.view();
            let ids = [12u32, 0, 5, 5, 7];
            let mut out = vec![f32::NAN; ids.len() * cols];
            embed_gather(&w, &ids, &mut out).unwrap();
            for (t, &id) in ids.iter().enumerate() {
                let mut row = vec![0f32; cols];
                dequant_row(&w, id as usize, &mut row);
                assert_eq!(row[..], out[t * cols..(t + 1) * cols]);
                for c in 0..cols {
                    let r = deq64(&w, id as usize, c);
                    assert!(
                        (row[c] as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()),
                        "{bits} {gs} {c}"
                    );
                }
            }
            let mut out = vec![1.5f32; 3 * cols];
            assert_eq!(embed_gather(&w, &[1, 13, 99], &mut out), Err((1, 13)));
            assert!(out.iter().all(|&v| v == 1.5), "written before the error");
        }
    }

    /// CPU time of the calling thread (Linux; excludes time spent descheduled on a busy machine).
    fn thread_cpu_s() -> f64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |ns| ns * 1e-9)
    }

    /// Both-core bandwidth of the decode matvec vs a plain copy. Run with
    /// `cargo test --release --no-default-features --lib matvec::tests::bandwidth -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bandwidth() {
        fn best(mut f: impl FnMut(), reps: usize) -> f64 {
            f();
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        }
        let threads = rayon::current_num_threads();
        let n = 256 << 20;
        let src: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; n];
        let t = best(
            || {
                dst.par_chunks_mut(1 << 20)
                    .zip(src.par_chunks(1 << 20))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            },
            5,
        );
        println!(
            "copy 256 MiB ({threads} threads): {:.1} GB/s (bytes copied / time)",
            n as f64 / t / 1e9
        );
        let words: Vec<u64> = (0..n / 8).map(|i| i as u64).collect();
        let t = best(
            || {
                let s: u64 = words
                    .par_chunks(1 << 17)
                    .map(|c| c.iter().fold(0u64, |a, &b| a ^ b))
                    .sum();
                std::hint::black_box(s);
            },
            5,
        );
        println!("read 256 MiB: {:.1} GB/s", n as f64 / t / 1e9);

        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut rng = Rng::new(4);
        for (rows, cols, bits, gs, n_tok) in [
            (8192, 8192, 4, 64, 1),
            (16384, 8192, 4, 64, 1),
            (16384, 8192, 8, 64, 1),
            (4096, 4096, 4, 64, 4),
            (4096, 4096, 4, 64, 17),
        ] {
            let gpr = cols / gs;
            let q = Quant {
                packed: (0..rows * cols * bits as usize / 32)
                    .map(|_| rng.next_u64() as u32)
                    .collect(),
                scales: Floats::new(&rng.vec(rows * gpr), Sd::Bf16),
                biases: Floats::new(&rng.vec(rows * gpr), Sd::Bf16),
                rows,
                cols,
                bits,
                gs,
            };
            let bytes = (q.packed.len() * 4 + 2 * rows * gpr * 2) as f64;
            let x = rng.vec(n_tok * cols);
            let mut y = vec![0f32; n_tok * rows];
            let w = q.view();
            for path in paths() {
                let t = best(|| matvec_impl(&w, &x, &mut y, n_tok, path, None), 10);
                let (t1, c1) = one.install(|| {
                    let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
                    // schedstat advances at scheduler ticks: time several calls per sample.
                    for _ in 0..3 {
                        let (t0, c0) = (Instant::now(), thread_cpu_s());
                        for _ in 0..8 {
                            matvec_impl(&w, &x, &mut y, n_tok, path, None);
                        }
                        wall = wall.min(t0.elapsed().as_secs_f64() / 8.0);
                        cpu = cpu.min((thread_cpu_s() - c0) / 8.0);
                    }
                    (wall, cpu)
                });
                println!(
                    "{rows}x{cols} {bits}-bit g{gs} n_tokens {n_tok} {path:?}: {:.2} ms, {:.1} GB/s \
                     ({threads} threads); 1 thread {:.1} GB/s wall, {:.1} GB/s per CPU-second",
                    t * 1e3,
                    bytes / t / 1e9,
                    bytes / t1 / 1e9,
                    bytes / c1 / 1e9
                );
            }
        }
    }
}
