//! GatedDeltaNet kernels: causal conv, decay/beta gates, the delta rule by token and by chunk.

use super::norm::{axpy, dot, rows_per_task, sigmoid, silu, with_float_slice, Widen};
use super::view::FloatSlice;
use rayon::prelude::*;

/// Taps of the causal conv; the state keeps the previous `CONV_KERNEL - 1` inputs.
pub const CONV_KERNEL: usize = 4;
const HIST: usize = CONV_KERNEL - 1;

/// Depthwise causal conv + SiLU. `w` is `[conv_dim, 4]` (tap 3 multiplies the current token),
/// `conv_state` `[3, conv_dim]` holds the previous 3 inputs, oldest first:
/// `out[t, c] = silu(sum_j w[c, j] * in_{t-3+j}[c])`, where inputs before `t = 0` come from the
/// state. Afterwards the state holds the last 3 inputs.
pub fn conv1d_step(
    qkv_in: &[f32],
    conv_state: &mut [f32],
    w: FloatSlice<'_>,
    conv_out: &mut [f32],
    conv_dim: usize,
    n_tokens: usize,
) {
    let (cd, n) = (conv_dim, conv_dim * n_tokens);
    debug_assert!(qkv_in.len() >= n && conv_out.len() >= n);
    debug_assert!(conv_state.len() >= HIST * cd && w.len() >= CONV_KERNEL * cd);
    if cd == 0 {
        return;
    }
    let (qkv_in, state) = (&qkv_in[..n], &mut conv_state[..HIST * cd]);
    fn run<W: Widen>(w: &[W], x: &[f32], state: &[f32], out: &mut [f32], cd: usize) {
        let w = &w[..CONV_KERNEL * cd];
        // Input row `t - back` (1 <= back <= 3), from this call or from the state.
        let prev = |t: usize, back: usize| -> &[f32] {
            if t >= back {
                &x[(t - back) * cd..][..cd]
            } else {
                &state[(HIST + t - back) * cd..][..cd]
            }
        };
        out.par_chunks_mut(cd)
            .enumerate()
            .with_min_len(rows_per_task(CONV_KERNEL * cd))
            .for_each(|(t, o)| {
                let (x0, x1, x2, x3) = (prev(t, 3), prev(t, 2), prev(t, 1), &x[t * cd..][..cd]);
                for (c, (o, w)) in o.iter_mut().zip(w.chunks_exact(CONV_KERNEL)).enumerate() {
                    let acc = w[0].widen() * x0[c]
                        + w[1].widen() * x1[c]
                        + w[2].widen() * x2[c]
                        + w[3].widen() * x3[c];
                    *o = silu(acc);
                }
            });
    }
    with_float_slice!(w, run(qkv_in, state, &mut conv_out[..n], cd));
    if n_tokens >= HIST {
        state.copy_from_slice(&qkv_in[(n_tokens - HIST) * cd..]);
    } else {
        state.copy_within(n.., 0);
        state[(HIST - n_tokens) * cd..].copy_from_slice(qkv_in);
    }
}

/// `g_out = exp(-exp(a_log[h]) * softplus(alpha + dt_bias[h]))` and `beta_out = sigmoid(beta)`
/// over `[n_tokens, num_v_heads]`; softplus is torch's (identity above 20).
#[allow(clippy::too_many_arguments)]
pub fn decay_beta(
    alpha: &[f32],
    beta: &[f32],
    a_log: FloatSlice<'_>,
    dt_bias: FloatSlice<'_>,
    g_out: &mut [f32],
    beta_out: &mut [f32],
    num_v_heads: usize,
    n_tokens: usize,
) {
    let (nv, n) = (num_v_heads, num_v_heads * n_tokens);
    debug_assert!(alpha.len() >= n && beta.len() >= n && g_out.len() >= n && beta_out.len() >= n);
    debug_assert!(a_log.len() >= nv && dt_bias.len() >= nv);
    for i in 0..n {
        let h = i % nv;
        let x = alpha[i] + dt_bias.get(h);
        let softplus = if x > 20.0 { x } else { x.exp().ln_1p() };
        g_out[i] = (-a_log.get(h).exp() * softplus).exp();
        beta_out[i] = sigmoid(beta[i]);
    }
}

/// Shape of one GatedDeltaNet call.
#[derive(Clone, Copy)]
struct Dims {
    nv: usize,
    dv: usize,
    dk: usize,
    k_per_v: usize,
    n_tokens: usize,
}

impl Dims {
    fn nk(&self) -> usize {
        self.nv / self.k_per_v
    }
    fn row(&self) -> usize {
        2 * self.nk() * self.dk + self.nv * self.dv
    }
    /// `(q, k, v)` of value head `h` in `conv_out` row `t`.
    fn qkv<'a>(
        &self,
        conv_out: &'a [f32],
        t: usize,
        h: usize,
    ) -> (&'a [f32], &'a [f32], &'a [f32]) {
        let row = &conv_out[t * self.row()..][..self.row()];
        let kh = h / self.k_per_v;
        let kbase = self.nk() * self.dk;
        (
            &row[kh * self.dk..][..self.dk],
            &row[kbase + kh * self.dk..][..self.dk],
            &row[2 * kbase + h * self.dv..][..self.dv],
        )
    }
    fn check(&self, state: &[f32], conv_out: &[f32], g: &[f32], beta: &[f32], out: &[f32]) {
        let n = self.nv * self.n_tokens;
        debug_assert!(self.k_per_v > 0 && self.nv % self.k_per_v == 0);
        debug_assert!(state.len() >= self.nv * self.dk * self.dv);
        debug_assert!(conv_out.len() >= self.row() * self.n_tokens);
        debug_assert!(g.len() >= n && beta.len() >= n);
        debug_assert!(out.len() >= n * self.dv);
    }
}

/// Run `f(scratch, h, state_h, out_h)` for every value head in parallel, with `out_h` the head's
/// `[n_tokens, dv]` output rows, gathered into `output` `[n_tokens, nv * dv]`.
fn for_each_head<S, I, F>(d: Dims, state: &mut [f32], output: &mut [f32], init: I, f: F)
where
    I: Fn() -> S + Send + Sync,
    F: Fn(&mut S, usize, &mut [f32], &mut [f32]) + Send + Sync,
{
    let hs = d.dk * d.dv;
    let state = &mut state[..d.nv * hs];
    let per_task = rows_per_task(4 * hs * d.n_tokens);
    if d.n_tokens == 1 {
        state
            .par_chunks_mut(hs)
            .zip(output[..d.nv * d.dv].par_chunks_mut(d.dv))
            .enumerate()
            .with_min_len(per_task)
            .for_each_init(init, |sc, (h, (s, o))| f(sc, h, s, o));
        return;
    }
    let (n, row) = (d.n_tokens, d.nv * d.dv);
    let mut heads = vec![0f32; n * row];
    state
        .par_chunks_mut(hs)
        .zip(heads.par_chunks_mut(n * d.dv))
        .enumerate()
        .with_min_len(per_task)
        .for_each_init(init, |sc, (h, (s, o))| f(sc, h, s, o));
    output[..n * row]
        .par_chunks_mut(row)
        .enumerate()
        .with_min_len(rows_per_task(row))
        .for_each(|(t, orow)| {
            for (h, o) in orow.chunks_exact_mut(d.dv).enumerate() {
                o.copy_from_slice(&heads[(h * n + t) * d.dv..][..d.dv]);
            }
        });
}

/// The delta-rule recurrence token by token. `conv_out` rows are `q [nk*dk] | k [nk*dk] |
/// v [nv*dv]` with `nk = nv / k_heads_per_v`; value head `h` uses key head `h / k_heads_per_v`
/// (q, k already normalised). Per token, with `S` `[nv, dk, dv]`:
/// `S *= g; kv = k^T S; delta = beta * (v - kv); S += k (outer) delta; o = q^T S`
/// (with `k^T (g S)` evaluated as `g (k^T S)`).
/// `output` is `[n_tokens, nv * dv]`. Parallel over value heads.
#[allow(clippy::too_many_arguments)]
pub fn delta_net_step(
    state: &mut [f32],
    conv_out: &[f32],
    g_decay: &[f32],
    beta: &[f32],
    output: &mut [f32],
    num_v_heads: usize,
    value_dim: usize,
    k_heads_per_v: usize,
    key_dim: usize,
    n_tokens: usize,
) {
    let d = Dims {
        nv: num_v_heads,
        dv: value_dim,
        dk: key_dim,
        k_per_v: k_heads_per_v,
        n_tokens,
    };
    d.check(state, conv_out, g_decay, beta, output);
    if d.nv * d.dv * d.dk * n_tokens == 0 {
        return;
    }
    let dv = d.dv;
    for_each_head(
        d,
        state,
        output,
        || vec![0f32; 2 * dv],
        |scratch, h, s, out| {
            let (kv, delta) = scratch.split_at_mut(dv);
            for (t, o) in out.chunks_exact_mut(dv).enumerate() {
                let (q, k, v) = d.qkv(conv_out, t, h);
                let (g, b) = (g_decay[t * d.nv + h], beta[t * d.nv + h]);
                // kv = k^T (g S) as g (k^T S): the first pass only reads S.
                kv.fill(0.0);
                for (srow, &kr) in s.chunks_exact(dv).zip(k) {
                    axpy(kv, kr, srow);
                }
                for ((dl, &v), &kv) in delta.iter_mut().zip(v).zip(kv.iter()) {
                    *dl = (v - g * kv) * b;
                }
                o.fill(0.0);
                for ((srow, &kr), &qr) in s.chunks_exact_mut(dv).zip(k).zip(q) {
                    for ((sv, &dl), o) in srow.iter_mut().zip(delta.iter()).zip(o.iter_mut()) {
                        *sv = g * *sv + kr * dl;
                        *o += qr * *sv;
                    }
                }
            }
        },
    );
}

/// Per-task buffers of the chunked form, sized for one chunk of `c` tokens.
struct ChunkScratch {
    /// `[c, dk]` queries and keys of the chunk.
    q: Vec<f32>,
    k: Vec<f32>,
    /// `[dk, c]` keys transposed and weighted by their decay to the chunk end.
    kwt: Vec<f32>,
    /// `[c, dv]`: `K S0`, then the right-hand side, then `delta`.
    u: Vec<f32>,
    /// `[c, dv]`: `Q S0`.
    qs: Vec<f32>,
    /// `[c, c]` decayed causal `q_i.k_j`, zero above the diagonal.
    att: Vec<f32>,
    /// `[c, c]` `D[i, j]` for `j <= i`.
    decay: Vec<f32>,
    /// `[c]` `E[i]`.
    cum: Vec<f32>,
}

/// The same recurrence in chunks of `chunk_size` tokens, in the WY / UT-transform form of
/// transformers' `torch_chunk_gated_delta_rule`, starting from and updating `state`; the last
/// chunk may be partial. Within a chunk, with `D[i,j] = prod_{j<m<=i} g_m` (the exponential of a
/// difference of cumulative log-decays, formed as a running product of decays <= 1 so it never
/// overflows and a zero decay is exact) and `E[i] = prod_{m<=i} g_m`:
/// `delta = (I + L)^{-1} beta (V - E K S0)` with `L[i,j] = beta_i D[i,j] k_i.k_j` (j < i) by
/// forward substitution, `o_i = E[i] q_i S0 + sum_{j<=i} D[i,j] (q_i.k_j) delta_j`, and
/// `S = E[last] S0 + sum_j D[last,j] k_j (outer) delta_j`.
#[allow(clippy::too_many_arguments)]
pub fn delta_net_chunkwise(
    state: &mut [f32],
    conv_out: &[f32],
    g_decay: &[f32],
    beta: &[f32],
    output: &mut [f32],
    num_v_heads: usize,
    value_dim: usize,
    k_heads_per_v: usize,
    key_dim: usize,
    n_tokens: usize,
    chunk_size: usize,
) {
    let d = Dims {
        nv: num_v_heads,
        dv: value_dim,
        dk: key_dim,
        k_per_v: k_heads_per_v,
        n_tokens,
    };
    d.check(state, conv_out, g_decay, beta, output);
    debug_assert!(chunk_size > 0);
    if d.nv * d.dv * d.dk * n_tokens == 0 {
        return;
    }
    let c = chunk_size.clamp(1, n_tokens);
    let (dk, dv) = (d.dk, d.dv);
    let init = || ChunkScratch {
        q: vec![0.0; c * dk],
        k: vec![0.0; c * dk],
        kwt: vec![0.0; dk * c],
        u: vec![0.0; c * dv],
        qs: vec![0.0; c * dv],
        att: vec![0.0; c * c],
        decay: vec![0.0; c * c],
        cum: vec![0.0; c],
    };
    for_each_head(d, state, output, init, |sc, h, s, out| {
        for t0 in (0..n_tokens).step_by(c) {
            let len = c.min(n_tokens - t0);
            chunk(
                d,
                sc,
                h,
                t0,
                len,
                conv_out,
                g_decay,
                beta,
                s,
                &mut out[t0 * dv..][..len * dv],
            );
        }
    });
}

/// One chunk of `len` tokens from `t0` for value head `h`: writes `out` `[len, dv]`, advances `s`.
#[allow(clippy::too_many_arguments)]
fn chunk(
    d: Dims,
    sc: &mut ChunkScratch,
    h: usize,
    t0: usize,
    len: usize,
    conv_out: &[f32],
    g_decay: &[f32],
    beta: &[f32],
    s: &mut [f32],
    out: &mut [f32],
) {
    let (dk, dv, c) = (d.dk, d.dv, sc.cum.len());
    let g = |i: usize| g_decay[(t0 + i) * d.nv + h] as f64;

    // Gather q, k; decays as f64 running products, each rounded once to f32.
    let (q, k) = (&mut sc.q[..len * dk], &mut sc.k[..len * dk]);
    let mut e = 1f64;
    for i in 0..len {
        let (qi, ki, _) = d.qkv(conv_out, t0 + i, h);
        q[i * dk..][..dk].copy_from_slice(qi);
        k[i * dk..][..dk].copy_from_slice(ki);
        e *= g(i);
        sc.cum[i] = e as f32;
        let mut p = 1f64;
        sc.decay[i * c + i] = 1.0;
        for j in (0..i).rev() {
            p *= g(j + 1);
            sc.decay[i * c + j] = p as f32;
        }
    }
    let (q, k) = (&*q, &*k);
    let (cum, decay) = (&sc.cum[..len], &sc.decay);

    // u = K S0, qs = Q S0.
    let (u, qs) = (&mut sc.u[..len * dv], &mut sc.qs[..len * dv]);
    u.fill(0.0);
    qs.fill(0.0);
    gemm_acc(k, dk, s, dv, u, dv, len, dk, dv);
    gemm_acc(q, dk, s, dv, qs, dv, len, dk, dv);

    // Right-hand side beta_i (v_i - E_i k_i S0), then forward substitution through (I + L),
    // L[i, j] = beta_i D[i, j] k_i.k_j.
    for i in 0..len {
        let (_, _, v) = d.qkv(conv_out, t0 + i, h);
        let (ei, bi) = (cum[i], beta[(t0 + i) * d.nv + h]);
        let (done, rest) = u.split_at_mut(i * dv);
        let ui = &mut rest[..dv];
        for (uv, &vv) in ui.iter_mut().zip(v) {
            *uv = (vv - ei * *uv) * bi;
        }
        let ki = &k[i * dk..][..dk];
        for (j, uj) in done.chunks_exact(dv).enumerate() {
            let lij = bi * decay[i * c + j] * dot(ki, &k[j * dk..][..dk]);
            axpy(ui, -lij, uj);
        }
    }
    let u = &*u;

    // o = E Q S0 + att delta, att[i, j] = D[i, j] q_i.k_j on and below the diagonal.
    let att = &mut sc.att[..len * len];
    for (i, arow) in att.chunks_exact_mut(len).enumerate() {
        let qi = &q[i * dk..][..dk];
        for (j, a) in arow.iter_mut().enumerate() {
            *a = if j <= i {
                decay[i * c + j] * dot(qi, &k[j * dk..][..dk])
            } else {
                0.0
            };
        }
    }
    for (i, o) in out.chunks_exact_mut(dv).enumerate() {
        for (o, &qsv) in o.iter_mut().zip(&qs[i * dv..][..dv]) {
            *o = cum[i] * qsv;
        }
    }
    gemm_acc(att, len, u, dv, out, dv, len, len, dv);

    // S = E[last] S0 + sum_j D[last, j] k_j (outer) delta_j.
    let last = len - 1;
    let kwt = &mut sc.kwt[..dk * len];
    for (r, row) in kwt.chunks_exact_mut(len).enumerate() {
        for (j, w) in row.iter_mut().enumerate() {
            *w = decay[last * c + j] * k[j * dk + r];
        }
    }
    let e_last = cum[last];
    s.iter_mut().for_each(|v| *v *= e_last);
    gemm_acc(kwt, len, u, dv, s, dv, dk, len, dv);
}

/// Rows and columns of the register block of `gemm_acc`.
const MR: usize = 4;
const NR: usize = 8;

/// `c[m, n] += a[m, k] b[k, n]`, row-major with leading dimensions `lda`, `ldb`, `ldc`. Every
/// element of `c` adds its `k` products in order, so the result does not depend on the blocking.
#[allow(clippy::too_many_arguments)]
fn gemm_acc(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    let mut i0 = 0;
    while i0 + MR <= m {
        let arows: [&[f32]; MR] = std::array::from_fn(|r| &a[(i0 + r) * lda..][..k]);
        let mut j0 = 0;
        while j0 + NR <= n {
            let mut acc = [[0f32; NR]; MR];
            for (r, acc) in acc.iter_mut().enumerate() {
                acc.copy_from_slice(&c[(i0 + r) * ldc + j0..][..NR]);
            }
            for p in 0..k {
                let brow: &[f32; NR] = b[p * ldb + j0..][..NR].try_into().unwrap();
                for (acc, arow) in acc.iter_mut().zip(&arows) {
                    let av = arow[p];
                    for (x, &bv) in acc.iter_mut().zip(brow) {
                        *x += av * bv;
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                c[(i0 + r) * ldc + j0..][..NR].copy_from_slice(acc);
            }
            j0 += NR;
        }
        if j0 < n {
            gemm_edge(a, lda, b, ldb, c, ldc, i0..i0 + MR, j0..n, k);
        }
        i0 += MR;
    }
    if i0 < m {
        gemm_edge(a, lda, b, ldb, c, ldc, i0..m, 0..n, k);
    }
}

/// `gemm_acc` over a block of rows and columns, one row of `c` at a time.
#[allow(clippy::too_many_arguments)]
fn gemm_edge(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k: usize,
) {
    for i in rows {
        let crow = &mut c[i * ldc + cols.start..i * ldc + cols.end];
        for p in 0..k {
            axpy(
                crow,
                a[i * lda + p],
                &b[p * ldb + cols.start..][..cols.len()],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::norm::test_rng::{assert_close, Rng};
    use super::*;
    use half::bf16;

    #[test]
    fn conv1d_matches_and_advances_state() {
        let mut rng = Rng::new(21);
        for (cd, n) in [(1, 1), (7, 1), (7, 2), (13, 3), (64, 10), (8192, 4)] {
            let x = rng.vec(n * cd, -2.0, 2.0);
            let st0 = rng.vec(HIST * cd, -2.0, 2.0);
            let w = rng.vec(CONV_KERNEL * cd, -1.0, 1.0);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for ws in [FloatSlice::F32(&w), FloatSlice::Bf16(&wb)] {
                let wf = ws.to_f32_vec();
                let mut st = st0.clone();
                let mut out = vec![0f32; n * cd];
                conv1d_step(&x, &mut st, ws, &mut out, cd, n);
                // The full input sequence: state rows then this call's rows.
                let seq: Vec<f32> = st0.iter().chain(&x).copied().collect();
                let mut want = vec![0f64; n * cd];
                for t in 0..n {
                    for ch in 0..cd {
                        let a: f64 = (0..CONV_KERNEL)
                            .map(|j| wf[ch * 4 + j] as f64 * seq[(t + j) * cd + ch] as f64)
                            .sum();
                        want[t * cd + ch] = a / (1.0 + (-a).exp());
                    }
                }
                assert_close(&out, &want, 1e-6, "conv1d_step");
                assert_eq!(st, seq[n * cd..], "state after {n} tokens");
            }
        }
    }

    #[test]
    fn gemm_acc_matches_f64_on_edge_shapes() {
        let mut rng = Rng::new(27);
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (4, 8, 8), (9, 13, 17), (64, 128, 130)] {
            let (lda, ldb, ldc) = (k + 2, n + 1, n + 3);
            let a = rng.vec(m * lda, -1.0, 1.0);
            let b = rng.vec(k * ldb, -1.0, 1.0);
            let c0 = rng.vec(m * ldc, -1.0, 1.0);
            let mut c = c0.clone();
            gemm_acc(&a, lda, &b, ldb, &mut c, ldc, m, k, n);
            let mut want: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
            for i in 0..m {
                for j in 0..n {
                    want[i * ldc + j] += (0..k)
                        .map(|p| a[i * lda + p] as f64 * b[p * ldb + j] as f64)
                        .sum::<f64>();
                }
            }
            assert_close(&c, &want, 1e-6, "gemm_acc");
        }
    }

    #[test]
    fn decay_beta_matches() {
        let mut rng = Rng::new(22);
        let (nv, n) = (5, 3);
        let mut alpha = rng.vec(nv * n, -6.0, 6.0);
        alpha[0] = 30.0; // softplus identity branch
        alpha[1] = -40.0;
        let beta = rng.vec(nv * n, -6.0, 6.0);
        let a_log = rng.vec(nv, -2.0, 2.0);
        let dt = rng.vec(nv, -1.0, 1.0);
        let (mut g, mut b) = (vec![0f32; nv * n], vec![0f32; nv * n]);
        decay_beta(
            &alpha,
            &beta,
            FloatSlice::F32(&a_log),
            FloatSlice::F32(&dt),
            &mut g,
            &mut b,
            nv,
            n,
        );
        for i in 0..nv * n {
            let x = alpha[i] as f64 + dt[i % nv] as f64;
            let sp = if x > 20.0 { x } else { x.exp().ln_1p() };
            let wg = (-(a_log[i % nv] as f64).exp() * sp).exp();
            assert!(
                (g[i] as f64 - wg).abs() <= 2e-6 * wg.max(1e-30),
                "g[{i}] {} vs {wg}",
                g[i]
            );
            let wb = 1.0 / (1.0 + (-(beta[i] as f64)).exp());
            assert!((b[i] as f64 - wb).abs() < 1e-6, "beta[{i}]");
        }
    }

    /// Random GatedDeltaNet inputs: normalised q (scaled by 1/sqrt(dk)) and k, beta in (0, 1).
    struct Case {
        d: Dims,
        conv: Vec<f32>,
        g: Vec<f32>,
        beta: Vec<f32>,
        state: Vec<f32>,
    }

    fn case(rng: &mut Rng, d: Dims, decay: &mut dyn FnMut(&mut Rng) -> f32) -> Case {
        let (nk, dk) = (d.nk(), d.dk);
        let mut conv = Vec::with_capacity(d.row() * d.n_tokens);
        for _ in 0..d.n_tokens {
            for part in 0..2 {
                for _ in 0..nk {
                    let mut v = rng.normals(dk);
                    let r = 1.0 / (v.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
                    let s = if part == 0 { r / (dk as f32).sqrt() } else { r };
                    v.iter_mut().for_each(|x| *x *= s);
                    conv.extend(v);
                }
            }
            conv.extend(rng.normals(d.nv * d.dv));
        }
        let n = d.nv * d.n_tokens;
        Case {
            d,
            conv,
            g: (0..n).map(|_| decay(rng)).collect(),
            beta: (0..n).map(|_| rng.uniform(0.02, 0.98)).collect(),
            state: rng
                .normals(d.nv * dk * d.dv)
                .iter()
                .map(|x| 0.3 * x)
                .collect(),
        }
    }

    /// f64 recurrence: (output, final state).
    fn ref_delta(c: &Case) -> (Vec<f64>, Vec<f64>) {
        let d = c.d;
        let mut s: Vec<f64> = c.state.iter().map(|&x| x as f64).collect();
        let mut out = vec![0f64; d.n_tokens * d.nv * d.dv];
        for t in 0..d.n_tokens {
            for h in 0..d.nv {
                let (q, k, v) = d.qkv(&c.conv, t, h);
                let (g, b) = (c.g[t * d.nv + h] as f64, c.beta[t * d.nv + h] as f64);
                let sh = &mut s[h * d.dk * d.dv..][..d.dk * d.dv];
                sh.iter_mut().for_each(|x| *x *= g);
                for col in 0..d.dv {
                    let kv: f64 = (0..d.dk).map(|r| k[r] as f64 * sh[r * d.dv + col]).sum();
                    let delta = b * (v[col] as f64 - kv);
                    for r in 0..d.dk {
                        sh[r * d.dv + col] += k[r] as f64 * delta;
                    }
                    out[(t * d.nv + h) * d.dv + col] =
                        (0..d.dk).map(|r| q[r] as f64 * sh[r * d.dv + col]).sum();
                }
            }
        }
        (out, s)
    }

    fn shapes() -> Vec<Dims> {
        // (nv, dv, dk, k_heads_per_v, n_tokens)
        [
            (1, 4, 4, 1, 1),
            (2, 5, 3, 2, 7),
            (4, 16, 8, 4, 37),
            (4, 9, 12, 2, 1),
            (8, 32, 16, 2, 70),
            (3, 24, 40, 1, 130),
        ]
        .into_iter()
        .map(|(nv, dv, dk, k_per_v, n_tokens)| Dims {
            nv,
            dv,
            dk,
            k_per_v,
            n_tokens,
        })
        .collect()
    }

    fn run_step(c: &Case) -> (Vec<f32>, Vec<f32>) {
        let d = c.d;
        let mut s = c.state.clone();
        let mut out = vec![0f32; d.n_tokens * d.nv * d.dv];
        delta_net_step(
            &mut s, &c.conv, &c.g, &c.beta, &mut out, d.nv, d.dv, d.k_per_v, d.dk, d.n_tokens,
        );
        (out, s)
    }

    fn run_chunk(c: &Case, chunk: usize) -> (Vec<f32>, Vec<f32>) {
        let d = c.d;
        let mut s = c.state.clone();
        let mut out = vec![0f32; d.n_tokens * d.nv * d.dv];
        delta_net_chunkwise(
            &mut s, &c.conv, &c.g, &c.beta, &mut out, d.nv, d.dv, d.k_per_v, d.dk, d.n_tokens,
            chunk,
        );
        (out, s)
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let scale = b.iter().fold(1e-30f64, |m, &v| m.max(v.abs() as f64));
        a.iter()
            .zip(b)
            .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
            / scale
    }

    #[test]
    fn delta_net_step_matches_f64_recurrence() {
        let mut rng = Rng::new(23);
        for d in shapes() {
            let c = case(&mut rng, d, &mut |r| r.uniform(0.5, 1.0));
            let (out, s) = run_step(&c);
            let (want_out, want_s) = ref_delta(&c);
            assert_close(&out, &want_out, 1e-5, "delta_net_step output");
            assert_close(&s, &want_s, 1e-5, "delta_net_step state");
        }
    }

    #[test]
    fn step_tokens_one_at_a_time_equals_batch() {
        let mut rng = Rng::new(24);
        let d = Dims {
            nv: 4,
            dv: 8,
            dk: 6,
            k_per_v: 2,
            n_tokens: 5,
        };
        let c = case(&mut rng, d, &mut |r| r.uniform(0.5, 1.0));
        let (out, s) = run_step(&c);
        let mut s1 = c.state.clone();
        let row = d.row();
        for t in 0..d.n_tokens {
            let mut o = vec![0f32; d.nv * d.dv];
            let (g, b) = (&c.g[t * d.nv..][..d.nv], &c.beta[t * d.nv..][..d.nv]);
            delta_net_step(
                &mut s1,
                &c.conv[t * row..][..row],
                g,
                b,
                &mut o,
                d.nv,
                d.dv,
                d.k_per_v,
                d.dk,
                1,
            );
            assert_eq!(o[..], out[t * d.nv * d.dv..][..d.nv * d.dv]);
        }
        assert_eq!(s1, s);
    }

    #[test]
    fn chunkwise_matches_step_and_f64() {
        let mut rng = Rng::new(25);
        for d in shapes() {
            for chunk in [1, 4, 16, 64] {
                let c = case(&mut rng, d, &mut |r| r.uniform(0.5, 1.0));
                let (out, s) = run_chunk(&c, chunk);
                let (sout, ss) = run_step(&c);
                let (want_out, want_s) = ref_delta(&c);
                assert_close(&out, &want_out, 1e-5, "chunkwise output");
                assert_close(&s, &want_s, 1e-5, "chunkwise state");
                let (eo, es) = (rel_err(&out, &sout), rel_err(&s, &ss));
                assert!(
                    eo < 3e-6 && es < 3e-6,
                    "{chunk}: vs step: out {eo:e} state {es:e}"
                );
            }
        }
    }

    #[test]
    fn chunkwise_handles_realistic_and_zero_decays() {
        let mut rng = Rng::new(26);
        let d = Dims {
            nv: 4,
            dv: 32,
            dk: 32,
            k_per_v: 2,
            n_tokens: 150,
        };
        // Decays from the model's own gate, with some exactly 0 and some tiny.
        let mut decay = |r: &mut Rng| {
            let u = r.uniform(0.0, 1.0);
            if u < 0.05 {
                0.0
            } else if u < 0.1 {
                1e-30
            } else {
                let x = r.uniform(-8.0, 12.0);
                let sp = if x > 20.0 { x } else { x.exp().ln_1p() };
                (-(r.uniform(-3.0, 2.5)).exp() * sp).exp()
            }
        };
        let c = case(&mut rng, d, &mut decay);
        assert!(c.g.contains(&0.0) && c.g.iter().any(|&g| g > 0.9));
        let (want_out, want_s) = ref_delta(&c);
        let (sout, ss) = run_step(&c);
        assert_close(&sout, &want_out, 1e-5, "step output");
        assert_close(&ss, &want_s, 1e-5, "step state");
        for chunk in [1, 4, 16, 64] {
            let (out, s) = run_chunk(&c, chunk);
            assert!(
                out.iter().chain(&s).all(|v| v.is_finite()),
                "chunk {chunk}: not finite"
            );
            assert_close(&out, &want_out, 1e-5, "chunkwise output");
            assert_close(&s, &want_s, 1e-5, "chunkwise state");
            let (eo, es) = (rel_err(&out, &sout), rel_err(&s, &ss));
            assert!(
                eo < 3e-6 && es < 3e-6,
                "{chunk}: vs step: out {eo:e} state {es:e}"
            );
        }
    }
}
