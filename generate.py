"""
Batched sampling from a Llama (model.py): a preallocated KV cache, continuous batching, each
distinct prompt prefilled once and fanned out to its samples, temperature / top-k / top-p sampling,
and a tool hook that writes ids in place of samples. Search, RL and eval sample through generate().

    import checkpoint
    from generate import generate
    net, tok = checkpoint.load_model("out/base")
    prompt = tok.render_prompt([{"role": "user", "content": "What is 12*13?"}])
    [[s]] = generate(net, [prompt], max_new_tokens=64, temperature=0, stop_ids=tok.stop_ids)
    print(tok.decode(s.tokens), s.logprobs, s.stopped)

How generate() runs: up to batch_size rows decode together, one token per row per step (Batch).
A row starts a pending sample by copying its prompt's prefilled keys/values (Prefixes,
Batch.admit). Each step samples (sample_next), lets the tool overwrite the ids it owes (ToolHook),
records tokens and logprobs (Batch.append), and finishes the rows that hit a stop id or their limit
(Batch.finished, Batch.finish); freed rows take the next pending samples, and idle rows are dropped
in batches (Batch.compact).

generate(prefix_cache=PrefixCache(n)) keeps keys/values across calls (a radix tree over token ids,
bounded by n positions): a prompt that starts with a sequence seen before is prefilled only past it
(model.extend). search.py uses one per chunk of trees.

generate(compile=True) compiles the decode step with dynamic shapes: one compilation serves every
batch size of 2 or more rows and every length (static shapes would recompile for each), one more a
lone row.
"""
import dataclasses
import heapq
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from tqdm import tqdm


class KVCache:
    """Preallocated keys/values of the rows in flight: per layer, keys (B, n_kv, hd, S), stored
    transposed so that a decode step's scores are a plain matmul over keys [0, L) (faster on CPUs
    than over a transposed slice, the same values), and values (B, n_kv, S, hd). Each row holds
    its own sequence at its own positions (prompts differ in length), so rows never wait for each
    other. Under tensor parallelism (tp ranks, model.tensor_parallel) a rank keeps its
    n_kv_heads / tp heads."""

    def __init__(self, cfg, B, S, device, dtype, tp=1):
        n_kv, hd, n = cfg.n_kv_heads // tp, cfg.dim // cfg.n_heads, cfg.n_layers
        self.k = [torch.zeros(B, n_kv, hd, S, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(B, n_kv, S, hd, device=device, dtype=dtype) for _ in range(n)]

    def keep(self, rows):
        """Keep only these rows. A copy of the whole cache: generate drops idle rows in batches."""
        self.k = [k.index_select(0, rows) for k in self.k]  # a faster gather than k[rows] on CPUs
        self.v = [v.index_select(0, rows) for v in self.v]


@dataclass
class Sample:
    tokens: list[int]  # generated ids, including the stop token if one was hit
    logprobs: list[float]  # log p(token) at temperature 1 (raw policy; no top-k/top-p), per token
    stopped: bool  # True if it ended on a stop id, False if it hit max_new_tokens / context
    # positions (in tokens) a tool wrote, not the model
    forced: list[int] = dataclasses.field(default_factory=list)


_stats = {"prefill_tokens": 0, "decode_tokens": 0}
_compiled = weakref.WeakKeyDictionary()  # model -> compiled decode step


def generate_stats():
    """Counters since the last reset: prefill_tokens (prompt tokens prefilled: each distinct prompt
    once, all but its last token) and decode_tokens (tokens through the decode step: one per
    generated token)."""
    return dict(_stats)


def reset_generate_stats():
    for k in _stats:
        _stats[k] = 0


# ----------------------------------------------------------------------------- sampling

TOP_P_FIRST = 64


def sample_next(logits, temperature, top_k, top_p, gen):
    """Next token per row from fp32 logits (B, V): greedy at temperature 0, else temperature /
    top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs, order = logits.softmax(dim=-1), None
    if top_p < 1.0:  # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # Sorting only the TOP_P_FIRST likeliest tokens gives the same prefix when they hold more
        # than top_p in every row (a trained policy's usual case) and costs far less than sorting
        # the vocabulary; a flatter row sends the whole batch to the full sort. The check is a host
        # sync.
        top, order = probs.topk(min(TOP_P_FIRST, probs.size(-1)), dim=-1)
        if bool((top.sum(dim=-1) <= top_p).any()):
            top, order = probs.sort(dim=-1, descending=True)
        probs = top.masked_fill(top.cumsum(dim=-1) - top > top_p, 0.0)
    # inverse-CDF draw: one uniform per row, no host sync, cheaper on CPU than multinomial or
    # argmax(p / Exp(1)); the kept probabilities need no renormalizing: u is scaled by their total
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=gen) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return (idx if order is None else order.gather(-1, idx))[:, 0]


# ----------------------------------------------------------------------------- generate's parts


def plan(prompts, counts, max_new_tokens, max_seq_len):
    """(results, pending, left): results[i] = [None] * counts[i], already empty Samples for a prompt
    with no room to generate; pending, the other samples as (prompt index, sample index) in order;
    left, the samples of each prompt still to start."""
    results = [[None] * n for n in counts]
    pending, left = deque(), {}
    for i, (p, n) in enumerate(zip(prompts, counts)):
        if n > 0 and not p:
            raise ValueError(f"prompt {i} is empty")
        if n > 0 and min(max_new_tokens, max_seq_len - len(p)) <= 0:  # no room: nothing to generate
            results[i] = [Sample([], [], False) for _ in range(n)]
        elif n > 0:
            pending.extend((i, j) for j in range(n))
            left[i] = n
    return results, pending, left


def cache_len(prompts, left, max_new_tokens, max_seq_len):
    """Cache positions: up to a multiple of 8 (the compiled step's key count), and always more than
    the keys a step attends to: a compiled graph specializes on whether its slice [:L] is the whole
    cache."""
    S = min(max_seq_len, max(len(prompts[i]) for i in left) + max_new_tokens)
    return -(-S // 8) * 8 + 8


def decode_step(model, compile):
    """(step, align): model.decode, or its compilation (one per model, reused by later calls), and
    the multiple that the number of attended keys is rounded up to."""
    if not compile:
        return model.decode, 1
    # Dynamic shapes: one compilation serves every batch size and length. With duck sizing on, a
    # first batch of n_kv_heads or head_dim rows shares that dim's symbol and the graph specializes
    # on it: a second compilation for the next batch size.
    torch.fx.experimental._config.use_duck_shape = False
    if model not in _compiled:
        _compiled[model] = torch.compile(model.decode, fullgraph=True, dynamic=True)
    # On CUDA the compiled step specializes on L % 8 == 0 (inductor's alignment check): attending to
    # L rounded up to a multiple of 8 (the extra keys masked) keeps it to one compilation.
    return _compiled[model], 8


class _Segment:
    """A node of PrefixCache's radix tree: a run of token ids and their keys/values (per layer
    (k, v), each (n_kv, len, hd)), below the segments that precede it."""
    __slots__ = ("ids", "kv", "parent", "children", "used")

    def __init__(self, ids, kv, parent, used):
        self.ids, self.kv, self.parent, self.children, self.used = ids, kv, parent, {}, used


class PrefixCache:
    """Keys/values of token sequences, kept across generate() calls so that a prompt which starts
    with a sequence seen before (the same problem's prompt, a tree path one step longer) is
    prefilled only from where the known part ends. A radix tree of token segments: sequences that
    share a start share its keys/values. Bounded: once it holds more than max_tokens positions, the
    least recently used leaves are dropped until it holds 3/4 of max_tokens (a dropped leaf's parent
    can go next). Keys/values depend on the position, so every sequence starts at position 0."""

    def __init__(self, max_tokens):
        self.max_tokens, self.tokens, self.clock = max_tokens, 0, 0
        self.root = _Segment((), [], None, 0)

    def match(self, ids):
        """([(segment, tokens of it used)], n): the longest start of ids in the tree, n tokens."""
        self.clock += 1
        node, n, segs = self.root, 0, []
        while n < len(ids) and (child := node.children.get(ids[n])) is not None:
            m = 0
            while m < len(child.ids) and n + m < len(ids) and child.ids[m] == ids[n + m]:
                m += 1
            child.used = self.clock
            segs.append((child, m))
            n += m
            if m < len(child.ids):
                break
            node = child
        return segs, n

    def get(self, segs):
        """The keys/values of a match: per layer (k, v), each (n_kv, n, hd)."""
        return [(torch.cat([s.kv[i][0][:, :m] for s, m in segs], 1),
                 torch.cat([s.kv[i][1][:, :m] for s, m in segs], 1))
                for i in range(len(segs[0][0].kv))]

    def insert(self, ids, kv_of):
        """Keep ids; kv_of(a, b) returns the keys/values of positions [a, b) of ids (per layer
        (k, v), each (n_kv, b - a, hd)), called only for the part not in the tree yet."""
        segs, n = self.match(ids)
        if n == len(ids) or self.max_tokens <= 0:
            return
        node = segs[-1][0] if segs else self.root
        if segs and segs[-1][1] < len(node.ids):
            node = self._split(node, segs[-1][1])
        node.children[ids[n]] = _Segment(tuple(ids[n:]), kv_of(n, len(ids)), node, self.clock)
        self.tokens += len(ids) - n
        if self.tokens > self.max_tokens:
            self._evict(self.max_tokens * 3 // 4)

    def _split(self, node, m):
        """Cut node after its first m tokens; returns the new upper part."""
        head = _Segment(node.ids[:m], [(k[:, :m].clone(), v[:, :m].clone()) for k, v in node.kv],
                        node.parent, node.used)
        node.ids, node.kv = node.ids[m:], [(k[:, m:].clone(), v[:, m:].clone()) for k, v in node.kv]
        head.parent.children[head.ids[0]] = head
        head.children[node.ids[0]], node.parent = node, head
        return head

    def _evict(self, keep):
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root:
                heapq.heappush(leaves, (node.used, id(node), node))
        while self.tokens > keep and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.ids[0]]
            self.tokens -= len(node.ids)
            if not parent.children and parent is not self.root:
                heapq.heappush(leaves, (parent.used, id(parent), parent))


class Prefixes:
    """Keys/values of each distinct prompt, all but its last token, prefilled once and kept while
    the prompt has samples left to start; every row that samples it copies them. With a
    PrefixCache, a prompt is prefilled from where its longest start found there ends, and kept
    there afterwards."""

    def __init__(self, model, prompts, left, cache=None):
        self.model, self.prompts, self.left, self.cache = model, prompts, left, cache
        self.kv = {}  # prompt index -> (keys/values of its prefill chunk, its row there)

    def prefill(self, idxs):
        """Prefill these prompts in right-padded chunks of at most ~16k tokens."""
        idxs = [i for i in idxs if len(self.prompts[i]) > 1 and i not in self.kv]
        n = max(1, 16384 // max([len(self.prompts[i]) for i in idxs], default=1))
        for c in range(0, len(idxs), n):
            chunk = [self.prompts[i][:-1] for i in idxs[c : c + n]]
            kv = self.chunk(chunk)
            for r, i in enumerate(idxs[c : c + n]):
                self.kv[i] = (kv, r)
                if self.cache is not None:
                    self.cache.insert(chunk[r], lambda a, b: [
                        (k[r, :, a:b].clone(), v[r, :, a:b].clone()) for k, v in kv])

    def chunk(self, seqs):
        """Keys/values of one chunk of sequences: per layer (k, v), each (rows, n_kv, T, hd)."""
        dev = self.model.tok_embeddings.weight.device
        hits = [self.cache.match(s) if self.cache is not None else ([], 0) for s in seqs]
        start = [n for _, n in hits]
        T = max(len(s) - n for s, n in zip(seqs, start))
        _stats["prefill_tokens"] += sum(len(s) - n for s, n in zip(seqs, start))
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for r, (s, n) in enumerate(zip(seqs, start)):
            ids[r, : len(s) - n] = torch.tensor(s[n:], dtype=torch.long)
        if not any(start):
            return self.model.prefill(ids.to(dev))
        w = self.model.tok_embeddings.weight
        kv = KVCache(self.model.cfg, len(seqs), max(start) + T, dev, w.dtype,
                     self.model.tp)
        for r, (segs, n) in enumerate(hits):
            for layer, (k, v) in enumerate(self.cache.get(segs) if n else []):
                kv.k[layer][r, :, :, :n], kv.v[layer][r, :, :n] = k.transpose(-1, -2), v
        if T:
            self.model.extend(ids.to(dev), torch.tensor(start, device=dev), kv)
        return [(k.transpose(-1, -2), v) for k, v in zip(kv.k, kv.v)]

    def claim(self, i):
        """(chunk keys/values, row) for one sample of prompt i, or None for a one-token prompt. The
        prompt's last sample lets them go."""
        got = self.kv.get(i)
        self.left[i] -= 1
        if self.left[i] == 0:
            self.kv.pop(i, None)
        return got


class ToolHook:
    """tool = (trigger ids, fn): when a row writes a trigger id, fn(its prompt, its generated ids so
    far) returns ids to write next instead of samples, one per step. queue: row -> ids still to
    write; forced: row -> positions (from the prompt's end) the tool wrote."""

    def __init__(self, tool, B, dev):
        self.fn = tool[1] if tool else None
        self.triggers = torch.tensor(sorted(tool[0]) if tool else [], dtype=torch.long, device=dev)
        self.queue = {}
        self.forced = [[] for _ in range(B)]

    def overwrite(self, batch):
        """Rows in the middle of a tool's output: its next id replaces the sample."""
        if not self.queue:
            return
        busy = list(self.queue)
        batch.tok[busy] = torch.tensor([self.queue[r].pop(0) for r in busy], device=batch.dev)
        for r in busy:
            self.forced[r].append(int(batch.pos[r]) - len(batch.prompts[batch.rows[r][0]]))
            if not self.queue[r]:
                del self.queue[r]

    def call(self, batch, done):
        """Call the tool for the running rows that wrote a trigger id (a host sync, with a tool)."""
        if not len(self.triggers):
            return
        wrote = torch.isin(batch.tok, self.triggers) & ~done & batch.live
        for r in wrote.nonzero()[:, 0].tolist():
            if r in self.queue:  # a trigger inside the tool's own output (" == 24") calls nothing
                continue
            prompt = batch.prompts[batch.rows[r][0]]
            ids = self.fn(prompt, batch.out_tok[r, len(prompt) : int(batch.pos[r]) + 1].tolist())
            if ids:
                self.queue[r] = list(ids)

    def release(self, r):
        """The positions the tool wrote in row r's finished sample; the row starts afresh."""
        forced, self.forced[r] = self.forced[r], []
        self.queue.pop(r, None)
        return forced

    def keep(self, kept):
        self.queue = {kept.index(r): q for r, q in self.queue.items()}  # finished rows have none
        self.forced = [self.forced[r] for r in kept]


class Batch:
    """The rows that decode together. Per row: the last token (fed next step), its position, the
    last position allowed, live (False for a finished row waiting to be dropped), the generated ids
    and logprobs (each at its position), and rows[r], the (prompt index, sample index) it holds or
    None. max_pos is a host copy of the largest position that advances: a step attends to keys
    [0, max_pos] only, without a sync per step."""

    def __init__(self, model, prompts, B, S, max_new_tokens, tool):
        cfg, w = model.cfg, model.tok_embeddings.weight
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.max_seq_len = cfg.max_seq_len
        self.dev = dev = w.device
        self.cache = KVCache(cfg, B, S, dev, w.dtype, model.tp)
        self.tok, self.pos, self.limit = (torch.zeros(B, dtype=torch.long, device=dev)
                                          for _ in range(3))
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out_tok = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(B, S, dtype=torch.float32, device=dev)
        self.rows = [None] * B
        self.tool = ToolHook(tool, B, dev)
        self.ar = torch.arange(B, device=dev)
        self.max_pos, self.idle = 0, 0  # idle: finished rows still in the batch

    def admit(self, free, pending, prefixes):
        """Start pending samples in the free rows: copy their prompt's keys/values, feed its last
        token next step."""
        take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        if not take:
            return
        prefixes.prefill(list(dict.fromkeys(i for i, _ in take)))
        groups = {}  # prefill chunk -> (its keys/values, destination rows, source rows)
        for r, (i, j) in zip(free, take):
            self.rows[r] = (i, j)
            got = prefixes.claim(i)
            if got is not None:
                kv, src = got
                g = groups.setdefault(id(kv), (kv, [], []))
                g[1].append(r)
                g[2].append(src)
        for kv, dst, src in groups.values():
            dst, src = torch.tensor(dst, device=self.dev), torch.tensor(src, device=self.dev)
            for layer, (k, v) in enumerate(kv):
                self.cache.k[layer][dst, :, :, : k.size(2)] = k[src].transpose(-1, -2)
                self.cache.v[layer][dst, :, : v.size(2)] = v[src]
        r = torch.tensor(free[: len(take)], device=self.dev)
        plen = torch.tensor([len(self.prompts[i]) for i, _ in take], device=self.dev)
        self.tok[r] = torch.tensor([self.prompts[i][-1] for i, _ in take], device=self.dev)
        self.pos[r] = plen - 1
        self.limit[r] = (plen - 1 + self.max_new_tokens).clamp(max=self.max_seq_len - 1)
        self.live[r] = True

    def append(self, tok, logits):
        """Take the step's tokens (the tool's owed ids replace samples) and their logprobs under
        logits, each at its row's next position; a finished row stays where it is (its output is
        never read)."""
        self.tok = tok
        self.pos += self.live
        self.max_pos += 1
        self.tool.overwrite(self)
        self.out_tok[self.ar, self.pos] = self.tok
        lp = logits.log_softmax(dim=-1).gather(1, self.tok[:, None])[:, 0]
        self.out_lp[self.ar, self.pos] = lp

    def finished(self, stops):
        """The running rows that end this step (a stop id or their limit); the tool runs for the
        rest."""
        done = self.pos >= self.limit
        if len(stops):
            done |= torch.isin(self.tok, stops)
        done &= self.live
        self.tool.call(self, done)
        # the host sync of every step (top-p's and the tool's come on top)
        return done.nonzero()[:, 0].tolist()

    def finish(self, fin, results, stop_set, keep=None):
        """Hand the finished rows' samples to results and mark the rows free. keep: a PrefixCache
        that keeps each sample's keys/values (prompt and sample but its last token, which was never
        fed)."""
        toks, lps = self.out_tok[fin].tolist(), self.out_lp[fin].tolist()
        ends = self.pos[fin].tolist()
        for r, t, lp, e in zip(fin, toks, lps, ends):
            i, j = self.rows[r]
            n = len(self.prompts[i])
            forced = self.tool.release(r)
            results[i][j] = Sample(t[n : e + 1], lp[n : e + 1], t[e] in stop_set, forced)
            self.rows[r] = None
            if keep is not None:
                keep.insert(self.prompts[i] + t[n:e], lambda a, b: [
                    (k[r, :, :, a:b].transpose(-1, -2).contiguous(), v[r, :, a:b].clone())
                    for k, v in zip(self.cache.k, self.cache.v)])
        self.live[fin] = False

    def compact(self):
        """Drop the idle rows (nothing left to start in them) once they are an eighth of the batch:
        copying the cache at each finish costs more than an idle row's step. False once no row is
        left."""
        self.idle = self.rows.count(None)
        if not (self.idle and self.idle * 8 >= len(self.rows)):
            return True
        keep = [r for r, x in enumerate(self.rows) if x is not None]
        keep = torch.tensor(keep, dtype=torch.long, device=self.dev)
        if len(keep) == 0:
            return False
        self.cache.keep(keep)
        self.tok, self.pos, self.limit, self.live, self.out_tok, self.out_lp = (
            t[keep] for t in (self.tok, self.pos, self.limit, self.live, self.out_tok, self.out_lp))
        self.tool.keep(keep.tolist())
        self.rows = [x for x in self.rows if x is not None]
        self.ar = torch.arange(len(self.rows), device=self.dev)
        self.idle = 0
        return True


# ----------------------------------------------------------------------------- generate


@torch.inference_mode()  # no_grad with less per-op overhead; nothing it creates leaves as a tensor
def generate(model, prompts, num_samples=1, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             stop_ids=(), seed=0, batch_size=256, compile=False, progress=False, tool=None,
             prefix_cache=None, cache_samples=False):
    """Sample num_samples[i] continuations of each prompt (lists of ids); returns result[i] =
    [Sample, ...].

    tool = (trigger ids, fn): when a row writes a trigger id, fn(its prompt, its generated ids so
    far) returns ids to write next instead of samples (e.g. a calculator's result after "11*4=");
    they are fed one per step like sampled ids, and Sample.forced lists their positions so RL can
    leave them out of the policy gradient.

    Continuous batching: up to batch_size rows decode together, one token per row per step. A row
    that finishes hands its slot to the next pending sample; when none are left, finished rows are
    dropped from the batch. Each distinct prompt is prefilled once (all but its last token) and its
    keys/values are copied to every row that samples it. Same seed -> same outputs for the same
    arguments (batch_size changes the draws).

    prefix_cache (a PrefixCache): keys/values kept across calls. Each prompt is prefilled from where
    its longest start in the cache ends and then kept there; with cache_samples, every finished
    sample is kept too (its continuation is a later call's prompt, as in search). Cached keys come
    from other batch shapes than a fresh prefill's, so logprobs agree to float noise, not bits."""
    assert batch_size >= 1
    model = getattr(model, "_orig_mod", model)
    counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
    assert len(counts) == len(prompts), "num_samples must be an int or one count per prompt"
    results, pending, left = plan(prompts, counts, max_new_tokens, model.cfg.max_seq_len)
    if not pending:
        return results
    B = min(batch_size, len(pending))
    S = cache_len(prompts, left, max_new_tokens, model.cfg.max_seq_len)
    batch = Batch(model, prompts, B, S, max_new_tokens, tool)
    step, align = decode_step(model, compile)
    gen = torch.Generator(batch.dev).manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=batch.dev)
    stop_set = set(stops.tolist())
    prefixes = Prefixes(model, prompts, left, prefix_cache)
    keep = prefix_cache if cache_samples else None

    bar = tqdm(total=len(pending), disable=not progress, desc="generate", unit="sample")
    model.rope_table(batch.dev)  # built eagerly, outside any compiled graph
    batch.admit(list(range(B)), pending, prefixes)
    batch.max_pos = int(batch.pos.max())
    while True:
        L = -(-(batch.max_pos + 1) // align) * align
        logits = step(batch.tok, batch.pos, batch.cache, L)
        _stats["decode_tokens"] += len(batch.rows) - batch.idle
        batch.append(sample_next(logits, temperature, top_k, top_p, gen), logits)
        fin = batch.finished(stops)
        if not fin:
            continue
        batch.finish(fin, results, stop_set, keep)
        bar.update(len(fin))
        batch.admit(fin, pending, prefixes)  # refill the finished rows with pending samples, if any
        if not batch.compact():
            break
        batch.max_pos = int((batch.pos * batch.live).max())  # an idle row keeps its place
    bar.close()
    return results
