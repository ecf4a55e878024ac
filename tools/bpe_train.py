#!/usr/bin/env python3
"""Byte-level BPE for the bundled model: pre-tokenizer, trainer, encoder, tokenizer.json writer.

Pure Python (standard library only).  The encoder here is the reference the C++ tokenizer is
checked against (models/duet-tiny/tokenizer_samples.json), so it follows the Hugging Face
"ByteLevel" pre-tokenizer with use_regex=true exactly, i.e. GPT-2's split pattern

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

followed by GPT-2's bytes-to-unicode mapping and rank-ordered merge application.  Python's `re`
has no \\p{L}, so the pattern is implemented as a small hand-written scanner over Unicode
general categories (L* = letter, N* = number) and the Unicode White_Space property.

Token ids: 0..255 are the single bytes (id == byte value), then one id per learned merge result,
then the special token <|endoftext|> (last id), which is both BOS and EOS.
"""

from __future__ import annotations

import heapq
import json
import unicodedata
from collections import Counter
from typing import Dict, Iterable, List, Tuple

EOT = "<|endoftext|>"

# Unicode White_Space property (what \s means in the Unicode-aware regex engines HF uses).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in pattern order


def _kind(ch: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else."""
    if ch in _WHITESPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    if cat == "L":
        return "L"
    if cat == "N":
        return "N"
    return "o"


def pretokenize(text: str) -> List[str]:
    """Split text exactly as GPT-2's regex does (leftmost alternative wins, greedy runs)."""
    out: List[str] = []
    n = len(text)
    kinds = [_kind(c) for c in text]
    i = 0
    while i < n:
        c = text[i]
        # 1. contractions: 's 't 're 've 'm 'll 'd (case-sensitive)
        if c == "'":
            hit = None
            for suf in _CONTRACTIONS:
                if text.startswith(suf, i + 1):
                    hit = suf
                    break
            if hit is not None:
                out.append(text[i : i + 1 + len(hit)])
                i += 1 + len(hit)
                continue
        # 2-4.  ' ?\p{L}+' , ' ?\p{N}+' , ' ?[^\s\p{L}\p{N}]+'
        start = i
        j = i + 1 if (c == " " and i + 1 < n) else i
        k = kinds[j] if j < n else "s"
        if k in ("L", "N", "o") and (j == i or c == " "):
            j2 = j + 1
            while j2 < n and kinds[j2] == k:
                j2 += 1
            out.append(text[start:j2])
            i = j2
            continue
        # 5. '\s+(?!\S)'  6. '\s+'   (here text[i] is whitespace)
        j2 = i + 1
        while j2 < n and kinds[j2] == "s":
            j2 += 1
        if j2 < n and j2 - i > 1:
            j2 -= 1  # leave the last space to prefix the following word
        out.append(text[i:j2])
        i = j2
    return out


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table: Dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteBPE:
    """A trained byte-level BPE: token byte strings, ordered merges, one special token."""

    def __init__(self, token_bytes: List[bytes], merges: List[Tuple[int, int, int]]):
        # token_bytes[i] = bytes of token id i (the special token is appended after these)
        self.token_bytes = token_bytes
        self.merges = merges  # (left id, right id, result id) in rank order
        self.ranks: Dict[Tuple[int, int], Tuple[int, int]] = {}
        for rank, (a, b, r) in enumerate(merges):
            self.ranks.setdefault((a, b), (rank, r))
        self.eot_id = len(token_bytes)
        self.vocab_size = len(token_bytes) + 1
        self._cache: Dict[str, List[int]] = {}

    # ---- encoding -------------------------------------------------------------------------
    def encode_word(self, word: str) -> List[int]:
        got = self._cache.get(word)
        if got is not None:
            return got
        ids = list(word.encode("utf-8"))
        ranks = self.ranks
        while len(ids) > 1:
            best = None
            for p in zip(ids, ids[1:]):
                rr = ranks.get(p)
                if rr is not None and (best is None or rr[0] < best[0]):
                    best = rr
                    best_pair = p
            if best is None:
                break
            a, b = best_pair
            merged: List[int] = []
            k = 0
            while k < len(ids):
                if k + 1 < len(ids) and ids[k] == a and ids[k + 1] == b:
                    merged.append(best[1])
                    k += 2
                else:
                    merged.append(ids[k])
                    k += 1
            ids = merged
        if len(self._cache) < 500_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        """Encode text.  With allow_special, literal '<|endoftext|>' becomes the special id
        (what HF does for an added special token) and the pieces between are encoded alone."""
        parts = text.split(EOT) if allow_special else [text]
        out: List[int] = []
        for n, part in enumerate(parts):
            if n:
                out.append(self.eot_id)
            for w in pretokenize(part):
                out.extend(self.encode_word(w))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        for i in ids:
            if i == self.eot_id:
                buf.extend(EOT.encode())
            else:
                buf.extend(self.token_bytes[i])
        return buf.decode("utf-8", errors="replace")

    # ---- serialisation --------------------------------------------------------------------
    def token_string(self, i: int) -> str:
        if i == self.eot_id:
            return EOT
        b2u = bytes_to_unicode()
        return "".join(b2u[b] for b in self.token_bytes[i])

    def tokenizer_json(self) -> dict:
        vocab = {self.token_string(i): i for i in range(self.vocab_size)}
        assert len(vocab) == self.vocab_size, "token strings must be unique"
        merges = [f"{self.token_string(a)} {self.token_string(b)}" for a, b, _ in self.merges]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{
                "id": self.eot_id, "content": EOT, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True,
            }],
            "normalizer": None,
            "pre_tokenizer": dict(byte_level),
            "post_processor": None,
            "decoder": dict(byte_level),
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "vocab": vocab,
                "merges": merges,
            },
        }

    @staticmethod
    def from_tokenizer_json(obj: dict) -> "ByteBPE":
        u2b = {u: b for b, u in bytes_to_unicode().items()}
        vocab = obj["model"]["vocab"]
        special = {t["content"] for t in obj.get("added_tokens", [])}
        n = len(vocab) - len(special)
        token_bytes: List[bytes] = [b""] * n
        for s, i in vocab.items():
            if s in special:
                continue
            token_bytes[i] = bytes(u2b[ch] for ch in s)
        by_string = {s: i for s, i in vocab.items()}
        merges = []
        for m in obj["model"]["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            merges.append((by_string[a], by_string[b], by_string[a + b]))
        return ByteBPE(token_bytes, merges)


def train_bpe(word_counts: Dict[str, int], vocab_size: int, min_count: int = 2,
              log=print) -> ByteBPE:
    """Learn merges from pre-token counts until the vocabulary (with one special token)
    reaches vocab_size.  Ties between equally frequent pairs go to the smallest (left, right)
    id pair, so the result is deterministic."""
    words: List[List[int]] = []
    freqs: List[int] = []
    for w, c in sorted(word_counts.items()):
        words.append(list(w.encode("utf-8")))
        freqs.append(c)
    token_bytes: List[bytes] = [bytes([b]) for b in range(256)]
    id_of: Dict[bytes, int] = {tb: i for i, tb in enumerate(token_bytes)}
    pair_count: Counter = Counter()
    where: Dict[Tuple[int, int], set] = {}
    for wi, ids in enumerate(words):
        f = freqs[wi]
        for p in zip(ids, ids[1:]):
            pair_count[p] += f
            where.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: List[Tuple[int, int, int]] = []
    target_tokens = vocab_size - 1  # room for <|endoftext|>
    while len(token_bytes) < target_tokens and heap:
        negc, pair = heapq.heappop(heap)
        cur = pair_count.get(pair, 0)
        if -negc != cur:
            if cur > 0:
                heapq.heappush(heap, (-cur, pair))
            continue
        if cur < min_count:
            break
        a, b = pair
        nb = token_bytes[a] + token_bytes[b]
        new_id = id_of.get(nb)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(nb)
            id_of[nb] = new_id
        merges.append((a, b, new_id))
        touched: Dict[Tuple[int, int], int] = {}
        for wi in where.pop(pair, ()):
            ids = words[wi]
            f = freqs[wi]
            if len(ids) < 2:
                continue
            merged: List[int] = []
            k = 0
            changed = False
            while k < len(ids):
                if k + 1 < len(ids) and ids[k] == a and ids[k + 1] == b:
                    merged.append(new_id)
                    k += 2
                    changed = True
                else:
                    merged.append(ids[k])
                    k += 1
            if not changed:
                continue
            for p in zip(ids, ids[1:]):
                pair_count[p] -= f
                touched[p] = 1
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                touched[p] = 1
                s = where.get(p)
                if s is None:
                    where[p] = s = set()
                s.add(wi)
            words[wi] = merged
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c <= 0:
                pair_count.pop(p, None)
            elif p != pair:
                heapq.heappush(heap, (-c, p))
        if len(merges) % 500 == 0:
            log(f"  bpe: {len(merges)} merges, vocab {len(token_bytes) + 1}, last {nb!r} x{cur}")
    return ByteBPE(token_bytes, merges)


def count_pretokens(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        for part in t.split(EOT):
            counts.update(pretokenize(part))
    return counts


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="encode text with a tokenizer.json written here")
    ap.add_argument("tokenizer_json")
    ap.add_argument("text", nargs="?", help="text to encode (default: stdin)")
    args = ap.parse_args()
    with open(args.tokenizer_json, encoding="utf-8") as f:
        tok = ByteBPE.from_tokenizer_json(json.load(f))
    text = args.text if args.text is not None else sys.stdin.read()
    print(json.dumps(tok.encode(text)))
