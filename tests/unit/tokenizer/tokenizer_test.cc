// Hermetic tests of duet::tokenizer on tiny hand-written fixtures (tests/data/tokenizer/):
//   tiny_bytelevel/  byte-level BPE (NFC, Split regex + ByteLevel, pair merges, added tokens with
//                    lstrip/rstrip, a hole in the ids, BOS template, tokenizer_config.json)
//   tiny_spm/        Llama-2 style BPE (Prepend/Replace normalizer, byte fallback, fuse_unk,
//                    "a b" merges, Replace/ByteFallback/Fuse/Strip decoder, BOS template)
//   tiny_gpt2/       GPT-2 vocab.json + merges.txt
// Variants (Metaspace, Strip stop, errors) are built from these in the tests.
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "duet/tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using duet::tokenizer::StreamDecoder;
using duet::tokenizer::Tokenizer;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;

fs::path DataDir() { return fs::path(DUET_SOURCE_DIR) / "tests/data/tokenizer"; }

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::unique_ptr<Tokenizer> MustLoad(const std::string& name) {
  auto t = Tokenizer::Load(DataDir() / name);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return *std::move(t);
}

std::unique_ptr<Tokenizer> MustFromJson(const json& j) {
  auto t = Tokenizer::FromJson(j.dump());
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return *std::move(t);
}

json FixtureJson(const std::string& name) {
  return json::parse(ReadFile(DataDir() / name / "tokenizer.json"));
}

// A directory under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("duet_tokenizer_test_" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  void Write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name, std::ios::binary) << text;
  }
};

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

// Streams `ids` and checks the StreamDecoder contract against Decode. Returns the Push outputs.
std::vector<std::string> CheckStream(const Tokenizer& tok, const Ids& ids, bool skip_special) {
  StreamDecoder stream(tok, skip_special);
  std::vector<std::string> pieces;
  std::string all;
  for (int32_t id : ids) {
    pieces.push_back(stream.Push(id));
    CHECK(IsValidUtf8(pieces.back()));
    all += pieces.back();
  }
  const std::string tail = stream.Flush();
  CHECK(IsValidUtf8(tail));
  all += tail;
  CHECK(all == tok.Decode(ids, skip_special));
  return pieces;
}

constexpr const char* kEmoji = "\xF0\x9F\x98\x80";  // U+1F600, 4 bytes
constexpr const char* kCjk = "\xE5\xAD\x97";        // U+5B57, 3 bytes

}  // namespace

TEST_CASE("tokenizer: byte-level BPE: merges, pre-tokenizer regex and round trip", "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  const int32_t hello = 40, world = 45;  // "hello", "Ġworld"
  CHECK(tok->Encode("hello world") == Ids{hello, world});
  CHECK(tok->Encode("") == Ids{});
  CHECK(tok->Decode(Ids{hello, world}) == "hello world");
  // "'s" is a contraction in any case for this regex ((?i:...)): "'S" stays one pre-token too.
  CHECK(tok->Encode("hello's") == Ids{hello, 53});
  // Two spaces then a word: "Ġ" + "Ġworld" (\s+(?!\S) leaves the last space to the word).
  CHECK(tok->Encode("hello  world") == Ids{hello, 20, world});
  CHECK(tok->Decode(tok->Encode("hello  world\n\t")) == "hello  world\n\t");
  // Digits are split in groups of at most three.
  CHECK(tok->Encode("1231") == Ids{17, 18, 19, 17});
}

TEST_CASE("tokenizer: byte-level BPE: NFC normalizer", "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  const Ids cafe = {51};                       // "cafÃ©" = "café" in byte-level characters
  CHECK(tok->Encode("caf\xC3\xA9") == cafe);   // é precomposed
  CHECK(tok->Encode("cafe\xCC\x81") == cafe);  // e + combining acute: NFC composes it
  CHECK(tok->Decode(cafe) == "caf\xC3\xA9");
}

TEST_CASE("tokenizer: byte-level BPE: a multi-byte character split across tokens", "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  // The emoji's 4 bytes become "ðŁĺ" (3 bytes) + "Ģ" (1 byte); the CJK char is 3 one-byte tokens.
  const Ids emoji = tok->Encode(kEmoji);
  CHECK(emoji == Ids{47, 28});
  const Ids cjk = tok->Encode(kCjk);
  CHECK(cjk == Ids{29, 30, 31});
  CHECK(tok->Decode(emoji) == kEmoji);
  CHECK(tok->Decode(cjk) == kCjk);
  // A lone partial character decodes to U+FFFD, never to invalid UTF-8.
  CHECK(tok->Decode(Ids{47}) == "\xEF\xBF\xBD");
  CHECK(tok->Decode(Ids{29, 30, 40}) == "\xEF\xBF\xBDhello");
}

TEST_CASE("tokenizer: added tokens: matched in text, longest first, lstrip/rstrip, special flags",
          "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  const int32_t hello = 40, eot = 54, tool = 56, think = 57, ab = 58, abcd = 59;
  CHECK(tok->Encode("<|endoftext|>") == Ids{eot});
  CHECK(tok->Encode("hello<|endoftext|>hello") == Ids{hello, eot, hello});
  // A partial special token is plain text.
  CHECK(tok->Encode("<|endoftext|") == Ids{32, 34, 1, 13, 6, 3, 9, 10, 1, 35, 10, 34});
  // Longest match wins at a position.
  CHECK(tok->Encode("<ab><cd>") == Ids{abcd});
  CHECK(tok->Encode("<ab><c") == Ids{ab, 32, 8});
  // <tool> has lstrip and rstrip: it absorbs the spaces around it.
  CHECK(tok->Encode("hello <tool>  hello") == Ids{hello, tool, hello});
  // <think> has neither: the spaces stay in the text around it.
  CHECK(tok->Encode("hello <think> hello") == Ids{hello, 20, think, 20, hello});
  // Decoding: added tokens are literal text; only special ones are skipped.
  CHECK(tok->Decode(Ids{hello, eot, think}) == "hello<|endoftext|><think>");
  CHECK(tok->Decode(Ids{hello, eot, think}, /*skip_special_tokens=*/true) == "hello<think>");
  CHECK(tok->IsSpecialId(eot));
  CHECK_FALSE(tok->IsSpecialId(think));
}

TEST_CASE("tokenizer: vocabulary queries, bos/eos and invalid ids", "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  CHECK(tok->vocab_size() == 62);  // 54 model tokens, added tokens up to id 61, a hole at 60
  CHECK(tok->TokenToId("Ġworld") == 45);
  CHECK(tok->TokenToId("<think>") == 57);
  CHECK_FALSE(tok->TokenToId("nope").has_value());
  CHECK(tok->IdToToken(45) == "Ġworld");
  CHECK(tok->bos_id() == 55);  // from tokenizer_config.json
  CHECK(tok->eos_id() == 54);  // from tokenizer_config.json ({"content": ...} form)
  CHECK(tok->IsValidId(0));
  CHECK(tok->IsValidId(61));
  CHECK_FALSE(tok->IsValidId(60));  // hole
  CHECK_FALSE(tok->IsValidId(-1));
  CHECK_FALSE(tok->IsValidId(62));
  CHECK_FALSE(tok->IdToToken(60).has_value());
  // Invalid ids are skipped by Decode (and by StreamDecoder), never a crash.
  CHECK(tok->Decode(Ids{-5, 40, 60, 1 << 30, 45}) == "hello world");
  CheckStream(*tok, Ids{-5, 40, 60, 1 << 30, 45}, false);
}

TEST_CASE("tokenizer: add_special_tokens applies the post_processor template", "[tokenizer]") {
  const auto byte_level = MustLoad("tiny_bytelevel");
  CHECK(byte_level->Encode("hello", true) == Ids{55, 40});
  CHECK(byte_level->Encode("", true) == Ids{55});
  const auto spm = MustLoad("tiny_spm");
  CHECK(spm->Encode("hello world", true) == Ids{1, 23, 28});
  const auto gpt2 = MustLoad("tiny_gpt2");  // GPT-2 adds nothing
  CHECK(gpt2->Encode("hello", true) == Ids{11});
}

TEST_CASE("tokenizer: input that is not valid UTF-8 is repaired to U+FFFD first", "[tokenizer]") {
  const auto tok = MustLoad("tiny_spm");
  // U+FFFD is not in the vocabulary: bytes EF BF BD have no byte tokens -> <unk>.
  CHECK(tok->Encode("hello\xFF") == tok->Encode("hello\xEF\xBF\xBD"));
  CHECK(tok->Encode("\xE5\xAD") == tok->Encode("\xEF\xBF\xBD"));
}

TEST_CASE("tokenizer: SentencePiece-style BPE: prepend, byte fallback, unk fusion, decoder chain",
          "[tokenizer]") {
  const auto tok = MustLoad("tiny_spm");
  const int32_t space = 11, hello = 23, world = 28;
  CHECK(tok->Encode("hello world") == Ids{hello, world});
  CHECK(tok->Decode(Ids{hello, world}) == "hello world");
  CHECK(tok->Decode(Ids{1, hello, world}) == "<s> hello world");
  CHECK(tok->Decode(Ids{1, hello, world}, true) == "hello world");
  // Characters outside the vocabulary fall back to their UTF-8 bytes.
  CHECK(tok->Encode(kCjk) == Ids{space, 4, 5, 6});
  CHECK(tok->Encode(std::string("hello\n") + kEmoji) == Ids{hello, 3, 7, 8, 9, 10});
  CHECK(tok->Decode(tok->Encode(std::string("hello\n") + kEmoji)) ==
        std::string("hello\n") + kEmoji);
  // Without byte tokens for them (ß = C3 9F), characters become <unk>, and runs of <unk> fuse.
  CHECK(tok->Encode("\xC3\x9F\xC3\x9F") == Ids{space, 0});
  CHECK(tok->Encode("\xC3\x9Fhello") == Ids{space, 0, 12, 13, 20, 15});
  // Leading spaces survive: the decoder strips exactly one (the prepended "▁").
  CHECK(tok->Decode(tok->Encode("  hello")) == "  hello");
  // Text after an added token gets its own "▁" (HF normalizes each piece between added tokens).
  CHECK(tok->Encode("hello</s>hello") == Ids{hello, 2, hello});
  CHECK(tok->bos_id() == 1);  // from the template
  CHECK(tok->eos_id() == 2);  // from the well-known name
}

TEST_CASE("tokenizer: Metaspace pre-tokenizer and decoder", "[tokenizer]") {
  json j = FixtureJson("tiny_spm");
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  j["decoder"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  const auto tok = MustFromJson(j);
  CHECK(tok->Encode("hello world") == Ids{23, 28});
  CHECK(tok->Decode(Ids{23, 28}) == "hello world");
  // prepend_scheme "first": only text at the very start gets "▁".
  CHECK(tok->Encode("<s>hello") == Ids{1, 12, 13, 20, 15});
  CHECK(tok->Decode(Ids{1, 12, 13, 20, 15}) == "<s>hello");
  CHECK(tok->Decode(Ids{1, 23}) == "<s> hello");  // the first token is <s>: nothing stripped
  CheckStream(*tok, Ids{23, 28, 1, 23}, false);
  CheckStream(*tok, Ids{1, 23, 28}, true);
  // split = true splits before each "▁": same ids here, the words are in the vocabulary.
  j["pre_tokenizer"]["split"] = true;
  CHECK(MustFromJson(j)->Encode("hello world") == Ids{23, 28});
}

TEST_CASE("tokenizer: GPT-2 vocab.json + merges.txt", "[tokenizer]") {
  const auto tok = MustLoad("tiny_gpt2");
  CHECK(tok->Encode("hello world<|endoftext|>hello") == Ids{11, 16, 17, 11});
  CHECK(tok->Encode("hello's") == Ids{11, 20});
  CHECK(tok->Encode("hello'S") == Ids{11, 18, 21});  // GPT-2's contractions are lowercase only
  CHECK(tok->Decode(Ids{11, 16, 17, 11}) == "hello world<|endoftext|>hello");
  CHECK(tok->Decode(Ids{11, 16, 17, 11}, true) == "hello worldhello");
  CHECK(tok->bos_id() == 17);
  CHECK(tok->eos_id() == 17);
  CHECK(tok->IsSpecialId(17));
  CHECK(tok->vocab_size() == 22);
}

TEST_CASE("tokenizer: StreamDecoder holds incomplete characters", "[tokenizer][stream]") {
  const auto byte_level = MustLoad("tiny_bytelevel");
  // Emoji: the first token carries 3 of its 4 bytes.
  CHECK(CheckStream(*byte_level, Ids{40, 47, 28, 45}, false) ==
        std::vector<std::string>{"hello", "", kEmoji, " world"});
  // CJK: one byte per token.
  CHECK(CheckStream(*byte_level, Ids{29, 30, 31}, false) == std::vector<std::string>{"", "", kCjk});
  // An incomplete character before a complete one is replaced, as Decode does.
  CHECK(CheckStream(*byte_level, Ids{29, 30, 40}, false) ==
        std::vector<std::string>{"", "", "\xEF\xBF\xBDhello"});
  {
    StreamDecoder stream(*byte_level);
    CHECK(stream.Push(47).empty());
    CHECK(stream.Flush() == "\xEF\xBF\xBD");  // incomplete at the end
    CHECK(stream.Push(40) == "hello");        // Flush reset the decoder
  }
  const auto spm = MustLoad("tiny_spm");
  // Byte-fallback tokens; the leading "▁" of the first token is stripped.
  CHECK(CheckStream(*spm, Ids{11, 4, 5, 6}, false) == std::vector<std::string>{"", "", "", kCjk});
  CHECK(CheckStream(*spm, Ids{23, 28}, false) == std::vector<std::string>{"hello", " world"});
  CHECK(CheckStream(*spm, Ids{1, 23}, true) == std::vector<std::string>{"", "hello"});
  CHECK(CheckStream(*spm, Ids{1, 23}, false) == std::vector<std::string>{"<s>", " hello"});
}

TEST_CASE("tokenizer: StreamDecoder equals Decode on random id sequences", "[tokenizer][stream]") {
  json strip_both = FixtureJson("tiny_spm");
  strip_both["decoder"]["decoders"][3] = {
      {"type", "Strip"}, {"content", " "}, {"start", 2}, {"stop", 2}};
  json no_decoder = FixtureJson("tiny_spm");
  no_decoder["decoder"] = nullptr;
  std::vector<std::unique_ptr<Tokenizer>> tokenizers;
  tokenizers.push_back(MustLoad("tiny_bytelevel"));
  tokenizers.push_back(MustLoad("tiny_spm"));
  tokenizers.push_back(MustLoad("tiny_gpt2"));
  tokenizers.push_back(MustFromJson(strip_both));
  tokenizers.push_back(MustFromJson(no_decoder));
  std::mt19937 rng(1234);
  for (const auto& tok : tokenizers) {
    std::uniform_int_distribution<int32_t> pick(-1, tok->vocab_size());
    for (int n = 0; n < 300; ++n) {
      Ids ids(rng() % 12);
      for (int32_t& id : ids) id = pick(rng);
      INFO("sequence " << n);
      CheckStream(*tok, ids, false);
      CheckStream(*tok, ids, true);
    }
  }
}

TEST_CASE("tokenizer: Encode and Decode from many threads", "[tokenizer]") {
  const auto tok = MustLoad("tiny_bytelevel");
  const std::vector<std::string> texts = {"hello world", "caf\xC3\xA9 hello's", kEmoji,
                                          "hello <tool> world<|endoftext|>", "  1231  "};
  std::vector<Ids> want;
  for (const auto& t : texts) want.push_back(tok->Encode(t));
  std::atomic<int> n_wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        const size_t k = static_cast<size_t>(i) % texts.size();
        if (tok->Encode(texts[k]) != want[k] || tok->Decode(want[k]) != tok->Decode(want[k])) {
          ++n_wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(n_wrong == 0);
}

TEST_CASE("tokenizer: Load errors name the problem", "[tokenizer][errors]") {
  SECTION("missing directory") {
    auto t = Tokenizer::Load("/nonexistent/duet/model");
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kNotFound);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("/nonexistent/duet/model"));
  }
  SECTION("directory without tokenizer files") {
    TempDir dir;
    auto t = Tokenizer::Load(dir.path);
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kNotFound);
    CHECK_THAT(std::string(t.status().message()),
               Catch::Contains("neither tokenizer.json nor vocab.json"));
  }
  SECTION("vocab.json without merges.txt") {
    TempDir dir;
    dir.Write("vocab.json", "{\"a\": 0}");
    auto t = Tokenizer::Load(dir.path);
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kNotFound);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("merges.txt is missing"));
  }
  SECTION("malformed tokenizer.json") {
    TempDir dir;
    dir.Write("tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
    auto t = Tokenizer::Load(dir.path);
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("not valid JSON"));
    CHECK_THAT(std::string(t.status().message()), Catch::Contains(dir.path.string()));
  }
  SECTION("malformed merges.txt") {
    TempDir dir;
    dir.Write("vocab.json", "{\"a\": 0, \"b\": 1, \"ab\": 2}");
    dir.Write("merges.txt", "#version: 0.2\na b\nab\n");
    auto t = Tokenizer::Load(dir.path);
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("merges.txt line 3"));
  }
}

TEST_CASE("tokenizer: FromJson errors name the problem", "[tokenizer][errors]") {
  auto error_of = [](const json& j) {
    auto t = Tokenizer::FromJson(j.dump());
    REQUIRE_FALSE(t.ok());
    return t.status();
  };
  const json base = FixtureJson("tiny_spm");
  SECTION("not JSON") {
    auto t = Tokenizer::FromJson("tokenizer.json? no");
    REQUIRE_FALSE(t.ok());
    CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(t.status().message()), Catch::Contains("not valid JSON"));
  }
  SECTION("unknown model type") {
    json j = base;
    j["model"]["type"] = "WordPiece";
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kUnimplemented);
    CHECK_THAT(std::string(s.message()), Catch::Contains("model type 'WordPiece'"));
  }
  SECTION("unsupported normalizer") {
    json j = base;
    j["normalizer"] = {{"type", "BertNormalizer"}};
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kUnimplemented);
    CHECK_THAT(std::string(s.message()), Catch::Contains("normalizer type 'BertNormalizer'"));
  }
  SECTION("unsupported decoder") {
    json j = base;
    j["decoder"] = {{"type", "WordPiece"}, {"prefix", "##"}};
    CHECK_THAT(std::string(error_of(j).message()), Catch::Contains("decoder type 'WordPiece'"));
  }
  SECTION("no model") {
    json j = base;
    j.erase("model");
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("no \"model\""));
  }
  SECTION("merge of unknown tokens") {
    json j = base;
    j["model"]["merges"].push_back("x y");
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("'x y'"));
  }
  SECTION("wrong field type") {
    json j = base;
    j["model"]["vocab"]["h"] = "twelve";
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("id out of range") {
    json j = base;
    j["model"]["vocab"]["h"] = -3;
    CHECK(error_of(j).code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("regex that does not compile") {
    json j = base;
    j["pre_tokenizer"] = {{"type", "Split"},
                          {"pattern", {{"Regex", "(unclosed"}}},
                          {"behavior", "Isolated"},
                          {"invert", false}};
    const absl::Status s = error_of(j);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("(unclosed"));
  }
}
