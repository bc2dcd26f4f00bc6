"""
bench/gpu_memory.py: bench/plan.py against a GPU's allocator. A training step of a
Llama-3.2-1B-shaped model (random weights) on one CUDA GPU in each layout the plan covers; the peak
of torch.cuda.max_memory_allocated in each phase against the plan's bytes for the same shape, row
and layout. Needs one NVIDIA GPU (~40 GB free); nothing is downloaded.

    python bench/gpu_memory.py                   # 2048-token rows
    python bench/gpu_memory.py --seq_len=4096    # longer rows: the activations and logits grow
    python bench/gpu_memory.py --dry_run=True    # every step on the CPU at a tiny shape, nothing
                                                 # measured: checks this script (a test runs it)

Layouts (one line per phase: measured, planned, their ratio; "ok" when measured <= planned *
headroom, the margin bench/plan.py adds, "FAIL" when the plan underestimates by more):
  sft, one GPU: fp32 weights, gradients and AdamW state, bf16 autocast, blocks recomputed, one
      packed row (plan_sft at N = 1); again with logit_chunk (the output layer chunk rows at a time)
  rl, one GPU: the same policy on one plain row, a bf16 generation copy and a bf16 reference
      (plan_rl at N = 1): the generation phase (a short batch through generate), the training
      forward, the reference's forward, the backward
  FSDP2, one rank, bf16 mixed precision, offload: the layout of 70B training (common.fsdp_shard)
      on a one-rank process group: its shards live on the host, so the GPU holds what the plan's
      FSDP2 rows at N > 1 hold besides the state (bf16 block inputs, root gathered, logits)
Every measurement starts after a first step, so that AdamW's state and the gradients exist (the
plan counts them in every phase); phases are measured from a reset peak to the phase's end.
"""
import os
import sys
from dataclasses import dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import plan  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402
from generate import generate  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402


@dataclass
class Config:
    seq_len: int = 2048       # tokens of the training row
    logit_chunk: int = 1024   # the chunked-logits variant's chunk
    gen_rows: int = 32        # rows of the generation phase
    gen_tokens: int = 128     # new tokens per row in the generation phase (prompt: 128 tokens)
    dry_run: bool = False     # CPU, a tiny shape, no measurement


GiB = 2**30
failed = []
dev, SHAPE = "cuda", replace(plan.MODELS["1B"][1], max_seq_len=8192)
VOCAB = 128000  # token ids drawn below this


def report(layout, phase, measured, planned, headroom):
    if dev == "cpu":
        print(f"dry  {layout:<36} {phase:<18} planned {planned / 2**20:6.2f} MiB")
        return
    ok = measured <= planned * headroom
    if not ok:
        failed.append(f"{layout}: {phase}")
    print(f"{'ok  ' if ok else 'FAIL'} {layout:<36} {phase:<18} measured "
          f"{measured / GiB:6.2f} GiB  planned {planned / GiB:6.2f} GiB "
          f"({measured / planned:.2f}x)")


def planned(p, phase):
    return sum(p.rows[k] for k in p.phases[phase])


class Peak:
    """The peak of allocated GPU memory from entering to leaving the block."""

    def __enter__(self):
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if dev == "cuda":
            torch.cuda.synchronize()
        self.bytes = torch.cuda.max_memory_allocated() if dev == "cuda" else 0


def policy():
    """The 1B-shaped Llama on the GPU, each block recomputed in the backward."""
    torch.manual_seed(0)
    with torch.device(dev):
        return common.recompute_blocks(Llama(SHAPE))


def packed_row(T):
    """One row of four documents, and its targets (loss on every token, as loss_on="all")."""
    x = torch.randint(0, VOCAB, (1, T + 1), device=dev)
    doc = torch.arange(T, device=dev)[None] * 4 // T
    return x[:, :-1], x[:, 1:], doc


def sft_step(net, opt, x, y, doc, chunk, amp):
    """sft.py's loss on one packed row, backward, AdamW; returns (forward peak, backward peak)."""
    with Peak() as fwd:
        loss = sft.summed_loss(net, x, doc, y, chunk, amp)
    with Peak() as bwd:
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # the plan keeps gradients in every phase
    return fwd.bytes, bwd.bytes


def check_sft(c, pc, chunk):
    layout = "sft, one GPU" + f", logit_chunk={chunk}" * bool(chunk)
    net = policy()
    opt = common.make_optimizer(net, 1e-5, 0.0)
    x, y, doc = packed_row(c.seq_len)
    amp = common.autocast(dev, torch.bfloat16)
    sft_step(net, opt, x, y, doc, chunk, amp)  # AdamW's state, the gradients, kernels' workspaces
    fwd, bwd = sft_step(net, opt, x, y, doc, chunk, amp)
    p = plan.plan_sft(SHAPE, 1, replace(pc, sft_logit_chunk=chunk))
    report(layout, "forward end", fwd, planned(p, "forward end"), pc.headroom)
    report(layout, "backward", bwd, planned(p, "backward"), pc.headroom)


def check_rl(c, pc):
    layout = "rl, one GPU"
    net = policy()
    opt = common.make_optimizer(net, 1e-5, 0.0)
    sampler = rl.generation_model(net, torch.bfloat16, dev)
    with torch.device(dev):
        ref = Llama(SHAPE).to(torch.bfloat16).requires_grad_(False)
    amp = common.autocast(dev, torch.bfloat16)
    prompt, new = 128, c.seq_len - 128
    inputs = torch.randint(0, VOCAB, (1, c.seq_len), device=dev)
    targets = inputs.roll(-1, 1)

    def step():
        with Peak() as fwd, amp:
            logp = rl.token_logprobs(net, inputs, targets, prompt - 1)
        with Peak() as ref_fwd, torch.no_grad(), amp:
            rl.token_logprobs(ref, inputs, targets, prompt - 1)
        with Peak() as bwd:
            logp.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return fwd.bytes, ref_fwd.bytes, bwd.bytes

    step()
    fwd, ref_fwd, bwd = step()
    prompts = [torch.randint(0, VOCAB, (128,)).tolist() for _ in range(c.gen_rows)]
    with Peak() as gen:
        generate(sampler, prompts, max_new_tokens=c.gen_tokens, temperature=1.0, seed=0,
                 batch_size=c.gen_rows)
    p = plan.plan_rl(SHAPE, 1, replace(pc, prompt_len=prompt, rl_max_new_tokens=new))
    report(layout, "forward end", fwd, planned(p, "forward end"), pc.headroom)
    report(layout, "reference forward", ref_fwd, planned(p, "reference forward"), pc.headroom)
    report(layout, "backward", bwd, planned(p, "backward"), pc.headroom)
    pg = plan.plan_rl(SHAPE, 1, replace(pc, prompt_len=128, rl_max_new_tokens=c.gen_tokens,
                                        rl_gen_batch_size=c.gen_rows,
                                        rl_prompts_per_step=c.gen_rows, rl_group_size=1))
    report(layout, "generation", gen.bytes, planned(pg, "generation"), pc.headroom)


def check_fsdp(c, pc):
    layout = "FSDP2 (1 rank), bf16 mixed, offload"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    common.dist_setup()
    torch.manual_seed(0)
    net = common.recompute_blocks(Llama(SHAPE))  # built on the host: offload keeps it there
    common.fsdp_shard(net, torch.bfloat16, offload=True)
    opt = common.make_optimizer(net, 1e-5, 0.0)
    x, y, doc = packed_row(c.seq_len)
    amp = common.training_context(net, dev, torch.bfloat16)
    sft_step(net, opt, x, y, doc, 0, amp)
    fwd, bwd = sft_step(net, opt, x, y, doc, 0, amp)
    rows, fwd_keys, bwd_keys = plan.training(SHAPE, 1, c.seq_len, True, 8, True, mp=True)
    report(layout, "forward end", fwd, sum(rows[k] for k in fwd_keys), pc.headroom)
    report(layout, "backward", bwd, sum(rows[k] for k in bwd_keys), pc.headroom)
    torch.distributed.destroy_process_group()


def main(c):
    global dev, SHAPE, VOCAB
    if c.dry_run:
        dev, VOCAB = "cpu", 97
        SHAPE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                            max_seq_len=512)
        c = replace(c, seq_len=min(c.seq_len, 192), logit_chunk=min(c.logit_chunk, 64),
                    gen_rows=min(c.gen_rows, 4), gen_tokens=min(c.gen_tokens, 8))
    elif not torch.cuda.is_available():
        raise common.UserError("bench/gpu_memory.py needs a CUDA GPU (--dry_run=True: the CPU)")
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}; {c.seq_len}-token rows")
    pc = replace(plan.Config(), sft_seq_len=c.seq_len, sft_micro_batch=1, rl_micro_batch=1,
                 sft_grad_checkpoint=True, rl_grad_checkpoint=True, sft_logit_chunk=0,
                 rl_logit_chunk=0)  # the steps below: whole rows' logits unless told
    for run in (lambda: check_sft(c, pc, 0), lambda: check_sft(c, pc, c.logit_chunk),
                lambda: check_rl(c, pc), lambda: check_fsdp(c, pc)):
        run()
        torch.cuda.empty_cache()
    print(f"\n{len(failed)} phase(s) above the plan's margin: {failed}" if failed else
          "\nevery phase within the plan's margin")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    common.run_main(main, Config)
