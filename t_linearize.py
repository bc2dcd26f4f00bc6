"""Tests for linearize.py (Algorithm 1, phrases, direct mode, replay checker, bad input). Run:
    python -m pytest -q t_linearize.py
"""
import json
from collections import Counter

import pytest

import common
import linearize as L
from linearize import GO_BACK, NOT_SURE, REFLECT, RESTART, SEEMS_RIGHT

BACK = f"{REFLECT} {NOT_SURE} {GO_BACK} "
OK = f"{REFLECT} {SEEMS_RIGHT}\n"


def node(i, parent, text, Q=0.5, answer=None, reward=None, source="mcts"):
    return {"id": i, "parent": parent, "depth": 0, "text": text, "prior": 1.0, "N": 1, "Q": Q,
            "terminal": reward is not None, "answer": answer, "reward": reward, "source": source}


def countdown_tree(tid="p1"):
    """Countdown-style tree (delimiter "\\n"):
        0 root ── 1 a ── 2 b ── 3 wrong "1"
              │      └─ 4 c ── 5 correct "24"
              └─ 6 d ── 7 wrong "2"
                   └─ 8 wrong "1"   (same wrong answer as 3)
    """
    nodes = [node(0, None, ""), node(1, 0, "a=1 (left 2)\n"), node(2, 1, "b\n"),
             node(3, 2, "w \\boxed{1}\n", answer="1", reward=0.0), node(4, 1, "c\n"),
             node(5, 4, "ok \\boxed{24}\n", answer="24", reward=1.0), node(6, 0, "d\n"),
             node(7, 6, "x \\boxed{2}\n", answer="2", reward=0.0), node(8, 6, "y \\boxed{1}\n", answer="1", reward=0.0)]
    problem = {"id": tid, "problem": "Use 1 2 to make 24", "answer": "24", "numbers": [1, 2], "target": 24}
    return {"id": tid, "problem": problem, "nodes": nodes, "stats": {}}


def test_backtrack_to_lca_exact_text():
    tree = countdown_tree()
    text, meta = L.linearize(tree, [3, 5], q_high=0.75)
    assert text == ("a=1 (left 2)\nb\nw \\boxed{1}\n" + BACK + "had a=1 (left 2).\n"
                    + "c\nok \\boxed{24}\n" + OK)
    assert meta == {"k": 1, "backtracks": 1, "restarts": 0, "positive": 1}
    # the paper's phrases, spelled out once (spec/API.md)
    assert ("\nBut wait, are we solving the problem correctly so far? Hmm... I'm not sure if we're solving the "
            "problem correctly so far. Let's go back to where we had a=1 (left 2).\n") in text
    assert text.endswith("\nBut wait, are we solving the problem correctly so far? Hmm... Our solution seems to be "
                         "correct so far.\n")
    assert L.check_trace(tree, text) == []


def test_restart_when_shared_node_is_root():
    tree = countdown_tree()
    text, meta = L.linearize(tree, [7, 5], q_high=0.75)
    assert text == "d\nx \\boxed{2}\n" + f"{REFLECT} {NOT_SURE} {RESTART}\n" + "a=1 (left 2)\nc\nok \\boxed{24}\n" + OK
    assert meta["restarts"] == 1 and meta["backtracks"] == 1
    # the jump after 3 lands on node 1, which is not an ancestor of the previous terminal 7: still valid
    text, meta = L.linearize(tree, [7, 3, 5], q_high=0.75)
    assert text.count(RESTART) == 1 and text.count(GO_BACK) == 1 and L.check_trace(tree, text) == []


def test_positive_reflection_only_on_final_path_high_q_mcts_steps():
    tree = countdown_tree()
    tree["nodes"][4]["Q"] = 0.9   # on n*'s path -> reflection
    tree["nodes"][2]["Q"] = 0.9   # on a wrong branch -> none
    text, meta = L.linearize(tree, [3, 5], q_high=0.75)
    assert "b\nw" in text and "c\n" + OK + "ok" in text and meta["positive"] == 2
    tree["nodes"][4]["source"] = "rollout"  # a rollout node's Q is one sample, not an MCTS estimate
    assert L.linearize(tree, [3, 5], q_high=0.75)[1]["positive"] == 1
    plain, _ = L.linearize(tree, [5], q_high=0.75, reflect=False)
    assert plain == "a=1 (left 2)\nc\nok \\boxed{24}\n"


def test_restate():
    assert L.restate({"text": "25+50=75 (left 3 7 75)\n"}) == "had 25+50=75 (left 3 7 75)"
    assert L.restate({"text": "We get $x = 2.5$. Then we add.\n\n"}) == "had we get $x = 2.5$"
    assert L.restate({"text": "\n"}) == "had that step"


def test_distinct_wrong_answers_and_k_cap():
    tree = countdown_tree()
    cfg = L.Config(ks=(0, 1, 1, 2, 3, 3))
    for seed in range(20):
        cfg.seed, stats = seed, Counter()
        for text, meta in L.astro_traces(tree, cfg, stats):
            assert L.check_trace(tree, text) == []
            assert meta["k"] <= 2  # only 2 distinct wrong answers ("1", "2")
            answers = [a for a in ("\\boxed{1}", "\\boxed{2}") if a in text]
            assert len(answers) == meta["k"] and text.count("\\boxed{1}") <= 1
        assert stats["k_capped"] == 2  # the two k=3 slots
    # no wrong terminal at all: only the direct trace
    only_good = countdown_tree()
    only_good["nodes"] = [node(0, None, ""), node(1, 0, "c\n"), node(2, 1, "ok \\boxed{24}\n", answer="24", reward=1)]
    stats = Counter()
    traces = L.astro_traces(only_good, L.Config(), stats)
    assert [m["k"] for _, m in traces] == [0] and stats["slots_no_wrong"] == 3


def test_none_answer_is_one_distinct_value():
    tree = countdown_tree()
    for i in (3, 8):
        tree["nodes"][i]["answer"] = None
    seen = set()
    for seed in range(30):
        for text, meta in L.astro_traces(tree, L.Config(seed=seed, ks=(2,)), Counter()):
            assert not ("w \\boxed" in text and "y \\boxed" in text)  # both answer None: never together
            seen.add(meta["k"])
    assert seen == {2}


def test_checker_rejects_broken_traces():
    tree = countdown_tree()
    good, _ = L.linearize(tree, [3, 5], q_high=0.75)
    # wrong final answer
    errs = L.check_trace(tree, "a=1 (left 2)\nb\nw \\boxed{1}\n")
    assert any("not at a correct terminal" in e for e in errs)
    # backtrack to a node never written (node 6 "d" was not written)
    broken = "a=1 (left 2)\nb\nw \\boxed{1}\n" + BACK + "had d.\n" + "x \\boxed{2}\n"
    assert any("never written" in e for e in L.check_trace(tree, broken))
    # the same wrong answer twice (3 and 8 both answer "1")
    repeated, _ = L.linearize(tree, [3, 8, 5], q_high=0.75)
    assert any("repeated" in e for e in L.check_trace(tree, repeated))
    # a step that is not a child of the current node, and a backtrack not after a wrong terminal
    assert L.check_trace(tree, good.replace("b\n", "c\n", 1))
    assert any("not right after a wrong terminal" in e
               for e in L.check_trace(tree, "a=1 (left 2)\n" + f"{REFLECT} {NOT_SURE} {RESTART}\n"))
    assert any("malformed" in e for e in L.check_trace(tree, good.replace(NOT_SURE, "hmm")))


def write_trees(path, trees):
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))


def make_trees():
    no_good = countdown_tree("p3")
    no_good["nodes"][5].update(reward=0.0, answer="23")
    return [countdown_tree("p1"), countdown_tree("p2"), no_good]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_main_end_to_end_direct_matches_and_determinism(tmp_path):
    write_trees(tmp_path / "trees.jsonl", make_trees())
    kw = dict(trees=str(tmp_path / "trees.jsonl"), seed=3)
    s = L.main(L.Config(out=str(tmp_path / "astro.jsonl"), **kw))
    astro = read(tmp_path / "astro.jsonl")
    assert s["trees"] == 3 and s["skipped_no_correct"] == 1 and s["traces"] == len(astro) > 2
    assert json.loads((tmp_path / "astro.stats.json").read_text())["traces"] == len(astro)
    for r in astro:
        user, asst = r["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant" and r["meta"]["mode"] == "astro"
        assert asst["content"].endswith(OK) and r["id"].split("#")[0] in ("p1", "p2")
        assert r["meta"]["k"] == asst["content"].count(NOT_SURE)
    assert {r["meta"]["k"] for r in astro} >= {0, 1}
    for tid in ("p1", "p2"):  # dedup is per tree (p1 and p2 are the same tree, so they may share texts)
        texts = [r["messages"][1]["content"] for r in astro if r["id"].startswith(tid + "#")]
        assert len(set(texts)) == len(texts)
    L.main(L.Config(out=str(tmp_path / "direct.jsonl"), mode="direct", **kw))
    direct = read(tmp_path / "direct.jsonl")
    count = lambda rs: Counter(r["id"].split("#")[0] for r in rs)
    assert count(direct) == count(astro)
    assert all(REFLECT not in r["messages"][1]["content"] and r["meta"]["k"] == 0 for r in direct)
    # deterministic, and independent of tree order
    L.main(L.Config(out=str(tmp_path / "again.jsonl"), **kw))
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "astro.jsonl").read_bytes()
    write_trees(tmp_path / "rev.jsonl", make_trees()[::-1])
    L.main(L.Config(out=str(tmp_path / "rev_out.jsonl"), trees=str(tmp_path / "rev.jsonl"), seed=3))
    by_id = lambda rs: {r["id"]: r for r in rs}
    assert by_id(read(tmp_path / "rev_out.jsonl")) == by_id(astro)


def test_direct_repeats_when_too_few_correct_terminals(tmp_path):
    tree = countdown_tree()  # one correct terminal, so every direct example is the same path
    astro = L.astro_traces(tree, L.Config(), Counter())
    direct = L.direct_traces(tree, L.Config(), len(astro))
    assert len(direct) == len(astro) == 4 and len({t for t, _ in direct}) == 1


def test_bad_input_errors(tmp_path):
    path = tmp_path / "trees.jsonl"
    cases = [("nodes", lambda t: t.pop("nodes"), "trees.jsonl:2: missing field 'nodes'"),
             ("parent", lambda t: t["nodes"][3].update(parent=7), "trees.jsonl:2: nodes[3].parent"),
             ("field", lambda t: t["nodes"][4].pop("Q"), "trees.jsonl:2: nodes[4].Q: missing"),
             ("reward", lambda t: t["nodes"][5].update(reward=None), "trees.jsonl:2: nodes[5].reward"),
             ("id", lambda t: t["nodes"][2].update(id=5), "trees.jsonl:2: nodes[2].id")]
    for _, edit, msg in cases:
        bad = countdown_tree("p2")
        edit(bad)
        write_trees(path, [countdown_tree("p1"), bad])
        with pytest.raises(common.UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            L.main(L.Config(trees=str(path), out=str(tmp_path / "o.jsonl")))
    with pytest.raises(common.UserError, match="mode"):
        L.main(L.Config(mode="bogus"))


def test_duplicates_dropped_and_math_delimiter():
    tree = countdown_tree()
    tree["nodes"] = tree["nodes"][:6]  # one wrong terminal, one correct: only 2 different traces exist
    stats = Counter()
    traces = L.astro_traces(tree, L.Config(), stats)
    assert [m["k"] for _, m in traces] == [0, 1] and stats["duplicates"] == 2 and stats["k_capped"] == 1
    # MATH-style record (no "numbers"): blank-line delimiter, also appended to a terminal that lacks it
    math = {"id": "m", "problem": {"id": "m", "problem": "1+1?", "answer": "2"}, "stats": {},
            "nodes": [node(0, None, ""), node(1, 0, "We add. It is easy.\n\n"),
                      node(2, 1, "So \\boxed{3}", answer="3", reward=0),
                      node(3, 1, "So \\boxed{2}", answer="2", reward=1)]}
    text, _ = L.linearize(math, [2, 3], q_high=0.75)
    assert text == ("We add. It is easy.\n\nSo \\boxed{3}\n\n" + BACK + "had we add.\n\n"
                    + "So \\boxed{2}\n\n" + OK.replace("\n", "\n\n"))
    assert L.check_trace(math, text) == []


def random_tree(rng, tid, n=40):
    """A random Countdown-style tree: every leaf is a terminal with one of a few answers."""
    nodes = [node(0, None, "")]
    for i in range(1, n):
        p = rng.randrange(i)
        while nodes[p]["terminal"]:
            p = rng.randrange(i)
        nodes.append(node(i, p, f"s{i} (left {rng.randrange(3)})\n", Q=rng.random(),
                          source=rng.choice(["mcts", "rollout"])))
    kids = L.children(nodes)
    for nd in nodes[1:]:
        if not kids[nd["id"]]:
            a = rng.choice(["24", "1", "2", "3", None])
            boxed = nd["text"].rstrip("\n") + f" \\boxed{{{a}}}"  # no delimiter: as if the model stopped
            nd.update(terminal=True, answer=a, reward=float(a == "24"), text=boxed)
    problem = {"id": tid, "problem": "p", "answer": "24", "numbers": [1, 2], "target": 24}
    return {"id": tid, "problem": problem, "nodes": nodes, "stats": {}}


def test_random_trees_replay_cleanly(tmp_path):
    import random
    rng = random.Random(0)
    trees = [random_tree(rng, f"r{i}") for i in range(40)]
    write_trees(tmp_path / "trees.jsonl", trees)
    s = L.main(L.Config(trees=str(tmp_path / "trees.jsonl"), out=str(tmp_path / "a.jsonl"), ks=(0, 1, 2, 3)))
    assert s["traces"] > 40 and s["backtracks_per_trace"] > 1 and s["restarts_per_trace"] > 0  # main replays each
    for r in read(tmp_path / "a.jsonl"):
        text = r["messages"][1]["content"]
        answers = [t.split("\\boxed{")[1].split("}")[0] for t in text.split("\n") if "\\boxed{" in t]
        assert answers[-1] == "24" and len(set(answers[:-1])) == len(answers) - 1 == r["meta"]["k"]
    # identical step texts in different places (restatements and steps become ambiguous): still no false alarm
    for tree in trees:
        for nd in tree["nodes"][1:]:
            nd["text"] = f"s{nd['id'] % 3}" + nd["text"][nd["text"].index(" "):]
        if L.correct_terminals(tree["nodes"], 0.0):
            for text, _ in L.astro_traces(tree, L.Config(ks=(0, 1, 2, 3)), Counter()):
                assert L.check_trace(tree, text) == []


def test_steps_verbatim_and_positive_reflection_only_at_line_ends():
    tree = countdown_tree()
    tree["nodes"][1].update(text="a=1 (left 2)\n(", Q=0.9)  # the delimiter inside a token: the line goes on
    tree["nodes"][4].update(text="c)\n", Q=0.9)
    text, meta = L.linearize(tree, [5], q_high=0.75)
    assert text == "a=1 (left 2)\n(c)\n" + OK + "ok \\boxed{24}\n" + OK and meta["positive"] == 2
    assert L.check_trace(tree, text) == []


def test_token_lengths_and_max_tokens(tmp_path):
    import base64
    # a byte-level tokenizer (256 single-byte ranks): one token per byte of ASCII text
    (tmp_path / "tok.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    write_trees(tmp_path / "trees.jsonl", make_trees())
    kw = dict(trees=str(tmp_path / "trees.jsonl"), tokenizer=str(tmp_path / "tok.model"))
    s = L.main(L.Config(out=str(tmp_path / "all.jsonl"), **kw))
    assert s["mean_tokens"] == s["mean_chars"] and s["too_long"] == 0
    cap = min(len(r["messages"][1]["content"]) for r in read(tmp_path / "all.jsonl") if r["meta"]["k"] == 1)
    s = L.main(L.Config(out=str(tmp_path / "cut.jsonl"), max_tokens=cap, **kw))
    kept = read(tmp_path / "cut.jsonl")
    assert s["too_long"] > 0 and all(len(r["messages"][1]["content"]) <= cap for r in kept)
    assert {r["meta"]["k"] for r in kept} == {0, 1}
    L.main(L.Config(out=str(tmp_path / "d.jsonl"), max_tokens=cap, mode="direct", **kw))
    assert len(read(tmp_path / "d.jsonl")) == len(kept)
    with pytest.raises(common.UserError, match="max_tokens needs"):
        L.main(L.Config(trees=kw["trees"], max_tokens=10))
