"""
runs/readme_table.py — put the main job's results table into README.md, from out/report.md.

    python runs/readme_table.py --out=out            # after bash runs/countdown.sh
    python runs/readme_table.py --out=out --check=True   # only say whether README.md is up to date

Copies five columns of report.md's first table (one row per model) between README.md's
`<!-- results -->` and `<!-- /results -->` lines, with the report's header line and the machine the
job ran on (this machine: run it where the job ran). Numbers differ between CPUs (floating-point
order), so the table always names its machine.
"""
import os
import platform
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

COLUMNS = ("model", "pass@1 (95% CI)", "pass@1, 3 numbers", "pass@1, 4 numbers", "tokens/response")
BEGIN, END = "<!-- results -->", "<!-- /results -->"


@dataclass
class Config:
    out: str = "out"            # the main job's output directory (reads <out>/report.md)
    readme: str = "README.md"   # the file to update
    check: bool = False         # only compare; exit 1 if README.md's table differs


def first_table(path):
    """(header cells, rows of cells) of the first markdown table in `path`."""
    if not os.path.isfile(path):
        raise common.UserError(f"{path}: file not found (run bash runs/countdown.sh first)")
    lines = [ln.strip() for ln in open(path, encoding="utf-8")]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        raise common.UserError(f"{path}: no table")
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append([c.strip() for c in ln.strip("|").split("|")])
    return table[0], table[2:]


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch
    return f"{os.cpu_count()} cores, {cpu or 'unknown CPU'}, torch {torch.__version__}"


def block(report):
    header, rows = first_table(report)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise common.UserError(f"{report}: the first table has no column {missing[0]!r}")
    cols = [header.index(c) for c in COLUMNS]
    about = next(ln.strip() for ln in open(report, encoding="utf-8") if ln.startswith("Held-out"))
    about = re.sub(r" pass@1 = .*", "", about)
    out = [BEGIN, f"{about} pass@1 in %, 95% bootstrap interval over problems.",
           f"Machine: {machine()}.", "", "| " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(r[i] for i in cols) + " |" for r in rows]
    return "\n".join(out + [END])


def main(cfg):
    text = open(cfg.readme, encoding="utf-8").read()
    if BEGIN not in text or END not in text:
        raise common.UserError(f"{cfg.readme}: no {BEGIN} ... {END} lines to fill")
    new = text[: text.index(BEGIN)] + block(os.path.join(cfg.out, "report.md")) \
        + text[text.index(END) + len(END):]
    if cfg.check:
        print("up to date" if new == text else f"{cfg.readme} differs from {cfg.out}/report.md")
        sys.exit(0 if new == text else 1)
    with open(cfg.readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(cfg.readme + ".tmp", cfg.readme)
    print(f"{cfg.readme}: results table from {cfg.out}/report.md")


if __name__ == "__main__":
    common.run_main(main, Config)
