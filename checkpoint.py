"""
Model weights in and out, in three layouts: ours (model.pt + tokenizer), Meta's originals
(params.json + consolidated.*.pth, model-parallel shards merged) and Hugging Face's (config.json +
*.safetensors, sharded or not). Every stage loads its policy with load_model. And the training
state that sft.py and rl.py resume from (save_state, load_state): out_dir/state.pt, with the model
and optimizer in it, or under FSDP2 in a torch.distributed.checkpoint directory it names.

    import checkpoint
    net, tok = checkpoint.load_model("Llama-3.2-1B-Instruct")  # HF dir: config.json + *.safetensors
    # net, tok = checkpoint.load_model("~/.llama/checkpoints/Llama3.2-1B-Instruct")  # Meta layout
    # on a GPU: checkpoint.load_model(path, device="cuda", dtype=torch.bfloat16)
    checkpoint.save_checkpoint("out/mine", net, tok, {})  # ours; load_model("out/mine") reads it
    checkpoint.export_hf(net, tok, "out/mine-hf")  # transformers' LlamaForCausalLM loads this
    checkpoint.export_meta(net, tok, "out/mine-meta")  # params.json + consolidated.00.pth

Conventions (each pinned by a test in test_all.py):
- Meta's checkpoints rotate interleaved pairs of each head (model.py rotates halves, HF's layout):
  their wq/wk rows are permuted on load.
- Meta params.json `use_scaled_rope: true` means factor 8 (Meta's reference code hard-codes it)
  unless the file carries `rope_scaling_factor` or a `rope_scaling` dict. The Llama 3.2 HF configs
  say 32: add "rope_scaling_factor": 32 to a 3.2 params.json to get the HF copy's logits.
- Parameters keep Meta's names except two stacked pairs: attention.wqkv = [wq; wk; wv],
  feed_forward.w13 = [w1; w3]; split_qkv / join_qkv convert.
"""
import dataclasses
import glob
import json
import math
import mmap
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

import hf_tokenizer
from common import UserError, is_sharded, torch_save
from model import (Llama, ModelConfig, ROPE_SCALING, build_model, ffn_hidden, row_blocks,
                   tp_fill, tp_model)
from tokenizer import Tokenizer

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


def _meta_unperm(w, n_heads):
    """Our half-split rotary rows -> Meta's interleaved pairs (the inverse of _meta_perm)."""
    return w.view(n_heads, 2, -1, w.size(1)).transpose(1, 2).reshape(w.shape)


def _ffn_fields(dim, hidden):
    """(multiple_of, ffn_dim_multiplier) with which Meta's rule gives `hidden` (HF stores it)."""
    base, m = int(2 * (4 * dim) / 3), math.gcd(hidden, 256)
    for mult in (None, hidden / base if m > 1 else (hidden + 0.5) / base):
        if ffn_hidden(ModelConfig(dim=dim, multiple_of=m, ffn_dim_multiplier=mult)) == hidden:
            return m, mult
    raise ValueError(f"cannot express intermediate_size {hidden}")


def config_from_hf(c, where):
    """A ModelConfig from a Hugging Face config.json dict (where: its file, for errors)."""
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


def _stacked(cfg):
    return [f"layers.{i}.{m}.weight" for i in range(cfg.n_layers)
            for m in ("attention.wqkv", "feed_forward.w13")]


def _meta_names(name):
    """Meta's names of the row blocks of our stacked weight `name`: wq, wk, wv or w1, w3."""
    prefix, stacked, _ = name.rsplit(".", 2)
    return [f"{prefix}.w{n}.weight" for n in stacked[1:]]


def split_qkv(sd, cfg):
    """Our state dict -> Meta's names (wq, wk, wv and w1, w3 separate: views)."""
    sd = dict(sd)
    for name in _stacked(cfg):
        sd.update(zip(_meta_names(name), row_blocks(cfg, name, sd.pop(name))))
    return sd


def join_qkv(sd, cfg):
    """Meta's names -> our state dict (inverse of split_qkv)."""
    sd = dict(sd)
    for name in _stacked(cfg):
        sd[name] = torch.cat([sd.pop(n) for n in _meta_names(name)])
    return sd


def _meta_shapes(cfg):
    """Meta's parameter names and shapes for cfg, without allocating anything."""
    with torch.device("meta"):
        sd = split_qkv(Llama(cfg).state_dict(), cfg)
    return {k: v.shape for k, v in sd.items() if not (cfg.tie_embeddings and k == "output.weight")}


class _MetaWeight:
    """A Meta weight read on demand by narrow (model.tp_parts', of the rows or columns a rank
    keeps): the parts of the model-parallel files concatenated along dim, then for wq and wk the
    rotary rows of each of `heads` heads permuted (_meta_perm; a narrow along them covers whole
    heads). Only the parts of the files a narrow covers are read; narrow(0, 0, rows) reads all."""

    def __init__(self, parts, dim, heads):
        self.parts, self.dim, self.heads = parts, dim, heads
        s = parts[0].shape
        self.shape = torch.Size([*s[:dim], sum(t.size(dim) for t in parts), *s[dim + 1:]])

    def size(self, d):
        return self.shape[d]

    def narrow(self, d, start, length):
        pieces, at = [], 0
        for t in self.parts:
            if d == self.dim:  # this part's share of [start, start + length)
                a, b = (min(max(x - at, 0), t.size(d)) for x in (start, start + length))
                at, t = at + t.size(d), t.narrow(d, a, b - a)
            else:
                t = t.narrow(d, start, length)
            pieces.append(t)
        w = torch.cat(pieces, self.dim)
        return _meta_perm(w, self.heads * w.size(0) // self.shape[0]) if self.heads else w


def _load_meta(path, where):
    """(cfg, weights in Meta's names) of a Meta original dir; a weight split over several files,
    and wq and wk (rows permuted), are _MetaWeights: concatenated or permuted only when read."""
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise UserError(f"{path}: params.json but no consolidated.*.pth weights")
    parts = [_torch_load(s) for s in shards]
    cfg = _config_from_meta(_read_json(where), where, tied="output.weight" not in parts[0])
    sd = {}
    for k, shape in _meta_shapes(cfg).items():
        if any(k not in p for p in parts):
            raise UserError(f"{shards[0]}: missing tensor {k}")
        ts, d = [p[k] for p in parts], 0
        if ts[0].shape == shape:  # one shard, or replicated across model-parallel ranks (norms)
            ts = ts[:1]
        elif len(ts[0].shape) == len(shape):  # split along the one dimension that differs
            d = [a != b for a, b in zip(ts[0].shape, shape)].index(True)  # wo/w2: columns
        heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(k.split(".")[-2])
        sd[k] = ts[0] if len(ts) == 1 and not heads else _MetaWeight(ts, d, heads)
        if sd[k].shape != shape:
            raise UserError(f"{shards[0]}: tensor {k} has shape {tuple(sd[k].shape)}, "
                            f"expected {tuple(shape)}")
    return cfg, sd


def _load_hf(path, where):
    cfg = config_from_hf(_read_json(where), where)
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


def load_tokenizer(path):
    """The tokenizer load_model gives with a checkpoint dir's weights: tokenizer.model (tiktoken
    ranks; in a Hugging Face dir also original/tokenizer.model), else a byte-level BPE
    tokenizer.json. A path to one of those files loads that file."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return hf_tokenizer.load(path) if path.endswith(".json") else Tokenizer(path)
    hf = not any(os.path.isfile(os.path.join(path, n)) for n in ("model.pt", "params.json"))
    names = ["tokenizer.model", *(["original/tokenizer.model"] if hf else []), "tokenizer.json"]
    found = next((n for n in names if os.path.isfile(os.path.join(path, n))), None)
    if found is None:
        raise UserError(f"{path}: no tokenizer found ({', '.join(names)})")
    if found == "tokenizer.json":
        return hf_tokenizer.load(os.path.join(path, found))
    return Tokenizer(os.path.join(path, found))


def load_model(path, device="cpu", dtype=torch.float32, mesh=None):
    """(model, tokenizer) from our checkpoint dir, a Meta original dir or a Hugging Face dir (see
    the top). Weights stay memory-mapped until moved: modules are built on the meta device and the
    tensors assigned. mesh: a tp device mesh; the model is then sharded over it
    (model.tensor_parallel), each rank reading from the files only its own rows or columns of each
    weight, cast into its shards on device (model.tp_model, tp_fill): in no layout does a rank
    hold a whole weight (the norms aside), on the host or on device."""
    where_given, path = path, os.path.expanduser(str(path))
    j = lambda *p: os.path.join(path, *p)
    ours = os.path.isfile(j("model.pt"))
    if ours:
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
    elif os.path.isfile(j("config.json")):
        where = j("config.json")
        cfg, sd = _load_hf(path, where)
    else:
        raise UserError(f"{path}: no model.pt (ours), params.json (Meta) or config.json "
                        "(Hugging Face) found")
    tok = load_tokenizer(path)
    padded = "tokenizer.json" in tok.files and tok.n_vocab < cfg.vocab_size  # HF pads embeddings
    if tok.n_vocab != cfg.vocab_size and not padded:
        raise UserError(f"{tok.path}: tokenizer has {tok.n_vocab} tokens but the model ({where}) "
                        f"has vocab_size {cfg.vocab_size}")
    if mesh is None:
        whole = lambda w: w if isinstance(w, torch.Tensor) else w.narrow(0, 0, w.size(0))
        sd = sd if ours else join_qkv({k: whole(w) for k, w in sd.items()}, cfg)
        return build_model(cfg, sd, where).to(device=device, dtype=dtype), tok
    shapes = {k: torch.empty(w.shape, device="meta") for k, w in sd.items()}
    build_model(cfg, shapes if ours else join_qkv(shapes, cfg), where)  # the names and shapes
    blocks = lambda k: row_blocks(cfg, k, sd[k]) if k in sd else [sd[n] for n in _meta_names(k)]
    return tp_fill(tp_model(cfg, dtype, device, mesh, where_given), blocks), tok


def save_checkpoint(out_dir, model, tokenizer, config: dict):
    """Ours: the tokenizer's files (tokenizer.model, or tokenizer.json and tokenizer_config.json),
    then (last) out_dir/model.pt {model_config, model, config}."""
    model = getattr(model, "_orig_mod", model)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(out_dir)
    ck = {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
          "config": config}
    torch_save(ck, os.path.join(out_dir, "model.pt"))


def export_hf(model, tokenizer, out_dir):
    """Hugging Face's layout: config.json, model.safetensors, generation_config.json, the
    tokenizer's own files and tokenizer.json + tokenizer_config.json (chat template included)."""
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
    hf_tokenizer.export(tokenizer, out_dir)


def export_meta(model, tokenizer, out_dir):
    """Meta's original layout: params.json, consolidated.00.pth (one shard; wq/wk rows in Meta's
    interleaved order, no output.weight when tied) and the tokenizer's own files."""
    model = getattr(model, "_orig_mod", model)
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    sd = split_qkv(model.state_dict(), cfg)
    for i in range(cfg.n_layers):
        a = f"layers.{i}.attention."
        sd[a + "wq.weight"] = _meta_unperm(sd[a + "wq.weight"], cfg.n_heads)
        sd[a + "wk.weight"] = _meta_unperm(sd[a + "wk.weight"], cfg.n_kv_heads)
    if cfg.tie_embeddings:
        del sd["output.weight"]
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
              "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
              "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "max_seq_len": cfg.max_seq_len}
    if cfg.rope_scaling:
        params["rope_scaling"] = dict(cfg.rope_scaling)
    tokenizer.save(out_dir)
    torch_save({k: v.detach().cpu().clone() for k, v in sd.items()},  # no shared storage
               os.path.join(out_dir, "consolidated.00.pth"))
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f, indent=2)


# ----------------------------------------------------------------------------- the training state

def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _dcp():
    """torch.distributed.checkpoint and its state-dict helpers (imported on use: the import costs
    seconds, and every stage imports this file)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as sd
    return dcp, sd


def full_model(model):
    """The model to export: `model` itself, or for an FSDP2-sharded model a plain Llama holding its
    full weights, gathered on rank 0's CPU (None on the other ranks; every rank must call it). The
    final export is the one place the whole model meets on one rank."""
    model = _unwrap(model)
    if not is_sharded(model):
        return model
    _, sd = _dcp()
    full = sd.get_model_state_dict(model, options=sd.StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if _rank() != 0:
        return None
    with torch.device("meta"):  # built on the meta device, the gathered tensors assigned
        plain = Llama(model.cfg)
    plain.load_state_dict(full, assign=True)
    plain.tie()
    return plain


def _shard_dirs(out_dir):
    return [d for d in os.listdir(out_dir) if re.fullmatch(r"state-\d+", d)]


def save_state(out_dir, model, optimizer, step, extra):
    """The training state of a run: out_dir/state.pt, written atomically, holds the step, the RNG
    states (rank 0's), extra (data position, config...) and the model and optimizer. Under FSDP2
    these two are not gathered: each rank writes its own shards with torch.distributed.checkpoint
    into out_dir/state-<step>/ (on a file system all ranks share), and state.pt, written once that
    directory is complete, names it ("shards"); older directories are removed after. A kill at any
    moment leaves a state.pt whose state is whole. Under torch.distributed every rank must call
    it."""
    model, rank = _unwrap(model), _rank()
    if is_sharded(model):
        dcp, sd = _dcp()
        shards = f"state-{step}"
        if rank == 0:  # what a save killed at this step left
            shutil.rmtree(os.path.join(out_dir, shards), ignore_errors=True)
        dist.barrier()
        dcp.save({"model": sd.get_model_state_dict(model),
                  "optimizer": sd.get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(out_dir, shards))
        state = {"shards": shards}
    else:
        shards, state = None, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if rank == 0:
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        os.makedirs(out_dir, exist_ok=True)
        torch_save({**state, "step": step, "rng": rng, "extra": extra},
                   os.path.join(out_dir, "state.pt"))
        for d in _shard_dirs(out_dir):
            if d != shards:
                shutil.rmtree(os.path.join(out_dir, d))
    if dist.is_initialized():
        # nobody runs ahead (and could be killed "after" a checkpoint that is not on disk yet)
        dist.barrier()


def load_state(out_dir, model, optimizer):
    """Restore what save_state wrote (model, optimizer, RNG states) -> (step, extra), or None if
    there is none. Either layout loads into either kind of model: torch.distributed.checkpoint
    reshards a sharded state to this run's ranks (or to one process), and a whole state.pt is
    scattered into FSDP2's shards."""
    path = os.path.join(out_dir, "state.pt")
    if not os.path.exists(path):
        return None
    # mmap: the ranks share the page cache
    st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = _unwrap(model)
    if "shards" in st:  # each rank reads the parts of the files its own tensors hold
        if not os.path.isfile(os.path.join(out_dir, st["shards"], ".metadata")):
            raise UserError(f"{path}: its shards {st['shards']}/ are missing or incomplete")
        dcp, sd = _dcp()
        state = {"model": sd.get_model_state_dict(model),
                 "optimizer": sd.get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, st["shards"]),
                 no_dist=not dist.is_initialized())
        sd.set_model_state_dict(model, state["model"])
        sd.set_optimizer_state_dict(model, optimizer, state["optimizer"])
    elif is_sharded(model):
        _, sd = _dcp()
        opts = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd.set_model_state_dict(model, st["model"], options=opts)
        sd.set_optimizer_state_dict(model, optimizer, st["optimizer"], options=opts)
    else:
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
    rng = st["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return st["step"], st["extra"]
