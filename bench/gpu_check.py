"""
bench/gpu_check.py: what CI cannot run. model.py and generate.py on a CUDA GPU, checked against the
CPU, and the speed of a Llama-3.2-1B-shaped model there. Needs one NVIDIA GPU; nothing is
downloaded (random weights).

    python bench/gpu_check.py                  # checks, then timings
    python bench/gpu_check.py --timings=False  # checks only; --checks=False: timings only
    bash bench/gpu_check.sh                    # this, then every stage of the pipeline on the GPU

Checks (each prints ok / FAIL; the exit status is 1 if one failed):
  1. fp32 logits on CUDA equal the CPU's (TF32 off), plain and packed rows, with a 128k vocab and
     Llama 3.1 RoPE
  2. generate on CUDA: the logprob of every generated token equals a full forward of prompt +
     output (the KV cache, ragged prompts, fan-out, refill and compaction of rows)
  3. generate(compile=True) on CUDA: the eager greedy tokens, sampled tokens whose logprobs match a
     full forward, and one compilation for every batch size and length (plus one for a lone row:
     PyTorch specializes size 1)
  4. bf16 weights against fp32: greedy next-token agreement on random inputs, with the logit error
  5. one training step under bf16 autocast, eager against torch.compile: the same loss and
     gradient norm
  6. top-p on CUDA: sorting only the TOP_P_FIRST likeliest tokens draws what the full sort draws
     (peaked rows take that shortcut, flat ones the fallback), and compiled top-p sampling, with
     finished rows idling in the batch, reports logprobs that match a full forward
Timings (ratios against a baseline run in this process): decode tokens/s of the 1B shape in bf16,
compiled over eager, at batch 64 and 256 (each after a warm-up run of the same shape); training
tokens/s (bf16 autocast, compiled, grad checkpointing off/on) with its MFU.
"""
import functools
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from generate import TOP_P_FIRST, generate, sample_next  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402


@dataclass
class Config:
    checks: bool = True    # the correctness checks 1-6
    timings: bool = True   # time the 1B shape (needs ~45 GB of GPU memory)
    # bf16 dense peak for the MFU line; 0 = guess from the device name (H100/H200: 989)
    peak_tflops: float = 0.0


dev = torch.device("cuda")
failed = []
# Llama-3.2-1B's shape (its ffn 8192 = dim * 4, tied embeddings)
SHAPE_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                ffn_dim_multiplier=1.5, multiple_of=256, max_seq_len=8192, tie_embeddings=True)


def check(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failed.append(name)


def small(**kw):
    """A small model with Llama 3's vocabulary and Llama 3.1's RoPE scaling, on the CPU in fp32."""
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    c = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, max_seq_len=512,
             rope_scaling=scaling)
    torch.manual_seed(0)
    return Llama(ModelConfig(**{**c, **kw})).eval()


@torch.no_grad()
def logprob_error(model, prompts, out):
    """Largest |logprob generate reported - logprob of a full forward over prompt + output| over
    all samples."""
    worst = 0.0
    for p, samples in zip(prompts, out):
        for s in samples:
            full = torch.tensor(p + s.tokens, device=dev)[None]
            logp = F.log_softmax(model(full)[0, len(p) - 1 : -1], -1)
            lp = logp.gather(1, full[0, len(p):, None])[:, 0]
            worst = max(worst, (lp.cpu() - torch.tensor(s.logprobs)).abs().max().item())
    return worst


def check_cuda_logits(cpu, gpu, idx, doc):
    """1. CUDA fp32 == CPU fp32."""
    with torch.no_grad():
        for name, d in (("plain rows", None), ("packed rows", doc)):
            a = cpu(idx, d)
            b = gpu(idx.to(dev), None if d is None else d.to(dev)).cpu()
            err = (a - b).abs().max().item()
            check(f"CUDA == CPU logits, {name}", err < 1e-3,
                  f"max |diff| {err:.1e} (logits ~{a.abs().max():.1f})")


def check_kv_cache(gpu, prompts, counts):
    """2. the KV cache on CUDA: each generated token's logprob == a full forward."""
    # random stops: rows finish early, get refilled, compacted
    out = generate(gpu, prompts, counts, max_new_tokens=40, temperature=1.0, seed=3, batch_size=4,
                   stop_ids=list(range(120000, 128256)))
    worst = logprob_error(gpu, prompts, out)
    lens = sorted(len(s.tokens) for ss in out for s in ss)
    check("KV-cache generate == full forward", worst < 1e-3,
          f"max |logprob diff| {worst:.1e} over {len(lens)} samples of {lens[0]}-{lens[-1]} tokens")


def check_compiled(gpu, prompts, counts):
    """3. compiled decode == eager on CUDA: greedy tokens equal; sampled ones may part where the
    fused kernels' last bits move a uniform draw across a boundary, so those are checked by their
    logprobs against a full forward."""
    graphs = counters["stats"]["unique_graphs"]
    kw = dict(max_new_tokens=30, temperature=0.0, seed=7, batch_size=8)
    e = [s.tokens for ss in generate(gpu, prompts, counts, **kw) for s in ss]
    c = [s.tokens for ss in generate(gpu, prompts, counts, compile=True, **kw) for s in ss]
    check("compiled == eager greedy tokens", e == c,
          f"{sum(a == b for a, b in zip(e, c))}/{len(e)} samples equal")
    worst = 0.0
    for B, new in ((8, 30), (3, 17), (10, 45)):  # other batch sizes and lengths: the same graph
        out = generate(gpu, prompts, counts, max_new_tokens=new, temperature=1.0, seed=B,
                       batch_size=B, compile=True)
        worst = max(worst, logprob_error(gpu, prompts, out))
    check("compiled sampling == full forward", worst < 1e-3, f"max |logprob diff| {worst:.1e}")
    # PyTorch specializes a size of 1: a lone last row is one more graph
    n_graphs = counters["stats"]["unique_graphs"] - graphs
    check("one compilation for every batch size and length", n_graphs <= 2,
          f"{n_graphs} graph(s) (<= 2: one for a single row)")


def check_bf16(gpu, idx):
    """4. bf16 against fp32 (an approximation: how close, not equal)."""
    half = small().to(dev, torch.bfloat16)
    with torch.no_grad():
        a, b = gpu(idx.to(dev)), half(idx.to(dev))
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).norm() / a.norm()).item()
    check("bf16 vs fp32 logits", agree > 0.9 and rel < 0.05,
          f"greedy agreement {agree:.1%}, relative error {rel:.3f}")


def check_train_step(idx, doc):
    """5. a training step with bf16 autocast: compiled == eager."""
    def train_step(model, x):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(x[:, :-1], doc[:2, :-1].to(dev))
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters()))
        return loss.item(), norm.item()

    train = small().to(dev).train()
    x = idx[:2].to(dev)
    l0, n0 = train_step(train, x)
    l1, n1 = train_step(torch.compile(train), x)
    check("bf16 training step, compiled == eager", abs(l0 - l1) < 2e-2 and abs(n0 - n1) / n0 < 2e-2,
          f"loss {l0:.4f} vs {l1:.4f}, grad norm {n0:.4f} vs {n1:.4f}")


def full_sort(logits, top_p, gen):
    """Top-p sampling the plain way: sort the whole vocabulary."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    cdf = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0).cumsum(-1)
    u = torch.rand(cdf.size(0), 1, device=dev, generator=gen) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return order.gather(-1, idx)[:, 0]


def check_top_p(gpu, prompts):
    """6. top-p's shortcut on CUDA: the same draws as the full sort (the CPU test checks this
    bitwise too). A scan over 64 entries and one over the vocabulary may round differently in the
    last bit."""
    torch.manual_seed(1)
    for name, scale, shortcut in (("peaked rows", 12.0, True), ("flat rows", 1.0, False)):
        logits = torch.randn(4096, 128256, device=dev) * scale
        took = bool((logits.softmax(-1).topk(TOP_P_FIRST).values.sum(-1) > 0.95).all())
        a = sample_next(logits, 1.0, 0, 0.95, torch.Generator(dev).manual_seed(5))
        b = full_sort(logits, 0.95, torch.Generator(dev).manual_seed(5))
        same = (a == b).sum().item()
        check(f"top-p shortcut == full sort, {name}", took == shortcut and same >= 0.999 * len(a),
              f"{same}/{len(a)} draws equal, shortcut {'taken' if took else 'not taken'}")
    # compiled, T 0.7, top-p 0.95, random stops: rows finish early; 13 samples on 8 rows: some idle
    out = generate(gpu, prompts, [4, 3, 2, 4], max_new_tokens=60, temperature=0.7, top_p=0.95,
                   seed=11, batch_size=8, compile=True, stop_ids=list(range(124000, 128256)))
    worst = logprob_error(gpu, prompts, out)
    lens = sorted(len(s.tokens) for ss in out for s in ss)
    check("compiled top-p sampling, idle rows == full forward", worst < 1e-3,
          f"max |logprob diff| {worst:.1e} over samples of {lens[0]}-{lens[-1]} tokens")


def run_checks():
    cpu, gpu = small(), small().to(dev)
    idx = torch.randint(0, 128256, (3, 200))
    doc = torch.tensor([0] * 50 + [1] * 100 + [2] * 50).expand(3, 200)
    check_cuda_logits(cpu, gpu, idx, doc)
    prompts = [torch.randint(0, 128000, (n,)).tolist() for n in (5, 37, 120, 2)]
    counts = [3, 1, 2, 4]  # fan-out: several rows share a prefilled prompt
    check_kv_cache(gpu, prompts, counts)
    check_compiled(gpu, prompts, counts)
    check_bf16(gpu, idx)
    check_train_step(idx, doc)
    check_top_p(gpu, prompts)


def time_decode():
    """Decode tokens/s of the 1B shape in bf16 (random weights), eager and compiled."""
    torch.manual_seed(0)
    with torch.device(dev):
        big = Llama(ModelConfig(**SHAPE_1B)).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in big.parameters())
    print(f"\n1B shape: {n_params / 1e9:.2f}B parameters, bf16")
    for B in (64, 256):
        ps, res = [torch.randint(0, 128000, (128,)).tolist() for _ in range(B)], {}
        for comp in (False, True):
            kw = dict(max_new_tokens=256, temperature=1.0, seed=0, batch_size=B, compile=comp)
            generate(big, ps, **kw)  # warm-up: compiles, and loads each kernel on its first use
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = sum(len(s.tokens) for ss in generate(big, ps, **kw) for s in ss)
            torch.cuda.synchronize()
            res[comp] = n / (time.perf_counter() - t)
        print(f"decode batch {B:3d}, 128-token prompts, 256 new: eager {res[False]:8,.0f} tok/s, "
              f"compiled {res[True]:8,.0f} tok/s ({res[True] / res[False]:.2f}x)")
    del big
    torch.cuda.empty_cache()
    return n_params


def time_train(n_params, peak):
    """Training tokens/s of the 1B shape: fp32 master weights, bf16 autocast, compiled (as sft.py
    on a GPU), grad checkpointing off and on."""
    for ckpt in (False, True):
        torch.manual_seed(0)
        with torch.device(dev):
            net = Llama(ModelConfig(**SHAPE_1B))
        B, T = 4, 2048
        x = torch.randint(0, 128000, (B, T + 1), device=dev)
        if ckpt:  # as sft.py's grad_checkpoint: recompute each block in the backward
            for block in net.layers:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        step = torch.compile(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
        times = []
        for i in range(6):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(step(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        dt = sorted(times[2:])[1]  # after compile and warm-up
        tps = B * T / dt
        mfu = ""
        if peak:
            mfu = f", MFU {6 * n_params * tps / (peak * 1e12):.0%} of {peak:.0f} TFLOP/s"
        print(f"train {B}x{T} tokens, bf16 autocast, compiled, grad checkpoint {ckpt}: "
              f"{tps:,.0f} tok/s{mfu}, "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del net, step, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(cfg):
    assert torch.cuda.is_available(), "bench/gpu_check.py needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons with the CPU
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if cfg.checks:
        run_checks()
    if cfg.timings:
        n_params = time_decode()
        hopper = any(s in torch.cuda.get_device_name() for s in ("H100", "H200"))
        time_train(n_params, cfg.peak_tflops or (989.0 if hopper else 0.0))
    if cfg.checks:
        print(f"\n{len(failed)} check(s) failed: {failed}" if failed else "\nall checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    common.run_main(main, Config)
