// msl_cpu.h: the shim that lets Metal Shading Language kernels compile as C++17 and run on the
// CPU emulator. The translator (emu/rewrite.rs) includes it ahead of each rewritten .metal file.
// It deliberately avoids <cmath>/<cstdlib>: their global ::sqrt(double), ::abs(int) would join
// MSL's overload sets and silently change precision.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "msl_cpu/rt.h"
#include "msl_cpu/scalar.h"
#include "msl_cpu/vec.h"
#include "msl_cpu/math.h"
#include "msl_cpu/simd.h"
#include "msl_cpu/atomic.h"
#include "msl_cpu/args.h"
