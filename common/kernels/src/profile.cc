#include "duet/kernels/profile.h"

namespace duet::kernels {

std::atomic<bool> Profile::enabled_{false};
std::array<std::atomic<int64_t>, static_cast<int>(Op::kCount)> Profile::ns_{};

const char* OpName(Op op) {
  static constexpr const char* kNames[] = {"embed",  "norm",  "qkv",      "rope",
                                           "kv_write", "attention", "out_proj", "mlp_up",
                                           "act",    "mlp_down", "residual", "lm_head"};
  return kNames[static_cast<int>(op)];
}

void Profile::Enable(bool on) { enabled_.store(on, std::memory_order_relaxed); }

void Profile::Reset() {
  for (auto& n : ns_) n.store(0, std::memory_order_relaxed);
}

double Profile::Seconds(Op op) {
  return static_cast<double>(ns_[static_cast<int>(op)].load(std::memory_order_relaxed)) * 1e-9;
}

}  // namespace duet::kernels
