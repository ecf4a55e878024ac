#!/usr/bin/python3
"""Golden-logit fixtures for duet: tiny random-weight HF-style models + a float64 torch reference.

Usage (Debian's python3-torch / python3-numpy; use /usr/bin/python3, not a pyenv python):

    /usr/bin/python3 tools/make_fixtures.py --out tests/data/models

Regeneration is deterministic: running it twice writes byte-identical files (fixed seeds, one
torch thread, fixed float formatting).  The script only writes (and first empties) the fixture
directories listed below; anything else under --out is left alone.  It runs its self-checks
(see "Self-checks") before writing and aborts if one fails; --skip-checks skips them.

The forward passes below are written by hand from the architectures' definitions (HF semantics);
they do not import transformers.  The golden numbers are computed in float64 from exactly the
weights that are stored in the file (i.e. after rounding to F16/BF16 where the file stores those).

Fixture directories
-------------------
  dir                          arch               dims (hidden/layers/heads/kv/head_dim/ffn/vocab)  storage
  gpt2-tiny                    GPT2LMHeadModel    32 / 2 / 4 / 4 / 8 / 128 / 96, n_positions 64       F32
  gpt2-tiny-f16                GPT2LMHeadModel    same dims, other seed                                F16
  llama-tiny-gqa               LlamaForCausalLM   32 / 2 / 4 / 2 / 8 / 64 / 128, untied, no scaling    F32
  llama-tiny-tied-llama3rope   LlamaForCausalLM   32 / 2 / 2 / 1 / 16 / 64 / 128, tied, llama3 rope    F32
  qwen2-tiny                   Qwen2ForCausalLM   32 / 2 / 4 / 2 / 8 / 64 / 128, untied, qkv bias      F32
  llama-tiny-bf16              LlamaForCausalLM   32 / 2 / 4 / 4 / 8 / 64 / 128 (plain MHA), untied    BF16
  llama-tiny-sharded           LlamaForCausalLM   32 / 3 / 4 / 2 / 8 / 64 / 128, untied, 2 shards      F32

Each directory holds config.json (HF keys), model.safetensors (or model-0000{1,2}-of-00002.safetensors
plus model.safetensors.index.json = {"metadata": {"total_size": <sum of tensor bytes>},
"weight_map": {tensor name: shard file}}) and golden.json.  No tokenizer: tests feed token ids.

Tensor names and layouts
------------------------
GPT-2 (all with the "transformer." prefix; Conv1D weights are stored [in, out], y = x @ W + b):
  transformer.wte.weight [vocab, n_embd]          transformer.wpe.weight [n_positions, n_embd]
  transformer.h.{i}.ln_1.weight/.bias [n_embd]
  transformer.h.{i}.attn.c_attn.weight [n_embd, 3*n_embd]  .bias [3*n_embd]   (columns: q | k | v)
  transformer.h.{i}.attn.c_proj.weight [n_embd, n_embd]    .bias [n_embd]
  transformer.h.{i}.ln_2.weight/.bias [n_embd]
  transformer.h.{i}.mlp.c_fc.weight [n_embd, 4*n_embd]     .bias [4*n_embd]
  transformer.h.{i}.mlp.c_proj.weight [4*n_embd, n_embd]   .bias [n_embd]
  transformer.ln_f.weight/.bias [n_embd]
  No lm_head tensor: logits = ln_f(h) @ wte^T.  No attn.bias / attn.masked_bias buffers.
  Heads: q/k/v of width n_embd are split into n_head contiguous chunks of head_dim.
Llama / Qwen2 (nn.Linear layout [out, in], y = x @ W^T (+ b)):
  model.embed_tokens.weight [vocab, hidden]
  model.layers.{i}.input_layernorm.weight [hidden]
  model.layers.{i}.self_attn.q_proj.weight [n_heads*head_dim, hidden]
  model.layers.{i}.self_attn.k_proj.weight [n_kv*head_dim, hidden]
  model.layers.{i}.self_attn.v_proj.weight [n_kv*head_dim, hidden]
  model.layers.{i}.self_attn.o_proj.weight [hidden, n_heads*head_dim]
  (Qwen2 only) model.layers.{i}.self_attn.{q,k,v}_proj.bias [out]     (o_proj has no bias)
  model.layers.{i}.post_attention_layernorm.weight [hidden]
  model.layers.{i}.mlp.gate_proj.weight [ffn, hidden]   .up_proj.weight [ffn, hidden]
  model.layers.{i}.mlp.down_proj.weight [hidden, ffn]
  model.norm.weight [hidden]
  lm_head.weight [vocab, hidden]   -- absent when tie_word_embeddings is true (then use embed_tokens)
safetensors: 8-byte LE header length, JSON header ("__metadata__": {"format": "pt"} first, then the
tensors in file order), padded with spaces to a multiple of 8, then the raw LE data, no gaps.

Math the C++ side must match
----------------------------
GPT-2:  LayerNorm(x) = (x - mean) / sqrt(var + layer_norm_epsilon) * w + b, biased variance,
        layer_norm_epsilon = 1e-5.  Activation "gelu_new" = tanh form:
        0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))).  Positions 0..T-1 index wpe.
        h = wte[ids] + wpe[pos];  per layer: h += c_proj(attn(ln_1(h)));  h += mlp(ln_2(h));
        logits = ln_f(h) @ wte^T.  Attention: causal, scale 1/sqrt(head_dim), softmax over keys <= q.
Llama:  RMSNorm(x) = x / sqrt(mean(x^2) + rms_norm_eps) * w (no mean subtraction, no bias);
        rms_norm_eps = 1e-5 (llama-*), 1e-6 (qwen2-tiny).  MLP = down(silu(gate(x)) * up(x)).
        GQA: query head h uses kv head h // (n_heads / n_kv).  head_dim comes from config.json
        "head_dim" (always present in these fixtures, equal to hidden/n_heads).
        RoPE, HF "rotate_half" convention (NOT interleaved pairs): for d = head_dim,
        inv_freq[i] = rope_theta^(-2i/d), i < d/2; angle = pos * inv_freq[i];
        out[i] = x[i]*cos - x[i+d/2]*sin; out[i+d/2] = x[i+d/2]*cos + x[i]*sin.  Applied to q and
        k (after the bias for Qwen2), positions 0..T-1.  Scale 1/sqrt(head_dim); no attention factor.
        llama3 rope_scaling (llama-tiny-tied-llama3rope: factor 4, low_freq_factor 1,
        high_freq_factor 4, original_max_position_embeddings 32, rope_theta 10000, head_dim 16):
        wavelen = 2*pi/inv_freq; wavelen < orig/high -> unchanged; wavelen > orig/low ->
        inv_freq/factor; otherwise s = (orig/wavelen - low)/(high - low),
        inv_freq = (1-s)*inv_freq/factor + s*inv_freq.  Here frequency 0 is unchanged, 1 is smoothed,
        2..7 are divided by 4 (the script asserts all three branches occur).
        rope_theta: 10000 for the llama fixtures, 1e6 for qwen2-tiny.
        The tied model uses embed_tokens as lm head.

golden.json
-----------
  {
    "model": dir name, "architecture": ..., "dtype_note": text,
    "token_ids": [48 ids; llama-family ones start with bos; ids 10..13 repeat ids 2..5],
    "logits": [[vocab floats] for every position of the full causal forward over token_ids],
    "greedy": [8 ids]: greedy continuation (argmax of the float64 logits, computed with a K/V cache,
              eos is NOT treated as a stop token; the script asserts eos does not occur and that
              every step's top1 - top2 margin is > 0.05),
    "greedy_margins": [8 floats]: top1 - top2 logit at each greedy step (how robust the argmax is
              to low-precision arithmetic; an engine in bf16 mode may only compare greedy ids where
              the margin is comfortably larger than its error),
    "logits_stats": {"min", "max", "std"}
  }
  Floats are float64 results printed with 9 significant digits.  The greedy steps' logits are not
  stored: greedy[0] is argmax(logits[-1]); later steps continue from token_ids + greedy[:k].
  Suggested tolerances: F32-stored models run in f32 should match to ~1e-4 abs (the script measures
  the float32-vs-float64 difference of its own forward and checks it is < 1e-4); bf16 compute will
  be ~1e-2..1e-1 off.  The F16/BF16 goldens already use the rounded weights, so only arithmetic
  error remains.

Self-checks (printed; a fixture's directory is written only after its checks pass)
-----------------------------------------------------------
  * the same forward in float32 agrees with float64 (max |diff| < 1e-4) for every model;
  * incremental decoding with a K/V cache (one token at a time) equals the full forward (< 1e-10);
  * the fixtures are discriminative: swapping two input positions changes the last logits; and the
    usual bugs change the logits by > 0.05: interleaved RoPE instead of rotate_half, no RoPE,
    GQA mapping h % n_kv instead of h // group, ignoring llama3 scaling, treating the smoothed band
    as unchanged or fully divided, dropping Qwen2 biases, erf-GELU instead of tanh-GELU (GPT-2; this
    one is small and only reported), 1/sqrt(hidden) instead of 1/sqrt(head_dim).
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch

torch.set_num_threads(1)

N_GREEDY = 8

# --------------------------------------------------------------------------------------------
# model specifications
# --------------------------------------------------------------------------------------------

GPT2_BASE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96, layer_norm_epsilon=1e-5)

LLAMA_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=None, vocab_size=128, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}

SPECS = [
    dict(name="gpt2-tiny", arch="gpt2", seed=1001, storage="F32", params=dict(GPT2_BASE)),
    dict(name="gpt2-tiny-f16", arch="gpt2", seed=1005, storage="F16", params=dict(GPT2_BASE)),
    dict(name="llama-tiny-gqa", arch="llama", seed=2001, storage="F32", params=dict(LLAMA_BASE)),
    dict(name="llama-tiny-tied-llama3rope", arch="llama", seed=2002, storage="F32",
         params=dict(LLAMA_BASE, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING, max_position_embeddings=128)),
    dict(name="qwen2-tiny", arch="qwen2", seed=3001, storage="F32",
         params=dict(LLAMA_BASE, rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=3, eos_token_id=4)),
    dict(name="llama-tiny-bf16", arch="llama", seed=2003, storage="BF16",
         params=dict(LLAMA_BASE, num_key_value_heads=4)),
    dict(name="llama-tiny-sharded", arch="llama", seed=2004, storage="F32", shards=2,
         params=dict(LLAMA_BASE, num_hidden_layers=3)),
]

TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def make_config(spec):
    p = spec["params"]
    storage = TORCH_DTYPE_NAME[spec["storage"]]
    if spec["arch"] == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": p["n_embd"],
            "n_layer": p["n_layer"],
            "n_head": p["n_head"],
            "n_inner": None,
            "n_positions": p["n_positions"],
            "n_ctx": p["n_positions"],
            "vocab_size": p["vocab_size"],
            "layer_norm_epsilon": p["layer_norm_epsilon"],
            "activation_function": "gelu_new",
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "bos_token_id": p["vocab_size"] - 1,
            "eos_token_id": p["vocab_size"] - 1,
            "tie_word_embeddings": True,
            "torch_dtype": storage,
        }
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if spec["arch"] == "qwen2" else "LlamaForCausalLM"],
        "model_type": spec["arch"],
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["head_dim"],
        "max_position_embeddings": p["max_position_embeddings"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": p["rope_scaling"],
        "vocab_size": p["vocab_size"],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "bos_token_id": p["bos_token_id"],
        "eos_token_id": p["eos_token_id"],
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": storage,
    }
    if spec["arch"] == "qwen2":
        del cfg["attention_bias"]  # Qwen2 always has q/k/v bias; not a config key there
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = p["max_position_embeddings"]
        cfg["max_window_layers"] = p["num_hidden_layers"]
    return cfg


# --------------------------------------------------------------------------------------------
# random weights (float32, in file order)
# --------------------------------------------------------------------------------------------

def make_weights(spec, cfg):
    g = torch.Generator().manual_seed(spec["seed"])

    def normal(shape, std, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean).contiguous()

    def norm_w(n):
        return normal([n], 0.1, 1.0)

    W = {}
    if spec["arch"] == "gpt2":
        d, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
        W["transformer.wte.weight"] = normal([V, d], 0.3)
        W["transformer.wpe.weight"] = normal([P, d], 0.1)
        for i in range(cfg["n_layer"]):
            pre = f"transformer.h.{i}."
            W[pre + "ln_1.weight"] = norm_w(d)
            W[pre + "ln_1.bias"] = normal([d], 0.05)
            W[pre + "attn.c_attn.weight"] = normal([d, 3 * d], 0.3)
            W[pre + "attn.c_attn.bias"] = normal([3 * d], 0.05)
            W[pre + "attn.c_proj.weight"] = normal([d, d], 0.2)
            W[pre + "attn.c_proj.bias"] = normal([d], 0.05)
            W[pre + "ln_2.weight"] = norm_w(d)
            W[pre + "ln_2.bias"] = normal([d], 0.05)
            W[pre + "mlp.c_fc.weight"] = normal([d, 4 * d], 0.3)
            W[pre + "mlp.c_fc.bias"] = normal([4 * d], 0.05)
            W[pre + "mlp.c_proj.weight"] = normal([4 * d, d], 0.15)
            W[pre + "mlp.c_proj.bias"] = normal([d], 0.05)
        W["transformer.ln_f.weight"] = norm_w(d)
        W["transformer.ln_f.bias"] = normal([d], 0.05)
        return W

    d, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qwen = spec["arch"] == "qwen2"
    W["model.embed_tokens.weight"] = normal([V, d], 0.4 if cfg["tie_word_embeddings"] else 1.0)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        W[pre + "input_layernorm.weight"] = norm_w(d)
        W[pre + "self_attn.q_proj.weight"] = normal([H * hd, d], 0.3)
        if qwen:
            W[pre + "self_attn.q_proj.bias"] = normal([H * hd], 0.2)
        W[pre + "self_attn.k_proj.weight"] = normal([KV * hd, d], 0.3)
        if qwen:
            W[pre + "self_attn.k_proj.bias"] = normal([KV * hd], 0.2)
        W[pre + "self_attn.v_proj.weight"] = normal([KV * hd, d], 0.3)
        if qwen:
            W[pre + "self_attn.v_proj.bias"] = normal([KV * hd], 0.2)
        W[pre + "self_attn.o_proj.weight"] = normal([d, H * hd], 0.2)
        W[pre + "post_attention_layernorm.weight"] = norm_w(d)
        W[pre + "mlp.gate_proj.weight"] = normal([F, d], 0.3)
        W[pre + "mlp.up_proj.weight"] = normal([F, d], 0.3)
        W[pre + "mlp.down_proj.weight"] = normal([d, F], 0.2)
    W["model.norm.weight"] = norm_w(d)
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = normal([V, d], 0.4)
    return W


def round_to_storage(W, storage):
    """Round the float32 weights to the stored dtype; returns (stored tensors, float64 copies)."""
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[storage]
    stored = {k: v.to(tdt) for k, v in W.items()}
    exact = {k: v.to(torch.float64) for k, v in stored.items()}
    return stored, exact


# --------------------------------------------------------------------------------------------
# safetensors writer
# --------------------------------------------------------------------------------------------

def tensor_bytes(t):
    if t.dtype == torch.float32:
        return t.numpy().astype("<f4").tobytes(), "F32"
    if t.dtype == torch.float16:
        return t.numpy().astype("<f2").tobytes(), "F16"
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes(), "BF16"
    raise ValueError(t.dtype)


def write_safetensors(path, tensors):
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name, t in tensors.items():
        b, dt = tensor_bytes(t)
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((-len(hj)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return off


def read_safetensors(path):
    """Independent re-read used to verify what was written."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    out = {}
    expected_off = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        assert b == expected_off, "tensors must be contiguous"
        expected_off = e
        raw = body[b:e]
        if info["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif info["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        elif info["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            a = u.view(np.float32).astype(np.float64)
        else:
            raise ValueError(info["dtype"])
        out[name] = torch.from_numpy(a.reshape(info["shape"]).copy())
    assert expected_off == len(body)
    return out


# --------------------------------------------------------------------------------------------
# reference forward passes (dtype-generic; weights dict already in the compute dtype)
# --------------------------------------------------------------------------------------------

def causal_attention(q, k, v, past_len, scale):
    """q [H, T, hd], k/v [H, P+T, hd] (already expanded to H heads). Query t sits at past_len + t."""
    T, S = q.shape[1], k.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, T, S]
    qpos = torch.arange(T).unsqueeze(1) + past_len
    kpos = torch.arange(S).unsqueeze(0)
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # [H, T, hd]


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gpt2_forward(cfg, W, ids, past=None, opts=None):
    """Returns (logits [T, V], new_past). past: list of (k, v) [H, P, hd] per layer."""
    opts = opts or {}
    d, H = cfg["n_embd"], cfg["n_head"]
    hd = d // H
    eps = cfg["layer_norm_epsilon"]
    act = gelu_erf if opts.get("gelu") == "erf" else gelu_tanh
    scale = 1.0 / math.sqrt(d if opts.get("scale") == "hidden" else hd)
    P = 0 if past is None else past[0][0].shape[1]
    T = len(ids)
    pos = torch.arange(P, P + T)
    if opts.get("positions") is not None:
        pos = torch.tensor(opts["positions"])
    x = W["transformer.wte.weight"][torch.tensor(ids)] + W["transformer.wpe.weight"][pos]
    new_past = []
    for i in range(cfg["n_layer"]):
        pre = f"transformer.h.{i}."
        h = layer_norm(x, W[pre + "ln_1.weight"], W[pre + "ln_1.bias"], eps)
        qkv = h @ W[pre + "attn.c_attn.weight"] + W[pre + "attn.c_attn.bias"]  # Conv1D [in, out]
        q, k, v = qkv.split(d, dim=-1)
        q, k, v = (t.reshape(T, H, hd).transpose(0, 1) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[i][0], k], dim=1)
            v = torch.cat([past[i][1], v], dim=1)
        new_past.append((k, v))
        a = causal_attention(q, k, v, P, scale).transpose(0, 1).reshape(T, d)
        x = x + a @ W[pre + "attn.c_proj.weight"] + W[pre + "attn.c_proj.bias"]
        h = layer_norm(x, W[pre + "ln_2.weight"], W[pre + "ln_2.bias"], eps)
        m = act(h @ W[pre + "mlp.c_fc.weight"] + W[pre + "mlp.c_fc.bias"])
        x = x + m @ W[pre + "mlp.c_proj.weight"] + W[pre + "mlp.c_proj.bias"]
    x = layer_norm(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], eps)
    return x @ W["transformer.wte.weight"].T, new_past


def rope_inv_freq(cfg, dtype, opts=None):
    """HF default inv_freq, optionally with llama3 scaling. Returns (inv_freq, branch per freq)."""
    opts = opts or {}
    hd = cfg["head_dim"]
    theta = cfg["rope_theta"]
    i = torch.arange(0, hd // 2, dtype=torch.float64)
    inv = theta ** (-2.0 * i / hd)
    branches = ["default"] * (hd // 2)
    rs = cfg.get("rope_scaling")
    if rs is not None and opts.get("llama3") != "ignore":
        assert rs["rope_type"] == "llama3"
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        orig = rs["original_max_position_embeddings"]
        low_wl, high_wl = orig / low, orig / high
        out = []
        branches = []
        for f in inv.tolist():
            wl = 2.0 * math.pi / f
            if wl < high_wl:
                out.append(f)
                branches.append("high(unchanged)")
            elif wl > low_wl:
                out.append(f / factor)
                branches.append("low(divided)")
            else:
                s = (orig / wl - low) / (high - low)
                if opts.get("llama3") == "medium_unchanged":
                    out.append(f)
                elif opts.get("llama3") == "medium_divided":
                    out.append(f / factor)
                else:
                    out.append((1.0 - s) * f / factor + s * f)
                branches.append("medium(smoothed)")
        inv = torch.tensor(out, dtype=torch.float64)
    return inv.to(dtype), branches


def apply_rope(x, pos, inv_freq, style):
    """x [H, T, hd]; pos [T]."""
    if style == "none":
        return x
    ang = pos.to(inv_freq.dtype).unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, hd/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    if style == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return torch.stack([o1, o2], dim=-1).flatten(-2)
    raise ValueError(style)


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def llama_forward(cfg, W, ids, past=None, opts=None):
    opts = opts or {}
    d = cfg["hidden_size"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    group = H // KV
    eps = cfg["rms_norm_eps"]
    qwen = cfg["model_type"] == "qwen2"
    style = opts.get("rope", "half")
    scale = 1.0 / math.sqrt(d if opts.get("scale") == "hidden" else hd)
    dtype = W["model.embed_tokens.weight"].dtype
    inv_freq, _ = rope_inv_freq(cfg, dtype, opts)
    P = 0 if past is None else past[0][0].shape[1]
    T = len(ids)
    pos = torch.arange(P, P + T)
    if opts.get("positions") is not None:
        pos = torch.tensor(opts["positions"])
    if opts.get("gqa") == "mod":
        kv_of_head = torch.tensor([h % KV for h in range(H)])
    else:
        kv_of_head = torch.tensor([h // group for h in range(H)])

    def lin(x, name, bias=False):
        y = x @ W[name + ".weight"].T
        if bias and not opts.get("drop_bias"):
            y = y + W[name + ".bias"]
        return y

    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    new_past = []
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        h = rms_norm(x, W[pre + "input_layernorm.weight"], eps)
        q = lin(h, pre + "self_attn.q_proj", qwen).reshape(T, H, hd).transpose(0, 1)
        k = lin(h, pre + "self_attn.k_proj", qwen).reshape(T, KV, hd).transpose(0, 1)
        v = lin(h, pre + "self_attn.v_proj", qwen).reshape(T, KV, hd).transpose(0, 1)
        q = apply_rope(q, pos, inv_freq, style)
        k = apply_rope(k, pos, inv_freq, style)
        if past is not None:
            k = torch.cat([past[i][0], k], dim=1)
            v = torch.cat([past[i][1], v], dim=1)
        new_past.append((k, v))  # cache holds post-RoPE keys, KV heads only
        a = causal_attention(q, k[kv_of_head], v[kv_of_head], P, scale)
        a = a.transpose(0, 1).reshape(T, H * hd)
        x = x + lin(a, pre + "self_attn.o_proj")
        h = rms_norm(x, W[pre + "post_attention_layernorm.weight"], eps)
        gate = lin(h, pre + "mlp.gate_proj")
        up = lin(h, pre + "mlp.up_proj")
        x = x + lin(gate * torch.sigmoid(gate) * up, pre + "mlp.down_proj")
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T, new_past


def forward(cfg, W, ids, past=None, opts=None):
    if cfg["model_type"] == "gpt2":
        return gpt2_forward(cfg, W, ids, past, opts)
    return llama_forward(cfg, W, ids, past, opts)


# --------------------------------------------------------------------------------------------
# goldens and checks
# --------------------------------------------------------------------------------------------

def make_token_ids(spec, cfg, attempt=0):
    g = torch.Generator().manual_seed(spec["seed"] + 7 + 1000 * attempt)
    V = cfg["vocab_size"]
    ids = torch.randint(5, V - 1, (48,), generator=g).tolist()
    ids[10:14] = ids[2:6]  # a repeated 4-gram
    if cfg["model_type"] != "gpt2":
        ids[0] = cfg["bos_token_id"]
    return ids


def greedy_decode(cfg, W, ids, n):
    """Prefill once, then one token at a time through the K/V cache."""
    logits, past = forward(cfg, W, ids)
    out, margins = [], []
    last = logits[-1]
    for _ in range(n):
        top2 = torch.topk(last, 2)
        tok = int(top2.indices[0])
        out.append(tok)
        margins.append(float(top2.values[0] - top2.values[1]))
        step, past = forward(cfg, W, [tok], past)
        last = step[-1]
    return out, margins


def max_diff(a, b):
    return float((a - b).abs().max())


def self_check(spec, cfg, W64, ids, logits, greedy):
    name = spec["name"]
    report = []

    # 1. float32 forward agrees with float64
    W32 = {k: v.to(torch.float32) for k, v in W64.items()}
    l32, _ = forward(cfg, W32, ids)
    dd = max_diff(l32.to(torch.float64), logits)
    assert dd < 1e-4, (name, "f32 vs f64", dd)
    report.append(f"f32-vs-f64 {dd:.1e}")

    # 2. incremental decode == full forward over the whole sequence
    full, _ = forward(cfg, W64, ids + greedy)
    assert max_diff(full[:len(ids)], logits) < 1e-10
    _, past = forward(cfg, W64, ids[:7])
    inc = [forward(cfg, W64, ids[:7])[0]]
    for t in ids[7:] + greedy:
        step, past = forward(cfg, W64, [t], past)
        inc.append(step)
    inc = torch.cat(inc, dim=0)
    dd = max_diff(inc, full)
    assert dd < 1e-10, (name, "incremental", dd)
    for k, tok in enumerate(greedy):
        assert int(full[len(ids) - 1 + k].argmax()) == tok
    report.append(f"kv-cache {dd:.0e}")

    # 3. discriminative power against common bugs (last position logits must move by > 0.05)
    def sens(label, opts=None, ids_=None, threshold=0.05, must=True):
        alt, _ = forward(cfg, W64, ids_ if ids_ is not None else ids, opts=opts)
        dd = max_diff(alt[-1], logits[-1])
        if must:
            assert dd > threshold, (name, label, dd)
        report.append(f"{label} {dd:.3g}")

    swapped = list(ids)
    swapped[3], swapped[8] = swapped[8], swapped[3]
    sens("swap-positions", ids_=swapped)
    sens("scale-1/sqrt(hidden)", {"scale": "hidden"})
    if cfg["model_type"] == "gpt2":
        sens("erf-gelu", {"gelu": "erf"}, must=False)
        sens("positions-reversed", {"positions": list(range(len(ids)))[::-1]})
    else:
        sens("interleaved-rope", {"rope": "interleaved"})
        sens("no-rope", {"rope": "none"})
        if cfg["num_key_value_heads"] not in (1, cfg["num_attention_heads"]):
            sens("gqa-h%kv", {"gqa": "mod"})
        if cfg["rope_scaling"] is not None:
            _, branches = rope_inv_freq(cfg, torch.float64)
            assert {"high(unchanged)", "low(divided)", "medium(smoothed)"} <= set(branches), branches
            report.append("llama3 branches " + ",".join(b.split("(")[0] for b in branches))
            sens("llama3-ignored", {"llama3": "ignore"})
            sens("llama3-medium-unchanged", {"llama3": "medium_unchanged"})
            sens("llama3-medium-divided", {"llama3": "medium_divided"})
        if cfg["model_type"] == "qwen2":
            sens("no-qkv-bias", {"drop_bias": True})
    print(f"  {name}: " + "; ".join(report))


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def fmt(x):
    s = "%.9g" % x
    if s in ("nan", "inf", "-inf"):
        raise ValueError(s)
    return s


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def write_golden(path, golden):
    lines = ["{"]
    simple = ["model", "architecture", "dtype_note", "token_ids", "greedy"]
    for k in simple:
        lines.append(f"  {json.dumps(k)}: {json.dumps(golden[k])},")
    lines.append('  "greedy_margins": [' + ", ".join(fmt(m) for m in golden["greedy_margins"]) + "],")
    st = golden["logits_stats"]
    lines.append('  "logits_stats": {' + ", ".join(f'"{k}": {fmt(st[k])}' for k in ("min", "max", "std")) + "},")
    lines.append('  "logits": [')
    rows = ["    [" + ", ".join(fmt(v) for v in row) + "]" for row in golden["logits"]]
    lines.append(",\n".join(rows))
    lines.append("  ]")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


DTYPE_NOTES = {
    "F32": "weights stored as F32; logits computed in float64 from those exact weights",
    "F16": "weights stored as F16; logits computed in float64 from the f16-rounded weights "
           "(exactly the stored values)",
    "BF16": "weights stored as BF16; logits computed in float64 from the bf16-rounded weights "
            "(exactly the stored values)",
}


def shard_split(names, n_shards):
    """Contiguous split by tensor count; the split point falls inside a layer on purpose."""
    per = math.ceil(len(names) / n_shards)
    return [names[i * per:(i + 1) * per] for i in range(n_shards)]


def build(spec, out_root, check):
    cfg = make_config(spec)
    W32 = make_weights(spec, cfg)
    stored, W64 = round_to_storage(W32, spec["storage"])
    # Deterministic retries until the greedy continuation has no near-ties (a near-tie would make
    # the engine's greedy test depend on rounding rather than correctness).
    for attempt in range(20):
        ids = make_token_ids(spec, cfg, attempt)
        assert len(ids) + N_GREEDY <= (cfg.get("n_positions") or cfg.get("max_position_embeddings"))
        logits, _ = forward(cfg, W64, ids)
        greedy, margins = greedy_decode(cfg, W64, ids, N_GREEDY)
        if min(margins) > 0.05 and cfg["eos_token_id"] not in greedy:
            break
    assert cfg["eos_token_id"] not in greedy, (spec["name"], greedy)
    assert min(margins) > 0.05, (spec["name"], "greedy argmax too close to a tie", margins)
    std = float(logits.std())
    assert 0.5 < std < 10.0, (spec["name"], "logit scale", std)
    if check:
        self_check(spec, cfg, W64, ids, logits, greedy)

    d = os.path.join(out_root, spec["name"])
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    write_json(os.path.join(d, "config.json"), cfg)

    n_shards = spec.get("shards", 1)
    if n_shards == 1:
        files = {"model.safetensors": list(stored)}
    else:
        parts = shard_split(list(stored), n_shards)
        files = {f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors": p for k, p in enumerate(parts)}
    total = 0
    weight_map = {}
    for fname, names in files.items():
        total += write_safetensors(os.path.join(d, fname), {n: stored[n] for n in names})
        for n in names:
            weight_map[n] = fname
    if n_shards > 1:
        write_json(os.path.join(d, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    # verify: re-read the files independently and recompute
    back = {}
    for fname in files:
        back.update(read_safetensors(os.path.join(d, fname)))
    assert set(back) == set(W64)
    for k in W64:
        assert torch.equal(back[k], W64[k]), k
    relog, _ = forward(cfg, back, ids)
    assert torch.equal(relog, logits)

    arch = cfg["architectures"][0]
    write_golden(os.path.join(d, "golden.json"), {
        "model": spec["name"],
        "architecture": arch,
        "dtype_note": DTYPE_NOTES[spec["storage"]] + "; printed with 9 significant digits",
        "token_ids": ids,
        "greedy": greedy,
        "greedy_margins": margins,
        "logits_stats": {"min": float(logits.min()), "max": float(logits.max()), "std": std},
        "logits": logits.tolist(),
    })
    n_params = sum(t.numel() for t in stored.values())
    print(f"{spec['name']}: {arch} {spec['storage']} params={n_params} files={list(files)} "
          f"logits std={std:.2f} range=[{float(logits.min()):.2f}, {float(logits.max()):.2f}] "
          f"greedy={greedy} min margin={min(margins):.3f}")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/models", help="output root (default tests/data/models)")
    ap.add_argument("--only", action="append", help="build only this fixture (repeatable)")
    ap.add_argument("--skip-checks", action="store_true", help="skip the self-checks")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for spec in SPECS:
        if args.only and spec["name"] not in args.only:
            continue
        build(spec, args.out, not args.skip_checks)


if __name__ == "__main__":
    main(sys.argv[1:])
