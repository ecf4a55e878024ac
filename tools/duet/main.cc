// duet: the command-line front end.
//   duet run        --model DIR --prompt TEXT [sampling flags]   stream generated text
//   duet logits     --model DIR --token-ids 1,2,3                every position's logits as JSON
//   duet tokenize   --model DIR --text TEXT                      ids as JSON
//   duet detokenize --model DIR --ids 1,2,3                      text as JSON
//   duet bench-engine [--json FILE] [--threads N]                engine speed on real shapes
//   duet bench-codec [--tokens N] [--runs N] [--json FILE]       K/V wire codec GB/s per dtype
//   duet bench-pair [--json FILE] [--threads N]                  pair TTFT/decode vs one process
//   duet generate   --server ADDR --prompt TEXT [sampling flags]  one request to duet-decode
//   duet chat       --server ADDR [sampling flags]                multi-turn chat on one session
//   duet bench      --server ADDR --concurrency N --requests M ... serving latency/throughput
// Errors exit non-zero with a one-line message on stderr.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/strings/str_cat.h"
#include "args.h"
#include "bench_codec.h"
#include "bench_engine.h"
#include "bench_pair.h"
#include "client.h"
#include "duet/kernels/threads.h"
#include "duet/model/model.h"
#include "duet/tensor/malloc_tuning.h"
#include "duet/tokenizer/tokenizer.h"
#include "generate.h"

namespace {

using duet::cli::Args;
using nlohmann::json;

constexpr const char* kUsage =
    "usage: duet <command> [flags]\n"
    "  run          --model DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]\n"
    "               [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--stop STR]...\n"
    "               [--ignore-eos] [--precision bf16|f32] [--threads N] [--no-special-tokens]\n"
    "               [--kv-cache-dtype f32|f16|int8]\n"
    "  logits       --model DIR --token-ids 1,2,3 [--precision f32|bf16] [--threads N]\n"
    "               [--kv-cache-dtype f32|f16|int8]\n"
    "  tokenize     --model DIR --text TEXT [--add-special-tokens]\n"
    "  detokenize   --model DIR --ids 1,2,3\n"
    "  bench-engine [--json FILE] [--threads N] [--models gpt2-124m,tinyllama-1.1b]\n"
    "               [--kv-cache-dtype f32|f16|int8]\n"
    "  bench-codec  [--tokens N] [--runs N] [--json FILE]\n"
    "  bench-pair   [--json FILE] [--threads N per server, default cores/2] [--workdir DIR]\n"
    "               [--prefill-bin PATH] [--decode-bin PATH] [--tokenizer FILE]\n"
    "               [--kv-cache-dtype f32|f16|int8]\n"
    "  generate     --server ADDR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]\n"
    "               [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--stop STR]...\n"
    "               [--ignore-eos] [--session ID] [--open-session] [--timeout-s S]\n"
    "  chat         --server ADDR [sampling flags as generate] [--timeout-s S]\n"
    "  bench        --server ADDR --concurrency N --requests M --prompt-tokens P --max-tokens T\n"
    "               [--seed S] [--json FILE] [--timeout-s S]\n";

int Fail(const std::string& cmd, const absl::Status& s) {
  std::fprintf(stderr, "duet %s: %s\n", cmd.c_str(), std::string(s.message()).c_str());
  return 1;
}

absl::StatusOr<duet::kernels::Precision> ParsePrecision(const Args& a, const char* fallback) {
  const std::string p = a.Get("precision").value_or(fallback);
  if (p == "bf16") return duet::kernels::Precision::kBF16;
  if (p == "f32") return duet::kernels::Precision::kF32;
  return absl::InvalidArgumentError(absl::StrCat("--precision must be bf16 or f32, got \"", p, "\""));
}

absl::Status SetThreads(const Args& a) {
  auto t = a.GetInt("threads", 0);
  if (!t.ok()) return t.status();
  if (*t < 0) return absl::InvalidArgumentError(absl::StrCat("--threads must be >= 0, got ", *t));
  duet::kernels::SetNumThreads(static_cast<int>(*t));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<duet::model::Model>> LoadModel(const Args& a, const char* prec) {
  auto dir = a.Require("model");
  if (!dir.ok()) return dir.status();
  auto p = ParsePrecision(a, prec);
  if (!p.ok()) return p.status();
  auto kv = duet::model::ParseKvCacheDtype(a.Get("kv-cache-dtype").value_or("f32"));
  if (!kv.ok()) return kv.status();
  return duet::model::Model::Load(*dir, {*p, *kv});
}

absl::StatusOr<std::unique_ptr<duet::tokenizer::Tokenizer>> LoadTokenizer(const Args& a) {
  auto dir = a.Require("model");
  if (!dir.ok()) return dir.status();
  return duet::tokenizer::Tokenizer::Load(*dir);
}

int Run(int argc, char** argv) {
  auto a = Args::Parse(argc, argv,
                       {"model", "prompt", "max-tokens", "temperature", "top-k", "top-p", "min-p",
                        "repetition-penalty", "seed", "stop", "precision", "threads",
                        "kv-cache-dtype"},
                       {"ignore-eos", "no-special-tokens"});
  if (!a.ok()) return Fail("run", a.status());
  if (auto s = SetThreads(*a); !s.ok()) return Fail("run", s);
  auto prompt = a->Require("prompt");
  if (!prompt.ok()) return Fail("run", prompt.status());
  duet::cli::GenerateOptions opt;
  auto temperature = a->GetDouble("temperature", 0.8);
  auto top_k = a->GetInt("top-k", 0);
  auto top_p = a->GetDouble("top-p", 1.0);
  auto min_p = a->GetDouble("min-p", 0.0);
  auto rep = a->GetDouble("repetition-penalty", 1.0);
  auto seed = a->GetInt("seed", 0);
  auto max_tokens = a->GetInt("max-tokens", 128);
  for (const absl::Status& s : {temperature.status(), top_k.status(), top_p.status(),
                                min_p.status(), rep.status(), seed.status(), max_tokens.status()})
    if (!s.ok()) return Fail("run", s);
  opt.sampling.temperature = static_cast<float>(*temperature);
  opt.sampling.top_k = static_cast<int32_t>(*top_k);
  opt.sampling.top_p = static_cast<float>(*top_p);
  opt.sampling.min_p = static_cast<float>(*min_p);
  opt.sampling.repetition_penalty = static_cast<float>(*rep);
  opt.sampling.seed = static_cast<uint64_t>(*seed);
  if (*max_tokens <= 0 || *max_tokens > (1 << 24)) {
    return Fail("run", absl::InvalidArgumentError(
                           absl::StrCat("--max-tokens must be positive, got ", *max_tokens)));
  }
  opt.stop.max_tokens = static_cast<int32_t>(*max_tokens);
  opt.stop.stop_strings = a->GetAll("stop");
  opt.stop.ignore_eos = a->Has("ignore-eos");
  opt.add_special_tokens = !a->Has("no-special-tokens");
  if (auto s = duet::sampling::Validate(opt.sampling); !s.ok()) return Fail("run", s);
  auto model = LoadModel(*a, "bf16");
  if (!model.ok()) return Fail("run", model.status());
  auto tok = LoadTokenizer(*a);
  if (!tok.ok()) return Fail("run", tok.status());
  auto r = duet::cli::Generate(**model, **tok, *prompt, opt, [](std::string_view text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  });
  if (!r.ok()) return Fail("run", r.status());
  const size_t n_out = r->output_ids.size();
  std::fprintf(stdout, "\n");
  std::fflush(stdout);
  std::fprintf(stderr,
               "\nprompt tokens: %zu  generated tokens: %zu  finish: %s\n"
               "TTFT: %.1f ms  decode: %.1f tokens/s\n",
               r->prompt_ids.size(), n_out,
               std::string(duet::sampling::FinishReasonName(r->finish)).c_str(),
               r->ttft_s * 1e3, n_out > 1 ? (n_out - 1) / r->decode_s : 0.0);
  return 0;
}

int Logits(int argc, char** argv) {
  auto a = Args::Parse(argc, argv, {"model", "token-ids", "precision", "threads", "kv-cache-dtype"},
                       {});
  if (!a.ok()) return Fail("logits", a.status());
  if (auto s = SetThreads(*a); !s.ok()) return Fail("logits", s);
  auto ids_s = a->Require("token-ids");
  if (!ids_s.ok()) return Fail("logits", ids_s.status());
  auto ids = duet::cli::ParseIdList(*ids_s);
  if (!ids.ok()) return Fail("logits", ids.status());
  auto model = LoadModel(*a, "f32");
  if (!model.ok()) return Fail("logits", model.status());
  auto& m = **model;
  const int32_t n = static_cast<int32_t>(ids->size());
  if (n > m.config().n_ctx) {
    return Fail("logits", absl::InvalidArgumentError(absl::StrCat(
                              n, " tokens exceed the model context of ", m.config().n_ctx)));
  }
  auto pool = duet::kv::BlockPool::Create(m.kv_shape(16), (n + 15) / 16);
  if (!pool.ok()) return Fail("logits", pool.status());
  duet::kv::SequenceKv kv(pool->get());
  if (auto s = kv.Reserve(n); !s.ok()) return Fail("logits", s);
  std::vector<float> logits;
  duet::model::BatchItem item{*ids, &kv, true};
  if (auto s = m.Forward({&item, 1}, &logits); !s.ok()) return Fail("logits", s);
  const int32_t V = m.config().n_vocab;
  json rows = json::array();
  for (int32_t p = 0; p < n; ++p)
    rows.push_back(std::vector<float>(logits.begin() + int64_t{p} * V,
                                      logits.begin() + int64_t{p + 1} * V));
  std::cout << json{{"token_ids", *ids}, {"logits", rows}}.dump() << "\n";
  return 0;
}

int Tokenize(int argc, char** argv) {
  auto a = Args::Parse(argc, argv, {"model", "text"}, {"add-special-tokens"});
  if (!a.ok()) return Fail("tokenize", a.status());
  auto text = a->Require("text");
  if (!text.ok()) return Fail("tokenize", text.status());
  auto tok = LoadTokenizer(*a);
  if (!tok.ok()) return Fail("tokenize", tok.status());
  std::cout << json{{"ids", (*tok)->Encode(*text, a->Has("add-special-tokens"))}}.dump() << "\n";
  return 0;
}

int Detokenize(int argc, char** argv) {
  auto a = Args::Parse(argc, argv, {"model", "ids"}, {});
  if (!a.ok()) return Fail("detokenize", a.status());
  auto ids_s = a->Require("ids");
  if (!ids_s.ok()) return Fail("detokenize", ids_s.status());
  auto ids = duet::cli::ParseIdList(*ids_s);
  if (!ids.ok()) return Fail("detokenize", ids.status());
  auto tok = LoadTokenizer(*a);
  if (!tok.ok()) return Fail("detokenize", tok.status());
  for (int32_t id : *ids) {
    if (!(*tok)->IsValidId(id)) {
      return Fail("detokenize", absl::InvalidArgumentError(absl::StrCat(
                                    "token id ", id, " out of range [0, ",
                                    (*tok)->vocab_size(), ")")));
    }
  }
  // ensure_ascii=false keeps UTF-8 as is; invalid UTF-8 (a lone byte token) is replaced.
  std::cout << json{{"text", (*tok)->Decode(*ids)}}.dump(-1, ' ', false,
                                                         json::error_handler_t::replace)
            << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // As the servers do: freed buffers stay in the process (no page faults per forward pass).
  duet::KeepFreedMemory();
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "run") return Run(argc - 2, argv + 2);
  if (cmd == "logits") return Logits(argc - 2, argv + 2);
  if (cmd == "tokenize") return Tokenize(argc - 2, argv + 2);
  if (cmd == "detokenize") return Detokenize(argc - 2, argv + 2);
  if (cmd == "bench-engine") return duet::cli::BenchEngineMain(argc - 2, argv + 2, "/proc/self/exe");
  if (cmd == "bench-codec") return duet::cli::BenchCodecMain(argc - 2, argv + 2);
  if (cmd == "bench-pair") return duet::cli::BenchPairMain(argc - 2, argv + 2);
  if (cmd == "generate") return duet::cli::GenerateMain(argc - 2, argv + 2);
  if (cmd == "chat") return duet::cli::ChatMain(argc - 2, argv + 2);
  if (cmd == "bench") return duet::cli::BenchMain(argc - 2, argv + 2);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::fprintf(stderr, "duet: unknown command \"%s\"\n%s", cmd.c_str(), kUsage);
  return 2;
}
