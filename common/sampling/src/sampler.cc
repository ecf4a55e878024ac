#include "duet/sampling/sampler.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace duet::sampling {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

absl::Status Invalid(const char* what, float value) {
  return absl::InvalidArgumentError(absl::StrCat(what, ", got ", value));
}

// logit > 0 ? logit / r : logit * r, with NaN as -inf.
float Penalize(float logit, float r) {
  if (std::isnan(logit)) return kNegInf;
  return logit > 0 ? logit / r : logit * r;
}

// Index of the largest value; the lowest index wins ties; NaN never wins; 0 if nothing beats -inf.
int32_t ArgMax(std::span<const float> v) {
  int32_t best = 0;
  float best_value = kNegInf;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] > best_value) {
      best_value = v[i];
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

}  // namespace

absl::Status Validate(const SamplingParams& p) {
  if (std::isnan(p.temperature) || std::isinf(p.temperature)) {
    return Invalid("temperature must be finite", p.temperature);
  }
  if (p.temperature < 0) return Invalid("temperature must be >= 0", p.temperature);
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0 (0 = off), got ", p.top_k));
  }
  if (!(p.top_p > 0 && p.top_p <= 1)) return Invalid("top_p must be in (0, 1]", p.top_p);
  if (!(p.min_p >= 0 && p.min_p < 1)) return Invalid("min_p must be in [0, 1)", p.min_p);
  if (!(p.repetition_penalty > 0) || std::isinf(p.repetition_penalty)) {
    return Invalid("repetition_penalty must be > 0 and finite", p.repetition_penalty);
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& p) : params_(p), rng_(p.seed) {
  if (!(params_.temperature > 0)) params_.temperature = 0;
  if (params_.top_k < 0) params_.top_k = 0;
  if (!(params_.top_p < 1)) params_.top_p = 1;
  if (!(params_.min_p > 0)) params_.min_p = 0;
  if (!(params_.repetition_penalty > 0) || std::isinf(params_.repetition_penalty)) {
    params_.repetition_penalty = 1;
  }
}

bool Sampler::MoreLikely(int32_t a, int32_t b) const {
  return logits_[a] > logits_[b] || (logits_[a] == logits_[b] && a < b);
}

void Sampler::SelectTopK(size_t n) {
  const size_t k = static_cast<size_t>(params_.top_k);
  const auto more_likely = [this](int32_t a, int32_t b) { return MoreLikely(a, b); };
  cand_ids_.clear();
  if (k == 0 || k >= n) {
    cand_ids_.resize(n);
    std::iota(cand_ids_.begin(), cand_ids_.end(), 0);
  } else if (k * 16 <= n) {
    // Small k: one pass with a heap of the k best so far, least likely on top. Most ids lose
    // one comparison against the top. Ids arrive in increasing order, so a tie never displaces.
    for (int32_t id = 0; id < static_cast<int32_t>(n); ++id) {
      if (cand_ids_.size() < k) {
        cand_ids_.push_back(id);
        std::push_heap(cand_ids_.begin(), cand_ids_.end(), more_likely);
      } else if (MoreLikely(id, cand_ids_.front())) {
        std::pop_heap(cand_ids_.begin(), cand_ids_.end(), more_likely);
        cand_ids_.back() = id;
        std::push_heap(cand_ids_.begin(), cand_ids_.end(), more_likely);
      }
    }
  } else {
    cand_ids_.resize(n);
    std::iota(cand_ids_.begin(), cand_ids_.end(), 0);
    std::nth_element(cand_ids_.begin(), cand_ids_.begin() + static_cast<std::ptrdiff_t>(k - 1),
                     cand_ids_.end(), more_likely);
    cand_ids_.resize(k);
  }
}

void Sampler::TopP(double target, float max_logit) {
  const auto more_likely = [this](int32_t a, int32_t b) { return MoreLikely(a, b); };
  // Keeps ids (in order) while the mass before them is below target; always keeps the first.
  const auto keep_prefix = [&](std::span<const int32_t> sorted, double before) {
    for (int32_t id : sorted) {
      if (!scratch_ids_.empty() && before >= target) break;
      before += weights_[id];
      scratch_ids_.push_back(id);
    }
  };

  scratch_ids_.clear();
  if (cand_ids_.size() <= 1024) {
    std::sort(cand_ids_.begin(), cand_ids_.end(), more_likely);
    keep_prefix(cand_ids_, 0.0);
    cand_ids_.swap(scratch_ids_);
    return;
  }

  // Many candidates: bucket them by how far their logit is below the max. Bins are ordered like
  // MoreLikely (a lower bin holds only strictly larger logits), so every bin before the one
  // where the running mass reaches target is kept whole, and only that bin needs sorting.
  // Bins span the logits whose weight can be non-zero in f32 (e^-88); the rest share the last.
  constexpr int kBins = 1024;
  float lo = max_logit;
  for (int32_t id : cand_ids_) {
    if (std::isfinite(logits_[id])) lo = std::min(lo, logits_[id]);
  }
  const double span = std::min<double>(static_cast<double>(max_logit) - lo,
                                       88.0 * static_cast<double>(params_.temperature));
  const double scale = span > 0 ? (kBins - 1) / span : 0.0;
  const auto bin_of = [&](int32_t id) {
    const double d = (static_cast<double>(max_logit) - logits_[id]) * scale;
    return d < kBins - 1 ? static_cast<int>(d) : kBins - 1;  // also catches -inf logits
  };
  std::array<double, kBins> bin_mass{};
  for (int32_t id : cand_ids_) bin_mass[bin_of(id)] += weights_[id];
  int crossing = 0;
  double before = 0;  // mass of the bins before `crossing`
  while (crossing < kBins && before + bin_mass[crossing] < target) before += bin_mass[crossing++];
  if (crossing == kBins) return;  // min-p already cut below target: keep everything

  tail_ids_.clear();
  for (int32_t id : cand_ids_) {
    const int b = bin_of(id);
    if (b < crossing) {
      scratch_ids_.push_back(id);
    } else if (b == crossing) {
      tail_ids_.push_back(id);
    }
  }
  std::sort(tail_ids_.begin(), tail_ids_.end(), more_likely);
  keep_prefix(tail_ids_, before);
  cand_ids_.swap(scratch_ids_);
}

double Sampler::NextUniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::Sample(std::span<const float> logits, std::span<const int32_t> history) {
  if (logits.empty()) return -1;
  const size_t n = logits.size();
  const float r = params_.repetition_penalty;
  const bool penalize = r != 1.0f && !history.empty();

  // Greedy without a penalty reads the caller's logits directly.
  if (params_.temperature == 0 && !penalize) return ArgMax(logits);

  // 1. Repetition penalty, on a copy. Each entry is computed from the caller's logit, so an id
  //    repeated in the history is penalised once.
  logits_.assign(logits.begin(), logits.end());
  for (float& x : logits_) {
    if (std::isnan(x)) x = kNegInf;
  }
  if (penalize) {
    for (int32_t id : history) {
      if (id >= 0 && static_cast<size_t>(id) < n) logits_[id] = Penalize(logits[id], r);
    }
  }
  const int32_t top = ArgMax(logits_);
  if (params_.temperature == 0) return top;
  const float max_logit = logits_[top];
  if (max_logit == kNegInf) return 0;  // every token is masked

  // 2. Top-k: the k most likely ids, unordered.
  SelectTopK(n);

  // 3. Temperature: unnormalised probabilities relative to the most likely token (which has 1
  //    exactly). Subtracting the max before dividing keeps tiny temperatures finite.
  weights_.resize(n);
  const float t = params_.temperature;
  double mass = 0;
  for (int32_t id : cand_ids_) {
    const float x = logits_[id];
    const float w = x == max_logit ? 1.0f : std::exp((x - max_logit) / t);
    weights_[id] = w;
    mass += w;
  }

  // 4, 5. Top-p, then min-p. Each keeps a most-likely prefix of the top-k set, so the result is
  //    their intersection; min-p (one cheap pass; the weights are already p / p_max) goes first
  //    to shrink what top-p orders. Top-p's target is still the mass of the whole top-k set.
  if (params_.min_p > 0) {
    const float min_p = params_.min_p;
    std::erase_if(cand_ids_, [&](int32_t id) { return weights_[id] < min_p; });
  }
  if (params_.top_p < 1) TopP((static_cast<double>(params_.top_p) - 1e-6) * mass, max_logit);

  // 6. Draw in proportion to the weights of what is left.
  double total = 0;
  for (int32_t id : cand_ids_) total += weights_[id];
  const double u = NextUniform() * total;
  double cum = 0;
  int32_t last = top;
  for (int32_t id : cand_ids_) {
    const float w = weights_[id];
    if (w <= 0) continue;
    cum += w;
    last = id;
    if (u < cum) return id;
  }
  return last;  // u landed on the rounding error at the very top
}

}  // namespace duet::sampling
