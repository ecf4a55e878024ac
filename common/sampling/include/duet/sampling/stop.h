// When generation stops, and which text reaches the client.
//
// StopChecker sees each generated token with the text it decoded to, and decides what may be
// emitted now: text that could still turn out to be the start of a stop string is held back until
// the next tokens decide it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace duet::sampling {

enum class FinishReason : uint8_t { kNone, kEos, kStopString, kMaxTokens };

// "none", "eos", "stop", "length".
std::string_view FinishReasonName(FinishReason r);

struct StopParams {
  // Generated tokens, the eos token included; must be > 0.
  int32_t max_tokens = 16;
  // Stop when one is generated; its text is not emitted. Each must be >= 0.
  std::vector<int32_t> eos_ids;
  // Stop when the generated text contains one; text from the stop string on is not emitted.
  // None may be empty.
  std::vector<std::string> stop_strings;
  // Eos ids are ordinary tokens.
  bool ignore_eos = false;
};

// OK, or INVALID_ARGUMENT naming the first bad field and its value.
absl::Status Validate(const StopParams& p);

// One sequence's stop decision. Not thread-safe: one per sequence.
//
// Stop strings are matched against the generated text only (not the prompt), across any split
// into token deltas. When several stop strings occur, the one that is complete first in the text
// wins (ties: the longer one), so the result does not depend on how the text was split into
// tokens. When one step meets several conditions, the reason is eos, then stop string, then
// max_tokens. Held-back text is released whenever a step finishes for eos or max_tokens.
class StopChecker {
 public:
  // p should pass Validate(); empty stop strings are ignored.
  explicit StopChecker(StopParams p);

  struct Step {
    std::string emit;                           // text to send now (may be empty)
    FinishReason finish = FinishReason::kNone;  // kNone: keep generating
  };

  // Call once per generated token with the text that token added (may be empty, e.g. a partial
  // UTF-8 character held by the detokenizer). After a step that finished, Push changes nothing
  // and returns no text and the same finish reason.
  Step Push(int32_t token, std::string_view text_delta);

  // Returns and clears the text still held back, for when generation ends for another reason
  // (e.g. cancelled). Empty after a stop string, eos or max_tokens.
  std::string Flush();

  // Tokens pushed before (and including) the finishing one.
  int32_t n_generated() const { return n_generated_; }
  FinishReason finish() const { return finish_; }

 private:
  // Length of the longest suffix of held_ that is a proper prefix of some stop string.
  size_t HoldLength() const;

  StopParams params_;
  std::string held_;  // text not yet emitted: a possible start of a stop string
  int32_t n_generated_ = 0;
  FinishReason finish_ = FinishReason::kNone;
};

}  // namespace duet::sampling
