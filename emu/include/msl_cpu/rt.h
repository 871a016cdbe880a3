// msl_cpu/rt.h: the interface between translated kernels (through the shim) and the emulator
// runtime (emu/runtime/runtime.cpp). Everything here is called from inside a fiber.
#pragma once
#include <cstddef>
#include <cstdint>

namespace msl_emu {

// Per-lane slot size of a simd collective; the largest payload is a simdgroup matrix triple
// (3 x 2 floats) or a 4-wide 64-bit vector.
constexpr size_t kSlotBytes = 64;
constexpr uint32_t kSimdWidth = 32;

// The state of one emulated GPU thread, readable by the builtin-attribute proxies.
struct ThreadCtx {
  uint32_t tpig[3];    // thread_position_in_grid
  uint32_t tptg[3];    // thread_position_in_threadgroup
  uint32_t tgpig[3];   // threadgroup_position_in_grid
  uint32_t tptgs[3];   // threads_per_threadgroup (the actual size of this, maybe partial, group)
  uint32_t tgpg[3];    // threadgroups_per_grid
  uint32_t tpg[3];     // threads_per_grid
  uint32_t dtptg[3];   // dispatch_threads_per_threadgroup (the requested size)
  uint32_t tid;        // thread_index_in_threadgroup
  uint32_t lane;       // thread_index_in_simdgroup
  uint32_t simd_id;    // simdgroup_index_in_threadgroup
  uint32_t simd_count; // simdgroups_per_threadgroup
};

// One generation of a simdgroup collective: lanes deposit `in`, the first lane to resume
// computes every lane's result into `out` (results are deterministic, see simd.h).
struct CollBuf {
  alignas(64) unsigned char in[kSimdWidth][kSlotBytes];
  alignas(64) unsigned char out[kSimdWidth][kSlotBytes];
  uint32_t mask;  // lanes that took part (arrived); others had exited or sat at a barrier
  bool done;      // `out` has been filled
};

enum CollOp : int {
  kCollSum = 1, kCollProduct, kCollMin, kCollMax, kCollAnd, kCollOr, kCollXor,
  kCollPrefixInclSum, kCollPrefixExclSum, kCollPrefixInclProduct, kCollPrefixExclProduct,
  kCollShuffle, kCollShuffleUp, kCollShuffleDown, kCollShuffleXor, kCollShuffleRotUp,
  kCollShuffleRotDown, kCollShuffleFillUp, kCollShuffleFillDown, kCollBroadcast,
  kCollBroadcastFirst, kCollBallot, kCollAll, kCollAny, kCollIsFirst, kCollActiveMask,
  kCollBarrier, kCollMatMul, kCollQuad = 0x100,
};

}  // namespace msl_emu

extern "C" {
// The current fiber's context (set by the scheduler before each switch into a fiber).
extern __thread msl_emu::ThreadCtx* msl_emu_cur;

// Park at a threadgroup barrier until every thread of the group has reached the same call site.
void msl_emu_barrier(const char* file, int line);
// Deposit `size` bytes for simdgroup collective `op`, park until the collective resolves, and
// return the generation buffer the lane reads its result from.
msl_emu::CollBuf* msl_emu_collective(const void* val, size_t size, int op, const char* file,
                                     int line);
// Threadgroup storage of declaration `site` (shared by the group, poisoned with 0xFF per group).
void* msl_emu_tg_alloc(uint32_t site, size_t size, size_t align, const char* file, int line);
// The dynamic threadgroup allocation bound at `[[threadgroup(index)]]`.
void* msl_emu_tg_arg(uint32_t index, const char* file, int line);
// The buffer bound at `[[buffer(index)]]`. `need` > 0 asks for a reference of that many bytes
// (checked against the binding); `type` names the parameter's type for messages.
void* msl_emu_buffer(uint32_t index, size_t need, size_t align, const char* type,
                     const char* file, int line);
// Fail the dispatch with a message (printf-style); never returns to the kernel.
[[noreturn]] void msl_emu_fail(const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
// Registry entry point used by the generated register functions.
void msl_emu_add_kernel(const char* name, void (*fn)(), const char* file, int line);
}
