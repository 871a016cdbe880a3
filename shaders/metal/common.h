// common.h: helpers shared by every kernel family: stored-float conversions, activation
// functions, threadgroup reductions and the MLX-affine dequantization primitives.
#ifndef MOEFLUX_COMMON_H
#define MOEFLUX_COMMON_H
#include <metal_stdlib>
#include "params.h"
using namespace metal;

// A bf16 value as stored in the weight file (kept as bits so Metal < 3.1 compiles it).
struct bf16 {
  ushort bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(half x) { return float(x); }
inline float to_f32(bf16 x) { return as_type<float>(uint(x.bits) << 16); }

inline float silu(float x) { return x / (1.0f + exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }

// The threadgroup-wide sum of `v`, returned to every thread. `buf` holds one float per
// simdgroup; a caller that reduces twice must separate the calls with a barrier or use two
// buffers. Every thread adds the partials in the same order, so all get the same bits.
inline float tg_sum(float v, threadgroup float* buf, uint sid, uint lane, uint nsg) {
  v = simd_sum(v);
  if (lane == 0) buf[sid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float t = 0.0f;
  for (uint i = 0; i < nsg; ++i) t += buf[i];
  return t;
}

// MLX affine quantization: word `w` holds 32/BITS fields, least significant first, and a
// value is `scale * q + bias`. Multiplying the masked (not shifted) field `w & (m << BITS*j)`,
// which is q * 2^(BITS*j) exactly, by x * 2^-(BITS*j) gives q * x without a shift.

// Scale the 32/BITS inputs of one word for `qdot_word`; returns their (unscaled) sum.
template <int BITS>
inline float q_prescale(thread float* xs) {
  float sum = 0.0f;
  float f = 1.0f;
  for (int j = 0; j < 32 / BITS; ++j) {
    sum += xs[j];
    xs[j] *= f;
    f *= 1.0f / float(1 << BITS);
  }
  return sum;
}

// sum_j q_j * x_j over the fields of word `w`, with `xs` prescaled by `q_prescale`.
template <int BITS>
inline float qdot_word(uint w, thread const float* xs) {
  float acc = 0.0f;
  for (int j = 0; j < 32 / BITS; ++j) {
    acc = fma(float(w & (((1u << BITS) - 1u) << (BITS * j))), xs[j], acc);
  }
  return acc;
}

// Field j of word w, as a float.
template <int BITS>
inline float q_field(uint w, uint j) {
  return float((w >> (BITS * j)) & ((1u << BITS) - 1u));
}

// One 32-lane block step of the dedicated matvec (matvec_qmv, moe_gmv): this lane's 2 words of
// rows row0..row0+R, against its 2 * 32/BITS inputs `xl` (prescaled) whose plain sum is `xsum`
// and whose first column is `col`. Per group: s * dot(q, x) + b * sum(x), folded into FMAs.
template <int BITS, typename S, uint R>
inline void qmv_rows(thread const float* xl, float xsum, uint col, device const uint* w,
                     device const S* scales, device const S* biases, uint row0, uint out_dim, uint wpr,
                     uint gpr, uint group_size, thread float* acc) {
  const uint word = col / (32 / BITS);
  const uint grp = col / group_size;
  for (uint r = 0; r < R; ++r) {
    const uint row = row0 + r;
    if (row < out_dim) {
      device const uint* wr = w + ulong(row) * wpr + word;
      const float dq = qdot_word<BITS>(wr[0], xl) + qdot_word<BITS>(wr[1], xl + 32 / BITS);
      const ulong gi = ulong(row) * gpr + grp;
      acc[r] = fma(to_f32(scales[gi]), dq, fma(to_f32(biases[gi]), xsum, acc[r]));
    }
  }
}

#endif  // MOEFLUX_COMMON_H
