// params.h: the parameter struct of every Metal kernel, shared by the shaders and the host
// (src/backend/metal/params.rs mirrors each struct field for field; a Rust test parses this file
// and checks every size and offset).
//
// Width rule: fields are `uint` or `float` (4 bytes) or `ulong` (8 bytes). `ulong` fields come
// first, so no struct has implicit padding; a struct holding a `ulong` ends with explicit `_pad`
// fields to a multiple of 8 bytes. Arrays are fixed-size arrays of those types. A struct is bound
// with `set_bytes` at `[[buffer(0)]]` of its kernel.
#ifndef MOEFLUX_PARAMS_H
#define MOEFLUX_PARAMS_H

// ---- norm.metal ---------------------------------------------------------------------------

// norm_rms_{f32,bf16,f16}: `rows` rows of `dim` floats, each times rsqrt(mean(x^2) + eps) * w.
struct NormRowsParams {
  uint dim;
  uint rows;
  float eps;
};

// norm_rms_qk: per token, per key head, l2-normalise q (times q_scale) and k in place.
struct QkNormParams {
  uint num_k_heads;
  uint key_dim;
  uint key_offset;
  uint per_token_total;
  float q_scale;
};

// norm_gated_rms_{f32,bf16,f16}: rows of `dim` (one per token and value head).
struct GatedNormParams {
  uint dim;
  uint rows;
  float eps;
};

// ---- attn.metal ---------------------------------------------------------------------------

// attn_rope: NeoX rotation of the first rotary_dim channels of each head.
struct RopeParams {
  uint n_tokens;
  uint num_heads;
  uint head_dim;
  uint rotary_dim;
  uint start_pos;
};

// attn_split_q_gate: `n` = n_tokens * num_heads * head_dim outputs per destination.
struct SplitParams {
  uint head_dim;
  uint n;
};

// attn_residual_add, attn_sigmoid_gate, attn_kv_append, moe_swiglu: `n` elements.
struct ElemParams {
  uint n;
};

// attn_zero_bytes: the first n_bytes bytes.
struct ZeroParams {
  ulong n_bytes;
};

// attn_sdpa_f{1,2}: causal GQA attention; `fold` query heads per threadgroup share a kv head.
struct SdpaParams {
  uint n_tokens;
  uint num_heads;
  uint heads_per_kv;
  uint head_dim;
  uint kv_dim;
  uint kv_start;
  float scale;
  uint fold;
};

// ---- matvec.metal -------------------------------------------------------------------------

// matvec_qmv_b{4,8}_{dt}: one simdgroup row block per threadgroup, grid.y = token.
struct QmvParams {
  uint in_dim;
  uint out_dim;
  uint n_tokens;
  uint group_size;
};

// matvec_qmm_b{4,8}_{dt}: Y[m, n] = X[m, k] . W[n, k]^T, tiles of 32 x 32.
struct QmmParams {
  uint m;
  uint n;
  uint k;
  uint group_size;
};

// matvec_embed_b{4,8}_{dt}: dequantize rows ids[t] of a [vocab, hidden] table.
struct EmbedParams {
  uint hidden;
  uint n_tokens;
  uint vocab;
  uint group_size;
};

// ---- moe.metal ----------------------------------------------------------------------------

// moe_softmax_topk: one simdgroup per token.
struct TopkParams {
  uint n_experts;
  uint k;
};

// moe_normalize: one thread per token.
struct NormalizeParams {
  uint n_tokens;
  uint k;
};

// moe_combine: hidden = h + m + sigmoid(g[t]) * s over n_tokens * dim.
struct CombineParams {
  uint n_tokens;
  uint dim;
};

// moe_route_count, moe_route_sort: n_assign = n_tokens * k assignments over n_experts.
struct RouteParams {
  uint n_assign;
  uint n_experts;
};

// moe_gather_combine: out[t] = sum_j w[t*k+j] * y[t*k+j].
struct GatherCombineParams {
  uint n_tokens;
  uint k;
  uint hidden;
};

// moe_gather_rows: dst[j] = src[idx[j]] for rows of `hidden`.
struct GatherRowsParams {
  uint n_rows;
  uint hidden;
  uint n_src_rows;
};

// moe_bucket_accumulate: out[tok[j]] += w[j] * y[j], j ascending; rows of `hidden`.
struct BucketAccParams {
  uint n_tokens;
  uint total;
  uint hidden;
};

// moe_ggemm_{gu,down}_b{4,8}_{dt}: grouped GEMM over rows routed to expert blocks.
// `off` holds byte offsets inside a block: gate w/s/b then up w/s/b (down uses the first three).
// `mode`: 0 gather-id gate/up, 1 gather-id down, 2 bucket gate/up, 3 bucket down.
struct MoeGemmParams {
  ulong stride;
  ulong off[6];
  uint mode;
  uint rows;
  uint in_dim;
  uint out_dim;
  uint group_size;
  uint k;
  uint n_buckets;
  uint n_slots;
  uint n_src_rows;
  uint write_gate;
};

// ---- linear_attn.metal --------------------------------------------------------------------

// linear_attn_conv1d_{dt}, linear_attn_conv1d_state.
struct ConvParams {
  uint conv_dim;
  uint n_tokens;
};

// linear_attn_decay_beta_{dt}: n = n_tokens * num_v_heads.
struct DecayParams {
  uint num_v_heads;
  uint n;
};

// linear_attn_delta_seq, linear_attn_delta_chunk.
struct DeltaParams {
  uint num_v_heads;
  uint value_dim;
  uint key_dim;
  uint k_heads_per_v;
  uint n_tokens;
  uint chunk;
};

// The sizes the host mirrors rely on (the Rust layout test reads these lines too).
static_assert(sizeof(NormRowsParams) == 12, "NormRowsParams layout");
static_assert(sizeof(QkNormParams) == 20, "QkNormParams layout");
static_assert(sizeof(GatedNormParams) == 12, "GatedNormParams layout");
static_assert(sizeof(RopeParams) == 20, "RopeParams layout");
static_assert(sizeof(SplitParams) == 8, "SplitParams layout");
static_assert(sizeof(ElemParams) == 4, "ElemParams layout");
static_assert(sizeof(ZeroParams) == 8, "ZeroParams layout");
static_assert(sizeof(SdpaParams) == 32, "SdpaParams layout");
static_assert(sizeof(QmvParams) == 16, "QmvParams layout");
static_assert(sizeof(QmmParams) == 16, "QmmParams layout");
static_assert(sizeof(EmbedParams) == 16, "EmbedParams layout");
static_assert(sizeof(TopkParams) == 8, "TopkParams layout");
static_assert(sizeof(NormalizeParams) == 8, "NormalizeParams layout");
static_assert(sizeof(CombineParams) == 8, "CombineParams layout");
static_assert(sizeof(RouteParams) == 8, "RouteParams layout");
static_assert(sizeof(GatherCombineParams) == 12, "GatherCombineParams layout");
static_assert(sizeof(GatherRowsParams) == 12, "GatherRowsParams layout");
static_assert(sizeof(BucketAccParams) == 12, "BucketAccParams layout");
static_assert(sizeof(MoeGemmParams) == 96, "MoeGemmParams layout");
static_assert(sizeof(ConvParams) == 8, "ConvParams layout");
static_assert(sizeof(DecayParams) == 8, "DecayParams layout");
static_assert(sizeof(DeltaParams) == 24, "DeltaParams layout");

#endif  // MOEFLUX_PARAMS_H
