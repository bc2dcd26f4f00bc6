"""
linearize.py — procedure cloning (ASTRO Algorithm 1): MCTS trees -> SFT conversations whose chain of
thought explores wrong branches, reflects, backtracks and ends at a correct answer.

    python linearize.py                             # ASTRO traces -> out/linearize/astro.jsonl
    python linearize.py config/linearize_direct.py  # Direct baseline -> out/linearize/direct.jsonl
    python linearize.py --trees=t.jsonl --out=o.jsonl --seed=1 \\
        --tokenizer=data/countdown/tokenizer.model

Per tree (a JSON line of search.py, schema in README.md, "JSONL schemas"):
  1. DFS the tree: correct terminals Psi (reward 1) and incorrect terminals Lambda (reward 0).
  2. Psi' = Psi filtered by min_q (the paper's self-evaluation filter; with an exact verifier we
     keep Psi' = Psi).
  3. For each k in cfg.ks: n* ~ Psi', k incorrect terminals with pairwise distinct answers in random
     order, visit them in turn (n* last). Each root->terminal path adds only its nodes not yet
     written, so it continues from the deepest written node it shares: a backtrack there (a restart
     if that node is the root).
  4. Text: step texts in order; before each backtrack the reflection line REFLECT NOT_SURE
     GO_BACK/RESTART; after high-Q steps of n*'s path and after n* the line REFLECT SEEMS_RIGHT
     (the phrases are common.py's).
  5. Replay every trace against its tree (check_trace); any error is a bug and stops the run.
Choices the paper leaves open are documented where they are made (Config, answer_key, astro_traces,
direct_traces, step_text, restate).
"""
import os
import random
import re
from collections import Counter
from dataclasses import dataclass

import common
import tasks  # the one prompt renderer and step delimiter of each task
from common import GO_BACK, NOT_SURE, REFLECT, RESTART, SEEMS_RIGHT


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
    min_q: float = 0.0       # Psi': keep a correct terminal only if every MCTS node on its path has
                             # Q >= min_q
    tries: int = 4           # re-draws of a trace slot that came out identical to an earlier one
    seed: int = 1337         # per-tree RNG = Random(f"{seed}:{tree id}"): order and resume do not
                             # matter
    tokenizer: str = ""      # tokenizer.model path: report lengths in tokens, enables max_tokens
    max_tokens: int = 0      # drop traces longer than this many tokens (0 = no cap)

    ranges = dict(q_high=(0.0, None), min_q=(0.0, 1.0), tries=(1, None), max_tokens=(0, None))


NODE_FIELDS = ("id", "parent", "text", "terminal", "answer", "reward", "Q", "source")
STATS = ("skipped_no_correct", "skipped_min_q", "slots_no_wrong", "k_capped", "duplicates",
         "too_long")


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
    """What 'distinct wrong answers' compares: the stripped answer; None (no answer) is one value of
    its own."""
    return None if node["answer"] is None else str(node["answer"]).strip()


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


def astro_traces(tree, cfg, stats):
    """The ASTRO traces of one tree: one per k in cfg.ks, minus slots without wrong terminals and
    duplicates."""
    nodes, rng = tree["nodes"], random.Random(f"{cfg.seed}:{tree['id']}")
    good = correct_terminals(nodes, cfg.min_q)
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
            # distinct answers, in random order
            wrong = [rng.choice(groups[a]) for a in rng.sample(list(groups), k)]
            order = wrong + [rng.choice(good)]
            text, meta = linearize(tree, order, cfg.q_high)
            if text not in seen:
                break
        if text in seen:  # identical traces would only up-weight one trace of this problem
            stats["duplicates"] += 1
            continue
        seen.add(text)
        traces.append((text, meta, order[:-1]))
    return traces


def direct_traces(tree, cfg, astro):
    """The Direct baseline for one tree, from its ASTRO traces `astro`: per ASTRO trace a plain
    root->n* path (distinct n* while there are enough, then cycling through them again: equal
    example counts matter more than dedup), and per wrong attempt in it that attempt alone, ending
    on its answer line's true verdict (" != 24") and stopping. So both sets teach the same verdicts,
    and the arms differ only in what follows a rejection: going back in context, or nothing."""
    good = correct_terminals(tree["nodes"], cfg.min_q)
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
    or be one attempt ending at a wrong one, the Direct set's rejections)."""
    nodes, rec = tree["nodes"], tree["problem"]
    delim, kids = tasks.step_delimiter(rec), children(nodes)
    wrong = lambda n: nodes[n]["terminal"] and nodes[n]["reward"] != 1
    # Replay states (pos, node, landing, written, wrong answers): more than one only where a
    # restatement or a step text is ambiguous in this tree; the trace is valid if any of them
    # replays it to the end.
    stack, failure = [(0, 0, None, frozenset([0]), frozenset())], (-1, "")
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
                if wrong(c) and a in seen:
                    failure = fail(f"wrong answer {a!r} repeated (node {c})")
                    continue
                stack.append((pos + len(step_text(nodes[c], delim, rec)), c, None, written | {c},
                              seen | {a} if wrong(c) else seen))
    return [failure[1]]


# ----------------------------------------------------------------------------- main

def check_config(cfg):
    if cfg.mode not in ("astro", "direct"):
        raise common.UserError(f"mode must be 'astro' or 'direct', got {cfg.mode!r}")
    if not cfg.ks or any(type(k) is not int or k < 0 for k in cfg.ks):
        raise common.UserError(f"ks must be non-negative ints, got {cfg.ks!r}")
    if cfg.max_tokens and not cfg.tokenizer:
        raise common.UserError("max_tokens needs --tokenizer=<tokenizer.model>")


def tree_records(tree, cfg, stats, ntok):
    """The conversation records of one tree (none if it has no usable correct terminal), each trace
    replayed against the tree first."""
    if not correct_terminals(tree["nodes"], cfg.min_q):  # no correct terminal passes min_q: skip
        stats["skipped_min_q" if terminals(tree["nodes"])[0] else "skipped_no_correct"] += 1
        return []
    traces = astro_traces(tree, cfg, stats)
    if cfg.max_tokens:  # before direct mode counts them, so both sets match per tree
        stats["too_long"] += len(traces)
        traces = [t for t in traces if ntok(t[0]) <= cfg.max_tokens]
        stats["too_long"] -= len(traces)
    if cfg.mode == "direct":  # not length-filtered: one path, rarely the longer
        traces = direct_traces(tree, cfg, traces)
    records = []
    for j, (text, meta, *_) in enumerate(traces):
        errors = check_trace(tree, text, rejected=cfg.mode == "direct")
        if errors:  # our own output failed the replay: a bug in this file, never silently written
            raise RuntimeError(f"linearize bug, tree {tree['id']!r} trace {j}: {errors}\n{text}")
        messages = tasks.prompt_messages(tree["problem"]) + [{"role": "assistant", "content": text}]
        records.append({"id": f"{tree['id']}#{j}", "messages": messages,
                        "meta": {**meta, "mode": cfg.mode}})
    return records


def summarize(cfg, trees, records, stats, ntok):
    """The statistics written next to the output (<out without .jsonl>.stats.json)."""
    n, texts = max(len(records), 1), [r["messages"][-1]["content"] for r in records]
    mean = lambda key: sum(r["meta"][key] for r in records) / n
    return dict(mode=cfg.mode, trees=len(trees), traces=len(records), **stats,
                traces_by_k=dict(sorted(Counter(r["meta"]["k"] for r in records).items())),
                backtracks_per_trace=mean("backtracks"), restarts_per_trace=mean("restarts"),
                positive_per_trace=mean("positive"), solved_share=mean("solved"),
                mean_chars=sum(map(len, texts)) / n,
                mean_tokens=sum(map(ntok, texts)) / n if cfg.tokenizer else None,
                config=common.config_dict(cfg))


def main(cfg):
    check_config(cfg)
    out = cfg.out or f"out/linearize/{cfg.mode}.jsonl"
    tok = None
    if cfg.tokenizer:
        from tokenizer import Tokenizer  # only for token counts
        tok = Tokenizer(cfg.tokenizer)
    ntok = lambda text: len(tok.encode(text)) if tok else 0
    trees = read_trees(cfg.trees)

    records, stats = [], Counter(dict.fromkeys(STATS, 0))
    for tree in trees:
        records += tree_records(tree, cfg, stats, ntok)

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    common.write_jsonl(out, records)
    summary = summarize(cfg, trees, records, stats, ntok)
    common.write_json(os.path.splitext(out)[0] + ".stats.json", summary)
    print(f"{cfg.trees}: {len(trees)} trees ({summary['skipped_no_correct']} without a correct "
          f"terminal) -> {len(records)} {cfg.mode} traces in {out}")
    print({k: round(v, 2) if isinstance(v, float) else v
           for k, v in summary.items() if k != "config"})
    return summary


if __name__ == "__main__":
    common.run_main(main, Config)
