"""
The Llama 3 tokenizer and chat format: tiktoken BPE from a ranks file ("<base64 token> <rank>" per
line, as Meta ships tokenizer.model) plus Llama 3.1's 256 special tokens.

    from tokenizer import Tokenizer
    tok = Tokenizer("data/countdown/tokenizer.model")  # written by data/countdown/prepare.py
    ids, mask = tok.render_chat([{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}])  # mask: assistant tokens
    prompt = tok.render_prompt([{"role": "user", "content": "2+2?"}])  # then the assistant header
    print(tok.decode(prompt))

The chat format renders exactly the given messages, with no injected "Cutting Knowledge Date" system
header (HF's template adds one; llama-models' ChatFormat does not). Content is not stripped (as in
llama-models), so traces keep their trailing delimiters.
"""
import base64
import binascii
import os
import shutil

import tiktoken

from common import UserError

# Llama 3's pre-tokenizer pattern
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>"  # Llama 3.1's order
                   for i in range(256 - len(SPECIAL_TOKENS))]


def read_ranks(path):
    """A tiktoken ranks file ("<base64 token> <rank>" per line) -> {bytes: rank}, ranks 0..n-1."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file not found")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise UserError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE from a ranks file plus 256 special tokens, ids n_base + i."""

    def __init__(self, path):
        self.path = str(path)
        ranks = read_ranks(self.path)
        self.specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=PAT_STR,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.n_vocab = len(ranks) + len(SPECIAL_TOKENS)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.eot_id, self.eom_id = self.specials["<|eot_id|>"], self.specials["<|eom_id|>"]
        self.stop_ids = {self.eot_id, self.eom_id, self.eos_id}
        self._bytes = None

    def save(self, out_dir):
        """Copy the ranks file to out_dir/tokenizer.model, atomically (unless it is that file)."""
        dst = os.path.join(out_dir, "tokenizer.model")
        if not (os.path.exists(dst) and os.path.samefile(self.path, dst)):
            tmp = f"{dst}.tmp{os.getpid()}"
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, dst)

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # special-token strings in text stay plain text

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def special(self, name):
        return self.specials[name]

    def ids_containing(self, s):
        """Ids of every token whose bytes contain the string s."""
        if self._bytes is None:
            self._bytes = [self.enc.decode_single_token_bytes(i) for i in range(self.n_vocab)]
        b = s.encode("utf-8")
        return {i for i, t in enumerate(self._bytes) if b in t}

    def _header(self, role):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}")
        return [self.specials["<|start_header_id|>"], *self.encode(role),
                self.specials["<|end_header_id|>"], *self.encode("\n\n")]

    def render_chat(self, messages):
        """Llama 3 chat format -> (ids, mask); mask is 1 on assistant content and its <|eot_id|>,
        from character loss_from of the content on where a message has one (the text before it
        is context: encoded on its own, no loss)."""
        ids, mask = [self.bos_id], [0]
        for m in messages:
            k, text = m.get("loss_from", 0), m["content"]
            h, before = self._header(m["role"]), self.encode(text[:k])
            body = self.encode(text[k:]) + [self.eot_id]
            ids += h + before + body
            mask += [0] * (len(h) + len(before)) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages):
        """Messages without the final assistant turn -> ids ending in the assistant header."""
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("render_prompt takes the conversation without the final assistant "
                             "message")
        return self.render_chat(messages)[0] + self._header("assistant")
