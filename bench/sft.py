"""
Tokens/s of sft.py's training step against a plain training loop over transformers'
LlamaForCausalLM with the same model config, data, batch (conversations per micro-step, micro-steps
per step), precision and AdamW, in one process.

    python bench/sft.py                    # the base policy's recipe: dim 128, 4 layers, 32 x 256
    python bench/sft.py --astro=True       # ASTRO SFT's rows: 18 x 448 tokens of ~190-token traces
    python bench/sft.py --steps=2 --warmup=1 --threads=1 --batch_size=4 --micro_batch=2   # a probe
    python bench/sft.py --compile=True     # sft.py with torch.compile (the plain loop stays eager)
Ours is sft.main itself (batch building, doc-masked forward, loss, backward, clip, AdamW), timed
from its own metrics.jsonl after `warmup` steps. Two baselines: (1) the same packed rows fed to
LlamaForCausalLM(input_ids, labels) with its plain causal attention over whole rows (more
attention work than ours, and packed documents see each other); (2) the usual HF SFT loop: the same
conversations, one per row, padded to the longest of the micro-batch. Rates are data tokens/s
(padding excluded; processed tokens in brackets), the ratio ours / transformers, and each side's
share of the fp32 torch.mm peak read in the same process (model FLOPs of the timed rows:
6 per weight per token, attention over each document's causal pairs, the output layer where a loss
is taken; work beyond that, such as transformers' attention across documents, counts for nothing).
Target: >= 1.5x at both shapes. Data: data/countdown/warmup.jsonl (--astro:
out/linearize/astro.jsonl) with data/countdown/tokenizer.model when present, else synthetic
Countdown-like conversations of the same length class with a byte-level tokenizer. Don't tune
timings while others use the CPU.
"""
import base64
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common
import sft
from bench.generate import mm_peak
from bench.plan import params
from model import ModelConfig, ffn_hidden
from tokenizer import Tokenizer


@dataclass
class Config:
    data: str = "data/countdown/warmup.jsonl"  # conversations; synthetic ones if it is missing
    tokenizer: str = "data/countdown/tokenizer.model"  # used with `data`
    dim: int = 128  # model shape: the base policy's (config/base_countdown.py)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    astro: bool = False  # ASTRO SFT's shape (config/sft_astro.py): overrides data, the row sizes
    seq_len: int = 256  # packed row length (config/base_countdown.py)
    batch_size: int = 32  # rows per optimizer step
    micro_batch: int = 32  # rows per forward
    steps: int = 10  # timed steps
    warmup: int = 2  # untimed steps first
    dtype: str = "float32"  # "bfloat16" (autocast, fp32 master weights) or "float32"
    compile: bool = False  # torch.compile in sft.py (a trainer option; the plain loop stays eager)
    compile_hf: bool = False  # torch.compile the transformers model too
    threads: int = 0  # torch threads; 0 = torch's default


def synthetic(dirname, n=3000, seed=0, numbers=2):
    """Countdown-like conversations (one operation per line) and a byte-level tokenizer: with 2
    numbers ~75 tokens each (as warm-up conversations), with 4 ~170 (as ASTRO traces)."""
    rnd = random.Random(seed)
    tok = os.path.join(dirname, "bytes.model")
    with open(tok, "w") as f:
        for i in range(256):
            f.write(f"{base64.b64encode(bytes([i])).decode()} {i}\n")
    data = os.path.join(dirname, "conv.jsonl")
    with open(data, "w") as f:
        for _ in range(n):
            nums = [rnd.randint(1, 99) for _ in range(numbers)]
            steps, pool = [], list(nums)
            while len(pool) > 1:
                a, b = pool.pop(rnd.randrange(len(pool))), pool.pop(rnd.randrange(len(pool)))
                pool.append(a + b)
                steps.append(f"{a} + {b} = {a + b}, remaining: {pool}\n")
            msgs = [{"role": "user", "content": f"Use {nums} to reach {pool[0]}."},
                    {"role": "assistant", "content": "".join(steps) + f"\\boxed{{{pool[0]}}}"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return data, tok


def ours(b, data, tok, out_dir):
    cfg = sft.Config(data=data, tokenizer=tok, dim=b.dim, n_layers=b.n_layers, n_heads=b.n_heads,
                     n_kv_heads=b.n_kv_heads, seq_len=b.seq_len, batch_size=b.batch_size,
                     micro_batch=b.micro_batch, max_steps=b.warmup + b.steps, dtype=b.dtype,
                     compile=b.compile, val_frac=0.0, eval_every=0, save_every=10**9, log_every=1,
                     progress=False, out_dir=out_dir)
    sft.main(cfg)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"loss"' in line][b.warmup:]
    seconds = sum(r["tokens"] / r["tok_s"] for r in recs)
    data_tokens = sum(r["tokens"] for r in recs)  # sft.py processes no padding
    return data_tokens / seconds, data_tokens / seconds


def stream(b, data, tok_path):
    """The rendered conversations and sft.py's stream of training rows over them (sft.Data: its
    epochs, each its own seeded order)."""
    tok = Tokenizer(tok_path)
    cfg = sft.Config(seq_len=b.seq_len)
    # ours holds out nothing either (val_frac=0)
    docs, _ = sft.render(sft.read_conversations(data), tok, cfg)
    return tok, docs, sft.Data(docs, [], cfg, 1)


def model_flops(b, vocab, docs):
    """Model FLOPs of a forward and backward over `docs` ((ids, tgt) pairs): (the matmuls with
    weights: 6 per weight per token in the blocks, 6 * dim * vocab per token that carries a loss;
    attention: per layer 12 * dim per causal (query, key) pair of a document, QK and PV)."""
    shape = ModelConfig(dim=b.dim, n_layers=b.n_layers, n_heads=b.n_heads,
                        n_kv_heads=b.n_kv_heads, vocab_size=vocab)
    blocks = params(shape).linear - b.dim * vocab  # every Linear weight but the output layer's
    tokens = sum(len(ids) for ids, _ in docs)
    loss_tokens = sum(int((tgt >= 0).sum()) for _, tgt in docs)
    pairs = sum(len(ids) * (len(ids) + 1) // 2 for ids, _ in docs)
    weights = 6 * blocks * tokens + 6 * b.dim * vocab * loss_tokens
    return weights, 12 * b.n_layers * b.n_heads * (b.dim // b.n_heads) * pairs


def transformers_loop(b, tok, docs, data, packed):
    """Data tokens/s and processed tokens/s of a plain LlamaForCausalLM loop. packed=True: our
    packed rows (trimmed as ours), plain causal attention over whole rows (documents see each other:
    more attention work than ours, and a different objective). packed=False: the same
    conversations per micro-step as ours, one per row, padded to the longest (the usual HF SFT
    loop)."""
    mcfg = ModelConfig(dim=b.dim, n_layers=b.n_layers, n_heads=b.n_heads, n_kv_heads=b.n_kv_heads)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.n_vocab, hidden_size=b.dim, intermediate_size=ffn_hidden(mcfg),
        num_hidden_layers=b.n_layers, num_attention_heads=b.n_heads,
        num_key_value_heads=b.n_kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=b.seq_len, tie_word_embeddings=False, attn_implementation="sdpa"))
    model = torch.compile(hf) if b.compile_hf else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=b.dtype == "bfloat16")
    accum, pos, t0, data_tokens, slots = b.batch_size // b.micro_batch, (0, 0), None, 0, 0
    for step in range(b.warmup + b.steps):
        if step == b.warmup:
            t0, data_tokens, slots = time.time(), 0, 0
        for _ in range(accum):
            mine, pos = data.batch(pos, b.micro_batch)
            if packed:
                x, y, _ = sft.make_batch(mine, docs, b.seq_len)
            else:
                x, y, _ = sft.make_batch([[i] for r in mine for i in r], docs, b.seq_len)
                longest = max(len(docs[i][0]) for r in mine for i in r)
                x, y = x[:, :longest], y[:, :longest]
            labels = torch.full_like(x, -100)  # HF shifts labels itself: labels[t] is read at t-1
            labels[:, 1:] = torch.where(y[:, :-1] == -1, -100, y[:, :-1])
            with autocast:
                loss = model(input_ids=x, labels=labels).loss
            (loss / accum).backward()
            data_tokens += sum(len(docs[i][0]) for r in mine for i in r)
            slots += x.numel()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.time() - t0
    return data_tokens / dt, slots / dt


def main(b):
    if b.threads:
        torch.set_num_threads(b.threads)
    if b.astro:
        b.data, b.seq_len, b.batch_size, b.micro_batch = "out/linearize/astro.jsonl", 448, 18, 18
    with tempfile.TemporaryDirectory() as tmp:
        data, tok = b.data, b.tokenizer
        if not (os.path.isfile(data) and os.path.isfile(tok)):  # not the main job's ratios
            data, tok = synthetic(tmp, numbers=4 if b.astro else 2)
            print(f"no {b.data} or {b.tokenizer}: synthetic byte-level conversations instead "
                  "(data/countdown/prepare.py writes the tokenizer and warm-up data; --astro reads "
                  "the main job's out/linearize/astro.jsonl)", flush=True)
        print(f"data {data} | dim {b.dim} x {b.n_layers} layers | {b.batch_size}x{b.seq_len} "
              f"tokens per step ({b.micro_batch} rows per forward) | {b.dtype} | "
              f"compile {b.compile} | "
              f"{torch.get_num_threads()} threads | {b.steps} timed steps after {b.warmup}")
        tokenizer, docs, train = stream(b, data, tok)
        _, pos = train.batch((0, 0), b.warmup * b.batch_size)  # the timed steps' rows follow
        timed = [docs[i] for r in train.batch(pos, b.steps * b.batch_size)[0] for i in r]
        flops = sum(model_flops(b, tokenizer.n_vocab, timed)) / sum(len(x) for x, _ in timed)
        peaks = [mm_peak()]
        print(f"{flops / 1e6:.2f} MFLOP per data token", flush=True)
        ours_data, ours_all = ours(b, data, tok, os.path.join(tmp, "out"))
        print(f"sft.py: {ours_data:,.0f} data tok/s ({ours_all:,.0f} processed, padding included)",
              flush=True)
        rates = {"sft.py": ours_data}
        for packed, name in ((True, "same packed rows, plain causal"),
                             (False, "one conversation per row, padded")):
            hf_data, hf_all = transformers_loop(b, tokenizer, docs, train, packed)
            rates[f"transformers {'packed' if packed else 'padded'}"] = hf_data
            print(f"transformers ({name}): {hf_data:,.0f} data tok/s ({hf_all:,.0f} processed) | "
                  f"ratio sft.py / transformers = {ours_data / hf_data:.2f}x", flush=True)
        # the peak read before and after the runs: a reading taken while others load the CPU is low
        peaks.append(mm_peak())
        print(f"torch.mm peak {max(peaks):.1f} GFLOP/s (readings {peaks[0]:.1f}, {peaks[1]:.1f}) | "
              "share of it: " + ", ".join(f"{k} {r * flops / 1e9 / max(peaks):.1%}"
                                          for k, r in rates.items()))


if __name__ == "__main__":
    common.run_main(main, Config)
