// Element-wise and row-wise ops on f32 activations, row-major [rows, dim].
// All run on the calling thread's OpenMP pool and never allocate.
#pragma once

#include <cstdint>

namespace duet::kernels {

// y = (x - mean) / sqrt(var + eps) * w + b, per row.
void LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
               float eps, float* y);
// y = x / sqrt(mean(x^2) + eps) * w, per row.
void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y);
// In place: x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's gelu_new).
void GeluTanh(float* x, int64_t n);
// gate_up: [rows, 2*dim] = [gate | up]; out[rows, dim] = silu(gate) * up.
void SiluMul(const float* gate_up, int64_t rows, int64_t dim, float* out);
// y += x.
void AddInPlace(float* y, const float* x, int64_t n);

// Rotary embedding, HF "rotate_half" convention: within each head of head_dim, element i pairs
// with i + head_dim/2. x: [rows, n_heads * head_dim] with row stride `stride` floats;
// positions[row] gives each row's position; inv_freq has head_dim/2 entries.
void Rope(float* x, int64_t rows, int64_t stride, int64_t n_heads, int64_t head_dim,
          const int32_t* positions, const float* inv_freq);

// In place softmax over n values.
void Softmax(float* x, int64_t n);

}  // namespace duet::kernels
