"""Tests of search.py (MCTS). Run: python -m pytest -q t_search.py
The MCTS core is tested with a scripted policy (no neural net); main() with a tiny random Llama checkpoint."""
import base64
import json
import math
import os
import random

import pytest
import torch

import model
import search
from search import Config, Node, Tree


def write_tokenizer(path):
    """A tiny tiktoken ranks file: the 256 bytes, "\\n\\n", and "<char>\\n", "<char>\\n\\n" for printable chars
    (so steps end on one token, and a random model ends steps often)."""
    toks = [bytes([i]) for i in range(256)] + [b"\n\n"]
    toks += [bytes([c]) + nl for nl in (b"\n", b"\n\n") for c in range(32, 127)]
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks))
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return model.Tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


MATH = {"id": "m1", "problem": "What is (3+4)*2?", "answer": "14"}


def make_tree(tok, rec=MATH, **kw):
    cfg = Config(**kw)
    return Tree(rec, tok, set(tok.ids_containing(search.step_delimiter(rec))), cfg)


def put(t, parent, text, score, N, W, terminal=False, reward=None):
    """Hand-made node."""
    i = len(t.nodes)
    t.nodes.append(Node(i, parent, t.nodes[parent].depth + 1, [], text, "mcts", terminal, None, reward, score, N, W))
    t.nodes[parent].children[text] = i
    return i


def test_puct_selection_and_backup_exact(tok):
    t = make_tree(tok)
    root = t.nodes[0]
    root.expanded, root.N, root.W = True, 10, 4.0
    a = put(t, 0, "a\n\n", 0.1, 6, 3.0)  # Q = 0.5, prior 0.25
    b = put(t, 0, "b\n\n", 0.3, 4, 1.0)  # Q = 0.25, prior 0.75
    assert t.prior(t.nodes[a]) == pytest.approx(0.25) and t.prior(t.nodes[b]) == pytest.approx(0.75)
    assert search.puct(t, root, t.nodes[a], 1.0) == pytest.approx(0.5 + 0.25 * math.sqrt(10) / 7)   # 0.6129
    assert search.puct(t, root, t.nodes[b], 1.0) == pytest.approx(0.25 + 0.75 * math.sqrt(10) / 5)  # 0.7743
    assert search.select(t, 1.0) == b       # exploration wins
    assert search.select(t, 0.0) == a       # greedy on Q
    # one level deeper: b expanded into a correct terminal c and a weak d
    t.nodes[b].expanded = True
    c = put(t, b, "c \\boxed{14}\n\n", 1.0, 1, 1.0, terminal=True, reward=1.0)
    d = put(t, b, "d\n\n", 3.0, 3, 0.0)
    # at b (N=4): c = 1 + 0.25*2/2 = 1.25; d = 0 + 0.75*2/4 = 0.375
    assert search.select(t, 1.0) == c
    t.backup(d, 1.0)
    assert (t.nodes[d].N, t.nodes[d].Q) == (4, pytest.approx(0.25))
    assert (t.nodes[b].N, t.nodes[b].Q) == (5, pytest.approx(2.0 / 5))
    assert (root.N, root.Q) == (11, pytest.approx(5.0 / 11))
    assert (t.nodes[a].N, t.nodes[c].N) == (6, 1)  # off-path nodes untouched


def test_add_merges_duplicates_and_classifies_terminals(tok):
    t = make_tree(tok, max_depth=3)
    s1 = tok.encode("Add 3 and 4.\n\n")
    s2 = tok.encode("Multiply.\n\n")
    i = t.add(0, s1, [-1.0] * len(s1), "mcts")
    assert t.add(0, s1, [-3.0] * len(s1), "rollout") == i  # same text: one child, scores add up
    j = t.add(0, s2, [-2.0] * len(s2), "rollout")
    assert t.nodes[i].source == "mcts" and t.nodes[j].source == "rollout"
    total = math.exp(-1) + math.exp(-3) + math.exp(-2)
    assert t.prior(t.nodes[i]) == pytest.approx((math.exp(-1) + math.exp(-3)) / total)
    assert t.prior(t.nodes[j]) == pytest.approx(math.exp(-2) / total)
    assert not t.nodes[i].terminal and t.nodes[i].text == "Add 3 and 4.\n\n"
    # a boxed step is terminal and graded on the whole response
    k = t.add(i, tok.encode("So \\boxed{14}.\n\n"), [0.0], "mcts")
    assert (t.nodes[k].terminal, t.nodes[k].answer, t.nodes[k].reward) == (True, "14", 1.0)
    # ended on eot: terminal, eot not in the text; no answer -> reward 0
    e = t.add(i, tok.encode("I give up.") + [tok.eot_id], [0.0], "mcts")
    assert (t.nodes[e].terminal, t.nodes[e].text, t.nodes[e].answer, t.nodes[e].reward) == \
        (True, "I give up.", None, 0.0)
    # cut at the token limit (no delimiter at the end): terminal
    assert t.nodes[t.add(i, tok.encode("3 + 4 is"), [0.0], "mcts")].terminal
    # the depth budget: depth 3 is terminal even on a delimiter
    m = t.add(i, tok.encode("More.\n\n"), [0.0], "mcts")
    assert not t.nodes[m].terminal and t.nodes[t.add(m, tok.encode("Even more.\n\n"), [0.0], "mcts")].terminal


def test_rollout_is_cut_into_steps_up_to_the_boxed_step(tok):
    t = make_tree(tok)
    first = t.add(0, tok.encode("Add.\n\n"), [0.0], "mcts")
    ids = tok.encode("7*2=14.\n\nSo \\boxed{14}.\n\nExtra chatter.\n\n") + [tok.eot_id]
    end = t.add_rollout(first, model.Sample(ids, [-0.5] * len(ids), True))
    assert t.response(end) == "Add.\n\n7*2=14.\n\nSo \\boxed{14}.\n\n"
    assert [t.nodes[i].source for i in t.path(end)] == ["mcts", "mcts", "rollout", "rollout"]
    assert t.nodes[end].reward == 1.0 and len(t.nodes) == 4
    # a second rollout sharing the first step merges into it
    ids2 = tok.encode("7*2=14.\n\nSo \\boxed{15}.\n\n")
    end2 = t.add_rollout(first, model.Sample(ids2, [-0.5] * len(ids2), False))
    assert t.nodes[end2].parent == t.nodes[end].parent and t.nodes[end2].reward == 0.0 and len(t.nodes) == 5
    # an empty rollout (no room left) is one empty terminal step
    assert t.nodes[t.add_rollout(first, model.Sample([], [], False))].terminal


# ----------------------------------------------------------------------------- a scripted policy

SCRIPT = {  # response so far -> [(next step, probability)]
    "": [("First add: 3+4=7.\n\n", 0.5), ("First multiply: 4*2=8.\n\n", 0.3), ("Guess.\n\n", 0.2)],
    "First add: 3+4=7.\n\n": [("Then 7*2=14, so \\boxed{14}.\n\n", 0.6), ("Then 7+2=9, so \\boxed{9}.\n\n", 0.4)],
    "First multiply: 4*2=8.\n\n": [("Then 8+3=11, so \\boxed{11}.\n\n", 0.7), ("Then 8*3=24: \\boxed{24}.\n\n", 0.3)],
    "Guess.\n\n": [("\\boxed{13}\n\n", 0.5), ("\\boxed{15}\n\n", 0.5)],
}


def scripted_policy(tok, prompts_by_id, calls=None):
    """Samples steps from SCRIPT. Like model.generate: stops on any stop id, so with the delimiter among the stop ids
    it returns one step, otherwise a whole response ending in <|eot_id|>. Deterministic in (seed, prompt, sample)."""
    delim_ids = set(tok.ids_containing("\n\n"))

    def policy(prompts, nums, *, max_new_tokens, temperature, stop_ids, seed):
        if calls is not None:
            calls.append(len(prompts))
        out = []
        for p, (prefix, n) in enumerate(zip(prompts, nums)):
            prompt = next(q for q in prompts_by_id.values() if prefix[:len(q)] == q)
            so_far = tok.decode(prefix[len(prompt):])
            samples = []
            for s in range(n):
                rng, text, ids, lps = random.Random(f"{seed}/{p}/{s}"), so_far, [], []
                while text in SCRIPT:
                    steps, probs = zip(*SCRIPT[text])
                    step = rng.choices(steps, probs)[0]
                    ids += tok.encode(step)
                    lps += [math.log(probs[steps.index(step)])] * len(tok.encode(step))
                    text += step
                    if delim_ids <= set(stop_ids):
                        break
                else:
                    ids, lps = ids + [tok.eot_id], lps + [0.0]
                samples.append(model.Sample(ids, lps, True))
            out.append(samples)
        return out
    return policy


def check_schema(tree, delim="\n\n"):
    nodes = tree["nodes"]
    assert nodes[0]["parent"] is None and nodes[0]["text"] == "" and nodes[0]["prior"] == 1.0
    kids = {}
    for i, n in enumerate(nodes):
        assert n["id"] == i and n["source"] in ("mcts", "rollout")
        if i:
            assert n["parent"] < i and n["depth"] == nodes[n["parent"]]["depth"] + 1
            assert not nodes[n["parent"]]["terminal"]
            kids.setdefault(n["parent"], []).append(n)
        if n["terminal"]:
            assert n["reward"] in (0.0, 1.0) and n["Q"] == n["reward"]
        else:
            assert n["reward"] is None and n["answer"] is None and n["text"].endswith(delim) or i == 0
    for p, ks in kids.items():
        assert sum(k["prior"] for k in ks) == pytest.approx(1.0)
        assert len({k["text"] for k in ks}) == len(ks)  # duplicates merged
        if not nodes[p]["terminal"]:  # every evaluation through p went through one of its children
            assert nodes[p]["N"] == sum(k["N"] for k in ks)
            assert nodes[p]["Q"] * nodes[p]["N"] == pytest.approx(sum(k["Q"] * k["N"] for k in ks))


def test_scripted_search_finds_the_answer_and_keeps_rollout_terminals(tok):
    recs = [dict(MATH, id=f"m{i}") for i in range(3)]
    prompts = {r["id"]: tok.render_prompt(search.prompt_messages(r)) for r in recs}
    calls = []
    cfg = Config(num_simulations=6, k=4, M=4, early_stop=False)
    trees = search.search(recs, scripted_policy(tok, prompts, calls), tok, cfg, seed=1)
    # per round ONE expansion call for all trees' leaves and ONE rollout call for all their new children
    assert len(calls) <= 2 * cfg.num_simulations and calls[0] == 3 and calls[1] > 3
    for t in trees:
        js = t.to_json()
        check_schema(js)
        assert js["stats"]["solved"] and js["stats"]["simulations"] == 6
        right = [n for n in js["nodes"] if n["reward"] == 1.0]
        assert {n["answer"] for n in right} == {"14"}
        assert t.response(right[0]["id"]) == "First add: 3+4=7.\n\nThen 7*2=14, so \\boxed{14}.\n\n"
        q = {n["text"]: n["Q"] for n in js["nodes"] if n["parent"] == 0}
        assert q["First add: 3+4=7.\n\n"] > q.get("First multiply: 4*2=8.\n\n", 0.0)
        assert {n["source"] for n in js["nodes"] if n["terminal"]} >= {"rollout"}
        assert js["stats"]["rollouts"] > 0
    # same seed -> same trees; another seed -> other trees
    again = search.search(recs, scripted_policy(tok, prompts), tok, cfg, seed=1)
    assert [t.to_json() for t in again] == [t.to_json() for t in trees]
    other = search.search(recs, scripted_policy(tok, prompts), tok, cfg, seed=2)
    assert [t.to_json() for t in other] != [t.to_json() for t in trees]


def test_early_stop_and_in_order_emit(tok):
    recs = [dict(MATH, id=f"m{i}") for i in range(4)]
    prompts = {r["id"]: tok.render_prompt(search.prompt_messages(r)) for r in recs}
    got = []
    cfg = Config(num_simulations=40, k=8, M=8, early_stop=True)
    trees = search.search(recs, scripted_policy(tok, prompts), tok, cfg, seed=3, emit=lambda t: got.append(t))
    assert [t.rec["id"] for t in got] == [r["id"] for r in recs]  # every tree once, in record order
    for t in trees:
        s = t.summary()
        assert s["solved"] and s["wrong_answers"] >= 3 and s["simulations"] < 40


# ----------------------------------------------------------------------------- main() on a tiny random model

@pytest.fixture
def one_thread():
    """The tiny model is latency-bound: one thread is as fast and does not fight other jobs for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_setup(tmp_path, n=5):
    if not hasattr(model, "save_checkpoint"):
        pytest.skip("model.py not written yet")
    tok = model.Tokenizer(write_tokenizer(tmp_path / "tokenizer.model"))
    torch.manual_seed(0)
    net = model.Llama(model.ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_vocab,
                                        max_seq_len=512))
    model.save_checkpoint(str(tmp_path / "policy"), net, tok, {})
    probs = tmp_path / "problems.jsonl"
    rng = random.Random(0)
    with open(probs, "w") as f:
        for i in range(n):
            nums = [rng.randint(1, 9) for _ in range(3)]
            f.write(json.dumps({"id": f"cd{i}", "problem": f"Use {nums} to make {sum(nums)}.", "answer":
                                str(sum(nums)), "numbers": nums, "target": sum(nums), "level": 3}) + "\n")
    return dict(problems=str(probs), policy=str(tmp_path / "policy"), num_simulations=3, k=2, M=3,
                max_step_tokens=6, max_rollout_tokens=16, problems_per_batch=2, seed=5, batch_size=64)


def test_main_resume_is_byte_identical(tmp_path, one_thread):
    kw = tiny_setup(tmp_path)
    search.main(Config(out_dir=str(tmp_path / "a"), **kw))
    full = open(tmp_path / "a" / "trees.jsonl", "rb").read()
    lines = full.splitlines(keepends=True)
    assert [json.loads(x)["id"] for x in lines] == [f"cd{i}" for i in range(5)]
    for x in lines:
        check_schema(json.loads(x), delim="\n")
    stats = json.load(open(tmp_path / "a" / "stats.json"))
    assert stats["trees"] == 5 and stats["decode_tokens"] > 0 and 0 < stats["prefill_per_decode"]
    # killed after the first tree / in the middle of writing the third (a torn line, in a half-done chunk)
    for name, cut in (("one", len(lines[0])), ("torn", len(lines[0]) + len(lines[1]) + len(lines[2]) // 2)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "trees.jsonl", "wb") as f:
            f.write(full[:cut])
        search.main(Config(out_dir=str(tmp_path / name), **kw))
        assert open(tmp_path / name / "trees.jsonl", "rb").read() == full, name
    # a finished file is left alone; changing a search setting on resume is refused
    search.main(Config(out_dir=str(tmp_path / "a"), **kw))
    assert open(tmp_path / "a" / "trees.jsonl", "rb").read() == full
    with pytest.raises(search.common.UserError, match="c_puct"):
        search.main(Config(out_dir=str(tmp_path / "a"), **dict(kw, c_puct=2.0)))


def test_killed_process_resumes_to_the_same_file(tmp_path, one_thread):
    """A real kill (SIGKILL) of a separate process right after its first tree is flushed; then resume here.
    The trees written before the kill must equal this process's (same seed, same single thread)."""
    import subprocess
    import sys
    import time
    kw = dict(tiny_setup(tmp_path, n=4), problems_per_batch=1)
    search.main(Config(out_dir=str(tmp_path / "a"), **kw))
    full = open(tmp_path / "a" / "trees.jsonl", "rb").read()
    out = tmp_path / "b" / "trees.jsonl"
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, os.path.join(here, "search.py"), f"--out_dir={tmp_path / 'b'}",
                          *(f"--{k}={v}" for k, v in kw.items())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path)))
    t0 = time.time()
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1) and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    p.kill()
    p.wait()
    assert 1 <= out.read_bytes().count(b"\n") < full.count(b"\n"), "not killed between the first and last tree"
    search.main(Config(out_dir=str(tmp_path / "b"), **kw))
    assert out.read_bytes() == full


def test_config_files_parse():
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("search_countdown.py", "search_llama_math.py"):
        cfg = search.common.parse_config(Config, [os.path.join(here, "config", name)])
        assert cfg.k >= 1 and cfg.M >= 1 and cfg.num_simulations >= 1
