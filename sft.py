"""
sft.py — the trainer. Trains the built-in task's base policy from scratch, and fine-tunes a policy on the
chain-of-thoughts that linearize.py writes (ASTRO traces, or the Direct baseline).

    python sft.py                                  # base policy of the built-in task, from scratch -> out/base
    python sft.py config/base_countdown.py         # the same weights, spelled out (val loss every 200 steps, not 50)
    python sft.py config/sft_astro.py              # ASTRO SFT of out/base on out/linearize/astro.jsonl -> out/sft_astro
    python sft.py config/sft_astro.py config/sft_direct.py   # Direct SFT (the control) -> out/sft_direct
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_llama_math.py    # FSDP2 (the config's); DDP: --fsdp=False

Data: JSONL of {"messages": [{"role": ..., "content": ...}, ...]} rendered with the Llama 3 chat format
(model.Tokenizer.render_chat). Conversations are packed into rows of up to seq_len tokens; a per-token document
id keeps attention (and rotary positions) inside each conversation, so packing changes the speed, not the result.
The global batch (batch_size rows) is the same for any number of processes: each rank takes its slice.
Kill it at any moment and re-run the same command: it resumes from out_dir/state.pt and ends with the same
weights, bit for bit, as a run that was never stopped. Re-running a finished run prints "already done".
"""
import bisect
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
from common import UserError
from model import Llama, ModelConfig, Tokenizer, load_model, save_checkpoint


@dataclass
class Config:
    # data
    data: str = "data/countdown/warmup.jsonl"  # training conversations, JSONL of {"messages": [...]}
    val_data: str = ""                # held-out conversations; "" = hold out val_frac of `data`
    val_frac: float = 0.02            # share of `data` held out (fixed by seed) when val_data is ""
    loss_on: str = "assistant"        # "assistant": assistant content + its <|eot_id|>; "all": every token
    seq_len: int = 256                # packed row length = longest conversation allowed (in tokens)
    skip_long: bool = False           # longer conversations: False = error naming file:line, True = drop + count
    # model
    init: str = "scratch"             # "scratch" (shape and tokenizer below) or a checkpoint dir (ours/Meta/HF)
    tokenizer: str = "data/countdown/tokenizer.model"  # used by init="scratch" only
    dim: int = 128                    # scratch only: width (dim 128, 4 layers, 4/2 heads = ~1.0M params)
    n_layers: int = 4                 # scratch only
    n_heads: int = 4                  # scratch only
    n_kv_heads: int = 2               # scratch only
    max_seq_len: int = 4096           # scratch only: rotary table size, room for longer generations (search, RL)
    # optimization
    batch_size: int = 32              # rows of seq_len tokens per optimizer step, summed over ranks and micro-steps
    micro_batch: int = 32             # rows per forward per rank; grad accumulation = batch_size/(micro_batch*ranks)
    epochs: float = 1.0               # passes over the data (rounded up to whole steps); used when max_steps is 0
    max_steps: int = 600              # optimizer steps; 0 = derive from epochs. 600*32*256 = 4.9M tokens
    lr: float = 3e-3                  # peak learning rate
    warmup_steps: int = 20            # linear warm-up, then cosine decay to lr*min_lr_frac
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1         # on matrices and embeddings only
    grad_clip: float = 1.0            # max global grad norm; 0 = no clipping
    # system
    out_dir: str = "out/base"         # state.pt, model.pt + tokenizer.model, metrics.jsonl, config.json
    seed: int = 1337                  # model init, validation split, per-epoch data order
    device: str = ""                  # "" = cuda if available, else cpu
    dtype: str = "float32"            # "bfloat16": bf16 autocast over fp32 master weights (GPUs; CPUs with AMX or
                                      # AVX512-BF16). On AVX2-only CPUs bf16 matmuls are ~10x slower: "float32"
    compile: bool = False             # torch.compile the model (slow start; worth it on GPU)
    fsdp: bool = False                # under torchrun: shard params/grads/optimizer (FSDP2) instead of DDP
    grad_checkpoint: bool = False     # recompute each block in the backward: less memory (long rows, big models)
    eval_every: int = 50              # val loss every N steps (and at the start and the end); 0 = start/end only
    save_every: int = 50              # state.pt every N steps (and at the end); 0 = at the end only
    log_every: int = 10               # one log line (and a metrics.jsonl record) every N steps
    progress: bool = True             # tqdm progress bar


ROLES = ("system", "user", "assistant")
FORMATS = {"loss": "loss {:.4f}", "lr": "lr {:.2e}", "tok_s": "tok/s {:,.0f}", "pad": "pad {:.1%}",
           "grad_norm": "norm {:.3f}", "val_loss": "val {:.4f}"}
# Keys that may change between a run and its resume without changing what is trained.
RESUME_FREE = {"out_dir", "device", "compile", "fsdp", "grad_checkpoint", "micro_batch", "eval_every", "save_every",
               "log_every", "progress"}


# ----------------------------------------------------------------------------- training helpers (rl.py uses them)

def get_lr(step, max_steps, lr, warmup_steps, min_lr_frac):
    """Linear warm-up over warmup_steps, then cosine decay from lr to lr*min_lr_frac at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW; weight decay on >=2-D params (matrices, embeddings) only, not on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel per step instead of many
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _dcp(model):
    """torch.distributed.checkpoint's state-dict helpers + full-state options if `model` is FSDP2-sharded, else None.
    (Imported only then: the import costs seconds, and rl.py imports this file.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(model, fsdp.FSDPModule):
        return None
    import torch.distributed.checkpoint.state_dict as dcp
    return dcp, dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_state(out_dir, model, optimizer, step, extra):
    """Atomically write out_dir/state.pt: model, optimizer, step, RNG states, extra (data position, config...).
    Under torch.distributed every rank must call it (FSDP gathers the full state first); rank 0 writes."""
    model = _unwrap(model)
    if sharded := _dcp(model):
        dcp, opts = sharded
        msd = dcp.get_model_state_dict(model, options=opts)
        osd = dcp.get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        msd, osd = model.state_dict(), optimizer.state_dict()
    if not dist.is_initialized() or dist.get_rank() == 0:
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        os.makedirs(out_dir, exist_ok=True)
        common.torch_save({"model": msd, "optimizer": osd, "step": step, "rng": rng, "extra": extra},
                          os.path.join(out_dir, "state.pt"))
    if dist.is_initialized():
        dist.barrier()  # nobody runs ahead (and could be killed "after" a checkpoint that is not on disk yet)


def load_state(out_dir, model, optimizer):
    """Restore what save_state wrote (model, optimizer, RNG states) -> (step, extra), or None if there is none."""
    path = os.path.join(out_dir, "state.pt")
    if not os.path.exists(path):
        return None
    st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share the page cache
    model = _unwrap(model)
    if sharded := _dcp(model):
        dcp, opts = sharded
        dcp.set_model_state_dict(model, st["model"], options=opts)
        dcp.set_optimizer_state_dict(model, optimizer, st["optimizer"], options=opts)
    else:
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
    rng = st["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return st["step"], st["extra"]


# ----------------------------------------------------------------------------- data

def read_conversations(path):
    """Validated records of a conversations file; every problem is a UserError naming file:line."""
    recs = common.read_jsonl(path, required=("messages",))
    for r in recs:
        where, msgs = f"{path}:{r['_line']}", r["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise UserError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
            if not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}].content must be a string")
    # the group keeps all traces of one problem ("<problem id>#<j>") on the same side of the validation split
    return [(f"{path}:{r['_line']}", r["messages"], str(r.get("id", r["_line"])).split("#")[0]) for r in recs]


def render(convs, tok, cfg):
    """[(ids, tgt)] per conversation, as int32 tensors: tgt[k] = ids[k+1] where that token carries loss, else -1."""
    docs, long = [], []
    for where, msgs, _ in convs:
        ids, mask = tok.render_chat(msgs)
        if cfg.loss_on == "all":
            mask = [1] * len(ids)
        elif not any(mask):
            raise UserError(f"{where}: no assistant message, so nothing to learn with loss_on='assistant'")
        if len(ids) > cfg.seq_len:
            long.append(f"{where} ({len(ids)} tokens)")
            continue
        ids = torch.tensor(ids, dtype=torch.int32)
        tgt = torch.where(torch.tensor(mask[1:] + [0], dtype=torch.bool), ids.roll(-1), -1)
        docs.append((ids, tgt.to(torch.int32)))
    if long and not cfg.skip_long:
        raise UserError(f"{len(long)} conversation(s) longer than seq_len={cfg.seq_len}: {', '.join(long[:5])}"
                        f"{' ...' if len(long) > 5 else ''} (raise seq_len, or --skip_long=True to drop them)")
    return docs, len(long)


def pack(lens, order, T, window=256):
    """Group documents into rows of <= T tokens. Each row starts with the longest of the next `window` documents
    (in `order`) and is topped up best-fit from them, so padding stays ~1% while the order stays random."""
    rows, waiting, k = [], [], 0  # waiting: sorted (length, doc index)
    while k < len(order) or waiting:
        while k < len(order) and len(waiting) < window:
            bisect.insort(waiting, (lens[order[k]], int(order[k])))
            k += 1
        row, room = [], T
        while (j := bisect.bisect_right(waiting, (room, math.inf)) - 1) >= 0:
            n, i = waiting.pop(j)
            row.append(i)
            room -= n
        rows.append(row)
    return rows


def make_batch(rows, docs, T, trim=True):
    """Rows of document indices -> x, y, doc LongTensors [len(rows), T]. Padding: token 0, target -1 and a document
    id of its own. trim: cut the padding all rows share at the end (to a multiple of 32): with documents of similar
    lengths no packing fills rows of T exactly. (Not under torch.compile, where each new shape recompiles.)"""
    if trim:
        T = min(T, -(-max([sum(len(docs[i][0]) for i in row) for row in rows] + [1]) // 32) * 32)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y, d = torch.full_like(x, -1), torch.zeros_like(x)
    for r, row in enumerate(rows):
        p = 0
        for j, i in enumerate(row):
            ids, tgt = docs[i]
            x[r, p:p + len(ids)], y[r, p:p + len(ids)], d[r, p:p + len(ids)] = ids, tgt, j
            p += len(ids)
        d[r, p:] = len(row)
    return x, y, d


# ----------------------------------------------------------------------------- main

def forward_loss(model, rows, docs, cfg, device, autocast):
    """(summed cross-entropy over the loss targets of `rows`, tokens processed)."""
    x, y, d = (t.to(device, non_blocking=True) for t in make_batch(rows, docs, cfg.seq_len, trim=not cfg.compile))
    with autocast:
        logits = model(x, doc=d)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum"), x.numel()


def main(cfg):
    for key, ok in (("loss_on", ("assistant", "all")), ("dtype", ("bfloat16", "float32"))):
        if getattr(cfg, key) not in ok:
            raise UserError(f"{key} must be one of {ok}, got {getattr(cfg, key)!r}")
    if min(cfg.batch_size, cfg.micro_batch, cfg.seq_len) < 1 or cfg.max_steps < 0 or not 0 <= cfg.val_frac < 1 \
            or cfg.max_steps == 0 and cfg.epochs <= 0:
        raise UserError("need batch_size, micro_batch, seq_len >= 1, 0 <= val_frac < 1, max_steps > 0 or epochs > 0")
    rank, world, local = common.dist_setup()
    master = rank == 0
    if cfg.batch_size % (cfg.micro_batch * world):
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch*ranks="
                        f"{cfg.micro_batch}*{world}")
    accum = cfg.batch_size // (cfg.micro_batch * world)
    device = cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    log = tqdm.write if master else (lambda *a: None)
    state_path, model_path = os.path.join(cfg.out_dir, "state.pt"), os.path.join(cfg.out_dir, "model.pt")
    saved = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True) \
        if os.path.exists(state_path) else None
    if saved:  # resuming: it must be the same run
        diff = [k for k, v in saved["extra"]["config"].items() if k not in RESUME_FREE and getattr(cfg, k, None) != v]
        if diff:
            raise UserError(f"{state_path} belongs to a run with different {', '.join(diff)}; "
                            f"use another out_dir or delete {cfg.out_dir}")
        if saved["step"] >= saved["extra"]["max_steps"] and os.path.exists(model_path):
            log(f"{cfg.out_dir}: already done ({saved['step']} steps)")
            if world > 1:
                dist.destroy_process_group()
            return {"step": saved["step"], "done": True}

    # data: checked before the model is built; the held-out split (by problem) is fixed by the seed
    train_convs = read_conversations(cfg.data)
    if cfg.val_data:
        val_convs = read_conversations(cfg.val_data)
    else:
        groups = sorted({g for _, _, g in train_convs})
        n_val = min(len(groups) - 1, max(1, round(cfg.val_frac * len(groups)))) if cfg.val_frac else 0
        held = {groups[i] for i in np.random.default_rng([cfg.seed, 1]).permutation(len(groups))[:n_val]}
        val_convs = [c for c in train_convs if c[2] in held]
        train_convs = [c for c in train_convs if c[2] not in held]

    # model: fp32 master weights (autocast provides the bf16 compute)
    torch.manual_seed(cfg.seed)
    if cfg.init == "scratch":
        tok = Tokenizer(cfg.tokenizer)
        raw = Llama(ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                                vocab_size=tok.n_vocab, max_seq_len=max(cfg.max_seq_len, cfg.seq_len))).to(device)
    else:  # under FSDP each rank loads on CPU and fully_shard moves only its own shard to the GPU
        raw, tok = load_model(cfg.init, device="cpu" if cfg.fsdp and world > 1 else device)
        if cfg.seq_len > raw.cfg.max_seq_len:
            raise UserError(f"seq_len={cfg.seq_len} exceeds the max_seq_len {raw.cfg.max_seq_len} of {cfg.init}")
    train, n_long = render(train_convs, tok, cfg)
    val, n_long_val = render(val_convs, tok, cfg)
    if not train:
        raise UserError(f"{cfg.data}: no training conversations left")
    lens = [len(ids) for ids, _ in train]
    n_tgts = [int((tgt != -1).sum()) for _, tgt in train]
    epoch_rows = {}  # {epoch: its rows}; the data order is a seeded permutation per epoch

    def rows_of(epoch):
        if epoch not in epoch_rows:
            epoch_rows.clear()
            order = np.random.default_rng([cfg.seed, 2, epoch]).permutation(len(train))
            epoch_rows[epoch] = pack(lens, order, cfg.seq_len)
        return epoch_rows[epoch]

    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(rows_of(0)) / cfg.batch_size)
    val_rows = pack([len(ids) for ids, _ in val], range(len(val)), cfg.seq_len) if val else []
    val_rows += [[]] * (-len(val_rows) % (world * cfg.micro_batch))  # every rank runs the same number of forwards
    epochs = max_steps * cfg.batch_size / len(rows_of(0))
    log(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params | {len(train)} train / {len(val)} val "
        f"conversations | epoch: {sum(lens) / 1e6:.2f}M tokens in {len(rows_of(0))} rows of <= {cfg.seq_len} | "
        f"{max_steps} steps x {cfg.batch_size} rows = {epochs:.2f} epochs = {epochs * sum(lens) / 1e6:.2f}M tokens | "
        f"{world} rank(s) x {accum} micro-step(s) | skipped as too long: {n_long} train, {n_long_val} val")

    # wrap: activation checkpointing, FSDP2, compile, DDP; the optimizer is built on the final (sharded) params
    model = raw
    if cfg.grad_checkpoint:
        for block in raw.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.layers:
            fully_shard(block)
        fully_shard(raw)
    if cfg.compile:
        model = torch.compile(raw)
    if world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if "cuda" in device else None)
    opt = make_optimizer(raw, cfg.lr, cfg.weight_decay)
    step, pos = 0, (0, 0)  # pos = (epoch, next row of that epoch)
    if saved:
        step, extra = load_state(cfg.out_dir, raw, opt)
        pos = tuple(extra["pos"])
        log(f"resumed from {state_path} at step {step}, data position {pos}")
    del saved
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def allsum(*xs):
        t = torch.tensor(xs, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def evaluate():
        tot = cnt = 0.0
        for i in range(0, len(val_rows), world * cfg.micro_batch):
            mine = val_rows[i + rank * cfg.micro_batch:i + (rank + 1) * cfg.micro_batch]
            tot += forward_loss(model, mine, val, cfg, device, autocast)[0].item()
            cnt += sum(int((val[j][1] != -1).sum()) for r in mine for j in r)
        tot, cnt = allsum(tot, cnt)
        return tot / max(cnt, 1)

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
        mpath = os.path.join(cfg.out_dir, "metrics.jsonl")
        keep = [r for r in common.resume_jsonl(mpath) if r.get("step", 0) <= step] if step else []
        common.write_jsonl(mpath, keep)  # drop what a killed run logged after its last checkpoint
        mfile = open(mpath, "a", encoding="utf-8")

    def emit(rec):  # one log line, mirrored into metrics.jsonl
        if master:
            common.append_jsonl(mfile, rec)
            log(" | ".join([f"step {rec['step']}/{max_steps}"] + [FORMATS[k].format(v) for k, v in rec.items()
                                                                  if k in FORMATS]))

    if step == 0 and val:
        emit({"step": 0, "val_loss": evaluate()})
    bar = tqdm(total=max_steps, initial=step, disable=not (master and cfg.progress), dynamic_ncols=True)
    t0, n_tok, n_pad, loss_sum, n_steps = time.time(), 0, 0, 0.0, 0
    while step < max_steps:
        lr = get_lr(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        rows, (e, i) = [], pos  # the global batch: the next batch_size rows of the (epoch, row) stream
        while len(rows) < cfg.batch_size:
            take = rows_of(e)[i:i + cfg.batch_size - len(rows)]
            rows, i = rows + take, i + len(take)
            e, i = (e + 1, 0) if i == len(rows_of(e)) else (e, i)
        pos = (e, i)
        n_tgt = max(1, sum(n_tgts[j] for r in rows for j in r))  # loss targets in the global batch
        for m in range(accum):
            mine = rows[(m * world + rank) * cfg.micro_batch:(m * world + rank + 1) * cfg.micro_batch]
            if world > 1:  # gradients are reduced across ranks on the last micro-step only
                if cfg.fsdp:
                    raw.set_requires_gradient_sync(m == accum - 1)
                else:
                    model.require_backward_grad_sync = m == accum - 1
            # sum over this slice / targets of the global batch: micro-steps and ranks add up to the global mean
            loss, n = forward_loss(model, mine, train, cfg, device, autocast)
            loss = loss / n_tgt
            (loss * world).backward()  # * world undoes the mean over ranks that DDP/FSDP take
            loss_sum += loss.detach()
            n_tok, n_pad = n_tok + n, n_pad + n - sum(lens[j] for r in mine for j in r)
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, n_steps, rec = step + 1, n_steps + 1, {}
        bar.update(1)
        last = step == max_steps
        if step % cfg.log_every == 0 or last:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            loss, tokens, pad = allsum(float(loss_sum), n_tok, n_pad)  # tokens processed, padding included
            rec = dict(step=step, loss=loss / n_steps, lr=lr, tok_s=tokens / (time.time() - t0), pad=pad / tokens,
                       grad_norm=norm.item(), tokens=int(tokens))
            loss_sum, n_steps, n_tok, n_pad, t0 = 0.0, 0, 0, 0, time.time()
        t1 = time.time()  # evaluation and checkpoints do not count into tok/s
        if val and (last or cfg.eval_every and step % cfg.eval_every == 0):
            rec.update(step=step, val_loss=evaluate())
        if rec:  # before the checkpoint, so every step a resume starts from has its record
            emit(rec)
        if cfg.save_every and step % cfg.save_every == 0 or last:
            save_state(cfg.out_dir, raw, opt, step, {"pos": list(pos), "max_steps": max_steps, "lr": lr,
                                                     "config": common.config_dict(cfg)})
        t0 += time.time() - t1
    bar.close()

    # the final model in the format every stage loads (tokenizer.model, then model.pt last)
    if cfg.fsdp and world > 1:
        dcp, opts = _dcp(raw)
        full = dcp.get_model_state_dict(raw, options=opts)
        if master:  # a plain copy to save: built on the meta device, the gathered tensors assigned
            with torch.device("meta"):
                raw = Llama(raw.cfg)
            raw.load_state_dict(full, assign=True)
            raw.tie()
    if master:
        save_checkpoint(cfg.out_dir, raw, tok, common.config_dict(cfg))
        mfile.close()
        log(f"saved {model_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "done": True}


if __name__ == "__main__":
    common.run_main(main, Config)
