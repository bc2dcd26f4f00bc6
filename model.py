"""
Llama 3 from scratch and its checkpoints (ours, Meta's originals, Hugging Face's): every stage
builds or loads its policy here. generate.py samples from it; tokenizer.py holds the chat format.

Load a downloaded Llama-3.2-1B-Instruct (either layout) and chat with it:
    import torch, model
    from generate import generate
    net, tok = model.load_model("Llama-3.2-1B-Instruct")  # HF dir: config.json + *.safetensors
    # net, tok = model.load_model("~/.llama/checkpoints/Llama3.2-1B-Instruct")  # Meta: params.json
    # on a GPU: model.load_model(path, device="cuda", dtype=torch.bfloat16)
    prompt = tok.render_prompt([{"role": "user", "content": "What is 12*13?"}])
    [[s]] = generate(net, [prompt], max_new_tokens=64, temperature=0, stop_ids=tok.stop_ids)
    print(tok.decode(s.tokens))
Ours: model.save_checkpoint(out_dir, net, tok, cfg_dict), then model.load_model(out_dir);
model.export_hf(net, tok, out_dir) writes a directory that transformers' LlamaForCausalLM loads.
Conventions (each pinned by a test in test_all.py):
- Rotary embeddings rotate the first half of each head against the second (HF's layout), so HF
  weights load as they are; Meta's rotate interleaved pairs: their wq/wk rows are permuted on load.
- Meta params.json `use_scaled_rope: true` means factor 8 (Meta's reference code hard-codes it)
  unless the file carries `rope_scaling_factor` or a `rope_scaling` dict. The Llama 3.2 HF configs
  say 32: add "rope_scaling_factor": 32 to a 3.2 params.json to get the HF copy's logits.
- Parameters keep Meta's names except two stacked pairs: attention.wqkv = [wq; wk; wv],
  feed_forward.w13 = [w1; w3] (one matmul instead of three / two); split_qkv / join_qkv convert.
"""
import dataclasses
import glob
import json
import math
import mmap
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, torch_save
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- model

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


# ----------------------------------------------------------------------------- checkpoints

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}


def hf_name(name):
    """Our (Meta's) parameter name -> the Hugging Face LlamaForCausalLM name."""
    part, w = name.rsplit(".", 1)
    if part in _HF_NAMES:
        return f"{_HF_NAMES[part]}.{w}"
    _, i, part = part.split(".", 2)
    return f"model.layers.{i}.{_HF_NAMES[part]}.{w}"


def read_safetensors(path):
    """{name: tensor}, memory-mapped, from a .safetensors file (u64 size, JSON header, data)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 1 << 27:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # lazy, never written back
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (a, b) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = math.prod(shape)
            if b - a != count * dtype.itemsize or 8 + n + b > len(buf):
                raise ValueError(f"tensor {name} has bad offsets")
            out[name] = torch.empty(shape, dtype=dtype) if not count else \
                torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + a).view(shape)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path, tensors):
    """Write {name: tensor} as .safetensors, atomically."""
    inv = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inv[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
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
        raise UserError(f"{path}: not a readable torch checkpoint "
                        f"({type(e).__name__}: {e})") from None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None


def _meta_perm(w, n_heads):
    """Meta's interleaved rotary row pairs -> our half-split rows (per head: even, then odd)."""
    return w.view(n_heads, -1, 2, w.size(1)).transpose(1, 2).reshape(w.shape)


def _ffn_fields(dim, hidden):
    """(multiple_of, ffn_dim_multiplier) with which Meta's rule gives `hidden` (HF stores it)."""
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
        rp = c.get("rope_parameters") or {}  # transformers >= 5: rope_theta and the scaling
        rs = c.get("rope_scaling") or rp
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope type {kind!r} is not supported")
        multiple_of, mult = _ffn_fields(dim, c["intermediate_size"])
        return ModelConfig(
            dim=dim, n_layers=c["num_hidden_layers"], n_heads=nh,
            n_kv_heads=c.get("num_key_value_heads") or nh, vocab_size=c["vocab_size"],
            multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", rp.get("rope_theta", 10000.0)),
            rope_scaling={k: rs[k] for k in ROPE_SCALING} if kind == "llama3" else None,
            max_seq_len=c.get("max_position_embeddings", 8192),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{where}: unsupported or incomplete config "
                        f"({type(e).__name__}: {e})") from None


def _config_from_meta(p, where, tied):
    try:
        scaling = None
        if p.get("rope_scaling"):
            scaling = {k: p["rope_scaling"][k] for k in ROPE_SCALING}
        elif p.get("use_scaled_rope"):  # Meta's reference hard-codes these numbers
            scaling = dict(factor=p.get("rope_scaling_factor", 8.0), low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)
        return ModelConfig(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=p["vocab_size"],
            multiple_of=p.get("multiple_of", 256), ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
            rope_scaling=scaling, max_seq_len=p.get("max_seq_len", 131072 if scaling else 8192),
            tie_embeddings=tied)
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: unsupported or incomplete params "
                        f"({type(e).__name__}: {e})") from None


def split_qkv(sd, cfg):
    """Our state dict -> Meta's names (wq, wk, wv and w1, w3 separate)."""
    sd, hd, h = dict(sd), cfg.dim // cfg.n_heads, ffn_hidden(cfg)
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        sizes = [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]
        q, k, v = sd.pop(a + "wqkv.weight").split(sizes)
        sd.update({a + "wq.weight": q, a + "wk.weight": k, a + "wv.weight": v})
        sd[f + "w1.weight"], sd[f + "w3.weight"] = sd.pop(f + "w13.weight").split([h, h])
    return sd


def join_qkv(sd, cfg):
    """Meta's names -> our state dict (inverse of split_qkv)."""
    sd = dict(sd)
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        sd[a + "wqkv.weight"] = torch.cat([sd.pop(f"{a}w{n}.weight") for n in "qkv"])
        sd[f + "w13.weight"] = torch.cat([sd.pop(f"{f}w{n}.weight") for n in "13"])
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
        if ts[0].shape == shape:  # one shard, or replicated across model-parallel ranks (norms)
            sd[k] = ts[0]
        else:  # split along the one dimension that differs (columns of wo/w2, rows elsewhere)
            same_rank = len(ts[0].shape) == len(shape)
            d = [a != b for a, b in zip(ts[0].shape, shape)].index(True) if same_rank else 0
            sd[k] = torch.cat(ts, dim=d)
        if sd[k].shape != shape:
            raise UserError(f"{shards[0]}: tensor {k} has shape {tuple(sd[k].shape)}, "
                            f"expected {tuple(shape)}")
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
    ignored = ("rotary_emb.inv_freq",
               "lm_head.weight" if cfg.tie_embeddings else "rotary_emb.inv_freq")
    extra = sorted(h for h in hf if h not in names and not h.endswith(ignored))
    if extra:
        raise UserError(f"{hf[extra[0]][1]}: unexpected tensor {extra[0]}")
    return cfg, {k: hf[h][0] for h, k in names.items()}


def load_model(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from our checkpoint dir, a Meta original dir or a Hugging Face dir (see
    the top). Weights stay memory-mapped until moved: modules are built on the meta device and the
    tensors assigned."""
    path = os.path.expanduser(str(path))
    j = lambda *p: os.path.join(path, *p)
    tok_path = j("tokenizer.model")
    if os.path.isfile(j("model.pt")):
        where = j("model.pt")
        ck = _torch_load(where)
        if not isinstance(ck, dict) or not isinstance(ck.get("model_config"), dict) \
                or "model" not in ck:
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
            tok_path = j("original", "tokenizer.model")  # where Hugging Face's Llama repos keep it
        cfg, sd = _load_hf(path, where)
        sd = join_qkv(sd, cfg)
    else:
        raise UserError(f"{path}: no model.pt (ours), params.json (Meta) or config.json "
                        "(Hugging Face) found")
    tok = Tokenizer(tok_path)
    if tok.n_vocab != cfg.vocab_size:
        raise UserError(f"{tok_path}: tokenizer has {tok.n_vocab} tokens but the model ({where}) "
                        f"has vocab_size {cfg.vocab_size}")
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


def save_checkpoint(out_dir, model, tokenizer, config: dict):
    """Ours: out_dir/tokenizer.model, then (last) out_dir/model.pt {model_config, model, config}."""
    model = getattr(model, "_orig_mod", model)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(out_dir)
    ck = {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
          "config": config}
    torch_save(ck, os.path.join(out_dir, "model.pt"))


def export_hf(model, tokenizer, out_dir):
    """Hugging Face's layout: config.json, model.safetensors, generation_config.json, tokenizer."""
    model = getattr(model, "_orig_mod", model)
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    sd = {hf_name(k): v for k, v in split_qkv(model.state_dict(), cfg).items()
          if not (cfg.tie_embeddings and k == "output.weight")}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), sd)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    scaling = dict(cfg.rope_scaling, rope_type="llama3") if cfg.rope_scaling else None
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": ffn_hidden(cfg), "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "head_dim": cfg.dim // cfg.n_heads, "vocab_size": cfg.vocab_size,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "max_position_embeddings": cfg.max_seq_len, "rope_scaling": scaling,
              "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, **ids, "torch_dtype": dtype}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(ids, f, indent=2)
    tokenizer.save(out_dir)
