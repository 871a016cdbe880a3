// msl_emu_api.h: the C ABI of the emulator runtime, used by the Rust side
// (src/backend/metal_emu/ffi.rs mirrors these structs field for field) and by the C++ test driver.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSL_EMU_MAX_BINDINGS 31
#define MSL_EMU_MAX_TG_MEMORY 32768

enum msl_emu_binding_kind { MSL_EMU_UNBOUND = 0, MSL_EMU_BUFFER = 1, MSL_EMU_BYTES = 2 };
enum msl_emu_sched { MSL_EMU_SCHED_FORWARD = 0, MSL_EMU_SCHED_REVERSE = 1 };

typedef struct msl_emu_binding {
  void* ptr;     // first byte the kernel sees (buffer base + offset)
  uint64_t len;  // bytes from ptr to the end of the buffer
  uint32_t kind; // msl_emu_binding_kind
  uint32_t _pad;
} msl_emu_binding;

typedef struct msl_emu_dispatch_desc {
  uint32_t kernel;       // index from msl_emu_find_kernel
  uint32_t groups[3];    // threadgroups per grid
  uint32_t tg[3];        // requested threads per threadgroup
  uint32_t threads[3];   // threads per grid; edge groups are partial when not a multiple of tg
  uint32_t sched;        // msl_emu_sched
  uint32_t workers;      // OS threads to use at most (0: the pool's size)
  uint64_t tg_mem[MSL_EMU_MAX_BINDINGS];  // dynamic threadgroup memory per [[threadgroup(i)]]
  msl_emu_binding buffers[MSL_EMU_MAX_BINDINGS];
} msl_emu_dispatch_desc;

typedef struct msl_emu_error {
  char kernel[128];
  char file[256];  // .metal file of the failing construct ("" if unknown)
  int32_t line;    // its line (0 if unknown)
  char message[1024];
} msl_emu_error;

typedef struct msl_emu_stats {
  uint64_t threads;      // GPU threads run
  uint64_t groups;       // threadgroups run
  uint64_t barriers;     // threadgroup barriers released (per group)
  uint64_t collectives;  // simdgroup collectives resolved (per simdgroup)
  uint64_t switches;     // fiber switches into kernels
} msl_emu_stats;

// Registers the compiled kernels once (thread-safe); the other calls do it on demand too.
void msl_emu_init(void);
uint32_t msl_emu_kernel_count(void);
const char* msl_emu_kernel_name(uint32_t index);
const char* msl_emu_kernel_file(uint32_t index);
int32_t msl_emu_kernel_line(uint32_t index);
// Index of the kernel registered as `name`, or -1.
int64_t msl_emu_find_kernel(const char* name);
// Runs one dispatch to completion. Returns 0 on success; otherwise fills *err and returns 1.
// `stats` (may be null) receives counters of this dispatch.
int32_t msl_emu_dispatch(const msl_emu_dispatch_desc* desc, msl_emu_error* err, msl_emu_stats* stats);

#ifdef __cplusplus
}
#endif
