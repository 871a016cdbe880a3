// norm.metal: row norms, one threadgroup per row: RMSNorm times a stored weight (also used per
// head in place), the weight-free q/k l2 norm of linear attention, and the gated RMSNorm of
// GatedDeltaNet. Threadgroups are whole simdgroups; each thread strides over its row.
#include "common.h"

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w for `rows` rows of `dim`. `x` and `out` may be
// the same memory (per-head norm in place): each thread rewrites only elements it read itself.
template <typename W>
[[kernel]] void norm_rms(constant NormRowsParams& p [[buffer(0)]],
                         device const float* x [[buffer(1)]],
                         device const W* w [[buffer(2)]],
                         device float* out [[buffer(3)]],
                         uint row [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint ntg [[threads_per_threadgroup]],
                         uint sid [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float partial[32];
  device const float* xr = x + ulong(row) * p.dim;
  device float* o = out + ulong(row) * p.dim;
  float ss = 0.0f;
  for (uint i = tid; i < p.dim; i += ntg) ss = fma(xr[i], xr[i], ss);
  const float total = tg_sum(ss, partial, sid, lane, ntg / 32);
  const float r = 1.0f / sqrt(total / float(p.dim) + p.eps);
  for (uint i = tid; i < p.dim; i += ntg) o[i] = (xr[i] * r) * to_f32(w[i]);
}

template [[host_name("norm_rms_f32")]] [[kernel]] decltype(norm_rms<float>) norm_rms<float>;
template [[host_name("norm_rms_bf16")]] [[kernel]] decltype(norm_rms<bf16>) norm_rms<bf16>;
template [[host_name("norm_rms_f16")]] [[kernel]] decltype(norm_rms<half>) norm_rms<half>;

// In place on each token's q|k|v slot: group (head, token, 0) normalises q of that key head to
// q * rsqrt(sum(q^2) + 1e-6) * q_scale, group (head, token, 1) k to k * rsqrt(sum(k^2) + 1e-6).
[[kernel]] void norm_rms_qk(constant QkNormParams& p [[buffer(0)]],
                            device float* x [[buffer(1)]],
                            uint3 g [[threadgroup_position_in_grid]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint ntg [[threads_per_threadgroup]],
                            uint sid [[simdgroup_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float partial[32];
  const bool is_k = g.z != 0;
  device float* v = x + ulong(g.y) * p.per_token_total + (is_k ? p.key_offset : 0u) + g.x * p.key_dim;
  float ss = 0.0f;
  for (uint i = tid; i < p.key_dim; i += ntg) ss = fma(v[i], v[i], ss);
  const float total = tg_sum(ss, partial, sid, lane, ntg / 32);
  const float r = 1.0f / sqrt(total + 1e-6f);
  for (uint i = tid; i < p.key_dim; i += ntg) v[i] = is_k ? v[i] * r : (v[i] * r) * p.q_scale;
}

// out = (w * rmsnorm(v)) * silu(z) per row of `dim` (one row per token and value head).
template <typename W>
[[kernel]] void norm_gated_rms(constant GatedNormParams& p [[buffer(0)]],
                               device const float* values [[buffer(1)]],
                               device const float* z [[buffer(2)]],
                               device const W* w [[buffer(3)]],
                               device float* out [[buffer(4)]],
                               uint row [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint ntg [[threads_per_threadgroup]],
                               uint sid [[simdgroup_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float partial[32];
  const ulong base = ulong(row) * p.dim;
  float ss = 0.0f;
  for (uint i = tid; i < p.dim; i += ntg) ss = fma(values[base + i], values[base + i], ss);
  const float total = tg_sum(ss, partial, sid, lane, ntg / 32);
  const float r = 1.0f / sqrt(total / float(p.dim) + p.eps);
  for (uint i = tid; i < p.dim; i += ntg) {
    out[base + i] = (to_f32(w[i]) * (values[base + i] * r)) * silu(z[base + i]);
  }
}

template [[host_name("norm_gated_rms_f32")]] [[kernel]] decltype(norm_gated_rms<float>) norm_gated_rms<float>;
template [[host_name("norm_gated_rms_bf16")]] [[kernel]] decltype(norm_gated_rms<bf16>) norm_gated_rms<bf16>;
template [[host_name("norm_gated_rms_f16")]] [[kernel]] decltype(norm_gated_rms<half>) norm_gated_rms<half>;
