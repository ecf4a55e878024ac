// Token sampling: turns one position's logits into a token id.
//
// The pipeline follows Hugging Face / vLLM: repetition penalty -> temperature -> top-k -> top-p
// -> min-p -> draw. A Sampler owns its random generator, so a sequence's tokens depend only on
// its seed, its logits and its history, never on other sequences or on the standard library's
// distribution implementations.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace duet::sampling {

struct SamplingParams {
  // 0 = greedy (argmax, lowest id wins ties); must be >= 0 and finite.
  float temperature = 1.0f;
  // Keep the k most likely tokens; 0 = off; must be >= 0.
  int32_t top_k = 0;
  // Nucleus: keep the smallest most-likely set whose probability mass reaches top_p; in (0, 1].
  float top_p = 1.0f;
  // Keep tokens with p >= min_p * p_max; must be in [0, 1).
  float min_p = 0.0f;
  // CTRL/HF style, once for every distinct token in the history: logit > 0 ? logit / r
  // : logit * r. Must be > 0 and finite; 1 = off, < 1 favours repeats.
  float repetition_penalty = 1.0f;
  // Same seed + same logits + same history => same tokens.
  uint64_t seed = 0;
};

// OK, or INVALID_ARGUMENT naming the first bad field and its value, e.g.
// "temperature must be >= 0, got -1".
absl::Status Validate(const SamplingParams& p);

// One sequence's sampler. Not thread-safe: one per sequence, used by one thread at a time.
//
// Semantics of each step, on the logits after the repetition penalty:
//  - temperature 0: argmax, the lowest id wins ties. No random number is drawn.
//  - otherwise p = softmax(logits / temperature); top-k keeps the k largest logits (the lower id
//    wins a tie at the cut); top-p keeps the shortest most-likely prefix whose mass, renormalised
//    over what top-k kept, reaches top_p (within 1e-6, so a boundary exactly at top_p is not
//    decided by rounding); min-p keeps tokens with p >= min_p * p_max. One token is drawn from
//    what is left, in proportion to p, with one 53-bit uniform double from the generator.
// NaN logits count as -inf. -inf logits are never drawn unless every logit is -inf or NaN; then
// Sample returns 0.
class Sampler {
 public:
  // p should pass Validate(); out-of-range values are treated as "off" (temperature <= 0 or NaN
  // as greedy, top_k < 0 as 0, top_p >= 1 as 1, min_p <= 0 as 0, a bad repetition_penalty as 1).
  explicit Sampler(const SamplingParams& p);

  // logits: one float per vocabulary id (must not be empty; returns -1 if it is).
  // history: prompt + generated ids so far, for the repetition penalty (each distinct id is
  // penalised once; ids outside [0, logits.size()) are ignored).
  // Cost: O(vocab) passes; top-k adds O(vocab log k) at worst, and top-p sorts only the
  // candidates (or, past 1024 of them, one histogram bin of them).
  int32_t Sample(std::span<const float> logits, std::span<const int32_t> history);

  const SamplingParams& params() const { return params_; }

 private:
  // Logit descending, then id ascending: the order every filter cuts.
  bool MoreLikely(int32_t a, int32_t b) const;
  // Fills cand_ids_ with the top_k most likely ids (all n when top_k is off), in no order.
  void SelectTopK(size_t n);
  // Reorders cand_ids_ and keeps the most likely prefix in which the mass of the tokens before
  // each one is below target (and at least one token).
  void TopP(double target, float max_logit);
  // Uniform in [0, 1) from the top 53 bits of one generator output.
  double NextUniform();

  SamplingParams params_;
  std::mt19937_64 rng_;
  // Scratch reused across calls (sized to the vocabulary on first use).
  std::vector<float> logits_;         // penalised logits, F32 [vocab]
  std::vector<float> weights_;        // exp((logit - max) / temperature), in (0, 1], F32 [vocab]
  std::vector<int32_t> cand_ids_;     // surviving candidate ids
  std::vector<int32_t> scratch_ids_;  // TopP's output under construction
  std::vector<int32_t> tail_ids_;     // TopP's histogram bin where the mass crosses top_p
};

}  // namespace duet::sampling
