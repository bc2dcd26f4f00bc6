"""
runs/report.py — the main job's last step: the paper's table in miniature, computed from the stage
outputs.

    python runs/report.py --out=out              # out/eval/*/summary.json, out/search,
                                                 # out/linearize -> out/report.md
    python runs/report.py --out=out --split=val  # out/eval_val/*/summary.json -> out/report_val.md
                                                 # (for tuning)

Every number comes from a file the stages wrote; nothing is typed in.
"""
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import tasks  # noqa: E402
from eval import accepts, bootstrap_ci, majority_correct, problem_accuracy  # noqa: E402

MODELS = [("base", "Base policy (warm-up SFT, no search)"), ("sft_direct", "Direct-SFT"),
          ("sft_astro", "ASTRO-SFT"), ("rl_direct", "Direct-RL"), ("rl_astro", "ASTRO-RL")]
NAMES = dict(MODELS)
# The paper's claims: each pair ordered (b beats a), and by how much, per level.
CLAIMS = [("base", "sft_direct"), ("sft_direct", "sft_astro"), ("rl_direct", "rl_astro"),
          ("sft_astro", "rl_astro"), ("sft_direct", "rl_direct")]
# ASTRO against its Direct control at equal generated tokens.
MATCHED = [("sft_direct", "sft_astro"), ("rl_direct", "rl_astro")]
# The gains compared between the easiest and the hardest level.
GAPS = [("base", "rl_astro"), ("base", "sft_astro"), ("sft_direct", "sft_astro"),
        ("rl_direct", "rl_astro")]


@dataclass
class Config:
    out: str = "out"      # the main job's output root
    split: str = "test"   # which eval: test reads <out>/eval, any other split <out>/eval_<split>
    report: str = ""      # "" = <out>/report.md (test) or <out>/report_<split>.md


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def level_gap(acc_a, acc_b, easy, hard, resamples=1000, seed=0):
    """95% intervals of (hard level's gain - easy level's gain) of b over a, in points and relative
    to a's accuracy on each level: problems resampled within each level (the levels are fixed
    halves of the benchmark)."""
    rng = np.random.default_rng(seed)
    means = []
    for ids in (easy, hard):
        a, b = np.array([acc_a[i] for i in ids]), np.array([acc_b[i] for i in ids])
        idx = rng.integers(0, len(ids), (resamples, len(ids)))
        means.append((a[idx].mean(1), b[idx].mean(1)))
    (ae, be), (ah, bh) = means
    with np.errstate(divide="ignore", invalid="ignore"):
        # a resample where a solves nothing on a level has no relative gain
        rel = (bh / ah) - (be / ae)
    pts = np.percentile((bh - ah) - (be - ae), [2.5, 97.5])
    rel = np.percentile(rel, [2.5, 97.5]) if np.isfinite(rel).all() else None
    return pts, rel


# ----------------------------------------------------------------------------- sections

def results_table(cfg, rows, levels):
    """The title, the setting and one row per model: accuracies, lengths, backtracks."""
    s0 = rows[0][2]
    sizes = ", ".join(f"{s0['problems_by_level'][lv]} with {lv} numbers" for lv in levels)
    lines = ["# nanoastro: ASTRO in miniature on Countdown", "",
             f"Held-out {cfg.split} problems: {s0['problems']} "
             f"({sizes}); "
             f"{s0['samples_per_problem']:.0f} samples per problem. "
             f"pass@1 = mean accuracy over the samples "
             f"(95% interval: {s0['ci_method']}); maj@k = majority vote over those samples; "
             f"greedy = temperature 0.",
             "", "| model | pass@1 (95% CI) | maj@k | greedy | "
             + " | ".join(f"pass@1, {lv} numbers" for lv in levels)
             + " | tokens/response | backtracks/response | r(backtracks, correct) |",
             "|---|---|---|---|" + "---|" * len(levels) + "---|---|---|"]
    for key, name, s in rows:
        lo, hi = s["pass@1_ci95"]
        corr = s["pearson_backtracks_correct"]
        lines.append(f"| {name} | {pct(s['pass@1'])} ({pct(lo)}–{pct(hi)}) | {pct(s['maj@k'])} | "
                     f"{pct(s['greedy_acc'])} | "
                     + " | ".join(pct(s["pass@1_by_level"].get(lv)) for lv in levels)
                     + f" | {s['mean_tokens']:.1f} | {s['backtracks_per_response']:.2f} | "
                     + ("–" if corr is None else f"{corr:+.2f}") + " |")
    lines += ["", "Accuracies in %. Truncated responses (hit the token budget; graded as no "
              "answer, in brackets those with an earlier box): "
              + ", ".join(f"{name} {pct(s['truncated'])}% ({pct(s.get('truncated_with_box'))}%)"
                          for _, name, s in rows) + "."]
    return lines


def ordering_table(pairs, got, acc, levels):
    """The paper's claims, checked on these numbers. Two intervals can overlap while the gain is
    clear: both models answer the same problems, so the paired interval (bootstrap over problems of
    the per-problem difference) is the sharper test of "b beats a"."""
    if not pairs:
        return []
    lines = ["", "## The paper's ordering on these problems", "",
             "| claim | pass@1 gain (points) | paired 95% CI of the gain | intervals disjoint | "
             + " | ".join(f"gain, {lv} numbers" for lv in levels) + " |",
             "|---|---|---|---|" + "---|" * len(levels)]
    for a, b in pairs:
        sa, sb = got[a], got[b]
        disjoint = sb["pass@1_ci95"][0] > sa["pass@1_ci95"][1]
        paired = "–"  # the two evals must cover the same problems
        if acc[a] and acc[a].keys() == acc[b].keys():
            lo, hi = bootstrap_ci([acc[b][i] - acc[a][i] for i in sorted(acc[a])])
            paired = f"{100 * lo:+.1f} to {100 * hi:+.1f}"
        gains = [sb["pass@1_by_level"].get(lv, 0) - sa["pass@1_by_level"].get(lv, 0)
                 for lv in levels]
        lines.append(f"| {NAMES[a]} < {NAMES[b]} | {100 * (sb['pass@1'] - sa['pass@1']):+.1f} | "
                     f"{paired} | {'yes' if disjoint else 'no'} | "
                     + " | ".join(f"{100 * g:+.1f}" for g in gains) + " |")
    return lines


def verification_table(rows):
    """The mechanism: after each answer line a model stops (accepts it) or goes on (rejects it);
    eval.verification scores that decision against the grader."""
    pc = lambda v: "–" if v is None else f"{100 * v:.1f}"
    lines = ["", "## Self-verification: the decision after each answer line, against the grader",
             "", "Stopping after an answer accepts it; reflecting (or writing on) rejects it. A "
             "response cut off by the budget makes no decision on its last answer. On Countdown "
             "the policy writes each verdict itself (the tool writes the box's value only), "
             "unless eval.py ran with --oracle=True, the ablation where the tool writes the "
             "grader's verdict: then these rates measure how well a model follows it.",
             "", "| model | answer lines | false accept (95% CI) | false reject (95% CI) | "
             "balanced accuracy (95% CI) | wrong first answers caught | of those, fixed |",
             "|---|---|---|---|---|---|---|"]
    for _, name, s in rows:
        v = s.get("verification")
        if not v:
            lines.append(f"| {name} | – | – | – | – | – | – |")
            continue
        cell = lambda k: pc(v[k]) + (f" ({pc(ci[0])}–{pc(ci[1])})" if (ci := v.get(k + "_ci95"))
                                     else "")
        lines.append(f"| {name} | {v['answer_lines']} | {cell('false_accept')} | "
                     f"{cell('false_reject')} | {cell('balanced')} | {pc(v['caught'])} | "
                     f"{pc(v['fixed'])} |")
    return lines + ["", "Rates in %."]


def resampling(recs, by_id, cap):
    """Per problem, from one model's first `cap` samples in sample order: self-verified
    resampling (the first sample the model accepts, else the last) -> (correct, tokens drawn up to
    it); maj@cap; and pass@cap with the tokens drawn up to the first correct sample (this one uses
    the grader)."""
    out = []
    for i in sorted(by_id):
        ps = by_id[i][:cap]
        stop = next((j for j, p in enumerate(ps) if accepts(recs[i], p)), len(ps) - 1)
        hit = next((j for j, p in enumerate(ps) if p["correct"]), len(ps) - 1)
        tokens = lambda j: sum(p["tokens"] for p in ps[:j + 1])
        out.append((ps[stop]["correct"], tokens(stop), majority_correct(recs[i], ps),
                    ps[hit]["correct"], tokens(hit)))
    return np.array(out, dtype=float)


def matched(got, preds, recs, d, a):
    """ASTRO (a) against Direct's (d) self-verified resampling, per attempt cap c: the rows of
    resampling() per c and, at the largest c whose mean tokens fit a's, the paired difference.
    None when the two did not run on the same problems."""
    by_id = defaultdict(list)
    for p in sorted(preds[d], key=lambda p: p["sample"]):
        if p["sample"] >= 0 and p["id"] in recs:
            by_id[p["id"]].append(p)
    astro = problem_accuracy(preds[a])
    if not by_id or by_id.keys() != astro.keys():
        return None
    budget = got[a]["mean_tokens"]
    rows = [resampling(recs, by_id, c) for c in range(1, min(map(len, by_id.values())) + 1)]
    out = dict(rows=rows, budget=budget, need=int(np.ceil(2 * budget / got[d]["mean_tokens"])),
               cap=None)
    fits = [c for c, r in enumerate(rows, 1) if r[:, 1].mean() <= budget]
    if fits:
        c = fits[-1]
        diff = [astro[i] - x for i, x in zip(sorted(by_id), rows[c - 1][:, 0])]
        out.update(cap=c, diff=float(np.mean(diff)), ci95=[float(x) for x in bootstrap_ci(diff)],
                   svr=float(rows[c - 1][:, 0].mean()), svr_tokens=float(rows[c - 1][:, 1].mean()),
                   maj=float(rows[c - 1][:, 2].mean()))
    return out


def matched_table(got, m):
    """The matched-compute comparison of each (Direct, ASTRO) pair in m: (d, a) -> matched()."""
    lines = []
    for (d, a), r in m.items():
        budget, k = r["budget"], len(r["rows"])
        lines += ["", f"## {NAMES[a]} against {NAMES[d]}'s self-verified resampling, at equal "
                  "tokens", "", f"{NAMES[d]} draws up to c samples per problem and stops at the "
                  f"first it accepts itself (else keeps the last). {NAMES[a]}: pass@1 "
                  f"{pct(got[a]['pass@1'])} at {budget:.1f} tokens per problem. {k} samples per "
                  f"problem drawn, {r['need']} needed to reach twice {NAMES[a]}'s tokens"
                  + ("" if k >= r["need"] else " (too few: the caps stop short)") + ".", "",
                  "| cap c | self-verified resampling | its tokens/problem | maj@c | "
                  "pass@c (uses the grader) | its tokens/problem |", "|---|---|---|---|---|---|"]
        for c, rows in enumerate(r["rows"], 1):
            x = rows.mean(0)
            lines.append(f"| {c} | {pct(x[0])} | {x[1]:.1f} | {pct(x[2])} | {pct(x[3])} | "
                         f"{x[4]:.1f} |")
        if r["cap"] is None:
            lines += ["", f"Even one {NAMES[d]} sample costs more tokens than {NAMES[a]}."]
            continue
        c, (lo, hi) = r["cap"], r["ci95"]
        bal = lambda key: pct((got[key].get("verification") or {}).get("balanced"))
        lines += ["", f"At equal tokens (c = {c}, the largest cap within {NAMES[a]}'s tokens): "
                  f"{NAMES[a]} − self-verified resampling = {100 * r['diff']:+.1f} points "
                  f"(paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}, bootstrap over problems); "
                  f"{NAMES[d]} pass@1 {pct(got[d]['pass@1'])}, maj@{c} {pct(r['maj'])}; "
                  f"balanced verification accuracy {NAMES[a]} {bal(a)}, {NAMES[d]} {bal(d)}."]
    return lines


def gains_table(cfg, gaps, acc, levels):
    """Where the gains are. The paper's grow with difficulty: base -> ASTRO-RL is 65.8 -> 81.8 on
    MATH-500 but 10.0 -> 30.0 (3x) on AIME 2024. Here: each gain on the easiest and the hardest
    level, in points and relative to the first model's accuracy there, and whether the hardest
    level's gain is the larger."""
    problems_path = os.path.join(cfg.out, "data", f"{cfg.split}.jsonl")
    if not gaps or len(levels) <= 1:
        return []
    lines = ["", "## Where the gains are: the easiest and the hardest level", ""]
    if not os.path.exists(problems_path):
        return lines + [f"(not computed: {problems_path}, which gives each problem's level, "
                        "is missing)"]
    level = {r["id"]: str(r.get("level"))
             for r in common.read_jsonl(problems_path, required=("id",))}
    easy, hard = levels[0], levels[-1]
    lines += ["Gain in points (and relative to the first model's accuracy on the level). "
              "Hardest − easiest: the difference of the two levels' gains, in points and in "
              "percentage points of relative gain, with a 95% interval from a bootstrap over "
              f"problems within each level (levels from {problems_path}).", "",
              f"| from → to | gain, {easy} numbers | gain, {hard} numbers "
              "| hardest − easiest, points | hardest − easiest, relative |",
              "|---|---|---|---|---|"]
    for a, b in gaps:
        ids = {lv: [i for i in sorted(acc[a]) if level.get(i) == lv] for lv in (easy, hard)}
        if acc[a].keys() != acc[b].keys() or not all(ids.values()):
            lines.append(f"| {NAMES[a]} → {NAMES[b]} | – | – | – | – |")  # not the same problems
            continue
        lines.append(gain_row(a, b, acc, ids, easy, hard))
    return lines


def gain_row(a, b, acc, ids, easy, hard):
    """A row of gains_table: b over a on the easiest and the hardest level, and the difference."""
    m = {lv: [np.mean([acc[k][i] for i in ids[lv]]) for k in (a, b)] for lv in (easy, hard)}
    gain = {lv: m[lv][1] - m[lv][0] for lv in m}
    rel = {lv: m[lv][1] / m[lv][0] - 1 if m[lv][0] else None for lv in m}
    cells = [f"{100 * gain[lv]:+.1f} ({'–' if rel[lv] is None else f'{rel[lv]:+.0%}'})" for lv in m]
    pts, rel_ci = level_gap(acc[a], acc[b], ids[easy], ids[hard])
    rel_cell = "–"
    if rel_ci is not None and None not in rel.values():
        lo, hi = (round(100 * x) for x in rel_ci)
        rel_cell = f"{round(100 * (rel[hard] - rel[easy])):+d} ({lo:+d} to {hi:+d})"
    pts_cell = (f"{100 * (gain[hard] - gain[easy]):+.1f} "
                f"({100 * pts[0]:+.1f} to {100 * pts[1]:+.1f})")
    return f"| {NAMES[a]} → {NAMES[b]} | {cells[0]} | {cells[1]} | {pts_cell} | {rel_cell} |"


def stats_tables(cfg):
    """The scalar statistics of the search and of each linearization."""
    lines = []
    search = load(os.path.join(cfg.out, "search", "stats.json"))
    if search:
        lines += ["", "## Search (MCTS with the base policy on training problems)", "",
                  "| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in search.items() if not isinstance(v, (dict, list))]
    for mode in ("astro", "direct"):
        st = load(os.path.join(cfg.out, "linearize", f"{mode}.stats.json"))
        if st:
            lines += ["", f"## Linearized {mode} traces", "", "| statistic | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in st.items() if not isinstance(v, (dict, list))]
    return lines


def example(cfg, evals):
    """One example: a test response of the ASTRO model that backtracked, else a training trace with
    a backtrack."""
    for key in ("rl_astro", "sft_astro"):
        path = os.path.join(cfg.out, evals, key, "predictions.jsonl")
        if os.path.exists(path):
            for p in common.resume_jsonl(path):
                if p.get("backtracks", 0) > 0 and p.get("correct"):
                    where = f"a correct {cfg.split} response of {key} with a backtrack ({p['id']})"
                    return ["", f"## Example: {where}", "", "```", p["response"].strip(), "```"]
    path = os.path.join(cfg.out, "linearize", "astro.jsonl")
    if os.path.exists(path):
        for r in common.resume_jsonl(path):
            if r.get("meta", {}).get("backtracks", 0) > 0:
                text, where = r["messages"][-1]["content"], f"an ASTRO training trace ({r['id']})"
                return ["", f"## Example: {where}", "", "```", text.strip(), "```"]
    return []


def numbers(cfg, rows, acc, m):
    """The report's headline numbers as JSON (report.json beside report.md): what
    runs/readme_table.py gathers across seeds."""
    s0 = rows[0][2]
    models = {key: dict(name=name, pass1=s["pass@1"], ci95=s["pass@1_ci95"],
                        by_level=s["pass@1_by_level"], tokens=s["mean_tokens"],
                        truncated=s["truncated"],
                        balanced=(s.get("verification") or {}).get("balanced"))
              for key, name, s in rows}
    keep = ("cap", "diff", "ci95", "svr", "svr_tokens", "budget")
    claims = {f"{a}<{b}": dict(gain=models[b]["pass1"] - models[a]["pass1"], ci95=[
        float(x) for x in bootstrap_ci([acc[b][i] - acc[a][i] for i in sorted(acc[a])])])
        for a, b in CLAIMS if a in acc and b in acc and acc[a] and acc[a].keys() == acc[b].keys()}
    return dict(split=cfg.split, problems=s0["problems"],
                problems_by_level=s0["problems_by_level"],
                samples=s0["samples_per_problem"], models=models, claims=claims,
                matched={a: dict(direct=d, **{k: r[k] for k in keep if k in r})
                         for (d, a), r in m.items()})


def targets(r):
    """The research targets, each (what, True / False) in one run, from report.json's numbers r
    (point estimates; the paired intervals are in the tables above them)."""
    m, c, t = r["models"], r["claims"], r["matched"].get("sft_astro", {})
    bal = {k: m[k]["balanced"] for k in m}
    return [("ASTRO-SFT > Direct-SFT's self-verified resampling at equal tokens",
             t.get("diff") is not None and t["diff"] > 0),
            ("ASTRO-RL > ASTRO-SFT", c.get("sft_astro<rl_astro", {}).get("gain", -1) > 0),
            ("Direct-RL > Direct-SFT", c.get("sft_direct<rl_direct", {}).get("gain", -1) > 0),
            ("ASTRO's balanced verification ≥ the base's (SFT and RL)",
             None not in (bal.get("base"), bal.get("sft_astro"), bal.get("rl_astro"))
             and min(bal["sft_astro"], bal["rl_astro"]) >= bal["base"]),
            ("ASTRO's balanced verification rises through RL",
             None not in (bal.get("sft_astro"), bal.get("rl_astro"))
             and bal["rl_astro"] > bal["sft_astro"]),
            ("every model truncated ≤ 10%", all(x["truncated"] <= 0.10 for x in m.values()))]


def targets_table(r):
    """report.md's list of the research targets: which hold in this run."""
    return ["", "## Research targets (this run)", "", "| target | |", "|---|---|"] + [
        f"| {what} | {'holds' if ok else '**no**'} |" for what, ok in targets(r)]


# ----------------------------------------------------------------------------- main

def times_table(cfg):
    """Each stage's wall time, from the main job's <out>/times.txt (written as the stages end, so
    the report's own seconds and the whole job's come after this table is made)."""
    path = os.path.join(cfg.out, "times.txt")
    if not os.path.isfile(path):
        return []
    rows = [ln.strip().split("  ", 1) for ln in open(path, encoding="utf-8") if ln.strip()]
    rows = [(t.strip(), name.strip()) for t, name in rows if t.strip().endswith(" s")]
    if not rows:
        return []
    total = sum(int(t[:-2]) for t, name in rows if name != "whole job")
    if all(name != "whole job" for _, name in rows):
        rows.append((f"{total} s", "stages so far"))
    return ["", "## Stage times (this machine; judge every speed change by these)", "",
            "| wall time | stage |", "|---|---|"] + [f"| {t} | {name} |" for t, name in rows]


def main(cfg):
    evals = "eval" if cfg.split == "test" else f"eval_{cfg.split}"
    rows = [(key, name, load(os.path.join(cfg.out, evals, key, "summary.json")))
            for key, name in MODELS]
    rows = [r for r in rows if r[2]]
    if not rows:
        raise common.UserError(
            f"no {cfg.out}/{evals}/*/summary.json found: run the eval stage first")
    levels = sorted({lv for _, _, s in rows for lv in s["pass@1_by_level"]}, key=int)
    lines = results_table(cfg, rows, levels)

    got = {key: s for key, _, s in rows}
    pairs = [(a, b) for a, b in CLAIMS if a in got and b in got]
    gaps = [(a, b) for a, b in GAPS if a in got and b in got]
    # each model's predictions, loaded once for all tables
    preds = {key: common.resume_jsonl(os.path.join(cfg.out, evals, key, "predictions.jsonl"))
             for key in got}
    acc = {key: problem_accuracy(preds[key]) for key in got}
    lines += ordering_table(pairs, got, acc, levels)
    lines += verification_table(rows)
    problems_path = os.path.join(cfg.out, "data", f"{cfg.split}.jsonl")
    m = {}
    if os.path.exists(problems_path):
        recs = {r["id"]: r for r in tasks.read_problems(problems_path)}
        m = {(d, a): matched(got, preds, recs, d, a) for d, a in MATCHED if d in got and a in got}
        m = {k: r for k, r in m.items() if r is not None}
        lines += matched_table(got, m)
    summary = numbers(cfg, rows, acc, m)
    lines += targets_table(summary)
    lines += gains_table(cfg, gaps, acc, levels)
    lines += stats_tables(cfg)
    lines += example(cfg, evals)
    lines += times_table(cfg)

    text = "\n".join(lines) + "\n"
    path = cfg.report or os.path.join(
        cfg.out, "report.md" if cfg.split == "test" else f"report_{cfg.split}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    common.write_json(path[:-len(".md")] + ".json", summary)
    print(text)


if __name__ == "__main__":
    common.run_main(main, Config)
