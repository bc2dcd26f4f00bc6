"""
rl.py — reinforcement learning with verifiable rewards (GRPO-style), from the SFT policy (ASTRO §3.2).

Run (the built-in Countdown task; resumes from out_dir/state.pt when it exists, so rerun the same command):
    python rl.py                                    # out/sft_astro -> out/rl_astro, prompts data/countdown/train.jsonl
    python rl.py config/rl_astro.py config/rl_direct.py   # out/sft_direct -> out/rl_direct (the Direct baseline)
    python rl.py --max_steps=3 --prompts_per_step=4                         # a quick CPU smoke run
    torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py  # several GPUs
Writes out_dir/{model.pt, tokenizer.model, state.pt, metrics.jsonl, config.json} (+ prompts.jsonl with a filter).

The objective. Each step samples, for each of B prompts q, a group of G completions o_i from π_old (the current
weights; ONE model.generate call, each prompt prefilled once and fanned out) and grades them with eval.grade:
    r_i = reward_correct (+1) if the last \\boxed{} answer is correct, else reward_wrong (-1; unparsable too)
    A_i = r_i - mean_j r_j                     (/ (std_j r_j + 1e-6) when std_adv)
    L   = 1/T Σ_i Σ_t [ -min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε) A_i) + β k3_it ]
    ρ_it = exp(ℓθ_it - ℓold_it),   k3_it = exp(ℓref_it - ℓθ_it) - (ℓref_it - ℓθ_it) - 1,
    ℓ_it = log π(o_it | q, o_i,<t)
The sums run over every completion token the policy sampled (stop token included; the calculator's tokens on
Countdown are context, not actions) of every completion kept in the step; T counts them. Why each choice (as
verl, TRL and nanochat make it, and where we differ):
- ±1 outcome reward, no length or format term: the paper's. Only the final answer counts, so the wrong answers
  an ASTRO trace backtracks from are not punished. No value network. G = 8 (the paper: 4): without a prompt
  filter, more of a step's groups hold both a right and a wrong answer.
- r - mean without std division by default (Dr. GRPO, nanochat, TRL scale_rewards="none"): the std gives groups
  that are almost always right or almost always wrong larger advantages (a difficulty bias). std_adv=True gives
  the verl / TRL-default form.
- Token-level aggregation Σ/T over the whole step (DAPO; TRL's default loss_type="dapo"): every token weighs the
  same. GRPO's per-sequence mean gives each token of a long response less weight, so long wrong answers are
  punished less and long correct ones rewarded less (a length bias); ASTRO wants length to grow only if it pays.
- ρ and the clip. With ppo_epochs = 1 (default) the rollouts serve one update right after sampling: π_θ = π_old,
  ρ ≡ 1. We use ℓθ.detach() as ℓold so ρ is exactly 1, the clip never acts (clipfrac 0) and the gradient is the
  plain policy gradient A ∇ℓθ (nanochat: "on policy, no need for ratio+clip"). With ppo_epochs > 1 each epoch is
  one optimizer step over the same rollouts, ℓold are the log-probs generate returned while sampling (raw policy,
  temperature 1) and ε = clip_eps = 0.2 (PPO's value; the paper does not state one).
- KL to the frozen start policy: off by default (β = kl_beta = 0, as TRL); log_kl still measures it. k3 is >= 0,
  unbiased for KL(π_θ || π_ref) on samples of π_θ and low-variance; mind the sign (TinyZero had it reversed).
- Zero-signal groups (all kept rewards equal, or < 2 kept): A = 0, no policy gradient (only KL would remain).
  Dropped from the batch and from T; their share is logged (`zero`).
- Truncated completions (max_new_tokens or the context hit without a stop id): truncation="mask" (default; DAPO's
  overlong filtering) removes them from their group before A is computed, and from the loss and T (a cut-off trace
  is no evidence that its reasoning was wrong). truncation="wrong" gives them reward_wrong, a length penalty: no
  answer is a wrong answer. On Countdown, "wrong" taught ASTRO to finish sooner rather than to solve more, and the
  10 short steps did a little better masked on val (EXPERIMENTS.md, run 29; no better on test, run 30); but with
  masking nothing pushes back on truncation, and over 40 steps ASTRO-RL drifted from 33% to 90% truncated (run 9),
  so config/rl_llama_math.py's 500 steps use "wrong". Their share is logged (`trunc`).
- Prompts: every train problem by default. filter_samples = n > 0 keeps the "moderately difficult" ones only (the
  paper's 8.7K): the START policy's pass rate over n samples per problem must be in (0, 1) (our rule: such a
  prompt tends to give a group with signal), cached in out_dir/prompts.jsonl so a resume does not redo it. On the
  CPU task the filter cost more than it saved: 512 problems x 4 samples (~170 s of ASTRO's 445 s) kept 109, and
  still 40-60% of the groups had no signal (EXPERIMENTS.md, runs 11 and 13); config/rl_llama_math.py uses it.
Training forward: model(idx) logits -> log_softmax gathered at the completion tokens (the SFT forward); optional
bf16 autocast (generation then runs on a bf16 copy of the fp32 policy); gradient accumulation over micro-batches
of completions; grad clip; lr from sft.get_lr; AdamW from sft.make_optimizer.
Logged each step (metrics.jsonl + one line): reward, acc (truncations included), len (generated tokens),
backtracks / reflections per response (eval.count_reflections), zero, trunc, kl (mean k3 per loss token, first
epoch), clipfrac (share of loss tokens whose clipped term is active, all epochs), tokens (T), tok_s (generated
tokens per second of step time); every eval_every steps val_acc & co. on the first eval_limit val problems.

Exact resume: state.pt (sft.save_state) holds model, optimizer, step and RNG states; everything else is a function
of (seed, step): step s takes its prompts from a stream of per-epoch permutations seeded by (seed, epoch) and
samples with a seed derived from (seed, s, rank). A killed and resumed CPU run ends with bitwise identical weights.

Several GPUs (torchrun): rank k samples prompts[k::world] of the step with its own seed. T is all-reduced over the
ranks; each rank backpropagates world * Σ_own / T and DDP averages gradients over ranks, giving Σ_all / T: the
gradient of the single-process loss over the same rollouts. All ranks run the same number of micro-batches (the
max; missing ones are zero-loss dummies) so that DDP's all-reduces line up.
"""
import contextlib
import copy
import hashlib
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import sft
from eval import count_reflections, grade, prompt_messages, read_problems, summarize, tool
from model import generate, load_model, save_checkpoint


@dataclass
class Config:
    # paths
    init: str = "out/sft_astro"                  # start policy and KL reference (any model.load_model path)
    train: str = "data/countdown/train.jsonl"    # RL prompts (problem records)
    val: str = "data/countdown/val.jsonl"        # held-out problems for the periodic evaluation
    out_dir: str = "out/rl_astro"
    # rollouts
    prompts_per_step: int = 8       # prompts per step over all ranks
    group_size: int = 8             # G completions per prompt (the paper: 4)
    temperature: float = 1.0        # 1.0: sample the very policy we train
    max_new_tokens: int = 448       # completion budget (GPU: 2-4x the longest SFT trace; CPU: ~1.2x)
    gen_batch_size: int = 256       # rows per model.generate batch
    # reward and advantage
    reward_correct: float = 1.0
    reward_wrong: float = -1.0      # wrong or unparsable answer
    std_adv: bool = False           # divide A by the group's std (verl/TRL default); off = Dr. GRPO / nanochat
    truncation: str = "mask"        # "mask": a truncated completion is dropped (DAPO); "wrong": it gets reward_wrong
    # prompt selection
    filter_samples: int = 0         # keep prompts with 0 < start-policy pass rate < 1 over this many samples; 0 = all
    filter_limit: int = 512         # how many (shuffled) train problems the filter looks at; 0 = all
    # optimization
    max_steps: int = 10
    lr: float = 1e-4                # 1e-6..5e-6 is usual for 1B-70B models; tiny ones take more
    warmup_steps: int = 10          # = max_steps: the short CPU run is all warm-up (a sooner peak lost val accuracy,
                                    # EXPERIMENTS.md run 29)
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # 0 = off
    micro_batch: int = 16           # completions per forward/backward (gradient accumulation)
    ppo_epochs: int = 1             # updates per batch of rollouts; >1 turns the ratio clip on
    clip_eps: float = 0.2           # PPO clip range ε
    kl_beta: float = 0.0            # β of the k3 KL penalty to the start policy
    log_kl: bool = True             # measure that KL even when kl_beta = 0 (one extra no-grad forward)
    # evaluation, logging, checkpoints
    eval_every: int = 0            # held-out evaluation every N steps and at the end (0 = never)
    eval_limit: int = 200           # the first N val problems (0 = all)
    eval_temperature: float = 0.0   # 0 = greedy
    save_every: int = 20            # state.pt + model.pt every N steps and at the end (0 = at the end only)
    seed: int = 1337
    # system
    device: str = ""                # "" = cuda if available else cpu
    dtype: str = "float32"          # "bfloat16": autocast training forward, bf16 copy for generation, bf16 ref
    compile: bool = False           # torch.compile model.generate's decode step


# Keys that may change between a run and its resume without changing what is trained.
RESUME_FREE = {"out_dir", "device", "compile", "micro_batch", "eval_every", "eval_limit", "eval_temperature",
               "save_every", "log_kl"}


# ----------------------------------------------------------------------------- the objective, on tensors

def group_advantages(rewards, keep, group_size, std_adv=False, eps=1e-6):
    """rewards, keep: [n_groups * G] (keep False = a masked truncation). Returns (A [n], signal [n_groups]).
    Kept members get r - mean over the kept members of their group (optionally / (std + eps), unbiased std as in
    verl); masked members and zero-signal groups (all kept rewards equal, or < 2 kept) get 0."""
    r, k = rewards.view(-1, group_size).double(), keep.view(-1, group_size)
    n = k.sum(1, keepdim=True)
    mean = torch.where(k, r, 0).sum(1, keepdim=True) / n.clamp(min=1)
    signal = (torch.where(k, r, -torch.inf).amax(1) > torch.where(k, r, torch.inf).amin(1)) & (n[:, 0] >= 2)
    adv = r - mean
    if std_adv:
        var = torch.where(k, adv ** 2, 0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(k & signal[:, None], adv, 0)
    return adv.view(-1).to(rewards.dtype), signal


def pg_loss(logp, old_logp, adv, mask, clip_eps, ref_logp=None, beta=0.0):
    """Token-level PPO-clip loss (+ β·k3), SUMMED over the tokens where mask is True; the caller divides by the
    token count of the whole batch. logp/old_logp/ref_logp/mask: [B, T]; adv: [B].
    Returns (loss_sum, clipped token count, kl_sum)."""
    logp = logp.masked_fill(~mask, 0.0)  # padding must not reach exp() (inf * 0 = nan, also in the backward)
    old_logp = old_logp.masked_fill(~mask, 0.0)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    clipped = ((a > 0) & (ratio > 1 + clip_eps)) | ((a < 0) & (ratio < 1 - clip_eps))  # the clipped term is the min
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp.masked_fill(~mask, 0.0) - logp
        kl = torch.exp(d) - d - 1
        if beta:
            loss = loss + beta * kl
    return loss[mask].sum(), (clipped & mask).sum().item(), kl[mask].detach().sum().item()


def token_logprobs(model, inputs, targets, start=0):
    """log p(targets) at positions >= start: model(idx) logits -> log_softmax gathered at the targets, computed as
    -cross_entropy (the SFT forward, and no [B, T, vocab] log-prob tensor)."""
    logits = model(inputs)[:, start:].float()
    return -F.cross_entropy(logits.flatten(0, 1), targets[:, start:].flatten(), reduction="none").view(logits.shape[:2])


def collate(rows, pad, device):
    """rows: (prompt ids, completion ids, sampling logprobs, advantage, forced positions) -> inputs, targets [B, L]
    (right-padded: causal attention keeps padding out of real positions), old logprobs and mask [B, L - start] (mask
    marks the completion targets the policy sampled: not the padding, not what a tool wrote; start = the first
    position holding one), adv [B], start. [] gives a dummy row, no loss."""
    dummy = not rows
    rows = rows or [([pad], [pad], [0.0], 0.0, [])]
    B, L = len(rows), max(len(r[0]) + len(r[1]) for r in rows) - 1
    inputs, targets = torch.full((B, L), pad), torch.full((B, L), pad)
    old, mask = torch.zeros(B, L), torch.zeros(B, L, dtype=torch.bool)
    for i, (p, c, lp, _, forced) in enumerate(rows):
        full = torch.tensor(p + c)
        inputs[i, :len(full) - 1], targets[i, :len(full) - 1] = full[:-1], full[1:]
        s = len(p) - 1
        mask[i, s:s + len(c)], old[i, s:s + len(c)] = not dummy, torch.tensor(lp)
        mask[i, [s + k for k in forced]] = False
    start = min(len(r[0]) for r in rows) - 1  # no completion target before it: skip those logits
    adv = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    return [t.to(device) for t in (inputs, targets, old[:, start:], mask[:, start:], adv)] + [start]


# ----------------------------------------------------------------------------- rollouts, prompts, helpers

def derive_seed(*parts):
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def step_prompts(n, step, per_step, seed):
    """Indices of the prompts of `step`: positions [step*per_step, (step+1)*per_step) of an endless stream of
    per-epoch permutations seeded by (seed, epoch). Stateless, so a resume needs only the step."""
    out, perms = [], {}
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(f"{seed}-{epoch}").shuffle(perms[epoch])
        out.append(perms[epoch][i])
    return out


def score(comps, cfg):
    """(rewards, keep) of the completions: +1/-1 from the grader; a truncated one is wrong (truncation="wrong",
    even if its last \\boxed{} happened to be right) or dropped from its group (truncation="mask": keep False)."""
    trunc_wrong = cfg.truncation == "wrong"
    rewards = torch.tensor([cfg.reward_correct if c["correct"] and (c["stopped"] or not trunc_wrong)
                            else cfg.reward_wrong for c in comps])
    keep = torch.tensor([c["stopped"] or trunc_wrong for c in comps], dtype=torch.bool)
    return rewards, keep


def rollout(sampler, tok, recs, n, temperature, seed, cfg):
    """n completions per record from ONE model.generate call, graded. Returns one dict per completion, grouped."""
    if not recs:
        return []
    prompts = [tok.render_prompt(prompt_messages(r)) for r in recs]
    groups = generate(sampler, prompts, n, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                      stop_ids=tok.stop_ids, seed=seed, batch_size=cfg.gen_batch_size, compile=cfg.compile,
                      tool=tool(recs[0], tok))
    out = []
    for rec, prompt, samples in zip(recs, prompts, groups):
        for s in samples:
            text = tok.decode(s.tokens[:-1] if s.stopped else s.tokens)
            pred, correct = grade(rec, text)
            backtracks, reflections = count_reflections(text)
            out.append(dict(prompt=prompt, tokens=s.tokens, logprobs=s.logprobs, forced=s.forced, stopped=s.stopped,
                            pred=pred, correct=bool(correct), backtracks=backtracks, reflections=reflections))
    return out


def gather(obj, world):  # every rank's obj, on every rank
    out = [obj] * world
    if world > 1:
        torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce(t, world, op="SUM"):
    if world > 1:
        torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op))
    return t


def select_prompts(cfg, sampler, tok, recs, rank, world):
    """The "moderately difficult" train problems for the START policy, cached in out_dir/prompts.jsonl."""
    if cfg.filter_samples <= 0:
        return recs
    order = list(range(len(recs)))
    random.Random(f"{cfg.seed}-filter").shuffle(order)
    cands = [recs[i] for i in (order[:cfg.filter_limit] if cfg.filter_limit > 0 else order)]
    path = os.path.join(cfg.out_dir, "prompts.jsonl")
    rate = {r["id"]: r["pass_rate"] for r in gather(common.resume_jsonl(path) if rank == 0 else None, world)[0]}
    C = 64  # problems per generate call; chunk k always uses seed (seed, "filter", k), so a redo is identical
    todo = [k for k in range(0, len(cands), C) if any(r["id"] not in rate for r in cands[k:k + C])]
    with (open(path, "a", encoding="utf-8") if rank == 0 else contextlib.nullcontext()) as f:
        for i in tqdm(range(0, len(todo), world), desc="filter prompts", disable=rank != 0 or not todo):
            res = []
            if i + rank < len(todo):
                k = todo[i + rank]
                part, n = cands[k:k + C], cfg.filter_samples
                comps = rollout(sampler, tok, part, n, cfg.temperature, derive_seed(cfg.seed, "filter", k), cfg)
                res = [{"id": r["id"], "pass_rate": sum(c["correct"] for c in comps[j * n:(j + 1) * n]) / n}
                       for j, r in enumerate(part)]
            for r in (r for got in gather(res, world) for r in got if r["id"] not in rate):
                rate[r["id"]] = r["pass_rate"]
                if f:
                    common.append_jsonl(f, r)
    kept = [r for r in cands if 0 < rate[r["id"]] < 1]
    if rank == 0:
        print(f"prompt filter: kept {len(kept)}/{len(cands)} problems with 0 < pass rate < 1 "
              f"over {cfg.filter_samples} samples (cache: {path})")
    if not kept:
        raise common.UserError(f"{cfg.train}: no problem has 0 < pass rate < 1 for {cfg.init}; "
                               "use --filter_samples=0 to keep every prompt")
    return kept


def update(model, ref, optimizer, rows, cfg, world, device, pad, amp):
    """ppo_epochs optimizer steps on this rank's rows (gradient accumulation over micro-batches).
    Returns (T, loss sum, clipped tokens, kl sum, grad norm); T = loss tokens over all ranks. No signal: no step."""
    micro = [rows[i:i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    n_tok = all_reduce(torch.tensor(float(sum(len(r[1]) - len(r[4]) for r in rows)), device=device), world).item()
    n_micro = int(all_reduce(torch.tensor(float(len(micro)), device=device), world, "MAX").item())
    policy = getattr(model, "module", model)
    loss_sum = clipped = kl_sum = grad_norm = 0.0
    for epoch in range(cfg.ppo_epochs if n_tok > 0 else 0):
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_micro):
            inputs, targets, old, mask, adv, s = collate(micro[j] if j < len(micro) else [], pad, device)
            sync = world == 1 or j == n_micro - 1  # DDP all-reduces gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with amp:
                    logp = token_logprobs(model, inputs, targets, s)
                ref_logp = None
                if ref is not None and (cfg.kl_beta > 0 or epoch == 0):
                    with torch.no_grad(), amp:
                        ref_logp = token_logprobs(ref, inputs, targets, s)
                old = logp.detach() if cfg.ppo_epochs == 1 else old  # one epoch: ρ ≡ 1 exactly
                loss, n_clip, kl = pg_loss(logp, old, adv, mask, cfg.clip_eps, ref_logp, cfg.kl_beta)
                (loss * world / n_tok).backward()  # DDP averages over ranks: * world makes it Σ_all / T
            clipped += n_clip
            if epoch == 0:
                loss_sum, kl_sum = loss_sum + loss.item(), kl_sum + kl
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf")).item()
        optimizer.step()
    return n_tok, loss_sum, clipped, kl_sum, grad_norm


# ----------------------------------------------------------------------------- main

def main(cfg):
    if cfg.truncation not in ("mask", "wrong"):
        raise common.UserError(f"truncation must be 'mask' or 'wrong', got {cfg.truncation!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise common.UserError(f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if cfg.group_size < 2 or cfg.prompts_per_step < 1 or cfg.ppo_epochs < 1 or cfg.micro_batch < 1:
        raise common.UserError("need group_size >= 2, prompts_per_step >= 1, ppo_epochs >= 1, micro_batch >= 1")
    rank, world, local = common.dist_setup()
    device = cfg.device or common.autodetect_device()
    if device == "cuda" and world > 1:
        device = f"cuda:{local}"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    amp = (torch.autocast(dev_type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else contextlib.nullcontext())
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        common.write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))

    policy, tok = load_model(cfg.init, device)  # fp32 master weights; autocast gives bf16 compute
    half = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    # model.generate keeps its KV cache in the weights' dtype (autocast does not reach it), so bf16 rollouts run on
    # a bf16 copy of the policy, refreshed before each use
    sampler = copy.deepcopy(policy).to(half) if half != torch.float32 else policy

    def sync():
        if sampler is not policy:
            sampler.load_state_dict(policy.state_dict())
        return sampler
    ref = None
    if cfg.kl_beta > 0 or cfg.log_kl:  # the frozen start policy
        ref, _ = load_model(cfg.init, device, dtype=half)
        ref.eval().requires_grad_(False)
    val = read_problems(cfg.val)[:cfg.eval_limit or None] if cfg.eval_every > 0 else []
    prompts = select_prompts(cfg, sampler, tok, read_problems(cfg.train), rank, world)  # before load_state
    optimizer = sft.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    resumed = sft.load_state(cfg.out_dir, policy, optimizer)
    start = resumed[0] if resumed else 0
    if resumed:  # an exact resume needs the same run: only these keys may change
        was, now = resumed[1]["config"], common.config_dict(cfg)
        bad = [k for k in now if k not in RESUME_FREE and was.get(k) != now[k]]
        if bad:
            raise common.UserError(f"{cfg.out_dir}/state.pt was written with other values of {', '.join(bad)}; "
                                   "use another out_dir or the same config")
    if start >= cfg.max_steps:
        if rank == 0:
            print(f"{cfg.out_dir}: already trained for {start} steps")
        return
    model = policy
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[local] if dev_type == "cuda" else None)

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0:  # keep the records of the steps state.pt holds; the rest is redone
        common.write_jsonl(metrics_path, [r for r in common.resume_jsonl(metrics_path) if r["step"] < start])
    metrics = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None

    def log(rec, line):
        if rank == 0:
            common.append_jsonl(metrics, rec)
            tqdm.write(line)

    def evaluate(step):  # held-out accuracy: the rollout path (generate + eval.grade), reported by eval.summarize
        part = val[rank::world]
        comps = rollout(sync(), tok, part, 1, cfg.eval_temperature, derive_seed(cfg.seed, "eval", step, rank), cfg)
        preds = [dict(id=r["id"], sample=0, pred=c["pred"], correct=c["correct"], tokens=len(c["tokens"]),
                      backtracks=c["backtracks"], reflections=c["reflections"], stopped=c["stopped"])
                 for r, c in zip(part, comps)]
        preds = [p for got in gather(preds, world) for p in got]
        if rank == 0:
            s = summarize(preds, val)
            rec = dict(step=step, val_acc=s["pass@1"], val_len=s["mean_tokens"], val_trunc=s["truncated"],
                       val_backtracks=s["backtracks_per_response"], val_reflections=s["reflections_per_response"],
                       val_no_answer=s["no_answer"], val_problems=s["problems"])
            log(rec, f"step {step} | val acc {rec['val_acc']:.4f} | len {rec['val_len']:.1f} | "
                     f"bt {rec['val_backtracks']:.2f} | trunc {rec['val_trunc']:.2f} ({s['problems']} problems, "
                     f"{'greedy' if cfg.eval_temperature == 0 else f'T={cfg.eval_temperature}'})")

    G = cfg.group_size
    for step in tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="rl", disable=rank != 0):
        if cfg.eval_every > 0 and step % cfg.eval_every == 0:
            evaluate(step)
        t0 = time.time()
        recs = [prompts[i] for i in step_prompts(len(prompts), step, cfg.prompts_per_step, cfg.seed)][rank::world]
        comps = rollout(sync(), tok, recs, G, cfg.temperature, derive_seed(cfg.seed, "rollout", step, rank), cfg)

        # rewards -> group advantages -> rows to train on (zero-signal groups and masked truncations dropped)
        rewards, keep = score(comps, cfg)
        adv, signal = group_advantages(rewards, keep, G, cfg.std_adv)
        rows = [(c["prompt"], c["tokens"], c["logprobs"], a, c["forced"])
                for i, (c, a) in enumerate(zip(comps, adv.tolist())) if keep[i] and signal[i // G]]
        lr = sft.get_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr
        n_tok, loss_sum, clipped, kl_sum, grad_norm = update(model, ref, optimizer, rows, cfg, world, device,
                                                             tok.bos_id, amp)

        # logging: sums over all ranks
        s = all_reduce(torch.tensor([
            len(comps), rewards.sum().item(), sum(c["correct"] for c in comps), sum(len(c["tokens"]) for c in comps),
            sum(c["backtracks"] for c in comps), sum(c["reflections"] for c in comps),
            sum(not c["stopped"] for c in comps), len(comps) // G, len(comps) // G - signal.sum().item(),
            loss_sum, clipped, kl_sum], dtype=torch.float64, device=device), world).tolist()
        n, dt = max(s[0], 1), time.time() - t0
        tok_n = max(n_tok, 1)
        rec = dict(step=step, lr=lr, loss=s[9] / tok_n, reward=s[1] / n, acc=s[2] / n, len=s[3] / n,
                   backtracks=s[4] / n, reflections=s[5] / n, trunc=s[6] / n, zero=s[8] / max(s[7], 1),
                   kl=s[11] / tok_n if ref is not None else None, clipfrac=s[10] / (tok_n * cfg.ppo_epochs),
                   grad_norm=grad_norm, tokens=int(n_tok), tok_s=s[3] / dt, dt=dt)
        log(rec, f"step {step} | reward {rec['reward']:+.3f} | acc {rec['acc']:.3f} | len {rec['len']:.1f} | "
                 f"bt {rec['backtracks']:.2f} | refl {rec['reflections']:.2f} | zero {rec['zero']:.2f} | "
                 f"trunc {rec['trunc']:.2f} | kl {rec['kl'] or 0:.2e} | clip {rec['clipfrac']:.3f} | "
                 f"lr {lr:.2e} | {rec['tok_s']:.0f} tok/s")

        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            if rank == 0:  # the model first: a kill between the two leaves state.pt behind, and a resume redoes it
                save_checkpoint(cfg.out_dir, policy, tok, common.config_dict(cfg))
            sft.save_state(cfg.out_dir, policy, optimizer, step + 1,  # every rank calls it (it ends on a barrier)
                           {"data_pos": (step + 1) * cfg.prompts_per_step, "config": common.config_dict(cfg)})

    if cfg.eval_every > 0:
        evaluate(cfg.max_steps)
    if rank == 0:
        metrics.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main, Config)
