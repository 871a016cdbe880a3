// msl_cpu/simd.h: threadgroup/simdgroup barriers, `simd_*` and `quad_*` collectives and 8x8
// simdgroup matrices.
//
// A collective parks the lane (a fiber) until every lane of its simdgroup has arrived, exited or
// parked at a threadgroup barrier (the GPU's active-lane semantics); the first lane to resume
// computes every lane's result with a fixed pairwise tree, so reductions are deterministic and
// independent of scheduling order. Reads from inactive lanes return 0xFF bytes (NaN / all ones).
#pragma once
#include <cstring>
#include "rt.h"
#include "vec.h"

namespace metal {
enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint32_t(a) | uint32_t(b)); }

inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_emu_barrier(file, line);
}
inline void simdgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_emu_collective(nullptr, 0, msl_emu::kCollBarrier, file, line);
}
}  // namespace metal

namespace msl_emu {

template <class T> inline T load_slot(const unsigned char* p) {
  T t;
  std::memcpy(static_cast<void*>(&t), p, sizeof(T));
  return t;
}
template <class T> inline void store_slot(unsigned char* p, const T& t) {
  std::memcpy(p, static_cast<const void*>(&t), sizeof(T));
}
template <class T> inline T poison() {
  T t;
  std::memset(static_cast<void*>(&t), 0xFF, sizeof(T));
  return t;
}
template <class T> constexpr bool simd_ok_v = is_scalar_v<T> || is_vec_v<T>;

// Reduce the active lanes of each aligned group of G lanes with a fixed pairwise tree; the
// result for the group starting at lane g lands in out[g].
template <class T, class F> inline void tree_reduce(CollBuf* b, uint32_t G, F f) {
  T vals[kSimdWidth];
  for (uint32_t base = 0; base < kSimdWidth; base += G) {
    uint32_t m = 0;
    for (uint32_t i = 0; i < G; ++i) {
      if (b->mask >> (base + i) & 1) {
        vals[i] = load_slot<T>(b->in[base + i]);
        m |= 1u << i;
      }
    }
    if (!m) continue;
    for (uint32_t s = 1; s < G; s *= 2) {
      for (uint32_t i = 0; i + s < G; i += 2 * s) {
        bool l = m >> i & 1, r = m >> (i + s) & 1;
        if (l && r) vals[i] = f(vals[i], vals[i + s]);
        else if (r) vals[i] = vals[i + s];
        if (r) m |= 1u << i;
      }
    }
    store_slot(b->out[base], vals[0]);
  }
}

template <class T, class F>
inline T reduce(const T& x, int op, uint32_t G, F f, const char* file, int line) {
  static_assert(simd_ok_v<T> && sizeof(T) <= kSlotBytes, "simd collectives take scalars and vectors");
  CollBuf* b = msl_emu_collective(&x, sizeof(T), op, file, line);
  if (!b->done) {
    tree_reduce<T>(b, G, f);
    b->done = true;
  }
  return load_slot<T>(b->out[msl_emu_cur->lane & ~(G - 1)]);
}

// Inclusive or exclusive scan over the active lanes of each group of G lanes, in lane order.
template <class T, class F>
inline T scan(const T& x, int op, uint32_t G, bool inclusive, T identity, F f, const char* file, int line) {
  static_assert(simd_ok_v<T> && sizeof(T) <= kSlotBytes, "simd collectives take scalars and vectors");
  CollBuf* b = msl_emu_collective(&x, sizeof(T), op, file, line);
  if (!b->done) {
    for (uint32_t base = 0; base < kSimdWidth; base += G) {
      T acc = identity;
      for (uint32_t i = base; i < base + G; ++i) {
        if (!(b->mask >> i & 1)) continue;
        T v = load_slot<T>(b->in[i]);
        T next = f(acc, v);
        store_slot(b->out[i], inclusive ? next : acc);
        acc = next;
      }
    }
    b->done = true;
  }
  return load_slot<T>(b->out[msl_emu_cur->lane]);
}

// Read lane `src`'s value (poison if it is out of range or inactive).
template <class T> inline T shuffle_any(const T& x, int op, int64_t src, const char* file, int line) {
  static_assert(sizeof(T) <= kSlotBytes, "collective payload too large");
  CollBuf* b = msl_emu_collective(&x, sizeof(T), op, file, line);
  if (src < 0 || src >= int64_t(kSimdWidth) || !(b->mask >> src & 1)) return poison<T>();
  return load_slot<T>(b->in[src]);
}
template <class T> inline T shuffle(const T& x, int op, int64_t src, const char* file, int line) {
  static_assert(simd_ok_v<T>, "simd collectives take scalars and vectors");
  return shuffle_any(x, op, src, file, line);
}

inline uint32_t first_lane(uint32_t mask) { return mask ? uint32_t(__builtin_ctz(mask)) : 0; }

template <class T> struct op_add { T operator()(const T& a, const T& b) const { return a + b; } };
template <class T> struct op_mul { T operator()(const T& a, const T& b) const { return a * b; } };
template <class T> struct op_and { T operator()(const T& a, const T& b) const { return a & b; } };
template <class T> struct op_or { T operator()(const T& a, const T& b) const { return a | b; } };
template <class T> struct op_xor { T operator()(const T& a, const T& b) const { return a ^ b; } };
template <class T> struct op_min { T operator()(const T& a, const T& b) const { return metal::min(a, b); } };
template <class T> struct op_max { T operator()(const T& a, const T& b) const { return metal::max(a, b); } };

}  // namespace msl_emu

namespace metal {

// A ballot result (MSL's simd_vote): the bits of the active lanes whose predicate was true.
struct simd_vote {
  using vote_t = uint64_t;
  vote_t v = 0;
  vote_t active = 0;
  constexpr simd_vote() = default;
  explicit constexpr simd_vote(vote_t bits) : v(bits), active(~vote_t(0)) {}
  constexpr simd_vote(vote_t bits, vote_t act) : v(bits), active(act) {}
  explicit constexpr operator vote_t() const { return v; }
  constexpr bool all() const { return (v & active) == active; }
  constexpr bool any() const { return v != 0; }
};

#define MSL_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

// Reductions, for a simdgroup (32 lanes) and for a quad (4 lanes).
#define MSL_EMU_REDUCE(name, qname, op, F)                                                       \
  template <class T> inline T name(T x, MSL_EMU_SITE) {                                          \
    return msl_emu::reduce(x, msl_emu::op, 32, msl_emu::F<T>{}, file, line);                     \
  }                                                                                              \
  template <class T> inline T qname(T x, MSL_EMU_SITE) {                                         \
    return msl_emu::reduce(x, msl_emu::op | msl_emu::kCollQuad, 4, msl_emu::F<T>{}, file, line); \
  }
MSL_EMU_REDUCE(simd_sum, quad_sum, kCollSum, op_add)
MSL_EMU_REDUCE(simd_product, quad_product, kCollProduct, op_mul)
MSL_EMU_REDUCE(simd_min, quad_min, kCollMin, op_min)
MSL_EMU_REDUCE(simd_max, quad_max, kCollMax, op_max)
MSL_EMU_REDUCE(simd_and, quad_and, kCollAnd, op_and)
MSL_EMU_REDUCE(simd_or, quad_or, kCollOr, op_or)
MSL_EMU_REDUCE(simd_xor, quad_xor, kCollXor, op_xor)
#undef MSL_EMU_REDUCE

#define MSL_EMU_SCAN(name, qname, op, F, incl, ident)                                              \
  template <class T> inline T name(T x, MSL_EMU_SITE) {                                            \
    return msl_emu::scan(x, msl_emu::op, 32, incl, T(ident), msl_emu::F<T>{}, file, line);         \
  }                                                                                                \
  template <class T> inline T qname(T x, MSL_EMU_SITE) {                                           \
    return msl_emu::scan(x, msl_emu::op | msl_emu::kCollQuad, 4, incl, T(ident), msl_emu::F<T>{}, file, line); \
  }
MSL_EMU_SCAN(simd_prefix_inclusive_sum, quad_prefix_inclusive_sum, kCollPrefixInclSum, op_add, true, 0)
MSL_EMU_SCAN(simd_prefix_exclusive_sum, quad_prefix_exclusive_sum, kCollPrefixExclSum, op_add, false, 0)
MSL_EMU_SCAN(simd_prefix_inclusive_product, quad_prefix_inclusive_product, kCollPrefixInclProduct, op_mul, true, 1)
MSL_EMU_SCAN(simd_prefix_exclusive_product, quad_prefix_exclusive_product, kCollPrefixExclProduct, op_mul, false, 1)
#undef MSL_EMU_SCAN

template <class T> inline T simd_shuffle(T x, ushort src, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffle, src, file, line);
}
template <class T> inline T simd_broadcast(T x, ushort src, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollBroadcast, src, file, line);
}
template <class T> inline T simd_shuffle_xor(T x, ushort mask, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffleXor, (msl_emu_cur->lane ^ mask) & 31u, file, line);
}
// Lanes whose source falls outside the simdgroup keep their own value (no wrap-around).
template <class T> inline T simd_shuffle_down(T x, ushort delta, MSL_EMU_SITE) {
  uint32_t src = msl_emu_cur->lane + delta;
  return msl_emu::shuffle(x, msl_emu::kCollShuffleDown, src < 32 ? src : msl_emu_cur->lane, file, line);
}
template <class T> inline T simd_shuffle_up(T x, ushort delta, MSL_EMU_SITE) {
  int64_t src = int64_t(msl_emu_cur->lane) - delta;
  return msl_emu::shuffle(x, msl_emu::kCollShuffleUp, src >= 0 ? src : msl_emu_cur->lane, file, line);
}
template <class T> inline T simd_shuffle_rotate_down(T x, ushort delta, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffleRotDown, (msl_emu_cur->lane + delta) % 32u, file, line);
}
template <class T> inline T simd_shuffle_rotate_up(T x, ushort delta, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffleRotUp, (msl_emu_cur->lane + 32u - delta % 32u) % 32u, file, line);
}
// and_fill: lanes past the edge read `fill` from the lane the shift wraps to.
template <class T> inline T simd_shuffle_and_fill_down(T x, T fill, ushort delta, MSL_EMU_SITE) {
  struct P { T x, fill; } p{x, fill};
  P q = msl_emu::shuffle_any(p, msl_emu::kCollShuffleFillDown, (msl_emu_cur->lane + delta) % 32u, file, line);
  return msl_emu_cur->lane + delta < 32 ? q.x : q.fill;
}
template <class T> inline T simd_shuffle_and_fill_up(T x, T fill, ushort delta, MSL_EMU_SITE) {
  struct P { T x, fill; } p{x, fill};
  P q = msl_emu::shuffle_any(p, msl_emu::kCollShuffleFillUp, (msl_emu_cur->lane + 32u - delta % 32u) % 32u, file, line);
  return msl_emu_cur->lane >= delta ? q.x : q.fill;
}
template <class T> inline T simd_broadcast_first(T x, MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(&x, sizeof(T), msl_emu::kCollBroadcastFirst, file, line);
  return msl_emu::load_slot<T>(b->in[msl_emu::first_lane(b->mask)]);
}

template <class T> inline T quad_shuffle(T x, ushort src, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffle | msl_emu::kCollQuad, (msl_emu_cur->lane & ~3u) | (src & 3u), file, line);
}
template <class T> inline T quad_broadcast(T x, ushort src, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollBroadcast | msl_emu::kCollQuad, (msl_emu_cur->lane & ~3u) | (src & 3u), file, line);
}
template <class T> inline T quad_shuffle_xor(T x, ushort mask, MSL_EMU_SITE) {
  return msl_emu::shuffle(x, msl_emu::kCollShuffleXor | msl_emu::kCollQuad, msl_emu_cur->lane ^ (mask & 3u), file, line);
}
template <class T> inline T quad_shuffle_down(T x, ushort delta, MSL_EMU_SITE) {
  uint32_t q = msl_emu_cur->lane & 3u;
  return msl_emu::shuffle(x, msl_emu::kCollShuffleDown | msl_emu::kCollQuad,
                          q + delta < 4 ? msl_emu_cur->lane + delta : msl_emu_cur->lane, file, line);
}
template <class T> inline T quad_shuffle_up(T x, ushort delta, MSL_EMU_SITE) {
  uint32_t q = msl_emu_cur->lane & 3u;
  return msl_emu::shuffle(x, msl_emu::kCollShuffleUp | msl_emu::kCollQuad,
                          q >= delta ? msl_emu_cur->lane - delta : msl_emu_cur->lane, file, line);
}

inline simd_vote simd_ballot(bool pred, MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(&pred, sizeof(bool), msl_emu::kCollBallot, file, line);
  uint64_t v = 0;
  for (uint32_t i = 0; i < 32; ++i)
    if ((b->mask >> i & 1) && b->in[i][0]) v |= uint64_t(1) << i;
  return simd_vote(v, b->mask);
}
inline bool simd_all(bool pred, MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(&pred, sizeof(bool), msl_emu::kCollAll, file, line);
  for (uint32_t i = 0; i < 32; ++i)
    if ((b->mask >> i & 1) && !b->in[i][0]) return false;
  return true;
}
inline bool simd_any(bool pred, MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(&pred, sizeof(bool), msl_emu::kCollAny, file, line);
  for (uint32_t i = 0; i < 32; ++i)
    if ((b->mask >> i & 1) && b->in[i][0]) return true;
  return false;
}
inline bool simd_is_first(MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(nullptr, 0, msl_emu::kCollIsFirst, file, line);
  return msl_emu_cur->lane == msl_emu::first_lane(b->mask);
}
inline simd_vote simd_active_threads_mask(MSL_EMU_SITE) {
  msl_emu::CollBuf* b = msl_emu_collective(nullptr, 0, msl_emu::kCollActiveMask, file, line);
  return simd_vote(b->mask, b->mask);
}

// ---- simdgroup matrices (8x8) ------------------------------------------------------------
// Each lane holds two elements of row `r`, columns `c` and `c + 1`, in Apple's lane layout
// (the one MLX's steel GEMM relies on through thread_elements()).
template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices are emulated");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  // A matrix with `d` on the diagonal and zeros elsewhere.
  explicit simdgroup_matrix(T d);
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

}  // namespace metal

namespace msl_emu {
struct MatCoord { uint32_t row, col; };
inline MatCoord mat_coord(uint32_t lane) {
  uint32_t q = lane / 4;
  return {(q & 4) + ((lane / 2) % 4), (q & 2) * 2 + (lane % 2) * 2};
}
struct MatSlot { float a[2], b[2], c[2]; };
}  // namespace msl_emu

namespace metal {
template <class T, int C, int R> simdgroup_matrix<T, C, R>::simdgroup_matrix(T d) {
  msl_emu::MatCoord k = msl_emu::mat_coord(msl_emu_cur->lane);
  for (int j = 0; j < 2; ++j) e.v[j] = k.row == k.col + j ? d : T(0);
}

template <class T, int C = 8, int R = 8> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.e = vec<T, 2>(value);
  return m;
}

template <class T>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const T* src, ulong elements_per_row = 8,
                           ulong2 origin = ulong2(0), bool transpose = false) {
  msl_emu::MatCoord k = msl_emu::mat_coord(msl_emu_cur->lane);
  for (uint32_t j = 0; j < 2; ++j) {
    ulong r = transpose ? k.col + j : k.row, c = transpose ? k.row : k.col + j;
    d.e.v[j] = src[(origin.y + r) * elements_per_row + origin.x + c];
  }
}
template <class T>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, T* dst, ulong elements_per_row = 8,
                            ulong2 origin = ulong2(0), bool transpose = false) {
  msl_emu::MatCoord k = msl_emu::mat_coord(msl_emu_cur->lane);
  for (uint32_t j = 0; j < 2; ++j) {
    ulong r = transpose ? k.col + j : k.row, c = transpose ? k.row : k.col + j;
    dst[(origin.y + r) * elements_per_row + origin.x + c] = a.e.v[j];
  }
}

// d = a * b + c, accumulated in float with fused multiply-adds over k = 0..7.
template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                                          MSL_EMU_SITE) {
  msl_emu::MatSlot s{{float(a.e.v[0]), float(a.e.v[1])}, {float(b.e.v[0]), float(b.e.v[1])},
                     {float(c.e.v[0]), float(c.e.v[1])}};
  msl_emu::CollBuf* buf = msl_emu_collective(&s, sizeof(s), msl_emu::kCollMatMul, file, line);
  if (!buf->done) {
    if (buf->mask != 0xffffffffu)
      msl_emu_fail(file, line, "simdgroup matrix multiply with inactive lanes (mask 0x%08x)", buf->mask);
    float A[8][8], B[8][8], Cm[8][8];
    for (uint32_t l = 0; l < 32; ++l) {
      msl_emu::MatCoord k = msl_emu::mat_coord(l);
      msl_emu::MatSlot v = msl_emu::load_slot<msl_emu::MatSlot>(buf->in[l]);
      for (uint32_t j = 0; j < 2; ++j) {
        A[k.row][k.col + j] = v.a[j];
        B[k.row][k.col + j] = v.b[j];
        Cm[k.row][k.col + j] = v.c[j];
      }
    }
    for (uint32_t l = 0; l < 32; ++l) {
      msl_emu::MatCoord k = msl_emu::mat_coord(l);
      float out[2];
      for (uint32_t j = 0; j < 2; ++j) {
        float acc = Cm[k.row][k.col + j];
        for (int kk = 0; kk < 8; ++kk) acc = __builtin_fmaf(A[k.row][kk], B[kk][k.col + j], acc);
        out[j] = acc;
      }
      std::memcpy(buf->out[l], out, sizeof(out));
    }
    buf->done = true;
  }
  float out[2];
  std::memcpy(out, buf->out[msl_emu_cur->lane], sizeof(out));
  d.e.v[0] = TD(out[0]);
  d.e.v[1] = TD(out[1]);
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b, MSL_EMU_SITE) {
  simdgroup_matrix<float, 8, 8> z;
  z.e = vec<float, 2>(0.0f);
  simdgroup_multiply_accumulate(d, a, b, z, file, line);
}
#undef MSL_EMU_SITE

}  // namespace metal
