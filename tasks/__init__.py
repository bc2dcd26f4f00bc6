"""
The tasks every stage shares: problems, prompts, the task's tool and the graders, behind one small
dispatch, so search, linearize, RL and eval never ask which task a problem belongs to.

    import tasks
    problems = tasks.read_problems("data/countdown/test.jsonl")
    pred, correct = tasks.grade(problems[0], response)

A record with "numbers" is Countdown (tasks/countdown.py: steps end in "\\n", a calculator tool);
any other is a math problem (tasks/math.py: steps end in "\\n\\n", no tool). The final answer is the
content of the LAST \\boxed{...} of the response. Problem records: README.md, "JSONL schemas".
"""
import re

import common
from . import countdown
from . import math as math_task  # the MATH grader; `math` alone would read as the standard library


def prompt_messages(rec):
    """The one prompt renderer: a problem record -> chat messages (the user turn)."""
    if "numbers" in rec:
        content = countdown.countdown_prompt(rec["numbers"], rec["target"])
    else:
        content = f"{rec['problem']}\n\n{math_task.MATH_INSTRUCTION}"
    return [{"role": "user", "content": content}]


def step_delimiter(rec):
    return "\n" if "numbers" in rec else "\n\n"


def read_problems(path):
    """Problem records of a JSONL file, validated; a bad record is a UserError naming
    file:line: field."""
    recs, seen = common.read_jsonl(path, required=("id", "problem", "answer")), set()
    for r in recs:
        where = f"{path}:{r['_line']}"
        bad = lambda field, msg: common.UserError(f"{where}: {field}: {msg}")
        if not isinstance(r["id"], str) or not r["id"]:
            raise bad("id", f"must be a non-empty string, got {r['id']!r}")
        if r["id"] in seen:
            raise bad("id", f"duplicate id {r['id']!r}")
        seen.add(r["id"])
        for key in ("problem", "answer"):
            if not isinstance(r[key], str):
                raise bad(key, f"must be a string, got {type(r[key]).__name__}")
        if "level" in r and type(r["level"]) is not int:
            raise bad("level", f"must be an int, got {r['level']!r}")
        if "numbers" in r:
            countdown.validate(r, where)
    return recs


def tool(rec, tok, oracle=False):
    """The task's tool for generate.generate (the same in search, RL and eval): Countdown's
    calculator (countdown.tool; oracle=True, the labelled ablation, also writes the grader's
    verdict), or None."""
    return countdown.tool(tok, oracle=oracle) if "numbers" in rec else None


def with_true_verdict(rec, step):
    """A terminal step with the verdict the grader gives on its answer line (Countdown: the
    comparison after the box's value, countdown.with_true_verdict); MATH steps carry none."""
    return countdown.with_true_verdict(rec, step) if "numbers" in rec else step


def extract_boxed(text):
    """Content of the LAST \\boxed{...} (or \\fbox{...}), brace-matched; None if there is none or it
    is unclosed."""
    i, cmd = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
    if i < 0:
        return None
    j = i + len(cmd)
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m and j > i + len(cmd) else None
    depth, k = 0, j
    while k < len(text):
        c = text[k]
        if c == "\\":
            k += 2  # an escaped brace \{ \} is content, not grouping
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[j + 1:k].strip()
        k += 1
    return None


def grade(rec, response):
    """(pred, correct) for a response to a problem record: pred is the last \\boxed{} content
    (None if absent). Safe on any string, bounded in time."""
    pred = extract_boxed(response)
    if pred is None:
        return None, False
    if "numbers" in rec:
        return pred[:1000], countdown.countdown_correct(rec, pred)
    return pred[:1000], math_task.math_equal(rec["answer"], pred)


def answer_key(rec, pred):
    """What maj@k votes on: Countdown, the expression's value (if it uses the numbers correctly);
    math, the normalized answer."""
    if pred is None:
        return None
    if "numbers" in rec:
        p = countdown.countdown_eval(pred.split("=")[0])
        return str(p[0]) if p and sorted(p[1]) == sorted(rec["numbers"]) else "invalid"
    return math_task.normalize_math(pred)[0]


def same_answer(rec, a, b):
    """Whether two answers to a problem are one answer under the task's grader: MATH, math_equal
    (\\frac{1}{2} and 0.5 are one); Countdown, the exact (stripped) text. None (no answer) equals
    only None."""
    if a is None or b is None:
        return a is b
    if "numbers" in rec:
        return a.strip() == b.strip()
    return math_task.math_equal(a, b)


def decisions(rec, response, stopped):
    """[(correct, accepted)] for each answer line (one holding \\boxed{) of a response: correct is
    the grader's judgement of that line's box; accepted is the policy's decision: on Countdown the
    verdict it wrote after the box's value (" == 54" accepts; " != 54", "... but it breaks the
    rules" reject), else whether the response ends there (after at most a "seems correct" line)
    rather than going on (a reflection and a backtrack, or anything else). A last answer line
    without a verdict in a response cut off by the token budget has no decision and is left out."""
    lines = response.split("\n")
    out = []
    for i, line in enumerate(lines):
        if "\\boxed{" not in line:
            continue
        said = countdown.written_verdict(line) if "numbers" in rec else None
        if said is None:
            rest = [ln for ln in lines[i + 1:] if ln.strip()]
            said = not rest or len(rest) == 1 and rest[0].startswith(common.REFLECT) \
                and common.SEEMS_RIGHT in rest[0]
            if said and not stopped:
                continue  # cut off: no decision was made
        out.append((grade(rec, line)[1], said))
    return out


def verdict_score(rec, response, stopped):
    """How well a response judged its own answers: the mean over its decisions (see decisions) of
    +1 for one the grader agrees with and -1 for one it does not; 0 without a decision."""
    ds = decisions(rec, response, stopped)
    return sum(1 if right == accepted else -1 for right, accepted in ds) / max(len(ds), 1)


def count_reflections(text):
    """(backtracks, self-reflections) in a response: GO_BACK/RESTART phrases, and REFLECT
    phrases (common.py's)."""
    return (text.count(common.GO_BACK) + text.count(common.RESTART), text.count(common.REFLECT))
