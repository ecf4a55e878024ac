#include "duet/sampling/stop.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace duet::sampling {

std::string_view FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStopString:
      return "stop";
    case FinishReason::kMaxTokens:
      return "length";
  }
  return "unknown";
}

absl::Status Validate(const StopParams& p) {
  if (p.max_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be > 0, got ", p.max_tokens));
  }
  for (size_t i = 0; i < p.eos_ids.size(); ++i) {
    if (p.eos_ids[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("eos_ids[", i, "] must be >= 0, got ", p.eos_ids[i]));
    }
  }
  for (size_t i = 0; i < p.stop_strings.size(); ++i) {
    if (p.stop_strings[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_strings[", i, "] must not be empty, got \"\""));
    }
  }
  return absl::OkStatus();
}

StopChecker::StopChecker(StopParams p) : params_(std::move(p)) {
  std::erase_if(params_.stop_strings, [](const std::string& s) { return s.empty(); });
}

size_t StopChecker::HoldLength() const {
  const std::string_view held = held_;
  size_t best = 0;
  for (const std::string& s : params_.stop_strings) {
    for (size_t len = std::min(s.size() - 1, held.size()); len > best; --len) {
      if (held.ends_with(std::string_view(s).substr(0, len))) {
        best = len;
        break;
      }
    }
  }
  return best;
}

StopChecker::Step StopChecker::Push(int32_t token, std::string_view text_delta) {
  Step step;
  if (finish_ != FinishReason::kNone) {
    step.finish = finish_;
    return step;
  }
  ++n_generated_;

  // 1. Eos: the held text is now decided (it was not a stop string); the eos text is dropped.
  if (!params_.ignore_eos &&
      std::find(params_.eos_ids.begin(), params_.eos_ids.end(), token) != params_.eos_ids.end()) {
    step.emit = std::exchange(held_, {});
    finish_ = step.finish = FinishReason::kEos;
    return step;
  }

  // 2. Stop strings. A match ending in this delta starts inside held_ + delta, because held_ is
  //    the longest tail of the earlier text that could begin a stop string. Earliest end wins,
  //    then earliest start.
  held_.append(text_delta);
  size_t cut = std::string::npos;
  size_t cut_end = std::string::npos;
  for (const std::string& s : params_.stop_strings) {
    const size_t pos = held_.find(s);
    if (pos == std::string::npos) continue;
    const size_t end = pos + s.size();
    if (end < cut_end || (end == cut_end && pos < cut)) {
      cut = pos;
      cut_end = end;
    }
  }
  if (cut != std::string::npos) {
    step.emit = held_.substr(0, cut);
    held_.clear();
    finish_ = step.finish = FinishReason::kStopString;
    return step;
  }

  // 3. Emit all but the tail that could still start a stop string.
  const size_t hold = HoldLength();
  step.emit = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);

  // 4. Length: nothing more will come, so nothing needs holding.
  if (n_generated_ >= params_.max_tokens) {
    step.emit += std::exchange(held_, {});
    finish_ = step.finish = FinishReason::kMaxTokens;
  }
  return step;
}

std::string StopChecker::Flush() { return std::exchange(held_, {}); }

}  // namespace duet::sampling
