// Wall-clock time per kind of work in the forward pass, for benchmarks ("profile, don't guess").
// Off by default: then a ScopedOp costs one relaxed atomic load. Not for concurrent forward passes
// (the totals are process-wide); bench-engine turns it on for one measured phase at a time.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace duet::kernels {

enum class Op : int {
  kEmbed,
  kNorm,
  kQkv,        // the q/k/v projection
  kRope,
  kKvWrite,    // new rows' K/V into the paged cache
  kAttention,
  kOut,        // the attention output projection
  kMlpUp,      // up (and gate) projection
  kAct,        // gelu / silu*mul
  kMlpDown,
  kResidual,
  kLmHead,
  kCount
};
const char* OpName(Op op);

class Profile {
 public:
  static void Enable(bool on);
  static bool enabled() { return enabled_.load(std::memory_order_relaxed); }
  static void Reset();
  static void Add(Op op, int64_t ns) {
    ns_[static_cast<int>(op)].fetch_add(ns, std::memory_order_relaxed);
  }
  // Seconds spent in op since the last Reset.
  static double Seconds(Op op);

 private:
  static std::atomic<bool> enabled_;
  static std::array<std::atomic<int64_t>, static_cast<int>(Op::kCount)> ns_;
};

class ScopedOp {
 public:
  explicit ScopedOp(Op op) : op_(op), on_(Profile::enabled()) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~ScopedOp() {
    if (on_) {
      Profile::Add(op_, std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - t0_)
                            .count());
    }
  }
  ScopedOp(const ScopedOp&) = delete;
  ScopedOp& operator=(const ScopedOp&) = delete;

 private:
  Op op_;
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace duet::kernels
