"""
Tokenizers and chat formats: tiktoken BPE from a ranks file ("<base64 token> <rank>" per line, as
Meta ships tokenizer.model) plus Llama 3.1's 256 special tokens, or from the parts hf_tokenizer.py
reads out of a Hugging Face tokenizer.json; the chat format is Llama 3's or ChatML's.

    from tokenizer import Tokenizer
    tok = Tokenizer("data/countdown/tokenizer.model")  # written by data/countdown/prepare.py
    ids, mask = tok.render_chat([{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}])  # mask: assistant tokens
    prompt = tok.render_prompt([{"role": "user", "content": "2+2?"}])  # then the assistant header
    print(tok.decode(prompt))

The chat format renders exactly the given messages, with no injected "Cutting Knowledge Date" system
header (HF's template adds one; llama-models' ChatFormat does not). Content is not stripped (as in
llama-models), so traces keep their trailing delimiters. ChatML renders
"<|im_start|>role\ncontent<|im_end|>\n" per message, also without an injected system message.
"""
import base64
import binascii
import os
import re
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


LLAMA3, CHATML = "llama3", "chatml"  # the chat formats render_chat writes
TURN_END = {LLAMA3: "<|eot_id|>", CHATML: "<|im_end|>"}  # the token that ends each message


class Tokenizer:
    """tiktoken BPE plus special tokens and a chat format. Tokenizer(path) reads a ranks file with
    Llama 3's pattern, 256 special tokens (ids n_base + i) and chat format; with `ranks` given,
    path names the file they came from (hf_tokenizer.py reads a Hugging Face tokenizer.json) and
    the other arguments say the pattern, {name: id} special tokens, chat format (LLAMA3, CHATML
    or None), bos/eos names, the files save copies and the characters (a regex character class)
    encode drops because the vocab has no token for their bytes."""

    def __init__(self, path, ranks=None, pat_str=PAT_STR, specials=None, chat_format=LLAMA3,
                 bos="<|begin_of_text|>", eos="<|end_of_text|>", files=None, drop=None):
        self.path = str(path)
        self.drop = re.compile(drop) if drop else None
        if ranks is None:
            ranks = read_ranks(self.path)
            specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.ranks, self.specials, self.chat_format = ranks, specials, chat_format
        self.pat_str = pat_str
        self.files = files or {"tokenizer.model": self.path}  # {name in a checkpoint: source}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=pat_str,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.n_vocab = self.enc.max_token_value + 1
        self.bos_id, self.eos_id = specials.get(bos), specials.get(eos)
        self.eot_id = specials.get(TURN_END[chat_format]) if chat_format else None
        self.eom_id = specials.get("<|eom_id|>") if chat_format == LLAMA3 else None
        self.stop_ids = {i for i in (self.eot_id, self.eom_id, self.eos_id) if i is not None}
        self._bytes = None

    def save(self, out_dir):
        """Copy the tokenizer's files into out_dir, atomically (unless out_dir holds them)."""
        for name, src in self.files.items():
            dst = os.path.join(out_dir, name)
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                tmp = f"{dst}.tmp{os.getpid()}"
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)

    def encode(self, text, specials=False):
        """Text -> ids; special-token strings in text stay plain text unless specials=True."""
        if self.drop:  # the text between dropped characters, piece by piece
            pieces = self.drop.split(text)
            if len(pieces) > 1:
                return [i for p in pieces for i in self.encode(p, specials)]
        if specials:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def special(self, name):
        return self.specials[name]

    def ids_containing(self, s):
        """Ids of every token whose bytes contain the string s."""
        if self._bytes is None:
            ids = sorted({*self.ranks.values(), *self.specials.values()})
            self._bytes = {i: self.enc.decode_single_token_bytes(i) for i in ids}
        b = s.encode("utf-8")
        return {i for i, t in self._bytes.items() if b in t}

    def _header(self, role):
        """The ids before a message's content: Llama 3's <|start_header_id|>role<|end_header_id|>
        and a blank line, or ChatML's <|im_start|>role and a newline."""
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}")
        if self.chat_format == LLAMA3:
            return [self.specials["<|start_header_id|>"], *self.encode(role),
                    self.specials["<|end_header_id|>"], *self.encode("\n\n")]
        if self.chat_format == CHATML:
            return [self.specials["<|im_start|>"], *self.encode(role + "\n")]
        raise ValueError(f"{self.path}: the tokenizer has no chat format")

    def render_chat(self, messages):
        """Chat format -> (ids, mask); mask is 1 on assistant content and its end-of-turn token
        (<|eot_id|> or <|im_end|>), from character loss_from of the content on where a message
        has one (the text before it is context: encoded on its own, no loss). Llama 3 starts
        with <|begin_of_text|>; ChatML adds a newline (no loss) after each <|im_end|>."""
        ids, mask = ([self.bos_id], [0]) if self.chat_format == LLAMA3 else ([], [])
        after = self.encode("\n") if self.chat_format == CHATML else []
        for m in messages:
            k, text = m.get("loss_from", 0), m["content"]
            h, before = self._header(m["role"]), self.encode(text[:k])
            body = self.encode(text[k:]) + [self.eot_id]
            ids += h + before + body + after
            mask += [0] * (len(h) + len(before)) + [int(m["role"] == "assistant")] * len(body)
            mask += [0] * len(after)
        return ids, mask

    def render_prompt(self, messages):
        """Messages without the final assistant turn -> ids ending in the assistant header."""
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("render_prompt takes the conversation without the final assistant "
                             "message")
        return self.render_chat(messages)[0] + self._header("assistant")
