// The two K/V-cache invariants the project rests on, as checks any model test can run:
// prefill-then-decode equals full recomputation, and a batched decode step equals the same
// sequences decoded one by one. Include after <catch2/catch.hpp>.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "duet/kv/block_pool.h"
#include "duet/model/model.h"

namespace duet::testing {

inline double MaxDiff(const float* a, const float* b, size_t n) {
  double d = 0;
  for (size_t i = 0; i < n; ++i) d = std::max(d, double{std::fabs(a[i] - b[i])});
  return d;
}

// Logits of the last position after one forward over all of `tokens` in a fresh cache.
inline std::vector<float> LastLogits(model::Model& m, kv::BlockPool& pool,
                                     const std::vector<int32_t>& tokens) {
  kv::SequenceKv kv(&pool);
  REQUIRE(kv.Reserve(static_cast<int32_t>(tokens.size())).ok());
  std::vector<float> logits;
  model::BatchItem item{tokens, &kv, false};
  REQUIRE(m.Forward({&item, 1}, &logits).ok());
  return logits;
}

// Prefills t[0, n_prompt), then decodes t[n_prompt], ... one token per step; after the prefill
// and after every step the logits equal a fresh forward over the same prefix within `tol`.
// Returns the smallest max |logit| of those recomputations (so a caller can see the logits were
// not all near zero).
inline double CheckDecodeEqualsRecompute(model::Model& m, kv::BlockPool& pool,
                                         const std::vector<int32_t>& t, size_t n_prompt,
                                         double tol) {
  kv::SequenceKv kv(&pool);
  REQUIRE(kv.Reserve(static_cast<int32_t>(t.size())).ok());
  std::vector<float> logits;
  const std::vector<int32_t> prompt(t.begin(), t.begin() + n_prompt);
  model::BatchItem prefill{prompt, &kv, false};
  REQUIRE(m.Forward({&prefill, 1}, &logits).ok());
  double smallest_max = INFINITY;
  for (size_t i = n_prompt; i <= t.size(); ++i) {
    const auto full = LastLogits(m, pool, {t.begin(), t.begin() + i});
    REQUIRE(full.size() == logits.size());
    const double d = MaxDiff(full.data(), logits.data(), full.size());
    INFO("step with " << i << " tokens: max |d| = " << d);
    REQUIRE(d <= tol);
    double mx = 0;
    for (float x : full) mx = std::max(mx, double{std::fabs(x)});
    smallest_max = std::min(smallest_max, mx);
    if (i == t.size()) break;
    model::BatchItem step{std::span<const int32_t>(&t[i], 1), &kv, false};
    REQUIRE(m.Forward({&step, 1}, &logits).ok());
  }
  return smallest_max;
}

// Prefills every prompt into two caches, then for `steps` steps decodes token next(s, step) for
// every sequence s: once as one batch, once sequence by sequence; the logits agree within `tol`.
inline void CheckBatchedEqualsOneByOne(model::Model& m, kv::BlockPool& pool,
                                       const std::vector<std::vector<int32_t>>& prompts,
                                       const std::function<int32_t(size_t, int)>& next_token,
                                       double tol, int steps = 3) {
  const int32_t V = m.config().n_vocab;
  std::vector<kv::SequenceKv> batched, single;
  std::vector<float> logits;
  for (const auto& prompt : prompts) {
    for (auto* group : {&batched, &single}) {
      group->emplace_back(&pool);
      REQUIRE(group->back().Reserve(static_cast<int32_t>(prompt.size()) + steps).ok());
      model::BatchItem item{prompt, &group->back(), false};
      REQUIRE(m.Forward({&item, 1}, &logits).ok());
    }
  }
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> next(prompts.size());
    for (size_t s = 0; s < prompts.size(); ++s) next[s] = next_token(s, step);
    std::vector<model::BatchItem> items;
    for (size_t s = 0; s < prompts.size(); ++s)
      items.push_back({std::span<const int32_t>(&next[s], 1), &batched[s], false});
    std::vector<float> batch_logits;
    REQUIRE(m.Forward(items, &batch_logits).ok());
    REQUIRE(batch_logits.size() == prompts.size() * V);
    for (size_t s = 0; s < prompts.size(); ++s) {
      model::BatchItem one{std::span<const int32_t>(&next[s], 1), &single[s], false};
      REQUIRE(m.Forward({&one, 1}, &logits).ok());
      const double d = MaxDiff(logits.data(), batch_logits.data() + s * V, V);
      INFO("sequence " << s << " step " << step << " max |d| = " << d);
      REQUIRE(d <= tol);
    }
  }
}

}  // namespace duet::testing
