// msl_cpu/vec.h: MSL vectors `vec<T, N>` with MSL layout (a 3-vector is padded to 4 elements,
// alignment = size), packed vectors, swizzles and element-wise operators.
//
// Swizzles of one component are real members (`v.x`, `v.r`); longer ones (`v.xy`, `v.zyx`) are
// rewritten by the translator into `v.template msl_swz<1, 0>()` (a value) or, when assigned to,
// `msl_swz_ref<...>()` (a proxy), so that templates deduce through them.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>
#include "scalar.h"

namespace metal {
template <class T, int N> struct vec;
template <class T, int N> struct packed_vec;
}  // namespace metal

namespace msl_emu {
template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<metal::vec<T, N>> : std::true_type {};
template <class T> constexpr bool is_vec_v = is_vec<std::remove_cv_t<T>>::value;

// MSL scalar types (what broadcasts into a vector and what `simd_*` accept besides vectors).
template <class T>
constexpr bool is_scalar_v = std::is_arithmetic_v<std::remove_cv_t<T>> || is_f16_v<T>;

template <class T> struct comps { static constexpr int n = 1; using elem = T; };
template <class T, int N> struct comps<metal::vec<T, N>> { static constexpr int n = N; using elem = T; };
template <class T, int N> struct comps<metal::packed_vec<T, N>> { static constexpr int n = N; using elem = T; };

template <class T, int N> struct vec_storage;
template <class T> struct vec_storage<T, 2> {
  union { T v[2]; struct { T x, y; }; struct { T r, g; }; };
};
template <class T> struct vec_storage<T, 3> {
  union { T v[4]; struct { T x, y, z; }; struct { T r, g, b; }; };
};
template <class T> struct vec_storage<T, 4> {
  union { T v[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; };
};

template <class V, int... I> struct swz_ref;
}  // namespace msl_emu

namespace metal {

template <class T, int N>
struct alignas(sizeof(T) * (N == 3 ? 4 : N)) vec : msl_emu::vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "MSL vectors have 2, 3 or 4 components");
  static_assert(msl_emu::is_scalar_v<T>, "vector element must be a scalar type");
  using value_type = T;

  vec() = default;
  // Scalar broadcast (implicit in MSL).
  template <class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>
  constexpr vec(S s) : msl_emu::vec_storage<T, N>{} {
    for (int i = 0; i < N; ++i) this->v[i] = T(s);
  }
  // Component-wise construction from scalars and same-element vectors: float4(v.xy, 0, 1).
  template <class A0, class A1, class... A,
            std::enable_if_t<(msl_emu::comps<std::decay_t<A0>>::n + msl_emu::comps<std::decay_t<A1>>::n +
                              (0 + ... + msl_emu::comps<std::decay_t<A>>::n)) == N,
                             int> = 0>
  constexpr vec(const A0& a0, const A1& a1, const A&... a) : msl_emu::vec_storage<T, N>{} {
    int i = 0;
    put(i, a0);
    put(i, a1);
    (put(i, a), ...);
  }
  // Element-type conversion is explicit in MSL: float4(h4).
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  explicit constexpr vec(const vec<U, N>& o) : msl_emu::vec_storage<T, N>{} {
    for (int i = 0; i < N; ++i) this->v[i] = T(o.v[i]);
  }
  constexpr vec(const packed_vec<T, N>& p) : msl_emu::vec_storage<T, N>{} {
    for (int i = 0; i < N; ++i) this->v[i] = p.v[i];
  }

  constexpr T& operator[](int i) { return this->v[i]; }
  constexpr const T& operator[](int i) const { return this->v[i]; }

  template <int... I> constexpr vec<T, int(sizeof...(I))> msl_swz() const {
    static_assert(((I < N) && ...), "swizzle component out of range");
    return vec<T, int(sizeof...(I))>(this->v[I]...);
  }
  template <int... I> msl_emu::swz_ref<vec, I...> msl_swz_ref() {
    static_assert(((I < N) && ...), "swizzle component out of range");
    return msl_emu::swz_ref<vec, I...>{*this};
  }

 private:
  template <class S> constexpr void put(int& i, const S& s) {
    if constexpr (msl_emu::is_vec_v<S>) {
      static_assert(std::is_same_v<typename S::value_type, T>,
                    "MSL does not convert vector element types implicitly");
      for (int k = 0; k < msl_emu::comps<S>::n; ++k) this->v[i++] = s.v[k];
    } else {
      static_assert(msl_emu::is_scalar_v<S>, "vector constructor argument must be scalar or vector");
      this->v[i++] = T(s);
    }
  }
};

template <class T, int N> struct packed_vec {
  T v[N];
  packed_vec() = default;
  constexpr packed_vec(const vec<T, N>& o) : v{} {
    for (int i = 0; i < N; ++i) v[i] = o.v[i];
  }
  template <class... A, std::enable_if_t<sizeof...(A) == N, int> = 0>
  constexpr packed_vec(const A&... a) : v{T(a)...} {}
  constexpr T& operator[](int i) { return v[i]; }
  constexpr const T& operator[](int i) const { return v[i]; }
};

}  // namespace metal

namespace msl_emu {
// The target of an assignment to a multi-component swizzle: `v.xy = f2; v.zw += 1;`.
template <class V, int... I> struct swz_ref {
  V& v;
  using T = typename V::value_type;
  using W = metal::vec<T, int(sizeof...(I))>;
  static_assert(sizeof...(I) >= 2, "single components are plain members");
  swz_ref& operator=(const W& w) {
    int k = 0;
    ((v.v[I] = w.v[k++]), ...);
    return *this;
  }
  operator W() const { return W(v.v[I]...); }
#define MSL_EMU_SWZ_COMPOUND(op)                                   \
  swz_ref& operator op##=(const W& w) { return *this = W(*this) op w; } \
  template <class S, std::enable_if_t<is_scalar_v<S>, int> = 0>  \
  swz_ref& operator op##=(S s) { return *this = W(*this) op W(s); }
  MSL_EMU_SWZ_COMPOUND(+)
  MSL_EMU_SWZ_COMPOUND(-)
  MSL_EMU_SWZ_COMPOUND(*)
  MSL_EMU_SWZ_COMPOUND(/)
#undef MSL_EMU_SWZ_COMPOUND
};

template <class T> struct msl_bool_of { using type = bool; };
}  // namespace msl_emu

namespace metal {

#define MSL_EMU_VEC_BIN(op)                                                                    \
  template <class T, int N> constexpr vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<T, N> r;                                                                              \
    for (int i = 0; i < N; ++i) r.v[i] = T(a.v[i] op b.v[i]);                                 \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>     \
  constexpr vec<T, N> operator op(const vec<T, N>& a, S b) { return a op vec<T, N>(T(b)); }   \
  template <class T, int N, class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>     \
  constexpr vec<T, N> operator op(S a, const vec<T, N>& b) { return vec<T, N>(T(a)) op b; }   \
  template <class T, int N> constexpr vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) { \
    return a = a op b;                                                                        \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>     \
  constexpr vec<T, N>& operator op##=(vec<T, N>& a, S b) { return a = a op vec<T, N>(T(b)); }

MSL_EMU_VEC_BIN(+)
MSL_EMU_VEC_BIN(-)
MSL_EMU_VEC_BIN(*)
MSL_EMU_VEC_BIN(/)
MSL_EMU_VEC_BIN(%)
MSL_EMU_VEC_BIN(&)
MSL_EMU_VEC_BIN(|)
MSL_EMU_VEC_BIN(^)
MSL_EMU_VEC_BIN(<<)
MSL_EMU_VEC_BIN(>>)
#undef MSL_EMU_VEC_BIN

#define MSL_EMU_VEC_CMP(op)                                                                    \
  template <class T, int N> constexpr vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<bool, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r.v[i] = bool(a.v[i] op b.v[i]);                              \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N, class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>     \
  constexpr vec<bool, N> operator op(const vec<T, N>& a, S b) { return a op vec<T, N>(T(b)); } \
  template <class T, int N, class S, std::enable_if_t<msl_emu::is_scalar_v<S>, int> = 0>     \
  constexpr vec<bool, N> operator op(S a, const vec<T, N>& b) { return vec<T, N>(T(a)) op b; }

MSL_EMU_VEC_CMP(==)
MSL_EMU_VEC_CMP(!=)
MSL_EMU_VEC_CMP(<)
MSL_EMU_VEC_CMP(>)
MSL_EMU_VEC_CMP(<=)
MSL_EMU_VEC_CMP(>=)
MSL_EMU_VEC_CMP(&&)
MSL_EMU_VEC_CMP(||)
#undef MSL_EMU_VEC_CMP

template <class T, int N> constexpr vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = T(-a.v[i]);
  return r;
}
template <class T, int N> constexpr vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> constexpr vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = T(~a.v[i]);
  return r;
}
template <class T, int N> constexpr vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = !a.v[i];
  return r;
}
template <class T, int N> vec<T, N>& operator++(vec<T, N>& a) { return a += T(1); }
template <class T, int N> vec<T, N>& operator--(vec<T, N>& a) { return a -= T(1); }

}  // namespace metal

#define MSL_EMU_VEC_TYPEDEFS(T, name)                  \
  typedef metal::vec<T, 2> name##2;                    \
  typedef metal::vec<T, 3> name##3;                    \
  typedef metal::vec<T, 4> name##4;                    \
  typedef metal::packed_vec<T, 2> packed_##name##2;    \
  typedef metal::packed_vec<T, 3> packed_##name##3;    \
  typedef metal::packed_vec<T, 4> packed_##name##4;
MSL_EMU_VEC_TYPEDEFS(float, float)
MSL_EMU_VEC_TYPEDEFS(half, half)
MSL_EMU_VEC_TYPEDEFS(bfloat, bfloat)
MSL_EMU_VEC_TYPEDEFS(int, int)
MSL_EMU_VEC_TYPEDEFS(uint, uint)
MSL_EMU_VEC_TYPEDEFS(short, short)
MSL_EMU_VEC_TYPEDEFS(ushort, ushort)
MSL_EMU_VEC_TYPEDEFS(char, char)
MSL_EMU_VEC_TYPEDEFS(uchar, uchar)
MSL_EMU_VEC_TYPEDEFS(bool, bool)
MSL_EMU_VEC_TYPEDEFS(long, long)
MSL_EMU_VEC_TYPEDEFS(ulong, ulong)
#undef MSL_EMU_VEC_TYPEDEFS

static_assert(sizeof(float3) == 16 && alignof(float3) == 16, "MSL float3 layout");
static_assert(sizeof(half3) == 8 && sizeof(packed_float3) == 12, "MSL half3/packed layout");

namespace metal {
// as_type<T>(x): reinterpret the bits of a same-sized value.
template <class T, class U> inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  return __builtin_bit_cast(T, u);
}
}  // namespace metal
