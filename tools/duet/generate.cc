#include "generate.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace duet::cli {
namespace {
double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

std::vector<int32_t> EosIds(const model::Model& model, const tokenizer::Tokenizer& tok) {
  std::vector<int32_t> ids = model.config().eos_token_ids;
  if (auto e = tok.eos_id(); e && std::find(ids.begin(), ids.end(), *e) == ids.end())
    ids.push_back(*e);
  return ids;
}

absl::StatusOr<GenerateResult> Generate(model::Model& model, const tokenizer::Tokenizer& tok,
                                        std::string_view prompt, GenerateOptions options,
                                        const std::function<void(std::string_view)>& on_text) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  return GenerateFromIds(model, tok, tok.Encode(prompt, options.add_special_tokens), options,
                         on_text);
}

absl::StatusOr<GenerateResult> GenerateFromIds(
    model::Model& model, const tokenizer::Tokenizer& tok, std::vector<int32_t> prompt_ids,
    GenerateOptions options, const std::function<void(std::string_view)>& on_text) {
  const auto t0 = std::chrono::steady_clock::now();
  if (prompt_ids.empty()) return absl::InvalidArgumentError("prompt has no tokens");
  if (auto s = sampling::Validate(options.sampling); !s.ok()) return s;
  if (options.stop.eos_ids.empty()) options.stop.eos_ids = EosIds(model, tok);
  if (auto s = sampling::Validate(options.stop); !s.ok()) return s;
  const int64_t n_ctx = model.config().n_ctx;
  const int64_t n_prompt = static_cast<int64_t>(prompt_ids.size());
  if (n_prompt + options.stop.max_tokens > n_ctx) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", n_prompt, " tokens + max_tokens ",
                                                   options.stop.max_tokens,
                                                   " exceeds the model context of ", n_ctx));
  }
  auto pool = kv::BlockPool::Create(
      model.kv_shape(options.block_size),
      static_cast<int32_t>((n_prompt + options.stop.max_tokens + options.block_size - 1) /
                           options.block_size));
  if (!pool.ok()) return pool.status();
  kv::SequenceKv kv(pool->get());
  if (auto s = kv.Reserve(static_cast<int32_t>(n_prompt + options.stop.max_tokens)); !s.ok())
    return s;

  GenerateResult r;
  r.prompt_ids = std::move(prompt_ids);
  sampling::Sampler sampler(options.sampling);
  sampling::StopChecker stop(options.stop);
  tokenizer::StreamDecoder detok(tok);
  std::vector<int32_t> history = r.prompt_ids;
  std::vector<float> logits;
  model::BatchItem item{r.prompt_ids, &kv, false};
  if (auto s = model.Forward({&item, 1}, &logits); !s.ok()) return s;
  const int32_t V = model.config().n_vocab;
  std::chrono::steady_clock::time_point t_first;
  while (true) {
    const int32_t next = sampler.Sample({logits.data(), static_cast<size_t>(V)}, history);
    if (r.output_ids.empty()) {
      r.ttft_s = Since(t0);
      t_first = std::chrono::steady_clock::now();
    }
    r.output_ids.push_back(next);
    history.push_back(next);
    const bool is_eos = std::find(options.stop.eos_ids.begin(), options.stop.eos_ids.end(),
                                  next) != options.stop.eos_ids.end() &&
                        !options.stop.ignore_eos;
    const std::string delta = is_eos ? std::string() : detok.Push(next);
    auto step = stop.Push(next, delta);
    if (!step.emit.empty()) {
      r.text += step.emit;
      if (on_text) on_text(step.emit);
    }
    if (step.finish != sampling::FinishReason::kNone) {
      r.finish = step.finish;
      break;
    }
    model::BatchItem one{std::span<const int32_t>(&r.output_ids.back(), 1), &kv, false};
    if (auto s = model.Forward({&one, 1}, &logits); !s.ok()) return s;
  }
  if (r.finish != sampling::FinishReason::kStopString) {
    std::string rest = stop.Flush();
    // Any partial character the detokenizer still holds goes through the stop checker's rules
    // too: it cannot complete a stop string once generation has ended, so it is emitted.
    rest += detok.Flush();
    if (!rest.empty()) {
      r.text += rest;
      if (on_text) on_text(rest);
    }
  }
  r.decode_s = Since(t_first);
  return r;
}

}  // namespace duet::cli
