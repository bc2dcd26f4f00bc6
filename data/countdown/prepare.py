"""
data/countdown/prepare.py — the built-in task's files: Countdown problems, the warm-up SFT set and
the task's tokenizer.

    python data/countdown/prepare.py                  # -> data/countdown/
    python data/countdown/prepare.py --out_dir=/tmp/cd --train=500 --warmup=1000 --val=50 --test=50

Writes (deterministic: fixed seeds, stable ids such as "cd4-test-00012"):
  train.jsonl val.jsonl test.jsonl  problems {id, problem, answer=str(target), level, numbers,
                                    target, solutions, new_target}; level = count of numbers;
                                    solutions = how many of the operation sequences (over
                                    positions) reach the target: a difficulty measure
  warmup.jsonl                      SFT conversations (README.md, "JSONL schemas") for the base
                                    policy: one random valid solution path per problem, no
                                    backtracking, or (a share warmup_wrong) one random legal
                                    attempt ending on its true verdict, the loss on the verdict
                                    only; its problems are disjoint from every split, so
                                    search/RL on train.jsonl never meets a problem the base saw
                                    solved
  confirm.jsonl                     with --confirm=N only: N fresh problems per level, as test but
                                    with seen targets only (Config.confirm); confirm<r>.jsonl with
                                    --confirm_round=r > 1: the r-th such split, disjoint from the
                                    earlier ones
  tokenizer.model                   tiktoken ranks: 256 bytes + up to `merges` BPE merges
                                    (tokenizer.py's Tokenizer appends the 256 Llama 3 special
                                    tokens; n_vocab <= 256 + 512 + 256 = 1024)
  prepare.json                      the config and statistics (solvability, solutions, tokens per
                                    trace)

The task's rules, its brute-force solver and its trace format are tasks/countdown.py's (solve,
steps): a problem is kept only if solvable, and a warm-up conversation is one solution path written
in the trace format the calculator tool also writes at sampling time.

Numbers chosen (all are Config fields):
  - inputs 1..25, targets 10..100: products stay below ~600 in the steps that matter, so a
    ~3M-parameter model can learn the arithmetic (SoS uses 1..99 for a 250M model); targets as in
    SoS.
  - levels 3 and 4: a 3-number problem has 48 operation sequences and a median of 2 solutions (~4%:
    an easy level a small model solves often); a 4-number problem has 1152 sequences, and the level
    keeps only those with at least 8 solutions (min_solutions; median 18, ~1.6%), so a policy that
    guesses rarely succeeds and must search: the ASTRO setting. Without that floor (median 4,
    ~0.35%) a small policy stays at a random guesser's rate there, far below the paper's hardest
    benchmark (AIME: 10% for its base).
  - 10% of the target values (a seeded choice) never appear in train/warmup; val/test draw targets
    from the whole range, so ~10% of them test unseen targets (new_target = true), as SoS's
    held-out-target split.
  - sizes: train 13k (search/RL draw from it), warm-up 30k conversations (~60-85 tokens each with
    the prompt, ~2.3M tokens), both 1/3 3-number and 2/3 4-number problems (level_mix); val 200 and
    test 300 per level (pass@1 within ~+-6% at 95%). Only ~21k distinct solvable 3-number problems
    exist with these ranges (2,925 input multisets x 91 targets, 8% solvable), hence the smaller
    3-number share; 4-number problems are plentiful (~650k solvable, ~27% of them with >= 8
    solutions). The script stops with an error instead of looping when a level's problems run out.
  - tokenizer: a byte-level BPE trained on prompts, traces and the reflection phrases (common.py's,
    as linearize.py writes them), with Llama 3's pre-tokenizer pattern, so whole words, 2-digit
    numbers and frequent 3-digit ones become single tokens; ~420 merges exist with this corpus (a
    pair must occur twice), so ranks ~675 and n_vocab ~930 (<= 1024); a 4-number trace is ~45
    tokens (~15 per step), a 3-number one ~25, the prompt ~37.
Test/val are drawn first and from their own random streams, so changing train/warm-up sizes leaves
them unchanged.
"""
import base64
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import regex  # ships with tiktoken (its pre-tokenizer dependency); needed for \p{L} classes
import tiktoken

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import tasks  # noqa: E402  (the prompt renderer)
from tasks import countdown  # noqa: E402
from tokenizer import PAT_STR  # noqa: E402  (Llama 3's pre-tokenizer pattern)


@dataclass
class Config:
    out_dir: str = "data/countdown"  # where the files go
    seed: int = 1337                 # every random stream derives from it (and the split and level)
    levels: tuple = (3, 4)           # counts of numbers; each is a difficulty level
    lo: int = 1                      # smallest input number
    hi: int = 25                     # largest input number
    target_lo: int = 10              # smallest target
    target_hi: int = 100             # largest target
    holdout: float = 0.1             # share of target values kept out of train/warmup
    train: int = 13000               # problems for search / RL, split over the levels by level_mix
    warmup: int = 30000              # warm-up SFT conversations (own problems, disjoint from the
                                     # splits), by level_mix
    warmup_wrong: float = 0.5        # share of warm-up conversations that are one random legal
                                     # attempt, mostly wrong, ending on its true verdict (" != 54")
                                     # and stopping, with the loss on the verdict only: the base
                                     # practises comparing with the target (~15k verdicts), not
                                     # random moves
    level_mix: tuple = (1, 2)        # relative share of each level in train and warmup (3-number
                                     # problems are few)
    min_solutions: tuple = (1, 8)    # per level: keep only problems with at least this many
                                     # solution sequences
    val: int = 200                   # problems per level
    test: int = 300                  # problems per level
    confirm: int = 0                 # problems per level of confirm.jsonl, a fresh held-out split
                                     # for a confirmatory read once test has been looked at; drawn
                                     # last, from its own stream: the other files are the same with
                                     # or without it. Seen targets only: train and warm-up use up
                                     # most 3-number problems with seen targets, so the problems
                                     # left over-represent the held-out ones (28% instead of test's
                                     # 5%)
    confirm_round: int = 1           # r > 1: also draw confirmatory splits 2..r after the first
                                     # (each from its own stream, each N per level, disjoint from
                                     # all before it); split r goes to confirm<r>.jsonl. A
                                     # confirmatory split answers one question once: the next one
                                     # needs a new split
    merges: int = 512                # BPE merges of the tokenizer (ranks = 256 + merges)
    bpe_docs: int = 4000             # warm-up conversations the BPE trains on (plenty: the text is
                                     # repetitive)

    ranges = dict(lo=(1, None), hi=(1, None), target_lo=(1, None), target_hi=(1, None),
                  holdout=(0.0, 1.0), warmup_wrong=(0.0, 1.0), train=(0, None),
                  warmup=(0, None), val=(0, None), test=(0, None), confirm=(0, None),
                  confirm_round=(1, None), merges=(0, None), bpe_docs=(1, None))


# ----------------------------------------------------------------------------- problems

def make_split(cfg, name, n, level, min_solutions, targets, seen, stream):
    """n problems of `level` numbers with >= min_solutions solutions, targets drawn uniformly from
    `targets`, none in `seen` (rejection sampling, as SoS: uniform numbers and target, kept if
    solvable and new)."""
    rng = np.random.default_rng([cfg.seed, stream, level])
    out, rate, stale = [], 0.1, 0
    while len(out) < n:
        B = int(np.clip((n - len(out)) / max(rate, 0.01) * 1.2, 256, 100_000))
        nums = rng.integers(cfg.lo, cfg.hi + 1, (B, level))
        tgt = rng.choice(targets, B)
        count, paths = countdown.solve(nums, tgt, rng)
        before = len(out)
        for k in np.flatnonzero(count >= min_solutions):
            key = (tuple(sorted(nums[k].tolist())), int(tgt[k]))
            if key in seen or len(out) == n:
                continue
            seen.add(key)
            numbers, target = nums[k].tolist(), int(tgt[k])
            out.append(({"id": f"cd{level}-{name}-{len(out):05d}",
                         "problem": countdown.countdown_prompt(numbers, target),
                         "answer": str(target), "level": level, "numbers": numbers,
                         "target": target, "solutions": int(count[k])}, paths[k]))
        rate = max((len(out) - before) / B, 1e-4)
        stale = stale + 1 if len(out) == before else 0
        if stale == 20:  # the space of distinct solvable problems is used up
            raise common.UserError(
                f"{name}: only {len(out)} of {n} new solvable {level}-number problems found "
                f"(inputs {cfg.lo}..{cfg.hi}, >= {min_solutions} solutions); lower the size or "
                f"min_solutions, or widen the ranges")
    return out


def draw_splits(cfg, all_targets, seen_targets):
    """{split name: [(problem record, solution path)]}, in draw order: test and val first, from
    their own streams, so their problems do not depend on the train/warm-up sizes."""
    shares = np.cumsum(cfg.level_mix) / sum(cfg.level_mix)
    per_level = lambda total: np.diff(np.round(np.concatenate([[0], shares]) * total)
                                      .astype(int)).tolist()
    seen, splits = set(), {}
    confirms = [(f"confirm{r if r > 1 else ''}", cfg.confirm, seen_targets)
                for r in range(1, cfg.confirm_round + 1)]
    for stream, (name, size, targets) in enumerate([("test", cfg.test, all_targets),
                                                    ("val", cfg.val, all_targets),
                                                    ("train", cfg.train, seen_targets),
                                                    ("warmup", cfg.warmup, seen_targets),
                                                    *confirms], 1):
        if name.startswith("confirm") and not size:
            continue
        # train and warmup: split by level_mix; the others: `size` per level
        sizes = per_level(size) if name in ("train", "warmup") else [size] * len(cfg.levels)
        splits[name] = [p for level, n, m in zip(cfg.levels, sizes, cfg.min_solutions)
                        for p in make_split(cfg, name, n, level, m, targets, seen, stream)]
    return splits


def write_problems(cfg, splits, held_set):
    """Every split but warmup as <name>.jsonl, each record marked with new_target."""
    for name in [n for n in splits if n != "warmup"]:
        recs = [dict(r, new_target=r["target"] in held_set) for r, _ in splits[name]]
        if name == "train":  # levels mixed in any prefix: search takes the first `limit` problems
            recs = [recs[k] for k in np.random.default_rng([cfg.seed, 6]).permutation(len(recs))]
        common.write_jsonl(os.path.join(cfg.out_dir, f"{name}.jsonl"), recs)


def random_attempt(numbers, rng):
    """A random legal operation sequence (solve's format): any two numbers left, any operation
    whose result is a non-negative integer."""
    vals, path = list(numbers), []
    while len(vals) > 1:
        i, j = sorted(rng.choice(len(vals), 2, replace=False).tolist())
        a, b = max(vals[i], vals[j]), min(vals[i], vals[j])
        ops = [op for op in "+-*/" if op != "/" or b and a % b == 0]
        op = ops[rng.integers(len(ops))]
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        vals = [v for k, v in enumerate(vals) if k not in (i, j)] + [c]
        path.append((i, j, op))
    return path


def warmup_conversations(cfg, warmup):
    """Warm-up SFT conversations: problem + its random solution path (or, for a share warmup_wrong,
    a random legal attempt ending on its true verdict), in random (seeded) order."""
    rng = np.random.default_rng([cfg.seed, 5])
    wrong = np.random.default_rng([cfg.seed, 6])
    convs = []
    for k in rng.permutation(len(warmup)):
        rec, path = warmup[k]
        attempt = cfg.warmup_wrong and wrong.random() < cfg.warmup_wrong
        if attempt:
            path = random_attempt(rec["numbers"], wrong)
        lines = countdown.steps(rec["numbers"], path, rec["target"])
        trace = "".join(line + "\n" for line in lines)  # each step ends in "\n"
        answer = {"role": "assistant", "content": trace}
        if attempt:  # the random moves are context, the verdict is the lesson
            answer["loss_from"] = len(trace) - len(lines[-1]) - 1 + countdown.ANSWER_END.match(
                lines[-1]).end()
        convs.append({"id": f"{rec['id']}#0", "messages": tasks.prompt_messages(rec) + [answer],
                      "meta": {"k": 0, "backtracks": 0, "mode": "warmup"}})
    return convs


# ----------------------------------------------------------------------------- tokenizer

def train_bpe(counts, merges):
    """Byte-level BPE over pre-tokenized words with their counts (each distinct word is processed
    once). Returns (ranks, segmentation): the ranks are the 256 single bytes (rank = byte value),
    then one token per merge in merge order, the order tiktoken applies them in (a merge whose bytes
    already exist as a token adds no new rank); the segmentation maps each word to its final tokens
    (tests check tiktoken reproduces it)."""
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
    """Pre-token counts of the text the model will see: chat roles, prompts, traces and the
    reflection lines linearize.py writes (one backtrack and one "seems correct" line per
    conversation, as in an ASTRO trace)."""
    pat, counts = regex.compile(PAT_STR), Counter()
    for k, conv in enumerate(convs):
        user, trace = conv["messages"][0]["content"], conv["messages"][1]["content"]
        back = common.RESTART if k % 3 == 0 else f"{common.GO_BACK} had {trace.split(chr(10))[0]}."
        text = (f"user\n\n{user}assistant\n\n{trace}{common.REFLECT} {common.NOT_SURE} {back}\n"
                f"{common.REFLECT} {common.SEEMS_RIGHT}\n")
        counts.update(m.encode() for m in pat.findall(text))
    return counts


def write_ranks(path, vocab):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for rank, tok in enumerate(vocab):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    os.replace(tmp, path)


def level_stats(cfg, vocab, convs, splits):
    """Per level: median solutions of the test problems, mean tokens of a trace and of a prompt,
    measured with tiktoken on the ranks just written (the way tokenizer.py's Tokenizer encodes)."""
    enc = tiktoken.Encoding("countdown", pat_str=PAT_STR,
                            mergeable_ranks={t: i for i, t in enumerate(vocab)}, special_tokens={})
    stats = {}
    for level in cfg.levels:
        of_level = lambda c: c["id"].startswith(f"cd{level}-")
        tr = [c["messages"][1]["content"] for c in convs[:2000] if of_level(c)]
        sols = [r["solutions"] for r, _ in splits["test"] if r["level"] == level]
        tokens = [len(enc.encode_ordinary(t)) for t in tr]
        stats[f"level{level}"] = {
            "test_median_solutions": float(np.median(sols)) if sols else None,
            "trace_tokens": float(np.mean(tokens)) if tr else None,
            "prompt_tokens": float(np.mean([len(enc.encode_ordinary(c["messages"][0]["content"]))
                                            for c in convs[:200] if of_level(c)] or [0])),
        }
    return stats


# ----------------------------------------------------------------------------- main

def check_config(cfg):
    if not (1 <= cfg.lo <= cfg.hi and cfg.target_lo <= cfg.target_hi and 0 <= cfg.holdout < 1
            and cfg.levels and all(isinstance(k, int) and 2 <= k <= 6 for k in cfg.levels)
            and cfg.confirm_round >= 1):
        raise common.UserError("need 1 <= lo <= hi, target_lo <= target_hi, 0 <= holdout < 1, "
                               "levels in 2..6, confirm_round >= 1")
    if len(cfg.level_mix) != len(cfg.levels) or min(cfg.level_mix) < 0 or sum(cfg.level_mix) <= 0:
        raise common.UserError(
            f"level_mix must give a share >= 0 per level {cfg.levels}, got {cfg.level_mix}")
    if len(cfg.min_solutions) != len(cfg.levels) or min(cfg.min_solutions) < 1:
        raise common.UserError(
            f"min_solutions must give a count >= 1 per level {cfg.levels}, got {cfg.min_solutions}")


def main(cfg):
    t0 = time.time()
    check_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    all_targets = np.arange(cfg.target_lo, cfg.target_hi + 1)
    held = np.random.default_rng([cfg.seed, 0]).choice(
        all_targets, round(cfg.holdout * len(all_targets)), replace=False)
    splits = draw_splits(cfg, all_targets, np.setdiff1d(all_targets, held))
    held_set = set(held.tolist())
    write_problems(cfg, splits, held_set)
    convs = warmup_conversations(cfg, splits["warmup"])
    common.write_jsonl(os.path.join(cfg.out_dir, "warmup.jsonl"), convs)

    t1 = time.time()
    vocab, _ = train_bpe(bpe_corpus(convs[:cfg.bpe_docs]), cfg.merges)
    write_ranks(os.path.join(cfg.out_dir, "tokenizer.model"), vocab)
    t2 = time.time()

    stats = {"ranks": len(vocab), "n_vocab_with_llama3_specials": len(vocab) + 256,
             "held_out_targets": sorted(held_set),
             "seconds": {"problems": round(t1 - t0, 2), "tokenizer": round(t2 - t1, 2)},
             **level_stats(cfg, vocab, convs, splits), "config": common.config_dict(cfg)}
    common.write_json(os.path.join(cfg.out_dir, "prepare.json"), stats)
    print(f"{cfg.out_dir}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) +
          f" problems; tokenizer {len(vocab)} ranks; {time.time() - t0:.1f}s")
    for level in cfg.levels:
        print(f"  level {level}: {stats[f'level{level}']}")
    return stats


if __name__ == "__main__":
    common.run_main(main, Config)
