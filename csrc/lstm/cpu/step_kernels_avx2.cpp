// The CPU step kernels compiled for AVX2 + FMA; lstm_cpu.cpp calls them when the CPU has both.
//
// The target pragma (rather than a per-file -mavx2) keeps one set of compiler flags for every
// source, as setup.py and CMake share one source list. The pragma changes code generation but
// not the predefined macros, so the macros that headers test (sleef.h declares its 256-bit
// functions under __AVX__) are set by hand. CPU_CAPABILITY_AVX2 selects ATen's AVX2
// Vectorized<T>, whose exp/tanh are SLEEF's (exported by libtorch_cpu).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
// Inlined 256-bit values passed by value trigger GCC's note on the ABI of 32-byte arguments
// (changed in GCC 4.6); these functions never cross a library boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "lstm/cpu/step_kernels.h"

FASTLSTM_DEFINE_CPU_STEP_KERNELS(avx2)
#endif
