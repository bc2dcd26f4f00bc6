"""
runs/readme_table.py — put the main job's results into README.md: one table over one or more runs
(seeds), from each run's report.json (runs/report.py writes it beside report.md).

    python runs/readme_table.py --outs=out                       # after bash runs/countdown.sh
    python runs/readme_table.py --outs=out,out_seed2,out_seed3   # three seeds of the main job
    python runs/readme_table.py --outs=out --check=True   # only say whether README.md is up to date

Writes between README.md's `<!-- results -->` and `<!-- /results -->` lines: each model's pass@1,
balanced verification accuracy, truncation and tokens in every run; the matched-compute rows
(ASTRO against Direct's self-verified resampling at ASTRO's mean tokens, with the paired
interval); and which of the research targets hold in each run. Numbers differ between CPUs
(floating-point order), so the table names the machine it was made on: run it where the jobs ran.
"""
import json
import os
import platform
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import common  # noqa: E402
from report import targets  # noqa: E402  (report.md lists the same targets per run)

BEGIN, END = "<!-- results -->", "<!-- /results -->"
MATCHED = (("sft_astro", "sft_direct"), ("rl_astro", "rl_direct"))


@dataclass
class Config:
    outs: str = "out"           # the main job's output directories, comma-separated (one per seed)
    readme: str = "README.md"   # the file to update
    check: bool = False         # only compare; exit 1 if README.md's table differs


def load_runs(outs):
    """{out dir: report.json} for each run; all must cover the same problems."""
    runs = {}
    for out in [o.strip() for o in outs.split(",") if o.strip()]:
        path = os.path.join(out, "report.json")
        if not os.path.isfile(path):
            raise common.UserError(f"{path}: file not found (run bash runs/countdown.sh, or "
                                   f"python runs/report.py --out={out})")
        with open(path, encoding="utf-8") as f:
            runs[out] = json.load(f)
    if not runs:
        raise common.UserError("--outs names no directory")
    first = next(iter(runs.values()))
    for out, r in runs.items():
        if (r["split"], r["problems"]) != (first["split"], first["problems"]):
            raise common.UserError(f"{out}/report.json: {r['problems']} {r['split']} problems, "
                                   f"the first run has {first['problems']} {first['split']}")
    return runs


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch
    return f"{os.cpu_count()} cores, {cpu or 'unknown CPU'}, torch {torch.__version__}"


def cells(values, fmt):
    """One cell: each run's value, ' / '-separated; with several runs, their mean first."""
    vals = [v for v in values if v is not None]
    each = " / ".join("–" if v is None else fmt(v) for v in values)
    return each if len(values) == 1 or not vals else f"{fmt(sum(vals) / len(vals))} ({each})"


def block(runs):
    pct = lambda v: f"{100 * v:.1f}"
    first = next(iter(runs.values()))
    levels = ", ".join(f"{n} with {lv} numbers" for lv, n in first["problems_by_level"].items())
    out = [BEGIN, f"Held-out {first['split']} problems: {first['problems']} ({levels}); "
           f"{len(runs)} run{'s' if len(runs) > 1 else ''} of the main job ({', '.join(runs)}"
           f"{': SEED= changes training and sampling, not the problems' if len(runs) > 1 else ''}"
           "). Each cell: the mean over runs, then each run's value. Percentages; tokens per "
           "response generated (tool-written and stop tokens included).", "",
           f"Machine: {machine()}.", "",
           "| model | pass@1 | balanced verification | truncated | tokens/response |",
           "|---|---|---|---|---|"]
    for key, x in first["models"].items():
        col = lambda f: [r["models"].get(key, {}).get(f) for r in runs.values()]
        out.append(f"| {x['name']} | {cells(col('pass1'), pct)} | {cells(col('balanced'), pct)} "
                   f"| {cells(col('truncated'), pct)} | {cells(col('tokens'), '{:.0f}'.format)} |")
    for a, d in MATCHED:
        ms = [r["matched"].get(a, {}) for r in runs.values()]
        if not any("diff" in x for x in ms):
            continue
        name = lambda k: first["models"][k]["name"]
        svr = [x.get("svr") for x in ms]
        caps = " / ".join(str(x.get("cap", "–")) for x in ms)
        tokens = cells([x.get("svr_tokens") for x in ms], "{:.0f}".format)
        out.append(f"| {name(d)}, self-verified resampling at {name(a)}'s tokens (cap c = {caps}) "
                   f"| {cells(svr, pct)} | | | {tokens} |")
        diffs = " / ".join(f"{100 * x['diff']:+.1f} ({100 * x['ci95'][0]:+.1f} to "
                           f"{100 * x['ci95'][1]:+.1f})" if "diff" in x else "–" for x in ms)
        out.append(f"| {name(a)} − that, paired 95% CI | {diffs} | | | |")
    out += ["", "| research target | " + " | ".join(runs) + " |",
            "|---|" + "---|" * len(runs)]
    held = [targets(r) for r in runs.values()]
    for i, (what, _) in enumerate(held[0]):
        out.append(f"| {what} | " + " | ".join("holds" if h[i][1] else "**no**" for h in held)
                   + " |")
    return "\n".join(out + [END])


def main(cfg):
    text = open(cfg.readme, encoding="utf-8").read()
    if BEGIN not in text or END not in text:
        raise common.UserError(f"{cfg.readme}: no {BEGIN} ... {END} lines to fill")
    runs = load_runs(cfg.outs)
    new = text[: text.index(BEGIN)] + block(runs) + text[text.index(END) + len(END):]
    if cfg.check:
        print("up to date" if new == text else f"{cfg.readme} differs from the runs' report.json")
        sys.exit(0 if new == text else 1)
    with open(cfg.readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(cfg.readme + ".tmp", cfg.readme)
    print(f"{cfg.readme}: results of {', '.join(runs)}")


if __name__ == "__main__":
    common.run_main(main, Config)
