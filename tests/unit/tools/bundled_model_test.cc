// The bundled model (models/duet-tiny) writes recognisable English: of 2000 tokens sampled at
// temperature 0.8, at least 70% of the words are in Debian's English word list (wamerican).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <fstream>
#include <string>
#include <unordered_set>

#include "generate.h"

namespace {

std::unordered_set<std::string> LoadWordList() {
  std::ifstream in("/usr/share/dict/american-english");
  REQUIRE(in.good());  // from the wamerican package, which scripts/setup installs
  std::unordered_set<std::string> words;
  for (std::string w; std::getline(in, w);) {
    std::transform(w.begin(), w.end(), w.begin(), [](unsigned char c) { return std::tolower(c); });
    words.insert(w);
  }
  return words;
}

// Words: maximal runs of ASCII letters, lowercased.
std::vector<std::string> Words(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  for (unsigned char c : text) {
    if (std::isalpha(c)) {
      cur += static_cast<char>(std::tolower(c));
    } else if (!cur.empty()) {
      out.push_back(cur);
      cur.clear();
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

TEST_CASE("the bundled model samples mostly dictionary words", "[bundled]") {
  const std::string dir = std::string(DUET_SOURCE_DIR) + "/models/duet-tiny";
  auto model = duet::model::Model::Load(dir);
  INFO(model.status().ToString());
  REQUIRE(model.ok());
  auto tok = duet::tokenizer::Tokenizer::Load(dir);
  INFO(tok.status().ToString());
  REQUIRE(tok.ok());
  const auto dict = LoadWordList();

  const char* prompts[] = {"the", "a person who", "of or relating to", "an act of", "in a manner"};
  std::string text;
  int64_t n_tokens = 0;
  for (uint64_t seed = 1; n_tokens < 2000; ++seed) {
    duet::cli::GenerateOptions opt;
    opt.sampling.temperature = 0.8f;
    opt.sampling.seed = seed;
    const std::string prompt = prompts[seed % 5];
    const int64_t room = (*model)->config().n_ctx - 16;
    opt.stop.max_tokens = static_cast<int32_t>(std::min<int64_t>(room, 2000 - n_tokens));
    auto r = duet::cli::Generate(**model, **tok, prompt, opt, nullptr);
    REQUIRE(r.ok());
    n_tokens += static_cast<int64_t>(r->output_ids.size());
    text += " " + r->text;
  }
  const auto words = Words(text);
  const auto known = std::count_if(words.begin(), words.end(),
                                   [&](const std::string& w) { return dict.count(w) > 0; });
  const double ratio = static_cast<double>(known) / static_cast<double>(words.size());
  WARN("bundled model: " << n_tokens << " tokens, " << words.size() << " words, "
                         << 100.0 * ratio << "% in the word list; sample: "
                         << text.substr(0, 300));
  REQUIRE(words.size() >= 300);
  CHECK(ratio >= 0.70);
}
