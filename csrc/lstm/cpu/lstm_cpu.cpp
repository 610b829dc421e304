// CPU kernels of fastlstm::recurrence_forward / recurrence_backward: the whole recurrence of one
// layer and direction in one op call (the contract is in fastlstm/lstm/recurrence.py).
//
// Per time step: the h @ W_hh^T GEMM through ATen (MKL or oneDNN underneath) into a preallocated
// buffer, then the fused cell arithmetic of cell.h over SIMD lanes, parallel over batch rows.
// Everything is computed in the accumulation type (double for float64, float otherwise); fp16 and
// bf16 inputs are converted once on entry, and h is rounded through the input dtype each step, as
// the contract asks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/buffers.h"
#include "decode/decode_kernels.h"
#include "lstm/cpu/step_kernels.h"
#include "common/part_barrier.h"
#include "cpu/gemm.h"
#include "cpu/step_gemm.h"

#if defined(__linux__)
// The Fortran BLAS that libtorch_cpu exports when torch is built with MKL or OpenBLAS. Declared
// weak: a torch without them still loads this library, and the steps fall back to at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (libtorch_cpu exports it when built with MKL): a weight matrix packed once
// into MKL's internal layout, then multiplied every step without being repacked.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}
#define FASTLSTM_DIRECT_BLAS 1
#endif

FASTLSTM_DEFINE_CPU_STEP_KERNELS(baseline)

namespace fastlstm {
namespace cpu {

#if defined(__x86_64__) || defined(_M_X64)
// FASTLSTM_CPU_ISA=avx2 or baseline (read once, at the first step) caps the pointwise kernels'
// instruction set below what the CPU has, so that each copy can be tested on one machine.
static bool cpu_isa_allows(const char* isa) {
  const char* cap = std::getenv("FASTLSTM_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  const std::string value(cap);
  if (value == "baseline") return false;
  if (value == "avx2") return std::string(isa) == "avx2";
  return true;
}

static bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          cpu_isa_allows("avx2");
  return has;
}

static bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && cpu_isa_allows("avx512") &&
                          __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

// The pointwise part of a step for rows [begin, end), in the widest instruction set the CPU has.
template <typename T>
static void forward_rows(const ForwardStep<T>& step, int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512()) return forward_rows_avx512(step, begin, end);
  if (cpu_has_avx2()) return forward_rows_avx2(step, begin, end);
#endif
  forward_rows_baseline(step, begin, end);
}

template <typename T>
static void backward_rows(const BackwardStep<T>& step, int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512()) return backward_rows_avx512(step, begin, end);
  if (cpu_has_avx2()) return backward_rows_avx2(step, begin, end);
#endif
  backward_rows_baseline(step, begin, end);
}

const DecodeKernels& decode_kernels() {
  using Cell = void (*)(const ForwardStep<float>&, int64_t, int64_t);
  static const DecodeKernels kernels = [] {
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx512()) {
      return DecodeKernels{dot4_avx512, dot1_avx512, static_cast<Cell>(forward_rows_avx512)};
    }
    if (cpu_has_avx2()) {
      return DecodeKernels{dot4_avx2, dot1_avx2, static_cast<Cell>(forward_rows_avx2)};
    }
#endif
    return DecodeKernels{dot4_baseline, dot1_baseline, static_cast<Cell>(forward_rows_baseline)};
  }();
  return kernels;
}

// Rows per parallel task: enough hidden units that a task outweighs the cost of handing it out.
static int64_t grain_rows(int64_t hidden) {
  constexpr int64_t kUnitsPerTask = 8192;
  return hidden >= kUnitsPerTask ? 1 : kUnitsPerTask / hidden;
}

// The pointwise part of a step over all its live rows, the rows split among threads.
template <typename T>
static void forward_step(const ForwardStep<T>& step, int64_t live) {
  at::parallel_for(0, live, grain_rows(step.hidden),
                   [&](int64_t begin, int64_t end) { forward_rows(step, begin, end); });
}

template <typename T>
static void backward_step(const BackwardStep<T>& step, int64_t live) {
  at::parallel_for(0, live, grain_rows(step.hidden),
                   [&](int64_t begin, int64_t end) { backward_rows(step, begin, end); });
}

namespace {

using at::Tensor;

// ---- the per-step GEMM ----------------------------------------------------------------------

// c[m, n] = a[m, k] @ b[k, n], row-major with leading dimensions; a_t / b_t say that a / b are
// stored transposed ([k, m] / [n, k]). A small step's GEMM takes a few microseconds, and
// at::mm_out's dispatch and the narrow()ed views around it took as long (B=8, H=128), so the
// BLAS is called directly when torch exports one.
// With `accumulate`, c += a @ b.
template <typename T>
void step_gemm(bool a_t, bool b_t, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate = false) {
  if (m == 0 || n == 0) return;
#ifdef FASTLSTM_DIRECT_BLAS
  constexpr bool is_float = std::is_same<T, float>::value;
  const bool have = is_float ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (have && k > 0 && m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX &&
      ldb < INT_MAX && ldc < INT_MAX) {
    // Column-major BLAS: c^T = b^T @ a^T.
    const char ta = b_t ? 'T' : 'N', tb = a_t ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda),
              ildc = static_cast<int>(ldc);
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (is_float) {
      sgemm_(&ta, &tb, &im, &in, &ik, &one, b, &ilda, a, &ildb, &beta, c, &ildc);
    } else {
      dgemm_(&ta, &tb, &im, &in, &ik, &one, b, &ilda, a, &ildb, &beta, c, &ildc);
    }
    return;
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  T* a_mut = const_cast<T*>(a);
  T* b_mut = const_cast<T*>(b);
  Tensor a_view = a_t ? at::from_blob(a_mut, {m, k}, {1, lda}, options)
                      : at::from_blob(a_mut, {m, k}, {lda, 1}, options);
  Tensor b_view = b_t ? at::from_blob(b_mut, {k, n}, {1, ldb}, options)
                      : at::from_blob(b_mut, {k, n}, {ldb, 1}, options);
  Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (accumulate) {
    c_view.addmm_(a_view, b_view);
  } else {
    at::mm_out(c_view, a_view, b_view);
  }
}

// C[m, n] = A[m, k] @ B[k, n] for a B that stays fixed over a layer's steps (row-major; B given
// as [k, n], or transposed as [n, k], with leading dimension ldb). A plain sgemm repacks B on
// every call: at batch 16 and H = 512, copying the weights into MKL's panel layout took a fifth
// of the step's GEMM time. With MKL and `pack`, B is packed once for the batch size `m` of a dense
// step and reused; any other row count (the shorter steps of a packed sequence) takes the plain
// GEMM, as MKL documents the packed matrix for the m, n, k it was packed with.
template <typename T>
class FixedRightGemm {
 public:
  FixedRightGemm() = default;
  FixedRightGemm(const FixedRightGemm&) = delete;
  FixedRightGemm& operator=(const FixedRightGemm&) = delete;

  // For fastlstm's own step GEMM (csrc/cpu/step_gemm.h; float32 only): the memory of B's packed copy,
  // in the AVX512-BF16 kernel's packing with `bf16` (a bf16 layer: A and B hold bf16 values)
  // where the CPU has it. Called outside the parallel region, so that a failed allocation raises
  // normally; pack_own() then fills it inside, and the kernel runs every product, whatever its
  // row count.
  void reserve_own(int64_t k, int64_t n, bool bf16) {
    static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value);
    if constexpr (std::is_same<T, float>::value) {
      if (k <= 0 || n <= 0) return;
      if (bf16 && step_gemm_bf16_available()) {
        storage_ = cached_empty({step_gemm_packed_bf16_elements(k, n)},
                                at::TensorOptions(at::kBFloat16));
        bf16_packed_ = reinterpret_cast<uint16_t*>(storage_.data_ptr<at::BFloat16>());
      } else {
        storage_ = cached_empty({step_gemm_packed_floats(k, n)}, at::TensorOptions(at::kFloat));
        own_packed_ = storage_.data_ptr<float>();
      }
    }
  }

  // Packs B for the own kernel into the memory reserve_own() took; B is given as for prepare(),
  // with `columns` saying which column (or, transposed, row) of `b` each of B's n columns is.
  // With `mask` (laid out as b; float32 packing only), B is b * mask.
  void pack_own(const T* b, int64_t ldb, bool b_transposed, int64_t k, int64_t n,
                PackColumns columns, const T* mask = nullptr) {
    k_ = k;
    n_ = n;
    if constexpr (std::is_same<T, float>::value) {
      if (bf16_packed_ != nullptr) step_gemm_pack_bf16(b, ldb, b_transposed, k, n, bf16_packed_,
                                                       columns);
      if (own_packed_ != nullptr) {
        step_gemm_pack(b, ldb, b_transposed, k, n, own_packed_, columns, mask);
      }
    }
  }

  // Call from the thread that will run the products (MKL packs for that thread count).
  void prepare(const T* b, int64_t ldb, bool b_transposed, int64_t m, int64_t k, int64_t n,
               bool pack) {
    b_ = b;
    ldb_ = ldb;
    b_transposed_ = b_transposed;
    m_ = m;
    k_ = k;
    n_ = n;
#ifdef FASTLSTM_DIRECT_BLAS
    if constexpr (std::is_same<T, float>::value) {
      if (pack && cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
          cblas_sgemm_compute != nullptr && m > 0 && n > 0 && k > 0 && m < INT_MAX &&
          n < INT_MAX && k < INT_MAX && ldb < INT_MAX) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, static_cast<int>(m),
                                                       static_cast<int>(n), static_cast<int>(k));
        // Inside the parallel region nothing may throw past the barrier: without memory for
        // the packed copy, the plain GEMM is used.
        try {
          storage_ = cached_empty({static_cast<int64_t>(bytes)}, at::TensorOptions(at::kByte));
          packed_ = reinterpret_cast<float*>(storage_.data_ptr<uint8_t>());
        } catch (...) {
          packed_ = nullptr;
        }
        if (packed_ != nullptr) {
          cblas_sgemm_pack(kRowMajor, kBMatrix, b_transposed ? kTrans : kNoTrans,
                           static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
                           b, static_cast<int>(ldb), packed_);
        }
      }
    }
#endif
  }

  // c = a @ B, or with `accumulate` c += a @ B.
  void run(int64_t m, const T* a, int64_t lda, T* c, int64_t ldc, bool accumulate = false) const {
    if (m == 0) return;
    if constexpr (std::is_same<T, float>::value) {
      if (bf16_packed_ != nullptr) {
        step_gemm_bf16(m, n_, k_, a, lda, bf16_packed_, c, ldc, accumulate);
        return;
      }
      if (own_packed_ != nullptr) {
        step_gemm_avx512(m, n_, k_, a, lda, own_packed_, c, ldc, accumulate);
        return;
      }
    }
#ifdef FASTLSTM_DIRECT_BLAS
    if constexpr (std::is_same<T, float>::value) {
      if (packed_ != nullptr && m == m_ && lda < INT_MAX && ldc < INT_MAX) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                            static_cast<int>(n_), static_cast<int>(k_), a,
                            static_cast<int>(lda), packed_, static_cast<int>(n_),
                            accumulate ? 1.0f : 0.0f, c, static_cast<int>(ldc));
        return;
      }
    }
#endif
    step_gemm<T>(false, b_transposed_, m, n_, k_, a, lda, b_, ldb_, c, ldc, accumulate);
  }

 private:
  // CBLAS enumerators.
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151,
                       kBMatrix = 162;
  const T* b_ = nullptr;
  int64_t ldb_ = 0;
  bool b_transposed_ = false;
  int64_t m_ = 0, k_ = 0, n_ = 0;
  at::Tensor storage_;  // holds packed_, own_packed_ or bf16_packed_
  float* packed_ = nullptr;
  float* own_packed_ = nullptr;
  uint16_t* bf16_packed_ = nullptr;
};

// ---- argument checks: every tensor is checked before any memory is touched ------------------

void check_tensor(const char* op, const Tensor& tensor, const char* name, const char* shape_text,
                  std::vector<int64_t> shape, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              tensor.device());
  TORCH_CHECK(tensor.dim() == static_cast<int64_t>(shape.size()) &&
                  tensor.sizes() == at::IntArrayRef(shape),
              op, ": ", name, " must have shape ", shape_text, " = ", at::IntArrayRef(shape),
              ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
}

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Live rows per time step, in time order. An empty batch_sizes means dense: `batch` rows a step.
std::vector<int64_t> step_sizes(const char* op, const Tensor& batch_sizes, int64_t num_rows,
                                int64_t batch) {
  TORCH_CHECK(batch_sizes.device().is_cpu(), op,
              ": batch_sizes must be a CPU tensor (as in PackedSequence), got one on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.dim() == 1, op, ": batch_sizes must be 1-D [T], got shape ",
              batch_sizes.sizes());
  std::vector<int64_t> sizes;
  if (batch_sizes.numel() == 0) {
    if (batch == 0) {
      TORCH_CHECK(num_rows == 0, op, ": with a batch of 0 rows the input must have 0 rows, got ",
                  num_rows);
      return sizes;
    }
    TORCH_CHECK(num_rows % batch == 0, op, ": dense input (empty batch_sizes) must have T * B rows "
                "with B = h0.size(0) = ", batch, ", got ", num_rows, " rows");
    sizes.assign(num_rows / batch, batch);
    return sizes;
  }
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, op, ": batch_sizes must have dtype int64, "
              "got ", batch_sizes.scalar_type());
  const Tensor contiguous = batch_sizes.contiguous();
  const int64_t* data = contiguous.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t t = 0; t < contiguous.numel(); ++t) {
    const int64_t live = data[t];
    TORCH_CHECK(live >= 1 && live <= batch, op, ": batch_sizes[", t, "] = ", live,
                " must be in [1, B] with B = h0.size(0) = ", batch);
    TORCH_CHECK(t == 0 || live <= data[t - 1], op, ": batch_sizes must not increase, got ",
                data[t - 1], " then ", live, " at step ", t);
    total += live;
    sizes.push_back(live);
  }
  TORCH_CHECK(total == num_rows, op, ": batch_sizes sum to ", total, " but the input has ",
              num_rows, " rows");
  return sizes;
}

std::vector<int64_t> step_offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> offsets(sizes.size() + 1, 0);
  for (size_t t = 0; t < sizes.size(); ++t) offsets[t + 1] = offsets[t] + sizes[t];
  return offsets;
}

Tensor to_acc(const Tensor& tensor, at::ScalarType acc) {
  return tensor.scalar_type() == acc ? tensor : tensor.to(acc);
}

// ---- the recurrence of fp32/fp64 layers without projection: threads own hidden units --------
//
// One parallel region runs every step. Part k of the hidden units [u_k, u_k+1) belongs to one
// thread for the whole sequence, with its slice of W_hh (packed contiguous, so it stays in that
// core's cache) and its c. Per step a thread multiplies h_prev by its W_hh slice (a single-thread
// BLAS call), applies the cell to its units and writes its columns of h straight into `out`;
// one barrier per step then makes the step's h visible to every thread. Against one
// multi-threaded GEMM and one parallel pointwise pass per step, this saves two fork/joins a step
// and splits the pointwise work, which at H <= 256 costs about as much as the GEMM.

// Asks the cache for columns [begin, end) of `rows` rows of a row-major matrix (leading dimension
// ld), ahead of their use. A part's pointwise pass reads its units' columns of the step's input
// gates (or saved gates), which the input projection wrote long before and which have left the
// cache: issued before the step's GEMM, the loads overlap it instead of stalling the cell math.
template <typename T>
inline void prefetch_columns(const T* data, int64_t rows, int64_t ld, int64_t begin,
                             int64_t end) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t row = 0; row < rows; ++row) {
    const T* base = data + row * ld;
    for (int64_t j = begin; j < end; j += kLine) __builtin_prefetch(base + j, 0, 2);
  }
}

// Packing W_hh for MKL reads it once more than the steps do: worth it from a few steps on, not
// for a one-token prefill (1 ms of a 1.8 ms generate() call at H = 256 before this threshold).
constexpr int64_t kPackMinSteps = 8;

// How a layer's recurrence is divided among threads. The batch rows are independent sequences,
// so a thread that owns rows [r_k, r_k+1) runs them through every step on its own, with no
// synchronization at all; it reads the whole of W_hh each step. When W_hh is too large to stay in
// one core's cache, or the batch too small to divide, threads own hidden units [u_k, u_k+1)
// instead, with only their slice of W_hh, and meet at one barrier per step.
struct Partition {
  bool by_rows = false;
  std::vector<int64_t> bounds{0, 0};  // part k owns rows or units [bounds[k], bounds[k + 1])

  int64_t parts() const { return static_cast<int64_t>(bounds.size()) - 1; }
  int64_t unit_begin(int64_t k) const { return by_rows ? 0 : bounds[k]; }
  int64_t unit_end(int64_t k, int64_t hidden) const { return by_rows ? hidden : bounds[k + 1]; }
  // Rows of part k among the step's `live` rows.
  int64_t row_begin(int64_t k, int64_t live) const {
    return by_rows ? std::min(bounds[k], live) : 0;
  }
  int64_t row_end(int64_t k, int64_t live) const {
    return by_rows ? std::min(bounds[k + 1], live) : live;
  }
};

Partition partition(int64_t hidden, int64_t batch, int64_t steps, int64_t element_size) {
  // Each part's GEMM per step must outweigh handing out the work (and, by units, a barrier of
  // about a microsecond): at least kMinMacsPerPart multiply-adds.
  constexpr int64_t kMinMacsPerPart = 1 << 17;
  constexpr int64_t kMinUnits = 32;       // by units: whole SIMD vectors, no shared cache lines
  constexpr int64_t kMinRows = 16;        // by rows: fewer rows make a GEMV-like GEMM (B=8, H=128:
                                          // 10% slower than by units)
  // By rows when every thread's copy of W_hh fits in its share of the cache (L2 on current x86
  // server cores is 1-2 MiB).
  constexpr int64_t kRowsMaxWeightBytes = int64_t(1) << 20;
  int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#ifndef FASTLSTM_DIRECT_BLAS
  threads = 1;  // at::mm_out inside the region could throw past a barrier
#else
  if (sgemm_ == nullptr || dgemm_ == nullptr) threads = 1;
#endif
  const int64_t macs = batch * 4 * hidden * hidden;
  threads = std::max<int64_t>(1, std::min(threads, macs / kMinMacsPerPart));
  // A few steps do not repay the per-call setup of a split (copies of W_hh, thread start-up).
  if (steps < kPackMinSteps) threads = 1;
  Partition result;
  result.by_rows =
      4 * hidden * hidden * element_size <= kRowsMaxWeightBytes && batch >= 2 * kMinRows;
  const int64_t extent = result.by_rows ? batch : hidden;
  const int64_t granule = result.by_rows ? 4 : 64 / element_size;
  const int64_t minimum = result.by_rows ? kMinRows : kMinUnits;
  const int64_t parts = std::max<int64_t>(1, std::min(threads, extent / minimum));
  const int64_t per_part = (extent + parts - 1) / parts;
  const int64_t chunk = (per_part + granule - 1) / granule * granule;
  result.bounds.assign(1, 0);
  while (result.bounds.back() < extent) {
    result.bounds.push_back(std::min(extent, result.bounds.back() + chunk));
  }
  if (result.bounds.size() == 1) result.bounds.push_back(0);
  return result;
}

// What the split drivers share: the steps' row offsets, the partition and whether to pack W_hh.
struct SplitPlan {
  SplitPlan(const std::vector<int64_t>& sizes, int64_t hidden, int64_t batch,
            int64_t element_size)
      : steps(static_cast<int64_t>(sizes.size())),
        offsets(step_offsets(sizes)),
        split(partition(hidden, batch, steps, element_size)),
        parts(split.parts()),
        pack(steps >= kPackMinSteps),
        own(uses_own_gemm(steps, element_size)) {}

  // Whether a layer of `steps` steps packs its weights for the own step GEMM (float32
  // arithmetic: float32 layers, and fp16 / bf16 ones on float32 copies).
  static bool uses_own_gemm(int64_t steps, int64_t element_size) {
    return steps >= kPackMinSteps && element_size == sizeof(float) && step_gemm_available() &&
           avoid_blas();
  }

  const int64_t steps;
  const std::vector<int64_t> offsets;
  const Partition split;
  const int64_t parts;
  const bool pack;
  const bool own;  // float32 steps on fastlstm's AVX-512 GEMM (csrc/cpu/step_gemm.h)
};

// Part k's columns of a [4H, K] weight's transpose (its units' i, f, g, o rows of W), copied into
// a contiguous [K, 4 n_k] block at offset 4 K u_k of `blocks`.
template <typename T>
void copy_unit_blocks(const Tensor& w, int64_t hidden, const Partition& split, Tensor& blocks) {
  const int64_t depth = w.size(1);
  for (int64_t k = 0; k < split.parts(); ++k) {
    const int64_t u0 = split.unit_begin(k), n = split.unit_end(k, hidden) - u0;
    Tensor block = at::from_blob(blocks.data_ptr<T>() + depth * 4 * u0, {depth, 4, n},
                                 w.options());
    block.copy_(w.view({4, hidden, depth}).narrow(1, u0, n).permute({2, 0, 1}));
  }
}

// h of rows [r0, r1), units [u0, u1) rounded to `Low` (fp16 / bf16) in place.
template <typename Low>
void round_through(float* h, int64_t ld, int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = h + r * ld;
    for (int64_t j = u0; j < u1; ++j) row[j] = static_cast<float>(static_cast<Low>(row[j]));
  }
}

// With `w_ih` (only where the own step GEMM runs: plan.own), `input` is the layer input x [N, I]
// and each part computes its own share of the step's x @ W_ih^T right before h @ W_hh^T, into the
// same buffer: the [N, 4H] input gates are never written to memory and read back (at B=16,
// H=512 that one large GEMM ran at 60% of the rate of the same product done a block at a time).
// Otherwise `input` is the input gates [N, 4H].
// With `round_h` fp16 or bf16 (T float32 only), every step's h is rounded to that dtype as soon as
// it is computed: the contract's float32 computation for fp16 / bf16 inputs, on float32 copies.
// Regularizers: `w_mask` [4H, H] (weight drop) multiplies W_hh: applied while packing for the own
// step GEMM, which copies W_hh into panels every call anyway, else on a masked copy made here
// (the BLAS reads W_hh in place); `zoneout` (cell.h) mixes h and c in the cell pass.
template <typename T>
void forward_split(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                   const Tensor& input, const Tensor* w_ih, const T* bias, const Tensor& w_hh_in,
                   const Tensor& h0, Tensor& c, Tensor& out, Tensor& gates, Tensor& cells,
                   bool save, Tensor& h_n, at::ScalarType round_h = at::kFloat,
                   const Tensor* w_mask = nullptr, const ZoneoutMasks* zoneout = nullptr) {
  const int64_t batch = h0.size(0);
  const SplitPlan plan(sizes, hidden, batch, sizeof(T));
  const bool mask_in_pack = w_mask != nullptr && plan.own && round_h != at::kBFloat16;
  const Tensor w_hh = w_mask != nullptr && !mask_in_pack ? w_hh_in * *w_mask : w_hh_in;
  const T* w_mask_data = mask_in_pack ? w_mask->data_ptr<T>() : nullptr;
  const int64_t steps = plan.steps, parts = plan.parts;
  const std::vector<int64_t>& offsets = plan.offsets;
  const Partition& split = plan.split;
  const bool pack = plan.pack;
  const bool fused = w_ih != nullptr;
  const int64_t input_size = fused ? w_ih->size(1) : 0;
  // A bf16 layer: h (rounded every step), h0, x and the weights all hold bf16 values, so the
  // products (whose A is h or x) can run on the AVX512-BF16 step kernel.
  const bool bf16 = round_h == at::kBFloat16;
  // Each part multiplies by the columns of W_hh^T of its units (and of W_ih^T when the
  // projection is fused). The own step GEMM packs them straight from W (pack_own with a column
  // map). For the BLAS, split by units, part k's are copied into a contiguous [H, 4 n_k] block
  // (its units' i, f, g, o pre-activations) at offset 4 H u_k; otherwise every part uses all of
  // W_hh^T, read as the transpose of W_hh.
  const bool by_unit_blocks = !split.by_rows && parts > 1;
  const bool copy_blocks = by_unit_blocks && !plan.own;
  Tensor packed = copy_blocks ? cached_empty({hidden, 4 * hidden}, w_hh.options()) : w_hh;
  if (copy_blocks) copy_unit_blocks<T>(w_hh, hidden, split, packed);
  Tensor packed_ih;
  if (fused) {
    packed_ih = copy_blocks ? cached_empty({input_size, 4 * hidden}, w_ih->options()) : *w_ih;
    if (copy_blocks) copy_unit_blocks<T>(*w_ih, hidden, split, packed_ih);
  }
  // h_prev @ W_hh^T of the step: by units, part k's [B, 4 n_k] at offset 4 B u_k; by rows,
  // one [B, 4H] matrix.
  Tensor scratch = cached_empty({batch * 4 * hidden}, w_hh.options());
  const T* xg = fused ? nullptr : input.data_ptr<T>();
  const T* x_data = fused ? input.data_ptr<T>() : nullptr;
  const T* h0_data = h0.data_ptr<T>();
  const T* packed_data = packed.data_ptr<T>();
  const T* packed_ih_data = fused ? packed_ih.data_ptr<T>() : nullptr;
  T* scratch_data = scratch.data_ptr<T>();
  T* c_data = c.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  T* gates_data = save ? gates.data_ptr<T>() : nullptr;
  T* cells_data = save ? cells.data_ptr<T>() : nullptr;
  PartBarrier barrier(parts);
  std::vector<FixedRightGemm<T>> products(parts);
  std::vector<FixedRightGemm<T>> projections(fused ? parts : 0);
  for (int64_t k = 0; plan.own && k < parts; ++k) {
    const int64_t n = split.unit_end(k, hidden) - split.unit_begin(k);
    products[k].reserve_own(hidden, 4 * n, bf16);
    if (fused) projections[k].reserve_own(input_size, 4 * n, bf16);
  }
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t k = part_begin; k < part_end; ++k) {
      const int64_t u0 = split.unit_begin(k), n = split.unit_end(k, hidden) - u0;
      const int64_t rows = split.row_end(k, batch) - split.row_begin(k, batch);
      if (plan.own) {
        // Column j of the part's B is gate j / n of unit u0 + j % n: row (j / n) H + u0 + j % n
        // of W (all of W, in order, when the part has every unit).
        const PackColumns columns{n, hidden, u0};
        products[k].pack_own(packed_data, hidden, true, hidden, 4 * n, columns, w_mask_data);
        if (fused) {
          projections[k].pack_own(packed_ih_data, input_size, true, input_size, 4 * n, columns);
        }
      } else if (by_unit_blocks) {
        products[k].prepare(packed_data + hidden * 4 * u0, 4 * n, false, rows, hidden, 4 * n,
                            pack);
        if (fused) {
          projections[k].prepare(packed_ih_data + input_size * 4 * u0, 4 * n, false, rows,
                                 input_size, 4 * n, pack);
        }
      } else {
        products[k].prepare(packed_data, hidden, true, rows, hidden, 4 * hidden, pack);
        if (fused) {
          projections[k].prepare(packed_ih_data, input_size, true, rows, input_size, 4 * hidden,
                                 pack);
        }
      }
    }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const int64_t offset = offsets[t], live = sizes[t];
      // h_prev: the previous visited step's rows of `out` for the sequences live there, h0 for
      // the rest (sequences that start at this step, in the reverse direction).
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      const bool has_prev = s > 0;
      const int64_t carried = has_prev ? std::min(live, sizes[prev_t]) : 0;
      const T* h_prev = has_prev ? out_data + offsets[prev_t] * hidden : nullptr;
      const T* step_xg = fused ? nullptr : xg + offset * 4 * hidden;
      for (int64_t k = part_begin; k < part_end; ++k) {
        const int64_t u0 = split.unit_begin(k), u1 = split.unit_end(k, hidden), n = u1 - u0;
        const int64_t r0 = split.row_begin(k, live), r1 = split.row_end(k, live);
        if (r0 == r1) continue;
        for (int64_t g = 0; !fused && g < 4; ++g) {
          prefetch_columns(step_xg + r0 * 4 * hidden, r1 - r0, 4 * hidden, g * hidden + u0,
                           g * hidden + u1);
        }
        // This part's pre-activations of row b are at pre + b * ld.
        T* pre = split.by_rows ? scratch_data : scratch_data + batch * 4 * u0;
        const int64_t ld = 4 * n;
        if (fused) {
          projections[k].run(r1 - r0, x_data + (offset + r0) * input_size, input_size,
                             pre + r0 * ld, ld);
        }
        const int64_t mid = std::min(std::max(carried, r0), r1);  // rows [r0, mid) carried
        if (mid > r0) {
          products[k].run(mid - r0, h_prev + r0 * hidden, hidden, pre + r0 * ld, ld, fused);
        }
        products[k].run(r1 - mid, h0_data + mid * hidden, hidden, pre + mid * ld, ld, fused);
        ForwardStep<T> step;
        step.hidden = hidden;
        step.unit_begin = u0;
        step.unit_end = u1;
        step.input_gates = step_xg;  // nullptr when fused: `pre` holds both products
        step.bias = bias;
        step.gemm = pre;
        step.gemm_ld = ld;
        step.gemm_gate = n;
        step.gates = save ? gates_data + offset * 4 * hidden : nullptr;
        step.c = c_data;
        step.cells = save ? cells_data + offset * hidden : nullptr;
        step.r = out_data + offset * hidden;
        step.r_stride = hidden;
        step.zoneout = zoneout;
        step.row_base = offset;
        step.mix_h = true;
        step.h_prev = h_prev;
        step.h_prev_live = carried;
        step.h0 = h0_data;
        forward_rows(step, r0, r1);
        if constexpr (std::is_same<T, float>::value) {
          if (round_h == at::kBFloat16) {
            round_through<at::BFloat16>(step.r, hidden, r0, r1, u0, u1);
          } else if (round_h == at::kHalf) {
            round_through<at::Half>(step.r, hidden, r0, r1, u0, u1);
          }
        }
      }
      if (!split.by_rows && s + 1 < steps) barrier.arrive_and_wait(part_end - part_begin);
    }
  });
  // h_n: each row's h after the last step it was live in; h0 for rows never live.
  h_n.copy_(h0);
  T* h_n_data = h_n.data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t last = -1;
    if (reverse) {
      if (steps > 0 && sizes[0] > b) last = 0;
    } else {
      // Live rows never increase, so the rows live at step t are a prefix.
      int64_t lo = 0, hi = steps;  // steps [0, lo) have row b live
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (sizes[mid] > b) lo = mid + 1; else hi = mid;
      }
      last = lo - 1;
    }
    if (last >= 0) {
      std::copy_n(out_data + (offsets[last] + b) * hidden, hidden, h_n_data + b * hidden);
    }
  }
}

template <typename T>
void backward_split(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                    const Tensor& grad_out, const Tensor& c0, const Tensor& w_hh_in,
                    const Tensor& gates, const Tensor& cells, Tensor& dh, Tensor& dc,
                    Tensor& grad_xg, const Tensor* w_mask = nullptr,
                    const ZoneoutMasks* zoneout = nullptr) {
  const int64_t batch = dh.size(0);
  const SplitPlan plan(sizes, hidden, batch, sizeof(T));
  // As in forward_split: the weight mask in the own GEMM's packing, else on a masked copy.
  const bool mask_in_pack = w_mask != nullptr && plan.own;
  const Tensor w_hh = w_mask != nullptr && !mask_in_pack ? w_hh_in * *w_mask : w_hh_in;
  const T* w_mask_data = mask_in_pack ? w_mask->data_ptr<T>() : nullptr;
  // Zoneout of h: the cell pass writes k * (gradient reaching h) into dh, and the step's
  // product then adds grad_gates @ W_hh to it.
  const bool carry_h = zoneout != nullptr && zoneout->h;
  const int64_t steps = plan.steps, parts = plan.parts;
  const std::vector<int64_t>& offsets = plan.offsets;
  const Partition& split = plan.split;
  const bool pack = plan.pack;
  // W_hh by unit part: part k is the contiguous [4H, n_k] block of its units' columns, at offset
  // 4H u_k (by rows: W_hh itself).
  Tensor packed;
  if (split.by_rows || parts == 1 || plan.own) {  // the own GEMM packs straight from W_hh
    packed = w_hh;
  } else {
    packed = cached_empty({4 * hidden * hidden}, w_hh.options());
    for (int64_t k = 0; k < parts; ++k) {
      const int64_t u0 = split.bounds[k], n = split.bounds[k + 1] - u0;
      at::from_blob(packed.data_ptr<T>() + 4 * hidden * u0, {4 * hidden, n}, w_hh.options())
          .copy_(w_hh.narrow(1, u0, n));
    }
  }
  const T* packed_data = packed.data_ptr<T>();
  const T* gates_data = gates.data_ptr<T>();
  const T* cells_data = cells.data_ptr<T>();
  const T* c0_data = c0.data_ptr<T>();
  const T* grad_out_data = grad_out.data_ptr<T>();
  T* dh_data = dh.data_ptr<T>();
  T* dc_data = dc.data_ptr<T>();
  T* grad_xg_data = grad_xg.data_ptr<T>();
  PartBarrier barrier(parts);
  std::vector<FixedRightGemm<T>> products(parts);
  for (int64_t k = 0; plan.own && k < parts; ++k) {
    // The A of these products is the gate gradients, not bf16 values: the float32 kernel.
    products[k].reserve_own(4 * hidden, split.unit_end(k, hidden) - split.unit_begin(k), false);
  }
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t k = part_begin; k < part_end; ++k) {
      const int64_t u0 = split.unit_begin(k), n = split.unit_end(k, hidden) - u0;
      if (plan.own) {
        // Column j of the part's B [4H, n] is column u0 + j of W_hh.
        products[k].pack_own(packed_data, hidden, false, 4 * hidden, n, PackColumns{0, 0, u0},
                             w_mask_data);
      } else {
        products[k].prepare(packed_data + 4 * hidden * u0, n, false,
                            split.row_end(k, batch) - split.row_begin(k, batch), 4 * hidden, n,
                            pack);
      }
    }
    // Backward visits the steps in the opposite order of the forward.
    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const int64_t offset = offsets[t], live = sizes[t];
      const int64_t prev_t = reverse ? t + 1 : t - 1;  // the step the forward visited before t
      const bool has_prev = prev_t >= 0 && prev_t < steps;
      T* grad_gates = grad_xg_data + offset * 4 * hidden;
      for (int64_t k = part_begin; k < part_end; ++k) {
        BackwardStep<T> step;
        step.hidden = hidden;
        step.unit_begin = split.unit_begin(k);
        step.unit_end = split.unit_end(k, hidden);
        step.gates = gates_data + offset * 4 * hidden;
        step.cells = cells_data + offset * hidden;
        step.prev_cells = has_prev ? cells_data + offsets[prev_t] * hidden : nullptr;
        step.prev_live = has_prev ? sizes[prev_t] : 0;
        step.c0 = c0_data;
        step.dh = dh_data;
        step.dh_stride = hidden;
        step.grad_out = grad_out_data + offset * hidden;
        step.dc = dc_data;
        step.grad_gates = grad_gates;
        step.zoneout = zoneout;
        step.row_base = offset;
        step.dh_carry = carry_h ? dh_data : nullptr;
        backward_rows(step, split.row_begin(k, live), split.row_end(k, live));
      }
      // By units, every part's gate gradients of this step are written before any thread
      // reads them all. By rows, a thread reads only its own rows.
      if (!split.by_rows) barrier.arrive_and_wait(part_end - part_begin);
      // dh[rows, units] = grad_gates[rows] @ W_hh[:, units]: a thread's next step reads only
      // the dh it wrote itself, so no second barrier is needed.
      const int64_t next_s = s - 1;
      const int64_t next_t = reverse ? steps - 1 - next_s : next_s;
      for (int64_t k = part_begin; k < part_end; ++k) {
        const int64_t u0 = split.unit_begin(k), u1 = split.unit_end(k, hidden);
        const int64_t r0 = split.row_begin(k, live), r1 = split.row_end(k, live);
        // The next visited step's saved gates and cells, fetched while the GEMM runs.
        if (next_s >= 0) {
          const int64_t next_offset = offsets[next_t], next_live = sizes[next_t];
          const int64_t n0 = split.row_begin(k, next_live), n1 = split.row_end(k, next_live);
          for (int64_t g = 0; g < 4; ++g) {
            prefetch_columns(gates_data + (next_offset + n0) * 4 * hidden, n1 - n0, 4 * hidden,
                             g * hidden + u0, g * hidden + u1);
          }
          prefetch_columns(cells_data + (next_offset + n0) * hidden, n1 - n0, hidden, u0, u1);
          prefetch_columns(grad_out_data + (next_offset + n0) * hidden, n1 - n0, hidden, u0, u1);
        }
        products[k].run(r1 - r0, grad_gates + r0 * 4 * hidden, 4 * hidden,
                        dh_data + r0 * hidden + u0, hidden, carry_h);
      }
    }
  });
}

// ---- forward --------------------------------------------------------------------------------

// Zoneout keep weights of h for rows [row_base, row_base + live) and `units` units, as a tensor
// (the projection paths mix h after their GEMM with tensor operations).
template <typename T>
Tensor zoneout_keep_h(const ZoneoutMasks& masks, int64_t row_base, int64_t live, int64_t units,
                      const at::TensorOptions& options) {
  if (masks.expected) return at::full({live, units}, static_cast<T>(masks.prob_h), options);
  Tensor keep = at::empty({live, units}, options);
  T* data = keep.data_ptr<T>();
  for (int64_t b = 0; b < live; ++b) {
    for (int64_t u = 0; u < units; ++u) {
      const uint32_t element = static_cast<uint32_t>((row_base + b) * units + u);
      data[b * units + u] = zoneout_keeps(masks.key_h, masks.threshold_h, element) ? T(1) : T(0);
    }
  }
  return keep;
}

template <typename T>
void forward_loop(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                  const Tensor& input_gates, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                  Tensor& h, Tensor& c, Tensor& out, Tensor& gates, Tensor& cells, bool save,
                  const ZoneoutMasks* zoneout = nullptr) {
  const int64_t steps = static_cast<int64_t>(sizes.size());
  const std::vector<int64_t> offsets = step_offsets(sizes);
  const int64_t batch = h.size(0);
  const int64_t proj = h.size(1);
  // h @ W_hh^T reads W_hh^T as a contiguous [P, 4H] matrix: MKL's sgemm ran 10-15% faster on it
  // than on the transposed view (B=32, H=256, one thread), and the copy is made once per layer.
  const Tensor w_hh_t = w_hh.t().contiguous();
  // Gates of one step when they are not saved; r = o * tanh(c) before the projection.
  Tensor scratch_gates = save ? Tensor() : at::empty({batch, 4 * hidden}, h.options());
  Tensor r = w_hr.has_value() ? at::empty({batch, hidden}, h.options()) : Tensor();
  // Raw pointers, taken once: the loop touches no Tensor on the direct path.
  const T* input_data = input_gates.data_ptr<T>();
  const T* w_hh_t_data = w_hh_t.data_ptr<T>();
  const T* w_hr_data = w_hr.has_value() ? w_hr->data_ptr<T>() : nullptr;
  T* h_data = h.data_ptr<T>();
  T* c_data = c.data_ptr<T>();
  T* r_data = w_hr.has_value() ? r.data_ptr<T>() : nullptr;
  T* gates_data = save ? gates.data_ptr<T>() : nullptr;
  T* cells_data = save ? cells.data_ptr<T>() : nullptr;
  T* scratch_data = save ? nullptr : scratch_gates.data_ptr<T>();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t offset = offsets[t], live = sizes[t];
    T* step_gates = save ? gates_data + offset * 4 * hidden : scratch_data;
    step_gemm<T>(false, false, live, 4 * hidden, proj, h_data, proj, w_hh_t_data, 4 * hidden,
                 step_gates, 4 * hidden);
    ForwardStep<T> step;
    step.hidden = hidden;
    step.unit_begin = 0;
    step.unit_end = hidden;
    step.input_gates = input_data + offset * 4 * hidden;
    step.bias = nullptr;
    step.gemm = step_gates;
    step.gemm_ld = 4 * hidden;
    step.gemm_gate = hidden;
    step.gates = step_gates;
    step.c = c_data;
    step.cells = save ? cells_data + offset * hidden : nullptr;
    step.r = w_hr.has_value() ? r_data : h_data;
    step.r_stride = w_hr.has_value() ? hidden : proj;
    step.zoneout = zoneout;  // c only: h is mixed below, after the projection
    step.row_base = offset;
    forward_step(step, live);
    if (w_hr.has_value() && zoneout != nullptr && zoneout->h) {
      Tensor h_new = at::empty({live, proj}, h.options());
      step_gemm<T>(false, true, live, proj, hidden, r_data, hidden, w_hr_data, hidden,
                   h_new.data_ptr<T>(), proj);
      const Tensor keep = zoneout_keep_h<T>(*zoneout, offset, live, proj, h.options());
      Tensor h_live = h.narrow(0, 0, live);
      h_live.copy_(keep * h_live + (1 - keep) * h_new);
    } else if (w_hr.has_value()) {
      // h = r @ W_hr^T, W_hr being [P, H].
      step_gemm<T>(false, true, live, proj, hidden, r_data, hidden, w_hr_data, hidden, h_data,
                   proj);
    }
    Tensor h_live = h.narrow(0, 0, live);
    Tensor out_rows = out.narrow(0, offset, live);
    out_rows.copy_(h_live);
    // The next step reads h as the caller's dtype holds it.
    if (out.scalar_type() != h.scalar_type()) h_live.copy_(out_rows);
  }
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

// The zoneout arguments both ops take, checked, as the masks the kernels read; the kernels get
// them only when a probability is above 0.
ZoneoutMasks checked_zoneout(const char* op, double zoneout_h, double zoneout_c,
                             const std::optional<Tensor>& zoneout_seed, bool zoneout_expected) {
  TORCH_CHECK(zoneout_h >= 0 && zoneout_h < 1 && zoneout_c >= 0 && zoneout_c < 1, op,
              ": zoneout_h and zoneout_c must be in [0, 1), got ", zoneout_h, " and ", zoneout_c);
  return make_zoneout_masks(zoneout_h, zoneout_c, zoneout_seed_value(zoneout_seed, op),
                            zoneout_expected);
}

// With w_ih, the first argument is the layer input x [N, I] and the op computes the input gates
// x @ W_ih^T itself: fused into the steps where they run on the own step GEMM (forward_split),
// otherwise as one product up front.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward_cpu(
    const Tensor& xg_in, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh_in, const std::optional<Tensor>& w_hr, bool reverse, bool save,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& w_ih, double zoneout_h,
    double zoneout_c, const std::optional<Tensor>& zoneout_seed, bool zoneout_expected,
    const std::optional<Tensor>& w_hh_mask) {
  const char* op = "fastlstm::recurrence_forward";
  const Tensor& w_hh = w_hh_in;
  const char* first = w_ih.has_value() ? "x" : "xg";
  TORCH_CHECK(xg_in.dim() == 2, op, ": ", first, " must be 2-D [N, ",
              w_ih.has_value() ? "input_size" : "4*hidden", "], got shape ", xg_in.sizes());
  TORCH_CHECK(c0.dim() == 2, op, ": c0 must be 2-D [B, hidden], got shape ", c0.sizes());
  TORCH_CHECK(h0.dim() == 2, op, ": h0 must be 2-D [B, P], got shape ", h0.sizes());
  const auto dtype = xg_in.scalar_type();
  TORCH_CHECK(supported_dtype(dtype), op, ": ", first,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t num_rows = xg_in.size(0), batch = c0.size(0), hidden = c0.size(1);
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be 2-D [P, hidden], got shape ", w_hr->sizes());
    check_tensor(op, *w_hr, "w_hr", "[P, hidden]", {proj, hidden}, dtype);
  }
  if (w_ih.has_value()) {
    const int64_t input_size = xg_in.size(1);
    TORCH_CHECK(w_ih->dim() == 2, op, ": w_ih must be 2-D [4*hidden, input_size], got shape ",
                w_ih->sizes());
    check_tensor(op, xg_in, "x", "[N, input_size]", {num_rows, input_size}, dtype);
    check_tensor(op, *w_ih, "w_ih", "[4*hidden, input_size]", {4 * hidden, input_size}, dtype);
  } else {
    check_tensor(op, xg_in, "xg", "[N, 4*hidden]", {num_rows, 4 * hidden}, dtype);
  }
  check_tensor(op, c0, "c0", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, h0, "h0", "[B, P]", {batch, proj}, dtype);
  check_tensor(op, w_hh, "w_hh", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  if (bias.has_value()) check_tensor(op, *bias, "bias", "[4*hidden]", {4 * hidden}, dtype);
  if (w_hh_mask.has_value()) {
    check_tensor(op, *w_hh_mask, "w_hh_mask", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  }
  const ZoneoutMasks zone_masks =
      checked_zoneout(op, zoneout_h, zoneout_c, zoneout_seed, zoneout_expected);
  const ZoneoutMasks* zoneout = zoneout_h > 0 || zoneout_c > 0 ? &zone_masks : nullptr;
  const std::vector<int64_t> sizes = step_sizes(op, batch_sizes, num_rows, batch);
  // Every argument checked: the input projection, fused into the steps where forward_split runs
  // them on the own step GEMM, otherwise one product here.
  const bool fused = w_ih.has_value() && !w_hr.has_value() && acc_dtype(dtype) == at::kFloat &&
                     SplitPlan::uses_own_gemm(static_cast<int64_t>(sizes.size()), sizeof(float));
  const Tensor xg = w_ih.has_value() && !fused ? linear_product(xg_in, *w_ih) : xg_in;

  const auto acc = acc_dtype(dtype);
  const auto acc_options = xg.options().dtype(acc);
  Tensor out = cached_empty({num_rows, proj}, xg.options());
  Tensor gates = cached_empty({save ? num_rows : 0, 4 * hidden}, acc_options);
  Tensor cells = cached_empty({save ? num_rows : 0, hidden}, acc_options);
  Tensor c = c0.to(acc, /*non_blocking=*/false, /*copy=*/true);
  if (!w_hr.has_value() && dtype == acc) {
    // fp32/fp64 without projection: h lives in `out`, the steps split over threads by units.
    Tensor h_n = at::empty_like(h0);
    const Tensor* mask = w_hh_mask.has_value() ? &*w_hh_mask : nullptr;
    if (acc == at::kDouble) {
      forward_split<double>(sizes, reverse, hidden, xg, nullptr,
                            bias.has_value() ? bias->data_ptr<double>() : nullptr, w_hh, h0, c,
                            out, gates, cells, save, h_n, at::kFloat, mask, zoneout);
    } else {
      forward_split<float>(sizes, reverse, hidden, xg, fused ? &*w_ih : nullptr,
                           bias.has_value() ? bias->data_ptr<float>() : nullptr, w_hh, h0, c,
                           out, gates, cells, save, h_n, at::kFloat, mask, zoneout);
    }
    return {out, h_n, c, gates, cells};
  }
  if (!w_hr.has_value()) {
    // fp16/bf16 without projection: the same split path on float32 copies, h rounded to dtype
    // after every step, so `out` holds values of dtype exactly.
    const Tensor input_f = xg.to(at::kFloat).contiguous();
    const Tensor w_ih_f = fused ? w_ih->to(at::kFloat).contiguous() : Tensor();
    // The weight mask multiplies in the layer's dtype, as the other backends' w_hh * mask does.
    const Tensor w_hh_f =
        (w_hh_mask.has_value() ? w_hh * *w_hh_mask : w_hh).to(at::kFloat).contiguous();
    const Tensor h0_f = h0.to(at::kFloat).contiguous();
    const Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
    Tensor out_f = cached_empty({num_rows, proj}, acc_options);
    Tensor h_n_f = at::empty_like(h0_f);
    forward_split<float>(sizes, reverse, hidden, input_f, fused ? &w_ih_f : nullptr,
                         bias.has_value() ? bias_f.data_ptr<float>() : nullptr, w_hh_f, h0_f, c,
                         out_f, gates, cells, save, h_n_f, dtype, nullptr, zoneout);
    out.copy_(out_f);
    return {out, h_n_f.to(dtype), c.to(dtype), gates, cells};
  }
  Tensor h = h0.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const Tensor input_gates =
      bias.has_value() ? at::add(xg.to(acc), bias->to(acc)) : to_acc(xg, acc);
  const Tensor w_hh_acc = to_acc(w_hh_mask.has_value() ? w_hh * *w_hh_mask : w_hh, acc);
  const std::optional<Tensor> w_hr_acc =
      w_hr.has_value() ? std::optional<Tensor>(to_acc(*w_hr, acc)) : std::nullopt;
  if (acc == at::kDouble) {
    forward_loop<double>(sizes, reverse, hidden, input_gates, w_hh_acc, w_hr_acc, h, c, out, gates,
                         cells, save, zoneout);
  } else {
    forward_loop<float>(sizes, reverse, hidden, input_gates, w_hh_acc, w_hr_acc, h, c, out, gates,
                        cells, save, zoneout);
  }
  return {out, h.to(dtype), c.to(dtype), gates, cells};
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
void backward_loop(const std::vector<int64_t>& sizes, bool reverse, int64_t hidden,
                   const Tensor& grad_out, const Tensor& c0, const Tensor& w_hh,
                   const std::optional<Tensor>& w_hr, const Tensor& gates, const Tensor& cells,
                   Tensor& dh, Tensor& dc, Tensor& grad_xg, Tensor& grad_h_total,
                   const ZoneoutMasks* zoneout = nullptr) {
  const int64_t steps = static_cast<int64_t>(sizes.size());
  const std::vector<int64_t> offsets = step_offsets(sizes);
  const int64_t batch = dh.size(0);
  const int64_t proj = dh.size(1);
  const bool direct_grad = grad_xg.scalar_type() == dh.scalar_type();
  const T* w_hh_data = w_hh.data_ptr<T>();
  T* dh_data = dh.data_ptr<T>();
  Tensor scratch_grad = direct_grad ? Tensor() : at::empty({batch, 4 * hidden}, dh.options());
  // With a projection: the whole gradient reaching h, then the gradient reaching r.
  Tensor dh_total = w_hr.has_value() ? at::empty_like(dh) : Tensor();
  Tensor dr = w_hr.has_value() ? at::empty({batch, hidden}, dh.options()) : Tensor();
  // Raw pointers, taken once: without a projection the loop touches no Tensor.
  const T* gates_data = gates.data_ptr<T>();
  const T* cells_data = cells.data_ptr<T>();
  const T* c0_data = c0.data_ptr<T>();
  const T* grad_out_data = grad_out.data_ptr<T>();
  T* dc_data = dc.data_ptr<T>();
  T* grad_xg_data = direct_grad ? grad_xg.data_ptr<T>() : nullptr;
  T* scratch_data = direct_grad ? nullptr : scratch_grad.data_ptr<T>();
  // Backward visits the steps in the opposite order of the forward.
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t offset = offsets[t], live = sizes[t];
    const int64_t prev_t = reverse ? t + 1 : t - 1;  // the step the forward visited before t
    const bool has_prev = prev_t >= 0 && prev_t < steps;
    BackwardStep<T> step;
    step.hidden = hidden;
    step.unit_begin = 0;
    step.unit_end = hidden;
    step.dh_stride = hidden;
    step.gates = gates_data + offset * 4 * hidden;
    step.cells = cells_data + offset * hidden;
    step.prev_cells = has_prev ? cells_data + offsets[prev_t] * hidden : nullptr;
    step.prev_live = has_prev ? sizes[prev_t] : 0;
    step.c0 = c0_data;
    step.dc = dc_data;
    step.grad_gates = direct_grad ? grad_xg_data + offset * 4 * hidden : scratch_data;
    step.zoneout = zoneout;  // c only: h's zoneout is split off below, before the projection
    step.row_base = offset;
    Tensor carry;  // zoneout of h: k * (gradient reaching h), for the step before
    if (w_hr.has_value()) {
      Tensor total = dh_total.narrow(0, 0, live);
      at::add_out(total, dh.narrow(0, 0, live), grad_out.narrow(0, offset, live));
      if (zoneout != nullptr && zoneout->h) {
        const Tensor keep = zoneout_keep_h<T>(*zoneout, offset, live, proj, dh.options());
        carry = keep * total;
        total.mul_(1 - keep);
      }
      grad_h_total.narrow(0, offset, live).copy_(total);
      // dr = total @ W_hr, W_hr being [P, H].
      step_gemm<T>(false, false, live, hidden, proj, total.data_ptr<T>(), proj,
                   w_hr->data_ptr<T>(), hidden, dr.data_ptr<T>(), hidden);
      step.dh = dr.data_ptr<T>();
      step.grad_out = nullptr;
    } else {
      step.dh = dh_data;
      step.grad_out = grad_out_data + offset * proj;
    }
    backward_step(step, live);
    if (!direct_grad) {
      grad_xg.narrow(0, offset, live).copy_(scratch_grad.narrow(0, 0, live));
    }
    // dh = grad_gates @ W_hh, W_hh being [4H, P].
    step_gemm<T>(false, false, live, proj, 4 * hidden, step.grad_gates, 4 * hidden, w_hh_data,
                 proj, dh_data, proj);
    if (carry.defined()) dh.narrow(0, 0, live).add_(carry);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> recurrence_backward_cpu(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn,
    const Tensor& batch_sizes, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& gates, const Tensor& cells, bool reverse,
    double zoneout_h, double zoneout_c, const std::optional<Tensor>& zoneout_seed,
    bool zoneout_expected, const std::optional<Tensor>& w_hh_mask) {
  const char* op = "fastlstm::recurrence_backward";
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [N, P], got shape ",
              grad_out.sizes());
  TORCH_CHECK(c0.dim() == 2, op, ": c0 must be 2-D [B, hidden], got shape ", c0.sizes());
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(supported_dtype(dtype), op, ": grad_out must be float32, float64, float16 or "
              "bfloat16, got ", dtype);
  const auto acc = acc_dtype(dtype);
  TORCH_CHECK(gates.dim() == 2, op, ": gates must be 2-D [N, 4*hidden], got shape ",
              gates.sizes());
  TORCH_CHECK(gates.size(0) != 0 || grad_out.size(0) == 0, op, ": gates is empty; the forward "
              "was run with save=False and kept nothing for backward");
  // The rows are those the forward saved.
  const int64_t num_rows = gates.size(0), batch = c0.size(0), hidden = c0.size(1);
  TORCH_CHECK(hidden > 0, op, ": hidden size (c0.size(1)) must be positive");
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be 2-D [P, hidden], got shape ", w_hr->sizes());
    check_tensor(op, *w_hr, "w_hr", "[P, hidden]", {proj, hidden}, dtype);
  }
  check_tensor(op, grad_out, "grad_out", "[N, P]", {num_rows, proj}, dtype);
  check_tensor(op, grad_hn, "grad_hn", "[B, P]", {batch, proj}, dtype);
  check_tensor(op, grad_cn, "grad_cn", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, c0, "c0", "[B, hidden]", {batch, hidden}, dtype);
  check_tensor(op, w_hh, "w_hh", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  check_tensor(op, gates, "gates", "[N, 4*hidden] (accumulation dtype)", {num_rows, 4 * hidden},
               acc);
  check_tensor(op, cells, "cells", "[N, hidden] (accumulation dtype)", {num_rows, hidden}, acc);
  if (w_hh_mask.has_value()) {
    check_tensor(op, *w_hh_mask, "w_hh_mask", "[4*hidden, P]", {4 * hidden, proj}, dtype);
  }
  const ZoneoutMasks zone_masks =
      checked_zoneout(op, zoneout_h, zoneout_c, zoneout_seed, zoneout_expected);
  const ZoneoutMasks* zoneout = zoneout_h > 0 || zoneout_c > 0 ? &zone_masks : nullptr;
  const Tensor* mask = w_hh_mask.has_value() ? &*w_hh_mask : nullptr;
  const std::vector<int64_t> sizes = step_sizes(op, batch_sizes, num_rows, batch);

  Tensor grad_xg = cached_empty({num_rows, 4 * hidden}, grad_out.options());
  Tensor grad_h_total = at::empty({w_hr.has_value() ? num_rows : 0, proj}, grad_out.options());
  Tensor dh = grad_hn.to(acc, /*non_blocking=*/false, /*copy=*/true);
  Tensor dc = grad_cn.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const Tensor grad_out_acc = to_acc(grad_out, acc);
  const Tensor c0_acc = to_acc(c0, acc);
  // Low precision and the projection path: the masked weight in the layer's dtype, as in the
  // forward. fp32/fp64 split path: backward_split applies the mask.
  const bool split_full = !w_hr.has_value() && dtype == acc;
  const Tensor w_hh_acc =
      to_acc(w_hh_mask.has_value() && !split_full ? w_hh * *w_hh_mask : w_hh, acc);
  const std::optional<Tensor> w_hr_acc =
      w_hr.has_value() ? std::optional<Tensor>(to_acc(*w_hr, acc)) : std::nullopt;
  if (split_full) {
    if (acc == at::kDouble) {
      backward_split<double>(sizes, reverse, hidden, grad_out, c0, w_hh, gates, cells, dh, dc,
                             grad_xg, mask, zoneout);
    } else {
      backward_split<float>(sizes, reverse, hidden, grad_out, c0, w_hh, gates, cells, dh, dc,
                            grad_xg, mask, zoneout);
    }
    return {grad_xg, dh, dc, grad_h_total};
  }
  if (!w_hr.has_value()) {
    // fp16/bf16: the split path on float32 copies; the gate gradients are rounded once, at the
    // end (backward_loop, too, multiplies the unrounded ones by W_hh).
    Tensor grad_xg_f = cached_empty({num_rows, 4 * hidden}, grad_out_acc.options());
    backward_split<float>(sizes, reverse, hidden, grad_out_acc, c0_acc, w_hh_acc, gates, cells, dh,
                          dc, grad_xg_f, nullptr, zoneout);
    grad_xg.copy_(grad_xg_f);
    return {grad_xg, dh.to(dtype), dc.to(dtype), grad_h_total};
  }
  if (acc == at::kDouble) {
    backward_loop<double>(sizes, reverse, hidden, grad_out_acc, c0_acc, w_hh_acc, w_hr_acc, gates,
                          cells, dh, dc, grad_xg, grad_h_total, zoneout);
  } else {
    backward_loop<float>(sizes, reverse, hidden, grad_out_acc, c0_acc, w_hh_acc, w_hr_acc, gates,
                         cells, dh, dc, grad_xg, grad_h_total, zoneout);
  }
  return {grad_xg, dh.to(dtype), dc.to(dtype), grad_h_total};
}

}  // namespace
}  // namespace cpu
}  // namespace fastlstm

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("recurrence_forward", &fastlstm::cpu::recurrence_forward_cpu);
  m.impl("recurrence_backward", &fastlstm::cpu::recurrence_backward_cpu);
}
