"""
Tests for model.py (tiny random models, CPU, no downloads):
    python -m pytest -q t_model.py
transformers and llama-models are test-only references (logit parity, golden token ids).
"""
import base64
import json
import os
import sys
import types

import pytest
import torch

import model as M
from common import UserError

torch.set_num_threads(1)
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def tiny_cfg(**kw):
    # vocab 512 = a byte-level ranks file (256) + 256 specials; hd 16 so rope scaling hits all three bands
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=256,
                rope_scaling=dict(SCALING))
    return M.ModelConfig(**{**base, **kw})


def random_model(cfg, seed=0):
    """Random weights large enough that the logits are far from uniform (so greedy has clear winners)."""
    torch.manual_seed(seed)
    m = M.Llama(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    return m.eval()


def byte_tokenizer(tmp_path):
    path = tmp_path / "bytes.model"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return M.Tokenizer(path)


def hf_model(cfg, state_dict=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(hidden_size=cfg.dim, intermediate_size=M.ffn_hidden(cfg), num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                     vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                     rope_scaling=dict(cfg.rope_scaling, rope_type="llama3") if cfg.rope_scaling else None,
                     max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(hc).eval()
    if state_dict is not None:
        missing, unexpected = hf.load_state_dict({M.hf_name(k): v for k, v in M.split_qkv(state_dict, cfg).items()},
                                                 strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def meta_state_dict(m):
    """Our (half-split rotary) weights in Meta's layout: names as they are, wq/wk rows un-permuted."""
    cfg = m.cfg
    unperm = lambda w, n: w.view(n, 2, -1, w.size(1)).transpose(1, 2).reshape(w.shape)  # inverse of M._meta_perm
    sd = {}
    for k, v in M.split_qkv(m.state_dict(), cfg).items():
        if k.endswith("attention.wq.weight"):
            v = unperm(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = unperm(v, cfg.n_kv_heads)
        sd[k] = v.clone()
    sd["rope.freqs"] = torch.zeros(cfg.dim // cfg.n_heads // 2)  # old Meta checkpoints carry this; ignored
    if cfg.tie_embeddings:
        del sd["output.weight"]  # no output matrix: loads as tied
    return sd


def write_meta(m, tok, d, shards=1):
    """A Meta original directory, optionally split like fairscale model parallelism (rows, or columns of wo/w2)."""
    d.mkdir()
    cfg = m.cfg
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier,
                  norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, use_scaled_rope=True)
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


# ----------------------------------------------------------------------------- model vs transformers

def test_rope_convention_matches_meta_interleaved():
    """Meta rotates interleaved pairs as complex numbers; our half-split rotary on permuted rows is the same."""
    cfg = tiny_cfg()
    T, hd, nh = 10, 16, 4
    x, w = torch.randn(T, cfg.dim), torch.randn(nh * hd, cfg.dim)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), M.rope_freqs(cfg))
    xq = (x @ w.T).view(T, nh, hd // 2, 2)  # Meta: interleaved pairs times e^{i t f}
    meta = torch.view_as_real(torch.view_as_complex(xq) * torch.polar(torch.ones_like(freqs), freqs)[:, None])
    m = M.Llama(cfg)
    cos, sin = m.rope_table(x.device)
    ours = M.rope((x @ M._meta_perm(w, nh).T).view(1, T, nh, hd), cos[None, :T, None], sin[None, :T, None])[0]
    perm = M._meta_perm(torch.arange(nh * hd).float()[:, None], nh)[:, 0].long()  # row order after the permutation
    assert torch.allclose(ours.reshape(T, -1), meta.reshape(T, -1)[:, perm], atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_hf_and_meta_layouts(tmp_path, tied):
    tok = byte_tokenizer(tmp_path)
    cfg = tiny_cfg(tie_embeddings=tied, ffn_dim_multiplier=1.3)
    ref = random_model(cfg)
    hf = hf_model(cfg, ref.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    want = hf(idx).logits
    # Hugging Face layout, sharded with an index (written by transformers itself)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    os.makedirs(tmp_path / "hf" / "original")
    (tmp_path / "hf" / "original" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    m_hf, _ = M.load_model(tmp_path / "hf")
    # Meta layout, two model-parallel shards
    write_meta(ref, tok, tmp_path / "meta", shards=2)
    m_meta, _ = M.load_model(tmp_path / "meta")
    assert m_meta.cfg.tie_embeddings == tied and m_hf.cfg.tie_embeddings == tied
    for m in (ref, m_hf, m_meta):
        assert (m(idx) - want).abs().max().item() <= 1e-4
    if tied:
        assert m_hf.output.weight is m_hf.tok_embeddings.weight


def test_meta_single_shard_and_hf_single_file(tmp_path):
    tok = byte_tokenizer(tmp_path)
    ref = random_model(tiny_cfg(), seed=1)
    write_meta(ref, tok, tmp_path / "meta", shards=1)
    hf_model(ref.cfg, ref.state_dict()).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    idx = torch.randint(0, 512, (1, 30))
    for d in ("meta", "hf"):
        m, t = M.load_model(tmp_path / d)
        assert t.n_vocab == 512 and torch.allclose(m(idx), ref(idx), atol=1e-5)


def test_greedy_generation_matches_transformers():
    cfg = tiny_cfg()
    m = random_model(cfg, seed=2)
    hf = hf_model(cfg, m.state_dict())
    prompts = [[5, 9, 200, 31], [7], list(range(100, 123))]
    res = M.generate(m, prompts, max_new_tokens=24, temperature=0)
    for p, [s] in zip(prompts, res):
        want = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        assert s.tokens == want and not s.stopped


def test_export_hf_round_trip(tmp_path):
    from transformers import LlamaForCausalLM
    tok = byte_tokenizer(tmp_path)
    for tied in (False, True):
        m = random_model(tiny_cfg(tie_embeddings=tied), seed=3)
        out = tmp_path / f"export{tied}"
        M.export_hf(m, tok, out)
        hf = LlamaForCausalLM.from_pretrained(out).eval()
        idx = torch.randint(0, 512, (2, 33))
        assert (hf(idx).logits - m(idx)).abs().max().item() <= 1e-4
        back, _ = M.load_model(out)
        assert torch.equal(back(idx), m(idx))


def test_doc_mask_equals_separate_forwards():
    m = random_model(tiny_cfg(), seed=4)
    a, b, c = (torch.randint(0, 512, (1, n)) for n in (7, 12, 5))
    packed = torch.cat([a, b, c], 1)
    doc = torch.tensor([[3] * 7 + [1] * 12 + [3] * 5])  # ids may repeat: a run of equal ids is one document
    got = m(packed, doc=doc)
    want = torch.cat([m(a), m(b), m(c)], 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(m(packed, doc=torch.zeros_like(doc)), m(packed), atol=1e-5)


# ----------------------------------------------------------------------------- generation

def full_logprobs(m, prompt, tokens):
    lp = m(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1].log_softmax(-1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_cache_equals_full_forward_ragged_fanout():
    """KV-cached logprobs (ragged prompts, fan-out, refilled slots, compaction) == full forward log_softmax."""
    m = random_model(tiny_cfg(), seed=5)
    prompts = [[1, 2, 3], list(range(40, 81)), [9], list(range(200, 217))]
    res = M.generate(m, prompts, [3, 1, 2, 4], max_new_tokens=20, temperature=0.8, top_k=50, top_p=0.9,
                     seed=1, batch_size=4)
    assert [len(r) for r in res] == [3, 1, 2, 4]
    for p, samples in zip(prompts, res):
        for s in samples:
            assert len(s.tokens) == 20 and len(s.logprobs) == 20
            assert torch.allclose(torch.tensor(s.logprobs), full_logprobs(m, p, s.tokens), atol=1e-4)


def same(a, b):
    """Samples (nested lists) with equal tokens and stop flags and logprobs equal up to float noise."""
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.tokens == b.tokens and a.stopped == b.stopped and \
        torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_batching_does_not_change_greedy_outputs():
    m = random_model(tiny_cfg(), seed=6)
    prompts = [list(range(i, i + 3 * i + 1)) for i in range(1, 8)]
    free = M.generate(m, prompts, max_new_tokens=15, temperature=0)
    stop = {free[0][0].tokens[4], free[3][0].tokens[9]}  # rows stop at different steps
    kw = dict(max_new_tokens=15, temperature=0, stop_ids=stop)
    ref = M.generate(m, prompts, 2, batch_size=256, **kw)
    assert any(s.stopped for r in ref for s in r) and not all(s.stopped for r in ref for s in r)
    for bs in (1, 3):  # (the logprobs' last bits depend on the batch shape)
        assert same(M.generate(m, prompts, 2, batch_size=bs, **kw), ref)
    for p, r in zip(prompts, ref):  # and each equals the prompt alone
        assert same([r[0], r[0]], r) and same(M.generate(m, [p], **kw)[0], r[:1])


def test_fanout_rows_sample_independently_and_seed_reproduces():
    m = random_model(tiny_cfg(), seed=7)
    with torch.no_grad():
        m.output.weight.mul_(0.05)  # flatten the distribution so samples differ
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = M.generate(m, [[1, 2, 3]], 16, seed=3, **kw)[0]
    assert len({s.tokens[0] for s in a}) > 4  # first tokens drawn per row, not broadcast
    assert len({tuple(s.tokens) for s in a}) == 16
    assert M.generate(m, [[1, 2, 3]], 16, seed=3, **kw)[0] == a
    assert M.generate(m, [[1, 2, 3]], 16, seed=4, **kw)[0] != a


def test_stop_ids_and_max_new_tokens():
    m = random_model(tiny_cfg(), seed=8)
    prompt = [4, 5, 6]
    [[free]] = M.generate(m, [prompt], max_new_tokens=12, temperature=0)
    assert len(free.tokens) == 12 and not free.stopped
    stop = free.tokens[5]
    k = free.tokens.index(stop)
    [[s]] = M.generate(m, [prompt], max_new_tokens=12, temperature=0, stop_ids=[stop, 9999])
    assert s.tokens == free.tokens[: k + 1] and s.stopped and len(s.logprobs) == k + 1
    [[s]] = M.generate(m, [prompt], max_new_tokens=3, temperature=0)
    assert s.tokens == free.tokens[:3]
    # the context ends generation too: max_seq_len 256
    [[s]] = M.generate(m, [list(range(250))], max_new_tokens=50, temperature=0)
    assert len(s.tokens) == 6 and not s.stopped
    assert M.generate(m, [list(range(256))], max_new_tokens=5)[0][0] == M.Sample([], [], False)


def test_sampler_temperature_top_k_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])).expand(20000, 5).contiguous()
    freq = lambda ids: torch.bincount(ids, minlength=5).float() / len(ids)
    assert torch.allclose(freq(M.sample_next(logits, 1.0, 0, 1.0, gen)), logits[0].exp(), atol=0.015)
    assert torch.equal(M.sample_next(logits, 0, 0, 1.0, gen), torch.zeros(20000, dtype=torch.long))
    f = freq(M.sample_next(logits, 1.0, 2, 1.0, gen))  # top-k renormalizes over the two best
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015)
    f = freq(M.sample_next(logits, 1.0, 0, 0.7, gen))  # top-p keeps 0.5, 0.3 (the mass before 0.15 is 0.8 > 0.7)
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.015)
    f = freq(M.sample_next(logits, 2.0, 0, 1.0, gen))  # temperature 2 flattens: p ~ sqrt(p)
    want = logits[0].div(2).softmax(-1)
    assert torch.allclose(f, want, atol=0.015)


def test_generate_stats_count_each_prompt_once():
    m = random_model(tiny_cfg(), seed=9)
    M.reset_generate_stats()
    res = M.generate(m, [[1, 2, 3, 4], [5, 6]], [8, 2], max_new_tokens=5, temperature=1.0, stop_ids=range(0, 512, 3))
    st = M.generate_stats()
    assert st["prefill_tokens"] == 3 + 1  # all but the last token of each distinct prompt, once
    assert st["decode_tokens"] == sum(len(s.tokens) for r in res for s in r) < 10 * 5  # finished rows cost nothing


def test_compiled_decode_matches_eager():
    m = random_model(tiny_cfg(n_layers=1, dim=32), seed=10)
    prompts = [[1, 2, 3], list(range(10, 30))]
    kw = dict(max_new_tokens=10, temperature=1.0, seed=5)
    eager = M.generate(m, prompts, 2, **kw)
    compiled = M.generate(m, prompts, 2, compile=True, **kw)
    for e, c in zip(sum(eager, []), sum(compiled, [])):
        assert e.tokens == c.tokens
        assert torch.allclose(torch.tensor(e.logprobs), torch.tensor(c.logprobs), atol=1e-4)


# ----------------------------------------------------------------------------- tokenizer

def llama_models_reference():
    """llama-models' own Tokenizer / ChatFormat. Its chat_format imports PIL only for images: when PIL is absent, a
    stub stands in during the import and is removed afterwards (so nothing else sees a fake PIL)."""
    pytest.importorskip("llama_models")
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
        from llama_models.llama3 import tokenizer
        from llama_models.llama3.chat_format import ChatFormat
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    path = os.path.join(os.path.dirname(tokenizer.__file__), "tokenizer.model")
    return path, tokenizer.Tokenizer.get_instance(), ChatFormat, RawMessage, StopReason


def test_real_llama3_tokenizer_golden_ids():
    path, ref, ChatFormat, RawMessage, StopReason = llama_models_reference()
    tok = M.Tokenizer(path)
    assert tok.n_vocab == ref.n_words == 128256
    assert tok.specials == ref.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id) == (128000, 128001, 128008, 128009)
    assert tok.stop_ids == set(ref.stop_tokens)
    texts = ["Hello, world!", "  spaces\n\nand\ttabs 12345 ünïcödé 日本語", "x<|eot_id|>y <|begin_of_text|>", ""]
    for t in texts:
        assert tok.encode(t) == ref.encode(t, bos=False, eos=False)
        assert tok.decode(tok.encode(t)) == t
    assert 128009 not in tok.encode("<|eot_id|>")  # special-token text is never a control token
    assert {271, 198} <= tok.ids_containing("\n") and 271 in tok.ids_containing("\n\n")
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 2+2?\n"},
            {"role": "assistant", "content": "4\n"}, {"role": "user", "content": "<|eot_id|> and 3+3?"}]
    fmt = ChatFormat(ref)
    raw = [RawMessage(role=x["role"], content=x["content"], stop_reason=StopReason.end_of_turn) for x in msgs]
    assert tok.render_prompt(msgs) == fmt.encode_dialog_prompt(raw).tokens
    ids, mask = tok.render_chat(msgs[:3])
    want = [ref.bos_id] + sum((fmt.encode_message(r, None)[0] for r in raw[:3]), [])
    assert ids == want
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]  # golden: system = 9125, "\n\n" = 271
    assert tok.render_prompt(msgs[:1])[-4:] == [128006, 78191, 128007, 271]  # assistant = 78191
    body = fmt.encode_message(raw[2], None)[0][4:]  # assistant content + <|eot_id|>
    assert [i for i, k in zip(ids, mask) if k] == body and body[-1] == tok.eot_id


def test_byte_tokenizer_chat_mask_and_specials(tmp_path):
    tok = byte_tokenizer(tmp_path)
    assert tok.n_vocab == 512 and tok.bos_id == 256 and tok.eot_id == 256 + 9
    assert tok.special("<|start_header_id|>") == 262 and tok.special("<|reserved_special_token_2|>") == 268
    assert tok.special("<|reserved_special_token_245|>") == 511
    assert tok.encode("ab") == [97, 98] and tok.decode([104, 105]) == "hi"
    assert tok.ids_containing("\n") == {10}
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert [i for i, k in zip(ids, mask) if k] == [ord("y"), ord("o"), tok.eot_id]
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    prompt = tok.render_prompt([{"role": "user", "content": "hi"}])
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError):
        tok.render_prompt([{"role": "assistant", "content": "x"}])
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match="bad.model:2"):
        M.Tokenizer(bad)


# ----------------------------------------------------------------------------- checkpoints

def test_save_checkpoint_round_trip_and_errors(tmp_path):
    tok = byte_tokenizer(tmp_path)
    m = random_model(tiny_cfg(tie_embeddings=True), seed=11)
    out = tmp_path / "ck"
    M.save_checkpoint(out, m, tok, {"lr": 1e-3})
    back, tok2 = M.load_model(out)
    idx = torch.randint(0, 512, (1, 20))
    assert torch.equal(back(idx), m(idx)) and tok2.n_vocab == tok.n_vocab
    assert back.output.weight is back.tok_embeddings.weight
    assert torch.load(out / "model.pt", weights_only=True)["config"] == {"lr": 1e-3}
    assert sorted(os.listdir(out)) == ["model.pt", "tokenizer.model"]
    # vocab mismatch names the tokenizer file
    (tmp_path / "ck2").mkdir()
    M.save_checkpoint(tmp_path / "ck2", random_model(tiny_cfg(vocab_size=600)), tok, {})
    with pytest.raises(UserError, match="tokenizer.model.*vocab_size 600"):
        M.load_model(tmp_path / "ck2")
    # corrupted model.pt
    data = (out / "model.pt").read_bytes()
    (out / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.pt"):
        M.load_model(out)
    with pytest.raises(UserError, match="no model.pt"):
        M.load_model(tmp_path / "nowhere")


def test_broken_hf_and_meta_checkpoints(tmp_path):
    tok = byte_tokenizer(tmp_path)
    m = random_model(tiny_cfg(), seed=12)
    M.export_hf(m, tok, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-100])  # truncated
    with pytest.raises(UserError, match="model.safetensors"):
        M.load_model(tmp_path / "hf")
    st.write_bytes(data)
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(UserError, match="gone.safetensors"):
        M.load_model(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors.index.json")
    os.remove(tmp_path / "hf" / "tokenizer.model")
    with pytest.raises(UserError, match="tokenizer.model"):
        M.load_model(tmp_path / "hf")
    write_meta(m, tok, tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="consolidated.00.pth"):
        M.load_model(tmp_path / "meta")
    write_meta(random_model(tiny_cfg(n_layers=1)), tok, tmp_path / "meta1")
    params = json.loads((tmp_path / "meta1" / "params.json").read_text())
    (tmp_path / "meta1" / "params.json").write_text(json.dumps({**params, "n_layers": 2}))
    with pytest.raises(UserError, match="missing tensor layers.1"):
        M.load_model(tmp_path / "meta1")


def test_safetensors_writer_reads_back_and_ffn_rule(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4), "e": torch.zeros(0, 2)}
    M.write_safetensors(tmp_path / "x.safetensors", ts)
    back = M.read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    # Meta's SwiGLU sizes: Llama 3 8B, Llama 3.2 1B; and HF sizes map back onto the rule
    assert M.ffn_hidden(M.ModelConfig(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3)) == 14336
    assert M.ffn_hidden(M.ModelConfig(dim=2048, multiple_of=256, ffn_dim_multiplier=1.5)) == 8192
    for dim, hidden in [(2048, 8192), (4096, 14336), (64, 171), (256, 704), (3072, 8192)]:
        mo, mult = M._ffn_fields(dim, hidden)
        assert M.ffn_hidden(M.ModelConfig(dim=dim, multiple_of=mo, ffn_dim_multiplier=mult)) == hidden
