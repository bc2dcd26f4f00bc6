"""
Llama 3 from scratch: RMSNorm, rotary embeddings (with Llama 3.1 scaling), grouped-query
attention, SwiGLU, and the two entry points generation needs (prefill, one-token decode).
checkpoint.py loads and saves it (ours, Meta's, Hugging Face's); generate.py samples from it.

    import model
    net = model.Llama(model.ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2))
    logits = net(idx)                # idx (B, T) token ids -> fp32 logits (B, T, vocab)
    logits = net(idx, doc=doc_ids)   # packed rows: attention stays inside each document
    logits = net(idx, doc=doc_ids, keep=targets != -1)  # (n, vocab): only where a loss is taken
    model.tensor_parallel(net, tp_mesh, "out/base")  # inference, tensor parallel (--tp)
    sampler = model.generation_model(policy, torch.bfloat16, "cuda")  # rl.py: what rollouts use

Conventions (each pinned by a test in test_all.py):
- Rotary embeddings rotate the first half of each head against the second (HF's layout), so HF
  weights load as they are (checkpoint.py permutes Meta's interleaved wq/wk rows on load).
- Parameters keep Meta's names except two stacked pairs: attention.wqkv = [wq; wk; wv],
  feed_forward.w13 = [w1; w3] (one matmul instead of three / two).
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common


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


class _Gather(torch.autograd.Function):
    """y = x[index] along dim 0 where the gradient needs no scatter: every row of x is read by
    exactly one row of y marked in `inverse` (x[r] = y[inverse[r]]), and the other rows of y carry
    no gradient (`live` False, or None when every row of y is live). The backward is a gather, not
    indexing's scatter-add into zeros (which costs more than the attention on CPUs)."""

    @staticmethod
    def forward(ctx, x, index, inverse, live):
        ctx.inverse, ctx.live = inverse, live
        return x.index_select(0, index)  # a faster gather than x[index] on CPUs

    @staticmethod
    def backward(ctx, g):
        g = g.index_select(0, ctx.inverse)
        if ctx.live is not None:
            g = torch.where(ctx.live.view(-1, *[1] * (g.dim() - 1)), g, 0.0)
        return g, None, None, None


class Documents:
    """Attention per document for packed rows, without a (T, T) mask: the documents of a batch,
    sorted by length and grouped (each group's longest is at most 1.25x its shortest), gathered
    into one slot per (document, position) of its group's (documents, length) batch for plain
    causal attention, and the outputs gathered back into the rows. doc (B, T): equal ids in a run
    form one document. Also holds each token's distance to its document's start (its rotary
    position)."""

    def __init__(self, doc):
        B, T = doc.shape
        new = torch.ones_like(doc, dtype=torch.bool)
        new[:, 1:] = doc[:, 1:] != doc[:, :-1]
        t = torch.arange(T, device=doc.device).expand(B, T)
        self.pos = t - torch.where(new, t, 0).cummax(dim=1).values
        # documents never cross rows: in the flattened rows each is one run of tokens
        lens = torch.bincount(new.flatten().cumsum(0) - 1)
        first = lens.cumsum(0) - lens  # flat index of each document's first token
        order = lens.argsort(descending=True, stable=True)
        n = lens[order].tolist()
        slots, real, self.shapes, a = [], [], [], 0
        while a < len(n):
            b = a + 1
            while b < len(n) and n[b] * 5 >= n[a] * 4:
                b += 1
            docs, L = order[a:b], n[a]
            idx = first[docs, None] + torch.arange(L, device=doc.device)
            # a shorter document's padding slots read any token: they come after its last one,
            # so causal attention never shows them to its queries, and their outputs are dropped
            slots.append(idx.clamp(max=B * T - 1).flatten())
            real.append((torch.arange(L, device=doc.device) < lens[docs, None]).flatten())
            self.shapes.append((b - a, L))
            a = b
        self.slots, self.real = torch.cat(slots), torch.cat(real)  # slot -> token; is it one
        self.back = torch.empty(B * T, dtype=torch.long, device=doc.device)  # token -> its slot
        every = torch.arange(len(self.slots), device=doc.device)
        self.back[self.slots[self.real]] = every[self.real]

    # data-dependent groups: compiled code calls it as it is. torch's lazy torch.compiler.disable:
    # the public one imports dynamo, most of a process's start-up, into every process importing us
    @torch._disable_dynamo
    def attend(self, q, k, v):
        """Causal attention within each document: q (B, T, heads, hd), k and v (B, T, kv heads,
        hd) -> (B, T, heads, hd). A padding slot's gradient is zero (no real query sees it and its
        output is dropped), so the gathers' backwards drop it."""
        B, T = q.shape[:2]
        q, k, v = (_Gather.apply(x.flatten(0, 1), self.slots, self.back, None) for x in (q, k, v))
        sizes = [n * L for n, L in self.shapes]  # split, not sliced: one cat in the backward
        out = []
        for (n, L), q_, k_, v_ in zip(self.shapes, *(x.split(sizes) for x in (q, k, v))):
            q_, k_, v_ = (x.unflatten(0, (n, L)).transpose(1, 2) for x in (q_, k_, v_))
            y = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
            out.append(y.transpose(1, 2).flatten(0, 1))
        y = _Gather.apply(torch.cat(out), self.back, self.slots, self.real)
        return y.view(B, T, -1, q.size(-1))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        # Meta's wq, wk, wv stacked in one matrix: one matmul and one rotary call, not three / two
        self.wqkv = nn.Linear(cfg.dim, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, kv=None):
        """kv: None (plain forward), a list (prefill: this layer's keys/values are appended) or
        (k_cache, v_cache, rows, pos) (generate.KVCache's: keys transposed): decode (T == 1, row
        b's token sits at position pos[b]) or extend (pos (B, T): row b's tokens sit at positions
        pos[b], after its cached keys)."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.nh + 2 * self.nkv, self.hd)
        qk = rope(qkv[:, :, : self.nh + self.nkv], cos, sin)
        q, k, v = qk[:, :, : self.nh], qk[:, :, self.nh :], qkv[:, :, self.nh + self.nkv :]
        if isinstance(kv, tuple) and kv[3].dim() == 1:
            kc, vc, rows, pos = kv
            kc[rows, :, :, pos] = k[:, 0]
            vc[rows, :, pos] = v[:, 0]
            L = mask.size(-1)  # keys [0, L) cover every row's position; the mask hides its future
            # one query per row: a kv head's rep query heads share its keys: they go in as rep rows.
            # Two matmuls, not SDPA: for one query its flash kernel costs ~1.5x as much on CPUs
            q = q.view(B, self.nkv, self.nh // self.nkv, self.hd)
            att = (q @ kc[..., :L]).float() * self.hd**-0.5 + mask
            y = att.softmax(dim=-1).type_as(q) @ vc[:, :, :L]
        elif isinstance(kv, tuple):  # extend: T tokens per row at positions pos (B, T)
            kc, vc, rows, pos = kv
            kc[rows[:, None], :, :, pos] = k
            vc[rows[:, None], :, pos] = v
            L = mask.size(-1)
            keys = kc[..., :L].transpose(-1, -2).contiguous()  # SDPA's rounding differs on a view
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vc[:, :, :L],
                                               attn_mask=mask, enable_gqa=True).transpose(1, 2)
        elif isinstance(mask, Documents):  # packed rows (training): no keys/values kept
            # copies, not views of qkv: a view's backward is a zero-filled qkv per view, then a sum
            y = mask.attend(q.contiguous(), k.contiguous(), v.contiguous())
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


def chunked_logprobs(output, h, targets, chunk):
    """log p(targets) (n,) from the final norm's outputs h (n, dim): the output layer and the
    log-softmax run `chunk` positions at a time and are recomputed in the backward
    (torch.utils.checkpoint), so at most chunk x vocab fp32 logits are alive, not n x vocab (4.2 GB
    for 8192 positions of Llama 3's vocabulary, three times that in the backward)."""
    def part(hc, tc):
        return -F.cross_entropy(output(hc).float(), tc, reduction="none")
    n = max(1, h.size(0))  # no positions: one empty chunk
    return torch.cat([checkpoint(part, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, n, chunk or n)])


class Llama(nn.Module):
    tp = 1  # tensor parallel degree: tensor_parallel() sets it; each rank holds 1/tp of the heads

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

    def forward(self, idx, doc=None, keep=None, targets=None, chunk=0):
        """idx (B, T) -> fp32 logits (B, T, vocab). doc (B, T): ids of packed documents; each run of
        equal ids is its own document (block-diagonal causal attention, positions restart at 0).
        keep (B, T) bool: only the logits at these positions, (n, vocab) (training computes the
        output layer only where a loss is taken). targets (n,), with keep: log p(targets) (n,)
        instead of logits, `chunk` positions at a time (chunked_logprobs)."""
        T = idx.size(1)
        docs = None if doc is None else Documents(doc)
        longest = T if doc is None else int(docs.pos.max()) + 1
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {longest} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        cos, sin = self.rope_table(idx.device)
        if doc is None:
            cos, sin = cos[None, :T, None], sin[None, :T, None]
        else:
            cos, sin = cos[docs.pos][:, :, None], sin[docs.pos][:, :, None]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, docs)
        if targets is not None:
            return chunked_logprobs(self.output, self.norm(x[keep]), targets, chunk)
        return self.output(self.norm(x if keep is None else x[keep])).float()

    def prefill(self, idx):
        """Every layer's keys/values [(k, v), each (B, n_kv, T, hd)] for right-padded prompts idx
        (B, T): padding after the real tokens is out of their causal view, and decode's."""
        T = idx.size(1)
        cos, sin = self.rope_table(idx.device)
        kv, x = [], self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos[None, :T, None], sin[None, :T, None], None, kv)
        return kv

    def extend(self, idx, start, cache):
        """Prefill after cached keys/values: row b of cache (generate.KVCache: per-layer lists k
        (B, n_kv, hd, S) and v (B, n_kv, S, hd)) holds its first start[b] positions; idx (B, T)
        are its next tokens, right-padded (S >= max(start) + T). Their keys/values are written at
        start[b] + t."""
        T = idx.size(1)
        pos = start[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        cos, sin = self.rope_table(idx.device)
        cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
        L = int(start.max()) + T
        mask = (torch.arange(L, device=idx.device) <= pos[:, :, None])[:, None]  # (B, 1, T, L)
        rows, x = torch.arange(idx.size(0), device=idx.device), self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, (cache.k[i], cache.v[i], rows, pos))

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


def build_model(cfg, sd, where):
    """Our Llama holding the weights sd (our names, wqkv and w13 joined): built on the meta device
    and the tensors assigned (no copy); a shape that does not match cfg is a UserError naming
    where."""
    if cfg.tie_embeddings:
        sd = {**sd, "output.weight": sd["tok_embeddings.weight"]}
    with torch.device("meta"):
        model = Llama(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise common.UserError(f"{where}: weights do not match the model config ({e})") from None
    model.tie()  # assign=True gave the two names two parameters
    return model


def stacked_rows(cfg, name):
    """The row blocks of a stacked weight, by parameter name: wqkv's [q; k; v], w13's [w1; w3];
    None for any other parameter."""
    hd, hidden = cfg.dim // cfg.n_heads, ffn_hidden(cfg)
    if name.endswith("attention.wqkv.weight"):
        return [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]
    return [hidden, hidden] if name.endswith("feed_forward.w13.weight") else None


def row_blocks(cfg, name, w):
    """The row blocks of the weight `name`: wqkv's [q; k; v], w13's [w1; w3] (views of w); [w]
    for any other parameter."""
    rows = stacked_rows(cfg, name)
    return list(w.split(rows)) if rows else [w]


def tp_parts(blocks, dim, tp, r):
    """Rank r's parts of the weight stacked by rows from `blocks` under tp-way sharding along dim:
    the r-th chunk of each block along dim as torch.chunk cuts it (DTensor's Shard(dim) split;
    empty past the last chunk). A block is a tensor or anything with size(d) and
    narrow(d, start, length) (checkpoint.py's lazily read Meta weights): only the part is read."""
    for b in blocks:
        n = b.size(dim)
        c = -(-n // tp)
        a = min(r * c, n)
        yield b.narrow(dim, a, min(a + c, n) - a)


def tp_rows(w, cfg, name, tp, r):
    """Rank r's rows of the whole stacked weight w (`name`: wqkv or w13) under tp-way tensor
    parallelism: the r-th 1/tp of each block, [its q; k; v heads] or [its w1; w3 units]. Stacked
    for r = 0..tp-1 they are the layout tensor_parallel shards contiguously."""
    return torch.cat(list(tp_parts(row_blocks(cfg, name, w), 0, tp, r)))


def tensor_parallel(net, mesh, where):
    """Shard net for inference Megatron-style over the 1-D device mesh `mesh` of tp ranks
    (torch.distributed.tensor.parallel): each rank keeps n_heads/tp query heads and n_kv_heads/tp
    key/value heads (wqkv's rows, colwise; wo's columns, rowwise) and hidden/tp SwiGLU units (w13's
    rows, colwise; w2's columns, rowwise), a slice of the vocabulary of the embedding (rowwise) and
    of the output layer (colwise, its logits gathered whole on every rank); the norms stay whole.
    Attention runs on the local heads, so the keys/values a rank keeps (generate.KVCache,
    PrefixCache) are its heads only; one all-reduce follows attention, one the feed-forward.
    wqkv's and w13's rows are reordered first (tp_rows) so that rank r's contiguous shard is its
    [q; k; v] heads and its [w1; w3] units: their global (DTensor) layout is not the checkpoint's.
    The plan lives here. A net holding real weights is reordered in place and each weight cut by
    distribute_tensor (scattered from the mesh's first rank); on the meta device nothing is
    moved, which is how tp_model builds the empty shards that tp_fill fills (checkpoint.load_model,
    tp_copy). where: the checkpoint, named by the refusal when the heads do not split into tp."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    cfg, tp = net.cfg, mesh.size()
    hidden = ffn_hidden(cfg)
    if cfg.n_heads % tp or cfg.n_kv_heads % tp or hidden % tp:
        raise common.UserError(f"{where}: n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads} and "
                               f"the SwiGLU width {hidden} must divide by tp={tp}")
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())}
    with torch.no_grad():
        for name, w in net.named_parameters():
            if stacked_rows(cfg, name):
                w.copy_(torch.cat([tp_rows(w, cfg, name, tp, r) for r in range(tp)]))
        for i, block in enumerate(net.layers):
            a = block.attention
            a.nh, a.nkv = a.nh // tp, a.nkv // tp
            plan |= {f"layers.{i}.attention.wqkv": ColwiseParallel(),
                     f"layers.{i}.attention.wo": RowwiseParallel(),
                     f"layers.{i}.feed_forward.w13": ColwiseParallel(),
                     f"layers.{i}.feed_forward.w2": RowwiseParallel()}
    parallelize_module(net, mesh, plan)
    net.tie()  # a tied output shares the embedding's shard (both cut the vocabulary, Shard(0))
    net.tp = tp
    return net


def full_copy(model, dtype, device, into=None):
    """A plain Llama in `dtype` on `device` holding the full weights of the FSDP2-sharded `model`,
    on every rank (every rank must call it): each parameter all-gathered from the ranks' shards
    (gathered, one tensor at a time) into the copy. `into`, a copy an earlier
    call returned, is refilled in place."""
    if into is None:
        with torch.device("meta"):
            into = Llama(model.cfg)
        into = into.to_empty(device=device).to(dtype).requires_grad_(False)
        into.tie()
    copies = dict(into.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            copies[name].copy_(gathered(p, device, dtype))
    return into


def gathered(p, device, dtype):
    """The whole of an FSDP2-sharded parameter p, all-gathered on `device` in `dtype`: each rank's
    shard is cast and moved there first (an offloaded shard leaves host memory; a bf16 gather moves
    half the bytes of an fp32 one)."""
    from torch.distributed.tensor import DTensor
    local = p.to_local().to(device, dtype)
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride()).full_tensor()


def tp_model(cfg, dtype, device, mesh, where):
    """A Llama in `dtype` on `device`, sharded by tensor_parallel over the tp ranks of `mesh`, its
    shards allocated but not filled (tp_fill fills them): built on the meta device and
    parallelized there (distribute_tensor cuts meta tensors without communicating), then
    allocated, so a rank only ever allocates its own shards (1/tp of the weights) and the norms."""
    with torch.device("meta"):
        net = tensor_parallel(Llama(cfg).to(dtype), mesh, where)
    net = net.to_empty(device=device).requires_grad_(False)
    net.tie()
    return net


def tp_fill(net, blocks):
    """Fill each parameter of the tensor-parallel `net` (tp_model), one at a time, with this rank's
    parts (tp_parts) of the whole weight that blocks(name) gives as its row blocks (row_blocks):
    its chunk along the dim tensor_parallel shards, for wqkv and w13 each block's chunk copied
    into its rows of the shard (tp_rows' order); the norms whole. Each part is cast to the
    shard's dtype and device as it is copied: no temporary beyond what reading a part takes."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for name, p in net.named_parameters():
            local, dim, tp, r = p, 0, 1, 0  # the norms: whole on every rank
            if isinstance(p, DTensor):
                local, dim = p.to_local(), p.placements[0].dim
                tp, r = p.device_mesh.size(), p.device_mesh.get_local_rank()
            at = 0
            for part in tp_parts(blocks(name), dim, tp, r):
                local.narrow(0, at, part.size(0)).copy_(part)
                at += part.size(0)
    return net


def tp_copy(model, dtype, device, mesh, where, into=None):
    """full_copy's tensor-parallel form: a Llama in `dtype` on `device`, sharded by
    tensor_parallel over the tp ranks of `mesh` (tp_model: 1/tp of the weights per rank),
    holding the weights of the FSDP2-sharded `model`; no rank ever holds the whole model. Every
    rank (all must call it) gathers one parameter at a time (gathered), copies its own
    rows into its shard (tp_fill) and frees the full tensor: the shards plus one full tensor (and,
    for wqkv and w13, its rows for this rank) at the peak.
    `into`, a copy an earlier call returned, is refilled in place; `where` names the checkpoint
    whose heads must divide by tp."""
    if into is None:
        into = tp_model(model.cfg, dtype, device, mesh, where)
    params = dict(model.named_parameters())
    return tp_fill(into, lambda name: row_blocks(model.cfg, name,
                                                 gathered(params[name], device, dtype)))


def generation_model(policy, dtype, device, sampler=None, mesh=None, where=""):
    """The model generate samples from, holding the policy's current weights: the seam between
    training and generation. The fp32 policy of one process or DDP samples itself; else a copy in
    `dtype` (the KV cache takes the weights' dtype; autocast misses it), `sampler` (an earlier
    call's copy) refilled in place. Under FSDP2 every rank (all must call it) gathers a whole copy
    (full_copy), or with a tp `mesh` its shard of a tensor-parallel one
    (tp_copy; `where` names the checkpoint if the heads do not divide by tp)."""
    if common.is_sharded(policy):
        if mesh is not None:
            return tp_copy(policy, dtype, device, mesh, where, sampler)
        return full_copy(policy, dtype, device, sampler)
    if dtype == torch.float32:
        return policy
    if sampler is None:
        return copy.deepcopy(policy).to(dtype)
    sampler.load_state_dict(policy.state_dict())
    return sampler
