#include "duet/kernels/attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "duet/tensor/dtype.h"
#include "fast_math.h"

namespace duet::kernels {

// ---- PagedKvLayout: one position's K or V in any element type ----

namespace {

// What StoreKRows / LoadKRows need for their int8 path (byte masks on 16-byte vectors).
bool HasAvx512BwVl() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// max |x| over n (a multiple of 16) floats, NaN if any is NaN.
__attribute__((target("avx512f"))) float AbsMax16(const float* x, int32_t n) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int32_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  return nan != 0 ? std::nanf("") : _mm512_reduce_max_ps(m);
}
// q[i] = x[i] * inv rounded to nearest even (the default rounding mode), clamped to +-127.
__attribute__((target("avx512f"))) void Quantize16(const float* x, int32_t n, float inv,
                                                   int8_t* q) {
  const __m512 vi = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int32_t i = 0; i < n; i += 16) {
    const __m512 r =
        _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
  }
}

// Transposes 16 rows of 16 floats: out[c] holds column c of r (row j in lane j).
__attribute__((target("avx512f"))) inline void Transpose16x16(const __m512 (&r)[16],
                                                              __m512 (&out)[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  // u[4g + q], 128-bit lane L: column 4L + q of rows 4g..4g+3.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xDD);
    out[q] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    out[8 + q] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    out[4 + q] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    out[12 + q] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// StoreKRows for an int8 cache with 16-slot blocks and head_dim a multiple of 16: each row's
// scale as QuantizeKvI8 computes it, then 16 dims at a time transposed in registers, so that
// each K row of the block (one dim, 16 slots) is quantized and stored as one 16-byte vector.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void StoreKRowsI8(const float* x, int64_t ld,
                                                                       int32_t m, int32_t d,
                                                                       int8_t* kt, float* scales) {
  alignas(64) float inv[16] = {};
  for (int32_t j = 0; j < m; ++j) {
    const float scale = AbsMax16(x + j * ld, d) / 127.f;
    scales[j] = scale;
    inv[j] = scale > 0.f && std::isfinite(scale) ? 1.f / scale : 0.f;
  }
  const __m512 vinv = _mm512_load_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __mmask16 rows = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
  for (int32_t i0 = 0; i0 < d; i0 += 16) {
    __m512 r[16], c[16];
    for (int32_t j = 0; j < 16; ++j)
      r[j] = j < m ? _mm512_loadu_ps(x + j * ld + i0) : _mm512_setzero_ps();
    Transpose16x16(r, c);
    for (int32_t i = 0; i < 16; ++i) {
      const __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(c[i], vinv), lo), hi);
      _mm_mask_storeu_epi8(kt + static_cast<int64_t>(i0 + i) * 16, rows,
                           _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
    }
  }
}

// LoadKRows for the same cache: each K row (one dim, 16 slots) widened and scaled per slot,
// then 16 dims at a time transposed back into the m rows.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void LoadKRowsI8(const int8_t* kt,
                                                                      const float* scales,
                                                                      int32_t m, int32_t d,
                                                                      float* x) {
  const __mmask16 rows = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
  const __m512 sc = _mm512_maskz_loadu_ps(rows, scales);
  for (int32_t i0 = 0; i0 < d; i0 += 16) {
    __m512 c[16], r[16];
    for (int32_t i = 0; i < 16; ++i) {
      const __m128i q = _mm_maskz_loadu_epi8(rows, kt + static_cast<int64_t>(i0 + i) * 16);
      c[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), sc);
    }
    Transpose16x16(c, r);
    for (int32_t j = 0; j < m; ++j) _mm512_storeu_ps(x + static_cast<int64_t>(j) * d + i0, r[j]);
  }
}
#pragma GCC diagnostic pop

}  // namespace

void PagedKvLayout::LoadKRows(int32_t block, int32_t kv_head, int32_t slot, int32_t m,
                              float* x) const {
  if (dtype == KvDtype::kI8 && HasAvx512BwVl() && block_size == 16 && head_dim % 16 == 0) {
    LoadKRowsI8(KT<int8_t>(block, kv_head) + slot, KScales(block, kv_head) + slot, m, head_dim, x);
    return;
  }
  for (int32_t j = 0; j < m; ++j)
    LoadK(block, kv_head, slot + j, x + static_cast<int64_t>(j) * head_dim);
}

void PagedKvLayout::StoreKRows(int32_t block, int32_t kv_head, int32_t slot, int32_t m,
                               const float* x, int64_t x_stride) const {
  const int64_t ld = x_stride > 0 ? x_stride : head_dim;
  if (dtype == KvDtype::kI8 && HasAvx512BwVl() && block_size == 16 && head_dim % 16 == 0) {
    StoreKRowsI8(x, ld, m, head_dim, KT<int8_t>(block, kv_head) + slot,
                 KScales(block, kv_head) + slot);
    return;
  }
  for (int32_t j = 0; j < m; ++j) StoreK(block, kv_head, slot + j, x + j * ld);
}

// int8: scale = max|x| / 127 (0 for an all-zero vector), q = x / scale rounded to nearest even.
// A vector holding inf or NaN gets a non-finite scale and reads back as NaN.
float QuantizeKvI8(const float* x, int32_t n, int64_t stride, int8_t* q) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && n % 16 == 0 && n <= 512) {
    const float amax = AbsMax16(x, n);
    const float scale = amax / 127.f;
    const float inv = scale > 0.f && std::isfinite(scale) ? 1.f / scale : 0.f;
    int8_t tmp[512];
    Quantize16(x, n, inv, stride == 1 ? q : tmp);
    if (stride != 1)
      for (int32_t i = 0; i < n; ++i) q[static_cast<int64_t>(i) * stride] = tmp[i];
    return scale;
  }
  float amax = 0.f;
  for (int32_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  for (int32_t i = 0; i < n && !std::isnan(amax); ++i)
    if (std::isnan(x[i])) amax = x[i];
  const float scale = amax / 127.f;
  const float inv = scale > 0.f && std::isfinite(scale) ? 1.f / scale : 0.f;
  for (int32_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i] * inv);
    q[static_cast<int64_t>(i) * stride] =
        static_cast<int8_t>(std::isnan(r) ? 0.f : std::clamp(r, -127.f, 127.f));
  }
  return scale;
}

void PagedKvLayout::StoreK(int32_t block, int32_t kv_head, int32_t slot, const float* k) const {
  const int64_t o = k_offset(block, kv_head) + slot;
  if (dtype == KvDtype::kI8) {
    KScales(block, kv_head)[slot] =
        QuantizeKvI8(k, head_dim, block_size, static_cast<int8_t*>(base) + o);
  } else if (dtype == KvDtype::kF32) {
    float* kt = static_cast<float*>(base) + o;
    for (int32_t t = 0; t < head_dim; ++t) kt[static_cast<int64_t>(t) * block_size] = k[t];
  } else {
    uint16_t* kt = static_cast<uint16_t*>(base) + o;
    for (int32_t t = 0; t < head_dim; ++t)
      kt[static_cast<int64_t>(t) * block_size] = F32ToF16Sat(k[t]);
  }
}

void PagedKvLayout::LoadK(int32_t block, int32_t kv_head, int32_t slot, float* k) const {
  const int64_t o = k_offset(block, kv_head) + slot;
  if (dtype == KvDtype::kI8) {
    const int8_t* kt = static_cast<const int8_t*>(base) + o;
    const float scale = KScales(block, kv_head)[slot];
    for (int32_t t = 0; t < head_dim; ++t)
      k[t] = static_cast<float>(kt[static_cast<int64_t>(t) * block_size]) * scale;
  } else if (dtype == KvDtype::kF32) {
    const float* kt = static_cast<const float*>(base) + o;
    for (int32_t t = 0; t < head_dim; ++t) k[t] = kt[static_cast<int64_t>(t) * block_size];
  } else {
    const uint16_t* kt = static_cast<const uint16_t*>(base) + o;
    for (int32_t t = 0; t < head_dim; ++t)
      k[t] = F16ToF32(kt[static_cast<int64_t>(t) * block_size]);
  }
}

void PagedKvLayout::StoreV(int32_t block, int32_t kv_head, int32_t slot, const float* v) const {
  if (dtype == KvDtype::kI8) {
    VScales(block, kv_head)[slot] = QuantizeKvI8(v, head_dim, 1, V<int8_t>(block, kv_head, slot));
  } else if (dtype == KvDtype::kF32) {
    std::memcpy(V<float>(block, kv_head, slot), v, head_dim * sizeof(float));
  } else {
    ConvertF32ToF16Sat(v, V<uint16_t>(block, kv_head, slot), head_dim);
  }
}

void PagedKvLayout::PrefetchSlot(int32_t block, int32_t slot) const {
  const auto* base_bytes = static_cast<const char*>(base);
  const int64_t es = static_cast<int64_t>(KvDtypeSize(dtype));
  const int64_t row_bytes = static_cast<int64_t>(block_size) * es;  // one K row of a head
  for (int32_t h = 0; h < n_kv_heads; ++h) {
    const char* k = base_bytes + (k_offset(block, h) + slot) * es;
    // One prefetch per line: rows are row_bytes apart; a line holds 64 / row_bytes rows when
    // rows are shorter than a line.
    const int64_t step = std::max<int64_t>(row_bytes, 64);
    for (int64_t at = 0; at < head_dim * row_bytes; at += step) _mm_prefetch(k + at, _MM_HINT_T0);
    const char* v = base_bytes + v_offset(block, h, slot) * es;
    for (int64_t at = 0; at < head_dim * es; at += 64) _mm_prefetch(v + at, _MM_HINT_T0);
  }
  if (dtype == KvDtype::kI8) {
    for (int32_t h = 0; h < n_kv_heads; ++h) {
      _mm_prefetch(reinterpret_cast<const char*>(KScales(block, h) + slot), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(VScales(block, h) + slot), _MM_HINT_T0);
    }
  }
}

void PagedKvLayout::LoadV(int32_t block, int32_t kv_head, int32_t slot, float* v) const {
  if (dtype == KvDtype::kI8) {
    const int8_t* q = V<int8_t>(block, kv_head, slot);
    const float scale = VScales(block, kv_head)[slot];
    for (int32_t t = 0; t < head_dim; ++t) v[t] = static_cast<float>(q[t]) * scale;
  } else if (dtype == KvDtype::kF32) {
    std::memcpy(v, V<float>(block, kv_head, slot), head_dim * sizeof(float));
  } else {
    ConvertF16ToF32(V<uint16_t>(block, kv_head, slot), v, head_dim);
  }
}

namespace {

// Attention runs in three passes over chunks of the context (kChunkBlocks blocks at a time):
// (1) the scores of every query of a work item against every slot of the chunk, (2) one softmax
// update per query over the whole chunk (running max and sum carried from chunk to chunk, as in
// flash attention, but once per chunk instead of once per block), (3) the probabilities times V.
// A chunk's scores stay in a per-thread buffer of queries x chunk slots.
// 16 blocks of a GPT-2-sized work item (12 heads of 64, f16) are 768 KiB of K and V: pass (3)
// finds the V rows that pass (1)'s stream brought in still in L2.
constexpr int32_t kChunkBlocks = 16;

// A unit of work: one sequence, a run of kv heads, a tile of consecutive new rows. All query
// heads of a kv head's group and all rows of the tile share each K/V block while it is in L1.
struct WorkItem {
  int32_t seq;
  int32_t kv_head0, kv_head1;  // kv heads [kv_head0, kv_head1)
  int32_t row0, row1;          // new rows [row0, row1) of the sequence
};

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Whether the decode path prefetches an f16 or f32 cache too (an int8 cache always does; see
// DecodeRange): measured faster on the Intel Xeon machines here, slower on the AMD EPYC ones
// (there with the earlier prefetch, in bursts into L1; the spread L2 prefetch is unmeasured on
// them, so they keep the hardware prefetchers alone).
bool PrefetchWideKv() {
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
}

inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t x) { return F16ToF32(x); }
inline float ToF32(int8_t x) { return static_cast<float>(x); }  // times its scale, by the caller

// GCC 12 reports the deliberately undefined vectors inside its own AVX-512 intrinsics
// (_mm512_undefined_ps, used by set1/reduce) as "used uninitialized" once they are inlined into
// a target("avx512f") function; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16 cache elements as f32 lanes (f32, or IEEE half: one conversion instruction).
__attribute__((target("avx512f"))) inline __m512 Load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"))) inline __m512 Load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f"))) inline __m512 Load16(const int8_t* p) {  // unscaled
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Asks for [p, p + bytes) in L2 a few lines at a time, over `steps` calls of Step() (the decode
// path spreads its prefetch of the next block through its loops: see DecodeRange); Finish()
// asks for what the steps left. A null p asks for nothing.
class SpreadL2Prefetch {
 public:
  SpreadL2Prefetch(const char* p, int64_t bytes, int32_t steps)
      : p_(p), bytes_(p != nullptr ? bytes : 0), per_step_((bytes_ / 64 + steps - 1) / steps) {}
  void Step() {
    for (int64_t z = 0; z < per_step_ && at_ < bytes_; ++z, at_ += 64)
      _mm_prefetch(p_ + at_, _MM_HINT_T2);
  }
  void Finish() {
    for (; at_ < bytes_; at_ += 64) _mm_prefetch(p_ + at_, _MM_HINT_T2);
  }

 private:
  const char* p_;
  int64_t bytes_, per_step_, at_ = 0;
};

// Scores of NQ queries (q: [NQ][d], already scaled) against one block of 16 slots (kt: K
// transposed [d][16]): s[i] = q_i . k_j for the 16 slots j, unscaled by any int8 K scale. Each K
// row is loaded once for all NQ queries; C independent chains per query keep eight FMAs in
// flight. With `pf`, also prefetches [pf, pf + pf_bytes) into L2, a few lines per step of the
// loop (see DecodeRange).
template <typename T, int NQ>
__attribute__((target("avx512f"))) inline void ScoresRegs(const T* kt, const float* q, int32_t d,
                                                          __m512 (&s)[NQ], const char* pf = nullptr,
                                                          int64_t pf_bytes = 0) {
  constexpr int C = NQ >= 8 ? 1 : 8 / NQ;
  __m512 a[NQ][C];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) a[i][c] = _mm512_setzero_ps();
  SpreadL2Prefetch ahead(pf, pf_bytes, (d + C - 1) / C);
  for (int32_t t = 0; t < d; t += C) {
    ahead.Step();
    for (int c = 0; c < C; ++c) {
      const __m512 k = Load16(kt + static_cast<int64_t>(t + c) * 16);
      for (int i = 0; i < NQ; ++i)
        a[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * d + t + c]), k, a[i][c]);
    }
  }
  for (int i = 0; i < NQ; ++i) {
    s[i] = a[i][0];
    for (int c = 1; c < C; ++c) s[i] = _mm512_add_ps(s[i], a[i][c]);
  }
}

// The same, stored: s[i * ld + j].
template <typename T, int NQ>
__attribute__((target("avx512f"))) void ScoresBlock(const T* kt, const float* q, int32_t d,
                                                    float* s, int64_t ld) {
  __m512 sv[NQ];
  ScoresRegs<T, NQ>(kt, q, d, sv);
  for (int i = 0; i < NQ; ++i) _mm512_storeu_ps(s + i * ld, sv[i]);
}

template <typename T>
void ScoresBlockAll(const T* kt, const float* q, int32_t nq, int32_t d, float* s, int64_t ld) {
  int32_t i = 0;
  for (; i + 8 <= nq; i += 8) ScoresBlock<T, 8>(kt, q + i * d, d, s + i * ld, ld);
  if (i + 4 <= nq) ScoresBlock<T, 4>(kt, q + i * d, d, s + i * ld, ld), i += 4;
  if (i + 2 <= nq) ScoresBlock<T, 2>(kt, q + i * d, d, s + i * ld, ld), i += 2;
  if (i < nq) ScoresBlock<T, 1>(kt, q + i * d, d, s + i * ld, ld);
}

// acc_i[t0, t0 + 16W) += sum_{j < n} p_i[j] v_j[t0, t0 + 16W) for NQ queries over one block's V
// rows (vb: [16][d]). Two chains (even and odd j) per accumulator.
template <typename T, int NQ, int W>
__attribute__((target("avx512f"))) void AccumulateSlab(const T* vb, const float* const* p,
                                                       int32_t n, int32_t d, int32_t t0,
                                                       float* const* acc) {
  __m512 a[NQ][W], b[NQ][W];
  for (int i = 0; i < NQ; ++i)
    for (int w = 0; w < W; ++w) {
      a[i][w] = _mm512_loadu_ps(acc[i] + t0 + 16 * w);
      b[i][w] = _mm512_setzero_ps();
    }
  int32_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const T* v0 = vb + static_cast<int64_t>(j) * d + t0;
    const T* v1 = v0 + d;
    for (int w = 0; w < W; ++w) {
      const __m512 x0 = Load16(v0 + 16 * w), x1 = Load16(v1 + 16 * w);
      for (int i = 0; i < NQ; ++i) {
        a[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), x0, a[i][w]);
        b[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j + 1]), x1, b[i][w]);
      }
    }
  }
  if (j < n) {
    const T* v0 = vb + static_cast<int64_t>(j) * d + t0;
    for (int w = 0; w < W; ++w) {
      const __m512 x0 = Load16(v0 + 16 * w);
      for (int i = 0; i < NQ; ++i) a[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), x0, a[i][w]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int w = 0; w < W; ++w)
      _mm512_storeu_ps(acc[i] + t0 + 16 * w, _mm512_add_ps(a[i][w], b[i][w]));
}

template <typename T, int NQ>
void AccumulateV(const T* vb, const float* const* p, int32_t n, int32_t d, float* const* acc) {
  int32_t t = 0;
  for (; t + 32 <= d; t += 32) AccumulateSlab<T, NQ, 2>(vb, p, n, d, t, acc);
  if (t < d) AccumulateSlab<T, NQ, 1>(vb, p, n, d, t, acc);
}

// Softmax update of one query over `len` scores of a chunk (s, in place: scores in,
// probabilities out; zero past n_valid): running max m and sum l, accumulator rescaled.
__attribute__((target("avx512f"))) void SoftmaxChunkWide(float* s, int32_t n_valid, int32_t len,
                                                         float* m, float* l, float* acc,
                                                         int32_t d) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int32_t j = 0; j < n_valid; j += 16) {
    const int32_t r = std::min(16, n_valid - j);
    const __mmask16 k = static_cast<__mmask16>((1u << r) - 1u);
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, s + j));
  }
  const float mb = std::max(*m, _mm512_reduce_max_ps(vmax));
  const __m512 vm = _mm512_set1_ps(mb);
  __m512 vsum = _mm512_setzero_ps();
  for (int32_t j = 0; j < len; j += 16) {
    const int32_t r = std::clamp(n_valid - j, 0, 16);
    const __mmask16 k = static_cast<__mmask16>((1u << r) - 1u);
    const __m512 p = _mm512_maskz_mov_ps(k, FastExp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm)));
    vsum = _mm512_add_ps(vsum, p);
    _mm512_storeu_ps(s + j, p);
  }
  const float alpha = FastExp(*m - mb);
  *l = *l * alpha + _mm512_reduce_add_ps(vsum);
  *m = mb;
  const __m512 al = _mm512_set1_ps(alpha);
  for (int32_t t = 0; t < d; t += 16)
    _mm512_storeu_ps(acc + t, _mm512_mul_ps(_mm512_loadu_ps(acc + t), al));
}

#pragma GCC diagnostic pop

void SoftmaxChunkScalar(float* s, int32_t n_valid, int32_t len, float* m, float* l, float* acc,
                        int32_t d) {
  float mb = *m;
  for (int32_t j = 0; j < n_valid; ++j) mb = std::max(mb, s[j]);
  float sum = 0.f;
  for (int32_t j = 0; j < n_valid; ++j) {
    s[j] = FastExp(s[j] - mb);
    sum += s[j];
  }
  for (int32_t j = n_valid; j < len; ++j) s[j] = 0.f;
  const float alpha = FastExp(*m - mb);
  *l = *l * alpha + sum;
  *m = mb;
  for (int32_t t = 0; t < d; ++t) acc[t] *= alpha;
}

// Asks for [p, p + bytes) in L1 ahead of use. The hardware prefetchers stop at 4 KiB pages and
// a block's K (or V) of one kv head is only 1-4 KiB, so without this every block starts with
// DRAM latency (measured: most of attention's time stalled on the first K row of a block).
// PrefetchL2 asks for them in L2 only (the decode path: see DecodeRange).
template <_mm_hint kHint>
inline void PrefetchLines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, kHint);
}
inline void Prefetch(const void* p, int64_t bytes) { PrefetchLines<_MM_HINT_T0>(p, bytes); }
inline void PrefetchL2(const void* p, int64_t bytes) { PrefetchLines<_MM_HINT_T2>(p, bytes); }

// Per-thread scratch, kept across calls (OpenMP's threads persist): no allocation per layer.
struct Scratch {
  std::vector<float> q;      // [nq][d] scaled queries of the work item
  std::vector<float> s;      // [nq][slots] scores, then probabilities
  std::vector<float> m, l;   // [nq] running max and sum
  std::vector<float> acc;    // [nq][d]
  std::vector<int32_t> pos;  // [nq] position of each query's row

  // Room for nq queries of head_dim d with `slots` scores each (grows, never shrinks).
  void Reserve(size_t nq, size_t d, size_t slots) {
    if (m.size() < nq) {
      m.resize(nq);
      l.resize(nq);
      pos.resize(nq);
    }
    if (q.size() < nq * d) q.resize(nq * d);
    if (acc.size() < nq * d) acc.resize(nq * d);
    if (s.size() < nq * slots) s.resize(nq * slots);
  }
};
Scratch& ThreadScratch() {
  thread_local Scratch sc;
  return sc;
}

template <typename T>
void RunItem(const WorkItem& it, const float* q, int64_t q_stride, const PagedKvLayout& kv,
             const AttentionSeq& seq, int32_t group, float scale, bool wide, Scratch& sc,
             float* out, int64_t out_stride) {
  const int32_t d = kv.head_dim, bs = kv.block_size;
  const int32_t nq1 = (it.row1 - it.row0) * group;  // queries per kv head
  const int32_t nq = nq1 * (it.kv_head1 - it.kv_head0);
  const int64_t ld = static_cast<int64_t>(kChunkBlocks) * bs;
  // Query qi: kv head g = kv_head0 + qi / nq1, row = row0 + (qi % nq1) / group,
  // head h = g * group + (qi % nq1) % group.
  struct Query {
    int32_t row, h;
  };
  auto query = [&](int32_t qi) {
    const int32_t g = it.kv_head0 + qi / nq1;
    return Query{it.row0 + (qi % nq1) / group, g * group + (qi % nq1) % group};
  };
  for (int32_t qi = 0; qi < nq; ++qi) {
    const auto [row, h] = query(qi);
    const float* src = q + (seq.row_begin + row) * q_stride + static_cast<int64_t>(h) * d;
    float* dst = sc.q.data() + static_cast<int64_t>(qi) * d;
    for (int32_t t = 0; t < d; ++t) dst[t] = src[t] * scale;
    sc.pos[qi] = seq.n_past + row;
  }
  std::fill(sc.m.begin(), sc.m.begin() + nq, -INFINITY);
  std::fill(sc.l.begin(), sc.l.begin() + nq, 0.f);
  std::fill(sc.acc.begin(), sc.acc.begin() + static_cast<int64_t>(nq) * d, 0.f);
  const int32_t n_blocks = (seq.n_past + it.row1 - 1) / bs + 1;
  const T* base = static_cast<const T*>(kv.base);
  const int64_t head_bytes = static_cast<int64_t>(d) * bs * static_cast<int64_t>(sizeof(T));
  // Two blocks ahead of the pass: the K of pass (1), then the V of pass (3), then the next
  // chunk's K, in the order the passes read them.
  constexpr int32_t kAhead = 2;

  for (int32_t c0 = 0; c0 < n_blocks; c0 += kChunkBlocks) {
    const int32_t c1 = std::min(n_blocks, c0 + kChunkBlocks);
    const int32_t len = (c1 - c0) * bs;
    // (1) Scores. Blocks outer, kv heads inner: a block's heads lie next to each other.
    for (int32_t b = c0; b < c1; ++b) {
      const int32_t block = seq.block_table[b];
      // K of block b + kAhead, or past the chunk's end, V of the chunk's first blocks for (3).
      const int32_t ahead = b + kAhead < c1 ? b + kAhead : c0 + (b + kAhead - c1);
      const bool ahead_k = b + kAhead < c1, ahead_v = !ahead_k && ahead < c1;
      const int32_t ahead_block = ahead_k || ahead_v ? seq.block_table[ahead] : -1;
      for (int32_t g = it.kv_head0; g < it.kv_head1; ++g) {
        if (ahead_k) {
          Prefetch(base + kv.k_offset(ahead_block, g), head_bytes);
        } else if (ahead_v) {
          Prefetch(base + kv.v_offset(ahead_block, g, 0), head_bytes);
        }
        const T* kt = base + kv.k_offset(block, g);
        const int32_t qi0 = (g - it.kv_head0) * nq1;
        float* s = sc.s.data() + qi0 * ld + (b - c0) * bs;
        const float* qq = sc.q.data() + static_cast<int64_t>(qi0) * d;
        if (wide) {
          ScoresBlockAll(kt, qq, nq1, d, s, ld);
        } else {
          for (int32_t i = 0; i < nq1; ++i) {
            for (int32_t j = 0; j < bs; ++j) {
              float dot = 0.f;
              for (int32_t t = 0; t < d; ++t)
                dot += qq[i * d + t] * ToF32(kt[static_cast<int64_t>(t) * bs + j]);
              s[i * ld + j] = dot;
            }
          }
        }
        if constexpr (std::is_same_v<T, int8_t>) {  // each slot's K scale
          const float* ks = kv.KScales(block, g);
          for (int32_t i = 0; i < nq1; ++i)
            for (int32_t j = 0; j < bs; ++j) s[i * ld + j] *= ks[j];
        }
      }
    }
    // (2) Softmax over the chunk, per query (causal: slots past the query's position are out).
    for (int32_t qi = 0; qi < nq; ++qi) {
      const int32_t n_valid = std::min(len, sc.pos[qi] - c0 * bs + 1);
      if (n_valid <= 0) continue;
      float* s = sc.s.data() + qi * ld;
      float* acc = sc.acc.data() + static_cast<int64_t>(qi) * d;
      if (wide) {
        SoftmaxChunkWide(s, n_valid, len, &sc.m[qi], &sc.l[qi], acc, d);
      } else {
        SoftmaxChunkScalar(s, n_valid, len, &sc.m[qi], &sc.l[qi], acc, d);
      }
    }
    // (3) Probabilities times V, queries of equal valid length together.
    for (int32_t b = c0; b < c1; ++b) {
      const int32_t block = seq.block_table[b];
      const int32_t ahead = b + kAhead;
      for (int32_t g = it.kv_head0; g < it.kv_head1; ++g) {
        if (ahead < c1) {
          Prefetch(base + kv.v_offset(seq.block_table[ahead], g, 0), head_bytes);
        } else if (ahead < n_blocks) {
          Prefetch(base + kv.k_offset(seq.block_table[ahead], g), head_bytes);
        }
        const T* vb = base + kv.v_offset(block, g, 0);
        const int32_t qi0 = (g - it.kv_head0) * nq1;
        if constexpr (std::is_same_v<T, int8_t>) {  // fold each slot's V scale into its weight
          const float* vs = kv.VScales(block, g);
          for (int32_t i = 0; i < nq1; ++i) {
            float* pr = sc.s.data() + (qi0 + i) * ld + (b - c0) * bs;
            for (int32_t j = 0; j < bs; ++j) pr[j] *= vs[j];
          }
        }
        for (int32_t i = 0; i < nq1;) {
          const int32_t qi = qi0 + i;
          const int32_t n = std::min(bs, sc.pos[qi] - b * bs + 1);
          int32_t run = 1;
          while (run < 4 && i + run < nq1 && std::min(bs, sc.pos[qi + run] - b * bs + 1) == n) {
            ++run;
          }
          if (n > 0) {
            const float* p[4];
            float* acc[4];
            for (int32_t r = 0; r < run; ++r) {
              p[r] = sc.s.data() + (qi + r) * ld + (b - c0) * bs;
              acc[r] = sc.acc.data() + static_cast<int64_t>(qi + r) * d;
            }
            if (wide) {
              switch (run) {
                case 4:
                  AccumulateV<T, 4>(vb, p, n, d, acc);
                  break;
                case 3:
                  AccumulateV<T, 3>(vb, p, n, d, acc);
                  break;
                case 2:
                  AccumulateV<T, 2>(vb, p, n, d, acc);
                  break;
                default:
                  AccumulateV<T, 1>(vb, p, n, d, acc);
                  break;
              }
            } else {
              for (int32_t r = 0; r < run; ++r)
                for (int32_t j = 0; j < n; ++j)
                  for (int32_t t = 0; t < d; ++t)
                    acc[r][t] += p[r][j] * ToF32(vb[static_cast<int64_t>(j) * d + t]);
            }
          }
          i += run;
        }
      }
    }
  }
  for (int32_t qi = 0; qi < nq; ++qi) {
    const auto [row, h] = query(qi);
    float* o = out + (seq.row_begin + row) * out_stride + static_cast<int64_t>(h) * d;
    const float* a = sc.acc.data() + static_cast<int64_t>(qi) * d;
    const float inv = 1.f / sc.l[qi];
    for (int32_t t = 0; t < d; ++t) o[t] = a[t] * inv;
  }
}

// ---- Decode: one new row per sequence, 1, 2, 4 or 8 query heads per kv head ----
//
// A decode step of a model without grouped queries (GPT-2) reads every cached K/V element once
// for one query, so it is a pure stream of the cache. The chunked passes above read a chunk's K
// then come back for its V: half of every block is skipped and then fetched, and a plain read in
// that pattern reaches only ~60% of a sequential read here. This path reads each block once, in
// memory order (all heads' K, then all heads' V), with one online-softmax update per query per
// block, so the hardware prefetchers see one sequential stream per thread. A long context (few
// sequences) is split into block ranges across threads, whose partial softmaxes are merged.
// With grouped queries (TinyLlama: 8 per kv head) each element serves the whole group, whose
// accumulators the same single pass keeps in registers (batch 16 x 512 positions, 22 layers:
// f16 cache 10.2-11.6 ms with the chunked passes, 8.9 ms here; int8 12.2 -> 6.5-7.5 ms).

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// acc_i[t0, t0 + 16W) += sum_{j < n} p_i[j] v_j[t0, t0 + 16W) for the G queries of one kv head
// (p: [G][16], acc: [G][d]) over one block's V rows (vg: [16][d]). Up to two queries, two chains
// (even and odd rows) per accumulator; from four on, G x W accumulators of one chain each.
// With `pf`, also prefetches [pf, pf + pf_bytes) into L2, spread over the rows (see
// DecodeRange); what the rows leave is prefetched at the end.
template <typename T, int G, int W>
__attribute__((target("avx512f"))) inline void DecodeV(const T* vg, const float* p, int32_t n,
                                                       int32_t d, int32_t t0, float* acc,
                                                       const char* pf = nullptr,
                                                       int64_t pf_bytes = 0) {
  constexpr bool kTwoChains = G <= 2;
  SpreadL2Prefetch ahead(pf, pf_bytes, kTwoChains ? 8 : 16);  // row pairs or rows of a block
  __m512 x[G][W], y[kTwoChains ? G : 1][kTwoChains ? W : 1];  // y: the odd rows' chains
  for (int i = 0; i < G; ++i)
    for (int w = 0; w < W; ++w) {
      x[i][w] = _mm512_loadu_ps(acc + i * d + t0 + 16 * w);
      if constexpr (kTwoChains) y[i][w] = _mm512_setzero_ps();
    }
  int32_t j = 0;
  if constexpr (kTwoChains) {
    for (; j + 2 <= n; j += 2) {
      ahead.Step();
      const T* r0 = vg + static_cast<int64_t>(j) * d + t0;
      const T* r1 = r0 + d;
      for (int w = 0; w < W; ++w) {
        const __m512 v0 = Load16(r0 + 16 * w), v1 = Load16(r1 + 16 * w);
        for (int i = 0; i < G; ++i) {
          x[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * 16 + j]), v0, x[i][w]);
          y[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * 16 + j + 1]), v1, y[i][w]);
        }
      }
    }
  }
  for (; j < n; ++j) {
    if constexpr (!kTwoChains) ahead.Step();
    const T* r0 = vg + static_cast<int64_t>(j) * d + t0;
    for (int w = 0; w < W; ++w) {
      const __m512 v0 = Load16(r0 + 16 * w);
      for (int i = 0; i < G; ++i)
        x[i][w] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * 16 + j]), v0, x[i][w]);
    }
  }
  ahead.Finish();
  for (int i = 0; i < G; ++i)
    for (int w = 0; w < W; ++w) {
      __m512 sum = x[i][w];
      if constexpr (kTwoChains) sum = _mm512_add_ps(sum, y[i][w]);
      _mm512_storeu_ps(acc + i * d + t0 + 16 * w, sum);
    }
}

// Online softmax of one block for G queries, then their share of V, for blocks [b0, b1) of one
// sequence. qs: [H][d] scaled queries; m, l: [H] running max and sum; acc: [H][d]; p: [H][16].
template <typename T, int G>
__attribute__((target("avx512f"))) void DecodeRange(const PagedKvLayout& kv,
                                                    const AttentionSeq& seq, int32_t b0, int32_t b1,
                                                    const float* qs, float* m, float* l, float* acc,
                                                    float* p) {
  const int32_t d = kv.head_dim, n_kv = kv.n_kv_heads;
  const int64_t hs = kv.head_stride();
  const int32_t pos = seq.n_past;  // the new row's position
  const T* base = static_cast<const T*>(kv.base);
  const bool prefetch_wide = PrefetchWideKv();
  for (int32_t b = b0; b < b1; ++b) {
    const int32_t block = seq.block_table[b];
    const int32_t n = std::min(16, pos - b * 16 + 1);  // valid slots, >= 1
    const __mmask16 valid = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1u);
    const T* kb = base + kv.k_offset(block, 0);
    const T* vb = kb + kv.v_offset();
    // An int8 cache reads the next block one block ahead, head by head, and its scales (which
    // live after V) before they are needed. Without this the hardware prefetchers leave it
    // waiting on DRAM at 21-26 GB/s (perf: the stalls sit on each cache line's first K load and
    // on the scales); with it the GPT-2 shape streams at 39-56 GB/s (batch 16 x 512 positions,
    // 12 layers, alternating runs: 6.4-7.9 ms -> 2.9-4.3 ms). The same prefetch makes the f16
    // and f32 caches slower (0-15%), so they go without. Into L2, not L1: on a 2-core Xeon
    // (huge pages, same shape) an L1 prefetch leaves a third of the time stalled on the prefetch
    // instructions themselves, with L1's few outstanding misses full: 8.1-8.5 ms, into L2
    // 7.3-7.5 ms (on the EPYC where the prefetch was first measured, the hint made no
    // difference). And spread: a head's K lines are asked for a few at a time through the
    // score loop, its V lines through the V rows, not in bursts of 16 lines before each
    // (Xeon, layer-major blocks as BlockPool lays them, 24 layers so that L3 cannot hold them:
    // 16.7-17.7 -> 13.6-14.5 ms; without prefetch the same data read with no arithmetic took
    // 12-13.5). On the Xeon the spread prefetch also helps f16 and f32 (16 sequences x 512, 12
    // layers: f16 11.2-12.1 -> 8.9-9.1 ms, f32 21.3-24.1 -> 18.7-20.7; one sequence, 96 layers:
    // f16 5.9-7.0 -> 4.6-4.8, f32 10.8-12.6 -> 9.7-11.3), so there they take it too
    // (PrefetchWideKv).
    const T* next = nullptr;
    if constexpr (!std::is_same_v<T, int8_t>) {
      if (prefetch_wide && b + 1 < b1) next = base + kv.k_offset(seq.block_table[b + 1], 0);
    }
    if constexpr (std::is_same_v<T, int8_t>) {
      const int64_t scale_bytes = kv.scale_bytes();
      if (b == b0) PrefetchL2(kv.KScales(block, 0), scale_bytes);
      if (b + 1 < b1) {
        next = base + kv.k_offset(seq.block_table[b + 1], 0);
        PrefetchL2(kv.KScales(seq.block_table[b + 1], 0), scale_bytes);
      }
    }
    // Scores and the softmax update, kv head by kv head: K of the block in memory order.
    for (int32_t g = 0; g < n_kv; ++g) {
      __m512 scores[G];
      ScoresRegs<T, G>(kb + g * hs, qs + static_cast<int64_t>(g) * G * d, d, scores,
                       next != nullptr ? reinterpret_cast<const char*>(next + g * hs) : nullptr,
                       next != nullptr ? hs * static_cast<int64_t>(sizeof(T)) : 0);
      for (int i = 0; i < G; ++i) {
        const int32_t h = g * G + i;
        __m512 sv = scores[i];
        if constexpr (std::is_same_v<T, int8_t>)  // each slot's K scale
          sv = _mm512_mul_ps(sv, _mm512_loadu_ps(kv.KScales(block, g)));
        sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, sv);
        // A new maximum rescales what has been summed so far (rare after the first blocks).
        if (_mm512_cmp_ps_mask(sv, _mm512_set1_ps(m[h]), _CMP_GT_OQ) != 0) {
          const float mb = _mm512_reduce_max_ps(sv);
          if (m[h] != -INFINITY) {
            const float alpha = FastExp(m[h] - mb);
            l[h] *= alpha;
            const __m512 al = _mm512_set1_ps(alpha);
            float* ah = acc + static_cast<int64_t>(h) * d;
            for (int32_t t = 0; t < d; t += 16)
              _mm512_storeu_ps(ah + t, _mm512_mul_ps(_mm512_loadu_ps(ah + t), al));
          }
          m[h] = mb;
        }
        const __m512 pv =
            _mm512_maskz_mov_ps(valid, FastExp16(_mm512_sub_ps(sv, _mm512_set1_ps(m[h]))));
        l[h] += _mm512_reduce_add_ps(pv);
        if constexpr (std::is_same_v<T, int8_t>) {  // V's weights carry each slot's V scale
          _mm512_storeu_ps(p + h * 16, _mm512_mul_ps(pv, _mm512_loadu_ps(kv.VScales(block, g))));
        } else {
          _mm512_storeu_ps(p + h * 16, pv);
        }
      }
    }
    // Probabilities times V: the block's V in memory order, slot rows of d elements. Up to two
    // queries per kv head, 64 columns at a time, so that a row of head_dim 64 is read whole in
    // one pass (AccumulateSlab does the same sum through pointer arrays: 5-10% slower here; its
    // 32-column slabs read half a row and come back, 45% slower with an f32 cache). Groups of 4
    // and 8 take 16 / group vectors per pass, as many as their accumulators leave registers
    // for, and for 8 that is the 32-column pass again: there the arithmetic per row, not the
    // re-read from L1, is what costs.
    constexpr int kW = G <= 2 ? 4 : 16 / G;  // 16-column vectors per pass over the rows
    for (int32_t g = 0; g < n_kv; ++g) {
      const T* vg = vb + g * hs;
      const float* pg = p + g * G * 16;
      float* ag = acc + static_cast<int64_t>(g) * G * d;
      // The next block's V of this head is prefetched during the first pass (a block with a
      // next block is full, so the pass runs all 16 rows).
      const char* vpf =
          next != nullptr ? reinterpret_cast<const char*>(next + kv.v_offset() + g * hs) : nullptr;
      int32_t t0 = 0;
      for (; t0 + 16 * kW <= d; t0 += 16 * kW) {
        DecodeV<T, G, kW>(vg, pg, n, d, t0, ag, vpf,
                          vpf != nullptr ? hs * static_cast<int64_t>(sizeof(T)) : 0);
        vpf = nullptr;
      }
      if (vpf != nullptr) PrefetchL2(vpf, hs * sizeof(T));  // d < 16 * kW: no full pass
      // What is left (d is a multiple of 16) in one more pass.
      const int32_t rest = (d - t0) / 16;
      if constexpr (kW >= 4) {
        if (rest == 3) DecodeV<T, G, 3>(vg, pg, n, d, t0, ag);
      }
      if constexpr (kW >= 3) {
        if (rest == 2) DecodeV<T, G, 2>(vg, pg, n, d, t0, ag);
      }
      if (rest == 1) DecodeV<T, G, 1>(vg, pg, n, d, t0, ag);
    }
  }
}

#pragma GCC diagnostic pop

// The decode path's entry for `group` query heads per kv head (1, 2, 4, 8: 0-3), -1 when it has
// none and the chunked passes serve the step.
constexpr int DecodeGroupIndex(int32_t group) {
  return group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : group == 8 ? 3 : -1;
}

// A decode step's unit of work: blocks [b0, b1) of one sequence, all heads. `part` >= 0 names
// its slot in the partial results when the sequence is split, -1 when it is whole.
struct DecodeWork {
  int32_t seq, b0, b1, part;
};

void DecodeAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                     const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                     float* out, int64_t out_stride) {
  const int32_t group = n_heads / kv.n_kv_heads, d = kv.head_dim, bs = kv.block_size;
  const int32_t threads = std::max(1, omp_get_max_threads());
  // Split a sequence into parts when there are fewer sequences than two per thread, but keep a
  // part at least 8 blocks long (the merge costs a few vectors per head).
  const int32_t want_parts = std::max(1, (2 * threads + n_seqs - 1) / n_seqs);
  std::vector<DecodeWork> work;
  int32_t n_parts = 0;
  for (int32_t s = 0; s < n_seqs; ++s) {
    const int32_t n_blocks = seqs[s].n_past / bs + 1;
    const int32_t parts = std::clamp(n_blocks / 8, 1, want_parts);
    for (int32_t i = 0; i < parts; ++i) {
      work.push_back(
          {s, n_blocks * i / parts, n_blocks * (i + 1) / parts, parts == 1 ? -1 : n_parts++});
    }
  }
  const int64_t per_part = static_cast<int64_t>(n_heads) * (d + 2);  // m, l, acc[d] per head
  std::vector<float> partials(static_cast<size_t>(n_parts) * per_part);
  const int64_t n_work = static_cast<int64_t>(work.size());

#pragma omp parallel if (n_work > 1)
  {
    Scratch& sc = ThreadScratch();
    sc.Reserve(n_heads, d, 16);
    float *qs = sc.q.data(), *acc = sc.acc.data(), *m = sc.m.data(), *l = sc.l.data(),
          *p = sc.s.data();  // p: the block's probabilities, [n_heads][16]
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_work; ++w) {
      const DecodeWork& it = work[w];
      const AttentionSeq& seq = seqs[it.seq];
      const float* qrow = q + seq.row_begin * q_stride;
      for (int64_t i = 0; i < static_cast<int64_t>(n_heads) * d; ++i) qs[i] = qrow[i] * scale;
      std::fill(m, m + n_heads, -INFINITY);
      std::fill(l, l + n_heads, 0.f);
      std::fill(acc, acc + static_cast<int64_t>(n_heads) * d, 0.f);
      using Fn = void (*)(const PagedKvLayout&, const AttentionSeq&, int32_t, int32_t, const float*,
                          float*, float*, float*, float*);
      constexpr Fn kRanges[3][4] = {{DecodeRange<float, 1>, DecodeRange<float, 2>,
                                     DecodeRange<float, 4>, DecodeRange<float, 8>},
                                    {DecodeRange<uint16_t, 1>, DecodeRange<uint16_t, 2>,
                                     DecodeRange<uint16_t, 4>, DecodeRange<uint16_t, 8>},
                                    {DecodeRange<int8_t, 1>, DecodeRange<int8_t, 2>,
                                     DecodeRange<int8_t, 4>, DecodeRange<int8_t, 8>}};
      const Fn run = kRanges[static_cast<int>(kv.dtype)][DecodeGroupIndex(group)];
      run(kv, seq, it.b0, it.b1, qs, m, l, acc, p);
      if (it.part < 0) {
        float* o = out + seq.row_begin * out_stride;
        for (int32_t h = 0; h < n_heads; ++h) {
          const float inv = 1.f / l[h];
          for (int32_t t = 0; t < d; ++t)
            o[static_cast<int64_t>(h) * d + t] = acc[static_cast<int64_t>(h) * d + t] * inv;
        }
      } else {
        float* pp = partials.data() + it.part * per_part;
        for (int32_t h = 0; h < n_heads; ++h) {
          pp[h * (d + 2)] = m[h];
          pp[h * (d + 2) + 1] = l[h];
          std::copy(acc + static_cast<int64_t>(h) * d, acc + static_cast<int64_t>(h + 1) * d,
                    pp + h * (d + 2) + 2);
        }
      }
    }
  }
  // Merge the parts of split sequences: rescale each part's sums to the overall maximum.
  for (int64_t w = 0; w < n_work;) {
    if (work[w].part < 0) {
      ++w;
      continue;
    }
    int64_t e = w;
    while (e < n_work && work[e].seq == work[w].seq) ++e;
    const AttentionSeq& seq = seqs[work[w].seq];
    float* o = out + seq.row_begin * out_stride;
    for (int32_t h = 0; h < n_heads; ++h) {
      float mx = -INFINITY;
      for (int64_t i = w; i < e; ++i)
        mx = std::max(mx, partials[work[i].part * per_part + h * (d + 2)]);
      float sum = 0.f;
      float* oh = o + static_cast<int64_t>(h) * d;
      std::fill(oh, oh + d, 0.f);
      for (int64_t i = w; i < e; ++i) {
        const float* pp = partials.data() + work[i].part * per_part + h * (d + 2);
        const float f = FastExp(pp[0] - mx);
        sum += f * pp[1];
        for (int32_t t = 0; t < d; ++t) oh[t] += f * pp[2 + t];
      }
      const float inv = 1.f / sum;
      for (int32_t t = 0; t < d; ++t) oh[t] *= inv;
    }
    w = e;
  }
}

}  // namespace

void PagedAttention(const float* q, int64_t q_stride, const PagedKvLayout& kv,
                    const AttentionSeq* seqs, int32_t n_seqs, int32_t n_heads, float scale,
                    float* out, int64_t out_stride) {
  const int32_t group = n_heads / kv.n_kv_heads;
  const int32_t d = kv.head_dim;
  const int32_t bs = kv.block_size;
  const int32_t tile_rows = std::max(1, 32 / group);
  const bool wide = bs == 16 && d % 16 == 0 && HasAvx512();
  bool decode = wide && DecodeGroupIndex(group) >= 0;
  for (int32_t s = 0; s < n_seqs && decode; ++s) decode = seqs[s].n_new == 1;
  if (decode) {
    DecodeAttention(q, q_stride, kv, seqs, n_seqs, n_heads, scale, out, out_stride);
    return;
  }

  std::vector<WorkItem> work;
  // Few tiles (decode): an item takes a run of adjacent kv heads, whose K (and V) lie next to each
  // other in every block, so each thread streams long contiguous ranges instead of small pieces;
  // about two items per thread keep the threads balanced. Many tiles (prefill): one head each.
  int64_t n_tiles = 0;
  for (int32_t s = 0; s < n_seqs; ++s) n_tiles += (seqs[s].n_new + tile_rows - 1) / tile_rows;
  const int64_t per_thread = 2 * static_cast<int64_t>(std::max(1, omp_get_max_threads()));
  const int32_t heads_per_item = static_cast<int32_t>(
      std::clamp<int64_t>(n_tiles * kv.n_kv_heads / per_thread, 1, kv.n_kv_heads));
  int32_t max_q = 1;
  for (int32_t s = 0; s < n_seqs; ++s) {
    for (int32_t r0 = 0; r0 < seqs[s].n_new; r0 += tile_rows) {
      const int32_t r1 = std::min(seqs[s].n_new, r0 + tile_rows);
      for (int32_t g = 0; g < kv.n_kv_heads; g += heads_per_item) {
        const int32_t g1 = std::min(kv.n_kv_heads, g + heads_per_item);
        work.push_back({s, g, g1, r0, r1});
        max_q = std::max(max_q, (r1 - r0) * group * (g1 - g));
      }
    }
  }
  const int64_t n_work = static_cast<int64_t>(work.size());
  const size_t chunk_slots = static_cast<size_t>(kChunkBlocks) * bs;

#pragma omp parallel if (n_work > 1)
  {
    Scratch& sc = ThreadScratch();
    sc.Reserve(static_cast<size_t>(max_q), d, chunk_slots);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = n_work - 1; w >= 0; --w) {  // longest (latest rows) first
      const WorkItem& it = work[w];
      if (kv.dtype == KvDtype::kF32) {
        RunItem<float>(it, q, q_stride, kv, seqs[it.seq], group, scale, wide, sc, out, out_stride);
      } else if (kv.dtype == KvDtype::kF16) {
        RunItem<uint16_t>(it, q, q_stride, kv, seqs[it.seq], group, scale, wide, sc, out,
                          out_stride);
      } else {
        RunItem<int8_t>(it, q, q_stride, kv, seqs[it.seq], group, scale, wide, sc, out, out_stride);
      }
    }
  }
}

}  // namespace duet::kernels
