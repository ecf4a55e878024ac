#include "duet/kernels/ops.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "duet/kernels/attention.h"
#include "duet/tensor/dtype.h"

namespace k = duet::kernels;

TEST_CASE("bf16 and f16 conversions round to nearest even", "[dtype]") {
  REQUIRE(duet::Bf16ToF32(duet::F32ToBf16(1.0f)) == 1.0f);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7 in bf16: rounds to even (1).
  REQUIRE(duet::Bf16ToF32(duet::F32ToBf16(1.0f + std::ldexp(1.f, -8))) == 1.0f);
  REQUIRE(duet::Bf16ToF32(duet::F32ToBf16(1.0f + 3 * std::ldexp(1.f, -8))) ==
          1.0f + std::ldexp(1.f, -6));
  for (float f : {0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f}) {
    REQUIRE(duet::F16ToF32(duet::F32ToF16(f)) == f);
  }
  REQUIRE(duet::F32ToF16(1.0f) == 0x3c00);
  REQUIRE(duet::F32ToF16(-2.0f) == 0xc000);
  REQUIRE(duet::F16ToF32(0x7bff) == 65504.f);
  REQUIRE(std::isinf(duet::F16ToF32(duet::F32ToF16(1e6f))));
}

TEST_CASE("ConvertF32ToBf16 gives F32ToBf16's bits for every kind of value", "[dtype]") {
  // Bit patterns that cover ties (odd and even), carries into the exponent, the largest finite
  // values, infinities, quiet and signalling NaNs of both signs, denormals and zeros; then a
  // sweep of patterns. Lengths not a multiple of 16 exercise the scalar tail as well.
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x00008000u,
                                0x00018000u, 0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu,
                                0xff7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                                0x7f800001u, 0xff80ffffu, 0x7fffffffu, 0x3effffffu, 0x4b7fffffu};
  for (uint32_t u = 0; u < 4096; ++u) bits.push_back(u * 1048573u + 12345u);
  for (size_t n : {bits.size(), bits.size() - 7, size_t{15}, size_t{1}}) {
    std::vector<float> src(n);
    std::memcpy(src.data(), bits.data(), n * sizeof(float));
    std::vector<uint16_t> got(n);
    duet::ConvertF32ToBf16(src.data(), got.data(), n);
    for (size_t i = 0; i < n; ++i) {
      INFO("bits 0x" << std::hex << bits[i]);
      REQUIRE(got[i] == duet::F32ToBf16(src[i]));
    }
  }
}

TEST_CASE("RmsNorm and LayerNorm match their definitions", "[ops]") {
  std::vector<float> x = {1, 2, 3, 4, -1, 0, 1, 2}, w = {1, 2, 1, 0.5}, b = {0, 1, 0, -1};
  std::vector<float> y(8);
  k::RmsNorm(x.data(), w.data(), 2, 4, 1e-6f, y.data());
  const float r0 = 1.f / std::sqrt((1 + 4 + 9 + 16) / 4.f + 1e-6f);
  REQUIRE(y[1] == Approx(2 * r0 * 2));
  k::LayerNorm(x.data(), w.data(), b.data(), 2, 4, 1e-5f, y.data());
  // row 1: mean 0.5, var 1.25
  REQUIRE(y[4] == Approx((-1 - 0.5f) / std::sqrt(1.25f + 1e-5f) * 1 + 0));
  REQUIRE(y[7] == Approx((2 - 0.5f) / std::sqrt(1.25f + 1e-5f) * 0.5f - 1));
}

TEST_CASE("Rope rotates pairs (i, i + d/2) by position * inv_freq", "[ops]") {
  std::vector<float> x = {1, 0, 0, 1};  // one head, d = 4
  std::vector<float> inv = {1.0f, 0.5f};
  int32_t pos = 2;
  k::Rope(x.data(), 1, 4, 1, 4, &pos, inv.data());
  // pair (0,2): (1,0) rotated by 2 rad; pair (1,3): (0,1) rotated by 1 rad.
  REQUIRE(x[0] == Approx(std::cos(2.f)));
  REQUIRE(x[2] == Approx(std::sin(2.f)));
  REQUIRE(x[1] == Approx(-std::sin(1.f)));
  REQUIRE(x[3] == Approx(std::cos(1.f)));
}

TEST_CASE("PagedAttention equals dense causal attention across scattered blocks", "[attention]") {
  // 1 sequence, 5 positions, block size 2, blocks scattered as 3,0,2; 2 query heads share 1 kv
  // head.
  const int32_t bs = 2, d = 4, n_blocks = 4, T = 5;
  std::vector<float> pool(n_blocks * 2 * bs * d);
  k::PagedKvLayout kv;
  kv.base = pool.data();
  kv.block_stride = 2 * bs * d;
  kv.layer_offset = 0;
  kv.block_size = bs;
  kv.n_kv_heads = 1;
  kv.head_dim = d;
  const int32_t table[] = {3, 0, 2};
  std::vector<float> K(T * d), V(T * d), Q(T * 2 * d);
  for (int i = 0; i < T * d; ++i) {
    K[i] = std::sin(0.3f * i);
    V[i] = std::cos(0.7f * i);
  }
  for (int i = 0; i < T * 2 * d; ++i) Q[i] = std::sin(1.1f * i + 0.5f);
  for (int p = 0; p < T; ++p)
    for (int t = 0; t < d; ++t) {
      kv.V(table[p / bs], 0, p % bs)[t] = V[p * d + t];
    }
  for (int p = 0; p < T; ++p) kv.StoreK(table[p / bs], 0, p % bs, &K[p * d]);
  float back[4];
  kv.LoadK(table[4 / bs], 0, 4 % bs, back);
  REQUIRE(back[3] == K[4 * d + 3]);
  // Two sequences sharing the cache: one prefilling all 5 rows, one decoding its last row only.
  k::AttentionSeq seqs[2] = {{table, 0, T, 0}, {table, T - 1, 1, T}};
  std::vector<float> Q2 = Q;
  Q2.insert(Q2.end(), Q.end() - 2 * d, Q.end());
  std::vector<float> out((T + 1) * 2 * d);
  k::PagedAttention(Q2.data(), 2 * d, kv, seqs, 2, 2, 0.5f, out.data(), 2 * d);
  for (int t = 0; t < 2 * d; ++t) REQUIRE(out[T * 2 * d + t] == Approx(out[(T - 1) * 2 * d + t]));
  for (int p = 0; p < T; ++p)
    for (int h = 0; h < 2; ++h) {
      std::vector<double> s(p + 1);
      double mx = -1e30, sum = 0;
      for (int j = 0; j <= p; ++j) {
        double dot = 0;
        for (int t = 0; t < d; ++t) dot += Q[p * 2 * d + h * d + t] * K[j * d + t];
        s[j] = dot * 0.5;
        mx = std::max(mx, s[j]);
      }
      for (auto& v : s) sum += (v = std::exp(v - mx));
      for (int t = 0; t < d; ++t) {
        double o = 0;
        for (int j = 0; j <= p; ++j) o += s[j] / sum * V[j * d + t];
        REQUIRE(out[p * 2 * d + h * d + t] == Approx(o).margin(1e-5));
      }
    }
}

TEST_CASE("GeluTanh and SiluMul match their closed forms", "[ops]") {
  std::vector<float> x, ref;
  for (float v = -12.f; v <= 12.f; v += 0.37f) {
    x.push_back(v);
    ref.push_back(0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v))));
  }
  k::GeluTanh(x.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(x[i] == Approx(ref[i]).epsilon(1e-5).margin(1e-6));
  std::vector<float> gu = {-30.f, -1.f, 0.f, 2.f, 50.f, 0.5f, 2.f, 3.f, -1.f, 1.f}, out(5);
  k::SiluMul(gu.data(), 1, 5, out.data());
  for (int i = 0; i < 5; ++i) {
    const double g = gu[i], u = gu[5 + i];
    REQUIRE(out[i] == Approx(g / (1 + std::exp(-g)) * u).epsilon(1e-5).margin(1e-6));
  }
  // Rows long enough for the 8-lane path, with a tail, over the range that matters.
  const int64_t dim = 37, rows = 3;
  std::vector<float> gu2(2 * dim * rows), out2(dim * rows);
  for (size_t i = 0; i < gu2.size(); ++i) gu2[i] = std::sin(0.7f * i) * 25.f;
  k::SiluMul(gu2.data(), rows, dim, out2.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) {
      const double g = gu2[r * 2 * dim + i], u = gu2[r * 2 * dim + dim + i];
      REQUIRE(out2[r * dim + i] == Approx(g / (1 + std::exp(-g)) * u).epsilon(1e-5).margin(1e-5));
    }
}

// The shapes real models use (block size 16, head_dim 64 and 128, grouped-query attention), where
// the vectorized path runs, with an f32 and an f16 cache: every output equals a dense
// double-precision reference over the K/V the cache holds (f16-rounded for the f16 cache).
namespace {

struct SeqSpec {
  int32_t past, n_new;
};

// Runs PagedAttention over sequences `spec` (blocks scattered through the pool) and returns the
// largest |difference| from dense causal attention in double precision over what the cache holds.
double WorstVsDense(k::KvDtype dtype, int32_t d, int32_t n_heads, int32_t n_kv,
                    const std::vector<SeqSpec>& spec) {
  const int32_t bs = 16, group = n_heads / n_kv, n_seqs = static_cast<int32_t>(spec.size());
  std::vector<std::vector<int32_t>> tables(n_seqs);
  int32_t n_blocks = 0;
  for (int s = 0; s < n_seqs; ++s) {
    const int32_t nb = (spec[s].past + spec[s].n_new + bs - 1) / bs;
    for (int32_t b = 0; b < nb; ++b) tables[s].push_back(n_blocks++);
  }
  std::vector<int32_t> perm(n_blocks);
  int32_t step = 37;  // coprime with n_blocks
  while (std::gcd(step, n_blocks) != 1) ++step;
  for (int32_t i = 0; i < n_blocks; ++i) perm[i] = (i * step + 11) % n_blocks;
  for (auto& t : tables)
    for (auto& b : t) b = perm[b];
  const int64_t elems = static_cast<int64_t>(n_blocks) * 2 * n_kv * bs * d;
  std::vector<float> pool(elems);  // f32 storage is large enough for every dtype
  k::PagedKvLayout kv;
  kv.base = pool.data();
  kv.dtype = dtype;
  kv.block_stride = k::KvLayerBlockElements(dtype, n_kv, bs, d);
  kv.layer_offset = 0;
  kv.block_size = bs;
  kv.n_kv_heads = n_kv;
  kv.head_dim = d;
  std::vector<std::vector<float>> K(n_seqs), V(n_seqs);  // [pos][kv_head][d], as the cache holds
  std::vector<float> Q;                                  // [row][head][d]
  std::vector<k::AttentionSeq> seqs;
  int32_t row = 0;
  double worst_held = 0;  // int8: |held - stored| / (max |row| / 254), at most 1
  int64_t not_held = 0;   // f32, f16: elements that read back other than stored (rounded)
  for (int s = 0; s < n_seqs; ++s) {
    const int32_t T = spec[s].past + spec[s].n_new;
    K[s].resize(static_cast<size_t>(T) * n_kv * d);
    V[s].resize(K[s].size());
    for (size_t i = 0; i < K[s].size(); ++i) {
      // Scores grow with position in some heads, so the running max moves late in the context.
      K[s][i] = std::sin(0.37f * i + s) * (1.f + 2.f * static_cast<float>(i) / K[s].size());
      V[s][i] = std::cos(0.53f * i - s);
    }
    std::vector<float> back(d);
    for (int32_t p = 0; p < T; ++p)
      for (int32_t h = 0; h < n_kv; ++h) {
        const int32_t block = tables[s][p / bs], slot = p % bs;
        float* kr = &K[s][(static_cast<size_t>(p) * n_kv + h) * d];
        float* vr = &V[s][(static_cast<size_t>(p) * n_kv + h) * d];
        kv.StoreK(block, h, slot, kr);
        kv.StoreV(block, h, slot, vr);
        // Read back what the cache holds: f32 exactly, f16 rounded, int8 within half a step.
        for (auto [x, load] :
             {std::pair{kr, &k::PagedKvLayout::LoadK}, std::pair{vr, &k::PagedKvLayout::LoadV}}) {
          (kv.*load)(block, h, slot, back.data());
          float amax = 0;
          for (int32_t t = 0; t < d; ++t) amax = std::max(amax, std::fabs(x[t]));
          for (int32_t t = 0; t < d; ++t) {
            if (dtype == k::KvDtype::kI8) {
              worst_held = std::max(worst_held, std::fabs(back[t] - x[t]) / (amax / 254.0));
            } else {
              const float held =
                  dtype == k::KvDtype::kF32 ? x[t] : duet::F16ToF32(duet::F32ToF16Sat(x[t]));
              not_held += back[t] != held;
            }
            x[t] = back[t];
          }
        }
      }
    for (int32_t j = 0; j < spec[s].n_new * n_heads * d; ++j)
      Q.push_back(std::sin(0.71f * static_cast<float>(Q.size()) + 0.2f));
    seqs.push_back({tables[s].data(), spec[s].past, spec[s].n_new, row});
    row += spec[s].n_new;
  }
  CHECK(worst_held <= 1.0 + 1e-3);
  CHECK(not_held == 0);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t stride = int64_t{n_heads} * d;
  std::vector<float> out(static_cast<size_t>(row) * stride, -1.f);
  k::PagedAttention(Q.data(), stride, kv, seqs.data(), n_seqs, n_heads, scale, out.data(), stride);
  double worst = 0;
  for (int s = 0; s < n_seqs; ++s)
    for (int32_t r = 0; r < spec[s].n_new; ++r) {
      const int32_t pos = spec[s].past + r;
      const int64_t qrow = seqs[s].row_begin + r;
      for (int32_t h = 0; h < n_heads; ++h) {
        const int32_t g = h / group;
        std::vector<double> sc(pos + 1);
        double mx = -1e300, sum = 0;
        for (int32_t j = 0; j <= pos; ++j) {
          double dot = 0;
          for (int32_t t = 0; t < d; ++t)
            dot += double{Q[qrow * stride + h * d + t]} *
                   K[s][(static_cast<size_t>(j) * n_kv + g) * d + t];
          sc[j] = dot * scale;
          mx = std::max(mx, sc[j]);
        }
        for (auto& v : sc) sum += (v = std::exp(v - mx));
        for (int32_t t = 0; t < d; ++t) {
          double o = 0;
          for (int32_t j = 0; j <= pos; ++j)
            o += sc[j] / sum * V[s][(static_cast<size_t>(j) * n_kv + g) * d + t];
          worst = std::max(worst, std::fabs(o - out[qrow * stride + h * d + t]));
        }
      }
    }
  return worst;
}

const char* Name(k::KvDtype t) {
  return t == k::KvDtype::kF32 ? "f32" : t == k::KvDtype::kF16 ? "f16" : "int8";
}

}  // namespace

TEST_CASE("PagedAttention at real shapes equals dense causal attention", "[attention]") {
  // Sequence 0 prefills 37 rows from scratch; sequence 1 has 50 past positions and decodes 1;
  // sequence 2 has 16 past and prefills 9; sequence 3 has 530 past (past attention's
  // 256-position chunks) and prefills 3.
  const std::vector<SeqSpec> spec = {{0, 37}, {50, 1}, {16, 9}, {530, 3}};
  for (const auto dtype : {k::KvDtype::kF32, k::KvDtype::kF16, k::KvDtype::kI8}) {
    for (const auto& [d, n_heads, n_kv] : {std::tuple{64, 12, 12}, std::tuple{64, 8, 2},
                                           std::tuple{128, 4, 1}, std::tuple{32, 2, 2}}) {
      INFO("cache " << Name(dtype) << ", head_dim " << d << ", " << n_heads << " heads, " << n_kv
                    << " kv heads");
      CHECK(WorstVsDense(dtype, d, n_heads, n_kv, spec) < 2e-5);
    }
  }
}

// A decode step (one new row per sequence) has its own path for 1, 2, 4 or 8 query heads per kv
// head: one pass over each block in memory order, and a long context split across threads with
// the partial softmaxes merged. Head dims 48, 80 and 96 leave column tails of 16, 32 or 48 past
// the path's 64- or 32-column passes; 3 heads per kv head take the general path.
TEST_CASE("PagedAttention of a decode step equals dense causal attention", "[attention]") {
  const std::vector<std::vector<SeqSpec>> batches = {
      {{0, 1}},                                                // a first token
      {{1000, 1}},                                             // one long context: split
      {{15, 1}, {16, 1}, {4, 1}, {31, 1}, {700, 1}, {63, 1}},  // block edges, mixed lengths
      {{300, 1}, {129, 1}},
  };
  for (const auto dtype : {k::KvDtype::kF32, k::KvDtype::kF16, k::KvDtype::kI8}) {
    for (const auto& [d, n_heads, n_kv] :
         {std::tuple{64, 12, 12}, std::tuple{32, 4, 2}, std::tuple{128, 4, 4}, std::tuple{80, 6, 3},
          std::tuple{64, 8, 2}, std::tuple{64, 32, 4}, std::tuple{80, 16, 2}, std::tuple{48, 8, 2},
          std::tuple{80, 8, 2}, std::tuple{48, 16, 2}, std::tuple{48, 4, 4}, std::tuple{96, 4, 2},
          std::tuple{16, 16, 2}, std::tuple{64, 6, 2}}) {
      for (size_t b = 0; b < batches.size(); ++b) {
        INFO("cache " << Name(dtype) << ", head_dim " << d << ", " << n_heads << " heads, " << n_kv
                      << " kv heads, batch " << b);
        CHECK(WorstVsDense(dtype, d, n_heads, n_kv, batches[b]) < 2e-5);
      }
    }
  }
}

// The f16 cache: round to nearest, saturate at +-65504 instead of overflowing, keep NaN.
TEST_CASE("The f16 K/V cache rounds, saturates and keeps NaN", "[attention]") {
  std::vector<uint16_t> block(2 * 16 * 4);
  k::PagedKvLayout kv;
  kv.base = block.data();
  kv.dtype = k::KvDtype::kF16;
  kv.block_stride = static_cast<int64_t>(block.size());
  kv.block_size = 16;
  kv.n_kv_heads = 1;
  kv.head_dim = 4;
  const float in[4] = {1.0f + 1.0f / 4096, 1e6f, -70000.f, std::nanf("")};
  float out[4];
  kv.StoreV(0, 0, 3, in);
  kv.LoadV(0, 0, 3, out);
  CHECK(out[0] == 1.0f);  // 1 + 2^-12 is a tie between 1 and 1 + 2^-10: even wins
  CHECK(out[1] == 65504.f);
  CHECK(out[2] == -65504.f);
  CHECK(std::isnan(out[3]));
  kv.StoreK(0, 0, 7, in);
  kv.LoadK(0, 0, 7, out);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == 65504.f);
  CHECK(out[2] == -65504.f);
  CHECK(std::isnan(out[3]));
  const float third = 1.f / 3, thirds[4] = {third, third, third, third};
  kv.StoreV(0, 0, 0, thirds);
  kv.LoadV(0, 0, 0, out);
  CHECK(std::fabs(out[0] - third) <= third * std::ldexp(1.0, -11));
}

// The int8 cache: one scale per position and kv head (max |x| / 127), for K (stored transposed)
// and V alike; an all-zero vector reads back as zeros, the largest element exactly.
TEST_CASE("The int8 K/V cache quantizes each vector with its own scale", "[attention]") {
  const int32_t d = 32, bs = 16, n_kv = 2;
  std::vector<float> pool(k::KvLayerBlockElements(k::KvDtype::kI8, n_kv, bs, d));  // >= needed
  k::PagedKvLayout kv;
  kv.base = pool.data();
  kv.dtype = k::KvDtype::kI8;
  kv.block_stride = k::KvLayerBlockElements(k::KvDtype::kI8, n_kv, bs, d);
  kv.block_size = bs;
  kv.n_kv_heads = n_kv;
  kv.head_dim = d;
  std::vector<float> x(d), zeros(d, 0.f), out(d);
  for (int32_t t = 0; t < d; ++t) x[t] = 0.01f * (t - 11) * (t % 3 == 0 ? -1.f : 1.f);
  x[5] = -3.5f;  // the largest magnitude
  for (auto [store, load] : {std::pair{&k::PagedKvLayout::StoreK, &k::PagedKvLayout::LoadK},
                             std::pair{&k::PagedKvLayout::StoreV, &k::PagedKvLayout::LoadV}}) {
    (kv.*store)(0, 1, 9, x.data());
    (kv.*store)(0, 0, 9, zeros.data());  // a neighbour in the same block: its own scale
    (kv.*load)(0, 1, 9, out.data());
    CHECK(out[5] == -3.5f);
    for (int32_t t = 0; t < d; ++t) CHECK(std::fabs(out[t] - x[t]) <= 3.5f / 254 * 1.0001f);
    (kv.*load)(0, 0, 9, out.data());
    for (int32_t t = 0; t < d; ++t) CHECK(out[t] == 0.f);
  }
  CHECK(kv.KScales(0, 1)[9] == 3.5f / 127);
  CHECK(kv.VScales(0, 1)[9] == 3.5f / 127);
  CHECK(kv.KScales(0, 0)[9] == 0.f);
  x[7] = std::nanf("");
  kv.StoreV(0, 1, 2, x.data());
  kv.LoadV(0, 1, 2, out.data());
  CHECK(std::isnan(out[0]));  // not representable: the vector reads back as NaN
}

TEST_CASE("StoreKRows and LoadKRows do what StoreK and LoadK do row by row, in every cache type",
          "[attention]") {
  // Two layouts over separate pools, filled with the same rows: one row by row with StoreK,
  // one with StoreKRows over runs that start mid-block, end mid-block and fill whole blocks.
  // Head sizes 64 (the int8 cache's vector path) and 24 (not a multiple of 16: the row path).
  const int32_t d = GENERATE(64, 24);
  const auto dtype = GENERATE(k::KvDtype::kI8, k::KvDtype::kF16, k::KvDtype::kF32);
  const int32_t bs = 16, n_kv = 3, n_blocks = 3;
  const int64_t stride = k::KvLayerBlockElements(dtype, n_kv, bs, d);
  const size_t bytes = static_cast<size_t>(stride * n_blocks) * k::KvDtypeSize(dtype);
  std::vector<uint8_t> pool_a(bytes, 0xA5), pool_b(bytes, 0xA5);
  auto layout = [&](std::vector<uint8_t>& pool) {
    k::PagedKvLayout kv;
    kv.base = pool.data();
    kv.dtype = dtype;
    kv.block_stride = stride;
    kv.block_size = bs;
    kv.n_kv_heads = n_kv;
    kv.head_dim = d;
    return kv;
  };
  const k::PagedKvLayout a = layout(pool_a), b = layout(pool_b);
  std::mt19937 gen(5);
  std::normal_distribution<float> nd(0.f, 2.f);
  const int32_t n_rows = 40;  // slots 3..42 of blocks 2, 0, 1 (a scattered block table)
  const int32_t table[3] = {2, 0, 1};
  std::vector<float> rows(static_cast<size_t>(n_rows) * d);
  for (auto& v : rows) v = nd(gen);
  for (int32_t t = 0; t < d; ++t) rows[5 * d + t] = 0.f;  // an all-zero row
  rows[9 * d + 3] = std::nanf("");                        // a row holding NaN
  rows[11 * d + 1] = 1e30f;                               // and one far beyond the rest
  for (int32_t h = 0; h < n_kv; ++h) {
    for (int32_t r = 0; r < n_rows; ++r) {
      const int32_t pos = 3 + r;
      a.StoreK(table[pos / bs], h, pos % bs, rows.data() + static_cast<int64_t>(r) * d);
    }
    for (int32_t r = 0; r < n_rows;) {
      const int32_t pos = 3 + r, slot = pos % bs, m = std::min(bs - slot, n_rows - r);
      if (r % 2 == 0) {
        b.StoreKRows(table[pos / bs], h, slot, m, rows.data() + static_cast<int64_t>(r) * d);
      } else {  // the same rows d + 5 floats apart (x_stride)
        std::vector<float> spaced(static_cast<size_t>(m) * (d + 5), NAN);
        for (int32_t j = 0; j < m; ++j)
          std::copy_n(rows.data() + static_cast<int64_t>(r + j) * d, d,
                      spaced.data() + static_cast<int64_t>(j) * (d + 5));
        b.StoreKRows(table[pos / bs], h, slot, m, spaced.data(), d + 5);
      }
      r += m;
    }
  }
  INFO("head_dim " << d << " dtype " << static_cast<int>(dtype));
  REQUIRE(pool_a == pool_b);
  // And LoadKRows reads back what LoadK reads, over the same runs (NaN where LoadK gives NaN).
  for (int32_t h = 0; h < n_kv; ++h) {
    for (int32_t r = 0; r < n_rows;) {
      const int32_t pos = 3 + r, slot = pos % bs, m = std::min(bs - slot, n_rows - r);
      std::vector<float> got(static_cast<size_t>(m) * d), want(d);
      b.LoadKRows(table[pos / bs], h, slot, m, got.data());
      for (int32_t j = 0; j < m; ++j) {
        a.LoadK(table[pos / bs], h, slot + j, want.data());
        for (int32_t t = 0; t < d; ++t) {
          const float g = got[static_cast<size_t>(j) * d + t];
          REQUIRE((g == want[t] || (std::isnan(g) && std::isnan(want[t]))));
        }
      }
      r += m;
    }
  }
}
