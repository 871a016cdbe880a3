// msl_cpu/atomic.h: MSL atomics on real host atomics (threadgroups run on several OS threads);
// float add/min/max are compare-and-swap loops.
#pragma once
#include <type_traits>
#include "scalar.h"

namespace metal {
enum memory_order {
  memory_order_relaxed = __ATOMIC_RELAXED,
  memory_order_acquire = __ATOMIC_ACQUIRE,
  memory_order_release = __ATOMIC_RELEASE,
  memory_order_acq_rel = __ATOMIC_ACQ_REL,
  memory_order_seq_cst = __ATOMIC_SEQ_CST,
};

template <class T> struct atomic {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, uint> || std::is_same_v<T, bool> ||
                    std::is_same_v<T, float> || std::is_same_v<T, ulong> || std::is_same_v<T, long>,
                "MSL atomics hold int, uint, bool, float or 64-bit integers");
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;

template <class A> using atomic_value_t = decltype(std::declval<A&>().value);

template <class A> inline auto atomic_load_explicit(const volatile A* o, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T r;
  __atomic_load(const_cast<T*>(&o->value), &r, int(mo));
  return r;
}
template <class A, class U> inline void atomic_store_explicit(volatile A* o, U v, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T t = T(v);
  __atomic_store(const_cast<T*>(&o->value), &t, int(mo));
}
template <class A, class U> inline auto atomic_exchange_explicit(volatile A* o, U v, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T t = T(v), r;
  __atomic_exchange(const_cast<T*>(&o->value), &t, &r, int(mo));
  return r;
}
template <class A, class T, class U>
inline bool atomic_compare_exchange_weak_explicit(volatile A* o, T* expected, U desired, memory_order s,
                                                  memory_order f) {
  using V = std::remove_cv_t<atomic_value_t<A>>;
  static_assert(std::is_same_v<V, T>, "expected must point to the atomic's value type");
  V d = V(desired);
  return __atomic_compare_exchange(const_cast<V*>(&o->value), expected, &d, true, int(s), int(f));
}
template <class A, class T, class U>
inline bool atomic_compare_exchange_strong_explicit(volatile A* o, T* expected, U desired, memory_order s,
                                                    memory_order f) {
  using V = std::remove_cv_t<atomic_value_t<A>>;
  static_assert(std::is_same_v<V, T>, "expected must point to the atomic's value type");
  V d = V(desired);
  return __atomic_compare_exchange(const_cast<V*>(&o->value), expected, &d, false, int(s), int(f));
}

namespace detail_atomic {
template <class T> T no_float_bitops(T) {
  static_assert(sizeof(T) == 0, "bitwise atomics exist only for integer atomics");
  return T();
}
template <class A, class F> inline auto cas_loop(volatile A* o, F f, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T* p = const_cast<T*>(&o->value);
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next = f(old);
  while (!__atomic_compare_exchange(p, &old, &next, true, int(mo), __ATOMIC_RELAXED)) next = f(old);
  return old;
}
}  // namespace detail_atomic

#define MSL_EMU_ATOMIC_RMW(name, builtin, expr)                                              \
  template <class A, class U> inline auto name(volatile A* o, U v, memory_order mo) {       \
    using T = std::remove_cv_t<atomic_value_t<A>>;                                          \
    T arg = T(v);                                                                           \
    if constexpr (std::is_integral_v<T>) {                                                  \
      return builtin(const_cast<T*>(&o->value), arg, int(mo));                              \
    } else {                                                                                \
      return detail_atomic::cas_loop(o, [arg](T x) { return T(expr); }, mo);                \
    }                                                                                       \
  }
MSL_EMU_ATOMIC_RMW(atomic_fetch_add_explicit, __atomic_fetch_add, x + arg)
MSL_EMU_ATOMIC_RMW(atomic_fetch_sub_explicit, __atomic_fetch_sub, x - arg)
MSL_EMU_ATOMIC_RMW(atomic_fetch_and_explicit, __atomic_fetch_and, detail_atomic::no_float_bitops(x))
MSL_EMU_ATOMIC_RMW(atomic_fetch_or_explicit, __atomic_fetch_or, detail_atomic::no_float_bitops(x))
MSL_EMU_ATOMIC_RMW(atomic_fetch_xor_explicit, __atomic_fetch_xor, detail_atomic::no_float_bitops(x))
#undef MSL_EMU_ATOMIC_RMW
template <class A, class U> inline auto atomic_fetch_min_explicit(volatile A* o, U v, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T arg = T(v);
  return detail_atomic::cas_loop(o, [arg](T x) { return arg < x ? arg : x; }, mo);
}
template <class A, class U> inline auto atomic_fetch_max_explicit(volatile A* o, U v, memory_order mo) {
  using T = std::remove_cv_t<atomic_value_t<A>>;
  T arg = T(v);
  return detail_atomic::cas_loop(o, [arg](T x) { return x < arg ? arg : x; }, mo);
}
}  // namespace metal
