"""
MATH answers: the prompt's instruction and the grader of a \\boxed{} answer against the reference.

The grader never eval()s model text: LaTeX normalization, then exact string, then exact rational
numbers (in-process: the common fast path), then sympy on a sanitized, whitelisted de-LaTeXed string
in a separate worker process with a hard timeout. A process (not signal.alarm) because the timeout
must work off the main thread (rl/search may grade from threads); one long-lived worker forked on
first use (fork: starts instantly with sympy already imported; the child runs only sympy and the
pipe, never torch) and killed and replaced when an answer times out.
"""
import multiprocessing as mp
import re
import string
import threading
import time
from fractions import Fraction

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

MATH_MAX_CHARS = 400   # longer answers are compared as exact strings only
MATH_TIME_LIMIT = 5.0  # seconds of symbolic work per graded answer (all its elements together)
SYMPY_TIMEOUT = 2.0    # seconds per symbolic comparison; the worker is killed past it


# ----------------------------------------------------------------------------- normalization

# unicode math first (a space after a command keeps it apart from a following letter: "πr")
_REPLACE = [("−", "-"), ("×", "*"), ("·", "*"), ("÷", "/"), ("π", "\\pi "), ("∞", "\\infty "),
            ("≤", "\\le "), ("≥", "\\ge "), ("≠", "\\ne "), ("∪", "\\cup "), ("∈", "\\in "),
            ("²", "^2"), ("³", "^3"), ("√", "\\sqrt"), ("∛", "\\sqrt[3]"),
            ("\\left", ""), ("\\right", ""), ("\\quad", " "), ("\\qquad", " "),
            ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
            ("\\cfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""),
            ("\\degree", ""), ("°", ""), ("\\$", ""), ("$", ""), ("\\%", "%"), ("{,}", ","),
            ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne"), ("\\times", "*"),
            ("\\cdot", "*"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("bmatrix", "pmatrix"),
            ("\\dots", "..."), ("\\ldots", "..."), ("\\mp", "\\pm")]
_UNITS = ("units?|cm|centimeters?|mm|millimeters?|m|meters?|km|kilometers?|inch(?:es)?|in|feet|"
          "foot|ft|yards?|yd|miles?|mi|mph|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|"
          "months?|years?|dollars?|cents?|degrees?|pounds?|lbs?|ounces?|oz|gallons?|liters?|grams?|"
          "g|kg|points?|people|students|ways")
_UNIT_RE = re.compile(r"(?<=[\d}])\s+(?:(?:square|sq\.?|cubic)\s+)?(?:" + _UNITS
                      + r")(?:\s*\^\{?[23]\}?)?\.?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname|boldsymbol)"
                      r"\s*\{([^{}]*)\}")


def normalize_math(s, keep_name=False):
    """(canonical string, had a percent sign) of a LaTeX answer: strips presentation (\\left,
    spacing, \\text, units, degrees, $), unifies \\dfrac/\\tfrac, \\frac12, \\sqrt2, x^{2}, .5,
    unicode (√2, π, ×, −, ≤), 1,000, "x = 5" -> "5" (unless keep_name), (C) -> C."""
    s = s.strip()
    if len(s) > MATH_MAX_CHARS:
        return s, False
    s = _TEXT_RE.sub(r" \1 ", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]", " ", s)  # spacing commands, not the row break \\ before a space
    s = re.sub(r"([√∛])\s*(\d+(?:\.\d+)?|[a-zA-Z])", r"\1{\2}", s)  # √23 is √{23}, not √{2}3
    for a, b in _REPLACE:
        s = s.replace(a, b)
    pct = "%" in s
    s = s.replace("%", "").strip()
    while (t := _UNIT_RE.sub("", s).strip()) != s and t:
        s = t
    # keep a space only between letters: "\cot x"
    s = re.sub(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])", "", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"\\overline(\d)", r"\\overline{\1}", s)
    s = re.sub(r"(?<![\d.])\.(\d|\\overline)", r"0.\1", s)
    s = re.sub(r"(?<=[\d}])\.$", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if not keep_name:
        s = split_var(s)[1]
    if m := re.fullmatch(r"\(([A-E])\)", s):
        s = m.group(1)
    if re.fullmatch(r"[A-Za-z][A-Za-z ]+", s):
        s = s.lower()
    return s, pct


# the name of an answer: a bare variable, or a tuple of them, left of = or \in
_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w)?"
_NAMED = re.compile(rf"({_VAR}|\({_VAR}(?:,{_VAR})+\))(?:=|\\in(?![a-zA-Z]))([^=]+)")


def split_var(s):
    """(name, value): 'x=5' -> ('x', '5'), 'x\\in[1,2]' -> ('x', '[1,2]'), '(x,y)=(1,2)' ->
    ('(x,y)', '(1,2)'); (None, s) when no bare variable (or tuple of them) is on the left."""
    m = _NAMED.fullmatch(s)
    return m.groups() if m else (None, s)


def _names_differ(na, nb):
    """Both sides name what they answer, differently: x=1 and y=1 are different claims."""
    return na is not None and nb is not None and na != nb


def _unname(na, a, nb, b):
    """The values a and b of answers named na and nb: a name only one side gives is dropped; a
    tuple of names is bound to its values when the other side names values too, so (x,y)=(1,2),
    (y,x)=(2,1) and y=2,x=1 agree. None if the names differ."""
    tup = lambda n: n is not None and n[0] == "("
    names = lambda n: sorted(n[1:-1].split(","))
    if _names_differ(na, nb) and not (tup(na) and tup(nb) and names(na) == names(nb)):
        return None
    a = _bind(na, a) if tup(na) and (nb or "=" in b) else a
    b = _bind(nb, b) if tup(nb) and (na or "=" in a) else b
    return None if a is None or b is None else (a, b)


def _bind(name, value):
    """'(x,y)', '(1,2)' -> 'x=1,y=2' (a set of named values); None if the counts differ."""
    names, (kind, vals) = name[1:-1].split(","), _elements(value)
    return ",".join(f"{n}={v}" for n, v in zip(names, vals)) \
        if kind == "()" and len(vals) == len(names) else None


def _top_split(s, sep):
    """Split s at `sep` outside any (), [], {} (interval brackets may mismatch: depth ignores the
    bracket kind)."""
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
    """(kind, elements) of a compound answer, or (None, [s]) for a scalar. Kinds: "set" (bare list,
    \\{..\\}, union of intervals, a +- b: unordered), "(]"-style tuples/intervals (ordered),
    "matrix RxC" (ordered; a scalar in front multiplies each entry: 2\\begin{pmatrix}..)."""
    if m := re.fullmatch(r"((?:(?!pmatrix).)*?)\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s):
        rows = [r.split("&") for r in m.group(2).split("\\\\")]
        if len({len(r) for r in rows}) == 1:
            c = m.group(1).removesuffix("*")
            return f"matrix {len(rows)}x{len(rows[0])}", [_times(c, e) for r in rows for e in r]
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


def _times(c, e):
    """The entry e scaled by c: exact when both are plain numbers, else a product for sympy."""
    if not c:
        return e
    c = "-1" if c == "-" else c
    x, y = _number(c), _number(e)
    return str(x * y) if x is not None and y is not None else f"({c})*({e})"


def _balanced_inside(s):
    """True if the bracket opening s closes only at its very end (so "(a+5)(b+2)" is not one
    group)."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def _number(s):
    """Exact Fraction of a plain number: 5, -0.25, 3/4, \\frac{3}{4}, -\\frac{3}{4}, 1\\frac{4}{5},
    0.1\\overline{6} (repeating decimal); else None."""
    if len(s) > 60:
        return None
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return Fraction(s)
    if m := re.fullmatch(r"(-?)(\d+)\.(\d*)\\overline\{(\d+)\}", s):
        sign, whole, fixed, block = m.groups()  # 0.1\overline{6} = 1/10 + 6/90
        shift = 10 ** len(fixed)
        v = int(whole) + Fraction(int(fixed or 0), shift) \
            + Fraction(int(block), (10 ** len(block) - 1) * shift)
        return -v if sign else v
    if m := (re.fullmatch(r"(-?)(\d+)?\\frac\{(\d+)\}\{(\d+)\}", s)
             or re.fullmatch(r"(-?)()(\d+)/(\d+)", s)):
        sign, whole, p, q = m.groups()
        if int(q) == 0:
            return None
        v = int(whole or 0) + Fraction(int(p), int(q))  # 1\frac{4}{5} is a mixed number, 9/5
        return -v if sign else v
    return None


# ----------------------------------------------------------------------------- sympy, in a worker

_FUNCS = {"\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\cot": "cot", "\\sec": "sec",
          "\\csc": "csc", "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan", "\\ln": "log",
          "\\log": "log", "\\exp": "exp"}
_CONSTS = {"\\pi": "pi", "\\infty": "oo"}
_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d+)?|[a-zA-Z]|[-+*/^(){}\[\]!]|\s+|.")


def to_sympy_str(s):
    """De-LaTeX a normalized answer into a whitelisted Python-syntax string for sympy's
    parse_expr: numbers, single-letter symbols, + - * / **, parentheses and a few known functions.
    None when it is anything else, or too big: longer than MATH_MAX_CHARS, nested deeper than 20,
    exponents containing powers or factorials or numbers above 1000, factorials of anything but an
    integer <= 100. This is what makes 9^{9^9} and 10!!!! finish fast; the worker's timeout is the
    backstop."""
    toks = [t for t in _TOKEN.findall(s) if not t.isspace()]
    pos = 0

    def arg(d):  # a {group} or a single token, as for \frac12 and x^2
        nonlocal pos
        if d > 20:
            raise ValueError("too deep")  # \sqrt\sqrt..2 nests without braces
        if pos < len(toks) and toks[pos] == "{":
            pos += 1
            return seq(d + 1, "}")
        if pos >= len(toks):
            raise ValueError("missing argument")
        pos += 1
        return operand(toks[pos - 1], d + 1)

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
                big = any(float(n) > 1000 for n in re.findall(r"\d+(?:\.\d+)?", e))
                if "**" in e or "factorial" in e or big \
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
    from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations
    names = {n: getattr(sympy, n) for n in ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc",
                                            "asin", "acos", "atan", "log", "exp", "factorial", "pi",
                                            "oo", "Integer", "Float", "Rational", "Symbol")}
    names["__builtins__"] = {}
    local = {c: sympy.Symbol(c) for c in string.ascii_letters}
    x, y = (parse_expr(v, local_dict=local, global_dict=names,
                       transformations=standard_transformations + (rationalize,))
            for v in (a, b))  # decimals as exact rationals: 3.14159265358979 is not pi
    if x == y:
        return True
    if x.is_Rational and y.is_Rational:
        return False  # exact numbers that differ: 10^{10} and 10000000001
    if not (x.free_symbols or y.free_symbols):
        vx, vy = sympy.N(x, 30), sympy.N(y, 30)  # sympy floats: 10^{999} does not overflow
        if not (vx.is_finite and vy.is_finite):
            return False  # \infty equals only itself (x == y above)
        close = abs(vx - vy) <= 1e-20 * max(1, abs(vy))  # 30 digits of exact inputs
        # past 1e15 a close value may still differ by 1 (\pi^{50} and \pi^{50}+1): exact only
        return bool(close) and (abs(vy) < 1e15 or sympy.simplify(x - y) == 0)
    return sympy.simplify(x - y) == 0


def _sympy_serve(conn, other_end):
    """Worker loop: (a, b) -> bool until the pipe closes."""
    # the parent's end, inherited by fork: without this a dead parent would never send EOF
    other_end.close()
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
    """_sympy_equal(a, b) in the worker process, False past `timeout` seconds (the worker is then
    replaced). Thread-safe; results are cached (answers repeat across samples)."""
    global _worker
    key = (a, b)
    if key in _sympy_cache:
        return _sympy_cache[key]
    with _worker_lock:
        if _worker is None or not _worker[0].is_alive():
            import sympy  # noqa: F401  (before the fork, so every worker starts with it loaded)
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


# ----------------------------------------------------------------------------- equivalence

def _scalar_equal(a, b, pct, deadline):
    # "(55)" -> "55"
    unwrap = lambda x: x[1:-1] if x[:1] == "(" and x[-1:] == ")" and _balanced_inside(x) else x
    (na, a), (nb, b) = split_var(a), split_var(b)
    if _names_differ(na, nb):
        return False
    a, b = unwrap(a), unwrap(b)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:  # the fast path: exact rationals, in-process
        return x == y or pct and (x == y * 100 or x * 100 == y)
    if any(r in a + b for r in ("\\le", "\\ge", "<", ">", "=", "\\ne", "_")):
        return False  # relations and base-n numbers: exact string match only
    pa, pb = to_sympy_str(a), to_sympy_str(b)
    letters = lambda x: set(re.findall(r"\b[a-zA-Z]\b", x))
    if pa is None or pb is None or letters(pa) != letters(pb):
        return False  # unparseable, or different variables: not equal (cheap pre-check)
    left = deadline - time.monotonic()
    return left > 0 and sympy_equal(pa, pb, min(SYMPY_TIMEOUT, left))


def math_equal(gt, pred):
    """Is the predicted answer equivalent to the reference? Element-wise for tuples/intervals
    (ordered, same brackets), sets and lists (unordered) and matrices; percent answers also match
    x/100 and 100x. A named answer (x=1, (x,y)=(1,2)) matches its bare value or the same names'
    values; different names never match."""
    deadline = time.monotonic() + MATH_TIME_LIMIT
    (a, pa), (b, pb) = normalize_math(pred, keep_name=True), normalize_math(gt, keep_name=True)
    if a == b:
        return True
    if not a or not b or len(a) > MATH_MAX_CHARS or len(b) > MATH_MAX_CHARS:
        return False
    (na, a), (nb, b) = split_var(a), split_var(b)
    if (ab := _unname(na, a, nb, b)) is None:
        return False
    a, b = ab
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
