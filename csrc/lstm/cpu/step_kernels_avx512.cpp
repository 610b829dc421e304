// The CPU step kernels compiled for AVX-512; lstm_cpu.cpp calls them when the CPU has
// AVX512F/BW/DQ/VL. Twice the lanes of the AVX2 build: at H <= 256 the pointwise part of a step
// costs as much as its GEMM, so the wider lanes matter there.
//
// Built like lstm/cpu/step_kernels_avx2.cpp: a target pragma instead of per-file flags, with the macros that
// headers test set by hand, and CPU_CAPABILITY_AVX512 selecting ATen's 512-bit Vectorized<T>
// (exp from SLEEF, exported by libtorch_cpu).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "lstm/cpu/step_kernels.h"

FASTLSTM_DEFINE_CPU_STEP_KERNELS(avx512)
#endif
