"""
Tokens/s of generate.generate against transformers' generate on identical weights and prompts (fp32,
one process), and the share of the fp32 torch.mm peak that decoding reaches.

    python bench/generate.py                                 # the main job's base policy's shape
    python bench/generate.py --batches=1,16 --new_tokens=32  # a quick probe
    python bench/generate.py --dim=512 --n_layers=8 --compile=True
The default shape is the built-in base policy's (config/base_countdown.py: dim 128, 4 layers, 4
heads, 2 KV heads) with the Countdown tokenizer's vocabulary when data/countdown/tokenizer.model
exists. Every prompt has the same length and generation never stops early (no stop ids), so both
sides produce exactly batch * new_tokens tokens. Prints one line per batch size with both rates,
their ratio (ours / transformers) and ours as a share of the torch.mm peak measured first in the
same process (model FLOPs: 2 per weight per token, attention left out). Timings are only meaningful
on an otherwise idle CPU.
"""
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import common
import checkpoint
import generate as G
import model as M


@dataclass
class Config:
    dim: int = 128  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads
    vocab_size: int = 0  # vocabulary; 0 = the Countdown tokenizer's (1024 without it)
    tokenizer: str = "data/countdown/tokenizer.model"  # read for vocab_size = 0
    batches: str = "1,16,64,256"  # comma-separated batch sizes
    prompt_len: int = 64  # tokens per prompt
    new_tokens: int = 128  # generated tokens per row
    # torch threads (0 = torch's default; more threads than free cores slows both sides badly)
    threads: int = 1
    compile: bool = False  # also time generate(compile=True)
    repeats: int = 1  # timed runs per setting (the best one counts)
    # time with this process's CPU time: steadier while others share the CPU (threads=1)
    cpu_time: bool = False
    seed: int = 0  # weights and prompts


def best_times(fns, repeats, clock):
    """Best time of each function over `repeats` rounds, the functions interleaved so that load
    changes hit all of them."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = clock()
            fn()
            best[i] = min(best[i], clock() - t)
    return best


def mm_peak(size=512, repeats=20):
    """Best fp32 torch.mm GFLOP/s of two size x size matrices: the CPU's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    t = min(best_times([lambda: torch.mm(a, b)], 1, time.perf_counter)[0] for _ in range(repeats))
    return 2 * size**3 / t / 1e9


def vocab(cfg):
    if cfg.vocab_size:
        return cfg.vocab_size
    if os.path.isfile(cfg.tokenizer):
        from tokenizer import Tokenizer
        return Tokenizer(cfg.tokenizer).n_vocab
    return 1024


def models(cfg):
    """Our Llama with random weights and transformers' LlamaForCausalLM holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    mc = M.ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, vocab_size=vocab(cfg),
                       max_seq_len=max(1024, cfg.prompt_len + cfg.new_tokens))
    ours = M.Llama(mc).eval()
    hc = LlamaConfig(hidden_size=mc.dim, intermediate_size=M.ffn_hidden(mc),
                     num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads,
                     num_key_value_heads=mc.n_kv_heads, vocab_size=mc.vocab_size,
                     rms_norm_eps=mc.norm_eps, rope_theta=mc.rope_theta,
                     max_position_embeddings=mc.max_seq_len, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hc).eval()
    hf.load_state_dict({checkpoint.hf_name(k): v
                        for k, v in checkpoint.split_qkv(ours.state_dict(), mc).items()})
    return ours, hf


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ours, hf = models(cfg)
    mc = ours.cfg
    peak = mm_peak()
    flops = 2 * sum(p.numel() for n, p in ours.named_parameters() if "tok_embeddings" not in n)
    print(f"model: dim {mc.dim}, {mc.n_layers} layers, vocab {mc.vocab_size}, "
          f"{torch.get_num_threads()} threads; prompt {cfg.prompt_len}, "
          f"{cfg.new_tokens} new tokens, fp32, {'CPU' if cfg.cpu_time else 'wall'} time; "
          f"torch.mm peak {peak:.1f} GFLOP/s")
    for B in [int(b) for b in cfg.batches.split(",")]:
        prompts = torch.randint(0, mc.vocab_size - 256, (B, cfg.prompt_len))
        n = B * cfg.new_tokens

        def run_hf():
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                  do_sample=True, top_k=0, eos_token_id=None, pad_token_id=0)
            assert out.shape == (B, cfg.prompt_len + cfg.new_tokens)

        def run_ours(compile=False):
            res = G.generate(ours, prompts.tolist(), max_new_tokens=cfg.new_tokens, batch_size=B,
                             compile=compile)
            assert sum(len(s[0].tokens) for s in res) == n

        fns = [run_hf, run_ours] + ([lambda: run_ours(True)] if cfg.compile else [])
        for fn in fns:
            fn()  # warm-up (and compilation)
        clock = time.process_time if cfg.cpu_time else time.perf_counter
        t_hf, t_ours, *t_c = best_times(fns, cfg.repeats, clock)
        line = (f"batch {B:4d}: transformers {n / t_hf:6.0f} tok/s | "
                f"ours {n / t_ours:6.0f} tok/s | {t_hf / t_ours:4.2f}x | "
                f"{flops * n / t_ours / 1e9 / peak:5.1%} of mm peak")
        if t_c:
            line += f" | compiled {n / t_c[0]:6.0f} tok/s | {t_hf / t_c[0]:4.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    common.run_main(main, Config)
