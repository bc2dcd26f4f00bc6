"""
data/math/prepare.py — the real benchmarks in the common problem schema (README.md, "JSONL
schemas").

    python data/math/prepare.py               # -> data/math/{math500,aime24,amc23}.jsonl
    python data/math/prepare.py --train=True  # + data/math/math_{train,val}.jsonl (11,500 + 500)

Each file is downloaded from its public hosting (urls tried in order), checked against the sha256 of
the exact source bytes, and converted:
  math500   MATH-500 = openai/prm800k prm800k/math_splits/test.jsonl. prm800k stores it as a Git
            LFS pointer, so the bytes come from GitHub's LFS media host or the identical copy in
            hkust-nlp/simpleRL-reason (its sha256 equals prm800k's LFS oid). id = unique_id
            ("test/precalculus/807.json"); problem, answer, level, subject, solution verbatim;
            source order.
  aime24    QwenLM/Qwen2.5-Math evaluation/data/aime24/test.jsonl. id = "aime24/2024_AIME_I/1"
            from the AoPS url; answer verbatim (zero padding kept: "025"); sorted by contest, then
            problem number.
  amc23     QwenLM/Qwen2.5-Math evaluation/data/amc23/test.jsonl. id = "amc23/2023_AMC_12A/1"; the
            source answer is a JSON float and is written as repr: "27.0" (the grader, tasks/math.py,
            accepts 27); sorted as aime24.
  train     prm800k prm800k/math_splits/train.jsonl (LFS; sha256 = its LFS oid; 12,000 problems,
            11 MB), converted like math500, then split: the `val` problems with the smallest
            sha256(id) go to math_val.jsonl (for tuning and RL's held-out checks, so no choice is
            made on MATH-500), the rest to math_train.jsonl.
The three benchmark files are byte-identical to the copies described in shared/data/PROVENANCE.md.
Nothing is cached: a rerun downloads again (a few hundred kB without the train split).
"""
import hashlib
import json
import os
import re
import sys
import urllib.request
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402

QWEN = ("https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/"
        "a45202bd16f1ec06f433442dc1152d0074773465/evaluation/data")
SIMPLERL = ("https://raw.githubusercontent.com/hkust-nlp/simpleRL-reason/"
            "cf1c7858bfc145a27aa733e75d930d34f0d318a6/examples/simplelr_math_eval/data")
PRM800K = "https://media.githubusercontent.com/media/openai/prm800k/main/prm800k/math_splits"


@dataclass
class Config:
    out_dir: str = "data/math"  # where the JSONL files go
    train: bool = False         # also fetch the MATH train split (for search/RL at scale)
    val: int = 500              # with train: problems held out of it as math_val.jsonl
    timeout: float = 60.0       # seconds per download attempt


def download(url, timeout=60.0):
    """The only network access of this script (the tests replace it with fixtures)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def fetch(name, urls, sha256, timeout=60.0):
    """The bytes of the first url whose sha256 matches; a UserError naming the file and every
    failure otherwise."""
    errors = []
    for url in urls:
        try:
            data = download(url, timeout)
        except Exception as e:  # network errors of any kind: try the next source
            errors.append(f"{url}: {type(e).__name__}: {e}")
            continue
        got = hashlib.sha256(data).hexdigest()
        if got == sha256:
            return data
        errors.append(f"{url}: checksum mismatch: sha256 {got}, expected {sha256}")
    raise common.UserError(f"{name}: could not get a verified copy:\n  " + "\n  ".join(errors))


def source_lines(name, data):
    """(line number, record) of a source JSONL; a bad line is a UserError naming the file and
    line."""
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise common.UserError(f"{name}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not all(k in rec for k in ("problem", "answer")):
                raise common.UserError(f"{name}:{i}: expected an object with problem and answer")
            yield i, rec


def convert_math(name, data):
    out = []
    for i, r in source_lines(name, data):
        if not isinstance(r.get("unique_id"), str) or type(r.get("level")) is not int:
            raise common.UserError(f"{name}:{i}: unique_id must be a string and level an int")
        out.append({"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"],
                    "level": r["level"], "subject": r["subject"], "solution": r["solution"]})
    return out


def convert_contest(name, data, prefix, pattern):
    """AIME/AMC: id from the AoPS url, answer as a string, sorted by (contest, problem number)."""
    out = []
    for i, r in source_lines(name, data):
        m = re.search(pattern, str(r.get("url", "")))
        if not m:
            raise common.UserError(
                f"{name}:{i}: url {r.get('url')!r} does not name a {prefix} problem")
        a = r["answer"]
        answer = repr(a) if isinstance(a, float) else str(a)  # 27.0 -> "27.0": the value as given
        rec = {"id": f"{prefix}/{m.group(1)}/{int(m.group(2))}", "problem": r["problem"],
               "answer": answer}
        if "solution" in r:
            rec["solution"] = r["solution"]
        out.append(((m.group(1), int(m.group(2))), rec))
    return [rec for _, rec in sorted(out, key=lambda t: t[0])]


AIME = r"/(\d{4}_AIME_I{1,2})_Problems/Problem_(\d+)"  # in an AoPS url: contest, problem number
AMC = r"/(\d{4}_AMC_1[02][AB])_Problems/Problem_(\d+)"
SOURCES = {
    "math500": ([f"{SIMPLERL}/math500/test.jsonl", f"{PRM800K}/test.jsonl",
                 "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"],
                "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", convert_math),
    "aime24": ([f"{QWEN}/aime24/test.jsonl", f"{SIMPLERL}/aime24/test.jsonl"],
               "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
               lambda n, d: convert_contest(n, d, "aime24", AIME)),
    "amc23": ([f"{QWEN}/amc23/test.jsonl", f"{SIMPLERL}/amc23/test.jsonl"],
              "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
              lambda n, d: convert_contest(n, d, "amc23", AMC)),
    "math_train": ([f"{PRM800K}/train.jsonl"],
                   "90d96daeac3fe343ebb1e22ce93dd99690f75983e957f88de42f87cffe1e8076",
                   convert_math),
}


def main(cfg):
    os.makedirs(cfg.out_dir, exist_ok=True)
    written = {}
    for name, (urls, sha256, convert) in SOURCES.items():
        if name == "math_train" and not cfg.train:
            continue
        recs = convert(name, fetch(name, urls, sha256, cfg.timeout))
        ids = [r["id"] for r in recs]
        if len(set(ids)) != len(ids):
            raise common.UserError(f"{name}: duplicate ids")
        parts = {name: recs}
        if name == "math_train":  # a stable choice that does not depend on the file's order
            if not 0 < cfg.val < len(recs):
                raise common.UserError(f"val must be in 1..{len(recs) - 1} "
                                       f"(the train split has {len(recs)} problems)")
            held = set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:cfg.val])
            parts = {"math_train": [r for r in recs if r["id"] not in held],
                     "math_val": [r for r in recs if r["id"] in held]}
        for part, rows in parts.items():
            path = os.path.join(cfg.out_dir, f"{part}.jsonl")
            common.write_jsonl(path, rows)
            written[part] = len(rows)
            print(f"{path}: {len(rows)} problems")
    return written


if __name__ == "__main__":
    common.run_main(main, Config)
