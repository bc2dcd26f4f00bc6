"""
The built-in task, Countdown: make a target from a few numbers with + - * /, each number used once.

Rules (Stream of Search): each operation combines two of the numbers left with + - * /, integer
results only, exact division only, subtraction larger minus smaller; the result replaces the two;
every number must be used. A problem is solvable iff the last number left can equal the target
(solve: brute force over every operation sequence, vectorized over thousands of problems at once
with numpy).

Trace format (one operation per line, each ending in "\\n"; the larger operand is written first),
for 7 3 12 25:
    12*3=36 left 7 25 36
    (12*3)+25=36+25=61 left 7 61
    \\boxed{((12*3)+25)-7}=61-7=54 == 54
A line is [the expression over the original numbers, when an operand is itself a result: copied from
the start of that result's line, parenthesized, plus one operator =] a op b = result, then the
numbers left (the unused ones in their order, the result last). The last line boxes the full
expression: the grader reads only the \\boxed{}, and the box is a copy of what is already written,
never a composition the model must do in its head. The last line ends with the verdict on the box
("== 54" here; "!= 54" or "== 54 but it breaks the rules" on other boxes), which the policy writes
itself: the calculator (tool) writes every result, the numbers left and the box's value, never a
judgement. The traces of `steps` are in the form the policy's own lines take.

One rule of legality, the same for the solver, the grader and the traces: each operation combines
two numbers left into a non-negative integer (exact division), and every number is used once. The
grader evaluates the box as written: `3-7+25` and `(2/3)*6` pass through illegal intermediates and
are wrong. Every step is computable from the line before it (its numbers left) and the
lines that wrote its operands.

The grader never eval()s model text: countdown_eval is a tiny recursive-descent parser over
Fractions.
"""
import re
import string
from fractions import Fraction

import numpy as np

import common

CD_MAX_CHARS = 300  # longest expression graded (a 6-number expression needs < 60 chars)

CALC = re.compile(r"(?<![\d.])(\d{1,6})([-+*/])(\d{1,6})=$")  # "...11*4=" ending the text so far
TARGET = re.compile(r"Make (\d+) from ([\d ]+) with")  # target and numbers of a countdown_prompt
BOXED_LINE = re.compile(r".*\\boxed\{(.*)\}=")  # an answer line's box (greedy: up to its last "}=")
NUM = r"-?\d+(?:/[1-9]\d*)?"  # a value the calculator writes: 36, -4, 61/7
LEFT = re.compile(rf" left ({NUM}(?: {NUM})*)\.?$")  # numbers left, ending a step or a restatement
# an answer line up to the box's value (after the box's "}=" and its calculation "a op b=")
ANSWER_END = re.compile(r"(.*\\boxed\{(.*)\}=(?:[^=\n]*=)?(invalid|-?\d+(?:/\d+)?))")


def countdown_prompt(numbers, target):
    """The problem statement (data/countdown/prepare.py writes it as the record's "problem")."""
    # Short on purpose: every stage re-reads the prompt (training, search prefill, RL, eval).
    return (f"Make {target} from {' '.join(map(str, numbers))} with + - * /, each number once, "
            f"answer in \\boxed{{}}.")


def validate(rec, where):
    """Check the Countdown fields of a problem record (numbers, target, answer, level); a bad one
    is a UserError naming `where` (file:line) and the field."""
    bad = lambda field, msg: common.UserError(f"{where}: {field}: {msg}")
    isint = lambda v: type(v) is int
    nums = rec["numbers"]
    if not (isinstance(nums, list) and 2 <= len(nums) <= 8
            and all(isint(n) and 0 <= n < 10**6 for n in nums)):
        raise bad("numbers", f"must be a list of 2-8 ints in [0, 1e6), got {nums!r}")
    if not isint(rec.get("target")):
        raise bad("target", f"Countdown records need an int target, got {rec.get('target')!r}")
    if rec["answer"] != str(rec["target"]):
        raise bad("answer", f"must be str(target) = {str(rec['target'])!r}, got {rec['answer']!r}")
    if rec.get("level", len(nums)) != len(nums):
        raise bad("level",
                  f"a Countdown level is the count of numbers ({len(nums)}), got {rec['level']}")


# ----------------------------------------------------------------------------- problems and traces

def solve(numbers, targets, rng):
    """Brute force over all operation sequences for a batch of problems (numbers: int64 [B, k],
    targets [B]). Returns (count of solution sequences [B], one uniformly random solution sequence
    per problem or None). A sequence is a list of (i, j, op) over the current list of numbers:
    combine items i < j with op; the result goes to the end of the list (the order the trace writes
    the numbers left in)."""
    B = len(targets)
    count, pick = np.zeros(B, np.int64), np.full(B, -1)
    paths = []

    def rec(vals, valid, path):
        if len(vals) == 2:  # the last operation: test the four results against the target directly
            a, b = np.maximum(*vals), np.minimum(*vals)
            for op, hit in (("+", a + b == targets), ("-", a - b == targets),
                            ("*", a * b == targets), ("/", (b != 0) & (a == targets * b))):
                hit = np.flatnonzero(hit & valid)
                if len(hit):
                    count[hit] += 1
                    take = hit[rng.random(len(hit)) * count[hit] < 1]  # reservoir sampling
                    pick[take] = len(paths)  # so the pick is uniform over the solutions
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
    largest = float(numbers.max(initial=1)) ** numbers.shape[1] * max(1, targets.max(initial=1))
    dtype = np.int32 if largest < 2**31 else np.int64
    targets = targets.astype(dtype)
    rec([numbers[:, k].astype(dtype) for k in range(numbers.shape[1])], np.ones(B, bool), [])
    return count, [paths[p] if p >= 0 else None for p in pick]


def steps(numbers, path, target):
    """The step lines of an operation sequence (the trace format of the module docstring)."""
    items = [(n, str(n), False) for n in numbers]  # (value, expression over the inputs, a result?)
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
            left = " ".join(str(t[0]) for t in items)
            lines.append(f"{expr + '=' if cx or cy else ''}{calc} left {left}")
    return lines


# ----------------------------------------------------------------------------- calculator

def numbers_left(numbers, text):
    """The numbers left after the complete lines `text` of a response: the start numbers, replaced
    by the list of each step line ("... left 7 61") and of the step a go-back restates, reset by a
    restart."""
    for line in reversed(text.split("\n")):  # the last line that sets them decides
        if common.RESTART in line:
            break
        if m := LEFT.search(line):
            return [Fraction(n) for n in m[1].split()]
    return list(numbers)


def tool(tok, oracle=False):
    """The calculator for generate.generate (the same in search, RL and eval): (trigger token ids,
    calculator). It does arithmetic and bookkeeping, never judging: what it writes depends only on
    the text the policy wrote and the start numbers, never on the target or on whether a move was
    legal, and it never calls the grader. When the policy writes "a op b=", it writes the exact
    result (a Fraction: 36, -4 or 61/7) and, on a step line, the numbers left after it (the numbers
    left before, less a and b where they are among them, plus the result), ending the line:
    "36 left 7 25 36\\n". On the \\boxed{} line it writes the value of the whole boxed expression
    ("invalid" when it is malformed or divides by zero), and the policy writes the rest:
    " == 54", " != 54" or " == 54 but it breaks the rules" (verdict), and the newline. Why a
    calculator at all: the miniature is about search, not about a small model learning arithmetic.
    Why the numbers left: after a backtrack a small policy loses track of them. The model chooses
    every operation, copies its operands, compares the box with the target, and decides when to
    reflect, where to go back and what to try next.
    oracle=True is the labelled ablation: on the \\boxed{} line the tool also writes the grader's
    verdict on the row's own problem and ends the line, so every reflection follows an oracle."""
    # a token ending in "=" can end "a op b=" only if it is "=" or a digit precedes its "="
    triggers = [i for i in tok.ids_containing("=")
                if re.fullmatch(r"(.*\d)?=", tok.decode([i]), re.S)]

    def calculator(prompt, ids):
        # the prompt may end in part of the response (search's node paths)
        text = tok.decode(list(prompt) + ids)
        line = text.rsplit("\n", 1)[-1]
        m = CALC.search(line)
        if not m:
            return []
        target, numbers = TARGET.search(text).groups()  # THIS row's problem
        numbers = [int(n) for n in numbers.split()]
        if "\\boxed{" in line:  # the answer's line: the box's value
            box = BOXED_LINE.match(line)  # None: "a op b=" inside an unclosed box
            parsed = countdown_eval(box[1]) if box else None
            value = "invalid" if parsed is None else str(parsed[0])
            if oracle:
                ok = parsed is not None and countdown_correct(
                    {"target": int(target), "numbers": numbers}, box[1])
                return tok.encode(f"{value}{verdict(value, int(target), ok)}\n")
            return tok.encode(value)
        value = (countdown_eval(m[0][:-1]) or ("undefined",))[0]  # x/0: "undefined"
        if common.REFLECT in line:  # a go-back restating a step: the model restates the rest itself
            return tok.encode(str(value))
        left = numbers_left(numbers, text[: len(text) - len(line)])
        for n in (int(m[1]), int(m[3])):
            if n in left:
                left.remove(n)
        return tok.encode(f"{value} left {' '.join(map(str, left + [value]))}\n")
    return triggers, calculator


def verdict(value, target, correct):
    """The comparison that ends an answer line after the box's value: " == 54" (correct), " != 54"
    (another value), " == 54 but it breaks the rules" (the target, reached without using each
    number once or with an illegal operation)."""
    if correct:
        return f" == {target}"
    return f" == {target} but it breaks the rules" if value == str(target) else f" != {target}"


def written_verdict(line):
    """The verdict written on an answer line: True (" == 54"), False (" != 54", or "... but it
    breaks the rules"), None (none: the line stops at the box's value, or is not an answer line)."""
    m = ANSWER_END.match(line)
    rest = line[m.end():].strip() if m else ""
    if rest.startswith("!=") or rest.startswith("==") and "breaks the rules" in rest:
        return False
    return True if rest.startswith("==") else None


def with_true_verdict(rec, line):
    """An answer line with the verdict the grader gives in place of whatever followed the box's
    value (linearize writes it into every attempt); other lines unchanged."""
    m = ANSWER_END.match(line)
    if not m:
        return line
    end = "\n" if line.endswith("\n") else ""
    return m[1] + verdict(m[3], rec["target"], countdown_correct(rec, m[2])) + end


# ----------------------------------------------------------------------------- grader

def countdown_eval(s, legal=False):
    """(value, integer literals) of an expression over integers with + - * / and parentheses, or
    None if it is malformed, too long or divides by zero (legal=True: or if an operation, evaluated
    as written, gives a negative or non-integer result). Recursive descent over Fractions; no eval,
    no unary minus."""
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"),
                 ("\\left", ""), ("\\right", ""), ("{", "("), ("}", ")")):
        s = s.replace(a, b)
    if len(s) > CD_MAX_CHARS:
        return None
    toks, pos, lits = re.findall(r"[0-9]+|\S", s), 0, []

    def take(*ok):
        nonlocal pos
        if pos < len(toks) and toks[pos] in ok:
            pos += 1
            return toks[pos - 1]

    def check(v):
        if legal and (v < 0 or v.denominator != 1):
            raise ValueError("an illegal operation")
        return v

    def expr(d):
        v = term(d)
        while op := take("+", "-"):
            v = check(v + term(d) if op == "+" else v - term(d))
        return v

    def term(d):
        v = atom(d)
        while op := take("*", "/"):
            w = atom(d)
            if op == "/" and w == 0:
                raise ValueError("division by zero")
            v = check(v * w if op == "*" else v / w)
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
    """Correct iff the expression uses each given number exactly once, every operation in it is
    legal as written (the module's rule) and it equals the target. "expr = 64" is accepted when
    every side after the first is a plain value equal to it."""
    sides = pred.split("=")
    parsed = [countdown_eval(s, legal=True) for s in sides]
    if any(p is None for p in parsed) or any(len(p[1]) != 1 or p[0] != parsed[0][0]
                                             for p in parsed[1:]):
        return False
    value, lits = parsed[0]
    return sorted(lits) == sorted(rec["numbers"]) and value == rec["target"]
