#include "duet/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "str_util.h"
#include "tokenizer_impl.h"
#include "unicode.h"

namespace duet::tokenizer {
namespace {

namespace fs = std::filesystem;
using internal::AsAbsl;
using internal::Cat;

absl::StatusOr<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(Cat("cannot open ", path.string()));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::DataLossError(Cat("cannot read ", path.string()));
  return std::move(buffer).str();
}

bool IsFile(const fs::path& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

absl::Status WithContext(const absl::Status& s, const fs::path& dir) {
  return absl::Status(s.code(), Cat("loading tokenizer from ", dir.string(), ": ", s.message()));
}

}  // namespace

void internal::TokenizerImpl::EncodeSection(std::string_view text, bool at_text_start,
                                            std::vector<int32_t>& out) const {
  std::string normalized_storage;
  if (!normalizers.empty()) {
    normalized_storage = internal::ApplyNormalizers(normalizers, std::string(text));
    text = normalized_storage;
  }
  const internal::WordSink encode_word = [&](std::string_view word) {
    model.EncodeWord(word, out);
  };
  auto encode_words = [&](std::string_view part, bool at_start) {
    if (part.empty()) return;
    if (pre_tokenizers.empty()) {
      model.EncodeWord(part, out);
    } else {
      internal::PreTokenize(pre_tokenizers, part, at_start, encode_word);
    }
  };
  // Added tokens marked `normalized` are matched in the normalized text.
  size_t pos = 0;
  for (const auto& m : normalized_matcher.FindAll(text)) {
    encode_words(text.substr(pos, m.begin - pos), at_text_start && pos == 0);
    out.push_back(m.token->id);
    pos = m.end;
  }
  encode_words(text.substr(pos), at_text_start && pos == 0);
}

std::optional<std::string_view> internal::TokenizerImpl::PieceFor(int32_t id, bool skip_special,
                                                                  bool first) const {
  if (id < 0 || id >= static_cast<int32_t>(entries.size())) return std::nullopt;
  const TokenEntry& e = entries[id];
  if (!e.valid || (skip_special && e.special)) return std::nullopt;
  std::string_view piece = e.decoded;
  if (first && decode_rules.strip_first_token_space && piece.starts_with(' ')) {
    piece.remove_prefix(1);
  }
  return piece;
}

Tokenizer::Tokenizer(std::unique_ptr<internal::TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  auto impl = internal::BuildFromTokenizerJson(tokenizer_json, tokenizer_config_json);
  if (!impl.ok()) return impl.status();
  return std::unique_ptr<Tokenizer>(new Tokenizer(*std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGpt2Files(std::string_view vocab_json,
                                                                    std::string_view merges_txt) {
  auto impl = internal::BuildFromGpt2Files(vocab_json, merges_txt);
  if (!impl.ok()) return impl.status();
  return std::unique_ptr<Tokenizer>(new Tokenizer(*std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const fs::path& model_dir) {
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(
        Cat("tokenizer: model directory ", model_dir.string(), " does not exist"));
  }
  const fs::path tokenizer_json = model_dir / "tokenizer.json";
  const fs::path vocab_json = model_dir / "vocab.json";
  const fs::path merges_txt = model_dir / "merges.txt";
  absl::StatusOr<std::unique_ptr<Tokenizer>> result;
  if (IsFile(tokenizer_json)) {
    auto text = ReadFile(tokenizer_json);
    if (!text.ok()) return WithContext(text.status(), model_dir);
    std::string config;
    if (const fs::path config_path = model_dir / "tokenizer_config.json"; IsFile(config_path)) {
      auto config_text = ReadFile(config_path);
      if (!config_text.ok()) return WithContext(config_text.status(), model_dir);
      config = *std::move(config_text);
    }
    result = FromJson(*text, config);
  } else if (IsFile(vocab_json)) {
    if (!IsFile(merges_txt)) {
      return absl::NotFoundError(Cat("loading tokenizer from ", model_dir.string(),
                                     ": vocab.json is there but merges.txt is missing"));
    }
    auto vocab = ReadFile(vocab_json);
    if (!vocab.ok()) return WithContext(vocab.status(), model_dir);
    auto merges = ReadFile(merges_txt);
    if (!merges.ok()) return WithContext(merges.status(), model_dir);
    result = FromGpt2Files(*vocab, *merges);
  } else {
    return absl::NotFoundError(Cat("loading tokenizer from ", model_dir.string(),
                                   ": found neither tokenizer.json nor vocab.json + "
                                   "merges.txt"));
  }
  if (!result.ok()) return WithContext(result.status(), model_dir);
  return result;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::string repaired;
  if (!internal::IsValidUtf8(text)) {
    repaired = internal::ToValidUtf8(text);
    text = repaired;
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  // Added tokens in the input text are split out first; the text between them is encoded.
  size_t pos = 0;
  for (const auto& m : impl_->raw_matcher.FindAll(text)) {
    if (m.begin > pos) impl_->EncodeSection(text.substr(pos, m.begin - pos), pos == 0, ids);
    ids.push_back(m.token->id);
    pos = m.end;
  }
  if (pos < text.size()) impl_->EncodeSection(text.substr(pos), pos == 0, ids);

  if (!add_special_tokens || impl_->single_template.empty()) return ids;
  std::vector<int32_t> with_special;
  with_special.reserve(ids.size() + 4);
  for (const internal::TemplateItem& item : impl_->single_template) {
    const auto& part = item.is_sequence ? ids : item.ids;
    with_special.insert(with_special.end(), part.begin(), part.end());
  }
  return with_special;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const internal::DecodeRules& rules = impl_->decode_rules;
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    const auto piece = impl_->PieceFor(id, skip_special_tokens, first);
    if (!piece.has_value()) continue;
    if (rules.join_with_space && !first) bytes += ' ';
    bytes.append(*piece);
    first = false;
  }
  std::string text = internal::ToValidUtf8(bytes);
  std::string_view view = internal::StripLeading(text, rules.strip_content, rules.n_strip_start);
  view = internal::StripTrailing(view, rules.strip_content, rules.n_strip_stop);
  return std::string(view);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->entries.size()); }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (const auto it = impl_->added_by_content.find(AsAbsl(token));
      it != impl_->added_by_content.end()) {
    return it->second;
  }
  const auto& vocab = impl_->model.vocab();
  if (const auto it = vocab.find(AsAbsl(token)); it != vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (!IsValidId(id)) return std::nullopt;
  return impl_->entries[id].token;
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }

bool Tokenizer::IsValidId(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->entries[id].valid;
}

bool Tokenizer::IsSpecialId(int32_t id) const {
  return IsValidId(id) && impl_->entries[id].special;
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer),
      skip_special_tokens_(skip_special_tokens),
      n_strip_left_remaining_(tokenizer.impl_->decode_rules.n_strip_start) {}

std::string StreamDecoder::Push(int32_t id) {
  const internal::TokenizerImpl& impl = *tokenizer_.impl_;
  const auto piece = impl.PieceFor(id, skip_special_tokens_, !seen_token_);
  if (!piece.has_value()) return {};
  if (impl.decode_rules.join_with_space && seen_token_) pending_bytes_ += ' ';
  pending_bytes_.append(*piece);
  seen_token_ = true;
  // Emit everything but an incomplete character at the very end.
  const size_t n_complete =
      pending_bytes_.size() - internal::IncompleteUtf8TailLength(pending_bytes_);
  std::string text = internal::ToValidUtf8(std::string_view(pending_bytes_).substr(0, n_complete));
  pending_bytes_.erase(0, n_complete);
  return Emit(std::move(text), /*final=*/false);
}

std::string StreamDecoder::Flush() {
  std::string out = Emit(internal::ToValidUtf8(pending_bytes_), /*final=*/true);
  seen_token_ = false;
  n_strip_left_remaining_ = tokenizer_.impl_->decode_rules.n_strip_start;
  pending_bytes_.clear();
  held_tail_.clear();
  return out;
}

std::string StreamDecoder::Emit(std::string text, bool final) {
  const internal::DecodeRules& rules = tokenizer_.impl_->decode_rules;
  const std::string& c = rules.strip_content;
  if (c.empty()) return text;
  // Leading strip: drop `c` at the start of the whole text, up to n_strip_start times.
  size_t cut = 0;
  while (n_strip_left_remaining_ > 0 && cut < text.size()) {
    if (std::string_view(text).substr(cut).starts_with(c)) {
      cut += c.size();
      --n_strip_left_remaining_;
    } else {
      n_strip_left_remaining_ = 0;
    }
  }
  text.erase(0, cut);
  if (rules.n_strip_stop == 0) return text;
  // Trailing strip: hold back trailing `c`s (up to n_strip_stop) until we know they are not last.
  held_tail_ += text;
  const std::string_view kept = internal::StripTrailing(held_tail_, c, rules.n_strip_stop);
  std::string out(kept);
  if (final) {
    held_tail_.clear();
  } else {
    held_tail_.erase(0, kept.size());
  }
  return out;
}

}  // namespace duet::tokenizer
