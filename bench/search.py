"""
Tree tokens per second of search.py's MCTS (all trees of a batch grown at once, one generate call
per round and phase, each prefix prefilled once and fanned out to its samples) against the SAME
MCTS (search.search, same config, same weights, same problems) driven through transformers'
generate the naive way: one call per expansion and one per rollout group, the prefix repeated once
per sample (no fan-out), one tree at a time.

    python bench/search.py                 # out/base + data/countdown/val.jsonl when they exist
    python bench/search.py --problems=8 --num_simulations=4 --threads=1     # a quick probe
Without out/base it uses a random model of the base policy's shape (dim 128, 4 layers, as
config/base_countdown.py; tokenizer data/countdown/tokenizer.model, or a byte-level one); without
the problems file, random Countdown problems. Prints both rates, their ratio (target >= 3x) and our
prefilled vs decoded tokens (target <= 0.5x on the built-in task). Tree tokens = tokens of all
sampled steps and rollouts (the same count on both sides). Don't run it while others use the CPU
if you want to quote the numbers.
"""
import base64
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from transformers import LlamaForCausalLM

import checkpoint
import common
import generate as G
import model as M
import search
from tasks import prompt_messages, read_problems
from tokenizer import Tokenizer


@dataclass
class Config:
    policy: str = "out/base"                        # checkpoint; if missing, a random model
    data: str = "data/countdown/val.jsonl"          # problems; random Countdown problems if missing
    tokenizer: str = "data/countdown/tokenizer.model"  # for the random model; byte-level if missing
    problems: int = 16                              # problems searched by each side
    num_simulations: int = 4                        # search settings (see search.Config)
    k: int = 4
    M: int = 16                                     # the paper's M (search.py default)
    max_step_tokens: int = 48
    max_rollout_tokens: int = 192
    threads: int = 0                                # torch threads (0 = torch's default)
    seed: int = 0


def random_problems(n, seed):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        nums = [rng.randint(1, 20) for _ in range(4)]
        recs.append({"id": f"r{i}", "problem": f"Using the numbers {nums}, make {sum(nums)}.",
                     "answer": str(sum(nums)), "numbers": nums, "target": sum(nums), "level": 4})
    return recs


def load(cfg):
    if os.path.isfile(os.path.join(cfg.policy, "model.pt")):
        return checkpoint.load_model(cfg.policy)
    tok_path = cfg.tokenizer
    if not os.path.isfile(tok_path):
        tok_path = os.path.join(tempfile.mkdtemp(), "tokenizer.model")
        with open(tok_path, "w") as f:
            f.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    tok = Tokenizer(tok_path)
    torch.manual_seed(cfg.seed)
    shape = M.ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_vocab,
                          max_seq_len=4096)  # the base policy's (config/base_countdown.py)
    return M.Llama(shape).eval(), tok


def hf_policy(hf, counts):
    """The naive driver: one transformers generate call per (prefix, num_samples), the prefix
    repeated per row."""
    def policy(prompts, nums, *, max_new_tokens, temperature, stop_ids, seed, keep):
        stops, out = sorted(stop_ids), []
        for p, n in zip(prompts, nums):
            torch.manual_seed(seed + len(out))
            ids = torch.tensor([p] * n)
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                            temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
            new = g.sequences[:, len(p):]
            logprobs = torch.stack(g.logits, 1).float().log_softmax(-1)
            lps = logprobs.gather(-1, new[..., None])[..., 0]
            counts["prefill"] += n * len(p)
            counts["decode"] += new.numel()  # rows keep stepping (padded) until the last one stops
            samples = []
            for row, lp in zip(new.tolist(), lps.tolist()):
                end = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
                samples.append(G.Sample(row[:end], lp[:end], end < len(row) or row[-1] in stop_ids))
            out.append(samples)
        return out
    return policy


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net, tok = load(cfg)
    mc = net.cfg
    hf_dir = tempfile.mkdtemp()
    checkpoint.export_hf(net, tok, hf_dir)  # identical weights, in transformers' layout
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if os.path.isfile(cfg.data):
        recs = read_problems(cfg.data)[:cfg.problems]
    else:
        recs = random_problems(cfg.problems, 0)
    x = torch.tensor([tok.render_prompt(prompt_messages(recs[0]))])
    with torch.no_grad():
        err = (net(x) - hf(x).logits).abs().max().item()
    name = cfg.policy if os.path.isfile(os.path.join(cfg.policy, "model.pt")) else "random"
    print(f"policy {name}: dim {mc.dim}, {mc.n_layers} layers, vocab {mc.vocab_size}; "
          f"{len(recs)} problems; {torch.get_num_threads()} threads; "
          f"max |logits ours - transformers| = {err:.1e}")
    scfg = replace(search.Config(), num_simulations=cfg.num_simulations, k=cfg.k, M=cfg.M,
                   early_stop=False, max_step_tokens=cfg.max_step_tokens,
                   max_rollout_tokens=cfg.max_rollout_tokens)

    G.reset_generate_stats()
    t0 = time.perf_counter()
    trees = search.search(recs, search.make_policy(net, scfg), tok, scfg, seed=cfg.seed)
    t_ours = time.perf_counter() - t0
    gen = G.generate_stats()
    ours_tok = sum(t.decoded for t in trees)

    counts = {"prefill": 0, "decode": 0}
    policy = hf_policy(hf, counts)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf_trees = [search.search([r], policy, tok, scfg, seed=cfg.seed)[0] for r in recs]
    t_hf = time.perf_counter() - t0
    hf_tok = sum(t.decoded for t in hf_trees)

    r_ours, r_hf = ours_tok / t_ours, hf_tok / t_hf
    print(f"ours:         {ours_tok:7d} tree tokens in {t_ours:6.1f}s = {r_ours:7.0f} tok/s | "
          f"prefilled {gen['prefill_tokens']}, decoded {gen['decode_tokens']} "
          f"(prefill = {gen['prefill_tokens'] / max(gen['decode_tokens'], 1):.2f}x decoded)")
    print(f"transformers: {hf_tok:7d} tree tokens in {t_hf:6.1f}s = {r_hf:7.0f} tok/s | "
          f"prefilled {counts['prefill']}, decoded {counts['decode']} (incl. padded rows)")
    print(f"ratio: {r_ours / r_hf:.2f}x tree tokens/s (target >= 3x); "
          f"mean tree size ours {sum(len(t.nodes) for t in trees) / len(trees):.1f}, "
          f"transformers {sum(len(t.nodes) for t in hf_trees) / len(hf_trees):.1f}")


if __name__ == "__main__":
    common.run_main(main, Config)
