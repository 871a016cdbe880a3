// Kernels written the way production MSL is (MLX style: templates, helper functions,
// threadgroup staging, simdgroup reductions, packed weights), to keep the shim honest.
#include <metal_stdlib>
#include <metal_simdgroup>
using namespace metal;

#define METAL_FUNC inline __attribute__((always_inline))

struct EmuRmsParams {
  uint dim;
  float eps;
};

template <typename T>
METAL_FUNC float load_f(const device T* p, uint i) {
  return static_cast<float>(p[i]);
}

// y = x / sqrt(mean(x^2) + eps) * w, one row per threadgroup, 8 simdgroups.
template <typename T>
[[kernel]] void emu_rms_norm(const device T* x [[buffer(0)]],
                             const device T* w [[buffer(1)]],
                             device T* y [[buffer(2)]],
                             constant EmuRmsParams& p [[buffer(3)]],
                             uint row [[threadgroup_position_in_grid]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]],
                             uint ntg [[threads_per_threadgroup]]) {
  constexpr int kSimds = 8;
  threadgroup float partial[kSimds];
  const device T* xr = x + row * p.dim;
  float acc = 0.0f;
  for (uint i = tid; i < p.dim; i += ntg) {
    float v = load_f(xr, i);
    acc += v * v;
  }
  acc = simd_sum(acc);
  if (lane == 0) partial[sg] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float t = lane < uint(kSimds) ? partial[lane] : 0.0f;
    t = simd_sum(t);
    if (lane == 0) partial[0] = t;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float inv = metal::precise::rsqrt(partial[0] / float(p.dim) + p.eps);
  for (uint i = tid; i < p.dim; i += ntg) {
    y[row * p.dim + i] = static_cast<T>(load_f(xr, i) * inv * load_f(w, i));
  }
}
template [[host_name("emu_rms_norm_f32")]] [[kernel]] decltype(emu_rms_norm<float>) emu_rms_norm<float>;
template [[host_name("emu_rms_norm_bf16")]] [[kernel]] decltype(emu_rms_norm<bfloat>) emu_rms_norm<bfloat>;

// 4-bit affine dequant matvec (MLX layout): out[r] = sum_c (s * q + b) * x[c], groups of 64
// along a row; one simdgroup per row, x staged in threadgroup memory.
template <typename S, int group_size>
[[kernel]] void emu_qmv4(const device uint32_t* wq [[buffer(0)]],
                         const device S* scales [[buffer(1)]],
                         const device S* biases [[buffer(2)]],
                         const device float* x [[buffer(3)]],
                         device float* out [[buffer(4)]],
                         constant uint& in_dim [[buffer(5)]],
                         constant uint& out_dim [[buffer(6)]],
                         uint3 tgp [[threadgroup_position_in_grid]],
                         ushort lane [[thread_index_in_simdgroup]],
                         ushort sg [[simdgroup_index_in_threadgroup]],
                         ushort tid [[thread_index_in_threadgroup]]) {
  static_assert(group_size % 8 == 0, "groups hold whole words");
  threadgroup float xs[1024];
  for (uint i = tid; i < in_dim; i += 64) xs[i] = x[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint r = tgp.x * 2 + sg;
  if (r >= out_dim) return;  // whole simdgroup leaves after the last barrier
  const uint words = in_dim / 8;
  const uint groups = in_dim / group_size;
  thread float acc = 0.0f;
  for (uint wi = lane; wi < words; wi += 32) {
    uint32_t word = wq[r * words + wi];
    uint g = wi * 8 / group_size;
    float s = float(scales[r * groups + g]), b = float(biases[r * groups + g]);
    float4 xa = float4(xs[wi * 8 + 0], xs[wi * 8 + 1], xs[wi * 8 + 2], xs[wi * 8 + 3]);
    float4 xb = *reinterpret_cast<threadgroup const float4*>(&xs[wi * 8 + 4]);
    float4 qa, qb;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      qa[k] = float((word >> (4 * k)) & 0xfu);
      qb[k] = float((word >> (4 * (k + 4))) & 0xfu);
    }
    acc += s * (dot(qa, xa) + dot(qb, xb)) + b * (xa.x + xa.y + xa.z + xa.w + xb.x + xb.y + xb.z + xb.w);
  }
  acc = simd_sum(acc);
  if (simd_is_first()) out[r] = acc;
}
template [[host_name("emu_qmv4_f16_g64")]] [[kernel]] decltype(emu_qmv4<half, 64>) emu_qmv4<half, 64>;
template [[host_name("emu_qmv4_bf16_g64")]] [[kernel]] decltype(emu_qmv4<bfloat, 64>) emu_qmv4<bfloat, 64>;
