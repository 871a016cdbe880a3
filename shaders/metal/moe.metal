// moe.metal: the MoE block: SwiGLU, router softmax + top-k, weight normalisation, the residual
// combine, device-side routing (count, stable sort by expert), the grouped expert GEMM shared by
// both routed-expert ops (with a per-row matvec form for one token), and the deterministic
// scatter/combine of expert outputs.
#include "common.h"

// out = silu(gate) * up over n elements.
[[kernel]] void moe_swiglu(constant ElemParams& p [[buffer(0)]],
                           device const float* gate [[buffer(1)]],
                           device const float* up [[buffer(2)]],
                           device float* out [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
  if (i < p.n) out[i] = silu(gate[i]) * up[i];
}

// One simdgroup per token: softmax over n_experts, then k rounds of "largest probability below
// the previous pick" (ties: lower expert first), so no per-expert state is kept.
[[kernel]] void moe_softmax_topk(constant TopkParams& p [[buffer(0)]],
                                 device const float* logits [[buffer(1)]],
                                 device uint* idx_out [[buffer(2)]],
                                 device float* w_out [[buffer(3)]],
                                 uint t [[threadgroup_position_in_grid]],
                                 uint lane [[thread_index_in_simdgroup]]) {
  device const float* l = logits + ulong(t) * p.n_experts;
  float mx = -FLT_MAX;
  for (uint e = lane; e < p.n_experts; e += 32) mx = max(mx, l[e]);
  mx = simd_max(mx);
  float sum = 0.0f;
  for (uint e = lane; e < p.n_experts; e += 32) sum += exp(l[e] - mx);
  sum = simd_sum(sum);

  float last_p = 0.0f;
  uint last_i = 0;
  for (uint j = 0; j < p.k; ++j) {
    float bp = -1.0f;
    uint bi = 0xFFFFFFFFu;
    // A lane visits its experts in ascending order, so `>` keeps the lower index on ties.
    for (uint e = lane; e < p.n_experts; e += 32) {
      const float pe = exp(l[e] - mx) / sum;
      const bool below = j == 0 || pe < last_p || (pe == last_p && e > last_i);
      if (below && pe > bp) {
        bp = pe;
        bi = e;
      }
    }
    const float best = simd_max(bp);
    const uint at = simd_min(bp == best ? bi : 0xFFFFFFFFu);
    if (lane == 0) {
      idx_out[ulong(t) * p.k + j] = at;
      w_out[ulong(t) * p.k + j] = best;
    }
    last_p = best;
    last_i = at;
  }
}

// w /= sum(w) per token when the sum is positive (summed in order, one thread per token).
[[kernel]] void moe_normalize(constant NormalizeParams& p [[buffer(0)]],
                              device float* w [[buffer(1)]],
                              uint t [[thread_position_in_grid]]) {
  if (t >= p.n_tokens) return;
  device float* wt = w + ulong(t) * p.k;
  float sum = 0.0f;
  for (uint j = 0; j < p.k; ++j) sum += wt[j];
  if (sum > 0.0f) {
    for (uint j = 0; j < p.k; ++j) wt[j] = wt[j] / sum;
  }
}

// hidden = h_mid + moe_sum + sigmoid(shared_gate[t]) * shared_out over n_tokens * dim.
[[kernel]] void moe_combine(constant CombineParams& p [[buffer(0)]],
                            device const float* h_mid [[buffer(1)]],
                            device const float* moe_sum [[buffer(2)]],
                            device const float* shared_out [[buffer(3)]],
                            device const float* shared_gate [[buffer(4)]],
                            device float* out [[buffer(5)]],
                            uint i [[thread_position_in_grid]]) {
  if (i >= p.n_tokens * p.dim) return;
  const float g = sigmoid(shared_gate[i / p.dim]);
  out[i] = h_mid[i] + moe_sum[i] + g * shared_out[i];
}

// htpe[e] = number of assignments routed to expert e; one simdgroup per expert.
[[kernel]] void moe_route_count(constant RouteParams& p [[buffer(0)]],
                                device const uint* indices [[buffer(1)]],
                                device uint* htpe [[buffer(2)]],
                                uint g [[threadgroup_position_in_grid]],
                                uint sid [[simdgroup_index_in_threadgroup]],
                                uint nsg [[simdgroups_per_threadgroup]],
                                uint lane [[thread_index_in_simdgroup]]) {
  const uint e = g * nsg + sid;
  if (e >= p.n_experts) return;
  uint cnt = 0;
  for (uint a = lane; a < p.n_assign; a += 32) cnt += indices[a] == e ? 1u : 0u;
  cnt = simd_sum(cnt);
  if (lane == 0) htpe[e] = cnt;
}

// hids = assignment ids sorted by expert, stable: the simdgroup of expert e starts at the sum
// of the earlier counts and places its assignments in ascending order with a prefix sum.
[[kernel]] void moe_route_sort(constant RouteParams& p [[buffer(0)]],
                               device const uint* indices [[buffer(1)]],
                               device const uint* htpe [[buffer(2)]],
                               device uint* hids [[buffer(3)]],
                               uint g [[threadgroup_position_in_grid]],
                               uint sid [[simdgroup_index_in_threadgroup]],
                               uint nsg [[simdgroups_per_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
  const uint e = g * nsg + sid;
  if (e >= p.n_experts) return;
  uint start = 0;
  for (uint i = lane; i < e; i += 32) start += htpe[i];
  start = simd_sum(start);
  uint placed = 0;
  for (uint base = 0; base < p.n_assign; base += 32) {
    const uint a = base + lane;
    const uint hit = (a < p.n_assign && indices[a] == e) ? 1u : 0u;
    const uint before = simd_prefix_exclusive_sum(hit);
    if (hit != 0 && start + placed + before < p.n_assign) hids[start + placed + before] = a;
    placed += simd_sum(hit);
  }
}

// out_sum[t] = sum_j weights[t*k+j] * y[t*k+j], j ascending (y rows in assignment order).
[[kernel]] void moe_gather_combine(constant GatherCombineParams& p [[buffer(0)]],
                                   device const float* weights [[buffer(1)]],
                                   device const float* y [[buffer(2)]],
                                   device float* out [[buffer(3)]],
                                   uint i [[thread_position_in_grid]]) {
  if (i >= p.n_tokens * p.hidden) return;
  const uint t = i / p.hidden;
  const uint d = i - t * p.hidden;
  float o = 0.0f;
  for (uint j = 0; j < p.k; ++j) {
    const ulong a = ulong(t) * p.k + j;
    o += weights[a] * y[a * p.hidden + d];
  }
  out[i] = o;
}

// dst[j] = src[idx[j]] for n_rows rows of `hidden` (rows with an index out of range get zeros).
[[kernel]] void moe_gather_rows(constant GatherRowsParams& p [[buffer(0)]],
                                device const float* src [[buffer(1)]],
                                device const uint* idx [[buffer(2)]],
                                device float* dst [[buffer(3)]],
                                uint i [[thread_position_in_grid]]) {
  if (i >= p.n_rows * p.hidden) return;
  const uint j = i / p.hidden;
  const uint s = idx[j];
  dst[i] = s < p.n_src_rows ? src[ulong(s) * p.hidden + (i - j * p.hidden)] : 0.0f;
}

// out[t] = sum over assignments j (ascending) with tok[j] == t of w[j] * y[j]; rows of tokens
// without assignments become zero. One thread per column keeps every sum in a fixed order.
[[kernel]] void moe_bucket_accumulate(constant BucketAccParams& p [[buffer(0)]],
                                      device const uint* tok [[buffer(1)]],
                                      device const float* w [[buffer(2)]],
                                      device const float* y [[buffer(3)]],
                                      device float* out [[buffer(4)]],
                                      uint d [[thread_position_in_grid]]) {
  if (d >= p.hidden) return;
  for (uint t = 0; t < p.n_tokens; ++t) out[ulong(t) * p.hidden + d] = 0.0f;
  for (uint j = 0; j < p.total; ++j) {
    const uint t = tok[j];
    if (t < p.n_tokens) out[ulong(t) * p.hidden + d] += w[j] * y[ulong(j) * p.hidden + d];
  }
}

// Where routed row r reads its input, which expert slot it uses and which output row it writes.
// An out-of-range index marks the row invalid (slot 0xFFFFFFFF): it is skipped.
struct RowRoute {
  uint src;
  uint slot;
  uint dst;
};

inline uint bucket_of(constant uint* buckets, uint n_buckets, uint r) {
  // The last b with buckets[b] <= r (buckets is non-decreasing, buckets[0] = 0).
  uint lo = 0;
  uint hi = n_buckets;
  while (hi - lo > 1) {
    const uint mid = (lo + hi) / 2;
    if (buckets[mid] <= r) lo = mid; else hi = mid;
  }
  return lo;
}

inline RowRoute route_row(constant MoeGemmParams& p, uint r, device const uint* ra,
                          device const uint* rb, constant uint* buckets) {
  RowRoute rr = {0u, 0xFFFFFFFFu, 0u};
  if (r >= p.rows) return rr;
  if (p.mode <= 1) {
    // Gather-id: ra = hids (sorted assignment ids), rb = indices (expert per assignment).
    const uint a = ra[r];
    if (a >= p.rows) return rr;
    rr.src = p.mode == 0 ? a / p.k : r;
    rr.dst = p.mode == 0 ? r : a;
    rr.slot = rb[a];
  } else {
    // Buckets: ra = token index per assignment, rb = expert slot per bucket.
    rr.src = p.mode == 2 ? ra[r] : r;
    rr.dst = r;
    rr.slot = rb[bucket_of(buckets, p.n_buckets, r)];
  }
  if (rr.src >= p.n_src_rows || rr.slot >= p.n_slots) rr.slot = 0xFFFFFFFFu;
  return rr;
}

// Grouped expert GEMM: routed rows in tiles of 32 x 32 outputs; a tile's rows are walked in runs
// of one expert (rows are grouped by expert), each run a tiled GEMM against that expert's block
// (as in matvec_qmm) with the other rows zeroed. GU: gate and up together from the same input
// tile; writes up (out1), silu(gate) * up (out0) and, if write_gate, gate (out2). Otherwise the
// down projection into out0.
template <int BITS, typename S, bool GU>
[[kernel]] void moe_ggemm(constant MoeGemmParams& p [[buffer(0)]],
                          device const uchar* experts [[buffer(1)]],
                          device const float* x [[buffer(2)]],
                          device const uint* ra [[buffer(3)]],
                          device const uint* rb [[buffer(4)]],
                          constant uint* buckets [[buffer(5)]],
                          device float* out0 [[buffer(6)]],
                          device float* out1 [[buffer(7)]],
                          device float* out2 [[buffer(8)]],
                          uint2 tg [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint sid [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BM = 32;
  constexpr uint BN = 32;
  constexpr uint BK = 32;
  constexpr uint LD = BK + 4;
  constexpr uint NT = 128;
  constexpr uint NP = GU ? 2 : 1;
  constexpr uint PW = 32 / BITS;
  constexpr uint WPT = BK / PW;
  threadgroup float xs[BM * LD];
  threadgroup float ws[NP * BN * LD];
  threadgroup uint row_src[BM];
  threadgroup uint row_slot[BM];
  threadgroup uint row_dst[BM];

  const uint n0 = tg.x * BN;
  const uint r0 = tg.y * BM;
  const uint wpr = p.in_dim / PW;
  const uint gpr = p.in_dim / p.group_size;
  const uint sm = (sid / 2) * 16;
  const uint sn = (sid % 2) * 16;
  if (tid < BM) {
    const RowRoute rr = route_row(p, r0 + tid, ra, rb, buckets);
    row_src[tid] = rr.src;
    row_slot[tid] = rr.slot;
    row_dst[tid] = rr.dst;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  uint seg = 0;
  while (seg < BM) {
    const uint slot = row_slot[seg];
    uint end = seg + 1;
    while (end < BM && row_slot[end] == slot) ++end;
    if (slot != 0xFFFFFFFFu) {
      device const uchar* blk = experts + ulong(slot) * p.stride;
      simdgroup_float8x8 c[NP][2][2];
      for (uint q = 0; q < NP; ++q)
        for (uint i = 0; i < 2; ++i)
          for (uint j = 0; j < 2; ++j) c[q][i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

      for (uint k0 = 0; k0 < p.in_dim; k0 += BK) {
        {
          const uint r = tid / 4;
          const uint cc = (tid % 4) * 8;
          const bool in = r >= seg && r < end;
          device const float* xr = x + ulong(row_src[r]) * p.in_dim + k0 + cc;
          for (uint j = 0; j < 8; ++j) xs[r * LD + cc + j] = in ? xr[j] : 0.0f;
        }
        for (uint q = 0; q < NP; ++q) {
          device const uint* w = (device const uint*)(blk + p.off[3 * q]);
          device const S* sc = (device const S*)(blk + p.off[3 * q + 1]);
          device const S* bi = (device const S*)(blk + p.off[3 * q + 2]);
          for (uint idx = tid; idx < BN * WPT; idx += NT) {
            const uint r = idx / WPT;
            const uint wi = idx - r * WPT;
            const uint gn = n0 + r;
            threadgroup float* dst = ws + (q * BN + r) * LD + wi * PW;
            if (gn < p.out_dim) {
              const uint word = w[ulong(gn) * wpr + k0 / PW + wi];
              const ulong gi = ulong(gn) * gpr + k0 / p.group_size;
              const float s = to_f32(sc[gi]);
              const float b = to_f32(bi[gi]);
              for (uint j = 0; j < PW; ++j) dst[j] = s * q_field<BITS>(word, j) + b;
            } else {
              for (uint j = 0; j < PW; ++j) dst[j] = 0.0f;
            }
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < BK; kk += 8) {
          simdgroup_float8x8 a[2];
          for (uint i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (sm + 8 * i) * LD + kk, LD);
          for (uint q = 0; q < NP; ++q) {
            simdgroup_float8x8 bt[2];
            for (uint j = 0; j < 2; ++j)
              simdgroup_load(bt[j], ws + (q * BN + sn + 8 * j) * LD + kk, LD, ulong2(0, 0), true);
            for (uint i = 0; i < 2; ++i)
              for (uint j = 0; j < 2; ++j) simdgroup_multiply_accumulate(c[q][i][j], a[i], bt[j], c[q][i][j]);
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }

      // Part 0 to xs, part 1 (up) to ws, then the run's rows go out.
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          simdgroup_store(c[0][i][j], xs + (sm + 8 * i) * LD + sn + 8 * j, LD);
          if (GU) simdgroup_store(c[NP - 1][i][j], ws + (sm + 8 * i) * LD + sn + 8 * j, LD);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (uint idx = tid; idx < BM * BN; idx += NT) {
        const uint r = idx / BN;
        const uint cc = idx - r * BN;
        if (r >= seg && r < end && n0 + cc < p.out_dim) {
          const ulong o = ulong(row_dst[r]) * p.out_dim + n0 + cc;
          const float v0 = xs[r * LD + cc];
          if (GU) {
            const float u = ws[r * LD + cc];
            out1[o] = u;
            out0[o] = silu(v0) * u;
            if (p.write_gate != 0) out2[o] = v0;
          } else {
            out0[o] = v0;
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    seg = end;
  }
}

// The grouped expert product for few routed rows (decode), where the tiled GEMM would leave the
// GPU idle: threadgroup (row block, routed row r) runs matvec_qmv's dedicated matvec on r's expert
// block, 4 simdgroups x 4 output rows, the input staged in threadgroup memory. GU computes gate
// and up from one staged input. Outputs as in moe_ggemm.
template <int BITS, typename S, bool GU>
[[kernel]] void moe_gmv(constant MoeGemmParams& p [[buffer(0)]],
                        device const uchar* experts [[buffer(1)]],
                        device const float* x [[buffer(2)]],
                        device const uint* ra [[buffer(3)]],
                        device const uint* rb [[buffer(4)]],
                        constant uint* buckets [[buffer(5)]],
                        device float* out0 [[buffer(6)]],
                        device float* out1 [[buffer(7)]],
                        device float* out2 [[buffer(8)]],
                        uint2 tg [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint sid [[simdgroup_index_in_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint NSG = 4;
  constexpr uint R = 4;
  constexpr uint XC = 2048;
  constexpr uint PW = 32 / BITS;
  constexpr uint VPT = 2 * PW;
  constexpr uint BLOCK = 32 * VPT;
  constexpr uint NP = GU ? 2 : 1;
  threadgroup float xs[XC];

  // The route depends only on the threadgroup, so a skipped row returns as a whole group.
  const RowRoute rr = route_row(p, tg.y, ra, rb, buckets);
  if (rr.slot == 0xFFFFFFFFu) return;
  device const uchar* blk = experts + ulong(rr.slot) * p.stride;
  const uint row0 = (tg.x * NSG + sid) * R;
  const uint wpr = p.in_dim / PW;
  const uint gpr = p.in_dim / p.group_size;
  device const float* xt = x + ulong(rr.src) * p.in_dim;
  float acc[NP][R];
  for (uint q = 0; q < NP; ++q)
    for (uint r = 0; r < R; ++r) acc[q][r] = 0.0f;

  for (uint c0 = 0; c0 < p.in_dim; c0 += XC) {
    const uint len = min(XC, p.in_dim - c0);
    for (uint i = tid; i < len; i += NSG * 32) xs[i] = xt[c0 + i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint b0 = 0; b0 < len; b0 += BLOCK) {
      const uint v0 = b0 + lane * VPT;
      if (v0 < len) {
        float xl[VPT];
        for (uint j = 0; j < VPT; ++j) xl[j] = xs[v0 + j];
        const float xsum = q_prescale<BITS>(xl) + q_prescale<BITS>(xl + PW);
        for (uint q = 0; q < NP; ++q) {
          device const uint* w = (device const uint*)(blk + p.off[3 * q]);
          device const S* sc = (device const S*)(blk + p.off[3 * q + 1]);
          device const S* bi = (device const S*)(blk + p.off[3 * q + 2]);
          qmv_rows<BITS, S, R>(xl, xsum, c0 + v0, w, sc, bi, row0, p.out_dim, wpr, gpr, p.group_size, acc[q]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint r = 0; r < R; ++r) {
    const float v0 = simd_sum(acc[0][r]);
    const float v1 = GU ? simd_sum(acc[NP - 1][r]) : 0.0f;
    const uint row = row0 + r;
    if (lane == 0 && row < p.out_dim) {
      const ulong o = ulong(rr.dst) * p.out_dim + row;
      if (GU) {
        out1[o] = v1;
        out0[o] = silu(v0) * v1;
        if (p.write_gate != 0) out2[o] = v0;
      } else {
        out0[o] = v0;
      }
    }
  }
}


template [[host_name("moe_ggemm_gu_b4_f32")]] [[kernel]] decltype(moe_ggemm<4, float, true>) moe_ggemm<4, float, true>;
template [[host_name("moe_ggemm_gu_b4_bf16")]] [[kernel]] decltype(moe_ggemm<4, bf16, true>) moe_ggemm<4, bf16, true>;
template [[host_name("moe_ggemm_gu_b4_f16")]] [[kernel]] decltype(moe_ggemm<4, half, true>) moe_ggemm<4, half, true>;
template [[host_name("moe_ggemm_gu_b8_f32")]] [[kernel]] decltype(moe_ggemm<8, float, true>) moe_ggemm<8, float, true>;
template [[host_name("moe_ggemm_gu_b8_bf16")]] [[kernel]] decltype(moe_ggemm<8, bf16, true>) moe_ggemm<8, bf16, true>;
template [[host_name("moe_ggemm_gu_b8_f16")]] [[kernel]] decltype(moe_ggemm<8, half, true>) moe_ggemm<8, half, true>;
template [[host_name("moe_ggemm_down_b4_f32")]] [[kernel]] decltype(moe_ggemm<4, float, false>) moe_ggemm<4, float, false>;
template [[host_name("moe_ggemm_down_b4_bf16")]] [[kernel]] decltype(moe_ggemm<4, bf16, false>) moe_ggemm<4, bf16, false>;
template [[host_name("moe_ggemm_down_b4_f16")]] [[kernel]] decltype(moe_ggemm<4, half, false>) moe_ggemm<4, half, false>;
template [[host_name("moe_ggemm_down_b8_f32")]] [[kernel]] decltype(moe_ggemm<8, float, false>) moe_ggemm<8, float, false>;
template [[host_name("moe_ggemm_down_b8_bf16")]] [[kernel]] decltype(moe_ggemm<8, bf16, false>) moe_ggemm<8, bf16, false>;
template [[host_name("moe_ggemm_down_b8_f16")]] [[kernel]] decltype(moe_ggemm<8, half, false>) moe_ggemm<8, half, false>;
template [[host_name("moe_gmv_gu_b4_f32")]] [[kernel]] decltype(moe_gmv<4, float, true>) moe_gmv<4, float, true>;
template [[host_name("moe_gmv_gu_b4_bf16")]] [[kernel]] decltype(moe_gmv<4, bf16, true>) moe_gmv<4, bf16, true>;
template [[host_name("moe_gmv_gu_b4_f16")]] [[kernel]] decltype(moe_gmv<4, half, true>) moe_gmv<4, half, true>;
template [[host_name("moe_gmv_gu_b8_f32")]] [[kernel]] decltype(moe_gmv<8, float, true>) moe_gmv<8, float, true>;
template [[host_name("moe_gmv_gu_b8_bf16")]] [[kernel]] decltype(moe_gmv<8, bf16, true>) moe_gmv<8, bf16, true>;
template [[host_name("moe_gmv_gu_b8_f16")]] [[kernel]] decltype(moe_gmv<8, half, true>) moe_gmv<8, half, true>;
template [[host_name("moe_gmv_down_b4_f32")]] [[kernel]] decltype(moe_gmv<4, float, false>) moe_gmv<4, float, false>;
template [[host_name("moe_gmv_down_b4_bf16")]] [[kernel]] decltype(moe_gmv<4, bf16, false>) moe_gmv<4, bf16, false>;
template [[host_name("moe_gmv_down_b4_f16")]] [[kernel]] decltype(moe_gmv<4, half, false>) moe_gmv<4, half, false>;
template [[host_name("moe_gmv_down_b8_f32")]] [[kernel]] decltype(moe_gmv<8, float, false>) moe_gmv<8, float, false>;
template [[host_name("moe_gmv_down_b8_bf16")]] [[kernel]] decltype(moe_gmv<8, bf16, false>) moe_gmv<8, bf16, false>;
template [[host_name("moe_gmv_down_b8_f16")]] [[kernel]] decltype(moe_gmv<8, half, false>) moe_gmv<8, half, false>;
