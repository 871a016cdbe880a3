//! Full-attention kernels: partial RoPE, q/gate split, KV append, causal GQA attention.

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

/// `q_proj` `[T, H, 2*head_dim]` with per-head `[q | gate]` -> `q_out` and `gate_out`, each
/// `[T, H*head_dim]`.
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
/// `kvh * head_dim`. `softmax(softmax_scale * q.k) v` in f32 with an online softmax over key tiles.
///
/// The heads sharing a kv head are processed together so each cache row is loaded once for all of
/// them. Keys are cut into segments whose length depends only on the key count (`seg_len`); each
/// segment's partial softmax is merged into the result in order. Work runs in parallel over
/// (token, kv head), and for a single token also over segments (flash-decoding); both orders give
/// the same bits, so a token's output does not depend on how many tokens share the call.
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
    let a = Attn {
        k_cache,
        v_cache,
        kv_dim,
        hd: head_dim,
        hpk: heads_per_kv,
        scale: softmax_scale,
    };
    let group = heads_per_kv * head_dim;
    let n_groups = num_heads / heads_per_kv;
    let n_keys = kv_start + 1;
    let seg = seg_len(n_keys);
    if n_tokens == 1 && n_keys > seg {
        // Decode over a long cache: one task per (kv head, segment), merged afterwards.
        let n_segs = n_keys.div_ceil(seg);
        let part = group + 2 * heads_per_kv;
        let mut parts = vec![0f32; n_groups * n_segs * part];
        parts.par_chunks_mut(part).enumerate().for_each_init(
            || a.scratch(),
            |sc, (i, p)| {
                let (g, si) = (i / n_segs, i % n_segs);
                let (acc, ml) = p.split_at_mut(group);
                let keys = si * seg..n_keys.min((si + 1) * seg);
                a.segment(&q[g * group..][..group], g * head_dim, keys, acc, ml, sc);
            },
        );
        out[..row]
            .chunks_exact_mut(group)
            .zip(parts.chunks_exact(n_segs * part))
            .for_each(|(o, parts)| {
                let mut ml = parts[group..part].to_vec();
                o.copy_from_slice(&parts[..group]);
                for p in parts.chunks_exact(part).skip(1) {
                    a.merge(o, &mut ml, &p[..group], &p[group..]);
                }
                a.finish(o, &ml);
            });
        return;
    }
    out[..row * n_tokens]
        .par_chunks_mut(group)
        .zip(q[..row * n_tokens].par_chunks(group))
        .enumerate()
        .with_min_len(rows_per_task(2 * rows * group))
        .for_each_init(
            || (a.scratch(), vec![0f32; group + 4 * heads_per_kv]),
            |(sc, buf), (i, (o, qg))| {
                let (t, g) = (i / n_groups, i % n_groups);
                let n_keys = kv_start + t + 1;
                let seg = seg_len(n_keys);
                let (acc, rest) = buf.split_at_mut(group);
                let (ml, seg_ml) = rest.split_at_mut(2 * heads_per_kv);
                a.segment(qg, g * head_dim, 0..n_keys.min(seg), o, ml, sc);
                for k0 in (seg..n_keys).step_by(seg) {
                    let keys = k0..n_keys.min(k0 + seg);
                    a.segment(qg, g * head_dim, keys, acc, seg_ml, sc);
                    a.merge(o, ml, acc, seg_ml);
                }
                a.finish(o, ml);
            },
        );
}

/// Keys per softmax segment: at least `MIN_SEG`, at most `MAX_SEGS` segments, whole tiles.
fn seg_len(n_keys: usize) -> usize {
    n_keys
        .div_ceil(MAX_SEGS)
        .max(MIN_SEG)
        .next_multiple_of(KEY_TILE)
}
const MIN_SEG: usize = 256;
const MAX_SEGS: usize = 16;

/// The caches and shape shared by every query group of one attention call.
#[derive(Clone, Copy)]
struct Attn<'a> {
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    kv_dim: usize,
    hd: usize,
    hpk: usize,
    scale: f32,
}

impl Attn<'_> {
    /// Scores of one key tile for every head of a group.
    fn scratch(&self) -> Vec<f32> {
        vec![0f32; self.hpk * KEY_TILE]
    }

    /// Softmax partial of the `hpk` queries `qg` over cache rows `keys` at column `col`:
    /// `acc[h] = sum_j exp(s_hj - m_h) v_j` and `ml = [m.., l..]`, `l_h = sum_j exp(s_hj - m_h)`.
    fn segment(
        &self,
        qg: &[f32],
        col: usize,
        keys: std::ops::Range<usize>,
        acc: &mut [f32],
        ml: &mut [f32],
        s: &mut [f32],
    ) {
        let (hd, hpk) = (self.hd, self.hpk);
        let (m, l) = ml.split_at_mut(hpk);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        for k0 in keys.clone().step_by(KEY_TILE) {
            let tl = KEY_TILE.min(keys.end - k0);
            for j in 0..tl {
                let kr = &self.k_cache[(k0 + j) * self.kv_dim + col..][..hd];
                for (h, qh) in qg.chunks_exact(hd).enumerate() {
                    s[h * KEY_TILE + j] = dot(qh, kr) * self.scale;
                }
            }
            for h in 0..hpk {
                let sh = &mut s[h * KEY_TILE..][..tl];
                let m_new = sh.iter().fold(m[h], |a, &b| a.max(b));
                if m_new > m[h] && l[h] > 0.0 {
                    let c = (m[h] - m_new).exp();
                    l[h] *= c;
                    acc[h * hd..][..hd].iter_mut().for_each(|a| *a *= c);
                }
                m[h] = m_new;
                for p in sh.iter_mut() {
                    *p = (*p - m_new).exp();
                    l[h] += *p;
                }
            }
            for j in 0..tl {
                let vr = &self.v_cache[(k0 + j) * self.kv_dim + col..][..hd];
                for (h, acc) in acc.chunks_exact_mut(hd).enumerate() {
                    axpy(acc, s[h * KEY_TILE + j], vr);
                }
            }
        }
    }

    /// Fold the partial `(acc2, ml2)` into the running `(acc, ml)`.
    fn merge(&self, acc: &mut [f32], ml: &mut [f32], acc2: &[f32], ml2: &[f32]) {
        let hpk = self.hpk;
        for (h, (acc, acc2)) in acc
            .chunks_exact_mut(self.hd)
            .zip(acc2.chunks_exact(self.hd))
            .enumerate()
        {
            let (m1, m2) = (ml[h], ml2[h]);
            let m = m1.max(m2);
            let (c1, c2) = ((m1 - m).exp(), (m2 - m).exp());
            ml[h] = m;
            ml[hpk + h] = ml[hpk + h] * c1 + ml2[hpk + h] * c2;
            for (a, &b) in acc.iter_mut().zip(acc2) {
                *a = *a * c1 + b * c2;
            }
        }
    }

    /// `acc[h] /= l_h`.
    fn finish(&self, acc: &mut [f32], ml: &[f32]) {
        for (h, acc) in acc.chunks_exact_mut(self.hd).enumerate() {
            let inv = 1.0 / ml[self.hpk + h];
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    }
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
    fn sdpa_decode_equals_last_token_of_a_batch() {
        let mut rng = Rng::new(14);
        let (n, nh, hpk, hd, kv_start) = (4, 8, 4, 16, 700);
        let kv_dim = (nh / hpk) * hd;
        let rows = kv_start + n;
        let q = rng.vec(n * nh * hd, -1.0, 1.0);
        let k = rng.vec(rows * kv_dim, -3.0, 3.0);
        let v = rng.vec(rows * kv_dim, -1.0, 1.0);
        let mut batch = vec![0f32; n * nh * hd];
        sdpa_causal(
            &q, &k, &v, &mut batch, n, nh, hpk, hd, kv_dim, kv_start, 0.25,
        );
        for t in 0..n {
            let mut one = vec![0f32; nh * hd];
            let qt = &q[t * nh * hd..][..nh * hd];
            sdpa_causal(
                qt,
                &k,
                &v,
                &mut one,
                1,
                nh,
                hpk,
                hd,
                kv_dim,
                kv_start + t,
                0.25,
            );
            assert_eq!(one[..], batch[t * nh * hd..][..nh * hd], "token {t}");
        }
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
            (3, 4, 2, 32, 600, 1),
            (1, 2, 1, 8, 5000, 0),
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
