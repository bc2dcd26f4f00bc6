"""
search.py — Monte Carlo Tree Search over solution steps with the policy LLM (ASTRO, arXiv 2507.00417
§2.2). For every problem it grows a tree whose nodes are reasoning steps and writes the WHOLE tree
(each node's step text, parent, depth, prior, N, Q, terminal flag, answer, reward) as one JSON line;
linearize.py turns the trees into self-reflecting, backtracking traces.

    python search.py                     # built-in task: data/countdown/train.jsonl, out/base
    python search.py config/search_countdown.py --limit=100   # the main job's, on 100 problems
    torchrun --standalone --nproc_per_node=8 search.py config/search_llama_math.py   # --tp=8
    torchrun --standalone --nproc_per_node=8 search.py --tp=2 ...   # 4 copies of TP over 2 GPUs

Writes out/search/trees.jsonl (one tree per problem, in problem order), out/search/stats.json and
out/search/config.json. Killed? Run the same command again: it resumes, and the file ends
byte-identical to an uninterrupted run. Under torchrun the ranks form tp groups of --tp consecutive
ranks: each holds one copy of the policy, tensor parallel (model.tensor_parallel: its kv heads, and
so its KV and prefix caches, split over the group), grows the same trees on every rank (the same
seeds on the same logits) and takes every dp-th chunk of problems; its first rank writes them.

One simulation, in the paper's terms (state S_t = problem x + steps s_0..s_t; action = the next
step):
  1. Selection   from the root, follow argmax_a Q(S,a) + c_puct·π(a|S)·√N(S) / (1 + N(S,a)) down to
                 a node that has not been expanded yet (or to a terminal, which is simply scored
                 again).
  2. Expansion   sample k next steps from that node; identical steps merge into one child.
  3. Simulation  every new non-terminal child gets M rollouts to the end of the response with the
                 same policy; reward = the verifier (1 correct / 0 otherwise) on the whole response.
                 A terminal child is scored by the verifier directly (Q = its reward, no rollouts
                 needed).
  4. Backup      every evaluation (one rollout, or one terminal) adds N += 1 and W += reward to each
                 node on its path to the root; Q = W / N is the visit-weighted running mean of all
                 values that went through the node. So N counts evaluations: a child that got M
                 rollouts has N = M, its parent gained M visits.
The rollouts are kept: each is cut into steps and inserted below its child as a chain of nodes
(source "rollout", merged with an identical sibling step), so every terminal a rollout reached is a
node linearize.py can choose. Rollout nodes are ordinary children: PUCT sees their N, Q and prior,
and selecting one that is not expanded yet expands it like any other leaf (its new children are
"mcts" nodes with M rollouts each; the node itself keeps source "rollout", so linearize.py does not
treat its Q as an M-rollout mean).

The prefix cache: a path's keys/values are kept from the call that computed them (its prompt, or an
expansion's sample), so the next round's rollouts and expansions extend it instead of prefilling the
prompt and path again (generate.PrefixCache; least recently used dropped past prefix_cache_mb).

Choices the paper leaves open (see the comments where they are made):
- prior π(a|s) of a multi-token step: exp(mean token log-prob under the raw policy, over the
  tokens the policy wrote: a tool's are not its choice), length-normalized so a long step is not
  penalized for its length; every sample of the same step text (from expansions and from
  rollouts) adds its value, so a step sampled twice weighs twice;
  normalized over the siblings.
- a step ends on a token that contains the task's delimiter (the delimiter belongs to the step); a
  step is terminal if it contains \\boxed{, ended the response (<|eot_id|>; its text omits the eot),
  was cut at max_step_tokens, or reaches max_depth. Terminals are graded with tasks.grade on the
  whole response.
- a rollout samples until <|eot_id|> (or max_rollout_tokens) and is then cut after its first
  terminal step (normally the \\boxed{} step): what a policy writes after its answer is not part of
  the solution.
- early stop (on by default): a tree stops once it holds a correct terminal and >= 3 distinct wrong
  answers (answerless endings do not count): linearize's default traces use up to 2 wrong answers
  each; the main job's k = 3 slot is capped at 3 on a tree that stopped early.
- no progressive widening: a node is expanded once, and then its children are fixed (its k samples
  merged with the rollout steps already below it); rollouts only add nodes below unexpanded nodes.
"""
import math
import os
import time
from dataclasses import dataclass

import torch.distributed as dist

import common
import generate
import checkpoint
from tasks import grade, prompt_messages, read_problems, step_delimiter, tool


@dataclass
class Config:
    problems: str = "data/countdown/train.jsonl"  # problems to search (tasks.read_problems format)
    policy: str = "out/base"          # the search policy (ours, Meta or HF; checkpoint.load_model)
    out_dir: str = "out/search"       # trees.jsonl, stats.json, config.json
    limit: int = 0                    # search only the first `limit` problems of the file (0 = all)
    num_simulations: int = 32         # selections per tree (paper: not given; 32-64 for GPUs)
    k: int = 4                        # next steps sampled per expansion (paper: not given)
    M: int = 16                       # rollouts per new child (paper: M = 16)
    c_puct: float = 1.0               # exploration weight in PUCT (paper: not given)
    temperature: float = 1.0          # sampling temperature of expansions (diverse candidate steps)
    rollout_temperature: float = 1.0  # of rollouts (1.0: Q estimates the policy's own success rate)
    top_p: float = 1.0                # nucleus sampling for both (1.0 = off)
    max_depth: int = 0                # most steps in a response; 0 = the task's need + depth_slack
    depth_slack: int = 2              # steps allowed beyond the need (Countdown's need,
                                      # len(numbers), already counts one more than its lines)
    max_step_tokens: int = 64         # a step cut at this length ends its response (a terminal)
    max_rollout_tokens: int = 256     # budget of one rollout
    problems_per_batch: int = 64      # trees grown at once; also the chunk of resume,
                                      # determinism and data parallelism
    early_stop: bool = True           # a tree stops once it has a correct terminal and >= 3
                                      # distinct wrong answers
    seed: int = 1337                  # same seed (and config) => same trees
    batch_size: int = 256             # rows per forward pass inside generate.generate
    prefix_cache_mb: int = 1024       # keys/values kept across rounds (prompts, the paths of
                                      # nodes to expand or roll out), least recently used
                                      # dropped first; 0 = off (each prompt prefilled whole)
    compile: bool = False             # torch.compile generate's decode step (GPU)
    oracle: bool = False              # ablation: Countdown's tool writes the grader's verdict
    device: str = ""                  # "" = cuda if available, else cpu
    dtype: str = "float32"            # float32 | bfloat16 | float16
    tp: int = 1                       # tensor parallel degree under torchrun: ranks per copy of
                                      # the policy (a node's GPUs); the other ranks data parallel

    ranges = dict(limit=(0, None), num_simulations=(1, None), k=(1, None), M=(0, None),
                  c_puct=(0.0, None), temperature=(0.0, None), rollout_temperature=(0.0, None),
                  top_p=(0.0, 1.0), max_depth=(0, None), depth_slack=(0, None),
                  max_step_tokens=(1, None), max_rollout_tokens=(1, None),
                  problems_per_batch=(1, None), batch_size=(1, None), prefix_cache_mb=(0, None),
                  tp=(1, None))


# Keys that may change between a run and its resume: all others change the trees, and a resume with
# other values would mix the trees of two different searches in one file.
# tp, like device, changes the rounding of the logits, not the search.
RESUME_FREE = {"out_dir", "limit", "compile", "device", "tp"}
DEFAULT_NEED = 30  # steps a response may need when the task does not say it (MATH)


def depth_need(rec):
    """Steps a response may need: Countdown combines n numbers in n-1 lines (the last one boxed);
    counted as n, one spare (the main job searches with it: max depth n + depth_slack = n + 2)."""
    return len(rec["numbers"]) if "numbers" in rec else DEFAULT_NEED


def mix(*xs):
    """A deterministic seed from small integers (seed, chunk, round, phase): every generate call
    gets its own."""
    h = 0
    for x in xs:
        h = (h * 1_000_003 + x + 1) % (2**61 - 1)
    return h


# ----------------------------------------------------------------------------- the tree

def own_logprobs(sample):
    """The sample's logprobs, None where a tool wrote the token (Sample.forced)."""
    forced = set(getattr(sample, "forced", ()))
    return [None if j in forced else lp for j, lp in enumerate(sample.logprobs)]


@dataclass(eq=False)
class Node:
    id: int
    parent: int | None
    depth: int
    tokens: list          # this step's token ids as sampled: prefixes are built from them, never
                          # re-encoded
    text: str             # decoded step, incl. its trailing delimiter (without a final <|eot_id|>)
    source: str           # "mcts": produced by an expansion; "rollout": only ever seen in rollouts
    terminal: bool
    answer: str | None = None   # extracted final answer (terminals)
    reward: float | None = None  # verifier 1.0 / 0.0 (terminals)
    score: float = 0.0    # sum over the samples merged into this node of exp(mean token log-prob);
                          # prior ∝ score
    N: int = 0            # evaluations (rollouts / terminal scorings) that went through this node
    W: float = 0.0        # sum of their rewards; Q = W / N
    expanded: bool = False  # k next steps have been sampled from here
    rolled: bool = False    # its M rollouts have been run

    def __post_init__(self):
        self.children = {}  # step text -> child id: identical steps are one child

    @property
    def Q(self):
        return self.W / self.N if self.N else 0.0


class Tree:
    def __init__(self, rec, tok, delim_ids, cfg):
        self.rec, self.tok, self.delim_ids = rec, tok, delim_ids
        # the state's x: ends with the assistant header
        self.prompt = tok.render_prompt(prompt_messages(rec))
        self.max_depth = max(1, cfg.max_depth or depth_need(rec) + cfg.depth_slack)
        self.nodes = [Node(0, None, 0, [], "", "mcts", False, score=1.0)]
        self.sims = self.rollouts = self.decoded = self.prefilled = 0
        self.done = False

    def path(self, i):
        ids = []
        while i is not None:
            ids.append(i)
            i = self.nodes[i].parent
        return ids[::-1]

    def prefix(self, i):
        """The policy's input at node i: prompt ids + the step ids so far (exactly the tokens it
        generated)."""
        return self.prompt + [t for j in self.path(i) for t in self.nodes[j].tokens]

    def response(self, i):
        return "".join(self.nodes[j].text for j in self.path(i))

    def prior(self, node):
        """π(a|s): the node's score over the summed scores of its siblings (so priors sum to 1 per
        parent)."""
        if node.parent is None:
            return 1.0
        sibs = self.nodes[node.parent].children.values()
        return node.score / sum(self.nodes[j].score for j in sibs)

    def add(self, parent, tokens, logprobs, source):
        """The child of `parent` reached by the step `tokens`: a new node, or the sibling with the
        same text."""
        p = self.nodes[parent]
        stopped = bool(tokens) and tokens[-1] in self.tok.stop_ids
        text = self.tok.decode(tokens[:-1] if stopped else tokens)
        i = p.children.get(text)
        if i is None:
            i, depth = len(self.nodes), p.depth + 1
            # terminal: the step holds the final answer, or the response ended here (eot, or cut at
            # a length limit: the step does not end on a delimiter token), or the depth budget is
            # used up
            terminal = ("\\boxed{" in text or not tokens or tokens[-1] not in self.delim_ids
                        or depth >= self.max_depth)
            node = Node(i, parent, depth, list(tokens), text, source, terminal)
            if terminal:
                node.answer, correct = grade(self.rec, self.response(parent) + text)
                node.reward = 1.0 if correct else 0.0
            self.nodes.append(node)
            p.children[text] = i
        node = self.nodes[i]
        # length-normalized step probability over the policy's own tokens (a tool's ids, None
        # here, are not the policy's choice); a duplicate sample adds its share (sampled twice =
        # twice as likely)
        own = [lp for lp in logprobs if lp is not None]
        node.score += math.exp(sum(own) / max(len(own), 1))
        if source == "mcts":
            node.source = "mcts"
        return i

    def add_rollout(self, child, sample):
        """Cut a rollout into steps (after each delimiter token, as expansion does) and insert them
        below `child` as a chain of nodes, up to the first terminal step. Returns the last node of
        the chain."""
        toks, lps = sample.tokens, own_logprobs(sample)
        cuts = [j + 1 for j, t in enumerate(toks) if t in self.delim_ids]
        if not cuts or cuts[-1] < len(toks):
            # the last piece ends on eot or was cut short (no tokens at all: an empty step)
            cuts.append(len(toks))
        i, a = child, 0
        for b in cuts:
            i, a = self.add(i, toks[a:b], lps[a:b], "rollout"), b
            if self.nodes[i].terminal:
                break
        return i

    def backup(self, i, value):
        """One evaluation: N += 1, W += value on every node from i up to the root (Q = W/N, a
        running mean)."""
        while i is not None:
            n = self.nodes[i]
            n.N += 1
            n.W += value
            i = n.parent

    def summary(self):
        ends = [n for n in self.nodes if n.terminal]
        wrong = {n.answer.strip() for n in ends if n.reward == 0.0 and n.answer is not None}
        right = sum(n.reward == 1.0 for n in ends)
        return {"simulations": self.sims, "nodes": len(self.nodes), "solved": right > 0,
                "correct_terminals": right, "terminals": len(ends), "wrong_answers": len(wrong),
                "rollouts": self.rollouts, "max_depth": self.max_depth,
                "decoded_tokens": self.decoded, "prefilled_tokens": self.prefilled}

    def to_json(self):
        rec = {k: v for k, v in self.rec.items() if k != "_line"}
        nodes = [{"id": n.id, "parent": n.parent, "depth": n.depth, "text": n.text,
                  "prior": self.prior(n), "N": n.N, "Q": n.Q, "terminal": n.terminal,
                  "answer": n.answer, "reward": n.reward, "source": n.source} for n in self.nodes]
        return {"id": rec["id"], "problem": rec, "nodes": nodes, "stats": self.summary()}


# ----------------------------------------------------------------------------- MCTS

def puct(tree, parent, child, c_puct):
    """Paper §2.2: Q(S,a) + c_puct · π(a|S) · √N(S) / (1 + N(S,a))."""
    return child.Q + c_puct * tree.prior(child) * math.sqrt(parent.N) / (1 + child.N)


def select(tree, c_puct):
    """Descend by PUCT from the root to a node not expanded yet, or to a terminal. Ties go to the
    older child."""
    node = tree.nodes[0]
    while node.expanded and not node.terminal:
        children = (tree.nodes[j] for j in node.children.values())
        node = max(children, key=lambda c: puct(tree, node, c, c_puct))
    return node.id


def early_done(tree):
    """Enough for linearize: one correct ending and >= 3 distinct wrong answers (its default traces
    use up to 2 each, one spare; the main job's k = 3 uses all 3). Wrong endings without any answer
    (no \\boxed{}) do not count."""
    s = tree.summary()
    return s["solved"] and s["wrong_answers"] >= 3


def search(recs, policy, tok, cfg, seed, emit=None):
    """Grow one tree per record, all at once. Each round: one selection per unfinished tree, then
    ONE policy call for all their expansions and ONE for all rollouts. `policy(prompts, nums,
    max_new_tokens=, temperature=, stop_ids=, seed=, keep=)` returns, per prompt, a list of samples
    with .tokens, .logprobs, .stopped (generate.generate's Sample; keep: the samples will be
    extended next, expansions); tests pass a scripted one. Finished
    trees are handed to `emit` in record order as soon as they and all trees before them are
    finished. Returns the trees."""
    delim = step_delimiter(recs[0])
    delim_ids = set(tok.ids_containing(delim))
    step_stops = set(tok.stop_ids) | delim_ids  # a step ends on the delimiter (or the response)
    trees = [Tree(rec, tok, delim_ids, cfg) for rec in recs]
    emitted = 0
    for rnd in range(cfg.num_simulations):
        active = [t for t in trees if not t.done]
        # 1. selection, one per tree
        leaves = []
        for t in active:
            t.sims += 1
            i = select(t, cfg.c_puct)
            if t.nodes[i].terminal:  # a known ending: its verifier value is backed up once more
                t.backup(i, t.nodes[i].reward)
            else:
                leaves.append((t, i))
        # 2. expansion: k next steps for every leaf, one batched call
        prompts = [t.prefix(i) for t, i in leaves]
        outs = policy(prompts, [cfg.k] * len(prompts), max_new_tokens=cfg.max_step_tokens,
                      temperature=cfg.temperature, stop_ids=step_stops,
                      seed=mix(seed, rnd, 0), keep=True) if prompts else []
        fresh = []  # (tree, child) pairs that need rollouts
        for (t, i), prompt, samples in zip(leaves, prompts, outs):
            t.nodes[i].expanded = True
            t.prefilled += len(prompt)
            t.decoded += sum(len(s.tokens) for s in samples)
            children = (t.add(i, s.tokens, own_logprobs(s), "mcts") for s in samples)
            for c in dict.fromkeys(children):  # distinct, in order
                child = t.nodes[c]
                if child.terminal:  # scored by the verifier directly: Q = reward
                    t.backup(c, child.reward)
                elif not child.rolled:
                    child.rolled = True
                    fresh.append((t, c))
        # 3. simulation: M rollouts for every new child, one batched call (each prefix prefilled
        # once, fanned out)
        prompts = [t.prefix(c) for t, c in fresh]
        outs = policy(prompts, [cfg.M] * len(prompts), max_new_tokens=cfg.max_rollout_tokens,
                      temperature=cfg.rollout_temperature, stop_ids=set(tok.stop_ids),
                      seed=mix(seed, rnd, 1), keep=False) if prompts and cfg.M > 0 else []
        for (t, c), prompt, samples in zip(fresh, prompts, outs):
            t.prefilled += len(prompt)
            for s in samples:
                t.rollouts += 1
                t.decoded += len(s.tokens)
                end = t.nodes[t.add_rollout(c, s)]
                # 4. backup; a rollout that ran out of tokens right after a full step has no
                # answer: reward 0
                t.backup(end.id, end.reward if end.terminal else 0.0)
        for t in active:
            if t.sims >= cfg.num_simulations or cfg.early_stop and early_done(t):
                t.done = True
        while emitted < len(trees) and trees[emitted].done:
            if emit:
                emit(trees[emitted])
            emitted += 1
    return trees


# ----------------------------------------------------------------------------- the file of trees

def make_policy(net, cfg, tool=None):
    """The one place the neural policy is called: generate.generate with this run's sampling
    settings (and the task's tool: Countdown's calculator, see tasks.tool), and its own prefix
    cache: a path is prefilled once, then extended from the cache. keep=True: the
    samples' keys/values are kept too (expansions: each new child is rolled out next)."""
    c = net.cfg
    per_token = 2 * c.n_layers * c.n_kv_heads * (c.dim // c.n_heads) * net.output.weight.itemsize
    cache = generate.PrefixCache(cfg.prefix_cache_mb * 2**20 // per_token)

    def policy(prompts, nums, *, max_new_tokens, temperature, stop_ids, seed, keep):
        return generate.generate(net, prompts, nums, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=cfg.top_p, stop_ids=stop_ids,
                                 seed=seed, batch_size=cfg.batch_size, compile=cfg.compile,
                                 tool=tool, prefix_cache=cache if cfg.prefix_cache_mb else None,
                                 cache_samples=keep)
    return policy


def check(cfg, recs):
    """The settings parse_config does not check (it checks the ranges, again here for callers that
    build a Config themselves), and one task per file."""
    common.check_ranges(cfg)
    for r in recs:  # (read_problems already rejects repeated ids, which key the resume)
        if step_delimiter(r) != step_delimiter(recs[0]):
            raise common.UserError(f"{cfg.problems}:{r.get('_line')}: mixes tasks with different "
                                   "step delimiters; search one task per run")


def search_chunks(chunks, todo, done, out_path, cfg, device, dtype, rank, mesh=None):
    """Search the chunks `todo`, appending each tree not in out_path yet (`done`: their ids) as it
    finishes, in problem order. mesh: this rank's tp group (the policy is sharded over it; only its
    first rank writes, and every chunk's summaries must agree across it). Returns the new trees'
    summaries and this run's counts."""
    if todo:
        print(f"rank {rank}: {len(done)} trees already in {out_path}; {len(todo)} chunks to search "
              f"with {cfg.policy}")
        net, tok = checkpoint.load_model(cfg.policy, device=device, dtype=dtype, mesh=mesh)
    writer, group = mesh is None or mesh.get_local_rank() == 0, mesh and mesh.get_group()
    generate.reset_generate_stats()
    t0, new = time.time(), []
    with open(out_path if writer else os.devnull, "a", encoding="utf-8") as f:
        for c in todo:
            tc, n0 = time.time(), len(new)

            def emit(tree):
                if tree.rec["id"] not in done:
                    if writer:
                        common.append_jsonl(f, tree.to_json())
                    new.append(tree.summary())
            # a policy (and prefix cache) per chunk: its trees depend on nothing outside it, so a
            # resumed run that re-runs a chunk grows the same trees; one task per file (check())
            policy = make_policy(net, cfg, tool(chunks[0][0], tok, cfg.oracle))
            search(chunks[c], policy, tok, cfg, mix(cfg.seed, c), emit)
            got, n = new[n0:], max(len(new) - n0, 1)
            if any(g != got for g in common.gather(got, cfg.tp, group)):
                raise RuntimeError(f"chunk {c}: the ranks of a tp group grew different trees")
            print(f"rank {rank} chunk {c + 1}/{len(chunks)}: {len(got)} trees in "
                  f"{time.time() - tc:.1f}s, solved {sum(s['solved'] for s in got) / n:.2f}, "
                  f"mean nodes {sum(s['nodes'] for s in got) / n:.1f}", flush=True)
    gen = generate.generate_stats()
    secs = time.time() - t0
    return new, {"problems": len(new), "seconds": secs, "decode_tokens": gen["decode_tokens"],
                 "prefill_tokens": gen["prefill_tokens"]}


def merge_ranks(run, recs, final, cfg, rank, world, writer=True):
    """Under torchrun each dp rank (rank: its index of `world` dp groups; writer: the first rank of
    its tp group) reports its counts; rank 0 merges every dp rank's trees into `final` in problem
    order and their counts into `run`. Returns the summaries of all trees on rank 0, None on the
    others."""
    if writer:
        common.write_json(os.path.join(cfg.out_dir, f"stats.rank{rank}.json"), run)
    dist.barrier()
    if rank != 0 or not writer:
        return None
    by_id = {}
    for r in range(world):
        trees = common.resume_jsonl(os.path.join(cfg.out_dir, f"trees.rank{r}.jsonl"))
        by_id.update((t["id"], t) for t in trees)
        other = common.read_json(os.path.join(cfg.out_dir, f"stats.rank{r}.json"))
        if r:
            for k in ("problems", "decode_tokens", "prefill_tokens"):
                run[k] += other[k]
            run["seconds"] = max(run["seconds"], other["seconds"])
    merged = [by_id[r["id"]] for r in recs if r["id"] in by_id]
    common.write_jsonl(final, merged)
    return [t["stats"] for t in merged]


def write_stats(run, trees, final, cfg, world):
    """stats.json: this run's counts and rates, and the summary of all trees of the file."""
    n = max(len(trees), 1)
    stats = {**run, "world_size": world,
             "problems_per_s": run["problems"] / max(run["seconds"], 1e-9),
             "decode_tokens_per_s": run["decode_tokens"] / max(run["seconds"], 1e-9),
             "prefill_per_decode": run["prefill_tokens"] / max(run["decode_tokens"], 1),
             "trees": len(trees), "solved_share": sum(s["solved"] for s in trees) / n,
             "mean_nodes": sum(s["nodes"] for s in trees) / n,
             "mean_simulations": sum(s["simulations"] for s in trees) / n,
             "mean_wrong_answers": sum(s["wrong_answers"] for s in trees) / n}
    common.write_json(os.path.join(cfg.out_dir, "stats.json"), stats)
    print(f"{stats['trees']} trees in {final}: solved {stats['solved_share']:.3f}, mean nodes "
          f"{stats['mean_nodes']:.1f} | this run: {run['problems']} problems, "
          f"{stats['problems_per_s']:.2f}/s, decoded {run['decode_tokens']} "
          f"({stats['decode_tokens_per_s']:.0f}/s), prefilled {run['prefill_tokens']} "
          f"({stats['prefill_per_decode']:.2f}x decoded)")


# ----------------------------------------------------------------------------- main

def main(cfg):
    rank, world, local = common.dist_setup()
    device, dtype = common.device_and_dtype(cfg, local)
    recs = read_problems(cfg.problems)
    recs = recs[:cfg.limit] if cfg.limit > 0 else recs
    check(cfg, recs)
    dp_rank, dp, mesh = common.inference_mesh(cfg.tp, device)
    writer = mesh is None or mesh.get_local_rank() == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    final = os.path.join(cfg.out_dir, "trees.jsonl")
    out_path = final if dp == 1 else os.path.join(cfg.out_dir, f"trees.rank{dp_rank}.jsonl")
    # the trees already written (a torn last line is cut: redone), from the same search only; the
    # tp group's writer reads them, and its other ranks search the same chunks
    finished = [[(r["id"], r["stats"]) for r in common.resume_jsonl(out_path)] if writer else None]
    if mesh is not None:
        dist.broadcast_object_list(finished, group=mesh.get_group(), group_src=0)
    finished = finished[0]
    done = {i for i, _ in finished}
    cfg_path = os.path.join(cfg.out_dir, "config.json")
    if done and os.path.exists(cfg_path):
        saved = common.read_json(cfg_path)
        common.check_same_run(saved, common.config_dict(cfg), cfg_path, RESUME_FREE)
    if rank == 0:
        common.write_json(cfg_path, common.config_dict(cfg))

    # fixed chunks in file order; rank r takes chunks r, r+world, ... A chunk's seed depends only
    # on cfg.seed and its index, so a partly written chunk is re-run whole and yields the same
    # trees: only the unwritten ones are appended, and the file ends up byte-identical to an
    # uninterrupted run.
    B = cfg.problems_per_batch
    chunks = [recs[i:i + B] for i in range(0, len(recs), B)]
    todo = [c for c in range(dp_rank, len(chunks), dp)
            if any(r["id"] not in done for r in chunks[c])]
    if not todo and world == 1 and os.path.exists(os.path.join(cfg.out_dir, "stats.json")):
        # keep the stats of the run that searched them
        print(f"{out_path}: all {len(done)} trees already done")
        return
    new, run = search_chunks(chunks, todo, done, out_path, cfg, device, dtype, rank, mesh)
    if dp > 1:
        trees = merge_ranks(run, recs, final, cfg, dp_rank, dp, writer)
        if trees is None:
            return
    elif rank != 0:
        return
    else:
        trees = [s for _, s in finished] + new
    write_stats(run, trees, final, cfg, world)


if __name__ == "__main__":
    common.run_main(main, Config)
