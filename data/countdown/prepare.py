"""
data/countdown/prepare.py — the built-in task: Countdown problems, the warm-up SFT set and the task's tokenizer.

    python data/countdown/prepare.py                                   # -> data/countdown/, a few seconds
    python data/countdown/prepare.py --out_dir=/tmp/cd --train=500 --warmup=1000 --val=50 --test=50

Writes (deterministic: fixed seeds, stable ids such as "cd4-test-00012"):
  train.jsonl val.jsonl test.jsonl  problems {id, problem, answer=str(target), level, numbers, target, solutions,
                                    new_target}; level = count of numbers; solutions = how many of the operation
                                    sequences (over positions) reach the target: a difficulty measure
  warmup.jsonl                      SFT conversations (README.md, "JSONL schemas") for the base policy: one random
                                    valid solution path per problem, no backtracking; its problems are disjoint from
                                    every split, so search/RL on train.jsonl never meets a problem the base saw solved
  confirm.jsonl                     with --confirm=N only: N fresh problems per level, as test but with seen
                                    targets only (Config.confirm); confirm<r>.jsonl with --confirm_round=r > 1:
                                    the r-th such split, disjoint from the earlier ones
  tokenizer.model                   tiktoken ranks: 256 bytes + up to `merges` BPE merges (model.py's Tokenizer
                                    appends the 256 Llama 3 special tokens; n_vocab <= 256 + 512 + 256 = 1024)
  prepare.json                      the config and statistics (solvability, solutions, tokens per trace)

Rules (Stream of Search): each operation combines two of the numbers left with + - * /, integer results only,
exact division only, subtraction larger minus smaller; the result replaces the two; every number must be used.
A problem is solvable iff the last number left can equal the target (brute force over every operation sequence,
vectorized over thousands of problems at once with numpy).

Trace format (one operation per line, each ending in "\\n"; the larger operand is written first), for 7 3 12 25:
    12*3=36 left 7 25 36
    (12*3)+25=36+25=61 left 7 61
    \\boxed{((12*3)+25)-7}=61-7=54 == 54
A line is [the expression over the original numbers, when an operand is itself a result: copied from the start of
that result's line, parenthesized, plus one operator =] a op b = result, then the numbers left (the unused ones in
their order, the result last). The last line boxes the full expression: the grader reads only the \\boxed{}, and
the box is a copy of what is already written, never a composition the model must do in its head. The last line
ends with the verdict on the box ("== 54" here; "!= 54" and others at sampling time, where eval.tool's calculator
writes every result, the numbers left, the box's value and that verdict), so the traces here are in the form the
policy's own lines take. Every step is computable from the line before it (its numbers left) and the lines that
wrote its operands.

Numbers chosen (the lead will tune them with real training; all are Config fields):
  - inputs 1..25, targets 10..100: products stay below ~600 in the steps that matter, so a ~3M-parameter model
    trained for minutes can learn the arithmetic (SoS uses 1..99 for a 250M model); targets as in SoS.
  - levels 3 and 4: a 3-number problem has 48 operation sequences and a median of 2 solutions (~4%: an easy level
    a small model solves often); a 4-number problem has 1152 sequences, and the level keeps only those with at least
    8 solutions (min_solutions; median 18, ~1.6%), so a policy that guesses rarely succeeds and must search: the
    ASTRO setting. Without that floor (median 4, ~0.35%) every model of the main job stayed at a random guesser's
    1-2% per attempt there, far below the paper's hardest benchmark (AIME: 10% for its base); with it the base
    solves ~12% (EXPERIMENTS.md, run 23).
  - 10% of the target values (a seeded choice) never appear in train/warmup; val/test draw targets from the whole
    range, so ~10% of them test unseen targets (new_target = true), as SoS's held-out-target split.
  - sizes: train 13k (search/RL draw from it), warm-up 30k conversations (~60-85 tokens each with the prompt,
    ~2.3M tokens: about one pass in a 5-minute CPU SFT), both 1/3 3-number and 2/3 4-number problems (level_mix);
    val 200 and test 300 per level (pass@1 within ~+-6% at 95%). Only ~21k distinct solvable 3-number problems
    exist with these ranges (2,925 input multisets x 91 targets, 8% solvable), hence the smaller 3-number share;
    4-number problems are plentiful (~650k solvable, ~27% of them with >= 8 solutions). The script stops with an
    error instead of looping when a level's problems run out.
  - tokenizer: a byte-level BPE trained on prompts, traces and the reflection phrases of linearize.py, with Llama
    3's pre-tokenizer pattern, so whole words, 2-digit numbers and frequent 3-digit ones become single tokens;
    ~420 merges exist with this corpus (a pair must occur twice), so ranks ~675 and n_vocab ~930 (<= 1024); a
    4-number trace is ~45 tokens (~15 per step), a 3-number one ~25, the prompt ~37.
Test/val are drawn first and from their own random streams, so changing train/warm-up sizes leaves them unchanged.
"""
import base64
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import regex  # ships with tiktoken (its pre-tokenizer dependency); needed for \p{L} classes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import eval as tasks  # noqa: E402  (the prompt renderer; the name `eval` would shadow the builtin)
import linearize  # noqa: E402
from model import PAT_STR  # noqa: E402  (Llama 3's pre-tokenizer pattern, which model.Tokenizer applies)


@dataclass
class Config:
    out_dir: str = "data/countdown"  # where the files go
    seed: int = 1337                 # every random stream derives from it (and from the split and level)
    levels: tuple = (3, 4)           # counts of numbers; each is a difficulty level
    lo: int = 1                      # smallest input number
    hi: int = 25                     # largest input number
    target_lo: int = 10              # smallest target
    target_hi: int = 100             # largest target
    holdout: float = 0.1             # share of target values kept out of train/warmup (seen only in val/test)
    train: int = 13000               # problems for search / RL, split over the levels by level_mix
    warmup: int = 30000              # warm-up SFT conversations (own problems, disjoint from the splits), by level_mix
    level_mix: tuple = (1, 2)        # relative share of each level in train and warmup (3-number problems are few)
    min_solutions: tuple = (1, 8)    # per level: keep only problems with at least this many solution sequences
    val: int = 200                   # problems per level
    test: int = 300                  # problems per level
    confirm: int = 0                 # problems per level of confirm.jsonl, a fresh held-out split for a confirmatory
                                     # read once test has been looked at (EXPERIMENTS.md); drawn last, from its own
                                     # stream: the other files are the same with or without it. Seen targets only:
                                     # train and warm-up use up most 3-number problems with seen targets, so the
                                     # problems left over-represent the held-out ones (28% instead of test's 5%)
    confirm_round: int = 1           # r > 1: also draw rounds 2..r after round 1 (each from its own stream, each N
                                     # per level, disjoint from all before it); round r goes to confirm<r>.jsonl.
                                     # A confirmatory split answers one question once: the next one needs a new round
    merges: int = 512                # BPE merges of the tokenizer (ranks = 256 + merges)
    bpe_docs: int = 4000             # warm-up conversations the BPE trains on (plenty: the text is repetitive)


# ----------------------------------------------------------------------------- solver

def solve(numbers, targets, rng):
    """Brute force over all operation sequences for a batch of problems (numbers: int64 [B, k], targets [B]).
    Returns (count of solution sequences [B], one uniformly random solution sequence per problem or None).
    A sequence is a list of (i, j, op) over the current list of numbers: combine items i < j with op; the
    result goes to the end of the list (the order the trace writes the numbers left in)."""
    B = len(targets)
    count, pick = np.zeros(B, np.int64), np.full(B, -1)
    paths = []

    def rec(vals, valid, path):
        if len(vals) == 2:  # the last operation: test the four results against the target directly
            a, b = np.maximum(*vals), np.minimum(*vals)
            for op, hit in (("+", a + b == targets), ("-", a - b == targets), ("*", a * b == targets),
                            ("/", (b != 0) & (a == targets * b))):
                hit = np.flatnonzero(hit & valid)
                if len(hit):
                    count[hit] += 1
                    take = hit[rng.random(len(hit)) * count[hit] < 1]  # reservoir sampling: uniform over solutions
                    pick[take] = len(paths)
                paths.append(path + [(0, 1, op)])
            return
        for i in range(len(vals)):
            for j in range(i + 1, len(vals)):
                a, b = np.maximum(vals[i], vals[j]), np.minimum(vals[i], vals[j])
                rest = [v for k, v in enumerate(vals) if k not in (i, j)]
                q, r = np.divmod(a, np.where(b == 0, 1, b))
                for op, c, ok in (("+", a + b, valid), ("-", a - b, valid), ("*", a * b, valid),
                                  ("/", q, valid & (b != 0) & (r == 0))):
                    rec(rest + [c], ok, path + [(i, j, op)])

    # int32 halves the memory traffic; int64 when the largest possible value needs it
    dtype = np.int32 if float(numbers.max(initial=1)) ** numbers.shape[1] * max(1, targets.max(initial=1)) < 2**31 \
        else np.int64
    targets = targets.astype(dtype)
    rec([numbers[:, k].astype(dtype) for k in range(numbers.shape[1])], np.ones(B, bool), [])
    return count, [paths[p] if p >= 0 else None for p in pick]


def steps(numbers, path, target):
    """The step lines of an operation sequence (see the docstring for the format)."""
    items = [(n, str(n), False) for n in numbers]  # (value, expression over the inputs, is it a result)
    lines = []
    for s, (i, j, op) in enumerate(path):
        (x, ex, cx), (y, ey, cy) = sorted((items[i], items[j]), key=lambda t: -t[0])
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else None}[op]
        assert value is not None and (op != "/" or x % y == 0) and value >= 0, (numbers, path)
        expr = f"{f'({ex})' if cx else ex}{op}{f'({ey})' if cy else ey}"
        items = [t for k, t in enumerate(items) if k not in (i, j)] + [(value, expr, True)]
        calc = f"{x}{op}{y}={value}"
        if s == len(path) - 1:
            lines.append(f"\\boxed{{{expr}}}={calc} {'==' if value == target else '!='} {target}")
        else:
            lines.append(f"{expr + '=' if cx or cy else ''}{calc} left {' '.join(str(t[0]) for t in items)}")
    return lines


def make_split(cfg, name, n, level, min_solutions, targets, seen, stream):
    """n problems of `level` numbers with >= min_solutions solutions, targets drawn uniformly from `targets`, none
    in `seen` (rejection sampling, as SoS: uniform numbers and target, kept if solvable and new)."""
    rng = np.random.default_rng([cfg.seed, stream, level])
    out, rate, stale = [], 0.1, 0
    while len(out) < n:
        B = int(np.clip((n - len(out)) / max(rate, 0.01) * 1.2, 256, 100_000))
        nums = rng.integers(cfg.lo, cfg.hi + 1, (B, level))
        tgt = rng.choice(targets, B)
        count, paths = solve(nums, tgt, rng)
        before = len(out)
        for k in np.flatnonzero(count >= min_solutions):
            key = (tuple(sorted(nums[k].tolist())), int(tgt[k]))
            if key in seen or len(out) == n:
                continue
            seen.add(key)
            numbers, target = nums[k].tolist(), int(tgt[k])
            out.append(({"id": f"cd{level}-{name}-{len(out):05d}", "problem": tasks.countdown_prompt(numbers, target),
                         "answer": str(target), "level": level, "numbers": numbers, "target": target,
                         "solutions": int(count[k])}, paths[k]))
        rate = max((len(out) - before) / B, 1e-4)
        stale = stale + 1 if len(out) == before else 0
        if stale == 20:  # the space of distinct solvable problems is used up
            raise common.UserError(f"{name}: only {len(out)} of {n} new solvable {level}-number problems found "
                                   f"(inputs {cfg.lo}..{cfg.hi}, >= {min_solutions} solutions); lower the size or "
                                   f"min_solutions, or widen the ranges")
    return out


# ----------------------------------------------------------------------------- tokenizer

def train_bpe(counts, merges):
    """Byte-level BPE over pre-tokenized words with their counts (each distinct word is processed once).
    Returns (ranks, segmentation): the ranks are the 256 single bytes (rank = byte value), then one token per merge
    in merge order, the order tiktoken applies them in (a merge whose bytes already exist as a token adds no new
    rank); the segmentation maps each word to its final tokens (tests check tiktoken reproduces it)."""
    vocab = [bytes([b]) for b in range(256)]
    ids = {v: i for i, v in enumerate(vocab)}
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pairs, where = Counter(), {}
    for w, (toks, f) in enumerate(zip(words, freq)):
        for p in zip(toks, toks[1:]):
            pairs[p] += f
            where.setdefault(p, set()).add(w)
    while len(vocab) < 256 + merges and pairs:
        best, n = max(pairs.items(), key=lambda kv: kv[1])
        if n < 2:
            break
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in ids:
            ids[merged] = len(vocab)
            vocab.append(merged)
        new = ids[merged]
        for w in sorted(where.pop(best)):
            toks, f = words[w], freq[w]
            for p in zip(toks, toks[1:]):
                pairs[p] -= f
                if pairs[p] <= 0:
                    del pairs[p]
            out, k = [], 0
            while k < len(toks):
                if k + 1 < len(toks) and (toks[k], toks[k + 1]) == best:
                    out.append(new)
                    k += 2
                else:
                    out.append(toks[k])
                    k += 1
            words[w] = out
            for p in zip(out, out[1:]):
                pairs[p] += f
                where.setdefault(p, set()).add(w)
    return vocab, {w: [vocab[t] for t in toks] for w, toks in zip(counts, words)}


def bpe_corpus(convs):
    """Pre-token counts of the text the model will see: chat roles, prompts, traces and the reflection lines
    linearize.py writes (one backtrack and one "seems correct" line per conversation, as in an ASTRO trace)."""
    pat, counts = regex.compile(PAT_STR), Counter()
    for k, conv in enumerate(convs):
        user, trace = conv["messages"][0]["content"], conv["messages"][1]["content"]
        back = linearize.RESTART if k % 3 == 0 else f"{linearize.GO_BACK} had {trace.split(chr(10))[0]}."
        text = (f"user\n\n{user}assistant\n\n{trace}{linearize.REFLECT} {linearize.NOT_SURE} {back}\n"
                f"{linearize.REFLECT} {linearize.SEEMS_RIGHT}\n")
        counts.update(m.encode() for m in pat.findall(text))
    return counts


def write_ranks(path, vocab):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for rank, tok in enumerate(vocab):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

def main(cfg):
    t0 = time.time()
    if not (1 <= cfg.lo <= cfg.hi and cfg.target_lo <= cfg.target_hi and 0 <= cfg.holdout < 1 and cfg.levels
            and all(isinstance(k, int) and 2 <= k <= 6 for k in cfg.levels) and cfg.confirm_round >= 1):
        raise common.UserError("need 1 <= lo <= hi, target_lo <= target_hi, 0 <= holdout < 1, levels in 2..6, "
                               "confirm_round >= 1")
    os.makedirs(cfg.out_dir, exist_ok=True)
    all_targets = np.arange(cfg.target_lo, cfg.target_hi + 1)
    held = np.random.default_rng([cfg.seed, 0]).choice(all_targets, round(cfg.holdout * len(all_targets)),
                                                       replace=False)
    seen_targets = np.setdiff1d(all_targets, held)
    seen, splits = set(), {}
    # Test and val first, from their own streams: their problems do not depend on the train/warm-up sizes.
    if len(cfg.level_mix) != len(cfg.levels) or min(cfg.level_mix) < 0 or sum(cfg.level_mix) <= 0:
        raise common.UserError(f"level_mix must give a share >= 0 per level {cfg.levels}, got {cfg.level_mix}")
    if len(cfg.min_solutions) != len(cfg.levels) or min(cfg.min_solutions) < 1:
        raise common.UserError(f"min_solutions must give a count >= 1 per level {cfg.levels}, got {cfg.min_solutions}")
    shares = np.cumsum(cfg.level_mix) / sum(cfg.level_mix)
    per_level = lambda total: np.diff(np.round(np.concatenate([[0], shares]) * total).astype(int)).tolist()
    for stream, (name, size, targets) in enumerate([("test", cfg.test, all_targets), ("val", cfg.val, all_targets),
                                                    ("train", cfg.train, seen_targets),
                                                    ("warmup", cfg.warmup, seen_targets),
                                                    *[(f"confirm{r if r > 1 else ''}", cfg.confirm, seen_targets)
                                                      for r in range(1, cfg.confirm_round + 1)]], 1):
        if name.startswith("confirm") and not size:
            continue
        sizes = per_level(size) if name in ("train", "warmup") else [size] * len(cfg.levels)  # others: per level
        splits[name] = [p for level, n, m in zip(cfg.levels, sizes, cfg.min_solutions)
                        for p in make_split(cfg, name, n, level, m, targets, seen, stream)]
    held_set = set(held.tolist())
    for name in [n for n in splits if n != "warmup"]:
        recs = [dict(r, new_target=r["target"] in held_set) for r, _ in splits[name]]
        if name == "train":  # levels mixed in any prefix: the search takes the first `limit` problems
            recs = [recs[k] for k in np.random.default_rng([cfg.seed, 6]).permutation(len(recs))]
        common.write_jsonl(os.path.join(cfg.out_dir, f"{name}.jsonl"), recs)

    # Warm-up SFT conversations: problem + one random solution path, in random (seeded) order.
    rng = np.random.default_rng([cfg.seed, 5])
    convs = []
    for k in rng.permutation(len(splits["warmup"])):
        rec, path = splits["warmup"][k]
        trace = "".join(line + "\n" for line in steps(rec["numbers"], path, rec["target"]))  # each step ends in "\n"
        convs.append({"id": f"{rec['id']}#0", "messages": tasks.prompt_messages(rec) +
                      [{"role": "assistant", "content": trace}],
                      "meta": {"k": 0, "backtracks": 0, "mode": "warmup"}})
    common.write_jsonl(os.path.join(cfg.out_dir, "warmup.jsonl"), convs)

    t1 = time.time()
    vocab, _ = train_bpe(bpe_corpus(convs[:cfg.bpe_docs]), cfg.merges)
    write_ranks(os.path.join(cfg.out_dir, "tokenizer.model"), vocab)
    t2 = time.time()

    # Statistics, measured with tiktoken on the ranks just written (the way model.py's Tokenizer encodes).
    import tiktoken
    enc = tiktoken.Encoding("countdown", pat_str=PAT_STR, mergeable_ranks={t: i for i, t in enumerate(vocab)},
                            special_tokens={})
    stats = {"ranks": len(vocab), "n_vocab_with_llama3_specials": len(vocab) + 256,
             "held_out_targets": sorted(held_set),
             "seconds": {"problems": round(t1 - t0, 2), "tokenizer": round(t2 - t1, 2)}}
    for level in cfg.levels:
        tr = [c["messages"][1]["content"] for c in convs[:2000] if c["id"].startswith(f"cd{level}-")]
        sols = [r["solutions"] for r, _ in splits["test"] if r["level"] == level]
        stats[f"level{level}"] = {
            "test_median_solutions": float(np.median(sols)) if sols else None,
            "trace_tokens": float(np.mean([len(enc.encode_ordinary(t)) for t in tr])) if tr else None,
            "prompt_tokens": float(np.mean([len(enc.encode_ordinary(c["messages"][0]["content"]))
                                            for c in convs[:200] if c["id"].startswith(f"cd{level}-")] or [0])),
        }
    stats["config"] = common.config_dict(cfg)
    common.write_json(os.path.join(cfg.out_dir, "prepare.json"), stats)
    print(f"{cfg.out_dir}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) +
          f" problems; tokenizer {len(vocab)} ranks; {time.time() - t0:.1f}s")
    for level in cfg.levels:
        print(f"  level {level}: {stats[f'level{level}']}")
    return stats


if __name__ == "__main__":
    common.run_main(main, Config)
