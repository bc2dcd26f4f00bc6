# RL (GRPO-style) from the ASTRO-SFT policy on the built-in Countdown task (these are rl.py's defaults, spelled out).
# python rl.py config/rl_astro.py
init = "out/sft_astro"
train = "data/countdown/train.jsonl"
val = "data/countdown/val.jsonl"
out_dir = "out/rl_astro"
prompts_per_step = 16
group_size = 4
max_new_tokens = 512
filter_samples = 8
filter_limit = 1024
max_steps = 200
lr = 1e-5
