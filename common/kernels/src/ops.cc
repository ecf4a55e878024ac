#include "duet/kernels/ops.h"

#include <algorithm>
#include <cmath>

#include "fast_math.h"

namespace duet::kernels {

void LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
               float eps, float* y) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<float>(dim);
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < dim; ++i) {
      const float d = xr[i] - mean;
      var += d * d;
    }
    var /= static_cast<float>(dim);
    const float inv = 1.f / std::sqrt(var + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
  }
}

void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

namespace {

// v * sigmoid(2u) with u = sqrt(2/pi) (v + 0.044715 v^3): GELU's tanh form, 8 lanes at a time.
void GeluRange(float* x, int64_t begin, int64_t end) {
  constexpr float kC = 0.7978845608028654f;  // sqrt(2/pi)
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kC),
                                   _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
    const __m256 e = FastExp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), u));
    _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  }
  for (; i < end; ++i) {
    // 0.5 v (1 + tanh(u)) = v * sigmoid(2u) = v / (1 + exp(-2u))
    const float v = x[i];
    const float u = kC * (v + 0.044715f * v * v * v);
    x[i] = v / (1.f + FastExp(-2.f * u));
  }
}

}  // namespace

void GeluTanh(float* x, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t c = 0; c < n_chunks; ++c) GeluRange(x, c * kChunk, std::min(n, (c + 1) * kChunk));
}

void SiluMul(const float* gate_up, int64_t rows, int64_t dim, float* out) {
#pragma omp parallel for schedule(static) if (rows * dim > 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * dim;
    const float* u = g + dim;
    float* o = out + r * dim;
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = FastExp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (; i < dim; ++i) o[i] = g[i] / (1.f + FastExp(-g[i])) * u[i];
  }
}

void AddInPlace(float* y, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void Rope(float* x, int64_t rows, int64_t stride, int64_t n_heads, int64_t head_dim,
          const int32_t* positions, const float* inv_freq) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const double pos = positions[r];
    float cos_buf[512], sin_buf[512];  // head_dim/2 <= 512 is checked at model load
    for (int64_t i = 0; i < half; ++i) {
      const double a = pos * static_cast<double>(inv_freq[i]);
      cos_buf[i] = static_cast<float>(std::cos(a));
      sin_buf[i] = static_cast<float>(std::sin(a));
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + r * stride + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_buf[i] - b * sin_buf[i];
        v[i + half] = b * cos_buf[i] + a * sin_buf[i];
      }
    }
  }
}

void Softmax(float* x, int64_t n) {
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace duet::kernels
