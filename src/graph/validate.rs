//! Graph validation before any kernel runs: ids exist and have an accepted role, every byte range
//! an op touches fits its buffer for the declared dims, weight ranges fall inside the weight file,
//! dims are consistent, and no two aliased buffers are live at once. Errors name the op label,
//! the field and the numbers.

use super::op::{ExpertLayout, FieldValue, Op, WDtype, WeightRef};
use super::{describe_accepts, Graph};
use crate::backend::PoolInfo;
use crate::error::{Error, Result};

/// Validate every op of `graph` against `pool` and a weight file of `weights_len` bytes (if open).
pub fn validate(
    graph: &Graph,
    pool: &(impl PoolInfo + ?Sized),
    weights_len: Option<u64>,
) -> Result<()> {
    for op in &graph.ops {
        validate_op(op, pool, weights_len)?;
    }
    crate::plan::lifetime::check_layout(graph, pool).map_err(Error::UnsafeAlias)
}

/// `"label (OpName)"`, the op identity used in every error.
pub fn op_ident(op: &Op) -> String {
    format!("{} ({})", op.label(), op.name())
}

const F32: u64 = 4;

struct Checker<'a, P: PoolInfo + ?Sized> {
    op: &'a Op,
    ident: String,
    pool: &'a P,
    weights_len: Option<u64>,
}

impl<P: PoolInfo + ?Sized> Checker<'_, P> {
    fn dims(&self, ok: bool, field: &'static str, msg: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::dims(&self.ident, field, msg()))
        }
    }

    fn nonzero(&self, field: &'static str, v: u32) -> Result<()> {
        self.dims(v > 0, field, || "must be at least 1, got 0".to_string())
    }

    /// The buffer in `field` must hold at least `elems * elem_bytes` bytes after `offset`.
    fn fits(
        &self,
        field: &'static str,
        raw: u32,
        offset: u64,
        elems: u128,
        elem_bytes: u64,
    ) -> Result<()> {
        let needed = offset as u128 + elems * elem_bytes as u128;
        let have = self.pool.byte_size(raw).unwrap_or(0) as u64;
        if needed > have as u128 {
            return Err(Error::OutOfBounds {
                op: self.ident.clone(),
                field,
                buf_label: self.pool.label_of(raw).unwrap_or("?").to_string(),
                needed: u64::try_from(needed).unwrap_or(u64::MAX),
                have,
            });
        }
        Ok(())
    }

    /// `len` bytes at `off` must lie inside the weight file and be `align`-aligned.
    fn weight_range(&self, field: &'static str, off: u64, len: u128, align: u64) -> Result<()> {
        let Some(wlen) = self.weights_len else {
            return Err(Error::NoWeights {
                op: self.ident.clone(),
                field,
            });
        };
        self.dims(off % align == 0, field, || {
            format!("offset {off} is not a multiple of {align}")
        })?;
        let end = off as u128 + len;
        if end > wlen as u128 {
            return Err(Error::OutOfBounds {
                op: self.ident.clone(),
                field,
                buf_label: "<weight file>".to_string(),
                needed: u64::try_from(end).unwrap_or(u64::MAX),
                have: wlen,
            });
        }
        Ok(())
    }

    fn float_vec(&self, field: &'static str, off: u64, n: u32, dtype: WDtype) -> Result<()> {
        self.weight_range(field, off, n as u128 * dtype.size() as u128, dtype.size())
    }

    fn quant_format(&self, field: &'static str, bits: u32, group_size: u32) -> Result<()> {
        self.dims(bits == 4 || bits == 8, field, || {
            format!("bits must be 4 or 8, got {bits}")
        })?;
        self.dims(matches!(group_size, 32 | 64 | 128), field, || {
            format!("group_size must be 32, 64 or 128, got {group_size}")
        })
    }

    /// A quantized `[rows, cols]` matrix in the weight file.
    fn weight_ref(&self, field: &'static str, w: &WeightRef, rows: u32, cols: u32) -> Result<()> {
        self.quant_format(field, w.bits, w.group_size)?;
        self.dims(cols % w.group_size == 0, field, || {
            format!(
                "in_dim {cols} is not a multiple of group_size {}",
                w.group_size
            )
        })?;
        let (r, c) = (rows as u64, cols as u64);
        self.weight_range(field, w.w_off, w.packed_bytes(r, c) as u128, 4)?;
        let sb = w.scale_bytes(r, c) as u128;
        self.weight_range(field, w.s_off, sb, w.scale_dtype.size())?;
        self.weight_range(field, w.b_off, sb, w.scale_dtype.size())
    }

    /// An expert layout and the expert buffer holding `n_blocks`-worth of slots up to `max_slot`.
    fn experts(
        &self,
        layout: &ExpertLayout,
        stride: u64,
        base: u32,
        max_slot: Option<u64>,
    ) -> Result<()> {
        self.quant_format("layout", layout.bits, layout.group_size)?;
        self.nonzero("layout", layout.hidden_dim)?;
        self.nonzero("layout", layout.inter_dim)?;
        for (what, d) in [
            ("hidden_dim", layout.hidden_dim),
            ("inter_dim", layout.inter_dim),
        ] {
            self.dims(d % layout.group_size == 0, "layout", || {
                format!(
                    "{what} {d} is not a multiple of group_size {}",
                    layout.group_size
                )
            })?;
        }
        let o = layout.offsets();
        let ss = layout.scale_dtype.size();
        for part in [o.gate, o.up, o.down] {
            self.dims(
                part.w_off % 4 == 0 && part.s_off % ss == 0 && part.b_off % ss == 0,
                "layout",
                || {
                    format!(
                        "expert block parts are misaligned (offsets {}, {}, {})",
                        part.w_off, part.s_off, part.b_off
                    )
                },
            )?;
        }
        self.dims(stride >= o.block_bytes, "expert_stride", || {
            format!(
                "stride {stride} is smaller than the expert block ({} bytes)",
                o.block_bytes
            )
        })?;
        self.dims(stride % 4 == 0, "expert_stride", || {
            format!("stride {stride} is not a multiple of 4")
        })?;
        if let Some(max_slot) = max_slot {
            let needed = max_slot as u128 * stride as u128 + o.block_bytes as u128;
            let have = self.pool.byte_size(base).unwrap_or(0) as u128;
            if needed > have {
                return Err(Error::OutOfBounds {
                    op: self.ident.clone(),
                    field: "expert_base",
                    buf_label: self.pool.label_of(base).unwrap_or("?").to_string(),
                    needed: u64::try_from(needed).unwrap_or(u64::MAX),
                    have: have as u64,
                });
            }
        }
        Ok(())
    }
}

/// Validate one op (ids, roles, writability, sizes, weight ranges, dims).
pub fn validate_op(
    op: &Op,
    pool: &(impl PoolInfo + ?Sized),
    weights_len: Option<u64>,
) -> Result<()> {
    let c = Checker {
        op,
        ident: op_ident(op),
        pool,
        weights_len,
    };
    check_buffers(&c)?;
    check_dims(&c)
}

fn check_buffers<P: PoolInfo + ?Sized>(c: &Checker<'_, P>) -> Result<()> {
    let mut err = None;
    let mut written: Vec<(&'static str, u32)> = Vec::new();
    c.op.visit_fields(|field, v| {
        if err.is_some() {
            return;
        }
        let FieldValue::Buf {
            raw,
            accepts,
            access,
            ..
        } = v
        else {
            return;
        };
        let Some(role) = c.pool.role(raw) else {
            err = Some(Error::BadBufId {
                op: c.ident.clone(),
                field,
                id: raw,
                count: c.pool.count(),
            });
            return;
        };
        if !accepts.contains(&role) {
            err = Some(Error::Role {
                op: c.ident.clone(),
                field,
                expected: describe_accepts(accepts),
                actual: role.name().to_string(),
                id: raw,
            });
            return;
        }
        if access.writes() {
            if c.pool.writable(raw) == Some(false) {
                err = Some(Error::ReadOnly {
                    label: c.pool.label_of(raw).unwrap_or("?").to_string(),
                    what: format!("[{}] field `{field}` writes it", c.ident),
                });
                return;
            }
            let phys = c.pool.physical_of(raw);
            if let Some((other, _)) = written.iter().find(|(_, r)| c.pool.physical_of(*r) == phys) {
                err = Some(Error::dims(
                    &c.ident,
                    field,
                    format!("writes the same memory as field `{other}` (buffer {raw})"),
                ));
                return;
            }
            written.push((field, raw));
        }
    });
    err.map_or(Ok(()), Err)
}

fn check_dims<P: PoolInfo + ?Sized>(c: &Checker<'_, P>) -> Result<()> {
    let t = |n: u32| n as u128;
    match c.op {
        Op::RmsNormBf16NTokens {
            x,
            weight_off,
            out,
            dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            c.nonzero("dim", *dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.dims(eps.is_finite() && *eps >= 0.0, "eps", || {
                format!("must be finite and >= 0, got {eps}")
            })?;
            c.fits("x", x.raw(), 0, t(*n_tokens) * t(*dim), F32)?;
            c.fits("out", out.raw(), 0, t(*n_tokens) * t(*dim), F32)?;
            c.float_vec("weight_off", *weight_off, *dim, *weight_dtype)
        }
        Op::RmsNormQkNTokens {
            x,
            num_k_heads,
            key_dim,
            key_offset_per_token,
            per_token_total,
            n_tokens,
            ..
        } => {
            c.nonzero("num_k_heads", *num_k_heads)?;
            c.nonzero("key_dim", *key_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            let region = t(*num_k_heads) * t(*key_dim);
            c.dims(
                region <= t(*key_offset_per_token),
                "key_offset_per_token",
                || format!("{key_offset_per_token} overlaps the q region of {region} floats"),
            )?;
            c.dims(t(*key_offset_per_token) + region <= t(*per_token_total), "per_token_total", || {
                format!("{per_token_total} is less than key_offset_per_token {key_offset_per_token} + {region}")
            })?;
            c.fits("x", x.raw(), 0, t(*n_tokens) * t(*per_token_total), F32)
        }
        Op::RmsNormPerHeadNTokens {
            x,
            weight_off,
            num_heads,
            head_dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            c.nonzero("num_heads", *num_heads)?;
            c.nonzero("head_dim", *head_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.dims(eps.is_finite() && *eps >= 0.0, "eps", || {
                format!("must be finite and >= 0, got {eps}")
            })?;
            c.fits(
                "x",
                x.raw(),
                0,
                t(*n_tokens) * t(*num_heads) * t(*head_dim),
                F32,
            )?;
            c.float_vec("weight_off", *weight_off, *head_dim, *weight_dtype)
        }
        Op::RopeNTokens {
            x,
            inv_freq,
            n_tokens,
            num_heads,
            head_dim,
            rotary_dim,
            start_pos,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("num_heads", *num_heads)?;
            c.dims(*rotary_dim > 0 && rotary_dim % 2 == 0, "rotary_dim", || {
                format!("must be even and positive, got {rotary_dim}")
            })?;
            c.dims(rotary_dim <= head_dim, "rotary_dim", || {
                format!("{rotary_dim} exceeds head_dim {head_dim}")
            })?;
            c.dims(
                start_pos.checked_add(*n_tokens).is_some(),
                "start_pos",
                || format!("start_pos {start_pos} + n_tokens {n_tokens} overflows"),
            )?;
            c.fits("inv_freq", inv_freq.raw(), 0, t(*rotary_dim / 2), F32)?;
            c.fits(
                "x",
                x.raw(),
                0,
                t(*n_tokens) * t(*num_heads) * t(*head_dim),
                F32,
            )
        }
        Op::SplitQGate {
            q_proj,
            q_out,
            gate_out,
            num_heads,
            head_dim,
            n_tokens,
            ..
        } => {
            c.nonzero("num_heads", *num_heads)?;
            c.nonzero("head_dim", *head_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            let n = t(*n_tokens) * t(*num_heads) * t(*head_dim);
            c.fits("q_proj", q_proj.raw(), 0, 2 * n, F32)?;
            c.fits("q_out", q_out.raw(), 0, n, F32)?;
            c.fits("gate_out", gate_out.raw(), 0, n, F32)
        }
        Op::ResidualAddNTokens {
            a,
            b,
            out,
            n_tokens,
            dim,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("dim", *dim)?;
            let n = t(*n_tokens) * t(*dim);
            c.fits("a", a.raw(), 0, n, F32)?;
            c.fits("b", b.raw(), 0, n, F32)?;
            c.fits("out", out.raw(), 0, n, F32)
        }
        Op::ZeroBuffer { buf, n_bytes, .. } => c.fits("buf", buf.raw(), 0, *n_bytes as u128, 1),
        Op::MatvecNTokens {
            weight,
            input,
            input_off,
            output,
            output_off,
            in_dim,
            out_dim,
            n_tokens,
            ..
        } => {
            c.nonzero("in_dim", *in_dim)?;
            c.nonzero("out_dim", *out_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.dims(input_off % 4 == 0, "input_off", || {
                format!("{input_off} is not a multiple of 4")
            })?;
            c.dims(output_off % 4 == 0, "output_off", || {
                format!("{output_off} is not a multiple of 4")
            })?;
            c.dims(in_dim % weight.group_size.max(1) == 0, "in_dim", || {
                format!(
                    "{in_dim} is not a multiple of group_size {}",
                    weight.group_size
                )
            })?;
            c.fits(
                "input",
                input.raw(),
                *input_off,
                t(*n_tokens) * t(*in_dim),
                F32,
            )?;
            c.fits(
                "output",
                output.raw(),
                *output_off,
                t(*n_tokens) * t(*out_dim),
                F32,
            )?;
            c.weight_ref("weight", weight, *out_dim, *in_dim)
        }
        Op::SwigluFusedBatched {
            gate,
            up,
            out,
            total,
            ..
        } => {
            c.nonzero("total", *total)?;
            c.fits("gate", gate.raw(), 0, t(*total), F32)?;
            c.fits("up", up.raw(), 0, t(*total), F32)?;
            c.fits("out", out.raw(), 0, t(*total), F32)
        }
        Op::SdpaCausalTiled {
            q,
            k,
            v,
            attn_out,
            n_tokens,
            num_heads,
            heads_per_kv,
            head_dim,
            kv_dim,
            kv_start,
            kv_len_total,
            softmax_scale,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("num_heads", *num_heads)?;
            c.nonzero("heads_per_kv", *heads_per_kv)?;
            c.nonzero("head_dim", *head_dim)?;
            c.dims(num_heads % heads_per_kv == 0, "heads_per_kv", || {
                format!("num_heads {num_heads} is not a multiple of heads_per_kv {heads_per_kv}")
            })?;
            let kv_heads = num_heads / heads_per_kv;
            c.dims(t(*kv_dim) == t(kv_heads) * t(*head_dim), "kv_dim", || {
                format!("{kv_dim} != kv heads {kv_heads} * head_dim {head_dim}")
            })?;
            c.dims(
                t(*kv_start) + t(*n_tokens) <= t(*kv_len_total),
                "kv_len_total",
                || format!("{kv_len_total} < kv_start {kv_start} + n_tokens {n_tokens}"),
            )?;
            c.dims(softmax_scale.is_finite(), "softmax_scale", || {
                format!("must be finite, got {softmax_scale}")
            })?;
            let n = t(*n_tokens) * t(*num_heads) * t(*head_dim);
            c.fits("q", q.raw(), 0, n, F32)?;
            c.fits("attn_out", attn_out.raw(), 0, n, F32)?;
            c.fits("k", k.raw(), 0, t(*kv_len_total) * t(*kv_dim), F32)?;
            c.fits("v", v.raw(), 0, t(*kv_len_total) * t(*kv_dim), F32)
        }
        Op::SigmoidGateNTokens {
            x,
            gate,
            dim,
            n_tokens,
            ..
        } => {
            c.nonzero("dim", *dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.fits("x", x.raw(), 0, t(*n_tokens) * t(*dim), F32)?;
            c.fits("gate", gate.raw(), 0, t(*n_tokens) * t(*dim), F32)
        }
        Op::KvCacheAppendNTokens {
            k_src,
            v_src,
            k_cache,
            v_cache,
            kv_dim,
            n_tokens,
            kv_start,
            ..
        } => {
            c.nonzero("kv_dim", *kv_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            let n = t(*n_tokens) * t(*kv_dim);
            c.fits("k_src", k_src.raw(), 0, n, F32)?;
            c.fits("v_src", v_src.raw(), 0, n, F32)?;
            let rows = t(*kv_start) + t(*n_tokens);
            c.fits("k_cache", k_cache.raw(), 0, rows * t(*kv_dim), F32)?;
            c.fits("v_cache", v_cache.raw(), 0, rows * t(*kv_dim), F32)
        }
        Op::MoeSoftmaxTopK {
            logits,
            indices_out,
            weights_out,
            n_tokens,
            n_experts,
            k,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("n_experts", *n_experts)?;
            c.dims(*k >= 1 && k <= n_experts, "k", || {
                format!("must be in 1..={n_experts}, got {k}")
            })?;
            c.fits("logits", logits.raw(), 0, t(*n_tokens) * t(*n_experts), F32)?;
            c.fits("indices_out", indices_out.raw(), 0, t(*n_tokens) * t(*k), 4)?;
            c.fits(
                "weights_out",
                weights_out.raw(),
                0,
                t(*n_tokens) * t(*k),
                F32,
            )
        }
        Op::MoeNormalizeWeights {
            weights,
            n_tokens,
            k,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("k", *k)?;
            c.fits("weights", weights.raw(), 0, t(*n_tokens) * t(*k), F32)
        }
        Op::MoeBatchedPermuteFuse {
            expert_base,
            expert_stride,
            layout,
            expert_indices,
            expert_slots,
            bucket_input,
            bucket_gate,
            bucket_up,
            bucket_act,
            bucket_out,
            bucket_token_idx,
            bucket_weights,
            out_sum,
            n_tokens,
            buckets,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            let max_slot = expert_slots.iter().copied().max().map(u64::from);
            c.experts(layout, *expert_stride, expert_base.raw(), max_slot)?;
            let nb = expert_slots.len();
            c.dims(buckets.len() == nb + 1, "buckets", || {
                format!(
                    "needs n_buckets + 1 = {} CSR offsets, got {}",
                    nb + 1,
                    buckets.len()
                )
            })?;
            c.dims(buckets.first() == Some(&0), "buckets", || {
                "offsets must start at 0".to_string()
            })?;
            if let Some(i) = buckets.windows(2).position(|w| w[0] > w[1]) {
                return Err(Error::dims(
                    &c.ident,
                    "buckets",
                    format!(
                        "offsets decrease at {i}: {} > {}",
                        buckets[i],
                        buckets[i + 1]
                    ),
                ));
            }
            let total = t(*buckets.last().unwrap_or(&0));
            let (h, i) = (t(layout.hidden_dim), t(layout.inter_dim));
            c.fits("expert_indices", expert_indices.raw(), 0, nb as u128, 4)?;
            c.fits("bucket_input", bucket_input.raw(), 0, t(*n_tokens) * h, F32)?;
            c.fits("bucket_gate", bucket_gate.raw(), 0, total * i, F32)?;
            c.fits("bucket_up", bucket_up.raw(), 0, total * i, F32)?;
            c.fits("bucket_act", bucket_act.raw(), 0, total * i, F32)?;
            c.fits("bucket_out", bucket_out.raw(), 0, total * h, F32)?;
            c.fits("bucket_token_idx", bucket_token_idx.raw(), 0, total, 4)?;
            c.fits("bucket_weights", bucket_weights.raw(), 0, total, F32)?;
            c.fits("out_sum", out_sum.raw(), 0, t(*n_tokens) * h, F32)
        }
        Op::MoeGatherIdFuse {
            expert_base,
            expert_stride,
            layout,
            indices,
            weights,
            mlp_in,
            out_sum,
            htpe,
            hids,
            gate_mid,
            up_mid,
            down_mid,
            n_tokens,
            n_experts,
            k,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("n_experts", *n_experts)?;
            c.dims(*k >= 1 && k <= n_experts, "k", || {
                format!("must be in 1..={n_experts}, got {k}")
            })?;
            c.experts(
                layout,
                *expert_stride,
                expert_base.raw(),
                Some(*n_experts as u64 - 1),
            )?;
            let (h, i) = (t(layout.hidden_dim), t(layout.inter_dim));
            let nk = t(*n_tokens) * t(*k);
            c.fits("indices", indices.raw(), 0, nk, 4)?;
            c.fits("weights", weights.raw(), 0, nk, F32)?;
            c.fits("mlp_in", mlp_in.raw(), 0, t(*n_tokens) * h, F32)?;
            c.fits("out_sum", out_sum.raw(), 0, t(*n_tokens) * h, F32)?;
            c.fits("htpe", htpe.raw(), 0, t(*n_experts), 4)?;
            c.fits("hids", hids.raw(), 0, nk, 4)?;
            c.fits("gate_mid", gate_mid.raw(), 0, nk * i, F32)?;
            c.fits("up_mid", up_mid.raw(), 0, nk * i, F32)?;
            c.fits("down_mid", down_mid.raw(), 0, nk * h, F32)
        }
        Op::MoeCombineResidualNTokens {
            h_mid,
            moe_sum,
            shared_out,
            shared_gate,
            hidden_out,
            n_tokens,
            dim,
            ..
        } => {
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("dim", *dim)?;
            let n = t(*n_tokens) * t(*dim);
            c.fits("h_mid", h_mid.raw(), 0, n, F32)?;
            c.fits("moe_sum", moe_sum.raw(), 0, n, F32)?;
            c.fits("shared_out", shared_out.raw(), 0, n, F32)?;
            c.fits("shared_gate", shared_gate.raw(), 0, t(*n_tokens), F32)?;
            c.fits("hidden_out", hidden_out.raw(), 0, n, F32)
        }
        Op::Conv1dStepNTokens {
            qkv_in,
            conv_state,
            weight_off,
            conv_out,
            conv_dim,
            n_tokens,
            weight_dtype,
            ..
        } => {
            c.nonzero("conv_dim", *conv_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            let n = t(*n_tokens) * t(*conv_dim);
            c.fits("qkv_in", qkv_in.raw(), 0, n, F32)?;
            c.fits("conv_out", conv_out.raw(), 0, n, F32)?;
            c.fits("conv_state", conv_state.raw(), 0, 3 * t(*conv_dim), F32)?;
            c.weight_range(
                "weight_off",
                *weight_off,
                t(*conv_dim) * 4 * weight_dtype.size() as u128,
                weight_dtype.size(),
            )
        }
        Op::ComputeDecayBetaNTokens {
            alpha_in,
            beta_in,
            a_log_off,
            dt_bias_off,
            g_decay_out,
            beta_gate_out,
            num_v_heads,
            n_tokens,
            weight_dtype,
            ..
        } => {
            c.nonzero("num_v_heads", *num_v_heads)?;
            c.nonzero("n_tokens", *n_tokens)?;
            let n = t(*n_tokens) * t(*num_v_heads);
            c.fits("alpha_in", alpha_in.raw(), 0, n, F32)?;
            c.fits("beta_in", beta_in.raw(), 0, n, F32)?;
            c.fits("g_decay_out", g_decay_out.raw(), 0, n, F32)?;
            c.fits("beta_gate_out", beta_gate_out.raw(), 0, n, F32)?;
            c.float_vec("a_log_off", *a_log_off, *num_v_heads, *weight_dtype)?;
            c.float_vec("dt_bias_off", *dt_bias_off, *num_v_heads, *weight_dtype)
        }
        Op::GatedDeltaNetStepNTokens {
            state,
            conv_out,
            g_decay,
            beta_gate,
            output,
            num_v_heads,
            value_dim,
            k_heads_per_v,
            key_dim,
            n_tokens,
            ..
        }
        | Op::GatedDeltaNetChunkwise {
            state,
            conv_out,
            g_decay,
            beta_gate,
            output,
            num_v_heads,
            value_dim,
            k_heads_per_v,
            key_dim,
            n_tokens,
            ..
        } => {
            if let Op::GatedDeltaNetChunkwise { chunk_size, .. } = c.op {
                c.dims((1..=1024).contains(chunk_size), "chunk_size", || {
                    format!("must be in 1..=1024, got {chunk_size}")
                })?;
            }
            c.nonzero("num_v_heads", *num_v_heads)?;
            c.nonzero("value_dim", *value_dim)?;
            c.nonzero("key_dim", *key_dim)?;
            c.nonzero("k_heads_per_v", *k_heads_per_v)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.dims(num_v_heads % k_heads_per_v == 0, "k_heads_per_v", || {
                format!(
                    "num_v_heads {num_v_heads} is not a multiple of k_heads_per_v {k_heads_per_v}"
                )
            })?;
            let nk = t(num_v_heads / k_heads_per_v);
            let (nv, dk, dv) = (t(*num_v_heads), t(*key_dim), t(*value_dim));
            c.fits(
                "conv_out",
                conv_out.raw(),
                0,
                t(*n_tokens) * (2 * nk * dk + nv * dv),
                F32,
            )?;
            c.fits("g_decay", g_decay.raw(), 0, t(*n_tokens) * nv, F32)?;
            c.fits("beta_gate", beta_gate.raw(), 0, t(*n_tokens) * nv, F32)?;
            c.fits("output", output.raw(), 0, t(*n_tokens) * nv * dv, F32)?;
            c.fits("state", state.raw(), 0, nv * dk * dv, F32)
        }
        Op::GatedRmsNormNTokens {
            values,
            z,
            weight_off,
            output,
            num_v_heads,
            value_dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            c.nonzero("num_v_heads", *num_v_heads)?;
            c.nonzero("value_dim", *value_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.dims(eps.is_finite() && *eps >= 0.0, "eps", || {
                format!("must be finite and >= 0, got {eps}")
            })?;
            let n = t(*n_tokens) * t(*num_v_heads) * t(*value_dim);
            c.fits("values", values.raw(), 0, n, F32)?;
            c.fits("z", z.raw(), 0, n, F32)?;
            c.fits("output", output.raw(), 0, n, F32)?;
            c.float_vec("weight_off", *weight_off, *value_dim, *weight_dtype)
        }
        Op::EmbedGatherNTokens {
            token_ids,
            weight,
            hidden_out,
            hidden_dim,
            n_tokens,
            vocab,
            ..
        } => {
            c.nonzero("hidden_dim", *hidden_dim)?;
            c.nonzero("n_tokens", *n_tokens)?;
            c.nonzero("vocab", *vocab)?;
            c.fits("token_ids", token_ids.raw(), 0, t(*n_tokens), 4)?;
            c.fits(
                "hidden_out",
                hidden_out.raw(),
                0,
                t(*n_tokens) * t(*hidden_dim),
                F32,
            )?;
            c.weight_ref("weight", weight, *vocab, *hidden_dim)
        }
    }
}
