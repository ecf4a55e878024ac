// The sampler against exact distributions: each filter keeps exactly the tokens it should, and
// the empirical frequencies match the probabilities a naive reference computes.
#include "duet/sampling/sampler.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using duet::sampling::Sampler;
using duet::sampling::SamplingParams;
using duet::sampling::Validate;

namespace {

std::vector<float> LogitsFromProbs(const std::vector<double>& probs) {
  std::vector<float> out;
  for (double p : probs) out.push_back(static_cast<float>(std::log(p)));
  return out;
}

// Frequency of each id over n draws.
std::vector<double> Frequencies(Sampler& s, const std::vector<float>& logits, int n,
                                const std::vector<int32_t>& history = {}) {
  std::vector<double> freq(logits.size(), 0.0);
  for (int i = 0; i < n; ++i) {
    const int32_t id = s.Sample(logits, history);
    REQUIRE(id >= 0);
    REQUIRE(id < static_cast<int32_t>(logits.size()));
    freq[id] += 1.0;
  }
  for (double& f : freq) f /= n;
  return freq;
}

// The exact distribution the sampler should draw from, computed naively: full softmax, full sort.
std::vector<double> ReferenceProbs(std::vector<float> logits, const SamplingParams& p,
                                   const std::vector<int32_t>& history) {
  const size_t n = logits.size();
  std::vector<bool> seen(n, false);
  for (int32_t id : history) {
    if (id < 0 || static_cast<size_t>(id) >= n || seen[id]) continue;
    seen[id] = true;
    logits[id] =
        logits[id] > 0 ? logits[id] / p.repetition_penalty : logits[id] * p.repetition_penalty;
  }
  std::vector<double> prob(n);
  const double max = *std::max_element(logits.begin(), logits.end());
  for (size_t i = 0; i < n; ++i) prob[i] = std::exp((logits[i] - max) / p.temperature);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  size_t keep = n;
  if (p.top_k > 0) keep = std::min(keep, static_cast<size_t>(p.top_k));
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += prob[order[i]];
  double before = 0;
  for (size_t i = 0; i < keep; ++i) {
    if (i > 0 && before >= p.top_p * mass) {
      keep = i;
      break;
    }
    before += prob[order[i]];
  }
  std::vector<double> out(n, 0.0);
  const double p_max = prob[order[0]];
  double total = 0;
  for (size_t i = 0; i < keep; ++i) {
    if (prob[order[i]] >= p.min_p * p_max) {
      out[order[i]] = prob[order[i]];
      total += prob[order[i]];
    }
  }
  for (double& x : out) x /= total;
  return out;
}

double MaxAbsDiff(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

std::vector<float> RandomLogits(size_t n, float stddev, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> out(n);
  for (float& x : out) x = dist(rng);
  return out;
}

void RequireInvalid(const SamplingParams& p, const std::string& field, const std::string& value) {
  const absl::Status s = Validate(p);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find(field) != std::string_view::npos);
  REQUIRE(s.message().find(value) != std::string_view::npos);
}

}  // namespace

TEST_CASE("Validate accepts the defaults and the edges of each range", "[sampling]") {
  REQUIRE(Validate(SamplingParams{}).ok());
  SamplingParams p;
  p.temperature = 0;
  p.top_k = 1;
  p.top_p = 1e-6f;
  p.min_p = 0.999f;
  p.repetition_penalty = 0.5f;
  REQUIRE(Validate(p).ok());
}

TEST_CASE("Validate rejects each bad value, naming the field and the value", "[sampling]") {
  SamplingParams p;
  p.temperature = -1;
  RequireInvalid(p, "temperature", "-1");
  p.temperature = std::numeric_limits<float>::quiet_NaN();
  RequireInvalid(p, "temperature", "nan");
  p.temperature = std::numeric_limits<float>::infinity();
  RequireInvalid(p, "temperature", "inf");

  p = {};
  p.top_p = 0;
  RequireInvalid(p, "top_p", "got 0");
  p.top_p = 1.5f;
  RequireInvalid(p, "top_p", "1.5");
  p.top_p = std::numeric_limits<float>::quiet_NaN();
  RequireInvalid(p, "top_p", "nan");

  p = {};
  p.min_p = 1;
  RequireInvalid(p, "min_p", "got 1");
  p.min_p = -0.1f;
  RequireInvalid(p, "min_p", "-0.1");

  p = {};
  p.top_k = -1;
  RequireInvalid(p, "top_k", "-1");

  p = {};
  p.repetition_penalty = 0;
  RequireInvalid(p, "repetition_penalty", "got 0");
  p.repetition_penalty = -2;
  RequireInvalid(p, "repetition_penalty", "-2");
  p.repetition_penalty = std::numeric_limits<float>::infinity();
  RequireInvalid(p, "repetition_penalty", "inf");
}

TEST_CASE("Greedy is argmax, the lowest id winning ties", "[sampling]") {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p);
  REQUIRE(s.Sample(std::vector<float>{0.1f, 2.0f, -3.0f, 1.9f}, {}) == 1);
  REQUIRE(s.Sample(std::vector<float>{1.0f, 5.0f, 5.0f, 5.0f}, {}) == 1);
  REQUIRE(s.Sample(std::vector<float>{-7.0f}, {}) == 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  REQUIRE(s.Sample(std::vector<float>{nan, -1.0f, nan, 0.5f}, {}) == 3);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const auto logits = RandomLogits(1000, 3.0f, seed);
    const auto expected = std::max_element(logits.begin(), logits.end()) - logits.begin();
    REQUIRE(s.Sample(logits, {}) == expected);
  }
}

TEST_CASE("Empty logits return -1 and all-masked logits return 0", "[sampling]") {
  Sampler s(SamplingParams{});
  REQUIRE(s.Sample({}, {}) == -1);
  const float ninf = -std::numeric_limits<float>::infinity();
  REQUIRE(s.Sample(std::vector<float>{ninf, ninf, ninf}, {}) == 0);
}

TEST_CASE("Masked (-inf) and NaN logits are never drawn", "[sampling]") {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> logits = {ninf, 0.0f, nan, 0.0f, ninf};
  Sampler s(SamplingParams{});
  const auto freq = Frequencies(s, logits, 4000);
  REQUIRE(freq[0] == 0);
  REQUIRE(freq[2] == 0);
  REQUIRE(freq[4] == 0);
  REQUIRE(freq[1] == Approx(0.5).margin(0.05));
}

TEST_CASE("A tiny temperature approaches greedy and stays finite", "[sampling]") {
  const std::vector<float> logits = {1.0f, 3.0f, 2.99f, -4.0f};
  for (float t : {1e-6f, 1e-20f, 1e-40f}) {
    SamplingParams p;
    p.temperature = t;
    p.seed = 11;
    Sampler s(p);
    for (int i = 0; i < 500; ++i) REQUIRE(s.Sample(logits, {}) == 1);
  }
  // As the temperature falls, the runner-up's share falls towards zero.
  double previous = 1.0;
  for (float t : {1.0f, 0.1f, 0.02f}) {
    SamplingParams p;
    p.temperature = t;
    Sampler s(p);
    const auto freq = Frequencies(s, std::vector<float>{0.0f, 0.1f}, 20000);
    REQUIRE(freq[0] < previous);
    previous = freq[0];
  }
  REQUIRE(previous < 0.02);
}

TEST_CASE("The same seed gives the same tokens; different seeds differ", "[sampling]") {
  const auto logits = RandomLogits(64, 1.0f, 3);
  const std::vector<int32_t> history = {1, 5, 9};
  auto draws = [&](uint64_t seed) {
    SamplingParams p;
    p.seed = seed;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.repetition_penalty = 1.1f;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.Sample(logits, history));
    return out;
  };
  REQUIRE(draws(42) == draws(42));
  REQUIRE(draws(42) != draws(43));
  REQUIRE(draws(0) != draws(1));
  // Pinned: a draw depends only on the seed and the 53-bit uniform, not on the standard
  // library's distributions. mt19937_64 is fully specified, so this holds on every platform.
  SamplingParams p;
  p.seed = 5489;
  Sampler s(p);
  std::mt19937_64 rng(5489);
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
  const int32_t expected = u < 0.25 ? 0 : (u < 0.5 ? 1 : (u < 0.75 ? 2 : 3));
  REQUIRE(s.Sample(std::vector<float>{0.0f, 0.0f, 0.0f, 0.0f}, {}) == expected);
}

TEST_CASE("top_k = 1 equals greedy", "[sampling]") {
  SamplingParams p;
  p.top_k = 1;
  p.temperature = 1.5f;
  p.seed = 9;
  Sampler s(p);
  for (uint32_t seed = 0; seed < 100; ++seed) {
    auto logits = RandomLogits(1000, 2.0f, seed);
    logits[seed * 7] = logits[seed * 7 + 1] = 20.0f;  // a tie: the lower id wins
    REQUIRE(s.Sample(logits, {}) == static_cast<int32_t>(seed * 7));
  }
}

TEST_CASE("top_k = 2 only ever draws the two most likely tokens", "[sampling]") {
  SamplingParams p;
  p.top_k = 2;
  Sampler s(p);
  const std::vector<float> logits = {0.5f, 0.2f, 1.2f, 0.9f, -1.0f, 1.0f, 0.0f};
  const auto freq = Frequencies(s, logits, 10000);
  for (size_t id = 0; id < logits.size(); ++id) {
    if (id != 2 && id != 5) REQUIRE(freq[id] == 0);
  }
  const double p2 = 1.0 / (1.0 + std::exp(1.0 - 1.2));
  REQUIRE(freq[2] == Approx(p2).margin(0.02));

  // A tie at the cut keeps the lower ids.
  const auto tied = Frequencies(s, std::vector<float>{1.0f, 3.0f, 3.0f, 3.0f}, 2000);
  REQUIRE(tied[0] == 0);
  REQUIRE(tied[3] == 0);
  REQUIRE(tied[1] > 0.4);
  REQUIRE(tied[2] > 0.4);
}

TEST_CASE("top_p keeps the smallest set reaching top_p, in proportion", "[sampling]") {
  SamplingParams p;
  p.top_p = 0.8f;
  p.seed = 123;
  Sampler s(p);
  // Out of order, so the nucleus has to be found by sorting.
  const auto logits = LogitsFromProbs({0.15, 0.5, 0.05, 0.3});
  const auto freq = Frequencies(s, logits, 20000);
  REQUIRE(freq[0] == 0);
  REQUIRE(freq[2] == 0);
  REQUIRE(freq[1] == Approx(0.625).margin(0.02));
  REQUIRE(freq[3] == Approx(0.375).margin(0.02));

  // Just past the boundary the third token joins.
  p.top_p = 0.81f;
  Sampler wider(p);
  const auto freq_wider = Frequencies(wider, logits, 20000);
  REQUIRE(freq_wider[0] == Approx(0.15 / 0.95).margin(0.02));
  REQUIRE(freq_wider[2] == 0);
}

TEST_CASE("top_p renormalises over what top_k kept", "[sampling]") {
  // After top_k = 2 the probabilities are 4/7 and 3/7, so top_p = 0.5 keeps only the first.
  // Over the full distribution (0.4 < 0.5) it would keep two.
  SamplingParams p;
  p.top_k = 2;
  p.top_p = 0.5f;
  Sampler s(p);
  const auto freq = Frequencies(s, LogitsFromProbs({0.4, 0.3, 0.2, 0.1}), 2000);
  REQUIRE(freq[0] == 1.0);
}

TEST_CASE("min_p drops tokens under min_p times the largest probability", "[sampling]") {
  SamplingParams p;
  p.min_p = 0.5f;
  Sampler s(p);
  const auto freq = Frequencies(s, LogitsFromProbs({0.19, 0.4, 0.16, 0.25}), 20000);
  REQUIRE(freq[0] == 0);
  REQUIRE(freq[2] == 0);
  REQUIRE(freq[1] == Approx(0.4 / 0.65).margin(0.02));
  REQUIRE(freq[3] == Approx(0.25 / 0.65).margin(0.02));
}

TEST_CASE("Repetition penalty divides positive logits and multiplies negative ones", "[sampling]") {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 1.2f;
  Sampler greedy(p);
  // Positive: 2.0 / 1.2 = 1.67 < 1.9.
  REQUIRE(greedy.Sample(std::vector<float>{2.0f, 1.9f}, {}) == 0);
  REQUIRE(greedy.Sample(std::vector<float>{2.0f, 1.9f}, std::vector<int32_t>{0}) == 1);
  // Negative: -1.0 * 1.2 = -1.2 < -1.1 (dividing would raise it to -0.83).
  REQUIRE(greedy.Sample(std::vector<float>{-1.0f, -1.1f}, std::vector<int32_t>{0}) == 1);
  // A token repeated in the history is penalised once: 2.0 / 1.2 = 1.67 > 1.5.
  REQUIRE(greedy.Sample(std::vector<float>{2.0f, 1.5f}, std::vector<int32_t>{0, 0, 0}) == 0);
  // Ids outside the vocabulary are ignored.
  REQUIRE(greedy.Sample(std::vector<float>{2.0f, 1.9f}, std::vector<int32_t>{-1, 2, 99}) == 0);

  // The exact amounts, through the drawn frequencies at temperature 1 with r = 2.
  p.temperature = 1;
  p.repetition_penalty = 2;
  Sampler s(p);
  const std::vector<int32_t> history = {0};
  auto pos = Frequencies(s, std::vector<float>{1.0f, 0.0f}, 20000, history);
  REQUIRE(pos[0] == Approx(1.0 / (1.0 + std::exp(-0.5))).margin(0.015));
  auto neg = Frequencies(s, std::vector<float>{-1.0f, 0.0f}, 20000, history);
  REQUIRE(neg[0] == Approx(1.0 / (1.0 + std::exp(2.0))).margin(0.015));
  // A penalty below 1 favours repeats.
  p.repetition_penalty = 0.5f;
  Sampler favour(p);
  auto fav = Frequencies(favour, std::vector<float>{1.0f, 1.5f}, 20000, history);
  REQUIRE(fav[0] == Approx(1.0 / (1.0 + std::exp(-0.5))).margin(0.015));
}

TEST_CASE("At temperature 1 the draws follow the softmax; temperature 2 flattens it",
          "[sampling]") {
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f, 0.5f, 1.5f};
  SamplingParams p;
  p.seed = 77;
  Sampler s1(p);
  const auto f1 = Frequencies(s1, logits, 50000);
  const auto ref1 = ReferenceProbs(logits, p, {});
  REQUIRE(MaxAbsDiff(f1, ref1) < 0.015);

  p.temperature = 2;
  Sampler s2(p);
  const auto f2 = Frequencies(s2, logits, 50000);
  const auto ref2 = ReferenceProbs(logits, p, {});
  REQUIRE(MaxAbsDiff(f2, ref2) < 0.015);
  // Most likely token: 0.43 at t = 1, 0.28 at t = 2; least likely: 0.02 against 0.07.
  REQUIRE(f2[0] < f1[0] - 0.1);
  REQUIRE(f2[3] > f1[3] + 0.03);
}

TEST_CASE("Every stage together matches a naive reference", "[sampling]") {
  const auto logits = RandomLogits(200, 2.0f, 17);
  const std::vector<int32_t> history = {3, 17, 17, 42, 150, 199, 500};
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 12;
  p.top_p = 0.9f;
  p.min_p = 0.05f;
  p.repetition_penalty = 1.3f;
  p.seed = 2024;
  Sampler s(p);
  const auto freq = Frequencies(s, logits, 50000, history);
  const auto ref = ReferenceProbs(logits, p, history);
  const size_t support = std::count_if(ref.begin(), ref.end(), [](double x) { return x > 0; });
  REQUIRE(support > 2);  // the test exercises a real mixture
  for (size_t i = 0; i < ref.size(); ++i) {
    if (ref[i] == 0) REQUIRE(freq[i] == 0);
  }
  REQUIRE(MaxAbsDiff(freq, ref) < 0.015);
}

TEST_CASE("A 128k vocabulary: top-p's histogram finds the same nucleus as a full sort",
          "[sampling]") {
  const size_t n = 128256;
  const auto logits = RandomLogits(n, 2.0f, 99);
  for (float top_p : {0.05f, 0.5f, 0.9f}) {
    SamplingParams p;
    p.top_p = top_p;
    p.seed = 1;
    const auto ref = ReferenceProbs(logits, p, {});
    const size_t support = std::count_if(ref.begin(), ref.end(), [](double x) { return x > 0; });
    INFO("top_p " << top_p << " nucleus " << support);
    REQUIRE(support > 1);
    REQUIRE((support > 64) == (top_p > 0.1f));  // a small nucleus and large ones
    Sampler s(p);
    for (int i = 0; i < 100; ++i) {
      const int32_t id = s.Sample(logits, {});
      REQUIRE(ref[id] > 0);
    }
  }
  // And with top_k, only the k largest.
  SamplingParams p;
  p.top_k = 40;
  Sampler s(p);
  std::vector<float> sorted = logits;
  std::nth_element(sorted.begin(), sorted.begin() + 39, sorted.end(), std::greater<float>());
  for (int i = 0; i < 100; ++i) REQUIRE(logits[s.Sample(logits, {})] >= sorted[39]);
}

TEST_CASE("Large candidate sets: histogram top-p and heap top-k match the reference",
          "[sampling]") {
  // 1500 ids: ten likely ones among a long tail, so the nucleus is small but top-p sees more
  // than 1024 candidates.
  auto logits = RandomLogits(1500, 1.0f, 31);
  for (float& x : logits) x -= 3.0f;
  for (int i = 0; i < 10; ++i) logits[37 + 131 * i] += 6.0f;
  struct Case {
    const char* name;
    SamplingParams p;
  };
  const std::vector<Case> cases = {
      {"top_p", {.top_p = 0.7f}},
      {"top_p min_p", {.top_p = 0.9f, .min_p = 0.02f}},
      {"heap top_k, top_p", {.top_k = 50, .top_p = 0.8f}},
      {"nth_element top_k, top_p", {.top_k = 1200, .top_p = 0.95f}},
      {"top_p t=3", {.temperature = 3.0f, .top_p = 0.2f}},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    Sampler s(c.p);
    const auto freq = Frequencies(s, logits, 12000);
    const auto ref = ReferenceProbs(logits, c.p, {});
    for (size_t i = 0; i < ref.size(); ++i) {
      if (ref[i] == 0) REQUIRE(freq[i] == 0);
    }
    REQUIRE(MaxAbsDiff(freq, ref) < 0.02);
  }
}

TEST_CASE("Ties across a large top-p cut keep the lower ids", "[sampling]") {
  // 3000 equal logits: top_p = 0.5 keeps exactly ids 0..1499.
  SamplingParams p;
  p.top_p = 0.5f;
  Sampler s(p);
  const std::vector<float> logits(3000, 1.0f);
  int32_t lowest = 3000, highest = -1;
  for (int i = 0; i < 1000; ++i) {
    const int32_t id = s.Sample(logits, {});
    lowest = std::min(lowest, id);
    highest = std::max(highest, id);
  }
  REQUIRE(highest <= 1499);
  REQUIRE(highest >= 1450);
  REQUIRE(lowest <= 50);
}

// Not a test: `duet_sampling_test "[bench]"` prints the cost of one step at vocab 128k.
TEST_CASE("Sample cost at vocab 128k", "[.][bench]") {
  const auto logits = RandomLogits(128256, 2.0f, 5);
  std::vector<int32_t> history(2000);
  std::iota(history.begin(), history.end(), 0);
  struct Case {
    const char* name;
    SamplingParams p;
  };
  std::vector<Case> cases = {
      {"greedy", {.temperature = 0}},
      {"greedy+penalty", {.temperature = 0, .repetition_penalty = 1.1f}},
      {"t=0.8", {.temperature = 0.8f}},
      {"top_k=40", {.temperature = 0.8f, .top_k = 40}},
      {"top_k=40 top_p=0.9", {.temperature = 0.8f, .top_k = 40, .top_p = 0.9f}},
      {"top_p=0.9", {.temperature = 0.8f, .top_p = 0.9f}},
      {"top_p=0.9 min_p=0.05 penalty",
       {.temperature = 0.8f, .top_p = 0.9f, .min_p = 0.05f, .repetition_penalty = 1.1f}},
  };
  for (const Case& c : cases) {
    Sampler s(c.p);
    const int iters = 200;
    const auto start = std::chrono::steady_clock::now();
    int64_t sink = 0;
    for (int i = 0; i < iters; ++i) sink += s.Sample(logits, history);
    const std::chrono::duration<double, std::micro> us = std::chrono::steady_clock::now() - start;
    std::printf("%-30s %8.1f us/sample (%lld)\n", c.name, us.count() / iters,
                static_cast<long long>(sink));
  }
}
