"""Tests of sft.py (tiny models, CPU, a few seconds each):  python -m pytest -q t_sft.py"""
import base64
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import common
import sft
from model import Llama, ModelConfig, Tokenizer, load_model

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on busy shared cores, and the same as the subprocesses (OMP_NUM_THREADS=1), which
    the bitwise comparisons need."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_tokenizer(path):
    with open(path, "w") as f:
        for i in range(256):
            f.write(f"{base64.b64encode(bytes([i])).decode()} {i}\n")
    return str(path)


def conversations(n, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(1, 60), rnd.randint(1, 60)
        out.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                 {"role": "assistant", "content": f"{a}+{b}={a + b}\n" * rnd.randint(1, 3)}]})
    return out


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def setup(tmp_path):
    """(data path, tokenizer path, make_config(**overrides)) for a tiny run."""
    data = write_lines(tmp_path / "conv.jsonl", [json.dumps(c) for c in conversations(96)])
    tok = byte_tokenizer(tmp_path / "bytes.model")

    def make(**kw):
        base = dict(data=data, tokenizer=tok, seq_len=128, batch_size=4, micro_batch=2, max_steps=6, lr=3e-3,
                    dtype="float32", warmup_steps=2, eval_every=0, save_every=100, log_every=1, progress=False,
                    out_dir=str(tmp_path / "out"), **TINY)
        base.update(kw)
        return sft.Config(**base)
    return data, tok, make


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "model.pt"), map_location="cpu", weights_only=True)["model"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- helpers

def test_get_lr_and_optimizer():
    assert sft.get_lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert sft.get_lr(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert sft.get_lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)  # cosine midpoint
    assert sft.get_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert sft.get_lr(500, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    m = Llama(ModelConfig(vocab_size=300, max_seq_len=64, **TINY))
    opt = sft.make_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ----------------------------------------------------------------------------- data

def test_loss_masking(setup):
    data, tok_path, make = setup
    tok = Tokenizer(tok_path)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": "1+2=3"}]
    convs = [("f:1", msgs, "1")]
    ids, mask = tok.render_chat(msgs)
    (ids_a, tgt_a), = sft.render(convs, tok, make(loss_on="assistant"))[0]
    (ids_b, tgt_b), = sft.render(convs, tok, make(loss_on="all"))[0]
    assert ids_a.tolist() == ids_b.tolist() == ids
    # assistant: the targets are exactly the assistant content + its <|eot_id|>, each predicted from the token before
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
    tok = Tokenizer(tok_path)
    docs, _ = sft.render([(f"f:{i}", c["messages"], str(i)) for i, c in enumerate(conversations(3, seed=1))],
                         tok, make(loss_on="all"))
    x, y, d = sft.make_batch([[0, 1, 2]], docs, 160)
    torch.manual_seed(0)
    m = Llama(ModelConfig(vocab_size=tok.n_vocab, max_seq_len=160, **TINY))
    with torch.no_grad():
        packed = m(x, doc=d)[0]
        p = 0
        for ids, tgt in docs:
            alone = m(ids.long()[None])[0]
            torch.testing.assert_close(packed[p:p + len(ids)], alone, atol=1e-5, rtol=1e-5)
            assert y[0, p:p + len(ids)].tolist() == tgt.tolist()
            p += len(ids)
    assert p < 160 and (y[0, p:] == -1).all() and (d[0, p:] == 3).all()  # padding: own doc id, no loss


def test_too_long_is_reported(setup, tmp_path):
    data, tok, make = setup
    lines = [json.dumps(c) for c in conversations(5)]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "x" * 300},
                                             {"role": "assistant", "content": "y"}]}))
    path = write_lines(tmp_path / "long.jsonl", lines)
    with pytest.raises(common.UserError, match=r"1 conversation\(s\) longer than seq_len=128: .*long.jsonl:4 "):
        sft.main(make(data=path))
    assert not os.path.exists(tmp_path / "out" / "state.pt")
    convs = sft.read_conversations(path)
    docs, n_long = sft.render(convs, Tokenizer(tok), make(skip_long=True))
    assert (len(docs), n_long) == (5, 1)


BAD = {
    "malformed": (['{"messages": [}'], r"bad.jsonl:1: not valid JSON"),
    "no_messages": ([json.dumps(conversations(1)[0]), '{"msgs": []}'], r"bad.jsonl:2: missing field 'messages'"),
    "unknown_role": ([json.dumps({"messages": [{"role": "robot", "content": "hi"}]})],
                     r"bad.jsonl:1: messages\[0\].role must be one of .* got 'robot'"),
    "bad_content": ([json.dumps({"messages": [{"role": "user", "content": 3}]})],
                    r"bad.jsonl:1: messages\[0\].content must be a string"),
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
    for f in ("base_countdown", "sft_astro", "sft_direct", "sft_llama_math"):  # the shipped configs parse
        common.parse_config(sft.Config, [os.path.join(ROOT, "config", f + ".py")])


# ----------------------------------------------------------------------------- training

def test_short_run_learns(setup, capsys):
    _, _, make = setup
    cfg = make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1)
    sft.main(cfg)
    recs = [r for r in metrics(cfg.out_dir) if "loss" in r]
    vals = [r["val_loss"] for r in metrics(cfg.out_dir) if "val_loss" in r]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30] and len(vals) == 4  # steps 0, 10, 20, 30
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"] and vals[-1] < 0.7 * vals[0]
    assert all(r["pad"] < 0.5 and r["tok_s"] > 0 for r in recs)
    out = capsys.readouterr().out
    assert "step 30/30 | loss" in out and "| pad " in out and "tok/s" in out
    assert json.load(open(os.path.join(cfg.out_dir, "config.json")))["max_steps"] == 30
    m, tok = load_model(cfg.out_dir)  # the final model loads like any checkpoint
    assert tok.n_vocab == 512
    # a finished run is not redone; the same out_dir with another recipe is refused
    assert sft.main(make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1))["step"] == 30
    assert "already done" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="different lr"):
        sft.main(make(max_steps=30, eval_every=10, log_every=5, val_frac=0.1, lr=1e-4))
    # fine-tuning from it (init=<checkpoint>) starts where it ended
    ft = make(init=cfg.out_dir, out_dir=cfg.out_dir + "_ft", max_steps=2, lr=1e-4, val_frac=0.1, eval_every=1)
    sft.main(ft)
    assert metrics(ft.out_dir)[0]["val_loss"] == pytest.approx(vals[-1], rel=1e-6)  # same weights, same split


def test_grad_checkpoint_same_weights(setup):
    _, _, make = setup
    a, b = make(max_steps=2, out_dir=make().out_dir + "_a"), make(max_steps=2, out_dir=make().out_dir + "_b")
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
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py"), *args], env=env, cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        while p.poll() is None:
            if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    assert p.wait() == -signal.SIGKILL, open(cfg.out_dir + ".log").read()
    assert not os.path.exists(os.path.join(cfg.out_dir, "model.pt"))


@pytest.mark.parametrize("dtype,kills", [("float32", (2, 6)), ("bfloat16", (5,))])
def test_resume_after_sigkill_is_bitwise(setup, dtype, kills):
    _, _, make = setup
    ref = make(dtype=dtype, max_steps=9, save_every=3, out_dir=make().out_dir + "_ref")
    sft.main(ref)
    cfg = make(dtype=dtype, max_steps=9, save_every=3)
    for step in kills:  # killed before the first checkpoint (fp32), and after one
        kill_after(cfg, step)
    sft.main(cfg)  # resumed here, with the subprocesses' single thread (bitwise equality needs the same kernels)
    a, b = final_weights(ref.out_dir), final_weights(cfg.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(cfg.out_dir)] == list(range(10))  # no duplicates left by the kills


# ----------------------------------------------------------------------------- multi-process

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, ports, cfgs):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    for port, cfg in zip(ports, cfgs):
        os.environ["MASTER_PORT"] = str(port)
        sft.main(cfg)  # joins the process group (gloo) and leaves it at the end


def test_ddp_and_fsdp_match_one_process(setup):
    """2 processes (DDP, then FSDP2) on gloo/CPU with the same global batch == 1 process, in fp32."""
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
                assert (key in r1) == (key in r2) and r1.get(key, 0) == pytest.approx(r2.get(key, 0), rel=1e-5)
