//! The encode arm of every op, written once over [`ComputeEncoder`]: which kernel runs, which
//! buffer goes to which index at which offset, the parameter struct, and the grid. Real Metal
//! (metal-rs) and the Linux emulator run these same arms.
//!
//! Conventions shared with the shaders: the parameter struct is at `[[buffer(0)]]`, buffers
//! follow from index 1; quantized weights are bound three times (words, scales, biases).
//! Kernels never read outside the ranges validation checked, and skip routed rows whose ids are
//! out of range (a device cannot report them; the emulated backend checks them on the host).

use super::kernels::{quant, typed};
use super::params::*;
use crate::backend::encoder::ComputeEncoder;
use crate::error::{Error, Result};
use crate::graph::{ExpertLayout, Op, WeightRef};

/// Alternative kernels chosen by environment switches (the earlier engine's escape hatches).
/// A switch is on unless its variable is `0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switches {
    /// `MOEFLUX_MATVEC_M1_V3`: the dedicated matvec at one token (`MatvecNTokens`, single-row
    /// buckets, and the expert products of both MoE ops at one token); off forces the tiled
    /// GEMM there too.
    pub matvec_m1: bool,
    /// `MOEFLUX_SDPA_GQA`: attention folds two query heads of one kv head into a threadgroup
    /// (sharing each K/V load) when `heads_per_kv` is even; off: one head per threadgroup. Applies
    /// to both the decode and the tiled prefill kernel.
    pub sdpa_gqa: bool,
    /// `MOEFLUX_MOE_GATHER`: `MoeBatchedPermuteFuse` runs one grouped GEMM over all buckets;
    /// off: one matvec/GEMM per bucket.
    pub moe_gather: bool,
    /// `MOEFLUX_DELTA_NET_VB`: `GatedDeltaNetChunkwise` runs the sequential register-resident
    /// kernel (measured faster on Apple GPUs by the earlier engine); off: the chunkwise kernel.
    pub delta_net_vb: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            matvec_m1: true,
            sdpa_gqa: true,
            moe_gather: true,
            delta_net_vb: true,
        }
    }
}

impl Switches {
    /// The switches as set in the environment.
    pub fn from_env() -> Self {
        let on = |name: &str| std::env::var(name).map_or(true, |v| v.trim() != "0");
        Switches {
            matvec_m1: on("MOEFLUX_MATVEC_M1_V3"),
            sdpa_gqa: on("MOEFLUX_SDPA_GQA"),
            moe_gather: on("MOEFLUX_MOE_GATHER"),
            delta_net_vb: on("MOEFLUX_DELTA_NET_VB"),
        }
    }
}

/// How a backend binds its memory to an encoder: pool buffers by raw id and the weight file.
pub trait Bindings<E: ComputeEncoder> {
    /// Bind pool buffer `raw` to `[[buffer(index)]]`, `offset` bytes into it.
    fn buffer(&self, enc: &mut E, index: u32, raw: u32, offset: u64) -> Result<()>;
    /// Bind the weight file to `[[buffer(index)]]`, `offset` bytes into it.
    fn weights(&self, enc: &mut E, index: u32, offset: u64) -> Result<()>;
    /// Byte size of pool buffer `raw`.
    fn size(&self, raw: u32) -> Option<usize>;
}

/// Where a quantized matrix lives: the weight file or a pool buffer (an expert block).
#[derive(Clone, Copy, Debug)]
enum Src {
    File,
    Pool(u32),
}

fn bind_src<E: ComputeEncoder, B: Bindings<E>>(
    b: &B,
    enc: &mut E,
    index: u32,
    src: Src,
    off: u64,
) -> Result<()> {
    match src {
        Src::File => b.weights(enc, index, off),
        Src::Pool(raw) => b.buffer(enc, index, raw, off),
    }
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "metal".into(),
        msg: msg.into(),
    }
}

/// `a * b` as a dispatch size, or an error if one dispatch cannot cover it.
fn mul(a: u32, b: u32) -> Result<u32> {
    a.checked_mul(b)
        .ok_or_else(|| unsupported(format!("{a} x {b} elements exceed one dispatch (2^32)")))
}

/// Threads of a row-per-threadgroup kernel: whole simdgroups, at most 256.
fn row_threads(n: u32) -> u32 {
    n.next_multiple_of(32).clamp(32, 256)
}

/// One thread per element over `n` elements, 256 per group.
fn dispatch_1d<E: ComputeEncoder>(enc: &mut E, n: u32) -> Result<()> {
    enc.dispatch_threadgroups([n.div_ceil(256), 1, 1], [256, 1, 1])
}

const NO_BUCKETS: [u32; 4] = [0; 4];

/// Encode `op` (validated) into `enc`.
pub fn encode_op<E: ComputeEncoder, B: Bindings<E>>(
    enc: &mut E,
    b: &B,
    op: &Op,
    sw: &Switches,
) -> Result<()> {
    match op {
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
            enc.set_pipeline(typed("norm_rms", *weight_dtype)?)?;
            enc.set_value(
                0,
                &NormRowsParams {
                    dim: *dim,
                    rows: *n_tokens,
                    eps: *eps,
                },
            );
            b.buffer(enc, 1, x.raw(), 0)?;
            b.weights(enc, 2, *weight_off)?;
            b.buffer(enc, 3, out.raw(), 0)?;
            enc.dispatch_threadgroups([*n_tokens, 1, 1], [row_threads(*dim), 1, 1])
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
            enc.set_pipeline("norm_rms_qk")?;
            enc.set_value(
                0,
                &QkNormParams {
                    num_k_heads: *num_k_heads,
                    key_dim: *key_dim,
                    key_offset: *key_offset_per_token,
                    per_token_total: *per_token_total,
                    q_scale: (1.0 / (*key_dim as f64).sqrt()) as f32,
                },
            );
            b.buffer(enc, 1, x.raw(), 0)?;
            enc.dispatch_threadgroups([*num_k_heads, *n_tokens, 2], [row_threads(*key_dim), 1, 1])
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
            // The row norm with the rows being heads; in place (x bound as input and output).
            let rows = mul(*num_heads, *n_tokens)?;
            enc.set_pipeline(typed("norm_rms", *weight_dtype)?)?;
            enc.set_value(
                0,
                &NormRowsParams {
                    dim: *head_dim,
                    rows,
                    eps: *eps,
                },
            );
            b.buffer(enc, 1, x.raw(), 0)?;
            b.weights(enc, 2, *weight_off)?;
            b.buffer(enc, 3, x.raw(), 0)?;
            enc.dispatch_threadgroups([rows, 1, 1], [row_threads(*head_dim), 1, 1])
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
            enc.set_pipeline("attn_rope")?;
            enc.set_value(
                0,
                &RopeParams {
                    n_tokens: *n_tokens,
                    num_heads: *num_heads,
                    head_dim: *head_dim,
                    rotary_dim: *rotary_dim,
                    start_pos: *start_pos,
                },
            );
            b.buffer(enc, 1, x.raw(), 0)?;
            b.buffer(enc, 2, inv_freq.raw(), 0)?;
            let threads = (rotary_dim / 2).next_multiple_of(32).clamp(32, 128);
            enc.dispatch_threadgroups([*num_heads, *n_tokens, 1], [threads, 1, 1])
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
            let n = mul(mul(*n_tokens, *num_heads)?, *head_dim)?;
            enc.set_pipeline("attn_split_q_gate")?;
            enc.set_value(
                0,
                &SplitParams {
                    head_dim: *head_dim,
                    n,
                },
            );
            b.buffer(enc, 1, q_proj.raw(), 0)?;
            b.buffer(enc, 2, q_out.raw(), 0)?;
            b.buffer(enc, 3, gate_out.raw(), 0)?;
            dispatch_1d(enc, n)
        }
        Op::ResidualAddNTokens {
            a,
            b: bb,
            out,
            n_tokens,
            dim,
            ..
        } => {
            let n = mul(*n_tokens, *dim)?;
            enc.set_pipeline("attn_residual_add")?;
            enc.set_value(0, &ElemParams { n });
            b.buffer(enc, 1, a.raw(), 0)?;
            b.buffer(enc, 2, bb.raw(), 0)?;
            b.buffer(enc, 3, out.raw(), 0)?;
            dispatch_1d(enc, n)
        }
        Op::ZeroBuffer { buf, n_bytes, .. } => {
            if *n_bytes == 0 {
                return Ok(());
            }
            enc.set_pipeline("attn_zero_bytes")?;
            enc.set_value(0, &ZeroParams { n_bytes: *n_bytes });
            b.buffer(enc, 1, buf.raw(), 0)?;
            let groups = n_bytes.div_ceil(256).min(1 << 16) as u32;
            enc.dispatch_threadgroups([groups, 1, 1], [256, 1, 1])
        }
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
        } => matvec(
            enc,
            b,
            sw,
            Src::File,
            0,
            weight,
            (input.raw(), *input_off),
            (output.raw(), *output_off),
            *in_dim,
            *out_dim,
            *n_tokens,
        ),
        Op::SwigluFusedBatched {
            gate,
            up,
            out,
            total,
            ..
        } => {
            enc.set_pipeline("moe_swiglu")?;
            enc.set_value(0, &ElemParams { n: *total });
            b.buffer(enc, 1, gate.raw(), 0)?;
            b.buffer(enc, 2, up.raw(), 0)?;
            b.buffer(enc, 3, out.raw(), 0)?;
            dispatch_1d(enc, *total)
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
            softmax_scale,
            ..
        } => {
            if *head_dim > 256 {
                return Err(unsupported(format!(
                    "attention head_dim {head_dim} > 256 is not supported on Metal"
                )));
            }
            let fold = if sw.sdpa_gqa && heads_per_kv % 2 == 0 {
                2
            } else {
                1
            };
            // Prefill: the tiled kernel (8 query rows per simdgroup); decode and short runs: one
            // simd_sum per key, 8 simdgroups per query head.
            let tiled = *n_tokens >= 8 && head_dim % 8 == 0;
            let name = match (tiled, fold, *head_dim) {
                (false, 1, _) => "attn_sdpa_f1",
                (false, _, _) => "attn_sdpa_f2",
                (true, 1, 0..=64) => "attn_sdpa_tile_f1_d64",
                (true, 1, 65..=128) => "attn_sdpa_tile_f1_d128",
                (true, 1, _) => "attn_sdpa_tile_f1_d256",
                (true, _, 0..=64) => "attn_sdpa_tile_f2_d64",
                (true, _, 65..=128) => "attn_sdpa_tile_f2_d128",
                (true, _, _) => "attn_sdpa_tile_f2_d256",
            };
            enc.set_pipeline(name)?;
            enc.set_value(
                0,
                &SdpaParams {
                    n_tokens: *n_tokens,
                    num_heads: *num_heads,
                    heads_per_kv: *heads_per_kv,
                    head_dim: *head_dim,
                    kv_dim: *kv_dim,
                    kv_start: *kv_start,
                    scale: *softmax_scale,
                    fold,
                },
            );
            b.buffer(enc, 1, q.raw(), 0)?;
            b.buffer(enc, 2, k.raw(), 0)?;
            b.buffer(enc, 3, v.raw(), 0)?;
            b.buffer(enc, 4, attn_out.raw(), 0)?;
            if tiled {
                let rows = 16 / fold;
                enc.dispatch_threadgroups(
                    [num_heads / fold, n_tokens.div_ceil(rows), 1],
                    [64, 1, 1],
                )
            } else {
                enc.dispatch_threadgroups([num_heads / fold, *n_tokens, 1], [256, 1, 1])
            }
        }
        Op::SigmoidGateNTokens {
            x,
            gate,
            dim,
            n_tokens,
            ..
        } => {
            let n = mul(*dim, *n_tokens)?;
            enc.set_pipeline("attn_sigmoid_gate")?;
            enc.set_value(0, &ElemParams { n });
            b.buffer(enc, 1, x.raw(), 0)?;
            b.buffer(enc, 2, gate.raw(), 0)?;
            dispatch_1d(enc, n)
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
            let n = mul(*n_tokens, *kv_dim)?;
            let at = *kv_start as u64 * *kv_dim as u64 * 4;
            enc.set_pipeline("attn_kv_append")?;
            enc.set_value(0, &ElemParams { n });
            b.buffer(enc, 1, k_src.raw(), 0)?;
            b.buffer(enc, 2, v_src.raw(), 0)?;
            b.buffer(enc, 3, k_cache.raw(), at)?;
            b.buffer(enc, 4, v_cache.raw(), at)?;
            dispatch_1d(enc, n)
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
            enc.set_pipeline("moe_softmax_topk")?;
            enc.set_value(
                0,
                &TopkParams {
                    n_experts: *n_experts,
                    k: *k,
                },
            );
            b.buffer(enc, 1, logits.raw(), 0)?;
            b.buffer(enc, 2, indices_out.raw(), 0)?;
            b.buffer(enc, 3, weights_out.raw(), 0)?;
            enc.dispatch_threadgroups([*n_tokens, 1, 1], [32, 1, 1])
        }
        Op::MoeNormalizeWeights {
            weights,
            n_tokens,
            k,
            ..
        } => {
            enc.set_pipeline("moe_normalize")?;
            enc.set_value(
                0,
                &NormalizeParams {
                    n_tokens: *n_tokens,
                    k: *k,
                },
            );
            b.buffer(enc, 1, weights.raw(), 0)?;
            enc.dispatch_threadgroups([n_tokens.div_ceil(64), 1, 1], [64, 1, 1])
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
            let io = BucketIo {
                experts: expert_base.raw(),
                slots_dev: expert_indices.raw(),
                input: bucket_input.raw(),
                gate: bucket_gate.raw(),
                up: bucket_up.raw(),
                act: bucket_act.raw(),
                out: bucket_out.raw(),
                tok: bucket_token_idx.raw(),
                weights: bucket_weights.raw(),
                out_sum: out_sum.raw(),
            };
            moe_buckets(
                enc,
                b,
                sw,
                &io,
                *expert_stride,
                layout,
                expert_slots,
                buckets,
                *n_tokens,
            )
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
            let n_assign = mul(*n_tokens, *k)?;
            let route = RouteParams {
                n_assign,
                n_experts: *n_experts,
            };
            enc.set_pipeline("moe_route_count")?;
            enc.set_value(0, &route);
            b.buffer(enc, 1, indices.raw(), 0)?;
            b.buffer(enc, 2, htpe.raw(), 0)?;
            enc.dispatch_threadgroups([n_experts.div_ceil(8), 1, 1], [256, 1, 1])?;
            enc.set_pipeline("moe_route_sort")?;
            b.buffer(enc, 3, hids.raw(), 0)?;
            enc.dispatch_threadgroups([n_experts.div_ceil(8), 1, 1], [256, 1, 1])?;

            let offs = layout.offsets();
            let (h, i) = (layout.hidden_dim, layout.inter_dim);
            // One token (decode): the dedicated matvec per routed row, as for MatvecNTokens.
            let mv = sw.matvec_m1 && *n_tokens == 1;
            let base = MoeGemmParams {
                stride: *expert_stride,
                rows: n_assign,
                group_size: layout.group_size,
                k: *k,
                n_slots: *n_experts,
                ..MoeGemmParams::default()
            };
            let gu = MoeGemmParams {
                off: part_offsets(&offs.gate, Some(&offs.up)),
                mode: MOE_MODE_GATHER_GU,
                in_dim: h,
                out_dim: i,
                n_src_rows: *n_tokens,
                ..base
            };
            let gemm = GroupedGemm {
                experts: expert_base.raw(),
                x: mlp_in.raw(),
                ra: hids.raw(),
                rb: indices.raw(),
                buckets: &NO_BUCKETS,
                out: [gate_mid.raw(), up_mid.raw(), gate_mid.raw()],
            };
            grouped_gemm(enc, b, layout, true, mv, &gu, &gemm)?;
            let down = MoeGemmParams {
                off: part_offsets(&offs.down, None),
                mode: MOE_MODE_GATHER_DOWN,
                in_dim: i,
                out_dim: h,
                n_src_rows: n_assign,
                ..base
            };
            let dgemm = GroupedGemm {
                x: gate_mid.raw(),
                out: [down_mid.raw(); 3],
                ..gemm
            };
            grouped_gemm(enc, b, layout, false, mv, &down, &dgemm)?;

            let n = mul(*n_tokens, h)?;
            enc.set_pipeline("moe_gather_combine")?;
            enc.set_value(
                0,
                &GatherCombineParams {
                    n_tokens: *n_tokens,
                    k: *k,
                    hidden: h,
                },
            );
            b.buffer(enc, 1, weights.raw(), 0)?;
            b.buffer(enc, 2, down_mid.raw(), 0)?;
            b.buffer(enc, 3, out_sum.raw(), 0)?;
            dispatch_1d(enc, n)
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
            let n = mul(*n_tokens, *dim)?;
            enc.set_pipeline("moe_combine")?;
            enc.set_value(
                0,
                &CombineParams {
                    n_tokens: *n_tokens,
                    dim: *dim,
                },
            );
            b.buffer(enc, 1, h_mid.raw(), 0)?;
            b.buffer(enc, 2, moe_sum.raw(), 0)?;
            b.buffer(enc, 3, shared_out.raw(), 0)?;
            b.buffer(enc, 4, shared_gate.raw(), 0)?;
            b.buffer(enc, 5, hidden_out.raw(), 0)?;
            dispatch_1d(enc, n)
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
            // Pass 1 reads the old state for every token; pass 2 then shifts the state.
            let p = ConvParams {
                conv_dim: *conv_dim,
                n_tokens: *n_tokens,
            };
            enc.set_pipeline(typed("linear_attn_conv1d", *weight_dtype)?)?;
            enc.set_value(0, &p);
            b.buffer(enc, 1, qkv_in.raw(), 0)?;
            b.buffer(enc, 2, conv_state.raw(), 0)?;
            b.weights(enc, 3, *weight_off)?;
            b.buffer(enc, 4, conv_out.raw(), 0)?;
            enc.dispatch_threadgroups([conv_dim.div_ceil(64), *n_tokens, 1], [64, 1, 1])?;
            enc.set_pipeline("linear_attn_conv1d_state")?;
            enc.dispatch_threadgroups([conv_dim.div_ceil(64), 1, 1], [64, 1, 1])
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
            let n = mul(*num_v_heads, *n_tokens)?;
            enc.set_pipeline(typed("linear_attn_decay_beta", *weight_dtype)?)?;
            enc.set_value(
                0,
                &DecayParams {
                    num_v_heads: *num_v_heads,
                    n,
                },
            );
            b.buffer(enc, 1, alpha_in.raw(), 0)?;
            b.buffer(enc, 2, beta_in.raw(), 0)?;
            b.weights(enc, 3, *a_log_off)?;
            b.weights(enc, 4, *dt_bias_off)?;
            b.buffer(enc, 5, g_decay_out.raw(), 0)?;
            b.buffer(enc, 6, beta_gate_out.raw(), 0)?;
            dispatch_1d(enc, n)
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
        } => {
            let p = DeltaParams {
                num_v_heads: *num_v_heads,
                value_dim: *value_dim,
                key_dim: *key_dim,
                k_heads_per_v: *k_heads_per_v,
                n_tokens: *n_tokens,
                chunk: 1,
            };
            delta_net(
                enc,
                b,
                &p,
                false,
                [
                    state.raw(),
                    conv_out.raw(),
                    g_decay.raw(),
                    beta_gate.raw(),
                    output.raw(),
                ],
            )
        }
        Op::GatedDeltaNetChunkwise {
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
            chunk_size,
            ..
        } => {
            let p = DeltaParams {
                num_v_heads: *num_v_heads,
                value_dim: *value_dim,
                key_dim: *key_dim,
                k_heads_per_v: *k_heads_per_v,
                n_tokens: *n_tokens,
                chunk: (*chunk_size).clamp(1, 16),
            };
            let bufs = [
                state.raw(),
                conv_out.raw(),
                g_decay.raw(),
                beta_gate.raw(),
                output.raw(),
            ];
            delta_net(enc, b, &p, !sw.delta_net_vb, bufs)
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
            let rows = mul(*num_v_heads, *n_tokens)?;
            enc.set_pipeline(typed("norm_gated_rms", *weight_dtype)?)?;
            enc.set_value(
                0,
                &GatedNormParams {
                    dim: *value_dim,
                    rows,
                    eps: *eps,
                },
            );
            b.buffer(enc, 1, values.raw(), 0)?;
            b.buffer(enc, 2, z.raw(), 0)?;
            b.weights(enc, 3, *weight_off)?;
            b.buffer(enc, 4, output.raw(), 0)?;
            enc.dispatch_threadgroups([rows, 1, 1], [row_threads(*value_dim), 1, 1])
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
            enc.set_pipeline(quant("matvec_embed", weight.bits, weight.scale_dtype)?)?;
            enc.set_value(
                0,
                &EmbedParams {
                    hidden: *hidden_dim,
                    n_tokens: *n_tokens,
                    vocab: *vocab,
                    group_size: weight.group_size,
                },
            );
            b.weights(enc, 1, weight.w_off)?;
            b.weights(enc, 2, weight.s_off)?;
            b.weights(enc, 3, weight.b_off)?;
            b.buffer(enc, 4, token_ids.raw(), 0)?;
            b.buffer(enc, 5, hidden_out.raw(), 0)?;
            let words = hidden_dim * weight.bits / 32;
            enc.dispatch_threadgroups([words.div_ceil(64), *n_tokens, 1], [64, 1, 1])
        }
    }
}

/// `y = dequant(W) x` for `n_tokens` rows: the dedicated matvec at one token (unless switched
/// off), the tiled GEMM otherwise. `base` is added to the weight's offsets (an expert block).
#[allow(clippy::too_many_arguments)]
fn matvec<E: ComputeEncoder, B: Bindings<E>>(
    enc: &mut E,
    b: &B,
    sw: &Switches,
    src: Src,
    base: u64,
    w: &WeightRef,
    (x, x_off): (u32, u64),
    (y, y_off): (u32, u64),
    in_dim: u32,
    out_dim: u32,
    n_tokens: u32,
) -> Result<()> {
    let gemm = n_tokens > 1 || !sw.matvec_m1;
    enc.set_pipeline(quant(
        if gemm { "matvec_qmm" } else { "matvec_qmv" },
        w.bits,
        w.scale_dtype,
    )?)?;
    bind_src(b, enc, 1, src, base + w.w_off)?;
    bind_src(b, enc, 2, src, base + w.s_off)?;
    bind_src(b, enc, 3, src, base + w.b_off)?;
    b.buffer(enc, 4, x, x_off)?;
    b.buffer(enc, 5, y, y_off)?;
    if gemm {
        enc.set_value(
            0,
            &QmmParams {
                m: n_tokens,
                n: out_dim,
                k: in_dim,
                group_size: w.group_size,
            },
        );
        enc.dispatch_threadgroups(
            [out_dim.div_ceil(32), n_tokens.div_ceil(32), 1],
            [128, 1, 1],
        )
    } else {
        enc.set_value(
            0,
            &QmvParams {
                in_dim,
                out_dim,
                n_tokens,
                group_size: w.group_size,
            },
        );
        enc.dispatch_threadgroups([out_dim.div_ceil(16), n_tokens, 1], [128, 1, 1])
    }
}

/// `MoeGemmParams::off` from one or two matrices of an expert block.
fn part_offsets(a: &WeightRef, b: Option<&WeightRef>) -> [u64; 6] {
    let b = b.copied().unwrap_or(WeightRef {
        w_off: 0,
        s_off: 0,
        b_off: 0,
        ..*a
    });
    [a.w_off, a.s_off, a.b_off, b.w_off, b.s_off, b.b_off]
}

/// The buffers of one grouped GEMM dispatch (see `moe_ggemm` in `moe.metal`).
#[derive(Clone, Copy)]
struct GroupedGemm<'a> {
    experts: u32,
    x: u32,
    ra: u32,
    rb: u32,
    buckets: &'a [u32],
    /// GU: act, up, gate; down: out (three times).
    out: [u32; 3],
}

/// The grouped expert product of `p.rows` routed rows: the tiled GEMM (`moe_ggemm_*`), or with
/// `matvec` the dedicated matvec per row (`moe_gmv_*`, for one token).
#[allow(clippy::too_many_arguments)]
fn grouped_gemm<E: ComputeEncoder, B: Bindings<E>>(
    enc: &mut E,
    b: &B,
    layout: &ExpertLayout,
    gu: bool,
    matvec: bool,
    p: &MoeGemmParams,
    g: &GroupedGemm<'_>,
) -> Result<()> {
    if p.rows == 0 {
        return Ok(());
    }
    let name = match (matvec, gu) {
        (false, true) => "moe_ggemm_gu",
        (false, false) => "moe_ggemm_down",
        (true, true) => "moe_gmv_gu",
        (true, false) => "moe_gmv_down",
    };
    enc.set_pipeline(quant(name, layout.bits, layout.scale_dtype)?)?;
    enc.set_value(0, p);
    b.buffer(enc, 1, g.experts, 0)?;
    b.buffer(enc, 2, g.x, 0)?;
    b.buffer(enc, 3, g.ra, 0)?;
    b.buffer(enc, 4, g.rb, 0)?;
    let bytes: Vec<u8> = g.buckets.iter().flat_map(|v| v.to_ne_bytes()).collect();
    enc.set_bytes(5, &bytes);
    for (i, &o) in g.out.iter().enumerate() {
        b.buffer(enc, 6 + i as u32, o, 0)?;
    }
    if matvec {
        enc.dispatch_threadgroups([p.out_dim.div_ceil(16), p.rows, 1], [128, 1, 1])
    } else {
        enc.dispatch_threadgroups(
            [p.out_dim.div_ceil(32), p.rows.div_ceil(32), 1],
            [128, 1, 1],
        )
    }
}

/// The buffers of `MoeBatchedPermuteFuse`, by raw id.
struct BucketIo {
    experts: u32,
    slots_dev: u32,
    input: u32,
    gate: u32,
    up: u32,
    act: u32,
    out: u32,
    tok: u32,
    weights: u32,
    out_sum: u32,
}

/// Largest bucket count whose CSR offsets fit in one `set_bytes` (4 KB).
const MAX_GATHER_BUCKETS: usize = 1023;

#[allow(clippy::too_many_arguments)]
fn moe_buckets<E: ComputeEncoder, B: Bindings<E>>(
    enc: &mut E,
    b: &B,
    sw: &Switches,
    io: &BucketIo,
    stride: u64,
    layout: &ExpertLayout,
    slots: &[u32],
    buckets: &[u32],
    n_tokens: u32,
) -> Result<()> {
    let total = buckets.last().copied().unwrap_or(0);
    let (h, i) = (layout.hidden_dim, layout.inter_dim);
    let offs = layout.offsets();
    if total > 0 {
        if sw.moe_gather && slots.len() <= MAX_GATHER_BUCKETS {
            let mv = sw.matvec_m1 && n_tokens == 1;
            // Slots the expert buffer holds: the kernels skip rows routed past them.
            let size = b.size(io.experts).unwrap_or(0) as u64;
            let n_slots = if size >= offs.block_bytes && stride > 0 {
                ((size - offs.block_bytes) / stride + 1).min(u32::MAX as u64) as u32
            } else {
                0
            };
            let base = MoeGemmParams {
                stride,
                rows: total,
                group_size: layout.group_size,
                k: 1,
                n_buckets: slots.len() as u32,
                n_slots,
                ..MoeGemmParams::default()
            };
            let gu = MoeGemmParams {
                off: part_offsets(&offs.gate, Some(&offs.up)),
                mode: MOE_MODE_BUCKET_GU,
                in_dim: h,
                out_dim: i,
                n_src_rows: n_tokens,
                write_gate: 1,
                ..base
            };
            let gemm = GroupedGemm {
                experts: io.experts,
                x: io.input,
                ra: io.tok,
                rb: io.slots_dev,
                buckets,
                out: [io.act, io.up, io.gate],
            };
            grouped_gemm(enc, b, layout, true, mv, &gu, &gemm)?;
            let down = MoeGemmParams {
                off: part_offsets(&offs.down, None),
                mode: MOE_MODE_BUCKET_DOWN,
                in_dim: i,
                out_dim: h,
                n_src_rows: total,
                ..base
            };
            let dgemm = GroupedGemm {
                x: io.act,
                out: [io.out; 3],
                ..gemm
            };
            grouped_gemm(enc, b, layout, false, mv, &down, &dgemm)?;
        } else {
            // Per bucket: gather the inputs into bucket_out, then matvec/GEMM per expert block.
            enc.set_pipeline("moe_gather_rows")?;
            enc.set_value(
                0,
                &GatherRowsParams {
                    n_rows: total,
                    hidden: h,
                    n_src_rows: n_tokens,
                },
            );
            b.buffer(enc, 1, io.input, 0)?;
            b.buffer(enc, 2, io.tok, 0)?;
            b.buffer(enc, 3, io.out, 0)?;
            dispatch_1d(enc, mul(total, h)?)?;
            let runs: Vec<(u64, u32, u32)> = slots
                .iter()
                .zip(buckets.windows(2))
                .filter(|(_, w)| w[1] > w[0])
                .map(|(&s, w)| (s as u64 * stride, w[0], w[1] - w[0]))
                .collect();
            let row = |r: u32, width: u32| r as u64 * width as u64 * 4;
            for &(blk, start, len) in &runs {
                let x = (io.out, row(start, h));
                matvec(
                    enc,
                    b,
                    sw,
                    Src::Pool(io.experts),
                    blk,
                    &offs.gate,
                    x,
                    (io.gate, row(start, i)),
                    h,
                    i,
                    len,
                )?;
                matvec(
                    enc,
                    b,
                    sw,
                    Src::Pool(io.experts),
                    blk,
                    &offs.up,
                    x,
                    (io.up, row(start, i)),
                    h,
                    i,
                    len,
                )?;
            }
            let n = mul(total, i)?;
            enc.set_pipeline("moe_swiglu")?;
            enc.set_value(0, &ElemParams { n });
            b.buffer(enc, 1, io.gate, 0)?;
            b.buffer(enc, 2, io.up, 0)?;
            b.buffer(enc, 3, io.act, 0)?;
            dispatch_1d(enc, n)?;
            for &(blk, start, len) in &runs {
                let (x, y) = ((io.act, row(start, i)), (io.out, row(start, h)));
                matvec(
                    enc,
                    b,
                    sw,
                    Src::Pool(io.experts),
                    blk,
                    &offs.down,
                    x,
                    y,
                    i,
                    h,
                    len,
                )?;
            }
        }
    }
    enc.set_pipeline("moe_bucket_accumulate")?;
    enc.set_value(
        0,
        &BucketAccParams {
            n_tokens,
            total,
            hidden: h,
        },
    );
    b.buffer(enc, 1, io.tok, 0)?;
    b.buffer(enc, 2, io.weights, 0)?;
    b.buffer(enc, 3, io.out, 0)?;
    b.buffer(enc, 4, io.out_sum, 0)?;
    enc.dispatch_threadgroups([h.div_ceil(64), 1, 1], [64, 1, 1])
}

/// The delta rule: the chunkwise kernel when asked for and the shape allows it (key_dim <= 128,
/// key_dim and value_dim multiples of 8), else the sequential one (key_dim <= 256).
fn delta_net<E: ComputeEncoder, B: Bindings<E>>(
    enc: &mut E,
    b: &B,
    p: &DeltaParams,
    chunkwise: bool,
    bufs: [u32; 5],
) -> Result<()> {
    let chunk_ok = p.key_dim <= 128 && p.key_dim % 8 == 0 && p.value_dim % 8 == 0;
    if p.key_dim > 256 {
        return Err(unsupported(format!(
            "GatedDeltaNet key_dim {} > 256 is not supported on Metal",
            p.key_dim
        )));
    }
    let chunked = chunkwise && chunk_ok;
    enc.set_pipeline(if chunked {
        "linear_attn_delta_chunk"
    } else {
        "linear_attn_delta_seq"
    })?;
    enc.set_value(0, p);
    for (i, &raw) in bufs.iter().enumerate() {
        b.buffer(enc, 1 + i as u32, raw, 0)?;
    }
    if chunked {
        enc.dispatch_threadgroups([p.value_dim.div_ceil(32), p.num_v_heads, 1], [128, 1, 1])
    } else {
        enc.dispatch_threadgroups([p.value_dim.div_ceil(4), p.num_v_heads, 1], [128, 1, 1])
    }
}
