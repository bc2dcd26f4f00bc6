"""
eval.py — the tasks every stage shares (problems, prompts, graders) and the evaluation of a checkpoint.

    python eval.py                                                   # out/rl_astro on data/countdown/test.jsonl
    python eval.py --init=out/sft_astro --num_samples=8 --greedy=True  # + one greedy answer per problem
    python eval.py --init=out/base --temperature=0                   # greedy decoding only
    python eval.py --init=/models/Llama-3.1-8B-Instruct --data=data/math/math500.jsonl --num_samples=16 \
        --max_new_tokens=4096 --device=cuda --dtype=bfloat16

Output: out/eval/<init name>-<data name>/ (or --out_dir): predictions.jsonl (every sample: id, sample index (-1 =
the extra greedy one), response, pred, correct, tokens, backtracks, reflections, stopped), appended as problems
finish, so a killed eval resumes and skips finished problems; summary.json (atomic); a printed table.

Tasks: a record with "numbers" is Countdown (steps end in "\n"), any other is a math problem (steps end in "\n\n").
The final answer is the content of the LAST \\boxed{...} of the response.
Metrics: pass@1 = mean over problems of the share of correct samples, with a 95% percentile-bootstrap interval over
problems (problems are what varies between benchmark draws; 1000 resamples, fixed seed); maj@k = majority vote over
the k = num_samples answers (votes keyed by the normalized answer); per-level pass@1; mean response length in
generated tokens (stop token included); backtracks and self-reflections per response (count_reflections); the share
of truncated responses (no stop token); Pearson r between a sample's backtracks and its correctness.

Graders never eval() model text. Countdown: a tiny recursive-descent parser over Fractions. MATH: LaTeX
normalization, then exact string, then exact rational numbers (in-process: the common fast path), then sympy on a
sanitized, whitelisted de-LaTeXed string in a separate worker process with a hard timeout. A process (not
signal.alarm) because the timeout must work off the main thread (rl/search may grade from threads); one long-lived
worker forked on first use (fork: starts instantly with sympy already imported; the child runs only sympy and the
pipe, never torch) and killed and replaced when an answer times out.
"""
import json
import multiprocessing as mp
import os
import re
import string
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

import common


@dataclass
class Config:
    init: str = "out/rl_astro"               # checkpoint dir (ours, Meta or Hugging Face; see model.load_model)
    data: str = "data/countdown/test.jsonl"  # problems (JSONL, schema in README.md, "JSONL schemas")
    out_dir: str = ""                        # "" = out/eval/<init name>-<data name>
    limit: int = 0                           # evaluate only the first `limit` problems (0 = all)
    num_samples: int = 4                     # sampled answers per problem (n of pass@1 and k of maj@k)
    temperature: float = 1.0                 # 0 = greedy decoding, one answer per problem
    top_p: float = 1.0                       # nucleus sampling (1.0 = off)
    top_k: int = 0                           # top-k sampling (0 = off)
    greedy: bool = False                     # also decode one greedy answer per problem (greedy accuracy)
    max_new_tokens: int = 512                # generation budget; responses that hit it count as truncated
    chunk: int = 64                          # problems per generate() call; predictions are written per chunk
    batch_size: int = 256                    # sequences decoded at once inside generate()
    seed: int = 0                            # sampling seed (chunk i uses seed + its first problem's index)
    device: str = ""                         # "" = cuda if available else cpu
    dtype: str = "float32"                   # float32 | bfloat16 | float16
    compile: bool = False                    # torch.compile the decode step


# ----------------------------------------------------------------------------- problems and prompts

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def countdown_prompt(numbers, target):
    """The Countdown problem statement (data/countdown/prepare.py writes it as the record's "problem")."""
    # Short on purpose: every stage re-reads the prompt (training, search prefill, RL, eval) on a CPU budget.
    return f"Make {target} from {' '.join(map(str, numbers))} with + - * /, each number once, answer in \\boxed{{}}."


def prompt_messages(rec):
    """The one prompt renderer: a problem record -> chat messages (the user turn)."""
    if "numbers" in rec:
        return [{"role": "user", "content": countdown_prompt(rec["numbers"], rec["target"])}]
    return [{"role": "user", "content": f"{rec['problem']}\n\n{MATH_INSTRUCTION}"}]


def step_delimiter(rec):
    return "\n" if "numbers" in rec else "\n\n"


CALC = re.compile(r"(?<![\d.])(\d{1,6})([-+*/])(\d{1,6})=$")  # "...11*4=" at the end of the text so far
TARGET = re.compile(r"Make (\d+) from ([\d ]+) with")  # target and numbers in a Countdown prompt (countdown_prompt)
BOXED_LINE = re.compile(r".*\\boxed\{(.*)\}=")  # an answer line's boxed expression (greedy: up to its last "}=")
LEFT = re.compile(r" left ([\d ]+)\.?$")  # the numbers left at the end of a step line, or of a go-back's restated step


def numbers_left(numbers, text):
    """The numbers left after the complete lines `text` of a Countdown response: the start numbers, replaced by the
    list of each step line ("... left 7 61") and of the step a go-back restates, reset by a restart."""
    import linearize  # here, not at the top: linearize imports eval
    left = list(numbers)
    for line in text.split("\n"):
        if linearize.RESTART in line:
            left = list(numbers)
        elif m := LEFT.search(line):
            left = [int(n) for n in m[1].split()]
    return left


def tool(rec, tok):
    """The task's tool for model.generate (the same in search, RL and eval), or None. Countdown has a calculator:
    when the policy writes "a op b=", the sampler writes the result (integer results only: a - b with a >= b, exact
    division; anything else is left to the model) and, on a step line whose a and b are among the numbers left
    (numbers_left), the numbers left after it, ending the line: "36 left 7 25 36\\n". On the \\boxed{} line it
    writes the value of the boxed expression itself and the grader's verdict (countdown_correct) on the row's own
    problem, and ends the line: "=12*2=24 == 24\\n" when the box solves it, "=18+8=26 != 24\\n" when its value
    differs, "... == 24 but the numbers are wrong\\n" when it reaches the target without using each number once,
    "invalid != 24\\n" when the box is malformed or divides by zero. A policy that miscopies an operand ("=25-22="
    after "(25-11)...") gets the box's true value, not the target it wished for (89% of the "==" in run 8's trees
    were such copies).
    Why a calculator at all: the miniature is about search, not about a 1M-parameter model learning arithmetic;
    with its own arithmetic a third of the steps were wrong, and even with exact results it never learned to
    compare its value with the target in the budget, so its reflections could not tell right answers from wrong
    ones (EXPERIMENTS.md, runs 3-9). Why the numbers left: after a backtrack the 1M-parameter policy lost track of
    them (79% of its steps after a first 4-number attempt were wrong; EXPERIMENTS.md, run 15). The model still
    chooses every operation, copies its operands, and decides when to reflect, where to go back and what to try
    next."""
    if "numbers" not in rec:
        return None
    import linearize  # here, not at the top: linearize imports eval
    triggers = [i for i in tok.ids_containing("=") if tok.decode([i]).endswith("=")]

    def calculator(prompt, ids):
        text = tok.decode(list(prompt) + ids)  # the prompt may end in part of the response (search's node paths)
        line = text.rsplit("\n", 1)[-1]
        m = CALC.search(line)
        if not m:
            return []
        target, numbers = TARGET.search(text).groups()  # THIS row's problem
        row = {"target": int(target), "numbers": [int(n) for n in numbers.split()]}
        if "\\boxed{" in line:  # the answer's line: judge the box, and end the line
            box = BOXED_LINE.match(line)  # None: "a op b=" inside an unclosed box
            parsed = countdown_eval(box[1]) if box else None  # (value, literals), or None: malformed, x/0
            if parsed is None:
                return tok.encode(f"invalid != {target}\n")
            value, ok = parsed[0], countdown_correct(row, box[1])
            verdict = "==" if value == row["target"] else "!="
            wrong_numbers = "" if ok or verdict == "!=" else " but the numbers are wrong"
            return tok.encode(f"{value} {verdict} {target}{wrong_numbers}\n")  # a Fraction prints as 54 or 61/7
        value = (countdown_eval(m[0][:-1]) or (None,))[0]  # the grader's arithmetic (None: division by zero)
        if value is None or value < 0 or value.denominator != 1:  # illegal moves are left to the model
            return []
        if linearize.REFLECT in line:  # a go-back restating a step: the model restates the rest itself
            return tok.encode(str(int(value)))
        left = numbers_left(row["numbers"], text[: len(text) - len(line)])
        for n in (int(m[1]), int(m[3])):
            if n not in left:  # an operand that is not left: the model's own mistake, the rest of the line is its own
                return tok.encode(str(int(value)))
            left.remove(n)
        return tok.encode(f"{int(value)} left {' '.join(map(str, left + [int(value)]))}\n")
    return triggers, calculator


def read_problems(path):
    """Problem records of a JSONL file, validated; a bad record is a UserError naming file:line: field."""
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
        isint = lambda v: type(v) is int
        if "level" in r and not isint(r["level"]):
            raise bad("level", f"must be an int, got {r['level']!r}")
        if "numbers" in r:
            nums = r["numbers"]
            if not (isinstance(nums, list) and 2 <= len(nums) <= 8 and all(isint(n) and 0 <= n < 10**6 for n in nums)):
                raise bad("numbers", f"must be a list of 2-8 ints in [0, 1e6), got {nums!r}")
            if not isint(r.get("target")):
                raise bad("target", f"Countdown records need an int target, got {r.get('target')!r}")
            if r["answer"] != str(r["target"]):
                raise bad("answer", f"must be str(target) = {str(r['target'])!r}, got {r['answer']!r}")
            if r.get("level", len(nums)) != len(nums):
                raise bad("level", f"a Countdown level is the count of numbers ({len(nums)}), got {r['level']}")
    return recs


def count_reflections(text):
    """(backtracks, self-reflections) in a response: GO_BACK/RESTART phrases, and REFLECT phrases."""
    import linearize  # here, not at the top: linearize imports eval, and either may be imported first
    return (text.count(linearize.GO_BACK) + text.count(linearize.RESTART), text.count(linearize.REFLECT))


def extract_boxed(text):
    """Content of the LAST \\boxed{...} (or \\fbox{...}), brace-matched; None if there is none or it is unclosed."""
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


# ----------------------------------------------------------------------------- Countdown grader

CD_MAX_CHARS = 300  # longest expression graded (a 6-number expression needs < 60 chars)


def countdown_eval(s):
    """(value, integer literals) of an expression over integers with + - * / and parentheses, or None if it is
    malformed, too long or divides by zero. Recursive descent over Fractions; no eval, no unary minus."""
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"), ("\\left", ""),
                 ("\\right", ""), ("{", "("), ("}", ")")):
        s = s.replace(a, b)
    if len(s) > CD_MAX_CHARS:
        return None
    toks, pos, lits = re.findall(r"[0-9]+|\S", s), 0, []

    def take(*ok):
        nonlocal pos
        if pos < len(toks) and toks[pos] in ok:
            pos += 1
            return toks[pos - 1]

    def expr(d):
        v = term(d)
        while op := take("+", "-"):
            v = v + term(d) if op == "+" else v - term(d)
        return v

    def term(d):
        v = atom(d)
        while op := take("*", "/"):
            w = atom(d)
            if op == "/" and w == 0:
                raise ValueError("division by zero")
            v = v * w if op == "*" else v / w
        return v

    def atom(d):
        nonlocal pos
        if d > 40 or pos >= len(toks):
            raise ValueError("too deep or ends early")
        if take("("):
            v = expr(d + 1)
            if not take(")"):
                raise ValueError("unclosed (")
            return v
        t = toks[pos]
        if not (t[0] in string.digits and len(t) <= 9):
            raise ValueError(f"unexpected {t!r}")
        pos += 1
        lits.append(int(t))
        return Fraction(int(t))

    try:
        v = expr(0)
    except ValueError:
        return None
    return (v, lits) if pos == len(toks) else None


def countdown_correct(rec, pred):
    """Correct iff the expression uses each given number exactly once and equals the target exactly.
    "expr = 64" is accepted when every side after the first is a plain value equal to it."""
    sides = pred.split("=")
    parsed = [countdown_eval(s) for s in sides]
    if any(p is None for p in parsed) or any(len(p[1]) != 1 or p[0] != parsed[0][0] for p in parsed[1:]):
        return False
    value, lits = parsed[0]
    return sorted(lits) == sorted(rec["numbers"]) and value == rec["target"]


# ----------------------------------------------------------------------------- MATH grader

MATH_MAX_CHARS = 400   # longer answers are compared as exact strings only
MATH_TIME_LIMIT = 5.0  # seconds of symbolic work per graded answer (all its elements together)
SYMPY_TIMEOUT = 2.0    # seconds per symbolic comparison; the worker is killed past it

_REPLACE = [("\\left", ""), ("\\right", ""), ("\\quad", " "), ("\\qquad", " "), ("\\displaystyle", ""),
            ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""),
            ("\\circ", ""), ("\\degree", ""), ("°", ""),
            ("\\$", ""), ("$", ""), ("\\%", "%"), ("{,}", ","), ("\\leq", "\\le"), ("\\geq", "\\ge"),
            ("\\neq", "\\ne"), ("\\times", "*"), ("\\cdot", "*"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"),
            ("bmatrix", "pmatrix"), ("\\dots", "..."), ("\\ldots", "..."), ("\\mp", "\\pm")]
_UNITS = ("units?|cm|centimeters?|mm|millimeters?|m|meters?|km|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|yd|"
          "miles?|mi|mph|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|dollars?|cents?|"
          "degrees?|pounds?|lbs?|ounces?|oz|gallons?|liters?|grams?|g|kg|points?|people|students|ways")
_UNIT_RE = re.compile(r"(?<=[\d}])\s+(?:(?:square|sq\.?|cubic)\s+)?(?:" + _UNITS + r")(?:\s*\^\{?[23]\}?)?\.?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname|boldsymbol)\s*\{([^{}]*)\}")


def normalize_math(s):
    """(canonical string, had a percent sign) of a LaTeX answer: strips presentation (\\left, spacing, \\text,
    units, degrees, $), unifies \\dfrac/\\tfrac, \\frac12, \\sqrt2, x^{2}, .5, 1,000, "x = 5" -> "5", (C) -> C."""
    s = s.strip()
    if len(s) > MATH_MAX_CHARS:
        return s, False
    s = _TEXT_RE.sub(r" \1 ", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]", " ", s)  # spacing commands, but not the row break \\ before a space
    for a, b in _REPLACE:
        s = s.replace(a, b)
    pct = "%" in s
    s = s.replace("%", "").strip()
    while (t := _UNIT_RE.sub("", s).strip()) != s and t:
        s = t
    s = re.sub(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])", "", s)  # keep a space only between letters: "\cot x"
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = re.sub(r"(?<=[\d}])\.$", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = strip_var(s)
    if m := re.fullmatch(r"\(([A-E])\)", s):
        s = m.group(1)
    if re.fullmatch(r"[A-Za-z][A-Za-z ]+", s):
        s = s.lower()
    return s, pct


def strip_var(s):
    """'x=5' -> '5', 'x\\in[1,2]' -> '[1,2]': a bare variable name on the left is not part of the answer."""
    m = re.fullmatch(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w)?(?:=|\\in)([^=]+)", s)
    return m.group(1) if m else s


def _top_split(s, sep):
    """Split s at `sep` outside any (), [], {} (interval brackets may mismatch: depth ignores bracket kind)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [s[start:]]


def _elements(s):
    """(kind, elements) of a compound answer, or (None, [s]) for a scalar. Kinds: "set" (bare list, \\{..\\},
    union of intervals, a +- b: unordered), "(]"-style tuples/intervals (ordered), "matrix RxC" (ordered)."""
    if m := re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s):
        rows = [r.split("&") for r in m.group(1).split("\\\\")]
        if len({len(r) for r in rows}) == 1:
            return f"matrix {len(rows)}x{len(rows[0])}", [e for r in rows for e in r]
    if len(parts := _top_split(s, "\\cup")) > 1:
        return "set", parts
    kind, inner = "set", s
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
    elif s[:1] in "([" and s[-1:] in ")]" and _balanced_inside(s):
        kind, inner = s[0] + s[-1], s[1:-1]
    parts = _top_split(inner, ",")
    if kind == "set":
        parts = [x for p in parts for x in ([p.replace("\\pm", "+", 1), p.replace("\\pm", "-", 1)]
                                             if p.count("\\pm") == 1 else [p])]
    return (None, [s]) if len(parts) == 1 else (kind, parts)  # "(5)" and "5" are scalars


def _balanced_inside(s):
    """True if the bracket opening s closes only at its very end (so "(a+5)(b+2)" is not one group)."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def _number(s):
    """Exact Fraction of a plain number: 5, -0.25, 3/4, \\frac{3}{4}, -\\frac{3}{4}, 1\\frac{4}{5}; else None."""
    if len(s) > 60:
        return None
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return Fraction(s)
    if m := re.fullmatch(r"(-?)(\d+)?\\frac\{(\d+)\}\{(\d+)\}", s) or re.fullmatch(r"(-?)()(\d+)/(\d+)", s):
        sign, whole, p, q = m.groups()
        if int(q) == 0:
            return None
        v = int(whole or 0) + Fraction(int(p), int(q))  # 1\frac{4}{5} is a mixed number, 9/5
        return -v if sign else v
    return None


_FUNCS = {"\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\cot": "cot", "\\sec": "sec", "\\csc": "csc",
          "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan", "\\ln": "log", "\\log": "log", "\\exp": "exp"}
_CONSTS = {"\\pi": "pi", "\\infty": "oo"}
_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d+)?|[a-zA-Z]|[-+*/^(){}\[\]!]|\s+|.")


def to_sympy_str(s):
    """De-LaTeX a normalized answer into a whitelisted Python-syntax string for sympy's parse_expr: numbers,
    single-letter symbols, + - * / **, parentheses and a few known functions. None when it is anything else,
    or too big: longer than MATH_MAX_CHARS, nested deeper than 20, exponents containing powers or factorials or
    numbers above 1000, factorials of anything but an integer <= 100. This is what makes 9^{9^9} and 10!!!!
    finish fast; the worker's timeout is the backstop."""
    toks = [t for t in _TOKEN.findall(s) if not t.isspace()]
    pos = 0

    def arg(d):  # a {group} or a single token, as for \frac12 and x^2
        nonlocal pos
        if pos < len(toks) and toks[pos] == "{":
            pos += 1
            return seq(d + 1, "}")
        if pos >= len(toks):
            raise ValueError("missing argument")
        pos += 1
        return operand(toks[pos - 1], d)

    def operand(t, d):
        nonlocal pos
        if t in _CONSTS:
            return _CONSTS[t]
        if re.fullmatch(r"\d+(\.\d+)?|[a-zA-Z]", t) and len(t) <= 30:
            return t.lstrip("0") or "0" if t.isdigit() else t  # 073 is not Python syntax
        if t == "\\frac":
            return f"(({arg(d)})/({arg(d)}))"
        if t == "\\sqrt":
            if pos < len(toks) and toks[pos] == "[":
                pos += 1
                n = seq(d + 1, "]")
                return f"(({arg(d)})**(1/({n})))"
            return f"sqrt({arg(d)})"
        if t in _FUNCS:
            return f"{_FUNCS[t]}({arg(d)})"
        if t in ("(", "{", "["):
            return f"({seq(d + 1, {'(': ')', '{': '}', '[': ']'}[t])})"
        raise ValueError(f"not allowed: {t!r}")

    def seq(d, close):
        nonlocal pos
        if d > 20:
            raise ValueError("too deep")
        out = []
        while pos < len(toks) and toks[pos] != close:
            t = toks[pos]
            pos += 1
            if t in ("+", "-", "*", "/"):
                out.append(t)
            elif t == "^":
                e = arg(d)
                if "**" in e or "factorial" in e or any(float(n) > 1000 for n in re.findall(r"\d+(?:\.\d+)?", e)) \
                        or not out or out[-1].startswith("**("):  # also no towers a^b^c
                    raise ValueError("exponent too big")
                out.append(f"**({e})")
            elif t == "!":
                if not (out and re.fullmatch(r"\d+", out[-1]) and int(out[-1]) <= 100):
                    raise ValueError("factorial of a non-literal or a big number")
                out[-1] = f"factorial({out[-1]})"
            else:
                piece = operand(t, d)
                if out and out[-1] not in ("+", "-", "*", "/"):
                    out.append("*")  # implicit multiplication: 2\pi, 3x, x^2y, (a+5)(b+2)
                out.append(piece)
        if close is not None:
            if pos >= len(toks):
                raise ValueError(f"missing {close}")
            pos += 1
        return "".join(out)

    if len(s) > MATH_MAX_CHARS:
        return None
    try:
        py = seq(0, None)
    except (ValueError, RecursionError):
        return None
    return py or None


def _sympy_equal(a, b):
    """(Runs in the worker process.) Symbolic/numeric equality of two to_sympy_str strings."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations
    names = {n: getattr(sympy, n) for n in ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
                                            "log", "exp", "factorial", "pi", "oo", "Integer", "Float", "Rational",
                                            "Symbol")}
    names["__builtins__"] = {}
    local = {c: sympy.Symbol(c) for c in string.ascii_letters}
    x, y = (parse_expr(v, local_dict=local, global_dict=names, transformations=standard_transformations)
            for v in (a, b))
    if x == y:
        return True
    if not (x.free_symbols or y.free_symbols):
        vx, vy = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
        return abs(vx - vy) <= 1e-9 * max(1.0, abs(vy))
    return sympy.simplify(x - y) == 0


def _sympy_serve(conn, other_end):
    """Worker loop: (a, b) -> bool until the pipe closes."""
    other_end.close()  # the parent's end, inherited by fork: without this a dead parent would never send EOF
    while True:
        try:
            a, b = conn.recv()
        except (EOFError, OSError):
            return
        try:
            r = bool(_sympy_equal(a, b))
        except Exception:  # a parse/simplify failure means "not shown equal"
            r = False
        conn.send(r)


_worker, _worker_lock, _sympy_cache = None, threading.Lock(), {}


def stop_sympy_worker():
    global _worker
    if _worker is not None:
        _worker[0].kill()
        _worker[0].join()
        _worker[1].close()
        _worker = None


def sympy_equal(a, b, timeout=SYMPY_TIMEOUT):
    """_sympy_equal(a, b) in the worker process, False past `timeout` seconds (the worker is then replaced).
    Thread-safe; results are cached (answers repeat across samples)."""
    global _worker
    key = (a, b)
    if key in _sympy_cache:
        return _sympy_cache[key]
    with _worker_lock:
        if _worker is None or not _worker[0].is_alive():
            import sympy  # noqa: F401  (imported before the fork, so every worker starts with it loaded)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_sympy_serve, args=(child, parent), daemon=True)
            proc.start()
            child.close()
            _worker = (proc, parent)
        try:
            _worker[1].send(key)
            r = _worker[1].recv() if _worker[1].poll(timeout) else None
        except (EOFError, OSError):
            r = None
        if r is None:  # hung or died: never reuse it
            stop_sympy_worker()
            r = False
    if len(_sympy_cache) < 100_000:
        _sympy_cache[key] = r
    return r


def _scalar_equal(a, b, pct, deadline):
    unwrap = lambda x: x[1:-1] if x[:1] == "(" and x[-1:] == ")" and _balanced_inside(x) else x  # "(55)" -> "55"
    a, b = unwrap(strip_var(a)), unwrap(strip_var(b))
    if a == b:
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:  # the fast path: exact rationals, in-process
        return x == y or pct and (x == y * 100 or x * 100 == y)
    if any(r in a + b for r in ("\\le", "\\ge", "<", ">", "=", "\\ne", "_")):
        return False  # relations and base-n numbers: exact string match only
    pa, pb = to_sympy_str(a), to_sympy_str(b)
    if pa is None or pb is None or set(re.findall(r"\b[a-zA-Z]\b", pa)) != set(re.findall(r"\b[a-zA-Z]\b", pb)):
        return False  # unparseable, or different variables: not equal (cheap pre-check)
    left = deadline - time.monotonic()
    return left > 0 and sympy_equal(pa, pb, min(SYMPY_TIMEOUT, left))


def math_equal(gt, pred):
    """Is the predicted answer equivalent to the reference? Element-wise for tuples/intervals (ordered, same
    brackets), sets and lists (unordered) and matrices; percent answers also match x/100 and 100x."""
    deadline = time.monotonic() + MATH_TIME_LIMIT
    (a, pa), (b, pb) = normalize_math(pred), normalize_math(gt)
    if a == b:
        return True
    if not a or not b or len(a) > MATH_MAX_CHARS or len(b) > MATH_MAX_CHARS:
        return False
    (ka, ea), (kb, eb) = _elements(a), _elements(b)
    if ka is None and kb is None:
        return _scalar_equal(a, b, pa or pb, deadline)
    if ka != kb or len(ea) != len(eb) or len(ea) > 16:
        return False
    if ka != "set":
        return all(_scalar_equal(x, y, pa or pb, deadline) for x, y in zip(ea, eb))
    left = list(eb)
    for x in ea:  # greedy matching is exact for an equivalence relation
        hit = next((i for i, y in enumerate(left) if _scalar_equal(x, y, pa or pb, deadline)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


# ----------------------------------------------------------------------------- grading entry points

def grade(rec, response):
    """(pred, correct) for a response to a problem record: pred is the last \\boxed{} content (None if absent).
    Safe on any string, bounded in time."""
    pred = extract_boxed(response)
    if pred is None:
        return None, False
    if "numbers" in rec:
        return pred[:1000], countdown_correct(rec, pred)
    return pred[:1000], math_equal(rec["answer"], pred)


def answer_key(rec, pred):
    """What maj@k votes on: Countdown, the expression's value (if it uses the numbers correctly); math, the
    normalized answer."""
    if pred is None:
        return None
    if "numbers" in rec:
        p = countdown_eval(pred.split("=")[0])
        return str(p[0]) if p and sorted(p[1]) == sorted(rec["numbers"]) else "invalid"
    return normalize_math(pred)[0]


# ----------------------------------------------------------------------------- report

def bootstrap_ci(values, resamples=1000, seed=0):
    """95% percentile-bootstrap interval of the mean of `values`, one per problem (problems are what varies between
    benchmark draws). Fixed seed: the same predictions give the same interval."""
    v = np.asarray(values, dtype=float)
    boot = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def problem_accuracy(preds):
    """{problem id: share of its sampled answers (sample >= 0; not the greedy one) that are correct}."""
    by_id = defaultdict(list)
    for p in preds:
        if p["sample"] >= 0:
            by_id[p["id"]].append(p["correct"])
    return {i: float(np.mean(v)) for i, v in by_id.items()}


def summarize(preds, problems):
    """The report: preds = prediction records (as in predictions.jsonl), problems = the problem records."""
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
    maj = []
    for r in probs:
        votes = Counter(k for p in by_id[r["id"]] if (k := answer_key(r, p["pred"])) is not None)
        win = votes.most_common(1)[0][0] if votes else None
        maj.append(any(p["correct"] for p in by_id[r["id"]] if win is not None and answer_key(r, p["pred"]) == win))
    samples = [p for r in probs for p in by_id[r["id"]]]
    levels = defaultdict(list)
    for r, a in zip(probs, acc):
        if "level" in r:
            levels[r["level"]].append(a)
    bt, ok = np.array([p["backtracks"] for p in samples], float), np.array([p["correct"] for p in samples], float)
    corr = float(np.corrcoef(bt, ok)[0, 1]) if bt.std() > 0 and ok.std() > 0 else None
    out = {
        "problems": len(probs), "samples": len(samples), "samples_per_problem": len(samples) / len(probs),
        "pass@1": float(acc.mean()), "pass@1_ci95": list(bootstrap_ci(acc)),
        "ci_method": "percentile bootstrap over problems, 1000 resamples",
        "maj@k": float(np.mean(maj)),
        "greedy_acc": float(np.mean([greedy[r["id"]]["correct"] for r in probs if r["id"] in greedy])) if greedy
        else None,
        "pass@1_by_level": {str(k): float(np.mean(v)) for k, v in sorted(levels.items())},
        "problems_by_level": {str(k): len(v) for k, v in sorted(levels.items())},
        "mean_tokens": float(np.mean([p["tokens"] for p in samples])),
        "backtracks_per_response": float(bt.mean()),
        "reflections_per_response": float(np.mean([p["reflections"] for p in samples])),
        "truncated": float(np.mean([not p["stopped"] for p in samples])),
        "no_answer": float(np.mean([p["pred"] is None for p in samples])),
        "pearson_backtracks_correct": corr,
    }
    return out


def print_summary(s, title):
    f = lambda v: "-" if v is None else f"{v:.4f}"
    lo, hi = s["pass@1_ci95"]
    rows = [("pass@1", f"{f(s['pass@1'])}  (95% CI {f(lo)}-{f(hi)}, {s['ci_method']})"),
            (f"maj@{s['samples_per_problem']:g}", f(s["maj@k"])), ("greedy accuracy", f(s["greedy_acc"]))]
    rows += [(f"pass@1 level {k}", f"{f(v)}  ({s['problems_by_level'][k]} problems)")
             for k, v in s["pass@1_by_level"].items()]
    rows += [(k.replace("_", " "), f(s[k])) for k in ("mean_tokens", "backtracks_per_response",
                                                      "reflections_per_response", "truncated", "no_answer",
                                                      "pearson_backtracks_correct")]
    print(f"\n{title}: {s['problems']} problems, {s['samples']} samples")
    for k, v in rows:
        print(f"  {k:<28} {v}")


# ----------------------------------------------------------------------------- main

def main(cfg):
    import torch
    from tqdm import tqdm
    import model  # here: the graders above must import without model.py (search/rl import them)

    problems = read_problems(cfg.data)[:cfg.limit or None]
    name = f"{os.path.basename(os.path.normpath(cfg.init))}-{os.path.splitext(os.path.basename(cfg.data))[0]}"
    out_dir = cfg.out_dir or os.path.join("out", "eval", name)
    os.makedirs(out_dir, exist_ok=True)
    n = 1 if cfg.temperature == 0 else cfg.num_samples
    if n < 1:
        raise common.UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    want = set(range(n)) | ({-1} if cfg.greedy and cfg.temperature > 0 else set())

    # Resume: keep the problems whose samples are all written; a partly written problem is redone from scratch.
    # Predictions made with other settings or by other weights (a retrained checkpoint) are never mixed in.
    settings = {k: getattr(cfg, k) for k in ("init", "data", "num_samples", "temperature", "top_p", "top_k", "greedy",
                                             "max_new_tokens", "seed")}
    settings["weights"] = sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in os.scandir(cfg.init)
                                 if e.name.endswith((".pt", ".pth", ".safetensors"))) if os.path.isdir(cfg.init) else []
    settings_path, pred_path = os.path.join(out_dir, "settings.json"), os.path.join(out_dir, "predictions.jsonl")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != settings and os.path.exists(pred_path):
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise common.UserError(f"{pred_path} was made with other settings {diff}; use another --out_dir")
    common.write_json(settings_path, settings)
    done = common.resume_jsonl(pred_path)
    got = defaultdict(set)
    for p in done:
        got[p["id"]].add(p["sample"])
    finished = {i for i, s in got.items() if s >= want}
    if any(p["id"] not in finished for p in done):
        common.write_jsonl(pred_path, [p for p in done if p["id"] in finished])
    todo = [(i, r) for i, r in enumerate(problems) if r["id"] not in finished]

    if todo:
        device = cfg.device or common.autodetect_device()
        net, tok = model.load_model(cfg.init, device=device, dtype=getattr(torch, cfg.dtype))
        net.eval()
        stop = tok.stop_ids
        runs = ([(0, dict(num_samples=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k))] +
                ([(-1, dict(num_samples=1, temperature=0.0))] if -1 in want else []))
        with open(pred_path, "a", encoding="utf-8") as f, \
                tqdm(total=len(problems), initial=len(problems) - len(todo), desc="eval", unit="problem") as bar:
            for c in range(0, len(todo), cfg.chunk):
                chunk = todo[c:c + cfg.chunk]
                prompts = [tok.render_prompt(prompt_messages(r)) for _, r in chunk]
                results = [[] for _ in chunk]
                for first, kw in runs:
                    outs = model.generate(net, prompts, max_new_tokens=cfg.max_new_tokens, stop_ids=stop,
                                          seed=cfg.seed + chunk[0][0], batch_size=cfg.batch_size,
                                          compile=cfg.compile, tool=tool(chunk[0][1], tok), **kw)
                    for res, samples in zip(results, outs):
                        res.extend((first + j if first >= 0 else -1, s) for j, s in enumerate(samples))
                lines = []
                for (_, r), res in zip(chunk, results):
                    for j, s in res:
                        ids = s.tokens[:-1] if s.stopped and s.tokens and s.tokens[-1] in stop else s.tokens
                        text = tok.decode(ids)
                        pred, ok = grade(r, text)
                        bt, refl = count_reflections(text)
                        lines.append(json.dumps({"id": r["id"], "sample": j, "response": text, "pred": pred,
                                                 "correct": ok, "tokens": len(s.tokens), "backtracks": bt,
                                                 "reflections": refl, "stopped": s.stopped}, ensure_ascii=False))
                f.write("".join(line + "\n" for line in lines))  # one write and fsync per chunk, not per sample
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(chunk))

    summary = summarize(common.resume_jsonl(pred_path), problems)
    if not summary["problems"]:
        raise common.UserError(f"{cfg.data}: no problems to evaluate")
    if cfg.temperature == 0:
        summary["greedy_acc"] = summary["pass@1"]  # the samples are the greedy answers
    summary["settings"] = settings
    common.write_json(os.path.join(out_dir, "summary.json"), summary)
    print_summary(summary, f"{cfg.init} on {cfg.data} -> {out_dir}")
    return summary


if __name__ == "__main__":
    common.run_main(main, Config)
