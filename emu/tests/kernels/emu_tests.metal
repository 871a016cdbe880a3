// Test kernels of the MSL emulator itself (tests/emu_harness.rs). Plain MSL: each one either
// checks a piece of the shim against a scalar reference or provokes a diagnostic on purpose.
#include <metal_stdlib>
using namespace metal;

struct EmuTestParams {
  uint n;
  float scale;
  float bias;
  uint pad;
};

kernel void emu_test_add(device const float* a [[buffer(0)]],
                         device const float* b [[buffer(1)]],
                         device float* c [[buffer(2)]],
                         constant uint& n [[buffer(3)]],
                         uint gid [[thread_position_in_grid]]) {
  if (gid < n) c[gid] = a[gid] + b[gid];
}

// Every builtin of every thread, 12 words each.
kernel void emu_test_ids(device uint* out [[buffer(0)]],
                         uint2 tpig [[thread_position_in_grid]],
                         uint2 tgpig [[threadgroup_position_in_grid]],
                         uint2 tptg [[thread_position_in_threadgroup]],
                         uint2 tgsize [[threads_per_threadgroup]],
                         uint2 grid [[threads_per_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         ushort lane [[thread_index_in_simdgroup]],
                         ushort sid [[simdgroup_index_in_threadgroup]]) {
  device uint* o = out + (tpig.y * grid.x + tpig.x) * 12;
  o[0] = tpig.x; o[1] = tpig.y; o[2] = tgpig.x; o[3] = tgpig.y; o[4] = tptg.x; o[5] = tptg.y;
  o[6] = tgsize.x; o[7] = tgsize.y; o[8] = tid; o[9] = lane; o[10] = sid; o[11] = 1;
}

// One sum per group through threadgroup memory; the last thread adds. Without the barrier it
// is right only when the last thread happens to run last (forward order), so the reverse
// schedule exposes the missing barrier.
kernel void emu_test_group_sum(device const float* x [[buffer(0)]],
                               device float* out [[buffer(1)]],
                               constant uint& with_barrier [[buffer(2)]],
                               uint gid [[thread_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint ntg [[threads_per_threadgroup]],
                               uint group [[threadgroup_position_in_grid]]) {
  threadgroup float partial[256];
  partial[tid] = x[gid];
  if (with_barrier != 0) threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == ntg - 1) {
    float s = 0.0f;
    for (uint i = 0; i < ntg; ++i) s += partial[i];
    out[group] = s;
  }
}

// A classic tree reduction with a barrier per level (correct under every schedule).
kernel void emu_test_tree_sum(device const float* x [[buffer(0)]],
                              device float* out [[buffer(1)]],
                              uint gid [[thread_position_in_grid]],
                              uint tid [[thread_index_in_threadgroup]],
                              uint ntg [[threads_per_threadgroup]],
                              uint group [[threadgroup_position_in_grid]]) {
  threadgroup float sh[256];
  sh[tid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = ntg / 2; s > 0; s >>= 1) {
    if (tid < s) sh[tid] += sh[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) out[group] = sh[0];
}

// simd collectives against scalar loops; `live` lanes of each simdgroup take part, the others
// return first (active-lane semantics). 10 floats per thread.
kernel void emu_test_simd(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          constant uint& live [[buffer(2)]],
                          uint gid [[thread_position_in_grid]],
                          uint lane [[thread_index_in_simdgroup]]) {
  if (lane >= live) return;
  float v = x[gid];
  device float* o = out + gid * 10;
  o[0] = simd_sum(v);
  o[1] = simd_prefix_inclusive_sum(v);
  o[2] = simd_prefix_exclusive_sum(v);
  o[3] = simd_max(v);
  o[4] = simd_min(v);
  o[5] = simd_shuffle_xor(v, 1);
  o[6] = simd_shuffle_down(v, 3);
  o[7] = simd_broadcast(v, 0);
  o[8] = float(uint(ulong(simd_ballot(v > 0.0f)) & 0xffffffffu));
  o[9] = quad_sum(v);
}

// Integer and vector collectives (deterministic integer sums, vector sums by component).
kernel void emu_test_simd_int(device const int* x [[buffer(0)]],
                              device int* out [[buffer(1)]],
                              uint gid [[thread_position_in_grid]]) {
  int v = x[gid];
  int2 w = int2(v, -2 * v);
  int2 s = simd_sum(w);
  out[gid * 4 + 0] = s.x;
  out[gid * 4 + 1] = s.y;
  out[gid * 4 + 2] = simd_prefix_exclusive_sum(v);
  out[gid * 4 + 3] = simd_shuffle_up(v, 2);
}

kernel void emu_test_divergent_barrier(device float* out [[buffer(0)]],
                                       uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}

kernel void emu_test_barrier_after_return(device float* out [[buffer(0)]],
                                          uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 3) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = 1.0f;
}

kernel void emu_test_divergent_simd(device float* out [[buffer(0)]],
                                    uint lane [[thread_index_in_simdgroup]]) {
  float s;
  if (lane < 8) {
    s = simd_sum(1.0f);
  } else {
    s = simd_max(2.0f);
  }
  out[lane] = s;
}

// Reads threadgroup memory that no thread wrote: the emulator's poison makes it NaN.
kernel void emu_test_poison(device float* out [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float sh[64];
  if (tid < 32) sh[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = sh[tid];
}

kernel void emu_test_tg_too_big(device float* out [[buffer(0)]],
                                uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float a[4096];
  threadgroup float b[4100];  // 16 bytes past the 32 KB limit
  a[tid] = 1.0f;
  b[tid] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = a[tid] + b[tid];
}

kernel void emu_test_dyn_tg(device const float* x [[buffer(0)]],
                            device float* out [[buffer(1)]],
                            threadgroup float* sh [[threadgroup(0)]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint ntg [[threads_per_threadgroup]]) {
  sh[tid] = x[tid] * 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = sh[ntg - 1 - tid];
}

kernel void emu_test_unbound(device const float* x [[buffer(0)]],
                             device float* y [[buffer(1)]],
                             uint gid [[thread_position_in_grid]]) {
  y[gid] = x[gid] + 1.0f;
}

kernel void emu_test_params(constant EmuTestParams& p [[buffer(0)]],
                            device const float* x [[buffer(1)]],
                            device float* y [[buffer(2)]],
                            uint gid [[thread_position_in_grid]]) {
  if (gid < p.n) y[gid] = x[gid] * p.scale + p.bias;
}

kernel void emu_test_div_zero(device const int* x [[buffer(0)]],
                              device int* y [[buffer(1)]],
                              uint gid [[thread_position_in_grid]]) {
  y[gid] = 100 / x[gid];
}

// 16-bit float conversions of every bit pattern and one rounded op of each kind.
kernel void emu_test_f16(device const ushort* bits [[buffer(0)]],
                         device const float* f [[buffer(1)]],
                         device float* h2f [[buffer(2)]],
                         device float* b2f [[buffer(3)]],
                         device ushort* f2h [[buffer(4)]],
                         device ushort* f2b [[buffer(5)]],
                         device ushort* hops [[buffer(6)]],
                         device ushort* bops [[buffer(7)]],
                         uint i [[thread_position_in_grid]]) {
  h2f[i] = float(as_type<half>(bits[i]));
  b2f[i] = float(as_type<bfloat>(bits[i]));
  f2h[i] = as_type<ushort>(half(f[i]));
  f2b[i] = as_type<ushort>(bfloat(f[i]));
  half ha = as_type<half>(bits[i]), hb = as_type<half>(bits[(i * 7919u + 13u) & 0xffffu]);
  bfloat ba = as_type<bfloat>(bits[i]), bb = as_type<bfloat>(bits[(i * 7919u + 13u) & 0xffffu]);
  hops[i * 4 + 0] = as_type<ushort>(half(ha + hb));
  hops[i * 4 + 1] = as_type<ushort>(half(ha - hb));
  hops[i * 4 + 2] = as_type<ushort>(half(ha * hb));
  hops[i * 4 + 3] = as_type<ushort>(half(ha / hb));
  bops[i * 4 + 0] = as_type<ushort>(bfloat(ba + bb));
  bops[i * 4 + 1] = as_type<ushort>(bfloat(ba - bb));
  bops[i * 4 + 2] = as_type<ushort>(bfloat(ba * bb));
  bops[i * 4 + 3] = as_type<ushort>(bfloat(ba / bb));
}

// C = A * B + C for 8x8 tiles, one simdgroup per tile pair.
kernel void emu_test_matmul8(device const float* a [[buffer(0)]],
                             device const float* b [[buffer(1)]],
                             device float* c [[buffer(2)]],
                             uint group [[threadgroup_position_in_grid]]) {
  simdgroup_float8x8 ma, mb, mc;
  simdgroup_load(ma, a + group * 64, 8);
  simdgroup_load(mb, b + group * 64, 8);
  simdgroup_load(mc, c + group * 64, 8);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c + group * 64, 8);
}

template <typename T>
[[kernel]] void emu_test_scale(device const T* x [[buffer(0)]],
                               device T* y [[buffer(1)]],
                               constant float& s [[buffer(2)]],
                               uint gid [[thread_position_in_grid]]) {
  y[gid] = T(float(x[gid]) * s);
}
template [[host_name("emu_test_scale_f32")]] [[kernel]] decltype(emu_test_scale<float>) emu_test_scale<float>;
template [[host_name("emu_test_scale_f16")]] [[kernel]] decltype(emu_test_scale<half>) emu_test_scale<half>;

kernel void emu_test_atomic(device atomic_uint* counter [[buffer(0)]],
                            device atomic_float* fsum [[buffer(1)]],
                            uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  atomic_fetch_max_explicit(counter + 1, gid, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
}

// Vectors, swizzles, math overloads.
kernel void emu_test_vec(device const float4* x [[buffer(0)]],
                         device float4* y [[buffer(1)]],
                         uint gid [[thread_position_in_grid]]) {
  float4 v = x[gid];
  float4 r = float4(v.zw, v.x, 1.0);
  r.xy += v.yx * 2;
  half2 h = half2(v.xy);
  r.w = dot(r.xyz, float3(1.0f, 2.0f, 3.0f)) + float(h.x) + max(v.x, v.y) + clamp(v.z, 0.0f, 1.0f);
  y[gid] = select(r, fast::exp(-abs(r)), v < 0.0f) + rsqrt(4.0f) + precise::sqrt(9.0f);
}

kernel void emu_test_bench_copy(device const float* x [[buffer(0)]],
                                device float* y [[buffer(1)]],
                                uint gid [[thread_position_in_grid]]) {
  y[gid] = x[gid];
}

kernel void emu_test_bench_barrier(device float* y [[buffer(0)]],
                                   constant uint& rounds [[buffer(1)]],
                                   uint tid [[thread_index_in_threadgroup]],
                                   uint gid [[thread_position_in_grid]]) {
  float acc = 0.0f;
  for (uint r = 0; r < rounds; ++r) {
    acc += float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  y[gid] = acc;
}
