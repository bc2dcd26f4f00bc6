"""
rl.py — reinforcement learning with verifiable rewards (GRPO-style) from the SFT policy, ASTRO §3.2.

    python rl.py                              # out/sft_astro -> out/rl_astro, data/countdown/train
    python rl.py config/rl_astro.py config/rl_direct.py   # out/sft_direct -> out/rl_direct (Direct)
    python rl.py --max_steps=3 --prompts_per_step=4         # a quick CPU smoke run
    torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py   # several GPUs
    torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py --tp=8  # TP rollouts
Writes out_dir/{model.pt, tokenizer.model, state.pt, metrics.jsonl, config.json} (+ prompts.jsonl
with a prompt filter). Killed? Rerun the command: it resumes from state.pt.

The objective. Each step samples, for each of B prompts q, a group of G completions o_i from π_old
(the current weights; ONE generate.generate call, each prompt prefilled once and fanned out) and
grades them with tasks.grade:
    r_i = reward_correct (+1) if the last \\boxed{} answer is correct, else reward_wrong (-1),
          + reward_verdict x (mean ±1 over its decisions, right / wrong; -1 if cut off: rejecting
          every answer until the budget ends must not pay)
    A_i = r_i - mean_j r_j                     (/ (std_j r_j + 1e-6) when std_adv)
    L   = 1/T Σ_i Σ_t [ -min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε) A_i) + β k3_it ]
    ρ_it = exp(ℓθ_it - ℓold_it),   k3_it = exp(ℓref_it - ℓθ_it) - (ℓref_it - ℓθ_it) - 1,
    ℓ_it = log π(o_it | q, o_i,<t)
The sums run over every completion token the policy sampled (stop token included; the calculator's
tokens on Countdown are context, not actions) of every completion kept in the step; T counts them.
Why each choice (as verl, TRL and nanochat make it, and where we differ):
- ±1 outcome reward, no length or format term (the paper's): the wrong answers an ASTRO trace
  backtracks from are not punished. No value network. G = 8 (the paper: 4): without a prompt
  filter, more of a step's groups hold both a right and a wrong answer.
- r - mean without std division by default (Dr. GRPO, nanochat, TRL scale_rewards="none"): dividing
  by the std favours groups that are almost always right or wrong. std_adv=True: verl / TRL default.
- Token-level aggregation Σ/T over the whole step (DAPO; TRL's loss_type="dapo"): every token weighs
  the same; GRPO's per-sequence mean punishes long wrong answers less (a length bias).
- ρ and the clip. With ppo_epochs = 1 (default) π_θ = π_old: ℓθ.detach() serves as ℓold, ρ ≡ 1, the
  clip never acts and the gradient is the plain policy gradient A ∇ℓθ. With ppo_epochs > 1 each
  epoch is one optimizer step over the same rollouts, ℓold are the log-probs generate returned
  (raw policy, temperature 1) and ε = clip_eps = 0.2 (PPO's; the paper states none).
- KL to the frozen start policy: off by default (β = kl_beta = 0, as TRL); log_kl still measures
  it. k3 is >= 0, unbiased for KL(π_θ || π_ref) on samples of π_θ and low-variance.
- Zero-signal groups (all kept rewards equal, or < 2 kept): A = 0, dropped from the batch and from
  T; their share is logged (`zero`).
- Truncated completions (no stop id before max_new_tokens or the context end): truncation="mask"
  (default; DAPO's overlong filtering) removes them from their group before A is computed and from
  the loss (a cut-off trace is no evidence its reasoning was wrong); "wrong" scores them
  reward_wrong, a length penalty. Masking leaves nothing to push back on truncation, so long runs
  (config/rl_llama_math.py) use "wrong". Their share is logged (`trunc`).
- Prompts: every train problem by default. filter_samples = n > 0 keeps the "moderately difficult"
  ones (the paper's 8.7K): the START policy's pass rate over n samples must be in (0, 1), cached in
  out_dir/prompts.jsonl so a resume does not redo it.
Training forward: log_softmax of model(idx) gathered at the completion tokens (as sft.py); optional
bf16 compute over fp32 master weights (autocast; under FSDP2 its mixed precision; generation then
runs on a bf16 copy of the policy) and block recompute; gradient accumulation over micro-batches;
grad clip; lr from common.get_lr; AdamW from common.make_optimizer.
Logged each step (metrics.jsonl + one line): reward, acc, len (generated tokens), backtracks and
reflections per response, zero, trunc, kl (mean k3 per loss token), clipfrac, tokens (T), tok_s;
every eval_every steps val_acc & co. on the first eval_limit val problems.

Exact resume: state.pt holds model, optimizer, step and RNG states; everything else is a function
of (seed, step): step s takes its prompts from per-epoch permutations seeded by (seed, epoch) and
samples with a seed derived from (seed, s, rank). A killed and resumed CPU run ends bitwise equal.

Several GPUs (torchrun): rank k samples prompts[k::world] of the step with its own seed. T is
all-reduced; each rank backpropagates world * Σ_own / T and DDP (or FSDP2) averages gradients over
ranks, giving Σ_all / T: the single-process gradient. All ranks run the same number of micro-batches
(the max; missing ones are zero-loss dummies) so that the collectives line up. fsdp=True: FSDP2
shards policy, gradients, AdamW state, reference and checkpoints (offload=True keeps those shards
in host memory: the 70B layout of bench/plan.py); rollouts use a whole copy, or with tp > 1 one
tensor-parallel copy per group of tp consecutive ranks (as search and eval's --tp): the groups
split the prompts and seeds by dp rank, each rank trains on its share of its group's.
"""
import contextlib
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from eval import summarize
from generate import generate
from checkpoint import full_model, load_model, load_state, save_checkpoint, save_state
from model import generation_model
from tasks import count_reflections, grade, prompt_messages, read_problems, tool, verdict_score


@dataclass
class Config:
    # paths
    init: str = "out/sft_astro"                # start policy and KL reference (any checkpoint)
    train: str = "data/countdown/train.jsonl"  # RL prompts (problem records)
    val: str = "data/countdown/val.jsonl"      # held-out problems for the periodic evaluation
    out_dir: str = "out/rl_astro"
    # rollouts
    prompts_per_step: int = 8       # prompts per step over all ranks
    group_size: int = 8             # G completions per prompt (the paper: 4)
    temperature: float = 1.0        # 1.0: sample the very policy we train
    max_new_tokens: int = 448       # completion budget (GPU: 2-4x the longest SFT trace; CPU: 1.2x)
    gen_batch_size: int = 256       # rows per generate.generate batch
    # reward and advantage
    reward_correct: float = 1.0
    reward_wrong: float = -1.0      # wrong or unparsable answer
    reward_verdict: float = 0.0     # weight of tasks.verdict_score (0 = the paper's outcome reward)
    std_adv: bool = False           # divide A by the group's std (verl/TRL default); off = Dr. GRPO
    truncation: str = "mask"        # "mask": a truncated completion is dropped (DAPO); "wrong": it
                                    # gets reward_wrong
    # prompt selection
    filter_samples: int = 0         # keep prompts with 0 < start-policy pass rate < 1 over this
                                    # many samples; 0 = keep all
    filter_limit: int = 512         # how many (shuffled) train problems the filter sees; 0 = all
    # optimization
    max_steps: int = 10
    lr: float = 1e-4                # 1e-6..5e-6 is usual for 1B-70B models; tiny ones take more
    warmup_steps: int = 10          # = max_steps: the short CPU run is all warm-up (an earlier peak
                                    # costs val accuracy)
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # 0 = off
    micro_batch: int = 16           # completions per forward/backward (gradient accumulation)
    ppo_epochs: int = 1             # updates per batch of rollouts; >1 turns the ratio clip on
    clip_eps: float = 0.2           # PPO clip range ε
    kl_beta: float = 0.0            # β of the k3 KL penalty to the start policy
    log_kl: bool = True             # measure that KL even if kl_beta = 0 (an extra no-grad forward)
    # evaluation, logging, checkpoints
    eval_every: int = 0             # held-out evaluation every N steps and at the end (0 = never)
    eval_limit: int = 200           # the first N val problems (0 = all)
    eval_temperature: float = 0.0   # 0 = greedy
    save_every: int = 20            # state.pt + model.pt every N steps and at the end (0 = the end)
    seed: int = 1337
    # system
    device: str = ""                # "" = cuda if available else cpu
    dtype: str = "float32"          # "bfloat16": autocast training forward, bf16 copy for
                                    # generation, bf16 reference policy
    compile: bool = False           # torch.compile generate.generate's decode step
    fsdp: bool = False              # under torchrun: FSDP2 shards policy, AdamW, reference
    offload: bool = False           # fsdp: those shards (and the gradients) in host memory
    tp: int = 1                     # fsdp: rollouts from a copy tensor parallel over tp ranks
    grad_checkpoint: bool = False   # recompute each block in the backward: less memory
    logit_chunk: int = 0            # > 0: logits this many positions at a time (less memory)
    oracle: bool = False            # ablation: Countdown's tool writes the grader's verdict

    ranges = dict(prompts_per_step=(1, None), group_size=(2, None), temperature=(0.0, None),
                  max_new_tokens=(1, None), gen_batch_size=(1, None), filter_samples=(0, None),
                  filter_limit=(0, None), max_steps=(0, None), lr=(0.0, None),
                  warmup_steps=(0, None), min_lr_frac=(0.0, 1.0), weight_decay=(0.0, None),
                  grad_clip=(0.0, None), micro_batch=(1, None), ppo_epochs=(1, None),
                  clip_eps=(0.0, None), kl_beta=(0.0, None), eval_every=(0, None),
                  eval_limit=(0, None), eval_temperature=(0.0, None), save_every=(0, None),
                  tp=(1, None), logit_chunk=(0, None))


# Keys a resume may change without changing what is trained (tp: how rollouts are split and seeded).
RESUME_FREE = {"out_dir", "device", "compile", "fsdp", "offload", "tp", "grad_checkpoint",
               "logit_chunk", "micro_batch", "eval_every", "eval_limit", "eval_temperature",
               "save_every", "log_kl"}


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards, keep, group_size, std_adv=False, eps=1e-6):
    """rewards, keep: [n_groups * G] (keep False = a masked truncation). Returns (A [n], signal
    [n_groups]). Kept members get r - mean over the kept members of their group (optionally
    / (std + eps), unbiased std as in verl); masked members and zero-signal groups (all kept rewards
    equal, or < 2 kept) get 0."""
    r, k = rewards.view(-1, group_size).double(), keep.view(-1, group_size)
    n = k.sum(1, keepdim=True)
    mean = torch.where(k, r, 0).sum(1, keepdim=True) / n.clamp(min=1)
    highest, lowest = torch.where(k, r, -torch.inf).amax(1), torch.where(k, r, torch.inf).amin(1)
    signal = (highest > lowest) & (n[:, 0] >= 2)
    adv = r - mean
    if std_adv:
        var = torch.where(k, adv ** 2, 0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(k & signal[:, None], adv, 0)
    return adv.view(-1).to(rewards.dtype), signal


def pg_loss(logp, old_logp, adv, mask, clip_eps, ref_logp=None, beta=0.0):
    """Token-level PPO-clip loss (+ β·k3), SUMMED over the tokens where mask is True; the caller
    divides by the token count of the whole batch. logp/old_logp/ref_logp/mask: [B, T]; adv: [B].
    Returns (loss_sum, clipped token count, kl_sum)."""
    # padding must not reach exp() (inf * 0 = nan, also in the backward)
    logp = logp.masked_fill(~mask, 0.0)
    old_logp = old_logp.masked_fill(~mask, 0.0)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    # the tokens whose clipped term is the min
    clipped = ((a > 0) & (ratio > 1 + clip_eps)) | ((a < 0) & (ratio < 1 - clip_eps))
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp.masked_fill(~mask, 0.0) - logp
        kl = torch.exp(d) - d - 1
        if beta:
            loss = loss + beta * kl
    return loss[mask].sum(), (clipped & mask).sum().item(), kl[mask].detach().sum().item()


def token_logprobs(model, inputs, targets, start=0, chunk=0):
    """log p(targets) at positions >= start: model(idx) logits -> log_softmax gathered at the
    targets, computed as -cross_entropy (the SFT forward, and no [B, T, vocab] log-prob tensor).
    chunk > 0: the output layer only at those positions, chunk of them at a time
    (model.chunked_logprobs: chunk x vocab logits alive, not B x T x vocab)."""
    if chunk:
        keep = torch.zeros_like(inputs, dtype=torch.bool)
        keep[:, start:] = True
        return model(inputs, keep=keep, targets=targets[keep], chunk=chunk).view(len(inputs), -1)
    logits = model(inputs)[:, start:].float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets[:, start:].flatten(), reduction="none")
    return -nll.view(logits.shape[:2])


def collate(rows, pad, device):
    """rows: (prompt ids, completion ids, sampling logprobs, advantage, forced positions) ->
    inputs, targets [B, L] (right-padded: causal attention keeps padding out of real positions), old
    logprobs and mask [B, L - start] (mask marks the completion targets the policy sampled: not the
    padding, not what a tool wrote; start = the first position holding one), adv [B], start. []
    gives a dummy row, no loss."""
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


# ----------------------------------------------------------------------------- rollouts and prompts

def step_prompts(n, step, per_step, seed):
    """Indices of the prompts of `step`: positions [step*per_step, (step+1)*per_step) of an endless
    stream of per-epoch permutations seeded by (seed, epoch). Stateless, so a resume needs only the
    step."""
    out, perms = [], {}
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(f"{seed}-{epoch}").shuffle(perms[epoch])
        out.append(perms[epoch][i])
    return out


def score(comps, cfg):
    """(rewards, keep) of the completions (the docstring's r_i); a truncated one is wrong
    (truncation="wrong", even with a right last box) or leaves its group ("mask": keep False)."""
    trunc_wrong = cfg.truncation == "wrong"
    right = [c["correct"] and (c["stopped"] or not trunc_wrong) for c in comps]
    rewards = torch.tensor([(cfg.reward_correct if r else cfg.reward_wrong)
                            + cfg.reward_verdict * (c["verdict"] if c["stopped"] else -1)
                            for r, c in zip(right, comps)])
    keep = torch.tensor([c["stopped"] or trunc_wrong for c in comps], dtype=torch.bool)
    return rewards, keep


def rollout(sampler, tok, recs, n, temperature, seed, cfg):
    """n completions per record from ONE generate.generate call, graded. Returns one dict per
    completion, grouped by record."""
    if not recs:
        return []
    prompts = [tok.render_prompt(prompt_messages(r)) for r in recs]
    groups = generate(sampler, prompts, n, max_new_tokens=cfg.max_new_tokens,
                      temperature=temperature, stop_ids=tok.stop_ids, seed=seed,
                      batch_size=cfg.gen_batch_size, compile=cfg.compile,
                      tool=tool(recs[0], tok, cfg.oracle))
    out = []
    for rec, prompt, samples in zip(recs, prompts, groups):
        for s in samples:
            text = tok.decode(s.tokens[:-1] if s.stopped else s.tokens)
            pred, correct = grade(rec, text)
            bt, refl = count_reflections(text)
            out.append(dict(prompt=prompt, tokens=s.tokens, logprobs=s.logprobs, forced=s.forced,
                            stopped=s.stopped, pred=pred, correct=bool(correct), backtracks=bt,
                            reflections=refl, verdict=verdict_score(rec, text, s.stopped)))
    return out


def select_prompts(cfg, sampler, tok, recs, rank, world, dp_rank, dp):
    """The "moderately difficult" train problems for the START policy, cached in
    out_dir/prompts.jsonl. The dp groups split the chunks; a tp group's ranks grade the same."""
    if cfg.filter_samples <= 0:
        return recs
    order = list(range(len(recs)))
    random.Random(f"{cfg.seed}-filter").shuffle(order)
    cands = [recs[i] for i in (order[:cfg.filter_limit] if cfg.filter_limit > 0 else order)]
    path = os.path.join(cfg.out_dir, "prompts.jsonl")
    cached = common.gather(common.resume_jsonl(path) if rank == 0 else None, world)[0]
    rate = {r["id"]: r["pass_rate"] for r in cached}
    # problems per generate call; chunk k always uses seed (seed, "filter", k): a redo is identical
    C = 64
    todo = [k for k in range(0, len(cands), C) if any(r["id"] not in rate for r in cands[k:k + C])]
    with (open(path, "a", encoding="utf-8") if rank == 0 else contextlib.nullcontext()) as f:
        show = rank == 0 and todo
        for i in tqdm(range(0, len(todo), dp), desc="filter prompts", disable=not show):
            res = []
            if i + dp_rank < len(todo):
                k = todo[i + dp_rank]
                part, n = cands[k:k + C], cfg.filter_samples
                seed = common.derive_seed(cfg.seed, "filter", k)
                comps = rollout(sampler, tok, part, n, cfg.temperature, seed, cfg)
                res = [{"id": r["id"],
                        "pass_rate": sum(c["correct"] for c in comps[j * n:(j + 1) * n]) / n}
                       for j, r in enumerate(part)]
            for r in (r for got in common.gather(res, world) for r in got if r["id"] not in rate):
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


# ----------------------------------------------------------------------------- one step

def train_rows(comps, cfg):
    """Rewards -> group advantages -> the rows to train on: (prompt, completion, sampling logprobs,
    advantage, forced positions) of the kept completions of groups with signal (zero-signal groups
    and masked truncations are dropped). Returns (rows, rewards, signal)."""
    G = cfg.group_size
    rewards, keep = score(comps, cfg)
    adv, signal = group_advantages(rewards, keep, G, cfg.std_adv)
    rows = [(c["prompt"], c["tokens"], c["logprobs"], a, c["forced"])
            for i, (c, a) in enumerate(zip(comps, adv.tolist())) if keep[i] and signal[i // G]]
    return rows, rewards, signal


def update(model, ref, optimizer, rows, cfg, world, device, pad, amp):
    """ppo_epochs optimizer steps on this rank's rows (gradient accumulation over micro-batches).
    Returns (T, loss sum, clipped tokens, kl sum, grad norm); T = loss tokens over all ranks.
    No signal: no step."""
    micro = [rows[i:i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    n_tok = torch.tensor(float(sum(len(r[1]) - len(r[4]) for r in rows)), device=device)
    n_tok = common.all_reduce(n_tok, world).item()
    n_micro = torch.tensor(float(len(micro)), device=device)
    n_micro = int(common.all_reduce(n_micro, world, "MAX").item())
    policy = getattr(model, "module", model)
    sharded = common.is_sharded(policy)
    loss_sum = clipped = kl_sum = grad_norm = 0.0
    for epoch in range(cfg.ppo_epochs if n_tok > 0 else 0):
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_micro):
            batch = collate(micro[j] if j < len(micro) else [], pad, device)
            inputs, targets, old, mask, adv, s = batch
            sync = world == 1 or j == n_micro - 1  # gradients reduced on the last micro-batch
            with common.grad_sync(model, sync):
                with amp:
                    logp = token_logprobs(model, inputs, targets, s, cfg.logit_chunk)
                ref_logp = None
                if ref is not None and (cfg.kl_beta > 0 or epoch == 0):
                    with torch.no_grad(), amp:
                        ref_logp = token_logprobs(ref, inputs, targets, s, cfg.logit_chunk)
                    if common.is_sharded(ref):  # no backward frees a no-grad forward's root
                        ref.reshard()
                old = logp.detach() if cfg.ppo_epochs == 1 else old  # one epoch: ρ ≡ 1 exactly
                loss, n_clip, kl = pg_loss(logp, old, adv, mask, cfg.clip_eps, ref_logp,
                                           cfg.kl_beta)
                # DDP and FSDP2 average over ranks: * world makes it Σ_all / T
                (loss * world / n_tok).backward()
            clipped += n_clip
            if epoch == 0:
                loss_sum, kl_sum = loss_sum + loss.item(), kl_sum + kl
        max_norm = cfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
        grad_norm = (norm.full_tensor() if sharded else norm).item()  # FSDP2: a DTensor
        optimizer.step()
    return n_tok, loss_sum, clipped, kl_sum, grad_norm


def step_record(step, lr, comps, rewards, signal, result, t0, cfg, world, device, kl_on):
    """The log record of a step and its line: rollout and update statistics, summed over ranks."""
    n_tok, loss_sum, clipped, kl_sum, grad_norm = result
    G = cfg.group_size
    s = common.all_reduce(torch.tensor([
        len(comps), rewards.sum().item(), sum(c["correct"] for c in comps),
        sum(len(c["tokens"]) for c in comps), sum(c["backtracks"] for c in comps),
        sum(c["reflections"] for c in comps), sum(not c["stopped"] for c in comps), len(comps) // G,
        len(comps) // G - signal.sum().item(), loss_sum, clipped, kl_sum],
        dtype=torch.float64, device=device), world).tolist()
    n, dt = max(s[0], 1), time.time() - t0
    tok_n = max(n_tok, 1)
    rec = dict(step=step, lr=lr, loss=s[9] / tok_n, reward=s[1] / n, acc=s[2] / n, len=s[3] / n,
               backtracks=s[4] / n, reflections=s[5] / n, trunc=s[6] / n, zero=s[8] / max(s[7], 1),
               kl=s[11] / tok_n if kl_on else None, clipfrac=s[10] / (tok_n * cfg.ppo_epochs),
               grad_norm=grad_norm, tokens=int(n_tok), tok_s=s[3] / dt, dt=dt)
    line = (f"step {step} | reward {rec['reward']:+.3f} | acc {rec['acc']:.3f} | "
            f"len {rec['len']:.1f} | bt {rec['backtracks']:.2f} | refl {rec['reflections']:.2f} | "
            f"zero {rec['zero']:.2f} | trunc {rec['trunc']:.2f} | kl {rec['kl'] or 0:.2e} | "
            f"clip {rec['clipfrac']:.3f} | lr {lr:.2e} | {rec['tok_s']:.0f} tok/s")
    return rec, line


def evaluate(step, sampler, tok, val, cfg, rank, world, dp_rank, dp, log):
    """Held-out accuracy on the rollout path (generate + tasks.grade), reported by
    eval.summarize. The dp groups split the problems; a tp group's first rank reports them."""
    part = val[dp_rank::dp]
    seed = common.derive_seed(cfg.seed, "eval", step, dp_rank)
    comps = rollout(sampler, tok, part, 1, cfg.eval_temperature, seed, cfg)
    preds = [dict(id=r["id"], sample=0, pred=c["pred"], correct=c["correct"],
                  tokens=len(c["tokens"]), backtracks=c["backtracks"],
                  reflections=c["reflections"], stopped=c["stopped"]) for r, c in zip(part, comps)]
    preds = [p for got in common.gather(preds, world)[::world // dp] for p in got]
    if rank == 0:
        s = summarize(preds, val)
        rec = dict(step=step, val_acc=s["pass@1"], val_len=s["mean_tokens"],
                   val_trunc=s["truncated"], val_backtracks=s["backtracks_per_response"],
                   val_reflections=s["reflections_per_response"], val_no_answer=s["no_answer"],
                   val_problems=s["problems"])
        sampling = "greedy" if cfg.eval_temperature == 0 else f"T={cfg.eval_temperature}"
        log(rec, f"step {step} | val acc {rec['val_acc']:.4f} | len {rec['val_len']:.1f} | "
                 f"bt {rec['val_backtracks']:.2f} | trunc {rec['val_trunc']:.2f} "
                 f"({s['problems']} problems, {sampling})")


# ----------------------------------------------------------------------------- main

def check(cfg):
    """The settings parse_config does not check (and the ranges, for Configs built in code)."""
    common.check_ranges(cfg)
    if cfg.truncation not in ("mask", "wrong"):
        raise common.UserError(f"truncation must be 'mask' or 'wrong', got {cfg.truncation!r}")
    if cfg.tp > 1 and not cfg.fsdp:
        raise common.UserError(f"tp={cfg.tp} needs fsdp=True (rollouts from FSDP2's shards)")
    if cfg.offload and not cfg.fsdp:
        raise common.UserError("offload=True needs fsdp=True (it offloads FSDP2's shards)")


def reference(cfg, device, dtype, sharded):
    """The frozen start policy of the KL term, or None when the KL is neither used nor logged.
    Under FSDP2 sharded as the policy (cast to dtype group by group): its forward gathers one block
    at a time."""
    if not (cfg.kl_beta > 0 or cfg.log_kl):
        return None
    ref, _ = load_model(cfg.init, "cpu" if sharded else device, None if sharded else dtype)
    ref = ref.eval().requires_grad_(False)
    return common.fsdp_shard(ref, offload=cfg.offload, store=dtype) if sharded else ref


def resume(cfg, policy, optimizer):
    """The first step to run: 0, or the step of out_dir/state.pt, whose weights, optimizer and RNG
    states are restored. It must be the same run: only the keys in RESUME_FREE may differ."""
    resumed = load_state(cfg.out_dir, policy, optimizer)
    if not resumed:
        return 0
    path = os.path.join(cfg.out_dir, "state.pt")
    common.check_same_run(resumed[1]["config"], common.config_dict(cfg), path, RESUME_FREE)
    return resumed[0]


def save(policy, optimizer, tok, steps, cfg, rank):
    """model.pt (rank 0; under FSDP2 at the end only, gathered by checkpoint.full_model), then the
    training state after `steps` steps. The model first: a kill between the two leaves the older
    state, and a resume redoes the step. Every rank calls it (save_state ends on a barrier)."""
    if steps == cfg.max_steps or not common.is_sharded(policy):
        export = full_model(policy)
        if rank == 0:
            save_checkpoint(cfg.out_dir, export, tok, common.config_dict(cfg))
    extra = {"data_pos": steps * cfg.prompts_per_step, "config": common.config_dict(cfg)}
    save_state(cfg.out_dir, policy, optimizer, steps, extra)


class Metrics(common.MetricsFile):
    """metrics.jsonl and the log lines, on rank 0; a resumed run keeps the records of the steps
    state.pt holds."""

    def __call__(self, rec, line):
        if self.write(rec):
            tqdm.write(line)


def main(cfg):
    check(cfg)
    rank, world, local = common.dist_setup()
    device, dtype = common.device_and_dtype(cfg, local, dtypes=("float32", "bfloat16"))
    dp_rank, dp, mesh = common.inference_mesh(cfg.tp, device)  # tp = 1: dp_rank, dp = rank, world
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        common.write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))

    # the policy (fp32 master weights; bf16 compute), its sampler, the reference
    sharded = cfg.fsdp and world > 1
    fp32 = torch.float32  # sharded: loaded as stored, cast to fp32 group by group by fsdp_shard
    policy, tok = load_model(cfg.init, "cpu" if sharded else device, None if sharded else fp32)
    if cfg.grad_checkpoint:
        common.recompute_blocks(policy)
    if sharded:  # FSDP2: this rank's fp32 shards only; bf16: its mixed precision, not autocast
        policy = common.fsdp_shard(policy, dtype, cfg.offload, store=fp32)
    amp = common.training_context(policy, device, dtype)
    sampler = generation_model(policy, dtype, device, mesh=mesh, where=cfg.init)
    ref = reference(cfg, device, dtype, sharded)
    val = read_problems(cfg.val)[:cfg.eval_limit or None] if cfg.eval_every > 0 else []
    prompts = select_prompts(cfg, sampler, tok, read_problems(cfg.train), rank, world, dp_rank, dp)
    optimizer = common.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    start = resume(cfg, policy, optimizer)  # after the filter: it grades the START policy
    if start >= cfg.max_steps:
        if rank == 0:
            print(f"{cfg.out_dir}: already trained for {start} steps")
        return
    model = policy
    if world > 1 and not sharded:
        device_ids = [local] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)
    log = Metrics(cfg.out_dir, lambda r: r["step"] < start, rank == 0)

    # each step: rollouts of this rank's prompts -> advantages -> update -> log (-> checkpoint)
    for step in tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="rl",
                     disable=rank != 0):
        sampler = generation_model(policy, dtype, device, sampler, mesh)  # this step's weights
        if cfg.eval_every > 0 and step % cfg.eval_every == 0:
            evaluate(step, sampler, tok, val, cfg, rank, world, dp_rank, dp, log)
        t0 = time.time()
        ids = step_prompts(len(prompts), step, cfg.prompts_per_step, cfg.seed)
        recs = [prompts[i] for i in ids][dp_rank::dp]
        seed = common.derive_seed(cfg.seed, "rollout", step, dp_rank)
        comps = rollout(sampler, tok, recs, cfg.group_size, cfg.temperature, seed, cfg)
        # a tp group's ranks sampled the same groups: each trains on (and logs) every tp-th one
        G, tp = cfg.group_size, world // dp
        comps = [c for i, c in enumerate(comps) if i // G % tp == rank % tp]
        rows, rewards, signal = train_rows(comps, cfg)
        lr = common.get_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr
        result = update(model, ref, optimizer, rows, cfg, world, device, tok.bos_id, amp)
        log(*step_record(step, lr, comps, rewards, signal, result, t0, cfg, world, device,
                         ref is not None))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save(policy, optimizer, tok, step + 1, cfg, rank)

    if cfg.eval_every > 0:
        sampler = generation_model(policy, dtype, device, sampler, mesh)
        evaluate(cfg.max_steps, sampler, tok, val, cfg, rank, world, dp_rank, dp, log)
    log.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main, Config)
