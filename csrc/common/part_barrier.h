// A spin barrier for the threads of one at::parallel_for region that run a fixed set of parts.
// Each thread arrives with the number of parts it runs, so the barrier opens once every part has
// arrived, however many threads OpenMP gave the region (a single thread running every part never
// waits).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

namespace fastlstm {
namespace cpu {

#if defined(__x86_64__) || defined(_M_X64)
inline void cpu_relax() { __builtin_ia32_pause(); }
#else
inline void cpu_relax() {}
#endif

class PartBarrier {
 public:
  explicit PartBarrier(int64_t parts) : parts_(parts) {}

  void arrive_and_wait(int64_t weight) {
    if (weight == parts_) return;
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == parts_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    // Spin briefly (the phases between barriers take microseconds to tens of microseconds, the
    // wait for the slowest part a few), then yield so that an oversubscribed machine still makes
    // progress.
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpins) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int64_t kSpins = 1 << 11;
  const int64_t parts_;
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
};

}  // namespace cpu
}  // namespace fastlstm
