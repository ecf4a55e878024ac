#include "duet/tensor/buffer.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace duet {

namespace {
// Large buffers come straight from mmap: pages are zero and only become resident when touched.
// They start on a 2 MiB boundary and ask for transparent huge pages: weights and the K/V pool are
// streamed through at memory bandwidth, where 4 KiB pages cost a TLB miss every 64 cache lines,
// and a first touch faults once per 2 MiB instead of once per 4 KiB.
constexpr size_t kMmapThreshold = size_t{2} << 20;
constexpr size_t kHugePage = size_t{2} << 20;
size_t Rounded(size_t bytes) {
  return bytes >= kMmapThreshold ? (bytes + kHugePage - 1) / kHugePage * kHugePage
                                 : (bytes + 63) / 64 * 64;
}
void Release(void* data, size_t bytes) {
  if (data == nullptr) return;
  if (bytes >= kMmapThreshold) {
    munmap(data, Rounded(bytes));
  } else {
    std::free(data);
  }
}
}  // namespace

Buffer::Buffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  const size_t rounded = Rounded(bytes);
  if (bytes >= kMmapThreshold) {
    // Over-map by one huge page, keep the aligned middle, give back the rest.
    const size_t mapped = rounded + kHugePage;
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    const auto base = reinterpret_cast<uintptr_t>(p);
    const uintptr_t aligned = (base + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > base) munmap(p, aligned - base);
    const uintptr_t end = base + mapped, used_end = aligned + rounded;
    if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
    data_ = reinterpret_cast<void*>(aligned);
    madvise(data_, rounded, MADV_HUGEPAGE);  // a hint: fine if THP is off
    return;
  }
  data_ = std::aligned_alloc(64, rounded);
  if (data_ == nullptr) throw std::bad_alloc();
  std::memset(data_, 0, rounded);
}

Buffer::~Buffer() { Release(data_, bytes_); }

Buffer::Buffer(Buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Release(data_, bytes_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

}  // namespace duet
