// A decoder-only transformer (GPT-2, Llama, Qwen2) loaded from a Hugging Face directory, and its
// forward pass over a batch of sequences against a paged K/V cache.
//
// Weights are loaded once and read-only afterwards. K/V memory belongs to a kv::BlockPool;
// each sequence in a batch brings its own kv::SequenceKv. Prefill (many new tokens) and decode
// (one new token) are the same call: a sequence just has more or fewer new tokens.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "duet/kernels/linear.h"
#include "duet/kv/block_pool.h"
#include "duet/model/config.h"

namespace duet::model {

struct ModelOptions {
  kernels::Precision precision = kernels::Precision::kBF16;
  // Element type of the K/V cache (kv_shape().dtype). f32 keeps f32 mode exact and bf16 mode as
  // close to an f32 reference as it can be; f16 halves the cache (twice the sessions per MiB)
  // and the bytes attention reads per decode step, at about 2^-12 relative error per element;
  // int8 quarters it (one f32 scale per position and kv head, error up to max|x|/254 per element).
  kernels::KvDtype kv_cache_dtype = kernels::KvDtype::kF32;
};

// "f32" / "f16" / "int8" <-> KvDtype; INVALID_ARGUMENT names any other value.
absl::StatusOr<kernels::KvDtype> ParseKvCacheDtype(std::string_view name);
const char* KvCacheDtypeName(kernels::KvDtype dtype);

// One sequence's part of a batched forward step.
struct BatchItem {
  std::span<const int32_t> tokens;  // new tokens, at positions kv->n_tokens() onwards
  kv::SequenceKv* kv = nullptr;     // must have capacity for n_tokens() + tokens.size()
  bool all_logits = false;          // logits for every new token, else only for the last
};

// Optional callbacks of one forward pass, run on the calling (engine) thread.
struct ForwardHooks {
  // Called as soon as layer `layer`'s K/V of every item are in the cache (before the layer's
  // attention runs), so a caller can ship them while the rest of the pass computes. Returning
  // false aborts the pass with CANCELLED; then no cache is advanced.
  std::function<bool(int32_t layer)> on_layer_kv;
};

class Model {
 public:
  // Loads config.json and the safetensors weights of `dir`. One clear error naming the problem:
  // NOT_FOUND (missing file), UNIMPLEMENTED (unknown architecture), INVALID_ARGUMENT (missing,
  // extra or mis-shaped tensor, truncated file, unsupported dtype). Nothing is half-loaded.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::filesystem::path& dir,
                                                     const ModelOptions& options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  kernels::Precision precision() const { return options_.precision; }
  // Hash of config.json and every tensor's name, dtype, shape and bytes (32 hex digits).
  const std::string& fingerprint() const { return fingerprint_; }
  // K/V geometry for a block pool serving this model.
  kv::KvShape kv_shape(int32_t block_size) const;
  // Bytes of weights one decode step reads (packed matmul weights).
  size_t weight_bytes() const;

  // Runs the new tokens of every item through the model: writes their K/V into each item's
  // cache, advances each kv->n_tokens(), and fills `logits` with n_vocab floats per requested
  // row (items in order; all new rows for all_logits items, else the last row).
  // INVALID_ARGUMENT (naming the value) for an empty item, an out-of-range token id, a position
  // past the context, or too little K/V capacity; then no cache is advanced.
  // Not thread-safe: one engine thread runs a model's forward passes at a time.
  absl::Status Forward(std::span<const BatchItem> items, std::vector<float>* logits,
                       const ForwardHooks* hooks = nullptr);

 private:
  struct Weights;
  struct Scratch;
  Model();
  absl::Status Init(const std::filesystem::path& dir);

  ModelOptions options_;
  ModelConfig config_;
  std::string fingerprint_;
  std::unique_ptr<Weights> w_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace duet::model
