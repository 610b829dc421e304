// Large CPU buffers for the tensors the recurrence ops return (out, gates, cells, grad_xg) and
// their per-call scratch, kept for reuse once freed.
//
// A training loop frees and reallocates the same large buffers every step. The system allocator
// hands large blocks back to the kernel on free (mmap / heap trimming), so every step paid a page
// fault and a zeroed page per 4 KiB written: a quarter of a training step at B=16, H=512 (perf:
// clear_page, exc_page_fault). Freed blocks of at least kMinBytes wait here, up to a total of
// limit() bytes, for the next request of the same size; anything else goes back to the system.
// The limit is FASTLSTM_CPU_CACHE_MB (default 512; 0 turns the cache off).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastlstm {
namespace cpu {

class BufferCache {
 public:
  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  // An uninitialized contiguous CPU tensor, like at::empty(sizes, options).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (const int64_t size : sizes) numel *= size;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kMinBytes || limit_ == 0) return at::empty(sizes, options);
    void* data = take(bytes);
    if (data == nullptr) return at::empty(sizes, options);
    return at::from_blob(
        data, sizes, [bytes](void* ptr) { BufferCache::instance().give_back(ptr, bytes); },
        options.device(at::kCPU));
  }

  size_t limit() const { return limit_; }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kAlignment = 64;

  BufferCache() : limit_(read_limit()) {}

  static size_t read_limit() {
    const char* text = std::getenv("FASTLSTM_CPU_CACHE_MB");
    if (text == nullptr || *text == '\0') return size_t(512) << 20;
    char* end = nullptr;
    const long long megabytes = std::strtoll(text, &end, 10);
    TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0,
                "FASTLSTM_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", text,
                "'");
    return static_cast<size_t>(megabytes) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(bytes);
      if (found != free_.end()) {
        void* data = found->second.back();
        found->second.pop_back();
        if (found->second.empty()) free_.erase(found);
        cached_bytes_ -= bytes;
        return data;
      }
    }
    void* data = nullptr;
    if (posix_memalign(&data, kAlignment, bytes) != 0) return nullptr;
    return data;
  }

  // Keeps the block, evicting blocks of other sizes first if the total would pass the limit
  // (shapes change, for instance with the sequence length: the cache follows the newest ones).
  void give_back(void* data, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= limit_) {
        while (cached_bytes_ + bytes > limit_) {
          auto bucket = free_.begin();
          evicted.push_back(bucket->second.back());
          bucket->second.pop_back();
          cached_bytes_ -= bucket->first;
          if (bucket->second.empty()) free_.erase(bucket);
        }
        free_[bytes].push_back(data);
        cached_bytes_ += bytes;
        data = nullptr;
      }
    }
    for (void* block : evicted) std::free(block);
    std::free(data);
  }

  const size_t limit_;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_bytes_ = 0;
};

inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferCache::instance().empty(sizes, options);
}

}  // namespace cpu
}  // namespace fastlstm
