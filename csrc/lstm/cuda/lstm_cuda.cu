// CUDA kernels of the LSTM recurrence ops fastlstm::recurrence_forward / recurrence_backward.
//
// The contract (packed row layout, empty batch_sizes = dense, reverse, what is saved) is written
// out in fastlstm/lstm/recurrence.py; the cell arithmetic comes from cell.h, shared with the CPU code.
//
// Kernels
//   persistent  One cooperative launch for all T steps (forward, and one for backward). Block k
//               owns hidden units [k*U, k*U + U) with all four gates of them. Forward: the block's
//               4U rows of W_hh stay in shared memory for the whole sequence, c and h of its units
//               stay in registers; each step it stages h_{t-1} (all rows, all units, read from a
//               global double buffer that lives in L2), multiplies, applies the cell and writes its
//               slice of h_t into the other buffer; a grid-wide barrier ends the step. Backward:
//               the block keeps the columns W_hh[:, units] (4H x U) in shared memory and dh, dc of
//               its units in registers; per step it computes its units' gate gradients, publishes
//               them in fp32 (global double buffer), meets the grid barrier, then computes dh of
//               its units = dgates @ W_hh[:, units], staging dgates in column chunks when all 4H
//               columns do not fit beside the weights. bf16/fp16 multiply on tensor cores
//               (mma.sync m16n8k16, fp32 accumulate; the backward's fp32 dgates as a hi + lo
//               pair of 16-bit operands); fp32 uses fp32 FMA (no TF32). No proj_size, no fp64,
//               no zoneout.
//   step        One launch per time step: each block computes h_{t-1} @ W_hh^T for a tile of
//               8 hidden units x 4 gates and 16 rows, then the fused cell update (c kept in an fp32
//               or fp64 state buffer; h_{t-1} read straight from the previous step's output rows
//               or h0, so no h buffer is needed); plus a projection launch when proj_size > 0.
//               Backward: a fused pointwise launch and a dgates @ W_hh launch per step (two more
//               with proj_size). Any size, any dtype (fp64 included), any configuration.
//               Zoneout (cell.h's hash, evaluated where each element is used, forward and
//               backward alike) mixes c and h in the cell launch (h in the projection's epilogue
//               with proj_size); its backward carries k * dh_row into the dgates @ W_hh epilogue.
//
// Selection (choose_kernel): the persistent kernel when it can hold its slice on chip and the
// whole grid is co-resident, otherwise the step kernel. Its limits, and why:
//   - no proj_size, no fp64 and no zoneout (the persistent kernel implements none of them);
//   - bf16/fp16 need sm_80+ (mma.sync bf16 m16n8k16);
//   - U = ceil(H / #SMs) units per block, so one block per SM (H200/H100: 132 SMs, A100: 108);
//   - B * U <= kThreads * kItems (c, h or dh, dc of every (row, unit) pair live in registers);
//   - shared memory: W slice + staged h of all B rows + split-K partial sums must fit the
//     per-block opt-in limit (227 KB on H100/H200, 163 KB on A100); e.g. bf16 H=1024, B=16
//     forward needs ~115 KB. Backward: W slice + partial sums + fp32 dgates of all B rows in
//     chunks of at least kMinChunk columns; e.g. bf16 H=1024, B=16 keeps 70 KB of W and partial
//     sums and stages the 4096 dgates columns in 2 chunks (all of them would need 332 KB);
//   - the device supports cooperative launch and the occupancy calculator confirms that all
//     blocks fit at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SM count).
// FASTLSTM_CUDA_KERNEL=persistent|step|auto (read at every call) forces a kernel; forcing the
// persistent kernel where it cannot run is an error that says which limit failed.
//
// Precision: the fp32 and fp64 paths rely on precise expf/tanhf from cell.h. Build this file
// without --use_fast_math, which turns tanhf into tanh.approx.f32 (relative error ~2^-11), far
// coarser than the ~1e-5 agreement with nn.LSTM that fp32 is held to.
//
// Measured / not measured: every kernel here compiles for sm_90 with no register spills and no
// stack frame (ptxas -v; tests/test_build.py checks the build's report). Both kernels have run on
// an H200 (torch 2.11, CUDA 13: the numeric, packed, low-precision and CUDA-graph tests of
// tests/test_cuda_lstm.py pass) but have not been timed: nothing here claims a speed, and the
// selection limits above are capacity limits, not tuned thresholds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cell.h"

namespace fastlstm {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Load that bypasses L1: buffers written by other blocks during the same launch are read through
// L2 so a line cached in this SM's L1 by an earlier step can never be returned.
template <typename T>
__device__ __forceinline__ T load_cg(const T* ptr) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "load_cg: unsupported size");
  T value;
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(ptr));
    memcpy(&value, &bits, sizeof(T));
  } else if constexpr (sizeof(T) == 4) {
    const unsigned int bits = __ldcg(reinterpret_cast<const unsigned int*>(ptr));
    memcpy(&value, &bits, sizeof(T));
  } else {
    const unsigned long long bits = __ldcg(reinterpret_cast<const unsigned long long*>(ptr));
    memcpy(&value, &bits, sizeof(T));
  }
  return value;
}

__host__ __device__ __forceinline__ int round_up(int value, int multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

__host__ __device__ __forceinline__ int64_t round_up_bytes(int64_t value) {
  return (value + 15) / 16 * 16;
}

// ------------------------------------------------------------------------------------------------
// Persistent kernels
// ------------------------------------------------------------------------------------------------

constexpr int kThreads = 256;          // threads per block of the persistent kernels
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;              // (row, unit) pairs per thread, kept in registers
constexpr int kKSplitMax = 8;          // most split-K partial planes (one per warp at most)
constexpr int kMinChunk = 64;          // fewest columns of dgates the backward kernel stages at once

// Shared-memory layout of a persistent block, computed identically on host and device.
//   w: [n_pad][ldw] weights of the block, k contiguous (n = local output column)
//   a: [m_pad][lda] staged left operand (h or dgates of all rows), k contiguous; it holds a chunk
//      of a_cols columns of k (all of k in the forward kernel; the backward kernel stages 4H
//      columns of fp32 dgates and may need several chunks per step, see plan_persistent)
//   p: [ksplit][plane_rows(live)][n_pad] fp32 split-K partial sums; planes are packed for the
//      live rows of the step, so the region only needs max over live of ksplit * rows * n_pad
//      floats, bounded below (more planes only when there are fewer row tiles)
// Tensor-core path: n padded to 8, k to 16, m to 16, rows padded by 8 elements (16 bytes for
// 16-bit operands; for fp32 operands a row stride of 8 or 24 mod 32 words, so that the float2
// fragment loads of a half-warp, 4 rows x 4 lanes, fall in distinct banks). FMA path: w rows of
// odd length (distinct banks for consecutive n), m padded to 4 (each thread computes 4 rows).
struct SmemLayout {
  int n_pad, k_pad, ldw, m_pad, a_cols, lda;
  int64_t a_offset, p_offset, total;
};

// kWeightSize: bytes per element of w; kOperandSize: of a. k_chunk: the most columns of k staged
// at once (>= k stages everything).
template <bool kTensorCores, int kWeightSize, int kOperandSize>
__host__ __device__ __forceinline__ SmemLayout make_layout(int n, int k, int batch, int k_chunk) {
  SmemLayout layout;
  const int granule = kTensorCores ? 16 : 4;
  layout.k_pad = round_up(k, granule);
  layout.a_cols = k_chunk >= k ? layout.k_pad : round_up(k_chunk, granule);
  if (kTensorCores) {
    layout.n_pad = round_up(n, 8);
    layout.ldw = layout.k_pad + 8;
    layout.m_pad = round_up(batch, 16);
    layout.lda = layout.a_cols + 8;
  } else {
    layout.n_pad = n;
    layout.ldw = layout.k_pad + 1;
    layout.m_pad = round_up(batch, 4);
    layout.lda = layout.a_cols;
  }
  layout.a_offset = round_up_bytes(int64_t(layout.n_pad) * layout.ldw * kWeightSize);
  layout.p_offset =
      layout.a_offset + round_up_bytes(int64_t(layout.m_pad) * layout.lda * kOperandSize);
  // Partial-sum bound. Tensor cores: ksplit > 1 only when m_tiles * n_tiles < kWarps, and then
  // ksplit * m_tiles * 16 <= kWarps * 16 = 128 rows. FMA: ksplit > 1 only when
  // groups * n < kThreads, and then ksplit * 4 * groups * n <= 4 * kThreads = 1024 floats.
  const int64_t full_planes = int64_t(layout.m_pad) * layout.n_pad;
  const int64_t p_floats =
      kTensorCores
          ? (layout.m_pad > kWarps * 16 ? full_planes : int64_t(kWarps * 16) * layout.n_pad)
          : (full_planes > 4 * kThreads ? full_planes : int64_t(4 * kThreads));
  layout.total = layout.p_offset + p_floats * 4;
  return layout;
}

// Rows of one split-K plane for `rows` live rows (the product's padded row count).
template <bool kTensorCores>
__host__ __device__ __forceinline__ int plane_rows(int rows) {
  return kTensorCores ? round_up(rows, 16) : round_up(rows, 4);
}

template <typename T>
struct IsMmaType {
  static constexpr bool value =
      std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
};

// One m16n8k16 tensor-core product, fp32 accumulate; a/b hold packed pairs of 16-bit values.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the host never selects the tensor-core kernel below sm_80
#endif
}

// Number of split-K planes the block GEMMs use for `rows` live rows; the pointwise code that
// sums the planes calls the same function. The split divides one staged chunk of k.
template <bool kTensorCores>
__device__ __forceinline__ int split_k(const SmemLayout& layout, int rows, int n) {
  if (rows <= 0) return 1;
  if (kTensorCores) {
    const int tiles = (round_up(rows, 16) / 16) * (layout.n_pad / 8);
    const int k_steps = layout.a_cols / 16;
    return tiles >= kWarps ? 1 : max(1, min(kWarps / tiles, k_steps));
  } else {
    const int base = (round_up(rows, 4) / 4) * n;
    const int k_quads = layout.a_cols / 4;
    return base >= kThreads ? 1 : max(1, min(min(kThreads / base, kKSplitMax), k_quads));
  }
}

// One fp32 pair (k, k+1) of an A fragment as the sum of two 16-bit pairs, hi = round(v) and
// lo = round(v - hi), packed as mma operands (element k in the low half). fp16: |v| > 65504
// overflows to inf, as the same gradient stored in grad_xg (fp16) does.
template <typename T>
__device__ __forceinline__ void split_pair(float2 v, uint32_t& hi, uint32_t& lo) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __nv_bfloat162 high = __float22bfloat162_rn(v);
    const float2 back = __bfloat1622float2(high);
    const __nv_bfloat162 low = __float22bfloat162_rn(make_float2(v.x - back.x, v.y - back.y));
    memcpy(&hi, &high, 4);
    memcpy(&lo, &low, 4);
  } else {
    const __half2 high = __float22half2_rn(v);
    const float2 back = __half22float2(high);
    const __half2 low = __float22half2_rn(make_float2(v.x - back.x, v.y - back.y));
    memcpy(&hi, &high, 4);
    memcpy(&lo, &low, 4);
  }
}

// p[kp][m][n] = (or +=, when accumulate) sum over k in split kp of the staged chunk of
// a[m][k] * w[n][k_begin + k], for m < round_up(rows, 16) and all n < n_pad; the caller sums the
// planes. Tensor cores, one 16x8 tile per warp and k step; chunk_cols (a multiple of 16) columns
// are staged. A holds T (one mma per k step), or fp32 (kSplitA: each value split into hi + lo
// 16-bit parts, two mma's per k step, so the product sees ~16 significant bits of A instead of
// 8 (bf16) or 11 (fp16); the weights are T already, so only A needs the split).
template <typename T, bool kSplitA>
__device__ __forceinline__ void block_gemm_tensor_cores(const SmemLayout& layout,
                                                        const void* a_s, const T* w_s, float* p_s,
                                                        int rows, int ksplit, int k_begin,
                                                        int chunk_cols, bool accumulate) {
  using AType = typename std::conditional<kSplitA, float, T>::type;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;            // fragment row (A, C) or column (B)
  const int pair = (lane % 4) * 2;       // fragment k (A, B) or column pair (C)
  const int m_tiles = round_up(rows, 16) / 16;
  const int n_tiles = layout.n_pad / 8;
  const int tiles = m_tiles * n_tiles;
  const int k_steps = chunk_cols / 16;
  for (int work = warp; work < tiles * ksplit; work += kWarps) {
    const int tile = work % tiles;
    const int kp = work / tiles;
    const int m0 = (tile / n_tiles) * 16;
    const int n0 = (tile % n_tiles) * 8;
    const int step_begin = kp * k_steps / ksplit;
    const int step_end = (kp + 1) * k_steps / ksplit;
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    const AType* a_row0 = static_cast<const AType*>(a_s) + (m0 + group) * layout.lda + pair;
    const AType* a_row8 = a_row0 + 8 * layout.lda;
    const T* w_row = w_s + (n0 + group) * layout.ldw + k_begin + pair;
    for (int step = step_begin; step < step_end; ++step) {
      const int k0 = step * 16;
      uint32_t b[2];
      b[0] = *reinterpret_cast<const uint32_t*>(w_row + k0);
      b[1] = *reinterpret_cast<const uint32_t*>(w_row + k0 + 8);
      if constexpr (kSplitA) {
        uint32_t hi[4], lo[4];
        split_pair<T>(*reinterpret_cast<const float2*>(a_row0 + k0), hi[0], lo[0]);
        split_pair<T>(*reinterpret_cast<const float2*>(a_row8 + k0), hi[1], lo[1]);
        split_pair<T>(*reinterpret_cast<const float2*>(a_row0 + k0 + 8), hi[2], lo[2]);
        split_pair<T>(*reinterpret_cast<const float2*>(a_row8 + k0 + 8), hi[3], lo[3]);
        mma_16816<T>(c, lo, b);
        mma_16816<T>(c, hi, b);
      } else {
        uint32_t a[4];
        a[0] = *reinterpret_cast<const uint32_t*>(a_row0 + k0);
        a[1] = *reinterpret_cast<const uint32_t*>(a_row8 + k0);
        a[2] = *reinterpret_cast<const uint32_t*>(a_row0 + k0 + 8);
        a[3] = *reinterpret_cast<const uint32_t*>(a_row8 + k0 + 8);
        mma_16816<T>(c, a, b);
      }
    }
    float* plane = p_s + int64_t(kp) * plane_rows<true>(rows) * layout.n_pad;
    float* row0 = plane + (m0 + group) * layout.n_pad + n0 + pair;
    float* row8 = row0 + 8 * layout.n_pad;
    // Each (tile, kp) belongs to the same warp in every chunk, so accumulating is race-free.
    if (accumulate) {
      row0[0] += c[0];
      row0[1] += c[1];
      row8[0] += c[2];
      row8[1] += c[3];
    } else {
      row0[0] = c[0];
      row0[1] = c[1];
      row8[0] = c[2];
      row8[1] = c[3];
    }
  }
}

// The same product with fp32 FMA: each work item is one column n, four rows, one k split of the
// chunk_cols staged columns.
__device__ __forceinline__ void block_gemm_fma(const SmemLayout& layout, const float* a_s,
                                               const float* w_s, float* p_s, int rows, int n,
                                               int ksplit, int k_begin, int chunk_cols,
                                               bool accumulate) {
  const int groups = round_up(rows, 4) / 4;
  const int base = groups * n;
  for (int work = threadIdx.x; work < base * ksplit; work += kThreads) {
    const int col = work % n;
    const int m0 = ((work / n) % groups) * 4;
    const int kp = work / base;
    const int k_first = kp * chunk_cols / ksplit;
    const int k_end = (kp + 1) * chunk_cols / ksplit;
    const float* w_row = w_s + col * layout.ldw + k_begin;
    const float* a0 = a_s + m0 * layout.lda;
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
    for (int k = k_first; k < k_end; ++k) {
      const float w = w_row[k];
      acc0 = fmaf(a0[k], w, acc0);
      acc1 = fmaf(a0[layout.lda + k], w, acc1);
      acc2 = fmaf(a0[2 * layout.lda + k], w, acc2);
      acc3 = fmaf(a0[3 * layout.lda + k], w, acc3);
    }
    float* plane = p_s + int64_t(kp) * plane_rows<false>(rows) * layout.n_pad;
    float* out = plane + m0 * layout.n_pad + col;
    if (accumulate) {  // same work item, same thread, in every chunk
      out[0] += acc0;
      out[layout.n_pad] += acc1;
      out[2 * layout.n_pad] += acc2;
      out[3 * layout.n_pad] += acc3;
    } else {
      out[0] = acc0;
      out[layout.n_pad] = acc1;
      out[2 * layout.n_pad] = acc2;
      out[3 * layout.n_pad] = acc3;
    }
  }
}

// Stage rows [0, rows) x columns [0, cols) of a row-major global buffer (row stride src_stride)
// into a_s, reading through L2 (the buffer was written by other blocks of this launch); columns
// [cols, padded_cols) are written as zeros.
template <typename T>
__device__ __forceinline__ void stage_rows(const SmemLayout& layout, const T* src,
                                           int64_t src_stride, int rows, int cols,
                                           int padded_cols, T* a_s) {
  constexpr int kVector = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 && src_stride % kVector == 0;
  if (aligned && cols % kVector == 0 && padded_cols % kVector == 0 &&
      layout.lda % kVector == 0) {
    const int vectors_per_row = padded_cols / kVector;
    const int live_vectors = cols / kVector;
    for (int index = threadIdx.x; index < rows * vectors_per_row; index += kThreads) {
      const int row = index / vectors_per_row;
      const int vec = index % vectors_per_row;
      const int4 value =
          vec < live_vectors
              ? __ldcg(reinterpret_cast<const int4*>(src + int64_t(row) * src_stride) + vec)
              : make_int4(0, 0, 0, 0);
      *reinterpret_cast<int4*>(a_s + row * layout.lda + vec * kVector) = value;
    }
  } else {
    for (int index = threadIdx.x; index < rows * padded_cols; index += kThreads) {
      const int row = index / padded_cols;
      const int col = index % padded_cols;
      a_s[row * layout.lda + col] =
          col < cols ? load_cg(src + int64_t(row) * src_stride + col) : T(0);
    }
  }
}

__device__ __forceinline__ void zero_shared(unsigned char* smem, int64_t bytes) {
  for (int64_t index = threadIdx.x; index < bytes / 4; index += kThreads) {
    reinterpret_cast<uint32_t*>(smem)[index] = 0u;
  }
}

// Where step t's rows start and how many are live: a device table for packed input (offsets
// then live counts, 2*T int64), or the dense rule offset = t*B, live = B.
struct StepTable {
  const int64_t* table;  // nullptr for dense input
  int steps;
  int batch;
  __device__ __forceinline__ int64_t offset(int t) const {
    return table ? table[t] : int64_t(t) * batch;
  }
  __device__ __forceinline__ int live(int t) const {
    return table ? int(table[steps + t]) : batch;
  }
};

template <typename T>
struct PersistentForwardArgs {
  const T* xg;         // [N, 4H]
  const T* h0;         // [B, H]
  const T* c0;         // [B, H]
  const T* w_hh;       // [4H, H]
  T* h_buffer;         // [2, B, H] workspace exchanged between blocks
  T* out;              // [N, H]
  T* h_n;              // [B, H]
  T* c_n;              // [B, H]
  float* gates;        // [N, 4H] or nullptr when not saving
  float* cells;        // [N, H] or nullptr
  StepTable steps;
  int hidden;
  int units;           // hidden units per block
  bool reverse;
};

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, 1)
persistent_forward_kernel(const PersistentForwardArgs<T> args) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = args.hidden;
  const int batch = args.steps.batch;
  const int units = args.units;
  const int unit0 = blockIdx.x * units;
  const SmemLayout layout =
      make_layout<kTensorCores, sizeof(T), sizeof(T)>(4 * units, hidden, batch, hidden);
  using Operand = typename std::conditional<kTensorCores, T, float>::type;
  Operand* w_s = reinterpret_cast<Operand*>(smem);
  Operand* a_s = reinterpret_cast<Operand*>(smem + layout.a_offset);
  float* p_s = reinterpret_cast<float*>(smem + layout.p_offset);

  // Zero everything once (padding rows/columns must hold zeros, never stale values), then load
  // this block's rows of W_hh: local row gate*U + u is global row gate*H + unit0 + u.
  zero_shared(smem, layout.total);
  __syncthreads();
  for (int index = threadIdx.x; index < 4 * units * hidden; index += kThreads) {
    const int local = index / hidden;
    const int k = index % hidden;
    const int gate = local / units;
    const int unit = unit0 + local % units;
    if (unit < hidden) {
      w_s[local * layout.ldw + k] =
          static_cast<Operand>(args.w_hh[(int64_t(gate) * hidden + unit) * hidden + k]);
    }
  }

  // Per-thread state of its (row, unit) pairs: c and h of the unit, in registers.
  float c[kItems], h[kItems];
  int item_row[kItems], item_unit[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int q = threadIdx.x + i * kThreads;
    const int row = q / units;
    const int unit = unit0 + q % units;
    const bool valid = row < batch && unit < hidden;
    item_row[i] = valid ? row : batch;  // row == batch marks an unused slot
    item_unit[i] = unit;
    c[i] = valid ? static_cast<float>(args.c0[int64_t(row) * hidden + unit]) : 0.f;
    h[i] = valid ? static_cast<float>(args.h0[int64_t(row) * hidden + unit]) : 0.f;
  }
  __syncthreads();

  const int steps = args.steps.steps;
  const int64_t buffer_size = int64_t(batch) * hidden;
  for (int s = 0; s < steps; ++s) {
    const int t = args.reverse ? steps - 1 - s : s;
    const int64_t offset = args.steps.offset(t);
    const int live = args.steps.live(t);
    const T* h_prev = args.h_buffer + (s & 1) * buffer_size;
    T* h_next = args.h_buffer + ((s + 1) & 1) * buffer_size;

    // Issue this step's input-gate loads before the product so their latency overlaps it.
    float x[kItems][4];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        x[i][gate] = item_row[i] < live
            ? static_cast<float>(
                  args.xg[(offset + item_row[i]) * 4 * hidden + gate * hidden + item_unit[i]])
            : 0.f;
      }
    }
    if (live > 0) {
      if constexpr (kTensorCores) {
        stage_rows<T>(layout, h_prev, hidden, live, hidden, hidden, a_s);
      } else {
        stage_rows<float>(layout, reinterpret_cast<const float*>(h_prev), hidden, live, hidden,
                          hidden, reinterpret_cast<float*>(a_s));
      }
    }
    __syncthreads();
    const int ksplit = split_k<kTensorCores>(layout, live, 4 * units);
    const int plane = plane_rows<kTensorCores>(live);
    if (live > 0) {
      if constexpr (kTensorCores) {
        block_gemm_tensor_cores<T, false>(layout, a_s, w_s, p_s, live, ksplit, 0, layout.k_pad,
                                          false);
      } else {
        block_gemm_fma(layout, reinterpret_cast<const float*>(a_s),
                       reinterpret_cast<const float*>(w_s), p_s, live, 4 * units, ksplit, 0,
                       layout.k_pad, false);
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = item_row[i];
      if (row >= batch) continue;
      const int unit = item_unit[i];
      const int local = unit - unit0;
      if (row < live) {
        float pre[4];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          float sum = x[i][gate];
          for (int kp = 0; kp < ksplit; ++kp) {
            sum += p_s[(kp * plane + row) * layout.n_pad + gate * units + local];
          }
          pre[gate] = sum;
        }
        GateValues<float> g;
        float c_new;
        const float r = cell_forward<float>(pre[0], pre[1], pre[2], pre[3], c[i], g, c_new);
        c[i] = c_new;
        const T h_value = static_cast<T>(r);
        h[i] = static_cast<float>(h_value);  // later steps read h as the caller's dtype holds it
        const int64_t out_row = offset + row;
        h_next[int64_t(row) * hidden + unit] = h_value;
        args.out[out_row * hidden + unit] = h_value;
        if (args.gates != nullptr) {
          float* gate_row = args.gates + out_row * 4 * hidden + unit;
          gate_row[0] = g.i;
          gate_row[hidden] = g.f;
          gate_row[2 * hidden] = g.g;
          gate_row[3 * hidden] = g.o;
          args.cells[out_row * hidden + unit] = c_new;
        }
      } else {
        // Not live at this step: its h is carried into the buffer the next step reads.
        h_next[int64_t(row) * hidden + unit] = static_cast<T>(h[i]);
      }
    }
    if (s + 1 < steps) grid.sync();
  }

#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int row = item_row[i];
    if (row >= batch) continue;
    args.h_n[int64_t(row) * hidden + item_unit[i]] = static_cast<T>(h[i]);
    args.c_n[int64_t(row) * hidden + item_unit[i]] = static_cast<T>(c[i]);
  }
}

template <typename T>
struct PersistentBackwardArgs {
  const T* grad_out;     // [N, H]
  const T* grad_hn;      // [B, H]
  const T* grad_cn;      // [B, H]
  const T* c0;           // [B, H]
  const T* w_hh;         // [4H, H]
  const float* gates;    // [N, 4H] activated i, f, g, o
  const float* cells;    // [N, H]
  float* dgates_buffer;  // [2, B, 4H] fp32 workspace exchanged between blocks
  T* grad_xg;            // [N, 4H]
  T* grad_h0;            // [B, H]
  T* grad_c0;            // [B, H]
  StepTable steps;
  int hidden;
  int units;
  int k_chunk;           // columns of dgates staged in shared memory at once (see plan_persistent)
  bool reverse;
};

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, 1)
persistent_backward_kernel(const PersistentBackwardArgs<T> args) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = args.hidden;
  const int four_h = 4 * hidden;
  const int batch = args.steps.batch;
  const int units = args.units;
  const int unit0 = blockIdx.x * units;
  // The gate gradients stay fp32 from the cell's backward to the product dh = dgates @ W_hh, as
  // in every other backend: staged as fp32 and split into hi + lo 16-bit halves for the tensor
  // cores (block_gemm_tensor_cores<T, true>): two mma's per k step instead of one keep the
  // product on the tensor cores with ~16 significant bits of dgates, where an fp32 FMA product
  // would give the tensor cores up, and rounding dgates to T first (as this kernel once did)
  // put a relative error of up to 2^-9 (bf16) on every term of dh.
  const SmemLayout layout =
      make_layout<kTensorCores, sizeof(T), sizeof(float)>(units, four_h, batch, args.k_chunk);
  using Weight = typename std::conditional<kTensorCores, T, float>::type;
  Weight* w_s = reinterpret_cast<Weight*>(smem);
  float* a_s = reinterpret_cast<float*>(smem + layout.a_offset);
  float* p_s = reinterpret_cast<float*>(smem + layout.p_offset);

  // w_s[u][k] = W_hh[k][unit0 + u]: the columns of W_hh that produce this block's dh.
  zero_shared(smem, layout.total);
  __syncthreads();
  for (int index = threadIdx.x; index < units * four_h; index += kThreads) {
    const int k = index / units;
    const int local = index % units;
    const int unit = unit0 + local;
    if (unit < hidden) {
      w_s[local * layout.ldw + k] = static_cast<Weight>(args.w_hh[int64_t(k) * hidden + unit]);
    }
  }

  float dh[kItems], dc[kItems];
  int item_row[kItems], item_unit[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int q = threadIdx.x + i * kThreads;
    const int row = q / units;
    const int unit = unit0 + q % units;
    const bool valid = row < batch && unit < hidden;
    item_row[i] = valid ? row : batch;
    item_unit[i] = unit;
    dh[i] = valid ? static_cast<float>(args.grad_hn[int64_t(row) * hidden + unit]) : 0.f;
    dc[i] = valid ? static_cast<float>(args.grad_cn[int64_t(row) * hidden + unit]) : 0.f;
  }
  __syncthreads();

  const int steps = args.steps.steps;
  const int64_t buffer_size = int64_t(batch) * four_h;
  for (int s = 0; s < steps; ++s) {
    // Backward visits the steps in the opposite order of the forward pass.
    const int t = args.reverse ? s : steps - 1 - s;
    const int t_prev = args.reverse ? t + 1 : t - 1;  // the step the forward pass visited before
    const int64_t offset = args.steps.offset(t);
    const int live = args.steps.live(t);
    const bool has_prev = t_prev >= 0 && t_prev < steps;
    const int64_t prev_offset = has_prev ? args.steps.offset(t_prev) : 0;
    const int prev_live = has_prev ? args.steps.live(t_prev) : 0;
    float* dgates = args.dgates_buffer + (s & 1) * buffer_size;

    // Phase 1: gate gradients of this block's units, published for every block.
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = item_row[i];
      if (row >= live) continue;
      const int unit = item_unit[i];
      const int64_t out_row = offset + row;
      const float* gate_row = args.gates + out_row * four_h + unit;
      GateValues<float> g;
      g.i = gate_row[0];
      g.f = gate_row[hidden];
      g.g = gate_row[2 * hidden];
      g.o = gate_row[3 * hidden];
      const float c = args.cells[out_row * hidden + unit];
      const float c_prev = row < prev_live
          ? args.cells[(prev_offset + row) * hidden + unit]
          : static_cast<float>(args.c0[int64_t(row) * hidden + unit]);
      const float dr = dh[i] + static_cast<float>(args.grad_out[out_row * hidden + unit]);
      GateGrads<float> grads;
      float dc_prev;
      cell_backward<float>(g, c, c_prev, dr, dc[i], grads, dc_prev);
      dc[i] = dc_prev;
      T* grad_row = args.grad_xg + out_row * four_h + unit;
      grad_row[0] = static_cast<T>(grads.i);
      grad_row[hidden] = static_cast<T>(grads.f);
      grad_row[2 * hidden] = static_cast<T>(grads.g);
      grad_row[3 * hidden] = static_cast<T>(grads.o);
      float* shared_row = dgates + int64_t(row) * four_h + unit;
      shared_row[0] = grads.i;
      shared_row[hidden] = grads.f;
      shared_row[2 * hidden] = grads.g;
      shared_row[3 * hidden] = grads.o;
    }
    grid.sync();

    // Phase 2: dh of this block's units = dgates (all 4H columns) @ W_hh[:, units], staged and
    // multiplied in chunks of layout.a_cols columns; the partial sums accumulate in p_s.
    const int ksplit = split_k<kTensorCores>(layout, live, units);
    const int plane = plane_rows<kTensorCores>(live);
    if (live > 0) {
      for (int k_begin = 0; k_begin < four_h; k_begin += layout.a_cols) {
        const int cols = min(layout.a_cols, four_h - k_begin);
        const int padded_cols = round_up(cols, kTensorCores ? 16 : 4);
        if (k_begin > 0) __syncthreads();  // the previous chunk's product has read a_s
        stage_rows<float>(layout, dgates + k_begin, four_h, live, cols, padded_cols, a_s);
        __syncthreads();
        if constexpr (kTensorCores) {
          block_gemm_tensor_cores<T, true>(layout, a_s, w_s, p_s, live, ksplit, k_begin,
                                           padded_cols, k_begin > 0);
        } else {
          block_gemm_fma(layout, a_s, w_s, p_s, live, units, ksplit, k_begin, padded_cols,
                         k_begin > 0);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int row = item_row[i];
      if (row >= live) continue;
      const int local = item_unit[i] - unit0;
      float sum = 0.f;
      for (int kp = 0; kp < ksplit; ++kp) {
        sum += p_s[(kp * plane + row) * layout.n_pad + local];
      }
      dh[i] = sum;
    }
    // The next step's phase 1 writes the other dgates buffer, and its stage/product happen only
    // after the next grid barrier, so p_s and a_s need no further barrier here.
  }

#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int row = item_row[i];
    if (row >= batch) continue;
    args.grad_h0[int64_t(row) * hidden + item_unit[i]] = static_cast<T>(dh[i]);
    args.grad_c0[int64_t(row) * hidden + item_unit[i]] = static_cast<T>(dc[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Step kernels (fallback): one launch per time step
// ------------------------------------------------------------------------------------------------

constexpr int kStepUnits = 8;    // hidden units per block (x 4 gates)
constexpr int kStepRows = 16;    // batch rows per block
constexpr int kStepK = 32;       // k chunk staged in shared memory
constexpr int kStepThreads = kStepUnits * kStepRows;

// Per-step scalars of the step kernels.
struct StepInfo {
  int64_t offset;       // first row of this step
  int live;             // live rows at this step
  int64_t prev_offset;  // rows of the step the forward pass visited before this one
  int prev_live;        // 0 when there is none (h0 / c0 are the previous state)
  int next_live;        // live rows of the step the forward pass visits next (0 if none)
};

// Forward, one step: pre = xg[row] + h_prev @ W_hh^T for 8 units x 4 gates x 16 rows, then the
// cell. h_prev of row b is the previous step's output row (b < prev_live) or h0[b].
template <typename T>
__global__ void __launch_bounds__(kStepThreads)
step_forward_kernel(const T* __restrict__ xg, const T* __restrict__ h0,
                    const T* __restrict__ w_hh, T* __restrict__ out,
                    typename AccType<T>::type* __restrict__ c_state,
                    typename AccType<T>::type* __restrict__ r_state, T* __restrict__ h_n,
                    T* __restrict__ c_n, typename AccType<T>::type* __restrict__ gates,
                    typename AccType<T>::type* __restrict__ cells, StepInfo step, int hidden,
                    int proj, const ZoneoutMasks zoneout) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc h_s[kStepRows][kStepK + 1];
  __shared__ Acc w_s[4 * kStepUnits][kStepK + 1];
  const int local_unit = threadIdx.x % kStepUnits;
  const int local_row = threadIdx.x / kStepUnits;
  const int unit0 = blockIdx.x * kStepUnits;
  const int row0 = blockIdx.y * kStepRows;
  const int unit = unit0 + local_unit;
  const int row = row0 + local_row;
  const int in_dim = proj > 0 ? proj : hidden;

  Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int k0 = 0; k0 < in_dim; k0 += kStepK) {
    for (int index = threadIdx.x; index < kStepRows * kStepK; index += kStepThreads) {
      const int r = index / kStepK;
      const int k = k0 + index % kStepK;
      const int b = row0 + r;
      Acc value = Acc(0);
      if (b < step.live && k < in_dim) {
        value = b < step.prev_live
            ? static_cast<Acc>(out[(step.prev_offset + b) * in_dim + k])
            : static_cast<Acc>(h0[int64_t(b) * in_dim + k]);
      }
      h_s[r][index % kStepK] = value;
    }
    for (int index = threadIdx.x; index < 4 * kStepUnits * kStepK; index += kStepThreads) {
      const int local = index / kStepK;
      const int k = k0 + index % kStepK;
      const int gate = local / kStepUnits;
      const int u = unit0 + local % kStepUnits;
      w_s[local][index % kStepK] = (u < hidden && k < in_dim)
          ? static_cast<Acc>(w_hh[(int64_t(gate) * hidden + u) * in_dim + k])
          : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kStepK; ++k) {
      const Acc hv = h_s[local_row][k];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        acc[gate] += hv * w_s[gate * kStepUnits + local_unit][k];
      }
    }
    __syncthreads();
  }
  if (row >= step.live || unit >= hidden) return;

  const int64_t out_row = step.offset + row;
  const T* x_row = xg + out_row * 4 * hidden + unit;
  GateValues<Acc> g;
  Acc c_new;
  const Acc c_prev = c_state[int64_t(row) * hidden + unit];
  Acc r = cell_forward<Acc>(
      acc[0] + static_cast<Acc>(x_row[0]), acc[1] + static_cast<Acc>(x_row[hidden]),
      acc[2] + static_cast<Acc>(x_row[2 * hidden]), acc[3] + static_cast<Acc>(x_row[3 * hidden]),
      c_prev, g, c_new);
  if (zoneout.c) {  // c keeps its previous value with weight k (cell.h)
    const Acc keep = zoneout_weight<Acc>(zoneout, false, out_row, hidden, unit);
    c_new = keep * c_prev + (Acc(1) - keep) * c_new;
  }
  c_state[int64_t(row) * hidden + unit] = c_new;
  if (gates != nullptr) {
    Acc* gate_row = gates + out_row * 4 * hidden + unit;
    gate_row[0] = g.i;
    gate_row[hidden] = g.f;
    gate_row[2 * hidden] = g.g;
    gate_row[3 * hidden] = g.o;
    cells[out_row * hidden + unit] = c_new;
  }
  const bool last_visit = row >= step.next_live;  // this row's final state
  if (last_visit) c_n[int64_t(row) * hidden + unit] = static_cast<T>(c_new);
  if (proj > 0) {
    r_state[int64_t(row) * hidden + unit] = r;
  } else {
    if (zoneout.h) {  // h_prev: the same source the product above read
      const Acc h_prev = row < step.prev_live
          ? static_cast<Acc>(out[(step.prev_offset + row) * hidden + unit])
          : static_cast<Acc>(h0[int64_t(row) * hidden + unit]);
      const Acc keep = zoneout_weight<Acc>(zoneout, true, out_row, hidden, unit);
      r = keep * h_prev + (Acc(1) - keep) * r;
    }
    const T h_value = static_cast<T>(r);
    out[out_row * hidden + unit] = h_value;
    if (last_visit) h_n[int64_t(row) * hidden + unit] = h_value;
  }
}

// Tiled C[m][n] = sum_k A[m][k] * W(n, k) for m < rows, n < cols, in the accumulation type, with
// an epilogue that stores C. W(n, k) = w[n * ldw + k] (kKMajor false) or w[k * ldw + n] (true).
constexpr int kGemmRows = 16;
constexpr int kGemmCols = 32;
constexpr int kGemmK = 16;
constexpr int kGemmThreads = 256;

template <typename T, bool kKMajor, typename Epilogue>
__global__ void __launch_bounds__(kGemmThreads)
step_gemm_kernel(const typename AccType<T>::type* __restrict__ a, int lda,
                 const T* __restrict__ w, int ldw, int rows, int cols, int depth,
                 Epilogue epilogue) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc a_s[kGemmRows][kGemmK + 1];
  __shared__ Acc w_s[kGemmCols][kGemmK + 1];
  const int local_col = threadIdx.x % 16;
  const int local_row = threadIdx.x / 16;
  const int row0 = blockIdx.y * kGemmRows;
  const int col0 = blockIdx.x * kGemmCols;
  Acc acc0 = Acc(0), acc1 = Acc(0);
  for (int k0 = 0; k0 < depth; k0 += kGemmK) {
    {
      const int r = threadIdx.x / kGemmK;
      const int kk = threadIdx.x % kGemmK;
      const int m = row0 + r;
      const int k = k0 + kk;
      a_s[r][kk] = (m < rows && k < depth) ? a[int64_t(m) * lda + k] : Acc(0);
    }
    for (int index = threadIdx.x; index < kGemmCols * kGemmK; index += kGemmThreads) {
      int c, kk;
      if (kKMajor) {  // consecutive threads read consecutive n
        c = index % kGemmCols;
        kk = index / kGemmCols;
      } else {        // consecutive threads read consecutive k
        c = index / kGemmK;
        kk = index % kGemmK;
      }
      const int n = col0 + c;
      const int k = k0 + kk;
      Acc value = Acc(0);
      if (n < cols && k < depth) {
        value = static_cast<Acc>(kKMajor ? w[int64_t(k) * ldw + n] : w[int64_t(n) * ldw + k]);
      }
      w_s[c][kk] = value;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmK; ++kk) {
      const Acc av = a_s[local_row][kk];
      acc0 += av * w_s[local_col][kk];
      acc1 += av * w_s[local_col + 16][kk];
    }
    __syncthreads();
  }
  const int m = row0 + local_row;
  if (m >= rows) return;
  if (col0 + local_col < cols) epilogue(m, col0 + local_col, acc0);
  if (col0 + local_col + 16 < cols) epilogue(m, col0 + local_col + 16, acc1);
}

// Forward projection: out[row] = h = r @ W_hr^T, mixed with h_prev (the previous step's out row,
// or h0) by zoneout.
template <typename T>
struct ProjectionEpilogue {
  T* out;
  T* h_n;
  int64_t offset;
  int next_live;
  int proj;
  const T* h0;
  int64_t prev_offset;
  int prev_live;
  ZoneoutMasks zoneout;
  __device__ void operator()(int m, int n, typename AccType<T>::type value) const {
    using Acc = typename AccType<T>::type;
    if (zoneout.h) {
      const Acc h_prev = m < prev_live ? static_cast<Acc>(out[(prev_offset + m) * proj + n])
                                       : static_cast<Acc>(h0[int64_t(m) * proj + n]);
      const Acc keep = zoneout_weight<Acc>(zoneout, true, offset + m, proj, n);
      value = keep * h_prev + (Acc(1) - keep) * value;
    }
    const T h_value = static_cast<T>(value);
    out[(offset + m) * proj + n] = h_value;
    if (m >= next_live) h_n[int64_t(m) * proj + n] = h_value;
  }
};

// Backward: store into an accumulation-type state buffer [B, cols], plus `add` [B, cols] when
// given (zoneout's carry k * dh_row of h).
template <typename T>
struct StoreEpilogue {
  typename AccType<T>::type* dst;
  int cols;
  const typename AccType<T>::type* add = nullptr;
  __device__ void operator()(int m, int n, typename AccType<T>::type value) const {
    const int64_t index = int64_t(m) * cols + n;
    dst[index] = add != nullptr ? value + add[index] : value;
  }
};

// Backward with proj_size: dh_row = dh + grad_out[row] (kept in dh and in grad_h_total). Zoneout
// of h splits it: k dh_row goes to carry (added to the step before's dh), (1 - k) dh_row stays.
template <typename T>
__global__ void step_add_grad_out_kernel(const T* __restrict__ grad_out,
                                         typename AccType<T>::type* __restrict__ dh,
                                         T* __restrict__ grad_h_total,
                                         typename AccType<T>::type* __restrict__ carry,
                                         StepInfo step, int proj, const ZoneoutMasks zoneout) {
  using Acc = typename AccType<T>::type;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= int64_t(step.live) * proj) return;
  const int64_t row = index / proj;
  const int64_t col = index % proj;
  Acc value = dh[index] + static_cast<Acc>(grad_out[(step.offset + row) * proj + col]);
  if (zoneout.h) {
    const Acc keep = zoneout_weight<Acc>(zoneout, true, step.offset + row, proj, col);
    carry[index] = keep * value;
    value = (Acc(1) - keep) * value;
  }
  dh[index] = value;
  grad_h_total[(step.offset + row) * proj + col] = static_cast<T>(value);
}

// Backward pointwise, one step: the cell's backward for every live (row, unit).
//   proj == 0: dr = dh + grad_out[row]; proj > 0: dr = dr_state (dh_row @ W_hr, computed before)
template <typename T>
__global__ void step_backward_pointwise_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ c0,
    const typename AccType<T>::type* __restrict__ gates,
    const typename AccType<T>::type* __restrict__ cells,
    const typename AccType<T>::type* __restrict__ dh,
    const typename AccType<T>::type* __restrict__ dr_state,
    typename AccType<T>::type* __restrict__ dc_state,
    typename AccType<T>::type* __restrict__ dgates, T* __restrict__ grad_xg,
    typename AccType<T>::type* __restrict__ carry, StepInfo step, int hidden, int proj,
    const ZoneoutMasks zoneout) {
  using Acc = typename AccType<T>::type;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= int64_t(step.live) * hidden) return;
  const int64_t row = index / hidden;
  const int64_t unit = index % hidden;
  const int64_t out_row = step.offset + row;
  const Acc* gate_row = gates + out_row * 4 * hidden + unit;
  GateValues<Acc> g;
  g.i = gate_row[0];
  g.f = gate_row[hidden];
  g.g = gate_row[2 * hidden];
  g.o = gate_row[3 * hidden];
  const Acc c_prev = row < step.prev_live ? cells[(step.prev_offset + row) * hidden + unit]
                                          : static_cast<Acc>(c0[row * hidden + unit]);
  // With zoneout of c, cells hold the mixed state: the cell's own c_new is recomputed.
  const Acc c = zoneout.c ? g.f * c_prev + g.i * g.g : cells[out_row * hidden + unit];
  Acc dr = proj > 0 ? dr_state[index]
                    : dh[index] + static_cast<Acc>(grad_out[out_row * hidden + unit]);
  if (zoneout.h && proj == 0) {  // k dr reaches h_prev directly (with proj: split before)
    const Acc keep = zoneout_weight<Acc>(zoneout, true, out_row, hidden, unit);
    carry[index] = keep * dr;
    dr = (Acc(1) - keep) * dr;
  }
  const Acc dc = dc_state[index];
  Acc keep_c = Acc(0);
  if (zoneout.c) keep_c = zoneout_weight<Acc>(zoneout, false, out_row, hidden, unit);
  GateGrads<Acc> grads;
  Acc dc_prev;
  // Zoneout of c: (1 - k) dc goes through the cell, k dc straight to c_prev.
  cell_backward<Acc>(g, c, c_prev, dr, zoneout.c ? (Acc(1) - keep_c) * dc : dc, grads, dc_prev);
  dc_state[index] = zoneout.c ? dc_prev + keep_c * dc : dc_prev;
  T* grad_row = grad_xg + out_row * 4 * hidden + unit;
  grad_row[0] = static_cast<T>(grads.i);
  grad_row[hidden] = static_cast<T>(grads.f);
  grad_row[2 * hidden] = static_cast<T>(grads.g);
  grad_row[3 * hidden] = static_cast<T>(grads.o);
  Acc* dgates_row = dgates + row * 4 * hidden + unit;
  dgates_row[0] = grads.i;
  dgates_row[hidden] = grads.f;
  dgates_row[2 * hidden] = grads.g;
  dgates_row[3 * hidden] = grads.o;
}

// ------------------------------------------------------------------------------------------------
// Host side: argument checks, step layout, kernel choice, launches
// ------------------------------------------------------------------------------------------------

// Offsets and live counts of every step, in time order (host vectors), after checking them.
struct Layout {
  std::vector<int64_t> offset;
  std::vector<int64_t> live;
  bool dense = true;
  int steps() const { return static_cast<int>(offset.size()); }
};

Layout step_layout(const Tensor& batch_sizes, int64_t rows, int64_t batch, const char* op) {
  Layout layout;
  TORCH_CHECK(batch_sizes.dim() == 1, op, ": batch_sizes must be 1-D (steps,) int64, got ",
              batch_sizes.dim(), " dimensions");
  if (batch_sizes.numel() == 0) {
    TORCH_CHECK(batch > 0 ? rows % batch == 0 : rows == 0, op,
                ": with dense input (empty batch_sizes) the row count ", rows,
                " must be a multiple of the batch ", batch);
    const int64_t steps = batch > 0 ? rows / batch : 0;
    TORCH_CHECK(steps < (int64_t(1) << 31), op, ": too many time steps (", steps, ")");
    for (int64_t t = 0; t < steps; ++t) {
      layout.offset.push_back(t * batch);
      layout.live.push_back(batch);
    }
    return layout;
  }
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong, op,
              ": batch_sizes must be a CPU int64 tensor (as in PackedSequence), got ",
              batch_sizes.scalar_type(), " on ", batch_sizes.device());
  layout.dense = false;
  const Tensor sizes = batch_sizes.contiguous();
  const int64_t* data = sizes.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t t = 0; t < sizes.numel(); ++t) {
    TORCH_CHECK(data[t] >= 0 && data[t] <= batch, op, ": batch_sizes[", t, "] = ", data[t],
                " is outside [0, batch=", batch, "]");
    TORCH_CHECK(t == 0 || data[t] <= data[t - 1], op,
                ": batch_sizes must not increase (sequences sorted by length), but batch_sizes[",
                t, "] = ", data[t], " > batch_sizes[", t - 1, "] = ", data[t - 1]);
    layout.offset.push_back(offset);
    layout.live.push_back(data[t]);
    offset += data[t];
  }
  TORCH_CHECK(offset == rows, op, ": batch_sizes sum to ", offset, " but there are ", rows,
              " rows");
  return layout;
}

StepInfo step_info(const Layout& layout, int t, bool reverse_visit_order) {
  // reverse_visit_order: the forward pass visits t = T-1 .. 0.
  StepInfo info;
  info.offset = layout.offset[t];
  info.live = static_cast<int>(layout.live[t]);
  const int prev = reverse_visit_order ? t + 1 : t - 1;
  const int next = reverse_visit_order ? t - 1 : t + 1;
  const bool has_prev = prev >= 0 && prev < layout.steps();
  const bool has_next = next >= 0 && next < layout.steps();
  info.prev_offset = has_prev ? layout.offset[prev] : 0;
  info.prev_live = has_prev ? static_cast<int>(layout.live[prev]) : 0;
  info.next_live = has_next ? static_cast<int>(layout.live[next]) : 0;
  return info;
}

void check_tensor(const Tensor& tensor, const char* op, const char* name,
                  std::vector<int64_t> shape, const char* shape_text, const Tensor& like) {
  TORCH_CHECK(tensor.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              " like the other inputs, got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), " like the other inputs, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ",
              shape_text, " = ", at::IntArrayRef(shape), ", got ", tensor.sizes());
}

enum class Kernel { kPersistent, kStep };

struct Choice {
  Kernel kernel = Kernel::kStep;
  int units = 0;
  int blocks = 0;
  int64_t smem = 0;
  int k_chunk = 0;  // backward: columns of dgates staged at once
  std::string why_not_persistent;
};

enum class Requested { kAuto, kPersistent, kStep };

Requested requested_kernel() {
  const char* value = std::getenv("FASTLSTM_CUDA_KERNEL");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return Requested::kAuto;
  }
  if (std::strcmp(value, "persistent") == 0) return Requested::kPersistent;
  if (std::strcmp(value, "step") == 0) return Requested::kStep;
  TORCH_CHECK(false, "FASTLSTM_CUDA_KERNEL must be auto, persistent or step; got '", value, "'");
  return Requested::kAuto;
}

// Blocks of `kernel` that fit on one SM with `smem` bytes of dynamic shared memory. The kernel's
// opt-in shared-memory limit is raised to the largest size asked for so far, and the occupancy is
// remembered per (device, kernel, smem): after the first call of a shape, choosing the kernel makes
// no driver call.
int resident_blocks_per_sm(int device, const void* kernel, int smem) {
  struct Key {
    int device;
    const void* kernel;
    int smem;
    bool operator<(const Key& other) const {
      return std::tie(device, kernel, smem) < std::tie(other.device, other.kernel, other.smem);
    }
  };
  static std::mutex mutex;
  static std::map<Key, int> occupancy;                        // (device, kernel, smem) -> blocks
  static std::map<std::pair<int, const void*>, int> opt_in;   // (device, kernel) -> smem limit set
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = occupancy.find(Key{device, kernel, smem});
  if (found != occupancy.end()) return found->second;
  int& limit = opt_in[{device, kernel}];
  if (smem > limit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    limit = smem;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  occupancy[Key{device, kernel, smem}] = per_sm;
  return per_sm;
}

template <typename T, bool kTensorCores>
const void* persistent_kernel_pointer(bool backward) {
  return backward ? reinterpret_cast<const void*>(&persistent_backward_kernel<T, kTensorCores>)
                  : reinterpret_cast<const void*>(&persistent_forward_kernel<T, kTensorCores>);
}

// Whether the persistent kernel can run this shape, and with which grid; the reasons are the
// capacity limits listed at the top of this file.
template <typename T, bool kTensorCores>
Choice plan_persistent(bool backward, int64_t batch, int64_t hidden, bool has_proj,
                       bool zoneout) {
  Choice choice;
  if (zoneout) {
    choice.why_not_persistent = "zoneout is handled by the step kernel only";
    return choice;
  }
  if (has_proj) {
    choice.why_not_persistent = "proj_size > 0 is handled by the step kernel only";
    return choice;
  }
  if constexpr (std::is_same<T, double>::value) {
    choice.why_not_persistent = "float64 is handled by the step kernel only";
    return choice;
  } else {
  const int device = c10::cuda::current_device();
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  if (kTensorCores && props->major < 8) {
    choice.why_not_persistent = "bf16/fp16 tensor-core kernel needs compute capability 8.0+";
    return choice;
  }
  if (!props->cooperativeLaunch) {
    choice.why_not_persistent = "the device does not support cooperative launch";
    return choice;
  }
  const int sms = props->multiProcessorCount;
  const int64_t units = (hidden + sms - 1) / sms;
  if (batch * units > int64_t(kThreads) * kItems) {
    choice.why_not_persistent = "batch x units per block = " + std::to_string(batch * units) +
                                " exceeds the " + std::to_string(kThreads * kItems) +
                                " (row, unit) pairs a block keeps in registers";
    return choice;
  }
  const int64_t smem_limit = static_cast<int64_t>(props->sharedMemPerBlockOptin);
  int k_chunk = 0;
  SmemLayout layout;
  if (backward) {
    // The backward block stages fp32 dgates, 4H columns of them; what does not fit beside the
    // weights and partial sums is staged in chunks (a few more block barriers per step), the
    // largest chunk that fits, at least kMinChunk columns.
    const int four_h = int(4 * hidden);
    layout = make_layout<kTensorCores, sizeof(T), sizeof(float)>(int(units), four_h, int(batch),
                                                                four_h);
    k_chunk = four_h;
    if (layout.total > smem_limit) {
      const int64_t a_bytes = layout.p_offset - layout.a_offset;
      const int64_t other = layout.total - a_bytes;
      const int64_t row_bytes = int64_t(layout.m_pad) * sizeof(float);
      const int padding = kTensorCores ? 8 : 0;  // lda = a_cols + padding
      const int granule = kTensorCores ? 16 : 4;
      const int64_t fit = smem_limit > other ? (smem_limit - other) / row_bytes - padding : 0;
      k_chunk = static_cast<int>(std::max<int64_t>(fit, 0) / granule * granule);
      if (k_chunk < kMinChunk) {
        choice.why_not_persistent =
            "needs " + std::to_string(other + row_bytes * (kMinChunk + padding)) +
            " bytes of shared memory per block (W_hh columns, partial sums and a " +
            std::to_string(kMinChunk) + "-column chunk of dgates), the device allows " +
            std::to_string(smem_limit);
        return choice;
      }
      layout = make_layout<kTensorCores, sizeof(T), sizeof(float)>(int(units), four_h,
                                                                  int(batch), k_chunk);
    }
  } else {
    layout = make_layout<kTensorCores, sizeof(T), sizeof(T)>(int(4 * units), int(hidden),
                                                            int(batch), int(hidden));
  }
  if (layout.total > smem_limit) {
    choice.why_not_persistent = "needs " + std::to_string(layout.total) +
                                " bytes of shared memory per block, the device allows " +
                                std::to_string(smem_limit);
    return choice;
  }
  const int blocks = static_cast<int>((hidden + units - 1) / units);
  const void* kernel = persistent_kernel_pointer<T, kTensorCores>(backward);
  const int per_sm = resident_blocks_per_sm(device, kernel, static_cast<int>(layout.total));
  if (int64_t(per_sm) * sms < blocks) {
    choice.why_not_persistent = std::to_string(blocks) + " blocks cannot all be resident (" +
                                std::to_string(per_sm) + " per SM x " + std::to_string(sms) +
                                " SMs)";
    return choice;
  }
  choice.kernel = Kernel::kPersistent;
  choice.units = static_cast<int>(units);
  choice.blocks = blocks;
  choice.smem = layout.total;
  choice.k_chunk = k_chunk;
  return choice;
  }
}

// The one place that picks the kernel. The persistent kernel keeps W_hh on chip and runs all steps
// in one launch, so it is used whenever plan_persistent says it fits (see the limits at the top);
// everything else, and anything forced with FASTLSTM_CUDA_KERNEL=step, runs the step kernel.
template <typename T>
Choice choose_kernel(bool backward, int64_t batch, int64_t hidden, bool has_proj, bool zoneout,
                     int steps) {
  const Requested requested = requested_kernel();
  if (requested == Requested::kStep || steps == 0 || batch == 0) return Choice{};
  Choice choice =
      plan_persistent<T, IsMmaType<T>::value>(backward, batch, hidden, has_proj, zoneout);
  TORCH_CHECK(requested != Requested::kPersistent || choice.kernel == Kernel::kPersistent,
              "FASTLSTM_CUDA_KERNEL=persistent, but the persistent ",
              backward ? "backward" : "forward", " kernel cannot run batch=", batch,
              " hidden=", hidden, ": ", choice.why_not_persistent);
  return choice;
}

// Entries of the step table written per launch of fill_step_table_kernel: they travel as the
// kernel's parameters (3.8 KB, under the 4 KB every architecture accepts).
constexpr int kTableEntries = 476;

struct StepTableChunk {
  int64_t values[kTableEntries];
  int64_t begin;
  int count;
};

static_assert(sizeof(StepTableChunk) + sizeof(int64_t*) <= 4096,
              "fill_step_table_kernel's parameters must fit in 4 KB");

__global__ void fill_step_table_kernel(int64_t* __restrict__ table, const StepTableChunk chunk) {
  for (int i = threadIdx.x; i < chunk.count; i += blockDim.x) {
    table[chunk.begin + i] = chunk.values[i];
  }
}

// The packed layout's step table (offsets, then live rows) on the device, for the persistent
// kernel. Its values go to the device as kernel parameters, never through a host buffer: a
// copy from pinned host memory captured in a CUDA graph would record the buffer's address and
// each replay would copy whatever a later call left there, while kernel parameters are stored
// in the graph by value. One launch per kTableEntries entries (2 entries per step).
Tensor device_step_table(const Layout& layout, const Tensor& like, cudaStream_t stream) {
  if (layout.dense) return Tensor();
  const int64_t steps = static_cast<int64_t>(layout.offset.size());
  Tensor table = at::empty({2 * steps}, like.options().dtype(at::kLong));
  StepTableChunk chunk;
  for (int64_t begin = 0; begin < 2 * steps; begin += kTableEntries) {
    chunk.begin = begin;
    chunk.count = static_cast<int>(std::min<int64_t>(kTableEntries, 2 * steps - begin));
    for (int i = 0; i < chunk.count; ++i) {
      const int64_t entry = begin + i;
      chunk.values[i] = entry < steps ? layout.offset[entry] : layout.live[entry - steps];
    }
    fill_step_table_kernel<<<1, 128, 0, stream>>>(table.data_ptr<int64_t>(), chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return table;
}

template <typename T>
void launch_persistent(const void* kernel, const Choice& choice, void* args_struct) {
  void* kernel_args[] = {args_struct};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(choice.blocks), dim3(kThreads),
                                             kernel_args, static_cast<size_t>(choice.smem),
                                             at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

dim3 step_grid(int64_t cols, int64_t rows, int64_t col_tile, int64_t row_tile, const char* op) {
  const int64_t grid_y = (rows + row_tile - 1) / row_tile;
  TORCH_CHECK(grid_y <= 65535, op, ": batch ", rows, " is too large for the step kernel grid");
  return dim3(static_cast<unsigned>((cols + col_tile - 1) / col_tile),
              static_cast<unsigned>(grid_y));
}

// The zoneout seed: a one-element int64 CPU tensor (a tensor, so that torch.compile traces the
// seed drawn every forward as a value of the graph), or none (seed 0).
int64_t zoneout_seed_value(const std::optional<Tensor>& seed, const char* op) {
  if (!seed.has_value() || !seed->defined()) return 0;
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              op, ": zoneout_seed must be a one-element int64 CPU tensor, got ", seed->numel(),
              " elements of ", seed->scalar_type(), " on ", seed->device());
  return seed->item<int64_t>();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward_cuda(
    const Tensor& xg_in, const Tensor& batch_sizes, const Tensor& h0_in, const Tensor& c0_in,
    const Tensor& w_hh_in, const std::optional<Tensor>& w_hr_in, bool reverse, bool save,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& w_ih, double zoneout_h,
    double zoneout_c, const std::optional<Tensor>& zoneout_seed, bool zoneout_expected,
    const std::optional<Tensor>& w_hh_mask) {
  constexpr const char* op = "fastlstm::recurrence_forward (cuda)";
  // The regularizers' arguments (fastlstm/lstm/recurrence.py): fastlstm.LSTM passes the CUDA op the
  // masked weight w_hh * mask itself; zoneout runs in the step kernels (the kernel choice falls
  // back to them from the persistent kernel).
  TORCH_CHECK(zoneout_h >= 0 && zoneout_h < 1 && zoneout_c >= 0 && zoneout_c < 1, op,
              ": zoneout_h and zoneout_c must be in [0, 1), got ", zoneout_h, " and ", zoneout_c);
  const ZoneoutMasks zoneout =
      make_zoneout_masks(zoneout_h, zoneout_c, zoneout_seed_value(zoneout_seed, op),
                         zoneout_expected);
  TORCH_CHECK(!w_hh_mask.has_value(), op, ": w_hh_mask is implemented on the CPU only; pass the "
              "masked weight w_hh * mask as w_hh");
  TORCH_CHECK(!(w_ih.has_value() && w_ih->defined()), op,
              ": w_ih (the input projection inside the op) is implemented on the CPU only; pass "
              "the input gates x @ W_ih^T as xg");
  TORCH_CHECK(xg_in.is_cuda(), op, ": xg must be a CUDA tensor, got ", xg_in.device());
  TORCH_CHECK(xg_in.dim() == 2, op, ": xg must be 2-D (rows, 4*hidden), got ", xg_in.sizes());
  TORCH_CHECK(c0_in.dim() == 2, op, ": c0 must be 2-D (batch, hidden), got ", c0_in.sizes());
  TORCH_CHECK(h0_in.dim() == 2, op, ": h0 must be 2-D (batch, proj or hidden), got ",
              h0_in.sizes());
  const auto dtype = xg_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": xg must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t rows = xg_in.size(0);
  const int64_t batch = c0_in.size(0);
  const int64_t hidden = c0_in.size(1);
  const bool has_proj = w_hr_in.has_value() && w_hr_in->defined();
  TORCH_CHECK(!has_proj || w_hr_in->dim() == 2, op, ": w_hr must be 2-D (proj_size, hidden), got ",
              has_proj ? w_hr_in->sizes() : at::IntArrayRef());
  const int64_t proj = has_proj ? w_hr_in->size(0) : 0;
  const int64_t out_dim = has_proj ? proj : hidden;
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  check_tensor(xg_in, op, "xg", {rows, 4 * hidden}, "(rows, 4*hidden)", xg_in);
  check_tensor(c0_in, op, "c0", {batch, hidden}, "(batch, hidden)", xg_in);
  check_tensor(h0_in, op, "h0", {batch, out_dim}, "(batch, proj_size or hidden)", xg_in);
  check_tensor(w_hh_in, op, "w_hh", {4 * hidden, out_dim}, "(4*hidden, proj_size or hidden)",
               xg_in);
  if (has_proj) {
    check_tensor(*w_hr_in, op, "w_hr", {proj, hidden}, "(proj_size, hidden)", xg_in);
    TORCH_CHECK(proj > 0, op, ": w_hr must have proj_size > 0 rows");
  }
  TORCH_CHECK(hidden <= (int64_t(1) << 28) && out_dim <= (int64_t(1) << 28), op,
              ": hidden size too large");
  const Layout layout = step_layout(batch_sizes, rows, batch, op);

  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_tensor(*bias, op, "bias", {4 * hidden}, "(4*hidden,)", xg_in);

  const c10::cuda::CUDAGuard guard(xg_in.device());
  // A bias is added to the input gates once, before the steps (the cpu kernels add it in their
  // cell pass instead; fastlstm's modules pass it to the cpu backend only).
  const Tensor xg = has_bias ? at::add(xg_in, *bias).contiguous() : xg_in.contiguous();
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = c0_in.contiguous();
  const Tensor w_hh = w_hh_in.contiguous();
  const Tensor w_hr = has_proj ? w_hr_in->contiguous() : Tensor();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;

  Tensor out = at::empty({rows, out_dim}, xg.options());
  Tensor h_n = h0.clone();  // rows that are never live keep h0 / c0
  Tensor c_n = c0.clone();
  Tensor gates = at::empty({save ? rows : 0, 4 * hidden}, xg.options().dtype(acc));
  Tensor cells = at::empty({save ? rows : 0, hidden}, xg.options().dtype(acc));
  const int steps = layout.steps();
  if (steps == 0 || batch == 0) return {out, h_n, c_n, gates, cells};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "recurrence_forward_cuda", [&] {
    using Acc = typename AccType<scalar_t>::type;
    const Choice choice =
        choose_kernel<scalar_t>(false, batch, hidden, has_proj, zoneout.h || zoneout.c, steps);
    if (choice.kernel == Kernel::kPersistent) {
      if constexpr (!std::is_same<scalar_t, double>::value) {
        constexpr bool kTensorCores = IsMmaType<scalar_t>::value;
        Tensor h_buffer = at::empty({2, batch, hidden}, xg.options());
        h_buffer[0].copy_(h0);
        const Tensor table = device_step_table(layout, xg, stream);
        PersistentForwardArgs<scalar_t> args;
        args.xg = xg.data_ptr<scalar_t>();
        args.h0 = h0.data_ptr<scalar_t>();
        args.c0 = c0.data_ptr<scalar_t>();
        args.w_hh = w_hh.data_ptr<scalar_t>();
        args.h_buffer = h_buffer.data_ptr<scalar_t>();
        args.out = out.data_ptr<scalar_t>();
        args.h_n = h_n.data_ptr<scalar_t>();
        args.c_n = c_n.data_ptr<scalar_t>();
        args.gates = save ? gates.data_ptr<float>() : nullptr;
        args.cells = save ? cells.data_ptr<float>() : nullptr;
        args.steps = StepTable{table.defined() ? table.data_ptr<int64_t>() : nullptr, steps,
                               static_cast<int>(batch)};
        args.hidden = static_cast<int>(hidden);
        args.units = choice.units;
        args.reverse = reverse;
        launch_persistent<scalar_t>(persistent_kernel_pointer<scalar_t, kTensorCores>(false),
                                    choice, &args);
        return;
      }
    }
    // Fresh copies (never the caller's c0, even when it already has the accumulation dtype):
    // updated in place step by step.
    Tensor c_state = at::empty({batch, hidden}, xg.options().dtype(acc)).copy_(c0);
    Tensor r_state = has_proj ? at::empty({batch, hidden}, xg.options().dtype(acc)) : Tensor();
    for (int s = 0; s < steps; ++s) {
      const int t = reverse ? steps - 1 - s : s;
      const StepInfo info = step_info(layout, t, reverse);
      if (info.live == 0) continue;
      step_forward_kernel<scalar_t>
          <<<step_grid(hidden, info.live, kStepUnits, kStepRows, op), kStepThreads, 0, stream>>>(
              xg.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
              out.data_ptr<scalar_t>(), c_state.data_ptr<Acc>(),
              has_proj ? r_state.data_ptr<Acc>() : nullptr, h_n.data_ptr<scalar_t>(),
              c_n.data_ptr<scalar_t>(), save ? gates.data_ptr<Acc>() : nullptr,
              save ? cells.data_ptr<Acc>() : nullptr, info, static_cast<int>(hidden),
              static_cast<int>(proj), zoneout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (has_proj) {
        ProjectionEpilogue<scalar_t> epilogue{out.data_ptr<scalar_t>(),
                                              h_n.data_ptr<scalar_t>(),
                                              info.offset,
                                              info.next_live,
                                              static_cast<int>(proj),
                                              h0.data_ptr<scalar_t>(),
                                              info.prev_offset,
                                              info.prev_live,
                                              zoneout};
        step_gemm_kernel<scalar_t, false>
            <<<step_grid(proj, info.live, kGemmCols, kGemmRows, op), kGemmThreads, 0, stream>>>(
                r_state.data_ptr<Acc>(), static_cast<int>(hidden), w_hr.data_ptr<scalar_t>(),
                static_cast<int>(hidden), info.live, static_cast<int>(proj),
                static_cast<int>(hidden), epilogue);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {out, h_n, c_n, gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> recurrence_backward_cuda(
    const Tensor& grad_out_in, const Tensor& grad_hn_in, const Tensor& grad_cn_in,
    const Tensor& batch_sizes, const Tensor& c0_in, const Tensor& w_hh_in,
    const std::optional<Tensor>& w_hr_in, const Tensor& gates_in, const Tensor& cells_in,
    bool reverse, double zoneout_h, double zoneout_c,
    const std::optional<Tensor>& zoneout_seed, bool zoneout_expected,
    const std::optional<Tensor>& w_hh_mask) {
  constexpr const char* op = "fastlstm::recurrence_backward (cuda)";
  TORCH_CHECK(zoneout_h >= 0 && zoneout_h < 1 && zoneout_c >= 0 && zoneout_c < 1, op,
              ": zoneout_h and zoneout_c must be in [0, 1), got ", zoneout_h, " and ", zoneout_c);
  const ZoneoutMasks zoneout =
      make_zoneout_masks(zoneout_h, zoneout_c, zoneout_seed_value(zoneout_seed, op),
                         zoneout_expected);
  TORCH_CHECK(!w_hh_mask.has_value(), op, ": w_hh_mask is implemented on the CPU only; pass the "
              "masked weight w_hh * mask as w_hh");
  TORCH_CHECK(grad_out_in.is_cuda(), op, ": grad_out must be a CUDA tensor, got ",
              grad_out_in.device());
  TORCH_CHECK(grad_out_in.dim() == 2, op, ": grad_out must be 2-D (rows, proj or hidden), got ",
              grad_out_in.sizes());
  TORCH_CHECK(c0_in.dim() == 2, op, ": c0 must be 2-D (batch, hidden), got ", c0_in.sizes());
  const auto dtype = grad_out_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": grad_out must be float32, float64, float16 or bfloat16, got ", dtype);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = grad_out_in.size(0);
  const int64_t batch = c0_in.size(0);
  const int64_t hidden = c0_in.size(1);
  const bool has_proj = w_hr_in.has_value() && w_hr_in->defined();
  TORCH_CHECK(!has_proj || w_hr_in->dim() == 2, op, ": w_hr must be 2-D (proj_size, hidden), got ",
              has_proj ? w_hr_in->sizes() : at::IntArrayRef());
  const int64_t proj = has_proj ? w_hr_in->size(0) : 0;
  const int64_t out_dim = has_proj ? proj : hidden;
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  check_tensor(grad_out_in, op, "grad_out", {rows, out_dim}, "(rows, proj_size or hidden)",
               grad_out_in);
  check_tensor(grad_hn_in, op, "grad_hn", {batch, out_dim}, "(batch, proj_size or hidden)",
               grad_out_in);
  check_tensor(grad_cn_in, op, "grad_cn", {batch, hidden}, "(batch, hidden)", grad_out_in);
  check_tensor(c0_in, op, "c0", {batch, hidden}, "(batch, hidden)", grad_out_in);
  check_tensor(w_hh_in, op, "w_hh", {4 * hidden, out_dim}, "(4*hidden, proj_size or hidden)",
               grad_out_in);
  if (has_proj) {
    check_tensor(*w_hr_in, op, "w_hr", {proj, hidden}, "(proj_size, hidden)", grad_out_in);
  }
  const Tensor acc_like = grad_out_in.new_empty({0}, grad_out_in.options().dtype(acc));
  check_tensor(gates_in, op, "gates (saved by recurrence_forward with save=True)",
               {rows, 4 * hidden}, "(rows, 4*hidden) in the accumulation dtype", acc_like);
  check_tensor(cells_in, op, "cells (saved by recurrence_forward with save=True)",
               {rows, hidden}, "(rows, hidden) in the accumulation dtype", acc_like);
  TORCH_CHECK(hidden <= (int64_t(1) << 28) && out_dim <= (int64_t(1) << 28), op,
              ": hidden size too large");
  const Layout layout = step_layout(batch_sizes, rows, batch, op);

  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor grad_hn = grad_hn_in.contiguous();
  const Tensor grad_cn = grad_cn_in.contiguous();
  const Tensor c0 = c0_in.contiguous();
  const Tensor w_hh = w_hh_in.contiguous();
  const Tensor w_hr = has_proj ? w_hr_in->contiguous() : Tensor();
  const Tensor gates = gates_in.contiguous();
  const Tensor cells = cells_in.contiguous();

  Tensor grad_xg = at::empty({rows, 4 * hidden}, grad_out.options());
  Tensor grad_h_total = at::empty({has_proj ? rows : 0, out_dim}, grad_out.options());
  const int steps = layout.steps();
  if (steps == 0 || batch == 0) return {grad_xg, grad_hn.clone(), grad_cn.clone(), grad_h_total};
  Tensor grad_h0, grad_c0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "recurrence_backward_cuda", [&] {
    using Acc = typename AccType<scalar_t>::type;
    const Choice choice =
        choose_kernel<scalar_t>(true, batch, hidden, has_proj, zoneout.h || zoneout.c, steps);
    if (choice.kernel == Kernel::kPersistent) {
      if constexpr (!std::is_same<scalar_t, double>::value) {
        constexpr bool kTensorCores = IsMmaType<scalar_t>::value;
        Tensor dgates_buffer =
            at::empty({2, batch, 4 * hidden}, grad_out.options().dtype(at::kFloat));
        grad_h0 = at::empty({batch, hidden}, grad_out.options());
        grad_c0 = at::empty({batch, hidden}, grad_out.options());
        const Tensor table = device_step_table(layout, grad_out, stream);
        PersistentBackwardArgs<scalar_t> args;
        args.grad_out = grad_out.data_ptr<scalar_t>();
        args.grad_hn = grad_hn.data_ptr<scalar_t>();
        args.grad_cn = grad_cn.data_ptr<scalar_t>();
        args.c0 = c0.data_ptr<scalar_t>();
        args.w_hh = w_hh.data_ptr<scalar_t>();
        args.gates = gates.data_ptr<float>();
        args.cells = cells.data_ptr<float>();
        args.dgates_buffer = dgates_buffer.data_ptr<float>();
        args.grad_xg = grad_xg.data_ptr<scalar_t>();
        args.grad_h0 = grad_h0.data_ptr<scalar_t>();
        args.grad_c0 = grad_c0.data_ptr<scalar_t>();
        args.steps = StepTable{table.defined() ? table.data_ptr<int64_t>() : nullptr, steps,
                               static_cast<int>(batch)};
        args.hidden = static_cast<int>(hidden);
        args.units = choice.units;
        args.k_chunk = choice.k_chunk;
        args.reverse = reverse;
        launch_persistent<scalar_t>(persistent_kernel_pointer<scalar_t, kTensorCores>(true),
                                    choice, &args);
        return;
      }
    }
    // Fresh copies (never the caller's tensors), updated in place step by step.
    Tensor dh = at::empty({batch, out_dim}, grad_out.options().dtype(acc)).copy_(grad_hn);
    Tensor dc = at::empty({batch, hidden}, grad_out.options().dtype(acc)).copy_(grad_cn);
    Tensor dgates = at::empty({batch, 4 * hidden}, grad_out.options().dtype(acc));
    Tensor dr = has_proj ? at::empty({batch, hidden}, grad_out.options().dtype(acc)) : Tensor();
    // Zoneout of h: k * dh_row of this step's rows, added to the dh the GEMM below computes.
    Tensor carry =
        zoneout.h ? at::empty({batch, out_dim}, grad_out.options().dtype(acc)) : Tensor();
    Acc* carry_ptr = zoneout.h ? carry.data_ptr<Acc>() : nullptr;
    constexpr int kPointwiseThreads = 256;
    for (int s = 0; s < steps; ++s) {
      const int t = reverse ? s : steps - 1 - s;
      const StepInfo info = step_info(layout, t, reverse);
      if (info.live == 0) continue;
      if (has_proj) {
        const int64_t count = int64_t(info.live) * proj;
        step_add_grad_out_kernel<scalar_t>
            <<<static_cast<unsigned>((count + kPointwiseThreads - 1) / kPointwiseThreads),
               kPointwiseThreads, 0, stream>>>(grad_out.data_ptr<scalar_t>(), dh.data_ptr<Acc>(),
                                               grad_h_total.data_ptr<scalar_t>(), carry_ptr, info,
                                               static_cast<int>(proj), zoneout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dr = dh_row @ W_hr: W_hr is (proj, hidden), so W(n=unit, k=p) = w_hr[p * hidden + unit].
        step_gemm_kernel<scalar_t, true>
            <<<step_grid(hidden, info.live, kGemmCols, kGemmRows, op), kGemmThreads, 0, stream>>>(
                dh.data_ptr<Acc>(), static_cast<int>(proj), w_hr.data_ptr<scalar_t>(),
                static_cast<int>(hidden), info.live, static_cast<int>(hidden),
                static_cast<int>(proj), StoreEpilogue<scalar_t>{dr.data_ptr<Acc>(),
                                                               static_cast<int>(hidden)});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int64_t count = int64_t(info.live) * hidden;
      step_backward_pointwise_kernel<scalar_t>
          <<<static_cast<unsigned>((count + kPointwiseThreads - 1) / kPointwiseThreads),
             kPointwiseThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), gates.data_ptr<Acc>(),
              cells.data_ptr<Acc>(), dh.data_ptr<Acc>(), has_proj ? dr.data_ptr<Acc>() : nullptr,
              dc.data_ptr<Acc>(), dgates.data_ptr<Acc>(), grad_xg.data_ptr<scalar_t>(), carry_ptr,
              info, static_cast<int>(hidden), static_cast<int>(proj), zoneout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dh = dgates @ W_hh: W_hh is (4*hidden, out_dim), so W(n, k) = w_hh[k * out_dim + n].
      step_gemm_kernel<scalar_t, true>
          <<<step_grid(out_dim, info.live, kGemmCols, kGemmRows, op), kGemmThreads, 0, stream>>>(
              dgates.data_ptr<Acc>(), static_cast<int>(4 * hidden), w_hh.data_ptr<scalar_t>(),
              static_cast<int>(out_dim), info.live, static_cast<int>(out_dim),
              static_cast<int>(4 * hidden),
              StoreEpilogue<scalar_t>{dh.data_ptr<Acc>(), static_cast<int>(out_dim), carry_ptr});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_h0 = dh.to(dtype);
    grad_c0 = dc.to(dtype);
  });
  return {grad_xg, grad_h0, grad_c0, grad_h_total};
}

}  // namespace
}  // namespace fastlstm

TORCH_LIBRARY_IMPL(fastlstm, CUDA, m) {
  m.impl("recurrence_forward", &fastlstm::recurrence_forward_cuda);
  m.impl("recurrence_backward", &fastlstm::recurrence_backward_cuda);
}
