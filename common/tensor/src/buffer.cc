#include "duet/tensor/buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace duet {

namespace {
// Large buffers come straight from mmap: pages are zero and only become resident when touched.
constexpr size_t kMmapThreshold = size_t{2} << 20;
size_t Rounded(size_t bytes) { return (bytes + 63) / 64 * 64; }
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
    void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = p;
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
