// Single-process generation: tokenize, prefill, decode token by token with a sampler and stop
// criteria, stream text as it completes. What `duet run` does, and the reference the service
// pair is held against.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "duet/model/model.h"
#include "duet/sampling/sampler.h"
#include "duet/sampling/stop.h"
#include "duet/tokenizer/tokenizer.h"

namespace duet::cli {

struct GenerateOptions {
  sampling::SamplingParams sampling;
  sampling::StopParams stop;           // eos_ids are filled from the model when empty
  bool add_special_tokens = true;      // BOS etc. as the tokenizer's post-processor says
  int32_t block_size = 16;
};

struct GenerateResult {
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> output_ids;     // generated tokens (including a final eos)
  std::string text;                    // everything emitted
  sampling::FinishReason finish = sampling::FinishReason::kNone;
  double ttft_s = 0;                   // start to first token sampled
  double decode_s = 0;                 // first token to last token
};

// INVALID_ARGUMENT for an empty prompt, bad sampling/stop values, or prompt + max_tokens past
// the model's context (naming the numbers).
absl::StatusOr<GenerateResult> Generate(model::Model& model, const tokenizer::Tokenizer& tok,
                                        std::string_view prompt, GenerateOptions options,
                                        const std::function<void(std::string_view)>& on_text);

// The same, from token ids (no tokenization of the prompt).
absl::StatusOr<GenerateResult> GenerateFromIds(model::Model& model,
                                               const tokenizer::Tokenizer& tok,
                                               std::vector<int32_t> prompt_ids,
                                               GenerateOptions options,
                                               const std::function<void(std::string_view)>& on_text);

// eos ids of a model: config.json's plus the tokenizer's.
std::vector<int32_t> EosIds(const model::Model& model, const tokenizer::Tokenizer& tok);

}  // namespace duet::cli
