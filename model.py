"""
Llama 3 from scratch: the model, a hand-written KV cache with batched generation, the Llama 3 tokenizer and
chat format, and checkpoints (ours, Meta originals, Hugging Face). Every stage (sft, search, rl, eval) uses it.

Load a downloaded Llama-3.2-1B-Instruct (either layout) and chat with it:
    import torch, model
    net, tok = model.load_model("Llama-3.2-1B-Instruct")               # HF dir: config.json + *.safetensors
    # net, tok = model.load_model("~/.llama/checkpoints/Llama3.2-1B-Instruct")  # Meta: params.json + .pth
    # on a GPU: model.load_model(path, device="cuda", dtype=torch.bfloat16)
    prompt = tok.render_prompt([{"role": "user", "content": "What is 12*13?"}])
    [[s]] = model.generate(net, [prompt], max_new_tokens=64, temperature=0, stop_ids=tok.stop_ids)
    print(tok.decode(s.tokens))
Our own checkpoints: model.save_checkpoint(out_dir, net, tok, cfg_dict) then model.load_model(out_dir);
model.export_hf(net, tok, out_dir) writes a directory that transformers' LlamaForCausalLM loads.

Conventions (each pinned by a test in test_all.py):
- Rotary embeddings rotate the first half of each head against the second half (HF's layout), so HF weights load
  as they are; Meta checkpoints rotate interleaved pairs and get their wq/wk rows permuted on load.
- Chat format: exactly the given messages, no injected "Cutting Knowledge Date" system header (HF's template adds
  one; llama-models' ChatFormat does not). Content is not stripped (as in llama-models), so traces keep their
  trailing delimiters.
- Meta params.json `use_scaled_rope: true` means factor 8 (Meta's reference code hard-codes it) unless the file
  carries `rope_scaling_factor` or a `rope_scaling` dict; HF config.json gives all four numbers. The Llama 3.2 HF
  configs say factor 32: add "rope_scaling_factor": 32 to a 3.2 params.json to get the same logits as the HF copy.
- Parameters keep Meta's names except two stacked pairs: attention.wqkv = [wq; wk; wv], feed_forward.w13 = [w1; w3]
  (one matmul instead of three / two); split_qkv / join_qkv convert.
- generate(compile=True) compiles the decode step with dynamic shapes: one compilation serves every batch size of
  2 or more rows and every length (static shapes would recompile for each), one more a lone row; the first call
  takes ~20-60 s on a small CPU. On an H200 the compiled step decoded 1.6x faster than eager at 64 rows (a 4-layer
  dim-2048 model, bf16; bench/gpu_check.py times the 1B shape).
"""
import base64
import binascii
import dataclasses
import glob
import json
import math
import mmap
import os
import shutil
import weakref
from collections import deque
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, torch_save

# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:  # field names follow Meta's params.json
    dim: int = 256  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads (head_dim = dim // n_heads)
    n_kv_heads: int = 4  # key/value heads (grouped-query attention)
    vocab_size: int = 1024  # base ranks + 256 special tokens
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the SwiGLU hidden size (Llama 3 8B: 1.3, 3.2 1B: 1.5)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # rotary base
    rope_scaling: dict | None = None  # Llama 3.1: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 1024  # longest sequence (size of the rotary table)
    tie_embeddings: bool = False  # output head shares the token embedding matrix


def ffn_hidden(cfg):
    """Meta's SwiGLU hidden size: 4*dim, times 2/3, times ffn_dim_multiplier, rounded up to multiple_of."""
    h = int(2 * (4 * cfg.dim) / 3)
    if cfg.ffn_dim_multiplier is not None:
        h = int(cfg.ffn_dim_multiplier * h)
    return cfg.multiple_of * ((h + cfg.multiple_of - 1) // cfg.multiple_of)


def rope_freqs(cfg):
    """Rotary inverse frequencies (fp32), with Llama 3.1 scaling when cfg.rope_scaling is set."""
    hd = cfg.dim // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        f, lo, hi, L = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (L / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv  # interpolate between the scaled and unscaled band
        inv = torch.where(wavelen < L / hi, inv, torch.where(wavelen > L / lo, inv / f, mid))
    return inv


def rope(x, cos, sin):
    """Rotate x (B, T, heads, hd) in fp32, the first half of each head against the second half. cos is the table
    repeated twice, sin is [-sin, sin] (rope_table), so this is x * cos + rotate_half(x) * sin in few ops."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return (xf * cos + swapped * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32 whatever the model dtype, then scale in the model dtype, as Meta does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        # Meta's wq, wk, wv stacked into one matrix: one matmul and one rotary call instead of three / two
        self.wqkv = nn.Linear(cfg.dim, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, kv=None):
        """kv is None (plain forward), a list (prefill: this layer's keys/values are appended for generate),
        or (k_cache, v_cache, rows, pos) (decode: T == 1, row b's token sits at position pos[b])."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.nh + 2 * self.nkv, self.hd)
        qk = rope(qkv[:, :, : self.nh + self.nkv], cos, sin)
        q, k, v = qk[:, :, : self.nh], qk[:, :, self.nh :], qkv[:, :, self.nh + self.nkv :]
        if isinstance(kv, tuple):
            kc, vc, rows, pos = kv
            kc[rows, :, pos] = k[:, 0]
            vc[rows, :, pos] = v[:, 0]
            L = mask.size(-1)  # keys [0, L) cover every row's position; the mask hides each row's future
            # one query per row: the rep query heads of a kv head share its keys, so they go in as rep query rows
            q = q.view(B, self.nkv, self.nh // self.nkv, self.hd)
            y = F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L], attn_mask=mask)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if kv is not None:
                kv.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            y = y.transpose(1, 2)
        return self.wo(y.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = ffn_hidden(cfg)
        self.w13 = nn.Linear(cfg.dim, 2 * h, bias=False)  # Meta's w1 (gate) and w3 (up), stacked
        self.w2 = nn.Linear(h, cfg.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, kv=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, kv)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie()
        self._rope = None  # (cos, sin) fp32, built on first use; not a buffer so .to(bfloat16) cannot touch it
        self.init_weights()

    def tie(self):
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self):
        """nanoGPT-style: N(0, 0.02), residual output projections scaled down by sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                scaled = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layers) if scaled else 0.02)

    def rope_table(self, device):
        if self._rope is None or self._rope[0].device != device:
            with torch.inference_mode(False):  # usable by training even when generate builds it
                t = torch.arange(self.cfg.max_seq_len, dtype=torch.float32, device=device)
                f = torch.outer(t, rope_freqs(self.cfg).to(device))
                self._rope = (torch.cat([f.cos(), f.cos()], -1), torch.cat([-f.sin(), f.sin()], -1))
        return self._rope

    def forward(self, idx, doc=None):
        """idx (B, T) -> fp32 logits (B, T, vocab). doc (B, T): ids of packed documents; each run of equal ids is
        its own document (block-diagonal causal attention, positions restarting at 0)."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_table(idx.device)
        mask = None
        if doc is None:
            cos, sin = cos[None, :T, None], sin[None, :T, None]
        else:
            new = torch.ones_like(doc, dtype=torch.bool)
            new[:, 1:] = doc[:, 1:] != doc[:, :-1]
            t = torch.arange(T, device=idx.device).expand(B, T)
            pos = t - torch.where(new, t, 0).cummax(dim=1).values  # distance to the start of the document
            seg = new.cumsum(dim=1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
            cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.output(self.norm(x)).float()

    def prefill(self, idx):
        """Every layer's keys/values [(k, v), each (B, n_kv, T, hd)] for right-padded prompts idx (B, T). Padding sits
        after the real tokens, so causal attention keeps it out of them, and decode never attends to it."""
        T = idx.size(1)
        cos, sin = self.rope_table(idx.device)
        kv, x = [], self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos[None, :T, None], sin[None, :T, None], None, kv)
        return kv

    def decode(self, tok, pos, cache, L: int):
        """One token per row: tok (B,) at positions pos (B,), keys/values written into cache.
        Attends to cache positions [0, L) masked to <= pos. Returns next-token logits (B, vocab) fp32."""
        cos, sin = self.rope_table(tok.device)
        cos, sin = cos[pos][:, None, None], sin[pos][:, None, None]
        past = torch.arange(L, device=tok.device) <= pos[:, None]  # additive mask, built once for all layers
        mask = torch.where(past, 0.0, float("-inf")).to(self.output.weight.dtype)[:, None, None]  # (B, 1, 1, L)
        rows = torch.arange(tok.size(0), device=tok.device)
        x = self.tok_embeddings(tok)[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, (cache.k[i], cache.v[i], rows, pos))
        return self.output(self.norm(x))[:, 0].float()


# ----------------------------------------------------------------------------- generation


class KVCache:
    """Preallocated keys/values of the rows in flight: per layer (B, n_kv, S, hd). Each row holds its own sequence
    at its own positions (prompts differ in length), so rows never wait for each other."""

    def __init__(self, cfg, B, S, device, dtype):
        shape = (B, cfg.n_kv_heads, S, cfg.dim // cfg.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def keep(self, rows):
        """Keep only these rows. A copy of the whole cache: generate drops finished rows in batches."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


@dataclass
class Sample:
    tokens: list[int]  # generated ids, including the stop token if one was hit
    logprobs: list[float]  # log p(token) under the model at temperature 1 (raw policy; no top-k/top-p), per token
    stopped: bool  # True if it ended on a stop id, False if it hit max_new_tokens / context
    forced: list[int] = dataclasses.field(default_factory=list)  # positions (in tokens) a tool wrote, not the model


_stats = {"prefill_tokens": 0, "decode_tokens": 0}
_compiled = weakref.WeakKeyDictionary()  # model -> compiled decode step


def generate_stats():
    """Counters since the last reset: prefill_tokens (prompt tokens prefilled: each distinct prompt once, all but its
    last token) and decode_tokens (tokens through the decode step: one per generated token)."""
    return dict(_stats)


def reset_generate_stats():
    for k in _stats:
        _stats[k] = 0


TOP_P_FIRST = 64


def sample_next(logits, temperature, top_k, top_p, gen):
    """Next token per row from fp32 logits (B, V): greedy at temperature 0, else temperature/top-k/top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs, order = logits.softmax(dim=-1), None
    if top_p < 1.0:  # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # Sorting only the TOP_P_FIRST likeliest tokens gives the same prefix when they hold more than top_p in
        # every row (a trained policy's usual case) and costs far less than sorting the vocabulary (~15% of a
        # CPU decode step before); a flatter row sends the whole batch to the full sort. The check is a host sync.
        top, order = probs.topk(min(TOP_P_FIRST, probs.size(-1)), dim=-1)
        if bool((top.sum(dim=-1) <= top_p).any()):
            top, order = probs.sort(dim=-1, descending=True)
        probs = top.masked_fill(top.cumsum(dim=-1) - top > top_p, 0.0)
    # inverse-CDF draw: one uniform per row, no host sync, several times cheaper on CPU than multinomial or
    # argmax(p / Exp(1)); the kept probabilities need no renormalizing since u is scaled by their total
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=gen) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return (idx if order is None else order.gather(-1, idx))[:, 0]


@torch.inference_mode()  # like no_grad, with less per-op overhead; nothing it creates leaves as a tensor
def generate(model, prompts, num_samples=1, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(),
             seed=0, batch_size=256, compile=False, progress=False, tool=None):
    """Sample num_samples[i] continuations of each prompt (lists of ids); returns result[i] = [Sample, ...].

    tool = (trigger ids, fn): when a row writes a trigger id, fn(its prompt, its generated ids so far) returns ids to
    write next instead of samples (e.g. a calculator's result after "11*4="); they are fed one per step like
    sampled ids, and Sample.forced lists their positions so RL can leave them out of the policy gradient.

    Continuous batching: up to batch_size rows decode together, one token per row per step. A row that finishes
    hands its slot to the next pending sample; when none are left, finished rows are dropped from the batch.
    Each distinct prompt is prefilled once (all but its last token) and its keys/values are copied to every row
    that samples it. Same seed -> same outputs for the same arguments (batch_size changes the draws)."""
    assert batch_size >= 1
    model = getattr(model, "_orig_mod", model)
    cfg, w = model.cfg, model.tok_embeddings.weight
    dev = w.device
    counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
    assert len(counts) == len(prompts), "num_samples must be an int or one count per prompt"
    results = [[None] * n for n in counts]
    pending, left = deque(), {}  # samples not started yet, prompt by prompt; samples left to start per prompt
    for i, (p, n) in enumerate(zip(prompts, counts)):
        if n > 0 and not p:
            raise ValueError(f"prompt {i} is empty")
        if n > 0 and min(max_new_tokens, cfg.max_seq_len - len(p)) <= 0:  # no room: nothing to generate
            results[i] = [Sample([], [], False) for _ in range(n)]
        elif n > 0:
            pending.extend((i, j) for j in range(n))
            left[i] = n
    if not pending:
        return results

    B = min(batch_size, len(pending))
    S = min(cfg.max_seq_len, max(len(prompts[i]) for i in left) + max_new_tokens)
    S = -(-S // 8) * 8 + 8  # keys up to a multiple of 8 (the compiled step's L, below), and L < S always: a
                            # compiled graph specializes on whether its slice [:L] is the whole cache
    cache = KVCache(cfg, B, S, dev, w.dtype)
    if compile:  # dynamic shapes: one compilation serves every batch size and length (static ones recompile)
        # Without this, a first batch of n_kv_heads or head_dim rows shares that dim's symbol ("duck sizing") and
        # the graph specializes on it: a second compilation for the next batch size (seen on an H200).
        torch.fx.experimental._config.use_duck_shape = False
        if model not in _compiled:
            _compiled[model] = torch.compile(model.decode, fullgraph=True, dynamic=True)
        step = _compiled[model]
    else:
        step = model.decode
    align = 8 if compile else 1  # on CUDA the compiled step specializes on L % 8 == 0 (inductor's alignment check):
                                 # attending to L rounded up (extra keys masked) keeps it to one compilation
    gen = torch.Generator(dev).manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    stop_set = set(stops.tolist())
    # per row: last token (fed next step), its position, the last position allowed, generated ids and logprobs
    tok, pos, limit = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))
    live = torch.zeros(B, dtype=torch.bool, device=dev)  # False for a finished row that waits to be dropped
    out_tok = torch.zeros(B, S, dtype=torch.long, device=dev)  # a generated token sits at its position
    out_lp = torch.zeros(B, S, dtype=torch.float32, device=dev)
    rows = [None] * B  # (prompt index, sample index) held by each row
    triggers = torch.tensor(sorted(tool[0]) if tool else [], dtype=torch.long, device=dev)
    queue = {}  # row -> ids the tool still has to write there
    forced = [[] for _ in range(B)]  # row -> positions (from the prompt's end) the tool wrote
    prefix = {}  # prompt index -> (keys/values of its prefill chunk, its row there) while it has samples to start

    def prefill(idxs):
        """Prefill prompts (all but their last token) in right-padded chunks of at most ~16k tokens."""
        idxs = [i for i in idxs if len(prompts[i]) > 1]
        n = max(1, 16384 // max([len(prompts[i]) for i in idxs], default=1))
        for c in range(0, len(idxs), n):
            chunk = idxs[c : c + n]
            lens = [len(prompts[i]) - 1 for i in chunk]
            ids = torch.zeros(len(chunk), max(lens), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : lens[r]] = torch.tensor(prompts[i][:-1])
            kv = model.prefill(ids.to(dev))
            _stats["prefill_tokens"] += sum(lens)
            for r, i in enumerate(chunk):
                prefix[i] = (kv, r)

    def admit(free):
        """Start pending samples in the free rows: copy their prompt's cache, feed its last token next step."""
        take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        if not take:
            return
        prefill(list(dict.fromkeys(i for i, _ in take if i not in prefix)))
        groups = {}  # prefill chunk -> (its keys/values, destination rows, source rows)
        for r, (i, j) in zip(free, take):
            rows[r] = (i, j)
            if i in prefix:
                kv, src = prefix[i]
                g = groups.setdefault(id(kv), (kv, [], []))
                g[1].append(r)
                g[2].append(src)
            left[i] -= 1
            if left[i] == 0:
                prefix.pop(i, None)  # its last sample started: let the prefix cache go
        for kv, dst, src in groups.values():
            dst, src = torch.tensor(dst, device=dev), torch.tensor(src, device=dev)
            for layer, (k, v) in enumerate(kv):
                cache.k[layer][dst, :, : k.size(2)] = k[src]
                cache.v[layer][dst, :, : v.size(2)] = v[src]
        r = torch.tensor(free[: len(take)], device=dev)
        plen = torch.tensor([len(prompts[i]) for i, _ in take], device=dev)
        tok[r] = torch.tensor([prompts[i][-1] for i, _ in take], device=dev)
        pos[r] = plen - 1
        limit[r] = (plen - 1 + max_new_tokens).clamp(max=cfg.max_seq_len - 1)
        live[r] = True

    bar = tqdm(total=len(pending), disable=not progress, desc="generate", unit="sample")
    model.rope_table(dev)  # built eagerly, outside any compiled graph
    admit(list(range(B)))
    ar = torch.arange(B, device=dev)
    max_pos = int(pos.max())  # host copy of max(pos): decode attends to keys [0, max_pos] only, no sync per step
    idle = 0  # finished rows still in the batch
    while True:
        logits = step(tok, pos, cache, -(-(max_pos + 1) // align) * align)
        _stats["decode_tokens"] += len(rows) - idle
        tok = sample_next(logits, temperature, top_k, top_p, gen)
        pos += live  # a finished row waiting to be dropped stays where it is (its output is never read)
        max_pos += 1
        if queue:  # rows in the middle of a tool's output: its next id replaces the sample
            busy = list(queue)
            tok[busy] = torch.tensor([queue[r].pop(0) for r in busy], device=dev)
            for r in busy:
                forced[r].append(int(pos[r]) - len(prompts[rows[r][0]]))
                if not queue[r]:
                    del queue[r]
        out_tok[ar, pos] = tok
        out_lp[ar, pos] = logits.log_softmax(dim=-1).gather(1, tok[:, None])[:, 0]
        done = pos >= limit
        if len(stops):
            done |= torch.isin(tok, stops)
        done &= live
        if len(triggers):  # another host sync, only with a tool
            for r in (torch.isin(tok, triggers) & ~done & live).nonzero()[:, 0].tolist():
                if r in queue:  # a trigger inside the tool's own output (" == 24") does not call it again
                    continue
                prompt = prompts[rows[r][0]]
                ids = tool[1](prompt, out_tok[r, len(prompt) : int(pos[r]) + 1].tolist())
                if ids:
                    queue[r] = list(ids)
        fin = done.nonzero()[:, 0].tolist()  # the host sync of every step (top-p's and the tool's come on top)
        if not fin:
            continue
        toks, lps, ends = out_tok[fin].tolist(), out_lp[fin].tolist(), pos[fin].tolist()
        for r, t, lp, e in zip(fin, toks, lps, ends):
            i, j = rows[r]
            n = len(prompts[i])
            results[i][j] = Sample(t[n : e + 1], lp[n : e + 1], t[e] in stop_set, forced[r])
            rows[r], forced[r] = None, []
            queue.pop(r, None)
        live[fin] = False
        bar.update(len(fin))
        admit(fin)  # refill the finished rows with pending samples, if any
        idle = rows.count(None)  # nothing left to start them with: drop them from the batch, but only once they
        if idle and idle * 8 >= len(rows):  # are an eighth of it (copying the cache each time a row finished
            # cost ~10% of a CPU decode; an idle row costs one row's step)
            keep = torch.tensor([r for r, x in enumerate(rows) if x is not None], dtype=torch.long, device=dev)
            if len(keep) == 0:
                break
            cache.keep(keep)
            tok, pos, limit, live, out_tok, out_lp = (t[keep] for t in (tok, pos, limit, live, out_tok, out_lp))
            kept = keep.tolist()
            queue = {kept.index(r): q for r, q in queue.items()}  # (finished rows have no queue)
            forced = [forced[r] for r in kept]
            rows = [x for x in rows if x is not None]
            ar = torch.arange(len(rows), device=dev)
            idle = 0
        max_pos = int((pos * live).max())  # over the rows that advance: an idle row keeps its place
    bar.close()
    return results


# ----------------------------------------------------------------------------- tokenizer

PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(SPECIAL_TOKENS))]  # Llama 3.1 order


def read_ranks(path):
    """A tiktoken ranks file ("<base64 token> <rank>" per line) -> {bytes: rank}, ranks 0..n-1."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file not found")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise UserError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE from a ranks file plus 256 special tokens with ids n_base + i."""

    def __init__(self, path):
        self.path = str(path)
        ranks = read_ranks(self.path)
        self.specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.specials)
        self.n_vocab = len(ranks) + len(SPECIAL_TOKENS)
        self.bos_id, self.eos_id = self.specials["<|begin_of_text|>"], self.specials["<|end_of_text|>"]
        self.eot_id, self.eom_id = self.specials["<|eot_id|>"], self.specials["<|eom_id|>"]
        self.stop_ids = {self.eot_id, self.eom_id, self.eos_id}
        self._bytes = None

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # special-token strings in text stay plain text

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def special(self, name):
        return self.specials[name]

    def ids_containing(self, s):
        if self._bytes is None:
            self._bytes = [self.enc.decode_single_token_bytes(i) for i in range(self.n_vocab)]
        b = s.encode("utf-8")
        return {i for i, t in enumerate(self._bytes) if b in t}

    def _header(self, role):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}")
        return [self.specials["<|start_header_id|>"], *self.encode(role), self.specials["<|end_header_id|>"],
                *self.encode("\n\n")]

    def render_chat(self, messages):
        """Llama 3 chat format -> (ids, mask); mask is 1 on assistant content and its <|eot_id|>."""
        ids, mask = [self.bos_id], [0]
        for m in messages:
            h, body = self._header(m["role"]), self.encode(m["content"]) + [self.eot_id]
            ids += h + body
            mask += [0] * len(h) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages):
        """Messages without the final assistant turn -> ids ending with the assistant header and "\\n\\n"."""
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("render_prompt takes the conversation without the final assistant message")
        return self.render_chat(messages)[0] + self._header("assistant")


# ----------------------------------------------------------------------------- checkpoints

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(name):
    """Our (Meta's) parameter name -> the Hugging Face LlamaForCausalLM name."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    part, w = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_HF_NAMES[part]}.{w}"


def read_safetensors(path):
    """{name: tensor} memory-mapped from a .safetensors file (8-byte little-endian header size, JSON header, data)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 1 << 27:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private pages: loaded lazily, never written back
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (a, b) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = math.prod(shape)
            if b - a != count * dtype.itemsize or 8 + n + b > len(buf):
                raise ValueError(f"tensor {name} has bad offsets")
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + a).view(shape) if count \
                else torch.empty(shape, dtype=dtype)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path, tensors):
    """Write {name: tensor} as .safetensors, atomically."""
    inv = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inv[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # keep the data 8-byte aligned
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated / corrupted / foreign file
        raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None


def _meta_perm(w, n_heads):
    """Meta's interleaved-pair rotary rows -> our half-split rows (per head: even rows first, then odd rows)."""
    return w.view(n_heads, -1, 2, w.size(1)).transpose(1, 2).reshape(w.shape)


def _ffn_fields(dim, hidden):
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give `hidden` (HF configs store the size itself)."""
    base, m = int(2 * (4 * dim) / 3), math.gcd(hidden, 256)
    for mult in (None, hidden / base if m > 1 else (hidden + 0.5) / base):
        if ffn_hidden(ModelConfig(dim=dim, multiple_of=m, ffn_dim_multiplier=mult)) == hidden:
            return m, mult
    raise ValueError(f"cannot express intermediate_size {hidden}")


def _config_from_hf(c, where):
    try:
        if c.get("model_type", "llama") != "llama" or c.get("attention_bias") or c.get("mlp_bias") \
                or c.get("hidden_act", "silu") != "silu":
            raise ValueError("only Llama models (silu, no biases) are supported")
        dim, nh = c["hidden_size"], c["num_attention_heads"]
        if c.get("head_dim") not in (None, dim // nh):
            raise ValueError("head_dim != hidden_size // num_attention_heads is not supported")
        rp = c.get("rope_parameters") or {}  # transformers >= 5 stores rope_theta and the scaling here
        rs = c.get("rope_scaling") or rp
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope type {kind!r} is not supported")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        multiple_of, mult = _ffn_fields(dim, c["intermediate_size"])
        return ModelConfig(dim=dim, n_layers=c["num_hidden_layers"], n_heads=nh,
                           n_kv_heads=c.get("num_key_value_heads") or nh, vocab_size=c["vocab_size"],
                           multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=c.get("rms_norm_eps", 1e-6),
                           rope_theta=c.get("rope_theta", rp.get("rope_theta", 10000.0)),
                           rope_scaling={k: rs[k] for k in keys} if kind == "llama3" else None,
                           max_seq_len=c.get("max_position_embeddings", 8192),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{where}: unsupported or incomplete config ({type(e).__name__}: {e})") from None


def _config_from_meta(p, where, tied):
    try:
        scaling = None
        if p.get("rope_scaling"):
            scaling = {k: p["rope_scaling"][k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")}
        elif p.get("use_scaled_rope"):  # Meta's reference hard-codes these numbers
            scaling = dict(factor=p.get("rope_scaling_factor", 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
        return ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                           n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=p["vocab_size"],
                           multiple_of=p.get("multiple_of", 256), ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
                           norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
                           rope_scaling=scaling, max_seq_len=p.get("max_seq_len", 131072 if scaling else 8192),
                           tie_embeddings=tied)
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: unsupported or incomplete params ({type(e).__name__}: {e})") from None


def split_qkv(sd, cfg):
    """Our state dict -> Meta's names (wq, wk, wv and w1, w3 separate)."""
    sd, hd, h = dict(sd), cfg.dim // cfg.n_heads, ffn_hidden(cfg)
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        q, k, v = sd.pop(a + "wqkv.weight").split([cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd])
        sd.update({a + "wq.weight": q, a + "wk.weight": k, a + "wv.weight": v})
        sd[f + "w1.weight"], sd[f + "w3.weight"] = sd.pop(f + "w13.weight").split([h, h])
    return sd


def join_qkv(sd, cfg):
    """Meta's names -> our state dict (inverse of split_qkv)."""
    sd = dict(sd)
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        sd[a + "wqkv.weight"] = torch.cat([sd.pop(a + n) for n in ("wq.weight", "wk.weight", "wv.weight")])
        sd[f + "w13.weight"] = torch.cat([sd.pop(f + n) for n in ("w1.weight", "w3.weight")])
    return sd


def _meta_shapes(cfg):
    """Meta's parameter names and shapes for cfg, without allocating anything."""
    with torch.device("meta"):
        sd = split_qkv(Llama(cfg).state_dict(), cfg)
    return {k: v.shape for k, v in sd.items() if not (cfg.tie_embeddings and k == "output.weight")}


def _load_meta(path, where):
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise UserError(f"{path}: params.json but no consolidated.*.pth weights")
    parts = [_torch_load(s) for s in shards]
    cfg = _config_from_meta(_read_json(where), where, tied="output.weight" not in parts[0])
    sd = {}
    for k, shape in _meta_shapes(cfg).items():
        if any(k not in p for p in parts):
            raise UserError(f"{shards[0]}: missing tensor {k}")
        ts = [p[k] for p in parts]
        if ts[0].shape == shape:  # a single shard, or replicated across model-parallel ranks (norms)
            sd[k] = ts[0]
        else:  # split along the one dimension that differs (columns of wo/w2, rows elsewhere)
            d = [a != b for a, b in zip(ts[0].shape, shape)].index(True) if len(ts[0].shape) == len(shape) else 0
            sd[k] = torch.cat(ts, dim=d)
        if sd[k].shape != shape:
            raise UserError(f"{shards[0]}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)}")
    for i in range(cfg.n_layers):
        a = f"layers.{i}.attention."
        sd[a + "wq.weight"] = _meta_perm(sd[a + "wq.weight"], cfg.n_heads)
        sd[a + "wk.weight"] = _meta_perm(sd[a + "wk.weight"], cfg.n_kv_heads)
    return cfg, sd


def _load_hf(path, where):
    cfg = _config_from_hf(_read_json(where), where)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path}: config.json but no *.safetensors weights")
    hf = {}
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"{f}: weight file listed in the index is missing")
        hf.update({k: (v, f) for k, v in read_safetensors(f).items()})
    names = {hf_name(k): k for k in _meta_shapes(cfg)}
    for h in names:
        if h not in hf:
            raise UserError(f"{files[0]}: missing tensor {h}")
    ignored = ("rotary_emb.inv_freq", "lm_head.weight" if cfg.tie_embeddings else "rotary_emb.inv_freq")
    extra = sorted(h for h in hf if h not in names and not h.endswith(ignored))
    if extra:
        raise UserError(f"{hf[extra[0]][1]}: unexpected tensor {extra[0]}")
    return cfg, {k: hf[h][0] for h, k in names.items()}


def load_model(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from our checkpoint dir, a Meta original dir or a Hugging Face dir (see the top).
    Weights stay memory-mapped until moved: modules are built on the meta device and the tensors assigned."""
    path = os.path.expanduser(str(path))
    j = lambda *p: os.path.join(path, *p)
    tok_path = j("tokenizer.model")
    if os.path.isfile(j("model.pt")):
        where = j("model.pt")
        ck = _torch_load(where)
        if not isinstance(ck, dict) or not isinstance(ck.get("model_config"), dict) or "model" not in ck:
            raise UserError(f"{where}: not a nanoastro checkpoint (needs model_config and model)")
        try:
            cfg = ModelConfig(**ck["model_config"])
        except TypeError as e:
            raise UserError(f"{where}: bad model_config ({e})") from None
        sd = ck["model"]
    elif os.path.isfile(j("params.json")):
        where = j("params.json")
        cfg, sd = _load_meta(path, where)
        sd = join_qkv(sd, cfg)
    elif os.path.isfile(j("config.json")):
        where = j("config.json")
        if not os.path.isfile(tok_path):
            tok_path = j("original", "tokenizer.model")  # where the Hugging Face Llama repos keep it
        cfg, sd = _load_hf(path, where)
        sd = join_qkv(sd, cfg)
    else:
        raise UserError(f"{path}: no model.pt (ours), params.json (Meta) or config.json (Hugging Face) found")
    tok = Tokenizer(tok_path)
    if tok.n_vocab != cfg.vocab_size:
        raise UserError(f"{tok_path}: tokenizer has {tok.n_vocab} tokens but the model ({where}) has vocab_size "
                        f"{cfg.vocab_size}")
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Llama(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{where}: weights do not match the model config ({e})") from None
    model.tie()  # assign=True gave the two names two parameters
    return model.to(device=device, dtype=dtype), tok


def _copy_tokenizer(tokenizer, out_dir):
    dst = os.path.join(out_dir, "tokenizer.model")
    if not (os.path.exists(dst) and os.path.samefile(tokenizer.path, dst)):
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(tokenizer.path, tmp)
        os.replace(tmp, dst)


def save_checkpoint(out_dir, model, tokenizer, config: dict):
    """Our format: out_dir/tokenizer.model, then out_dir/model.pt = {model_config, model, config} (atomic, last)."""
    model = getattr(model, "_orig_mod", model)
    os.makedirs(out_dir, exist_ok=True)
    _copy_tokenizer(tokenizer, out_dir)
    ck = {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(), "config": config}
    torch_save(ck, os.path.join(out_dir, "model.pt"))


def export_hf(model, tokenizer, out_dir):
    """Hugging Face layout: config.json + model.safetensors (+ generation_config.json, tokenizer.model)."""
    model = getattr(model, "_orig_mod", model)
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    sd = {hf_name(k): v for k, v in split_qkv(model.state_dict(), cfg).items()
          if not (cfg.tie_embeddings and k == "output.weight")}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), sd)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": ffn_hidden(cfg), "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "head_dim": cfg.dim // cfg.n_heads, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
              "rope_scaling": dict(cfg.rope_scaling, rope_type="llama3") if cfg.rope_scaling else None,
              "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids),
              "torch_dtype": dtype}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids)}, f, indent=2)
    _copy_tokenizer(tokenizer, out_dir)
