"""
sft.py — the trainer. Trains the built-in task's base policy from scratch, and fine-tunes a policy
on the chain-of-thoughts that linearize.py writes (ASTRO traces, or the Direct baseline).

    python sft.py                           # the built-in task's base policy -> out/base
    python sft.py config/base_countdown.py  # the same weights, spelled out (val loss less often)
    python sft.py config/sft_astro.py       # ASTRO SFT of out/base on out/linearize/astro.jsonl
    python sft.py config/sft_astro.py config/sft_direct.py   # Direct SFT (the control)
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_llama_math.py   # FSDP2 on 8 GPUs

Data: JSONL of {"messages": [{"role": ..., "content": ...}, ...]} rendered with the Llama 3 chat
format (tokenizer.Tokenizer.render_chat); the loss is on assistant content, from character
"loss_from" on where a message has one. Conversations are packed into rows of up to seq_len
tokens; a per-token document id keeps attention (and rotary positions) inside each conversation,
so packing changes the speed, not the result. The global batch (batch_size rows) is the same for
any number of processes: each rank takes its slice. Kill it at any moment and re-run the same
command: it resumes from out_dir/state.pt and ends with the same weights, bit for bit, as a run
that was never stopped. Re-running a finished run prints "already done". Under FSDP2 (fsdp=True)
each rank saves its own shards of the model and optimizer (out_dir/state-<step>/,
torch.distributed.checkpoint; a resume may use another number of ranks) and only the final
model.pt is gathered, on rank 0; with dtype=bfloat16 it computes through FSDP2's mixed precision
(bf16 gathers, fp32 gradient reduction) rather than autocast, and offload=True keeps the shards,
gradients and AdamW state in host memory (70B on 8 GPUs: bench/plan.py).
"""
import bisect
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError
from checkpoint import full_model, load_model, load_state, save_checkpoint, save_state
from model import Llama, ModelConfig
from tokenizer import Tokenizer


@dataclass
class Config:
    # data
    data: str = "data/countdown/warmup.jsonl"  # training conversations, {"messages": [...]} lines
    val_data: str = ""          # held-out conversations; "" = hold out val_frac of `data`
    val_frac: float = 0.02      # share of `data` held out (fixed by seed) when val_data is ""
    loss_on: str = "assistant"  # "assistant": assistant content + its <|eot_id|>; "all": all tokens
    seq_len: int = 256          # packed row length = longest conversation allowed (in tokens)
    skip_long: bool = False     # longer conversations: False = error naming file:line, True = drop
    # model
    init: str = "scratch"       # "scratch" (shape, tokenizer below) or a checkpoint (ours/Meta/HF)
    tokenizer: str = "data/countdown/tokenizer.model"  # used by init="scratch" only
    dim: int = 128              # scratch only: width (dim 128, 4 layers, 4/2 heads = ~1.0M params)
    n_layers: int = 4           # scratch only
    n_heads: int = 4            # scratch only
    n_kv_heads: int = 2         # scratch only
    max_seq_len: int = 4096     # scratch only: rotary table size, room for the search's and RL's
                                # longer generations
    # optimization
    batch_size: int = 32        # rows of seq_len tokens per optimizer step (all ranks, micro-steps)
    micro_batch: int = 32       # rows per forward per rank; batch_size/(micro_batch*ranks) of them
    epochs: float = 1.0         # passes over the data (up to whole steps), used if max_steps is 0
    max_steps: int = 600        # optimizer steps; 0 = derive from epochs. 600*32*256 = 4.9M tokens
    lr: float = 3e-3            # peak learning rate
    warmup_steps: int = 20      # linear warm-up, then cosine decay to lr*min_lr_frac
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1   # on matrices and embeddings only
    grad_clip: float = 1.0      # max global grad norm; 0 = no clipping
    # system
    out_dir: str = "out/base"   # state.pt, model.pt + tokenizer.model, metrics.jsonl, config.json
    seed: int = 1337            # model init, validation split, per-epoch data order
    device: str = ""            # "" = cuda if available, else cpu
    dtype: str = "float32"      # "bfloat16": bf16 compute over fp32 master weights (GPUs; CPUs
                                # with AMX or AVX512-BF16: without them bf16 matmuls are far slower)
    compile: bool = False       # torch.compile each block (a slow start, then faster steps)
    fsdp: bool = False          # under torchrun: shard params, grads, optimizer (FSDP2), not DDP
    offload: bool = False       # fsdp: those shards in host memory (AdamW steps on the CPU)
    grad_checkpoint: bool = False  # recompute each block in the backward: less memory for long rows
    logit_chunk: int = 0        # > 0: logits this many positions at a time (less memory)
    eval_every: int = 50        # val loss every N steps (and at the start and end); 0 = those only
    save_every: int = 50        # state.pt every N steps (and at the end); 0 = at the end only
    log_every: int = 10         # one log line (and a metrics.jsonl record) every N steps
    progress: bool = True       # tqdm progress bar

    ranges = dict(val_frac=(0.0, 1.0), seq_len=(1, None), dim=(1, None), n_layers=(1, None),
                  n_heads=(1, None), n_kv_heads=(1, None), max_seq_len=(1, None),
                  batch_size=(1, None), micro_batch=(1, None), epochs=(0.0, None),
                  max_steps=(0, None), lr=(0.0, None), warmup_steps=(0, None),
                  min_lr_frac=(0.0, 1.0), weight_decay=(0.0, None), grad_clip=(0.0, None),
                  eval_every=(0, None), save_every=(0, None), log_every=(1, None),
                  logit_chunk=(0, None))


ROLES = ("system", "user", "assistant")
FORMATS = {"loss": "loss {:.4f}", "lr": "lr {:.2e}", "tok_s": "tok/s {:,.0f}",
           "grad_norm": "norm {:.3f}", "val_loss": "val {:.4f}"}
# Keys that may change between a run and its resume without changing what is trained.
RESUME_FREE = {"out_dir", "device", "compile", "fsdp", "offload", "grad_checkpoint", "logit_chunk",
               "micro_batch", "eval_every", "save_every", "log_every", "progress"}


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
            k = m.get("loss_from", 0)
            if type(k) is not int or not 0 <= k <= len(m["content"]):
                raise UserError(f"{where}: messages[{i}].loss_from must be an int from 0 to the "
                                f"content's length ({len(m['content'])}), got {k!r}")
    # the group keeps all traces of one problem ("<problem id>#<j>") on the same side of the split
    return [(f"{path}:{r['_line']}", r["messages"], str(r.get("id", r["_line"])).split("#")[0])
            for r in recs]


def read_data(cfg):
    """(train, val) conversations. Without val_data, a share val_frac of the problems of `data`
    (chosen by the seed) is held out, all traces of a problem on the same side."""
    train = read_conversations(cfg.data)
    if cfg.val_data:
        return train, read_conversations(cfg.val_data)
    groups = sorted({g for _, _, g in train})
    n_val = min(len(groups) - 1, max(1, round(cfg.val_frac * len(groups)))) if cfg.val_frac else 0
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(groups))
    held = {groups[i] for i in order[:n_val]}
    return [c for c in train if c[2] not in held], [c for c in train if c[2] in held]


def render(convs, tok, cfg):
    """[(ids, tgt)] per conversation, as int32 tensors: tgt[k] = ids[k+1] where that token carries
    loss, else -1. Also returns how many conversations were dropped as longer than seq_len."""
    docs, long = [], []
    for where, msgs, _ in convs:
        ids, mask = tok.render_chat(msgs)
        if cfg.loss_on == "all":
            mask = [1] * len(ids)
        elif not any(mask):
            raise UserError(f"{where}: no assistant message, so nothing to learn with "
                            "loss_on='assistant'")
        if len(ids) > cfg.seq_len:
            long.append(f"{where} ({len(ids)} tokens)")
            continue
        ids = torch.tensor(ids, dtype=torch.int32)
        tgt = torch.where(torch.tensor(mask[1:] + [0], dtype=torch.bool), ids.roll(-1), -1)
        docs.append((ids, tgt.to(torch.int32)))
    if long and not cfg.skip_long:
        raise UserError(f"{len(long)} conversation(s) longer than seq_len={cfg.seq_len}: "
                        f"{', '.join(long[:5])}{' ...' if len(long) > 5 else ''} "
                        "(raise seq_len, or --skip_long=True to drop them)")
    return docs, len(long)


def pack(lens, order, T, window=256):
    """Group documents into rows of <= T tokens. Each row starts with the longest of the next
    `window` documents (in `order`) and is topped up best-fit from them, so padding stays ~1% while
    the order stays random."""
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


def make_batch(rows, docs, T):
    """Rows of document indices -> x, y, doc LongTensors [len(rows), T']. Padding: token 0, target
    -1 and a document id of its own. T' <= T: the padding all rows share at the end is cut (to a
    multiple of 32): with documents of similar lengths no packing fills rows of T exactly."""
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


class Data:
    """The rendered conversations. Training rows come as a stream of epochs, each packing its own
    seeded permutation of the documents; a place in it is pos = (epoch, next row of that epoch).
    Validation rows are packed once, in file order, padded with empty rows so that every rank runs
    the same number of forwards."""

    def __init__(self, train, val, cfg, world):
        self.train, self.val, self.seed, self.seq_len = train, val, cfg.seed, cfg.seq_len
        self.lens = [len(ids) for ids, _ in train]
        self.n_tgts = [int((tgt != -1).sum()) for _, tgt in train]
        self.epoch_rows = {}  # {epoch: its rows}, the latest epoch only
        val_lens = [len(ids) for ids, _ in val]
        self.val_rows = pack(val_lens, range(len(val)), cfg.seq_len) if val else []
        self.val_rows += [[]] * (-len(self.val_rows) % (world * cfg.micro_batch))

    def rows(self, epoch):
        if epoch not in self.epoch_rows:
            self.epoch_rows.clear()
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.train))
            self.epoch_rows[epoch] = pack(self.lens, order, self.seq_len)
        return self.epoch_rows[epoch]

    def batch(self, pos, n):
        """The n rows of the stream that follow pos -> (rows, the position after them)."""
        rows, (e, i) = [], pos
        while len(rows) < n:
            take = self.rows(e)[i:i + n - len(rows)]
            rows, i = rows + take, i + len(take)
            e, i = (e + 1, 0) if i == len(self.rows(e)) else (e, i)
        return rows, (e, i)


# ----------------------------------------------------------------------------- model and steps

class Proc(NamedTuple):
    """This process: its rank among `world` processes, its device, the autocast of its forwards."""
    rank: int
    world: int
    device: str
    autocast: object


def build_model(cfg, device, world):
    """(model, tokenizer) with fp32 master weights (autocast provides the bf16 compute): a new Llama
    (init="scratch", seeded) or a checkpoint. Under FSDP each rank loads a checkpoint on the CPU and
    fully_shard moves only its own shard to the GPU."""
    torch.manual_seed(cfg.seed)
    if cfg.init == "scratch":
        tok = Tokenizer(cfg.tokenizer)
        shape = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads, vocab_size=tok.n_vocab,
                            max_seq_len=max(cfg.max_seq_len, cfg.seq_len))
        return Llama(shape).to(device), tok
    sharded = cfg.fsdp and world > 1  # then loaded as stored; wrap casts it group by group
    fp32 = torch.float32
    raw, tok = load_model(cfg.init, "cpu" if sharded else device, None if sharded else fp32)
    if cfg.seq_len > raw.cfg.max_seq_len:
        raise UserError(f"seq_len={cfg.seq_len} exceeds the max_seq_len {raw.cfg.max_seq_len} of "
                        f"{cfg.init}")
    return raw, tok


def wrap(raw, cfg, world, local, device, dtype):
    """The model the training forward calls: activation checkpointing, FSDP2 (in place; bf16: its
    mixed precision), compile, DDP, in this order. The optimizer is built on raw's final (sharded)
    parameters."""
    model = raw
    if cfg.grad_checkpoint:
        common.recompute_blocks(raw)
    if world > 1 and cfg.fsdp:
        common.fsdp_shard(raw, dtype, cfg.offload, store=torch.float32)
    if cfg.compile:  # block by block, dynamic shapes: one graph for every row length
        for block in raw.layers:
            block.forward = torch.compile(block.forward, dynamic=True)
    if world > 1 and not cfg.fsdp:
        ids = [local] if "cuda" in device else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def forward_loss(model, rows, docs, cfg, device, autocast):
    """(summed cross-entropy over the loss targets of `rows`, tokens processed: their documents'
    tokens, no padding)."""
    batch = make_batch(rows, docs, cfg.seq_len)
    x, y, d = (t.to(device, non_blocking=True) for t in batch)
    # the rows' documents as one stream without the padding (attention is per document anyway):
    # padding costs nothing, and the output layer runs only where a loss is taken
    real = d < torch.tensor([len(r) for r in rows], device=device)[:, None]
    real[0, 0] = True  # one token at least (a rank's share of val may be empty rows): no loss
    d = d + torch.arange(len(rows), device=device)[:, None] * d.size(1)  # ids unique across rows
    x, y, d = x[real][None], y[real][None], d[real][None]
    return summed_loss(model, x, d, y, cfg.logit_chunk, autocast), x.numel()


def summed_loss(model, x, d, y, chunk, autocast):
    """Cross-entropy summed over the targets y (-1: none) of the packed rows x with documents d;
    the output layer only where a loss is taken, chunk positions at a time if chunk
    (model.chunked_logprobs: chunk x vocab logits alive)."""
    keep = y != -1
    with autocast:
        if chunk:
            return -model(x, d, keep, y[keep], chunk).sum()
        logits = model(x, doc=d, keep=keep)
    return F.cross_entropy(logits.float(), y[keep], reduction="sum")


def allsum(proc, *xs):
    """The sums of xs over all ranks."""
    return common.all_reduce(torch.tensor(xs, dtype=torch.float64, device=proc.device),
                             proc.world).tolist()


@torch.no_grad()
def val_loss(model, data, cfg, proc):
    """Mean loss per target over the validation rows; each rank takes its slice of each batch."""
    tot = cnt = 0.0
    mb = cfg.micro_batch
    for i in range(0, len(data.val_rows), proc.world * mb):
        mine = data.val_rows[i + proc.rank * mb:i + (proc.rank + 1) * mb]
        tot += forward_loss(model, mine, data.val, cfg, proc.device, proc.autocast)[0].item()
        cnt += sum(int((data.val[j][1] != -1).sum()) for r in mine for j in r)
    tot, cnt = allsum(proc, tot, cnt)
    return tot / max(cnt, 1)


def train_step(model, raw, opt, rows, data, cfg, proc, window):
    """One optimizer step on the global batch `rows`. Each micro-step's loss over this rank's slice
    is divided by the loss targets of the whole batch, so micro-steps and ranks add up to the global
    mean; then clip and AdamW. Adds the loss and token counts to `window`; returns the grad norm."""
    rank, world = proc.rank, proc.world
    accum = cfg.batch_size // (cfg.micro_batch * world)
    n_tgt = max(1, sum(data.n_tgts[j] for r in rows for j in r))  # loss targets in the global batch
    for m in range(accum):
        k = m * world + rank
        mine = rows[k * cfg.micro_batch:(k + 1) * cfg.micro_batch]
        if world > 1:  # gradients are reduced across ranks on the last micro-step only
            if cfg.fsdp:
                raw.set_requires_gradient_sync(m == accum - 1)
            else:
                model.require_backward_grad_sync = m == accum - 1
        loss, n = forward_loss(model, mine, data.train, cfg, proc.device, proc.autocast)
        loss = loss / n_tgt
        (loss * world).backward()  # * world undoes the mean over ranks that DDP/FSDP take
        window["loss"] += loss.detach()
        window["tokens"] += n
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------- logging, the loop

def new_window():
    """Counters of the steps since the last log record."""
    return dict(loss=0.0, tokens=0, steps=0, t0=time.time())


def window_record(step, lr, norm, window, proc):
    """The log record of the window: mean loss, tokens/s (summed over the ranks; padding is never
    processed), the last grad norm."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    loss, tokens = allsum(proc, float(window["loss"]), window["tokens"])
    return dict(step=step, loss=loss / window["steps"], lr=lr,
                tok_s=tokens / (time.time() - window["t0"]),
                grad_norm=norm.item(), tokens=int(tokens))


class Metrics(common.MetricsFile):
    """metrics.jsonl and the log, on rank 0: one line per record. A resumed run keeps the records up
    to its step and drops what a killed run logged after its last checkpoint."""

    def __init__(self, out_dir, step, max_steps, master, log):
        keep = (lambda r: r.get("step", 0) <= step) if step else None
        super().__init__(out_dir, keep, master)
        self.max_steps, self.log = max_steps, log

    def emit(self, rec):
        if self.write(rec):
            fields = [FORMATS[k].format(v) for k, v in rec.items() if k in FORMATS]
            self.log(" | ".join([f"step {rec['step']}/{self.max_steps}"] + fields))


def train(model, raw, opt, data, step, pos, max_steps, cfg, proc, metrics):
    """Optimizer steps from `step` to max_steps, with log records, validation and state.pt as
    configured. Returns the last step."""
    show = proc.rank == 0 and cfg.progress
    bar = tqdm(total=max_steps, initial=step, disable=not show, dynamic_ncols=True)
    window = new_window()
    while step < max_steps:
        lr = common.get_lr(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        rows, pos = data.batch(pos, cfg.batch_size)  # the global batch: the stream's next rows
        norm = train_step(model, raw, opt, rows, data, cfg, proc, window)
        step, rec = step + 1, {}
        window["steps"] += 1
        bar.update(1)
        last = step == max_steps
        if step % cfg.log_every == 0 or last:
            rec, window = window_record(step, lr, norm, window, proc), new_window()
        t1 = time.time()  # evaluation and checkpoints do not count into tok/s
        if data.val and (last or cfg.eval_every and step % cfg.eval_every == 0):
            rec.update(step=step, val_loss=val_loss(model, data, cfg, proc))
        if rec:  # before the checkpoint, so every step a resume starts from has its record
            metrics.emit(rec)
        if cfg.save_every and step % cfg.save_every == 0 or last:
            extra = {"pos": list(pos), "max_steps": max_steps, "lr": lr,
                     "config": common.config_dict(cfg)}
            save_state(cfg.out_dir, raw, opt, step, extra)
        window["t0"] += time.time() - t1
    bar.close()
    return step


def save_model(raw, tok, cfg, proc):
    """The final model in the format every stage loads (tokenizer.model, then model.pt last). Under
    FSDP the shards are gathered first, into a plain copy on rank 0 (checkpoint.full_model)."""
    raw = full_model(raw)
    if proc.rank == 0:
        save_checkpoint(cfg.out_dir, raw, tok, common.config_dict(cfg))


# ----------------------------------------------------------------------------- main

def describe(raw, data, max_steps, cfg, world, n_long, n_long_val):
    """The first log line: the model's size, the data, the budget in steps, epochs and tokens."""
    rows, tokens = len(data.rows(0)), sum(data.lens)
    epochs = max_steps * cfg.batch_size / rows
    accum = cfg.batch_size // (cfg.micro_batch * world)
    params = sum(p.numel() for p in raw.parameters())
    return (f"{params / 1e6:.2f}M params | {len(data.train)} train / {len(data.val)} val "
            f"conversations | epoch: {tokens / 1e6:.2f}M tokens in {rows} rows of "
            f"<= {cfg.seq_len} | {max_steps} steps x {cfg.batch_size} rows = {epochs:.2f} epochs = "
            f"{epochs * tokens / 1e6:.2f}M tokens | {world} rank(s) x {accum} micro-step(s) | "
            f"skipped as too long: {n_long} train, {n_long_val} val")


def check(cfg):
    """The settings parse_config does not check (it checks the ranges, again here for callers that
    build a Config themselves)."""
    common.check_ranges(cfg)
    if cfg.loss_on not in ("assistant", "all"):
        raise UserError(f"loss_on must be one of ('assistant', 'all'), got {cfg.loss_on!r}")
    if cfg.val_frac >= 1 or cfg.max_steps == 0 and cfg.epochs <= 0:
        raise UserError("need val_frac < 1, and max_steps > 0 or epochs > 0")
    if cfg.offload and not cfg.fsdp:
        raise UserError("offload=True needs fsdp=True (it offloads FSDP2's shards)")


def saved_state(cfg):
    """out_dir/state.pt when this run is resumed, else None. It must be the same run: only the keys
    in RESUME_FREE may differ."""
    path = os.path.join(cfg.out_dir, "state.pt")
    if not os.path.exists(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    common.check_same_run(saved["extra"]["config"], common.config_dict(cfg), path, RESUME_FREE)
    return saved


def main(cfg):
    check(cfg)
    rank, world, local = common.dist_setup()
    if cfg.batch_size % (cfg.micro_batch * world):
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch*ranks="
                        f"{cfg.micro_batch}*{world}")
    device, dtype = common.device_and_dtype(cfg, local, dtypes=("bfloat16", "float32"))
    log = tqdm.write if rank == 0 else (lambda *a: None)
    model_path = os.path.join(cfg.out_dir, "model.pt")
    saved = saved_state(cfg)
    if saved and saved["step"] >= saved["extra"]["max_steps"] and os.path.exists(model_path):
        log(f"{cfg.out_dir}: already done ({saved['step']} steps)")
        if world > 1:
            dist.destroy_process_group()
        return {"step": saved["step"], "done": True}

    # data (checked before the model is built), the model, the rows
    train_convs, val_convs = read_data(cfg)
    raw, tok = build_model(cfg, device, world)
    train_docs, n_long = render(train_convs, tok, cfg)
    val_docs, n_long_val = render(val_convs, tok, cfg)
    if not train_docs:
        raise UserError(f"{cfg.data}: no training conversations left")
    data = Data(train_docs, val_docs, cfg, world)
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(data.rows(0)) / cfg.batch_size)
    log(describe(raw, data, max_steps, cfg, world, n_long, n_long_val))

    # the wrapped model, the optimizer, the state of a resumed run
    model = wrap(raw, cfg, world, local, device, dtype)
    opt = common.make_optimizer(raw, cfg.lr, cfg.weight_decay)
    step, pos = 0, (0, 0)  # pos = (epoch, next row of that epoch)
    if saved:
        step, extra = load_state(cfg.out_dir, raw, opt)
        pos = tuple(extra["pos"])
        log(f"resumed from {cfg.out_dir}/state.pt at step {step}, data position {pos}")
    del saved
    proc = Proc(rank, world, device, common.training_context(raw, device, dtype))

    # train
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.write_json(os.path.join(cfg.out_dir, "config.json"), common.config_dict(cfg))
    metrics = Metrics(cfg.out_dir, step, max_steps, rank == 0, log)
    if step == 0 and data.val:
        metrics.emit({"step": 0, "val_loss": val_loss(model, data, cfg, proc)})
    step = train(model, raw, opt, data, step, pos, max_steps, cfg, proc, metrics)
    save_model(raw, tok, cfg, proc)
    metrics.close()
    log(f"saved {model_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "done": True}


if __name__ == "__main__":
    common.run_main(main, Config)
