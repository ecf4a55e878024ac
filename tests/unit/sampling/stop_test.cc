// StopChecker: what text is emitted, what is held back, and why generation finishes, including
// stop strings split across token deltas in every possible way.
#include "duet/sampling/stop.h"

#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

using duet::sampling::FinishReason;
using duet::sampling::FinishReasonName;
using duet::sampling::StopChecker;
using duet::sampling::StopParams;
using duet::sampling::Validate;

namespace {

constexpr int32_t kEos = 2;
constexpr int32_t kTok = 7;  // any ordinary token

StopParams WithStops(std::vector<std::string> stops, int32_t max_tokens = 100) {
  StopParams p;
  p.max_tokens = max_tokens;
  p.eos_ids = {kEos};
  p.stop_strings = std::move(stops);
  return p;
}

struct Run {
  std::string emitted;
  FinishReason finish = FinishReason::kNone;
  int32_t n_pushed = 0;
};

// Pushes the deltas until a finish; then adds what Flush returns.
Run PushAll(StopChecker& c, const std::vector<std::string>& deltas) {
  Run run;
  for (const std::string& d : deltas) {
    ++run.n_pushed;
    auto step = c.Push(kTok, d);
    run.emitted += step.emit;
    if (step.finish != FinishReason::kNone) {
      run.finish = step.finish;
      break;
    }
  }
  run.emitted += c.Flush();
  return run;
}

// What a stop string does to a whole text: the text before the first stop string to complete
// (ties: the longest), or the whole text.
std::pair<std::string, bool> Reference(const std::string& text,
                                       const std::vector<std::string>& stops) {
  for (size_t end = 1; end <= text.size(); ++end) {
    size_t longest = 0;
    for (const std::string& s : stops) {
      if (s.size() <= end && s.size() > longest && text.compare(end - s.size(), s.size(), s) == 0) {
        longest = s.size();
      }
    }
    if (longest > 0) return {text.substr(0, end - longest), true};
  }
  return {text, false};
}

}  // namespace

TEST_CASE("FinishReasonName", "[stop]") {
  REQUIRE(FinishReasonName(FinishReason::kNone) == "none");
  REQUIRE(FinishReasonName(FinishReason::kEos) == "eos");
  REQUIRE(FinishReasonName(FinishReason::kStopString) == "stop");
  REQUIRE(FinishReasonName(FinishReason::kMaxTokens) == "length");
}

TEST_CASE("Validate StopParams", "[stop]") {
  REQUIRE(Validate(StopParams{}).ok());
  StopParams p;
  p.max_tokens = 0;
  auto s = Validate(p);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("max_tokens") != std::string_view::npos);
  REQUIRE(s.message().find("got 0") != std::string_view::npos);
  p.max_tokens = -3;
  s = Validate(p);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("-3") != std::string_view::npos);

  p = {};
  p.stop_strings = {"###", ""};
  s = Validate(p);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("stop_strings[1]") != std::string_view::npos);
  REQUIRE(s.message().find("\"\"") != std::string_view::npos);

  p = {};
  p.eos_ids = {2, -1};
  s = Validate(p);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("eos_ids[1]") != std::string_view::npos);
  REQUIRE(s.message().find("-1") != std::string_view::npos);
}

TEST_CASE("Eos stops and its text is not emitted", "[stop]") {
  StopChecker c(WithStops({}));
  auto a = c.Push(kTok, "Hello");
  REQUIRE(a.emit == "Hello");
  REQUIRE(a.finish == FinishReason::kNone);
  auto b = c.Push(kEos, "</s>");
  REQUIRE(b.emit.empty());
  REQUIRE(b.finish == FinishReason::kEos);
  REQUIRE(c.n_generated() == 2);
  // Nothing changes afterwards.
  auto after = c.Push(kTok, "more");
  REQUIRE(after.emit.empty());
  REQUIRE(after.finish == FinishReason::kEos);
  REQUIRE(c.n_generated() == 2);
  REQUIRE(c.Flush().empty());
}

TEST_CASE("Eos releases text held for a possible stop string", "[stop]") {
  StopChecker c(WithStops({"###"}));
  REQUIRE(c.Push(kTok, "a#").emit == "a");
  auto step = c.Push(kEos, "");
  REQUIRE(step.emit == "#");
  REQUIRE(step.finish == FinishReason::kEos);
  REQUIRE(c.Flush().empty());
}

TEST_CASE("ignore_eos treats eos as an ordinary token", "[stop]") {
  StopParams p = WithStops({}, 3);
  p.ignore_eos = true;
  StopChecker c(p);
  auto step = c.Push(kEos, "<eos>");
  REQUIRE(step.emit == "<eos>");
  REQUIRE(step.finish == FinishReason::kNone);
}

TEST_CASE("max_tokens counts every token; eos wins when both happen", "[stop]") {
  {
    StopChecker c(WithStops({}, 3));
    REQUIRE(c.Push(kTok, "a").finish == FinishReason::kNone);
    REQUIRE(c.Push(kTok, "").finish == FinishReason::kNone);  // an empty delta still counts
    auto step = c.Push(kTok, "c");
    REQUIRE(step.finish == FinishReason::kMaxTokens);
    REQUIRE(step.emit == "c");
    REQUIRE(c.n_generated() == 3);
  }
  {
    StopChecker c(WithStops({}, 2));
    REQUIRE(c.Push(kTok, "a").finish == FinishReason::kNone);
    auto step = c.Push(kEos, "</s>");
    REQUIRE(step.finish == FinishReason::kEos);
    REQUIRE(step.emit.empty());
  }
  {
    // max_tokens releases held text too; a stop string on the last token still says "stop".
    StopChecker c(WithStops({"END"}, 2));
    REQUIRE(c.Push(kTok, "x E").emit == "x ");
    auto step = c.Push(kTok, "N");
    REQUIRE(step.finish == FinishReason::kMaxTokens);
    REQUIRE(step.emit == "EN");
    StopChecker d(WithStops({"END"}, 2));
    d.Push(kTok, "x E");
    auto stop = d.Push(kTok, "ND!");
    REQUIRE(stop.finish == FinishReason::kStopString);
    REQUIRE(stop.emit.empty());
  }
}

TEST_CASE("A stop string in one delta: text before it emitted, from it on dropped", "[stop]") {
  StopChecker c(WithStops({"STOP"}));
  REQUIRE(c.Push(kTok, "Hello").emit == "Hello");
  auto step = c.Push(kTok, " world STOP and more");
  REQUIRE(step.emit == " world ");
  REQUIRE(step.finish == FinishReason::kStopString);
  REQUIRE(c.Flush().empty());
}

TEST_CASE("A stop string split across three deltas", "[stop]") {
  StopChecker c(WithStops({"STOP"}));
  auto a = c.Push(kTok, "Hello S");
  REQUIRE(a.emit == "Hello ");
  auto b = c.Push(kTok, "TO");
  REQUIRE(b.emit.empty());
  REQUIRE(b.finish == FinishReason::kNone);
  auto d = c.Push(kTok, "P, after");
  REQUIRE(d.emit.empty());
  REQUIRE(d.finish == FinishReason::kStopString);
  REQUIRE(c.n_generated() == 3);
}

TEST_CASE("A held partial match that is not a stop string is emitted later", "[stop]") {
  StopChecker c(WithStops({"STOP"}));
  REQUIRE(c.Push(kTok, "ST").emit.empty());
  REQUIRE(c.Push(kTok, "A").emit == "STA");
  // A failed match can hide the start of the real one: "SSTOP".
  REQUIRE(c.Push(kTok, "S").emit.empty());
  REQUIRE(c.Push(kTok, "S").emit == "S");
  REQUIRE(c.Push(kTok, "T").emit.empty());
  auto step = c.Push(kTok, "OP");
  REQUIRE(step.emit.empty());
  REQUIRE(step.finish == FinishReason::kStopString);
}

TEST_CASE("Flush returns the held text once", "[stop]") {
  StopChecker c(WithStops({"STOP"}));
  REQUIRE(c.Push(kTok, "abc ST").emit == "abc ");
  REQUIRE(c.Flush() == "ST");
  REQUIRE(c.Flush().empty());
}

TEST_CASE("Overlapping stop strings", "[stop]") {
  const std::vector<std::string> stops = {"ab", "bc"};
  {
    StopChecker c(WithStops(stops));
    auto step = c.Push(kTok, "xabc");
    REQUIRE(step.emit == "x");
    REQUIRE(step.finish == FinishReason::kStopString);
  }
  {
    StopChecker c(WithStops(stops));
    REQUIRE(c.Push(kTok, "xb").emit == "x");  // "b" may start "bc"
    auto step = c.Push(kTok, "c");
    REQUIRE(step.emit.empty());
    REQUIRE(step.finish == FinishReason::kStopString);
  }
  {
    // The stop string completed first wins, however the text is split: "bc" completes before
    // "abcd" does.
    const std::vector<std::string> nested = {"abcd", "bc"};
    StopChecker one(WithStops(nested));
    REQUIRE(one.Push(kTok, "abcd").emit == "a");
    StopChecker split(WithStops(nested));
    REQUIRE(split.Push(kTok, "ab").emit.empty());
    REQUIRE(split.Push(kTok, "cd").emit == "a");
  }
}

TEST_CASE("Multi-byte UTF-8 stop strings and empty deltas", "[stop]") {
  StopChecker c(WithStops({"\xE2\x80\x94\xE2\x80\x94"}));  // two em dashes
  REQUIRE(c.Push(kTok, "caf\xC3\xA9 \xE2\x80").emit == "caf\xC3\xA9 ");
  REQUIRE(c.Push(kTok, "").emit.empty());
  REQUIRE(c.Push(kTok, "\x94").emit.empty());
  REQUIRE(c.Push(kTok, "\xE2\x80\x94!").finish == FinishReason::kStopString);
}

TEST_CASE("Any split of the text gives the same result as the whole text", "[stop]") {
  std::mt19937 rng(7);
  auto random_string = [&](size_t min_len, size_t max_len) {
    std::uniform_int_distribution<size_t> len(min_len, max_len);
    std::uniform_int_distribution<int> ch('a', 'c');
    std::string s(len(rng), ' ');
    for (char& x : s) x = static_cast<char>(ch(rng));
    return s;
  };
  for (int trial = 0; trial < 3000; ++trial) {
    const std::string text = random_string(0, 30);
    std::vector<std::string> stops;
    const int n_stops = 1 + trial % 3;
    for (int i = 0; i < n_stops; ++i) stops.push_back(random_string(2, 5));
    std::vector<std::string> deltas;
    for (size_t i = 0; i < text.size();) {
      const size_t len = std::uniform_int_distribution<size_t>(0, 4)(rng);
      deltas.push_back(text.substr(i, len));
      i += len;
    }
    StopChecker c(WithStops(stops));
    const Run run = PushAll(c, deltas);
    const auto [expected, stopped] = Reference(text, stops);
    INFO("text " << text << " stops " << stops.size() << " " << stops[0]);
    REQUIRE(run.emitted == expected);
    REQUIRE((run.finish == FinishReason::kStopString) == stopped);
  }
}
