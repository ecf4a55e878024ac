#include "duet/kernels/linear.h"

#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <string>
#include <random>
#include <vector>

#include "duet/kernels/reference.h"
#include "duet/tensor/dtype.h"
#include "gemv_bf16.h"  // common/kernels/src: the small-M kernel and its thread split

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
  // With and without a bias (where the CPU has AMX, the small-M kernel's tiles start from it).
  const int64_t K = GENERATE(256, 70, 300), N = 130;
  const bool with_bias = GENERATE(false, true);
  const auto w = Random(K * N, 7);
  const auto bias = Random(N, 8);
  const float* b = with_bias ? bias.data() : nullptr;
  auto lin = Linear::Create(K, N, w.data(), WeightLayout::kKN, b, Precision::kBF16);
  REQUIRE(lin.ok());
  const auto wr = RoundBf16(w);
  for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 100}) {
    const auto x = Random(M * K, 11 + M);
    std::vector<float> ref(M * N), y(M * N);
    duet::kernels::reference::Matmul(RoundBf16(x).data(), wr.data(), b, M, K, N, ref.data());
    REQUIRE((*lin)->Forward(x.data(), M, y.data()).ok());
    for (int64_t i = 0; i < M * N; ++i) REQUIRE(y[i] == Approx(ref[i]).margin(1e-3));
  }
}

TEST_CASE("Linear names the small-M kernel this CPU and ONEDNN_MAX_CPU_ISA allow", "[linear]") {
  // ctest runs this binary's [linear] cases a second time with ONEDNN_MAX_CPU_ISA below AMX, so
  // that on an AMX machine the Linear cases above also run the dot-product kernel.
  const auto w = Random(256 * 130, 9);
  auto bf16 = Linear::Create(256, 130, w.data(), WeightLayout::kKN, nullptr, Precision::kBF16);
  auto f32 = Linear::Create(256, 130, w.data(), WeightLayout::kKN, nullptr, Precision::kF32);
  REQUIRE(bf16.ok());
  REQUIRE(f32.ok());
  CHECK(std::string((*f32)->small_m_kernel()) == "onednn");
  const char* isa = std::getenv("ONEDNN_MAX_CPU_ISA");
  const bool amx_allowed = isa == nullptr || std::string(isa) == "ALL" ||
                           std::string(isa) == "AVX512_CORE_AMX";
  std::string expected = "onednn";
  if (duet::kernels::HasAvx512Bf16()) expected = "avx512-bf16";
  if (duet::kernels::HasAmxBf16() && amx_allowed) expected = "amx";
  INFO("ONEDNN_MAX_CPU_ISA=" << (isa != nullptr ? isa : "(unset)"));
  CHECK(std::string((*bf16)->small_m_kernel()) == expected);
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

// ---- How the small-M kernel splits a matrix between threads (GemvSplit) ----

TEST_CASE("GemvSplit starts even and moves work toward the faster thread", "[linear]") {
  duet::kernels::GemvSplit split;
  int64_t b[4];
  split.Bounds(2, 10, b);
  CHECK((b[0] == 0 && b[1] == 5 && b[2] == 10));
  split.Bounds(3, 10, b);  // a new thread count starts even again
  CHECK((b[0] == 0 && b[1] == 3 && b[2] == 7 && b[3] == 10));

  // Thread 1 streams at half thread 0's speed, call after call: the split settles where both
  // finish together (2/3 and 1/3), a quarter of the way per call.
  split.Bounds(2, 300, b);
  for (int call = 0; call < 40; ++call) {
    split.Bounds(2, 300, b);
    const double seconds[2] = {(b[1] - b[0]) * 1e-6, (b[2] - b[1]) * 2e-6};
    split.Update(2, b, seconds);
  }
  CHECK(split.share(0) == Approx(2.0 / 3).margin(0.01));
  split.Bounds(2, 300, b);
  CHECK(b[1] == Approx(200).margin(3));

  // A thread that seems to stall keeps a floor of a quarter of its even share.
  for (int call = 0; call < 40; ++call) {
    split.Bounds(2, 300, b);
    const double seconds[2] = {(b[1] - b[0]) * 1e-6, (b[2] - b[1]) * 1.0};
    split.Update(2, b, seconds);
  }
  CHECK(split.share(1) == Approx(0.125).margin(1e-9));
  CHECK(split.share(0) + split.share(1) == Approx(1.0));

  // No measurement (no blocks, no time) changes nothing, and no share becomes NaN.
  const double before = split.share(0);
  const int64_t empty[3] = {0, 0, 0};
  const double zero[2] = {0, 0};
  split.Update(2, empty, zero);
  CHECK(split.share(0) == before);
  split.Update(3, b, zero);  // a call planned for another thread count is ignored
  CHECK(split.share(0) == before);

  // A time too small to divide by (a subnormal) counts as no measurement, not as infinite speed.
  split.Bounds(2, 300, b);
  const double tiny[2] = {1e-310, 1e-6};
  split.Update(2, b, tiny);
  CHECK(std::isfinite(split.share(0)));
  CHECK(split.share(0) + split.share(1) == Approx(1.0));

  // Every thread keeps at least one block when there are as many blocks as threads, even at the
  // floor (0.875 of 4 blocks would round to all 4).
  split.Bounds(2, 4, b);
  CHECK((b[1] >= 1 && b[1] <= 3 && b[2] == 4));

  // Three threads over two blocks: the one without a block keeps its share; the two measured
  // ones move toward their speeds within what is left.
  duet::kernels::GemvSplit three;
  three.Bounds(3, 2, b);
  REQUIRE((b[0] == 0 && b[1] == 1 && b[2] == 1 && b[3] == 2));
  const double t3[3] = {1e-6, 0, 2e-6};
  three.Update(3, b, t3);
  CHECK(three.share(1) == Approx(1.0 / 3));
  CHECK(three.share(0) == Approx(1.0 / 3 + 0.25 * (2.0 / 3 * 2 / 3 - 1.0 / 3)));
  CHECK(three.share(2) == Approx(1.0 / 3 + 0.25 * (2.0 / 3 / 3 - 1.0 / 3)));
}

namespace {
// A K x N matrix packed into BA16a64b2a by hand (blocks of 32 K x 64 N, N-blocks outermost, each
// block [16 k-pairs][64 n][2], zero padded to kp x np).
std::vector<uint16_t> PackBA16a64b2a(const std::vector<float>& w, int64_t K, int64_t N,
                                     int64_t kp, int64_t np) {
  std::vector<uint16_t> packed(kp * np, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nb = n / 64, kb = k / 32, pair = (k % 32) / 2;
      const int64_t at = nb * kp * 64 + kb * 32 * 64 + pair * 128 + (n % 64) * 2 + k % 2;
      packed[at] = duet::F32ToBf16(w[k * N + n]);
    }
  return packed;
}

using SmallMKernel = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t,
                              float*, duet::kernels::GemvSplit*);
struct NamedKernel {
  const char* name;
  SmallMKernel run;
  bool available;
  bool amx_rows;  // takes x packed by PackAmxRows, not as rows of kp values
};
// x (f32 [M, K]) as `kernel` takes it.
std::vector<uint16_t> KernelInput(const NamedKernel& kernel, const std::vector<float>& x,
                                  int64_t M, int64_t K, int64_t kp) {
  std::vector<uint16_t> xb(M * kp, 0);
  if (kernel.amx_rows) {
    duet::kernels::PackAmxRows(x.data(), M, K, kp, xb.data());
  } else {
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < K; ++k) xb[r * kp + k] = duet::F32ToBf16(x[r * K + k]);
  }
  return xb;
}
// Both small-M kernels, each where this CPU can run it (Linear uses GemmAmxBf16 where there is
// AMX, so on such a machine the Linear tests above do not reach GemvBf16; these do).
std::vector<NamedKernel> SmallMKernels() {
  return {{"GemvBf16", duet::kernels::GemvBf16, duet::kernels::HasAvx512Bf16(), false},
          {"GemmAmxBf16",
           [](const uint16_t* x, int64_t m, int64_t kp, const uint16_t* w, int64_t n, float* y,
              duet::kernels::GemvSplit* split) {
             duet::kernels::GemmAmxBf16(x, m, kp, w, n, y, split);
           },
           duet::kernels::HasAmxBf16(), true}};
}
}  // namespace

TEST_CASE("PackAmxRows lays rows out by 32-value slices and rounds as F32ToBf16", "[linear]") {
  if (!duet::kernels::HasAmxBf16()) {
    WARN("PackAmxRows not run: this CPU lacks AMX-BF16 (Linear does not call it)");
    return;
  }
  // 20 rows (a group of 16, then one of 4) of K = 70 (two full slices and a partial one),
  // holding ties, NaNs, infinities, the largest finite values and denormals among random bits.
  const int64_t M = 20, K = 70, kp = 96;
  const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x7fc00001u, 0xff800001u, 0x7f800000u,
                              0xff7fffffu, 0x00000001u, 0x807fffffu, 0x00000000u, 0x80000000u};
  std::vector<float> x(M * K);
  std::mt19937 gen(17);
  for (int64_t i = 0; i < M * K; ++i) {
    uint32_t u = i % 7 == 0 ? special[(i / 7) % 10] : static_cast<uint32_t>(gen());
    std::memcpy(&x[i], &u, 4);
  }
  std::vector<uint16_t> out(M * kp, 0xDEAD);
  duet::kernels::PackAmxRows(x.data(), M, K, kp, out.data());
  for (int64_t r = 0; r < M; ++r) {
    const int64_t g0 = r / 16 * 16, rows = std::min<int64_t>(16, M - g0);
    for (int64_t k = 0; k < kp; ++k) {
      const uint16_t got = out[g0 * kp + (k / 32 * rows + (r - g0)) * 32 + k % 32];
      INFO("row " << r << " k " << k);
      if (k >= K) {
        REQUIRE(got == 0);
        continue;
      }
      uint32_t u;
      std::memcpy(&u, &x[r * K + k], 4);
      const bool denormal = (u & 0x7f800000u) == 0 && (u & 0x007fffffu) != 0;
      const uint16_t want = denormal ? static_cast<uint16_t>((u >> 16) & 0x8000u)
                                     : duet::F32ToBf16(x[r * K + k]);
      REQUIRE(got == want);
    }
  }
}

TEST_CASE("Both small-M kernels equal the reference for every M, with K and N tails",
          "[linear]") {
  // K = 70: one partial 32-K block; 300: several and a partial one. N = 130 ends in a partial
  // 64-column block. M past 16 runs in groups of 16.
  const int64_t K = GENERATE(70, 300), N = 130;
  const int64_t kp = (K + 31) / 32 * 32, np = (N + 63) / 64 * 64;
  const auto w = Random(K * N, 21);
  const auto packed = PackBA16a64b2a(w, K, N, kp, np);
  const auto wr = RoundBf16(w);
  int ran = 0;
  for (const NamedKernel& kernel : SmallMKernels()) {
    if (!kernel.available) {
      WARN(kernel.name << " not run: this CPU lacks its instructions");
      continue;
    }
    ++ran;
    for (int64_t M = 1; M <= 20; ++M) {
      INFO(kernel.name << " K=" << K << " M=" << M);
      const auto x = Random(M * K, 31 + M);
      const std::vector<uint16_t> xb = KernelInput(kernel, x, M, K, kp);
      std::vector<float> y(M * N, NAN), ref(M * N);
      kernel.run(xb.data(), M, kp, packed.data(), N, y.data(), nullptr);
      duet::kernels::reference::Matmul(RoundBf16(x).data(), wr.data(), nullptr, M, K, N,
                                       ref.data());
      for (int64_t i = 0; i < M * N; ++i) REQUIRE(y[i] == Approx(ref[i]).margin(1e-3));
    }
  }
  // Any machine duet's bf16 mode runs fast on has at least the AVX-512-BF16 kernel; report how
  // many ran so a log shows it.
  CHECK(ran == static_cast<int>(duet::kernels::HasAvx512Bf16()) +
                   static_cast<int>(duet::kernels::HasAmxBf16()));
}

TEST_CASE("Each small-M kernel gives the same bits however the columns are split", "[linear]") {
  // Run once split evenly and once with thread 0 holding almost every block: each column is
  // summed by one thread either way.
  const int64_t K = 100, N = 1000, kp = 128, np = 1024;
  const auto w = Random(K * N, 3);
  const auto packed = PackBA16a64b2a(w, K, N, kp, np);
  for (const NamedKernel& kernel : SmallMKernels()) {
    if (!kernel.available) {
      WARN(kernel.name << " not run: this CPU lacks its instructions");
      continue;
    }
    for (int64_t M : {1, 7, 16}) {
      INFO(kernel.name << " M=" << M);
      const auto x = Random(M * K, 5 + M);
      const std::vector<uint16_t> xb = KernelInput(kernel, x, M, K, kp);
      std::vector<float> even(M * N), skewed(M * N), ref(M * N);
      kernel.run(xb.data(), M, kp, packed.data(), N, even.data(), nullptr);
      duet::kernels::GemvSplit split;
      int64_t b[duet::kernels::GemvSplit::kMaxThreads + 1];
      const int nt = 2;  // the pool below has exactly two threads, so the split is used
      // Thread 1 "three times slower": three quarters of the blocks go to thread 0. (Not so slow
      // that its share sits on the floor: the real call's timing could push it no lower, and
      // the check below that the call moved the split would then fail by chance.)
      for (int call = 0; call < 60; ++call) {
        split.Bounds(nt, 16, b);
        const double seconds[2] = {1e-6 * (b[1] - b[0]), 3e-6 * (b[2] - b[1])};
        split.Update(nt, b, seconds);
      }
      split.Bounds(nt, 16, b);
      REQUIRE(b[1] == 12);
      const double trained = split.share(0);
      const int threads_before = omp_get_max_threads();
      omp_set_num_threads(nt);
      kernel.run(xb.data(), M, kp, packed.data(), N, skewed.data(), &split);
      omp_set_num_threads(threads_before);
      CHECK(split.share(0) != trained);  // the call ran with the split's bounds and updated it
      duet::kernels::reference::Matmul(RoundBf16(x).data(), RoundBf16(w).data(), nullptr, M, K,
                                       N, ref.data());
      for (int64_t i = 0; i < M * N; ++i) {
        REQUIRE(skewed[i] == even[i]);
        REQUIRE(even[i] == Approx(ref[i]).margin(1e-3));
      }
    }
  }
}
