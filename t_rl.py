"""Tests for rl.py: python -m pytest -q t_rl.py"""
import base64
import contextlib
import dataclasses
import json
import math
import os
import random

import pytest
import torch

import common
import eval as ev
import model
import rl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: other jobs share these 2 cores, and oversubscribed OpenMP threads crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- advantages

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
    # std scaling: group 0 has unbiased std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1; group 2 std of [1,-1,-1] = sqrt(4/3)
    adv, _ = rl.group_advantages(rewards, keep, 4, std_adv=True)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]) / (1 + 1e-6), atol=1e-6)
    assert torch.allclose(adv[8:12], torch.tensor([4 / 3, -2 / 3, 0, -2 / 3]) / (math.sqrt(4 / 3) + 1e-6), atol=1e-6)
    assert adv[4:8].eq(0).all() and adv[12:].eq(0).all()
    # non-dyadic equal rewards must still count as zero signal (no float noise from the mean)
    _, signal = rl.group_advantages(torch.full((4,), 0.1), torch.ones(4, dtype=torch.bool), 4)
    assert not signal.any()


# ----------------------------------------------------------------------------- loss

def test_loss_token_level_on_policy():
    """ppo_epochs=1: old = logp.detach(), ρ ≡ 1, loss = -Σ A / T and every valid token gets gradient -A/T:
    no length bias (a per-sequence mean would give the 1-token answer 3x the per-token weight)."""
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


def test_loss_masks_padding_and_truncations():
    """Masked positions (padding, truncated completions) contribute nothing, even with extreme values there."""
    logp = torch.tensor([[-0.5, -80.0], [-1.0, -0.2]], requires_grad=True)
    old = torch.tensor([[-0.4, 0.0], [-0.9, 50.0]])
    ref = torch.tensor([[-0.6, 90.0], [-1.1, -0.2]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, clipped, kl = rl.pg_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and math.isfinite(kl)
    assert logp.grad[:, 1].eq(0).all()
    ref_only, _, kl_only = rl.pg_loss(logp[:, :1], old[:, :1], torch.tensor([1.0, -1.0]), mask[:, :1], 0.2,
                                      ref[:, :1], beta=0.1)
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
    # and its gradient pulls the policy toward the reference: ∂k3/∂ℓθ = 1 - exp(ℓref - ℓθ) (< 0 where ref > π)
    lp = logp.clone().requires_grad_()
    loss, _, _ = rl.pg_loss(lp, lp.detach(), adv, mask, 0.2, ref_logp=ref, beta=1.0)
    loss.backward()
    assert torch.allclose(lp.grad, 1 - (ref - logp).exp())


def test_second_epoch_clips():
    """The ratio/clip path: two PPO updates on the same rollouts with a large step; the second update sees
    ρ far from 1 and clips, the first (ρ = 1) never does."""
    torch.manual_seed(0)
    logits = torch.zeros(6, 5, requires_grad=True)  # a toy policy: 6 positions, 5 actions
    actions = torch.randint(0, 5, (6,))
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    opt = torch.optim.SGD([logits], lr=20.0)
    old = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).view(2, 3).detach()  # sampling logprobs
    fracs = []
    for epoch in range(2):
        logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).view(2, 3)
        loss, clipped, _ = rl.pg_loss(logp, old, adv, mask, 0.2)
        opt.zero_grad()
        (loss / mask.sum()).backward()
        opt.step()
        fracs.append(clipped / mask.sum().item())
    assert fracs[0] == 0 and fracs[1] > 0


# ----------------------------------------------------------------------------- helpers

def test_step_prompts_is_a_stream_of_permutations():
    n, per = 7, 3
    seq = [i for s in range(7) for i in rl.step_prompts(n, s, per, seed=5)]  # 21 = 3 epochs
    for e in range(3):
        assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
    assert seq[:n] != seq[n:2 * n]
    assert rl.step_prompts(n, 4, per, 5) == seq[12:15]  # stateless: any step on its own
    assert rl.derive_seed(1, "rollout", 3, 0) != rl.derive_seed(1, "rollout", 4, 0)


# ----------------------------------------------------------------------------- runs on the built-in task's pieces
# The start policy must already solve the task sometimes. A random tiny model never writes a correct boxed
# expression, and SFT-ing one in-test takes too long on 2 shared cores, so we build it by hand: a byte-level Llama
# whose blocks are switched off (wo = w2 = 0) is a bigram model, logits = W_out · rmsnorm(E[last token]), and we set
# E and W_out so that after the prompt it writes "\boxed{2" then "+" or "*" with probability P_ADD / 1 - P_ADD,
# then "3}" and <|eot_id|>. On the easy problem "make 5 from 2 3" it is right with probability ~P_ADD; a second
# problem, "make 7 from 2 3", has no solution and the difficulty filter must drop it. RL has to raise P(+ | 2)
# through every real piece: render_prompt, generate, eval.grade, advantages, the loss, AdamW on all weights.

P_ADD = 0.4


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def bigram_policy(tok, chain, branch, p_first, dim=32, sharp=12.0):
    """Llama whose next-token distribution depends on the last token only: chain[a] = b makes b follow a
    (almost surely); branch = (a, b1, b2): after a, b1 with probability p_first, else b2. The source tokens get
    orthogonal ±1 embeddings (Hadamard rows: rms 1, so rmsnorm keeps them), so every weight carries the signal
    and an optimizer step moves the logits as it would in a trained model."""
    torch.manual_seed(0)
    net = model.Llama(model.ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_vocab,
                                        max_seq_len=256))
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
    with open(d / "bytes.model", "w") as f:
        for i in range(256):
            f.write(f"{base64.b64encode(bytes([i])).decode()} {i}\n")
    tok = model.Tokenizer(str(d / "bytes.model"))
    probs = [dict(id="add", numbers=[2, 3], target=5), dict(id="none", numbers=[2, 3], target=7)]
    for p in probs:
        p.update(problem=ev.countdown_prompt(p["numbers"], p["target"]), answer=str(p["target"]))
    assert ev.grade(probs[0], "\\boxed{2+3}")[1] and not ev.grade(probs[0], "\\boxed{2*3}")[1]
    assert tok.render_prompt(ev.prompt_messages(probs[0]))[-1] == ord("\n")
    text = "\n\\boxed{2"
    chain = {ord(a): ord(b) for a, b in zip(text, text[1:])}
    chain.update({ord("+"): ord("3"), ord("*"): ord("3"), ord("3"): ord("}"), ord("}"): tok.eot_id})
    net = bigram_policy(tok, chain, (ord("2"), ord("+"), ord("*")), P_ADD)
    model.save_checkpoint(str(d / "init"), net, tok, {})
    train = write_jsonl(d / "train.jsonl", probs)

    def make(out, **kw):
        base = dict(init=str(d / "init"), train=train, val=train, out_dir=str(d / out), prompts_per_step=4,
                    group_size=8, max_new_tokens=16, max_steps=12, lr=1e-2, warmup_steps=1, micro_batch=16,
                    filter_samples=8, eval_every=10, eval_limit=2, save_every=100, log_kl=False)
        base.update(kw)
        return rl.Config(**base)
    return make


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "reward" in r], [r for r in recs if "val_acc" in r]


def test_logprobs_match_the_sampler(easy):
    """collate + token_logprobs (the training forward) give the log-probs generate sampled with: the masks, the
    padding and the shift line up, for completions of different lengths and prompts of different lengths."""
    cfg = easy("unused")
    net, tok = model.load_model(cfg.init)
    prompts = [tok.render_prompt([{"role": "user", "content": t}]) for t in ("make 5", "a longer prompt: make 5 now")]
    groups = model.generate(net, prompts, 3, max_new_tokens=12, stop_ids=tok.stop_ids, seed=3)
    assert all(len(s.tokens) == 12 for ss in groups for s in ss)  # then cut to different lengths below
    samples = [(p, s) for p, ss in zip(prompts, groups) for s in ss]
    rows = [(p, s.tokens[:k], s.logprobs[:k], 0.0) for k, (p, s) in zip((12, 3, 7, 1, 12, 5), samples)]
    inputs, targets, old, mask, adv, start = rl.collate(rows, tok.bos_id, "cpu")
    with torch.no_grad():
        logp = rl.token_logprobs(net, inputs, targets, start)
    assert mask.sum().item() == sum(len(r[1]) for r in rows)
    assert torch.allclose(logp[mask], old[mask], atol=1e-4)
    assert torch.equal(targets[:, start:][mask], torch.tensor([t for r in rows for t in r[1]]))


def test_reward_goes_up_and_filter(easy):
    cfg = easy("run", max_steps=12, eval_every=6)
    rl.main(cfg)
    steps, evals = read_metrics(cfg.out_dir)
    assert [r["step"] for r in steps] == list(range(12)) and [r["step"] for r in evals] == [0, 6, 12]
    first, last = (sum(r["reward"] for r in rs) / len(rs) for rs in (steps[:3], steps[-3:]))
    assert last > first + 0.3, (first, last)
    # greedy decoding picks "*" (P_ADD < 0.5) at the start and "+" at the end; "none" stays unsolvable
    assert evals[0]["val_acc"] == 0 and evals[-1]["val_acc"] == 0.5
    assert all(r["clipfrac"] == 0 for r in steps)  # ppo_epochs = 1: ρ ≡ 1
    assert all(0 <= r["zero"] <= 1 and 0 <= r["trunc"] <= 1 and r["kl"] is None for r in steps)
    # the filter kept the solvable problem only, and a rerun reads its cache (no policy needed)
    with open(os.path.join(cfg.out_dir, "prompts.jsonl")) as f:
        rates = {r["id"]: r["pass_rate"] for r in map(json.loads, f)}
    assert rates["none"] == 0 and 0 < rates["add"] < 1
    kept = rl.select_prompts(cfg, None, None, ev.read_problems(cfg.train), 0, 1)
    assert [r["id"] for r in kept] == ["add"]
    # the final model is a regular checkpoint
    net, _ = model.load_model(cfg.out_dir)
    assert net.cfg.dim == 32


def test_second_ppo_epoch_clips_in_a_run(easy):
    """The ratio/clip path inside main: ppo_epochs=2 with a large step clips tokens in the second epoch."""
    cfg = easy("ppo", ppo_epochs=2, lr=3e-2, max_steps=2, eval_every=0, filter_samples=0, log_kl=True)
    rl.main(cfg)
    steps, _ = read_metrics(cfg.out_dir)
    assert any(r["clipfrac"] > 0 for r in steps if r["tokens"])
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in steps)


def test_resume_after_a_crash_is_bitwise(easy, monkeypatch):
    """A run that dies in the middle of step 3 (its last checkpoint is at step 2, and metrics.jsonl already holds
    step 2) and is restarted ends with the same weights, optimizer state and metrics as a run that never stopped.
    In-process (the crash is an exception thrown from generate) because a fresh interpreter costs more than this
    whole test on 2 shared cores; sft's test covers a real SIGKILL of the same save/resume helpers.
    KL penalty on, so the reference path is covered too."""
    kw = dict(max_steps=6, save_every=2, eval_every=3, kl_beta=0.05, log_kl=True)
    full, cut = easy("full", **kw), easy("cut", **kw)
    rl.main(full)

    class Crash(BaseException):
        pass

    real = rl.generate

    def dying(*a, **k):
        if k["seed"] == rl.derive_seed(cut.seed, "rollout", 3, 0):
            raise Crash
        return real(*a, **k)
    monkeypatch.setattr(rl, "generate", dying)
    with pytest.raises(Crash):
        rl.main(cut)
    monkeypatch.undo()
    assert torch.load(os.path.join(cut.out_dir, "state.pt"), weights_only=False)["step"] == 2
    assert '"step": 2, "lr"' in open(os.path.join(cut.out_dir, "metrics.jsonl")).read()  # to be redone
    rl.main(cut)
    a, b = (torch.load(os.path.join(c.out_dir, "state.pt"), weights_only=False) for c in (full, cut))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    ma, mb = (open(os.path.join(c.out_dir, "metrics.jsonl")).read().splitlines() for c in (full, cut))
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("dt", "tok_s")} for x in lines]
    assert strip(ma) == strip(mb)
    steps, _ = read_metrics(full.out_dir)
    assert sum(r["tokens"] for r in steps) > 0 and any(r["kl"] > 0 for r in steps)  # updates and a live KL term
    # a finished run is left alone; a changed run refuses to resume; a bad option is a UserError
    rl.main(full)
    assert open(os.path.join(full.out_dir, "metrics.jsonl")).read().splitlines() == ma
    with pytest.raises(common.UserError, match="lr"):
        rl.main(easy("full", **dict(kw, lr=1e-3)))
    with pytest.raises(common.UserError, match="truncation"):
        rl.main(easy("bad", truncation="drop"))


def _ddp_worker(rank, world, port, init, rows, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common.dist_setup()
    net, tok = model.load_model(init)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: update() leaves the all-reduced gradients in .grad
    res = rl.update(ddp, None, opt, rows[rank::world], cfg, world, "cpu", tok.bos_id, contextlib.nullcontext())
    out.put((rank, res[:3], {k: p.grad.numpy().copy() for k, p in net.named_parameters()}))  # numpy: no shm
    torch.distributed.destroy_process_group()


def test_ddp_update_equals_single_process(easy):
    """2 ranks (gloo, forked) with half of the rows each, micro-batches of 2 (so the ranks run different numbers
    of real micro-batches and one pads with a dummy): the gradient equals the 1-process gradient over all rows."""
    cfg = easy("unused", micro_batch=2, ppo_epochs=1, grad_clip=0.0)  # clipping would hide a scale error
    net, tok = model.load_model(cfg.init)
    p1, p2 = (tok.render_prompt([{"role": "user", "content": t}]) for t in ("make 5", "a longer prompt: make 5"))
    rnd = random.Random(0)
    rows = [(p, [rnd.randrange(256) for _ in range(n)], [0.0] * n, a) for p, n, a in
            [(p1, 3, 1.0), (p2, 5, -0.5), (p1, 1, 0.7), (p2, 8, -1.2), (p1, 4, 2.0)]]  # ranks get 3 and 2 rows
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    n_tok, loss_sum, _ = rl.update(net, None, opt, rows, cfg, 1, "cpu", tok.bos_id, contextlib.nullcontext())[:3]
    ctx = torch.multiprocessing.get_context("fork")  # no re-import: seconds instead of tens of seconds here
    out, port = ctx.Queue(), random.Random().randrange(20000, 60000)
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg.init, rows, cfg, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][1][0] == got[1][1][0] == n_tok == 21
    assert got[0][1][1] + got[1][1][1] == pytest.approx(loss_sum, rel=1e-5)  # Σ over ranks = the 1-process sum
    for k, p in net.named_parameters():
        for _, _, grads in got:
            assert torch.allclose(torch.from_numpy(grads[k]), p.grad, atol=1e-6, rtol=1e-4), k


def test_config_files():
    root = os.path.dirname(os.path.abspath(__file__))
    astro, direct, math_ = (common.parse_config(rl.Config, [os.path.join(root, "config", f"rl_{n}.py")])
                            for n in ("astro", "direct", "llama_math"))
    assert dataclasses.asdict(astro) == dataclasses.asdict(rl.Config())  # the defaults are the built-in task
    assert (direct.init, direct.out_dir) == ("out/sft_direct", "out/rl_direct")
    assert {k for k, v in dataclasses.asdict(direct).items() if v != getattr(astro, k)} == {"init", "out_dir"}
    assert math_.dtype == "bfloat16" and math_.train.startswith("data/math/")
