# Example GPU run: RL of a Llama 3 policy (SFT'd on ASTRO traces for MATH) on MATH problems.
# The paths are placeholders: point init at your SFT checkpoint (our format, a Meta or a Hugging
# Face dir).
#   torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py
# Written for an 8B policy. 70B on 8 x 80 GB: add --offload=True --tp=8 --micro_batch=1 (its
# whole bf16 generation copy, 141 GB, fits no GPU; bench/plan.py --model=70B --stage=rl
# --rl_offload=True --rl_generation=tp --rl_micro_batch=1: 53 GB per GPU, 1.27 TB of host memory
# for the offloaded shards).
init = "out/sft_llama_math"  # the ASTRO-SFT policy of config/sft_llama_math.py
train = "data/math/math_train.jsonl"  # python data/math/prepare.py --train=True
val = "data/math/math_val.jsonl"  # held-out MATH problems from the same prepare.py run
out_dir = "out/rl_llama_math"  # this run's own directory
prompts_per_step = 64  # 8 per GPU on 8 GPUs
group_size = 4  # the paper's G
temperature = 1.0
max_new_tokens = 4096  # room for long MATH traces with backtracking; the eval gives as much or
                       # more (config/eval_llama_math.py; a test checks)
gen_batch_size = 128  # rows of up to 4096 new tokens: the KV cache bounds the batch
filter_samples = 8  # keep the "moderately difficult" prompts, as the paper
filter_limit = 8192  # the filter grades this many shuffled problems: a bounded up-front cost
max_steps = 500  # a long run: every prompt a few times over
truncation = "wrong"  # a long run: masked truncations let answers grow unchecked (rl.py docstring)
lr = 1e-6  # the usual rate for RL of 1B-70B models
warmup_steps = 20  # a short warm-up of a long run
micro_batch = 4  # bench/plan.py, 8B on 8 GPUs: 63 GB per GPU with logit_chunk (113 without:
                # the fp32 logits of four 4608-token rows, the policy's and the reference's)
logit_chunk = 1024  # the output layer 1024 positions at a time: 2 GB of logits, not 9.5
kl_beta = 0.001  # a light anchor to the SFT policy over a long run
eval_every = 50  # ten held-out evaluations over the run
eval_limit = 500  # MATH500's size: a steady estimate for its cost
save_every = 25  # a crash loses at most 25 slow steps
dtype = "bfloat16"  # GPUs: bf16 compute (FSDP2's mixed precision), bf16 rollouts and reference
fsdp = True  # 8B with fp32 AdamW state does not fit one GPU
grad_checkpoint = True  # rows of up to 4608 tokens: recompute activations instead of storing them
compile = True  # decode speed over thousands of generated tokens is worth the one-off compile
tp = 1  # 8B: a whole bf16 generation copy and its KV cache fit beside the FSDP2 state
        # (bench/plan.py --stage=rl, its generation phase)
