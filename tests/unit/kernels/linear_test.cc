#include "duet/kernels/linear.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "duet/kernels/reference.h"
#include "duet/tensor/dtype.h"

using duet::kernels::Linear;
using duet::kernels::Precision;
using duet::kernels::WeightLayout;

namespace {
std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}
std::vector<float> Transpose(const std::vector<float>& a, int64_t rows, int64_t cols) {
  std::vector<float> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}
std::vector<float> RoundBf16(std::vector<float> v) {
  for (auto& x : v) x = duet::Bf16ToF32(duet::F32ToBf16(x));
  return v;
}
}  // namespace

TEST_CASE("f32 Linear equals the reference matmul for every M and both layouts", "[linear]") {
  const int64_t K = 70, N = 45;  // deliberately not multiples of any block size
  const auto w_kn = Random(K * N, 1);
  const auto bias = Random(N, 2);
  const auto w_nk = Transpose(w_kn, K, N);
  auto a = Linear::Create(K, N, w_kn.data(), WeightLayout::kKN, bias.data(), Precision::kF32);
  auto b = Linear::Create(K, N, w_nk.data(), WeightLayout::kNK, bias.data(), Precision::kF32);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  for (int64_t M : {1, 3, 16, 33}) {
    const auto x = Random(M * K, 3 + M);
    std::vector<float> ref(M * N), ya(M * N), yb(M * N);
    duet::kernels::reference::Matmul(x.data(), w_kn.data(), bias.data(), M, K, N, ref.data());
    REQUIRE((*a)->Forward(x.data(), M, ya.data()).ok());
    REQUIRE((*b)->Forward(x.data(), M, yb.data()).ok());
    for (int64_t i = 0; i < M * N; ++i) {
      REQUIRE(ya[i] == Approx(ref[i]).margin(1e-4));
      REQUIRE(yb[i] == Approx(ref[i]).margin(1e-4));
    }
  }
}

TEST_CASE("bf16 Linear equals the reference on bf16-rounded inputs (f32 accumulation)",
          "[linear]") {
  // Small M (<= 16) runs duet's own kernel on the packed layout, larger M runs oneDNN. K and N
  // are not multiples of the 32x64 weight blocks; the small-M kernel splits K into chunks of 128
  // (K = 70: one partial chunk, 256: two, 300: two and a remainder) and M into 1, 2 or 3 row
  // chunks of up to 6 rows (every M from 1 to 16); N = 130 ends in a partial 64-column block.
  const int64_t K = GENERATE(256, 70, 300), N = 130;
  const auto w = Random(K * N, 7);
  auto lin = Linear::Create(K, N, w.data(), WeightLayout::kKN, nullptr, Precision::kBF16);
  REQUIRE(lin.ok());
  const auto wr = RoundBf16(w);
  for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 100}) {
    const auto x = Random(M * K, 11 + M);
    std::vector<float> ref(M * N), y(M * N);
    duet::kernels::reference::Matmul(RoundBf16(x).data(), wr.data(), nullptr, M, K, N, ref.data());
    REQUIRE((*lin)->Forward(x.data(), M, y.data()).ok());
    for (int64_t i = 0; i < M * N; ++i) REQUIRE(y[i] == Approx(ref[i]).margin(1e-3));
  }
}

TEST_CASE("Linear rejects bad shapes", "[linear]") {
  float w = 1.f;
  auto bad = Linear::Create(0, 4, &w, WeightLayout::kKN, nullptr, Precision::kF32);
  REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
  auto ok = Linear::Create(1, 1, &w, WeightLayout::kKN, nullptr, Precision::kF32);
  REQUIRE(ok.ok());
  float x = 1.f, y = 0.f;
  REQUIRE((*ok)->Forward(&x, 0, &y).code() == absl::StatusCode::kInvalidArgument);
}
