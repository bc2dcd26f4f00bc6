"""
selfeval.py — Psi', the paper's self-evaluation filter (ASTRO Appendix A.1), used by linearize.py:
the policy judges each correct terminal's solution N times (the paper's N = 8), and the terminal
stays a candidate n* only if every verdict says correct (judge_unanimous=False: a majority), so a
right answer reached by a wrong argument is not cloned.

    python linearize.py config/linearize_llama_math.py   # judges the terminals, then linearizes

A judge is a callable judge(items, n, seed) -> per item (problem record, solution text) a list of n
verdicts: True (correct), False (wrong) or None (no verdict given). policy_judge is the real one: a
checkpoint sampled with generate.py on the chat [the task's prompt as the user turn, the solution as
the assistant's turn, the judge prompt as a user turn], the verdict read from the last \\boxed{} of
its reply (yes or no). The tests also pass scripted judges.

The verdicts go to a JSONL file, one line per terminal, appended chunk by chunk (judge_chunk
terminals per generate call). A killed run resumes: a chunk with a missing verdict is judged again
whole with its own seed (seed + chunk index), so the file holds what an uninterrupted run writes.
The Direct arm reads the verdicts the ASTRO arm wrote: the policy judges once for both.
"""
import os

import checkpoint
import common
import generate
import tasks

# what a verdict depends on, besides the judging policy: a file judged otherwise is not reused
KEY_FIELDS = ("judge_n", "judge_prompt", "judge_temperature", "judge_max_new_tokens",
              "judge_chunk", "seed")


def read_verdicts(path, key):
    """{(tree id, node id): verdicts} of a verdicts file judged with settings `key` ({} if there is
    none; a torn last line is cut off and judged again). A bad line is a UserError naming it."""
    out = {}
    for line, r in enumerate(common.resume_jsonl(path), 1):
        where = f"{path}:{line}"
        for field in ("tree", "node", "verdicts", "judge"):
            if not isinstance(r, dict) or field not in r:
                raise common.UserError(f"{where}: {field}: missing")
        if r["judge"] != key:
            got = r["judge"] if isinstance(r["judge"], dict) else {}
            changed = sorted(k for k in key if got.get(k) != key[k])
            raise common.UserError(f"{where}: judge: judged with other settings "
                                   f"({', '.join(changed)}); delete it or set self_eval elsewhere")
        if not isinstance(r["tree"], str) or type(r["node"]) is not int:
            raise common.UserError(f"{where}: tree, node: must be a tree id and a node id")
        v = r["verdicts"]
        if not isinstance(v, list) or len(v) != key["judge_n"] or any(
                x not in (True, False, None) for x in v):
            raise common.UserError(f"{where}: verdicts: must be {key['judge_n']} of true, false "
                                   "or null")
        out[(r["tree"], r["node"])] = v
    return out


def judge_all(requests, cfg, path, policy, judge=None):
    """{(tree id, node id): verdicts} for requests [(tree id, node id, problem record, solution)]:
    read from `path`, the missing ones judged cfg.judge_n times each by `judge` (None: the policy
    `policy`, loaded only if some are missing) and appended to `path`."""
    key = {"policy": policy, **{k: getattr(cfg, k) for k in KEY_FIELDS}}
    done = read_verdicts(path, key)
    n = cfg.judge_chunk
    chunks = [requests[i:i + n] for i in range(0, len(requests), n)]
    todo = [c for c, chunk in enumerate(chunks) if any(r[:2] not in done for r in chunk)]
    if todo:
        judge = judge or policy_judge(cfg, policy)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for c in todo:
                got = judge([r[2:] for r in chunks[c]], cfg.judge_n, cfg.seed + c)
                for (tree, node, *_), verdicts in zip(chunks[c], got):
                    if (tree, node) not in done:
                        done[tree, node] = list(verdicts)
                        common.append_jsonl(f, {"tree": tree, "node": node,
                                                "verdicts": list(verdicts), "judge": key})
                print(f"self-evaluation: chunk {c + 1}/{len(chunks)} judged", flush=True)
    return {r[:2]: done[r[:2]] for r in requests}


def passes(verdicts, unanimous):
    """Whether a terminal stays in Psi': every verdict says correct, or (unanimous=False) more
    than half do."""
    yes = sum(v is True for v in verdicts)
    return yes == len(verdicts) if unanimous else 2 * yes > len(verdicts)


def parse_verdict(reply):
    """A judge's verdict: the last \\boxed{} of its reply, yes -> True, no -> False, else None."""
    said = (tasks.extract_boxed(reply) or "").strip().strip(".").lower()
    return {"yes": True, "no": False}.get(said)


def judge_messages(rec, solution, prompt):
    """The judge's chat: the task's prompt, the solution as the assistant's turn, the question."""
    return tasks.prompt_messages(rec) + [{"role": "assistant", "content": solution},
                                         {"role": "user", "content": prompt}]


def policy_judge(cfg, policy):
    """The judge that samples the checkpoint `policy` (ours, Meta's or Hugging Face's): the n
    verdicts of an item are n samples of one prompt."""
    device, dtype = common.device_and_dtype(cfg)
    net, tok = checkpoint.load_model(policy, device=device, dtype=dtype)

    def judge(items, n, seed):
        prompts = [tok.render_prompt(judge_messages(rec, text, cfg.judge_prompt))
                   for rec, text in items]
        outs = generate.generate(net, prompts, n, max_new_tokens=cfg.judge_max_new_tokens,
                                 temperature=cfg.judge_temperature, stop_ids=tok.stop_ids,
                                 seed=seed, batch_size=cfg.judge_batch_size)
        return [[parse_verdict(tok.decode(s.tokens)) for s in samples] for samples in outs]
    return judge
