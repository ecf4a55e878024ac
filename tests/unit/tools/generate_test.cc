// Single-process generation: seeds, stop criteria and validation, on a fixture model with the
// bundled tokenizer's byte-level vocabulary being irrelevant: ids come straight from the model.
#include <catch2/catch.hpp>

#include "generate.h"

namespace {
struct Loaded {
  std::unique_ptr<duet::model::Model> model;
  std::unique_ptr<duet::tokenizer::Tokenizer> tok;
};
Loaded LoadBundled() {
  const std::string dir = std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";
  auto m = duet::model::Model::Load(dir);
  REQUIRE(m.ok());
  auto t = duet::tokenizer::Tokenizer::Load(dir);
  REQUIRE(t.ok());
  return {std::move(*m), std::move(*t)};
}
}  // namespace

TEST_CASE("same seed, same output; greedy is deterministic", "[generate]") {
  auto l = LoadBundled();
  duet::cli::GenerateOptions opt;
  opt.sampling.temperature = 0.9f;
  opt.sampling.seed = 42;
  opt.stop.max_tokens = 40;
  opt.stop.ignore_eos = true;
  auto a = duet::cli::Generate(*l.model, *l.tok, "the river", opt, nullptr);
  auto b = duet::cli::Generate(*l.model, *l.tok, "the river", opt, nullptr);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(a->output_ids == b->output_ids);
  REQUIRE(a->output_ids.size() == 40);
  REQUIRE(a->finish == duet::sampling::FinishReason::kMaxTokens);
  opt.sampling.seed = 43;
  auto c = duet::cli::Generate(*l.model, *l.tok, "the river", opt, nullptr);
  REQUIRE(c.ok());
  REQUIRE(c->output_ids != a->output_ids);
}

TEST_CASE("streamed text equals the decoded tokens, and a stop string ends it", "[generate]") {
  auto l = LoadBundled();
  duet::cli::GenerateOptions opt;
  opt.sampling.temperature = 0.f;
  opt.stop.max_tokens = 60;
  opt.stop.ignore_eos = true;
  std::string streamed;
  auto r = duet::cli::Generate(*l.model, *l.tok, "a kind of", opt,
                               [&](std::string_view t) { streamed += t; });
  REQUIRE(r.ok());
  REQUIRE(streamed == r->text);
  REQUIRE(r->text == l.tok->Decode(r->output_ids));
  // Stop at the first space after the 10th character of that same greedy text.
  const auto cut = r->text.find(' ', 10);
  REQUIRE(cut != std::string::npos);
  const std::string stop = r->text.substr(cut, 2);
  opt.stop.stop_strings = {stop};
  auto s = duet::cli::Generate(*l.model, *l.tok, "a kind of", opt, nullptr);
  REQUIRE(s.ok());
  REQUIRE(s->finish == duet::sampling::FinishReason::kStopString);
  REQUIRE(s->text == r->text.substr(0, r->text.find(stop)));
}

TEST_CASE("generation rejects bad requests naming the value", "[generate]") {
  auto l = LoadBundled();
  duet::cli::GenerateOptions opt;
  auto empty = duet::cli::Generate(*l.model, *l.tok, "", opt, nullptr);
  REQUIRE(empty.status().code() == absl::StatusCode::kInvalidArgument);
  opt.stop.max_tokens = l.model->config().n_ctx;
  auto too_long = duet::cli::Generate(*l.model, *l.tok, "hello", opt, nullptr);
  REQUIRE(too_long.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(too_long.status().message().find(std::to_string(l.model->config().n_ctx)) !=
          std::string::npos);
  opt.stop.max_tokens = 5;
  opt.sampling.temperature = -1.f;
  auto bad_t = duet::cli::Generate(*l.model, *l.tok, "hello", opt, nullptr);
  REQUIRE(bad_t.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(bad_t.status().message().find("-1") != std::string::npos);
}
