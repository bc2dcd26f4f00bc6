"""
runs/fingerprint.py — hashes of a main job's artifacts: did a change leave the arithmetic alone?

    python runs/fingerprint.py --out=out > before.txt    # change the code, run the main job again
    python runs/fingerprint.py --out=out > after.txt && diff before.txt after.txt

Hashed: the state-dict tensors of every checkpoint (names, dtypes, shapes and bytes; not the pickled
file, whose bytes also hold the config), trees.jsonl, astro.jsonl, direct.jsonl, every
predictions.jsonl, and report.md without its rows of wall time and speed. Equal hashes are promised
on one machine only: another CPU may round differently.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

MODELS = ("base", "sft_direct", "sft_astro", "rl_direct", "rl_astro")


@dataclass
class Config:
    out: str = "out"  # the main job's output directory


def tensors_hash(path):
    """sha256 of a checkpoint's state dict: each tensor's name, dtype, shape and bytes, by name."""
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_hash(path, skip_line=lambda line: False):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for line in f:
            if not skip_line(line):
                h.update(line)
    return h.hexdigest()


def report_hash(path):
    """report.md's hash without its section of stage times, its rows of speed (they differ
    between any two runs) and its blank lines."""
    in_times = False

    def skip(line):
        nonlocal in_times
        if line.startswith(b"## "):
            in_times = line.startswith(b"## Stage times")
        return in_times or speed_row(line) or not line.strip()
    return file_hash(path, skip)


def speed_row(line):
    """A table row of wall time or speed (search's seconds, problems_per_s, ...)."""
    cells = line.decode("utf-8", "replace").split("|")
    first = cells[1].strip() if line.startswith(b"|") and len(cells) > 2 else ""
    return first == "seconds" or first.endswith("_per_s")


def main(cfg):
    rows = []
    for name in MODELS:
        path = os.path.join(cfg.out, name, "model.pt")
        rows.append((f"{name}/model.pt tensors", path, tensors_hash))
    for rel in ("search/trees.jsonl", "linearize/astro.jsonl", "linearize/direct.jsonl"):
        rows.append((rel, os.path.join(cfg.out, rel), file_hash))
    for evals in sorted(d for d in os.listdir(cfg.out) if d.startswith("eval")):
        for name in MODELS:
            rel = os.path.join(evals, name, "predictions.jsonl")
            rows.append((rel, os.path.join(cfg.out, rel), file_hash))
    reports = [f for f in os.listdir(cfg.out) if f.startswith("report") and f.endswith(".md")]
    for report in sorted(reports):
        rows.append((f"{report} without times", os.path.join(cfg.out, report), report_hash))
    for label, path, fn in rows:
        print(f"{fn(path) if os.path.exists(path) else 'missing':<64}  {label}")


if __name__ == "__main__":
    common.run_main(main, Config)
