"""
The few helpers every stage shares: the config parser, JSONL reading with precise errors,
resumable JSONL output, atomic writes, device/DDP setup. Kept here so each stage stays a short,
linear script.

Config files and overrides (nanoGPT style, but parsed, never exec'd):
    python sft.py config/base_countdown.py --lr=3e-4 --max_steps=200
A config file is a Python file holding only `name = <literal>` lines (comments allowed).
Every key must be a field of the stage's Config dataclass and the value must have the field's type.
"""
import ast
import dataclasses
import json
import os
import sys

import torch


class UserError(Exception):
    """Bad input from the user (config, data file, checkpoint). Stages print it without a traceback."""


def run_main(main, cfg_class):
    """Entry point of every stage: parse sys.argv into a Config, run main, print UserErrors plainly."""
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
    raise UserError(f"{where}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")


def parse_config(cfg_class, argv):
    """Build cfg_class() and apply config files (positional *.py) then --key=value overrides in order."""
    fields = {f.name: f for f in dataclasses.fields(cfg_class)}
    cfg = cfg_class()
    updates = []  # (key, value, where)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file not found: {arg}")
            with open(arg) as f:
                src = f.read()
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
    return cfg


def config_dict(cfg):
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- JSONL

def read_jsonl(path, required=()):
    """All records of a JSONL file; a malformed line or a missing field is a UserError naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


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
            f.write(json.dumps({k: v for k, v in rec.items() if k != "_line"}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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


def dist_setup():
    """(rank, world_size, local_rank). Under torchrun, also joins the process group (nccl on GPU, gloo on CPU)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local
