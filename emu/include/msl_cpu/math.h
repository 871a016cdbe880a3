// msl_cpu/math.h: `metal::` math with MSL's overload sets: transcendental and rounding functions
// exist for float and half (scalars and vectors) only, `fast::`/`precise::` for float only, and
// nothing here is pulled in by a using-directive (a stray overload once cost three digits).
// libm is reached through GCC builtins so that no global ::sqrt(double) joins the overload set.
#pragma once
#include <cfloat>
#include <climits>
#include <limits>
#include "vec.h"

#define MAXFLOAT FLT_MAX
#define HUGE_VALF __builtin_huge_valf()
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HALF_MAX 65504.0f
#define HALF_MIN 6.103515625e-05f
#define HALF_EPSILON 0.0009765625f
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f

namespace msl_emu {
inline float fract_f(float x) {
  float r = x - __builtin_floorf(x);
  return r < 0x1.fffffep-1f ? r : 0x1.fffffep-1f;
}
inline float sign_f(float x) { return x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : __builtin_isnan(x) ? 0.0f : x; }
inline float clamp_f(float x, float lo, float hi) { return __builtin_fminf(__builtin_fmaxf(x, lo), hi); }
inline float smoothstep_f(float e0, float e1, float x) {
  float t = clamp_f((x - e0) / (e1 - e0), 0.0f, 1.0f);
  return t * t * (3.0f - 2.0f * t);
}
template <class V, class F> inline V map1(const V& a, F f) {
  V r;
  for (int i = 0; i < comps<V>::n; ++i) r.v[i] = f(a.v[i]);
  return r;
}
template <class V, class F> inline V map2(const V& a, const V& b, F f) {
  V r;
  for (int i = 0; i < comps<V>::n; ++i) r.v[i] = f(a.v[i], b.v[i]);
  return r;
}
template <class V, class F> inline V map3(const V& a, const V& b, const V& c, F f) {
  V r;
  for (int i = 0; i < comps<V>::n; ++i) r.v[i] = f(a.v[i], b.v[i], c.v[i]);
  return r;
}
template <class T> constexpr bool is_intlike_v = std::is_integral_v<T> && !std::is_same_v<T, bool>;
}  // namespace msl_emu

// One float function `name` with body `expr` over `x`, plus its float vectors.
#define MSL_EMU_F1(name, expr)                                                                    \
  inline float name(float x) { return expr; }                                                    \
  template <int N> inline vec<float, N> name(const vec<float, N>& v) {                           \
    return msl_emu::map1(v, [](float x) { return float(expr); });                                \
  }
// ...and the same for half (computed in float, rounded once).
#define MSL_EMU_H1(name, expr)                                                                    \
  inline half name(half h) { float x = float(h); return half(expr); }                            \
  template <int N> inline vec<half, N> name(const vec<half, N>& v) {                             \
    return msl_emu::map1(v, [](half h) { float x = float(h); return half(expr); });              \
  }
#define MSL_EMU_FH1(name, expr) MSL_EMU_F1(name, expr) MSL_EMU_H1(name, expr)

#define MSL_EMU_F2(name, expr)                                                                    \
  inline float name(float x, float y) { return expr; }                                           \
  template <int N> inline vec<float, N> name(const vec<float, N>& a, const vec<float, N>& b) {   \
    return msl_emu::map2(a, b, [](float x, float y) { return float(expr); });                    \
  }
#define MSL_EMU_H2(name, expr)                                                                    \
  inline half name(half hx, half hy) { float x = float(hx), y = float(hy); return half(expr); }  \
  template <int N> inline vec<half, N> name(const vec<half, N>& a, const vec<half, N>& b) {      \
    return msl_emu::map2(a, b, [](half hx, half hy) { float x = float(hx), y = float(hy); return half(expr); }); \
  }
#define MSL_EMU_FH2(name, expr) MSL_EMU_F2(name, expr) MSL_EMU_H2(name, expr)

#define MSL_EMU_F3(name, expr)                                                                    \
  inline float name(float x, float y, float z) { return expr; }                                  \
  template <int N>                                                                                \
  inline vec<float, N> name(const vec<float, N>& a, const vec<float, N>& b, const vec<float, N>& c) { \
    return msl_emu::map3(a, b, c, [](float x, float y, float z) { return float(expr); });        \
  }
#define MSL_EMU_H3(name, expr)                                                                    \
  inline half name(half hx, half hy, half hz) {                                                  \
    float x = float(hx), y = float(hy), z = float(hz);                                           \
    return half(expr);                                                                           \
  }                                                                                               \
  template <int N>                                                                                \
  inline vec<half, N> name(const vec<half, N>& a, const vec<half, N>& b, const vec<half, N>& c) { \
    return msl_emu::map3(a, b, c, [](half hx, half hy, half hz) {                                \
      float x = float(hx), y = float(hy), z = float(hz);                                         \
      return half(expr);                                                                         \
    });                                                                                           \
  }
#define MSL_EMU_FH3(name, expr) MSL_EMU_F3(name, expr) MSL_EMU_H3(name, expr)

// Transcendentals shared by metal::, metal::fast:: and metal::precise:: (float only in the latter two).
#define MSL_EMU_TRANSCENDENTALS(F1, F2)                                     \
  F1(acos, __builtin_acosf(x)) F1(acosh, __builtin_acoshf(x))              \
  F1(asin, __builtin_asinf(x)) F1(asinh, __builtin_asinhf(x))              \
  F1(atan, __builtin_atanf(x)) F1(atanh, __builtin_atanhf(x))              \
  F1(cos, __builtin_cosf(x)) F1(cosh, __builtin_coshf(x))                  \
  F1(sin, __builtin_sinf(x)) F1(sinh, __builtin_sinhf(x))                  \
  F1(tan, __builtin_tanf(x)) F1(tanh, __builtin_tanhf(x))                  \
  F1(cospi, __builtin_cosf(x * M_PI_F)) F1(sinpi, __builtin_sinf(x * M_PI_F)) \
  F1(tanpi, __builtin_tanf(x * M_PI_F))                                    \
  F1(exp, __builtin_expf(x)) F1(exp2, __builtin_exp2f(x))                  \
  F1(exp10, __builtin_powf(10.0f, x))                                      \
  F1(log, __builtin_logf(x)) F1(log2, __builtin_log2f(x))                  \
  F1(log10, __builtin_log10f(x))                                           \
  F1(sqrt, __builtin_sqrtf(x)) F1(rsqrt, 1.0f / __builtin_sqrtf(x))        \
  F1(fabs, __builtin_fabsf(x)) F1(abs, __builtin_fabsf(x))                 \
  F1(ceil, __builtin_ceilf(x)) F1(floor, __builtin_floorf(x))              \
  F1(round, __builtin_roundf(x)) F1(rint, __builtin_rintf(x))              \
  F1(trunc, __builtin_truncf(x)) F1(fract, msl_emu::fract_f(x))            \
  F1(saturate, msl_emu::clamp_f(x, 0.0f, 1.0f)) F1(sign, msl_emu::sign_f(x)) \
  F2(atan2, __builtin_atan2f(x, y)) F2(pow, __builtin_powf(x, y))          \
  F2(powr, __builtin_powf(x, y)) F2(fmod, __builtin_fmodf(x, y))           \
  F2(fmax, __builtin_fmaxf(x, y)) F2(fmin, __builtin_fminf(x, y))          \
  F2(max, __builtin_fmaxf(x, y)) F2(min, __builtin_fminf(x, y))            \
  F2(copysign, __builtin_copysignf(x, y)) F2(fdim, __builtin_fdimf(x, y))

namespace metal {
MSL_EMU_TRANSCENDENTALS(MSL_EMU_FH1, MSL_EMU_FH2)
MSL_EMU_FH2(step, y < x ? 0.0f : 1.0f)
MSL_EMU_FH3(fma, __builtin_fmaf(x, y, z))
MSL_EMU_FH3(mix, x + (y - x) * z)
MSL_EMU_FH3(clamp, msl_emu::clamp_f(x, y, z))
MSL_EMU_FH3(smoothstep, msl_emu::smoothstep_f(x, y, z))

namespace fast {
MSL_EMU_TRANSCENDENTALS(MSL_EMU_F1, MSL_EMU_F2)
MSL_EMU_F3(clamp, msl_emu::clamp_f(x, y, z))
MSL_EMU_F2(divide, x / y)
}  // namespace fast
namespace precise {
MSL_EMU_TRANSCENDENTALS(MSL_EMU_F1, MSL_EMU_F2)
MSL_EMU_F3(clamp, msl_emu::clamp_f(x, y, z))
MSL_EMU_F2(divide, x / y)
}  // namespace precise

// Float predicates (scalar -> bool, vector -> bool vector).
#define MSL_EMU_PRED(name, expr)                                                               \
  inline bool name(float x) { return expr; }                                                  \
  inline bool name(half h) { float x = float(h); return expr; }                               \
  template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0> \
  inline vec<bool, N> name(const vec<T, N>& v) {                                              \
    vec<bool, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r.v[i] = name(v.v[i]);                                        \
    return r;                                                                                 \
  }
MSL_EMU_PRED(isnan, __builtin_isnan(x))
MSL_EMU_PRED(isinf, __builtin_isinf(x))
MSL_EMU_PRED(isfinite, __builtin_isfinite(x))
MSL_EMU_PRED(isnormal, __builtin_isnormal(x))
MSL_EMU_PRED(signbit, __builtin_signbit(x) != 0)
#undef MSL_EMU_PRED

// Integer functions: templates restricted to integer scalars and their vectors.
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T min(T a, T b) { return b < a ? b : a; }
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T max(T a, T b) { return a < b ? b : a; }
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>
inline T abs(T x) { return x < 0 ? T(-x) : x; }
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>
inline std::make_unsigned_t<T> absdiff(T a, T b) { return std::make_unsigned_t<T>(a > b ? a - b : b - a); }
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T popcount(T x) {
  return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x));
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T clz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = U(x);
  return u == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)u) - (64 - int(sizeof(T)) * 8));
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T ctz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = U(x);
  return u == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)u));
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T mulhi(T a, T b) {
  static_assert(sizeof(T) <= 4, "mulhi on 64-bit integers is not emulated");
  return T((int64_t(a) * int64_t(b)) >> (sizeof(T) * 8));
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T rotate(T v, T i) {
  using U = std::make_unsigned_t<T>;
  constexpr unsigned bits = sizeof(T) * 8;
  unsigned s = unsigned(i) % bits;
  return s == 0 ? v : T(U(U(v) << s) | U(U(v) >> (bits - s)));
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>
inline T extract_bits(T x, uint offset, uint bits) {
  using U = std::make_unsigned_t<T>;
  if (bits == 0) return T(0);
  U m = bits >= sizeof(T) * 8 ? U(~U(0)) : U((U(1) << bits) - 1);
  U r = U(U(x) >> offset) & m;
  if constexpr (std::is_signed_v<T>) {  // sign-extend
    if (bits < sizeof(T) * 8 && (r >> (bits - 1)) & 1) r |= U(~m);
  }
  return T(r);
}
template <class T, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0> inline T reverse_bits(T x) {
  using U = std::make_unsigned_t<T>;
  U u = U(x), r = 0;
  for (unsigned i = 0; i < sizeof(T) * 8; ++i) r = U((r << 1) | ((u >> i) & 1));
  return T(r);
}

#define MSL_EMU_IVEC1(name)                                                                     \
  template <class T, int N, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>              \
  inline vec<T, N> name(const vec<T, N>& a) { return msl_emu::map1(a, [](T x) { return name(x); }); }
#define MSL_EMU_IVEC2(name)                                                                     \
  template <class T, int N, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>              \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {                             \
    return msl_emu::map2(a, b, [](T x, T y) { return name(x, y); });                          \
  }
MSL_EMU_IVEC2(min)
MSL_EMU_IVEC2(max)
MSL_EMU_IVEC1(abs)
MSL_EMU_IVEC1(popcount)
MSL_EMU_IVEC1(clz)
MSL_EMU_IVEC1(ctz)
MSL_EMU_IVEC1(reverse_bits)
MSL_EMU_IVEC2(rotate)
#undef MSL_EMU_IVEC1
#undef MSL_EMU_IVEC2
template <class T, int N, std::enable_if_t<msl_emu::is_intlike_v<T>, int> = 0>
inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  return min(max(x, lo), hi);
}

// Geometric functions (float and half vectors).
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s = s + float(a.v[i]) * float(b.v[i]);
  return T(s);
}
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline T length_squared(const vec<T, N>& a) { return dot(a, a); }
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline T length(const vec<T, N>& a) { return T(__builtin_sqrtf(float(dot(a, a)))); }
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline T distance(const vec<T, N>& a, const vec<T, N>& b) { return length(a - b); }
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline T distance_squared(const vec<T, N>& a, const vec<T, N>& b) { return length_squared(a - b); }
template <class T, int N, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline vec<T, N> normalize(const vec<T, N>& a) { return a * T(1.0f / __builtin_sqrtf(float(dot(a, a)))); }
template <class T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, half>, int> = 0>
inline vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

// Relational: select, all, any.
template <class T, std::enable_if_t<msl_emu::is_scalar_v<T>, int> = 0>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = c.v[i] ? b.v[i] : a.v[i];
  return r;
}
template <class T, int N> inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) { return c ? b : a; }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N> inline bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i) if (!v.v[i]) return false;
  return true;
}
template <int N> inline bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i) if (v.v[i]) return true;
  return false;
}

// numeric_limits, with the 16-bit float types.
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr half min() { return half(uint16_t(0x0400), msl_emu::bits_tag{}); }
  static constexpr half max() { return half(uint16_t(0x7bff), msl_emu::bits_tag{}); }
  static constexpr half lowest() { return half(uint16_t(0xfbff), msl_emu::bits_tag{}); }
  static constexpr half epsilon() { return half(uint16_t(0x1400), msl_emu::bits_tag{}); }
  static constexpr half infinity() { return half(uint16_t(0x7c00), msl_emu::bits_tag{}); }
  static constexpr half quiet_NaN() { return half(uint16_t(0x7e00), msl_emu::bits_tag{}); }
  static constexpr half denorm_min() { return half(uint16_t(0x0001), msl_emu::bits_tag{}); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat min() { return bfloat(uint16_t(0x0080), msl_emu::bits_tag{}); }
  static constexpr bfloat max() { return bfloat(uint16_t(0x7f7f), msl_emu::bits_tag{}); }
  static constexpr bfloat lowest() { return bfloat(uint16_t(0xff7f), msl_emu::bits_tag{}); }
  static constexpr bfloat epsilon() { return bfloat(uint16_t(0x3c00), msl_emu::bits_tag{}); }
  static constexpr bfloat infinity() { return bfloat(uint16_t(0x7f80), msl_emu::bits_tag{}); }
  static constexpr bfloat quiet_NaN() { return bfloat(uint16_t(0x7fc0), msl_emu::bits_tag{}); }
  static constexpr bfloat denorm_min() { return bfloat(uint16_t(0x0001), msl_emu::bits_tag{}); }
};

// The type traits MSL's <metal_type_traits> offers, with half/bfloat counted as floating point.
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_const;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::is_signed;
using std::is_signed_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_reference;
using std::remove_reference_t;
using std::true_type;
template <class T>
struct is_floating_point
    : std::integral_constant<bool, std::is_floating_point_v<std::remove_cv_t<T>> || msl_emu::is_f16_v<T>> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : std::integral_constant<bool, msl_emu::is_scalar_v<T>> {};
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_scalar : std::integral_constant<bool, msl_emu::is_scalar_v<T>> {};
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T> struct is_vector : std::integral_constant<bool, msl_emu::is_vec_v<T>> {};
template <class T> constexpr bool is_vector_v = is_vector<T>::value;

}  // namespace metal
