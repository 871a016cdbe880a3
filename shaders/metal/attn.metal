// attn.metal: the full-attention block: partial NeoX RoPE, the q/gate split, the KV-cache
// append, element-wise residual add / sigmoid gate / zero fill, and causal GQA attention: a
// flash-decoding kernel (online softmax per simdgroup, partials merged in threadgroup memory) for
// few tokens and a tiled flash-attention kernel on simdgroup matrices for prefill.
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

// Flash attention for prefill. A threadgroup holds 16 query rows in threadgroup memory: 16 tokens
// of one head, or with F = 2 8 tokens of two heads sharing a kv head (each K/V tile then serves
// both). Keys go through threadgroup memory in tiles of 8; per tile each simdgroup (8 rows)
// computes S = Q K^T and O += P V on simdgroup matrices. The online softmax runs on S via
// threadgroup memory with lane l owning row l / 4 (its max and sum in registers, reduced over the
// row's 4 lanes with shuffles), so it does not depend on the matrices' lane layout; O is rescaled
// by a diagonal matrix product. HD (64, 128 or 256) bounds head_dim, a multiple of 8.
template <uint F, uint HD>
[[kernel]] void attn_sdpa_tile(constant SdpaParams& p [[buffer(0)]],
                               device const float* q [[buffer(1)]],
                               device const float* kc [[buffer(2)]],
                               device const float* vc [[buffer(3)]],
                               device float* out [[buffer(4)]],
                               uint2 tg [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint sid [[simdgroup_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint NSG = 2;
  constexpr uint ROWS = 8 * NSG;
  constexpr uint BK = 8;
  constexpr uint BT = ROWS / F;  // tokens per threadgroup
  constexpr uint ND = HD / 8;
  threadgroup float qs[ROWS * HD];
  threadgroup float kv[BK * HD];
  threadgroup float sc[NSG * 64];
  threadgroup float dg[NSG * 64];

  const uint hd = p.head_dim;
  const uint nd = hd / 8;
  const uint t_base = tg.y * BT;
  const uint col = (tg.x * F / p.heads_per_kv) * hd;
  const ulong row_stride = ulong(p.num_heads) * hd;
  const float neg = -FLT_MAX;

  for (uint idx = tid; idx < ROWS * hd; idx += NSG * 32) {
    const uint r = idx / hd;
    const uint d = idx - r * hd;
    const uint s = r / 8;
    const uint head = tg.x * F + (F == 2 ? s : 0);
    const uint tok = t_base + (F == 1 ? s * 8 : 0) + r % 8;
    qs[r * HD + d] = tok < p.n_tokens ? q[tok * row_stride + head * hd + d] * p.scale : 0.0f;
  }

  // This simdgroup's rows: head, first token; lane l works on row l / 4, columns c0, c0 + 1.
  const uint head = tg.x * F + (F == 2 ? sid : 0);
  const uint my_t0 = t_base + (F == 1 ? sid * 8 : 0);
  const uint i = lane / 4;
  const uint c0 = (lane % 4) * 2;
  const uint tok = my_t0 + i;
  const uint last_key = p.kv_start + tok;  // the last key row `tok` may see
  const bool any_row = my_t0 < p.n_tokens;
  const uint my_keys = p.kv_start + min(my_t0 + 7, p.n_tokens - 1) + 1;
  const uint tg_keys = p.kv_start + min(t_base + BT - 1, p.n_tokens - 1) + 1;
  float m = neg;
  float l = 0.0f;
  simdgroup_float8x8 o[ND];
  for (uint db = 0; db < ND; ++db) o[db] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  threadgroup float* my_sc = sc + sid * 64;
  threadgroup float* my_dg = dg + sid * 64;

  for (uint j0 = 0; j0 < tg_keys; j0 += BK) {
    for (uint idx = tid; idx < BK * hd; idx += NSG * 32) {
      const uint j = idx / hd;
      const uint d = idx - j * hd;
      kv[j * HD + d] = j0 + j < tg_keys ? kc[ulong(j0 + j) * p.kv_dim + col + d] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const bool act = any_row && j0 < my_keys;
    if (act) {
      simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (uint db = 0; db < ND; ++db) {
        if (db < nd) {
          simdgroup_float8x8 a;
          simdgroup_float8x8 bt;
          simdgroup_load(a, qs + sid * 8 * HD + db * 8, HD);
          simdgroup_load(bt, kv + db * 8, HD, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(s, a, bt, s);
        }
      }
      simdgroup_store(s, my_sc, 8);
      simdgroup_barrier(mem_flags::mem_threadgroup);
      const bool vis0 = tok < p.n_tokens && j0 + c0 <= last_key;
      const bool vis1 = tok < p.n_tokens && j0 + c0 + 1 <= last_key;
      const float s0 = my_sc[i * 8 + c0];
      const float s1 = my_sc[i * 8 + c0 + 1];
      float mx = max(vis0 ? s0 : neg, vis1 ? s1 : neg);
      mx = max(mx, simd_shuffle_xor(mx, 1));
      mx = max(mx, simd_shuffle_xor(mx, 2));
      const float mn = max(m, mx);
      const float c = exp(m - mn);
      const float p0 = vis0 ? exp(s0 - mn) : 0.0f;
      const float p1 = vis1 ? exp(s1 - mn) : 0.0f;
      float rs = p0 + p1;
      rs += simd_shuffle_xor(rs, 1);
      rs += simd_shuffle_xor(rs, 2);
      l = l * c + rs;
      m = mn;
      my_sc[i * 8 + c0] = p0;
      my_sc[i * 8 + c0 + 1] = p1;
      my_dg[i * 8 + c0] = c0 == i ? c : 0.0f;
      my_dg[i * 8 + c0 + 1] = c0 + 1 == i ? c : 0.0f;
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 dm;
      simdgroup_load(dm, my_dg, 8);
      for (uint db = 0; db < ND; ++db) {
        if (db < nd) {
          simdgroup_float8x8 t;
          simdgroup_multiply(t, dm, o[db]);
          o[db] = t;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint idx = tid; idx < BK * hd; idx += NSG * 32) {
      const uint j = idx / hd;
      const uint d = idx - j * hd;
      kv[j * HD + d] = j0 + j < tg_keys ? vc[ulong(j0 + j) * p.kv_dim + col + d] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (act) {
      simdgroup_float8x8 pm;
      simdgroup_load(pm, my_sc, 8);
      for (uint db = 0; db < ND; ++db) {
        if (db < nd) {
          simdgroup_float8x8 vb;
          simdgroup_load(vb, kv + db * 8, HD);
          simdgroup_multiply_accumulate(o[db], pm, vb, o[db]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  if (!any_row) return;
  // O / l, through this simdgroup's (no longer needed) Q rows.
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  my_dg[i * 8 + c0] = c0 == i ? inv : 0.0f;
  my_dg[i * 8 + c0 + 1] = c0 + 1 == i ? inv : 0.0f;
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 dm;
  simdgroup_load(dm, my_dg, 8);
  threadgroup float* my_q = qs + sid * 8 * HD;
  for (uint db = 0; db < ND; ++db) {
    if (db < nd) {
      simdgroup_float8x8 t;
      simdgroup_multiply(t, dm, o[db]);
      simdgroup_store(t, my_q + db * 8, HD);
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint idx = lane; idx < 8 * hd; idx += 32) {
    const uint r = idx / hd;
    const uint d = idx - r * hd;
    if (my_t0 + r < p.n_tokens) out[(my_t0 + r) * row_stride + head * hd + d] = my_q[r * HD + d];
  }
}

template [[host_name("attn_sdpa_tile_f1_d64")]] [[kernel]] decltype(attn_sdpa_tile<1, 64>) attn_sdpa_tile<1, 64>;
template [[host_name("attn_sdpa_tile_f1_d128")]] [[kernel]] decltype(attn_sdpa_tile<1, 128>) attn_sdpa_tile<1, 128>;
template [[host_name("attn_sdpa_tile_f1_d256")]] [[kernel]] decltype(attn_sdpa_tile<1, 256>) attn_sdpa_tile<1, 256>;
template [[host_name("attn_sdpa_tile_f2_d64")]] [[kernel]] decltype(attn_sdpa_tile<2, 64>) attn_sdpa_tile<2, 64>;
template [[host_name("attn_sdpa_tile_f2_d128")]] [[kernel]] decltype(attn_sdpa_tile<2, 128>) attn_sdpa_tile<2, 128>;
template [[host_name("attn_sdpa_tile_f2_d256")]] [[kernel]] decltype(attn_sdpa_tile<2, 256>) attn_sdpa_tile<2, 256>;
