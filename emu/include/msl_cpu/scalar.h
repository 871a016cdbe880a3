// msl_cpu/scalar.h: MSL scalar types. `half` and `bfloat` are 16-bit structs that compute in
// float and round to nearest even after every operation; for + - * / that is bit-exact IEEE
// half/bfloat arithmetic (float has more than 2p+2 significand bits for both).
#pragma once
#include <cstdint>
#include <type_traits>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace msl_emu {

constexpr uint32_t f2u(float f) { return __builtin_bit_cast(uint32_t, f); }
constexpr float u2f(uint32_t u) { return __builtin_bit_cast(float, u); }

constexpr uint16_t float_to_half_bits(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or NaN (NaNs stay NaN: quiet bit set, top payload kept)
    return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u));
  }
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: half subnormal (or zero), units of 2^-24
    uint32_t e = ax >> 23;
    if (e < 102) return uint16_t(sign);  // < 2^-25 (ties at 2^-25 go to even 0)
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1))) q += 1;
    return uint16_t(sign | q);
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);  // round to nearest even at bit 13
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

constexpr float half_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return u2f(sign | 0x7f800000u | (m ? 0x400000u | (m << 13) : 0u));
  if (e == 0) {
    if (m == 0) return u2f(sign);
    uint32_t be = 113;
    while (!(m & 0x400u)) { m <<= 1; --be; }
    return u2f(sign | (be << 23) | ((m & 0x3ffu) << 13));
  }
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}

constexpr uint16_t float_to_bfloat_bits(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

constexpr float bfloat_bits_to_float(uint16_t b) { return u2f(uint32_t(b) << 16); }

struct bits_tag {};

}  // namespace msl_emu

struct bfloat;

// IEEE binary16. Implicit conversions to and from float (MSL allows them for scalars);
// conversions to/from bfloat are explicit.
struct half {
  uint16_t bits;
  half() = default;
  constexpr half(float f) : bits(msl_emu::float_to_half_bits(f)) {}
  constexpr half(double d) : bits(msl_emu::float_to_half_bits(float(d))) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  constexpr half(I i) : bits(msl_emu::float_to_half_bits(float(i))) {}
  constexpr half(uint16_t b, msl_emu::bits_tag) : bits(b) {}
  explicit half(bfloat b);
  constexpr operator float() const { return msl_emu::half_bits_to_float(bits); }
};

// bfloat16 (MSL 3.1 `bfloat`).
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  constexpr bfloat(float f) : bits(msl_emu::float_to_bfloat_bits(f)) {}
  constexpr bfloat(double d) : bits(msl_emu::float_to_bfloat_bits(float(d))) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  constexpr bfloat(I i) : bits(msl_emu::float_to_bfloat_bits(float(i))) {}
  constexpr bfloat(uint16_t b, msl_emu::bits_tag) : bits(b) {}
  explicit bfloat(half h) : bits(msl_emu::float_to_bfloat_bits(float(h))) {}
  constexpr operator float() const { return msl_emu::bfloat_bits_to_float(bits); }
};
inline half::half(bfloat b) : bits(msl_emu::float_to_half_bits(float(b))) {}
typedef bfloat bfloat16_t;

namespace msl_emu {
template <class T> struct is_f16 : std::false_type {};
template <> struct is_f16<half> : std::true_type {};
template <> struct is_f16<bfloat> : std::true_type {};
template <class T> constexpr bool is_f16_v = is_f16<std::remove_cv_t<T>>::value;
// Scalars that mix with half/bfloat and yield half/bfloat: the integer types.
template <class T> constexpr bool is_int_v = std::is_integral_v<T>;
}  // namespace msl_emu

// Arithmetic for one 16-bit float type H: H op H -> H; H op integer -> H; H op float -> float
// (usual arithmetic conversions); half op bfloat does not compile (as in MSL).
#define MSL_EMU_F16_OPS(H)                                                                     \
  constexpr H operator+(H a) { return a; }                                                    \
  constexpr H operator-(H a) { return H(uint16_t(a.bits ^ 0x8000u), msl_emu::bits_tag{}); }   \
  MSL_EMU_F16_BIN(H, +) MSL_EMU_F16_BIN(H, -) MSL_EMU_F16_BIN(H, *) MSL_EMU_F16_BIN(H, /)     \
  MSL_EMU_F16_CMP(H, ==) MSL_EMU_F16_CMP(H, !=) MSL_EMU_F16_CMP(H, <) MSL_EMU_F16_CMP(H, >)   \
  MSL_EMU_F16_CMP(H, <=) MSL_EMU_F16_CMP(H, >=)                                               \
  inline H& operator++(H& a) { return a = a + H(1.0f); }                                      \
  inline H& operator--(H& a) { return a = a - H(1.0f); }                                      \
  inline H operator++(H& a, int) { H t = a; a = a + H(1.0f); return t; }                      \
  inline H operator--(H& a, int) { H t = a; a = a - H(1.0f); return t; }

#define MSL_EMU_F16_BIN(H, op)                                                                 \
  constexpr H operator op(H a, H b) { return H(float(a) op float(b)); }                       \
  template <class I, std::enable_if_t<msl_emu::is_int_v<I>, int> = 0>                         \
  constexpr H operator op(H a, I b) { return a op H(b); }                                     \
  template <class I, std::enable_if_t<msl_emu::is_int_v<I>, int> = 0>                         \
  constexpr H operator op(I a, H b) { return H(a) op b; }                                     \
  constexpr float operator op(H a, float b) { return float(a) op b; }                         \
  constexpr float operator op(float a, H b) { return a op float(b); }                         \
  inline H& operator op##=(H & a, H b) { return a = a op b; }                                 \
  template <class I, std::enable_if_t<msl_emu::is_int_v<I>, int> = 0>                         \
  inline H& operator op##=(H & a, I b) { return a = a op H(b); }                              \
  inline H& operator op##=(H & a, float b) { return a = H(float(a) op b); }                   \
  inline float& operator op##=(float& a, H b) { return a = a op float(b); }

#define MSL_EMU_F16_CMP(H, op)                                                                 \
  constexpr bool operator op(H a, H b) { return float(a) op float(b); }                       \
  template <class I, std::enable_if_t<msl_emu::is_int_v<I>, int> = 0>                         \
  constexpr bool operator op(H a, I b) { return float(a) op float(b); }                       \
  template <class I, std::enable_if_t<msl_emu::is_int_v<I>, int> = 0>                         \
  constexpr bool operator op(I a, H b) { return float(a) op float(b); }                       \
  constexpr bool operator op(H a, float b) { return float(a) op b; }                          \
  constexpr bool operator op(float a, H b) { return a op float(b); }

MSL_EMU_F16_OPS(half)
MSL_EMU_F16_OPS(bfloat)

// Mixing the two 16-bit float types is an error in MSL; keep it one here.
#define MSL_EMU_F16_MIX_DELETED(op)                                                            \
  void operator op(half, bfloat) = delete;                                                    \
  void operator op(bfloat, half) = delete;
MSL_EMU_F16_MIX_DELETED(+)
MSL_EMU_F16_MIX_DELETED(-)
MSL_EMU_F16_MIX_DELETED(*)
MSL_EMU_F16_MIX_DELETED(/)

namespace msl_emu {
// `1.5h` literals (the rewriter turns them into calls of this).
constexpr half half_lit(float f) { return half(f); }
}  // namespace msl_emu
