"""
linearize.py — procedure cloning (ASTRO Algorithm 1): MCTS trees -> SFT conversations whose chain of
thought explores wrong branches, reflects, backtracks and ends at a correct answer.

    python linearize.py                             # ASTRO traces -> out/linearize/astro.jsonl
    python linearize.py config/linearize_direct.py  # Direct baseline -> out/linearize/direct.jsonl
    python linearize.py --trees=t.jsonl --out=o.jsonl --seed=1 --max_tokens=0  # no length cap
    python linearize.py config/linearize_llama_math.py  # MATH: the policy judges Psi' first

Per tree (a JSON line of search.py, schema in README.md, "JSONL schemas"):
  1. DFS the tree: correct terminals Psi (reward 1) and incorrect terminals Lambda (reward 0).
  2. Psi' = Psi filtered by min_q and, when judge_n > 0, by the paper's self-evaluation (Appendix
     A.1, selfeval.py): the search policy judges each terminal's root->terminal solution judge_n
     times (at most judge_per_tree terminals per tree), and the terminal stays only if all
     verdicts say correct. The verdicts go to a file that a killed run resumes from and the Direct
     arm reads. Off by default: Countdown's verifier is exact, so Psi' = Psi.
  3. For each k in cfg.ks: n* ~ Psi', k incorrect terminals with pairwise distinct answers (distinct
     under the task's grader: math_equal for MATH, exact text for Countdown) in random
     order, visit them in turn (n* last). Each root->terminal path adds only its nodes not yet
     written, so it continues from the deepest written node it shares: a backtrack there (a restart
     if that node is the root).
  4. Text: step texts in order; before each backtrack the reflection line REFLECT NOT_SURE
     GO_BACK/RESTART; after high-Q steps of n*'s path and after n* the line REFLECT SEEMS_RIGHT
     (the phrases are common.py's).
  5. Drop conversations (prompt + trace, counted as sft.py renders them) longer than max_tokens,
     the SFT's seq_len, so SFT never meets one; the stats count them (too_long). The tokenizer is
     --tokenizer's, else the search policy's (search.py's config.json next to the trees names it),
     loaded as the stages load it; with neither, the run stops before it writes anything.
  6. Replay every trace against its tree (check_trace); any error is a bug and stops the run.
Choices the paper leaves open are documented where they are made (Config, answer_key, astro_traces,
direct_traces, step_text, restate).
"""
import os
import random
import re
from collections import Counter
from dataclasses import dataclass

import checkpoint
import common
import selfeval
import tasks  # the one prompt renderer and step delimiter of each task
from common import GO_BACK, NOT_SURE, REFLECT, RESTART, SEEMS_RIGHT

JUDGE_PROMPT = ("Check the solution above step by step. Is it correct: every step valid and the "
                "final answer right? End with \\boxed{yes} if it is correct, else \\boxed{no}.")


@dataclass
class Config:
    mode: str = "astro"      # "astro": search traces; "direct": the baseline, plain root->n* paths,
                             # same counts
    trees: str = "out/search/trees.jsonl"  # input: search.py's trees
    out: str = ""            # output JSONL; "" = out/linearize/<mode>.jsonl.
                             # Stats: <out without .jsonl>.stats.json
    ks: tuple = (0, 1, 1, 2)  # k (wrong terminals visited) of each trace per tree: the paper's 1
                             # direct + 3 with k >= 1. k is capped by the number of distinct wrong
                             # answers; a k >= 1 slot is dropped when the tree has no wrong terminal
                             # at all (it would be direct).
    q_high: float = 0.75     # positive reflection after a step of n*'s path with Q >= q_high (MCTS
                             # nodes only: a rollout-only node's Q is not an M-rollout mean)
    min_q: float = 0.0       # keep a correct terminal only if every MCTS node on its path has
                             # Q >= min_q (before the self-evaluation, judge_n)
    tries: int = 4           # re-draws of a trace slot that came out identical to an earlier one
    seed: int = 1337         # per-tree RNG = Random(f"{seed}:{tree id}"): order and resume do not
                             # matter
    tokenizer: str = ""      # counts tokens as sft.py will: a checkpoint dir or tokenizer file
                             # (checkpoint.load_tokenizer); "" = the search policy's (`policy` in
                             # search.py's config.json next to the trees)
    max_tokens: int = 448    # drop conversations (prompt + trace, as sft.py renders them) longer
                             # than this: the SFT's seq_len (config/sft_astro.py); 0 = no cap
    judge_n: int = 0         # Psi' (selfeval.py): verdicts per correct terminal, the paper's N = 8;
                             # 0 = none: Countdown's verifier is exact, so Psi' = Psi
    judge_unanimous: bool = True  # keep a terminal if all verdicts say correct (the paper), or
                                  # (False) more than half
    judge_prompt: str = JUDGE_PROMPT  # the user turn after the solution that asks for a verdict
    judge_per_tree: int = 0  # judge at most this many correct terminals per tree, drawn at random
                             # (the rest leave Psi'); 0 = all. A tree gives at most len(ks) n*,
                             # and keeping rollouts makes its correct terminals many.
    judge_policy: str = ""   # the judge's checkpoint; "" = the search policy (self-evaluation)
    judge_temperature: float = 1.0  # sampled verdicts, so the N of them can disagree
    judge_max_new_tokens: int = 1024  # room for the judge's check before its \boxed{} verdict
    judge_chunk: int = 256   # terminals per generate call; each chunk's verdicts are saved at once
    judge_batch_size: int = 256  # rows decoded at once in generate
    self_eval: str = ""      # the verdicts file; "" = self_eval.jsonl next to out (both arms)
    device: str = ""         # the judge's; "" = cuda if available, else cpu
    dtype: str = "float32"   # the judge's: float32 | bfloat16 | float16

    ranges = dict(q_high=(0.0, None), min_q=(0.0, 1.0), tries=(1, None), max_tokens=(0, None),
                  judge_n=(0, None), judge_per_tree=(0, None), judge_temperature=(0.0, None),
                  judge_max_new_tokens=(1, None), judge_chunk=(1, None), judge_batch_size=(1, None))


NODE_FIELDS = ("id", "parent", "text", "terminal", "answer", "reward", "Q", "source")
STATS = ("skipped_no_correct", "skipped_min_q", "slots_no_wrong", "k_capped", "duplicates",
         "too_long", "too_long_direct", "judged", "judge_rejected", "skipped_self_eval",
         "verdicts_unclear")


def read_trees(path):
    """search.py's trees, validated: a bad line is a UserError naming file:line:field."""
    trees, seen = common.read_jsonl(path, required=("id", "problem", "nodes")), set()
    for tree in trees:
        where = f"{path}:{tree['_line']}"
        problem = tree["problem"]
        if not isinstance(problem, dict) or not isinstance(problem.get("problem"), str):
            raise common.UserError(
                f"{where}: problem: must be the problem record (an object with 'problem')")
        if tree["id"] in seen:
            raise common.UserError(f"{where}: id: duplicate tree id {tree['id']!r}")
        seen.add(tree["id"])
        nodes = tree["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise common.UserError(f"{where}: nodes: must be a non-empty list")
        for i, n in enumerate(nodes):
            check_node(nodes, i, n, f"{where}: nodes[{i}]")
    return trees


def check_node(nodes, i, n, field):
    """Node i of a tree: its fields present, its parent an earlier non-terminal node (none for the
    root), a terminal's reward 0 or 1."""
    if not isinstance(n, dict):
        raise common.UserError(f"{field}: must be an object")
    for key in NODE_FIELDS:
        if key not in n:
            raise common.UserError(f"{field}.{key}: missing")
    p = n["parent"]
    if n["id"] != i:
        raise common.UserError(f"{field}.id: is {n['id']!r}, must equal its index {i}")
    if (p is not None if i == 0 else not (type(p) is int and 0 <= p < i)):
        raise common.UserError(
            f"{field}.parent: {p!r} out of range (root: null, else an earlier node id)")
    if i > 0 and nodes[p]["terminal"]:
        raise common.UserError(f"{field}.parent: node {p} is terminal and cannot have children")
    if not isinstance(n["text"], str) or not isinstance(n["Q"], (int, float)):
        raise common.UserError(f"{field}: text must be a string and Q a number")
    if n["terminal"] and n["reward"] not in (0, 1):
        raise common.UserError(
            f"{field}.reward: {n['reward']!r}, a terminal's reward must be 0 or 1")


# ----------------------------------------------------------------------------- Algorithm 1

def path(nodes, n):
    """Node ids from the root to n, root included."""
    ids = [n]
    while nodes[ids[-1]]["parent"] is not None:
        ids.append(nodes[ids[-1]]["parent"])
    return ids[::-1]


def children(nodes):
    kids = [[] for _ in nodes]
    for n in nodes[1:]:
        kids[n["parent"]].append(n["id"])
    return kids


def terminals(nodes):
    """DFS from the root: (Psi, Lambda) = correct and incorrect terminal ids, in DFS order (so draws
    are stable)."""
    kids, good, bad, stack = children(nodes), [], [], [0]
    while stack:
        n = stack.pop()
        if nodes[n]["terminal"]:
            (good if nodes[n]["reward"] == 1 else bad).append(n)
        stack.extend(reversed(kids[n]))
    return good, bad


def answer_key(node):
    """A terminal's answer as text, stripped; None (no answer) is one value of its own."""
    return None if node["answer"] is None else str(node["answer"]).strip()


def distinct(rec, answers):
    """Whether wrong answers are pairwise different under the task's grader (tasks.same_answer:
    on MATH math_equal, so 1/2 and 0.5 are one answer; on Countdown the text)."""
    return not any(tasks.same_answer(rec, a, b) for i, a in enumerate(answers)
                   for b in answers[:i])


def step_text(node, delim, rec):
    """A step as written in a trace: its text verbatim (what the policy generated), except that an
    answer line carries the verdict the grader gives (tasks.with_true_verdict: SFT teaches correct
    verification, whatever the search policy wrote there), plus the delimiter after a terminal that
    lacks it (the model stopped), so that what follows a terminal starts on its own line."""
    if not node["terminal"]:
        return node["text"]
    text = tasks.with_true_verdict(rec, node["text"])
    return text if text.endswith(delim) else text + delim


def restate(node):
    """The words after GO_BACK naming the step we return to: 'had <its first sentence/clause>'.
    One function, so a policy rewrite (the paper's LLM prose, for MATH) could replace it;
    check_trace uses it too."""
    first = node["text"].strip().split("\n")[0]
    first = re.split(r"(?<=[.!?])\s", first)[0].rstrip(" .:;,") or "that step"
    if first[1:2].islower():
        first = first[0].lower() + first[1:]  # "We set x" -> "had we set x"; "AB = 3" stays
    return "had " + first


def linearize(tree, order, q_high, reflect=True):
    """Visit the terminals `order` (n* last) and write the trace: (text, meta). reflect=False: plain
    steps."""
    nodes, delim = tree["nodes"], tasks.step_delimiter(tree["problem"])
    final = set(path(nodes, order[-1]))
    written, out = {0}, []
    meta = Counter(k=len(order) - 1, backtracks=0, restarts=0, positive=0)
    for i, t in enumerate(order):
        # the written part of a path is always a prefix
        new = [n for n in path(nodes, t) if n not in written]
        assert new, f"terminal {t} already written"
        if i > 0:  # on a wrong terminal: reflect, then jump to the deepest written node on the path
            back = nodes[new[0]]["parent"]
            where = RESTART if back == 0 else f"{GO_BACK} {restate(nodes[back])}."
            out.append(f"{REFLECT} {NOT_SURE} {where}{delim}")
            meta["backtracks"] += 1
            meta["restarts"] += back == 0
        for n in new:
            written.add(n)
            out.append(step_text(nodes[n], delim, tree["problem"]))
            # only n*'s path earns "seems correct": after n*, and after its MCTS steps (Q = a mean
            # over >= M rollouts, unlike a rollout-only step's) with a high Q that end a line (a
            # step cut inside a token that holds the delimiter, e.g. "\n(", continues on the same
            # line)
            node = nodes[n]
            high = node["source"] == "mcts" and node["Q"] >= q_high and node["text"].endswith(delim)
            if reflect and n in final and (n == t or high):
                out.append(f"{REFLECT} {SEEMS_RIGHT}{delim}")
                meta["positive"] += 1
    meta["solved"] = int(nodes[order[-1]]["reward"] == 1)  # 0: a Direct rejection
    return "".join(out), dict(meta)


def correct_terminals(nodes, min_q):
    """Psi': correct terminals whose path's MCTS nodes all have Q >= min_q (reached by more than
    luck)."""
    good, _ = terminals(nodes)
    return [t for t in good if all(nodes[n]["Q"] >= min_q for n in path(nodes, t)[1:]
                                   if nodes[n]["source"] == "mcts")]


def astro_traces(tree, cfg, stats, good=None):
    """The ASTRO traces of one tree: one per k in cfg.ks, minus slots without wrong terminals and
    duplicates. good: Psi' (default: the correct terminals that pass min_q)."""
    nodes, rng = tree["nodes"], random.Random(f"{cfg.seed}:{tree['id']}")
    good = correct_terminals(nodes, cfg.min_q) if good is None else good
    groups = {}  # wrong answer -> its terminals, in DFS order
    for t in terminals(nodes)[1]:
        groups.setdefault(answer_key(nodes[t]), []).append(t)
    traces, seen = [], set()
    for k in cfg.ks:
        if k > 0 and not groups:
            stats["slots_no_wrong"] += 1
            continue
        stats["k_capped"] += k > len(groups)
        k = min(k, len(groups))
        for _ in range(cfg.tries):
            # distinct answers, in random order; a draw of answers the grader deems one (1/2 and
            # 0.5 on MATH) is drawn again, as is a trace drawn before
            answers = rng.sample(list(groups), k)
            wrong = [rng.choice(groups[a]) for a in answers]
            order = wrong + [rng.choice(good)]
            text, meta = linearize(tree, order, cfg.q_high)
            fresh = text not in seen and distinct(tree["problem"], answers)
            if fresh:
                break
        if not fresh:  # identical traces would only up-weight one trace of this problem
            stats["duplicates"] += 1
            continue
        seen.add(text)
        traces.append((text, meta, order[:-1]))
    return traces


def direct_traces(tree, cfg, astro, good=None):
    """The Direct baseline for one tree, from its ASTRO traces `astro`: per ASTRO trace a plain
    root->n* path (distinct n* while there are enough, then cycling through them again: equal
    example counts matter more than dedup), and per wrong attempt in it that attempt alone, ending
    on its answer line's true verdict (" != 24") and stopping. So both sets teach the same verdicts,
    and the arms differ only in what follows a rejection: going back in context, or nothing.
    good: Psi', as in astro_traces."""
    good = correct_terminals(tree["nodes"], cfg.min_q) if good is None else good
    count = len(astro)
    picks = random.Random(f"{cfg.seed}:{tree['id']}:direct").sample(good, min(count, len(good)))
    traces = [linearize(tree, [picks[j % len(picks)]], cfg.q_high, reflect=False)
              for j in range(count)]
    return traces + [linearize(tree, [w], cfg.q_high, reflect=False)
                     for *_, wrong in astro for w in wrong]


# ----------------------------------------------------------------------------- replay checker

def check_trace(tree, trace, rejected=False):
    """Replay a trace against its tree; returns the errors (empty = valid). Every step must be a not
    yet written child of the current node (answer lines with the grader's verdict), a backtrack must
    leave a wrong terminal and land on a written node, no wrong answer may repeat, a positive
    reflection must follow a step, and the trace must end at a correct terminal (rejected=True:
    or be one attempt ending at a wrong one, the Direct set's rejections). A repeat is the same
    answer under the grader (distinct)."""
    nodes, rec = tree["nodes"], tree["problem"]
    delim, kids = tasks.step_delimiter(rec), children(nodes)
    wrong = lambda n: nodes[n]["terminal"] and nodes[n]["reward"] != 1
    # Replay states (pos, node, landing, written, wrong answers): more than one only where a
    # restatement or a step text is ambiguous in this tree; the trace is valid if any of them
    # replays it to the end.
    stack, failure = [(0, 0, None, frozenset([0]), ())], (-1, "")
    while stack:
        pos, cur, landing, written, seen = stack.pop()
        # report the branch that got farthest
        fail = lambda msg: max(failure, (pos, f"char {pos}: {msg}"))
        if pos >= len(trace):
            if landing is None and nodes[cur]["terminal"] and (
                    not wrong(cur) or rejected and len(written) == len(path(nodes, cur))):
                return []
            failure = fail(f"trace ends at node {cur}, not at a correct terminal")
        elif trace.startswith(REFLECT, pos):  # a reflection line
            end = trace.find(delim, pos)
            end = len(trace) if end < 0 else end
            line, rest, after = trace[pos:end], trace[pos + len(REFLECT):end], end + len(delim)
            said = rest[len(NOT_SURE) + 2:] if rest.startswith(f" {NOT_SURE} ") else ""
            named = said[len(GO_BACK) + 1:-1]
            if rest == f" {SEEMS_RIGHT}":
                if landing is None and cur != 0 and not wrong(cur):
                    stack.append((after, cur, None, written, seen))
                else:
                    failure = fail("positive reflection not after a correct-so-far step")
            elif said != RESTART and not (said.startswith(GO_BACK + " ") and said.endswith(".")):
                failure = fail(f"malformed reflection line {line!r}")
            elif landing is not None or not wrong(cur):
                failure = fail("backtrack not right after a wrong terminal")
            elif said == RESTART or any(n and restate(nodes[n]) == named for n in written):
                land = [0] if said == RESTART else [n for n in sorted(written)
                                                    if n and restate(nodes[n]) == named]
                stack.append((after, cur, land, written, seen))
            else:
                failure = fail(f"backtrack to a step never written: {named!r}")
        else:  # a step
            here = landing if landing is not None else [cur]
            match = [c for p in here for c in kids[p]
                     if c not in written and trace.startswith(step_text(nodes[c], delim, rec), pos)]
            if not match:
                failure = fail(f"{trace[pos:pos + 40]!r} is not a new step below node(s) {here}")
            for c in match:
                a = answer_key(nodes[c])
                if wrong(c) and not distinct(rec, [*seen, a]):
                    failure = fail(f"wrong answer {a!r} repeated (node {c})")
                    continue
                stack.append((pos + len(step_text(nodes[c], delim, rec)), c, None, written | {c},
                              seen + (a,) if wrong(c) else seen))
    return [failure[1]]


# ----------------------------------------------------------------------------- main

def check_config(cfg):
    common.check_ranges(cfg)
    if cfg.mode not in ("astro", "direct"):
        raise common.UserError(f"mode must be 'astro' or 'direct', got {cfg.mode!r}")
    if not cfg.ks or any(type(k) is not int or k < 0 for k in cfg.ks):
        raise common.UserError(f"ks must be non-negative ints, got {cfg.ks!r}")


def search_policy(cfg):
    """The checkpoint that grew the trees: `policy` in the config.json search.py writes next to
    them ("" if there is none)."""
    path = os.path.join(os.path.dirname(cfg.trees), "config.json")
    policy = common.read_json(path).get("policy") if os.path.isfile(path) else None
    return policy if isinstance(policy, str) else ""


def load_tokenizer(cfg):
    """The tokenizer sft.py will render the conversations with, for the cap (none without one
    unless --tokenizer names it): cfg.tokenizer, else the search policy's, loaded as load_model
    loads it (tokenizer.model or tokenizer.json). A cap without one is a UserError, before any
    work."""
    if not cfg.max_tokens:
        return checkpoint.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    where = cfg.tokenizer or search_policy(cfg)
    if not where:
        raise common.UserError(
            f"max_tokens={cfg.max_tokens} needs a tokenizer to count tokens: no --tokenizer, and "
            f"no search policy in {os.path.join(os.path.dirname(cfg.trees), 'config.json')}; "
            "pass --tokenizer=<checkpoint dir or tokenizer file>, or --max_tokens=0")
    return checkpoint.load_tokenizer(where)


def to_judge(tree, cfg):
    """The correct terminals of a tree that the policy judges: those that pass min_q, at most
    judge_per_tree of them (a seeded draw, the same in both arms), in DFS order."""
    good = correct_terminals(tree["nodes"], cfg.min_q)
    if cfg.judge_per_tree and len(good) > cfg.judge_per_tree:
        rng = random.Random(f"{cfg.seed}:{tree['id']}:judge")
        good = sorted(rng.sample(good, cfg.judge_per_tree), key=good.index)
    return good


def self_evaluation(trees, cfg, out, judge=None):
    """Psi' verdicts {(tree id, terminal): [verdict] * judge_n} of each terminal to_judge gives,
    its solution being its plain root->terminal path (selfeval.judge_all)."""
    policy = cfg.judge_policy or search_policy(cfg)
    if not policy:
        raise common.UserError(f"judge_n={cfg.judge_n} needs a judge: set judge_policy, or keep "
                               f"search.py's config.json next to {cfg.trees}")
    requests = [(t["id"], n, t["problem"], linearize(t, [n], cfg.q_high, reflect=False)[0])
                for t in trees for n in to_judge(t, cfg)]
    path = cfg.self_eval or os.path.join(os.path.dirname(out), "self_eval.jsonl")
    return selfeval.judge_all(requests, cfg, path, policy, judge)


def psi_prime(tree, cfg, verdicts, stats):
    """Psi' of a tree: its correct terminals that pass min_q and, when the policy judges, those of
    them it judged (to_judge) that pass the self-evaluation."""
    if verdicts is None:
        return correct_terminals(tree["nodes"], cfg.min_q)
    judged = to_judge(tree, cfg)
    votes = [verdicts[tree["id"], t] for t in judged]
    kept = [t for t, v in zip(judged, votes) if selfeval.passes(v, cfg.judge_unanimous)]
    stats["judged"] += len(judged)
    stats["judge_rejected"] += len(judged) - len(kept)
    stats["verdicts_unclear"] += sum(x is None for v in votes for x in v)
    return kept


def tree_records(tree, cfg, stats, tok, verdicts=None):
    """The conversation records of one tree (none if it has no usable correct terminal), each trace
    replayed against the tree first; tok counts tokens as sft.py renders a conversation."""
    nodes, prompt = tree["nodes"], tasks.prompt_messages(tree["problem"])
    good = psi_prime(tree, cfg, verdicts, stats)
    if not good:  # no correct terminal, none that passes min_q, or none the judge accepts
        reason = ("no_correct" if not terminals(nodes)[0] else
                  "min_q" if not correct_terminals(nodes, cfg.min_q) else "self_eval")
        stats[f"skipped_{reason}"] += 1
        return []
    chat = lambda text: prompt + [{"role": "assistant", "content": text}]

    def fit(traces, key):  # the traces whose conversation fits max_tokens; the rest counted
        kept = [t for t in traces if len(tok.render_chat(chat(t[0]))[0]) <= cfg.max_tokens]
        stats[key] += len(traces) - len(kept)
        return kept

    traces = astro_traces(tree, cfg, stats, good)
    if cfg.max_tokens:  # before direct mode counts them, so both sets match per tree
        traces = fit(traces, "too_long")
    if cfg.mode == "direct":
        traces = direct_traces(tree, cfg, traces, good)
        if cfg.max_tokens:  # a direct path is rarely the longer one, but SFT must never meet one
            traces = fit(traces, "too_long_direct")
    records = []
    for j, (text, meta, *_) in enumerate(traces):
        errors = check_trace(tree, text, rejected=cfg.mode == "direct")
        if errors:  # our own output failed the replay: a bug in this file, never silently written
            raise RuntimeError(f"linearize bug, tree {tree['id']!r} trace {j}: {errors}\n{text}")
        records.append({"id": f"{tree['id']}#{j}", "messages": chat(text),
                        "meta": {**meta, "mode": cfg.mode}})
    return records


def summarize(cfg, trees, records, stats, tok):
    """The statistics written next to the output (<out without .jsonl>.stats.json); with a
    tokenizer, mean_tokens (of a trace) and max_conversation_tokens (prompt + trace, as SFT sees
    it)."""
    n, texts = max(len(records), 1), [r["messages"][-1]["content"] for r in records]
    mean = lambda key: sum(r["meta"][key] for r in records) / n
    lengths = dict(mean_tokens=None, max_conversation_tokens=None, tokenizer=None)
    if tok:
        lengths = dict(mean_tokens=sum(len(tok.encode(t)) for t in texts) / n,
                       max_conversation_tokens=max((len(tok.render_chat(r["messages"])[0])
                                                    for r in records), default=0),
                       tokenizer=tok.path)
    return dict(mode=cfg.mode, trees=len(trees), traces=len(records), **stats,
                traces_by_k=dict(sorted(Counter(r["meta"]["k"] for r in records).items())),
                backtracks_per_trace=mean("backtracks"), restarts_per_trace=mean("restarts"),
                positive_per_trace=mean("positive"), solved_share=mean("solved"),
                mean_chars=sum(map(len, texts)) / n, **lengths, config=common.config_dict(cfg))


def main(cfg, judge=None):
    """judge: the judge of Psi' (selfeval.py), for tests; None = the policy (when judge_n > 0)."""
    check_config(cfg)
    out = cfg.out or f"out/linearize/{cfg.mode}.jsonl"
    tok = load_tokenizer(cfg)
    trees = read_trees(cfg.trees)
    verdicts = self_evaluation(trees, cfg, out, judge) if cfg.judge_n else None

    records, stats = [], Counter(dict.fromkeys(STATS, 0))
    for tree in trees:
        records += tree_records(tree, cfg, stats, tok, verdicts)

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    common.write_jsonl(out, records)
    summary = summarize(cfg, trees, records, stats, tok)
    common.write_json(os.path.splitext(out)[0] + ".stats.json", summary)
    print(f"{cfg.trees}: {len(trees)} trees ({summary['skipped_no_correct']} without a correct "
          f"terminal) -> {len(records)} {cfg.mode} traces in {out} ({summary['too_long']} ASTRO "
          f"traces over max_tokens={cfg.max_tokens} dropped)")
    print({k: round(v, 2) if isinstance(v, float) else v
           for k, v in summary.items() if k != "config"})
    return summary


if __name__ == "__main__":
    common.run_main(main, Config)
