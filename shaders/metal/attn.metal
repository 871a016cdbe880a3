// attn.metal: the full-attention block: partial NeoX RoPE, the q/gate split, the KV-cache
// append, element-wise residual add / sigmoid gate / zero fill, and causal GQA attention
// (flash-style: an online softmax per simdgroup, partials merged through threadgroup memory).
#include "common.h"

// In place on x [n_tokens, num_heads, head_dim]: group (head, token) rotates the pairs
// (i, i + rotary_dim/2) of its head by angle (start_pos + t) * inv_freq[i] (an f32 product, as
// transformers computes it). Channels from rotary_dim on are not touched.
[[kernel]] void attn_rope(constant RopeParams& p [[buffer(0)]],
                          device float* x [[buffer(1)]],
                          device const float* inv_freq [[buffer(2)]],
                          uint2 g [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint ntg [[threads_per_threadgroup]]) {
  const uint half_rd = p.rotary_dim / 2;
  device float* hx = x + (ulong(g.y) * p.num_heads + g.x) * p.head_dim;
  const float pos = float(p.start_pos + g.y);
  for (uint i = tid; i < half_rd; i += ntg) {
    // precise: angles reach thousands of radians, where fast sin/cos lose their accuracy.
    const float angle = pos * inv_freq[i];
    const float c = precise::cos(angle);
    const float s = precise::sin(angle);
    const float x1 = hx[i];
    const float x2 = hx[i + half_rd];
    hx[i] = x1 * c - x2 * s;
    hx[i + half_rd] = x2 * c + x1 * s;
  }
}

// q_proj rows [.., 2*head_dim] hold [q | gate] per head; output i (of n) is column i % head_dim
// of head row i / head_dim.
[[kernel]] void attn_split_q_gate(constant SplitParams& p [[buffer(0)]],
                                  device const float* q_proj [[buffer(1)]],
                                  device float* q_out [[buffer(2)]],
                                  device float* gate_out [[buffer(3)]],
                                  uint i [[thread_position_in_grid]]) {
  if (i >= p.n) return;
  const uint row = i / p.head_dim;
  const ulong src = ulong(row) * 2 * p.head_dim + (i - row * p.head_dim);
  q_out[i] = q_proj[src];
  gate_out[i] = q_proj[src + p.head_dim];
}

// out = a + b over n elements.
[[kernel]] void attn_residual_add(constant ElemParams& p [[buffer(0)]],
                                  device const float* a [[buffer(1)]],
                                  device const float* b [[buffer(2)]],
                                  device float* out [[buffer(3)]],
                                  uint i [[thread_position_in_grid]]) {
  if (i < p.n) out[i] = a[i] + b[i];
}

// x *= sigmoid(gate) over n elements.
[[kernel]] void attn_sigmoid_gate(constant ElemParams& p [[buffer(0)]],
                                  device float* x [[buffer(1)]],
                                  device const float* gate [[buffer(2)]],
                                  uint i [[thread_position_in_grid]]) {
  if (i < p.n) x[i] = x[i] * sigmoid(gate[i]);
}

// Copy n floats of k and v; the caches are bound at the byte offset of row kv_start.
[[kernel]] void attn_kv_append(constant ElemParams& p [[buffer(0)]],
                               device const float* k_src [[buffer(1)]],
                               device const float* v_src [[buffer(2)]],
                               device float* k_dst [[buffer(3)]],
                               device float* v_dst [[buffer(4)]],
                               uint i [[thread_position_in_grid]]) {
  if (i < p.n) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

// Zero the first n_bytes bytes with a grid-stride loop of byte stores (any alignment, any size).
[[kernel]] void attn_zero_bytes(constant ZeroParams& p [[buffer(0)]],
                                device uchar* buf [[buffer(1)]],
                                uint gid [[thread_position_in_grid]],
                                uint nthreads [[threads_per_grid]]) {
  for (ulong b = gid; b < p.n_bytes; b += nthreads) buf[b] = 0;
}

// Causal attention with grouped-query heads. Threadgroup (u, t) computes query heads
// [u*F, u*F + F) of token t (all sharing kv head u*F / heads_per_kv) over cache rows
// 0..=kv_start + t. Its 8 simdgroups take every 8th key; a simdgroup scores a key with one
// simd_sum per head (lane d holds dims d, d+32, ...), keeps a running max and sum per head, and
// the partials are merged through threadgroup memory. F = 2 reads each K/V row once for two
// heads. head_dim <= 256.
template <uint F>
[[kernel]] void attn_sdpa(constant SdpaParams& p [[buffer(0)]],
                          device const float* q [[buffer(1)]],
                          device const float* kc [[buffer(2)]],
                          device const float* vc [[buffer(3)]],
                          device float* out [[buffer(4)]],
                          uint2 tg [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint sid [[simdgroup_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint NSG = 8;
  constexpr uint DPL = 8;
  constexpr uint MAXD = 32 * DPL;
  threadgroup float tg_ml[NSG * F * 2];
  threadgroup float tg_acc[NSG * F * MAXD];

  const uint hd = p.head_dim;
  const uint dpl = (hd + 31) / 32;
  const uint h0 = tg.x * F;
  const uint t = tg.y;
  const uint col = (h0 / p.heads_per_kv) * hd;
  const uint n_keys = p.kv_start + t + 1;
  const ulong qrow = ulong(t) * p.num_heads * hd;

  float qv[F][DPL];
  float acc[F][DPL];
  float m[F];
  float l[F];
  for (uint f = 0; f < F; ++f) {
    for (uint i = 0; i < DPL; ++i) {
      const uint d = lane + 32 * i;
      qv[f][i] = (i < dpl && d < hd) ? q[qrow + (h0 + f) * hd + d] : 0.0f;
      acc[f][i] = 0.0f;
    }
    // Finite, so that fast math may assume no infinities.
    m[f] = -FLT_MAX;
    l[f] = 0.0f;
  }

  for (uint j = sid; j < n_keys; j += NSG) {
    device const float* kr = kc + ulong(j) * p.kv_dim + col;
    device const float* vr = vc + ulong(j) * p.kv_dim + col;
    float kx[DPL];
    float vx[DPL];
    for (uint i = 0; i < DPL; ++i) {
      const uint d = lane + 32 * i;
      const bool in = i < dpl && d < hd;
      kx[i] = in ? kr[d] : 0.0f;
      vx[i] = in ? vr[d] : 0.0f;
    }
    for (uint f = 0; f < F; ++f) {
      float s = 0.0f;
      for (uint i = 0; i < dpl; ++i) s = fma(qv[f][i], kx[i], s);
      s = simd_sum(s) * p.scale;
      const float mn = max(m[f], s);
      const float c = exp(m[f] - mn);
      const float e = exp(s - mn);
      l[f] = l[f] * c + e;
      for (uint i = 0; i < dpl; ++i) acc[f][i] = acc[f][i] * c + e * vx[i];
      m[f] = mn;
    }
  }

  for (uint f = 0; f < F; ++f) {
    if (lane == 0) {
      tg_ml[(sid * F + f) * 2] = m[f];
      tg_ml[(sid * F + f) * 2 + 1] = l[f];
    }
    for (uint i = 0; i < dpl; ++i) {
      const uint d = lane + 32 * i;
      if (d < hd) tg_acc[(sid * F + f) * MAXD + d] = acc[f][i];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (uint idx = tid; idx < F * hd; idx += NSG * 32) {
    const uint f = idx / hd;
    const uint d = idx - f * hd;
    float mx = -FLT_MAX;
    for (uint s = 0; s < NSG; ++s) mx = max(mx, tg_ml[(s * F + f) * 2]);
    float sum = 0.0f;
    float o = 0.0f;
    for (uint s = 0; s < NSG; ++s) {
      const float c = exp(tg_ml[(s * F + f) * 2] - mx);
      sum += tg_ml[(s * F + f) * 2 + 1] * c;
      o += tg_acc[(s * F + f) * MAXD + d] * c;
    }
    out[qrow + (h0 + f) * hd + d] = o / sum;
  }
}

template [[host_name("attn_sdpa_f1")]] [[kernel]] decltype(attn_sdpa<1>) attn_sdpa<1>;
template [[host_name("attn_sdpa_f2")]] [[kernel]] decltype(attn_sdpa<2>) attn_sdpa<2>;
