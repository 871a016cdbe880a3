// linear_attn.metal: GatedDeltaNet: the causal depthwise conv (two passes: outputs, then the
// state shift, so no thread reads state another has rewritten), the decay/beta gates, and the
// delta-rule recurrence, sequential with the state in registers or chunkwise on simdgroup
// matrices.
#include "common.h"

// out[t, c] = silu(sum_j w[c, j] * in_{t-3+j}[c]), inputs before t = 0 from conv_state
// [3, conv_dim] (oldest first). Thread (c, t).
template <typename W>
[[kernel]] void linear_attn_conv1d(constant ConvParams& p [[buffer(0)]],
                                   device const float* qkv_in [[buffer(1)]],
                                   device const float* state [[buffer(2)]],
                                   device const W* w [[buffer(3)]],
                                   device float* out [[buffer(4)]],
                                   uint2 gid [[thread_position_in_grid]]) {
  const uint c = gid.x;
  const uint t = gid.y;
  if (c >= p.conv_dim || t >= p.n_tokens) return;
  float xv[4];
  for (uint j = 0; j < 4; ++j) {
    const uint back = 3 - j;
    xv[j] = t >= back ? qkv_in[ulong(t - back) * p.conv_dim + c] : state[ulong(3 + t - back) * p.conv_dim + c];
  }
  device const W* wc = w + ulong(c) * 4;
  const float acc = to_f32(wc[0]) * xv[0] + to_f32(wc[1]) * xv[1] + to_f32(wc[2]) * xv[2] + to_f32(wc[3]) * xv[3];
  out[ulong(t) * p.conv_dim + c] = silu(acc);
}

template [[host_name("linear_attn_conv1d_f32")]] [[kernel]] decltype(linear_attn_conv1d<float>) linear_attn_conv1d<float>;
template [[host_name("linear_attn_conv1d_bf16")]] [[kernel]] decltype(linear_attn_conv1d<bf16>) linear_attn_conv1d<bf16>;
template [[host_name("linear_attn_conv1d_f16")]] [[kernel]] decltype(linear_attn_conv1d<half>) linear_attn_conv1d<half>;

// conv_state = the last 3 inputs (from this call, or the old state when n_tokens < 3).
// Thread c reads its column of the old state before writing it.
[[kernel]] void linear_attn_conv1d_state(constant ConvParams& p [[buffer(0)]],
                                         device const float* qkv_in [[buffer(1)]],
                                         device float* state [[buffer(2)]],
                                         uint c [[thread_position_in_grid]]) {
  if (c >= p.conv_dim) return;
  float old[3];
  for (uint i = 0; i < 3; ++i) old[i] = state[ulong(i) * p.conv_dim + c];
  for (uint i = 0; i < 3; ++i) {
    const uint at = p.n_tokens + i;  // position of the new row i in (old state ++ inputs)
    state[ulong(i) * p.conv_dim + c] = at >= 3 ? qkv_in[ulong(at - 3) * p.conv_dim + c] : old[at];
  }
}

// g = exp(-exp(A_log[h]) * softplus(alpha + dt_bias[h])), beta = sigmoid(beta_in) over
// n_tokens * num_v_heads; softplus is torch's (identity above 20).
template <typename W>
[[kernel]] void linear_attn_decay_beta(constant DecayParams& p [[buffer(0)]],
                                       device const float* alpha [[buffer(1)]],
                                       device const float* beta_in [[buffer(2)]],
                                       device const W* a_log [[buffer(3)]],
                                       device const W* dt_bias [[buffer(4)]],
                                       device float* g_out [[buffer(5)]],
                                       device float* beta_out [[buffer(6)]],
                                       uint i [[thread_position_in_grid]]) {
  if (i >= p.n) return;
  const uint h = i % p.num_v_heads;
  const float x = alpha[i] + to_f32(dt_bias[h]);
  float sp = x;
  if (x <= 20.0f) {
    // log1p(e) = log(u) * e / (u - 1) with u = 1 + e keeps full precision for small e.
    const float e = exp(x);
    const float u = 1.0f + e;
    sp = u == 1.0f ? e : log(u) * (e / (u - 1.0f));
  }
  g_out[i] = exp(-exp(to_f32(a_log[h])) * sp);
  beta_out[i] = sigmoid(beta_in[i]);
}

template [[host_name("linear_attn_decay_beta_f32")]] [[kernel]] decltype(linear_attn_decay_beta<float>) linear_attn_decay_beta<float>;
template [[host_name("linear_attn_decay_beta_bf16")]] [[kernel]] decltype(linear_attn_decay_beta<bf16>) linear_attn_decay_beta<bf16>;
template [[host_name("linear_attn_decay_beta_f16")]] [[kernel]] decltype(linear_attn_decay_beta<half>) linear_attn_decay_beta<half>;

// The delta rule token by token. Simdgroup (column j, value head h) keeps column j of the
// head's state S [key_dim, value_dim] in registers (lane l holds rows l, l+32, ...; key_dim <=
// 256) and per token computes kv = k.S[:, j] and o = q.S[:, j] with one simd_sum each:
// delta = beta * (v_j - g * kv); S[:, j] = g * S[:, j] + k * delta. No barriers.
[[kernel]] void linear_attn_delta_seq(constant DeltaParams& p [[buffer(0)]],
                                      device float* state [[buffer(1)]],
                                      device const float* conv [[buffer(2)]],
                                      device const float* g_decay [[buffer(3)]],
                                      device const float* beta [[buffer(4)]],
                                      device float* out [[buffer(5)]],
                                      uint2 tg [[threadgroup_position_in_grid]],
                                      uint sid [[simdgroup_index_in_threadgroup]],
                                      uint nsg [[simdgroups_per_threadgroup]],
                                      uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint MK = 8;
  const uint j = tg.x * nsg + sid;
  const uint h = tg.y;
  if (j >= p.value_dim) return;
  const uint dk = p.key_dim;
  const uint dv = p.value_dim;
  const uint nv = p.num_v_heads;
  const uint nk = nv / p.k_heads_per_v;
  const uint kh = h / p.k_heads_per_v;
  const ulong row = 2ul * nk * dk + ulong(nv) * dv;
  const uint mk = (dk + 31) / 32;
  device float* sh = state + ulong(h) * dk * dv + j;

  float s[MK];
  for (uint m = 0; m < MK; ++m) {
    const uint i = lane + 32 * m;
    s[m] = (m < mk && i < dk) ? sh[ulong(i) * dv] : 0.0f;
  }
  for (uint t = 0; t < p.n_tokens; ++t) {
    device const float* base = conv + ulong(t) * row;
    float qv[MK];
    float kv[MK];
    for (uint m = 0; m < MK; ++m) {
      const uint i = lane + 32 * m;
      const bool in = m < mk && i < dk;
      qv[m] = in ? base[kh * dk + i] : 0.0f;
      kv[m] = in ? base[nk * dk + kh * dk + i] : 0.0f;
    }
    const float v = base[2ul * nk * dk + ulong(h) * dv + j];
    const float g = g_decay[ulong(t) * nv + h];
    const float b = beta[ulong(t) * nv + h];
    float ks = 0.0f;
    for (uint m = 0; m < mk; ++m) ks = fma(kv[m], s[m], ks);
    ks = simd_sum(ks);
    const float delta = (v - g * ks) * b;
    float o = 0.0f;
    for (uint m = 0; m < mk; ++m) {
      s[m] = g * s[m] + kv[m] * delta;
      o = fma(qv[m], s[m], o);
    }
    o = simd_sum(o);
    if (lane == 0) out[ulong(t) * nv * dv + ulong(h) * dv + j] = o;
  }
  for (uint m = 0; m < mk; ++m) {
    const uint i = lane + 32 * m;
    if (i < dk) sh[ulong(i) * dv] = s[m];
  }
}

// The delta rule in chunks of `chunk` (<= 16) tokens (the WY form of the CPU kernel), as 16-row
// tiles on simdgroup matrices. Threadgroup (column block, value head): 4 simdgroups, each owning 8
// columns of the head's state (read and written in device memory). Per chunk, with
// D[i,j] = prod_{j<m<=i} g_m and E[i] = D[i,-1]:
//   U = K S0, QS = Q S0; delta = (I + L)^-1 beta (V - E U), L[i,j] = beta_i D[i,j] k_i.k_j (j < i);
//   O = E QS + A delta, A[i,j] = D[i,j] q_i.k_j (j <= i); S = E[last] S0 + (D[last,:] K)^T delta.
// Needs key_dim <= 128 and key_dim, value_dim multiples of 8 (the host checks).
[[kernel]] void linear_attn_delta_chunk(constant DeltaParams& p [[buffer(0)]],
                                        device float* state [[buffer(1)]],
                                        device const float* conv [[buffer(2)]],
                                        device const float* g_decay [[buffer(3)]],
                                        device const float* beta [[buffer(4)]],
                                        device float* out [[buffer(5)]],
                                        uint2 tg [[threadgroup_position_in_grid]],
                                        uint tid [[thread_index_in_threadgroup]],
                                        uint sid [[simdgroup_index_in_threadgroup]]) {
  constexpr uint C = 16;
  constexpr uint MAXK = 128;
  constexpr uint CB = 32;  // columns per threadgroup
  constexpr uint NT = 128;
  threadgroup float ks[C * MAXK];
  threadgroup float qs[C * MAXK];  // Q, later the decayed keys D[last, j] k_j
  threadgroup float dec[C * C];
  threadgroup float att[C * C];
  threadgroup float lmat[C * C];
  threadgroup float cum[C];
  threadgroup float gg[C];
  threadgroup float bet[C];
  threadgroup float ut[C * CB];  // U, then delta
  threadgroup float qst[C * CB];
  threadgroup float ot[C * CB];

  const uint dk = p.key_dim;
  const uint dv = p.value_dim;
  const uint nv = p.num_v_heads;
  const uint nk = nv / p.k_heads_per_v;
  const uint h = tg.y;
  const uint kh = h / p.k_heads_per_v;
  const ulong row = 2ul * nk * dk + ulong(nv) * dv;
  const uint cb0 = tg.x * CB;
  const uint col0 = cb0 + sid * 8;  // this simdgroup's 8 columns
  const bool active = col0 < dv;
  device float* sh = state + ulong(h) * dk * dv;
  const uint chunk = clamp(p.chunk, 1u, C);

  for (uint t0 = 0; t0 < p.n_tokens; t0 += chunk) {
    const uint len = min(chunk, p.n_tokens - t0);
    for (uint idx = tid; idx < C * dk; idx += NT) {
      const uint i = idx / dk;
      const uint r = idx - i * dk;
      device const float* base = conv + ulong(t0 + i) * row;
      ks[idx] = i < len ? base[nk * dk + kh * dk + r] : 0.0f;
      qs[idx] = i < len ? base[kh * dk + r] : 0.0f;
    }
    if (tid < C) {
      gg[tid] = tid < len ? g_decay[ulong(t0 + tid) * nv + h] : 1.0f;
      bet[tid] = tid < len ? beta[ulong(t0 + tid) * nv + h] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint idx = tid; idx < C * C; idx += NT) {
      const uint i = idx / C;
      const uint j = idx - i * C;
      float d = 0.0f;
      if (j <= i) {
        d = 1.0f;
        for (uint m = j + 1; m <= i; ++m) d *= gg[m];
      }
      dec[idx] = d;
      if (j == 0) {
        cum[i] = d * gg[0];
      }
    }
    // Q K^T and K K^T, one 8x8 block per simdgroup.
    {
      const uint bi = sid / 2;
      const uint bj = sid % 2;
      simdgroup_float8x8 aq = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 ak = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (uint kb = 0; kb < dk; kb += 8) {
        simdgroup_float8x8 mq;
        simdgroup_float8x8 mk;
        simdgroup_float8x8 mkt;
        simdgroup_load(mq, qs + bi * 8 * dk + kb, dk);
        simdgroup_load(mk, ks + bi * 8 * dk + kb, dk);
        simdgroup_load(mkt, ks + bj * 8 * dk + kb, dk, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(aq, mq, mkt, aq);
        simdgroup_multiply_accumulate(ak, mk, mkt, ak);
      }
      simdgroup_store(aq, att + bi * 8 * C + bj * 8, C);
      simdgroup_store(ak, lmat + bi * 8 * C + bj * 8, C);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint idx = tid; idx < C * C; idx += NT) {
      const uint i = idx / C;
      const uint j = idx - i * C;
      att[idx] = j <= i ? dec[idx] * att[idx] : 0.0f;
      lmat[idx] = j < i ? (bet[i] * dec[idx]) * lmat[idx] : 0.0f;
    }
    // U = K S0 and QS = Q S0 for this simdgroup's columns.
    if (active) {
      simdgroup_float8x8 u[2];
      simdgroup_float8x8 qv[2];
      for (uint rb = 0; rb < 2; ++rb) {
        u[rb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        qv[rb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      for (uint kb = 0; kb < dk; kb += 8) {
        simdgroup_float8x8 sb;
        simdgroup_load(sb, sh + ulong(kb) * dv + col0, dv);
        for (uint rb = 0; rb < 2; ++rb) {
          simdgroup_float8x8 a;
          simdgroup_load(a, ks + rb * 8 * dk + kb, dk);
          simdgroup_multiply_accumulate(u[rb], a, sb, u[rb]);
          simdgroup_load(a, qs + rb * 8 * dk + kb, dk);
          simdgroup_multiply_accumulate(qv[rb], a, sb, qv[rb]);
        }
      }
      for (uint rb = 0; rb < 2; ++rb) {
        simdgroup_store(u[rb], ut + rb * 8 * CB + sid * 8, CB);
        simdgroup_store(qv[rb], qst + rb * 8 * CB + sid * 8, CB);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Right-hand side and forward substitution, one thread per column.
    if (tid < CB && cb0 + tid < dv) {
      const uint c = tid;
      for (uint i = 0; i < C; ++i) {
        const float v = i < len ? conv[ulong(t0 + i) * row + 2ul * nk * dk + ulong(h) * dv + cb0 + c] : 0.0f;
        float d = (v - cum[i] * ut[i * CB + c]) * bet[i];
        for (uint j = 0; j < i; ++j) d += -lmat[i * C + j] * ut[j * CB + c];
        ut[i * CB + c] = d;
      }
    }
    // The decayed keys for the state update replace Q (no longer needed).
    for (uint idx = tid; idx < C * dk; idx += NT) {
      const uint j = idx / dk;
      qs[idx] = dec[(len - 1) * C + j] * ks[idx];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (active) {
      // O = A delta.
      for (uint rb = 0; rb < 2; ++rb) {
        simdgroup_float8x8 o = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (uint kb = 0; kb < 2; ++kb) {
          simdgroup_float8x8 a;
          simdgroup_float8x8 d;
          simdgroup_load(a, att + rb * 8 * C + kb * 8, C);
          simdgroup_load(d, ut + kb * 8 * CB + sid * 8, CB);
          simdgroup_multiply_accumulate(o, a, d, o);
        }
        simdgroup_store(o, ot + rb * 8 * CB + sid * 8, CB);
      }
      // S = E[last] S0 + (decayed K)^T delta, block by block of 8 state rows.
      const float el = cum[len - 1];
      for (uint rb = 0; rb < dk; rb += 8) {
        simdgroup_float8x8 acc;
        simdgroup_load(acc, sh + ulong(rb) * dv + col0, dv);
        acc.thread_elements()[0] *= el;
        acc.thread_elements()[1] *= el;
        for (uint kb = 0; kb < 2; ++kb) {
          simdgroup_float8x8 a;
          simdgroup_float8x8 d;
          simdgroup_load(a, qs + kb * 8 * dk + rb, dk, ulong2(0, 0), true);
          simdgroup_load(d, ut + kb * 8 * CB + sid * 8, CB);
          simdgroup_multiply_accumulate(acc, a, d, acc);
        }
        simdgroup_store(acc, sh + ulong(rb) * dv + col0, dv);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint idx = tid; idx < C * CB; idx += NT) {
      const uint i = idx / CB;
      const uint c = idx - i * CB;
      if (i < len && cb0 + c < dv) {
        out[ulong(t0 + i) * nv * dv + ulong(h) * dv + cb0 + c] = cum[i] * qst[i * CB + c] + ot[i * CB + c];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
