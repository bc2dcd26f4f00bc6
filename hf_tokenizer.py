"""
Hugging Face tokenizer files <-> our tiktoken Tokenizer. Reads a byte-level BPE tokenizer.json
(GPT-2, Llama 3, SmolLM2 and the like) and its tokenizer_config.json; writes both for a tokenizer
of ours, so that transformers and vLLM open an exported checkpoint on their own.

    import hf_tokenizer
    tok = hf_tokenizer.load("SmolLM2-135M-Instruct/tokenizer.json")  # a tokenizer.Tokenizer
    hf_tokenizer.export(tok, "out/mine-hf")  # tokenizer.json + tokenizer_config.json

Reading: vocab strings are GPT-2's byte-to-unicode images of the token bytes (mapped back), a
token's id is its tiktoken rank, so the merges must create tokens in increasing id order (the
merge order is the priority in both); the pre-tokenizer becomes one split regex; added tokens
become tiktoken special tokens. Only byte-level BPE is read: SentencePiece-style tokenizers
(Metaspace, byte fallback, Unigram) are refused. Added-token text inside content encodes as plain
text (as for Llama 3's specials), and their lstrip/rstrip flags are not modelled. The chat format
is ChatML when the chat template (or, without one, the special tokens) uses <|im_start|> and
<|im_end|>, Llama 3's when it uses <|start_header_id|>; otherwise the tokenizer has none.
"""
import os

from common import UserError, read_json, write_json
from tokenizer import CHATML, LLAMA3, Tokenizer

# GPT-2's pre-tokenizer pattern (ByteLevel's use_regex); DIGITS_PAT is the same after
# Digits(individual_digits) isolated each digit: a whitespace run also ends before a digit
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGITS_PAT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
MARKS = {LLAMA3: ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"),
         CHATML: ("<|im_start|>", "<|im_end|>")}  # the special tokens each chat format needs
TEMPLATES = {  # Jinja chat templates that render what Tokenizer.render_prompt does
    LLAMA3: "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}",
    CHATML: "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}


def byte_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, k = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b], k = chr(256 + k), k + 1
    return out


# ------------------------------------------------------------------------ reading tokenizer.json

def _refuse_sentencepiece(data, path):
    """One error for the tokenizers this reader does not cover, saying which part shows it."""
    model, pre, dec = data.get("model") or {}, data.get("pre_tokenizer"), data.get("decoder")
    why = None
    if model.get("type", "BPE") != "BPE":
        why = f"model.type is {model.get('type')!r}"
    elif model.get("byte_fallback"):
        why = "model.byte_fallback is true"
    elif "Metaspace" in repr(pre) or "Metaspace" in repr(dec):
        why = "it uses a Metaspace pre-tokenizer or decoder"
    elif data.get("normalizer") is not None:
        why = "normalizer is not null"
    elif not isinstance(dec, dict) or dec.get("type") != "ByteLevel":
        why = "decoder is not ByteLevel"
    if why:
        raise UserError(f"{path}: not a byte-level BPE tokenizer ({why}); only byte-level BPE "
                        "(model BPE with ByteLevel pre-tokenizer and decoder) is supported, "
                        "SentencePiece-style tokenizers are not")
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field):
            raise UserError(f"{path}: model.{field} is not supported")


def _pattern(pre, path):
    """The pre-tokenizer as one split regex: ByteLevel alone (GPT-2's regex), Split(regex) then
    ByteLevel without its regex (Llama 3), or individual Digits then ByteLevel (SmolLM2)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == \
        "Sequence" else [pre]
    steps = steps if isinstance(steps, list) and steps else [None]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    last = steps[-1] if isinstance(steps[-1], dict) else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PAT
        if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
            return DIGITS_PAT
        split = steps[0]
        if kinds == ["Split", "ByteLevel"] and not regex and not split.get("invert") \
                and split.get("behavior") == "Isolated" \
                and isinstance((split.get("pattern") or {}).get("Regex"), str):
            return split["pattern"]["Regex"]
    raise UserError(f"{path}: pre_tokenizer {kinds} is not supported (ByteLevel; Split(Regex, "
                    "Isolated) + ByteLevel(use_regex=false); Digits(individual) + ByteLevel are)")


def _added_tokens(data, path):
    """added_tokens -> {content: id}."""
    out = {}
    for t in data.get("added_tokens") or []:
        if not (isinstance(t, dict) and isinstance(t.get("content"), str)
                and isinstance(t.get("id"), int)):
            raise UserError(f"{path}: added_tokens: each needs a string content and an int id")
        out[t["content"]] = t["id"]
    if len(set(out.values())) != len(out):
        raise UserError(f"{path}: added_tokens: two tokens share an id")
    return out


def _ranks(model, added, path):
    """model.vocab (byte-level strings -> ids) -> {bytes: id} without the added tokens' ids;
    merges must create tokens in increasing id order (_dropped checks the single bytes)."""
    u2b = {c: b for b, c in byte_to_unicode().items()}
    vocab, taken, ranks = model.get("vocab"), set(added.values()), {}
    if not isinstance(vocab, dict):
        raise UserError(f"{path}: model.vocab must be an object of token -> id")
    for s, i in vocab.items():
        if not isinstance(i, int) or (i not in taken and any(c not in u2b for c in s)):
            raise UserError(f"{path}: model.vocab: {s!r} is not a byte-level token with an int id")
        if i in taken:
            continue
        ranks[bytes(u2b[c] for c in s)] = i
    if len(set(ranks.values())) != len(ranks):
        raise UserError(f"{path}: model.vocab: two tokens share an id")
    _check_merge_order(model.get("merges") or [], vocab, path)
    return ranks


def _dropped(ranks, path):
    """The characters encode drops when the vocab lacks some bytes, as the tokenizers library drops
    a byte it has no token for: ASCII control characters, and the 4-byte characters led by
    0xF1-0xF4 (Unicode's unassigned and private-use planes 4-16). Bytes UTF-8 never uses (0xC0,
    0xC1, 0xF5-0xFF) need no token; any other missing byte is refused. encode splits the text at
    the dropped characters and encodes the pieces between them: the library's ids, except for a
    dropped character inside a run of punctuation (" \x04!": the library merges " !") and the
    other bytes of a plane 4-16 character (the library keeps them). A regex character class, or
    None."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    refused = [b for b in missing if not (b < 0x20 or b == 0x7F or b >= 0xF1 or b in (0xC0, 0xC1))]
    if refused:
        raise UserError(f"{path}: model.vocab: no token for byte(s) {refused[:8]}")
    chars = [f"\\x{b:02x}" for b in missing if b < 0x80]
    chars += [f"\\U{(b - 0xF0) << 18:08x}-\\U{min(((b - 0xEF) << 18) - 1, 0x10FFFF):08x}"
              for b in missing if 0xF1 <= b <= 0xF4]
    return f"[{''.join(chars)}]" if chars else None


def _check_merge_order(merges, vocab, path):
    """tiktoken merges by token id: each merge must create a known token, new ones in id order."""
    seen, last = set(), -1
    for n, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        token = "".join(pair) if ok else None
        if token not in vocab:
            raise UserError(f"{path}: model.merges[{n}]: {m!r} does not make a vocab token")
        if token not in seen:
            if vocab[token] < last:
                raise UserError(f"{path}: model.merges[{n}]: {token!r} has id {vocab[token]}, "
                                f"below an earlier merge's {last}: ids must follow merge order")
            seen.add(token)
            last = vocab[token]


def _token_name(v):
    """A tokenizer_config token entry (a string, or {"content": ...}) -> its text, or None."""
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _template(cfg):
    """The chat template text of a tokenizer_config (a string, or named ones: "default")."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict)
                  and x.get("name") == "default"), None)
    return t if isinstance(t, str) else ""


def chat_format(specials, template):
    """LLAMA3, CHATML or None: the format whose special tokens exist and, when there is a chat
    template, appear in it."""
    for fmt, marks in MARKS.items():
        if all(m in specials for m in marks) and (not template or marks[0] in template):
            return fmt
    return None


def _beside(path, name):
    """{name: path of the file name in path's folder} when that file exists, else {}."""
    p = os.path.join(os.path.dirname(path), name)
    return {name: p} if os.path.isfile(p) else {}


def load(path):
    """A Tokenizer from a byte-level BPE tokenizer.json (and the files beside it: bos/eos tokens and
    the chat template from tokenizer_config.json, or the template from chat_template.jinja)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file not found")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a tokenizer.json (no model object)")
    _refuse_sentencepiece(data, path)
    specials = _added_tokens(data, path)
    ranks, pat = _ranks(data["model"], specials, path), _pattern(data.get("pre_tokenizer"), path)
    files = {"tokenizer.json": path, **_beside(path, "tokenizer_config.json"),
             **_beside(path, "chat_template.jinja")}
    cfg = read_json(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    template = _template(cfg)
    if not template and "chat_template.jinja" in files:
        with open(files["chat_template.jinja"], encoding="utf-8", errors="replace") as f:
            template = f.read()
    fmt = chat_format(specials, template)
    bos = "<|begin_of_text|>" if fmt == LLAMA3 else _token_name(cfg.get("bos_token"))
    eos = next((e for e in ("<|end_of_text|>", "<|endoftext|>") if e in specials),
               _token_name(cfg.get("eos_token")))
    try:
        return Tokenizer(path, ranks=ranks, pat_str=pat, specials=specials, chat_format=fmt,
                         bos=bos, eos=eos, files=files, drop=_dropped(ranks, path))
    except ValueError as e:  # tiktoken rejects the regex
        raise UserError(f"{path}: pre_tokenizer: regex not usable ({e})") from None


# ------------------------------------------------------------------------ writing tokenizer.json

def _parts(token, ranks):
    """The pieces BPE builds token from using only lower-ranked tokens (two for a reachable one):
    merge the lowest-ranked adjacent pair, leftmost first, as tiktoken does."""
    limit, parts = ranks[token], [token[i:i + 1] for i in range(len(token))]
    pair = [ranks.get(a + b, limit) for a, b in zip(parts, parts[1:])]  # pair[i]: parts i, i + 1
    while pair and (r := min(pair)) < limit:
        i = pair.index(r)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i < len(pair):
            pair[i] = ranks.get(parts[i] + parts[i + 1], limit)
        if i > 0:
            pair[i - 1] = ranks.get(parts[i - 1] + parts[i], limit)
    return parts


def merges(ranks):
    """tiktoken ranks -> the merges (a, b) in rank order of the token a + b they create."""
    out = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        parts = _parts(token, ranks)
        if len(parts) == 2:
            out.append(tuple(parts))
    return out


def tokenizer_json(tok):
    """The tokenizer.json of a tiktoken tokenizer: byte-level BPE, its regex as a Split, merges
    applied only to pieces not in the vocab (ignore_merges, as tiktoken does), BOS added in front
    for the Llama 3 format (as Meta's tokenizer.json does)."""
    b2u = byte_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(tok.specials.items(),
                                                                        key=lambda x: x[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    post = None
    if tok.chat_format == LLAMA3:
        bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
        post = {"type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         bos, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                         "ids": [tok.bos_id],
                                                         "tokens": ["<|begin_of_text|>"]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pat_str}, "behavior": "Isolated",
                 "invert": False}, byte_level]},
            "post_processor": post, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text(b): i for b, i in sorted(tok.ranks.items(),
                                                              key=lambda x: x[1])},
                      "merges": [f"{text(a)} {text(b)}" for a, b in merges(tok.ranks)]}}


def tokenizer_config(tok):
    """tokenizer_config.json: the fast tokenizer class, bos/eos (eos: the end-of-turn token when
    there is a chat format) and the chat template."""
    name = {i: s for s, i in tok.specials.items()}
    eos = tok.eot_id if tok.eot_id is not None else tok.eos_id
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if tok.bos_id is not None:
        cfg["bos_token"] = name[tok.bos_id]
    if eos is not None:
        cfg["eos_token"] = name[eos]
    if tok.chat_format:
        cfg["chat_template"] = TEMPLATES[tok.chat_format]
    return cfg


def export(tok, out_dir):
    """Write tokenizer.json and tokenizer_config.json into out_dir, each unless tok was read from
    such a file (then Tokenizer.save copies it)."""
    if "tokenizer.json" not in tok.files:
        write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json(tok))
    if "tokenizer_config.json" not in tok.files:
        write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(tok))
