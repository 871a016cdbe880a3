//! CPU kernels of the MoE block: SwiGLU, router softmax/top-k, weight normalisation, the two
//! routed-expert ops (host buckets and device-side routing) and the residual combine.
//!
//! The expert ops check every index and block bound before writing anything, run each expert's
//! tokens as one multi-token matvec, and sum expert outputs into `out_sum` in a fixed order.

use super::matvec::matvec_n_tokens;
use super::view::QuantMatrix;
use crate::graph::{ExpertLayout, ExpertOffsets};
use rayon::prelude::*;

/// Elements per parallel task of the element-wise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

#[inline(always)]
fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = silu(gate) * up` with `silu(x) = x / (1 + exp(-x))`, over `out.len()` elements.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    debug_assert!(gate.len() >= n && up.len() >= n);
    let run = |(o, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu_mul(g, u);
        }
    };
    if n <= ELEMWISE_CHUNK {
        run((out, (&gate[..n], &up[..n])));
    } else {
        out.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(
                gate[..n]
                    .par_chunks(ELEMWISE_CHUNK)
                    .zip(up[..n].par_chunks(ELEMWISE_CHUNK)),
            )
            .for_each(run);
    }
}

/// `gate = silu(gate) * up` in place.
fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_mul(*g, u);
    }
}

/// Per token: softmax over `n_experts` (f32, max-subtracted), then the `k` largest probabilities
/// in descending order (ties: lower expert index first). `indices[t*k+j]`, `weights[t*k+j]` are
/// the chosen expert and its probability.
pub fn softmax_topk(
    logits: &[f32],
    n_tokens: usize,
    n_experts: usize,
    k: usize,
    indices: &mut [u32],
    weights: &mut [f32],
) {
    debug_assert!(k <= n_experts);
    debug_assert!(logits.len() >= n_tokens * n_experts);
    debug_assert!(indices.len() >= n_tokens * k && weights.len() >= n_tokens * k);
    if n_tokens == 0 || k == 0 {
        return;
    }
    let one = |probs: &mut Vec<f32>, (l, (idx, w)): (&[f32], (&mut [u32], &mut [f32]))| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        probs.clear();
        probs.extend(l.iter().map(|&v| (v - m).exp()));
        let sum: f32 = probs.iter().sum();
        for p in probs.iter_mut() {
            *p /= sum;
        }
        // Insertion into a sorted top-k: strict comparisons keep the lower index ahead on ties.
        let mut len = 0;
        for (e, &p) in probs.iter().enumerate() {
            let beats_last = p > w[k - 1];
            if len == k && !beats_last {
                continue;
            }
            let mut pos = len.min(k - 1);
            while pos > 0 && w[pos - 1] < p {
                w[pos] = w[pos - 1];
                idx[pos] = idx[pos - 1];
                pos -= 1;
            }
            w[pos] = p;
            idx[pos] = e as u32;
            len = (len + 1).min(k);
        }
    };
    let items = logits[..n_tokens * n_experts].chunks(n_experts).zip(
        indices[..n_tokens * k]
            .chunks_mut(k)
            .zip(weights[..n_tokens * k].chunks_mut(k)),
    );
    if n_tokens * n_experts <= ELEMWISE_CHUNK {
        let mut probs = Vec::with_capacity(n_experts);
        items.for_each(|it| one(&mut probs, it));
    } else {
        logits[..n_tokens * n_experts]
            .par_chunks(n_experts)
            .zip(
                indices[..n_tokens * k]
                    .par_chunks_mut(k)
                    .zip(weights[..n_tokens * k].par_chunks_mut(k)),
            )
            .for_each_init(|| Vec::with_capacity(n_experts), one);
    }
}

/// Per token: `w /= sum(w)` over its `k` weights when the sum is positive.
pub fn normalize_weights(weights: &mut [f32], n_tokens: usize, k: usize) {
    if k == 0 {
        return;
    }
    for w in weights[..n_tokens * k].chunks_mut(k) {
        let sum: f32 = w.iter().sum();
        if sum > 0.0 {
            for v in w {
                *v /= sum;
            }
        }
    }
}

/// `out[t,d] = h_mid[t,d] + moe_sum[t,d] + sigmoid(shared_gate[t]) * shared_out[t,d]`.
pub fn combine_residual(
    h_mid: &[f32],
    moe_sum: &[f32],
    shared_out: &[f32],
    shared_gate: &[f32],
    out: &mut [f32],
    n_tokens: usize,
    dim: usize,
) {
    let n = n_tokens * dim;
    debug_assert!(h_mid.len() >= n && moe_sum.len() >= n && shared_out.len() >= n);
    debug_assert!(shared_gate.len() >= n_tokens && out.len() >= n);
    if n == 0 {
        return;
    }
    let row = |(t, o): (usize, &mut [f32])| {
        let g = sigmoid(shared_gate[t]);
        let r = t * dim..(t + 1) * dim;
        for (((o, &h), &m), &s) in o
            .iter_mut()
            .zip(&h_mid[r.clone()])
            .zip(&moe_sum[r.clone()])
            .zip(&shared_out[r])
        {
            *o = h + m + g * s;
        }
    };
    if n <= ELEMWISE_CHUNK {
        out[..n].chunks_mut(dim).enumerate().for_each(row);
    } else {
        out[..n].par_chunks_mut(dim).enumerate().for_each(row);
    }
}

/// Mutable scratch of the MoE ops: `gate`, `up`, `act` are `[assignments, inter]` and `out` is
/// `[assignments, hidden]` (rows as documented on the ops in `src/graph/op.rs`).
pub struct MoeScratch<'a> {
    pub gate: &'a mut [f32],
    pub up: &'a mut [f32],
    pub act: &'a mut [f32],
    pub out: &'a mut [f32],
}

type Fail = (&'static str, String);

/// `Err((field, message))` unless `have >= want`.
fn need(field: &'static str, have: usize, want: usize, shape: &str) -> Result<(), Fail> {
    if have < want {
        return Err((
            field,
            format!("{field} has {have} elements but {shape} needs {want}"),
        ));
    }
    Ok(())
}

/// Checks the layout the matvec kernel relies on.
fn check_layout(l: &ExpertLayout) -> Result<(), Fail> {
    let gs = l.group_size;
    if !matches!(l.bits, 4 | 8) || !matches!(gs, 32 | 64 | 128) {
        return Err((
            "layout",
            format!(
                "bits {} / group_size {gs} unsupported (4|8 / 32|64|128)",
                l.bits
            ),
        ));
    }
    if l.hidden_dim % gs != 0 || l.inter_dim % gs != 0 {
        return Err((
            "layout",
            format!(
                "hidden_dim {} and inter_dim {} must be multiples of group_size {gs}",
                l.hidden_dim, l.inter_dim
            ),
        ));
    }
    Ok(())
}

/// Gate, up and down of the expert block starting at byte `start` of `experts`.
fn expert_mats<'a>(
    experts: &'a [u8],
    start: u64,
    offs: &ExpertOffsets,
    l: &ExpertLayout,
) -> Result<[QuantMatrix<'a>; 3], String> {
    let end = start.checked_add(offs.block_bytes);
    let block = end
        .and_then(|end| experts.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?))
        .ok_or_else(|| {
            format!(
                "block [{start}, {start} + {}) falls outside expert_base ({} bytes)",
                offs.block_bytes,
                experts.len()
            )
        })?;
    let (h, i) = (l.hidden_dim as usize, l.inter_dim as usize);
    let view = |w, rows, cols| {
        QuantMatrix::from_ref(block, w, rows, cols).ok_or_else(|| {
            format!("block at byte {start} is misaligned for its u32 or scale views")
        })
    };
    Ok([
        view(&offs.gate, i, h)?,
        view(&offs.up, i, h)?,
        view(&offs.down, h, i)?,
    ])
}

/// Split the first `offsets.last()` rows of `buf` (rows of `row` floats) at the CSR `offsets`.
fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], row: usize) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * row);
        parts.push(head);
        buf = rest;
    }
    parts
}

/// One expert over `n` gathered rows: `xin` `[n, hidden]` holds the inputs and receives the
/// outputs; `gate`/`up` `[n, inter]`; the SwiGLU activation goes to `act` (or in place in `gate`).
fn run_expert(
    mats: &[QuantMatrix<'_>; 3],
    xin: &mut [f32],
    gate: &mut [f32],
    up: &mut [f32],
    act: Option<&mut [f32]>,
    n: usize,
) {
    let [g, u, d] = mats;
    matvec_n_tokens(g, xin, gate, n);
    matvec_n_tokens(u, xin, up, n);
    let act: &[f32] = match act {
        Some(act) => {
            swiglu(gate, up, act);
            act
        }
        None => {
            swiglu_in_place(gate, up);
            gate
        }
    };
    matvec_n_tokens(d, act, xin, n);
}

/// Stable counting sort of `0..keys.len()` by key: `(start offsets [n_keys + 1], order)`.
fn group_by_key(keys: &[u32], n_keys: usize) -> (Vec<usize>, Vec<u32>) {
    let mut start = vec![0usize; n_keys + 1];
    for &k in keys {
        start[k as usize + 1] += 1;
    }
    for i in 0..n_keys {
        start[i + 1] += start[i];
    }
    let mut next = start.clone();
    let mut order = vec![0u32; keys.len()];
    for (j, &k) in keys.iter().enumerate() {
        order[next[k as usize]] = j as u32;
        next[k as usize] += 1;
    }
    (start, order)
}

/// Op `MoeBatchedPermuteFuse`: bucket `b` runs assignments `offsets[b]..offsets[b+1]` through the
/// expert block at byte `slots[b] * stride` of `experts`; assignment `j` reads row `token_idx[j]`
/// of `input`, uses scratch rows `j`, and adds `weights[j] * y` into row `token_idx[j]` of
/// `out_sum`, which is overwritten over `[n_tokens, hidden]`. Each row of `out_sum` is summed in
/// assignment (bucket) order.
///
/// Errors name the offending field: a block outside `experts` (or misaligned), offsets not
/// non-decreasing from 0 to `token_idx.len()`, a token index `>= n_tokens`, or a buffer too short.
/// Everything is checked before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn moe_buckets(
    experts: &[u8],
    stride: usize,
    layout: &ExpertLayout,
    slots: &[u32],
    offsets: &[u32],
    input: &[f32],
    token_idx: &[u32],
    weights: &[f32],
    scratch: MoeScratch<'_>,
    out_sum: &mut [f32],
    n_tokens: usize,
) -> Result<(), (&'static str, String)> {
    check_layout(layout)?;
    let (hidden, inter) = (layout.hidden_dim as usize, layout.inter_dim as usize);
    let offs = layout.offsets();
    let total = token_idx.len();
    if offsets.len() != slots.len() + 1 {
        return Err((
            "buckets",
            format!(
                "{} offsets for {} expert_slots; need n_buckets + 1 = {}",
                offsets.len(),
                slots.len(),
                slots.len() + 1
            ),
        ));
    }
    if offsets[0] != 0 {
        return Err((
            "buckets",
            format!("buckets[0] = {} but must be 0", offsets[0]),
        ));
    }
    for (b, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err((
                "buckets",
                format!("buckets[{}] = {} < buckets[{b}] = {}", b + 1, w[1], w[0]),
            ));
        }
    }
    let last = offsets[slots.len()] as usize;
    if last != total {
        return Err((
            "buckets",
            format!(
                "buckets[{}] = {last} but bucket_token_idx has {total} entries",
                slots.len()
            ),
        ));
    }
    if let Some((j, &t)) = token_idx
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= n_tokens)
    {
        return Err((
            "bucket_token_idx",
            format!("bucket_token_idx[{j}] = {t} >= n_tokens {n_tokens}"),
        ));
    }
    let (rows_i, rows_h) = ("[assignments, inter]", "[assignments, hidden]");
    for (field, have, want, shape) in [
        ("bucket_weights", weights.len(), total, "[assignments]"),
        (
            "bucket_input",
            input.len(),
            n_tokens * hidden,
            "[n_tokens, hidden]",
        ),
        ("bucket_gate", scratch.gate.len(), total * inter, rows_i),
        ("bucket_up", scratch.up.len(), total * inter, rows_i),
        ("bucket_act", scratch.act.len(), total * inter, rows_i),
        ("bucket_out", scratch.out.len(), total * hidden, rows_h),
        (
            "out_sum",
            out_sum.len(),
            n_tokens * hidden,
            "[n_tokens, hidden]",
        ),
    ] {
        need(field, have, want, shape)?;
    }
    if (stride as u64) < offs.block_bytes && slots.len() > 1 {
        return Err((
            "expert_stride",
            format!("stride {stride} < expert block size {}", offs.block_bytes),
        ));
    }
    let mut mats = Vec::with_capacity(slots.len());
    for (b, &slot) in slots.iter().enumerate() {
        let start = slot as u64 * stride as u64;
        let m = expert_mats(experts, start, &offs, layout)
            .map_err(|e| ("expert_slots", format!("bucket {b} (slot {slot}): {e}")))?;
        mats.push(m);
    }

    let bounds: Vec<usize> = offsets.iter().map(|&o| o as usize).collect();
    let gates = split_rows(scratch.gate, &bounds, inter);
    let ups = split_rows(scratch.up, &bounds, inter);
    let acts = split_rows(scratch.act, &bounds, inter);
    let outs = split_rows(scratch.out, &bounds, hidden);
    gates
        .into_par_iter()
        .zip(ups)
        .zip(acts)
        .zip(outs)
        .enumerate()
        .for_each(|(b, (((gate, up), act), out))| {
            let rows = bounds[b]..bounds[b + 1];
            if rows.is_empty() {
                return;
            }
            for (o, &t) in out.chunks_exact_mut(hidden).zip(&token_idx[rows.clone()]) {
                o.copy_from_slice(&input[t as usize * hidden..(t as usize + 1) * hidden]);
            }
            run_expert(&mats[b], out, gate, up, Some(act), rows.len());
        });

    let (tstart, order) = group_by_key(token_idx, n_tokens);
    let ys: &[f32] = scratch.out;
    scatter_sum(out_sum, hidden, n_tokens, |t| {
        order[tstart[t]..tstart[t + 1]].iter().map(|&j| {
            (
                weights[j as usize],
                &ys[j as usize * hidden..(j as usize + 1) * hidden],
            )
        })
    });
    Ok(())
}

/// `out_sum[t] = 0 + sum w * y` over `terms(t)` in the order given, rows in parallel.
fn scatter_sum<'y, I>(
    out_sum: &mut [f32],
    hidden: usize,
    n_tokens: usize,
    terms: impl Fn(usize) -> I + Sync,
) where
    I: Iterator<Item = (f32, &'y [f32])>,
{
    if hidden == 0 {
        return;
    }
    out_sum[..n_tokens * hidden]
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(t, o)| {
            o.fill(0.0);
            for (w, y) in terms(t) {
                for (o, &v) in o.iter_mut().zip(y) {
                    *o += w * v;
                }
            }
        });
}

/// Op `MoeGatherIdFuse`: routing on the device. `indices`/`weights` are `[n_tokens*k]`; expert
/// `e` lives at byte `e * stride`. Fills `htpe[..n_experts]` with tokens per expert and
/// `hids[..n_tokens*k]` with assignment ids `t*k+j` sorted by expert (stable), runs each expert's
/// assignments through gate/up (rows of `gate_mid`/`up_mid` in `hids` order), SwiGLU in place in
/// `gate_mid`, down into `down_mid`, then `out_sum[t] = sum_j weights[t*k+j] * down_mid[row of
/// (t, j)]` with `j` ascending.
///
/// Errors (field, message) if an index is `>= n_experts`, a used block falls outside `experts`,
/// or a buffer is too short; all checked before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn moe_gather_id(
    experts: &[u8],
    stride: usize,
    layout: &ExpertLayout,
    indices: &[u32],
    weights: &[f32],
    mlp_in: &[f32],
    out_sum: &mut [f32],
    htpe: &mut [u32],
    hids: &mut [u32],
    gate_mid: &mut [f32],
    up_mid: &mut [f32],
    down_mid: &mut [f32],
    n_tokens: usize,
    n_experts: usize,
    k: usize,
) -> Result<(), (&'static str, String)> {
    check_layout(layout)?;
    let (hidden, inter) = (layout.hidden_dim as usize, layout.inter_dim as usize);
    let offs = layout.offsets();
    let total = n_tokens * k;
    let (per_a, rows_i) = ("[n_tokens * k]", "[n_tokens * k, inter]");
    for (field, have, want, shape) in [
        ("indices", indices.len(), total, per_a),
        ("weights", weights.len(), total, per_a),
        (
            "mlp_in",
            mlp_in.len(),
            n_tokens * hidden,
            "[n_tokens, hidden]",
        ),
        (
            "out_sum",
            out_sum.len(),
            n_tokens * hidden,
            "[n_tokens, hidden]",
        ),
        ("htpe", htpe.len(), n_experts, "[n_experts]"),
        ("hids", hids.len(), total, per_a),
        ("gate_mid", gate_mid.len(), total * inter, rows_i),
        ("up_mid", up_mid.len(), total * inter, rows_i),
        (
            "down_mid",
            down_mid.len(),
            total * hidden,
            "[n_tokens * k, hidden]",
        ),
    ] {
        need(field, have, want, shape)?;
    }
    let indices = &indices[..total];
    if let Some((a, &e)) = indices
        .iter()
        .enumerate()
        .find(|(_, &e)| e as usize >= n_experts)
    {
        return Err((
            "indices",
            format!("indices[{a}] = {e} >= n_experts {n_experts}"),
        ));
    }
    if (stride as u64) < offs.block_bytes && n_experts > 1 {
        return Err((
            "expert_stride",
            format!("stride {stride} < expert block size {}", offs.block_bytes),
        ));
    }
    let (estart, order) = group_by_key(indices, n_experts);
    let mut mats = Vec::new();
    for e in 0..n_experts {
        if estart[e + 1] > estart[e] {
            let m = expert_mats(experts, e as u64 * stride as u64, &offs, layout)
                .map_err(|m| ("expert_base", format!("expert {e}: {m}")))?;
            mats.push((e, m));
        }
    }

    for (e, h) in htpe[..n_experts].iter_mut().enumerate() {
        *h = (estart[e + 1] - estart[e]) as u32;
    }
    hids[..total].copy_from_slice(&order);
    let used: Vec<usize> = mats.iter().map(|&(e, _)| e).collect();
    let mut bounds: Vec<usize> = used.iter().map(|&e| estart[e]).collect();
    bounds.push(total);
    let gates = split_rows(gate_mid, &bounds, inter);
    let ups = split_rows(up_mid, &bounds, inter);
    let downs = split_rows(down_mid, &bounds, hidden);
    gates
        .into_par_iter()
        .zip(ups)
        .zip(downs)
        .zip(mats.par_iter())
        .for_each(|(((gate, up), down), (e, m))| {
            let ids = &order[estart[*e]..estart[*e + 1]];
            for (o, &a) in down.chunks_exact_mut(hidden).zip(ids) {
                let t = a as usize / k;
                o.copy_from_slice(&mlp_in[t * hidden..(t + 1) * hidden]);
            }
            run_expert(m, down, gate, up, None, ids.len());
        });

    let mut row_of = vec![0u32; total];
    for (r, &a) in order.iter().enumerate() {
        row_of[a as usize] = r as u32;
    }
    let ys: &[f32] = down_mid;
    scatter_sum(out_sum, hidden, n_tokens, |t| {
        (t * k..(t + 1) * k).map(|a| {
            let r = row_of[a] as usize;
            (weights[a], &ys[r * hidden..(r + 1) * hidden])
        })
    });
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::needless_range_loop,
    clippy::too_many_arguments,
    clippy::type_complexity
)]
mod tests {
    use super::*;
    use crate::backend::cpu::matvec::tests::{deq64, quantize, Quant, Rng, Sd};
    use crate::graph::WDtype;

    fn silu64(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }

    #[test]
    fn swiglu_and_combine_match_f64() {
        let mut rng = Rng::new(10);
        let n = 40_000; // above ELEMWISE_CHUNK: the parallel path
        let g: Vec<f32> = (0..n)
            .map(|i| rng.f32() * if i % 97 == 0 { 120.0 } else { 6.0 })
            .collect();
        let u = rng.vec(n);
        let mut out = vec![0f32; n];
        swiglu(&g, &u, &mut out);
        for i in 0..n {
            let r = silu64(g[i] as f64) * u[i] as f64;
            assert!(
                (out[i] as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()),
                "{i}: {} vs {r}",
                out[i]
            );
        }
        let mut small = vec![0f32; 7];
        swiglu(&g, &u, &mut small);
        assert_eq!(small[..], out[..7]);

        for (nt, dim) in [(3, 5), (9, 4096)] {
            let (h, m, s) = (rng.vec(nt * dim), rng.vec(nt * dim), rng.vec(nt * dim));
            let gate: Vec<f32> = rng.vec(nt).iter().map(|v| v * 8.0).collect();
            let mut out = vec![f32::NAN; nt * dim + 1];
            combine_residual(&h, &m, &s, &gate, &mut out, nt, dim);
            for t in 0..nt {
                let sg = 1.0 / (1.0 + (-(gate[t] as f64)).exp());
                for d in 0..dim {
                    let i = t * dim + d;
                    let r = h[i] as f64 + m[i] as f64 + sg * s[i] as f64;
                    assert!((out[i] as f64 - r).abs() <= 1e-6, "{t} {d}");
                }
            }
            assert!(out[nt * dim].is_nan());
        }
    }

    #[test]
    fn softmax_topk_order_ties_and_probabilities() {
        // Ties: equal logits keep the lower index first.
        let logits = [1.0f32, 3.0, 3.0, 0.0, 3.0, 2.0];
        let (mut idx, mut w) = (vec![0u32; 4], vec![0f32; 4]);
        softmax_topk(&logits, 1, 6, 4, &mut idx, &mut w);
        assert_eq!(idx, [1, 2, 4, 5]);
        assert_eq!(w[0], w[1]);
        assert_eq!(w[1], w[2]);
        // A tie at the k-th place: the earlier expert stays.
        let (mut idx, mut w) = (vec![0u32; 2], vec![0f32; 2]);
        softmax_topk(&[1.0, 3.0, 1.0, 1.0], 1, 4, 2, &mut idx, &mut w);
        assert_eq!(idx, [1, 0]);
        let all_equal = [0.5f32; 5];
        let (mut idx, mut w) = (vec![9u32; 5], vec![0f32; 5]);
        softmax_topk(&all_equal, 1, 5, 5, &mut idx, &mut w);
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        assert!(w.iter().all(|&v| v == 0.2));

        let mut rng = Rng::new(11);
        for (nt, ne, k) in [(3, 8, 1), (5, 16, 4), (2, 7, 7), (300, 64, 8)] {
            let logits: Vec<f32> = (0..nt * ne).map(|_| rng.f32() * 10.0).collect();
            let (mut idx, mut w) = (vec![0u32; nt * k], vec![0f32; nt * k]);
            softmax_topk(&logits, nt, ne, k, &mut idx, &mut w);
            for t in 0..nt {
                let l = &logits[t * ne..(t + 1) * ne];
                let m = l.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let e: Vec<f64> = l.iter().map(|&v| (v as f64 - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let mut order: Vec<usize> = (0..ne).collect();
                order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap().then(a.cmp(&b)));
                for j in 0..k {
                    assert_eq!(idx[t * k + j] as usize, order[j], "token {t} rank {j}");
                    let p = e[order[j]] / sum;
                    assert!(
                        (w[t * k + j] as f64 - p).abs() <= 1e-6 * p + 1e-9,
                        "{t} {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn normalize_weights_per_token() {
        let mut w = vec![1.0f32, 3.0, 0.0, 0.0, -1.0, 0.5, 2.0, 2.0];
        normalize_weights(&mut w, 4, 2);
        assert_eq!(w, [0.25, 0.75, 0.0, 0.0, -1.0, 0.5, 0.5, 0.5]);
        let mut w = vec![0.2f32, 0.3, 0.1];
        normalize_weights(&mut w, 1, 3);
        let r = [0.2 / 0.6, 0.3 / 0.6, 0.1 / 0.6];
        for (a, b) in w.iter().zip(r) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    /// Experts packed as in an expert file: block `slot` at `slot * stride`.
    struct Experts {
        layout: ExpertLayout,
        stride: usize,
        /// Per expert id: gate, up, down as owned matrices (the reference reads these).
        mats: Vec<[Quant; 3]>,
        buf: Vec<u8>,
        off: usize,
        len: usize,
    }

    impl Experts {
        /// `n` experts; expert `e` is stored at slot `slot_of[e]` of `n_slots`.
        fn new(
            rng: &mut Rng,
            hidden: usize,
            inter: usize,
            bits: u32,
            gs: usize,
            sd: Sd,
            slot_of: &[usize],
            n_slots: usize,
        ) -> Experts {
            let scale_dtype = match sd {
                Sd::F32 => WDtype::F32,
                Sd::Bf16 => WDtype::Bf16,
                Sd::F16 => WDtype::F16,
            };
            let layout = ExpertLayout {
                hidden_dim: hidden as u32,
                inter_dim: inter as u32,
                bits,
                group_size: gs as u32,
                scale_dtype,
            };
            let offs = layout.offsets();
            let stride = (offs.block_bytes as usize).div_ceil(64) * 64 + 64;
            let len = n_slots * stride;
            let mut buf = vec![0xA5u8; len + 8];
            let off = buf.as_ptr().align_offset(8);
            let mut mats = Vec::new();
            for &slot in slot_of {
                let mut q = |rows: usize, cols: usize| {
                    let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 0.3).collect();
                    quantize(&w, rows, cols, bits, gs, sd)
                };
                let m = [q(inter, hidden), q(inter, hidden), q(hidden, inter)];
                let base = off + slot * stride;
                for (qm, wr) in m.iter().zip([offs.gate, offs.up, offs.down]) {
                    let words: Vec<u8> = qm.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
                    for (o, bytes) in [
                        (wr.w_off, words),
                        (wr.s_off, qm.scales.bytes()),
                        (wr.b_off, qm.biases.bytes()),
                    ] {
                        let at = base + o as usize;
                        buf[at..at + bytes.len()].copy_from_slice(&bytes);
                    }
                }
                mats.push(m);
            }
            Experts {
                layout,
                stride,
                mats,
                buf,
                off,
                len,
            }
        }
        fn bytes(&self) -> &[u8] {
            &self.buf[self.off..self.off + self.len]
        }
        /// f64 expert MLP: (act [inter], y [hidden]).
        fn reference(&self, e: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
            let [g, u, d] = &self.mats[e];
            let (g, u, d) = (g.view(), u.view(), d.view());
            let mv = |w: &QuantMatrix<'_>, x: &[f64]| -> Vec<f64> {
                (0..w.rows)
                    .map(|r| (0..w.cols).map(|c| deq64(w, r, c) * x[c]).sum())
                    .collect()
            };
            let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let (gv, uv) = (mv(&g, &x), mv(&u, &x));
            let act: Vec<f64> = gv.iter().zip(&uv).map(|(&a, &b)| silu64(a) * b).collect();
            let y = mv(&d, &act);
            (act, y)
        }
    }

    /// Random routing: per token `k` distinct experts with positive weights.
    fn route(rng: &mut Rng, nt: usize, ne: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
        let (mut idx, mut w) = (Vec::new(), Vec::new());
        for _ in 0..nt {
            let mut ids: Vec<u32> = (0..ne as u32).collect();
            for i in 0..k {
                let j = i + rng.below(ne - i);
                ids.swap(i, j);
            }
            idx.extend_from_slice(&ids[..k]);
            w.extend((0..k).map(|_| rng.f32().abs() + 0.05));
        }
        (idx, w)
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())) + 1e-6;
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - r).abs() <= 1e-4 * scale,
                "{what}[{i}]: {g} vs {r} (scale {scale})"
            );
        }
    }

    /// Reference `out_sum` for routing `(idx, w)`.
    fn ref_sum(
        ex: &Experts,
        input: &[f32],
        idx: &[u32],
        w: &[f32],
        nt: usize,
        k: usize,
    ) -> Vec<f64> {
        let h = ex.layout.hidden_dim as usize;
        let mut out = vec![0f64; nt * h];
        for t in 0..nt {
            for j in 0..k {
                let (_, y) = ex.reference(idx[t * k + j] as usize, &input[t * h..(t + 1) * h]);
                for d in 0..h {
                    out[t * h + d] += w[t * k + j] as f64 * y[d];
                }
            }
        }
        out
    }

    struct Buckets {
        slots: Vec<u32>,
        offsets: Vec<u32>,
        token_idx: Vec<u32>,
        weights: Vec<f32>,
    }

    /// Host bucketing: ascending expert ids (one empty bucket kept), tokens ascending.
    fn buckets(
        idx: &[u32],
        w: &[f32],
        nt: usize,
        ne: usize,
        k: usize,
        slot_of: &[usize],
    ) -> Buckets {
        let mut b = Buckets {
            slots: vec![],
            offsets: vec![0],
            token_idx: vec![],
            weights: vec![],
        };
        for e in 0..ne {
            let mut any = false;
            for t in 0..nt {
                for j in 0..k {
                    if idx[t * k + j] as usize == e {
                        b.token_idx.push(t as u32);
                        b.weights.push(w[t * k + j]);
                        any = true;
                    }
                }
            }
            if any || e == 0 {
                b.slots.push(slot_of[e] as u32);
                b.offsets.push(b.token_idx.len() as u32);
            }
        }
        b
    }

    fn run_buckets(
        ex: &Experts,
        b: &Buckets,
        input: &[f32],
        nt: usize,
        out_sum: &mut [f32],
        scratch: &mut [Vec<f32>; 4],
    ) -> Result<(), Fail> {
        let [g, u, a, o] = scratch;
        moe_buckets(
            ex.bytes(),
            ex.stride,
            &ex.layout,
            &b.slots,
            &b.offsets,
            input,
            &b.token_idx,
            &b.weights,
            MoeScratch {
                gate: g,
                up: u,
                act: a,
                out: o,
            },
            out_sum,
            nt,
        )
    }

    #[test]
    fn moe_buckets_matches_f64() {
        let mut rng = Rng::new(12);
        let ne = 6;
        let slot_of = [4usize, 0, 5, 2, 1, 3];
        for (hidden, inter, bits, gs, sd) in [
            (128, 64, 4, 64, Sd::Bf16),
            (64, 96, 8, 32, Sd::F32),
            (256, 128, 4, 128, Sd::F16),
        ] {
            let ex = Experts::new(&mut rng, hidden, inter, bits, gs, sd, &slot_of, ne);
            for (nt, k) in [(1, 1), (5, 1), (4, 3), (3, ne)] {
                let input = rng.vec(nt * hidden);
                let (idx, w) = route(&mut rng, nt, ne, k);
                let b = buckets(&idx, &w, nt, ne, k, &slot_of);
                let total = nt * k;
                let mut scratch = [
                    vec![0f32; total * inter],
                    vec![0f32; total * inter],
                    vec![0f32; total * inter],
                    vec![0f32; total * hidden],
                ];
                let mut out = vec![f32::NAN; (nt + 1) * hidden + 2];
                // One more token than routed: its row has no assignments and must come out zero.
                let mut input1 = input.clone();
                input1.extend(rng.vec(hidden));
                run_buckets(&ex, &b, &input1, nt + 1, &mut out, &mut scratch).unwrap();
                close(
                    &out[..nt * hidden],
                    &ref_sum(&ex, &input, &idx, &w, nt, k),
                    &format!("out_sum {bits} {gs} nt {nt} k {k}"),
                );
                assert!(out[nt * hidden..(nt + 1) * hidden]
                    .iter()
                    .all(|&v| v == 0.0));
                assert!(out[(nt + 1) * hidden..].iter().all(|v| v.is_nan()));
                // Scratch rows follow the assignments: act and out of assignment j.
                for j in 0..total {
                    let t = b.token_idx[j] as usize;
                    let e = (0..ne).find(|&e| {
                        let bi = b.slots.iter().position(|&s| s as usize == slot_of[e]);
                        bi.is_some_and(|bi| {
                            (b.offsets[bi]..b.offsets[bi + 1]).contains(&(j as u32))
                        })
                    });
                    let (act, y) = ex.reference(e.unwrap(), &input[t * hidden..(t + 1) * hidden]);
                    close(&scratch[2][j * inter..(j + 1) * inter], &act, "bucket_act");
                    close(&scratch[3][j * hidden..(j + 1) * hidden], &y, "bucket_out");
                }
                // Same bits on one thread.
                let one = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let mut out1 = vec![f32::NAN; (nt + 1) * hidden + 2];
                one.install(|| run_buckets(&ex, &b, &input1, nt + 1, &mut out1, &mut scratch))
                    .unwrap();
                assert_eq!(out1[..(nt + 1) * hidden], out[..(nt + 1) * hidden]);
            }
        }
    }

    #[test]
    fn moe_buckets_rejects_bad_input_without_writing() {
        let mut rng = Rng::new(13);
        let (ne, nt, k, hidden, inter) = (4, 3, 2, 64, 64);
        let slot_of = [0usize, 1, 2, 3];
        let ex = Experts::new(&mut rng, hidden, inter, 4, 64, Sd::Bf16, &slot_of, ne);
        let input = rng.vec(nt * hidden);
        let (idx, w) = route(&mut rng, nt, ne, k);
        let good = buckets(&idx, &w, nt, ne, k, &slot_of);
        let cases: Vec<(&str, Box<dyn Fn(&mut Buckets)>)> = vec![
            ("expert_slots", Box::new(|b| b.slots[1] = 4)),
            ("buckets", Box::new(|b| b.offsets.swap(1, 2))),
            ("buckets", Box::new(|b| *b.offsets.last_mut().unwrap() -= 1)),
            ("buckets", Box::new(|b| b.offsets[0] = 1)),
            (
                "buckets",
                Box::new(|b| {
                    b.offsets.pop();
                }),
            ),
            ("bucket_token_idx", Box::new(|b| b.token_idx[2] = 3)),
        ];
        for (field, spoil) in cases {
            let mut b = Buckets {
                slots: good.slots.clone(),
                offsets: good.offsets.clone(),
                token_idx: good.token_idx.clone(),
                weights: good.weights.clone(),
            };
            spoil(&mut b);
            let mut scratch = [
                vec![7f32; 6 * inter],
                vec![7f32; 6 * inter],
                vec![7f32; 6 * inter],
                vec![7f32; 6 * hidden],
            ];
            let mut out = vec![7f32; nt * hidden];
            let err = run_buckets(&ex, &b, &input, nt, &mut out, &mut scratch).unwrap_err();
            assert_eq!(err.0, field, "{}", err.1);
            assert!(
                out.iter()
                    .chain(scratch.iter().flatten())
                    .all(|&v| v == 7.0),
                "{field}: wrote before failing"
            );
        }
    }

    #[allow(clippy::type_complexity)]
    fn run_gather(
        ex: &Experts,
        idx: &[u32],
        w: &[f32],
        input: &[f32],
        nt: usize,
        ne: usize,
        k: usize,
        fill: f32,
    ) -> (
        Result<(), Fail>,
        Vec<f32>,
        Vec<u32>,
        Vec<u32>,
        [Vec<f32>; 3],
    ) {
        let (h, i) = (ex.layout.hidden_dim as usize, ex.layout.inter_dim as usize);
        let mut out = vec![fill; nt * h];
        let (mut htpe, mut hids) = (vec![99u32; ne], vec![99u32; nt * k]);
        let mut mids = [
            vec![fill; nt * k * i],
            vec![fill; nt * k * i],
            vec![fill; nt * k * h],
        ];
        let [g, u, d] = &mut mids;
        let r = moe_gather_id(
            ex.bytes(),
            ex.stride,
            &ex.layout,
            idx,
            w,
            input,
            &mut out,
            &mut htpe,
            &mut hids,
            g,
            u,
            d,
            nt,
            ne,
            k,
        );
        (r, out, htpe, hids, mids)
    }

    #[test]
    fn moe_gather_id_matches_f64() {
        let mut rng = Rng::new(14);
        let ne = 5;
        let slot_of: Vec<usize> = (0..ne).collect();
        for (hidden, inter, bits, gs, sd) in [(128, 64, 4, 64, Sd::Bf16), (96, 64, 8, 32, Sd::F32)]
        {
            let ex = Experts::new(&mut rng, hidden, inter, bits, gs, sd, &slot_of, ne);
            for (nt, k) in [(1, 1), (6, 1), (4, 2), (3, ne)] {
                let input = rng.vec(nt * hidden);
                let (idx, w) = route(&mut rng, nt, ne, k);
                let (r, out, htpe, hids, mids) =
                    run_gather(&ex, &idx, &w, &input, nt, ne, k, f32::NAN);
                r.unwrap();
                close(
                    &out,
                    &ref_sum(&ex, &input, &idx, &w, nt, k),
                    &format!("out_sum {bits} nt {nt} k {k}"),
                );
                for e in 0..ne {
                    assert_eq!(
                        htpe[e] as usize,
                        idx.iter().filter(|&&x| x as usize == e).count()
                    );
                }
                // hids: a permutation, sorted by expert, stable within an expert.
                let mut seen = vec![false; nt * k];
                for (r, pair) in hids.windows(2).enumerate() {
                    let (a, b) = (pair[0] as usize, pair[1] as usize);
                    assert!(
                        idx[a] < idx[b] || (idx[a] == idx[b] && a < b),
                        "hids[{r}..]"
                    );
                }
                for (r, &a) in hids.iter().enumerate() {
                    let a = a as usize;
                    assert!(!seen[a]);
                    seen[a] = true;
                    let (act, y) = ex.reference(
                        idx[a] as usize,
                        &input[(a / k) * hidden..(a / k + 1) * hidden],
                    );
                    close(
                        &mids[0][r * inter..(r + 1) * inter],
                        &act,
                        "gate_mid (activation)",
                    );
                    close(&mids[2][r * hidden..(r + 1) * hidden], &y, "down_mid");
                }
                let one = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let (_, out1, ..) =
                    one.install(|| run_gather(&ex, &idx, &w, &input, nt, ne, k, 0.0));
                assert_eq!(out1, out);
            }
        }
    }

    #[test]
    fn moe_gather_id_rejects_bad_index_without_writing() {
        let mut rng = Rng::new(15);
        let (nt, k, hidden, inter) = (3, 2, 64, 64);
        // Five experts in the buffer.
        let ex = Experts::new(
            &mut rng,
            hidden,
            inter,
            4,
            64,
            Sd::Bf16,
            &[0, 1, 2, 3, 4],
            5,
        );
        let input = rng.vec(nt * hidden);
        let (mut idx, w) = route(&mut rng, nt, 5, k);
        idx[3] = 6;
        let (r, out, htpe, hids, mids) = run_gather(&ex, &idx, &w, &input, nt, 6, k, 7.0);
        let e = r.unwrap_err();
        assert_eq!(e.0, "indices", "{}", e.1);
        let untouched = |out: &[f32], htpe: &[u32], hids: &[u32], mids: &[Vec<f32>; 3]| {
            out.iter().chain(mids.iter().flatten()).all(|&v| v == 7.0)
                && htpe.iter().chain(hids).all(|&v| v == 99)
        };
        assert!(untouched(&out, &htpe, &hids, &mids));
        // In range of n_experts = 6, but expert 5's block is past the end of the buffer.
        idx[3] = 5;
        let (r, out, htpe, hids, mids) = run_gather(&ex, &idx, &w, &input, nt, 6, k, 7.0);
        let e = r.unwrap_err();
        assert_eq!(e.0, "expert_base", "{}", e.1);
        assert!(untouched(&out, &htpe, &hids, &mids));
    }

    /// Decode-shaped MoE (a3b: hidden 2048, inter 512, 4-bit g64 bf16, top-8) on both cores. Run
    /// with `cargo test --release --no-default-features --lib moe::tests::bandwidth -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bandwidth() {
        let (ne, k, hidden, inter) = (64usize, 8usize, 2048usize, 512usize);
        let layout = ExpertLayout {
            hidden_dim: hidden as u32,
            inter_dim: inter as u32,
            bits: 4,
            group_size: 64,
            scale_dtype: WDtype::Bf16,
        };
        let offs = layout.offsets();
        let stride = offs.block_bytes as usize;
        let mut rng = Rng::new(16);
        let mut words: Vec<u32> = (0..ne * stride / 4)
            .map(|_| rng.next_u64() as u32)
            .collect();
        // Valid small bf16 scales and biases.
        for e in 0..ne {
            for (wr, rows, cols) in [
                (offs.gate, inter, hidden),
                (offs.up, inter, hidden),
                (offs.down, hidden, inter),
            ] {
                let n = wr.scale_bytes(rows as u64, cols as u64) as usize;
                for at in [wr.s_off, wr.b_off] {
                    let start = (e * stride + at as usize) / 4;
                    for w in &mut words[start..start + n / 4] {
                        let (a, b) = (
                            half::bf16::from_f32(rng.f32() * 0.01),
                            half::bf16::from_f32(rng.f32() * 0.01),
                        );
                        *w = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
                    }
                }
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut buf = vec![0u8; bytes.len() + 8];
        let a = buf.as_ptr().align_offset(8);
        buf[a..a + bytes.len()].copy_from_slice(&bytes);
        let experts = &buf[a..a + bytes.len()];
        for nt in [1usize, 4] {
            let input = rng.vec(nt * hidden);
            let mut idx = Vec::new();
            for t in 0..nt {
                idx.extend((0..k).map(|j| ((t * 13 + j * 7) % ne) as u32));
            }
            let w = vec![0.125f32; nt * k];
            let total = nt * k;
            let mut out = vec![0f32; nt * hidden];
            let (mut htpe, mut hids) = (vec![0u32; ne], vec![0u32; total]);
            let (mut g, mut u, mut d) = (
                vec![0f32; total * inter],
                vec![0f32; total * inter],
                vec![0f32; total * hidden],
            );
            let mut run = || {
                moe_gather_id(
                    experts, stride, &layout, &idx, &w, &input, &mut out, &mut htpe, &mut hids,
                    &mut g, &mut u, &mut d, nt, ne, k,
                )
                .unwrap()
            };
            run();
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                run();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let mut used: Vec<u32> = idx.clone();
            used.sort();
            used.dedup();
            let moved = (used.len() * stride) as f64;
            println!("moe_gather_id n_tokens {nt} k {k}: {:.3} ms, {} experts, {:.1} GB/s of expert weights", best * 1e3, used.len(), moved / best / 1e9);
        }
    }
}
