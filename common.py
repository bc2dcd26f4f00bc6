"""
The few helpers every stage shares: the config parser and the resume check, JSONL reading with
precise errors, resumable JSONL output, atomic writes, device/DDP/FSDP2 setup, and the
learning-rate schedule and optimizer that sft.py and rl.py both use (their training state is
checkpoint.py's). Kept here so each stage stays a short, linear script.

Config files and overrides (nanoGPT style, but parsed, never exec'd):
    python sft.py config/base_countdown.py --lr=3e-4 --max_steps=200
A config file is a Python file holding only `name = <literal>` lines (comments allowed).
Every key must be a field of the stage's Config dataclass and the value must have the field's type.
A Config may declare the bounds of its numeric fields right under them, as a class attribute
(not a field): `ranges = dict(max_new_tokens=(1, None), temperature=(0.0, None))`, (low, high)
inclusive, None = unbounded. parse_config checks them and names the line that set a bad value.
"""
import ast
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import sys

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


class UserError(Exception):
    """Bad input from the user (config, data file, checkpoint). Stages print it without a
    traceback."""


def run_main(main, cfg_class):
    """Entry point of every stage: parse sys.argv into a Config, run main, print UserErrors
    plainly."""
    try:
        main(parse_config(cfg_class, sys.argv[1:]))
    except UserError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- config

def _coerce(name, value, default, where):
    """Type-check `value` against the type of the field's default (int is accepted for float)."""
    want = type(default)
    if default is None or isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, list):
        return tuple(value)
    got = f"{type(value).__name__} {value!r}"
    raise UserError(f"{where}: {name} must be {want.__name__}, got {got}")


def parse_config(cfg_class, argv):
    """Build cfg_class() and apply config files (positional *.py) then --key=value overrides in
    order; then check the ranges the Config declares."""
    fields = {f.name: f for f in dataclasses.fields(cfg_class)}
    cfg = cfg_class()
    updates = []  # (key, value, where, raw override text)
    set_by = {}  # key -> where its final value comes from
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file not found: {arg}")
            with open(arg, "rb") as f:
                src = _utf8(f.read(), arg)
            try:
                tree = ast.parse(src, filename=arg)
            except SyntaxError as e:
                raise UserError(f"{arg}:{e.lineno}: syntax error: {e.msg}") from None
            for node in tree.body:
                where = f"{arg}:{node.lineno}"
                if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                    continue  # a docstring
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise UserError(f"{where}: config files may only hold `name = value` lines")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise UserError(f"{where}: {node.targets[0].id} is not a literal") from None
                updates.append((node.targets[0].id, value, where, None))
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --out_dir=out/run1
            updates.append((key, value, f"override --{key}", raw))
    for key, value, where, raw in updates:
        if key not in fields:
            raise UserError(f"{where}: unknown config key {key!r} (known: {', '.join(fields)})")
        default = getattr(cfg, key)
        if isinstance(default, str) and raw is not None:
            value = raw  # string fields take the override verbatim: --tag=123 is the string "123"
        setattr(cfg, key, _coerce(key, value, default, where))
        set_by[key] = where
    check_ranges(cfg, set_by)
    return cfg


def check_ranges(cfg, set_by=None):
    """Each field named in the Config's `ranges` lies within its (low, high) bounds (inclusive,
    None = unbounded). set_by: key -> the config file line or override that set it (the error
    names it)."""
    set_by = set_by or {}
    for key, (low, high) in getattr(cfg, "ranges", {}).items():
        value = getattr(cfg, key)
        if low is not None and value < low or high is not None and value > high:
            bound = (f">= {low}" if high is None else f"<= {high}" if low is None
                     else f"in {low}..{high}")
            where = f"{set_by[key]}: " if key in set_by else ""
            raise UserError(f"{where}{key} must be {bound}, got {value!r}")


def config_dict(cfg):
    return dataclasses.asdict(cfg)


_MISSING = object()


def _short(value, width=40):
    text = repr(value) if value is not _MISSING else "(not set)"
    return text if len(text) <= width else text[:width - 3] + "..."


def check_same_run(saved, current, path, free=()):
    """A resume continues the run whose settings `saved` are stored with its outputs in `path`:
    every key of either dict except the `free` ones (those a resume may change) must have the same
    value now. Otherwise a UserError names the file and each differing key, saved -> current."""
    was, now = (lambda k: saved.get(k, _MISSING)), (lambda k: current.get(k, _MISSING))
    diff = [k for k in dict.fromkeys([*saved, *current]) if k not in free and was(k) != now(k)]
    if diff:
        changes = ", ".join(f"{k}: {_short(was(k))} -> {_short(now(k))}" for k in diff)
        raise UserError(f"{path} belongs to a run with other settings (different {changes}); "
                        "use another out_dir or the same settings")


# ----------------------------------------------------------------------------- JSONL

def _utf8(data, path):
    """The text of a file's bytes; bytes that are not UTF-8 are a UserError naming file:line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = 1 + len(re.findall(rb"\r\n?|\n", data[:e.start]))  # the newlines text mode reads
        raise UserError(f"{path}:{lineno}: not UTF-8") from None


def read_jsonl(path, required=()):
    """All records of a JSONL file; a line that is not UTF-8 or not JSON, or a missing field, is a
    UserError naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, "rb") as f:
        text = _utf8(f.read(), path)
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # text mode's lines
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for key in required:
            if key not in rec:
                raise UserError(f"{path}:{lineno}: missing field {key!r}")
        rec["_line"] = lineno  # so later checks can name the line too; never written back out
        records.append(rec)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def resume_jsonl(path, key="id"):
    """Records already finished in an output file we are about to append to.
    A torn last line (a run killed mid-write) is cut off, so it gets redone, not duplicated."""
    done = []
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    good = 0  # byte offset just past the last complete, parseable line
    for lineno, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break
        try:
            done.append(json.loads(line))
        except UnicodeDecodeError:  # a whole line, so not a torn write: some other file
            raise UserError(f"{path}:{lineno}: not UTF-8") from None
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def derive_seed(*parts):
    """A 63-bit seed from any parts (a run's seed, a purpose, a step, a rank): stable across runs
    and machines, unlike hash()."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class MetricsFile:
    """out_dir/metrics.jsonl, written on rank 0 (master): the records a resumed run's state holds
    (those `keep` accepts; None: a fresh run, the old file is not read) are kept, the rest dropped
    (they are redone), then one record is appended per write."""

    def __init__(self, out_dir, keep, master):
        self.file = None
        if master:
            path = os.path.join(out_dir, "metrics.jsonl")
            write_jsonl(path, [r for r in resume_jsonl(path) if keep(r)] if keep else [])
            self.file = open(path, "a", encoding="utf-8")

    def write(self, rec):
        """Appends rec (rank 0); returns whether this rank writes, and so logs."""
        if self.file:
            append_jsonl(self.file, rec)
        return self.file is not None

    def close(self):
        if self.file:
            self.file.close()


def append_jsonl(f, rec):
    """Append one record and flush it to disk, so a killed run keeps every finished record."""
    f.write(json.dumps({k: v for k, v in rec.items() if k != "_line"}, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_jsonl(path, records):
    """Write a whole JSONL file atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            rec = {k: v for k, v in rec.items() if k != "_line"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path):
    """A JSON file (the settings a run stored next to its outputs); a bad one is a UserError."""
    with open(path, "rb") as f:
        text = _utf8(f.read(), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def write_json(path, obj):
    """Write a JSON file atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def torch_save(obj, path):
    """torch.save atomically: a kill mid-save leaves the previous file intact, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- devices

def autodetect_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_and_dtype(cfg, local_rank=0, dtypes=("float32", "bfloat16", "float16")):
    """(device, torch dtype) of a stage from cfg.device and cfg.dtype. Device "" = a GPU if there is
    one, else the CPU; "cuda" = this process's GPU, cuda:<local_rank>. The dtype must be one of the
    names in `dtypes` (the ones the stage supports)."""
    if cfg.dtype not in dtypes:
        raise UserError(f"dtype must be one of {', '.join(dtypes)}, got {cfg.dtype!r}")
    device = cfg.device or autodetect_device()
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return device, getattr(torch, cfg.dtype)


def autocast(device, dtype):
    """bf16 autocast over fp32 master weights when dtype is bfloat16; otherwise a no-op."""
    bf16 = dtype == torch.bfloat16
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


def dist_setup():
    """(rank, world_size, local_rank). Under torchrun, also joins the process group (nccl for GPU
    tensors, gloo for host tensors)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():  # gloo for host tensors: FSDP2's offloaded shards
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def inference_mesh(tp, device):
    """(dp rank, dp size, tp mesh or None) of a generating stage (search, eval): the processes as a
    (dp, tp) grid whose tp groups are consecutive ranks (the GPUs of one node). Each tp group holds
    one copy of the model, tensor parallel over its ranks (model.tensor_parallel), and every rank
    of it generates the same tokens; the data is split across the dp groups. tp = 1: no mesh,
    every process is its own dp group."""
    rank, world, _ = dist_setup()
    if world % tp:
        raise UserError(f"tp={tp} must divide the number of processes ({world}; torchrun "
                        "--nproc_per_node sets it)")
    if tp == 1:
        return rank, world, None
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(torch.device(device).type, (world // tp, tp),
                            mesh_dim_names=("dp", "tp"))
    return mesh.get_local_rank("dp"), world // tp, mesh["tp"]


def all_reduce(t, world, op="SUM"):
    """The tensor t reduced (in place) over all ranks."""
    if world > 1:
        dist.all_reduce(t, getattr(dist.ReduceOp, op))
    return t


def gather(obj, world, group=None):
    """Every rank's obj, on every rank (of `group`, of `world` ranks; None: all)."""
    out = [obj] * world
    if world > 1:
        dist.all_gather_object(out, obj, group=group)
    return out


def recompute_blocks(model):
    """Activation checkpointing, in place: each block of model.layers recomputes its forward in the
    backward instead of keeping its activations (less memory for long rows, one more forward)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def grad_sync(model, on):
    """The context of one backward: gradients reduced across ranks (on), or kept on this rank for a
    later backward to reduce (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext() if on or is_sharded(model) else model.no_sync()


def fsdp_shard(model, dtype=torch.float32, offload=False, store=None):
    """FSDP2 (torch's fully_shard) over all ranks, in place: each block of model.layers its own
    group (gathered for its forward and its backward, then freed), then the root (embeddings, final
    norm, output). Parameters become DTensors sharded on dim 0; build the optimizer after.
    dtype bfloat16: FSDP2's mixed precision instead of autocast (training_context): each group is
    gathered in bf16 and computes in it, gradients are reduced in fp32 into the fp32 shards, and no
    bf16 copy outlives its group. offload: the shards, their gradients and AdamW's state live in
    host memory (a group's shard is copied to the GPU for its gather; AdamW steps on the CPU).
    store: the shards' dtype (None: the weights' own), each group cast just before it is sharded:
    a checkpoint memory-mapped in another dtype (bf16 weights trained in fp32, an fp32 policy as a
    bf16 reference) is copied one group at a time, never whole."""
    from torch.distributed import fsdp  # only here: the import costs seconds
    kw = {}
    if dtype != torch.float32:
        # the blocks' float inputs stay as given: the rotary tables fp32, the residual bf16
        kw["mp_policy"] = fsdp.MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    if offload:
        kw["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=torch.cuda.is_available())

    def shard(module, params):
        if store is not None:
            for p in params:
                p.data = p.data.to(store)  # in place: a tied matrix stays one parameter
        fsdp.fully_shard(module, **kw)
    for block in model.layers:
        shard(block, block.parameters())
    shard(model, [p for n, p in model.named_parameters() if not n.startswith("layers.")])
    return model


def training_context(model, device, dtype):
    """The context of a training forward: bf16 autocast over fp32 master weights, or nothing where
    FSDP2's mixed precision casts (fsdp_shard with dtype) or the weights are fp32 already."""
    return contextlib.nullcontext() if is_sharded(model) else autocast(device, dtype)


def is_sharded(model):
    """Whether model is FSDP2-sharded (without importing FSDP: every stage imports this file)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


# ----------------------------------------------------------------------------- training

def get_lr(step, max_steps, lr, warmup_steps, min_lr_frac):
    """Linear warm-up over warmup_steps, then cosine decay from lr to lr*min_lr_frac at
    max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW; weight decay on >=2-D params (matrices, embeddings) only, not on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel per step, not many
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# ----------------------------------------------------------------------------- trace phrases

# The paper's self-reflection phrases, which linearize.py writes and tasks.count_reflections counts.
REFLECT = "But wait, are we solving the problem correctly so far? Hmm..."
NOT_SURE = "I'm not sure if we're solving the problem correctly so far."
GO_BACK = "Let's go back to where we"  # + " <restated step>."
RESTART = "Let's restart our solution from the beginning."
SEEMS_RIGHT = "Our solution seems to be correct so far."
