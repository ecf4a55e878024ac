#include "pipeline.h"

#include <algorithm>
#include <utility>

namespace duet::tokenizer::internal {
namespace {

// The code point that ends just before byte offset `end` (valid UTF-8 assumed).
char32_t CodePointBefore(std::string_view text, size_t end, size_t* begin) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
  size_t i = b;
  if (begin != nullptr) *begin = b;
  return NextCodePoint(text, i);
}

bool IsWordChar(char32_t cp) { return cp == '_' || IsLetter(cp) || IsNumber(cp); }

std::string ReplaceAll(std::string_view text, std::string_view pattern, std::string_view content) {
  if (pattern.empty()) return std::string(text);
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(pattern, pos);
    if (hit == std::string_view::npos) break;
    out.append(text.substr(pos, hit - pos)).append(content);
    pos = hit + pattern.size();
  }
  out.append(text.substr(pos));
  return out;
}

std::string RegexReplaceAll(const Regex& regex, std::string_view text, std::string_view content) {
  std::string out;
  size_t pos = 0;
  for (const auto& [begin, end] : regex.FindAll(text)) {
    out.append(text.substr(pos, begin - pos)).append(content);
    pos = end;
  }
  out.append(text.substr(pos));
  return out;
}

std::string_view TrimWhiteSpace(std::string_view text, bool left, bool right) {
  if (left) {
    size_t i = 0;
    while (i < text.size()) {
      size_t next = i;
      if (!IsWhiteSpace(NextCodePoint(text, next))) break;
      i = next;
    }
    text.remove_prefix(i);
  }
  if (right) {
    size_t end = text.size();
    while (end > 0) {
      size_t begin;
      if (!IsWhiteSpace(CodePointBefore(text, end, &begin))) break;
      end = begin;
    }
    text = text.substr(0, end);
  }
  return text;
}

// A piece of text and whether it is a delimiter, as Split sees it.
struct Segment {
  size_t begin;
  size_t end;
  bool is_delimiter;
};

// Applies a split behaviour (Hugging Face's SplitDelimiterBehavior) to the segments of a text and
// returns the resulting pieces as [begin, end) ranges, empty ones dropped.
std::vector<std::pair<size_t, size_t>> SplitSegments(const std::vector<Segment>& segments,
                                                     SplitBehavior behavior) {
  std::vector<std::pair<size_t, size_t>> pieces;
  pieces.reserve(segments.size());
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments) {
        if (!s.is_delimiter) pieces.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kIsolated:
      for (const Segment& s : segments) pieces.emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kContiguous: {
      bool previous_delimiter = false;
      for (const Segment& s : segments) {
        if (s.is_delimiter && previous_delimiter && !pieces.empty()) {
          pieces.back().second = s.end;
        } else {
          pieces.emplace_back(s.begin, s.end);
        }
        previous_delimiter = s.is_delimiter;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_delimiter = false;
      for (const Segment& s : segments) {
        if (s.is_delimiter && !previous_delimiter && !pieces.empty()) {
          pieces.back().second = s.end;
        } else {
          pieces.emplace_back(s.begin, s.end);
        }
        previous_delimiter = s.is_delimiter;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_delimiter = false;  // the segment to the right was a delimiter
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->is_delimiter && !previous_delimiter && !pieces.empty()) {
          pieces.back().first = it->begin;
        } else {
          pieces.emplace_back(it->begin, it->end);
        }
        previous_delimiter = it->is_delimiter;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    }
  }
  std::erase_if(pieces, [](const auto& p) { return p.second <= p.first; });
  return pieces;
}

// Segments of a text of `size` bytes from match ranges: gaps and matches in order (no empty gaps).
std::vector<Segment> SegmentsFromMatches(size_t size,
                                         const std::vector<std::pair<size_t, size_t>>& matches,
                                         bool invert) {
  std::vector<Segment> segments;
  segments.reserve(matches.size() * 2 + 1);
  size_t pos = 0;
  for (const auto& [begin, end] : matches) {
    if (begin > pos) segments.push_back(Segment{pos, begin, invert});
    segments.push_back(Segment{begin, end, !invert});
    pos = end;
  }
  if (pos < size) segments.push_back(Segment{pos, size, invert});
  return segments;
}

std::vector<std::pair<size_t, size_t>> FindLiteral(std::string_view text,
                                                   std::string_view literal) {
  std::vector<std::pair<size_t, size_t>> matches;
  if (literal.empty()) return matches;
  for (size_t pos = text.find(literal); pos != std::string_view::npos;
       pos = text.find(literal, pos + literal.size())) {
    matches.emplace_back(pos, pos + literal.size());
  }
  return matches;
}

std::vector<std::pair<size_t, size_t>> FindDigits(std::string_view text, bool individual) {
  std::vector<std::pair<size_t, size_t>> matches;
  for (size_t i = 0; i < text.size();) {
    const size_t begin = i;
    if (!IsNumber(NextCodePoint(text, i))) continue;
    if (!individual && !matches.empty() && matches.back().second == begin) {
      matches.back().second = i;
    } else {
      matches.emplace_back(begin, i);
    }
  }
  return matches;
}

// Runs pre-tokenizer steps[k..] on `piece` and passes each resulting word to `emit`. Pieces are
// views into the caller's text where possible; only byte-level mapping makes new strings.
void PreTokenizeFrom(const std::vector<PreTokenizerStep>& steps, size_t k, std::string_view piece,
                     bool at_text_start, const WordSink& emit) {
  if (piece.empty()) return;
  if (k == steps.size()) {
    emit(piece);
    return;
  }
  const PreTokenizerStep& step = steps[k];
  // Recurses on the pieces of `text` given by match ranges and a behaviour.
  auto split = [&](std::string_view text, const std::vector<std::pair<size_t, size_t>>& matches,
                   bool invert, SplitBehavior behavior, bool byte_level) {
    const auto pieces = SplitSegments(SegmentsFromMatches(text.size(), matches, invert), behavior);
    for (size_t i = 0; i < pieces.size(); ++i) {
      const std::string_view p = text.substr(pieces[i].first, pieces[i].second - pieces[i].first);
      const bool at_start = at_text_start && i == 0;
      if (byte_level) {
        PreTokenizeFrom(steps, k + 1, BytesToByteLevel(p), at_start, emit);
      } else {
        PreTokenizeFrom(steps, k + 1, p, at_start, emit);
      }
    }
  };
  switch (step.kind) {
    case PreTokenizerStep::Kind::kSplit:
      split(piece, step.regex ? step.regex->FindAll(piece) : FindLiteral(piece, step.literal),
            step.invert, step.behavior, false);
      return;
    case PreTokenizerStep::Kind::kDigits:
      split(piece, FindDigits(piece, step.individual_digits), false,
            step.individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false);
      return;
    case PreTokenizerStep::Kind::kByteLevel: {
      std::string prefixed;
      if (step.add_prefix_space && !piece.starts_with(' ')) {
        prefixed.assign(" ").append(piece);
        piece = prefixed;
      }
      if (step.regex) {
        split(piece, step.regex->FindAll(piece), false, SplitBehavior::kIsolated, true);
      } else {
        PreTokenizeFrom(steps, k + 1, BytesToByteLevel(piece), at_text_start, emit);
      }
      return;
    }
    case PreTokenizerStep::Kind::kMetaspace: {
      std::string text = ReplaceAll(piece, " ", step.replacement);
      const bool prepend = step.prepend_scheme == PrependScheme::kAlways ||
                           (step.prepend_scheme == PrependScheme::kFirst && at_text_start);
      if (prepend && !text.starts_with(step.replacement)) text = step.replacement + text;
      if (step.split) {
        split(text, FindLiteral(text, step.replacement), false, SplitBehavior::kMergedWithNext,
              false);
      } else {
        PreTokenizeFrom(steps, k + 1, text, at_text_start, emit);
      }
      return;
    }
  }
}

}  // namespace

void AddedTokenMatcher::Build(const std::vector<const AddedToken*>& tokens) {
  nodes_.assign(1, Node{});
  edges_.clear();
  first_byte_.fill(false);
  for (const AddedToken* token : tokens) {
    if (token->content.empty()) continue;
    int32_t node = 0;
    for (char c : token->content) {
      const auto byte = static_cast<unsigned char>(c);
      const auto [it, inserted] =
          edges_.try_emplace(EdgeKey(node, byte), static_cast<int32_t>(nodes_.size()));
      if (inserted) nodes_.push_back(Node{});
      node = it->second;
    }
    // With duplicate contents the first declared token wins.
    if (nodes_[node].token == nullptr) nodes_[node].token = token;
    first_byte_[static_cast<unsigned char>(token->content[0])] = true;
  }
}

std::vector<AddedTokenMatcher::Match> AddedTokenMatcher::FindAll(std::string_view text) const {
  std::vector<Match> matches;
  if (empty()) return matches;
  size_t floor = 0;  // matches may not reach back before the end of the previous one
  size_t i = 0;
  while (i < text.size()) {
    if (!first_byte_[static_cast<unsigned char>(text[i])]) {
      ++i;
      continue;
    }
    // Longest token starting at i.
    const AddedToken* best = nullptr;
    size_t best_end = 0;
    int32_t node = 0;
    for (size_t j = i; j < text.size(); ++j) {
      const auto it = edges_.find(EdgeKey(node, static_cast<unsigned char>(text[j])));
      if (it == edges_.end()) break;
      node = it->second;
      if (nodes_[node].token != nullptr) {
        best = nodes_[node].token;
        best_end = j + 1;
      }
    }
    if (best != nullptr && best->single_word) {
      size_t unused;
      const bool word_before = i > 0 && IsWordChar(CodePointBefore(text, i, &unused));
      size_t k = best_end;
      const bool word_after = best_end < text.size() && IsWordChar(NextCodePoint(text, k));
      if (word_before || word_after) best = nullptr;
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    Match m{i, best_end, best};
    if (best->lstrip) {
      while (m.begin > floor) {
        size_t begin;
        if (!IsWhiteSpace(CodePointBefore(text, m.begin, &begin)) || begin < floor) break;
        m.begin = begin;
      }
    }
    if (best->rstrip) {
      while (m.end < text.size()) {
        size_t next = m.end;
        if (!IsWhiteSpace(NextCodePoint(text, next))) break;
        m.end = next;
      }
    }
    matches.push_back(m);
    floor = m.end;
    i = m.end;
  }
  return matches;
}

std::string ApplyNormalizers(const std::vector<NormalizerStep>& steps, std::string text) {
  for (const NormalizerStep& step : steps) {
    switch (step.kind) {
      case NormalizerStep::Kind::kUnicode:
        text = Normalize(text, step.form);
        break;
      case NormalizerStep::Kind::kLowercase:
        text = Lowercase(text);
        break;
      case NormalizerStep::Kind::kPrepend:
        if (!text.empty()) text = step.text + text;
        break;
      case NormalizerStep::Kind::kReplace:
        text = step.regex ? RegexReplaceAll(*step.regex, text, step.content)
                          : ReplaceAll(text, step.text, step.content);
        break;
      case NormalizerStep::Kind::kStrip:
        text = std::string(TrimWhiteSpace(text, step.strip_left, step.strip_right));
        break;
    }
  }
  return text;
}

void PreTokenize(const std::vector<PreTokenizerStep>& steps, std::string_view text,
                 bool at_text_start, const WordSink& emit) {
  PreTokenizeFrom(steps, 0, text, at_text_start, emit);
}

std::string DecodeTokenPiece(const std::vector<DecoderStep>& steps, std::string_view token,
                             bool is_added) {
  std::string s(token);
  bool is_bytes = false;  // s holds raw bytes now; text transforms no longer apply
  bool fused = false;     // later steps see the whole text, not this token
  for (const DecoderStep& step : steps) {
    switch (step.kind) {
      case DecoderStep::Kind::kByteLevel:
        if (!is_added && !is_bytes) {
          s = ByteLevelToBytes(s);
          is_bytes = true;
        }
        fused = true;  // ByteLevel returns one string for all tokens
        break;
      case DecoderStep::Kind::kReplace:
        if (!is_bytes) {
          s = step.regex ? RegexReplaceAll(*step.regex, s, step.content)
                         : ReplaceAll(s, step.pattern, step.content);
        }
        break;
      case DecoderStep::Kind::kByteFallback:
        if (!is_added && !is_bytes && s.size() == 6 && s.starts_with("<0x") && s.ends_with(">")) {
          auto hex = [](char c) -> int {
            if (c >= '0' && c <= '9') return c - '0';
            if (c >= 'a' && c <= 'f') return c - 'a' + 10;
            if (c >= 'A' && c <= 'F') return c - 'A' + 10;
            return -1;
          };
          const int hi = hex(s[3]);
          const int lo = hex(s[4]);
          if (hi >= 0 && lo >= 0) {
            s.assign(1, static_cast<char>(hi * 16 + lo));
            is_bytes = true;
          }
        }
        break;
      case DecoderStep::Kind::kFuse:
        fused = true;
        break;
      case DecoderStep::Kind::kStrip:
        if (!fused && !is_bytes) {
          s = std::string(
              StripTrailing(StripLeading(s, step.content, step.start), step.content, step.stop));
        }
        break;
      case DecoderStep::Kind::kMetaspace:
        if (!is_bytes) s = ReplaceAll(s, step.content, " ");
        break;
    }
  }
  return s;
}

DecodeRules MakeDecodeRules(const std::vector<DecoderStep>& steps, bool has_decoder) {
  DecodeRules rules;
  rules.join_with_space = !has_decoder;
  bool fused = false;
  for (const DecoderStep& step : steps) {
    switch (step.kind) {
      case DecoderStep::Kind::kByteLevel:
      case DecoderStep::Kind::kFuse:
        fused = true;
        break;
      case DecoderStep::Kind::kStrip:
        if (fused) {
          rules.strip_content = step.content;
          rules.n_strip_start = step.start;
          rules.n_strip_stop = step.stop;
        }
        break;
      case DecoderStep::Kind::kMetaspace:
        if (step.prefix_space) rules.strip_first_token_space = true;
        break;
      default:
        break;
    }
  }
  return rules;
}

std::string_view StripLeading(std::string_view text, std::string_view c, int32_t n) {
  if (c.empty()) return text;
  for (int32_t k = 0; k < n && text.starts_with(c); ++k) text.remove_prefix(c.size());
  return text;
}

std::string_view StripTrailing(std::string_view text, std::string_view c, int32_t n) {
  if (c.empty()) return text;
  for (int32_t k = 0; k < n && text.ends_with(c); ++k) text.remove_suffix(c.size());
  return text;
}

}  // namespace duet::tokenizer::internal
