#!/usr/bin/python3
"""Train duet's bundled model (models/duet-tiny) from freely licensed English text in Debian.

The repo cannot download a model, so it ships a tiny Llama it trains itself:

  corpus     WordNet 3.0 glosses (Debian package wordnet-base, WordNet 3.0 licence) and the
             King James Bible (package bible-kjv-text, public domain text; read with `bible`
             from package bible-kjv), normalised to ASCII
  tokenizer  byte-level BPE trained here (tools/bpe_train.py), GPT-2 pre-tokenizer, 4096 ids
  model      LlamaForCausalLM: RMSNorm, RoPE (HF rotate_half), SwiGLU, grouped-query attention,
             tied embeddings; trained with AdamW for a wall-clock budget (--minutes)
  output     an HF directory: config.json, model.safetensors (BF16, written by hand),
             tokenizer.json, tokenizer_config.json, generation_config.json,
             tokenizer_samples.json (reference encodings for the C++ tokenizer), README.md

Needs only Debian packages: python3-torch python3-numpy wordnet-base bible-kjv wamerican.
Run with the system interpreter:

  /usr/bin/python3 tools/train_bundled_model.py --out models/duet-tiny

The seed fixes the corpus order, initialisation and batches; the number of optimizer steps
depends on how fast the machine is, since training stops when --minutes have passed (the
learning-rate schedule follows elapsed time, so a slow machine still gets a full decay).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe_train  # noqa: E402
from bpe_train import EOT, ByteBPE  # noqa: E402

WORDNET_DIR = "/usr/share/wordnet"
DICT_PATH = "/usr/share/dict/american-english"


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------

def to_ascii(s: str) -> str:
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.replace("\r", "").replace("\t", " ")
    return "".join(c for c in s if c == "\n" or 32 <= ord(c) < 127)


def load_dictionary() -> set:
    with open(DICT_PATH, encoding="utf-8", errors="replace") as f:
        return {w.strip().lower() for w in f if w.strip()}


_LETTERS = re.compile(r"[A-Za-z]+")


def words_of(text: str) -> list:
    """Words as the dictionary-word score sees them: runs of letters, lowercased."""
    return [w.lower() for w in _LETTERS.findall(text)]


def wordnet_glosses() -> list:
    """The gloss of every WordNet synset (definition, then examples in quotes), one a line.
    The lemmas are left out: many are Latin genus names or rare words, and a model taught to
    open each line with a headword learns to invent headwords."""
    lines = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET_DIR, "data." + pos), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                _, sep, gloss = line.partition(" | ")
                gloss = to_ascii(gloss.strip())
                if sep and gloss:
                    lines.append(gloss)
    return lines


def kjv_chapters() -> list:
    """The KJV as a list of chapters, each a list of verses (verse numbers dropped)."""
    exe = shutil.which("bible")
    if exe is None:
        raise SystemExit("the `bible` reader is missing: apt-get install bible-kjv bible-kjv-text "
                         "(or pass --no-kjv)")
    out = subprocess.run([exe, "-l100000", "gen1:1-rev22:21"], check=True,
                         capture_output=True, text=True, encoding="latin-1").stdout
    chapters, cur = [], []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m:
            cur.append(to_ascii(m.group(1).strip()))
        else:  # a chapter heading such as "Genesis 1"
            if cur:
                chapters.append(cur)
            cur = []
    if cur:
        chapters.append(cur)
    return chapters


def build_documents(args, dictionary):
    """Documents of plain English whose every word is a dictionary word among the corpus's
    --max-word-rank most frequent: a gloss or a verse with any other word is dropped.  A
    model this small spends its capacity on the common words and, having never seen a
    non-word, rarely invents one (see the dictionary-word score)."""
    rng = random.Random(args.seed)
    glosses = wordnet_glosses()
    chapters = [] if args.no_kjv else kjv_chapters()
    freq = {}
    for t in glosses + [v for c in chapters for v in c]:
        for w in words_of(t):
            freq[w] = freq.get(w, 0) + 1
    ranked = sorted(freq, key=lambda w: (-freq[w], w))
    if args.max_word_rank:
        ranked = ranked[:args.max_word_rank]
    allowed = {w for w in ranked if w in dictionary}

    def ok(t):
        return all(w in allowed for w in words_of(t))

    kept_glosses = [g for g in glosses if ok(g)]
    docs = []
    per = args.wordnet_lines_per_doc
    for i in range(0, len(kept_glosses), per):
        docs.append("\n".join(kept_glosses[i:i + per]))
    n_wn = len(docs)
    n_verses = 0
    for c in chapters:
        kept = [v for v in c if ok(v)]
        n_verses += len(kept)
        if kept:
            docs.append(" ".join(kept))
    rng.shuffle(docs)
    n_val = max(1, len(docs) // 100)
    val, train = docs[:n_val], docs[n_val:]
    print(f"corpus: {len(kept_glosses)} of {len(glosses)} WordNet glosses in {n_wn} documents, "
          f"{n_verses} of {sum(map(len, chapters))} KJV verses in {len(docs) - n_wn} chapters "
          f"(allowed words: {len(allowed)}); train {len(train)} docs "
          f"({sum(map(len, train)) / 1e6:.1f} MB), validation {len(val)} docs", flush=True)
    counts = {"wordnet_glosses": len(kept_glosses), "wordnet_glosses_all": len(glosses),
              "kjv_verses": n_verses, "kjv_verses_all": sum(map(len, chapters)),
              "kjv_chapters": len(docs) - n_wn, "allowed_words": len(allowed)}
    return train, val, counts


# ------------------------------------------------------------------------------------------
# model (LlamaForCausalLM semantics, HF conventions)
# ------------------------------------------------------------------------------------------

def build_model_classes(matmul_dtype=None):
    """All matmuls run in matmul_dtype (default BF16, f32 accumulation: oneDNN, fast) and
    everything else in f32, with explicit casts: Debian's torch has only the reference BLAS
    for f32 matmuls (~40x slower) and slow mixed-dtype elementwise kernels, which autocast
    would hit."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    mdt = torch.bfloat16 if matmul_dtype is None else matmul_dtype

    def mm(a, b):
        return (a.to(mdt) @ b.to(mdt)).float()

    class Linear(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(n_out, n_in))  # HF layout [out, in]

        def forward(self, x):
            return F.linear(x.to(mdt), self.weight.to(mdt)).float()

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
            self.hd = c["hidden_size"] // self.nh
            d = c["hidden_size"]
            self.q_proj = Linear(d, self.nh * self.hd)
            self.k_proj = Linear(d, self.nkv * self.hd)
            self.v_proj = Linear(d, self.nkv * self.hd)
            self.o_proj = Linear(self.nh * self.hd, d)

        def forward(self, x, cos, sin, mask, cache=None):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.nh, self.hd)
            k = self.k_proj(x).view(B, T, self.nkv, self.hd)
            v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            q = (q * cos + rotate_half(q) * sin).transpose(1, 2)
            k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
            if cache is not None:  # incremental decoding: [k, v] of earlier positions
                if cache[0] is not None:
                    k = torch.cat([cache[0], k], dim=2)
                    v = torch.cat([cache[1], v], dim=2)
                cache[0], cache[1] = k, v
            rep = self.nh // self.nkv
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            att = mm(q * (1.0 / math.sqrt(self.hd)), k.transpose(-1, -2)) + mask
            att = F.softmax(att, dim=-1)
            y = mm(att, v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
            return self.o_proj(y)

    class MLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            d, f = c["hidden_size"], c["intermediate_size"]
            self.gate_proj = Linear(d, f)
            self.up_proj = Linear(d, f)
            self.down_proj = Linear(f, d)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.self_attn = Attention(c)
            self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.mlp = MLP(c)

        def forward(self, x, cos, sin, mask, cache=None):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Backbone(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
            self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
            self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    class LlamaForCausalLM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.model = Backbone(c)
            hd = c["hidden_size"] // c["num_attention_heads"]
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            self.register_buffer("inv_freq", inv.float(), persistent=False)
            std = 0.02
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    continue
                s = std / math.sqrt(2 * c["num_hidden_layers"]) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)

        def rope(self, T, offset=0):
            pos = torch.arange(offset, offset + T, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos()[None, :, None], emb.sin()[None, :, None]  # [1, T, 1, hd]

        def forward(self, ids, cache=None, offset=0):
            """ids [B, T] -> logits [B, T, V].  cache: per-layer [k, v] lists for incremental
            decoding, offset: position of ids[:, 0]."""
            B, T = ids.shape
            x = self.model.embed_tokens(ids)
            cos, sin = self.rope(T, offset)
            mask = torch.full((T, offset + T), float("-inf")).triu(offset + 1)
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, mask, None if cache is None else cache[i])
            x = self.model.norm(x)
            return mm(x, self.model.embed_tokens.weight.t())  # tied lm_head

    return LlamaForCausalLM


# ------------------------------------------------------------------------------------------
# safetensors (written by hand)
# ------------------------------------------------------------------------------------------

def save_safetensors(path, tensors):
    """tensors: list of (name, torch tensor); stored as BF16 (round to nearest even)."""
    import torch
    header, blobs, off = {}, [], 0
    for name, t in tensors:
        t = t.detach().to(torch.bfloat16).contiguous()
        raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    import numpy as np
    import torch
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        assert meta["dtype"] == "BF16"
        a = np.frombuffer(data[b:e], dtype="<i2").astype(np.int32) << 16
        out[name] = torch.from_numpy(a.view(np.float32).copy()).reshape(meta["shape"])
    return out


def hf_state(model):
    """Parameters under their HF names, in HF order (no lm_head.weight: tied)."""
    c = model.config
    sd = dict(model.named_parameters())
    names = ["model.embed_tokens.weight"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    assert set(names) == set(sd), set(names) ^ set(sd)
    return [(n, sd[n]) for n in names]


# ------------------------------------------------------------------------------------------
# sampling and the dictionary-word score (what the C++ test checks)
# ------------------------------------------------------------------------------------------

def sample(model, prompt_ids, n_new, temperature, gen, max_ctx, stop_id=None):
    """Plain full-recompute sampling (the model is tiny).  Stops at stop_id if given."""
    import torch
    assert len(prompt_ids) + n_new <= max_ctx + 1
    out = []
    cache = [[None, None] for _ in model.model.layers]
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids)]), cache, 0)[0, -1]
        pos = len(prompt_ids)
        for _ in range(n_new):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            if stop_id is not None and nxt == stop_id:
                break
            out.append(nxt)
            if len(out) == n_new:
                break
            logits = model(torch.tensor([[nxt]]), cache, pos)[0, -1]
            pos += 1
    return out




def word_score(text, dictionary):
    words = [w.lower() for w in re.split(r"[^A-Za-z]+", text) if w]
    if not words:
        return 0.0, 0
    return sum(w in dictionary for w in words) / len(words), len(words)


def sample_for_score(model, tok, n_tokens, temperature, seed, max_ctx):
    """n_tokens sampled at `temperature` starting from <|endoftext|>; when the model emits
    <|endoftext|> the generation restarts from it (as a server stopping at eos would)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    pieces, total = [], 0
    while total < n_tokens:
        got = sample(model, [tok.eot_id], min(max_ctx - 1, n_tokens - total), temperature, gen,
                     max_ctx, stop_id=tok.eot_id)
        total += max(1, len(got))
        pieces.append(tok.decode(got))
    return pieces


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

TOKENIZER_SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a person who makes things; \"she is a skilled maker of furniture\"",
    "In the beginning God created the heaven and the earth.",
    "It's what they'd said: we'll see, I'm sure you've heard, they're here, don't!",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\n\n\nline five\n",
    "tabs\tand\t\tmixed \t whitespace",
    "Numbers: 3.14159, 2024-06-01, 1,000,000 and 42nd",
    "punctuation!!! ...?? (brackets) [square] {curly} <angle> @#$%^&*",
    "UPPER lower MiXeD CamelCaseWord snake_case_word kebab-case-word",
    "unbelievably antidisestablishmentarianism pneumonoultramicroscopic",
    "'s 't 're 've 'm 'll 'd 'S 'T 'x '",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
    "Greek \u03b1\u03b2\u03b3 and Cyrillic \u043f\u0440\u0438\u0432\u0435\u0442, digits \u0663\u0664 \u00bd",
    "emoji \U0001F600 and CJK \u4e2d\u6587 and a dash \u2014 and quotes \u201chi\u201d",
    "And he said unto them, Go ye into all the world.",
    "x",
    "",
    "the act of running quickly; a fast-moving (rapid) thing, as in 'a quick run'",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "models", "duet-tiny"))
    ap.add_argument("--work-dir", default="/tmp/duet-tiny-train",
                    help="corpus/token cache and checkpoints (never committed)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = adaptive: start with 1, and every 100 steps try "
                         "1 against 2 and keep the faster (on a CPU shared with compilers, one "
                         "thread is often faster than two)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512, help="training sequence length")
    ap.add_argument("--max-positions", type=int, default=2048,
                    help="max_position_embeddings written to config.json")
    ap.add_argument("--batch", type=int, default=4,
                    help="sequences per step (4 x 512 keeps the logits under glibc's mmap "
                         "threshold; larger batches page-fault their buffers every step)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--wordnet-lines-per-doc", type=int, default=40)
    ap.add_argument("--no-kjv", action="store_true", help="WordNet glosses only")
    ap.add_argument("--max-word-rank", type=int, default=16000,
                    help="keep only glosses/verses whose words are all dictionary words among "
                         "the corpus's N most frequent (0: any dictionary word)")
    ap.add_argument("--eval-tokens", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()

    # glibc returns every large tensor buffer to the OS and page-faults it back in on the next
    # step, which costs more than the arithmetic here; keep freed memory in the heap instead.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(32 << 20)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(16 << 30)
        os.environ["MALLOC_TOP_PAD_"] = str(256 << 20)
        os.execv(sys.executable, [sys.executable] + sys.argv)

    t_start = time.time()
    import numpy as np
    import torch
    threads = args.threads or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    dictionary = load_dictionary()

    # ---- corpus + tokenizer (cached by a key of the options that shape them) --------------
    key = (f"v3-s{args.seed}-v{args.vocab_size}-w{args.wordnet_lines_per_doc}"
           f"-k{int(not args.no_kjv)}-r{args.max_word_rank}")
    cache = os.path.join(args.work_dir, key)
    tok_path = cache + ".tokenizer.json"
    if os.path.exists(cache + ".train.npy") and os.path.exists(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            tok = ByteBPE.from_tokenizer_json(json.load(f))
        train_ids = np.load(cache + ".train.npy")
        val_ids = np.load(cache + ".val.npy")
        with open(cache + ".meta.json") as f:
            corpus_meta = json.load(f)
        print(f"loaded cached corpus {cache}", flush=True)
    else:
        train_docs, val_docs, doc_counts = build_documents(args, dictionary)
        t0 = time.time()
        counts = bpe_train.count_pretokens(train_docs)
        print(f"pre-tokens: {sum(counts.values())} ({len(counts)} distinct) "
              f"in {time.time() - t0:.0f}s", flush=True)
        t0 = time.time()
        tok = bpe_train.train_bpe(counts, args.vocab_size)
        print(f"bpe: {len(tok.merges)} merges, vocab {tok.vocab_size} in {time.time() - t0:.0f}s",
              flush=True)

        def encode_docs(docs):
            ids = []
            for d in docs:
                ids.append(tok.eot_id)
                ids.extend(tok.encode(d, allow_special=False))
            return np.array(ids, dtype=np.int16 if tok.vocab_size < 32768 else np.int32)

        t0 = time.time()
        train_ids, val_ids = encode_docs(train_docs), encode_docs(val_docs)
        print(f"encoded: train {len(train_ids)} tokens, val {len(val_ids)} tokens "
              f"({sum(map(len, train_docs)) / len(train_ids):.2f} chars/token) "
              f"in {time.time() - t0:.0f}s", flush=True)
        corpus_meta = {
            "train_docs": len(train_docs), "val_docs": len(val_docs),
            "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs)),
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
            "corpus_word_score": word_score("\n".join(train_docs), dictionary)[0],
            **doc_counts,
        }
        np.save(cache + ".train.npy", train_ids)
        np.save(cache + ".val.npy", val_ids)
        with open(tok_path, "w", encoding="utf-8") as f:
            json.dump(tok.tokenizer_json(), f, ensure_ascii=False)
        with open(cache + ".meta.json", "w") as f:
            json.dump(corpus_meta, f)
    assert tok.vocab_size == args.vocab_size, (tok.vocab_size, args.vocab_size)

    # ---- model --------------------------------------------------------------------------
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": args.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": tok.vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": tok.eot_id,
        "eos_token_id": tok.eot_id,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    }
    Model = build_model_classes()
    model = Model(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters ({n_params * 2 / 1e6:.2f} MB in BF16)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    train_t = torch.from_numpy(train_ids.astype(np.int64))
    val_t = torch.from_numpy(val_ids.astype(np.int64))
    T, B = args.context, args.batch
    data_gen = torch.Generator().manual_seed(args.seed + 1)

    def batch_from(src, gen):
        starts = torch.randint(0, len(src) - T - 1, (B,), generator=gen)
        x = torch.stack([src[s:s + T] for s in starts])
        y = torch.stack([src[s + 1:s + T + 1] for s in starts])
        return x, y

    def evaluate(n_batches=20):
        model.eval()
        g = torch.Generator().manual_seed(7)
        tot = 0.0
        with torch.no_grad():
            for _ in range(n_batches):
                x, y = batch_from(val_t, g)
                logits = model(x)
                tot += float(torch.nn.functional.cross_entropy(
                    logits.view(-1, logits.size(-1)), y.view(-1)))
        model.train()
        return tot / n_batches

    budget = args.minutes * 60.0
    t_train = time.time()
    step, tokens_seen, ema = 0, 0, None
    last_log = t_train
    step_times = []  # (threads, seconds) of recent steps
    probe = None  # (first step, threads before) while timing the other thread count
    print(f"training for {args.minutes:g} min: batch {B} x {T} tokens, lr {args.lr:g}",
          flush=True)
    model.train()
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        progress = elapsed / budget
        if step < args.warmup_steps:
            lr = args.lr * (step + 1) / args.warmup_steps
        else:
            lr = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 *
                            (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        if args.threads == 0 and step >= 40 and step % 100 == 40 and probe is None:
            # time the other thread count for a few steps; keep it only if it is faster
            probe = (step, threads)
            threads = 3 - threads
            torch.set_num_threads(threads)
        elif probe is not None and step - probe[0] == 6:
            other = [d for t, d in step_times[-5:]]  # the first step after a switch is slow
            base = [d for t, d in step_times[-18:-6] if t == probe[1]][-10:]
            other.sort()
            base.sort()
            if base and other[len(other) // 2] > base[len(base) // 2]:
                threads = probe[1]
                torch.set_num_threads(threads)
            probe = None
        t_step = time.time()
        x, y = batch_from(train_t, data_gen)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += B * T
        step_times.append((threads, time.time() - t_step))
        del step_times[:-40]
        lv = float(loss)
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        now = time.time()
        if now - last_log >= 60 or step == 10:
            tps = tokens_seen / (now - t_train)
            print(f"step {step:6d}  {elapsed / 60:5.1f} min  loss {lv:.3f} (ema {ema:.3f})  "
                  f"lr {lr:.2e}  {tps:.0f} tok/s  threads {threads}", flush=True)
            last_log = now
    train_seconds = time.time() - t_train
    final_train = ema
    print(f"trained {step} steps, {tokens_seen} tokens "
          f"({tokens_seen / len(train_ids):.2f} epochs) in {train_seconds / 60:.1f} min",
          flush=True)

    # ---- export, then evaluate the exported (BF16-rounded) weights ------------------------
    st_path = os.path.join(args.out, "model.safetensors")
    save_safetensors(st_path, hf_state(model))
    loaded = load_safetensors(st_path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(loaded[n])
    model.eval()
    torch.set_num_threads(1)  # decoding one token at a time gains nothing from a second thread
    final_val = evaluate(40)
    t0 = time.time()
    pieces = sample_for_score(model, tok, args.eval_tokens, args.temperature, args.seed, T)
    text = "\n".join(pieces)
    score, n_words = word_score(text, dictionary)
    print(f"validation loss {final_val:.3f}; dictionary words {100 * score:.1f}% of {n_words} "
          f"in {args.eval_tokens} tokens at T={args.temperature} ({time.time() - t0:.0f}s)",
          flush=True)
    # one long generation as well (no restarts, positions up to 2000)
    gen = torch.Generator().manual_seed(args.seed + 5)
    long_ids = sample(model, [tok.eot_id], args.eval_tokens, args.temperature, gen,
                      args.max_positions)
    long_text = tok.decode([i for i in long_ids if i != tok.eot_id])
    long_score, long_words = word_score(long_text, dictionary)
    print(f"single {args.eval_tokens}-token generation: {100 * long_score:.1f}% of {long_words}",
          flush=True)
    samples = []
    gen = torch.Generator().manual_seed(args.seed + 9)
    for prompt in ["The", "In the beginning", "a person who"]:
        got = sample(model, tok.encode(prompt), 48, args.temperature, gen, T,
                     stop_id=tok.eot_id)
        samples.append(prompt + tok.decode(got))
    for s in samples:
        print("sample:", repr(s), flush=True)

    # ---- the rest of the HF directory ----------------------------------------------------
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok.tokenizer_json(), f, ensure_ascii=False)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": None,
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": args.max_positions,
            "added_tokens_decoder": {str(tok.eot_id): {
                "content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}},
        }, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "do_sample": True,
                   "temperature": args.temperature, "top_p": 1.0,
                   "max_new_tokens": 256}, f, indent=2)
        f.write("\n")
    write_tokenizer_samples(args.out, tok)

    total_seconds = time.time() - t_start
    stats = {
        "parameters": n_params,
        "train_steps": step, "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids),
        "train_minutes": train_seconds / 60, "total_minutes": total_seconds / 60,
        "final_train_loss_ema": final_train, "final_val_loss": final_val,
        "word_score": score, "word_score_words": n_words,
        "long_word_score": long_score,
        "samples": samples, "eval_text_head": text[:600],
        "args": vars(args), "corpus": corpus_meta,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.work_dir, "last_run.json"), "w") as f:
        json.dump(stats, f, indent=1)
    write_model_card(args, config, stats)
    size = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {total_seconds / 60:.1f} min total",
          flush=True)


def write_tokenizer_samples(out_dir, tok):
    """Reference encodings for the C++ tokenizer test, one sample per line."""
    plain = [{"text": t, "ids": tok.encode(t, allow_special=False)} for t in TOKENIZER_SAMPLES]
    special = [{"text": t, "ids": tok.encode(t)}
               for t in [EOT + "Hello", "one" + EOT + " two" + EOT]]

    def rows(items):
        return ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in items)

    with open(os.path.join(out_dir, "tokenizer_samples.json"), "w", encoding="utf-8") as f:
        f.write("{\n")
        f.write(' "description": ' + json.dumps(
            "reference encodings by tools/bpe_train.py for tokenizer.json: GPT-2 pre-tokenizer "
            "regex, GPT-2 byte map, merges applied by rank. 'samples' contain no special "
            "tokens; in 'special_samples' a literal <|endoftext|> becomes the added special "
            "token (id %d), as Hugging Face tokenizers does" % tok.eot_id) + ",\n")
        f.write(' "samples": [\n' + rows(plain) + "\n ],\n")
        f.write(' "special_samples": [\n' + rows(special) + "\n ]\n}\n")


def write_model_card(args, c, s):
    cm = s["corpus"]
    defaults = {"--minutes": 20.0, "--seed": 1234}
    cmd = "/usr/bin/python3 tools/train_bundled_model.py --out models/duet-tiny"
    if args.minutes != defaults["--minutes"]:
        cmd += f" --minutes {args.minutes:g}"
    if args.seed != defaults["--seed"]:
        cmd += f" --seed {args.seed}"
    extra = []
    for flag, val, dflt in [("--context", args.context, 512), ("--batch", args.batch, 4),
                            ("--lr", args.lr, 3e-3), ("--layers", args.layers, 4),
                            ("--hidden", args.hidden, 256),
                            ("--intermediate", args.intermediate, 512),
                            ("--heads", args.heads, 4), ("--kv-heads", args.kv_heads, 2),
                            ("--vocab-size", args.vocab_size, 4096)]:
        if val != dflt:
            extra.append(f"{flag} {val:g}" if isinstance(val, float) else f"{flag} {val}")
    if args.no_kjv:
        extra.append("--no-kjv")
    if args.max_word_rank != 16000:
        extra.append(f"--max-word-rank {args.max_word_rank}")
    if extra:
        cmd += " " + " ".join(extra)
    samples = "\n".join(f"    {x!r}" for x in s["samples"])
    card = f"""# duet-tiny

A tiny Llama-architecture language model that duet trains itself, so the demo and the tests run
on a machine that cannot download a model. It writes recognisable (if meandering) English in
the style of its corpus: dictionary definitions and the King James Bible. It knows nothing
useful; it exists to exercise the engine end to end.

## Files

| file | content |
|---|---|
| config.json | HF `LlamaForCausalLM` config |
| model.safetensors | weights, BF16, HF tensor names, tied embeddings (no `lm_head.weight`) |
| tokenizer.json | byte-level BPE (HF `tokenizers` format, GPT-2 pre-tokenizer and byte map) |
| tokenizer_config.json, generation_config.json | HF companions |
| tokenizer_samples.json | 20 strings and their ids from the reference Python encoder (`tools/bpe_train.py`), for checking the C++ tokenizer |

## Model

| | |
|---|---|
| architecture | LlamaForCausalLM: RMSNorm (eps {c['rms_norm_eps']}), RoPE (rotate_half, theta {c['rope_theta']:g}), SwiGLU, GQA |
| parameters | {s['parameters']:,} |
| hidden / intermediate | {c['hidden_size']} / {c['intermediate_size']} |
| layers | {c['num_hidden_layers']} |
| attention heads / KV heads | {c['num_attention_heads']} / {c['num_key_value_heads']} (head dim {c['head_dim']}) |
| vocabulary | {c['vocab_size']} (256 bytes, {c['vocab_size'] - 257} merges, `<\\|endoftext\\|>` = {c['eos_token_id']} as BOS and EOS) |
| trained context | {args.context} tokens; `max_position_embeddings` is {c['max_position_embeddings']}: longer generations stay English (see the unbroken 2000-token score below), though the model never saw those distances |
| storage | BF16, tied input/output embeddings |

## Training

| | |
|---|---|
| corpus | WordNet 3.0 glosses (definitions with their quoted examples, one a line, 40 lines a document) and the King James Bible (the verses of a chapter as one paragraph, verse numbers dropped), ASCII. Only glosses and verses whose every word is in /usr/share/dict/american-english and among the corpus's {args.max_word_rank or 'all'} most frequent words are kept ({cm['allowed_words']:,} distinct words): {cm['wordnet_glosses']:,} of {cm['wordnet_glosses_all']:,} glosses, {cm['kjv_verses']:,} of {cm['kjv_verses_all']:,} verses. {cm['train_docs']:,} training and {cm['val_docs']} held-out documents, each preceded by `<\\|endoftext\\|>` |
| train / validation | {cm['train_tokens']:,} / {cm['val_tokens']:,} tokens ({cm['train_chars'] / cm['train_tokens']:.2f} characters per token) |
| optimizer | AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak lr {args.lr:g}, {args.warmup_steps} warm-up steps, cosine decay over the time budget to {args.min_lr_frac:g} of peak |
| batch | {args.batch} sequences x {args.context} tokens |
| steps / tokens seen | {s['train_steps']:,} / {s['tokens_seen']:,} ({s['epochs']:.2f} epochs) |
| training time | {s['train_minutes']:.1f} min on a 2-core CPU shared with compilers ({s['total_minutes']:.1f} min for the whole script) |
| final train loss | {s['final_train_loss_ema']:.3f} (moving average, nats/token) |
| final validation loss | {s['final_val_loss']:.3f} (BF16 weights as stored) |
| dictionary-word score | {100 * s['word_score']:.1f}% of {s['word_score_words']} words in {args.eval_tokens} tokens sampled at T={args.temperature} from `<\\|endoftext\\|>` (restarting after `<\\|endoftext\\|>`) are in /usr/share/dict/american-english; one unbroken {args.eval_tokens}-token generation: {100 * s['long_word_score']:.1f}% |
| seed | {args.seed} (torch {s['torch']}) |

The dictionary-word score is what duet's C++ test checks (it requires 70%): sample at
T={args.temperature} with no top-k/top-p, decode, split the text on every non-letter, lowercase,
and count the words found in the word list (which is compared lowercased too). The score is
computed with the weights as stored (BF16), with BF16 matmuls and f32 everything else.

Samples at T={args.temperature} (prompt, then the model's continuation):

{samples}

## Re-training

Needs Debian packages only (`python3-torch python3-numpy wordnet-base bible-kjv bible-kjv-text wamerican`):

    {cmd}

`--minutes` is the training budget (the whole run adds a few minutes for the corpus, the
tokenizer and the evaluation). The seed fixes corpus order, initialisation and batches; the
number of steps depends on the machine's speed (the run above shared its two cores with
compiler jobs most of the time), so a re-run gives close but not identical numbers: a
faster or idler machine sees more tokens and ends with a lower loss. Corpus and token
caches go to `--work-dir` (default /tmp/duet-tiny-train); nothing there is committed.

## Licence

The weights and tokenizer are derived from:

- **WordNet 3.0** glosses (Debian package `wordnet-base`), under the WordNet 3.0 licence, whose
  notice must accompany copies:

  > WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
  >
  > Permission to use, copy, modify and distribute this software and database and its
  > documentation for any purpose and without fee or royalty is hereby granted, provided that
  > you agree to comply with the following copyright notice and statements, including the
  > disclaimer, and that the same appear on ALL copies of the software, database and
  > documentation, including modifications that you make for internal use or for distribution.
  >
  > THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
  > REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
  > PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-ABILITY OR FITNESS
  > FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR
  > DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER
  > RIGHTS.
  >
  > The name of Princeton University or Princeton may not be used in advertising or publicity
  > pertaining to distribution of the software and/or database. Title to copyright in this
  > software, database and any associated documentation shall at all times remain with
  > Princeton University and LICENSEE agrees to preserve same.

  (full text: /usr/share/doc/wordnet-base/copyright)
- **The King James Bible** (Debian package `bible-kjv-text`): the text's copyright has expired
  (public domain); the package's data file may be copied, modified and distributed at will.

The code that trained it (tools/train_bundled_model.py, tools/bpe_train.py) is part of duet.
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    main()
