//! Full-attention kernels: partial NeoX RoPE, the per-head q/gate split, the KV-cache append,
//! causal GQA attention with an online softmax, and the element-wise residual and sigmoid gate.

use super::norm::{axpy, dot, rows_per_task, sigmoid, PAR_GRAIN};
use rayon::prelude::*;

/// Rotary pairs whose cos/sin are computed together on the stack.
const ROPE_BLOCK: usize = 64;
/// Keys scored together before the running softmax is rescaled.
const KEY_TILE: usize = 64;

/// NeoX partial rotary in place on `x` `[n_tokens, num_heads, head_dim]`: for `i < rotary_dim/2`,
/// `angle = (start_pos + t) as f32 * inv_freq[i]` (f32 product, then f32 cos/sin as transformers
/// does) and `(x[i], x[i+rd/2]) -> (x[i]*c - x[i+rd/2]*s, x[i+rd/2]*c + x[i]*s)`. Channels at and
/// beyond `rotary_dim` are left untouched.
pub fn rope(
    x: &mut [f32],
    inv_freq: &[f32],
    n_tokens: usize,
    num_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    start_pos: usize,
) {
    let half = rotary_dim / 2;
    let row = num_heads * head_dim;
    debug_assert!(rotary_dim % 2 == 0 && rotary_dim <= head_dim);
    debug_assert!(inv_freq.len() >= half && x.len() >= row * n_tokens);
    if half == 0 || row * n_tokens == 0 {
        return;
    }
    x[..row * n_tokens]
        .par_chunks_mut(row)
        .enumerate()
        .with_min_len(rows_per_task(num_heads * rotary_dim))
        .for_each(|(t, xr)| {
            let pos = (start_pos + t) as f32;
            let (mut cos, mut sin) = ([0f32; ROPE_BLOCK], [0f32; ROPE_BLOCK]);
            for b0 in (0..half).step_by(ROPE_BLOCK) {
                let nb = ROPE_BLOCK.min(half - b0);
                for ((c, s), &f) in cos.iter_mut().zip(&mut sin).zip(&inv_freq[b0..b0 + nb]) {
                    let angle = pos * f;
                    (*c, *s) = (angle.cos(), angle.sin());
                }
                let (cos, sin) = (&cos[..nb], &sin[..nb]);
                for head in xr.chunks_exact_mut(head_dim) {
                    let (lo, hi) = head[..rotary_dim].split_at_mut(half);
                    let (lo, hi) = (&mut lo[b0..b0 + nb], &mut hi[b0..b0 + nb]);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                        let (x1, x2) = (*a, *b);
                        *a = x1 * c - x2 * s;
                        *b = x2 * c + x1 * s;
                    }
                }
            }
        });
}

/// `q_proj` `[T, H, 2*head_dim]` with per-head `[q | gate]` -> `q_out`, `gate_out` `[T, H*head_dim]`.
pub fn split_q_gate(
    q_proj: &[f32],
    q_out: &mut [f32],
    gate_out: &mut [f32],
    num_heads: usize,
    head_dim: usize,
    n_tokens: usize,
) {
    let n = num_heads * head_dim * n_tokens;
    debug_assert!(q_proj.len() >= 2 * n && q_out.len() >= n && gate_out.len() >= n);
    if n == 0 {
        return;
    }
    q_out[..n]
        .par_chunks_mut(head_dim)
        .zip(gate_out[..n].par_chunks_mut(head_dim))
        .zip(q_proj[..2 * n].par_chunks(2 * head_dim))
        .with_min_len(rows_per_task(2 * head_dim))
        .for_each(|((q, g), src)| {
            let (sq, sg) = src.split_at(head_dim);
            q.copy_from_slice(sq);
            g.copy_from_slice(sg);
        });
}

/// `out = a + b` over `out.len()`.
pub fn residual_add(a: &[f32], b: &[f32], out: &mut [f32]) {
    let n = out.len();
    debug_assert!(a.len() >= n && b.len() >= n);
    out.par_chunks_mut(PAR_GRAIN)
        .zip(
            a[..n]
                .par_chunks(PAR_GRAIN)
                .zip(b[..n].par_chunks(PAR_GRAIN)),
        )
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// `x *= sigmoid(gate)` over `x.len()`.
pub fn sigmoid_gate(x: &mut [f32], gate: &[f32]) {
    let n = x.len();
    debug_assert!(gate.len() >= n);
    x.par_chunks_mut(PAR_GRAIN / 4)
        .zip(gate[..n].par_chunks(PAR_GRAIN / 4))
        .for_each(|(x, g)| {
            for (x, &g) in x.iter_mut().zip(g) {
                *x *= sigmoid(g);
            }
        });
}

/// Copy `n_tokens` rows of `kv_dim` from `k_src`/`v_src` to rows `kv_start..` of the caches.
pub fn kv_append(
    k_src: &[f32],
    v_src: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    kv_dim: usize,
    n_tokens: usize,
    kv_start: usize,
) {
    let (n, at) = (kv_dim * n_tokens, kv_dim * kv_start);
    debug_assert!(k_src.len() >= n && v_src.len() >= n);
    debug_assert!(k_cache.len() >= at + n && v_cache.len() >= at + n);
    k_cache[at..at + n].copy_from_slice(&k_src[..n]);
    v_cache[at..at + n].copy_from_slice(&v_src[..n]);
}

/// Causal GQA attention: token `t` (position `kv_start + t`) and head `h` (kv head
/// `h / heads_per_kv`) attend cache rows `0..=kv_start + t`. `q` and `out` are
/// `[n_tokens, num_heads * head_dim]`; the caches are `[rows, kv_dim]` with kv head `kvh` at column
/// `kvh * head_dim`. `softmax(softmax_scale * q.k) v` in f32 with an online softmax over key tiles,
/// parallel over (t, h).
#[allow(clippy::too_many_arguments)]
pub fn sdpa_causal(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    n_tokens: usize,
    num_heads: usize,
    heads_per_kv: usize,
    head_dim: usize,
    kv_dim: usize,
    kv_start: usize,
    softmax_scale: f32,
) {
    let row = num_heads * head_dim;
    let rows = kv_start + n_tokens;
    debug_assert!(heads_per_kv > 0 && num_heads % heads_per_kv == 0);
    debug_assert!((num_heads / heads_per_kv) * head_dim <= kv_dim);
    debug_assert!(q.len() >= row * n_tokens && out.len() >= row * n_tokens);
    debug_assert!(k_cache.len() >= rows * kv_dim && v_cache.len() >= rows * kv_dim);
    if row * n_tokens == 0 {
        return;
    }
    out[..row * n_tokens]
        .par_chunks_mut(head_dim)
        .zip(q[..row * n_tokens].par_chunks(head_dim))
        .enumerate()
        .with_min_len(rows_per_task(2 * rows * head_dim))
        .for_each(|(i, (o, q))| {
            let (t, h) = (i / num_heads, i % num_heads);
            let col = (h / heads_per_kv) * head_dim;
            attend(
                q,
                k_cache,
                v_cache,
                o,
                kv_dim,
                col,
                kv_start + t + 1,
                softmax_scale,
            );
        });
}

/// One query over cache rows `0..n_keys` (columns `col..col + q.len()`), accumulating into `acc`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    acc: &mut [f32],
    kv_dim: usize,
    col: usize,
    n_keys: usize,
    scale: f32,
) {
    let hd = q.len();
    acc.fill(0.0);
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    let mut s = [0f32; KEY_TILE];
    for k0 in (0..n_keys).step_by(KEY_TILE) {
        let s = &mut s[..KEY_TILE.min(n_keys - k0)];
        let mut tile_max = f32::NEG_INFINITY;
        for (j, s) in s.iter_mut().enumerate() {
            *s = dot(q, &k_cache[(k0 + j) * kv_dim + col..][..hd]) * scale;
            tile_max = tile_max.max(*s);
        }
        let m_new = m.max(tile_max);
        if m_new > m && l > 0.0 {
            let c = (m - m_new).exp();
            l *= c;
            acc.iter_mut().for_each(|a| *a *= c);
        }
        m = m_new;
        for (j, &s) in s.iter().enumerate() {
            let p = (s - m).exp();
            l += p;
            axpy(acc, p, &v_cache[(k0 + j) * kv_dim + col..][..hd]);
        }
    }
    let inv = 1.0 / l;
    acc.iter_mut().for_each(|a| *a *= inv);
}

#[cfg(test)]
mod tests {
    use super::super::norm::test_rng::{assert_close, Rng};
    use super::*;

    fn inv_freq(rd: usize, theta: f64) -> Vec<f32> {
        (0..rd / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / rd as f64) as f32)
            .collect()
    }

    #[test]
    fn rope_rotates_first_rotary_dim_channels() {
        let mut rng = Rng::new(11);
        // (n_tokens, heads, head_dim, rotary_dim, start_pos, theta)
        for (n, nh, hd, rd, p0, theta) in [
            (1, 1, 8, 8, 0, 1e4),
            (3, 2, 16, 4, 5, 1e4),
            (5, 4, 256, 64, 1000, 1e7),
            (2, 3, 300, 260, 70_000, 1e6),
        ] {
            let f = inv_freq(rd, theta);
            let x0 = rng.vec(n * nh * hd, -2.0, 2.0);
            let mut x = x0.clone();
            rope(&mut x, &f, n, nh, hd, rd, p0);
            let mut want: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
            for t in 0..n {
                for h in 0..nh {
                    let base = (t * nh + h) * hd;
                    for i in 0..rd / 2 {
                        let angle = ((p0 + t) as f32 * f[i]) as f64;
                        let (c, s) = (angle.cos(), angle.sin());
                        let (x1, x2) = (x0[base + i] as f64, x0[base + i + rd / 2] as f64);
                        want[base + i] = x1 * c - x2 * s;
                        want[base + i + rd / 2] = x2 * c + x1 * s;
                    }
                }
            }
            assert_close(&x, &want, 1e-6, "rope");
            for t in 0..n * nh {
                assert_eq!(x[t * hd + rd..(t + 1) * hd], x0[t * hd + rd..(t + 1) * hd]);
            }
        }
    }

    #[test]
    fn split_add_gate_append() {
        let mut rng = Rng::new(12);
        let (nh, hd, n) = (3, 5, 2);
        let qp = rng.vec(n * nh * 2 * hd, -1.0, 1.0);
        let (mut q, mut g) = (vec![0.0; n * nh * hd], vec![0.0; n * nh * hd]);
        split_q_gate(&qp, &mut q, &mut g, nh, hd, n);
        for t in 0..n {
            for h in 0..nh {
                for d in 0..hd {
                    let src = (t * nh + h) * 2 * hd + d;
                    assert_eq!(q[(t * nh + h) * hd + d], qp[src]);
                    assert_eq!(g[(t * nh + h) * hd + d], qp[src + hd]);
                }
            }
        }

        let len = 3 * PAR_GRAIN + 17;
        let (a, b) = (rng.vec(len, -1.0, 1.0), rng.vec(len, -1.0, 1.0));
        let mut out = vec![0.0; len];
        residual_add(&a, &b, &mut out);
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        assert_close(&out, &want, 1e-7, "residual_add");

        let mut x = a.clone();
        sigmoid_gate(&mut x, &b);
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&a, &g)| a as f64 / (1.0 + (-(g as f64)).exp()))
            .collect();
        assert_close(&x, &want, 1e-6, "sigmoid_gate");

        let kv_dim = 6;
        let (ks, vs) = (
            rng.vec(2 * kv_dim, -1.0, 1.0),
            rng.vec(2 * kv_dim, -1.0, 1.0),
        );
        let (mut kc, mut vc) = (vec![9.0; 5 * kv_dim], vec![9.0; 5 * kv_dim]);
        kv_append(&ks, &vs, &mut kc, &mut vc, kv_dim, 2, 2);
        assert_eq!(&kc[2 * kv_dim..4 * kv_dim], &ks[..]);
        assert_eq!(&vc[2 * kv_dim..4 * kv_dim], &vs[..]);
        assert!(kc[..2 * kv_dim]
            .iter()
            .chain(&kc[4 * kv_dim..])
            .all(|&v| v == 9.0));
        assert!(vc[..2 * kv_dim]
            .iter()
            .chain(&vc[4 * kv_dim..])
            .all(|&v| v == 9.0));
    }

    #[allow(clippy::too_many_arguments)]
    fn ref_sdpa(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        nh: usize,
        hpk: usize,
        hd: usize,
        kv_dim: usize,
        kv_start: usize,
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * nh * hd];
        for t in 0..n {
            for h in 0..nh {
                let col = (h / hpk) * hd;
                let qv = &q[(t * nh + h) * hd..][..hd];
                let scores: Vec<f64> = (0..=kv_start + t)
                    .map(|j| {
                        let kr = &k[j * kv_dim + col..][..hd];
                        qv.iter()
                            .zip(kr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = p.iter().sum();
                let o = &mut out[(t * nh + h) * hd..][..hd];
                for (j, p) in p.iter().enumerate() {
                    for d in 0..hd {
                        o[d] += p / z * v[j * kv_dim + col + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn sdpa_causal_matches_full_softmax() {
        let mut rng = Rng::new(13);
        // (n_tokens, num_heads, heads_per_kv, head_dim, kv_start, extra kv columns)
        for (n, nh, hpk, hd, kv_start, pad) in [
            (1, 1, 1, 4, 0, 0),
            (1, 4, 2, 33, 7, 0),
            (5, 4, 1, 16, 0, 3),
            (3, 8, 4, 64, 150, 0),
            (70, 4, 2, 24, 60, 0),
            (1, 16, 8, 256, 300, 0),
        ] {
            let kv_dim = (nh / hpk) * hd + pad;
            let rows = kv_start + n + 2;
            let q = rng.vec(n * nh * hd, -1.0, 1.0);
            // Large-magnitude keys make the softmax peaky and exercise the rescaling.
            let k = rng.vec(rows * kv_dim, -3.0, 3.0);
            let v = rng.vec(rows * kv_dim, -1.0, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![0f32; n * nh * hd];
            sdpa_causal(
                &q, &k, &v, &mut out, n, nh, hpk, hd, kv_dim, kv_start, scale,
            );
            let want = ref_sdpa(&q, &k, &v, n, nh, hpk, hd, kv_dim, kv_start, scale);
            assert_close(&out, &want, 2e-6, "sdpa_causal");
        }
    }
}
