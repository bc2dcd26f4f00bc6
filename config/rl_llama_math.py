# Example GPU run: RL of a Llama 3 policy (SFT'd on ASTRO traces for MATH) on MATH problems.
# The paths are placeholders: point init at your SFT checkpoint (our format, a Meta or a Hugging Face dir).
# torchrun --standalone --nproc_per_node=8 rl.py config/rl_llama_math.py
init = "out/sft_llama_math"
train = "data/math/math_train.jsonl"  # python data/math/prepare.py --train=True
val = "data/math/math_val.jsonl"
out_dir = "out/rl_llama_math"
prompts_per_step = 64
group_size = 4
temperature = 1.0
max_new_tokens = 4096
gen_batch_size = 128
filter_samples = 8
filter_limit = 8192
max_steps = 500
truncation = "wrong"  # a long run: masked truncations let the answers grow unchecked (rl.py docstring)
lr = 1e-6
warmup_steps = 20
micro_batch = 4
kl_beta = 0.001
eval_every = 50
eval_limit = 500
save_every = 25
dtype = "bfloat16"
compile = True
