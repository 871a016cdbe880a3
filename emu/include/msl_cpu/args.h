// msl_cpu/args.h: kernel parameters without a parser. The translator turns every attribute on a
// kernel parameter into a default argument built from the proxies below, so a kernel is called
// with no arguments (`k()` or `k<float>()`) and each parameter reads the current emulated
// thread or the dispatch's bindings.
#pragma once
#include <type_traits>
#include "rt.h"
#include "vec.h"

namespace msl_emu {

template <class T> const char* type_name() { return __PRETTY_FUNCTION__; }
template <class E> constexpr size_t align_of_v = std::is_void_v<E> ? 1 : alignof(std::conditional_t<std::is_void_v<E>, char, E>);

// `[[buffer(i)]]` (or an implicitly numbered parameter): converts to a pointer, or to a
// reference whose size is checked against the binding (`set_bytes` too short is an error).
struct buffer_arg {
  uint32_t idx;
  const char* file;
  int line;
  mutable void* p = nullptr;
  template <class T> operator T&() const {
    if constexpr (std::is_pointer_v<T>) {
      using E = std::remove_cv_t<std::remove_pointer_t<T>>;
      p = msl_emu_buffer(idx, 0, align_of_v<E>, type_name<T>(), file, line);
      return *static_cast<T*>(static_cast<void*>(&p));
    } else {
      return *static_cast<T*>(msl_emu_buffer(idx, sizeof(T), alignof(T), type_name<T>(), file, line));
    }
  }
};

// `[[threadgroup(i)]]`: the dynamic threadgroup allocation set with set_threadgroup_memory_length.
struct tg_arg {
  uint32_t idx;
  const char* file;
  int line;
  template <class T> operator T*() const { return static_cast<T*>(msl_emu_tg_arg(idx, file, line)); }
};

// `threadgroup T x[N];` becomes `tgdecl_t<T[N]>& x = tg_var<T[N]>(site, ...)`.
template <class T> using tgdecl_t = T;
template <class T> inline T& tg_var(uint32_t site, const char* file, int line) {
  return *static_cast<T*>(msl_emu_tg_alloc(site, sizeof(T), alignof(T), file, line));
}

namespace bi {
// A 3-component builtin: MSL accepts uint/ushort (x component) or 2/3-vectors of them.
struct v3 {
  uint32_t x, y, z;
  operator uint() const { return x; }
  operator ushort() const { return ushort(x); }
  operator uint2() const { return uint2(x, y); }
  operator uint3() const { return uint3(x, y, z); }
  operator ushort2() const { return ushort2(ushort(x), ushort(y)); }
  operator ushort3() const { return ushort3(ushort(x), ushort(y), ushort(z)); }
};
struct v1 {
  uint32_t v;
  operator uint() const { return v; }
  operator ushort() const { return ushort(v); }
};
inline v3 mk3(const uint32_t* a) { return v3{a[0], a[1], a[2]}; }
inline v3 thread_position_in_grid() { return mk3(msl_emu_cur->tpig); }
inline v3 thread_position_in_threadgroup() { return mk3(msl_emu_cur->tptg); }
inline v3 threadgroup_position_in_grid() { return mk3(msl_emu_cur->tgpig); }
inline v3 threads_per_threadgroup() { return mk3(msl_emu_cur->tptgs); }
inline v3 dispatch_threads_per_threadgroup() { return mk3(msl_emu_cur->dtptg); }
inline v3 threadgroups_per_grid() { return mk3(msl_emu_cur->tgpg); }
inline v3 threads_per_grid() { return mk3(msl_emu_cur->tpg); }
inline v3 grid_size() { return mk3(msl_emu_cur->tpg); }
inline v3 grid_origin() { return v3{0, 0, 0}; }
inline v1 thread_index_in_threadgroup() { return v1{msl_emu_cur->tid}; }
inline v1 thread_index_in_simdgroup() { return v1{msl_emu_cur->lane}; }
inline v1 simdgroup_index_in_threadgroup() { return v1{msl_emu_cur->simd_id}; }
inline v1 simdgroups_per_threadgroup() { return v1{msl_emu_cur->simd_count}; }
inline v1 dispatch_simdgroups_per_threadgroup() {
  const uint32_t* d = msl_emu_cur->dtptg;
  return v1{(d[0] * d[1] * d[2] + kSimdWidth - 1) / kSimdWidth};
}
inline v1 threads_per_simdgroup() { return v1{kSimdWidth}; }
inline v1 thread_execution_width() { return v1{kSimdWidth}; }
inline v1 thread_index_in_quadgroup() { return v1{msl_emu_cur->tid % 4}; }
inline v1 quadgroup_index_in_threadgroup() { return v1{msl_emu_cur->tid / 4}; }
inline v1 quadgroups_per_threadgroup() {
  const uint32_t* d = msl_emu_cur->tptgs;
  return v1{(d[0] * d[1] * d[2] + 3) / 4};
}
}  // namespace bi
}  // namespace msl_emu
