// matvec.metal: MLX-affine 4/8-bit matrices: a dedicated matvec for one token (or a few), a
// tiled GEMM on simdgroup matrices for many tokens, and the embedding row gather. Weights are
// bound three times (packed words, scales, biases at their byte offsets); `S` is the stored type
// of scales and biases.
#include "common.h"

// y[t] = dequant(W) x[t] for the token t = grid.y. Each simdgroup owns 4 consecutive rows and
// each threadgroup 4 simdgroups (16 rows). The input is staged in threadgroup memory 2048 floats
// at a time; lane l takes 2 words (16 or 8 values) of every 32-lane block, prescales those inputs
// once and reuses them, and their sum, for its 4 rows: per group `s * dot(q, x) + b * sum(x)`.
template <int BITS, typename S>
[[kernel]] void matvec_qmv(constant QmvParams& p [[buffer(0)]],
                           device const uint* w [[buffer(1)]],
                           device const S* scales [[buffer(2)]],
                           device const S* biases [[buffer(3)]],
                           device const float* x [[buffer(4)]],
                           device float* y [[buffer(5)]],
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
  threadgroup float xs[XC];

  const uint row0 = (tg.x * NSG + sid) * R;
  const uint t = tg.y;
  const uint wpr = p.in_dim / PW;
  const uint gpr = p.in_dim / p.group_size;
  device const float* xt = x + ulong(t) * p.in_dim;
  float acc[R] = {0.0f, 0.0f, 0.0f, 0.0f};

  for (uint c0 = 0; c0 < p.in_dim; c0 += XC) {
    const uint len = min(XC, p.in_dim - c0);
    for (uint i = tid; i < len; i += NSG * 32) xs[i] = xt[c0 + i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // len is a multiple of 32 (in_dim is a multiple of the group size), so a lane's VPT values
    // lie all inside or all outside the chunk, and inside one group.
    for (uint b0 = 0; b0 < len; b0 += BLOCK) {
      const uint v0 = b0 + lane * VPT;
      if (v0 < len) {
        float xl[VPT];
        for (uint j = 0; j < VPT; ++j) xl[j] = xs[v0 + j];
        const float xsum = q_prescale<BITS>(xl) + q_prescale<BITS>(xl + PW);
        qmv_rows<BITS, S, R>(xl, xsum, c0 + v0, w, scales, biases, row0, p.out_dim, wpr, gpr, p.group_size, acc);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint r = 0; r < R; ++r) {
    const float v = simd_sum(acc[r]);
    const uint row = row0 + r;
    if (lane == 0 && row < p.out_dim) y[ulong(t) * p.out_dim + row] = v;
  }
}

// Y[m, n] = X[m, :] . dequant(W)[n, :] in 32 x 32 output tiles, K in steps of 32 (a step never
// crosses a quantization group). Per step the X tile and the dequantized W tile go to
// threadgroup memory; the 4 simdgroups (2 x 2) each accumulate a 16 x 16 block as 2 x 2
// simdgroup 8x8 float matrices. Edge rows and columns are zero-filled and not stored.
template <int BITS, typename S>
[[kernel]] void matvec_qmm(constant QmmParams& p [[buffer(0)]],
                           device const uint* w [[buffer(1)]],
                           device const S* scales [[buffer(2)]],
                           device const S* biases [[buffer(3)]],
                           device const float* x [[buffer(4)]],
                           device float* y [[buffer(5)]],
                           uint2 tg [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint sid [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BM = 32;
  constexpr uint BN = 32;
  constexpr uint BK = 32;
  constexpr uint LD = BK + 4;
  constexpr uint NT = 128;
  constexpr uint PW = 32 / BITS;
  constexpr uint WPT = BK / PW;  // packed words per tile row and K step
  threadgroup float xs[BM * LD];
  threadgroup float ws[BN * LD];

  const uint n0 = tg.x * BN;
  const uint m0 = tg.y * BM;
  const uint wpr = p.k / PW;
  const uint gpr = p.k / p.group_size;
  const uint sm = (sid / 2) * 16;
  const uint sn = (sid % 2) * 16;
  simdgroup_float8x8 c[2][2];
  for (uint i = 0; i < 2; ++i)
    for (uint j = 0; j < 2; ++j) c[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (uint k0 = 0; k0 < p.k; k0 += BK) {
    {
      const uint r = tid / 4;
      const uint cc = (tid % 4) * 8;
      const uint gm = m0 + r;
      for (uint j = 0; j < 8; ++j) xs[r * LD + cc + j] = gm < p.m ? x[ulong(gm) * p.k + k0 + cc + j] : 0.0f;
    }
    for (uint idx = tid; idx < BN * WPT; idx += NT) {
      const uint r = idx / WPT;
      const uint wi = idx - r * WPT;
      const uint gn = n0 + r;
      threadgroup float* dst = ws + r * LD + wi * PW;
      if (gn < p.n) {
        const uint word = w[ulong(gn) * wpr + k0 / PW + wi];
        const ulong gi = ulong(gn) * gpr + k0 / p.group_size;
        const float s = to_f32(scales[gi]);
        const float b = to_f32(biases[gi]);
        for (uint j = 0; j < PW; ++j) dst[j] = s * q_field<BITS>(word, j) + b;
      } else {
        for (uint j = 0; j < PW; ++j) dst[j] = 0.0f;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_float8x8 a[2];
      simdgroup_float8x8 bt[2];
      for (uint i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (sm + 8 * i) * LD + kk, LD);
      for (uint j = 0; j < 2; ++j) simdgroup_load(bt[j], ws + (sn + 8 * j) * LD + kk, LD, ulong2(0, 0), true);
      for (uint i = 0; i < 2; ++i)
        for (uint j = 0; j < 2; ++j) simdgroup_multiply_accumulate(c[i][j], a[i], bt[j], c[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (uint i = 0; i < 2; ++i)
    for (uint j = 0; j < 2; ++j) simdgroup_store(c[i][j], xs + (sm + 8 * i) * LD + sn + 8 * j, LD);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint idx = tid; idx < BM * BN; idx += NT) {
    const uint r = idx / BN;
    const uint cc = idx - r * BN;
    if (m0 + r < p.m && n0 + cc < p.n) y[ulong(m0 + r) * p.n + n0 + cc] = xs[r * LD + cc];
  }
}

// out[t] = dequant(W)[ids[t]]: thread (i, t) expands packed word i of the row. An id outside
// the table leaves its row untouched (the host reports such ids where it can see them).
template <int BITS, typename S>
[[kernel]] void matvec_embed(constant EmbedParams& p [[buffer(0)]],
                             device const uint* w [[buffer(1)]],
                             device const S* scales [[buffer(2)]],
                             device const S* biases [[buffer(3)]],
                             device const uint* ids [[buffer(4)]],
                             device float* out [[buffer(5)]],
                             uint2 gid [[thread_position_in_grid]]) {
  constexpr uint PW = 32 / BITS;
  const uint wpr = p.hidden / PW;
  if (gid.x >= wpr || gid.y >= p.n_tokens) return;
  const uint id = ids[gid.y];
  if (id >= p.vocab) return;
  const uint word = w[ulong(id) * wpr + gid.x];
  const uint col = gid.x * PW;
  const ulong gi = ulong(id) * (p.hidden / p.group_size) + col / p.group_size;
  const float s = to_f32(scales[gi]);
  const float b = to_f32(biases[gi]);
  device float* o = out + ulong(gid.y) * p.hidden + col;
  for (uint j = 0; j < PW; ++j) o[j] = s * q_field<BITS>(word, j) + b;
}

template [[host_name("matvec_qmv_b4_f32")]] [[kernel]] decltype(matvec_qmv<4, float>) matvec_qmv<4, float>;
template [[host_name("matvec_qmv_b4_bf16")]] [[kernel]] decltype(matvec_qmv<4, bf16>) matvec_qmv<4, bf16>;
template [[host_name("matvec_qmv_b4_f16")]] [[kernel]] decltype(matvec_qmv<4, half>) matvec_qmv<4, half>;
template [[host_name("matvec_qmv_b8_f32")]] [[kernel]] decltype(matvec_qmv<8, float>) matvec_qmv<8, float>;
template [[host_name("matvec_qmv_b8_bf16")]] [[kernel]] decltype(matvec_qmv<8, bf16>) matvec_qmv<8, bf16>;
template [[host_name("matvec_qmv_b8_f16")]] [[kernel]] decltype(matvec_qmv<8, half>) matvec_qmv<8, half>;

template [[host_name("matvec_qmm_b4_f32")]] [[kernel]] decltype(matvec_qmm<4, float>) matvec_qmm<4, float>;
template [[host_name("matvec_qmm_b4_bf16")]] [[kernel]] decltype(matvec_qmm<4, bf16>) matvec_qmm<4, bf16>;
template [[host_name("matvec_qmm_b4_f16")]] [[kernel]] decltype(matvec_qmm<4, half>) matvec_qmm<4, half>;
template [[host_name("matvec_qmm_b8_f32")]] [[kernel]] decltype(matvec_qmm<8, float>) matvec_qmm<8, float>;
template [[host_name("matvec_qmm_b8_bf16")]] [[kernel]] decltype(matvec_qmm<8, bf16>) matvec_qmm<8, bf16>;
template [[host_name("matvec_qmm_b8_f16")]] [[kernel]] decltype(matvec_qmm<8, half>) matvec_qmm<8, half>;

template [[host_name("matvec_embed_b4_f32")]] [[kernel]] decltype(matvec_embed<4, float>) matvec_embed<4, float>;
template [[host_name("matvec_embed_b4_bf16")]] [[kernel]] decltype(matvec_embed<4, bf16>) matvec_embed<4, bf16>;
template [[host_name("matvec_embed_b4_f16")]] [[kernel]] decltype(matvec_embed<4, half>) matvec_embed<4, half>;
template [[host_name("matvec_embed_b8_f32")]] [[kernel]] decltype(matvec_embed<8, float>) matvec_embed<8, float>;
template [[host_name("matvec_embed_b8_bf16")]] [[kernel]] decltype(matvec_embed<8, bf16>) matvec_embed<8, bf16>;
template [[host_name("matvec_embed_b8_f16")]] [[kernel]] decltype(matvec_embed<8, half>) matvec_embed<8, half>;
