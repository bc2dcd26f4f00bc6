"""
GPU memory plan: the bytes each GPU holds in each stage for the Llama 3 shapes, and how many 80 GB
GPUs a stage needs. A plan computed from shapes and configs: nothing here runs on a GPU.

    python bench/plan.py --model=8B --gpus=8 --stage=rl      # one model, one stage
    python bench/plan.py --model=all --gpus=8 --stage=all    # every model and stage (README's)
    python bench/plan.py --model=70B --stage=sft --sft_seq_len=4096 --gpu_gb=141   # what if
    python bench/plan.py --model=70B --stage=rl --rl_offload=True --rl_generation=tp  # 70B RL
Models (--model): 1B, 8B, 70B are Llama-3.2-1B (tied embeddings), Llama-3.1-8B and Llama-3.1-70B,
their public configs' shapes in model.ModelConfig (SwiGLU width from model.ffn_hidden, parameters
from model.Llama built on the meta device); "all" prints one column each. Batches and lengths come
from config/sft_llama_math.py, config/rl_llama_math.py, config/search_llama_math.py and
config/eval_llama_math.py; every one is a --key=value override below (prompt_len, the longest
rendered prompt, is an assumption of the plan: no config sets it).

The layouts planned (N = --gpus, tensor parallel degree tp = min(N, gpus_per_node)):
- sft: sft.py with fsdp=True, dtype=bfloat16 and its config: fp32 weights, gradients and AdamW's
  exp_avg and exp_avg_sq sharded over the N ranks by FSDP2 (fully_shard per block, then the root)
  with its bf16 mixed precision (common.fsdp_shard: each group all-gathered in bf16, forward and
  backward in bf16, gradients reduce-scattered in fp32 into the fp32 shards; no autocast), each
  block recomputed in the backward (grad_checkpoint). On one GPU (N = 1) nothing is sharded and
  bf16 is torch.autocast over the fp32 weights (common.autocast). --sft_offload=True plans
  offload=True: the shards, their gradients and AdamW's state live in host memory (FSDP2's
  CPUOffloadPolicy; AdamW steps on the CPU): those rows leave the GPU, and a line under the table
  gives the host memory they take on a node (its min(N, gpus_per_node) ranks' shards).
- rl: rl.py with fsdp=True and its config: that FSDP2 training state and forward (blocks
  recomputed: grad_checkpoint), a bf16 reference policy sharded over the N ranks as the training
  state, and generation on a whole bf16 copy of the policy on every GPU (model.generation_model),
  each rank decoding its share of the step's completions with its own KV cache.
  --rl_generation=tp plans rl.py --tp=tp instead: that copy tensor parallel over the tp GPUs of a
  node (model.tp_copy, refilled from the FSDP2 shards one parameter at a time), the KV cache
  sharded by kv heads over tp, each tp group decoding its share. Either refill holds one whole
  parameter besides for a moment (gathered in bf16), before generation: no row. The reference's
  forward runs between the policy's forward and its backward (rl.update), which then frees its
  root group (a no-grad forward has no backward to reshard it). --rl_offload=True plans
  offload=True: the training state's shards and the reference's in host memory.
- search, eval: what search.py and eval.py run under torchrun with --tp=tp (model.tensor_parallel,
  which refuses a tp that does not divide the heads; more GPUs than tp are data-parallel copies):
  bf16 weights tensor parallel over tp, the KV cache and search's prefix cache sharded by kv heads.
  The weights are loaded straight into each rank's shards, one parameter's part at a time, from
  the memory-mapped checkpoint (checkpoint.load_model(mesh=)): loading adds no row.
Formulas (bytes of one GPU; T = tokens of a micro-batch, n = positions whose logits are computed,
L layers, V vocabulary, d = dim, q = n_heads * head_dim, kv = n_kv_heads * head_dim, H = SwiGLU
width):
- FSDP2 shard of a parameter: dim 0 cut in N chunks as torch.chunk does (rank 0 holds the largest,
  ceil(rows / N) rows). Weights 4 B, gradients 4 B, AdamW 8 B per shard element plus its 4-byte
  step per parameter tensor (fused AdamW). These three are exact, on the GPU or (offload) on the
  host.
- Tensor parallel weights: every matrix split in tp (by rows or by columns; the same size when tp
  divides them, as for the three shapes up to tp = 8), the norms' vectors whole on each GPU.
- KV cache: generate.KVCache's tensors, rows x ceil(n_kv_heads / tp) x S x head_dim per layer for
  keys (stored transposed) and values, S = generate.cache_len(prompt_len + new tokens); rows =
  generate's batch_size
  (rl: gen_batch_size, or fewer when a generation group's share of a step's prompts_per_step *
  group_size completions is smaller). Exact.
- Decode logits: rows * V * 14 (the bf16 logits, their fp32 copy, log-softmax and probabilities).
- Prefix cache (search): prefix_cache_mb MB (2^20 B), its kv heads split over tp.
- Training activations: a = 16d + 6q + 4kv + 4 n_heads + 8H + 8 bytes per token is what a block
  saves for its backward, the same in both layouts: bf16 matmul inputs, attention's q, k, v,
  output and log-sum-exp, SwiGLU's gate/up, silu and product, and the norms' 16d + 8 (under
  autocast: their fp32 outputs, bf16 casts and rsqrt and the fp32 residual; in bf16: each norm's
  fp32 copy of its input, rsqrt, and its bf16 normalized and scaled outputs); rl's plain causal
  rows save the whole qkv and rotated qk instead of per-document copies: a + 2kv. Checkpointing
  keeps each block's input: N > 1, L * T * 2d (the bf16 residual stream; the fp32 rotary tables
  are shared by the blocks, FSDP2's mixed precision leaves its inputs uncast); N = 1, L * T * 4d
  (fp32). One block is recomputed in the backward: T * a (N > 1) or T * a + 2 * (the
  block's matrices: autocast's bf16 copies) (N = 1), counted twice (its saved tensors and the
  gradients flowing through it, estimated at T * a); without recompute all L blocks' saved
  tensors are held. Logits:
  n * V * 16 in the backward (saved fp32 log-softmax, its incoming gradient, a temporary, the
  result), n * V * 8 (sft: fp32 logits and log-softmax) or 12 (rl: the whole row's fp32 logits,
  the completion slice copied, log-softmax) at the end of the forward. sft: n = T (loss_on="all");
  rl: n = T (token_logprobs computes the output layer on the whole row). With logit_chunk (sft.py's
  and rl.py's; model.chunked_logprobs) n = min(T, logit_chunk): the output layer runs that many
  positions at a time and again in the backward.
- Autocast cache (N = 1 only): torch.autocast keeps the bf16 copy of every weight a matmul casts
  until the outermost autocast context exits: by the end of a recomputed forward each GPU holds a
  bf16 copy of every Linear's weight (2 B per element). FSDP2's mixed precision has no such cache:
  a group's bf16 weights are freed after its forward.
- FSDP2 gathers (N > 1, bf16, each parameter's dim 0 padded to a multiple of N as FSDP2 pads):
  the root group (embeddings, final norm, output) stays gathered from the forward to the end of
  the backward, 2 B * root; so at the end of the forward. The backward, estimated: the root's
  weights and its bf16 gradients (held until its reduce-scatter, the backward's last), two
  blocks' weights (one computing, one prefetched), one block's bf16 gradients and the fp32
  reduce-scatter input of the block before (FSDP2 keeps one in flight): 4 B * root + 10 B * block,
  or the root's own reduce-scatter at the end if larger (6 B * root: its gradients and their fp32
  input, its weights freed). Not counted: a group's transient all-gather buffers and
  reduce-scatter output, and with offload the shard copied to the GPU for its gather (at most 6 B
  per shard element of one group). None on one GPU.
- rl's reference forward (N > 1): its root gathered, 2 B * root (exact), and, estimated, two
  blocks gathered (4 B * block) and its logits' n * V * 12, beside the policy's forward-end rows.
  One GPU: its logits only.
- Peak: training holds the persistent rows plus either its forward-end rows (block inputs, autocast
  cache, root gathered, forward logits) or its backward rows (block inputs, gathers, one block
  twice, backward logits); rl adds a phase for the reference's forward (the forward-end rows and
  that forward), and its generation phase holds the persistent rows, the KV cache and decode
  logits instead. Needed per GPU: peak * headroom (allocator fragmentation and cached blocks) +
  runtime_gb (CUDA context, NCCL and cuBLAS workspaces, outside PyTorch's allocator). GPUs needed:
  the smallest N of 1, 2, 4, 8 then multiples of gpus_per_node (up to max_gpus; search and eval
  up to gpus_per_node: more GPUs only add data-parallel copies) whose need fits gpu_gb (GB = 10^9
  bytes; an "80 GB" card holds a little more: the margin is the plan's); offload applies where
  N > 1 (one GPU shards nothing).
Checked by tests (test_all.py, -k "plan or fsdp_update or tensor_parallel"): the weights, gradients
and AdamW bytes against what fully_shard's ranks hold after one step of sft.wrap's bf16 mixed
precision with offload (2 ranks, gloo, CPU: host memory there), and the bf16 storages alive at the
end of its checkpointed forward against the root gathered plus the block inputs, and the root a
bf16 reference holds in its forward (none after rl.update: it reshards); rl's bf16 generation copy
and reference shard against what rl.py builds (2 and 4 ranks); the autocast cache against the bf16
copies alive at the end of one process's checkpointed autocast forward; the KV cache against
generate.py's allocation; the TP weights and KV cache against what model.tensor_parallel's rank 0
holds at tp = 2; a block's saved tensors (T * a, plus its bf16 matrix copies under autocast; packed
and plain rows) against what saved_tensors_hooks lists for one block on CPU, under bf16 autocast
and in a bf16 model (distinct storages). Not checked: CUDA's attention kernels' saved tensors
(flash or memory-efficient SDPA may save other tensors than the CPU kernel), the gradients that
flow through the block in the backward, logits temporaries, the backward's gathers and
reduce-scatter buffers, the reference's forward, allocator fragmentation (headroom) and runtime:
they need a GPU's allocator to measure (torch.cuda.max_memory_allocated): bench/gpu_memory.py does,
on a lent GPU.
Not counted: generate's per-row token and logprob buffers (rows * S * 16 B), prefill's
temporaries and the reference's block activations (one block's, no grad), the final norm's saved
tensors (T * (8d + 4)), the prefix cache's overshoot of its bound, rotary tables (2 * max_seq_len *
head_dim * 4 B per model copy), torch.compile's workspaces; on the host while loading, one
group's copy in the shards' dtype per rank (sft.py and rl.py load a checkpoint memory-mapped as
stored, and common.fsdp_shard casts each group just before sharding it: a test measures it).
"""
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch

import common
import eval as evaluate  # the stage eval.py; its own name would shadow the builtin eval
import generate
import rl
import search
import sft
from model import Llama, ModelConfig, ffn_hidden

GB = 10**9


def stage_config(cfg_class, name):
    """A stage's Config with its GPU config file (config/<name>) applied."""
    return common.parse_config(cfg_class, [os.path.join(ROOT, "config", name)])


SFT = stage_config(sft.Config, "sft_llama_math.py")
RL = stage_config(rl.Config, "rl_llama_math.py")
SEARCH = stage_config(search.Config, "search_llama_math.py")
EVAL = stage_config(evaluate.Config, "eval_llama_math.py")

# the public configs' shapes; rope scaling and norm epsilon change no tensor's size
LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=131072)
MODELS = {
    "1B": ("Llama-3.2-1B", ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                       multiple_of=256, ffn_dim_multiplier=1.5,
                                       tie_embeddings=True, **LLAMA3)),
    "8B": ("Llama-3.1-8B", ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                       multiple_of=1024, ffn_dim_multiplier=1.3, **LLAMA3)),
    "70B": ("Llama-3.1-70B", ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                         multiple_of=4096, ffn_dim_multiplier=1.3, **LLAMA3)),
}
STAGES = ("sft", "rl", "search", "eval")


@dataclass
class Config:
    model: str = "8B"              # 1B | 8B | 70B | all (one column each)
    stage: str = "rl"              # sft | rl | search | eval | all (one table each)
    gpus: int = 8                  # GPUs of the run planned
    gpus_per_node: int = 8         # tensor parallelism stays inside a node
    gpu_gb: float = 80.0           # memory of one GPU, GB (10^9 bytes)
    headroom: float = 1.10         # allocator fragmentation and cached blocks: peak * headroom
    runtime_gb: float = 2.0        # per GPU outside PyTorch's allocator: CUDA context, NCCL, cuBLAS
    max_gpus: int = 1024           # the largest N "GPUs needed" tries
    prompt_len: int = 512          # tokens of the longest rendered prompt (a MATH problem + chat)
    # sft: config/sft_llama_math.py
    sft_seq_len: int = SFT.seq_len
    sft_micro_batch: int = SFT.micro_batch
    sft_grad_checkpoint: bool = SFT.grad_checkpoint
    sft_offload: bool = SFT.offload  # N > 1: FSDP2's shards, gradients, AdamW in host memory
    sft_logit_chunk: int = SFT.logit_chunk  # logits computed this many positions at a time
    # rl: config/rl_llama_math.py
    rl_prompts_per_step: int = RL.prompts_per_step
    rl_group_size: int = RL.group_size
    rl_max_new_tokens: int = RL.max_new_tokens
    rl_gen_batch_size: int = RL.gen_batch_size
    rl_micro_batch: int = RL.micro_batch
    rl_grad_checkpoint: bool = RL.grad_checkpoint
    rl_offload: bool = RL.offload  # N > 1: those and the reference's shard in host memory
    rl_logit_chunk: int = RL.logit_chunk
    rl_generation: str = "copy"    # "copy": rl.py's whole bf16 copy per GPU; "tp": rl.py
                                   # --tp=tp, the copy tensor parallel within a node
    # search: config/search_llama_math.py
    search_batch_size: int = SEARCH.batch_size
    search_max_rollout_tokens: int = SEARCH.max_rollout_tokens
    search_path_len: int = 2048    # tokens of the path a rollout continues (at most a solution;
                                   # max_depth * max_step_tokens = 7680 bounds it)
    search_prefix_cache_mb: int = SEARCH.prefix_cache_mb
    # eval: config/eval_llama_math.py
    eval_batch_size: int = EVAL.batch_size
    eval_max_new_tokens: int = EVAL.max_new_tokens

    ranges = dict(gpus=(1, None), gpus_per_node=(1, None), gpu_gb=(0.0, None),
                  headroom=(1.0, None), runtime_gb=(0.0, None), max_gpus=(1, None),
                  prompt_len=(1, None), sft_seq_len=(1, None), sft_micro_batch=(1, None),
                  rl_prompts_per_step=(1, None), rl_group_size=(1, None),
                  rl_max_new_tokens=(1, None), rl_gen_batch_size=(1, None),
                  rl_micro_batch=(1, None), search_batch_size=(1, None),
                  search_max_rollout_tokens=(1, None), search_path_len=(0, None),
                  search_prefix_cache_mb=(0, None), eval_batch_size=(1, None),
                  eval_max_new_tokens=(1, None), sft_logit_chunk=(0, None),
                  rl_logit_chunk=(0, None))


# ----------------------------------------------------------------------------- parameters

class Params(NamedTuple):
    shapes: dict  # parameter name -> shape (a tied matrix once)
    linear: int   # elements of the Linear weights (what autocast casts to bf16)


_PARAMS = {}


def params(shape):
    """The parameters of model.Llama(shape), built on the meta device (no memory, no init cost)."""
    key = repr(shape)
    if key not in _PARAMS:
        with torch.device("meta"):
            net = Llama(shape)
        shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
        linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
        _PARAMS[key] = Params(shapes, linear)
    return _PARAMS[key]


def chunk0(s, n):
    """Elements of the largest of n parts of a tensor of shape s cut along dim 0 (torch.chunk)."""
    return -(-s[0] // n) * math.prod(s[1:])


def fsdp_state(shape, world):
    """Bytes of the fp32 training state on rank 0 (the largest shards) under FSDP2 over `world`
    ranks: weights, gradients, AdamW state (exp_avg, exp_avg_sq and a 4-byte step per tensor)."""
    shapes = params(shape).shapes.values()
    shard = sum(chunk0(s, world) for s in shapes)
    return {"weights": 4 * shard, "gradients": 4 * shard, "optimizer": 8 * shard + 4 * len(shapes)}


def sharded(shape, world, itemsize=2):
    """Bytes of rank 0's FSDP2 shard of the model in a dtype of `itemsize` bytes."""
    return itemsize * sum(chunk0(s, world) for s in params(shape).shapes.values())


def tensor_parallel(shape, tp, itemsize=2):
    """Bytes per GPU of the model split tensor parallel over tp GPUs (norms replicated)."""
    shapes = params(shape).shapes.values()
    return itemsize * sum(chunk0(s, tp) if len(s) > 1 else math.prod(s) for s in shapes)


# ----------------------------------------------------------------------------- generation

def kv_cache(shape, rows, prompt_len, new_tokens, tp=1, dtype=torch.bfloat16):
    """Bytes per GPU of generate.py's KV cache for `rows` rows of prompt_len + new_tokens, kv heads
    split over tp GPUs: generate.KVCache built on the meta device."""
    S = generate.cache_len([[0] * prompt_len], [0], new_tokens, shape.max_seq_len)
    local = replace(shape, n_kv_heads=-(-shape.n_kv_heads // tp))
    cache = generate.KVCache(local, rows, S, "meta", dtype)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def decode_logits(shape, rows):
    return rows * shape.vocab_size * 14


# ----------------------------------------------------------------------------- training

def saved_per_token(shape, packed):
    """Bytes one block saves for its backward per token (docstring's a), the same under bf16
    autocast over fp32 weights and in bf16 without autocast (FSDP2's mixed precision); packed:
    sft's per-document attention, else rl's plain causal rows."""
    hd = shape.dim // shape.n_heads
    q, kv = shape.n_heads * hd, shape.n_kv_heads * hd
    a = 16 * shape.dim + 6 * q + 4 * kv + 4 * shape.n_heads + 8 * ffn_hidden(shape) + 8
    return a if packed else a + 2 * kv


def autocast_cache(shape):
    """Bytes of the bf16 copies torch.autocast keeps of every Linear weight (whole, unsharded)."""
    return 2 * params(shape).linear


def groups(shape, world=1):
    """(root, block): elements of FSDP2's root group (embeddings, final norm, output) and of one
    block's group as all-gathered over `world` ranks: each parameter's dim 0 padded to a multiple
    of world, as FSDP2 pads (world 1: the parameters as they are)."""
    padded = lambda keep: sum(world * chunk0(s, world) for n, s in params(shape).shapes.items()
                              if keep(n))
    return (padded(lambda n: not n.startswith("layers.")),
            padded(lambda n: n.startswith("layers.0.")))


def training(shape, world, tokens, recompute, logits_fwd, packed, chunk=0, mp=None):
    """(rows, forward-end labels, backward labels) of training's transient memory on one GPU, a
    micro-batch of `tokens` tokens whose logits are all computed, chunk of them at a time if chunk
    (logit_chunk); mp (default: world > 1): FSDP2's bf16 mixed precision, else bf16 autocast over
    fp32 weights. logits_fwd: bytes per logit at the end of the forward; packed: per-document
    attention (saved_per_token)."""
    L, d = shape.n_layers, shape.dim
    a, mp = saved_per_token(shape, packed), world > 1 if mp is None else mp
    root, grp = groups(shape, world)
    logits = min(tokens, chunk or tokens) * shape.vocab_size
    if mp:  # the bf16 residual
        inputs = ("block inputs (bf16)", L * tokens * 2 * d)
        block = tokens * a
    else:  # the fp32 residual; the block's saved tensors include its matrices' bf16 copies
        inputs = ("block inputs (fp32)", L * tokens * 4 * d)
        block = tokens * a + 2 * (groups(shape)[1] - 2 * d)
    rows = {
        inputs[0]: inputs[1],
        "blocks' saved tensors": 0 if recompute else L * block,
        "block in the backward": (block if recompute else 0) + tokens * a,
        "autocast cache (bf16)": autocast_cache(shape) if recompute and not mp else 0,
        "logits, forward": logits * logits_fwd,
        "logits, backward": logits * 16,
        "gathered (bf16), forward": 2 * root if mp else 0,
        "gathered (bf16), backward": max(4 * root + 10 * grp, 6 * root) if mp else 0,
    }
    forward = [inputs[0], "blocks' saved tensors", "autocast cache (bf16)", "logits, forward",
               "gathered (bf16), forward"]
    backward = [inputs[0], "blocks' saved tensors", "block in the backward", "logits, backward",
                "gathered (bf16), backward"]
    return rows, forward, backward


# ----------------------------------------------------------------------------- the stages

class Plan(NamedTuple):
    rows: dict    # label -> bytes per GPU
    phases: dict  # phase -> the labels it holds at once
    setup: str    # the batch and layout, in words
    host: dict    # label -> bytes per rank in host memory (offload), not on its GPU


def shards(n, offload):
    if n == 1:
        return "one GPU (no sharding; bf16 autocast)"
    return f"FSDP2 over {n} GPUs, bf16 mixed precision" + ", offload" * offload


def training_plan(rows, persistent, tr, phases, n, offload):
    """(rows, phases, host) of a training stage: its rows and training's (tr, its triple); the
    persistent rows are held in every phase, the phases given and training's two; offload (N > 1)
    moves the persistent FSDP2 shards (the rows named "FSDP shard") from the GPU to host."""
    moved = [k for k in persistent if "FSDP shard" in k] if offload and n > 1 else []
    host = {k: rows.pop(k) for k in moved}
    keep = [k for k in persistent if k not in host]
    rows.update(tr[0])
    phases = {name: keep + keys for name, keys in phases.items()}
    phases.update({"forward end": keep + tr[1], "backward": keep + tr[2]})
    return rows, phases, host


def plan_sft(shape, n, c):
    st = fsdp_state(shape, n)
    tokens = c.sft_micro_batch * c.sft_seq_len
    tr = training(shape, n, tokens, c.sft_grad_checkpoint, 8, True, c.sft_logit_chunk)
    rows = {"weights (fp32, FSDP shard)": st["weights"],
            "gradients (fp32, FSDP shard)": st["gradients"],
            "AdamW state (fp32, FSDP shard)": st["optimizer"]}
    rows, phases, host = training_plan(rows, list(rows), tr, {}, n, c.sft_offload)
    setup = (f"{shards(n, c.sft_offload)}; micro-batch {c.sft_micro_batch} x {c.sft_seq_len} "
             "tokens" + "; recompute" * c.sft_grad_checkpoint)
    return Plan(rows, phases, setup, host)


def plan_rl(shape, n, c):
    tp = min(n, c.gpus_per_node) if c.rl_generation == "tp" else 1
    dp = max(1, n // tp)  # generation groups
    seqs = -(-c.rl_prompts_per_step * c.rl_group_size // dp)
    gen_rows = min(c.rl_gen_batch_size, seqs)
    gen, kv = ("TP", ", TP") if c.rl_generation == "tp" else ("whole", "")
    st = fsdp_state(shape, n)
    root, block = groups(shape, n)
    row_len = c.prompt_len + c.rl_max_new_tokens
    tr = training(shape, n, c.rl_micro_batch * row_len, c.rl_grad_checkpoint, 12, False,
                  c.rl_logit_chunk)
    held = {"weights (fp32, FSDP shard)": st["weights"],  # in every phase
            "gradients (fp32, FSDP shard)": st["gradients"],
            "AdamW state (fp32, FSDP shard)": st["optimizer"],
            f"generation weights (bf16, {gen})": tensor_parallel(shape, tp),
            "reference (bf16, FSDP shard)": sharded(shape, n)}
    rows = {**held,
            f"KV cache (bf16{kv})": kv_cache(shape, gen_rows, c.prompt_len, c.rl_max_new_tokens,
                                             tp),
            "decode logits": decode_logits(shape, gen_rows),
            "reference forward": (2 * root + 4 * block) * (n > 1) + tr[0]["logits, forward"]}
    phases = {"generation": [f"KV cache (bf16{kv})", "decode logits"],
              "reference forward": tr[1] + ["reference forward"]}
    rows, phases, host = training_plan(rows, list(held), tr, phases, n, c.rl_offload)
    layout = f"TP {tp} x {dp}" if c.rl_generation == "tp" else "a whole copy per GPU"
    setup = (f"{shards(n, c.rl_offload)}; generation {layout}: {gen_rows} rows of "
             f"{c.prompt_len}+{c.rl_max_new_tokens} tokens; micro-batch {c.rl_micro_batch}"
             + "; recompute" * c.rl_grad_checkpoint)
    return Plan(rows, phases, setup, host)


def plan_decode(shape, n, c, rows, new_tokens, context, prefix_mb=0):
    """search and eval: bf16 weights TP within a node, the KV cache of `rows` rows of context +
    new_tokens tokens, the prefix cache's prefix_mb MB (2^20 bytes) split over the kv heads."""
    tp = min(n, c.gpus_per_node)
    rows_ = {"weights (bf16, TP)": tensor_parallel(shape, tp),
             "KV cache (bf16, TP)": kv_cache(shape, rows, context, new_tokens, tp),
             "decode logits": decode_logits(shape, rows)}
    if prefix_mb:
        rows_["prefix cache (bf16, TP)"] = prefix_mb * 2**20 // tp
    setup = f"TP {tp} (--tp={tp}): {rows} rows of {context}+{new_tokens} tokens"
    return Plan(rows_, {"decode": list(rows_)}, setup, {})


def plan_stage(stage, shape, n, c):
    if stage == "sft":
        return plan_sft(shape, n, c)
    if stage == "rl":
        return plan_rl(shape, n, c)
    if stage == "search":
        return plan_decode(shape, n, c, c.search_batch_size, c.search_max_rollout_tokens,
                           c.prompt_len + c.search_path_len, c.search_prefix_cache_mb)
    return plan_decode(shape, n, c, c.eval_batch_size, c.eval_max_new_tokens, c.prompt_len)


def peak(plan):
    """(bytes, phase) of the phase that holds the most."""
    return max((sum(plan.rows[k] for k in keys), name) for name, keys in plan.phases.items())


def need(plan, c):
    """Bytes per GPU the plan needs: its peak with headroom, plus the runtime outside PyTorch."""
    return peak(plan)[0] * c.headroom + c.runtime_gb * GB


def gpus_needed(stage, shape, c):
    """The smallest GPU count whose need fits one GPU, or None. search and eval only shard within
    a node (more GPUs are more data-parallel copies): their count stops at gpus_per_node."""
    top = c.gpus_per_node if stage in ("search", "eval") else c.max_gpus
    tries = sorted({n for n in (1, 2, 4) if n < c.gpus_per_node}
                   | set(range(c.gpus_per_node, top + 1, c.gpus_per_node)))
    return next((n for n in tries if need(plan_stage(stage, shape, n, c), c) <= c.gpu_gb * GB),
                None)


# ----------------------------------------------------------------------------- output

def table(title, columns, rows):
    """Aligned text: the title, a header, one line per (label, [cell per column])."""
    width = max(len(label) for label, _ in rows)
    cols = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(columns)]
    line = lambda label, cells: "  ".join([label.ljust(width)] + [x.rjust(w) for x, w in
                                                                    zip(cells, cols)])
    return "\n".join([title, line("GB per GPU", columns)] + [line(a, b) for a, b in rows])


def stage_table(stage, names, c):
    """The table of one stage at c.gpus GPUs, one column per model name."""
    plans = [plan_stage(stage, MODELS[m][1], c.gpus, c) for m in names]
    gb = lambda b: f"{b / GB:,.2f}"
    rows = [(k, [gb(p.rows[k]) for p in plans]) for k in plans[0].rows
            if any(p.rows[k] for p in plans)]  # rows this layout does not hold are left out
    rows.append(("peak", [f"{gb(peak(p)[0])} ({peak(p)[1]})" for p in plans]))
    rows.append((f"need: peak x {c.headroom:g} + {c.runtime_gb:g}",
                 [gb(need(p, c)) for p in plans]))
    found = [gpus_needed(stage, MODELS[m][1], c) for m in names]
    rows.append((f"GPUs needed ({c.gpu_gb:g} GB each)",
                 [str(n) if n else "none" for n in found]))
    if any(p.host for p in plans):  # offload: the ranks of a node hold their shards on its host
        ranks = min(c.gpus, c.gpus_per_node)
        rows.append((f"host memory per node ({ranks} ranks' offloaded shards)",
                     [gb(ranks * sum(p.host.values())) for p in plans]))
    setups = sorted({p.setup for p in plans})
    title = f"{stage} on {c.gpus} GPU{'s' * (c.gpus > 1)}: " + "; ".join(setups)
    return table(title, [MODELS[m][0] for m in names], rows)


def check(c):
    common.check_ranges(c)
    if c.model != "all" and c.model not in MODELS:
        raise common.UserError(f"model must be one of {', '.join(MODELS)} or all, got {c.model!r}")
    if c.rl_generation not in ("copy", "tp"):
        raise common.UserError(f"rl_generation must be 'copy' or 'tp', got {c.rl_generation!r}")
    if c.stage != "all" and c.stage not in STAGES:
        raise common.UserError(f"stage must be one of {', '.join(STAGES)} or all, "
                               f"got {c.stage!r}")


def main(c):
    check(c)
    names = list(MODELS) if c.model == "all" else [c.model]
    stages = STAGES if c.stage == "all" else (c.stage,)
    print("\n\n".join(stage_table(s, names, c) for s in stages))


if __name__ == "__main__":
    common.run_main(main, Config)
