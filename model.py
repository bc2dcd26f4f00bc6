"""
Llama 3 from scratch: RMSNorm, rotary embeddings (with Llama 3.1 scaling), grouped-query
attention, SwiGLU, and the two entry points generation needs (prefill, one-token decode).
checkpoint.py loads and saves it (ours, Meta's, Hugging Face's); generate.py samples from it.

    import model
    net = model.Llama(model.ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2))
    logits = net(idx)                # idx (B, T) token ids -> fp32 logits (B, T, vocab)
    logits = net(idx, doc=doc_ids)   # packed rows: attention stays inside each document

Conventions (each pinned by a test in test_all.py):
- Rotary embeddings rotate the first half of each head against the second (HF's layout), so HF
  weights load as they are (checkpoint.py permutes Meta's interleaved wq/wk rows on load).
- Parameters keep Meta's names except two stacked pairs: attention.wqkv = [wq; wk; wv],
  feed_forward.w13 = [w1; w3] (one matmul instead of three / two).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


ROPE_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:  # field names follow Meta's params.json
    dim: int = 256  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads (head_dim = dim // n_heads)
    n_kv_heads: int = 4  # key/value heads (grouped-query attention)
    vocab_size: int = 1024  # base ranks + 256 special tokens
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales SwiGLU's hidden size (3 8B: 1.3, 3.2 1B: 1.5)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # rotary base
    rope_scaling: dict | None = None  # Llama 3.1: {key: number for key in ROPE_SCALING}
    max_seq_len: int = 1024  # longest sequence (size of the rotary table)
    tie_embeddings: bool = False  # output head shares the token embedding matrix


def ffn_hidden(cfg):
    """Meta's SwiGLU hidden size: 4*dim * 2/3 * ffn_dim_multiplier, rounded up to multiple_of."""
    h = int(2 * (4 * cfg.dim) / 3)
    if cfg.ffn_dim_multiplier is not None:
        h = int(cfg.ffn_dim_multiplier * h)
    return cfg.multiple_of * ((h + cfg.multiple_of - 1) // cfg.multiple_of)


def rope_freqs(cfg):
    """Rotary inverse frequencies (fp32), with Llama 3.1 scaling when cfg.rope_scaling is set."""
    hd = cfg.dim // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if cfg.rope_scaling:
        f, lo, hi, L = (cfg.rope_scaling[k] for k in ROPE_SCALING)
        wavelen = 2 * math.pi / inv
        smooth = (L / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv  # between the scaled and the unscaled band
        inv = torch.where(wavelen < L / hi, inv, torch.where(wavelen > L / lo, inv / f, mid))
    return inv


def rope(x, cos, sin):
    """Rotate x (B, T, heads, hd) in fp32, each head's first half against its second half: with
    rope_table's cos (repeated twice) and sin ([-sin, sin]), x * cos + rotate_half(x) * sin."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return (xf * cos + swapped * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32 whatever the model dtype, scale in it, as Meta does
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        # Meta's wq, wk, wv stacked in one matrix: one matmul and one rotary call, not three / two
        self.wqkv = nn.Linear(cfg.dim, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, kv=None):
        """kv: None (plain forward), a list (prefill: this layer's keys/values are appended) or
        (k_cache, v_cache, rows, pos) (decode: T == 1, row b's token sits at position pos[b])."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.nh + 2 * self.nkv, self.hd)
        qk = rope(qkv[:, :, : self.nh + self.nkv], cos, sin)
        q, k, v = qk[:, :, : self.nh], qk[:, :, self.nh :], qkv[:, :, self.nh + self.nkv :]
        if isinstance(kv, tuple):
            kc, vc, rows, pos = kv
            kc[rows, :, pos] = k[:, 0]
            vc[rows, :, pos] = v[:, 0]
            L = mask.size(-1)  # keys [0, L) cover every row's position; the mask hides its future
            # one query per row: a kv head's rep query heads share its keys: they go in as rep rows
            q = q.view(B, self.nkv, self.nh // self.nkv, self.hd)
            y = F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L], attn_mask=mask)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if kv is not None:
                kv.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True)
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
        self._rope = None  # (cos, sin) fp32, built on first use; no buffer: .to(bfloat16) skips it
        self.init_weights()

    def tie(self):
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self):
        """nanoGPT-style: N(0, 0.02), residual output projections divided by sqrt(2 * n_layers)."""
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
        """idx (B, T) -> fp32 logits (B, T, vocab). doc (B, T): ids of packed documents; each run of
        equal ids is its own document (block-diagonal causal attention, positions restart at 0)."""
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
            pos = t - torch.where(new, t, 0).cummax(dim=1).values  # distance to its document start
            seg = new.cumsum(dim=1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
            cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.output(self.norm(x)).float()

    def prefill(self, idx):
        """Every layer's keys/values [(k, v), each (B, n_kv, T, hd)] for right-padded prompts idx
        (B, T): padding after the real tokens is out of their causal view, and decode's."""
        T = idx.size(1)
        cos, sin = self.rope_table(idx.device)
        kv, x = [], self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos[None, :T, None], sin[None, :T, None], None, kv)
        return kv

    def decode(self, tok, pos, cache, L: int):
        """One token per row: tok (B,) at positions pos (B,), keys/values written into cache.
        Attends to cache positions [0, L) masked to <= pos. Returns next-token logits (B, vocab)
        fp32. cache has per-layer lists k and v (generate.KVCache)."""
        cos, sin = self.rope_table(tok.device)
        cos, sin = cos[pos][:, None, None], sin[pos][:, None, None]
        past = torch.arange(L, device=tok.device) <= pos[:, None]  # additive mask for all layers
        mask = torch.where(past, 0.0, float("-inf")).to(self.output.weight.dtype)[:, None, None]
        rows = torch.arange(tok.size(0), device=tok.device)
        x = self.tok_embeddings(tok)[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, (cache.k[i], cache.v[i], rows, pos))
        return self.output(self.norm(x))[:, 0].float()
