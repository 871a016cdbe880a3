//! Normalisation kernels (RMSNorm, q/k L2 norm, gated RMSNorm) and shared vector helpers.

use super::view::FloatSlice;
use half::{bf16, f16};
use rayon::prelude::*;

/// Floats of work below which a kernel does not split further across rayon tasks.
pub(super) const PAR_GRAIN: usize = 1 << 14;

/// Rows per rayon task for rows costing `row_work` floats each.
#[inline]
pub(super) fn rows_per_task(row_work: usize) -> usize {
    (PAR_GRAIN / row_work.max(1)).max(1)
}

/// A stored float (weight vectors may be f32, bf16 or f16) widened to f32.
pub(super) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Call `$f::<T>(slice, args..)` with the typed slice inside a `FloatSlice`.
macro_rules! with_float_slice {
    ($w:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $w {
            FloatSlice::F32(s) => $f(s, $($arg),*),
            FloatSlice::Bf16(s) => $f(s, $($arg),*),
            FloatSlice::F16(s) => $f(s, $($arg),*),
        }
    };
}
pub(super) use with_float_slice;

#[inline(always)]
fn reduce8(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `sum(a[i] * b[i])` with eight partial sums in a fixed order (deterministic, vectorises).
#[inline]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        let x: &[f32; 8] = x.try_into().unwrap();
        let y: &[f32; 8] = y.try_into().unwrap();
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    reduce8(acc) + tail
}

/// `sum(x[i]^2)`, in the same fixed order as `dot`.
#[inline]
pub(super) fn sum_sq(x: &[f32]) -> f32 {
    dot(x, x)
}

/// `y += a * x`.
#[inline]
pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x * sigmoid(x)`, as torch computes it on the CPU.
#[inline(always)]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

/// `out = (x * r) * w` with `r = rsqrt(mean(x^2) + eps)`, the operation order of transformers.
#[inline]
fn norm_row<W: Widen>(x: &[f32], w: &[W], out: &mut [f32], eps: f32) {
    let r = inv_rms(x, eps);
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        *o = (x * r) * w.widen();
    }
}

#[inline]
fn norm_row_in_place<W: Widen>(x: &mut [f32], w: &[W], eps: f32) {
    let r = inv_rms(x, eps);
    for (x, &w) in x.iter_mut().zip(w) {
        *x = (*x * r) * w.widen();
    }
}

/// `out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w` over `n_tokens` rows of `dim` (f32 throughout).
pub fn rms_norm(
    x: &[f32],
    w: FloatSlice<'_>,
    out: &mut [f32],
    dim: usize,
    n_tokens: usize,
    eps: f32,
) {
    let n = dim * n_tokens;
    debug_assert!(x.len() >= n && out.len() >= n && w.len() >= dim);
    if n == 0 {
        return;
    }
    fn run<W: Widen>(w: &[W], x: &[f32], out: &mut [f32], dim: usize, eps: f32) {
        let w = &w[..dim];
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .with_min_len(rows_per_task(dim))
            .for_each(|(o, x)| norm_row(x, w, o, eps));
    }
    with_float_slice!(w, run(&x[..n], &mut out[..n], dim, eps));
}

/// In place on rows of `per_token_total` floats: for each key head `h < num_k_heads`, the query
/// at `h * key_dim` becomes `q * rsqrt(sum(q^2) + 1e-6) / sqrt(key_dim)` and the key at
/// `key_offset + h * key_dim` becomes `k * rsqrt(sum(k^2) + 1e-6)`.
pub fn rms_norm_qk(
    x: &mut [f32],
    num_k_heads: usize,
    key_dim: usize,
    key_offset: usize,
    per_token_total: usize,
    n_tokens: usize,
) {
    let (ptt, span) = (per_token_total, num_k_heads * key_dim);
    debug_assert!(span <= key_offset && key_offset + span <= ptt);
    debug_assert!(x.len() >= ptt * n_tokens);
    if ptt == 0 || n_tokens == 0 || span == 0 {
        return;
    }
    // transformers multiplies the l2-normalised query by the Python float 1/sqrt(dk), cast to f32.
    let q_scale = (1.0 / (key_dim as f64).sqrt()) as f32;
    let l2 = |v: &mut [f32], scale: Option<f32>| {
        let r = 1.0 / (sum_sq(v) + 1e-6).sqrt();
        match scale {
            Some(s) => v.iter_mut().for_each(|v| *v = (*v * r) * s),
            None => v.iter_mut().for_each(|v| *v *= r),
        }
    };
    x[..ptt * n_tokens]
        .par_chunks_mut(ptt)
        .with_min_len(rows_per_task(2 * span))
        .for_each(|row| {
            let (q, k) = row.split_at_mut(key_offset);
            for (q, k) in q[..span]
                .chunks_exact_mut(key_dim)
                .zip(k[..span].chunks_exact_mut(key_dim))
            {
                l2(q, Some(q_scale));
                l2(k, None);
            }
        });
}

/// In place per (token, head): `x = x * rsqrt(mean(x^2) + eps) * w` over `head_dim`, `w[head_dim]`.
pub fn rms_norm_per_head(
    x: &mut [f32],
    w: FloatSlice<'_>,
    num_heads: usize,
    head_dim: usize,
    n_tokens: usize,
    eps: f32,
) {
    let n = num_heads * head_dim * n_tokens;
    debug_assert!(x.len() >= n && w.len() >= head_dim);
    if n == 0 {
        return;
    }
    fn run<W: Widen>(w: &[W], x: &mut [f32], head_dim: usize, eps: f32) {
        let w = &w[..head_dim];
        x.par_chunks_mut(head_dim)
            .with_min_len(rows_per_task(head_dim))
            .for_each(|x| norm_row_in_place(x, w, eps));
    }
    with_float_slice!(w, run(&mut x[..n], head_dim, eps));
}

/// `out = (v * rsqrt(mean(v^2) + eps)) * w * silu(z)` per (token, value head) over `value_dim`;
/// `values`, `z` and `out` are `[n_tokens, num_v_heads * value_dim]`, `w` is `[value_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn gated_rms_norm(
    values: &[f32],
    z: &[f32],
    w: FloatSlice<'_>,
    out: &mut [f32],
    num_v_heads: usize,
    value_dim: usize,
    n_tokens: usize,
    eps: f32,
) {
    let n = num_v_heads * value_dim * n_tokens;
    debug_assert!(values.len() >= n && z.len() >= n && out.len() >= n && w.len() >= value_dim);
    if n == 0 {
        return;
    }
    fn run<W: Widen>(w: &[W], v: &[f32], z: &[f32], out: &mut [f32], dv: usize, eps: f32) {
        let w = &w[..dv];
        out.par_chunks_mut(dv)
            .zip(v.par_chunks(dv).zip(z.par_chunks(dv)))
            .with_min_len(rows_per_task(2 * dv))
            .for_each(|(o, (v, z))| {
                let r = inv_rms(v, eps);
                for (((o, &v), &z), &w) in o.iter_mut().zip(v).zip(z).zip(w) {
                    *o = (w.widen() * (v * r)) * silu(z);
                }
            });
    }
    with_float_slice!(w, run(&values[..n], &z[..n], &mut out[..n], value_dim, eps));
}

/// Seeded test inputs shared by the CPU kernel tests.
#[cfg(test)]
pub(super) mod test_rng {
    /// xorshift64* with uniform and approximately normal draws.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in `[lo, hi)`.
        pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        }
        /// Approximately standard normal (sum of 12 uniforms).
        pub fn normal(&mut self) -> f32 {
            (0..12).map(|_| self.uniform(0.0, 1.0)).sum::<f32>() - 6.0
        }
        pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform(lo, hi)).collect()
        }
        pub fn normals(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.normal()).collect()
        }
    }

    /// Assert `|got - want| <= tol * max(1, max|want|)` elementwise.
    pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= tol * scale,
                "{what}: element {i}: got {g}, want {w} (err {err:e}, scale {scale})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_rng::{assert_close, Rng};
    use super::*;

    fn ref_rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        x.iter()
            .zip(w)
            .map(|(&x, &w)| x as f64 * r * w as f64)
            .collect()
    }

    #[test]
    fn helpers_match_f64() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, 8, 9, 31, 130] {
            let a = rng.vec(n, -1.0, 1.0);
            let b = rng.vec(n, -1.0, 1.0);
            let want: f64 = a.iter().zip(&b).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "dot n={n}");
        }
    }

    #[test]
    fn rms_norm_all_weight_dtypes() {
        let mut rng = Rng::new(2);
        for (dim, n_tokens) in [(1, 1), (13, 1), (64, 3), (257, 5), (4096, 9)] {
            let x = rng.vec(dim * n_tokens + 3, -2.0, 2.0);
            let w = rng.vec(dim, 0.5, 1.5);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for ws in [
                FloatSlice::F32(&w),
                FloatSlice::Bf16(&wb),
                FloatSlice::F16(&wh),
            ] {
                let wf = ws.to_f32_vec();
                let mut out = vec![7.0f32; dim * n_tokens + 2];
                rms_norm(&x, ws, &mut out, dim, n_tokens, 1e-6);
                let want: Vec<f64> = x[..dim * n_tokens]
                    .chunks(dim)
                    .flat_map(|r| ref_rms(r, &wf, 1e-6))
                    .collect();
                assert_close(&out[..dim * n_tokens], &want, 2e-6, "rms_norm");
                assert_eq!(&out[dim * n_tokens..], &[7.0, 7.0], "wrote past the rows");
            }
        }
    }

    #[test]
    fn rms_norm_qk_normalises_q_and_k_only() {
        let mut rng = Rng::new(3);
        for (nk, dk, n_tokens) in [(1, 4, 1), (3, 17, 2), (4, 128, 5)] {
            let key_offset = nk * dk;
            let ptt = 2 * nk * dk + 2 * nk * 9; // q | k | v (r*dv = 18 per key head)
            let x0 = rng.vec(ptt * n_tokens, -3.0, 3.0);
            let mut x = x0.clone();
            rms_norm_qk(&mut x, nk, dk, key_offset, ptt, n_tokens);
            let mut want: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
            for t in 0..n_tokens {
                for h in 0..nk {
                    for (off, scale) in [
                        (h * dk, 1.0 / (dk as f64).sqrt()),
                        (key_offset + h * dk, 1.0),
                    ] {
                        let s = &mut want[t * ptt + off..][..dk];
                        let r = 1.0 / (s.iter().map(|v| v * v).sum::<f64>() + 1e-6).sqrt();
                        s.iter_mut().for_each(|v| *v *= r * scale);
                    }
                }
            }
            assert_close(&x, &want, 1e-6, "rms_norm_qk");
            for t in 0..n_tokens {
                assert_eq!(
                    x[t * ptt + 2 * nk * dk..][..18 * nk],
                    x0[t * ptt + 2 * nk * dk..][..18 * nk]
                );
            }
        }
    }

    #[test]
    fn rms_norm_per_head_matches() {
        let mut rng = Rng::new(4);
        for (nh, hd, n_tokens) in [(1, 8, 1), (3, 33, 2), (16, 256, 4)] {
            let x0 = rng.vec(nh * hd * n_tokens, -2.0, 2.0);
            let w = rng.vec(hd, -1.5, 1.5);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wf = FloatSlice::Bf16(&wb).to_f32_vec();
            let mut x = x0.clone();
            rms_norm_per_head(&mut x, FloatSlice::Bf16(&wb), nh, hd, n_tokens, 1e-6);
            let want: Vec<f64> = x0.chunks(hd).flat_map(|r| ref_rms(r, &wf, 1e-6)).collect();
            assert_close(&x, &want, 2e-6, "rms_norm_per_head");
        }
    }

    #[test]
    fn gated_rms_norm_matches() {
        let mut rng = Rng::new(5);
        for (nv, dv, n_tokens) in [(1, 5, 1), (4, 16, 3), (32, 128, 2)] {
            let n = nv * dv * n_tokens;
            let v = rng.vec(n, -2.0, 2.0);
            let z = rng.vec(n, -8.0, 8.0);
            let w = rng.vec(dv, 0.5, 1.5);
            let mut out = vec![0.0; n];
            gated_rms_norm(
                &v,
                &z,
                FloatSlice::F32(&w),
                &mut out,
                nv,
                dv,
                n_tokens,
                1e-6,
            );
            let mut want = Vec::with_capacity(n);
            for (vr, zr) in v.chunks(dv).zip(z.chunks(dv)) {
                for (y, &z) in ref_rms(vr, &w, 1e-6).into_iter().zip(zr) {
                    let z = z as f64;
                    want.push(y * z / (1.0 + (-z).exp()));
                }
            }
            assert_close(&out, &want, 2e-6, "gated_rms_norm");
        }
    }
}
