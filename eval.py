"""
eval.py — the evaluation of a checkpoint on a problem file: sampled answers, graded, and metrics.

    python eval.py                                      # out/rl_astro on data/countdown/test.jsonl
    python eval.py --init=out/sft_astro --num_samples=8 --greedy=True  # + one greedy answer each
    python eval.py --init=out/base --temperature=0      # greedy decoding only
    python eval.py --init=/models/Llama-3.1-8B-Instruct --data=data/math/math500.jsonl \\
        --num_samples=16 --max_new_tokens=4096 --device=cuda --dtype=bfloat16
    torchrun --standalone --nproc_per_node=8 eval.py --tp=2 ...   # 4 copies of TP over 2 GPUs

Output: out/eval/<init name>-<data name>/ (or --out_dir): predictions.jsonl (every sample: id,
sample index (-1 = the extra greedy one), response, pred, correct, tokens, backtracks, reflections,
stopped), appended as problems finish, so a killed eval resumes and skips finished problems;
summary.json (atomic); a printed table. Prompts, tools and graders are the tasks package's
(tasks/__init__.py). Under torchrun the ranks form tp groups of --tp consecutive ranks, each one
copy of the model, tensor parallel (model.tensor_parallel); the groups take consecutive chunks of
problems, every rank of a group samples the same tokens (the chunk's seed, the same logits), and
rank 0 writes each round of chunks in problem order: the file a single process writes.

Metrics: pass@1 = mean over problems of the share of correct samples, with a 95%
percentile-bootstrap interval over problems (problems are what varies between benchmark draws; 1000
resamples, fixed seed); maj@k = majority vote over the k = num_samples answers (votes keyed by
tasks.answer_key); per-level pass@1; mean response length in generated tokens (stop token
included); backtracks and self-reflections per response (tasks.count_reflections); the share of
truncated responses (no stop token; graded as no answer, whatever boxes they hold) and of those
with a box; Pearson r between a sample's backtracks and its correctness.
"""
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

import common
import generate
import checkpoint
import tasks


@dataclass
class Config:
    init: str = "out/rl_astro"       # checkpoint dir (ours, Meta or Hugging Face)
    data: str = "data/countdown/test.jsonl"  # problems (JSONL; README.md, "JSONL schemas")
    out_dir: str = ""                # "" = out/eval/<init name>-<data name>
    limit: int = 0                   # evaluate only the first `limit` problems (0 = all)
    num_samples: int = 4             # sampled answers per problem (n of pass@1 and k of maj@k)
    temperature: float = 1.0         # 0 = greedy decoding, one answer per problem
    top_p: float = 1.0               # nucleus sampling (1.0 = off)
    top_k: int = 0                   # top-k sampling (0 = off)
    greedy: bool = False             # also decode one greedy answer per problem (greedy accuracy)
    max_new_tokens: int = 512        # generation budget; responses that hit it count as truncated
    chunk: int = 64                  # problems per generate() call; predictions written per chunk
    batch_size: int = 256            # sequences decoded at once inside generate()
    seed: int = 0                    # sampling seed (chunk i uses seed + its first problem's index)
    device: str = ""                 # "" = cuda if available else cpu
    dtype: str = "float32"           # float32 | bfloat16 | float16
    compile: bool = False            # torch.compile the decode step
    oracle: bool = False             # ablation: Countdown's tool also writes the grader's verdict
                                     # on the answer line (the policy then only follows it)
    tp: int = 1                      # tensor parallel degree under torchrun: ranks per copy of
                                     # the model (a node's GPUs); the other ranks data parallel

    ranges = dict(limit=(0, None), num_samples=(1, None), temperature=(0.0, None), top_p=(0.0, 1.0),
                  top_k=(0, None), max_new_tokens=(1, None), chunk=(1, None), batch_size=(1, None),
                  tp=(1, None))


# ----------------------------------------------------------------------------- metrics

def bootstrap_ci(values, resamples=1000, seed=0):
    """95% percentile-bootstrap interval of the mean of `values`, one per problem (problems are what
    varies between benchmark draws). Fixed seed: the same predictions give the same interval."""
    v = np.asarray(values, dtype=float)
    boot = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def problem_accuracy(preds):
    """{problem id: share of its sampled answers (sample >= 0, not the greedy one) that are
    correct}."""
    by_id = defaultdict(list)
    for p in preds:
        if p["sample"] >= 0:
            by_id[p["id"]].append(p["correct"])
    return {i: float(np.mean(v)) for i, v in by_id.items()}


def verification(preds, problems, resamples=1000, seed=0):
    """How well the policy judges its own answers (tasks.decisions on every sampled response).
    false_accept = wrong answer lines it stops on / wrong answer lines; false_reject = right ones it
    goes on from / right ones; balanced = 1 - (false_accept + false_reject) / 2; each with a 95%
    bootstrap interval over problems; caught = wrong first answers it goes on from / wrong first
    answers; fixed = of those, the responses that end correct. None where a rate has no cases."""
    recs = {r["id"]: r for r in problems}
    # per problem: wrong lines, accepted wrong, right lines, rejected right, wrong first answers,
    # caught, caught and then fixed
    per = defaultdict(lambda: np.zeros(7))
    for p in preds:
        if p["sample"] < 0 or p["id"] not in recs:
            continue
        d = tasks.decisions(recs[p["id"]], p["response"], p["stopped"])
        c = per[p["id"]]
        for ok, accepted in d:
            c[:4] += (not ok, not ok and accepted, ok, ok and not accepted)
        if d and not d[0][0]:
            caught = not d[0][1]
            c[4:] += (1, caught, caught and p["correct"])
    if not per:
        return None
    counts = np.array([per[i] for i in sorted(per)])
    rate = lambda num, den: float(num / den) if den else None

    def balanced(c):
        fa, fr = rate(c[1], c[0]), rate(c[3], c[2])
        return None if fa is None or fr is None else 1 - (fa + fr) / 2

    rates = lambda c: (rate(c[1], c[0]), rate(c[3], c[2]), balanced(c))
    total = counts.sum(0)
    rng = np.random.default_rng(seed)
    boot = [rates(counts[rng.integers(0, len(counts), len(counts))].sum(0))
            for _ in range(resamples)]

    def ci(j):  # 95% interval of rate j over the resamples where it is defined
        got = [b[j] for b in boot if b[j] is not None]
        if rates(total)[j] is None or not got:
            return None
        return [float(np.percentile(got, 2.5)), float(np.percentile(got, 97.5))]

    return {"answer_lines": int(total[0] + total[2]), "false_accept": rate(total[1], total[0]),
            "false_accept_ci95": ci(0), "false_reject": rate(total[3], total[2]),
            "false_reject_ci95": ci(1), "balanced": balanced(total), "balanced_ci95": ci(2),
            "caught": rate(total[5], total[4]), "fixed": rate(total[6], total[5])}


def accepts(rec, p):
    """Does the policy accept the final answer of prediction p (it stopped, and its decision on
    its last answer line, tasks.decisions, is to accept)?"""
    d = tasks.decisions(rec, p["response"], p["stopped"]) if p["stopped"] else []
    return bool(d) and d[-1][1]


def majority_correct(rec, preds):
    """Is the majority answer of one problem's samples (votes keyed by tasks.answer_key) correct?"""
    votes = Counter(k for p in preds if (k := tasks.answer_key(rec, p["pred"])) is not None)
    win = votes.most_common(1)[0][0] if votes else None
    return any(p["correct"] for p in preds
               if win is not None and tasks.answer_key(rec, p["pred"]) == win)


def summarize(preds, problems):
    """The report: preds = prediction records (as in predictions.jsonl), problems = the problem
    records."""
    by_id, greedy = defaultdict(list), {}
    for p in sorted(preds, key=lambda p: p["sample"]):
        if p["sample"] < 0:
            greedy[p["id"]] = p
        else:
            by_id[p["id"]].append(p)
    probs = [r for r in problems if r["id"] in by_id]
    if not probs:
        return {"problems": 0}
    pa = problem_accuracy(preds)
    acc = np.array([pa[r["id"]] for r in probs])
    maj = [majority_correct(r, by_id[r["id"]]) for r in probs]
    samples = [p for r in probs for p in by_id[r["id"]]]
    levels = defaultdict(list)
    for r, a in zip(probs, acc):
        if "level" in r:
            levels[r["level"]].append(a)
    bt = np.array([p["backtracks"] for p in samples], float)
    ok = np.array([p["correct"] for p in samples], float)
    corr = float(np.corrcoef(bt, ok)[0, 1]) if bt.std() > 0 and ok.std() > 0 else None
    out = {
        "problems": len(probs), "samples": len(samples),
        "samples_per_problem": len(samples) / len(probs),
        "pass@1": float(acc.mean()), "pass@1_ci95": list(bootstrap_ci(acc)),
        "ci_method": "percentile bootstrap over problems, 1000 resamples",
        "maj@k": float(np.mean(maj)),
        "greedy_acc": float(np.mean([greedy[r["id"]]["correct"]
                                     for r in probs if r["id"] in greedy])) if greedy else None,
        "pass@1_by_level": {str(k): float(np.mean(v)) for k, v in sorted(levels.items())},
        "problems_by_level": {str(k): len(v) for k, v in sorted(levels.items())},
        "mean_tokens": float(np.mean([p["tokens"] for p in samples])),
        "backtracks_per_response": float(bt.mean()),
        "reflections_per_response": float(np.mean([p["reflections"] for p in samples])),
        "truncated": float(np.mean([not p["stopped"] for p in samples])),
        "truncated_with_box": float(np.mean([p.get("cut_box", False) for p in samples])),
        "no_answer": float(np.mean([p["pred"] is None for p in samples])),
        "pearson_backtracks_correct": corr,
    }
    return out


def print_summary(s, title):
    f = lambda v: "-" if v is None else f"{v:.4f}"
    lo, hi = s["pass@1_ci95"]
    rows = [("pass@1", f"{f(s['pass@1'])}  (95% CI {f(lo)}-{f(hi)}, {s['ci_method']})"),
            (f"maj@{s['samples_per_problem']:g}", f(s["maj@k"])),
            ("greedy accuracy", f(s["greedy_acc"]))]
    rows += [(f"pass@1 level {k}", f"{f(v)}  ({s['problems_by_level'][k]} problems)")
             for k, v in s["pass@1_by_level"].items()]
    rows += [(k.replace("_", " "), f(s[k]))
             for k in ("mean_tokens", "backtracks_per_response", "reflections_per_response",
                       "truncated", "truncated_with_box", "no_answer",
                       "pearson_backtracks_correct")]
    v = s.get("verification")
    if v and v["balanced"] is not None:
        rows.append(("self-verification", f"balanced {f(v['balanced'])}, false accept "
                     f"{f(v['false_accept'])}, false reject {f(v['false_reject'])}"))
    print(f"\n{title}: {s['problems']} problems, {s['samples']} samples")
    for k, v in rows:
        print(f"  {k:<28} {v}")


# ----------------------------------------------------------------------------- sampling

def write_predictions(cfg, todo, total, n, want, pred_path):
    """Sample the problems `todo` ([(index, record)]) chunk by chunk, grade every answer and append
    the predictions to pred_path: one write and fsync per chunk, not per sample. Under torchrun a
    round gives one chunk to each dp group; rank 0 gathers the round and writes it in order."""
    rank, world, local = common.dist_setup()
    device, dtype = common.device_and_dtype(cfg, local)
    dp_rank, dp, mesh = common.inference_mesh(cfg.tp, device)
    net, tok = checkpoint.load_model(cfg.init, device=device, dtype=dtype, mesh=mesh)
    net.eval()
    runs = ([(0, dict(num_samples=n, temperature=cfg.temperature, top_p=cfg.top_p,
                      top_k=cfg.top_k))]
            + ([(-1, dict(num_samples=1, temperature=0.0))] if -1 in want else []))
    with open(pred_path if rank == 0 else os.devnull, "a", encoding="utf-8") as f, \
            tqdm(total=total, initial=total - len(todo), desc="eval", unit="problem",
                 disable=rank != 0) as bar:
        for c in range(0, len(todo), cfg.chunk * dp):
            chunk = todo[c + dp_rank * cfg.chunk:c + (dp_rank + 1) * cfg.chunk]
            results = sample_chunk(cfg, net, tok, chunk, runs) if chunk else []
            lines = [json.dumps(prediction(tok, r, j, s), ensure_ascii=False)
                     for (_, r), res in zip(chunk, results) for j, s in res]
            every = common.gather(lines, world)  # rank r is rank r % tp of dp group r // tp
            if rank != 0:
                continue
            if any(got != every[r - r % cfg.tp] for r, got in enumerate(every)):
                raise RuntimeError("the ranks of a tp group sampled different answers")
            f.write("".join(line + "\n" for part in every[::cfg.tp] for line in part))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(todo[c:c + cfg.chunk * dp]))


def sample_chunk(cfg, net, tok, chunk, runs):
    """Per problem of `chunk`, its [(sample index, sample)]: the sampled answers 0..n-1 of the first
    run, then the greedy one (-1) when asked for. The seed is that of the chunk's first problem."""
    prompts = [tok.render_prompt(tasks.prompt_messages(r)) for _, r in chunk]
    results = [[] for _ in chunk]
    for first, kw in runs:
        outs = generate.generate(net, prompts, max_new_tokens=cfg.max_new_tokens,
                                 stop_ids=tok.stop_ids, seed=cfg.seed + chunk[0][0],
                                 batch_size=cfg.batch_size, compile=cfg.compile,
                                 tool=tasks.tool(chunk[0][1], tok, cfg.oracle), **kw)
        for res, samples in zip(results, outs):
            res.extend((first + j if first >= 0 else -1, s) for j, s in enumerate(samples))
    return results


def prediction(tok, rec, j, s):
    """The predictions.jsonl record of sample s (index j) of problem rec: its response, graded."""
    stop = tok.stop_ids
    ids = s.tokens[:-1] if s.stopped and s.tokens and s.tokens[-1] in stop else s.tokens
    text = tok.decode(ids)
    # a response cut off by the budget gives no answer: its last box may be one the model was
    # about to reject (cut_box counts those)
    pred, ok = tasks.grade(rec, text) if s.stopped else (None, False)
    bt, refl = tasks.count_reflections(text)
    return {"id": rec["id"], "sample": j, "response": text, "pred": pred, "correct": ok,
            "tokens": len(s.tokens), "backtracks": bt, "reflections": refl, "stopped": s.stopped,
            "cut_box": not s.stopped and tasks.extract_boxed(text) is not None}


# ----------------------------------------------------------------------------- main

def resume(settings, settings_path, pred_path, want):
    """The ids of the problems whose samples `want` are all in pred_path; the predictions of the
    others are dropped from it (a partly written problem is redone from scratch)."""
    common.write_json(settings_path, settings)
    done = common.resume_jsonl(pred_path)
    got = defaultdict(set)
    for p in done:
        got[p["id"]].add(p["sample"])
    finished = {i for i, s in got.items() if s >= want}
    if any(p["id"] not in finished for p in done):
        common.write_jsonl(pred_path, [p for p in done if p["id"] in finished])
    return finished


def main(cfg):
    """The summary on rank 0 (None on the other ranks under torchrun)."""
    rank, world, _ = common.dist_setup()
    problems = tasks.read_problems(cfg.data)[:cfg.limit or None]
    data_name = os.path.splitext(os.path.basename(cfg.data))[0]
    name = f"{os.path.basename(os.path.normpath(cfg.init))}-{data_name}"
    out_dir = cfg.out_dir or os.path.join("out", "eval", name)
    os.makedirs(out_dir, exist_ok=True)
    n = 1 if cfg.temperature == 0 else cfg.num_samples
    if n < 1:
        raise common.UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    want = set(range(n)) | ({-1} if cfg.greedy and cfg.temperature > 0 else set())

    # Resume: keep the problems whose samples are all written; a partly written problem is redone
    # from scratch. Predictions made with other settings or by other weights (a retrained
    # checkpoint) are never mixed in.
    keys = ("init", "data", "num_samples", "temperature", "top_p", "top_k", "greedy",
            "max_new_tokens", "seed", "oracle")
    settings = {k: getattr(cfg, k) for k in keys}
    files = os.scandir(cfg.init) if os.path.isdir(cfg.init) else []
    settings["weights"] = sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files
                                 if e.name.endswith((".pt", ".pth", ".safetensors")))
    settings_path = os.path.join(out_dir, "settings.json")
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    if os.path.exists(settings_path) and os.path.exists(pred_path):
        common.check_same_run(common.read_json(settings_path), settings, pred_path)
    # rank 0 keeps the files; the other ranks learn from it which problems are finished
    finished = [resume(settings, settings_path, pred_path, want) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(finished, src=0)
    todo = [(i, r) for i, r in enumerate(problems) if r["id"] not in finished[0]]

    if todo:
        write_predictions(cfg, todo, len(problems), n, want, pred_path)
    if rank != 0:
        return None

    preds = common.resume_jsonl(pred_path)
    summary = summarize(preds, problems)
    if not summary["problems"]:
        raise common.UserError(f"{cfg.data}: no problems to evaluate")
    summary["verification"] = verification(preds, problems)
    if cfg.temperature == 0:
        summary["greedy_acc"] = summary["pass@1"]  # the samples are the greedy answers
    summary["settings"] = settings
    common.write_json(os.path.join(out_dir, "summary.json"), summary)
    print_summary(summary, f"{cfg.init} on {cfg.data} -> {out_dir}")
    return summary


if __name__ == "__main__":
    common.run_main(main, Config)
